//! Runs the Windows builds' tests under Wine: what of the Windows code
//! needs no hypervisor (WHP's decoding and state conversions, the host
//! plumbing, devices driven through guest memory) runs here for real on
//! Wine's Win32, not only compiled.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::deps;
use crate::util::{cache_root, run, workspace_root};

const TARGET: &str = "x86_64-pc-windows-gnu";

/// `cargo test --target x86_64-pc-windows-gnu` of `packages` (`-p` list)
/// with Wine as the runner.
pub fn test(cargo: &str, packages: &[&str]) -> Result<()> {
    deps::ensure_packages(&["wine64", "gcc-mingw-w64-x86-64"])?;
    let wine = wine64()?;
    let test = |extra: &[&str]| {
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["test", "--target", TARGET])
            .args(packages)
            .args(extra);
        cmd
    };
    run(&mut test(&["--no-run"]))?;
    install_process_prng(&target_deps_dir())?;
    let prefix = cache_root()?.join("wine-prefix");
    run(test(&[])
        .env("CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER", &wine)
        .env("WINEPREFIX", &prefix)
        .env("WINEDEBUG", "-all"))
}

fn wine64() -> Result<PathBuf> {
    for candidate in ["/usr/lib/wine/wine64", "/usr/bin/wine64"] {
        if Path::new(candidate).exists() {
            return Ok(candidate.into());
        }
    }
    bail!("wine64 is installed but neither /usr/lib/wine/wine64 nor /usr/bin/wine64 exists")
}

fn target_deps_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join(TARGET).join("debug/deps")
}

/// Builds `bcryptprimitives.dll` (see its source) beside the test
/// executables, written whole before it is renamed into place.
fn install_process_prng(deps_dir: &Path) -> Result<()> {
    let source = workspace_root().join("xtask/wine/bcryptprimitives.c");
    let partial = deps_dir.join("bcryptprimitives.dll.partial");
    run(Command::new("x86_64-w64-mingw32-gcc")
        .args(["-shared", "-O2", "-o"])
        .arg(&partial)
        .arg(&source)
        .arg("-ladvapi32"))?;
    let dll = deps_dir.join("bcryptprimitives.dll");
    std::fs::rename(&partial, &dll).with_context(|| format!("installing {}", dll.display()))
}
