//! `supermachine-e2e bench-virtio`: vsock and virtio-blk measured through a
//! real guest, each next to a baseline on the same host in the same run.
//!
//! - vsock round trips (`MESSAGE` bytes each way) and throughput in both
//!   directions, against the same exchanges over a Unix socket pair on the
//!   host (what a host program would use without a VM).
//! - virtio-blk sequential O_DIRECT writes and reads of the whole disk in
//!   `BLOCK_IO` pieces, timed in the guest, against writing and reading the
//!   image file directly on the host with the same piece size. Both sides
//!   see the host page cache as it is (the device does buffered I/O on the
//!   image), so the ratio is the cost of the virtio path, not of a disk.
//!
//! The baselines run first, while no VM competes for the CPU.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::bench_proto::{self, BLK_LINE, BLOCK_IO, ECHO, MESSAGE, PORT, QUIT, SINK, SOURCE};
use crate::{Env, Scratch, connect_to_guest};

/// Round trips per run (latency percentiles are over all runs' trips).
pub(crate) const ROUND_TRIPS: usize = 1000;
/// Bytes per throughput run, each direction.
pub(crate) const STREAM_BYTES: u64 = 64 << 20;
/// The guest's disk, written and read whole in each run.
const DISK_BYTES: u64 = 64 << 20;

/// One side's figures: every round trip, and the duration of each
/// throughput run.
#[derive(Default)]
pub(crate) struct Figures {
    pub(crate) round_trips: Vec<Duration>,
    pub(crate) to_peer: Vec<Duration>,
    pub(crate) from_peer: Vec<Duration>,
    blk_write: Vec<Duration>,
    blk_read: Vec<Duration>,
}

pub fn run(env: &Env, runs: usize) -> ExitCode {
    match measure(env, runs) {
        Ok((vm, host)) => {
            print_table(runs, vm, host);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("bench-virtio failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn measure(env: &Env, runs: usize) -> Result<(Figures, Figures), String> {
    let scratch = Scratch::new("bench-virtio")?;
    let mut host = measure_streams(&socket_pair_peer, runs)
        .map_err(|e| format!("Unix socket baseline: {e}"))?;
    let baseline_file = scratch.0.join("baseline.img");
    for _ in 0..runs {
        let (w, r) = file_pass(&baseline_file).map_err(|e| format!("file baseline: {e}"))?;
        host.blk_write.push(w);
        host.blk_read.push(r);
    }
    std::fs::remove_file(&baseline_file).map_err(|e| format!("file baseline: {e}"))?;

    let disk = scratch.0.join("disk.img");
    File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .map_err(|e| format!("creating {}: {e}", disk.display()))?;
    let socket = scratch.0.join("vm.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (socket, stop) = (socket.clone(), stop.clone());
        thread::spawn(move || -> io::Result<Figures> {
            // The guest listens only after its block passes; the first
            // connection waits for them.
            let open = |command: u8| -> io::Result<UnixStream> {
                let mut s = connect_to_guest(&socket, PORT, &stop).map_err(io::Error::other)?;
                s.write_all(&[command])?;
                Ok(s)
            };
            let figures = measure_streams(&open, runs)?;
            open(QUIT)?;
            Ok(figures)
        })
    };
    let r = env.boot(&[
        "--kernel",
        &env.path(crate::KERNEL),
        "--initrd",
        &env.path("bench-virtio.cpio"),
        "--disk",
        &disk.display().to_string(),
        "--vsock",
        &socket.display().to_string(),
        "--memory",
        "512M",
        "--append",
        &format!("quiet bench_runs={runs}"),
    ]);
    stop.store(true, Ordering::SeqCst);
    let mut vm = driver
        .join()
        .map_err(|_| "the vsock driver panicked".to_string())?
        .map_err(|e| format!("vsock: {e}\n  {}", r.describe()))?;
    if r.code != Some(0) || r.stdout.contains("BENCH-FAIL") {
        return Err(format!("the guest failed\n  {}", r.describe()));
    }
    for line in r.stdout.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some(BLK_LINE) {
            continue;
        }
        let bad = || format!("bad guest line {line:?}");
        let kind = words.next().ok_or_else(bad)?;
        let bytes: u64 = words.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        let nanos: u64 = words.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        if bytes != DISK_BYTES {
            return Err(format!("guest line {line:?}: expected {DISK_BYTES} bytes"));
        }
        match kind {
            "write" => vm.blk_write.push(Duration::from_nanos(nanos)),
            "read" => vm.blk_read.push(Duration::from_nanos(nanos)),
            _ => return Err(bad()),
        }
    }
    if vm.blk_write.len() != runs || vm.blk_read.len() != runs {
        return Err(format!(
            "expected {runs} block passes from the guest\n  {}",
            r.describe()
        ));
    }
    Ok((vm, host))
}

/// The baseline peer: a Unix socket pair whose far end is served by the
/// same command handlers the guest program runs.
fn socket_pair_peer(command: u8) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    thread::spawn(move || {
        let result = match command {
            ECHO => bench_proto::echo(theirs),
            SINK => bench_proto::sink(theirs),
            SOURCE => bench_proto::source(theirs, |s| s.shutdown(Shutdown::Write)),
            _ => Ok(()),
        };
        if let Err(e) = result {
            eprintln!("baseline peer: {e}");
        }
    });
    Ok(ours)
}

/// A stream whose writing half can be closed on its own.
pub(crate) trait HalfClose: Read + Write {
    fn close_write(&self) -> io::Result<()>;
}

impl HalfClose for UnixStream {
    fn close_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl HalfClose for std::net::TcpStream {
    fn close_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Round trips and both throughput directions, `runs` times, through
/// streams that `open` starts with a command byte.
pub(crate) fn measure_streams<S: HalfClose>(
    open: &dyn Fn(u8) -> io::Result<S>,
    runs: usize,
) -> io::Result<Figures> {
    let mut f = Figures::default();
    for _ in 0..runs {
        let mut s = open(ECHO)?;
        let mut message = [0x42u8; MESSAGE];
        for _ in 0..ROUND_TRIPS {
            let began = Instant::now();
            s.write_all(&message)?;
            s.read_exact(&mut message)?;
            f.round_trips.push(began.elapsed());
        }
        drop(s);

        let mut s = open(SINK)?;
        let chunk = vec![0xa5u8; 1 << 16];
        let began = Instant::now();
        let mut left = STREAM_BYTES;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        s.close_write()?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)?;
        f.to_peer.push(began.elapsed());
        expect_count("the peer received", u64::from_le_bytes(count))?;

        let mut s = open(SOURCE)?;
        let began = Instant::now();
        s.write_all(&STREAM_BYTES.to_le_bytes())?;
        let received = io::copy(&mut s, &mut io::sink())?;
        f.from_peer.push(began.elapsed());
        expect_count("the host received", received)?;
    }
    Ok(f)
}

fn expect_count(what: &str, got: u64) -> io::Result<()> {
    if got == STREAM_BYTES {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} {got} bytes, expected {STREAM_BYTES}"
        )))
    }
}

