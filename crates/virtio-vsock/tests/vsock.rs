//! virtio-vsock driven through the MMIO transport by an in-process guest
//! driver, against real Unix sockets on the host side.
#![allow(clippy::unwrap_used)]
// The device is built for Unix hosts only.
#![cfg(unix)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use std::sync::Arc;
use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};

use supermachine_virtio_mmio::{F_EVENT_IDX, F_VERSION_1, MmioTransport};
use supermachine_virtio_testing::{
    Allocator, Buf, DriverQueue, InterruptCounter, bring_up, guest_memory, notify, transport,
};
use supermachine_virtio_vsock::packet::{HEADER_SIZE, Header, TYPE_STREAM, op, shutdown};
use supermachine_virtio_vsock::{CONN_BUF_ALLOC, MAX_PAYLOAD, Vsock};

const MEM: usize = 64 << 20;
const CID: u64 = 3;
const RX_BUF: u32 = (HEADER_SIZE as u32) + MAX_PAYLOAD;
const GUEST_BUF_ALLOC: u32 = 256 << 10;

/// The guest's vsock stack, reduced to what the tests need.
struct Guest {
    mem: GuestMemoryMmapped,
    alloc: Allocator,
    dev: MmioTransport,
    backend: RawFd,
    rx: DriverQueue,
    tx: DriverQueue,
    event: DriverQueue,
    rx_bufs: HashMap<u32, u64>,
    tx_scratch: u64,
    received: VecDeque<(Header, Vec<u8>)>,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Guest {
    fn new() -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let mem = guest_memory(MEM);
        let mut alloc = Allocator::new(0x1000, MEM as u64);
        let vsock = Vsock::new(CID, &path).unwrap();
        let (mut dev, _irq) = transport(Box::new(vsock), &mem);
        let backend = dev.backend_fd().unwrap();
        let (mut q, _) = bring_up(
            &mut dev,
            &mem,
            &mut alloc,
            F_VERSION_1 | F_EVENT_IDX,
            &[64, 64, 8],
        );
        let mut q = q.drain(..);
        let (rx, tx, event) = (q.next().unwrap(), q.next().unwrap(), q.next().unwrap());
        let tx_scratch = alloc.alloc(u64::from(RX_BUF) * 64);
        let mut g = Self {
            mem,
            alloc,
            dev,
            backend,
            rx,
            tx,
            event,
            rx_bufs: HashMap::new(),
            tx_scratch,
            received: VecDeque::new(),
            _dir: dir,
            path,
        };
        // Never ask for interrupts: the test polls the rings.
        g.rx.set_used_event(&g.mem, u16::MAX / 2);
        for _ in 0..64 {
            let a = g.alloc.alloc(u64::from(RX_BUF));
            let head = g.rx.add(&g.mem, &[Buf::writable(a, RX_BUF)]).unwrap();
            g.rx_bufs.insert(u32::from(head), a);
        }
        notify(&mut g.dev, 0);
        g
    }

    fn header(&self, host_port: u32, guest_port: u32, op: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: 2,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    /// Sends one packet on the TX queue and waits for it to be consumed.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let a = self.tx_scratch;
        self.mem.write_slice(&h.encode(), GuestAddress(a)).unwrap();
        let mut bufs = vec![Buf::readable(a, HEADER_SIZE as u32)];
        if !payload.is_empty() {
            let p = a + HEADER_SIZE as u64;
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            bufs.push(Buf::readable(p, payload.len() as u32));
        }
        self.send_raw(&bufs);
    }

    fn send_raw(&mut self, bufs: &[Buf]) {
        self.tx.add(&self.mem, bufs).unwrap();
        notify(&mut self.dev, 1);
        assert!(self.tx.pop_used(&self.mem).is_some(), "TX packet consumed");
    }

    /// Runs the device's host side and collects what it sent the guest.
    fn poll(&mut self, timeout: Duration) {
        let mut pfd = [libc_pollfd(self.backend)];
        // SAFETY: pfd is a valid array of one pollfd for the call's duration.
        unsafe { libc::poll(pfd.as_mut_ptr(), 1, timeout.as_millis() as i32) };
        self.dev.backend_ready();
        self.collect();
    }

