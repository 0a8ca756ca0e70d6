//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer).

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{run, workspace_root};

/// Every target, in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "virtq_chain",
    "blk_request",
    "vsock_packet",
    "agent_frames",
    "net_frames",
];

fn ensure_tooling() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        eprintln!("xtask: installing the nightly toolchain (cargo-fuzz needs it)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("cargo-fuzz needs a nightly toolchain")?;
    }
    crate::deps::ensure_cargo_subcommand("fuzz", "cargo-fuzz")
}

/// Runs `targets` (all when empty) for `seconds` each.
pub fn run_targets(targets: &[String], seconds: u64) -> Result<()> {
    ensure_tooling()?;
    let chosen: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets.to_vec()
    };
    for t in &chosen {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target '{t}' (targets: {})",
                TARGETS.join(", ")
            );
        }
    }
    let fuzz_dir = workspace_root().join("fuzz");
    for t in &chosen {
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        run(Command::new("cargo")
            .current_dir(&fuzz_dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .args(["+nightly", "fuzz", "run", t, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=4096"))
        .with_context(|| {
            format!("fuzz target {t} failed (crash input under fuzz/artifacts/{t})")
        })?;
    }
    Ok(())
}