/// Writes `DISK_BYTES` to `path` in `BLOCK_IO` pieces and syncs, then reads
/// it back the same way: the host-side equivalent of the guest's passes.
fn file_pass(path: &Path) -> io::Result<(Duration, Duration)> {
    let mut buf = vec![0x3cu8; BLOCK_IO];
    let began = Instant::now();
    let mut file = File::create(path)?;
    let mut left = DISK_BYTES;
    while left > 0 {
        let n = left.min(BLOCK_IO as u64) as usize;
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    let wrote = began.elapsed();
    let began = Instant::now();
    let mut file = File::open(path)?;
    let mut left = DISK_BYTES;
    while left > 0 {
        let n = left.min(BLOCK_IO as u64) as usize;
        file.read_exact(&mut buf[..n])?;
        left -= n as u64;
    }
    Ok((wrote, began.elapsed()))
}

pub(crate) fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

pub(crate) fn mib_per_s(bytes: u64, v: &mut [Duration]) -> f64 {
    let median = percentile(v, 0.5).as_secs_f64();
    if median > 0.0 {
        bytes as f64 / (1 << 20) as f64 / median
    } else {
        0.0
    }
}

fn print_table(runs: usize, mut vm: Figures, mut host: Figures) {
    println!(
        "virtio: {runs} runs; latency over {} round trips of {MESSAGE} B, throughput = median run ({} MiB streams, {} MiB disk in {} KiB I/Os)",
        runs * ROUND_TRIPS,
        STREAM_BYTES >> 20,
        DISK_BYTES >> 20,
        BLOCK_IO >> 10
    );
    println!("| measure | supermachine | baseline (same host, same run) | ratio |");
    println!("|---|---|---|---|");
    for (label, p) in [
        ("vsock round trip p50", 0.5),
        ("vsock round trip p99", 0.99),
    ] {
        let (a, b) = (
            percentile(&mut vm.round_trips, p),
            percentile(&mut host.round_trips, p),
        );
        println!(
            "| {label} | {:.1} us | {:.1} us (Unix socket pair) | {:.1}x slower |",
            a.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            a.as_secs_f64() / b.as_secs_f64().max(1e-12)
        );
    }
    let rows = [
        (
            "vsock host to guest",
            "Unix socket pair",
            &mut vm.to_peer,
            &mut host.to_peer,
            STREAM_BYTES,
        ),
        (
            "vsock guest to host",
            "Unix socket pair",
            &mut vm.from_peer,
            &mut host.from_peer,
            STREAM_BYTES,
        ),
        (
            "virtio-blk sequential write",
            "write + fsync of the image file",
            &mut vm.blk_write,
            &mut host.blk_write,
            DISK_BYTES,
        ),
        (
            "virtio-blk sequential read",
            "read of the image file",
            &mut vm.blk_read,
            &mut host.blk_read,
            DISK_BYTES,
        ),
    ];
    for (label, baseline, ours, theirs, bytes) in rows {
        let (a, b) = (mib_per_s(bytes, ours), mib_per_s(bytes, theirs));
        println!(
            "| {label} | {a:.1} MiB/s | {b:.1} MiB/s ({baseline}) | {:.2}x |",
            a / b.max(1e-12)
        );
    }
}
