//! `cargo xtask bench oci`: getting an image from a registry to a root
//! disk, against the same job done by standard tools in the same run.
//!
//! The image (about 170 MiB unpacked, 4 gzip layers) is built from files
//! this machine already has: busybox, GCC's libraries and Perl. A real
//! registry (Debian's docker-registry) serves it on 127.0.0.1. Each run
//! times, from an empty cache:
//! - supermachine: `supermachine pull` (fetch, verify, unpack, mkfs.erofs);
//! - baseline: `skopeo copy` to an OCI layout, `umoci unpack`, and the
//!   same `mkfs.erofs` command line on the unpacked tree;
//!
//! and then `supermachine pull` again with everything cached. The order of
//! the two cold jobs alternates between runs.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::deps;
use crate::oci_layout::{self, Layer};
use crate::util::{run, workspace_root};

/// The host directories each layer above busybox holds (those present).
const LAYER_DIRS: &[&[&str]] = &[
    &["usr/lib/gcc"],
    &["usr/share/perl", "usr/share/perl5"],
    &[
        "usr/lib/x86_64-linux-gnu/perl",
        "usr/lib/x86_64-linux-gnu/perl-base",
    ],
];

pub fn bench(runs: usize) -> Result<()> {
    deps::ensure_packages(deps::OCI_TOOLS)?;
    let runs = runs.max(1);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo).current_dir(workspace_root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "supermachine",
    ]))?;
    let supermachine = workspace_root().join("target/release/supermachine");

    let work = tempfile::Builder::new()
        .prefix("supermachine-bench-oci-")
        .tempdir()?;
    let layout = work.path().join("layout");
    eprintln!("xtask: building the benchmark image");
    let (unpacked, packed) = build_layout(&layout)?;
    let registry = Registry::start(&work.path().join("registry"))?;
    let reference = format!("{}/bench/image:v1", registry.addr);
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reference}"),
    ]))?;
    eprintln!(
        "xtask: image {reference}: {:.1} MiB compressed, {:.1} MiB unpacked, {} layers",
        mib(packed),
        mib(unpacked),
        LAYER_DIRS.len() + 1
    );

    let mut ours = Vec::new();
    let mut cached = Vec::new();
    let mut baseline = Vec::new();
    for i in 0..runs {
        let run_dir = work.path().join(format!("run{i}"));
        fs::create_dir(&run_dir)?;
        let mut cold_ours = || -> Result<f64> {
            let cache = run_dir.join("cache");
            let t = time(
                Command::new(&supermachine)
                    .args(["pull", &reference])
                    .env("XDG_CACHE_HOME", &cache),
            )?;
            cached.push(time(
                Command::new(&supermachine)
                    .args(["pull", &reference])
                    .env("XDG_CACHE_HOME", &cache),
            )?);
            Ok(t)
        };
        if i % 2 == 0 {
            ours.push(cold_ours()?);
            baseline.push(standard_tools(&reference, &run_dir.join("baseline"))?);
        } else {
            baseline.push(standard_tools(&reference, &run_dir.join("baseline"))?);
            ours.push(cold_ours()?);
        }
        fs::remove_dir_all(&run_dir)?;
        eprintln!(
            "xtask: run {}/{runs}: supermachine {:.2} s, tools {:.2} s (skopeo {:.2} + umoci {:.2} + mkfs {:.2}), cached {:.3} s",
            i + 1,
            ours[i],
            baseline[i].total(),
            baseline[i].copy,
            baseline[i].unpack,
            baseline[i].mkfs,
            cached[i]
        );
    }

    let ours_m = median(&ours);
    let tools_m = median(&baseline.iter().map(Stages::total).collect::<Vec<_>>());
    let stage = |f: fn(&Stages) -> f64| median(&baseline.iter().map(f).collect::<Vec<_>>());
    let cached_m = median(&cached);
    println!();
    println!(
        "oci: registry on 127.0.0.1 to a root disk, {:.1} MiB image ({:.1} MiB unpacked), median of {runs} runs",
        mib(packed),
        mib(unpacked)
    );
    println!("| measure | time | ratio to the tools |");
    println!("|---|---|---|");
    println!(
        "| supermachine pull, empty cache (fetch + verify + unpack + mkfs.erofs) | {ours_m:.2} s | {:.2}x |",
        ours_m / tools_m
    );
    println!("| skopeo copy + umoci unpack + mkfs.erofs | {tools_m:.2} s | 1.00x |");
    println!(
        "| - skopeo copy (registry to OCI layout) | {:.2} s | |",
        stage(|s| s.copy)
    );
    println!("| - umoci unpack | {:.2} s | |", stage(|s| s.unpack));
    println!(
        "| - mkfs.erofs (same flags) | {:.2} s | |",
        stage(|s| s.mkfs)
    );
    println!(
        "| supermachine pull again, all cached | {:.3} s | {:.3}x |",
        cached_m,
        cached_m / tools_m
    );
    Ok(())
}

/// The three stages of the standard-tools baseline.
struct Stages {
    copy: f64,
    unpack: f64,
    mkfs: f64,
}

impl Stages {
    fn total(&self) -> f64 {
        self.copy + self.unpack + self.mkfs
    }
}

fn standard_tools(reference: &str, dir: &Path) -> Result<Stages> {
    fs::create_dir_all(dir)?;
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let copy = time(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:v1", layout.display()),
    ]))?;
    let mut umoci = Command::new("umoci");
    umoci.arg("unpack");
    if !is_root() {
        umoci.arg("--rootless");
    }
    let unpack = time(
        umoci
            .arg("--image")
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
    )?;
    // The command line supermachine's rootfs builder uses.
    let mkfs = time(
        Command::new("mkfs.erofs")
            .args([
                "--quiet",
                "--preserve-mtime",
                "-x2",
                "-U12345678-1234-1234-1234-123456789abc",
            ])
            .arg(dir.join("disk.erofs"))
            .arg(bundle.join("rootfs")),
    )?;
    Ok(Stages { copy, unpack, mkfs })
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `cmd` quietly and returns its wall time in seconds.
fn time(cmd: &mut Command) -> Result<f64> {
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    let elapsed = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(elapsed)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Writes an OCI layout of the benchmark image; returns its unpacked and
/// compressed sizes.
fn build_layout(layout: &Path) -> Result<(u64, u64)> {
    let staging = tempfile::tempdir()?;
    fs::create_dir_all(staging.path().join("bin"))?;
    fs::copy("/bin/busybox", staging.path().join("bin/busybox"))
        .context("/bin/busybox (Debian's busybox-static)")?;
    std::os::unix::fs::symlink("busybox", staging.path().join("bin/sh"))?;
    let mut layers = vec![Layer::Dir {
        root: staging.path().to_path_buf(),
        entries: vec!["bin".into()],
    }];
    for dirs in LAYER_DIRS {
        let present: Vec<String> = dirs
            .iter()
            .filter(|d| Path::new("/").join(d).exists())
            .map(|d| d.to_string())
            .collect();
        if present.is_empty() {
            bail!("none of {dirs:?} exists on this machine");
        }
        layers.push(Layer::Dir {
            root: PathBuf::from("/"),
            entries: present,
        });
    }
    let written = oci_layout::write(
        layout,
        &oci_layout::Image {
            name: "localhost/bench/image:v1",
            layers,
            exec: serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]}),
        },
    )?;
    Ok((written.unpacked, written.packed))
}

/// Debian's docker-registry on a free loopback port, killed on drop.
struct Registry {
    addr: String,
    child: Child,
}

impl Registry {
    fn start(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let registry = Self { addr, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&registry.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
