//! The virtio-mmio register interface and its state machine.

use std::sync::Arc;

use supermachine_hypervisor::InterruptLine;
use supermachine_memory::GuestMemoryMmapped;
use supermachine_virtq::{QueueState, Virtqueue};

use crate::device::{ActiveDevice, Interrupt, VirtioDevice};
use crate::{Error, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, MMIO_SIZE};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID reported to the guest ("SMVM").
const VENDOR_ID: u32 = 0x4d56_4d53;

/// Register offsets (virtio-mmio version 2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// `virtio_mmio.device=` for a device at `base` on interrupt `irq`.
pub fn kernel_cmdline_arg(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{irq}", MMIO_SIZE >> 10)
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmapped,
    interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The queues while the driver sets them up; empty once handed to the
    /// device at activation.
    queues: Vec<Virtqueue>,
    active: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// The layout of [`TransportState`]; bumped whenever a field changes.
pub const STATE_VERSION: u32 = 1;

/// Everything needed to recreate a transport and its device in a new VMM:
/// the registers the driver wrote, the interrupt status, each queue, and
/// the device's own bytes. Plain data; restoring checks all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportState {
    /// [`STATE_VERSION`] when saved.
    pub version: u32,
    /// The device ID it was saved from.
    pub device_type: u32,
    /// The status register.
    pub status: u32,
    /// Feature-window selectors and the accepted features.
    pub device_features_sel: u32,
    /// See `device_features_sel`.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The selected queue.
    pub queue_sel: u32,
    /// Interrupt bits not yet acknowledged.
    pub interrupt_status: u32,
    /// `DEVICE_NEEDS_RESET` was set.
    pub needs_reset: bool,
    /// The device was running (its queues are live rings in guest memory).
    pub active: bool,
    /// Every queue, in the device's order.
    pub queues: Vec<QueueState>,
    /// [`VirtioDevice::save_state`].
    pub device: Vec<u8>,
}

