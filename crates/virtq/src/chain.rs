//! Walking one descriptor chain, strictly, before a device sees any of it.

use std::mem::size_of;

use supermachine_memory::{Address, Bytes, GuestAddress, GuestMemoryMmapped};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{ByteValued, GuestMemory, Permissions};

/// One descriptor as it lies in guest memory (little-endian fields).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RawDescriptor {
    /// Guest physical address of the buffer (or indirect table).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Index of the next descriptor when `NEXT` is set.
    pub next: u16,
}

// SAFETY: RawDescriptor is repr(C), made of integers only, with no padding
// (8 + 4 + 2 + 2 bytes), so every byte pattern is a valid value.
unsafe impl ByteValued for RawDescriptor {}

/// Size of a descriptor in a table.
pub const DESCRIPTOR_SIZE: u64 = size_of::<RawDescriptor>() as u64;

/// The most entries an indirect table may have: `next` is a `u16`.
pub const MAX_INDIRECT_ENTRIES: u32 = u16::MAX as u32;

/// A guest buffer: `len` bytes at `addr`, known to lie inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A validated descriptor chain: its device-readable buffers, then its
/// device-writable ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u32,
    writable_len: u32,
}

impl Chain {
    /// Index of the chain's first descriptor (what goes in the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }
    /// Buffers the device reads, in order.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }
    /// Buffers the device writes, in order.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }
    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }
    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }
}

/// Why a chain was refused. The request fails; the queue goes on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor's own slot in its table is outside guest RAM.
    #[error("descriptor {index} of the table at {table:#x} is outside guest RAM")]
    DescriptorOutsideRam {
        /// Table address.
        table: u64,
        /// Index in the table.
        index: u32,
    },
    /// A `next` index points past the end of its table.
    #[error("descriptor index {index} is outside a table of {size}")]
    IndexOutOfRange {
        /// The index.
        index: u32,
        /// Entries in the table.
        size: u32,
    },
    /// More links than the table has entries: the chain loops.
    #[error("the chain is longer than its table of {0} descriptors (it loops)")]
    Loop(u32),
    /// An indirect descriptor without `VIRTIO_F_INDIRECT_DESC` negotiated.
    #[error("indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also says `NEXT`.
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    /// An indirect table whose length is 0, not a multiple of 16 bytes, or
    /// holds more than 65535 entries.
    #[error(
        "indirect table of {0} bytes (must be a non-zero multiple of 16, at most 65535 entries)"
    )]
    IndirectLength(u32),
    /// An indirect table that is not inside guest RAM.
    #[error("indirect table {addr:#x}+{len} is outside guest RAM")]
    IndirectOutsideRam {
        /// Table address.
        addr: u64,
        /// Table length.
        len: u32,
    },
    /// A buffer that is not entirely inside guest RAM.
    #[error("buffer {addr:#x}+{len} is outside guest RAM")]
    BufferOutsideRam {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable buffer after a device-writable one.
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// The readable or the writable buffers total 4 GiB or more.
    #[error("the chain's buffers total 4 GiB or more in one direction")]
    TooLarge,
}

/// Walks the chain starting at `head` in the `size`-entry table at `table`.
pub(crate) fn parse(
    mem: &GuestMemoryMmapped,
    table: GuestAddress,
    size: u16,
    head: u16,
    indirect_allowed: bool,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut table = table;
    let mut table_size = u32::from(size);
    let mut index = u32::from(head);
    let mut visited = 0u32;
    let mut in_indirect = false;
    loop {
        if index >= table_size {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table_size,
            });
        }
        visited += 1;
        if visited > table_size {
            return Err(ChainError::Loop(table_size));
        }
        let desc = table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .and_then(|at| mem.read_obj::<RawDescriptor>(at).ok())
            .ok_or(ChainError::DescriptorOutsideRam {
                table: table.0,
                index,
            })?;
        let (addr, len, flags) = (u64::from_le(desc.addr), u32::from_le(desc.len), {
            u32::from(u16::from_le(desc.flags))
        });

        if flags & VRING_DESC_F_INDIRECT != 0 {
            if !indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if flags & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = len / DESCRIPTOR_SIZE as u32;
            if len == 0 || len % DESCRIPTOR_SIZE as u32 != 0 || entries > MAX_INDIRECT_ENTRIES {
                return Err(ChainError::IndirectLength(len));
            }
            if !mem.check_range(GuestAddress(addr), len as usize, Permissions::Read) {
                return Err(ChainError::IndirectOutsideRam { addr, len });
            }
            table = GuestAddress(addr);
            table_size = entries;
            index = 0;
            visited = 0;
            in_indirect = true;
            continue;
        }

        let writable = flags & VRING_DESC_F_WRITE != 0;
        if !writable && !chain.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        if len > 0 {
            let access = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(GuestAddress(addr), len as usize, access) {
                return Err(ChainError::BufferOutsideRam { addr, len });
            }
            let segment = Segment {
                addr: GuestAddress(addr),
                len,
            };
            if writable {
                chain.writable_len = chain
                    .writable_len
                    .checked_add(len)
                    .ok_or(ChainError::TooLarge)?;
                chain.writable.push(segment);
            } else {
                chain.readable_len = chain
                    .readable_len
                    .checked_add(len)
                    .ok_or(ChainError::TooLarge)?;
                chain.readable.push(segment);
            }
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = u32::from(u16::from_le(desc.next));
    }
}
