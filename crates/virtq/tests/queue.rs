//! The queue engine driven by an in-process guest driver.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};
use supermachine_virtio_testing::{
    Allocator, Buf, DriverQueue, F_INDIRECT, F_NEXT, F_WRITE, guest_memory,
};
use supermachine_virtq::{ChainError, Error, Reader, Virtqueue, Writer};

const MEM: usize = 1 << 20;

struct Setup {
    mem: GuestMemoryMmapped,
    alloc: Allocator,
    driver: DriverQueue,
    queue: Virtqueue,
}

fn setup(size: u16) -> Setup {
    let mem = guest_memory(MEM);
    let mut alloc = Allocator::new(0x1000, MEM as u64);
    let driver = DriverQueue::new(&mem, &mut alloc, size);
    let mut queue = Virtqueue::new(256).unwrap();
    queue.set_size(size).unwrap();
    queue.set_desc_table(Some(driver.desc as u32), Some(0));
    queue.set_avail_ring(Some(driver.avail as u32), Some(0));
    queue.set_used_ring(Some(driver.used as u32), Some(0));
    queue.set_features(false, true);
    queue.set_ready(true);
    queue.validate(&mem).unwrap();
    Setup {
        mem,
        alloc,
        driver,
        queue,
    }
}

#[test]
fn a_chain_is_read_and_written_across_its_buffers_then_returned() {
    let mut s = setup(8);
    let (a, b, c) = (s.alloc.alloc(3), s.alloc.alloc(5), s.alloc.alloc(6));
    s.mem.write_slice(b"abc", GuestAddress(a)).unwrap();
    s.mem.write_slice(b"defgh", GuestAddress(b)).unwrap();
    let head = s
        .driver
        .add(
            &s.mem,
            &[
                Buf::readable(a, 3),
                Buf::readable(b, 5),
                Buf::writable(c, 6),
            ],
        )
        .unwrap();

    let popped = s.queue.pop(&s.mem).unwrap().unwrap();
    assert_eq!(popped.head, head);
    let chain = popped.chain.unwrap();
    assert_eq!((chain.readable_len(), chain.writable_len()), (8, 6));
    let mut r = Reader::new(&s.mem, chain.readable());
    let mut text = String::new();
    r.read_to_string(&mut text).unwrap();
    assert_eq!(text, "abcdefgh");
    let mut w = Writer::new(&s.mem, chain.writable());
    assert_eq!(
        w.write(b"0123456789").unwrap(),
        6,
        "bounded by the descriptor"
    );
    assert_eq!(w.written(), 6);
    s.queue.add_used(&s.mem, head, 6).unwrap();
    assert!(s.queue.needs_notification(&s.mem).unwrap());
    assert_eq!(s.driver.pop_used(&s.mem), Some((u32::from(head), 6)));
    let mut out = [0u8; 6];
    s.mem.read_slice(&mut out, GuestAddress(c)).unwrap();
    assert_eq!(&out, b"012345");
    assert!(s.queue.pop(&s.mem).unwrap().is_none());
}

#[test]
fn indirect_tables_are_followed() {
    let mut s = setup(4);
    let (table, a, b) = (s.alloc.alloc(48), s.alloc.alloc(4), s.alloc.alloc(4));
    s.mem.write_slice(b"wxyz", GuestAddress(a)).unwrap();
    let head = s.driver.add_indirect(
        &s.mem,
        table,
        &[
            Buf::readable(a, 4),
            Buf::readable(a, 2),
            Buf::writable(b, 4),
        ],
    );
    let chain = s.queue.pop(&s.mem).unwrap().unwrap().chain.unwrap();
    assert_eq!(chain.head(), head);
    assert_eq!(chain.readable().len(), 2);
    assert_eq!(chain.writable_len(), 4);
}

#[test]
fn split_tail_keeps_the_status_byte_apart() {
    let mut s = setup(4);
    let (a, b) = (s.alloc.alloc(10), s.alloc.alloc(1));
    s.driver
        .add(&s.mem, &[Buf::writable(a, 10), Buf::writable(b, 1)])
        .unwrap();
    let chain = s.queue.pop(&s.mem).unwrap().unwrap().chain.unwrap();
    let mut w = Writer::new(&s.mem, chain.writable());
    let mut status = w.split_tail(1).unwrap();
    assert_eq!(w.write(&[7u8; 64]).unwrap(), 10);
    status.write_obj(9u8).unwrap();
    assert!(status.write_obj(1u8).is_err());
    assert_eq!(s.mem.read_obj::<u8>(GuestAddress(b)).unwrap(), 9);
    assert_eq!(s.mem.read_obj::<u8>(GuestAddress(a + 9)).unwrap(), 7);
}