    fn collect(&mut self) {
        while let Some((id, len)) = self.rx.pop_used(&self.mem) {
            let a = self.rx_bufs.remove(&id).unwrap();
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(a)).unwrap();
            let h = Header::decode(&raw);
            assert_eq!(len as usize, HEADER_SIZE + h.len as usize, "used length");
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(a + HEADER_SIZE as u64))
                .unwrap();
            self.received.push_back((h, payload));
            let head = self.rx.add(&self.mem, &[Buf::writable(a, RX_BUF)]).unwrap();
            self.rx_bufs.insert(u32::from(head), a);
        }
        notify(&mut self.dev, 0);
    }

    /// Waits for the next packet to the guest.
    fn expect_packet(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = self.received.pop_front() {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            self.poll(Duration::from_millis(50));
        }
    }

    fn expect_op(&mut self, want: u16) -> Header {
        loop {
            let (h, _) = self.expect_packet();
            if h.op == op::CREDIT_UPDATE && want != op::CREDIT_UPDATE {
                continue;
            }
            assert_eq!(h.op, want, "packet {h:?}");
            return h;
        }
    }
}

fn libc_pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn listen(path: &Path, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", path.display())).unwrap()
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const BIG: usize = 100 << 20;

#[test]
fn guest_to_host_stream_of_100_mib_arrives_intact() {
    let mut g = Guest::new();
    let listener = listen(&g.path, 5000);
    let host = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n;
        }
        (total, hash.finalize().to_vec())
    });
    g.send(g.header(5000, 1234, op::REQUEST), &[]);
    let resp = g.expect_op(op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 1234));
    let mut peer_buf = resp.buf_alloc;
    let mut peer_fwd = resp.fwd_cnt;
    assert_eq!(peer_buf, CONN_BUF_ALLOC);

    let payload = data(BIG, 7);
    let want = Sha256::digest(&payload).to_vec();
    let mut sent = 0usize;
    while sent < BIG {
        let credit = peer_buf as usize - (sent as u32).wrapping_sub(peer_fwd) as usize;
        if credit == 0 {
            let (h, _) = g.expect_packet();
            assert_eq!(h.op, op::CREDIT_UPDATE, "{h:?}");
            (peer_buf, peer_fwd) = (h.buf_alloc, h.fwd_cnt);
            continue;
        }
        let n = credit.min(MAX_PAYLOAD as usize).min(BIG - sent);
        let mut h = g.header(5000, 1234, op::RW);
        h.len = n as u32;
        g.send(h, &payload[sent..sent + n]);
        sent += n;
        g.poll(Duration::ZERO);
        while let Some((h, _)) = g.received.pop_front() {
            (peer_buf, peer_fwd) = (h.buf_alloc, h.fwd_cnt);
        }
    }
    let mut h = g.header(5000, 1234, op::SHUTDOWN);
    h.flags = shutdown::SEND | shutdown::RECEIVE;
    g.send(h, &[]);
    // The device delivers what is buffered, then closes with RST.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        g.poll(Duration::from_millis(20));
        if g.received.iter().any(|(h, _)| h.op == op::RST) {
            break;
        }
        assert!(Instant::now() < deadline, "no RST after the close");
    }
    let (total, got) = host.join().unwrap();
    assert_eq!(total, BIG);
    assert_eq!(got, want, "sha256 of what the host received");
}

