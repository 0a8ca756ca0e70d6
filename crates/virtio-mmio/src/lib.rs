//! The virtio-mmio transport (version 2) and the device trait.
//!
//! A [`VirtioDevice`] implements one kind of device; an [`MmioTransport`]
//! puts it on the guest's MMIO bus and runs the register state machine:
//! status, feature negotiation, queue setup, activation and reset.

mod device;
mod transport;

pub use device::{ActiveDevice, Interrupt, VirtioDevice};
pub use supermachine_virtq::QueueState;
pub use transport::{
    MmioTransport, STATE_VERSION, TransportState, kernel_cmdline_arg, reg, status,
};

/// Errors from the transport and its devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device offers a queue size the split ring cannot have.
    #[error("virtio device type {device_type}: queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// The device.
        device_type: u32,
        /// The queue.
        index: usize,
        /// Its offered size.
        size: u16,
    },
    /// The device could not start with what the driver set up.
    #[error("{0}")]
    Activate(String),
    /// A saved state cannot be restored.
    #[error("restoring a virtio device: {0}")]
    Restore(String),
}

/// Bytes of MMIO space each device occupies.
pub const MMIO_SIZE: u64 = 0x1000;

/// `VIRTIO_F_VERSION_1`: the device is a modern (virtio 1.x) device.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Reads `data.len()` bytes of a little-endian config structure at `offset`;
/// bytes past its end read as zero. For `VirtioDevice::read_config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
