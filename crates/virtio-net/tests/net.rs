//! The device driven as a Linux driver drives it, through in-process
//! guest memory, against a real socket pair standing where passt (or
//! gvproxy) sits.
#![allow(clippy::unwrap_used)]
// The backends are Unix sockets; Windows has none yet.
#![cfg(unix)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};
use supermachine_virtio_mmio::{F_EVENT_IDX, F_VERSION_1, MmioTransport};
use supermachine_virtio_net::{
    DEFAULT_MTU, DatagramBackend, EgressPolicy, FrameBackend, HEADER_SIZE, MAX_WAITING_FRAMES, Net,
    NetConfig, PolicyMode, StreamBackend,
};
use supermachine_virtio_testing::{
    Allocator, Buf, DriverQueue, InterruptCounter, bring_up, device_features, guest_memory, notify,
    transport,
};

const MEM: usize = 64 << 20;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const FEATURES: u64 =
    F_VERSION_1 | F_EVENT_IDX | F_CSUM | F_GUEST_CSUM | F_MTU | F_MAC | F_MRG_RXBUF | F_STATUS;

struct Guest {
    mem: GuestMemoryMmapped,
    alloc: Allocator,
    dev: MmioTransport,
    irq: Arc<InterruptCounter>,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_bufs: HashMap<u32, u64>,
    rx_buf_len: u32,
    backend_fd: RawFd,
    /// What every received frame's header flags must be.
    rx_flags: u8,
}

fn device(policy: EgressPolicy, backend: Box<dyn FrameBackend>) -> Net {
    Net::new(
        NetConfig {
            mac: MAC,
            mtu: DEFAULT_MTU,
            policy,
        },
        backend,
    )
    .unwrap()
}

impl Guest {
    fn new(net: Net, features: u64, rx_buffers: usize, rx_buf_len: u32) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let mem = guest_memory(MEM);
        let mut alloc = Allocator::new(0x1000, MEM as u64);
        let (mut dev, irq) = transport(Box::new(net), &mem);
        let backend_fd = dev.backend_fd().unwrap();
        let (mut queues, status) = bring_up(&mut dev, &mem, &mut alloc, features, &[256, 256]);
        assert_eq!(status & 0x40, 0, "device failed: {status:#x}");
        let tx = queues.pop().unwrap();
        let rx = queues.pop().unwrap();
        let mut g = Self {
            mem,
            alloc,
            dev,
            irq,
            rx,
            tx,
            rx_bufs: HashMap::new(),
            rx_buf_len,
            backend_fd,
            // DATA_VALID exactly when the driver took GUEST_CSUM.
            rx_flags: if features & F_GUEST_CSUM != 0 { 2 } else { 0 },
        };
        g.add_rx_buffers(rx_buffers);
        g
    }

    fn add_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.alloc.alloc(u64::from(self.rx_buf_len));
            let head = self
                .rx
                .add(&self.mem, &[Buf::writable(a, self.rx_buf_len)])
                .unwrap();
            self.rx_bufs.insert(u32::from(head), a);
        }
        notify(&mut self.dev, 0);
    }

    /// Transmits `frame` behind `header`, in two descriptors as Linux
    /// does when the header is not in the frame's buffer.
    fn send_with(&mut self, header: [u8; HEADER_SIZE], frame: &[u8]) {
        let h = self.alloc.alloc(HEADER_SIZE as u64);
        let f = self.alloc.alloc(frame.len() as u64);
        self.mem.write_slice(&header, GuestAddress(h)).unwrap();
        self.mem.write_slice(frame, GuestAddress(f)).unwrap();
        self.tx
            .add(
                &self.mem,
                &[
                    Buf::readable(h, HEADER_SIZE as u32),
                    Buf::readable(f, frame.len() as u32),
                ],
            )
            .unwrap();
        notify(&mut self.dev, 1);
        while self.tx.pop_used(&self.mem).is_some() {}
    }

    fn send(&mut self, frame: &[u8]) {
        self.send_with([0; HEADER_SIZE], frame);
    }

    /// Waits for the device's descriptor (or `timeout`) and lets the
    /// device work when it is ready, as the VMM's event loop does: work
    /// that waits for a readiness the device never asked for never
    /// happens here either.
    fn poll(&mut self, timeout: Duration) {
        if self.readable_within(timeout) {
            self.dev.backend_ready();
        }
    }

    /// Whether the device's backend descriptor would wake the event loop.
    fn backend_readable(&self) -> bool {
        self.readable_within(Duration::ZERO)
    }

    /// Whether the device's descriptor becomes readable within `timeout`.
    fn readable_within(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.backend_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call's duration.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) > 0 }
    }

    /// Frames the device has given the guest: (header, frame) each,
    /// merged buffers joined; the buffers go back to the ring.
    fn received(&mut self) -> Vec<([u8; HEADER_SIZE], Vec<u8>)> {
        let mut out = Vec::new();
        let mut returned = 0;
        while let Some((id, len)) = self.rx.pop_used(&self.mem) {
            let a = self.rx_bufs.remove(&id).unwrap();
            let mut data = vec![0u8; len as usize];
            self.mem.read_slice(&mut data, GuestAddress(a)).unwrap();
            let mut header = [0u8; HEADER_SIZE];
            header.copy_from_slice(&data[..HEADER_SIZE]);
            let mut frame = data[HEADER_SIZE..].to_vec();
            let buffers = u16::from_le_bytes([header[10], header[11]]);
            for _ in 1..buffers {
                let (id, len) = self.rx.pop_used(&self.mem).expect("merged buffer");
                let a = self.rx_bufs.remove(&id).unwrap();
                let mut more = vec![0u8; len as usize];
                self.mem.read_slice(&mut more, GuestAddress(a)).unwrap();
                frame.extend_from_slice(&more);
                self.reuse(id, a);
                returned += 1;
            }
            self.reuse(id, a);
            returned += 1;
            out.push((header, frame));
        }
        if returned > 0 {
            notify(&mut self.dev, 0);
        }
        out
    }

    fn reuse(&mut self, _id: u32, a: u64) {
        let head = self
            .rx
            .add(&self.mem, &[Buf::writable(a, self.rx_buf_len)])
            .unwrap();
        self.rx_bufs.insert(u32::from(head), a);
    }

    /// Polls until `n` frames have arrived (or fails after 5 s).
    fn expect_frames(&mut self, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} frames arrived: {:?}",
                got.len(),
                got.iter().map(Vec::len).collect::<Vec<_>>()
            );
            self.poll(Duration::from_millis(20));
            got.extend(self.received().into_iter().map(|(h, f)| {
                assert_eq!(h[1], 0, "no GSO");
                assert_eq!(h[0], self.rx_flags, "header flags");
                f
            }));
        }
        got
    }

    fn config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.dev.read(0x100 + offset, &mut data);
        data
    }
}

