//! `cargo xtask bench snapshot`, the native half: the counting test guest
//! snapshotted and restored by supermachine and by Firecracker, side by
//! side in one run on one host, at 128 MiB, 512 MiB and 2 GiB.
//!
//! Restore time is measured the same way for both, from outside: from
//! spawning the process to the first complete report the restored guest
//! prints on its serial console (the guest prints one every 16 counts, so
//! that line comes within a few microseconds of guest time after the
//! first instruction). Firecracker's includes its API round trips (socket
//! ready, `PUT /snapshot/load` with `resume_vm`), which is how it
//! restores; ours is `supermachine boot --restore DIR`. Runs alternate.
//!
//! Also: snapshot creation (ours: `Machine::snapshot_and_stop`;
//! Firecracker's: `PUT /snapshot/create` of a paused VM), and the host
//! memory each extra restored VM adds when 20 run from one snapshot (the
//! sum of their proportional set sizes, less one VM's, over 19).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use supermachine::{Console, Machine, MachineConfig};

use crate::bench_run::{median_and_percentile, ms};
use crate::firecracker::Firecracker;

const REPORT_SHIFT: u32 = 4;
const SIZES_MIB: [u64; 3] = [128, 512, 2048];
const SHARERS: usize = 20;

/// Median and 99th percentile.
pub(crate) fn median_p99(values: &[f64]) -> (f64, f64) {
    median_and_percentile(values, 0.99)
}

/// Reads lines until one is a complete report of the counting guest.
fn first_report(out: &mut impl BufRead) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the guest's console ended before it reported".into());
        }
        let l = line.trim_end();
        if l.len() == 8 && l.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(());
        }
    }
}

/// Our snapshot of the counting guest with `mib` of RAM; returns the
/// time `snapshot_and_stop` took.
fn ours_snapshot(kernel: &Path, mib: u64, dir: &Path) -> Result<Duration, String> {
    let (reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
    let mut config = MachineConfig::new(kernel);
    config.memory_bytes = mib << 20;
    config.entropy = false;
    config.console = Console::Writer(Box::new(writer));
    let machine = Machine::start(config).map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::new(reader);
    for _ in 0..3 {
        first_report(&mut reader)?;
    }
    // Keep draining so the guest never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let started = Instant::now();
    machine.snapshot_and_stop(dir).map_err(|e| e.to_string())?;
    let took = started.elapsed();
    machine.wait().map_err(|e| e.to_string())?;
    let _ = drain.join();
    Ok(took)
}

/// Firecracker's Full snapshot of the same guest; returns the time
/// `PUT /snapshot/create` took.
fn firecracker_snapshot(
    binary: &Path,
    kernel: &Path,
    mib: u64,
    dir: &Path,
) -> Result<Duration, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut fc = Firecracker::start(binary, &dir.join("api.sock"))?;
    fc.request(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0"}}"#,
            kernel.display()
        ),
    )?;
    fc.request(
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count":1,"mem_size_mib":{mib}}}"#),
    )?;
    fc.request("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#)?;
    let mut out = fc.stdout.take().ok_or("no console")?;
    for _ in 0..3 {
        first_report(&mut out)?;
    }
    let drain = std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let took = fc.snapshot(dir)?;
    drop(fc);
    let _ = drain.join();
    Ok(took)
}

/// A restored VM that keeps running (and printing) until dropped.
enum Restored {
    Ours {
        child: Child,
        _console: std::thread::JoinHandle<()>,
    },
    Firecracker {
        vm: Firecracker,
        _console: std::thread::JoinHandle<()>,
    },
}

