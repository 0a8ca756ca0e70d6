//! Where tier-3 tests run: directly when this host's KVM can boot Linux,
//! otherwise inside a QEMU TCG "test host" whose kernel has KVM for AMD
//! SVM built in (QEMU's `-cpu max` emulates SVM).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::arch::Arch;
use crate::cpio::Archive;
use crate::kernel;
use crate::util::{cache_root, workspace_root};
use crate::{deps, images};

/// How tier-3 tests reach a KVM that boots Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    TestHost,
}

/// Real KVM (kvm_intel or kvm_amd) boots Linux; PVM (kvm_pvm) does not.
/// `SUPERMACHINE_E2E=direct|testhost` overrides the choice. Guests of
/// another architecture than this machine's always run in a test host.
pub fn detect_mode(arch: Arch) -> Result<Mode> {
    if arch.name() != std::env::consts::ARCH {
        return Ok(Mode::TestHost);
    }
    match std::env::var("SUPERMACHINE_E2E").as_deref() {
        Ok("direct") => return Ok(Mode::Direct),
        Ok("testhost") => return Ok(Mode::TestHost),
        Ok(other) if !other.is_empty() => {
            bail!("SUPERMACHINE_E2E must be 'direct' or 'testhost', not '{other}'")
        }
        _ => {}
    }
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let real_kvm = Path::new("/dev/kvm").exists()
        && (module("kvm_intel") || module("kvm_amd"))
        && !module("kvm_pvm");
    Ok(if real_kvm {
        Mode::Direct
    } else {
        Mode::TestHost
    })
}

/// Static (musl) builds of our binaries, so they run in the test host's
/// bare initramfs as they do on the host.
pub struct Binaries {
    /// What they were built for.
    pub arch: Arch,
    pub supermachine: PathBuf,
    pub e2e: PathBuf,
    /// The guest half of the vsock test (goes into a guest image).
    pub vsock_peer: PathBuf,
    /// The guest half of the virtio benchmark (goes into a guest image).
    pub bench_peer: PathBuf,
    /// The guest agent (the guest image's /init).
    pub agent: PathBuf,
    /// A TCP echo server for the agent's connect test (in the test image).
    pub tcp_echo: PathBuf,
    /// The KVM backend's tier-2 guest programs, on a test host of another
    /// architecture than this machine (aarch64), where they cannot run
    /// here.
    pub kvm_guest_programs: Option<PathBuf>,
}

pub fn build_static_binaries(arch: Arch) -> Result<Binaries> {
    let target = arch.musl_target();
    deps::ensure_rust_target(target)?;
    // ring (TLS in the image puller) compiles C for the target.
    deps::ensure_packages(arch.cross_packages())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_for = || {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(workspace_root());
        arch.cross_env(&mut cmd);
        cmd
    };
    crate::util::run(
        cargo_for()
            .args(["build", "--release", "--target", target])
            .args(["-p", "supermachine", "-p", "supermachine-e2e"])
            .args(["-p", "supermachine-guest-agent"]),
    )?;
    let kvm_guest_programs = match arch {
        Arch::X86_64 => None,
        Arch::Aarch64 => Some(test_binary(
            cargo_for().args(["test", "--release", "--no-run", "--target", target]),
            "supermachine-hypervisor-kvm",
            "guest_programs_aarch64",
        )?),
    };
    let dir = workspace_root().join("target").join(target).join("release");
    Ok(Binaries {
        arch,
        kvm_guest_programs,
        supermachine: dir.join("supermachine"),
        e2e: dir.join("supermachine-e2e"),
        vsock_peer: dir.join("vsock-peer"),
        bench_peer: dir.join("bench-peer"),
        agent: dir.join("supermachine-agent"),
        tcp_echo: dir.join("tcp-echo"),
    })
}

