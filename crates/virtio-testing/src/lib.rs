//! A guest-side virtio driver for tests: split rings in guest memory and
//! the virtio-mmio bring-up, as a Linux driver would do them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use supermachine_hypervisor::InterruptLine;
use supermachine_virtio_mmio::{MmioTransport, VirtioDevice};

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const F_WRITE: u16 = 2;
/// The buffer is an indirect table.
pub const F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmapped {
    GuestMemoryMmapped::from_ranges(&[(GuestAddress(0), size)]).expect("test guest memory")
}

/// Hands out guest memory for buffers, upward from `next`.
#[derive(Debug, Clone)]
pub struct Allocator {
    next: u64,
    end: u64,
}

impl Allocator {
    /// Allocates from `start..end`.
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }
    /// `len` bytes, 16-byte aligned.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next.next_multiple_of(16);
        assert!(at + len <= self.end, "test allocator exhausted");
        self.next = at + len;
        at
    }
}

/// One buffer of a chain as the driver describes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }
    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// The driver's side of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    /// Entries.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    free: Vec<u16>,
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl DriverQueue {
    /// Lays out a queue of `size` entries from `alloc` and zeroes its rings.
    pub fn new(mem: &GuestMemoryMmapped, alloc: &mut Allocator, size: u16) -> Self {
        let n = u64::from(size);
        let desc = alloc.alloc(16 * n);
        let avail = alloc.alloc(6 + 2 * n);
        let used = alloc.alloc(6 + 8 * n);
        for (addr, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
            mem.write_slice(&vec![0u8; len as usize], GuestAddress(addr))
                .expect("zero rings");
        }
        Self {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Writes descriptor `index` as given, with no checks at all.
    pub fn write_descriptor(
        &self,
        mem: &GuestMemoryMmapped,
        table: u64,
        index: u16,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) {
        let at = GuestAddress(table + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).expect("descriptor write");
    }

    /// Puts `head` in the next available slot and publishes it.
    pub fn publish_head(&mut self, mem: &GuestMemoryMmapped, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Stores the available index (release, as a driver's barrier would).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmapped, idx: u16) {
        mem.store(idx.to_le(), GuestAddress(self.avail + 2), Ordering::Release)
            .expect("avail idx");
    }

    /// Adds a chain of `bufs` and makes it available; returns its head, or
    /// `None` when the table has no room.
    pub fn add(&mut self, mem: &GuestMemoryMmapped, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let indices: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { F_WRITE } else { 0 };
            let next = indices.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_descriptor(mem, self.desc, indices[i], (b.addr, b.len, flags, next));
        }
        let head = indices[0];
        self.in_flight.insert(head, indices);
        self.publish_head(mem, head);
        Some(head)
    }

    /// Adds `bufs` as one indirect table at `table` (room for `bufs.len()`
    /// descriptors) referenced by a single ring descriptor.
    pub fn add_indirect(&mut self, mem: &GuestMemoryMmapped, table: u64, bufs: &[Buf]) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_descriptor(mem, table, i as u16, (b.addr, b.len, flags, i as u16 + 1));
        }
        let head = self.free.pop().expect("free descriptor");
        self.write_descriptor(
            mem,
            self.desc,
            head,
            (table, 16 * bufs.len() as u32, F_INDIRECT, 0),
        );
        self.in_flight.insert(head, vec![head]);
        self.publish_head(mem, head);
        head
    }

    /// The used ring's index as the device last published it.
    pub fn used_idx(&self, mem: &GuestMemoryMmapped) -> u16 {
        u16::from_le(
            mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
                .expect("used idx"),
        )
    }

    /// Takes the next used entry: (head, bytes written), freeing its
    /// descriptors.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmapped) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let mut elem = [0u8; 8];
        mem.read_slice(&mut elem, GuestAddress(self.used + 4 + 8 * slot))
            .expect("used entry");
        self.last_used = self.last_used.wrapping_add(1);
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        if let Ok(head) = u16::try_from(id)
            && let Some(indices) = self.in_flight.remove(&head)
        {
            self.free.extend(indices);
        }
        Some((id, len))
    }

    /// With EVENT_IDX: asks for an interrupt once the used index passes `idx`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmapped, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.store(idx.to_le(), GuestAddress(at), Ordering::Release)
            .expect("used_event");
    }

    /// The available index as this driver has published it.
    pub fn avail_index(&self) -> u16 {
        self.avail_idx
    }

    /// With EVENT_IDX: whether a driver that moved the available index
    /// from `old` to where it is now must notify the device (Linux's
    /// `vring_need_event`).
    pub fn must_notify(&self, mem: &GuestMemoryMmapped, old: u16) -> bool {
        let event = self.avail_event(mem);
        let new = self.avail_idx;
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// With EVENT_IDX: the available index after which the device wants a
    /// notification.
    pub fn avail_event(&self, mem: &GuestMemoryMmapped) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(
            mem.load(GuestAddress(at), Ordering::Acquire)
                .expect("avail_event"),
        )
    }
}

