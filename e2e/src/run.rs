//! Tier 3 of `supermachine run` and the verbs around it, driven through
//! the real CLI as a user types it: the demo image (busybox) and a Debian
//! bookworm image with python3 (glibc), both loaded from OCI layouts into
//! a store of the tests' own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Check, Env, Run, expect};

/// Longest any one CLI command may take (a VM boot under emulation plus
/// its workload).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);

/// The CLI with private cache and runtime directories (so the tests
/// neither see nor touch the user's images and VMs), the guest kernel and
/// agent from the assets, and the assets as working directory.
pub struct Cli {
    bin: PathBuf,
    assets: PathBuf,
    home: PathBuf,
}

/// One set of directories (and the loaded images) for every run test.
static SHARED: OnceLock<Result<Cli, String>> = OnceLock::new();

impl Cli {
    fn get(env: &Env) -> Result<&'static Cli, String> {
        SHARED
            .get_or_init(|| {
                let home = std::env::temp_dir().join(format!("sm-e2e-run-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&home);
                std::fs::create_dir_all(home.join("run"))
                    .map_err(|e| format!("creating {}: {e}", home.display()))?;
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(
                    home.join("run"),
                    std::fs::Permissions::from_mode(0o700),
                );
                let cli = Cli {
                    bin: env.supermachine.clone(),
                    assets: env.assets.clone(),
                    home,
                };
                cli.load("./demo-image")?;
                Ok(cli)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The shared CLI with the Debian image loaded too.
    pub(crate) fn with_debian(env: &Env) -> Result<&'static Cli, String> {
        static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
        let cli = Cli::get(env)?;
        LOADED
            .get_or_init(|| cli.load("./debian-image"))
            .clone()
            .map(|()| cli)
    }

    fn load(&self, layout: &str) -> Result<(), String> {
        let r = self.run(&["load", layout]);
        if r.code == Some(0) {
            Ok(())
        } else {
            Err(format!("loading {layout}:\n  {}", r.describe()))
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(&self.assets)
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join("cache"))
            .env("XDG_RUNTIME_DIR", self.home.join("run"))
            .env("SUPERMACHINE_GUEST_DIR", &self.assets)
            .env_remove("RUST_LOG");
        c
    }

    /// The shared CLI (the demo image loaded).
    pub fn shared(env: &Env) -> Result<&'static Cli, String> {
        Cli::get(env)
    }

    /// Runs `supermachine ARGS` with `SUPERMACHINE_TIMINGS` set.
    pub fn run_timed(&self, args: &[&str]) -> Run {
        self.run_full(args, None, &[("SUPERMACHINE_TIMINGS", "1")])
    }

    /// [`Cli::run`] with the port forwarder's debug log on (a detached
    /// VM's goes to its `vmm.err`).
    fn run_logged(&self, args: &[&str]) -> Run {
        self.run_full(args, None, &[("RUST_LOG", "supermachine::ports=debug")])
    }

    /// Runs `supermachine ARGS` to its end with no stdin.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_full(args, None, &[])
    }

    /// [`Cli::run`] with more environment variables.
    pub(crate) fn run_with_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Run {
        self.run_full(args, None, vars)
    }

    /// Runs `supermachine ARGS`, feeding `input` to its stdin.
    pub fn run_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Run {
        self.run_full(args, input, &[])
    }

    fn run_full(&self, args: &[&str], input: Option<&[u8]>, vars: &[(&str, &str)]) -> Run {
        let started = Instant::now();
        let mut command = self.command(args);
        command
            .envs(vars.iter().copied())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => return failed_to_start(&self.bin, &e, started),
        };
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            let bytes = bytes.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        finish(child, started)
    }

    /// Starts `supermachine ARGS` without waiting.
    pub(crate) fn spawn(&self, args: &[&str]) -> std::io::Result<Child> {
        self.spawn_with(args, &[])
    }

    /// [`Cli::spawn`] with more environment variables.
    pub(crate) fn spawn_with(
        &self,
        args: &[&str],
        vars: &[(&str, &std::path::Path)],
    ) -> std::io::Result<Child> {
        self.command(args)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    }

    /// Runs `test`; when it fails, removes the detached VM `name` it may
    /// have left, so later tests start clean.
    pub(crate) fn cleaning_up(&self, name: &str, test: impl FnOnce() -> Check) -> Check {
        let result = test();
        if result.is_err() {
            let _ = self.run(&["rm", "-f", name]);
        }
        result
    }