impl Restored {
    fn pid(&self) -> u32 {
        match self {
            Restored::Ours { child, .. } => child.id(),
            Restored::Firecracker { vm, .. } => vm.pid(),
        }
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Restored::Ours { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn drain(out: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<()> {
    let mut out = out;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    })
}

/// `supermachine boot --restore`: (time to the first report, the VM).
fn ours_restore(supermachine: &Path, snapshot: &Path) -> Result<(Duration, Restored), String> {
    let started = Instant::now();
    let mut child = Command::new(supermachine)
        .args(["boot", "--restore"])
        .arg(snapshot)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let result = first_report(&mut out);
    let took = started.elapsed();
    let vm = Restored::Ours {
        child,
        _console: drain(out),
    };
    result.map(|()| (took, vm))
}

/// Firecracker: process start, API socket, `PUT /snapshot/load` with
/// resume, first report. Returns (time to the report, time of the load
/// request alone, the VM).
fn firecracker_restore(
    binary: &Path,
    snapshot: &Path,
    socket: &Path,
) -> Result<(Duration, Duration, Restored), String> {
    let started = Instant::now();
    let mut fc = Firecracker::start(binary, socket)?;
    let load = Instant::now();
    fc.restore(snapshot, None)?;
    let load_took = load.elapsed();
    let mut out = fc.stdout.take().ok_or("no console")?;
    first_report(&mut out)?;
    let took = started.elapsed();
    Ok((
        took,
        load_took,
        Restored::Firecracker {
            vm: fc,
            _console: drain(out),
        },
    ))
}

/// Proportional set size of a process, in KiB.
pub(crate) fn pss_kib(pid: u32) -> Result<u64, String> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("smaps_rollup of {pid}: {e}"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no Pss for {pid}"))
}

/// Host memory per extra VM when `SHARERS` restores of one snapshot run
/// at once, in KiB: (sum of PSS of all) - (PSS of one alone), over the
/// rest.
fn shared_cost(mut start: impl FnMut(usize) -> Result<Restored, String>) -> Result<f64, String> {
    let one = start(0)?;
    std::thread::sleep(Duration::from_millis(300));
    let alone = pss_kib(one.pid())?;
    let mut all = vec![one];
    for i in 1..SHARERS {
        all.push(start(i)?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let total: u64 = all
        .iter()
        .map(|v| pss_kib(v.pid()))
        .sum::<Result<u64, _>>()?;
    Ok((total as f64 - alone as f64) / (SHARERS - 1) as f64)
}

pub(crate) fn run(supermachine: &Path, firecracker: &Path, runs: usize) -> ExitCode {
    match bench(supermachine, firecracker, runs.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-snapshot-native: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(supermachine: &Path, firecracker: &Path, runs: usize) -> Result<(), String> {
    let work = std::env::temp_dir().join(format!(
        "supermachine-bench-snapshot-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(work.clone());
    let kernel = work.join("counting.elf");
    std::fs::write(
        &kernel,
        supermachine_test_guests::counting_guest(REPORT_SHIFT),
    )
    .map_err(|e| e.to_string())?;

    let mut rows = Vec::new();
    for mib in SIZES_MIB {
        eprintln!("bench-snapshot-native: {mib} MiB: snapshots");
        let ours_dir = work.join(format!("ours-{mib}"));
        let fc_dir = work.join(format!("fc-{mib}"));
        let ours_create = ours_snapshot(&kernel, mib, &ours_dir)?;
        let fc_create = firecracker_snapshot(firecracker, &kernel, mib, &fc_dir)?;
        eprintln!("bench-snapshot-native: {mib} MiB: {runs} restores each");
        let mut ours = Vec::new();
        let mut fc = Vec::new();
        let mut fc_load = Vec::new();
        for i in 0..runs {
            let socket = work.join("restore.sock");
            let mut one = |first: bool| -> Result<(), String> {
                if first {
                    let (t, vm) = ours_restore(supermachine, &ours_dir)?;
                    ours.push(ms(t));
                    drop(vm);
                } else {
                    let (t, load, vm) = firecracker_restore(firecracker, &fc_dir, &socket)?;
                    fc.push(ms(t));
                    fc_load.push(ms(load));
                    drop(vm);
                }
                Ok(())
            };
            one(i % 2 == 0)?;
            one(i % 2 == 1)?;
        }
        let memory = if mib == 512 {
            eprintln!("bench-snapshot-native: {mib} MiB: {SHARERS} VMs from one snapshot");
            let socket_dir = work.join("sharers");
            std::fs::create_dir_all(&socket_dir).map_err(|e| e.to_string())?;
            let ours_kib =
                shared_cost(|_| ours_restore(supermachine, &ours_dir).map(|(_, vm)| vm))?;
            let fc_kib = shared_cost(|i| {
                firecracker_restore(firecracker, &fc_dir, &socket_dir.join(format!("{i}.sock")))
                    .map(|(_, _, vm)| vm)
            })?;
            Some((ours_kib, fc_kib))
        } else {
            None
        };
        rows.push((mib, ours, fc, fc_load, ours_create, fc_create, memory));
    }

    println!("snapshot-native:");
    println!(
        "| guest RAM | supermachine restore p50 / p99 (ms) | Firecracker restore p50 / p99 (ms) | ratio p50 | Firecracker's load request alone p50 (ms) | snapshot creation: supermachine / Firecracker (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for (mib, ours, fc, fc_load, ours_create, fc_create, _) in &rows {
        let (o50, o99) = median_p99(ours);
        let (f50, f99) = median_p99(fc);
        let (l50, _) = median_p99(fc_load);
        println!(
            "| {mib} MiB | {o50:.2} / {o99:.2} | {f50:.2} / {f99:.2} | {:.2}x | {l50:.2} | {:.1} / {:.1} |",
            o50 / f50,
            ms(*ours_create),
            ms(*fc_create)
        );
    }
    for (mib, .., memory) in &rows {
        if let Some((ours_kib, fc_kib)) = memory {
            println!(
                "| host memory per extra VM, {SHARERS} restores of one {mib} MiB snapshot (PSS) | {:.0} KiB | {:.0} KiB | {:.2}x | | |",
                ours_kib,
                fc_kib,
                ours_kib / fc_kib
            );
        }
    }
    println!(
        "(restore: process spawn to the restored guest's first report on its console, {runs} runs each, alternating)"
    );
    Ok(())
}
