//! The device side of a virtio split virtqueue.
//!
//! [`Virtqueue`] wraps `virtio-queue`'s `Queue` (ring indices, EVENT_IDX
//! notification suppression, used entries published with release
//! ordering) and adds what a device facing a hostile driver needs: ring
//! layouts checked before use, and chains parsed strictly into a
//! [`Chain`] of bounds-checked [`Segment`]s that [`Reader`] and
//! [`Writer`] cannot overrun. A bad chain fails only its own request
//! ([`ChainError`]); a broken ring stops only its own device ([`Error`]).

mod chain;
mod io;

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use supermachine_memory::{GuestAddress, GuestMemoryMmapped};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

pub use chain::{Chain, ChainError, DESCRIPTOR_SIZE, RawDescriptor, Segment};
pub use io::{Reader, Writer};
pub use virtio_queue::QueueState;

/// The largest queue the split-ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// A queue that cannot be used as configured (the device needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested size is not a power of two in range.
    #[error("queue size {size} is not a power of two between 1 and {max}")]
    InvalidSize {
        /// Requested.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// The queue was used before the driver made it ready.
    #[error("the queue is not ready")]
    NotReady,
    /// A ring is not aligned as the split-ring format requires.
    #[error("the {ring} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring is not entirely inside guest RAM.
    #[error("the {ring} at {addr:#x} ({len} bytes) is outside guest RAM")]
    OutsideRam {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Two rings share memory.
    #[error("the {0} and the {1} overlap")]
    Overlap(&'static str, &'static str),
    /// The driver claims more new buffers than the queue can hold.
    #[error("the available index moved by {0}, more than the queue size")]
    AvailIndexJump(u16),
    /// The available ring names a head outside the descriptor table.
    #[error("available ring entry {head} is outside the table of {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// Ring memory could not be accessed.
    #[error("ring access failed: {0}")]
    Ring(virtio_queue::Error),
    /// A saved queue state is inconsistent.
    #[error("invalid saved queue state: {0}")]
    InvalidState(virtio_queue::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A chain taken from the available ring: its head (which must go back in
/// the used ring whatever happens) and the parsed chain or why it was
/// refused.
#[derive(Debug)]
pub struct Popped {
    /// Head index, for [`Virtqueue::add_used`].
    pub head: u16,
    /// The chain, or why it is unusable.
    pub chain: std::result::Result<Chain, ChainError>,
}

/// One split virtqueue, device side.
#[derive(Debug)]
pub struct Virtqueue {
    queue: Queue,
    indirect: bool,
}

impl Virtqueue {
    /// A queue offering at most `max_size` entries (a power of two).
    pub fn new(max_size: u16) -> Result<Self> {
        let queue = Queue::new(max_size).map_err(|_| Error::InvalidSize {
            size: max_size,
            max: MAX_QUEUE_SIZE,
        })?;
        Ok(Self {
            queue,
            indirect: false,
        })
    }

    /// The largest size the driver may choose.
    pub fn max_size(&self) -> u16 {
        self.queue.max_size()
    }
    /// The size the driver chose.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }
    /// Whether the driver has made the queue ready.
    pub fn ready(&self) -> bool {
        self.queue.ready()
    }

    /// Sets the size; refused unless a power of two up to `max_size`.
    pub fn set_size(&mut self, size: u16) -> Result<()> {
        self.queue
            .try_set_size(size)
            .map_err(|_| Error::InvalidSize {
                size,
                max: self.max_size(),
            })
    }
    /// Marks the queue ready (or not).
    pub fn set_ready(&mut self, ready: bool) {
        self.queue.set_ready(ready);
    }
    /// Sets half of the descriptor table address.
    pub fn set_desc_table(&mut self, low: Option<u32>, high: Option<u32>) {
        self.queue.set_desc_table_address(low, high);
    }
    /// Sets half of the available ring address.
    pub fn set_avail_ring(&mut self, low: Option<u32>, high: Option<u32>) {
        self.queue.set_avail_ring_address(low, high);
    }
    /// Sets half of the used ring address.
    pub fn set_used_ring(&mut self, low: Option<u32>, high: Option<u32>) {
        self.queue.set_used_ring_address(low, high);
    }
    /// Descriptor table address.
    pub fn desc_table(&self) -> u64 {
        self.queue.desc_table()
    }
    /// Available ring address.
    pub fn avail_ring(&self) -> u64 {
        self.queue.avail_ring()
    }
    /// Used ring address.
    pub fn used_ring(&self) -> u64 {
        self.queue.used_ring()
    }

    /// Applies the negotiated ring features.
    pub fn set_features(&mut self, event_idx: bool, indirect: bool) {
        self.queue.set_event_idx(event_idx);
        self.indirect = indirect;
    }

    /// Back to the state before the driver configured it.
    pub fn reset(&mut self) {
        self.queue.reset();
        self.indirect = false;
    }

    /// Checks the rings before the device starts: ready, aligned, inside
    /// RAM, not overlapping each other.
    pub fn validate(&self, mem: &GuestMemoryMmapped) -> Result<()> {
        if !self.ready() {
            return Err(Error::NotReady);
        }
        let n = u64::from(self.size());
        // Sizes include the EVENT_IDX words, which a driver must provide
        // room for whether or not it negotiates the feature.
        let rings = [
            ("descriptor table", self.desc_table(), 16 * n, 16),
            ("available ring", self.avail_ring(), 6 + 2 * n, 2),
            ("used ring", self.used_ring(), 6 + 8 * n, 4),
        ];
        for (i, &(ring, addr, len, align)) in rings.iter().enumerate() {
            if addr % align != 0 {
                return Err(Error::Misaligned { ring, addr, align });
            }
            let access = if i == 2 {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if addr.checked_add(len).is_none()
                || !mem.check_range(GuestAddress(addr), len as usize, access)
            {
                return Err(Error::OutsideRam { ring, addr, len });
            }
        }
        for (i, a) in rings.iter().enumerate() {
            for b in &rings[i + 1..] {
                if a.1 < b.1 + b.2 && b.1 < a.1 + a.2 {
                    return Err(Error::Overlap(a.0, b.0));
                }
            }
        }
        Ok(())
    }

    /// Takes the next available chain, if any. `Err` means the ring itself
    /// is broken and the device should stop using the queue.
    pub fn pop(&mut self, mem: &GuestMemoryMmapped) -> Result<Option<Popped>> {
        let size = self.size();
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(Error::Ring)?;
        let pending = (avail - Wrapping(self.queue.next_avail())).0;
        if pending == 0 {
            return Ok(None);
        }
        if pending > size {
            return Err(Error::AvailIndexJump(pending));
        }
        let Some(next) = self.queue.iter(mem).map_err(Error::Ring)?.next() else {
            return Err(Error::Ring(virtio_queue::Error::InvalidAvailRingIndex));
        };
        let head = next.head_index();
        if head >= size {
            return Err(Error::HeadOutOfRange { head, size });
        }
        let chain = chain::parse(
            mem,
            GuestAddress(self.desc_table()),
            size,
            head,
            self.indirect,
        );
        if let Err(e) = &chain {
            log::warn!("virtqueue: refusing chain {head}: {e}");
        }
        Ok(Some(Popped { head, chain }))
    }

    /// How far the driver has published buffers (its available index).
    pub fn avail_idx(&self, mem: &GuestMemoryMmapped) -> Result<u16> {
        self.queue
            .avail_idx(mem, Ordering::Acquire)
            .map(|i| i.0)
            .map_err(Error::Ring)
    }

    /// Asks the driver to notify the device when it publishes a buffer
    /// beyond those available now, even if the device has not taken those
    /// yet (plain [`Virtqueue::enable_notification`] asks only past what
    /// the device has taken). Returns the available index the request is
    /// relative to.
    pub fn notify_on_new_buffers(&mut self, mem: &GuestMemoryMmapped) -> Result<u16> {
        if !self.queue.event_idx_enabled() {
            self.enable_notification(mem)?;
            return self.avail_idx(mem);
        }
        let now = self.avail_idx(mem)?;
        let avail_event = self
            .used_ring()
            .checked_add(4 + 8 * u64::from(self.size()))
            .ok_or(Error::Ring(virtio_queue::Error::AddressOverflow))?;
        // `validate` checked that the used ring, this word included, is
        // inside guest RAM.
        mem.store(now.to_le(), GuestAddress(avail_event), Ordering::Release)
            .map_err(|e| Error::Ring(virtio_queue::Error::GuestMemory(e)))?;
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(now)
    }

    /// Serves every available chain with `serve` (which returns the bytes
    /// it wrote; refused chains are returned with 0 without calling it),
    /// until the ring stays empty with notifications re-enabled. Returns
    /// whether the driver wants an interrupt for what was returned.
    pub fn drain(
        &mut self,
        mem: &GuestMemoryMmapped,
        mut serve: impl FnMut(&Chain) -> u32,
    ) -> Result<bool> {
        let mut completed = false;
        loop {
            self.disable_notification(mem)?;
            while let Some(popped) = self.pop(mem)? {
                let written = popped.chain.as_ref().map_or(0, &mut serve);
                self.add_used(mem, popped.head, written)?;
                completed = true;
            }
            if !self.enable_notification(mem)? {
                return Ok(completed && self.needs_notification(mem)?);
            }
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemoryMmapped, head: u16, len: u32) -> Result<()> {
        self.queue.add_used(mem, head, len).map_err(Error::Ring)
    }

    /// Whether the driver wants an interrupt for what was added since the
    /// last call (always, without EVENT_IDX).
    pub fn needs_notification(&mut self, mem: &GuestMemoryMmapped) -> Result<bool> {
        self.queue.needs_notification(mem).map_err(Error::Ring)
    }

    /// Asks the driver for notifications again; true if buffers arrived
    /// meanwhile (process them before sleeping).
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmapped) -> Result<bool> {
        self.queue.enable_notification(mem).map_err(Error::Ring)
    }

    /// Tells the driver notifications are not needed while processing.
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmapped) -> Result<()> {
        self.queue.disable_notification(mem).map_err(Error::Ring)
    }

    /// Everything needed to recreate the queue (for snapshots).
    pub fn state(&self) -> QueueState {
        self.queue.state()
    }

    /// Whether indirect descriptors were negotiated (not in `QueueState`).
    pub fn indirect(&self) -> bool {
        self.indirect
    }

    /// Recreates a queue from [`Virtqueue::state`]; the state is untrusted.
    pub fn from_state(state: QueueState, indirect: bool) -> Result<Self> {
        let queue = Queue::try_from(state).map_err(Error::InvalidState)?;
        Ok(Self { queue, indirect })
    }
}