/// A frame from the guest's MAC to the gateway's: `ethertype`, `payload`.
fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The peer's end of a stream backend: length-prefixed frames.
fn peer_write(peer: &mut UnixStream, frame: &[u8]) {
    peer.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
    peer.write_all(frame).unwrap();
}

fn peer_read(peer: &mut UnixStream) -> Vec<u8> {
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 4];
    peer.read_exact(&mut len).unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    peer.read_exact(&mut frame).unwrap();
    frame
}

fn stream_guest(
    policy: EgressPolicy,
    features: u64,
    buffers: usize,
    len: u32,
) -> (Guest, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    let net = device(policy, Box::new(StreamBackend::new(ours).unwrap()));
    (Guest::new(net, features, buffers, len), peer)
}

#[test]
fn config_space_and_features_are_what_a_linux_driver_reads() {
    let (mut g, _peer) = stream_guest(EgressPolicy::default(), FEATURES, 4, 4096);
    let offered = device_features(&mut g.dev);
    assert_eq!(offered & FEATURES, FEATURES);
    assert_eq!(offered & F_GUEST_TSO4, 0, "no segmentation offload");
    assert_eq!(g.config(0, 6), MAC);
    assert_eq!(g.config(6, 2), [1, 0], "link up");
    assert_eq!(g.config(8, 2), [1, 0], "one queue pair");
    assert_eq!(g.config(10, 2), DEFAULT_MTU.to_le_bytes());
    // Reads past the end are zeroes, not a panic.
    assert_eq!(g.config(200, 4), [0; 4]);
}

