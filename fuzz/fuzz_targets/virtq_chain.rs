//! Chain parsing: the input is the descriptor table and available ring of
//! a queue; every chain is popped, read, written and returned.
#![no_main]

#[path = "common.rs"]
mod common;

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use supermachine_virtio_testing::{Allocator, DriverQueue, guest_memory};
use supermachine_virtq::{Reader, Virtqueue, Writer};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mem = guest_memory(common::MEM);
    let mut alloc = Allocator::new(0x1000, common::MEM as u64);
    let size = 1u16 << (flags % 8);
    let driver = DriverQueue::new(&mem, &mut alloc, size);
    common::scribble(&mem, &driver, data);
    let Ok(mut q) = Virtqueue::new(128) else {
        return;
    };
    if q.set_size(size).is_err() {
        return;
    }
    q.set_desc_table(Some(driver.desc as u32), Some(0));
    q.set_avail_ring(Some(driver.avail as u32), Some(0));
    q.set_used_ring(Some(driver.used as u32), Some(0));
    q.set_features(flags & 0x40 != 0, flags & 0x80 != 0);
    q.set_ready(true);
    if q.validate(&mem).is_err() {
        return;
    }
    let mut sink = vec![0u8; 4096];
    for _ in 0..256 {
        match q.pop(&mem) {
            Ok(Some(popped)) => {
                let mut written = 0;
                if let Ok(chain) = &popped.chain {
                    let mut r = Reader::new(&mem, chain.readable());
                    while let Ok(n) = r.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                    let mut w = Writer::new(&mem, chain.writable());
                    let _ = w.split_tail(1);
                    while let Ok(n) = w.write(&sink) {
                        if n == 0 {
                            break;
                        }
                    }
                    written = w.written() as u32;
                }
                let _ = q.add_used(&mem, popped.head, written);
                let _ = q.needs_notification(&mem);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = q.enable_notification(&mem);
});