    /// Where baked snapshots are kept.
    pub(crate) fn snapshots(&self) -> PathBuf {
        self.home.join("cache/supermachine/oci/snapshots")
    }

    pub(crate) fn runtime(&self) -> PathBuf {
        self.home.join("run/supermachine")
    }

    /// What a run leaves behind that it should not: VM socket directories,
    /// detached VM directories other than `keep`, store temporaries, and
    /// VMM processes.
    pub(crate) fn leftovers(&self, keep: &[&str]) -> Vec<String> {
        let mut found = Vec::new();
        let list = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        // A kept VM's VMM process, and the socket directory it owns.
        let mut kept_pids = Vec::new();
        for pid in list(Path::new("/proc")) {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if cmdline.split(|b| *b == 0).any(|a| a == b"__vmm") {
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if keep.iter().any(|k| text.contains(&format!("/vms/{k}"))) {
                    kept_pids.push(pid);
                } else {
                    found.push(format!("VMM process {pid}: {text}"));
                }
            }
        }
        // A passt outliving its VM. A kept VM's is its VMM's child; the
        // library VMs this runner holds have theirs as its children. One
        // whose VMM just ended may take a moment to see the end of its
        // socket and go.
        let stray = || -> Vec<PasstProcess> {
            passt_processes()
                .into_iter()
                .filter(|p| {
                    !p.zombie
                        && p.parent != std::process::id()
                        && !kept_pids.iter().any(|k| *k == p.parent.to_string())
                })
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut strays = stray();
        while !strays.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            strays = stray();
        }
        for p in strays {
            found.push(format!("passt process {} (parent {})", p.pid, p.parent));
        }
        for name in list(&self.runtime()) {
            let owner = name.strip_prefix("vm-").and_then(|r| r.split('-').next());
            if let Some(pid) = owner
                && !kept_pids.iter().any(|k| k == pid)
            {
                found.push(format!("socket directory {name}"));
            }
        }
        for name in list(&self.runtime().join("vms")) {
            if !keep.contains(&name.as_str()) {
                found.push(format!("VM directory {name}"));
            }
        }
        for name in list(&self.home.join("cache/supermachine/oci/tmp")) {
            found.push(format!("store temporary {name}"));
        }
        for name in list(&self.snapshots()) {
            if name.starts_with('.') {
                found.push(format!("half-made snapshot {name}"));
            }
        }
        found
    }
}

/// A passt process on this machine.
pub(crate) struct PasstProcess {
    pub(crate) pid: u32,
    pub(crate) parent: u32,
    /// Ended, waiting to be reaped.
    pub(crate) zombie: bool,
}

/// Every passt process, from /proc.
pub(crate) fn passt_processes() -> Vec<PasstProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if comm.trim() != "passt" {
                return None;
            }
            // After the command name in parentheses: state, parent.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
            let zombie = fields.next()? == "Z";
            let parent = fields.next()?.parse().ok()?;
            Some(PasstProcess {
                pid,
                parent,
                zombie,
            })
        })
        .collect()
}

fn failed_to_start(bin: &Path, e: &std::io::Error, started: Instant) -> Run {
    Run {
        code: None,
        stdout: String::new(),
        stderr: format!("cannot start {}: {e}", bin.display()),
        elapsed: started.elapsed(),
    }
}

/// Collects a child's output and status, killing it after
/// [`COMMAND_TIMEOUT`].
pub(crate) fn finish(child: Child, started: Instant) -> Run {
    crate::finish_within(child, started, COMMAND_TIMEOUT, |_| "it hung".into())
}

/// The run is a clean one-line failure: non-zero, one line on stderr
/// saying `what`, and nothing left behind.
pub(crate) fn one_line_failure(cli: &Cli, r: &Run, what: &str) -> Check {
    one_line_failure_keeping(cli, r, what, &[])
}

/// [`one_line_failure`] where the detached VMs `keep` may remain.
fn one_line_failure_keeping(cli: &Cli, r: &Run, what: &str, keep: &[&str]) -> Check {
    expect(
        r.code.is_some_and(|c| c != 0),
        "expected a non-zero exit status",
        r,
    )?;
    expect(
        r.stderr.trim().lines().count() == 1 && r.stderr.contains(what),
        &format!("expected one line on stderr mentioning {what:?}"),
        r,
    )?;
    let left = cli.leftovers(keep);
    expect(
        left.is_empty(),
        &format!("expected nothing left behind, found: {left:?}"),
        r,
    )
}