/// Builds the test binary `name` of `package` with `cargo` (a `cargo test
/// --no-run` command) and returns its path, from cargo's JSON messages.
fn test_binary(cargo: &mut Command, package: &str, name: &str) -> Result<PathBuf> {
    let out = cargo
        .args(["-p", package, "--test", name, "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the {name} tests of {package} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo named no executable for the {name} tests"))
}

/// Everything a tier-3 run needs, staged in one directory: the guest
/// kernel (on x86_64 in both formats), the guest images, the agent's
/// initramfs and the test image's root disk. On aarch64 the assets of the
/// tests that run on x86_64 only are left out (`docs/architecture.md`).
pub fn stage_assets(dir: &Path, bins: &Binaries) -> Result<()> {
    let guest = kernel::build(kernel::Flavor::Guest, bins.arch, None)?;
    fs::create_dir_all(dir)?;
    match bins.arch {
        Arch::X86_64 => {
            fs::copy(guest.vmlinux(), dir.join("vmlinux"))?;
            fs::copy(guest.boot_image(), dir.join("bzImage"))?;
        }
        Arch::Aarch64 => {
            fs::copy(guest.boot_image(), dir.join("Image"))?;
        }
    }
    crate::guest::write_initramfs(&bins.agent, &dir.join("initramfs.cpio"))?;
    images::build_test_images(dir, bins)?;
    images::build_test_rootfs(bins, &dir.join("rootfs.erofs"))?;
    images::build_demo_layout(&dir.join("demo-image"))?;
    images::build_empty_ext4(&dir.join("upper.ext4"), 32 << 20)?;
    if let Some(programs) = &bins.kvm_guest_programs {
        fs::copy(programs, dir.join("kvm-guest-programs"))?;
    }
    if bins.arch == Arch::X86_64 {
        images::build_debian_layout(&dir.join("debian-image"))?;
        images::build_demo_bundle(&dir.join("crun-bundle"))?;
        // The 1 GiB upload test's passt (see deps::newer_passt).
        fs::copy(deps::newer_passt()?, dir.join("passt-newer"))?;
    }
    Ok(())
}

/// Runs `command` (a shell command line, run in `/e2e` with `supermachine`,
/// `supermachine-e2e` and the assets there) inside the test host. Streams
/// the test host's console and returns it with the command's exit status.
pub fn run_inside(bins: &Binaries, assets: &Path, command: &str) -> Result<(String, i32)> {
    run_inside_with(bins, assets, &[], command)
}

/// [`run_inside`] with more files or directories copied into `/e2e`.
pub fn run_inside_with(
    bins: &Binaries,
    assets: &Path,
    extra: &[PathBuf],
    command: &str,
) -> Result<(String, i32)> {
    // Under TCG the emulated timer interrupts lag when this machine is busy
    // (or the initramfs is large), and the kernel's clocksource watchdog
    // then finds the TSC "skewed" against jiffies and drops it; KVM guests
    // inside a test host running on jiffies never get past their own timer
    // setup. The TSC TCG emulates follows the host's, so the test host is
    // told to trust it (`tsc=reliable`); should it still come up without
    // it, that is detected before the command runs, and the test host is
    // booted again.
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        match run_once(bins, assets, extra, command)? {
            Boot::Ran(console, code) => return Ok((console, code)),
            Boot::BadClock(clock) => eprintln!(
                "xtask: the test host came up without a TSC clocksource ({clock}); booting it again ({attempt}/{ATTEMPTS})"
            ),
            Boot::Froze(console) => eprintln!(
                "xtask: the test host froze after {:?} (no output and no CPU, key presses did not wake it); running the command again ({attempt}/{ATTEMPTS})",
                console
                    .lines()
                    .rev()
                    .find(|l| !l.contains("Unhandled WRMSR"))
                    .unwrap_or("")
            ),
        }
    }
    bail!("the test host did not get through the command in {ATTEMPTS} boots")
}

