//! The vsock exchange both ends of the tier-3 vsock test run: each side
//! sends a seeded pattern, half-closes, and expects the SHA-256 of what it
//! sent back as one hex line.

// Each of the two binaries that include this uses only its own half.
#![allow(dead_code)]

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Connections each side opens at once.
pub const CONNECTIONS: usize = 64;
/// Bytes each connection carries from its opener.
pub const BYTES: usize = 256 << 10;
/// The host port guest programs connect to.
pub const HOST_PORT: u32 = 5000;
/// The guest port host programs connect to.
pub const GUEST_PORT: u32 = 6000;

/// `len` pseudo-random bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn digest_line(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}\n")
}

/// The accepting side: reads to end of stream, answers with the digest.
pub fn serve(mut s: impl Read + Write) -> io::Result<()> {
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    s.write_all(digest_line(&all).as_bytes())?;
    s.flush()
}

/// The opening side: sends the pattern for `seed`, half-closes with
/// `shut`, and checks the digest that comes back.
pub fn exchange<S: Read + Write>(
    mut s: S,
    seed: u64,
    shut: impl FnOnce(&S) -> io::Result<()>,
) -> Result<(), String> {
    let data = pattern(seed, BYTES);
    s.write_all(&data)
        .map_err(|e| format!("seed {seed}: send: {e}"))?;
    shut(&s).map_err(|e| format!("seed {seed}: shutdown: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("seed {seed}: reply: {e}"))?;
    if reply == digest_line(&data) {
        Ok(())
    } else {
        Err(format!(
            "seed {seed}: digest mismatch (got {:?})",
            reply.trim()
        ))
    }
}