pub(crate) fn ok_with(r: &Run, code: i32, stdout: &str) -> Check {
    expect(
        r.code == Some(code),
        &format!("expected exit status {code}"),
        r,
    )?;
    expect(
        r.stdout.contains(stdout),
        &format!("expected {stdout:?} on stdout"),
        r,
    )
}

/// The non-zero `TcpExt` counters of a /proc/net/netstat text.
fn nonzero_tcp_stats(netstat: &str) -> String {
    let lines: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("TcpExt:"))
        .collect();
    let [names, values, ..] = lines.as_slice() else {
        return String::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(_, v)| *v != "0")
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A loopback port nothing listens on now.
pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// One HTTP/1.0 GET to 127.0.0.1:port; the status line.
pub(crate) fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply.lines().next().unwrap_or("").to_string())
}

pub fn demo_image_runs_by_path(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    let r = cli.run(&["run", "./demo-image"]);
    ok_with(&r, 0, "Hello from a supermachine microVM.")?;
    expect(
        r.stdout.contains("as user root in /home/demo"),
        "expected the image's working directory",
        &r,
    )?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &r)
}

pub fn exit_codes_and_signals_propagate(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    ok_with(&cli.run(&["run", "demo", "sh", "-c", "exit 7"]), 7, "")?;
    ok_with(
        &cli.run(&["run", "demo", "sh", "-c", "echo dying; kill -KILL $$"]),
        137,
        "dying",
    )?;
    let r = cli.run(&["run", "demo", "no-such-program"]);
    expect(
        r.code == Some(127),
        "expected 127 for a missing program",
        &r,
    )?;
    one_line_failure(cli, &r, "no-such-program")
}

pub fn env_workdir_user_and_entrypoint_apply(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    let env_file = cli.home.join("env-file");
    std::fs::write(
        &env_file,
        "# comment\nFROM_FILE=two\n\nGREETING=overridden\n",
    )
    .map_err(|e| e.to_string())?;
    let r = cli.run(&[
        "run",
        "-e",
        "FROM_FLAG=one",
        "--env-file",
        &env_file.display().to_string(),
        "-w",
        "/tmp",
        "-u",
        "demo",
        "--entrypoint",
        "sh",
        "demo",
        "-c",
        "echo \"$FROM_FLAG $FROM_FILE $GREETING $(pwd) $(id -un):$(id -gn) $HOME $PATH\"",
    ]);
    ok_with(
        &r,
        0,
        "one two overridden /tmp demo:demo /home/demo /usr/local/bin:/usr/bin:/bin",
    )
}

pub fn stdin_is_piped_with_i(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    let input: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let r = cli.run_with_input(
        &["run", "-i", "demo", "sh", "-c", "wc -c; echo done"],
        Some(&input),
    );
    ok_with(&r, 0, "1048576\ndone")?;
    // Without -i the workload's stdin is empty.
    let r = cli.run_with_input(&["run", "demo", "wc", "-c"], Some(b"ignored"));
    ok_with(&r, 0, "0")
}

pub fn tty_gives_a_terminal(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    let r = cli.run(&[
        "run",
        "-t",
        "demo",
        "sh",
        "-c",
        "tty; stty size; test -t 0 && test -t 1 && echo both-terminals",
    ]);
    ok_with(&r, 0, "/dev/pts/0")?;
    expect(
        r.stdout.contains("24 80") && r.stdout.contains("both-terminals"),
        "expected a 24x80 terminal on stdin and stdout",
        &r,
    )
}

/// Waits for `line` on the child's stdout; returns the reader.
fn wait_for_line(
    child: &mut Child,
    line: &str,
) -> Result<BufReader<std::process::ChildStdout>, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut text = String::new();
    loop {
        text.clear();
        match reader.read_line(&mut text) {
            Ok(0) | Err(_) => return Err(format!("the workload never printed {line:?}")),
            Ok(_) if text.trim() == line => return Ok(reader),
            Ok(_) => {}
        }
    }
}

