//! The schema of a machine snapshot's state file, and the conversions
//! between it and the live devices. Written down in `docs/snapshot.md`;
//! any change to these types bumps [`FORMAT_VERSION`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use supermachine_hypervisor::{VcpuState, VmState};
use supermachine_virtio_mmio::{QueueState, TransportState};

/// The state file's format version (the header's, checked on every read).
pub const FORMAT_VERSION: u32 = 1;
/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Everything about a paused machine except its RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// The guest architecture ("x86_64").
    pub arch: String,
    /// Guest RAM in bytes; the memory file holds exactly this much.
    pub memory_bytes: u64,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, timer, clock.
    pub vm: VmState,
    /// The COM1 UART.
    pub serial: SerialSnapshot,
    /// The virtio devices, in the order they were placed.
    pub devices: Vec<DeviceSnapshot>,
}

/// A 16550 UART's registers and unread input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// What a virtio device is, as far as recreating its host side goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-blk on a raw image file; the file must still be there with
    /// this size (its contents are the disk's, not the snapshot's).
    Block {
        /// The image file.
        path: PathBuf,
        /// The guest may not write.
        read_only: bool,
        /// Its size in bytes when the snapshot was taken.
        size: u64,
    },
    /// virtio-vsock; the host socket is given anew to each restore.
    Vsock {
        /// The guest's context ID.
        cid: u64,
    },
    /// virtio-rng.
    Entropy,
    /// virtio-net; the backend is given anew to each restore.
    Net {
        /// The guest's MAC address.
        mac: [u8; 6],
        /// The MTU the guest was told.
        mtu: u16,
    },
}

/// One virtio device: what it is, where it sits, and its transport state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// The device.
    pub kind: DeviceKind,
    /// Its MMIO base.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The transport, its queues and the device's own bytes.
    pub transport: SavedTransport,
}

/// [`TransportState`] as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SavedTransport {
    pub version: u32,
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub active: bool,
    pub queues: Vec<SavedQueue>,
    pub device: Vec<u8>,
}

/// A split virtqueue's state as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<&TransportState> for SavedTransport {
    fn from(t: &TransportState) -> Self {
        Self {
            version: t.version,
            device_type: t.device_type,
            status: t.status,
            device_features_sel: t.device_features_sel,
            driver_features_sel: t.driver_features_sel,
            driver_features: t.driver_features,
            queue_sel: t.queue_sel,
            interrupt_status: t.interrupt_status,
            needs_reset: t.needs_reset,
            active: t.active,
            queues: t
                .queues
                .iter()
                .map(|q| SavedQueue {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx_enabled,
                })
                .collect(),
            device: t.device.clone(),
        }
    }
}

impl From<&SavedTransport> for TransportState {
    fn from(t: &SavedTransport) -> Self {
        Self {
            version: t.version,
            device_type: t.device_type,
            status: t.status,
            device_features_sel: t.device_features_sel,
            driver_features_sel: t.driver_features_sel,
            driver_features: t.driver_features,
            queue_sel: t.queue_sel,
            interrupt_status: t.interrupt_status,
            needs_reset: t.needs_reset,
            active: t.active,
            queues: t
                .queues
                .iter()
                .map(|q| QueueState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx_enabled,
                })
                .collect(),
            device: t.device.clone(),
        }
    }
}

impl From<&vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}
