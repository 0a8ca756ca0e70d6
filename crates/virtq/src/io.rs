//! Copying to and from a chain's buffers, never past what its descriptors
//! allow.

use std::io;

use supermachine_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmapped, VolatileSlice,
};
use vm_memory::{ByteValued, ReadVolatile, WriteVolatile};

use crate::chain::Segment;

/// A cursor over a list of segments.
#[derive(Clone, Debug)]
struct Cursor<'a> {
    segments: &'a [Segment],
    /// Offset into `segments[0]`.
    offset: u32,
    remaining: usize,
    done: usize,
}

impl<'a> Cursor<'a> {
    fn new(segments: &'a [Segment]) -> Self {
        Self {
            segments,
            offset: 0,
            remaining: segments.iter().map(|s| s.len as usize).sum(),
            done: 0,
        }
    }

    /// The next contiguous piece, at most `max` bytes.
    fn piece(&self, max: usize) -> Option<(GuestAddress, usize)> {
        let s = self.segments.first()?;
        let len = ((s.len - self.offset) as usize)
            .min(max)
            .min(self.remaining);
        if len == 0 {
            return None;
        }
        // Segments were checked to lie inside RAM, so this cannot wrap.
        Some((GuestAddress(s.addr.0 + u64::from(self.offset)), len))
    }

    /// Moves past `n` bytes; `n` is at most `remaining`.
    fn advance(&mut self, mut n: usize) {
        self.remaining -= n;
        self.done += n;
        while n > 0 {
            let Some(s) = self.segments.first() else {
                return;
            };
            let left = (s.len - self.offset) as usize;
            if n < left {
                self.offset += n as u32;
                return;
            }
            n -= left;
            self.segments = &self.segments[1..];
            self.offset = 0;
        }
    }

    fn skip(&mut self, n: usize) -> usize {
        let n = n.min(self.remaining);
        self.advance(n);
        n
    }

