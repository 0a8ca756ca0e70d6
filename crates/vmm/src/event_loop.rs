//! The VMM's event loop: host input for the serial console, virtio queue
//! notifications and device backends, and the wake-up that ends the loop
//! when the VM finishes. It waits on one `supermachine_host::Poller`
//! (epoll on Linux, kqueue on macOS, an I/O completion port on Windows),
//! level-triggered.

use std::io::Read;
use std::sync::{Arc, Mutex};

use supermachine_host::{AsPollable, Interest, Pollable, Poller, Trigger};
use supermachine_hypervisor::IoNotifier;

use crate::devices::serial::SerialPort;
use crate::devices::virtio::VirtioSubscriber;
use crate::lifecycle::Lifecycle;

/// Copies host input into the UART's receive FIFO, pausing while it is
/// full so that no byte is dropped.
pub(crate) struct InputForwarder {
    pub(crate) input: Box<dyn InputSource>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    pub(crate) paused: bool,
}

/// Host input: readable, and pollable for when it is. A read that would
/// block (`WouldBlock`) is not an error: the input waits for the next
/// readiness.
pub(crate) trait InputSource: Read + AsPollable + Send {}
impl<T: Read + AsPollable + Send> InputSource for T {}

/// What a token stands for.
#[derive(Clone, Copy, Debug)]
enum Source {
    Finished,
    Input,
    InputRoom,
    Notifier {
        device: usize,
        queue: usize,
    },
    /// A device's host side (vsock, net: Unix only).
    #[cfg_attr(not(unix), allow(dead_code))]
    Backend {
        device: usize,
    },
}

/// `source`, borrowed without its owner's lifetime.
///
/// # Safety
/// What `source` borrows must stay open for as long as the result is
/// used: the loop only does this for what it owns.
unsafe fn unbound(source: Pollable<'_>) -> Pollable<'static> {
    #[cfg(unix)]
    {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the caller's promise.
        unsafe { BorrowedFd::borrow_raw(source.as_raw_fd()) }
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::{AsRawHandle, AsRawSocket, BorrowedHandle, BorrowedSocket};
        match source {
            Pollable::Socket(s) => {
                // SAFETY: the caller's promise.
                let socket = unsafe { BorrowedSocket::borrow_raw(s.as_raw_socket()) };
                Pollable::Socket(socket)
            }
            Pollable::Waitable(h) => {
                // SAFETY: the caller's promise.
                let handle = unsafe { BorrowedHandle::borrow_raw(h.as_raw_handle()) };
                Pollable::Waitable(handle)
            }
        }
    }
}

/// What a queue notifier is watched through: a descriptor (eventfd,
/// pipe) on Unix, an event object on Windows.
///
/// # Safety
/// As for [`unbound`]: the notifier must outlive the result's use.
unsafe fn notifier_source(notifier: &dyn IoNotifier) -> Pollable<'static> {
    #[cfg(unix)]
    // SAFETY: the caller's promise.
    return unsafe { std::os::fd::BorrowedFd::borrow_raw(notifier.as_raw_fd()) };
    #[cfg(windows)]
    // SAFETY: the caller's promise.
    return Pollable::Waitable(unsafe {
        std::os::windows::io::BorrowedHandle::borrow_raw(notifier.as_raw_handle())
    });
}

struct EventLoop {
    poller: Poller,
    /// What each token stands for: the token is the index.
    sources: Vec<Source>,
    /// The host input's token, to watch it again after a pause.
    input_token: u64,
    lifecycle: Arc<Lifecycle>,
    input: Option<InputForwarder>,
    devices: Vec<VirtioSubscriber>,
}

impl EventLoop {
    fn watch(&mut self, pollable: Pollable<'_>, source: Source) -> std::io::Result<()> {
        let token = self.sources.len() as u64;
        self.poller
            .add(pollable, token, Interest::READ, Trigger::Level)?;
        self.sources.push(source);
        Ok(())
    }