impl MmioTransport {
    /// Puts `device` behind a transport that raises `line`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmapped,
        line: Arc<dyn InterruptLine>,
    ) -> Result<Self, Error> {
        let queues = Self::fresh_queues(device.as_ref())?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(line)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            active: false,
        })
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Result<Vec<Virtqueue>, Error> {
        device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Virtqueue::new(size).map_err(|_| Error::QueueSize {
                    device_type: device.device_type(),
                    index,
                    size,
                })
            })
            .collect()
    }

    /// The transport's and device's state, for a snapshot. Call it from the
    /// thread that runs the device, with the vCPUs paused.
    pub fn save(&self) -> TransportState {
        let running = if self.active {
            self.device.queue_states()
        } else {
            None
        };
        // Active but without queues: the device gave up on a broken ring
        // and waits for the driver's reset; it is saved as such.
        let needs_reset = self.interrupt.needs_reset() || (self.active && running.is_none());
        let queues = match running {
            Some(states) => states,
            None if self.active => self
                .device
                .queue_max_sizes()
                .iter()
                .map(|&max_size| QueueState {
                    max_size,
                    size: max_size,
                    ..QueueState::default()
                })
                .collect(),
            None => self.queues.iter().map(Virtqueue::state).collect(),
        };
        TransportState {
            version: STATE_VERSION,
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            needs_reset,
            active: self.active && !needs_reset,
            queues,
            device: self.device.save_state(),
        }
    }

    /// Recreates a transport from [`MmioTransport::save`] around a new
    /// `device` of the same type, on the restored guest memory. A running
    /// device is activated again on its saved rings. The state is checked
    /// as untrusted input: a mismatch is an error, never a panic.
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmapped,
        line: Arc<dyn InterruptLine>,
        state: &TransportState,
    ) -> Result<Self, Error> {
        let bad = |why: String| Error::Restore(why);
        if state.version != STATE_VERSION {
            return Err(bad(format!(
                "state version {} (this build reads {STATE_VERSION})",
                state.version
            )));
        }
        if state.device_type != device.device_type() {
            return Err(bad(format!(
                "saved from device type {}, restoring into type {}",
                state.device_type,
                device.device_type()
            )));
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(bad(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                max_sizes.len()
            )));
        }
        let indirect = state.driver_features & F_INDIRECT_DESC != 0;
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (saved, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.max_size != max {
                return Err(bad(format!(
                    "queue {i} was saved with maximum size {}, the device offers {max}",
                    saved.max_size
                )));
            }
            let q = Virtqueue::from_state(*saved, state.active && indirect)
                .map_err(|e| bad(format!("queue {i}: {e}")))?;
            if state.active {
                q.validate(&mem)
                    .map_err(|e| bad(format!("queue {i}: {e}")))?;
            }
            queues.push(q);
        }
        if state.active && state.status & status::DRIVER_OK == 0 {
            return Err(bad("saved as running without DRIVER_OK".into()));
        }
        device.restore_state(&state.device)?;
        let mut t = Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(line)),
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queues: Vec::new(),
            active: false,
        };
        // Before activation: a restored device may have news for the
        // driver at once (vsock's transport reset), whose bits must add to
        // the saved ones, not be overwritten by them.
        t.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if state.active {
            let active = ActiveDevice {
                mem: t.mem.clone(),
                queues,
                interrupt: t.interrupt.clone(),
                features: t.driver_features,
            };
            t.device.activate(active)?;
            t.active = true;
        } else {
            t.queues = queues;
        }
        Ok(t)
    }

    /// Raises the interrupt again if the driver has anything to look at.
    /// A restore calls it once the vCPUs' interrupt controllers are
    /// restored: an edge raised before is lost (no vCPU to take it, or a
    /// local APIC state written over it), and the driver may not have seen
    /// the one before the snapshot either; an extra one only makes it read
    /// the status again.
    pub fn raise_pending_interrupt(&self) {
        self.interrupt.raise_pending();
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// How many queues the device has (one ioeventfd each).
    pub fn queue_count(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    /// Whether the driver has started the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device's host-side descriptor, for the event loop.
    #[cfg(unix)]
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// The backend descriptor is readable.
    pub fn backend_ready(&mut self) {
        if self.active {
            self.device.backend_ready();
        }
    }

    /// The driver notified queue `index` (from an ioeventfd or a write).
    pub fn queue_notified(&mut self, index: u32) {
        if !self.active || self.interrupt.needs_reset() {
            return;
        }
        match usize::try_from(index) {
            Ok(i) if i < self.queue_count() => self.device.queue_notified(i),
            _ => log::warn!("virtio: notify for nonexistent queue {index}"),
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX
    }

    fn selected_queue(&mut self) -> Option<&mut Virtqueue> {
        if self.status & status::FEATURES_OK == 0 || self.status & status::DRIVER_OK != 0 {
            log::warn!("virtio: queue register written outside queue setup");
            return None;
        }
        let sel = self.queue_sel as usize;
        self.queues.get_mut(sel)
    }

    /// A guest read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = if data.len() != 4 || !offset.is_multiple_of(4) {
            log::warn!("virtio: {}-byte register read at {offset:#x}", data.len());
            0
        } else {
            self.read_register(offset)
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn read_register(&self, offset: u64) -> u32 {
        let sel_queue = || self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => sel_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => sel_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => {
                let needs_reset = if self.interrupt.needs_reset() {
                    status::DEVICE_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            // No shared memory regions: a length of all ones says so.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            // The configuration never changes under the driver's feet.
            reg::CONFIG_GENERATION => 0,
            _ => {
                log::warn!("virtio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    /// A guest write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!("virtio: {}-byte register write at {offset:#x}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            log::warn!("virtio: unaligned register write at {offset:#x}");
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    log::warn!("virtio: driver features written outside negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ if value != 0 => {
                        log::warn!("virtio: driver accepted features beyond bit 63")
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    let size = u16::try_from(value).unwrap_or(0);
                    if let Err(e) = q.set_size(size) {
                        log::warn!("virtio: {e}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table(None, Some(value))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring(Some(value), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring(None, Some(value))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring(Some(value), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring(None, Some(value))),
            reg::QUEUE_NOTIFY => self.queue_notified(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL | reg::QUEUE_RESET => {}
            _ => log::warn!("virtio: write of unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Virtqueue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits until it resets the device.
        if value & self.status != self.status {
            log::warn!(
                "virtio: status {value:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & F_VERSION_1 == 0 {
                log::warn!(
                    "virtio: refusing features {:#x} (unoffered {unknown:#x}, VERSION_1 required)",
                    self.driver_features
                );
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            self.activate();
        }
        if added & status::FAILED != 0 {
            log::info!(
                "virtio: the driver gave up on device type {}",
                self.device.device_type()
            );
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if let Err(e) = q.validate(&self.mem) {
                self.interrupt
                    .device_broken(&format_args!("queue {i} cannot be used: {e}"));
                return;
            }
        }
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let indirect = self.driver_features & F_INDIRECT_DESC != 0;
        let mut queues = std::mem::take(&mut self.queues);
        for q in &mut queues {
            q.set_features(event_idx, indirect);
        }
        let active = ActiveDevice {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        match self.device.activate(active) {
            Ok(()) => self.active = true,
            Err(e) => self.interrupt.device_broken(&e),
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        // Sizes were valid when the transport was created.
        self.queues = Self::fresh_queues(self.device.as_ref()).unwrap_or_default();
        self.interrupt.clear();
    }
}