#[test]
fn host_to_guest_stream_of_100_mib_arrives_intact() {
    let mut g = Guest::new();
    let path = g.path.clone();
    let payload = data(BIG, 11);
    let want = Sha256::digest(&payload).to_vec();
    let host = thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"CONNECT 6000\n").unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("OK "), "{line:?}");
        let host_port: u32 = line[3..].trim().parse().unwrap();
        s.write_all(&payload).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // The guest's reply, then the guest's close.
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        (host_port, reply)
    });
    let req = g.expect_op(op::REQUEST);
    assert_eq!(req.dst_port, 6000);
    let host_port = req.src_port;
    g.send(g.header(host_port, 6000, op::RESPONSE), &[]);
    let mut hash = Sha256::new();
    let mut total = 0usize;
    let mut fwd = 0u32;
    let mut reported = 0u32;
    // The last packet carries the device's credit for the guest.
    let last = loop {
        let (h, p) = g.expect_packet();
        match h.op {
            op::RW => {
                assert!(
                    (total as u32).wrapping_sub(fwd) as usize + p.len() <= GUEST_BUF_ALLOC as usize,
                    "the device sent beyond the guest's credit"
                );
                hash.update(&p);
                total += p.len();
                fwd = fwd.wrapping_add(p.len() as u32);
                if fwd.wrapping_sub(reported) >= 64 << 10 {
                    let mut u = g.header(host_port, 6000, op::CREDIT_UPDATE);
                    u.fwd_cnt = fwd;
                    g.send(u, &[]);
                    reported = fwd;
                }
            }
            op::SHUTDOWN => {
                assert_eq!(h.flags & shutdown::SEND, shutdown::SEND);
                break h;
            }
            op::CREDIT_UPDATE => {}
            other => panic!("unexpected op {other}"),
        }
    };
    assert_eq!(total, BIG);
    assert_eq!(hash.finalize().to_vec(), want);
    // The guest answers within its credit (nothing sent yet, so the
    // device must not claim to have forwarded anything: the `OK` line it
    // wrote to the host is not guest data), then closes its side.
    let (peer_buf, peer_fwd) = (last.buf_alloc, last.fwd_cnt);
    let in_flight = 0u32.wrapping_sub(peer_fwd);
    assert!(
        in_flight <= peer_buf && peer_buf - in_flight >= 5,
        "no credit for the reply: buf_alloc {peer_buf}, fwd_cnt {peer_fwd}"
    );
    let mut h = g.header(host_port, 6000, op::RW);
    h.len = 5;
    h.fwd_cnt = fwd;
    g.send(h, b"done\n");
    let mut h = g.header(host_port, 6000, op::SHUTDOWN);
    h.flags = shutdown::SEND | shutdown::RECEIVE;
    g.send(h, &[]);
    g.expect_op(op::RST);
    let (port, reply) = host.join().unwrap();
    assert_eq!(port, host_port);
    assert_eq!(reply, b"done\n");
}

