//! The device against a real virtiofsd, driven through the virtio-mmio
//! transport exactly as the guest's driver does: bring-up, then FUSE
//! requests on the request queue, answered by virtiofsd from a host
//! directory straight into guest memory.
//!
//! virtiofsd comes from `$SUPERMACHINE_VIRTIOFSD` (which `cargo xtask ci`
//! sets to the copy it installs), else PATH; without one the test fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};
use supermachine_virtio_fs::Fs;
use supermachine_virtio_testing::{Allocator, Buf, bring_up, device_features, notify, transport};
use vm_memory::FileOffset;

const MEM_SIZE: usize = 4 << 20;
const VERSION_1: u64 = 1 << 32;
const FUSE_INIT: u32 = 26;
const FUSE_LOOKUP: u32 = 1;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

fn virtiofsd() -> PathBuf {
    if let Some(p) = std::env::var_os("SUPERMACHINE_VIRTIOFSD").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .find(|c| c.is_file())
        })
        .expect(
            "virtiofsd: set SUPERMACHINE_VIRTIOFSD or put it on PATH (cargo xtask ci installs it)",
        )
}

/// Guest memory on a shared memfd, as the VMM makes it for shares.
fn shared_memory() -> GuestMemoryMmapped {
    let file: std::fs::File =
        rustix::fs::memfd_create("virtio-fs-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd")
            .into();
    file.set_len(MEM_SIZE as u64).expect("size");
    GuestMemoryMmapped::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("shared guest memory")
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_virtiofsd(dir: &std::path::Path, socket: &std::path::Path, read_only: bool) -> Daemon {
    let mut c = Command::new(virtiofsd());
    c.arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .args(["--cache=never", "--sandbox=none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if read_only {
        c.arg("--readonly");
    }
    let daemon = Daemon(c.spawn().expect("starting virtiofsd"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "virtiofsd never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon
}

fn in_header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(IN_HEADER);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
    h
}

/// Whether the device's call eventfd becomes readable within `timeout_ms`.
fn call_is_pending(t: &supermachine_virtio_mmio::MmioTransport, timeout_ms: i32) -> bool {
    let fd = t.backend_fd().expect("the call eventfd");
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the transport's open eventfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
    p.revents & libc::POLLIN != 0
}

/// Sends one FUSE request on the request queue and waits for its answer:
/// (error, body).
fn request(
    t: &mut supermachine_virtio_mmio::MmioTransport,
    mem: &GuestMemoryMmapped,
    queue: &mut supermachine_virtio_testing::DriverQueue,
    alloc: &mut Allocator,
    request: &[u8],
) -> (i32, Vec<u8>) {
    let req = alloc.alloc(request.len() as u64);
    mem.write_slice(request, GuestAddress(req))
        .expect("request in guest memory");
    let reply = alloc.alloc(4096);
    queue
        .add(
            mem,
            &[
                Buf::readable(req, request.len() as u32),
                Buf::writable(reply, 4096),
            ],
        )
        .expect("room on the ring");
    notify(t, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let len = loop {
        if let Some((_, len)) = queue.pop_used(mem) {
            break len;
        }
        assert!(Instant::now() < deadline, "virtiofsd never answered");
        if call_is_pending(t, 50) {
            t.backend_ready();
        }
    };
    let mut out = vec![0u8; len as usize];
    mem.read_slice(&mut out, GuestAddress(reply))
        .expect("reply in guest memory");
    assert!(out.len() >= OUT_HEADER, "short reply");
    let error = i32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
    (error, out[OUT_HEADER..].to_vec())
}

#[test]
fn fuse_requests_are_answered_from_the_host_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"from the host").unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("fs.sock");
    let _daemon = start_virtiofsd(dir.path(), &socket, false);

    let mem = shared_memory();
    let fs = Fs::new("share", &socket).expect("connecting to virtiofsd");
    let (mut t, irq) = transport(Box::new(fs), &mem);

    // The tag and one request queue, as the guest reads them.
    let mut tag = [0u8; 36];
    t.read(0x100, &mut tag);
    assert_eq!(&tag[..5], b"share");
    assert!(tag[5..].iter().all(|b| *b == 0));

    let offered = device_features(&mut t);
    assert!(offered & VERSION_1 != 0);
    let mut alloc = Allocator::new(0x1000, MEM_SIZE as u64);
    let (mut queues, status) = bring_up(&mut t, &mem, &mut alloc, VERSION_1, &[64, 64]);
    assert_eq!(
        status & 0x40,
        0,
        "the device failed to activate (status {status:#x})"
    );

    let mut init = in_header(IN_HEADER + 64, FUSE_INIT, 1, 0);
    for word in [7u32, 31, 0x20000, 0, 0] {
        init.extend_from_slice(&word.to_le_bytes());
    }
    init.extend_from_slice(&[0u8; 44]);
    let (error, body) = request(&mut t, &mem, &mut queues[1], &mut alloc, &init);
    assert_eq!(error, 0, "FUSE_INIT failed");
    assert_eq!(
        u32::from_le_bytes(body[0..4].try_into().unwrap()),
        7,
        "FUSE major version"
    );
    // virtiofsd writes the used ring before it signals its call eventfd,
    // so the answer can be seen before the call arrives: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while irq.count() == 0 && Instant::now() < deadline {
        if call_is_pending(&t, 50) {
            t.backend_ready();
        }
    }
    assert!(irq.count() > 0, "the backend's call became an interrupt");

    let name = b"hello.txt\0";
    let mut lookup = in_header(IN_HEADER + name.len(), FUSE_LOOKUP, 2, 1);
    lookup.extend_from_slice(name);
    let (error, body) = request(&mut t, &mem, &mut queues[1], &mut alloc, &lookup);
    assert_eq!(error, 0, "looking up the host's file");
    // fuse_entry_out: nodeid, generation, entry/attr validity (4 x u64
    // and 2 x u32), then fuse_attr: ino u64, size u64.
    let size = u64::from_le_bytes(body[48..56].try_into().unwrap());
    assert_eq!(size, 13, "the file's size as the host has it");

    let missing = b"nope\0";
    let mut lookup = in_header(IN_HEADER + missing.len(), FUSE_LOOKUP, 3, 1);
    lookup.extend_from_slice(missing);
    let (error, _) = request(&mut t, &mem, &mut queues[1], &mut alloc, &lookup);
    assert_eq!(error, -libc::ENOENT);
}

#[test]
fn anonymous_guest_memory_fails_activation_not_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("fs.sock");
    let _daemon = start_virtiofsd(dir.path(), &socket, false);
    let mem = supermachine_virtio_testing::guest_memory(MEM_SIZE);
    let fs = Fs::new("share", &socket).expect("connecting to virtiofsd");
    let (mut t, _) = transport(Box::new(fs), &mem);
    let mut alloc = Allocator::new(0x1000, MEM_SIZE as u64);
    let (_, status) = bring_up(&mut t, &mem, &mut alloc, VERSION_1, &[64, 64]);
    assert_ne!(
        status & 0x40,
        0,
        "expected DEVICE_NEEDS_RESET, got status {status:#x}"
    );
}
