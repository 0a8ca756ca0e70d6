//! The Unix event: an eventfd on Linux, a pipe elsewhere.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// A counter another thread bumps to wake a poller. Signals coalesce:
/// [`Event::drain`] reports how many arrived since the last drain.
#[derive(Debug)]
pub struct Event {
    read: OwnedFd,
    /// The write end of the pipe; the eventfd itself on Linux.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    write: OwnedFd,
}

impl Event {
    /// A new, unsignalled event (non-blocking, close-on-exec).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn new() -> io::Result<Self> {
        use rustix::event::{EventfdFlags, eventfd};
        let fd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        Ok(Self { read: fd })
    }

    /// A new, unsignalled event (non-blocking, close-on-exec).
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub fn new() -> io::Result<Self> {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        use rustix::io::{FdFlags, fcntl_setfd};
        let (read, write) = rustix::pipe::pipe()?;
        for fd in [&read, &write] {
            fcntl_setfd(fd, FdFlags::CLOEXEC)?;
            fcntl_setfl(fd, fcntl_getfl(fd)? | OFlags::NONBLOCK)?;
        }
        Ok(Self { read, write })
    }

    /// Signals the event. Never blocks: a counter or pipe that is full
    /// already holds a signal.
    pub fn signal(&self) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let result = rustix::io::write(&self.read, &1u64.to_ne_bytes());
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let result = rustix::io::write(&self.write, &[1]);
        match result {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes every signal so far; returns how many there were (0 if none).
    pub fn drain(&self) -> io::Result<u64> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let mut count = [0u8; 8];
            match rustix::io::read(&self.read, &mut count) {
                Ok(8) => Ok(u64::from_ne_bytes(count)),
                Ok(_) => Ok(0),
                Err(rustix::io::Errno::AGAIN) => Ok(0),
                Err(e) => Err(e.into()),
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let mut total = 0u64;
            let mut buf = [0u8; 64];
            loop {
                match rustix::io::read(&self.read, &mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(rustix::io::Errno::AGAIN) => return Ok(total),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

impl AsFd for Event {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl AsRawFd for Event {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(event: &Event) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            event,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&zero)).unwrap_or(0) == 1
    }

    #[test]
    fn signals_make_it_readable_until_drained() {
        let event = Event::new().unwrap();
        assert!(!readable(&event));
        assert_eq!(event.drain().unwrap(), 0);
        event.signal().unwrap();
        event.signal().unwrap();
        assert!(readable(&event));
        assert_eq!(event.drain().unwrap(), 2);
        assert!(!readable(&event));
    }

    #[test]
    fn a_signal_from_another_thread_wakes_a_poller() {
        let event = std::sync::Arc::new(Event::new().unwrap());
        let signaller = event.clone();
        let thread = std::thread::spawn(move || signaller.signal().unwrap());
        let mut fds = [rustix::event::PollFd::new(
            &*event,
            rustix::event::PollFlags::IN,
        )];
        assert_eq!(rustix::event::poll(&mut fds, None).unwrap(), 1);
        thread.join().unwrap();
        assert_eq!(event.drain().unwrap(), 1);
    }
}
