//! The tier-3 runner. It runs wherever `/dev/kvm` can boot Linux: directly
//! on a host with real KVM, or inside the QEMU test host that `cargo xtask
//! e2e` builds. It drives the real `supermachine` binary and the real guest
//! kernel, and ends with the line `N passed, N failed`.
//!
//! `supermachine-e2e test --supermachine BIN --assets DIR`
//! `supermachine-e2e bench-boot|bench-virtio --supermachine BIN --assets DIR [--runs N]`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod agent;
mod bench_exec;
mod bench_net;
mod bench_proto;
mod bench_run;
mod bench_snapshot;
mod bench_snapshot_linux;
mod bench_virtio;
mod exchange;
mod firecracker;
mod net;
mod run;
mod snapshot;

/// The guest kernel asset: the ELF `vmlinux` on x86_64, the `Image` on
/// aarch64.
#[cfg(target_arch = "x86_64")]
const KERNEL: &str = "vmlinux";
#[cfg(target_arch = "aarch64")]
const KERNEL: &str = "Image";

/// Tests that run on x86_64 only, each for a reason `docs/architecture.md`
/// gives: the bzImage format, and assets built from x86_64 Debian
/// packages (the Debian python image the detached-server and most network
/// tests run in, virtiofsd, the newer passt).
#[cfg(target_arch = "aarch64")]
const X86_64_ONLY: &[&str] = &[
    "bzimage-boots-to-init-and-reboots",
    "run-glibc-image-runs-python",
    "run-detached-server-lifecycle",
    "run-v-shares-host-directories",
    "net-guest-reaches-the-host-by-name-over-tcp-and-udp",
    "net-a-gibibyte-down-arrives-intact",
    "net-a-gibibyte-up-arrives-intact",
    "net-a-half-closed-connection-sees-the-servers-close",
    "net-deny-private-refuses-what-it-should",
    "snapshot-baked-server-restores-twenty-at-once",
];
#[cfg(target_arch = "x86_64")]
const X86_64_ONLY: &[&str] = &[];

/// What the refusal of a file that is no kernel at all says.
#[cfg(target_arch = "x86_64")]
const GARBAGE_KERNEL_REASON: &str = "neither an ELF vmlinux";
#[cfg(target_arch = "aarch64")]
const GARBAGE_KERNEL_REASON: &str = "no arm64 Image magic";

const MARKER: &str = "SUPERMACHINE-E2E-MARKER";
const BENCH_MARKER: &str = "SUPERMACHINE-BENCH-INIT";
const QUIET: &str = "quiet";
/// Far beyond a boot even under emulation; a hung guest fails its test.
/// (`SUPERMACHINE_E2E_BOOT_TIMEOUT` seconds overrides it, for debugging.)
fn boot_timeout() -> Duration {
    let secs = std::env::var("SUPERMACHINE_E2E_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
}

struct Env {
    supermachine: PathBuf,
    assets: PathBuf,
}

impl Env {
    fn asset(&self, name: &str) -> PathBuf {
        self.assets.join(name)
    }

    /// The guest kernel and agent initramfs every library VM here boots.
    fn guest_image(&self) -> supermachine::GuestImage {
        supermachine::GuestImage {
            kernel: self.asset(KERNEL),
            initramfs: self.asset("initramfs.cpio"),
        }
    }

    /// Runs `supermachine boot ARGS`, killing it after [`boot_timeout`].
    fn boot(&self, args: &[&str]) -> Run {
        let started = Instant::now();
        let child = Command::new(&self.supermachine)
            .arg("boot")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                return Run {
                    code: None,
                    stdout: String::new(),
                    stderr: format!("cannot start {}: {e}", self.supermachine.display()),
                    elapsed: started.elapsed(),
                };
            }
        };
        finish_within(child, started, boot_timeout(), |pid| {
            format!("its threads were in: {}", where_threads_wait(pid))
        })
    }

    /// Boots asset `kernel` with asset `image` as its initrd, the `extra`
    /// options and a quiet kernel.
    fn boot_image(&self, kernel: &str, image: &str, extra: &[&str]) -> Run {
        let (kernel, image) = (self.path(kernel), self.path(image));
        let mut args = vec!["--kernel", &kernel, "--initrd", &image];
        args.extend_from_slice(extra);
        args.extend(["--append", QUIET]);
        self.boot(&args)
    }

    fn path(&self, name: &str) -> String {
        self.asset(name).display().to_string()
    }
}

