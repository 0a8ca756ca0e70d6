//! Debian packages of another architecture, unpacked into a directory:
//! what the arm64 test host and the arm64 test images need from Debian
//! (a static busybox; passt and the EROFS tools with their libraries).
//!
//! apt runs with a private state, cache and status file under the cache,
//! reading the system's own sources, so the host's package database is
//! never touched. The result is cached under `<cache>/sysroot-<arch>-<key>`,
//! keyed by the package list and the apt sources.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::arch::Arch;
use crate::util::{Staging, cache_root, hash_parts, run};

/// Bump when the unpacking changes in a way the inputs don't show.
const RECIPE_VERSION: &[u8] = b"sysroot-1";

/// What the arm64 test host runs besides our static binaries.
pub const TEST_HOST_PACKAGES: &[&str] = &["busybox-static", "passt", "erofs-utils"];

/// Debian's architecture name.
fn debian_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
    }
}

/// Downloads `packages` and everything they depend on for `arch`, and
/// unpacks them into one directory (cached); returns it.
pub fn build(arch: Arch, packages: &[&str]) -> Result<PathBuf> {
    let sources = system_sources()?;
    let mut parts: Vec<&[u8]> = vec![RECIPE_VERSION, debian_arch(arch).as_bytes()];
    let list = packages.join(" ");
    parts.push(list.as_bytes());
    for (_, text) in &sources {
        parts.push(text.as_bytes());
    }
    let key = hash_parts(&parts);
    let cache = cache_root()?;
    let dest = cache.join(format!("sysroot-{}-{key}", arch.name()));
    if dest.join(".complete").is_file() {
        return Ok(dest);
    }
    eprintln!(
        "xtask: fetching Debian {} packages: {list}",
        debian_arch(arch)
    );
    // apt's private state, removed when done; the tree is committed.
    let apt_stage = Staging::new(&cache, "sysroot-apt")?;
    let apt_root = apt_stage.path().to_path_buf();
    let tree = Staging::new(&cache, "sysroot")?;
    for dir in [
        "etc/sources.list.d",
        "etc/preferences.d",
        "state/lists/partial",
        "cache/archives/partial",
    ] {
        fs::create_dir_all(apt_root.join(dir))?;
    }
    for (name, text) in &sources {
        fs::write(apt_root.join("etc/sources.list.d").join(name), text)?;
    }
    fs::write(apt_root.join("status"), "")?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-qq")
            .arg(format!("-oAPT::Architecture={}", debian_arch(arch)))
            .arg(format!("-oAPT::Architectures={}", debian_arch(arch)))
            .arg(format!("-oDir::Etc={}", apt_root.join("etc").display()))
            .arg("-oDir::Etc::SourceList=/dev/null")
            .arg(format!("-oDir::State={}", apt_root.join("state").display()))
            .arg(format!(
                "-oDir::State::status={}",
                apt_root.join("status").display()
            ))
            .arg(format!("-oDir::Cache={}", apt_root.join("cache").display()))
            .arg("-oDebug::NoLocking=1")
            // The private directories belong to whoever runs this, not
            // to apt's `_apt` download user.
            .arg("-oAPT::Sandbox::User=root")
            .arg("-oAPT::Install-Recommends=false")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(apt(&["update"]).stdout(std::process::Stdio::null()))?;
    run(apt(&["install", "--download-only", "-y"])
        .args(packages)
        .stdout(std::process::Stdio::null()))?;
    let root = tree.path();
    let archives = apt_root.join("cache/archives");
    let mut unpacked = 0;
    for entry in fs::read_dir(&archives)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&path).arg(root))?;
            unpacked += 1;
        }
    }
    if unpacked == 0 {
        bail!("apt downloaded no packages for {list}");
    }
    fs::write(root.join(".complete"), list.as_bytes())?;
    drop(apt_stage);
    tree.commit(&dest)?;
    Ok(dest)
}

/// The system's apt sources (`/etc/apt/sources.list` and the files in
/// `/etc/apt/sources.list.d`), by file name.
fn system_sources() -> Result<Vec<(String, String)>> {
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        sources.push(("system.list".to_string(), text));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut names: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            let name = path
                .file_name()
                .context("a sources file without a name")?
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".list") || name.ends_with(".sources") {
                sources.push((name, fs::read_to_string(&path)?));
            }
        }
    }
    if sources.is_empty() {
        bail!("no apt sources in /etc/apt: cannot fetch packages of another architecture");
    }
    Ok(sources)
}

/// Files of the sysroot a dynamically linked `program` (a path inside
/// it) needs: the program, the dynamic loader and every shared library
/// of the sysroot's library directories. (No `ldd` runs for a foreign
/// architecture; the libraries of a few small packages are what there
/// is.)
pub fn program_with_libraries(sysroot: &Path, program: &str) -> Result<Vec<(PathBuf, String)>> {
    let mut files = vec![(
        sysroot.join(program.trim_start_matches('/')),
        program.to_string(),
    )];
    if !files[0].0.is_file() {
        bail!("{program} is not in the sysroot {}", sysroot.display());
    }
    for dir in ["lib", "usr/lib"] {
        let root = sysroot.join(dir);
        if !root.is_dir() {
            continue;
        }
        for path in walk(&root)? {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.contains(".so") {
                let rel = path.strip_prefix(sysroot)?.to_string_lossy().into_owned();
                files.push((path, format!("/{rel}")));
            }
        }
    }
    Ok(files)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            out.extend(walk(&entry.path())?);
        } else {
            out.push(entry.path());
        }
    }
    Ok(out)
}
