//! virtio-mmio devices in the VM: where they sit, how the guest learns of
//! them, and how their notifications reach them.

use std::sync::{Arc, Mutex};

use supermachine_hypervisor::IoNotifier;
use supermachine_virtio_mmio::MmioTransport;

use crate::bus::BusDevice;

/// Offset of the QueueNotify register.
pub(crate) const QUEUE_NOTIFY: u64 = 0x50;

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// Feeds one device its queue notifications and host-side events.
pub(crate) struct VirtioSubscriber {
    pub(crate) name: String,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    /// One per queue, in queue order.
    pub(crate) notifiers: Vec<Box<dyn IoNotifier>>,
    /// The device's host-side descriptor (vsock and net, Unix only).
    #[cfg(unix)]
    pub(crate) backend: Option<std::os::fd::RawFd>,
}

impl VirtioSubscriber {
    /// The guest notified queue `index`.
    pub(crate) fn queue_notified(&mut self, index: usize) {
        if let Err(e) = self.notifiers[index].consume() {
            log::warn!("{}: queue {index} notifier: {e}", self.name);
        }
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_notified(index as u32);
    }

    /// The device's host side has something for it.
    pub(crate) fn backend_ready(&mut self) {
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .backend_ready();
    }
}
