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

use supermachine::{Network, NetworkMode, Vm, VmConfig};

use crate::Env;
use crate::bench_proto::{self, ECHO, MESSAGE, QUIT, SINK, SOURCE};
use crate::bench_virtio::{Figures, ROUND_TRIPS, STREAM_BYTES, measure_streams, percentile};

pub fn run(env: &Env, runs: usize) -> ExitCode {
    match measure(env, runs) {
        Ok(figures) => {
            print_table(runs, figures);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("bench-net failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A passt newer than Debian 12's, when xtask staged one (see its
/// `deps::newer_passt`): measured in a second VM, as a column of its own.
const NEWER_PASST: &str = "passt-newer";

/// What one invocation measures.
struct Measured {
    /// virtio-net through the system's passt.
    net: Figures,
    /// virtio-net through [`NEWER_PASST`], if there is one.
    newer_net: Option<Figures>,
    /// vsock in the first VM.
    vsock: Figures,
    /// TCP over the host's loopback.
    host: Figures,
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

fn measure(env: &Env, runs: usize) -> Result<Measured, String> {
    let baseline = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let host = measure_streams(&loopback_peer(&baseline), runs)
        .map_err(|e| format!("loopback baseline: {e}"))?;
    let (net, vsock) = measure_vm(env, runs, None)?;
    let newer = env.asset(NEWER_PASST);
    let newer_net = match newer.is_file() {
        true => Some(measure_vm(env, runs, Some(newer))?.0),
        false => None,
    };
    Ok(Measured {
        net,
        newer_net,
        vsock: vsock.ok_or("vsock was not measured")?,
        host,
    })
}

/// virtio-net through `passt` (the system's when `None`) in a new VM, and
/// vsock in the same VM when `passt` is the system's.
fn measure_vm(
    env: &Env,
    runs: usize,
    passt: Option<std::path::PathBuf>,
) -> Result<(Figures, Option<Figures>), String> {
    let with_vsock = passt.is_none();
    let options = VmConfig {
        network: Network {
            mode: NetworkMode::Passt,
            passt,
            ..Network::default()
        },
        ..crate::bench_exec::vm_config(env)
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
    let vsock = if with_vsock {
        Some(measure_streams(&open_vsock, runs).map_err(|e| format!("vsock: {e}"))?)
    } else {
        None
    };
    let _ = open_vsock(QUIT);
    let _ = peer.wait();
    Ok((net, vsock))
}

fn print_table(runs: usize, m: Measured) {
    let Measured {
        mut net,
        mut newer_net,
        mut vsock,
        mut host,
    } = m;
    println!(
        "net: {runs} runs; latency over {} round trips of {MESSAGE} B, throughput = median run of {} MiB",
        runs * ROUND_TRIPS,
        STREAM_BYTES >> 20
    );
    let newer_label = match newer_net {
        Some(_) => "virtio-net + passt 2025-05-03",
        None => "virtio-net + passt 2025-05-03 (not staged)",
    };
    println!(
        "| measure | virtio-net + system passt | {newer_label} | vsock (same VM) | TCP over the host's loopback | net / vsock | net / loopback |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cell = |v: Option<f64>, unit: &str, digits: usize| match v {
        Some(v) => format!("{v:.digits$} {unit}"),
        None => "-".to_string(),
    };
    for (label, p) in [("round trip p50", 0.5), ("round trip p99", 0.99)] {
        let us = |f: &mut Figures| percentile(&mut f.round_trips, p).as_secs_f64() * 1e6;
        let [a, b, c] = [&mut net, &mut vsock, &mut host].map(us);
        let newer = newer_net.as_mut().map(us);
        println!(
            "| {label} | {a:.1} us | {} | {b:.1} us | {c:.1} us | {:.2}x | {:.2}x |",
            cell(newer, "us", 1),
            a / b.max(1e-9),
            a / c.max(1e-9)
        );
    }
    let mbps = |d: Duration| STREAM_BYTES as f64 / d.as_secs_f64().max(1e-9) / 1e6;
    for (label, pick) in [("guest to host", 0usize), ("host to guest", 1usize)] {
        let rate = |f: &mut Figures| {
            let v = if pick == 0 {
                &mut f.from_peer
            } else {
                &mut f.to_peer
            };
            mbps(percentile(v, 0.5))
        };
        let [a, b, c] = [&mut net, &mut vsock, &mut host].map(rate);
        let newer = newer_net.as_mut().map(rate);
        println!(
            "| {label} throughput | {a:.0} MB/s | {} | {b:.0} MB/s | {c:.0} MB/s | {:.2}x | {:.2}x |",
            cell(newer, "MB/s", 0),
            a / b.max(1e-9),
            a / c.max(1e-9)
        );
    }
}
