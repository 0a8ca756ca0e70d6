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

/// Test targets that boot guests (tier 2): they need the Windows
/// Hypervisor Platform, which Wine does not have, and are left out here.
/// On a Windows host with it, `cargo test -p PACKAGE --test TARGET` runs
/// them. (package, its directory, test target)
const NEED_WHP: &[(&str, &str, &str)] = &[
    ("supermachine", "crates/supermachine", "snapshot"),
    (
        "supermachine-hypervisor-whp",
        "hypervisor-whp",
        "guest_programs",
    ),
];

/// `cargo test --target x86_64-pc-windows-gnu` of `packages` (`--workspace`
/// and its `--exclude`s) with Wine as the runner, but for [`NEED_WHP`].
pub fn test(cargo: &str, packages: &[&str]) -> Result<()> {
    deps::ensure_packages(&["wine64", "gcc-mingw-w64-x86-64"])?;
    let wine = wine64()?;
    let prefix = cache_root()?.join("wine-prefix");
    // Every package but those with tier-2 targets; then those, target by
    // target.
    let mut runs: Vec<Vec<String>> = Vec::new();
    let mut rest: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
    for (package, dir, _) in NEED_WHP {
        rest.extend(["--exclude".into(), package.to_string()]);
        let mut run = vec![
            "-p".into(),
            package.to_string(),
            "--lib".into(),
            "--bins".into(),
        ];
        for target in test_targets(&workspace_root().join(dir))? {
            if !NEED_WHP
                .iter()
                .any(|(p, _, t)| p == package && *t == target)
            {
                run.extend(["--test".into(), target]);
            }
        }
        runs.push(run);
    }
    runs.insert(0, rest);
    let test = |selection: &[String], extra: &[&str]| {
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["test", "--target", TARGET])
            .args(selection)
            .args(extra)
            .env("CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER", &wine)
            .env("WINEPREFIX", &prefix)
            .env("WINEDEBUG", "-all");
        cmd
    };
    for selection in &runs {
        run(&mut test(selection, &["--no-run"]))?;
    }
    // Beside the test executables, and beside the binaries they run.
    let deps = target_deps_dir();
    install_process_prng(&deps)?;
    if let Some(binaries) = deps.parent() {
        install_process_prng(binaries)?;
    }
    for selection in &runs {
        run(&mut test(selection, &[]))?;
    }
    Ok(())
}

/// The integration test targets of the package in `dir` (`tests/*.rs`).
fn test_targets(dir: &Path) -> Result<Vec<String>> {
    let tests = dir.join("tests");
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(&tests).with_context(|| format!("listing {}", tests.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
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