#[test]
fn bad_configurations_are_refused() {
    let (ours, _peer) = UnixStream::pair().unwrap();
    let backend = || Box::new(StreamBackend::new(ours.try_clone().unwrap()).unwrap());
    let make = |mac, mtu| {
        Net::new(
            NetConfig {
                mac,
                mtu,
                policy: EgressPolicy::default(),
            },
            backend(),
        )
    };
    assert!(
        make([1, 2, 3, 4, 5, 6], 1500)
            .unwrap_err()
            .to_string()
            .contains("unicast")
    );
    assert!(make([0; 6], 1500).is_err());
    assert!(make(MAC, 500).unwrap_err().to_string().contains("MTU 500"));
    assert!(make(MAC, 1500).is_ok());
}

#[test]
fn frames_cross_both_ways_with_merged_buffers() {
    let (mut g, mut peer) = stream_guest(EgressPolicy::default(), FEATURES, 64, 4096);
    // Guest to backend: a small frame and one of a full 65520-byte packet.
    let small = ethernet(0x0800, &pattern(100, 1));
    let big = ethernet(0x0800, &pattern(usize::from(DEFAULT_MTU), 2));
    g.send(&small);
    g.send(&big);
    assert_eq!(peer_read(&mut peer), small);
    assert_eq!(peer_read(&mut peer), big);

    // Backend to guest: the big frame spans 17 4 KiB buffers.
    let frames = [
        ethernet(0x86dd, &pattern(60, 3)),
        big.clone(),
        ethernet(0x0806, &pattern(28, 4)),
    ];
    for f in &frames {
        peer_write(&mut peer, f);
    }
    let got = g.expect_frames(3);
    assert_eq!(got, frames);
    assert!(g.irq.count() > 0);
}

#[test]
fn without_merged_buffers_a_frame_too_big_for_a_buffer_is_dropped_alone() {
    let features = FEATURES & !F_MRG_RXBUF & !F_GUEST_CSUM;
    let (mut g, mut peer) = stream_guest(EgressPolicy::default(), features, 8, 2048);
    let small = [
        ethernet(0x0800, &pattern(200, 5)),
        ethernet(0x0800, &pattern(300, 6)),
    ];
    peer_write(&mut peer, &small[0]);
    peer_write(&mut peer, &ethernet(0x0800, &pattern(4000, 7)));
    peer_write(&mut peer, &small[1]);
    let got = g.expect_frames(2);
    assert_eq!(got, small);
    g.poll(Duration::from_millis(50));
    assert!(g.received().is_empty(), "an extra frame");
}

#[test]
fn frames_wait_for_buffers_and_the_backend_is_held_back() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const FRAMES: usize = 300;
    const LEN: usize = 60_000;
    // Room for one frame: the device delivers it, then starves.
    let (mut g, peer) = stream_guest(EgressPolicy::default(), FEATURES, 20, 4096);
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let writer = std::thread::spawn(move || {
        let mut peer = peer;
        for i in 0..FRAMES {
            peer_write(&mut peer, &ethernet(0x0800, &pattern(LEN, i as u8)));
            counter.store(i + 1, Ordering::SeqCst);
        }
        peer
    });
    // Out of receive buffers: the device keeps a bounded number of
    // frames and stops reading, so the writer blocks.
    for _ in 0..20 {
        g.poll(Duration::from_millis(10));
    }
    // Nor does it watch the backend meanwhile (a readable socket it
    // cannot drain would wake the event loop without end).
    assert!(
        !g.backend_readable(),
        "the device watches a backend it cannot use"
    );
    let stalled_at = written.load(Ordering::SeqCst);
    assert!(
        stalled_at < MAX_WAITING_FRAMES + 20,
        "the device read {stalled_at} frames with nowhere to put them"
    );
    // The device asked to be told of the next buffer the driver adds (a
    // Linux driver notifies only when asked).
    let before = g.rx.avail_index();
    let a = g.alloc.alloc(4096);
    let head = g.rx.add(&g.mem, &[Buf::writable(a, 4096)]).unwrap();
    g.rx_bufs.insert(u32::from(head), a);
    assert!(
        g.rx.must_notify(&g.mem, before),
        "a driver adding a buffer would not notify the starved device"
    );
    // Buffers arrive: every frame comes through, in order, intact.
    g.add_rx_buffers(63);
    let got = g.expect_frames_slowly(FRAMES);
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &ethernet(0x0800, &pattern(LEN, i as u8)), "frame {i}");
    }
    let _peer = writer.join().unwrap();
}

impl Guest {
    /// Like `expect_frames`, with more patience for large transfers.
    fn expect_frames_slowly(&mut self, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} frames arrived",
                got.len()
            );
            self.poll(Duration::from_millis(20));
            got.extend(self.received().into_iter().map(|(_, f)| f));
        }
        got
    }
}