/// Makes `head` available after writing `descs` (index, descriptor) raw.
/// (index in the table, (addr, len, flags, next)).
type RawDesc = (u16, (u64, u32, u16, u16));
type Expect = fn(&ChainError) -> bool;

fn raw_chain(s: &mut Setup, descs: &[RawDesc], head: u16) -> ChainError {
    for &(i, d) in descs {
        s.driver.write_descriptor(&s.mem, s.driver.desc, i, d);
    }
    s.driver.publish_head(&s.mem, head);
    let popped = s.queue.pop(&s.mem).unwrap().unwrap();
    assert_eq!(popped.head, head);
    let err = popped.chain.unwrap_err();
    // A refused request still goes back to the driver, and the queue goes on.
    s.queue.add_used(&s.mem, head, 0).unwrap();
    assert_eq!(s.driver.pop_used(&s.mem), Some((u32::from(head), 0)));
    err
}

#[test]
fn hostile_chains_fail_their_request_only() {
    let mut s = setup(8);
    let buf = s.alloc.alloc(64);
    let ram = MEM as u64;
    let cases: Vec<(Vec<RawDesc>, Expect)> = vec![
        // A loop: 0 -> 1 -> 0.
        (
            vec![(0, (buf, 8, F_NEXT, 1)), (1, (buf, 8, F_NEXT, 0))],
            |e| matches!(e, ChainError::Loop(8)),
        ),
        // Next index past the table.
        (vec![(0, (buf, 8, F_NEXT, 200))], |e| {
            matches!(e, ChainError::IndexOutOfRange { index: 200, .. })
        }),
        // Buffer outside RAM, straddling its end, and wrapping the address space.
        (vec![(0, (ram, 1, 0, 0))], |e| {
            matches!(e, ChainError::BufferOutsideRam { .. })
        }),
        (vec![(0, (ram - 4, 8, F_WRITE, 0))], |e| {
            matches!(e, ChainError::BufferOutsideRam { .. })
        }),
        (vec![(0, (u64::MAX - 2, 16, 0, 0))], |e| {
            matches!(e, ChainError::BufferOutsideRam { .. })
        }),
        // Readable after writable.
        (
            vec![(0, (buf, 8, F_WRITE | F_NEXT, 1)), (1, (buf, 8, 0, 0))],
            |e| matches!(e, ChainError::ReadableAfterWritable),
        ),
        // Lengths whose sum overflows 32 bits (buffers overlap, which is allowed).
        (
            vec![
                (0, (0, 0x8000_0000, F_NEXT, 1)),
                (1, (0, 0x8000_0000, 0, 0)),
            ],
            |e| {
                matches!(
                    e,
                    ChainError::BufferOutsideRam { .. } | ChainError::TooLarge
                )
            },
        ),
        // Indirect with NEXT, with a bad length, outside RAM.
        (vec![(0, (buf, 32, F_INDIRECT | F_NEXT, 1))], |e| {
            matches!(e, ChainError::IndirectWithNext)
        }),
        (vec![(0, (buf, 17, F_INDIRECT, 0))], |e| {
            matches!(e, ChainError::IndirectLength(17))
        }),
        (vec![(0, (buf, 0, F_INDIRECT, 0))], |e| {
            matches!(e, ChainError::IndirectLength(0))
        }),
        (vec![(0, (ram - 16, 32, F_INDIRECT, 0))], |e| {
            matches!(e, ChainError::IndirectOutsideRam { .. })
        }),
    ];
    for (descs, expected) in cases {
        let err = raw_chain(&mut s, &descs, 0);
        assert!(expected(&err), "unexpected error {err:?} for {descs:x?}");
    }
}

#[test]
fn nested_or_unnegotiated_indirect_tables_are_refused() {
    let mut s = setup(4);
    let table = s.alloc.alloc(32);
    // The indirect table's first entry is itself indirect.
    s.driver
        .write_descriptor(&s.mem, table, 0, (table, 32, F_INDIRECT, 0));
    let err = raw_chain(&mut s, &[(0, (table, 32, F_INDIRECT, 0))], 0);
    assert_eq!(err, ChainError::NestedIndirect);
    // A loop inside an indirect table.
    s.driver
        .write_descriptor(&s.mem, table, 0, (table, 4, F_NEXT, 1));
    s.driver
        .write_descriptor(&s.mem, table, 1, (table, 4, F_NEXT, 0));
    let err = raw_chain(&mut s, &[(0, (table, 32, F_INDIRECT, 0))], 0);
    assert_eq!(err, ChainError::Loop(2));

    s.queue.set_features(false, false);
    let err = raw_chain(&mut s, &[(0, (table, 32, F_INDIRECT, 0))], 0);
    assert_eq!(err, ChainError::IndirectNotNegotiated);
}