/// Collects a child's output and exit status, killing it after `timeout`
/// (`on_timeout(pid)`, asked first, says where it was stuck).
fn finish_within(
    mut child: std::process::Child,
    started: Instant,
    timeout: Duration,
    on_timeout: impl FnOnce(u32) -> String,
) -> Run {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).replace('\r', "")
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut timed_out = None;
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if started.elapsed() > timeout => {
                timed_out = Some(on_timeout(child.id()));
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let mut stderr = err.join().unwrap_or_default();
    if let Some(where_) = timed_out {
        stderr.push_str(&format!("\n(killed after {timeout:?}; {where_})"));
    }
    Run {
        code,
        stdout: out.join().unwrap_or_default(),
        stderr,
        elapsed: started.elapsed(),
    }
}

/// Each thread of `pid` as `name: kernel wait channel (syscall number)`,
/// to say where a hung VMM was stuck.
fn where_threads_wait(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "unknown".into();
    };
    let read = |task: &Path, file: &str| {
        std::fs::read_to_string(task.join(file))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    tasks
        .flatten()
        .map(|t| {
            let task = t.path();
            let syscall = read(&task, "syscall");
            format!(
                "{}: {} (syscall {})",
                read(&task, "comm"),
                read(&task, "wchan"),
                syscall.split_whitespace().next().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn describe(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            let keep = std::env::var("SUPERMACHINE_E2E_TAIL")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(15);
            lines[lines.len().saturating_sub(keep)..].join("\n    ")
        };
        format!(
            "exit {:?} after {:.1?}\n  stdout (tail):\n    {}\n  stderr:\n    {}",
            self.code,
            self.elapsed,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }

    fn marker_line(&self) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(MARKER))
    }
}

type Check = Result<(), String>;

fn expect(cond: bool, what: &str, run: &Run) -> Check {
    if cond {
        Ok(())
    } else {
        Err(format!("{what}\n  {}", run.describe()))
    }
}

fn failed(run: &Run) -> Check {
    expect(
        run.code.is_some_and(|c| c != 0),
        "expected a non-zero exit status",
        run,
    )
}

fn clean_exit_with_marker(run: &Run) -> Check {
    expect(run.code == Some(0), "expected exit status 0", run)?;
    expect(
        run.marker_line().is_some(),
        "expected the marker on stdout",
        run,
    )
}

type Test<'a> = (&'static str, Box<dyn Fn() -> Check + 'a>);

fn tests<'a>(env: &'a Env, vm: &'a agent::AgentVm) -> Vec<Test<'a>> {
    vec![
        (
            "kernel-boots-to-init-and-powers-off",
            Box::new(move || clean_exit_with_marker(&env.boot_image(KERNEL, "poweroff.cpio", &[]))),
        ),
        (
            "bzimage-boots-to-init-and-reboots",
            Box::new(move || {
                clean_exit_with_marker(&env.boot_image("bzImage", "reboot.cpio", &[]))
            }),
        ),
        (
            "two-vcpus-and-512m-are-seen-by-the-guest",
            Box::new(move || {
                let r = env.boot_image(
                    KERNEL,
                    "poweroff.cpio",
                    &["--cpus", "2", "--memory", "512M"],
                );
                clean_exit_with_marker(&r)?;
                let line = r.marker_line().unwrap_or_default();
                expect(
                    line.contains("cpus=2"),
                    "expected the guest to see 2 CPUs",
                    &r,
                )?;
                let mem_kib: u64 = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("mem_kib="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                expect(
                    (400_000..=524_288).contains(&mem_kib),
                    "expected about 512 MiB of guest RAM",
                    &r,
                )
            }),
        ),
        (
            "guest-panic-is-a-failure-with-the-panic-message",
            Box::new(move || {
                let r = env.boot_image(KERNEL, "panic.cpio", &[]);
                failed(&r)?;
                expect(
                        r.stderr.contains("guest kernel panicked: Kernel panic - not syncing: Attempted to kill init!"),
                        "expected the panic message on stderr",
                        &r,
                    )
            }),
        ),
        (
            "console-file-receives-the-guest-console",
            Box::new(move || {
                let file =
                    std::env::temp_dir().join(format!("sm-console-{}.log", std::process::id()));
                let r = env.boot_image(
                    KERNEL,
                    "poweroff.cpio",
                    &["--console-file", &file.display().to_string()],
                );
                let console = std::fs::read_to_string(&file).unwrap_or_default();
                let _ = std::fs::remove_file(&file);
                expect(r.code == Some(0), "expected exit status 0", &r)?;
                expect(!r.stdout.contains(MARKER), "expected nothing on stdout", &r)?;
                expect(
                    console.contains(MARKER),
                    "expected the marker in the console file",
                    &r,
                )
            }),
        ),
        (
            "virtio-blk-pattern-round-trips-and-read-only-is-enforced",
            Box::new(move || blk_round_trip(env)),
        ),
        (
            "vsock-64-connections-each-way-at-once",
            Box::new(move || vsock_exchange(env)),
        ),
        (
            "missing-disk-image-is-refused-before-any-vm",
            Box::new(move || {
                let r = env.boot(&[
                    "--kernel",
                    &env.path(KERNEL),
                    "--disk",
                    "/nonexistent/disk.img",
                ]);
                expect(
                    r.code.is_some_and(|c| c != 0)
                        && r.stderr.trim()
                            == "supermachine: disk image /nonexistent/disk.img: No such file or directory (os error 2)",
                    "expected one clear line naming the disk",
                    &r,
                )
            }),
        ),
        (
            "missing-kernel-is-refused-before-any-vm",
            Box::new(move || {
                let r = env.boot(&["--kernel", "/nonexistent/vmlinux"]);
                failed(&r)?;
                expect(
                    r.stderr.trim()
                        == "supermachine: cannot read kernel /nonexistent/vmlinux: No such file or directory (os error 2)",
                    "expected one clear line naming the kernel",
                    &r,
                )
            }),
        ),
        (
            "truncated-kernel-is-refused-before-any-vm",
            Box::new(move || {
                let cut = std::env::temp_dir().join(format!("sm-truncated-{}", std::process::id()));
                let bytes = std::fs::read(env.path(KERNEL)).unwrap_or_default();
                let write = std::fs::write(&cut, &bytes[..bytes.len() / 2]);
                let r = env.boot(&["--kernel", &cut.display().to_string()]);
                let _ = std::fs::remove_file(&cut);
                write.map_err(|e| format!("writing the truncated kernel: {e}"))?;
                failed(&r)?;
                expect(
                    r.stderr.contains("is not a bootable")
                        && r.stderr.contains("Linux kernel")
                        && r.stderr.contains("truncated"),
                    "expected a clear 'truncated' error",
                    &r,
                )?;
                expect(
                    !r.stdout.contains("Linux version"),
                    "expected no guest output",
                    &r,
                )
            }),
        ),
        (
            "garbage-kernel-is-refused-before-any-vm",
            Box::new(move || {
                let r = env.boot(&["--kernel", &env.path("poweroff.cpio")]);
                failed(&r)?;
                expect(
                    r.stderr.contains(GARBAGE_KERNEL_REASON) && r.stderr.lines().count() == 1,
                    "expected one clear line",
                    &r,
                )
            }),
        ),
        (
            "agent-exit-codes-and-signals-are-reported-exactly",
            Box::new(move || agent::exit_statuses(vm, env)),
        ),
        (
            "agent-env-cwd-and-user-are-applied",
            Box::new(move || agent::env_cwd_user(vm, env)),
        ),
        (
            "agent-100mib-stdout-intact-while-stderr-interleaves",
            Box::new(move || agent::large_stdout_with_stderr(vm, env)),
        ),
        (
            "agent-stdin-is-piped-to-eof",
            Box::new(move || agent::stdin_to_eof(vm, env)),
        ),
        (
            "agent-timeout-kills-the-process-tree",
            Box::new(move || agent::timeout_kills_the_tree(vm, env)),
        ),
        (
            "agent-50-concurrent-execs-each-get-their-output",
            Box::new(move || agent::fifty_concurrent(vm, env)),
        ),
        (
            "agent-pseudo-terminal-sees-tty-and-resize",
            Box::new(move || agent::terminal(vm, env)),
        ),
        (
            "agent-files-round-trip-both-ways-64mib",
            Box::new(move || agent::files_both_ways(vm, env)),
        ),
        (
            "agent-connect-reaches-a-guest-tcp-server",
            Box::new(move || agent::tcp_connect(vm, env)),
        ),
        (
            "agent-overlay-takes-writes-and-the-disk-is-unchanged",
            Box::new(move || agent::overlay_and_stop(env)),
        ),
        (
            "agent-writable-disk-keeps-writes-for-the-next-vm",
            Box::new(move || agent::writable_disk_outlives_the_vm(env)),
        ),
        (
            "agent-snapshot-while-running-parks-and-resumes-a-kept-process",
            Box::new(move || agent::snapshot_while_running(env)),
        ),
        (
            "agent-snapshot-restores-a-linux-guest-and-pools",
            Box::new(move || agent::snapshot_restore_and_pool(env)),
        ),
        (
            "run-demo-image-by-path",
            Box::new(move || run::demo_image_runs_by_path(env)),
        ),
        (
            "run-exit-codes-and-signals-propagate",
            Box::new(move || run::exit_codes_and_signals_propagate(env)),
        ),
        (
            "run-env-workdir-user-entrypoint-apply",
            Box::new(move || run::env_workdir_user_and_entrypoint_apply(env)),
        ),
        (
            "run-i-pipes-stdin",
            Box::new(move || run::stdin_is_piped_with_i(env)),
        ),
        (
            "run-t-gives-a-terminal",
            Box::new(move || run::tty_gives_a_terminal(env)),
        ),
        (
            "run-ctrl-c-reaches-the-workload",
            Box::new(move || run::ctrl_c_reaches_the_workload(env)),
        ),
        (
            "run-glibc-image-runs-python",
            Box::new(move || run::glibc_image_runs_python(env)),
        ),
        (
            "run-v-shares-host-directories",
            Box::new(move || run::volumes_share_host_directories(env)),
        ),
        (
            "run-bad-volumes-are-one-line-and-leave-nothing",
            Box::new(move || run::bad_volumes_are_one_line_and_leave_nothing(env)),
        ),
        (
            "run-detached-server-lifecycle",
            Box::new(move || run::detached_server_lifecycle(env)),
        ),
        (
            "run-killed-vmm-shows-exited-and-rm-cleans",
            Box::new(move || run::killed_vmm_shows_exited_and_rm_cleans(env)),
        ),
        (
            "run-bad-input-is-one-line-and-leaves-nothing",
            Box::new(move || run::bad_input_is_one_line_and_leaves_nothing(env)),
        ),
        (
            "net-busybox-guest-fetches-from-the-host",
            Box::new(move || net::busybox_guest_fetches_from_the_host(env)),
        ),
        (
            "net-a-half-closed-connection-sees-the-servers-close",
            Box::new(move || net::a_half_closed_connection_sees_the_servers_close(env)),
        ),
        (
            "net-guest-reaches-the-host-by-name-over-tcp-and-udp",
            Box::new(move || net::guest_reaches_the_host_by_name_tcp_and_udp(env)),
        ),
        (
            "net-a-gibibyte-down-arrives-intact",
            Box::new(move || net::a_gibibyte_arrives_intact(env, net::Way::Down)),
        ),
        (
            "net-a-gibibyte-up-arrives-intact",
            Box::new(move || net::a_gibibyte_arrives_intact(env, net::Way::Up)),
        ),
        (
            "net-deny-private-refuses-what-it-should",
            Box::new(move || net::deny_private_refuses_what_it_should(env)),
        ),
        (
            "net-none-has-only-loopback",
            Box::new(move || net::network_none_has_only_loopback(env)),
        ),
        (
            "net-killing-the-vmm-leaves-no-passt",
            Box::new(move || net::killing_the_vmm_leaves_no_passt(env)),
        ),
        (
            "snapshot-agent-only-serves-any-run",
            Box::new(move || snapshot::agent_snapshot_serves_any_run(env)),
        ),
        (
            "snapshot-baked-server-restores-twenty-at-once",
            Box::new(move || snapshot::baked_server_restores_twenty_at_once(env)),
        ),
    ]
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("sm-e2e-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn blk_round_trip(env: &Env) -> Check {
    const PATTERN_BYTES: usize = 4 << 20;
    const RO_MARKER: &[u8; 16] = b"READ-ONLY-DISK!!";
    let scratch = Scratch::new("blk")?;
    let rw = scratch.0.join("rw.img");
    let ro = scratch.0.join("ro.img");
    let fail = |e: std::io::Error| format!("preparing disk images: {e}");
    std::fs::write(&rw, vec![0u8; 8 << 20]).map_err(fail)?;
    let mut ro_bytes = RO_MARKER.to_vec();
    ro_bytes.resize(1 << 20, 0xee);
    std::fs::write(&ro, &ro_bytes).map_err(fail)?;
    let r = env.boot_image(
        KERNEL,
        "blk.cpio",
        &[
            "--disk",
            &rw.display().to_string(),
            "--disk",
            &format!("{},ro", ro.display()),
        ],
    );
    expect(r.code == Some(0), "expected exit status 0", &r)?;
    for line in [
        "BLK-WRITTEN",
        "BLK-READBACK-OK",
        "BLK-RO-REFUSED",
        "BLK-RO-CONTENT READ-ONLY-DISK!!",
        "BLK-SIZES 16384 1",
        "RNG-BYTES 64",
    ] {
        expect(
            r.stdout.lines().any(|l| l.trim() == line),
            &format!("expected the guest to print '{line}'"),
            &r,
        )?;
    }
    // The host's view: the pattern is in the image, the rest untouched.
    let image = std::fs::read(&rw).map_err(fail)?;
    let pattern: Vec<u8> = b"SUPERMACHINE-BLK-PATTERN\n"
        .iter()
        .copied()
        .cycle()
        .take(PATTERN_BYTES)
        .collect();
    expect(
        image[..PATTERN_BYTES] == pattern[..],
        "expected the guest's pattern in the image file",
        &r,
    )?;
    expect(
        image[PATTERN_BYTES..].iter().all(|&b| b == 0),
        "expected the rest of the image untouched",
        &r,
    )?;
    expect(
        std::fs::read(&ro).map_err(fail)? == ro_bytes,
        "expected the read-only image unchanged",
        &r,
    )
}

/// Connects to guest port `port` through the device's socket, retrying
/// while the guest is still booting (the device refuses with EOF until
/// the guest listens).
fn connect_to_guest(socket: &Path, port: u32, stop: &AtomicBool) -> Result<UnixStream, String> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(format!("the VM ended before guest port {port} answered"));
        }
        if let Ok(mut s) = UnixStream::connect(socket)
            && s.write_all(format!("CONNECT {port}\n").as_bytes()).is_ok()
        {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while let Ok(1) = s.read(&mut byte) {
                if byte[0] == b'\n' {
                    break;
                }
                line.push(byte[0]);
            }
            if line.starts_with(b"OK ") {
                return Ok(s);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vsock_exchange(env: &Env) -> Check {
    use exchange::{CONNECTIONS, GUEST_PORT, HOST_PORT};
    let scratch = Scratch::new("vsock")?;
    let socket = scratch.0.join("vm.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", socket.display()))
        .map_err(|e| format!("binding the host listener: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    // Host side, serving: accept until every guest connection is served.
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<usize, String> {
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut workers = Vec::new();
            while workers.len() < CONNECTIONS && !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        workers.push(std::thread::spawn(move || exchange::serve(s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // Each worker ends when its guest connection does (at the
            // latest when the VM exits and the device closes it).
            Ok(workers
                .into_iter()
                .map(|w| w.join())
                .filter(|r| matches!(r, Ok(Ok(()))))
                .count())
        })
    };
    // Host side, connecting: as many connections to the guest's port.
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let s = connect_to_guest(&socket, GUEST_PORT, &stop)?;
                exchange::exchange(s, 1000 + i as u64, |s| {
                    s.shutdown(std::net::Shutdown::Write)
                })
            })
        })
        .collect();
    let r = env.boot_image(
        KERNEL,
        "vsock.cpio",
        &["--vsock", &socket.display().to_string(), "--memory", "512M"],
    );
    stop.store(true, Ordering::SeqCst);
    let client_errors: Vec<String> = clients
        .into_iter()
        .filter_map(|c| {
            c.join()
                .unwrap_or_else(|_| Err("client panicked".into()))
                .err()
        })
        .collect();
    let served = server
        .join()
        .unwrap_or_else(|_| Err("server panicked".into()))?;
    expect(r.code == Some(0), "expected exit status 0", &r)?;
    expect(
        r.stdout.lines().any(|l| l.trim() == "VSOCK-GUEST-OK"),
        "expected the guest program to check every exchange",
        &r,
    )?;
    expect(
        served == CONNECTIONS,
        &format!("expected {CONNECTIONS} guest connections, the host served {served}"),
        &r,
    )?;
    expect(
        client_errors.is_empty(),
        &format!(
            "expected every host-started exchange to check out; {} failed, first: {}",
            client_errors.len(),
            client_errors.first().map_or("", String::as_str)
        ),
        &r,
    )?;
    expect(
        !socket.exists(),
        "expected the VMM to remove its socket",
        &r,
    )
}

/// Tests that move a gibibyte through emulated hardware: they get twice
/// the usual time (each took 150-270 s in the test host).
const LONG_TESTS: &[&str] = &[
    "net-a-gibibyte-down-arrives-intact",
    "net-a-gibibyte-up-arrives-intact",
];

/// Ends the whole run when one test hangs: a test that has not finished
/// within `SUPERMACHINE_E2E_TEST_TIMEOUT` seconds (default 300, twice that
/// for [`LONG_TESTS`]) is
/// reported as failed, with where each of this process's threads waits,
/// and the runner exits (taking any stuck VM with it) instead of holding
/// CI until the test host's own deadline.
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

/// Tests passed and failed so far (the watchdog reports them too).
static PASSED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static FAILED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Watchdog {
    fn arm(name: &'static str) -> Watchdog {
        let usual = std::env::var("SUPERMACHINE_E2E_TEST_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let limit = Duration::from_secs(if LONG_TESTS.contains(&name) {
            2 * usual
        } else {
            usual
        });
        let (done, wait) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                println!(
                    "FAIL {name}: still running after {limit:?}; threads: {}",
                    where_threads_wait(std::process::id())
                );
                println!(
                    "{} passed, {} failed",
                    PASSED.load(Ordering::SeqCst),
                    FAILED.load(Ordering::SeqCst) + 1
                );
                std::process::exit(1);
            }
        });
        Watchdog(Some(done))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            let _ = done.send(());
        }
    }
}

