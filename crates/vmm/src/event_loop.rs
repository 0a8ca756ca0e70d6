//! The VMM's event loop: host input for the serial console, virtio queue
//! notifications and device backends, and the wake-up that ends the loop
//! when the VM finishes. It waits on one `supermachine_host::Poller`
//! (epoll on Linux, kqueue on macOS), level-triggered.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use supermachine_host::{Interest, Poller, Trigger};

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

/// Host input: a pollable, readable descriptor.
pub(crate) trait InputSource: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> InputSource for T {}

/// What a token stands for.
#[derive(Clone, Copy, Debug)]
enum Source {
    Finished,
    Input,
    InputRoom,
    Notifier { device: usize, queue: usize },
    Backend { device: usize },
}

/// Borrows a descriptor owned by something the loop keeps alive.
///
/// # Safety
/// `fd` must stay open for as long as the borrow is used.
unsafe fn borrowed(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the caller's promise.
    unsafe { BorrowedFd::borrow_raw(fd) }
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
    fn watch(&mut self, fd: BorrowedFd<'_>, source: Source) -> std::io::Result<()> {
        let token = self.sources.len() as u64;
        self.poller.add(fd, token, Interest::READ, Trigger::Level)?;
        self.sources.push(source);
        Ok(())
    }

    fn room_fd(input: &InputForwarder) -> RawFd {
        input
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .uart
            .events()
            .room
            .as_raw_fd()
    }

    /// Registers everything; a failure ends the VM.
    fn register(&mut self) -> std::io::Result<()> {
        let finished = self.lifecycle.clone();
        self.watch(finished.finished_evt.as_fd(), Source::Finished)?;
        if let Some(input) = self.input.take() {
            self.input_token = self.sources.len() as u64;
            let added = self.watch(input.input.as_fd(), Source::Input);
            match added {
                Ok(()) => {
                    // SAFETY: the UART, and its room event, live as long
                    // as the forwarder this loop owns.
                    let room = unsafe { borrowed(Self::room_fd(&input)) };
                    self.watch(room, Source::InputRoom)?;
                    self.input = Some(input);
                }
                // A regular file cannot be polled; such input is not
                // forwarded.
                Err(e) => log::info!("console input is not forwarded: {e}"),
            }
        }
        for device in 0..self.devices.len() {
            let fds: Vec<RawFd> = self.devices[device]
                .notifiers
                .iter()
                .map(|n| n.as_raw_fd())
                .collect();
            for (queue, fd) in fds.into_iter().enumerate() {
                // SAFETY: the notifier is owned by the subscriber, which
                // this loop owns.
                self.watch(unsafe { borrowed(fd) }, Source::Notifier { device, queue })?;
            }
            if let Some(fd) = self.devices[device].backend {
                // SAFETY: the backend's descriptor belongs to the device,
                // which the subscriber's transport keeps alive.
                self.watch(unsafe { borrowed(fd) }, Source::Backend { device })?;
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
                input.input.as_fd(),
                self.input_token,
                Interest::READ,
                Trigger::Level,
            )
        } else {
            self.poller.delete(input.input.as_fd())
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
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