pub fn ctrl_c_reaches_the_workload(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    let mut child = cli
        .spawn(&[
            "run",
            "demo",
            "sh",
            "-c",
            "trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 1; done",
        ])
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut reader = wait_for_line(&mut child, "ready")?;
    signal(child.id(), 2)?;
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let r = finish(child, started);
    let r = Run { stdout: rest, ..r };
    ok_with(&r, 5, "got-int")?;

    // A workload that ignores SIGTERM: the VM is stopped after the
    // grace period (137, as SIGKILL).
    let mut child = cli
        .spawn(&[
            "run",
            "--stop-timeout",
            "2",
            "demo",
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        ])
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let _reader = wait_for_line(&mut child, "ready")?;
    signal(child.id(), 15)?;
    let r = finish(child, started);
    expect(
        r.code == Some(137),
        "expected 137 once the grace period ended",
        &r,
    )?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &r)
}

/// The VMM process of the (one) detached VM running, from `ps --json`.
pub(crate) fn vmm_pid(cli: &Cli) -> Result<u32, String> {
    let ps = cli.run(&["ps", "--json"]);
    ps.stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"pid\": "))
        .and_then(|p| p.trim_end_matches(',').parse::<u32>().ok())
        .ok_or_else(|| format!("no pid in ps --json:\n{}", ps.stdout))
}

pub(crate) fn signal(pid: u32, signal: i32) -> Result<(), String> {
    let target = rustix::process::Pid::from_raw(pid as i32).ok_or("pid 0")?;
    let signal = rustix::process::Signal::from_named_raw(signal).ok_or("bad signal")?;
    rustix::process::kill_process(target, signal).map_err(|e| format!("kill {pid}: {e}"))
}

pub fn glibc_image_runs_python(env: &Env) -> Check {
    let cli = Cli::with_debian(env)?;
    let r = cli.run(&[
        "run",
        "debian-python:bookworm",
        "python3",
        "-c",
        "import platform, sys; print('python', sys.version_info[0], platform.libc_ver()[0], open('/etc/debian_version').read().strip()[:2])",
    ]);
    ok_with(&r, 0, "python 3 glibc 12")
}

/// The detached lifecycle on the Debian image: `run -d -p` serving
/// Python's `http.server`, 200 concurrent requests through the published
/// port, `ps`, `exec`, `logs -f`, `stop`, `exec` refused, `rm`.
///
/// The server is `http.server`'s own `test()` (what `python3 -m
/// http.server` runs) with a listen backlog of 256 instead of its 5: with
/// 5, a guest kernel that serves 200 simultaneous connections slowly (a
/// nested guest under TCG takes ~30 s) overflows the accept queue, prunes
/// half-open connections and resets one or two of them (counted in the
/// guest's `SyncookiesFailed` and `ListenOverflows`), as any Linux host
/// would; real servers listen with 128 or more.
pub fn detached_server_lifecycle(env: &Env) -> Check {
    let cli = Cli::with_debian(env)?;
    cli.cleaning_up("web", || server_lifecycle(cli))
}