    /// The UART's "room in the FIFO again" event.
    fn room(input: &InputForwarder) -> Pollable<'static> {
        let serial = input.serial.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the UART, and its room event, live as long as the
        // forwarder this loop owns.
        unsafe { unbound(serial.uart.events().room.as_pollable()) }
    }

    /// Registers everything; a failure ends the VM.
    fn register(&mut self) -> std::io::Result<()> {
        let finished = self.lifecycle.clone();
        self.watch(finished.finished_evt.as_pollable(), Source::Finished)?;
        if let Some(input) = self.input.take() {
            self.input_token = self.sources.len() as u64;
            let added = self.watch(input.input.as_pollable(), Source::Input);
            match added {
                Ok(()) => {
                    self.watch(Self::room(&input), Source::InputRoom)?;
                    self.input = Some(input);
                }
                // A regular file cannot be polled; such input is not
                // forwarded.
                Err(e) => log::info!("console input is not forwarded: {e}"),
            }
        }
        for device in 0..self.devices.len() {
            let notifiers: Vec<Pollable<'static>> = self.devices[device]
                .notifiers
                .iter()
                // SAFETY: the notifier is owned by the subscriber, which
                // this loop owns.
                .map(|n| unsafe { notifier_source(n.as_ref()) })
                .collect();
            for (queue, pollable) in notifiers.into_iter().enumerate() {
                self.watch(pollable, Source::Notifier { device, queue })?;
            }
            #[cfg(unix)]
            if let Some(fd) = self.devices[device].backend {
                // SAFETY: the backend's descriptor belongs to the device,
                // which the subscriber's transport keeps alive.
                let backend = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                self.watch(backend, Source::Backend { device })?;
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, source: Source) {
        match source {
            Source::Finished => {
                let _ = self.lifecycle.finished_evt.drain();
            }
            Source::Notifier { device, queue } => self.devices[device].queue_notified(queue),
            Source::Backend { device } => self.devices[device].backend_ready(),
            Source::InputRoom => self.input_room(),
            Source::Input => self.input_ready(),
        }
    }

    fn set_input_watched(&mut self, watched: bool) {
        let Some(input) = &self.input else {
            return;
        };
        let result = if watched {
            self.poller.add(
                input.input.as_pollable(),
                self.input_token,
                Interest::READ,
                Trigger::Level,
            )
        } else {
            self.poller.delete(input.input.as_pollable())
        };
        if let Err(e) = result {
            log::warn!("console input: {e}");
        }
    }

    fn input_room(&mut self) {
        let Some(input) = &mut self.input else {
            return;
        };
        let serial = input.serial.lock().unwrap_or_else(|p| p.into_inner());
        let _ = serial.uart.events().room.drain();
        drop(serial);
        if input.paused {
            input.paused = false;
            self.set_input_watched(true);
        }
    }

    fn input_ready(&mut self) {
        let Some(input) = &mut self.input else {
            return;
        };
        let mut serial = input.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = serial.uart.fifo_capacity();
        if room == 0 {
            input.paused = true;
            drop(serial);
            self.set_input_watched(false);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        let stop = match input.input.read(&mut buf[..want]) {
            Ok(0) => true,
            Ok(n) => {
                if let Err(e) = serial.uart.enqueue_raw_bytes(&buf[..n]) {
                    log::warn!("console input: {e}");
                }
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                false
            }
            Err(e) => {
                log::warn!("console input: {e}; no longer forwarded");
                true
            }
        };
        drop(serial);
        if stop {
            self.set_input_watched(false);
        }
    }
}

/// Runs the loop on the calling thread until the VM finishes.
pub(crate) fn run(
    lifecycle: Arc<Lifecycle>,
    input: Option<InputForwarder>,
    devices: Vec<VirtioSubscriber>,
) {
    let poller = match Poller::new() {
        Ok(p) => p,
        Err(e) => {
            lifecycle.finish(Err(crate::Error::EventLoop(e.to_string())));
            return;
        }
    };
    let mut event_loop = EventLoop {
        poller,
        sources: Vec::new(),
        input_token: 0,
        lifecycle: lifecycle.clone(),
        input,
        devices,
    };
    if let Err(e) = event_loop.register() {
        lifecycle.finish(Err(crate::Error::EventLoop(e.to_string())));
        return;
    }
    let mut ready = Vec::new();
    while !lifecycle.is_finished() {
        ready.clear();
        if let Err(e) = event_loop.poller.wait(None, &mut ready) {
            lifecycle.finish(Err(crate::Error::EventLoop(e.to_string())));
            break;
        }
        for r in &ready {
            if let Some(&source) = event_loop.sources.get(r.token as usize) {
                event_loop.dispatch(source);
            }
        }
    }
}
