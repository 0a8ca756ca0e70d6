//! The guest image every agent VM boots: the guest kernel and an
//! initramfs whose `/init` is the agent (a static musl binary). Cached
//! under `<cache>/guest/<key>/` by the kernel build and the agent's bytes;
//! `<cache>/guest/current` points at the newest, which is where the
//! `supermachine` binary looks when it is not told.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::arch::Arch;
use crate::cpio::Archive;
use crate::util::{Staging, cache_root, hash_parts, run, workspace_root};
use crate::{deps, kernel};

/// Bump when the image's layout changes in a way the inputs don't show.
const RECIPE_VERSION: &[u8] = b"guest-image-1";

/// A built guest image directory (`vmlinux`, `initramfs.cpio`).
pub struct GuestImage {
    pub dir: PathBuf,
}

impl GuestImage {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }
}

/// Builds the agent alone, statically; returns the binary.
pub fn build_agent() -> Result<PathBuf> {
    let target = Arch::X86_64.musl_target();
    deps::ensure_rust_target(target)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "--target", target])
        .args(["-p", "supermachine-guest-agent"]))?;
    Ok(workspace_root()
        .join("target")
        .join(target)
        .join("release/supermachine-agent"))
}

/// The agent's initramfs: the directories it mounts on, a console node,
/// and the agent as `/init`.
pub fn write_initramfs(agent: &Path, dest: &Path) -> Result<()> {
    let mut a = Archive::default();
    for d in ["dev", "proc", "sys"] {
        a.dir(d);
    }
    a.char_device("dev/console", 5, 1);
    a.file_from("init", 0o755, agent)?;
    a.write_to(dest)
}

/// Builds (or finds in the cache) the guest image around `agent`.
pub fn build(agent: &Path) -> Result<GuestImage> {
    let kernel = kernel::build(kernel::Flavor::Guest, Arch::X86_64, None)?;
    let agent_bytes = fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let kernel_id = kernel
        .dir
        .file_name()
        .context("kernel dir")?
        .to_string_lossy();
    let key = hash_parts(&[RECIPE_VERSION, kernel_id.as_bytes(), &agent_bytes]);
    let root = cache_root()?.join("guest");
    let image = GuestImage {
        dir: root.join(&key),
    };
    if !image.initramfs().exists() {
        let staging = Staging::new(&root, "guest")?;
        fs::copy(kernel.vmlinux(), staging.path().join("vmlinux"))?;
        write_initramfs(agent, &staging.path().join("initramfs.cpio"))?;
        staging.commit(&image.dir)?;
    }
    // Point `current` at it: a new link renamed over the old one.
    let link = root.join("current");
    let tmp = root.join(format!(".current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&key, &tmp)?;
    fs::rename(&tmp, &link)?;
    Ok(image)
}
