//! What the two halves of `cargo xtask bench virtio` agree on: the guest
//! program (`bench-peer`) and the host runner (`supermachine-e2e
//! bench-virtio`).

// Each of the two binaries that include this uses only part of it.
#![allow(dead_code)]

/// The guest port the host connects to; each connection starts with one
/// command byte.
pub const PORT: u32 = 7000;
/// Echo fixed-size messages until end of stream (round-trip latency).
pub const ECHO: u8 = b'E';
/// Read to end of stream, then answer with the byte count (8 bytes, LE).
pub const SINK: u8 = b'S';
/// Read a byte count (8 bytes, LE), send that many bytes, then close.
pub const SOURCE: u8 = b'G';
/// The benchmark is over: the guest program exits and the guest powers off.
pub const QUIT: u8 = b'Q';
/// Bytes in one round-trip message.
pub const MESSAGE: usize = 64;
/// Bytes per I/O in the block benchmark (and its host baseline).
pub const BLOCK_IO: usize = 1 << 20;
/// The guest's result lines: `BENCH-BLK write|read BYTES NANOS`.
pub const BLK_LINE: &str = "BENCH-BLK";

use std::io::{self, Read, Write};

/// `ECHO`: sends every `MESSAGE`-byte message back until end of stream.
pub fn echo(mut s: impl Read + Write) -> io::Result<()> {
    let mut message = [0u8; MESSAGE];
    loop {
        match s.read_exact(&mut message) {
            Ok(()) => s.write_all(&message)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// `SINK`: counts bytes to end of stream and answers with the count.
pub fn sink(mut s: impl Read + Write) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    s.write_all(&total.to_le_bytes())
}

/// `SOURCE`: sends as many bytes as asked for, then half-closes with
/// `shut`.
pub fn source<S: Read + Write>(
    mut s: S,
    shut: impl FnOnce(&S) -> io::Result<()>,
) -> io::Result<()> {
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    let mut left = u64::from_le_bytes(count);
    let buf = vec![0x5au8; 1 << 16];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    shut(&s)
}
