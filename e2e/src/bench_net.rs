//! `supermachine-e2e bench-net`: guest networking (virtio-net + passt)
//! measured with the virtio benchmark's peer and protocol, next to vsock
//! in the same VM and a TCP connection over the host's own loopback, in
//! one run.
//!
//! The guest's `bench-peer` connects out to the host through passt's
//! gateway (the host's loopback) for each command, then serves the same
//! commands over vsock. Round trips are `MESSAGE` bytes each way;
//! throughput is `STREAM_BYTES` each way. The baseline runs first, while
//! no VM competes for the CPU.

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use supermachine::{GuestImage, Network, NetworkMode, Vm, VmConfig};

use crate::Env;
use crate::bench_proto::{self, ECHO, MESSAGE, QUIT, SINK, SOURCE};
use crate::bench_virtio::{Figures, ROUND_TRIPS, STREAM_BYTES, measure_streams, percentile};

pub fn run(env: &Env, runs: usize) -> ExitCode {
    match measure(env, runs) {
        Ok([net, vsock, host]) => {
            print_table(runs, net, vsock, host);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("bench-net failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The baseline: TCP over the host's loopback, its far end served by the
/// same handlers the guest runs.
fn loopback_peer(listener: &TcpListener) -> impl Fn(u8) -> io::Result<TcpStream> + '_ {
    move |command| {
        let ours = TcpStream::connect(listener.local_addr()?)?;
        let (theirs, _) = listener.accept()?;
        ours.set_nodelay(true)?;
        theirs.set_nodelay(true)?;
        std::thread::spawn(move || {
            let result = match command {
                ECHO => bench_proto::echo(theirs),
                SINK => bench_proto::sink(theirs),
                SOURCE => bench_proto::source(theirs, |s| s.shutdown(std::net::Shutdown::Write)),
                _ => Ok(()),
            };
            if let Err(e) = result {
                eprintln!("loopback peer: {e}");
            }
        });
        Ok(ours)
    }
}

fn measure(env: &Env, runs: usize) -> Result<[Figures; 3], String> {
    let baseline = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let host = measure_streams(&loopback_peer(&baseline), runs)
        .map_err(|e| format!("loopback baseline: {e}"))?;

    let options = VmConfig {
        guest: Some(GuestImage {
            kernel: env.asset("vmlinux"),
            initramfs: env.asset("initramfs.cpio"),
        }),
        hostname: "bench".into(),
        memory_bytes: 512 << 20,
        network: Network {
            mode: NetworkMode::Passt,
            ..Network::default()
        },
        ..VmConfig::default()
    };
    let vm = Vm::start(&env.asset("rootfs.erofs"), &options).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let target = format!(
        "{}:{}",
        supermachine::GATEWAY_IPV4,
        listener.local_addr().map_err(|e| e.to_string())?.port()
    );
    let peer = vm
        .exec(["bench-peer", "--blk-runs", "0", "--tcp-connect", &target])
        .spawn()
        .map_err(|e| format!("starting bench-peer: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let open_tcp = |command: u8| -> io::Result<TcpStream> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    s.write_all(&[command])?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        }
    };
    let net = measure_streams(&open_tcp, runs).map_err(|e| format!("virtio-net: {e}"))?;
    open_tcp(QUIT).map_err(|e| e.to_string())?;
    let open_vsock = |command: u8| crate::bench_exec::open_peer(&vm, command);
    let vsock = measure_streams(&open_vsock, runs).map_err(|e| format!("vsock: {e}"))?;
    let _ = open_vsock(QUIT);
    let _ = peer.wait();
    Ok([net, vsock, host])
}

fn print_table(runs: usize, mut net: Figures, mut vsock: Figures, mut host: Figures) {
    println!(
        "net: {runs} runs; latency over {} round trips of {MESSAGE} B, throughput = median run of {} MiB",
        runs * ROUND_TRIPS,
        STREAM_BYTES >> 20
    );
    println!(
        "| measure | virtio-net + passt | vsock (same VM) | TCP over the host's loopback | net / vsock | net / loopback |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, p) in [("round trip p50", 0.5), ("round trip p99", 0.99)] {
        let [a, b, c] = [&mut net, &mut vsock, &mut host]
            .map(|f| percentile(&mut f.round_trips, p).as_secs_f64() * 1e6);
        println!(
            "| {label} | {a:.1} us | {b:.1} us | {c:.1} us | {:.2}x | {:.2}x |",
            a / b.max(1e-9),
            a / c.max(1e-9)
        );
    }
    let mbps = |d: Duration| STREAM_BYTES as f64 / d.as_secs_f64().max(1e-9) / 1e6;
    for (label, pick) in [("guest to host", 0usize), ("host to guest", 1usize)] {
        let [a, b, c] = [&mut net, &mut vsock, &mut host].map(|f| {
            let v = if pick == 0 {
                &mut f.from_peer
            } else {
                &mut f.to_peer
            };
            mbps(percentile(v, 0.5))
        });
        println!(
            "| {label} throughput | {a:.0} MB/s | {b:.0} MB/s | {c:.0} MB/s | {:.2}x | {:.2}x |",
            a / b.max(1e-9),
            a / c.max(1e-9)
        );
    }
}
