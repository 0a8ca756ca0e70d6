//! The guest half of `cargo xtask bench virtio`. First it times sequential
//! O_DIRECT writes and reads over the whole of /dev/vda (`--blk-runs`
//! times each) and prints one `BENCH-BLK` line per pass; then it serves
//! vsock commands from the host on `PORT` until told to quit. With
//! `--tcp-connect HOST:PORT` it first serves the same commands over TCP,
//! connecting out to the host (through the guest's network) for each
//! one, until told to quit there.

#[path = "../bench_proto.rs"]
mod bench_proto;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::thread;
use std::time::Instant;

use bench_proto::{BLK_LINE, BLOCK_IO, ECHO, PORT, QUIT, SINK, SOURCE};
use vsock::{VMADDR_CID_ANY, VsockListener};

const DISK: &str = "/dev/vda";
/// O_DIRECT wants buffers aligned to the logical block size; a page
/// covers every device.
const ALIGN: usize = 4096;

fn main() -> ExitCode {
    let runs = std::env::args()
        .skip_while(|a| a != "--blk-runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    // `--blk-runs 0`: only the vsock service (the exec benchmark's guest).
    if runs > 0
        && let Err(e) = bench_blk(runs)
    {
        println!("BENCH-FAIL blk: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(target) = std::env::args().skip_while(|a| a != "--tcp-connect").nth(1)
        && let Err(e) = serve_tcp(&target)
    {
        println!("BENCH-FAIL tcp: {e}");
        return ExitCode::FAILURE;
    }
    match serve_vsock() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("BENCH-FAIL vsock: {e}");
            ExitCode::FAILURE
        }
    }
}

fn disk_bytes() -> io::Result<u64> {
    let sectors = std::fs::read_to_string("/sys/block/vda/size")?;
    sectors
        .trim()
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn open_direct(write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(DISK)
}

fn bench_blk(runs: usize) -> io::Result<()> {
    let total = disk_bytes()?;
    let mut backing = vec![0u8; BLOCK_IO + ALIGN];
    let start = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[start..start + BLOCK_IO];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + 1) as u8;
    }
    for _ in 0..runs {
        let mut disk = open_direct(true)?;
        let began = Instant::now();
        let mut done = 0;
        while done < total {
            let n = (total - done).min(BLOCK_IO as u64) as usize;
            disk.write_all(&buf[..n])?;
            done += n as u64;
        }
        disk.sync_all()?;
        println!("{BLK_LINE} write {total} {}", began.elapsed().as_nanos());

        let mut disk = open_direct(false)?;
        let began = Instant::now();
        let mut done = 0;
        while done < total {
            let n = (total - done).min(BLOCK_IO as u64) as usize;
            disk.read_exact(&mut buf[..n])?;
            done += n as u64;
        }
        println!("{BLK_LINE} read {total} {}", began.elapsed().as_nanos());
    }
    Ok(())
}

fn serve_vsock() -> io::Result<()> {
    let listener = VsockListener::bind_with_cid_port(VMADDR_CID_ANY, PORT)?;
    loop {
        let (mut s, _) = listener.accept()?;
        let mut command = [0u8; 1];
        s.read_exact(&mut command)?;
        match command[0] {
            QUIT => return Ok(()),
            ECHO => drop(thread::spawn(move || report("echo", bench_proto::echo(s)))),
            SINK => drop(thread::spawn(move || report("sink", bench_proto::sink(s)))),
            SOURCE => drop(thread::spawn(move || {
                report(
                    "source",
                    bench_proto::source(s, |s| s.shutdown(Shutdown::Write)),
                )
            })),
            other => println!("BENCH-FAIL unknown command {other}"),
        }
    }
}

/// One command per connection to `target`, served in turn.
fn serve_tcp(target: &str) -> io::Result<()> {
    loop {
        let mut s = std::net::TcpStream::connect(target)?;
        s.set_nodelay(true)?;
        let mut command = [0u8; 1];
        s.read_exact(&mut command)?;
        let result = match command[0] {
            QUIT => return Ok(()),
            ECHO => bench_proto::echo(s),
            SINK => bench_proto::sink(s),
            SOURCE => bench_proto::source(s, |s| s.shutdown(Shutdown::Write)),
            other => Err(io::Error::other(format!("unknown command {other}"))),
        };
        report("tcp", result);
    }
}

fn report(what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        println!("BENCH-FAIL {what}: {e}");
    }
}