/// How one test host boot went.
enum Boot {
    /// The command ran: the console and its exit status.
    Ran(String, i32),
    /// The test host's clock was unusable; nothing ran.
    BadClock(String),
    /// The test host stopped: no console output and no CPU for
    /// [`FROZEN_AFTER`] (its console so far).
    Froze(String),
}

/// How often the test host's activity is checked: a window with no
/// console output in which QEMU used under [`IDLE_TICKS`] of CPU is idle.
/// Anything running under TCG keeps QEMU far busier than that.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// CPU ticks (hundredths of a second) below which a window is idle.
const IDLE_TICKS: u64 = 3;
/// Idle windows in a row, each answered with a key press on the test
/// host's console, after which it is taken for stalled for good. A QEMU
/// TCG stall (seen in restore-heavy runs, and once in the middle of a
/// test's 200 HTTP clients, which then all timed out) leaves the test
/// host's vCPU halted with no timer due; the serial interrupt of a key
/// press wakes it, and a key press on a test host that is merely idle
/// does nothing (nothing reads the console).
const FROZEN_AFTER: Duration = Duration::from_secs(300);

/// CPU time QEMU (`pid`) has used, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Removes the initramfs of earlier runs whose xtask is gone (a killed
/// run never reaches its cleanup, and each is some 300 MB).
fn remove_orphaned_initramfs(work: &Path) {
    let Ok(entries) = fs::read_dir(work) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("host-"))
            .and_then(|n| n.strip_suffix(".cpio"))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn run_once(bins: &Binaries, assets: &Path, extra: &[PathBuf], command: &str) -> Result<Boot> {
    let arch = bins.arch;
    deps::ensure_packages(match arch {
        Arch::X86_64 => deps::TEST_HOST,
        Arch::Aarch64 => deps::TEST_HOST_AARCH64,
    })?;
    let host_kernel = kernel::build(kernel::Flavor::TestHost, arch, None)?;
    let work = cache_root()?.join("testhost-run");
    fs::create_dir_all(&work)?;
    remove_orphaned_initramfs(&work);
    let initramfs = work.join(format!("host-{}.cpio", std::process::id()));
    let _cleanup = RemoveOnDrop(initramfs.clone());

    let mut a = Archive::default();
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "e2e", "sbin", "usr", "usr/bin", "usr/sbin",
    ] {
        a.dir(d);
    }
    a.char_device("dev/console", 5, 1);
    let sysroot = match arch {
        Arch::X86_64 => None,
        Arch::Aarch64 => Some(crate::sysroot::build(
            arch,
            crate::sysroot::TEST_HOST_PACKAGES,
        )?),
    };
    a.file_from("bin/busybox", 0o755, &images::busybox(arch)?)?;
    a.symlink("bin/sh", "busybox");
    a.file_from("e2e/supermachine", 0o755, &bins.supermachine)?;
    a.file_from("e2e/supermachine-e2e", 0o755, &bins.e2e)?;
    for entry in fs::read_dir(assets)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .context("asset without a name")?
            .to_string_lossy()
            .into_owned();
        a.add_path(&format!("e2e/{name}"), &path)?;
    }
    // The host tools `supermachine` runs (building root disks, the
    // network backend).
    match &sysroot {
        None => {
            for program in HOST_PROGRAMS {
                add_dynamic_program(&mut a, program, program)?;
            }
            for program in OPTIONAL_HOST_PROGRAMS {
                if Path::new(program).exists() {
                    add_dynamic_program(&mut a, program, program)?;
                }
            }
            // virtio-fs shares (`run -v`) are served by virtiofsd.
            add_dynamic_program(
                &mut a,
                &deps::virtiofsd()?.to_string_lossy(),
                "/usr/libexec/virtiofsd",
            )?;
        }
        Some(sysroot) => {
            let mut added = std::collections::HashSet::new();
            for program in HOST_PROGRAMS {
                for (file, dest) in crate::sysroot::program_with_libraries(sysroot, program)? {
                    if added.insert(dest.clone()) {
                        // Links stay links (the loader's is one).
                        let name = dest.trim_start_matches('/');
                        a.parent_dirs(name).add_path(name, &file)?;
                    }
                }
            }
        }
    }
    // Where `supermachine` finds the guest kernel and agent by itself.
    let kernel_file = match arch {
        Arch::X86_64 => "vmlinux",
        Arch::Aarch64 => "Image",
    };
    a.dir("e2e/supermachine-guest");
    a.symlink(
        &format!("e2e/supermachine-guest/{kernel_file}"),
        &format!("../{kernel_file}"),
    );
    a.symlink("e2e/supermachine-guest/initramfs.cpio", "../initramfs.cpio");
    for path in extra {
        let name = path
            .file_name()
            .with_context(|| format!("{} has no file name", path.display()))?
            .to_string_lossy()
            .into_owned();
        a.add_path(&format!("e2e/{name}"), path)?;
    }
    // The initramfs root cannot be pivoted away from, which virtiofsd's
    // sandbox does: everything moves to a tmpfs root first, as a real
    // host's root is a real file system.
    let init = format!(
        "#!/bin/sh
/bin/busybox --install -s /bin
if [ ! -e /.switched ]; then
  mkdir -p /newroot
  mount -t tmpfs -o size=90% root /newroot
  for entry in /* /.[!.]*; do
    case $entry in /newroot|/proc|/sys|/dev|'/.[!.]*') ;; *) cp -a $entry /newroot/ ;; esac
  done
  mkdir -p /newroot/proc /newroot/sys /newroot/dev
  touch /newroot/.switched
  exec switch_root /newroot /init
fi
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ifconfig lo 127.0.0.1 up
# An uplink that leads nowhere (the kernel's dummy device, which drops
# everything; this machine has no network card): passt needs a default
# route on a link that is up to pick an interface. The tests only reach
# the host's own loopback, through passt's gateway.
ip link set dummy0 up
ip addr add 192.0.2.1/24 dev dummy0
ip route add default via 192.0.2.254 dev dummy0
ip -6 addr add 2001:db8::1/64 dev dummy0
ip -6 route add default via 2001:db8::fe dev dummy0
# The host's resolver: a DNS server the tests run on loopback.
mkdir -p /etc
echo 'nameserver 127.0.0.1' > /etc/resolv.conf
# passt drops root to nobody.
echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd
echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >> /etc/passwd
echo 'root:x:0:' > /etc/group
echo 'nogroup:x:65534:' >> /etc/group
export HOME=/root PATH=/e2e:$PATH
mkdir -p $HOME
cd /e2e
echo TESTHOST-UP kvm=$(test -c /dev/kvm && echo yes || echo no)
clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
case $clock in
  tsc|arch_sys_counter) ;;
  *) dmesg | grep -i -E 'tsc|clocksource|calibrat' | tail -5
     echo TESTHOST-BADCLOCK $clock
     reboot -f ;;
esac
{command}
echo TESTHOST-EXIT $?
reboot -f
"
    );
    a.file("init", 0o755, init.as_bytes());
    a.write_to(&initramfs)?;

    let timeout = Duration::from_secs(
        std::env::var("SUPERMACHINE_TESTHOST_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(40 * 60),
    );
    let mut qemu = match arch {
        Arch::X86_64 => {
            eprintln!("xtask: starting the QEMU test host (TCG, emulated AMD SVM)");
            let mut qemu = Command::new("qemu-system-x86_64");
            qemu.args(["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off"])
                .args(["-cpu", "max"])
                .arg("-append")
                .arg("console=ttyS0 reboot=t panic=-1 quiet tsc=reliable");
            qemu
        }
        Arch::Aarch64 => {
            eprintln!(
                "xtask: starting the arm64 QEMU test host (TCG, `virt` with EL2 and a GICv3)"
            );
            let mut qemu = Command::new("qemu-system-aarch64");
            // pauth-impdef: QEMU's own pointer-authentication hash, far
            // cheaper to emulate than the architected one.
            qemu.args(["-M", "virt,virtualization=on,gic-version=3"])
                .args(["-cpu", "max,pauth-impdef=on"])
                .arg("-append")
                .arg("console=ttyAMA0 panic=-1 quiet");
            qemu
        }
    };
    let mut child = qemu
        .args(["-accel", "tcg", "-m", "4096", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(host_kernel.boot_image())
        .arg("-initrd")
        .arg(&initramfs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting QEMU")?;
    // The console's input: nothing in the test host reads it, but a byte
    // arriving raises the serial interrupt.
    let mut console_in = child.stdin.take();
    let stdout = child.stdout.take().context("no qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.replace('\r', "");
            println!("  | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut console = String::new();
    let mut exit = None;
    let mut bad_clock = None;
    // The current activity window (its start and QEMU's CPU ticks then),
    // and since when every window has been idle.
    let mut window = (Instant::now(), cpu_ticks(child.id()));
    let mut idle_since: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                window = (Instant::now(), cpu_ticks(child.id()));
                idle_since = None;
                if let Some(code) = line.strip_prefix("TESTHOST-EXIT ") {
                    exit = code.trim().parse().ok();
                }
                if let Some(clock) = line.strip_prefix("TESTHOST-BADCLOCK ") {
                    bad_clock = Some(clock.trim().to_string());
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the test host did not finish within {timeout:?}");
        }
        if exit.is_none() && window.0.elapsed() >= IDLE_WINDOW {
            let ticks = cpu_ticks(child.id());
            let used = ticks
                .zip(window.1)
                .map(|(now, then)| now.saturating_sub(then));
            window = (Instant::now(), ticks);
            if used.is_none_or(|t| t >= IDLE_TICKS) {
                idle_since = None;
                continue;
            }
            let first = idle_since.is_none();
            let since = *idle_since.get_or_insert_with(|| {
                Instant::now()
                    .checked_sub(IDLE_WINDOW)
                    .unwrap_or_else(Instant::now)
            });
            if since.elapsed() > FROZEN_AFTER {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return Ok(Boot::Froze(console));
            }
            let pressed = console_in
                .as_mut()
                .is_some_and(|input| input.write_all(b"\n").and_then(|()| input.flush()).is_ok());
            if pressed && first {
                eprintln!(
                    "xtask: the test host has been silent and idle for {IDLE_WINDOW:?}; pressing Enter on its console (every {IDLE_WINDOW:?} while it stays idle)"
                );
            }
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    match (exit, bad_clock) {
        (Some(code), _) => Ok(Boot::Ran(console, code)),
        (None, Some(clock)) => Ok(Boot::BadClock(clock)),
        (None, None) => {
            bail!("the test host ended ({status}) without reporting the command's exit status")
        }
    }
}

/// Dynamically linked host programs the test host gets, with their
/// libraries, at the paths they have here.
const HOST_PROGRAMS: &[&str] = &["/usr/bin/mkfs.erofs", "/usr/bin/passt"];

/// Host programs copied in when installed (crun: `bench run`'s baseline).
const OPTIONAL_HOST_PROGRAMS: &[&str] = &["/usr/bin/crun"];

/// Adds `program` as `dest` and every library `ldd` names for it.
fn add_dynamic_program(a: &mut Archive, program: &str, dest: &str) -> Result<()> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("running ldd {program}"))?;
    if !out.status.success() {
        bail!("ldd {program} failed (is it installed?)");
    }
    let mut files = vec![(PathBuf::from(program), dest.to_string())];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            files.push((PathBuf::from(p), p.to_string()));
        }
    }
    for (file, dest) in files {
        let name = dest.trim_start_matches('/');
        a.parent_dirs(name);
        // The real file (libraries are symlinks to versioned names).
        let real = fs::canonicalize(&file)?;
        a.file_from(name, 0o755, &real)?;
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
