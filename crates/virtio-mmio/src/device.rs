//! What a virtio device implements, and what it gets when it starts.

#[cfg(unix)]
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use supermachine_hypervisor::InterruptLine;
use supermachine_memory::GuestMemoryMmapped;
use supermachine_virtq::{QueueState, Virtqueue};

use crate::Error;

/// Interrupt status bit: a used buffer was added.
pub(crate) const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration (or the device status) changed.
pub(crate) const INT_CONFIG: u32 = 2;

/// The device's interrupt: status bits the driver reads and acknowledges,
/// and the line (an irqfd on KVM) that tells it to look.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Arc<dyn InterruptLine>,
}

impl Interrupt {
    pub(crate) fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::error!("virtio: raising the interrupt failed: {e}");
        }
    }

    /// Tells the driver used buffers are waiting.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// The device cannot go on (the driver broke a queue): sets
    /// `DEVICE_NEEDS_RESET` and tells the driver. The device must stop
    /// using its queues until it is reset.
    pub fn device_broken(&self, why: &dyn std::fmt::Display) {
        log::error!("virtio device needs a reset: {why}");
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    /// Ends a round of queue work (`Virtqueue::drain`'s result, say):
    /// interrupts the driver if it wants one, or marks the device broken.
    /// Returns false when the device must stop using its queues.
    pub fn after_queue_work(
        &self,
        result: supermachine_virtq::Result<bool>,
        what: &dyn std::fmt::Display,
    ) -> bool {
        match result {
            Ok(true) => {
                self.signal_used();
                true
            }
            Ok(false) => true,
            Err(e) => {
                self.device_broken(&format_args!("{what}: {e}"));
                false
            }
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Raises the line again if any status bit is set.
    pub(crate) fn raise_pending(&self) {
        if self.status() != 0
            && let Err(e) = self.line.trigger()
        {
            log::error!("virtio: raising the interrupt failed: {e}");
        }
    }
}

/// What an activated device works with.
#[derive(Debug)]
pub struct ActiveDevice {
    /// Guest memory.
    pub mem: GuestMemoryMmapped,
    /// The queues, validated, in the device's order.
    pub queues: Vec<Virtqueue>,
    /// The interrupt to raise.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

impl ActiveDevice {
    /// Every queue's state as it stands: what a device with nothing taken
    /// and not yet returned reports from [`VirtioDevice::queue_states`].
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(Virtqueue::state).collect()
    }
}

/// One kind of virtio device, behind any transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 4 = entropy, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// The largest size of each queue (powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits offered. The transport adds
    /// `VERSION_1`, `INDIRECT_DESC` and `EVENT_IDX`.
    fn features(&self) -> u64;
    /// Reads the device's configuration space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (read-only unless overridden).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "virtio: ignoring a {}-byte write to read-only config offset {offset:#x}",
            data.len()
        );
    }
    /// Starts the device with the driver's queues (`Error::Activate` if it
    /// cannot).
    fn activate(&mut self, device: ActiveDevice) -> Result<(), Error>;
    /// Stops the device and forgets everything the driver set up.
    fn reset(&mut self);
    /// The driver notified queue `index` (only after activation).
    fn queue_notified(&mut self, index: usize);
    /// A descriptor the event loop should watch for host-side work. Unix
    /// only: the devices that have one (vsock, net) are not built for
    /// Windows yet.
    #[cfg(unix)]
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// `backend_fd` became readable.
    fn backend_ready(&mut self) {}

    // ---- Snapshots: called on the event-loop thread with vCPUs paused.

    /// The queues' state while the device is active (`None` otherwise), as
    /// the driver would find them if the device stopped now: a buffer
    /// taken from a ring but not yet returned must be wound back onto it,
    /// so that the restored device takes it again and none is lost.
    fn queue_states(&self) -> Option<Vec<QueueState>>;
    /// State beyond the queues and registers, as bytes only this device
    /// type reads back. Devices that keep none return nothing.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes back what [`VirtioDevice::save_state`] returned, before the
    /// restored device is activated. The bytes are untrusted.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), Error> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(Error::Restore(format!(
                "device type {} keeps no state, but the snapshot has {} bytes",
                self.device_type(),
                state.len()
            )))
        }
    }
}