/// Register access to a virtio-mmio device, as a vCPU would do it.
pub trait MmioRegisters {
    /// A read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);

    /// A 32-bit register read.
    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    /// A 32-bit register write.
    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }
}

pub use supermachine_virtio_mmio::{reg, status};

/// Reads the device's 64 offered feature bits.
pub fn device_features(dev: &mut impl MmioRegisters) -> u64 {
    dev.write32(reg::DEVICE_FEATURES_SEL, 0);
    let low = dev.read32(reg::DEVICE_FEATURES);
    dev.write32(reg::DEVICE_FEATURES_SEL, 1);
    let high = dev.read32(reg::DEVICE_FEATURES);
    u64::from(high) << 32 | u64::from(low)
}

/// The Linux driver's bring-up: reset, acknowledge, negotiate `features`
/// (which must be offered), set up `queues` (each laid out from `alloc`
/// with the given size), DRIVER_OK. Returns the driver queues and the
/// final status register.
pub fn bring_up(
    dev: &mut impl MmioRegisters,
    mem: &GuestMemoryMmapped,
    alloc: &mut Allocator,
    features: u64,
    queue_sizes: &[u16],
) -> (Vec<DriverQueue>, u32) {
    dev.write32(reg::STATUS, 0);
    dev.write32(reg::STATUS, status::ACKNOWLEDGE);
    dev.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    dev.write32(reg::DRIVER_FEATURES_SEL, 0);
    dev.write32(reg::DRIVER_FEATURES, features as u32);
    dev.write32(reg::DRIVER_FEATURES_SEL, 1);
    dev.write32(reg::DRIVER_FEATURES, (features >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    dev.write32(reg::STATUS, s);
    let mut queues = Vec::new();
    for (i, &size) in queue_sizes.iter().enumerate() {
        dev.write32(reg::QUEUE_SEL, i as u32);
        let q = DriverQueue::new(mem, alloc, size);
        dev.write32(reg::QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, q.desc),
            (reg::QUEUE_DRIVER_LOW, q.avail),
            (reg::QUEUE_DEVICE_LOW, q.used),
        ] {
            dev.write32(low, addr as u32);
            dev.write32(low + 4, (addr >> 32) as u32);
        }
        dev.write32(reg::QUEUE_READY, 1);
        queues.push(q);
    }
    dev.write32(reg::STATUS, s | status::DRIVER_OK);
    let final_status = dev.read32(reg::STATUS);
    (queues, final_status)
}

impl MmioRegisters for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// An interrupt line that counts its edges, as the guest's interrupt
/// controller would see them.
#[derive(Debug, Default)]
pub struct InterruptCounter(AtomicU64);

impl InterruptCounter {
    /// Edges so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl InterruptLine for InterruptCounter {
    fn trigger(&self) -> supermachine_hypervisor::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `device` behind a transport on `mem`, with a counting interrupt line.
pub fn transport(
    device: Box<dyn VirtioDevice>,
    mem: &GuestMemoryMmapped,
) -> (MmioTransport, Arc<InterruptCounter>) {
    let irq = Arc::new(InterruptCounter::default());
    let t = MmioTransport::new(device, mem.clone(), irq.clone()).expect("transport");
    (t, irq)
}

/// Notifies queue `index` the way a guest driver does (a QueueNotify write).
pub fn notify(dev: &mut impl MmioRegisters, index: u32) {
    dev.write32(reg::QUEUE_NOTIFY, index);
}
