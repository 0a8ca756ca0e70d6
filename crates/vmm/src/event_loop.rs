//! The VMM's event loop (on `event-manager`): host input for the serial
//! console, virtio queue notifications and device backends, and the
//! wake-up that ends the loop when the VM finishes.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};

use crate::devices::serial::SerialPort;
use crate::devices::virtio::VirtioSubscriber;
use crate::lifecycle::Lifecycle;

/// Ends the loop once the VM has finished.
struct FinishWatcher {
    lifecycle: Arc<Lifecycle>,
}

impl MutEventSubscriber for FinishWatcher {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(e) = ops.add(Events::new(&self.lifecycle.finished_evt, EventSet::IN)) {
            log::error!("event loop: watching for the VM's end: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps<'_>) {
        let _ = self.lifecycle.finished_evt.read();
    }
}

/// Copies host input into the UART's receive FIFO, pausing while it is
/// full so that no byte is dropped.
pub(crate) struct InputForwarder {
    pub(crate) input: Box<dyn InputSource>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    pub(crate) paused: bool,
}

/// Host input: a pollable, readable descriptor.
pub(crate) trait InputSource: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> InputSource for T {}

impl InputForwarder {
    fn input_events(&self) -> Events {
        Events::new_raw(self.input.as_raw_fd(), EventSet::IN)
    }

    fn room_fd(&self) -> RawFd {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .uart
            .events()
            .room
            .as_raw_fd()
    }
}

impl MutEventSubscriber for InputForwarder {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(e) = ops.add(self.input_events()) {
            // A regular file cannot be polled; such input is not forwarded.
            log::info!("console input is not forwarded: {e:?}");
            return;
        }
        if let Err(e) = ops.add(Events::new_raw(self.room_fd(), EventSet::IN)) {
            log::warn!("console input: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        if events.fd() == self.room_fd() {
            let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let _ = serial.uart.events().room.read();
            drop(serial);
            if self.paused {
                self.paused = false;
                if let Err(e) = ops.add(self.input_events()) {
                    log::warn!("console input: resuming: {e:?}");
                }
            }
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = serial.uart.fifo_capacity();
        if room == 0 {
            self.paused = true;
            let _ = ops.remove(self.input_events());
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                let _ = ops.remove(self.input_events());
            }
            Ok(n) => {
                if let Err(e) = serial.uart.enqueue_raw_bytes(&buf[..n]) {
                    log::warn!("console input: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("console input: {e}; no longer forwarded");
                let _ = ops.remove(self.input_events());
            }
        }
    }
}

/// Runs the loop on the calling thread until the VM finishes.
pub(crate) fn run(
    lifecycle: Arc<Lifecycle>,
    input: Option<InputForwarder>,
    devices: Vec<VirtioSubscriber>,
) {
    let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> = match EventManager::new() {
        Ok(m) => m,
        Err(e) => {
            lifecycle.finish(Err(crate::Error::EventLoop(format!("{e:?}"))));
            return;
        }
    };
    use event_manager::SubscriberOps;
    manager.add_subscriber(Box::new(FinishWatcher {
        lifecycle: lifecycle.clone(),
    }));
    if let Some(input) = input {
        manager.add_subscriber(Box::new(input));
    }
    for device in devices {
        manager.add_subscriber(Box::new(device));
    }
    while !lifecycle.is_finished() {
        if let Err(e) = manager.run() {
            lifecycle.finish(Err(crate::Error::EventLoop(format!("{e:?}"))));
        }
    }
}