fn run_tests(env: &Env, only: Option<&str>) -> ExitCode {
    let record = |name: &str, started: Instant, result: Check| match result {
        Ok(()) => {
            PASSED.fetch_add(1, Ordering::SeqCst);
            println!("PASS {name} ({:.1?})", started.elapsed());
        }
        Err(why) => {
            FAILED.fetch_add(1, Ordering::SeqCst);
            println!("FAIL {name}: {why}");
        }
    };
    let mut vm = agent::AgentVm::new();
    for (name, test) in tests(env, &vm) {
        if X86_64_ONLY.contains(&name)
            || only.is_some_and(|o| !o.split(',').any(|o| name.contains(o)))
        {
            continue;
        }
        let started = Instant::now();
        let watchdog = Watchdog::arm(name);
        let result = test();
        drop(watchdog);
        record(name, started, result);
    }
    if vm.started() {
        let started = Instant::now();
        record(
            "agent-vm-powers-off-on-stop",
            started,
            agent::stop_shared(&mut vm),
        );
    }
    let (passed, failed) = (PASSED.load(Ordering::SeqCst), FAILED.load(Ordering::SeqCst));
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

struct Sample {
    to_init: Duration,
    rss_kib: u64,
}

fn boot_once(env: &Env, kernel: &str) -> Result<Sample, String> {
    let started = Instant::now();
    let mut child = Command::new(&env.supermachine)
        .args([
            "boot",
            "--kernel",
            kernel,
            "--initrd",
            &env.path("bench.cpio"),
            "--append",
            QUIET,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting supermachine: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut to_init = None;
    let mut rss = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.starts_with(BENCH_MARKER) && to_init.is_none() {
            to_init = Some(started.elapsed());
            rss = vm_hwm_kib(child.id());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(format!("supermachine failed: {status}: {err}"));
    }
    Ok(Sample {
        to_init: to_init.ok_or("the guest never printed its marker")?,
        rss_kib: rss.ok_or("could not read the VMM's RSS")?,
    })
}

fn median<T: Copy + Ord>(v: &mut [T]) -> T {
    v.sort();
    v[v.len() / 2]
}

fn bench_boot(env: &Env, runs: usize) -> ExitCode {
    let mut rows = Vec::new();
    #[cfg(target_arch = "x86_64")]
    let kernels = [("ELF vmlinux", "vmlinux"), ("bzImage", "bzImage")];
    #[cfg(target_arch = "aarch64")]
    let kernels = [("arm64 Image", "Image")];
    for (label, file) in kernels {
        let kernel = env.path(file);
        let mut times = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            match boot_once(env, &kernel) {
                Ok(s) => {
                    times.push(s.to_init);
                    rss.push(s.rss_kib);
                }
                Err(e) => {
                    println!("bench failed for {label}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let (min, max) = (times.iter().min().copied(), times.iter().max().copied());
        rows.push((label, median(&mut times), min, max, median(&mut rss)));
    }
    let baseline = rows[0].1.as_secs_f64();
    println!("boot: VMM process start to guest /init (median of {runs} runs each)");
    println!("| kernel | median | min | max | ratio to the first | VMM peak RSS (VmHWM) |");
    println!("|---|---|---|---|---|---|");
    for (label, med, min, max, rss) in &rows {
        println!(
            "| {label} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {:.1} MiB |",
            med.as_secs_f64() * 1e3,
            min.unwrap_or_default().as_secs_f64() * 1e3,
            max.unwrap_or_default().as_secs_f64() * 1e3,
            med.as_secs_f64() / baseline,
            *rss as f64 / 1024.0
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.get(1).map(String::as_str) == Some("bench-snapshot-native") {
        let (Some(bin), Some(firecracker)) = (value("--supermachine"), value("--firecracker"))
        else {
            eprintln!(
                "usage: supermachine-e2e bench-snapshot-native --supermachine BIN --firecracker BIN [--runs N]"
            );
            return ExitCode::from(2);
        };
        let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(20);
        return bench_snapshot::run(Path::new(&bin), Path::new(&firecracker), runs);
    }
    let (Some(mode), Some(bin), Some(assets)) = (
        args.get(1).cloned(),
        value("--supermachine"),
        value("--assets"),
    ) else {
        eprintln!(
            "usage: supermachine-e2e test|bench-boot|bench-virtio|bench-net|bench-exec|bench-run --supermachine BIN --assets DIR [--runs N]"
        );
        return ExitCode::from(2);
    };
    let env = Env {
        supermachine: PathBuf::from(bin),
        assets: PathBuf::from(assets),
    };
    if !Path::new(&env.supermachine).exists() {
        eprintln!(
            "supermachine-e2e: no supermachine binary at {}",
            env.supermachine.display()
        );
        return ExitCode::from(2);
    }
    match mode.as_str() {
        "test" => run_tests(&env, value("--only").as_deref()),
        "bench-boot" => {
            let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(5);
            bench_boot(&env, runs)
        }
        "bench-exec" => {
            let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(5);
            bench_exec::run(&env, runs, args.iter().any(|a| a == "--probe"))
        }
        "bench-run" => {
            let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(10);
            bench_run::run(&env, runs)
        }
        "bench-snapshot-linux" => {
            let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(20);
            // Without --firecracker (no Firecracker for this
            // architecture), supermachine's rows alone.
            let firecracker = value("--firecracker").map(PathBuf::from);
            bench_snapshot_linux::run(&env, firecracker.as_deref(), runs)
        }
        "bench-virtio" => {
            let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(5);
            bench_virtio::run(&env, runs)
        }
        "bench-net" => {
            let runs = value("--runs").and_then(|r| r.parse().ok()).unwrap_or(5);
            bench_net::run(&env, runs)
        }
        other => {
            eprintln!("supermachine-e2e: unknown mode {other}");
            ExitCode::from(2)
        }
    }
}