    /// Moves up to `max` bytes piece by piece: `step(addr, len, done)`
    /// moves at most `len` bytes at `addr` (`done` bytes having moved
    /// before it) and says how many it moved. Stops at the end, at a short
    /// step, or at an error; the error is returned only if nothing moved.
    fn transfer(
        &mut self,
        max: usize,
        mut step: impl FnMut(GuestAddress, usize, usize) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut total = 0;
        while total < max {
            let Some((addr, len)) = self.piece(max - total) else {
                break;
            };
            match step(addr, len, total) {
                Ok(n) => {
                    self.advance(n);
                    total += n;
                    if n < len {
                        break;
                    }
                }
                Err(e) if total > 0 => {
                    log::trace!("transfer stopped after {total} bytes: {e}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

fn memory_error(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::other(e)
}

/// Reads a chain's device-readable buffers in order.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    mem: &'a GuestMemoryMmapped,
    cursor: Cursor<'a>,
}

impl<'a> Reader<'a> {
    /// A reader over `segments` (a chain's `readable()`).
    pub fn new(mem: &'a GuestMemoryMmapped, segments: &'a [Segment]) -> Self {
        Self {
            mem,
            cursor: Cursor::new(segments),
        }
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> usize {
        self.cursor.remaining
    }

    /// Bytes read so far.
    pub fn consumed(&self) -> usize {
        self.cursor.done
    }

    /// Skips up to `n` bytes; returns how many were skipped.
    pub fn skip(&mut self, n: usize) -> usize {
        self.cursor.skip(n)
    }

    /// Reads a plain value; fails if fewer than its size remain.
    pub fn read_obj<T: ByteValued>(&mut self) -> io::Result<T> {
        let mut value = T::zeroed();
        io::Read::read_exact(self, value.as_mut_slice())?;
        Ok(value)
    }

    /// Copies up to `max` bytes to `dst` (a file at its current position,
    /// a socket, ...), stopping early when `dst` takes less than offered.
    /// Returns the bytes copied; an error only if none were.
    pub fn copy_to<W: WriteVolatile>(&mut self, dst: &mut W, max: usize) -> io::Result<usize> {
        let mem = self.mem;
        self.cursor
            .transfer(max, |addr, len, _| write_piece(mem, addr, len, dst))
    }
}

impl io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mem = self.mem;
        self.cursor.transfer(buf.len(), |addr, len, done| {
            mem.read_slice(&mut buf[done..done + len], addr)
                .map_err(memory_error)?;
            Ok(len)
        })
    }
}

/// Writes a chain's device-writable buffers in order.
#[derive(Clone, Debug)]
pub struct Writer<'a> {
    mem: &'a GuestMemoryMmapped,
    cursor: Cursor<'a>,
}

impl<'a> Writer<'a> {
    /// A writer over `segments` (a chain's `writable()`).
    pub fn new(mem: &'a GuestMemoryMmapped, segments: &'a [Segment]) -> Self {
        Self {
            mem,
            cursor: Cursor::new(segments),
        }
    }

    /// Bytes of room left.
    pub fn remaining(&self) -> usize {
        self.cursor.remaining
    }

    /// Bytes written so far (what the used ring should report).
    pub fn written(&self) -> usize {
        self.cursor.done
    }

    /// Leaves up to `n` bytes as they are; returns how many were skipped.
    pub fn skip(&mut self, n: usize) -> usize {
        self.cursor.skip(n)
    }

    /// Splits off the last `n` bytes of room as a second writer (a status
    /// byte at the end of a request, say); `None` if fewer remain. This
    /// writer then stops short of them.
    pub fn split_tail(&mut self, n: usize) -> Option<Writer<'a>> {
        let keep = self.remaining().checked_sub(n)?;
        let mut tail = self.clone();
        tail.cursor.skip(keep);
        tail.cursor.done = 0;
        self.cursor.remaining = keep;
        Some(tail)
    }

    /// Writes a plain value; fails if there is not room for all of it.
    pub fn write_obj<T: ByteValued>(&mut self, value: T) -> io::Result<()> {
        io::Write::write_all(self, value.as_slice())
    }

    /// Copies up to `max` bytes from `src` (a file at its current position,
    /// a socket, ...), stopping at end of input or a short read. Returns
    /// the bytes copied; an error only if none were.
    pub fn copy_from<R: ReadVolatile>(&mut self, src: &mut R, max: usize) -> io::Result<usize> {
        let mem = self.mem;
        self.cursor
            .transfer(max, |addr, len, _| read_piece(mem, addr, len, src))
    }
}

impl io::Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mem = self.mem;
        self.cursor.transfer(buf.len(), |addr, len, done| {
            mem.write_slice(&buf[done..done + len], addr)
                .map_err(memory_error)?;
            Ok(len)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One `write(2)`-like call from guest memory: returns what `dst` took.
/// (vm-memory's `write_volatile_to` writes all-or-error, which loses the
/// count of a partial write to a non-blocking socket.)
fn write_piece<W: WriteVolatile>(
    mem: &GuestMemoryMmapped,
    addr: GuestAddress,
    len: usize,
    dst: &mut W,
) -> io::Result<usize> {
    match GuestMemoryBackend::get_slice(mem, addr, len) {
        Ok(slice) => dst.write_volatile(&slice).map_err(volatile_error),
        // The piece spans two memory regions: go through a buffer.
        Err(_) => {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, addr).map_err(memory_error)?;
            dst.write_volatile(&VolatileSlice::from(&mut buf[..]))
                .map_err(volatile_error)
        }
    }
}

/// One `read(2)`-like call into guest memory: returns what `src` gave.
fn read_piece<R: ReadVolatile>(
    mem: &GuestMemoryMmapped,
    addr: GuestAddress,
    len: usize,
    src: &mut R,
) -> io::Result<usize> {
    match GuestMemoryBackend::get_slice(mem, addr, len) {
        Ok(mut slice) => src.read_volatile(&mut slice).map_err(volatile_error),
        Err(_) => {
            let mut buf = vec![0u8; len];
            let n = src
                .read_volatile(&mut VolatileSlice::from(&mut buf[..]))
                .map_err(volatile_error)?;
            mem.write_slice(&buf[..n], addr).map_err(memory_error)?;
            Ok(n)
        }
    }
}

/// Keeps the OS error (EAGAIN, EPIPE, ...) visible through vm-memory's.
fn volatile_error(e: vm_memory::VolatileMemoryError) -> io::Error {
    match e {
        vm_memory::VolatileMemoryError::IOError(io) => io,
        other => io::Error::other(other),
    }
}
