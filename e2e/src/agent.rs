//! Tier 3 of the guest agent and the host API: a real guest kernel booting
//! the test image's EROFS disk, driven through `supermachine::Vm` exactly
//! as a program embedding the library would.

use std::io::{Read, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use supermachine::{Vm, VmConfig};

use crate::exchange::pattern;
use crate::{Check, Env};

/// The agent tests' shared VM, booted by the first test that needs it.
pub struct AgentVm {
    vm: OnceLock<Result<Vm, String>>,
}

impl AgentVm {
    pub fn new() -> Self {
        Self {
            vm: OnceLock::new(),
        }
    }

    /// True once a test has booted it.
    pub fn started(&self) -> bool {
        self.vm.get().is_some()
    }

    fn get(&self, env: &Env) -> Result<&Vm, String> {
        self.vm
            .get_or_init(|| {
                Vm::start(&env.asset("rootfs.erofs"), &options(env, "agent-test"))
                    .map_err(|e| format!("starting the VM: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

fn options(env: &Env, hostname: &str) -> VmConfig {
    VmConfig {
        guest: Some(env.guest_image()),
        hostname: hostname.into(),
        memory_bytes: 768 << 20,
        ..VmConfig::default()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(what()) }
}

fn run(vm: &Vm, argv: &[&str]) -> Result<supermachine::ExecOutput, String> {
    vm.exec(argv.iter().copied())
        .output()
        .map_err(|e| format!("{argv:?}: {e}"))
}

pub fn exit_statuses(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    for (argv, code) in [
        (vec!["true"], 0),
        (vec!["sh", "-c", "exit 1"], 1),
        (vec!["sh", "-c", "exit 255"], 255),
        (vec!["sh", "-c", "true | false"], 1),
    ] {
        let out = run(vm, &argv)?;
        ensure(
            out.status.code() == Some(code) && out.status.signal().is_none(),
            || format!("{argv:?}: expected exit {code}, got {}", out.status),
        )?;
    }
    let out = run(vm, &["sh", "-c", "kill -TERM $$"])?;
    ensure(
        out.status.signal() == Some(15)
            && out.status.code().is_none()
            && out.status.shell_code() == 143,
        || format!("expected death by SIGTERM, got {}", out.status),
    )?;
    let out = run(vm, &["sh", "-c", "kill -KILL $$"])?;
    ensure(out.status.signal() == Some(9), || {
        format!("expected death by SIGKILL, got {}", out.status)
    })?;
    ensure(out.peak_rss > 0, || "expected a peak RSS".into())?;
    match vm.exec(["no-such-program"]).output() {
        Err(e) => ensure(
            e.to_string() == "exec: \"no-such-program\": executable file not found in $PATH",
            || format!("unexpected error: {e}"),
        ),
        Ok(o) => Err(format!("a missing program ran: {}", o.status)),
    }
}

pub fn env_cwd_user(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let out = vm
        .exec(["sh", "-c", "echo $GREETING; pwd; id; echo $HOME; hostname"])
        .env("GREETING", "hello there")
        .cwd("/tmp")
        .user("app")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    // busybox `id` lists the groups in the kernel's (sorted) order.
    let expected = "hello there\n/tmp\nuid=1000(app) gid=1000(app) groups=50(staff),1000(app)\n/home/app\nagent-test\n";
    ensure(text == expected && out.status.success(), || {
        format!("expected {expected:?}, got {text:?} ({})", out.status)
    })?;
    let out = vm
        .exec(["id"])
        .user("1000:50")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(text.starts_with("uid=1000(app) gid=50(staff)"), || {
        format!("uid:gid user gave {text:?}")
    })?;
    match vm.exec(["id"]).user("nobody-here").output() {
        Err(e) => ensure(
            e.to_string().contains("unable to find user nobody-here"),
            || format!("unexpected error: {e}"),
        ),
        Ok(_) => Err("an unknown user ran".into()),
    }
}

pub fn large_stdout_with_stderr(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let chunk = pattern(1, 1 << 20);
    let mut expected = Sha256::new();
    for _ in 0..100 {
        expected.update(&chunk);
    }
    let out = vm
        .exec([
            "sh",
            "-c",
            "i=0; while [ $i -lt 100 ]; do cat /tmp/chunk; echo \"err $i\" >&2; i=$((i+1)); done",
        ])
        .stage_file("/tmp/chunk", chunk)
        .output()
        .map_err(|e| e.to_string())?;
    ensure(out.stdout.len() == 100 << 20, || {
        format!("expected 100 MiB of stdout, got {} bytes", out.stdout.len())
    })?;
    ensure(sha256(&out.stdout) == hex(&expected.finalize()), || {
        "stdout's SHA-256 differs".into()
    })?;
    let lines: Vec<String> = (0..100).map(|i| format!("err {i}")).collect();
    ensure(
        String::from_utf8_lossy(&out.stderr) == lines.join("\n") + "\n",
        || format!("stderr was {} bytes, not the 100 lines", out.stderr.len()),
    )?;
    println!(
        "  100 MiB of stdout in {:.2?} ({:.1} MiB/s)",
        out.duration,
        100.0 / out.duration.as_secs_f64()
    );
    Ok(())
}

pub fn stdin_to_eof(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let data = pattern(2, 8 << 20);
    let out = vm
        .exec(["sha256sum"])
        .stdin(data.clone())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(text.starts_with(&sha256(&data)), || {
        format!("the guest hashed stdin as {text:?}")
    })
}

pub fn timeout_kills_the_tree(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let started = Instant::now();
    let out = vm
        .exec([
            "sh",
            "-c",
            "sleep 1000 & sleep 1000 & sleep 1000; echo never",
        ])
        .timeout(Duration::from_secs(2))
        .output()
        .map_err(|e| e.to_string())?;
    ensure(out.timed_out && out.status.signal() == Some(9), || {
        format!(
            "expected a timeout kill, got {} (timed_out {})",
            out.status, out.timed_out
        )
    })?;
    ensure(out.stdout.is_empty(), || {
        "the shell went on after the timeout".into()
    })?;
    ensure(started.elapsed() < Duration::from_secs(60), || {
        "the timeout took too long".into()
    })?;
    let left = run(vm, &["sh", "-c", "pgrep sleep; true"])?;
    ensure(left.stdout.is_empty(), || {
        format!(
            "sleep processes survived: {}",
            String::from_utf8_lossy(&left.stdout)
        )
    })
}

pub fn fifty_concurrent(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..50 {
            let errors = &errors;
            s.spawn(move || {
                let script = format!(
                    "echo start-{i}; sleep 0.2; echo end-{i} >&2; exit {}",
                    i % 7
                );
                match vm.exec(["sh", "-c", &script]).output() {
                    Ok(o) => {
                        let ok = o.stdout == format!("start-{i}\n").as_bytes()
                            && o.stderr == format!("end-{i}\n").as_bytes()
                            && o.status.code() == Some(i % 7);
                        if !ok {
                            errors
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!(
                                    "exec {i}: {:?} / {:?} / {}",
                                    String::from_utf8_lossy(&o.stdout),
                                    String::from_utf8_lossy(&o.stderr),
                                    o.status
                                ));
                        }
                    }
                    Err(e) => errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("exec {i}: {e}")),
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_default();
    ensure(errors.is_empty(), || {
        format!("{} of 50 failed, first: {}", errors.len(), errors[0])
    })
}

pub fn terminal(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let mut p = vm
        .exec(["sh", "-c", "tty; stty size; read x; stty size; echo got-$x"])
        .tty(33, 99)
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = p.take_stdout().ok_or("no stdout")?;
    let mut stdin = p.take_stdin().ok_or("no stdin")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("33 99") {
        let n = stdout.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "the session ended early: {:?}",
                String::from_utf8_lossy(&seen)
            ));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    p.resize(50, 132).map_err(|e| e.to_string())?;
    stdin.write_all(b"go\n").map_err(|e| e.to_string())?;
    stdout.read_to_end(&mut seen).map_err(|e| e.to_string())?;
    let info = p.wait().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&seen);
    ensure(
        text.starts_with("/dev/pts/")
            && text.contains("33 99\r\n")
            && text.contains("50 132\r\n")
            && text.contains("got-go"),
        || format!("terminal session printed {text:?}"),
    )?;
    ensure(info.status.success(), || {
        format!("the session ended with {}", info.status)
    })?;
    // output() on a terminal closes its input: `cat` sees end of file.
    let out = vm
        .exec(["cat"])
        .tty(24, 80)
        .timeout(Duration::from_secs(60))
        .output()
        .map_err(|e| e.to_string())?;
    ensure(out.status.success() && !out.timed_out, || {
        format!(
            "cat on a terminal under output(): {} (timed out: {})",
            out.status, out.timed_out
        )
    })
}

pub fn files_both_ways(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let big = pattern(3, 64 << 20);
    let started = Instant::now();
    vm.write_file_from("/tmp/up/big.bin", big.as_slice(), 0o600, (1000, 1000))
        .map_err(|e| e.to_string())?;
    let up = started.elapsed();
    let out = run(
        vm,
        &[
            "sh",
            "-c",
            "sha256sum /tmp/up/big.bin; stat -c '%a %u %g %s' /tmp/up/big.bin",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(
        text.starts_with(&sha256(&big)) && text.contains("\n600 1000 1000 67108864"),
        || format!("the guest sees the staged file as {text:?}"),
    )?;
    let out = run(
        vm,
        &[
            "sh",
            "-c",
            "head -c 67108864 /dev/urandom > /tmp/down.bin && sha256sum /tmp/down.bin",
        ],
    )?;
    let guest_sum = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let started = Instant::now();
    let down = vm.read_file("/tmp/down.bin").map_err(|e| e.to_string())?;
    let down_time = started.elapsed();
    ensure(down.len() == 64 << 20 && sha256(&down) == guest_sum, || {
        format!(
            "read back {} bytes, SHA-256 {} vs the guest's {guest_sum}",
            down.len(),
            sha256(&down)
        )
    })?;
    println!("  64 MiB up in {up:.2?}, down in {down_time:.2?}");
    match vm.read_file("/no/such/file") {
        Err(e) => ensure(e.to_string().contains("No such file"), || {
            format!("unexpected error: {e}")
        }),
        Ok(_) => Err("a missing file was read".into()),
    }
}

pub fn tcp_connect(vm: &AgentVm, env: &Env) -> Check {
    let vm = vm.get(env)?;
    let mut server = vm
        .exec(["tcp-echo", "7070"])
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = server.take_stdout().ok_or("no stdout")?;
    let mut line = [0u8; 15];
    out.read_exact(&mut line)
        .map_err(|e| format!("tcp-echo: {e}"))?;
    ensure(&line == b"TCP-ECHO-READY\n", || {
        "tcp-echo did not start".into()
    })?;
    // One small exchange first, then several large ones at once, each
    // checked both ways.
    let results: Vec<Check> = std::iter::once(echo_through(vm, 0, 5))
        .chain(std::thread::scope(|s| {
            let handles: Vec<_> = (1..=4u64)
                .map(|i| s.spawn(move || echo_through(vm, i, 8 << 20)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect::<Vec<_>>()
        }))
        .collect();
    server.signal(15).map_err(|e| e.to_string())?;
    let _ = server.wait();
    for r in results {
        r?;
    }
    match vm.connect(7071) {
        Err(e) => ensure(e.to_string().contains("connect to guest port 7071"), || {
            format!("unexpected error: {e}")
        }),
        Ok(_) => Err("a closed port connected".into()),
    }
}

/// Sends `len` bytes through `vm.connect` to the guest's echo server and
/// checks what comes back.
fn echo_through(vm: &Vm, i: u64, len: usize) -> Check {
    let data = pattern(10 + i, len);
    let mut conn = vm.connect(7070).map_err(|e| e.to_string())?;
    let timeout = Some(Duration::from_secs(60));
    conn.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    conn.set_write_timeout(timeout).map_err(|e| e.to_string())?;
    let mut reader = conn.try_clone().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        let mut back = Vec::new();
        let r = reader.read_to_end(&mut back);
        (back, r)
    });
    conn.write_all(&data)
        .map_err(|e| format!("connection {i}: writing: {e}"))?;
    conn.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let (back, r) = echo.join().map_err(|_| "reader panicked".to_string())?;
    r.map_err(|e| format!("connection {i}: reading after {} bytes: {e}", back.len()))?;
    ensure(
        back.len() == data.len() && sha256(&back) == sha256(&data),
        || format!("connection {i}: {} bytes came back altered", back.len()),
    )
}

/// The overlay takes writes anywhere, the image's disk stays as it was,
/// and stopping the VM leaves nothing behind. Boots its own VM.
pub fn overlay_and_stop(env: &Env) -> Check {
    let disk = env.asset("rootfs.erofs");
    let before = sha256(&std::fs::read(&disk).map_err(|e| e.to_string())?);
    let vm = Vm::start(&disk, &options(env, "overlay-test")).map_err(|e| e.to_string())?;
    let out = run(
        &vm,
        &[
            "sh",
            "-c",
            "echo written > /etc/new-file && cat /etc/new-file && echo 'x:x:5:5::/:/bin/sh' >> /etc/passwd && grep -c . /etc/passwd && rm /bin/true && mount | grep ' / '",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(
        out.status.success() && text.starts_with("written\n4\n") && text.contains("overlay on / "),
        || {
            format!(
                "writes in the guest: {} {text:?} {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        },
    )?;
    let mounts = run(&vm, &["cat", "/proc/mounts"])?;
    let mounts = String::from_utf8_lossy(&mounts.stdout);
    for m in [
        " /proc proc",
        " /sys sysfs",
        " /dev devtmpfs",
        " /dev/pts devpts",
        " /dev/shm tmpfs",
        " /run tmpfs",
        " /tmp tmpfs",
        " /sys/fs/cgroup cgroup2",
    ] {
        ensure(mounts.contains(m), || {
            format!("{m:?} is not mounted: {mounts}")
        })?;
    }
    let socket_dir = vm.vsock_socket().parent().map(|p| p.to_path_buf());
    let reason = vm.stop().map_err(|e| e.to_string())?;
    ensure(reason == supermachine::ExitReason::PowerOff, || {
        format!("expected a power-off, got {reason:?}")
    })?;
    ensure(socket_dir.is_some_and(|d| !d.exists()), || {
        "the VM's socket directory was left behind".into()
    })?;
    let after = sha256(&std::fs::read(&disk).map_err(|e| e.to_string())?);
    ensure(before == after, || "the image's EROFS disk changed".into())
}

/// With a writable disk, what one VM writes is there for the next one
/// booted on it, over the same unchanged image.
pub fn writable_disk_outlives_the_vm(env: &Env) -> Check {
    let scratch = crate::Scratch::new("upper")?;
    let upper = scratch.0.join("upper.ext4");
    std::fs::copy(env.asset("upper.ext4"), &upper).map_err(|e| format!("copying the disk: {e}"))?;
    let options = VmConfig {
        writable_disk: Some(upper.clone()),
        ..options(env, "persist-test")
    };
    let disk = env.asset("rootfs.erofs");
    let first = Vm::start(&disk, &options).map_err(|e| e.to_string())?;
    let out = run(
        &first,
        &[
            "sh",
            "-c",
            "echo kept > /etc/persisted && mkdir -p /root/work && echo data > /root/work/file && rm /etc/group && sync",
        ],
    )?;
    ensure(out.status.success(), || {
        format!(
            "writing in the first VM: {} {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    first.stop().map_err(|e| e.to_string())?;
    let second = Vm::start(&disk, &options).map_err(|e| e.to_string())?;
    let out = run(
        &second,
        &[
            "sh",
            "-c",
            "cat /etc/persisted /root/work/file; test -e /etc/group && echo group-back; grep -c . /etc/passwd",
        ],
    )?;
    second.stop().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(text == "kept\ndata\n3\n", || {
        format!("the second VM saw {text:?} ({})", out.status)
    })
}

/// The shared VM stops cleanly at the end.
pub fn stop_shared(vm: &mut AgentVm) -> Check {
    match vm.vm.take() {
        Some(Ok(vm)) => {
            let reason = vm.stop().map_err(|e| e.to_string())?;
            ensure(reason == supermachine::ExitReason::PowerOff, || {
                format!("expected a power-off, got {reason:?}")
            })
        }
        _ => Ok(()),
    }
}

/// Numbers a counting process prints, one per line, as they come.
fn count_lines(reader: supermachine::OutputReader) -> std::sync::mpsc::Receiver<u64> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(n) = line.map(|l| l.trim().parse::<u64>()) else {
                return;
            };
            if tx.send(n.unwrap_or(u64::MAX)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Takes `n` more numbers, checking each follows the one before.
fn take_consecutive(
    rx: &std::sync::mpsc::Receiver<u64>,
    last: &mut Option<u64>,
    n: usize,
) -> Check {
    for _ in 0..n {
        let got = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| format!("the counter stopped after {last:?}"))?;
        if let Some(prev) = *last {
            ensure(got == prev + 1, || {
                format!("the counter went from {prev} to {got}")
            })?;
        }
        *last = Some(got);
    }
    Ok(())
}

/// A VM with a kept counting process is snapshotted while it runs: the
/// count goes on without a gap or a repeat; then snapshotted and stopped:
/// everything printed before the pause arrives, nothing after.
pub fn snapshot_while_running(env: &Env) -> Check {
    let base = std::env::temp_dir().join(format!("sm-e2e-snapshot-{}", std::process::id()));
    let result = snapshot_kept_counter(env, &base).map(|_| ());
    let _ = std::fs::remove_dir_all(&base);
    result
}

/// The source half of the snapshot tests: returns the counter's pid and
/// last number, and the two snapshots (running, stopped) under `base`.
fn snapshot_kept_counter(env: &Env, base: &std::path::Path) -> Result<(i32, Option<u64>), String> {
    let e = |e: supermachine::Error| e.to_string();
    let mut opts = options(env, "snap-source");
    opts.memory_bytes = 256 << 20;
    let vm = Vm::start(&env.asset("rootfs.erofs"), &opts).map_err(e)?;
    vm.write_file("/tmp/before", b"written before the snapshot")
        .map_err(e)?;
    let mut counter = vm
        .exec([
            "sh",
            "-c",
            "i=0; while true; do echo $i; i=$((i+1)); sleep 0.02; done",
        ])
        .keep()
        .spawn()
        .map_err(e)?;
    let pid = counter.pid();
    let rx = count_lines(counter.take_stdout().ok_or("no stdout")?);
    let mut last = None;
    take_consecutive(&rx, &mut last, 5)?;
    let stats = vm.snapshot(base.join("running")).map_err(e)?;
    println!(
        "  snapshot while running: {:.1?} paused, {} MiB of memory written",
        stats.paused,
        stats.memory_data_bytes >> 20
    );
    take_consecutive(&rx, &mut last, 10)?;
    vm.snapshot_and_stop(base.join("stopped")).map_err(e)?;
    // Everything the counter printed before the pause arrives; nothing after.
    let mut after_stop = 0;
    while let Ok(n) = rx.recv_timeout(Duration::from_secs(2)) {
        ensure(Some(n) == last.map(|l| l + 1), || {
            format!("after {last:?} the counter printed {n}")
        })?;
        last = Some(n);
        after_stop += 1;
    }
    ensure(after_stop < 50, || {
        format!("{after_stop} numbers after the VM stopped")
    })?;
    Ok((pid, last))
}

/// [`snapshot_while_running`]'s snapshots restored: a restore
/// in this process takes the counter over exactly where it stopped, has
/// the file written before, and its own hostname and environment; a
/// pool of that snapshot hands out distinct ready VMs, respects its
/// maximum and refills.
pub fn snapshot_restore_and_pool(env: &Env) -> Check {
    let base = std::env::temp_dir().join(format!("sm-e2e-snapshots-{}", std::process::id()));
    let result = snapshot_restore_and_pool_in(env, &base);
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn snapshot_restore_and_pool_in(env: &Env, base: &std::path::Path) -> Check {
    use supermachine::{Pool, PoolConfig, Snapshot};
    let e = |e: supermachine::Error| e.to_string();
    let (pid, mut last) = snapshot_kept_counter(env, base)?;
    let (running, stopped) = (base.join("running"), base.join("stopped"));
    let mut opts = options(env, "snap-copy");
    opts.memory_bytes = 256 << 20;
    let snapshot = Snapshot::open(&stopped).map_err(e)?;
    let mut copy_opts = opts.clone();
    copy_opts.hostname = "restored-copy".into();
    copy_opts.env = vec![("ROLE".into(), "copy".into())];
    let console = base.join("copy-console.log");
    copy_opts.console_file = Some(console.clone());
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();
    // Long enough that a wall clock not stepped after the restore shows.
    std::thread::sleep(Duration::from_secs(4));
    let began = Instant::now();
    let copy = snapshot
        .start(&copy_opts)
        .map_err(|err| format!("{err}; console: {}", console_text()))?;
    println!("  restored in {:.1?}", began.elapsed());
    let mut attached = copy
        .attach_process(pid)
        .map_err(|err| format!("{err}; console: {}", console_text()))?;
    let rx = count_lines(attached.take_stdout().ok_or("no stdout")?);
    take_consecutive(&rx, &mut last, 10)?;
    let before = copy.read_file("/tmp/before").map_err(e)?;
    ensure(before == b"written before the snapshot", || {
        format!("/tmp/before after the restore: {before:?}")
    })?;
    let guest_time = |vm: &Vm| -> Result<(f64, f64), String> {
        // busybox's date has whole seconds only.
        let out = run(vm, &["date", "+%s"])?;
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let guest: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| format!("date said {out:?}"))?;
        Ok((guest, host))
    };
    let (g1, h1) = guest_time(&copy)?;
    std::thread::sleep(Duration::from_secs(5));
    let (g2, h2) = guest_time(&copy)?;
    println!(
        "  guest clock after the restore: {:+.2} s from the host's, then {:+.2} s; it ran {:.2} s in {:.2} s",
        g1 - h1,
        g2 - h2,
        g2 - g1,
        h2 - h1
    );
    ensure((g1 - h1).abs() <= 2.0 && (g2 - h2).abs() <= 2.0, || {
        format!("the guest's wall clock is off: {:+.2} s", g1 - h1)
    })?;
    let who = run(&copy, &["sh", "-c", "echo $ROLE $(hostname) $HOSTNAME"])?;
    ensure(
        String::from_utf8_lossy(&who.stdout) == "copy restored-copy restored-copy\n",
        || format!("identity after the restore: {who:?}"),
    )?;
    attached.signal(9).map_err(e)?;
    let exit = attached.wait().map_err(e)?;
    ensure(exit.status.signal() == Some(9), || {
        format!("counter exit: {exit:?}")
    })?;
    drop(copy);

    let pool = Pool::new(
        Snapshot::open(&running).map_err(e)?,
        PoolConfig {
            min_ready: 2,
            max_vms: 3,
            vm: opts.clone(),
            ..PoolConfig::default()
        },
    )
    .map_err(e)?;
    ensure(pool.wait_ready(2, Duration::from_secs(120)), || {
        format!("the pool did not fill: {:?}", pool.stats())
    })?;
    let began = Instant::now();
    let a = pool.acquire().map_err(e)?;
    let took = began.elapsed();
    let b = pool.acquire().map_err(e)?;
    let c = pool.acquire().map_err(e)?;
    println!("  pool: acquire of a ready VM took {took:.1?}");
    let sockets = [a.vsock_socket(), b.vsock_socket(), c.vsock_socket()];
    ensure(
        sockets[0] != sockets[1] && sockets[1] != sockets[2] && sockets[0] != sockets[2],
        || format!("the pool handed out one VM twice: {sockets:?}"),
    )?;
    for (i, vm) in [&a, &b, &c].into_iter().enumerate() {
        println!("  pool: exec in VM {i}");
        let out = run(vm, &["cat", "/tmp/before"])?;
        ensure(out.stdout == b"written before the snapshot", || {
            format!("a pooled VM: {out:?}")
        })?;
    }
    ensure(pool.try_acquire().is_none(), || {
        "the pool went past max_vms".to_string()
    })?;
    drop(a);
    println!("  pool: one returned");
    ensure(pool.wait_ready(1, Duration::from_secs(120)), || {
        format!("the pool did not refill: {:?}", pool.stats())
    })?;
    let stats = pool.stats();
    ensure(
        stats.handed_out == 3 && stats.in_use == 2 && stats.failed == 0 && stats.ready == 1,
        || format!("pool stats: {stats:?}"),
    )?;
    Ok(())
}
