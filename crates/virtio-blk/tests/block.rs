//! virtio-blk driven through the MMIO transport by an in-process driver.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};
use supermachine_virtio_blk::{Block, ID_BYTES};
use supermachine_virtio_mmio::{
    Error, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, MmioTransport, TransportState,
};
use supermachine_virtio_testing::{
    Allocator, Buf, DriverQueue, F_NEXT, InterruptCounter, MmioRegisters, bring_up,
    device_features, guest_memory, notify, reg, status, transport,
};
use virtio_bindings::virtio_blk as vb;

const SECTORS: u64 = 64;
const MEM: usize = 4 << 20;

struct Disk {
    image: tempfile::NamedTempFile,
    mem: GuestMemoryMmapped,
    alloc: Allocator,
    dev: MmioTransport,
    irq: Arc<InterruptCounter>,
    queue: DriverQueue,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn disk_with(read_only: bool, features: u64) -> Disk {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image
        .write_all(&pattern((SECTORS * 512) as usize, 0x5a))
        .unwrap();
    let mem = guest_memory(MEM);
    let mut alloc = Allocator::new(0x1000, MEM as u64);
    let block = Block::open(image.path(), read_only).unwrap();
    let (mut dev, irq) = transport(Box::new(block), &mem);
    let (mut queues, st) = bring_up(&mut dev, &mem, &mut alloc, features, &[16]);
    assert_eq!(st & status::DRIVER_OK, status::DRIVER_OK);
    Disk {
        image,
        mem,
        alloc,
        dev,
        irq,
        queue: queues.remove(0),
    }
}

fn disk() -> Disk {
    disk_with(false, F_VERSION_1 | (1 << vb::VIRTIO_BLK_F_FLUSH))
}

struct Done {
    status: u8,
    used_len: u32,
    data: Vec<u8>,
}

impl Disk {
    /// Sends one request: header, `out` (device-readable data), `in_len`
    /// bytes to be filled, status byte.
    fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Done {
        let header = self.alloc.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(header)).unwrap();
        let mut bufs = vec![Buf::readable(header, 16)];
        if !out.is_empty() {
            let a = self.alloc.alloc(out.len() as u64);
            self.mem.write_slice(out, GuestAddress(a)).unwrap();
            bufs.push(Buf::readable(a, out.len() as u32));
        }
        let data = self.alloc.alloc(u64::from(in_len));
        if in_len > 0 {
            bufs.push(Buf::writable(data, in_len));
        }
        let st = self.alloc.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        bufs.push(Buf::writable(st, 1));
        let head = self.queue.add(&self.mem, &bufs).unwrap();
        notify(&mut self.dev, 0);
        let (id, used_len) = self.queue.pop_used(&self.mem).expect("request completed");
        assert_eq!(id, u32::from(head));
        let mut bytes = vec![0u8; in_len as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(data)).unwrap();
        Done {
            status: self.mem.read_obj(GuestAddress(st)).unwrap(),
            used_len,
            data: bytes,
        }
    }

    fn image_bytes(&mut self) -> Vec<u8> {
        let mut f = self.image.reopen().unwrap();
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        all
    }
}

const OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn reads_return_the_image_and_writes_reach_it() {
    let mut d = disk();
    let r = d.request(vb::VIRTIO_BLK_T_IN, 3, &[], 1024);
    assert_eq!((r.status, r.used_len), (OK, 1025));
    let image = d.image_bytes();
    assert_eq!(r.data, &image[3 * 512..5 * 512]);
    assert!(d.irq.count() >= 1, "completion raised the interrupt");

    let data = pattern(2048, 0x11);
    let w = d.request(vb::VIRTIO_BLK_T_OUT, 60, &data, 0);
    assert_eq!((w.status, w.used_len), (OK, 1));
    assert_eq!(d.request(vb::VIRTIO_BLK_T_FLUSH, 0, &[], 0).status, OK);
    assert_eq!(&d.image_bytes()[60 * 512..], &data[..]);
}

#[test]
fn requests_past_the_end_fail_and_touch_nothing() {
    let mut d = disk();
    let before = d.image_bytes();
    for (kind, sector, out, in_len) in [
        (vb::VIRTIO_BLK_T_IN, SECTORS, vec![], 512),
        (vb::VIRTIO_BLK_T_IN, SECTORS - 1, vec![], 1024),
        (vb::VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, vec![], 512),
        (vb::VIRTIO_BLK_T_OUT, SECTORS - 1, vec![7u8; 1024], 0),
        (vb::VIRTIO_BLK_T_OUT, u64::MAX, vec![7u8; 512], 0),
    ] {
        let r = d.request(kind, sector, &out, in_len);
        assert_eq!(r.status, IOERR, "type {kind} sector {sector}");
    }
    assert_eq!(d.image_bytes(), before);
    assert_eq!(d.request(vb::VIRTIO_BLK_T_IN, 0, &[], 512).status, OK);
}

