//! Small helpers: running commands, hashing, the cache directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `~/.cache/supermachine` (or `$XDG_CACHE_HOME/supermachine`), where slow
/// build outputs are kept, keyed by their inputs.
pub fn cache_root() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    let root = base.join("supermachine");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(root)
}

/// Runs a command, failing with its command line if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Hex SHA-256 of a list of byte strings, each length-prefixed.
pub fn hash_parts(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hex SHA-256 of a file's contents.
pub fn hash_file(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hash_parts(&[&bytes]))
}

/// A directory under the cache that is removed on drop unless `keep` is
/// called: build outputs are assembled here and renamed into place whole, so
/// an interrupted build never leaves a half-written cache entry.
pub struct Staging {
    dir: Option<PathBuf>,
}

impl Staging {
    pub fn new(parent: &Path, name: &str) -> Result<Self> {
        fs::create_dir_all(parent)?;
        let dir = parent.join(format!(".tmp-{name}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(Self { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Renames the staging directory to `dest` (replacing nothing: if
    /// `dest` appeared meanwhile, the staged copy is dropped).
    pub fn commit(mut self, dest: &Path) -> Result<()> {
        let dir = self.dir.take().context("staging already committed")?;
        if dest.exists() {
            fs::remove_dir_all(&dir)?;
            return Ok(());
        }
        fs::rename(&dir, dest)
            .with_context(|| format!("renaming {} to {}", dir.display(), dest.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// True when `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
