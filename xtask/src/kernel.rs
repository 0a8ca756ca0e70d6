//! Building the guest kernel and the test host's kernel from Debian's
//! `linux-source-6.12` (or a kernel source tarball), cached by source
//! version and config fragment.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::arch::Arch;
use crate::deps;
use crate::util::{Staging, cache_root, hash_file, hash_parts, run, workspace_root};

/// Bump when the build recipe below changes in a way the inputs don't show.
const RECIPE_VERSION: &[u8] = b"kernel-recipe-2";
const SOURCE_PACKAGE: &str = "linux-source-6.12";

/// Which kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// The minimal kernel supermachine boots as its guest.
    Guest,
    /// The QEMU test host's kernel, with KVM for AMD SVM built in.
    TestHost,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Guest => "guest",
            Flavor::TestHost => "testhost",
        }
    }

    fn fragments(self, arch: Arch) -> Vec<PathBuf> {
        let dir = workspace_root().join("guest/kernel");
        let mut names = vec![
            "guest.config".to_string(),
            format!("guest-{}.config", arch.name()),
            // The test host runs container tools too (crun, for the `run`
            // benchmark's baseline).
            "container.config".to_string(),
        ];
        if self == Flavor::TestHost {
            names.push("testhost.config".into());
            names.push(format!("testhost-{}.config", arch.name()));
        }
        names.into_iter().map(|n| dir.join(n)).collect()
    }
}

/// A built kernel in the cache.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub dir: PathBuf,
    pub arch: Arch,
}

impl Kernel {
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    /// The image a boot loader (or QEMU's `-kernel`) takes: `bzImage` on
    /// x86_64, `Image` on aarch64.
    pub fn boot_image(&self) -> PathBuf {
        self.dir.join(self.arch.boot_image().0)
    }
}

/// Where kernel sources come from.
#[derive(Clone, Debug)]
enum Source {
    DebianPackage(PathBuf),
    Tarball(PathBuf),
}

impl Source {
    fn identity(&self) -> Result<String> {
        Ok(match self {
            Source::DebianPackage(deb) => deb
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .context("package path has no file name")?,
            Source::Tarball(t) => format!("tarball-{}", hash_file(t)?),
        })
    }
}

fn find_or_download_package(src_dir: &Path) -> Result<PathBuf> {
    let cached = |dir: &Path| -> Result<Option<PathBuf>> {
        let mut debs: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .map(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with(SOURCE_PACKAGE) && n.ends_with(".deb")
                    })
                    .unwrap_or(false)
            })
            .collect();
        debs.sort();
        Ok(debs.pop())
    };
    if let Some(deb) = cached(src_dir)? {
        return Ok(deb);
    }
    eprintln!("xtask: downloading {SOURCE_PACKAGE} with apt-get download");
    let staging = Staging::new(src_dir, "download")?;
    let mut download = Command::new("apt-get");
    download
        .args(["download", SOURCE_PACKAGE])
        .current_dir(staging.path());
    if run(&mut download).is_err() {
        // A stale package list names a version the mirror no longer has.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(&mut download)?;
    }
    let deb = cached(staging.path())?.context("apt-get download produced no .deb")?;
    let dest = src_dir.join(deb.file_name().context("no file name")?);
    fs::rename(&deb, &dest)?;
    Ok(dest)
}

/// Unpacks the kernel source once per source identity; returns the tree.
fn unpack(source: &Source, src_dir: &Path) -> Result<PathBuf> {
    let id = source.identity()?;
    let dest = src_dir.join(format!("tree-{id}"));
    let tree = |root: &Path| -> Result<PathBuf> {
        for entry in fs::read_dir(root)? {
            let p = entry?.path();
            if p.join("Makefile").exists() && p.join("arch/x86").is_dir() {
                return Ok(p);
            }
        }
        bail!("no kernel source tree inside {}", root.display())
    };
    if dest.exists() {
        return tree(&dest);
    }
    eprintln!("xtask: unpacking kernel source ({id})");
    let staging = Staging::new(src_dir, "unpack")?;
    let script = match source {
        Source::DebianPackage(deb) => format!(
            "set -eu; dpkg-deb --fsys-tarfile '{}' | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' | tar -xJ",
            deb.display()
        ),
        Source::Tarball(t) => format!("set -eu; tar -xf '{}'", t.display()),
    };
    run(Command::new("sh")
        .args(["-c", &script])
        .current_dir(staging.path()))?;
    tree(staging.path())?;
    staging.commit(&dest)?;
    tree(&dest)
}

