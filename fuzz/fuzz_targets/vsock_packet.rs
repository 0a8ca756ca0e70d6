//! The vsock packet path: a started vsock device whose TX queue memory is
//! the input, with RX buffers provided for its answers.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use supermachine_virtio_mmio::{F_INDIRECT_DESC, F_VERSION_1};
use supermachine_virtio_testing::{Allocator, Buf, bring_up, guest_memory, notify, transport};
use supermachine_virtio_vsock::Vsock;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let path = dir()
        .path()
        .join(format!("v{}", RUN.fetch_add(1, Ordering::Relaxed)));
    let mem = guest_memory(common::MEM);
    let mut alloc = Allocator::new(0x1000, common::MEM as u64);
    let Ok(vsock) = Vsock::new(3, &path) else {
        return;
    };
    let (mut dev, _) = transport(Box::new(vsock), &mem);
    let (mut queues, _) = bring_up(
        &mut dev,
        &mem,
        &mut alloc,
        F_VERSION_1 | F_INDIRECT_DESC,
        &[16, 16, 4],
    );
    for _ in 0..8 {
        let buf = alloc.alloc(4096);
        let _ = queues[0].add(&mem, &[Buf::writable(buf, 4096)]);
    }
    notify(&mut dev, 0);
    common::scribble(&mem, &queues[1], data);
    notify(&mut dev, 1);
    dev.backend_ready();
});