/// A UDP/IPv4 packet from 10.0.2.15:5000 to `dst`:`port`, with its
/// checksum field holding the pseudo-header sum (what Linux leaves for a
/// device that offloads checksums).
fn udp4(dst: [u8; 4], port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 2, 15];
    ip.extend_from_slice(&dst);
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    let csum = !fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&[10, 0, 2, 15]);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let partial = !fold(sum(&pseudo, 0));
    let mut udp = Vec::new();
    udp.extend_from_slice(&5000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&partial.to_be_bytes());
    udp.extend_from_slice(payload);
    ip.extend_from_slice(&udp);
    ethernet(0x0800, &ip)
}

fn sum(data: &[u8], mut acc: u64) -> u64 {
    for w in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Whether the UDP/IPv4 frame's checksum verifies.
fn udp4_checksum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let udp = &ip[20..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    fold(sum(udp, sum(&pseudo, 0))) == 0
}

fn csum_header(start: u16, offset: u16) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0] = 1; // NEEDS_CSUM
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h
}

#[test]
fn the_device_completes_checksums_the_guest_left_to_it() {
    let (mut g, mut peer) = stream_guest(EgressPolicy::default(), FEATURES, 4, 4096);
    let frame = udp4([203, 0, 113, 9], 7, &pattern(1001, 9));
    assert!(!udp4_checksum_ok(&frame));
    g.send_with(csum_header(34, 6), &frame);
    let sent = peer_read(&mut peer);
    assert!(udp4_checksum_ok(&sent), "checksum completed");
    assert_eq!(sent[..40], frame[..40], "headers otherwise untouched");
    assert_eq!(sent[42..], frame[42..]);
}

#[test]
fn hostile_frames_fail_alone_and_the_device_goes_on() {
    let (mut g, mut peer) = stream_guest(EgressPolicy::default(), FEATURES, 4, 4096);
    let good = ethernet(0x0800, &pattern(64, 10));
    // TX: shorter than a header; a segmentation request (not offered);
    // checksum offsets outside the frame; a frame over the largest;
    // a runt frame.
    let a = g.alloc.alloc(8);
    g.tx.add(&g.mem, &[Buf::readable(a, 5)]).unwrap();
    notify(&mut g.dev, 1);
    let mut gso = [0u8; HEADER_SIZE];
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    g.send_with(gso, &good);
    g.send_with(csum_header(70, 8), &good);
    g.send_with(csum_header(u16::MAX, u16::MAX), &good);
    g.send(&ethernet(
        0x0800,
        &pattern(usize::from(DEFAULT_MTU) + 100, 11),
    ));
    g.send(&[0u8; 10]);
    // A device-writable TX buffer.
    let w = g.alloc.alloc(64);
    g.tx.add(&g.mem, &[Buf::writable(w, 64)]).unwrap();
    notify(&mut g.dev, 1);
    g.send(&good);
    assert_eq!(peer_read(&mut peer), good, "only the good frame went out");
    peer.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert!(peer.read(&mut byte).is_err(), "nothing else was sent");
    peer.set_nonblocking(false).unwrap();

    // RX: a device-readable buffer and one too short for the header are
    // handed back empty; the next good buffer gets the frame.
    let (mut g, mut peer) = stream_guest(EgressPolicy::default(), FEATURES, 0, 4096);
    let r = g.alloc.alloc(64);
    let short = g.alloc.alloc(8);
    let h1 = g.rx.add(&g.mem, &[Buf::readable(r, 64)]).unwrap();
    let h2 = g.rx.add(&g.mem, &[Buf::writable(short, 8)]).unwrap();
    g.add_rx_buffers(1);
    peer_write(&mut peer, &good);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut returned = Vec::new();
    while returned.len() < 3 {
        assert!(Instant::now() < deadline, "{returned:?}");
        g.poll(Duration::from_millis(20));
        while let Some(u) = g.rx.pop_used(&g.mem) {
            returned.push(u);
        }
    }
    assert_eq!(returned[0], (u32::from(h1), 0));
    assert_eq!(returned[1], (u32::from(h2), 0));
    assert_eq!(returned[2].1 as usize, HEADER_SIZE + good.len());
}