#[test]
fn many_concurrent_streams_in_both_directions() {
    const STREAMS: u32 = 64;
    const EACH: usize = 256 << 10;
    let mut g = Guest::new();
    let listener = listen(&g.path, 7000);
    let server = thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().unwrap();
            handles.push(thread::spawn(move || {
                // Echo with a twist: each byte + 1.
                let mut all = Vec::new();
                s.read_to_end(&mut all).unwrap();
                let out: Vec<u8> = all.iter().map(|b| b.wrapping_add(1)).collect();
                s.write_all(&out).unwrap();
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    struct Stream {
        sent: usize,
        peer_buf: u32,
        peer_fwd: u32,
        got: Vec<u8>,
        fwd: u32,
        reported: u32,
        done: bool,
    }
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    for i in 0..STREAMS {
        let port = 40000 + i;
        g.send(g.header(7000, port, op::REQUEST), &[]);
        streams.insert(
            port,
            Stream {
                sent: 0,
                peer_buf: 0,
                peer_fwd: 0,
                got: Vec::new(),
                fwd: 0,
                reported: 0,
                done: false,
            },
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while streams.values().any(|s| !s.done) {
        assert!(Instant::now() < deadline, "streams did not finish");
        g.poll(Duration::from_millis(5));
        while let Some((h, p)) = g.received.pop_front() {
            let s = streams.get_mut(&h.dst_port).unwrap();
            s.peer_buf = h.buf_alloc;
            s.peer_fwd = h.fwd_cnt;
            match h.op {
                op::RW => {
                    s.got.extend_from_slice(&p);
                    s.fwd = s.fwd.wrapping_add(p.len() as u32);
                }
                op::SHUTDOWN | op::RST => s.done = true,
                op::RESPONSE | op::CREDIT_UPDATE => {}
                other => panic!("unexpected op {other} on {}", h.dst_port),
            }
        }
        let ports: Vec<u32> = streams.keys().copied().collect();
        for port in ports {
            let s = streams.get_mut(&port).unwrap();
            let fwd = s.fwd;
            if s.peer_buf > 0 && s.sent < EACH {
                let credit =
                    s.peer_buf as usize - (s.sent as u32).wrapping_sub(s.peer_fwd) as usize;
                let n = credit.min(16 << 10).min(EACH - s.sent);
                if n > 0 {
                    let chunk = data(EACH, u64::from(port))[s.sent..s.sent + n].to_vec();
                    s.sent += n;
                    let mut h = g.header(7000, port, op::RW);
                    h.len = n as u32;
                    h.fwd_cnt = fwd;
                    g.send(h, &chunk);
                }
            } else if s.sent == EACH {
                s.sent += 1;
                let mut h = g.header(7000, port, op::SHUTDOWN);
                h.flags = shutdown::SEND;
                h.fwd_cnt = fwd;
                g.send(h, &[]);
            }
            // Tell the device what this guest has consumed.
            let s = streams.get_mut(&port).unwrap();
            if s.fwd != s.reported {
                s.reported = s.fwd;
                let mut u = g.header(7000, port, op::CREDIT_UPDATE);
                u.fwd_cnt = s.fwd;
                g.send(u, &[]);
            }
        }
    }
    for (port, s) in &streams {
        let want: Vec<u8> = data(EACH, u64::from(*port))
            .iter()
            .map(|b| b.wrapping_add(1))
            .collect();
        assert!(
            s.got == want,
            "stream {port} corrupted ({} bytes)",
            s.got.len()
        );
        g.send(g.header(7000, *port, op::RST), &[]);
    }
    server.join().unwrap();
}

#[test]
fn hostile_packets_are_refused_and_the_device_goes_on() {
    let mut g = Guest::new();
    let listener = listen(&g.path, 5001);

    // No listener on the port: RST.
    g.send(g.header(5999, 1, op::REQUEST), &[]);
    assert_eq!(g.expect_op(op::RST).dst_port, 1);
    // Data for a connection that does not exist: RST.
    let mut h = g.header(5001, 2, op::RW);
    h.len = 3;
    g.send(h, b"abc");
    assert_eq!(g.expect_op(op::RST).dst_port, 2);
    // A spoofed source CID: ignored.
    let mut h = g.header(5001, 3, op::REQUEST);
    h.src_cid = 99;
    g.send(h, &[]);
    // A datagram type: RST.
    let mut h = g.header(5001, 4, op::REQUEST);
    h.kind = 2;
    g.send(h, &[]);
    assert_eq!(g.expect_op(op::RST).dst_port, 4);
    // A header cut short, and a chain with nothing readable.
    let a = g.alloc.alloc(64);
    g.send_raw(&[Buf::readable(a, 20)]);
    g.send_raw(&[Buf::writable(a, 64)]);

    // A real connection, then a payload length beyond the buffers: RST.
    g.send(g.header(5001, 5, op::REQUEST), &[]);
    g.expect_op(op::RESPONSE);
    let (mut host_side, _) = listener.accept().unwrap();
    let mut h = g.header(5001, 5, op::RW);
    h.len = 1000;
    g.send(h, b"short");
    assert_eq!(g.expect_op(op::RST).dst_port, 5);
    let mut buf = [0u8; 8];
    assert_eq!(
        host_side.read(&mut buf).unwrap(),
        0,
        "device closed its socket"
    );

    // A guest ignoring its credit: RST once more than CONN_BUF_ALLOC is
    // buffered (the host side never reads).
    g.send(g.header(5001, 6, op::REQUEST), &[]);
    g.expect_op(op::RESPONSE);
    let (host_side, _) = listener.accept().unwrap();
    let chunk = vec![0x42u8; MAX_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..64 {
        let mut h = g.header(5001, 6, op::RW);
        h.len = MAX_PAYLOAD;
        g.send(h, &chunk);
        g.poll(Duration::ZERO);
        if g.received
            .iter()
            .any(|(h, _)| h.op == op::RST && h.dst_port == 6)
        {
            reset = true;
            break;
        }
    }
    assert!(reset, "credit violation was not reset");
    g.received.clear();
    drop(host_side);

    // After all that, a normal connection still works.
    g.send(g.header(5001, 7, op::REQUEST), &[]);
    g.expect_op(op::RESPONSE);
    let (mut s, _) = listener.accept().unwrap();
    let mut h = g.header(5001, 7, op::RW);
    h.len = 5;
    g.send(h, b"hello");
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // The host closes: the guest hears SHUTDOWN.
    drop(s);
    let h = g.expect_op(op::SHUTDOWN);
    assert_eq!(h.dst_port, 7);
}

#[test]
fn bad_connect_lines_are_closed_and_the_path_is_removed_on_drop() {
    let g = Guest::new();
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"HELLO 5\n").unwrap();
    let mut g = g;
    g.poll(Duration::from_millis(50));
    let mut buf = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed after a bad line");
    let path = g.path.clone();
    assert!(path.exists());
    drop(g.dev);
    assert!(!path.exists(), "socket path removed");
    let err = Vsock::new(2, &path).unwrap_err();
    assert_eq!(
        err.to_string(),
        "vsock guest CID 2 is reserved; use 3 or more"
    );
}

#[test]
fn a_restored_device_resets_the_guests_connections_and_loses_no_buffer() {
    let mut g = Guest::new();
    let listener = listen(&g.path, 5000);
    g.send(g.header(5000, 1234, op::REQUEST), &[]);
    g.expect_op(op::RESPONSE);
    let (mut old_host_side, _) = listener.accept().unwrap();
    // The driver's event buffers, as Linux posts them at probe (it posts
    // 8); nothing is written to them before a restore.
    let event_buf = g.alloc.alloc(4);
    g.mem.write_obj(u32::MAX, GuestAddress(event_buf)).unwrap();
    g.event.add(&g.mem, &[Buf::writable(event_buf, 4)]).unwrap();
    let spare_event_buf = g.alloc.alloc(4);
    g.event
        .add(&g.mem, &[Buf::writable(spare_event_buf, 4)])
        .unwrap();
    notify(&mut g.dev, 2);
    assert!(g.event.pop_used(&g.mem).is_none());

    // A host-initiated connection takes a host port.
    let path = g.path.clone();
    let host = thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"CONNECT 5001\n").unwrap();
        s
    });
    let old_port = g.expect_op(op::REQUEST).src_port;
    let _old_host_connection = host.join().unwrap();

    // The driver has acknowledged every interrupt so far.
    let mut status = [0u8; 4];
    g.dev.read(0x60, &mut status);
    g.dev.write(0x64, &status);
    let state = g.dev.save();
    assert!(state.active);
    assert_eq!(state.interrupt_status, 0);
    // The device holds an RX buffer for its next packet; the snapshot hands
    // it back, so the restored device takes exactly where the guest expects.
    assert_eq!(state.queues[0].next_avail, g.rx.used_idx(&g.mem));

    let new_path = g.path.with_file_name("restored.sock");
    let irq = Arc::new(InterruptCounter::default());
    let restored = MmioTransport::restore(
        Box::new(Vsock::new(CID, &new_path).unwrap()),
        g.mem.clone(),
        irq.clone(),
        &state,
    )
    .unwrap();
    drop(std::mem::replace(&mut g.dev, restored));
    g.backend = g.dev.backend_fd().unwrap();
    g.path = new_path;

    // The event's interrupt status survives the restore of the saved
    // (empty) status, and the line is raised again once the VMM says the
    // vCPUs can take it.
    g.dev.read(0x60, &mut status);
    assert_eq!(u32::from_le_bytes(status) & 1, 1, "used-buffer status");
    let edges = irq.count();
    g.dev.raise_pending_interrupt();
    assert_eq!(irq.count(), edges + 1);
    let (_, len) = g.event.pop_used(&g.mem).expect("a transport-reset event");
    assert_eq!(len, 4);
    let id: u32 = g.mem.read_obj(GuestAddress(event_buf)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    assert!(irq.count() >= 1, "the event raised the interrupt");
    // The old VMM's sockets are gone with it.
    let mut rest = Vec::new();
    assert_eq!(old_host_side.read_to_end(&mut rest).unwrap(), 0);

    // A host connection made before the guest has handled the reset is
    // held back: offered now, the reset would kill it.
    let path = g.path.clone();
    let host = thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"CONNECT 6000\n").unwrap();
        s
    });
    let mut held = host.join().unwrap();
    g.poll(Duration::from_millis(100));
    assert!(g.received.is_empty(), "offered early: {:?}", g.received);

    // The guest opens a connection to the host before it handles the
    // reset (its TX work ran first)...
    let listener = listen(&g.path, 5000);
    g.send(g.header(5000, 1235, op::REQUEST), &[]);
    g.expect_op(op::RESPONSE);
    let (mut early, _) = listener.accept().unwrap();
    // ...then handles the reset, re-reading its CID first, which resets
    // that connection in the guest without a packet: its host side is
    // closed now rather than left waiting forever.
    let mut cid = [0u8; 8];
    g.dev.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    early
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(early.read_to_end(&mut rest).unwrap(), 0);
    g.poll(Duration::from_millis(50));
    assert!(g.received.is_empty(), "offered mid-reset: {:?}", g.received);

    // The driver puts the event buffer back when it is done: the held
    // connection is offered then, from a host port after the old
    // device's (a guest still holds sockets of the old ones until it has
    // handled the reset).
    let before = g.event.avail_index();
    g.event.add(&g.mem, &[Buf::writable(event_buf, 4)]).unwrap();
    assert!(
        g.event.must_notify(&g.mem, before),
        "the driver would not notify the event queue"
    );
    notify(&mut g.dev, 2);
    let req = g.expect_op(op::REQUEST);
    assert_eq!(req.dst_port, 6000);
    assert!(
        req.src_port > old_port,
        "host port {} reused (the old device had reached {old_port})",
        req.src_port
    );
    g.send(g.header(req.src_port, 6000, op::RESPONSE), &[]);
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = [0u8; 3];
    held.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK ");
    // Only the rest of the OK line, then nothing: still open.
    held.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 16];
    let n = held.read(&mut byte).unwrap_or(0);
    assert!(byte[..n].ends_with(b"\n"));
    assert!(matches!(held.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
}

#[test]
fn a_full_host_backlog_resets_the_guest_connection_without_blocking() {
    let mut g = Guest::new();
    // A listener that never accepts, its backlog filled by connects that
    // would block from here on.
    let listener = listen(&g.path, 5100);
    let mut fillers = Vec::new();
    let target = std::path::PathBuf::from(format!("{}_5100", g.path.display()));
    loop {
        match supermachine_host::connect_unix_nonblocking(&target) {
            Ok(stream) => fillers.push(stream),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                break;
            }
        }
        assert!(fillers.len() < 100_000, "the backlog never filled");
    }
    let started = Instant::now();
    g.send(g.header(5100, 77, op::REQUEST), &[]);
    assert_eq!(g.expect_op(op::RST).dst_port, 77);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The device goes on: a listener with room gets its connection.
    drop((fillers, listener));
    let other = listen(&g.path, 5101);
    g.send(g.header(5101, 78, op::REQUEST), &[]);
    assert_eq!(g.expect_op(op::RESPONSE).dst_port, 78);
    other.accept().unwrap();
}

#[test]
fn a_stale_socket_path_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    // A VMM killed without cleaning up leaves its socket file behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(CID, &path).expect("a stale socket is replaced");
    // Now the path is live: a second device is refused.
    let err = Vsock::new(CID, &path).unwrap_err();
    assert!(
        err.to_string().contains("already exists and is in use"),
        "{err}"
    );
    drop(dev);
    assert!(!path.exists());
    // Nor is a regular file ever removed.
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(Vsock::new(CID, &path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}
