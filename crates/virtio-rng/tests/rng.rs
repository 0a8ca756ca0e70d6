//! virtio-rng driven through the MMIO transport.
#![allow(clippy::unwrap_used)]

use supermachine_memory::{Bytes, GuestAddress};
use supermachine_virtio_mmio::F_VERSION_1;
use supermachine_virtio_rng::{MAX_REQUEST, Rng};
use supermachine_virtio_testing::{Allocator, Buf, bring_up, guest_memory, notify, transport};

#[test]
fn buffers_are_filled_with_fresh_entropy_up_to_the_cap() {
    let mem = guest_memory(1 << 20);
    let mut alloc = Allocator::new(0x1000, 1 << 20);
    let (mut dev, irq) = transport(Box::new(Rng::new()), &mem);
    let (mut q, _) = bring_up(&mut dev, &mem, &mut alloc, F_VERSION_1, &[8]);
    let q = &mut q[0];
    let (a, b) = (alloc.alloc(256), alloc.alloc(256));
    q.add(&mem, &[Buf::writable(a, 100), Buf::writable(a + 100, 156)])
        .unwrap();
    q.add(&mem, &[Buf::writable(b, 256)]).unwrap();
    notify(&mut dev, 0);
    assert_eq!(q.pop_used(&mem).unwrap().1, 256);
    assert_eq!(q.pop_used(&mem).unwrap().1, 256);
    assert!(irq.count() >= 1);
    let (mut x, mut y) = ([0u8; 256], [0u8; 256]);
    mem.read_slice(&mut x, GuestAddress(a)).unwrap();
    mem.read_slice(&mut y, GuestAddress(b)).unwrap();
    assert_ne!(x, y);
    assert!(x.iter().any(|&v| v != 0));

    let big = alloc.alloc(MAX_REQUEST as u64 + 4096);
    q.add(&mem, &[Buf::writable(big, MAX_REQUEST as u32 + 4096)])
        .unwrap();
    notify(&mut dev, 0);
    assert_eq!(q.pop_used(&mem).unwrap().1, MAX_REQUEST as u32);

    // A device-readable buffer gets nothing written.
    q.add(&mem, &[Buf::readable(a, 16)]).unwrap();
    notify(&mut dev, 0);
    assert_eq!(q.pop_used(&mem).unwrap().1, 0);
}