fn server_lifecycle(cli: &Cli) -> Check {
    let port = free_port()?;
    let publish = format!("127.0.0.1:{port}:8000");
    let r = cli.run_logged(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &publish,
        "debian-python:bookworm",
        "python3",
        "-c",
        "import http.server as s; s.ThreadingHTTPServer.request_queue_size = 256; \
         s.test(HandlerClass=s.SimpleHTTPRequestHandler, port=8000)",
    ]);
    ok_with(&r, 0, "web")?;
    println!("  run -d web: started");
    // The server takes a moment to listen; until then connections close.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match http_get(port, "/") {
            Ok(status) if status.contains(" 200 ") => break,
            _ if Instant::now() > deadline => {
                return Err("the server never answered through the published port".into());
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    println!("  web answers; 200 clients");
    let clients_started = Instant::now();
    let vmm_err = cli.runtime().join("vms/web/vmm.err");
    let err_before = std::fs::metadata(&vmm_err).map_or(0, |m| m.len() as usize);
    let clients: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || http_get(port, &format!("/etc/debian_version?client={i}")))
        })
        .collect();
    let results: Vec<Result<String, String>> = clients
        .into_iter()
        .map(|c| c.join().unwrap_or_else(|_| Err("client panicked".into())))
        .collect();
    let answered = results
        .iter()
        .filter(|r| r.as_deref().is_ok_and(|s| s.contains(" 200 ")))
        .count();
    let first_failure = results
        .iter()
        .find(|r| !r.as_deref().is_ok_and(|s| s.contains(" 200 ")))
        .map(|r| format!("{r:?}"))
        .unwrap_or_default();
    println!(
        "  clients done: {answered} answered in {:.1?}",
        clients_started.elapsed()
    );
    if answered != 200 {
        let stats = cli.run(&["exec", "web", "sh", "-c", "grep TcpExt /proc/net/netstat"]);
        println!("  guest TCP stats: {}", nonzero_tcp_stats(&stats.stdout));
        let host = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        println!("  host TCP stats: {}", nonzero_tcp_stats(&host));
        let logs = cli.run(&["logs", "web"]);
        let unusual: Vec<&str> = logs
            .stderr
            .lines()
            .filter(|l| !l.contains("\"GET /"))
            .take(20)
            .collect();
        println!("  server stderr besides requests: {}", unusual.join(" | "));
        let err = std::fs::read_to_string(&vmm_err).unwrap_or_default();
        let during = err.get(err_before..).unwrap_or("");
        println!(
            "  vmm.err during the clients: {}",
            during.lines().take(20).collect::<Vec<_>>().join(" | ")
        );
    }
    let ps = cli.run(&["ps"]);
    expect(
        answered == 200,
        &format!(
            "expected 200 concurrent requests answered, {answered} were (first failure: {first_failure})"
        ),
        &ps,
    )?;
    expect(
        ps.stdout.contains("web") && ps.stdout.contains("Up "),
        "expected ps to list web as up",
        &ps,
    )?;
    ok_with(
        &cli.run(&[
            "exec",
            "web",
            "sh",
            "-c",
            "echo in $(hostname) as $(id -un); exit 4",
        ]),
        4,
        "as root",
    )?;
    let follower = cli
        .spawn(&["logs", "-f", "web"])
        .map_err(|e| e.to_string())?;
    let follow_started = Instant::now();
    let stop = cli.run(&["stop", "web"]);
    ok_with(&stop, 0, "web")?;
    let logs = finish(follower, follow_started);
    expect(
        logs.code == Some(0) && logs.stderr.contains("GET /etc/debian_version?client=199"),
        "expected logs -f to show the requests (python logs to stderr) and end with the VM",
        &logs,
    )?;
    let ps = cli.run(&["ps", "-a"]);
    expect(
        ps.stdout.contains("Exited (143)"),
        "expected web to show Exited (143) after SIGTERM",
        &ps,
    )?;
    let r = cli.run(&["exec", "web", "true"]);
    expect(
        r.stderr.contains("not running"),
        "expected exec to be refused",
        &r,
    )?;
    expect(
        r.code.is_some_and(|c| c != 0) && r.stderr.trim().lines().count() == 1,
        "expected one line and a non-zero exit",
        &r,
    )?;
    ok_with(&cli.run(&["rm", "web"]), 0, "web")?;
    let ps = cli.run(&["ps", "-a"]);
    expect(!ps.stdout.contains("web"), "expected web gone", &ps)?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &ps)
}

pub fn killed_vmm_shows_exited_and_rm_cleans(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    cli.cleaning_up("victim", || killed_vmm(cli))
}

fn killed_vmm(cli: &Cli) -> Check {
    ok_with(
        &cli.run(&["run", "-d", "--name", "victim", "demo", "sleep", "1000"]),
        0,
        "victim",
    )?;
    let pid = vmm_pid(cli)?;
    signal(pid, 9)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ps = cli.run(&["ps", "-a"]);
    expect(
        ps.stdout.contains("victim") && ps.stdout.contains("Exited (VMM died)"),
        "expected victim listed as exited",
        &ps,
    )?;
    let r = cli.run(&["ps"]);
    expect(
        !r.stdout.contains("victim"),
        "expected plain ps not to list it",
        &r,
    )?;
    ok_with(&cli.run(&["rm", "victim"]), 0, "victim")?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &ps)
}

pub fn bad_input_is_one_line_and_leaves_nothing(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    cli.cleaning_up("taken", || bad_input(cli))
}

