//! `cargo xtask ...`: the project's build, test and benchmark tasks.

mod arch;
mod bench_oci;
mod cpio;
mod deps;
mod fuzz;
mod guest;
mod images;
mod kernel;
mod oci_layout;
mod sysroot;
mod testhost;
mod util;
mod wine;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use arch::Arch;
use testhost::Mode;
use util::{run, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "supermachine project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build (or find in the cache) the minimal guest kernel.
    GuestKernel {
        /// A kernel source tarball to use instead of Debian's linux-source-6.12.
        #[arg(long)]
        source: Option<PathBuf>,
        /// The architecture (aarch64 is cross-built).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
    },
    /// Build (or find in the cache) the QEMU test host's kernel.
    TesthostKernel {
        /// A kernel source tarball to use instead of Debian's linux-source-6.12.
        #[arg(long)]
        source: Option<PathBuf>,
        /// The architecture (aarch64 is cross-built).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
    },
    /// Build (or find in the cache) the guest image every `supermachine`
    /// VM boots: the guest kernel and the agent's initramfs.
    Guest,
    /// Build the test guest images (initramfs archives) into a directory.
    GuestImages {
        #[arg(long, default_value = "target/guest-images")]
        out: PathBuf,
    },
    /// Run the demo image (`supermachine run`), built from Debian's
    /// busybox-static, end to end (inside the QEMU test host when this
    /// host's KVM cannot boot Linux).
    Demo,
    /// Run a command inside the QEMU test host, with `supermachine` on
    /// PATH, the guest kernel and agent where it finds them, the demo
    /// image as ./demo-image and the given files in its working directory.
    Testhost {
        /// The test host's architecture (aarch64: an emulated arm64 host).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
        /// A file or directory (an image archive or OCI layout, say) to
        /// copy in. Repeatable.
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<PathBuf>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Tier-3 end-to-end tests: real guest kernel, real KVM (directly, or
    /// inside the QEMU test host when this host's KVM cannot boot Linux).
    E2e {
        /// The guests' architecture (aarch64: in an emulated arm64 test
        /// host, its tier-2 guest programs first).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// Run the cargo-fuzz targets (nightly; installs cargo-fuzz if missing).
    Fuzz {
        /// A short fixed run of every target, as CI does.
        #[arg(long)]
        smoke: bool,
        /// Seconds per target (without --smoke).
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Check and lint the macOS and Windows builds, and run the Windows
    /// builds' tests under Wine (a step of `ci`).
    OtherPlatforms,
    /// Everything CI runs: install what is missing, fmt, clippy, tiers 1-3
    /// on x86_64, lint and tiers 1-3 for aarch64, macOS and Windows
    /// builds (Windows tests under Wine), a fuzz smoke run.
    Ci,
}

#[derive(Subcommand)]
enum Bench {
    /// VMM start to guest /init, and the VMM's peak RSS.
    Boot {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The guests' architecture (aarch64: in the arm64 test host).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
    },
    /// vsock round trips and throughput against a Unix socket pair, and
    /// virtio-blk sequential I/O against the image file, in one run.
    Virtio {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Guest-to-host TCP round trips and throughput through virtio-net
    /// and passt, against vsock in the same VM and TCP over the host's
    /// loopback, in one run.
    Net {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Exec round trips of `true` against raw vsock round trips, and exec
    /// stdout throughput against a raw vsock stream, in one VM.
    Exec {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also time the pieces of the stdout path (guest-side producer
        /// alone, through a pipe, read_file, cat) once each.
        #[arg(long)]
        probe: bool,
    },
    /// `supermachine run demo true` with a warm cache, phase by phase,
    /// against `supermachine boot` of the same kernel and `crun run` of
    /// the same image.
    Run {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// A registry image to a root disk: `supermachine pull` against
    /// skopeo copy + umoci unpack + mkfs.erofs, and a cached pull.
    Oci {
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Snapshot restore and creation against Firecracker
    /// (`../shared/tools/firecracker` or `--firecracker`), natively, on
    /// the counting test guest at 128 MiB, 512 MiB and 2 GiB, and the
    /// host memory each extra VM adds when 20 share one snapshot.
    Snapshot {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// The Firecracker binary to compare with.
        #[arg(long)]
        firecracker: Option<PathBuf>,
        /// aarch64: the arm64 agent guest in the arm64 test host, beside
        /// the x86_64 one (instead of the native and x86_64 halves).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
    },
}

fn assets_dir() -> PathBuf {
    workspace_root().join("target/e2e-assets")
}

fn prepare(arch: Arch) -> Result<(Mode, testhost::Binaries, PathBuf)> {
    let mode = testhost::detect_mode(arch)?;
    eprintln!(
        "xtask: tier 3 runs {}",
        match mode {
            Mode::Direct => "directly on this host's KVM",
            Mode::TestHost => "inside the QEMU test host (this host's KVM cannot boot Linux)",
        }
    );
    let bins = testhost::build_static_binaries(arch)?;
    let assets = assets_dir();
    if assets.exists() {
        std::fs::remove_dir_all(&assets)?;
    }
    testhost::stage_assets(&assets, &bins)?;
    Ok((mode, bins, assets))
}

/// Runs the e2e runner with `args` (after the mode word) directly or in the
/// test host; returns its output and exit status.
fn run_runner(
    mode: Mode,
    bins: &testhost::Binaries,
    assets: &Path,
    args: &str,
) -> Result<(String, i32)> {
    run_runner_after(mode, bins, assets, "", args)
}

/// [`run_runner`], in the test host after the shell command `before`.
fn run_runner_after(
    mode: Mode,
    bins: &testhost::Binaries,
    assets: &Path,
    before: &str,
    args: &str,
) -> Result<(String, i32)> {
    match mode {
        Mode::Direct => {
            let out = Command::new(&bins.e2e)
                .env("SUPERMACHINE_VIRTIOFSD", deps::virtiofsd()?)
                .args(args.split_whitespace())
                .args(["--supermachine"])
                .arg(&bins.supermachine)
                .arg("--assets")
                .arg(assets)
                .output()
                .context("running supermachine-e2e")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            print!("{text}");
            Ok((text, out.status.code().unwrap_or(1)))
        }
        Mode::TestHost => testhost::run_inside(
            bins,
            assets,
            &format!(
                "{before}./supermachine-e2e {args} --supermachine /e2e/supermachine --assets /e2e"
            ),
        ),
    }
}

fn e2e(arch: Arch) -> Result<()> {
    let (mode, bins, assets) = prepare(arch)?;
    // The KVM backend's tier-2 guest programs of an architecture this
    // machine cannot run natively go first, in the same test host.
    let before = if bins.kvm_guest_programs.is_some() {
        "./kvm-guest-programs --test-threads=1 || { echo 'FAIL tier-2 KVM guest programs'; exit 1; }; "
    } else {
        ""
    };
    // SUPERMACHINE_E2E_ONLY=substring[,substring] runs only the tests whose names
    // contain it (for working on one test).
    let args = match std::env::var("SUPERMACHINE_E2E_ONLY") {
        Ok(only) if !only.trim().is_empty() => format!("test --only {}", only.trim()),
        _ => "test".to_string(),
    };
    let (out, code) = run_runner_after(mode, &bins, &assets, before, &args)?;
    let summary = out
        .lines()
        .rev()
        .find(|l| l.ends_with(" failed") && l.contains(" passed, "))
        .context("the e2e runner printed no summary")?
        .to_string();
    let failures: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    if !failures.is_empty() {
        eprintln!("xtask: e2e failures:\n{}", failures.join("\n"));
    }
    println!("{summary}");
    if code != 0 || !failures.is_empty() {
        bail!("tier-3 tests failed");
    }
    Ok(())
}

/// Runs the e2e runner's `bench-<name>` mode and prints its table (the
/// lines from the one starting with `<name>:`).
fn bench(name: &str, arch: Arch, runs: usize, extra: &str) -> Result<()> {
    // An arm64 run is printed beside the x86_64 one of the same
    // invocation.
    if arch == Arch::Aarch64 {
        bench_one(name, Arch::X86_64, runs, extra)?;
    }
    bench_one(name, arch, runs, extra)
}

/// [`bench`] for guests of one architecture.
fn bench_one(name: &str, arch: Arch, runs: usize, extra: &str) -> Result<()> {
    let (mode, bins, assets) = prepare(arch)?;
    let (out, code) = run_runner(
        mode,
        &bins,
        &assets,
        &format!("bench-{name} --runs {runs} {extra}"),
    )?;
    if code != 0 {
        bail!("the {name} benchmark failed");
    }
    println!();
    println!("({} guests)", arch.name());
    if mode == Mode::TestHost {
        println!(
            "(measured inside the QEMU TCG test host: compare rows with each other, not with native numbers)"
        );
    }
    let heading = format!("{name}:");
    for line in out.lines().filter(|l| l.starts_with("probe ")) {
        println!("{line}");
    }
    for line in out.lines().skip_while(|l| !l.starts_with(&heading)) {
        if line.starts_with(&heading) || line.starts_with('|') {
            println!("{line}");
        }
    }
    Ok(())
}

/// The snapshot benchmark. x86_64: both VMMs restore the counting guest
/// on this host's `/dev/kvm` (where Linux may not boot), then the agent
/// guest where Linux boots. aarch64: the arm64 agent guest in the arm64
/// test host (no Firecracker for arm64 here), beside the x86_64 agent
/// guest of the same invocation.
fn bench_snapshot(runs: usize, firecracker: Option<PathBuf>, arch: Arch) -> Result<()> {
    let firecracker =
        firecracker.unwrap_or_else(|| workspace_root().join("../shared/tools/firecracker"));
    if !firecracker.exists() {
        bail!(
            "no Firecracker at {} (give one with --firecracker)",
            firecracker.display()
        );
    }
    if arch == Arch::X86_64 {
        bench_snapshot_native(runs, &firecracker)?;
    }
    bench_snapshot_linux(runs, Arch::X86_64, Some(&firecracker))?;
    if arch == Arch::Aarch64 {
        bench_snapshot_linux(runs, Arch::Aarch64, None)?;
    }
    Ok(())
}

/// Both VMMs restore the counting guest natively.
fn bench_snapshot_native(runs: usize, firecracker: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(Command::new(&cargo).current_dir(workspace_root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "supermachine",
        "-p",
        "supermachine-e2e",
    ]))?;
    let release = workspace_root().join("target/release");
    util::run(
        Command::new(release.join("supermachine-e2e"))
            .arg("bench-snapshot-native")
            .arg("--supermachine")
            .arg(release.join("supermachine"))
            .arg("--firecracker")
            .arg(firecracker)
            .args(["--runs", &runs.to_string()]),
    )
}

/// The agent guest of `arch`, timed to its first answer after a restore,
/// where Linux boots (a test host here); against Firecracker when given.
fn bench_snapshot_linux(runs: usize, arch: Arch, firecracker: Option<&Path>) -> Result<()> {
    let (mode, bins, assets) = prepare(arch)?;
    let (out, code) = match mode {
        Mode::Direct => {
            let mut runner = Command::new(&bins.e2e);
            runner
                .arg("bench-snapshot-linux")
                .args(["--runs", &runs.to_string()]);
            if let Some(fc) = firecracker {
                runner.arg("--firecracker").arg(fc);
            }
            let out = runner
                .arg("--supermachine")
                .arg(&bins.supermachine)
                .arg("--assets")
                .arg(&assets)
                .output()
                .context("running supermachine-e2e")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            (text, out.status.code().unwrap_or(1))
        }
        Mode::TestHost => {
            let extra: Vec<PathBuf> = firecracker.iter().map(|f| f.to_path_buf()).collect();
            testhost::run_inside_with(
                &bins,
                &assets,
                &extra,
                &format!(
                    "./supermachine-e2e bench-snapshot-linux --runs {runs}{} --supermachine /e2e/supermachine --assets /e2e",
                    if firecracker.is_some() {
                        " --firecracker /e2e/firecracker"
                    } else {
                        ""
                    }
                ),
            )?
        }
    };
    if code != 0 {
        bail!("the {} Linux-guest snapshot benchmark failed", arch.name());
    }
    println!();
    if mode == Mode::TestHost {
        println!(
            "(measured inside the QEMU TCG test host: compare rows with each other, not with native numbers)"
        );
    }
    for line in out
        .lines()
        .map(|l| {
            l.trim_start_matches("  | ")
                .trim_start_matches("| ")
                .trim_start()
        })
        .filter(|l| l.starts_with("probe "))
    {
        println!("{line}");
    }
    let mut table = false;
    for line in out.lines() {
        let line = line.strip_prefix("  | ").unwrap_or(line);
        if line.starts_with("snapshot-linux:") {
            table = true;
        }
        if table && (line.starts_with("snapshot-linux:") || line.starts_with('|')) {
            println!("{line}");
        }
    }
    Ok(())
}

fn demo() -> Result<()> {
    let mode = testhost::detect_mode(Arch::X86_64)?;
    match mode {
        Mode::Direct => {
            // `run` builds the image's root disk with mkfs.erofs.
            deps::ensure_packages(&["erofs-utils"])?;
            let agent = guest::build_agent()?;
            guest::build(&agent)?;
            let layout = workspace_root().join("target/demo-image");
            images::build_demo_layout(&layout)?;
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run(Command::new(cargo)
                .current_dir(workspace_root())
                .args(["run", "--release", "-q", "-p", "supermachine", "--", "run"])
                .arg(layout))
        }
        Mode::TestHost => {
            eprintln!(
                "xtask: this host's KVM cannot boot Linux; the demo runs inside the QEMU test host"
            );
            let code =
                testhost_command(Arch::X86_64, &[], &["supermachine", "run", "./demo-image"])?;
            if code != 0 {
                bail!("the demo failed (exit status {code})");
            }
            Ok(())
        }
    }
}

/// Runs `command` in the test host with `files` beside it; its status.
fn testhost_command<S: AsRef<str>>(arch: Arch, files: &[PathBuf], command: &[S]) -> Result<i32> {
    let bins = testhost::build_static_binaries(arch)?;
    let assets = assets_dir();
    if assets.exists() {
        std::fs::remove_dir_all(&assets)?;
    }
    testhost::stage_assets(&assets, &bins)?;
    let mut extra = Vec::new();
    for f in files {
        if !f.exists() {
            bail!("{}: no such file or directory", f.display());
        }
        extra.push(f.clone());
    }
    let line: Vec<String> = command.iter().map(|a| shell_quote(a.as_ref())).collect();
    let (_, code) = testhost::run_inside_with(&bins, &assets, &extra, &line.join(" "))?;
    Ok(code)
}

/// `arg` as one shell word.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

fn ci() -> Result<()> {
    deps::ensure_packages(deps::KERNEL_BUILD)?;
    deps::ensure_packages(deps::TEST_HOST)?;
    deps::ensure_packages(deps::OCI_TOOLS)?;
    // The virtio-fs tests (tier 1 and 3) talk to a real virtiofsd.
    let virtiofsd = deps::virtiofsd()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = workspace_root();
    let step = |name: &str, args: &[&str]| -> Result<()> {
        eprintln!("xtask: == {name} ==");
        run(Command::new(&cargo)
            .current_dir(&root)
            .env("SUPERMACHINE_VIRTIOFSD", &virtiofsd)
            .args(args))
    };
    step("format", &["fmt", "--all", "--check"])?;
    step(
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The tier 1-2 runner: it kills a hung test.
    deps::ensure_cargo_subcommand("nextest", "cargo-nextest")?;
    step(
        "tiers 1 and 2 (unit tests, KVM guest programs)",
        &["nextest", "run", "--workspace", "--no-fail-fast"],
    )?;
    step("doc tests", &["test", "--workspace", "--doc"])?;
    aarch64_shared_crates()?;
    other_platforms()?;
    eprintln!("xtask: == fuzz smoke ==");
    fuzz::run_targets(&[], SMOKE_SECONDS)?;
    eprintln!("xtask: == tier 3 (end to end) ==");
    e2e(Arch::X86_64)?;
    eprintln!("xtask: == aarch64: tiers 2 and 3 in the arm64 test host ==");
    e2e(Arch::Aarch64)
}

/// Crates whose unit tests run for aarch64 under user-mode QEMU here (the
/// KVM backend's need an arm64 KVM: they run in the arm64 test host).
const AARCH64_UNIT_TESTED: &[&str] = &[
    "supermachine-memory",
    "supermachine-hypervisor",
    "supermachine-boot",
];

/// Lints the workspace for aarch64 and runs [`AARCH64_UNIT_TESTED`]'s unit
/// tests there, under user-mode QEMU.
fn aarch64_shared_crates() -> Result<()> {
    let arch = Arch::Aarch64;
    let target = arch.musl_target();
    eprintln!("xtask: == aarch64: clippy, unit tests under qemu-aarch64 ==");
    deps::ensure_rust_target(target)?;
    deps::ensure_packages(arch.cross_packages())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tested: Vec<&str> = AARCH64_UNIT_TESTED
        .iter()
        .flat_map(|p| ["-p", *p])
        .collect();
    let everything = ["--workspace", "--exclude", "xtask"];
    for (verb, packages, tail) in [
        (
            "clippy",
            &everything[..],
            &["--all-targets", "--", "-D", "warnings"][..],
        ),
        ("test", &tested[..], &[][..]),
    ] {
        let mut cmd = Command::new(&cargo);
        arch.cross_env(&mut cmd);
        run(cmd
            .current_dir(workspace_root())
            .args([verb, "--target", target])
            .args(packages)
            .args(tail))?;
    }
    Ok(())
}

/// Crates that exist for Linux only: the KVM backend, the guest agent
/// (it runs inside the Linux guest), virtio-fs (vhost-user, virtiofsd),
/// and the machinery that builds and boots Linux test hosts.
const LINUX_ONLY: &[&str] = &[
    "supermachine-hypervisor-kvm",
    "supermachine-guest-agent",
    "supermachine-virtio-fs",
    "supermachine-e2e",
    "xtask",
];

/// `cargo check` and `cargo clippy` of every crate but [`LINUX_ONLY`] for
/// macOS (`aarch64-apple-darwin`) and Windows (`x86_64-pc-windows-gnu`),
/// then the Windows builds' tests under Wine. Nothing runs for macOS: this
/// machine cannot.
fn other_platforms() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut packages = vec!["--workspace"];
    packages.extend(LINUX_ONLY.iter().flat_map(|p| ["--exclude", *p]));
    for (name, target) in [
        ("macOS", "aarch64-apple-darwin"),
        ("Windows", "x86_64-pc-windows-gnu"),
    ] {
        eprintln!("xtask: == {name} ({target}): check and clippy ==");
        deps::ensure_rust_target(target)?;
        for (verb, tail) in [
            ("check", &["--all-targets"][..]),
            ("clippy", &["--all-targets", "--", "-D", "warnings"][..]),
        ] {
            run(Command::new(&cargo)
                .current_dir(workspace_root())
                .args([verb, "--target", target])
                .args(&packages)
                .args(tail))?;
        }
    }
    eprintln!("xtask: == Windows (x86_64-pc-windows-gnu): tests under Wine ==");
    wine::test(&cargo, &packages)
}

/// Seconds each fuzz target runs in a smoke run.
const SMOKE_SECONDS: u64 = 30;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::GuestKernel { source, arch } => {
            let k = kernel::build(kernel::Flavor::Guest, arch, source.as_deref())?;
            println!("{}", k.vmlinux().display());
            println!("{}", k.boot_image().display());
        }
        Task::TesthostKernel { source, arch } => {
            let k = kernel::build(kernel::Flavor::TestHost, arch, source.as_deref())?;
            println!("{}", k.boot_image().display());
        }
        Task::Guest => {
            let agent = guest::build_agent()?;
            let image = guest::build(&agent)?;
            println!("{}", image.kernel().display());
            println!("{}", image.initramfs().display());
        }
        Task::GuestImages { out } => {
            let bins = testhost::build_static_binaries(Arch::X86_64)?;
            images::build_test_images(&out, &bins)?;
            println!("{}", out.display());
        }
        Task::Demo => demo()?,
        Task::Testhost {
            arch,
            files,
            command,
        } => {
            let code = testhost_command(arch, &files, &command)?;
            std::process::exit(code);
        }
        Task::E2e { arch } => e2e(arch)?,
        Task::Bench {
            which: Bench::Boot { runs, arch },
        } => bench("boot", arch, runs, "")?,
        Task::Bench {
            which: Bench::Virtio { runs },
        } => bench("virtio", Arch::X86_64, runs, "")?,
        Task::Bench {
            which: Bench::Net { runs },
        } => bench("net", Arch::X86_64, runs, "")?,
        Task::Bench {
            which: Bench::Exec { runs, probe },
        } => bench(
            "exec",
            Arch::X86_64,
            runs,
            if probe { "--probe" } else { "" },
        )?,
        Task::Bench {
            which: Bench::Run { runs },
        } => {
            // The container baseline.
            deps::ensure_packages(&["crun"])?;
            bench("run", Arch::X86_64, runs, "")?
        }
        Task::Bench {
            which: Bench::Oci { runs },
        } => bench_oci::bench(runs)?,
        Task::Bench {
            which:
                Bench::Snapshot {
                    runs,
                    firecracker,
                    arch,
                },
        } => bench_snapshot(runs, firecracker, arch)?,
        Task::Fuzz {
            smoke,
            seconds,
            targets,
        } => fuzz::run_targets(&targets, if smoke { SMOKE_SECONDS } else { seconds })?,
        Task::OtherPlatforms => other_platforms()?,
        Task::Ci => ci()?,
    }
    Ok(())
}