#[test]
fn read_only_disks_refuse_every_write() {
    let mut d = disk_with(true, F_VERSION_1 | (1 << vb::VIRTIO_BLK_F_RO));
    let offered = device_features(&mut d.dev);
    assert_ne!(offered & (1 << vb::VIRTIO_BLK_F_RO), 0);
    assert_eq!(offered & (1 << vb::VIRTIO_BLK_F_DISCARD), 0);
    let before = d.image_bytes();
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_OUT, 0, &[1u8; 512], 0).status,
        IOERR
    );
    let seg = discard_segment(0, 8, 0);
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_DISCARD, 0, &seg, 0).status,
        IOERR
    );
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0).status,
        IOERR
    );
    assert_eq!(d.image_bytes(), before);
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_IN, 0, &[], 512).data,
        &before[..512]
    );
}

fn discard_segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn get_id_discard_and_write_zeroes() {
    let mut d = disk();
    let r = d.request(vb::VIRTIO_BLK_T_GET_ID, 0, &[], ID_BYTES as u32);
    assert_eq!(r.status, OK);
    let name = d
        .image
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.as_bytes()
            .starts_with(r.data.split(|&b| b == 0).next().unwrap())
    );

    let z = d.request(
        vb::VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &discard_segment(4, 2, 0),
        0,
    );
    assert_eq!(z.status, OK);
    let u = d.request(
        vb::VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &discard_segment(10, 1, vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        0,
    );
    assert_eq!(u.status, OK);
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_DISCARD, 0, &discard_segment(20, 4, 0), 0)
            .status,
        OK
    );
    let image = d.image_bytes();
    assert_eq!(image.len() as u64, SECTORS * 512, "size is kept");
    assert!(image[4 * 512..6 * 512].iter().all(|&b| b == 0));
    assert!(image[10 * 512..11 * 512].iter().all(|&b| b == 0));
    assert_ne!(image[6 * 512], 0, "only the range asked for");

    // Past the end, an unknown flag, and no segment at all.
    assert_eq!(
        d.request(
            vb::VIRTIO_BLK_T_DISCARD,
            0,
            &discard_segment(SECTORS, 1, 0),
            0
        )
        .status,
        IOERR
    );
    assert_eq!(
        d.request(
            vb::VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &discard_segment(0, 1, 0x80),
            0
        )
        .status,
        UNSUPP
    );
    assert_eq!(d.request(vb::VIRTIO_BLK_T_DISCARD, 0, &[], 0).status, IOERR);
    assert_eq!(d.request(99, 0, &[], 0).status, UNSUPP);
}

#[test]
fn malformed_requests_fail_alone_and_the_device_goes_on() {
    let mut d = disk();
    // A short header.
    let h = d.alloc.alloc(8);
    let st = d.alloc.alloc(1);
    d.queue
        .add(&d.mem, &[Buf::readable(h, 8), Buf::writable(st, 1)])
        .unwrap();
    notify(&mut d.dev, 0);
    let (_, len) = d.queue.pop_used(&d.mem).unwrap();
    assert_eq!(len, 1);
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(st)).unwrap(), IOERR);

    // No writable status byte at all: returned with nothing written.
    d.queue.add(&d.mem, &[Buf::readable(h, 8)]).unwrap();
    notify(&mut d.dev, 0);
    assert_eq!(d.queue.pop_used(&d.mem).unwrap().1, 0);

    // A looping chain.
    d.queue
        .write_descriptor(&d.mem, d.queue.desc, 5, (h, 8, F_NEXT, 6));
    d.queue
        .write_descriptor(&d.mem, d.queue.desc, 6, (h, 8, F_NEXT, 5));
    d.queue.publish_head(&d.mem, 5);
    notify(&mut d.dev, 0);
    assert_eq!(d.queue.pop_used(&d.mem), Some((5, 0)));

    // A data buffer outside guest RAM.
    d.queue
        .write_descriptor(&d.mem, d.queue.desc, 7, (h, 16, F_NEXT, 8));
    d.queue
        .write_descriptor(&d.mem, d.queue.desc, 8, (MEM as u64 - 100, 512, 2, 0));
    d.queue.publish_head(&d.mem, 7);
    notify(&mut d.dev, 0);
    assert_eq!(d.queue.pop_used(&d.mem), Some((7, 0)));

    let image = d.image_bytes();
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_IN, 1, &[], 512).data,
        &image[512..1024]
    );
}