fn bad_input(cli: &Cli) -> Check {
    // Unknown image: a loopback registry where nothing listens (no
    // traffic leaves the machine).
    let r = cli.run(&["run", "127.0.0.1:1/no/such:image", "true"]);
    one_line_failure(cli, &r, "127.0.0.1:1")?;
    let unknown_id = format!("sha256:{}", "0".repeat(64));
    let r = cli.run(&["run", &unknown_id]);
    one_line_failure(cli, &r, "no image")?;
    for bad in ["80", "a:80", "8080:0", "1.2.3.4.5:80:80"] {
        let r = cli.run(&["run", "-p", bad, "demo", "true"]);
        one_line_failure(cli, &r, bad)?;
    }
    let taken = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = taken.local_addr().map_err(|e| e.to_string())?.port();
    let r = cli.run(&["run", "-p", &format!("127.0.0.1:{port}:80"), "demo", "true"]);
    one_line_failure(cli, &r, "already in use")?;
    let r = cli.run(&[
        "run",
        "-d",
        "-p",
        &format!("127.0.0.1:{port}:80"),
        "demo",
        "true",
    ]);
    one_line_failure(cli, &r, "already in use")?;
    drop(taken);
    let r = cli.run(&["run", "--env-file", "/no/such/file", "demo", "true"]);
    one_line_failure(cli, &r, "/no/such/file")?;
    let r = cli.run(&["run", "-u", "nobody-here", "demo", "true"]);
    one_line_failure(cli, &r, "nobody-here")?;
    let r = cli.run(&["exec", "no-such-vm", "true"]);
    one_line_failure(cli, &r, "no-such-vm")?;
    ok_with(
        &cli.run(&["run", "-d", "--name", "taken", "demo", "sleep", "1000"]),
        0,
        "taken",
    )?;
    let r = cli.run(&["run", "-d", "--name", "taken", "demo", "true"]);
    expect(
        r.code.is_some_and(|c| c != 0)
            && r.stderr.trim().lines().count() == 1
            && r.stderr.contains("already in use"),
        "expected a taken name refused in one line",
        &r,
    )?;
    let left = cli.leftovers(&["taken"]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &r)?;
    let r = cli.run(&["rm", "taken"]);
    one_line_failure_keeping(cli, &r, "running", &["taken"])?;
    ok_with(&cli.run(&["rm", "-f", "taken"]), 0, "taken")?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &r)
}

/// `-v`: host and guest see each other's writes through one live share;
/// `:ro` refuses guest writes even after a remount attempt (virtiofsd
/// enforces it on the host).
pub fn volumes_share_host_directories(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    let shared = cli.home.join("shared");
    let _ = std::fs::remove_dir_all(&shared);
    std::fs::create_dir_all(&shared).map_err(|e| e.to_string())?;
    std::fs::write(shared.join("host.txt"), "written by the host\n").map_err(|e| e.to_string())?;
    let rw = format!("{}:/data", shared.display());
    let r = cli.run(&[
        "run",
        "-v",
        &rw,
        "demo",
        "sh",
        "-c",
        "cat /data/host.txt && echo written by the guest > /data/guest.txt && mkdir /data/sub && echo ok",
    ]);
    ok_with(&r, 0, "written by the host\nok")?;
    let back = std::fs::read_to_string(shared.join("guest.txt")).unwrap_or_default();
    expect(
        back == "written by the guest\n" && shared.join("sub").is_dir(),
        "expected the guest's file and directory on the host",
        &r,
    )?;
    let ro = format!("{}:/data:ro", shared.display());
    let r = cli.run(&[
        "run",
        "-v",
        &ro,
        "demo",
        "sh",
        "-c",
        "cat /data/guest.txt; echo x > /data/denied.txt && echo WROTE; mount -o remount,rw /data; echo y > /data/denied.txt && echo WROTE-AFTER-REMOUNT; rm /data/host.txt && echo REMOVED; true",
    ]);
    ok_with(&r, 0, "written by the guest")?;
    expect(
        !r.stdout.contains("WROTE") && !r.stdout.contains("REMOVED"),
        "expected every write to the read-only share refused",
        &r,
    )?;
    expect(
        !shared.join("denied.txt").exists() && shared.join("host.txt").exists(),
        "expected the host directory unchanged",
        &r,
    )?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &r)
}

pub fn bad_volumes_are_one_line_and_leave_nothing(env: &Env) -> Check {
    let cli = Cli::get(env)?;
    for bad in ["/tmp", "/tmp:relative", "/tmp:/", ":/data"] {
        let r = cli.run(&["run", "-v", bad, "demo", "true"]);
        one_line_failure(cli, &r, bad)?;
    }
    let r = cli.run(&["run", "-v", "/no/such/dir:/data", "demo", "true"]);
    one_line_failure(cli, &r, "/no/such/dir")?;
    let r = cli.run(&["run", "-d", "-v", "/no/such/dir:/data", "demo", "true"]);
    one_line_failure(cli, &r, "/no/such/dir")
}
