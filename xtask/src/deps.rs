//! Installs what the tasks need when it is missing: Debian packages with
//! apt-get, Rust targets with rustup.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{have, run};

/// Debian packages needed to build the kernels.
pub const KERNEL_BUILD: &[&str] = &[
    "make",
    "gcc",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "cpio",
    "xz-utils",
    "dpkg-dev",
];
/// The musl C compiler wrapper (`x86_64-linux-musl-gcc`), for crates that
/// compile C in static builds.
pub const MUSL_CC: &[&str] = &["musl-tools"];
/// Debian packages that build aarch64 binaries here and run their unit
/// tests: the cross linker and user-mode QEMU.
pub const AARCH64_CROSS: &[&str] = &["gcc-aarch64-linux-gnu", "qemu-user"];
/// Debian packages needed for guest images and the QEMU test host.
pub const TEST_HOST: &[&str] = &["qemu-system-x86", "busybox-static", "passt"];
/// The same for the arm64 test host (its busybox, passt and EROFS tools
/// come from Debian's arm64 packages: see `sysroot`).
pub const TEST_HOST_AARCH64: &[&str] = &["qemu-system-arm", "busybox-static"];
/// Debian packages the OCI image tests and benchmark drive: a real
/// registry, a real OCI client to push with, htpasswd and openssl for its
/// auth and TLS, the EROFS tools that build root disks, and umoci as the
/// benchmark baseline.
pub const OCI_TOOLS: &[&str] = &[
    "erofs-utils",
    "skopeo",
    "umoci",
    "docker-registry",
    "apache2-utils",
    "busybox-static",
    "openssl",
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing ones of `packages` (running apt-get update first).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!(
            "missing packages {} and no apt-get to install them; install them by hand",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc_geteuid() } == 0;
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(apt(&["update", "-qq"]).stdout(std::process::Stdio::null()))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing).stdout(std::process::Stdio::null());
    run(&mut install)
}

/// Adds a Rust target with rustup when it is not installed.
pub fn ensure_rust_target(target: &str) -> Result<()> {
    let list = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = &list
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    eprintln!("xtask: adding Rust target {target}");
    run(Command::new("rustup").args(["target", "add", target]))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Installs the crate `package` with `cargo install` when cargo has no
/// `subcommand` (cargo-nextest, cargo-fuzz).
pub fn ensure_cargo_subcommand(subcommand: &str, package: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let present = Command::new(&cargo)
        .args([subcommand, "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing {package}");
    run(Command::new(&cargo).args(["install", "--locked", package]))
}

/// The virtiofsd release `-v` is tested with (crates.io).
const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Upstream passt as Debian 13 packages it (source snapshot 2025-05-03).
/// Debian 12's passt (2023-03-09) never clears its "waiting for the
/// guest's ACK" state on a connection the guest opened until it has sent
/// the guest data, so on an upload to a server that never answers, every
/// two seconds without an ACK to the guest count as a retransmission and
/// the eighth resets the connection. The 1 GiB upload test runs against
/// this one; everything else uses the system's passt.
const NEWER_PASST_VERSION: &str = "2025_05_03.587980c";
const NEWER_PASST_SOURCE: &str =
    "http://deb.debian.org/debian/pool/main/p/passt/passt_0.0~git20250503.587980c.orig.tar.xz";
const NEWER_PASST_SHA256: &str = "69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49";

/// [`NEWER_PASST_VERSION`], built once from its verified source into the
/// cache.
pub fn newer_passt() -> Result<std::path::PathBuf> {
    use sha2::Digest;
    let cache = crate::util::cache_root()?;
    let root = cache.join(format!("passt-{NEWER_PASST_VERSION}"));
    let binary = root.join("passt");
    if binary.is_file() {
        return Ok(binary);
    }
    ensure_packages(&["curl", "make", "gcc", "xz-utils"])?;
    eprintln!("xtask: building passt {NEWER_PASST_VERSION} from Debian's source");
    let staging = crate::util::Staging::new(&cache, "passt")?;
    let tarball = staging.path().join("source.tar.xz");
    run(Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(&tarball)
        .arg(NEWER_PASST_SOURCE))?;
    let digest = format!("{:x}", sha2::Sha256::digest(std::fs::read(&tarball)?));
    if digest != NEWER_PASST_SHA256 {
        bail!("{NEWER_PASST_SOURCE} has SHA-256 {digest}, not {NEWER_PASST_SHA256}");
    }
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(staging.path()))?;
    let source = staging.path().join(format!("passt-{NEWER_PASST_VERSION}"));
    run(Command::new("make")
        .arg("-C")
        .arg(&source)
        .arg(format!("VERSION={NEWER_PASST_VERSION}"))
        .arg("passt"))?;
    std::fs::rename(source.join("passt"), staging.path().join("passt"))?;
    std::fs::remove_dir_all(&source)?;
    std::fs::remove_file(&tarball)?;
    staging.commit(&root)?;
    Ok(binary)
}

/// virtiofsd, built once by `cargo install` into the cache (it needs
/// libseccomp and libcap-ng to build and run).
pub fn virtiofsd() -> Result<std::path::PathBuf> {
    let root = crate::util::cache_root()?.join(format!("virtiofsd-{VIRTIOFSD_VERSION}"));
    let binary = root.join("bin/virtiofsd");
    if binary.is_file() {
        return Ok(binary);
    }
    ensure_packages(&["libseccomp-dev", "libcap-ng-dev", "pkg-config"])?;
    eprintln!("xtask: installing virtiofsd {VIRTIOFSD_VERSION} (cargo install)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let staging = crate::util::Staging::new(&crate::util::cache_root()?, "virtiofsd")?;
    run(Command::new(&cargo)
        .args([
            "install",
            "--locked",
            "--version",
            VIRTIOFSD_VERSION,
            "--root",
        ])
        .arg(staging.path())
        .arg("virtiofsd"))?;
    staging.commit(&root)?;
    Ok(binary)
}