#[test]
fn a_broken_ring_needs_a_reset_and_a_reset_recovers() {
    let mut d = disk();
    d.queue.set_avail_idx(&d.mem, 100);
    notify(&mut d.dev, 0);
    assert_ne!(d.dev.read32(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(
        d.dev.read32(reg::INTERRUPT_STATUS) & 2,
        0,
        "config interrupt"
    );
    notify(&mut d.dev, 0);

    let (mut queues, st) = bring_up(&mut d.dev, &d.mem, &mut d.alloc, F_VERSION_1, &[16]);
    assert_eq!(st & status::DEVICE_NEEDS_RESET, 0);
    d.queue = queues.remove(0);
    let image = d.image_bytes();
    assert_eq!(
        d.request(vb::VIRTIO_BLK_T_IN, 2, &[], 512).data,
        &image[1024..1536]
    );
}

#[test]
fn bad_queue_layouts_and_features_are_refused_at_setup() {
    let mem = guest_memory(MEM);
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(4096).unwrap();
    let (mut dev, _) = transport(Box::new(Block::open(image.path(), false).unwrap()), &mem);

    // A feature the device never offered: no FEATURES_OK.
    dev.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    dev.write32(reg::DRIVER_FEATURES_SEL, 0);
    dev.write32(reg::DRIVER_FEATURES, 1 << 30);
    dev.write32(reg::DRIVER_FEATURES_SEL, 1);
    dev.write32(reg::DRIVER_FEATURES, 1);
    dev.write32(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(dev.read32(reg::STATUS) & status::FEATURES_OK, 0);

    // The used ring on top of the descriptor table: the device does not start.
    let mut alloc = Allocator::new(0x1000, MEM as u64);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    dev.write32(reg::STATUS, 0);
    dev.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    dev.write32(reg::DRIVER_FEATURES_SEL, 1);
    dev.write32(reg::DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
    dev.write32(reg::STATUS, s);
    let q = DriverQueue::new(&mem, &mut alloc, 16);
    dev.write32(reg::QUEUE_SEL, 0);
    dev.write32(reg::QUEUE_NUM, 12); // not a power of two: ignored
    dev.write32(reg::QUEUE_NUM, 16);
    dev.write32(reg::QUEUE_DESC_LOW, q.desc as u32);
    dev.write32(reg::QUEUE_DRIVER_LOW, q.avail as u32);
    dev.write32(reg::QUEUE_DEVICE_LOW, q.desc as u32);
    dev.write32(reg::QUEUE_READY, 1);
    dev.write32(reg::STATUS, s | status::DRIVER_OK);
    assert!(!dev.is_active());
    assert_ne!(dev.read32(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);

    // A descriptor table outside guest RAM.
    let (_, st) = bring_up(&mut dev, &mem, &mut alloc, F_VERSION_1, &[16]);
    assert!(dev.is_active() && st & status::DEVICE_NEEDS_RESET == 0);
    dev.write32(reg::STATUS, 0);
    dev.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    dev.write32(reg::DRIVER_FEATURES_SEL, 1);
    dev.write32(reg::DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
    dev.write32(reg::STATUS, s);
    dev.write32(reg::QUEUE_DESC_LOW, 0xffff_f000);
    dev.write32(reg::QUEUE_DESC_HIGH, 0xff);
    dev.write32(reg::QUEUE_DRIVER_LOW, q.avail as u32);
    dev.write32(reg::QUEUE_DEVICE_LOW, q.used as u32);
    dev.write32(reg::QUEUE_READY, 1);
    dev.write32(reg::STATUS, s | status::DRIVER_OK);
    assert!(!dev.is_active());
    assert_eq!(dev.read32(reg::MAGIC), 0x7472_6976);
    assert_eq!(dev.read32(reg::VERSION), 2);
    assert_eq!(dev.read32(reg::DEVICE_ID), 2);
}

#[test]
fn indirect_requests_and_event_idx() {
    let mut d = disk_with(false, F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX);
    let (table, header, data, st) = (
        d.alloc.alloc(48),
        d.alloc.alloc(16),
        d.alloc.alloc(512),
        d.alloc.alloc(1),
    );
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&vb::VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&7u64.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(header)).unwrap();
    // The driver asks not to be interrupted until its second request.
    d.queue.set_used_event(&d.mem, 1);
    let before = d.irq.count();
    let bufs = [
        Buf::readable(header, 16),
        Buf::writable(data, 512),
        Buf::writable(st, 1),
    ];
    d.queue.add_indirect(&d.mem, table, &bufs);
    notify(&mut d.dev, 0);
    assert_eq!(d.queue.pop_used(&d.mem).unwrap().1, 513);
    assert_eq!(d.irq.count(), before, "suppressed by used_event");
    assert_eq!(
        d.queue.avail_event(&d.mem),
        1,
        "device asks for the next notify"
    );
    d.queue.add_indirect(&d.mem, table, &bufs);
    notify(&mut d.dev, 0);
    assert_eq!(d.irq.count(), before + 1);
    let mut got = vec![0u8; 512];
    d.mem.read_slice(&mut got, GuestAddress(data)).unwrap();
    let mut f = d.image.reopen().unwrap();
    let mut want = vec![0u8; 512];
    f.seek(SeekFrom::Start(7 * 512)).unwrap();
    f.read_exact(&mut want).unwrap();
    assert_eq!(got, want);
}

#[test]
fn missing_images_are_a_clear_error() {
    let err = Block::open(std::path::Path::new("/nonexistent/disk.img"), false).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("disk image /nonexistent/disk.img: "),
        "{err}"
    );
}

fn restore_from(d: &Disk, state: &TransportState) -> Result<MmioTransport, Error> {
    let block = Block::open(d.image.path(), false).unwrap();
    let irq = Arc::new(InterruptCounter::default());
    MmioTransport::restore(Box::new(block), d.mem.clone(), irq, state)
}

#[test]
fn a_restored_disk_continues_where_the_saved_one_stopped() {
    let mut d = disk();
    let payload = pattern(1024, 9);
    let w = d.request(vb::VIRTIO_BLK_T_OUT, 2, &payload, 0);
    assert_eq!(w.status, OK);
    let state = d.dev.save();
    assert!(state.active && !state.needs_reset);
    assert_eq!(state.queues[0].next_used, 1);

    // A new device on the same image and memory, as a new VMM would build.
    d.dev = restore_from(&d, &state).unwrap();
    let r = d.request(vb::VIRTIO_BLK_T_IN, 2, &[], 1024);
    assert_eq!(r.status, OK);
    assert_eq!(r.data, payload);
    assert_eq!(d.dev.save().queues[0].next_used, 2, "the used ring went on");
}

#[test]
fn a_device_saved_before_the_driver_started_it_is_restored_idle() {
    let d = disk_with(false, F_VERSION_1);
    let mut idle = {
        let block = Block::open(d.image.path(), false).unwrap();
        transport(Box::new(block), &d.mem).0
    };
    idle.write32(reg::STATUS, status::ACKNOWLEDGE);
    let state = idle.save();
    assert!(!state.active);
    let mut restored = restore_from(&d, &state).unwrap();
    assert!(!restored.is_active());
    assert_eq!(restored.read32(reg::STATUS), status::ACKNOWLEDGE);
}

#[test]
fn restoring_refuses_a_state_that_does_not_fit() {
    let d = disk();
    let good = d.dev.save();
    type Tamper = Box<dyn Fn(&mut TransportState)>;
    let cases: Vec<(&str, Tamper)> = vec![
        ("a newer layout", Box::new(|s| s.version += 1)),
        ("another device type", Box::new(|s| s.device_type = 4)),
        ("a missing queue", Box::new(|s| s.queues.clear())),
        (
            "a queue size not a power of two",
            Box::new(|s| s.queues[0].size = 3),
        ),
        (
            "another maximum size",
            Box::new(|s| s.queues[0].max_size = 8),
        ),
        (
            "a descriptor table outside RAM",
            Box::new(|s| s.queues[0].desc_table = MEM as u64),
        ),
        (
            "device bytes blk never writes",
            Box::new(|s| s.device = vec![1]),
        ),
        (
            "running without DRIVER_OK",
            Box::new(|s| s.status &= !status::DRIVER_OK),
        ),
    ];
    for (what, tamper) in cases {
        let mut state = good.clone();
        tamper(&mut state);
        match restore_from(&d, &state) {
            Err(Error::Restore(why)) => assert!(!why.is_empty(), "{what}"),
            Err(other) => panic!("{what}: unexpected error {other}"),
            Ok(_) => panic!("{what}: restored"),
        }
    }
    assert!(restore_from(&d, &good).is_ok());
}
