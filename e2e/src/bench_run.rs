//! `cargo xtask bench run`: `supermachine run demo true` with a warm
//! cache, phase by phase, beside the same guest kernel booted bare by
//! `supermachine boot` (no image, no agent) and `crun run` of the same
//! image unpacked as an OCI bundle, all in one run on one host.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::Env;
use crate::run::Cli;

/// Phases `run` reports with `SUPERMACHINE_TIMINGS` set, in order.
const PHASES: [(&str, &str); 5] = [
    (
        "resolve_ms",
        "resolve image (store lookup, cached root disk)",
    ),
    ("create_ms", "create VM (memory, devices, kernel load)"),
    ("kernel_boot_ms", "kernel boot to the agent (guest clock)"),
    ("agent_ready_ms", "agent setup and ready handshake"),
    ("workload_ms", "workload exec to exit"),
];

/// Median and the `p` quantile (0 < p <= 1, nearest rank).
pub(crate) fn median_and_percentile(values: &[f64], p: f64) -> (f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let rank = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    (v[v.len() / 2], v[rank])
}

/// Median and 90th percentile.
fn median_p90(values: &[f64]) -> (f64, f64) {
    median_and_percentile(values, 0.9)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `key=value` figure from a timings line.
fn timing(stderr: &str, key: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("supermachine: timings "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Times `command` to its exit, `runs` times; fails on a non-zero exit.
fn time_command(
    runs: usize,
    mut command: impl FnMut(usize) -> Command,
) -> Result<Vec<f64>, String> {
    let mut times = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        let out = command(i)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        if !out.status.success() {
            return Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        times.push(ms(elapsed));
    }
    Ok(times)
}

pub fn run(env: &Env, runs: usize) -> ExitCode {
    match measure(env, runs.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("bench run failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn measure(env: &Env, runs: usize) -> Result<(), String> {
    let cli = Cli::shared(env)?;
    // Warm: the root disk is built and the page cache holds the kernel.
    let warm = cli.run(&["run", "demo", "true"]);
    if warm.code != Some(0) {
        return Err(format!("warm-up run failed:\n  {}", warm.describe()));
    }
    let mut totals = Vec::new();
    let mut phases: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    for _ in 0..runs {
        let r = cli.run_timed(&["run", "demo", "true"]);
        if r.code != Some(0) {
            return Err(format!("run failed:\n  {}", r.describe()));
        }
        totals.push(ms(r.elapsed));
        for (i, (key, _)) in PHASES.iter().enumerate() {
            phases[i]
                .push(timing(&r.stderr, key).ok_or_else(|| format!("no {key} in: {}", r.stderr))?);
        }
    }

    let boot = time_command(runs, |_| {
        let mut c = Command::new(&env.supermachine);
        c.args(["boot", "--kernel", &env.path(crate::KERNEL)])
            .args(["--initrd", &env.path("poweroff.cpio"), "--append", "quiet"]);
        c
    })?;

    let bundle = env.asset("crun-bundle");
    let crun = if bundle.is_dir() && Command::new("crun").arg("--version").output().is_ok() {
        Some(time_command(runs, |i| {
            let mut c = Command::new("crun");
            // No cgroup manager in the bare test host; no pivot_root out
            // of an initramfs root.
            c.args(["--cgroup-manager=disabled", "run", "--no-pivot", "--bundle"])
                .arg(&bundle)
                .arg(format!("bench-{}-{i}", std::process::id()));
            c
        })?)
    } else {
        None
    };

    let (crun_median, crun_p90) = crun.as_deref().map(median_p90).unwrap_or((0.0, 0.0));
    let ratio = |v: f64| {
        if crun_median > 0.0 {
            format!("{:.1}x", v / crun_median)
        } else {
            "-".into()
        }
    };
    let (run_median, run_p90) = median_p90(&totals);
    println!("run: warm-cache `supermachine run demo true`, {runs} runs each, one host");
    println!("| measure | median | p90 | ratio to crun |");
    println!("|---|---|---|---|");
    println!(
        "| supermachine run demo true (process start to exit) | {run_median:.1} ms | {run_p90:.1} ms | {} |",
        ratio(run_median)
    );
    for (i, (_, label)) in PHASES.iter().enumerate() {
        let (m, p) = median_p90(&phases[i]);
        println!("| - {label} | {m:.1} ms | {p:.1} ms | |");
    }
    let (boot_median, boot_p90) = median_p90(&boot);
    println!(
        "| supermachine boot, same kernel, /init powers off (no image, no agent) | {boot_median:.1} ms | {boot_p90:.1} ms | {} |",
        ratio(boot_median)
    );
    match crun {
        Some(_) => println!(
            "| crun run, same image as an OCI bundle (baseline) | {crun_median:.1} ms | {crun_p90:.1} ms | 1.0x |"
        ),
        None => println!("| crun run (baseline) | not installed here | | |"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_timings_parse() {
        let (m, p) = median_p90(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!((m, p), (6.0, 9.0));
        let line = "x\nsupermachine: timings resolve_ms=1.5 create_ms=2.0 total_ms=9.0\n";
        assert_eq!(timing(line, "create_ms"), Some(2.0));
        assert_eq!(timing(line, "boot_ms"), None);
    }
}