/// A TCP SYN from 10.0.2.15:40000 to `dst`:`port`.
fn tcp4_syn(dst: [u8; 4], port: u16) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 2, 15];
    ip.extend_from_slice(&dst);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    ip.extend_from_slice(&tcp);
    ethernet(0x0800, &ip)
}

fn nothing_sent(peer: &mut UnixStream) -> bool {
    peer.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let quiet = peer.read(&mut byte).is_err();
    peer.set_nonblocking(false).unwrap();
    quiet
}

#[test]
fn deny_private_answers_refused_packets_and_sends_none() {
    let policy = EgressPolicy {
        mode: PolicyMode::DenyPrivate,
        allow: vec!["10.0.2.2:8080".parse().unwrap()],
        host_addrs: vec!["10.0.2.2".parse().unwrap()],
        ..EgressPolicy::default()
    };
    let (mut g, mut peer) = stream_guest(policy, FEATURES, 8, 4096);
    // The gateway (the host) on another port: refused with a reset.
    g.send(&tcp4_syn([10, 0, 2, 2], 22));
    let reply = g.expect_frames(1).remove(0);
    assert!(nothing_sent(&mut peer));
    assert_eq!(&reply[0..6], &MAC, "to the guest");
    let tcp = &reply[34..54];
    assert_eq!(&reply[26..30], &[10, 0, 2, 2], "from the address it tried");
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 22);
    assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
    assert_eq!(
        u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        1001,
        "acks the SYN"
    );
    assert_eq!(tcp[13], 0x14, "RST+ACK");
    // UDP to a private address: ICMP administratively prohibited,
    // quoting the datagram.
    let dns = udp4([192, 168, 1, 1], 53, b"query");
    g.send(&dns);
    let icmp = g.expect_frames(1).remove(0);
    assert!(nothing_sent(&mut peer));
    assert_eq!((icmp[23], icmp[34], icmp[35]), (1, 3, 13));
    assert_eq!(&icmp[42..62], &dns[14..34], "the quoted IP header");
    // The allowed exception and a public address go out.
    let allowed = tcp4_syn([10, 0, 2, 2], 8080);
    g.send(&allowed);
    assert_eq!(peer_read(&mut peer), allowed);
    let public = tcp4_syn([198, 51, 100, 7], 443);
    g.send(&public);
    assert_eq!(peer_read(&mut peer), public);
}

#[test]
fn the_datagram_backend_moves_frames_both_ways() {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    let net = device(
        EgressPolicy::default(),
        Box::new(DatagramBackend::new(ours).unwrap()),
    );
    let mut g = Guest::new(net, FEATURES, 32, 4096);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let out = ethernet(0x0800, &pattern(9000, 12));
    g.send(&out);
    let mut buf = vec![0u8; 70_000];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &out[..]);
    let back = ethernet(0x86dd, &pattern(20_000, 13));
    peer.send(&back).unwrap();
    assert_eq!(g.expect_frames(1), vec![back]);
}

#[test]
fn a_backend_that_goes_away_takes_the_link_down() {
    let (mut g, peer) = stream_guest(EgressPolicy::default(), FEATURES, 4, 4096);
    let before = g.irq.count();
    drop(peer);
    g.poll(Duration::from_millis(100));
    assert_eq!(g.config(6, 2), [0, 0], "link down");
    assert!(g.irq.count() > before, "the driver was told");
    let mut status = [0u8; 4];
    g.dev.read(0x60, &mut status);
    assert_ne!(u32::from_le_bytes(status) & 2, 0, "a configuration change");
    // The guest may go on sending; nothing breaks.
    g.send(&ethernet(0x0800, &pattern(100, 14)));
}

#[test]
fn receive_buffers_held_for_a_frame_go_back_in_a_snapshot() {
    let (mut g, mut peer) = stream_guest(EgressPolicy::default(), FEATURES, 3, 4096);
    // A frame needing 5 buffers, with 3 given: the device holds them.
    peer_write(&mut peer, &ethernet(0x0800, &pattern(18_000, 15)));
    g.poll(Duration::from_millis(100));
    assert!(g.received().is_empty());
    let state = g.dev.save();
    assert_eq!(state.queues[0].next_avail, 0, "held buffers wound back");
    // With more buffers the frame arrives whole.
    g.add_rx_buffers(2);
    let got = g.expect_frames(1);
    assert_eq!(got[0], ethernet(0x0800, &pattern(18_000, 15)));
}
