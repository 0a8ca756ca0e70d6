//! The block request path: a started virtio-blk device whose queue memory
//! is the input, notified as a guest would.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use supermachine_virtio_blk::Block;
use supermachine_virtio_mmio::{F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1};
use supermachine_virtio_testing::{Allocator, bring_up, guest_memory, notify, transport};

fn image() -> &'static tempfile::NamedTempFile {
    static IMAGE: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().expect("image");
        f.as_file().set_len(64 << 10).expect("image size");
        f
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mem = guest_memory(common::MEM);
    let mut alloc = Allocator::new(0x1000, common::MEM as u64);
    let Ok(block) = Block::open(image().path(), flags & 1 != 0) else {
        return;
    };
    let (mut dev, _) = transport(Box::new(block), &mem);
    let features = F_VERSION_1
        | if flags & 2 != 0 { F_EVENT_IDX } else { 0 }
        | if flags & 4 != 0 { F_INDIRECT_DESC } else { 0 };
    let (queues, _) = bring_up(&mut dev, &mem, &mut alloc, features, &[16]);
    common::scribble(&mem, &queues[0], data);
    notify(&mut dev, 0);
    notify(&mut dev, 0);
});
