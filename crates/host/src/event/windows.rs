//! The Windows event: a manual-reset event object and a count.

use std::io;
use std::os::windows::io::{AsHandle, AsRawHandle, BorrowedHandle, FromRawHandle, OwnedHandle};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use windows_sys::Win32::System::Threading::{CreateEventW, ResetEvent, SetEvent};

/// A counter another thread bumps to wake a poller. Signals coalesce:
/// [`Event::drain`] reports how many arrived since the last drain.
#[derive(Debug)]
pub struct Event {
    /// Manual reset: signalled from the first signal until a drain, so a
    /// poller sees it as a level.
    handle: OwnedHandle,
    count: AtomicU64,
}

impl Event {
    /// A new, unsignalled event.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no security attributes, manual reset, initially
        // unsignalled, no name; the call has no other inputs.
        let raw = unsafe { CreateEventW(ptr::null(), 1, 0, ptr::null()) };
        if raw.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `raw` is a new handle that nothing else owns.
            handle: unsafe { OwnedHandle::from_raw_handle(raw) },
            count: AtomicU64::new(0),
        })
    }

    /// Signals the event. Never blocks.
    pub fn signal(&self) -> io::Result<()> {
        // Counted before it is set: a drain that resets the event before
        // this `SetEvent` leaves it set for the next wait, so no signal is
        // lost (at worst a wait wakes to a count of 0).
        self.count.fetch_add(1, Ordering::AcqRel);
        // SAFETY: a valid event handle this value owns.
        if unsafe { SetEvent(self.handle.as_raw_handle()) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes every signal so far; returns how many there were (0 if none).
    pub fn drain(&self) -> io::Result<u64> {
        // SAFETY: a valid event handle this value owns.
        if unsafe { ResetEvent(self.handle.as_raw_handle()) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.count.swap(0, Ordering::AcqRel))
    }
}

impl AsHandle for Event {
    fn as_handle(&self) -> BorrowedHandle<'_> {
        self.handle.as_handle()
    }
}

impl crate::AsPollable for Event {
    fn as_pollable(&self) -> crate::Pollable<'_> {
        crate::Pollable::Waitable(self.handle.as_handle())
    }
}
