//! `supermachine-e2e bench-exec`: the agent's costs against the raw vsock
//! path they ride on, in one VM and one run.
//!
//! - exec round trip: `vm.exec(["true"]).output()` from request to exit
//!   status, against a 64-byte vsock echo round trip to a guest program
//!   (the virtio benchmark's `bench-peer`, started through the agent in
//!   the same VM);
//! - the same exec round trip against the guest's own cost of starting
//!   `true` (a shell in the guest forking and exec'ing it in a loop);
//! - stdout throughput: `dd if=/dev/zero bs=1M count=64` read through exec
//!   stdout (dd's 1 MiB writes keep the producer's own cost small, as the
//!   guest program's static buffer does), against the same number of
//!   bytes sent by the guest program over a raw vsock stream.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use supermachine::{Vm, VmConfig};

use crate::Env;
use crate::bench_proto::{PORT, QUIT};
use crate::bench_virtio::{ROUND_TRIPS, STREAM_BYTES, measure_streams, mib_per_s, percentile};

/// Execs per run.
const EXECS: usize = 200;

pub fn run(env: &Env, runs: usize, probe: bool) -> ExitCode {
    match measure(env, runs, probe) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("bench-exec failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn measure(env: &Env, runs: usize, probe: bool) -> Result<(), String> {
    let vm = Vm::start(&env.asset("rootfs.erofs"), &vm_config(env)).map_err(|e| e.to_string())?;
    let ready_in = vm.ready_in();
    let peer = vm
        .exec(["bench-peer", "--blk-runs", "0"])
        .spawn()
        .map_err(|e| format!("starting bench-peer: {e}"))?;
    let open = |command: u8| open_peer(&vm, command);
    let mut raw = measure_streams(&open, runs).map_err(|e| format!("raw vsock: {e}"))?;
    let _ = open(QUIT);
    let _ = peer.wait();

    // The guest's own cost of starting `true`: a shell in the guest
    // forking and exec'ing it EXECS times (one agent exec amortised).
    let mut guest_spawns = Vec::with_capacity(runs);
    let guest_loop = format!("i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done");
    for _ in 0..runs {
        let began = Instant::now();
        let out = vm
            .exec(["sh", "-c", &guest_loop])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("the guest spawn loop: {}", out.status));
        }
        guest_spawns.push(began.elapsed() / EXECS as u32);
    }

    let mut exec_trips = Vec::with_capacity(runs * EXECS);
    let mut stdout_runs = Vec::with_capacity(runs);
    for _ in 0..runs {
        for _ in 0..EXECS {
            let began = Instant::now();
            let out = vm.exec(["true"]).output().map_err(|e| e.to_string())?;
            exec_trips.push(began.elapsed());
            if !out.status.success() {
                return Err(format!("true: {}", out.status));
            }
        }
        let began = Instant::now();
        let mut p = vm
            .exec([
                "dd",
                "if=/dev/zero",
                "bs=1048576",
                &format!("count={}", STREAM_BYTES >> 20),
            ])
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdout = p.take_stdout().ok_or("no stdout")?;
        let got = io::copy(&mut stdout, &mut io::sink()).map_err(|e| e.to_string())?;
        let info = p.wait().map_err(|e| e.to_string())?;
        stdout_runs.push(began.elapsed());
        if got != STREAM_BYTES || !info.status.success() {
            return Err(format!("stdout run: {got} bytes, {}", info.status));
        }
    }
    if probe {
        // Where an exec's time goes: request to `Started` (the spawn), and
        // `Started` to the exit.
        let (mut to_started, mut to_exit) = (Vec::new(), Vec::new());
        for _ in 0..100 {
            let began = Instant::now();
            let p = vm.exec(["true"]).spawn().map_err(|e| e.to_string())?;
            let started = began.elapsed();
            p.wait().map_err(|e| e.to_string())?;
            to_started.push(started);
            to_exit.push(began.elapsed() - started);
        }
        println!(
            "probe exec `true` x100: request to Started p50 {:.2?}, Started to exit p50 {:.2?}",
            percentile(&mut to_started, 0.5),
            percentile(&mut to_exit, 0.5)
        );
        for script in [
            "time head -c 67108864 /dev/zero > /dev/null",
            "time head -c 67108864 /dev/zero | cat > /dev/null",
            "head -c 67108864 /dev/zero > /tmp/z",
        ] {
            let began = Instant::now();
            let out = vm
                .exec(["sh", "-c", script])
                .output()
                .map_err(|e| e.to_string())?;
            println!(
                "probe {script:?}: {:.2?} host; {}",
                began.elapsed(),
                String::from_utf8_lossy(&out.stderr).replace('\n', " ")
            );
        }
        let began = Instant::now();
        let n = vm
            .read_file_to("/tmp/z", io::sink())
            .map_err(|e| e.to_string())?;
        println!(
            "probe read_file 64 MiB: {n} bytes in {:.2?}",
            began.elapsed()
        );
        let began = Instant::now();
        let out = vm
            .exec(["cat", "/tmp/z"])
            .output()
            .map_err(|e| e.to_string())?;
        println!(
            "probe cat 64 MiB: {} bytes in {:.2?}",
            out.stdout.len(),
            began.elapsed()
        );
    }
    vm.stop().map_err(|e| e.to_string())?;

    println!(
        "exec: {runs} runs; {} execs of `true` and {} vsock round trips of 64 B; throughput = median of {runs} runs of {} MiB; agent ready {:.0} ms after VM start",
        runs * EXECS,
        runs * ROUND_TRIPS,
        STREAM_BYTES >> 20,
        ready_in.as_secs_f64() * 1e3
    );
    println!("| measure | through the agent | raw vsock, same VM, same run | ratio |");
    println!("|---|---|---|---|");
    for (label, p) in [("round trip p50", 0.5), ("round trip p99", 0.99)] {
        let (a, b) = (
            percentile(&mut exec_trips, p),
            percentile(&mut raw.round_trips, p),
        );
        println!(
            "| {label} | {:.1} us (exec `true`) | {:.1} us (64 B echo) | {:.1}x |",
            a.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            a.as_secs_f64() / b.as_secs_f64().max(1e-12)
        );
    }
    let (a, b) = (
        percentile(&mut exec_trips, 0.5),
        percentile(&mut guest_spawns, 0.5),
    );
    println!(
        "| starting `true` | {:.1} us (exec round trip p50) | {:.1} us (the guest's shell: fork, exec, wait; mean of {EXECS}) | {:.1}x |",
        a.as_secs_f64() * 1e6,
        b.as_secs_f64() * 1e6,
        a.as_secs_f64() / b.as_secs_f64().max(1e-12)
    );
    let (a, b) = (
        mib_per_s(STREAM_BYTES, &mut stdout_runs),
        mib_per_s(STREAM_BYTES, &mut raw.from_peer),
    );
    println!(
        "| guest to host throughput | {a:.1} MiB/s (exec stdout of dd) | {b:.1} MiB/s (vsock stream) | {:.2}x |",
        a / b.max(1e-12)
    );
    Ok(())
}

/// The VM the guest-side benchmarks run `bench-peer` in.
pub(crate) fn vm_config(env: &Env) -> VmConfig {
    VmConfig {
        guest: Some(env.guest_image()),
        hostname: "bench".into(),
        memory_bytes: 512 << 20,
        ..VmConfig::default()
    }
}

/// A connection to the guest's `bench-peer` on vsock, started with
/// `command` (the peer may not be listening yet).
pub(crate) fn open_peer(vm: &Vm, command: u8) -> io::Result<std::os::unix::net::UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match vm.connect_vsock(PORT) {
            Ok(mut s) => {
                s.write_all(&[command])?;
                return Ok(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}
