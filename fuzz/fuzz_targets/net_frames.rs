//! The virtio-net transmit path and the egress policy: a started device
//! (deny-private, so every frame is parsed) given the input as one frame
//! in a well-formed chain (header flags and checksum offsets included),
//! then as its TX queue memory, with receive buffers for its answers;
//! then as the backend's byte stream.
#![no_main]

#[path = "common.rs"]
mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use supermachine_virtio_mmio::{F_INDIRECT_DESC, F_VERSION_1};
use supermachine_virtio_net::{EgressPolicy, Net, NetConfig, PolicyMode, StreamBackend};
use supermachine_virtio_testing::{Allocator, Buf, bring_up, guest_memory, notify, transport};

fuzz_target!(|data: &[u8]| {
    let mem = guest_memory(common::MEM);
    let mut alloc = Allocator::new(0x1000, common::MEM as u64);
    let Ok((ours, mut peer)) = UnixStream::pair() else {
        return;
    };
    let Ok(backend) = StreamBackend::new(ours) else {
        return;
    };
    let config = NetConfig {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        mtu: 65520,
        policy: EgressPolicy {
            mode: PolicyMode::DenyPrivate,
            ..EgressPolicy::default()
        },
    };
    let Ok(net) = Net::new(config, Box::new(backend)) else {
        return;
    };
    let (mut dev, _) = transport(Box::new(net), &mem);
    let features = F_VERSION_1 | F_INDIRECT_DESC | 1 << 0 | 1 << 15;
    let (mut queues, _) = bring_up(&mut dev, &mem, &mut alloc, features, &[16, 16]);
    for _ in 0..8 {
        let buf = alloc.alloc(4096);
        let _ = queues[0].add(&mem, &[Buf::writable(buf, 4096)]);
    }
    notify(&mut dev, 0);
    let frame = alloc.alloc(data.len().max(1) as u64);
    let _ = supermachine_memory::Bytes::write_slice(&mem, data, supermachine_memory::GuestAddress(frame));
    let _ = queues[1].add(&mem, &[Buf::readable(frame, data.len() as u32)]);
    notify(&mut dev, 1);
    common::scribble(&mem, &queues[1], data);
    notify(&mut dev, 1);
    // The same bytes as a backend stream (length prefixes and all).
    let _ = peer.set_nonblocking(true);
    let _ = peer.write_all(data);
    dev.backend_ready();
});
