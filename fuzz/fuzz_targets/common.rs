//! Shared by the fuzz targets: a guest whose queue memory is the input.

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};
use supermachine_virtio_testing::DriverQueue;

/// Guest RAM for every target.
pub const MEM: usize = 1 << 20;

/// Overwrites a driver queue's descriptor table and available ring with
/// the input (what a hostile driver controls), leaving the used ring.
pub fn scribble(mem: &GuestMemoryMmapped, q: &DriverQueue, data: &[u8]) {
    let end = q.used.min(q.desc + data.len() as u64);
    let n = (end - q.desc) as usize;
    let _ = mem.write_slice(&data[..n], GuestAddress(q.desc));
}