#[test]
fn broken_rings_are_queue_errors_not_panics() {
    let mut s = setup(8);
    // The driver claims 9 new buffers in an 8-entry ring.
    s.driver.set_avail_idx(&s.mem, 9);
    assert!(matches!(s.queue.pop(&s.mem), Err(Error::AvailIndexJump(9))));

    let mut s = setup(8);
    s.mem
        .write_obj(100u16.to_le(), GuestAddress(s.driver.avail + 4))
        .unwrap();
    s.driver.set_avail_idx(&s.mem, 1);
    assert!(matches!(
        s.queue.pop(&s.mem),
        Err(Error::HeadOutOfRange { head: 100, size: 8 })
    ));
    assert!(s.queue.add_used(&s.mem, 100, 0).is_err());
}

#[test]
fn ring_layouts_are_checked_before_use() {
    let mut s = setup(8);
    assert!(matches!(
        s.queue.set_size(6),
        Err(Error::InvalidSize { size: 6, .. })
    ));
    assert!(
        s.queue.set_size(512).is_err(),
        "beyond the device's maximum"
    );
    assert!(s.queue.set_size(0).is_err());

    let configure = |q: &mut Virtqueue, desc: u64, avail: u64, used: u64| {
        q.set_desc_table(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring(Some(used as u32), Some((used >> 32) as u32));
    };
    let (d, a, u) = (s.driver.desc, s.driver.avail, s.driver.used);
    configure(&mut s.queue, d, a, d);
    assert!(matches!(s.queue.validate(&s.mem), Err(Error::Overlap(..))));
    configure(&mut s.queue, d, a, a + 4);
    assert!(matches!(s.queue.validate(&s.mem), Err(Error::Overlap(..))));
    configure(&mut s.queue, MEM as u64 - 64, a, u);
    assert!(matches!(
        s.queue.validate(&s.mem),
        Err(Error::OutsideRam { .. })
    ));
    configure(&mut s.queue, 1 << 40, a, u);
    assert!(matches!(
        s.queue.validate(&s.mem),
        Err(Error::OutsideRam { .. })
    ));
    configure(&mut s.queue, d, a, u);
    s.queue.validate(&s.mem).unwrap();
    // Misaligned addresses are not taken at all.
    configure(&mut s.queue, d + 8, a + 1, u + 2);
    assert_eq!(
        (
            s.queue.desc_table(),
            s.queue.avail_ring(),
            s.queue.used_ring()
        ),
        (d, a, u)
    );
    s.queue.set_ready(false);
    assert!(matches!(s.queue.validate(&s.mem), Err(Error::NotReady)));
}

#[test]
fn event_idx_suppresses_interrupts_until_the_driver_asks() {
    let mut s = setup(8);
    s.queue.set_features(true, true);
    let buf = s.alloc.alloc(8);
    // The driver wants an interrupt only once the used index passes 1.
    s.driver.set_used_event(&s.mem, 1);
    for expect_interrupt in [false, true, false] {
        let head = s.driver.add(&s.mem, &[Buf::writable(buf, 8)]).unwrap();
        let popped = s.queue.pop(&s.mem).unwrap().unwrap();
        s.queue.add_used(&s.mem, popped.head, 0).unwrap();
        assert_eq!(
            s.queue.needs_notification(&s.mem).unwrap(),
            expect_interrupt
        );
        s.driver.pop_used(&s.mem).unwrap();
        let _ = head;
    }
    // Re-enabling notifications publishes where the device has got to.
    assert!(!s.queue.enable_notification(&s.mem).unwrap());
    assert_eq!(s.driver.avail_event(&s.mem), 3);
}

#[test]
fn state_round_trips_and_bad_state_is_refused() {
    let mut s = setup(8);
    let buf = s.alloc.alloc(8);
    s.driver.add(&s.mem, &[Buf::writable(buf, 8)]).unwrap();
    let popped = s.queue.pop(&s.mem).unwrap().unwrap();
    s.queue.add_used(&s.mem, popped.head, 3).unwrap();
    let state = s.queue.state();
    let mut restored = Virtqueue::from_state(state, true).unwrap();
    assert_eq!(restored.state(), state);
    s.driver.add(&s.mem, &[Buf::writable(buf, 8)]).unwrap();
    assert!(restored.pop(&s.mem).unwrap().is_some());

    let mut bad = state;
    bad.size = 6;
    assert!(Virtqueue::from_state(bad, true).is_err());
    let mut bad = state;
    bad.max_size = 100;
    assert!(Virtqueue::from_state(bad, true).is_err());
}