/// Checks that every setting of the fragments survived `olddefconfig`.
fn verify_config(config: &Path, fragments: &[PathBuf]) -> Result<()> {
    let actual = fs::read_to_string(config)?;
    let mut lost = Vec::new();
    for fragment in fragments {
        for line in fs::read_to_string(fragment)?.lines() {
            let line = line.trim();
            let wanted_unset = line.starts_with("# CONFIG_") && line.ends_with(" is not set");
            if line.is_empty() || (line.starts_with('#') && !wanted_unset) {
                continue;
            }
            let present = actual.lines().any(|l| l.trim() == line);
            let unset_ok = wanted_unset && {
                let name = line
                    .trim_start_matches("# ")
                    .trim_end_matches(" is not set");
                !actual.lines().any(|l| l.starts_with(&format!("{name}=")))
            };
            if !present && !unset_ok {
                lost.push(line.to_string());
            }
        }
    }
    if !lost.is_empty() {
        bail!(
            "the kernel config lost settings of the fragment (unmet dependencies?): {}",
            lost.join(", ")
        );
    }
    Ok(())
}

/// Builds (or finds in the cache) the kernel of `flavor` for `arch`.
pub fn build(flavor: Flavor, arch: Arch, tarball: Option<&Path>) -> Result<Kernel> {
    let cache = cache_root()?;
    let src_dir = cache.join("src");
    fs::create_dir_all(&src_dir)?;
    let source = match tarball {
        Some(t) => Source::Tarball(
            t.canonicalize()
                .with_context(|| format!("kernel source tarball {}", t.display()))?,
        ),
        None => {
            deps::ensure_packages(&["dpkg-dev"])?;
            Source::DebianPackage(find_or_download_package(&src_dir)?)
        }
    };
    let fragments = flavor.fragments(arch);
    let mut parts: Vec<Vec<u8>> = vec![
        RECIPE_VERSION.to_vec(),
        flavor.name().as_bytes().to_vec(),
        arch.name().as_bytes().to_vec(),
        source.identity()?.into_bytes(),
    ];
    for f in &fragments {
        parts.push(fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    let key = hash_parts(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let label = format!("{}-{}", flavor.name(), arch.name());
    let out_dir = cache.join("kernels").join(format!("{label}-{key}"));
    let kernel = Kernel {
        dir: out_dir.clone(),
        arch,
    };
    if kernel.boot_image().exists() {
        return Ok(kernel);
    }

    deps::ensure_packages(deps::KERNEL_BUILD)?;
    if let Some((_, package)) = arch.cross_compiler() {
        deps::ensure_packages(&[package])?;
    }
    let tree = unpack(&source, &src_dir)?;
    // One build directory per flavor and source, reused across fragment
    // changes so that a changed fragment rebuilds incrementally.
    let build_dir = cache.join("kernel-build").join(format!(
        "{label}-{}",
        hash_parts(&[source.identity()?.as_bytes()])
    ));
    fs::create_dir_all(&build_dir)?;
    let log_path = build_dir.join("build.log");
    let log = fs::File::create(&log_path)?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let make = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(&tree)
            .arg(format!("O={}", build_dir.display()))
            .arg(format!("ARCH={}", arch.kernel_arch()));
        if let Some((prefix, _)) = arch.cross_compiler() {
            cmd.arg(format!("CROSS_COMPILE={prefix}"));
        }
        cmd.args(args)
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        run(&mut cmd).with_context(|| format!("kernel build failed; see {}", log_path.display()))
    };
    let started = std::time::Instant::now();
    eprintln!(
        "xtask: building the {label} kernel (log: {})",
        log_path.display()
    );
    make(&["tinyconfig"])?;
    let mut merge = Command::new(tree.join("scripts/kconfig/merge_config.sh"));
    merge
        .env("ARCH", arch.kernel_arch())
        .arg("-m")
        .arg("-O")
        .arg(&build_dir)
        .arg(build_dir.join(".config"))
        .args(&fragments)
        .current_dir(&tree)
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    run(&mut merge)?;
    make(&["olddefconfig"])?;
    verify_config(&build_dir.join(".config"), &fragments)?;
    let (image_target, image_path) = arch.boot_image();
    make(&[&format!("-j{jobs}"), "vmlinux", image_target])?;

    let staging = Staging::new(out_dir.parent().context("no parent")?, &label)?;
    fs::copy(build_dir.join("vmlinux"), staging.path().join("vmlinux"))?;
    fs::copy(
        build_dir.join(image_path),
        staging.path().join(image_target),
    )?;
    fs::copy(build_dir.join(".config"), staging.path().join("config"))?;
    staging.commit(&out_dir)?;
    eprintln!("xtask: {label} kernel built in {:.0?}", started.elapsed());
    Ok(kernel)
}
