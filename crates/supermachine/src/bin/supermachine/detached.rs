//! Detached VMs (`run -d`) and the verbs around them: `ps`, `logs`,
//! `exec`, `stop`, `rm`.
//!
//! Each detached VM is its own VMM process (this binary, started as
//! `supermachine __vmm DIR`, in its own session) with a directory under
//! the user's runtime directory, `vms/<name>/`:
//!
//! - `state.json`: what `ps` shows (replaced whole on each change);
//! - `run.json`: the `run` arguments and the resolved image ID;
//! - `log`: the workload's output, framed as (stream byte, u32 LE length,
//!   bytes) so `logs` puts stdout and stderr back where they belong;
//! - `console.log`: the guest console; `vmm.err`: the VMM's own stderr;
//! - `control.sock`: `stop SECONDS` / `kill` lines for the VMM.
//!
//! The directory outlives the VMM (an exited VM keeps its name and logs
//! until `rm`). A VMM that died without saying so is recognised by its
//! process being gone (pid and start time recorded), shown as exited,
//! and cleaned by `rm`.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use signal_hook::consts::signal::{SIGINT, SIGTERM};
use supermachine::images::ProcessSpec;
use supermachine::{Error, Image, OutputReader, Result, Vm};

use crate::ExecArgs;
use crate::run::{RunArgs, new_id};
use crate::session;

/// Where a VM stands, as recorded by its VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Starting,
    Running,
    Exited,
}

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub command: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    pub status: Status,
    /// The workload's exit status (128+N for signal N) once exited.
    pub exit_code: Option<i32>,
    pub finished: Option<u64>,
    /// The VMM process and its start time (clock ticks since boot), so a
    /// recycled pid is not mistaken for it.
    pub pid: u32,
    pub pid_start: u64,
    /// The guest's vsock socket (what `exec` connects to).
    pub vsock: Option<PathBuf>,
    pub ports: Vec<String>,
    /// The workload's environment, directory and ids: `exec` starts with
    /// the same, as `docker exec` does.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub remove_on_exit: bool,
}

/// `run.json`: what the VMM process needs to start the VM.
#[derive(Serialize, Deserialize)]
struct RunRequest {
    id: String,
    name: String,
    image_id: String,
    /// The `run` arguments as given (re-parsed by the VMM).
    argv: Vec<String>,
}

/// The directory holding every detached VM's own.
fn vms_dir() -> Result<PathBuf> {
    let dir = supermachine::runtime_dir()?.join("vms");
    fs::create_dir_all(&dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

fn io_err(what: String, source: io::Error) -> Error {
    Error::Io { what, source }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A VM name: Docker's rule (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), at most 64.
fn check_name(name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let ok = name.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOption(format!(
            "invalid VM name {name:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )))
    }
}

impl State {
    fn load(dir: &Path) -> Result<State> {
        let path = dir.join("state.json");
        let bytes =
            fs::read(&path).map_err(|e| io_err(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidOption(format!("{}: {e}", path.display())))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidOption(format!("state: {e}")))?;
        fs::write(&tmp, bytes).map_err(|e| io_err(format!("writing {}", tmp.display()), e))?;
        fs::rename(&tmp, dir.join("state.json"))
            .map_err(|e| io_err(format!("writing {}/state.json", dir.display()), e))
    }

    /// The VMM process is alive (and is the one recorded).
    pub fn vmm_alive(&self) -> bool {
        self.pid != 0 && supermachine_host::process_start(self.pid) == Some(self.pid_start)
    }

    /// Running, as far as anyone can tell: recorded so and its VMM alive.
    pub fn is_running(&self) -> bool {
        self.status != Status::Exited && self.vmm_alive()
    }
}

/// A detached VM found by name, ID or unique ID prefix.
fn find(name: &str) -> Result<(PathBuf, State)> {
    let vms = vms_dir()?;
    let direct = vms.join(name);
    if check_name(name).is_ok() && direct.join("state.json").is_file() {
        return Ok((direct.clone(), State::load(&direct)?));
    }
    let mut matching = Vec::new();
    for (dir, state) in list(&vms)? {
        if state.id.starts_with(name) {
            matching.push((dir, state));
        }
    }
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(Error::InvalidOption(format!("no VM named {name:?}"))),
        _ => Err(Error::InvalidOption(format!("VM ID {name:?} is ambiguous"))),
    }
}

fn list(vms: &Path) -> Result<Vec<(PathBuf, State)>> {
    let mut out = Vec::new();
    let entries = fs::read_dir(vms).map_err(|e| io_err(format!("reading {}", vms.display()), e))?;
    for entry in entries.flatten() {
        let dir = entry.path();
        // A VM being created has no state yet; a half-removed one none
        // any more.
        if let Ok(state) = State::load(&dir) {
            out.push((dir, state));
        }
    }
    out.sort_by_key(|(_, s)| std::cmp::Reverse(s.created));
    Ok(out)
}

/// Removes a directory on drop unless disarmed.
struct Reservation(Option<PathBuf>);

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// `run -d`: resolves the image here (pull progress on this terminal),
/// starts the VMM process, waits until the workload runs, prints the
/// name.
pub fn start(args: &RunArgs, argv: Vec<String>) -> Result<()> {
    if args.interactive {
        return Err(Error::InvalidOption(
            "-d cannot take -i: a detached VM's stdin is not attached (use `exec -i`)".into(),
        ));
    }
    let id = new_id();
    let name = args.name.clone().unwrap_or_else(|| id.clone());
    check_name(&name)?;
    let dir = vms_dir()?.join(&name);
    match fs::DirBuilder::new().create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let owner = State::load(&dir).map(|s| s.id).unwrap_or_default();
            return Err(Error::InvalidOption(format!(
                "the name {name:?} is already in use by VM {owner} (remove it with `supermachine rm {name}`)"
            )));
        }
        Err(e) => return Err(io_err(format!("creating {}", dir.display()), e)),
    }
    let reservation = Reservation(Some(dir.clone()));
    // Everything that can be checked here is, so errors read as they
    // would in the foreground.
    let overrides = args.overrides()?;
    let image = Image::resolve(&args.image, &args.pull_options())?;
    image.command(&overrides)?;
    let request = RunRequest {
        id,
        name: name.clone(),
        image_id: image.id().to_string(),
        argv,
    };
    let bytes = serde_json::to_vec(&request)
        .map_err(|e| Error::InvalidOption(format!("run request: {e}")))?;
    fs::write(dir.join("run.json"), bytes)
        .map_err(|e| io_err(format!("writing {}/run.json", dir.display()), e))?;
    let exe = std::env::current_exe().map_err(|e| io_err("finding this program".into(), e))?;
    let stderr = fs::File::create(dir.join("vmm.err"))
        .map_err(|e| io_err(format!("creating {}/vmm.err", dir.display()), e))?;
    let mut command = Command::new(exe);
    command
        .arg("__vmm")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    // SAFETY: setsid is async-signal-safe and touches no memory; the new
    // session keeps the VMM out of this terminal's job control and signals.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| io_err("starting the VMM process".into(), e))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    match line
        .trim_end()
        .split_once(' ')
        .unwrap_or((line.trim_end(), ""))
    {
        ("READY", _) => {
            std::mem::forget(reservation);
            println!("{name}");
            Ok(())
        }
        ("ERROR", message) => {
            let _ = child.wait();
            Err(Error::InvalidOption(message.to_string()))
        }
        _ => {
            let _ = child.wait();
            let why = fs::read_to_string(dir.join("vmm.err")).unwrap_or_default();
            Err(Error::InvalidOption(format!(
                "the VMM process ended before the VM was ready{}",
                why.lines()
                    .last()
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default()
            )))
        }
    }
}

/// The VMM process of a detached VM (`__vmm DIR`). Reports `READY` or
/// `ERROR <why>` on stdout, then runs the VM until its workload exits.
pub fn serve(dir: &Path) -> u8 {
    let mut report = io::stdout();
    match boot(dir) {
        Ok(running) => {
            let _ = writeln!(report, "READY").and_then(|()| report.flush());
            detach_stdout();
            running.run_to_exit(dir);
            0
        }
        Err(e) => {
            let _ = writeln!(report, "ERROR {e}").and_then(|()| report.flush());
            1
        }
    }
}

/// Points stdout at /dev/null, so the `run -d` process waiting on the
/// other end of the pipe sees it close.
fn detach_stdout() {
    if let Ok(null) = fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
    }
}

struct Running {
    vm: Arc<Vm>,
    state: Arc<Mutex<State>>,
    process: supermachine::Process,
    stop_signal: i32,
    stop_timeout: Duration,
    _forwards: Vec<supermachine::PortForward>,
}

fn boot(dir: &Path) -> Result<Running> {
    let bytes = fs::read(dir.join("run.json"))
        .map_err(|e| io_err(format!("reading {}/run.json", dir.display()), e))?;
    let request: RunRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidOption(format!("run.json: {e}")))?;
    let mut args = RunArgs::parse_from_argv(&request.argv)?;
    args.image = request.image_id.clone();
    let mut prepared = args.prepare(&request.id)?;
    prepared.config.console_file = Some(dir.join("console.log"));
    let (vm, restored) = crate::run::start_vm(&prepared, &args)?;
    let vm = Arc::new(vm);
    let mut forwards = Vec::new();
    for (listener, guest_port) in prepared.listeners {
        forwards.push(vm.forward_port(listener, guest_port)?);
    }
    let spec: &ProcessSpec = &prepared.spec;
    let mut process = match restored {
        Some(pid) => vm.attach_process(pid)?,
        None => {
            let mut exec = vm.exec_spec(spec);
            if args.tty {
                exec = exec.tty(24, 80);
            }
            exec.spawn()?
        }
    };
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .map_err(|e| io_err(format!("creating {}/log", dir.display()), e))?;
    let log = Arc::new(Mutex::new(log));
    for (stream, reader) in [(1u8, process.take_stdout()), (2, process.take_stderr())] {
        if let Some(r) = reader {
            let log = log.clone();
            std::thread::spawn(move || copy_to_log(r, stream, &log));
        }
    }
    let state = State {
        id: request.id,
        name: request.name,
        image: prepared.image.reference().to_string(),
        image_id: request.image_id,
        command: spec.args.clone(),
        created: now(),
        status: Status::Running,
        exit_code: None,
        finished: None,
        pid: std::process::id(),
        pid_start: supermachine_host::process_start(std::process::id()).unwrap_or(0),
        vsock: Some(vm.vsock_socket().to_path_buf()),
        ports: forwards
            .iter()
            .zip(&args.publish)
            .map(|(f, m)| format!("{}->{}/tcp", f.local_addr(), m.guest_port))
            .collect(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        remove_on_exit: args.rm,
    };
    state.save(dir)?;
    Ok(Running {
        vm,
        state: Arc::new(Mutex::new(state)),
        process,
        stop_signal: signal_number(&spec.stop_signal).unwrap_or(SIGTERM),
        stop_timeout: Duration::from_secs(args.stop_timeout),
        _forwards: forwards,
    })
}

fn copy_to_log(mut from: OutputReader, stream: u8, log: &Mutex<fs::File>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut record = Vec::with_capacity(n + 5);
        record.push(stream);
        record.extend_from_slice(&(n as u32).to_le_bytes());
        record.extend_from_slice(&buf[..n]);
        let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
        // A full disk loses log records, never the workload.
        let _ = f.write_all(&record);
    }
}

impl Running {
    fn run_to_exit(self, dir: &Path) {
        let control = dir.join("control.sock");
        let _ = fs::remove_file(&control);
        let stopper = Stopper {
            vm: Arc::downgrade(&self.vm),
            controller: self.process.controller(),
            signal: self.stop_signal,
        };
        if let Ok(listener) = UnixListener::bind(&control) {
            let stopper = stopper.clone();
            std::thread::spawn(move || serve_control(&listener, &stopper));
        }
        // Signals to the VMM itself (a shutdown of the host, say) stop
        // the VM as `stop` would.
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
            let stopper = stopper.clone();
            let timeout = self.stop_timeout;
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    stopper.stop(timeout);
                }
            });
        }
        let code = match self.process.wait() {
            Ok(info) => info.status.shell_code(),
            Err(_) => 128 + 9,
        };
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.status = Status::Exited;
            state.exit_code = Some(code);
            state.finished = Some(now());
            state.vsock = None;
            let _ = state.save(dir);
        }
        let _ = fs::remove_file(&control);
        drop(self._forwards);
        if let Ok(vm) = Arc::try_unwrap(self.vm) {
            let _ = vm.kill();
        }
        let remove = self.state.lock().map(|s| s.remove_on_exit).unwrap_or(false);
        if remove {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Asks the workload to stop, and ends the VM if it has not after the
/// timeout.
#[derive(Clone)]
struct Stopper {
    vm: std::sync::Weak<Vm>,
    controller: supermachine::ProcessController,
    signal: i32,
}

impl Stopper {
    fn stop(&self, timeout: Duration) {
        let _ = self.controller.signal(self.signal);
        let vm = self.vm.clone();
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if let Some(vm) = vm.upgrade() {
                vm.force_stop();
            }
        });
    }

    fn kill(&self) {
        if let Some(vm) = self.vm.upgrade() {
            vm.force_stop();
        }
    }
}

fn serve_control(listener: &UnixListener, stopper: &Stopper) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new(&mut conn)
            .take(64)
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        let mut words = line.split_whitespace();
        let answer = match (words.next(), words.next().map(str::parse::<u64>)) {
            (Some("stop"), Some(Ok(secs))) => {
                stopper.stop(Duration::from_secs(secs));
                "ok"
            }
            (Some("kill"), None) => {
                stopper.kill();
                "ok"
            }
            _ => "error: expected `stop SECONDS` or `kill`",
        };
        let _ = writeln!(conn, "{answer}");
    }
}

/// A signal by name (`SIGTERM`, `TERM`) or number.
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let bare = name.trim_start_matches("SIG");
    const NAMES: [(&str, i32); 15] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CHLD", 17),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("WINCH", 28),
        ("PWR", 30),
    ];
    NAMES.iter().find(|(n, _)| *n == bare).map(|(_, s)| *s)
}

/// `ps [-a] [--json]`.
pub fn ps(all: bool, json: bool) -> Result<()> {
    let rows: Vec<(PathBuf, State)> = list(&vms_dir()?)?
        .into_iter()
        .filter(|(_, s)| all || s.is_running())
        .collect();
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(_, s)| {
                serde_json::json!({
                    "name": s.name, "id": s.id, "image": s.image, "image_id": s.image_id,
                    "command": s.command, "created": s.created,
                    "state": if s.is_running() { "running" } else { "exited" },
                    "exit_code": exit_code(s), "finished": s.finished,
                    "ports": s.ports, "pid": s.pid,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into())
        );
        return Ok(());
    }
    let now = now();
    let mut table = vec![
        [
            "NAME", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS",
        ]
        .map(String::from),
    ];
    for (_, s) in &rows {
        let mut command = s.command.join(" ");
        if command.chars().count() > 24 {
            command = command.chars().take(23).collect::<String>() + "…";
        }
        let status = if s.is_running() {
            format!(
                "Up {}",
                crate::human_duration(now.saturating_sub(s.created))
            )
        } else {
            let when = s.finished.map_or_else(String::new, |f| {
                format!(" {} ago", crate::human_duration(now.saturating_sub(f)))
            });
            match exit_code(s) {
                Some(code) => format!("Exited ({code}){when}"),
                None => "Exited (VMM died)".into(),
            }
        };
        table.push([
            s.name.clone(),
            s.id.clone(),
            s.image.clone(),
            format!("\"{command}\""),
            format!(
                "{} ago",
                crate::human_duration(now.saturating_sub(s.created))
            ),
            status,
            s.ports.join(", "),
        ]);
    }
    crate::print_table(&table);
    Ok(())
}

/// The exit status, when one was recorded.
fn exit_code(s: &State) -> Option<i32> {
    if s.is_running() { None } else { s.exit_code }
}

/// `logs [-f] NAME`.
pub fn logs(name: &str, follow: bool) -> Result<()> {
    let (dir, _) = find(name)?;
    let path = dir.join("log");
    let mut file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", path.display()), e)),
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            pending = write_records(pending);
            continue;
        }
        if !follow {
            return Ok(());
        }
        // At the end: stop once the VM has exited and everything it wrote
        // has been read.
        let running = State::load(&dir).is_ok_and(|s| s.is_running());
        if !running {
            let n = file.read(&mut buf).unwrap_or(0);
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
            pending = write_records(pending);
            continue;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes every whole record in `bytes` to stdout or stderr; returns the
/// incomplete rest.
fn write_records(bytes: Vec<u8>) -> Vec<u8> {
    let mut at = 0;
    while bytes.len() - at >= 5 {
        let len = u32::from_le_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]])
            as usize;
        if bytes.len() - at - 5 < len {
            break;
        }
        let data = &bytes[at + 5..at + 5 + len];
        let _ = if bytes[at] == 2 {
            let mut e = io::stderr().lock();
            e.write_all(data).and_then(|()| e.flush())
        } else {
            let mut o = io::stdout().lock();
            o.write_all(data).and_then(|()| o.flush())
        };
        at += 5 + len;
    }
    bytes[at..].to_vec()
}

/// `exec NAME CMD...`: returns the process's exit status.
pub fn exec(args: &ExecArgs) -> Result<u8> {
    let (_, state) = find(&args.name)?;
    let socket = match &state.vsock {
        Some(s) if state.is_running() => s.clone(),
        _ => {
            return Err(Error::InvalidOption(format!(
                "VM {} is not running",
                state.name
            )));
        }
    };
    let vm = Vm::attach(&socket).map_err(|e| match e {
        Error::VmEnded => Error::InvalidOption(format!("VM {} is not running", state.name)),
        other => other,
    })?;
    let mut builder = vm
        .exec(args.command.iter().cloned())
        .envs(state.env.iter().map(|(k, v)| (k, v)))
        .cwd(args.workdir.clone().unwrap_or_else(|| state.cwd.clone()));
    for item in &args.env {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        builder = builder.env(k, v);
    }
    builder = match &args.user {
        Some(u) => builder.user(u.clone()),
        None => builder.user_ids(state.uid, state.gid, state.groups.clone()),
    };
    session::run(builder, args.interactive, args.tty, || {})
}

/// `stop [-t SECONDS] NAME...`: asks each VM's workload to stop, ending
/// the VM after the timeout; returns when its VMM has exited.
pub fn stop(names: &[String], timeout: Option<u64>) -> Result<()> {
    for name in names {
        let (dir, state) = find(name)?;
        if state.is_running() {
            let secs = timeout.unwrap_or(10);
            let asked = UnixStream::connect(dir.join("control.sock")).and_then(|mut c| {
                writeln!(c, "stop {secs}")?;
                let mut answer = String::new();
                BufReader::new(c).read_line(&mut answer)?;
                Ok(answer)
            });
            if asked.is_err() {
                kill_vmm(&state);
            }
            let deadline = Instant::now() + Duration::from_secs(secs + 15);
            while state.vmm_alive() {
                if Instant::now() > deadline {
                    kill_vmm(&state);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        println!("{}", state.name);
    }
    Ok(())
}

fn kill_vmm(state: &State) {
    if state.vmm_alive()
        && let Some(pid) = rustix::process::Pid::from_raw(state.pid as i32)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// `rm [-f] NAME...`.
pub fn rm(names: &[String], force: bool) -> Result<()> {
    for name in names {
        let (dir, state) = find(name)?;
        if state.is_running() {
            if !force {
                return Err(Error::InvalidOption(format!(
                    "VM {} is running: stop it first, or use rm -f",
                    state.name
                )));
            }
            kill_vmm(&state);
            let deadline = Instant::now() + Duration::from_secs(10);
            while state.vmm_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A VMM that was killed left its socket directory behind.
        if let Some(sockets) = state.vsock.as_ref().and_then(|s| s.parent())
            && !state.vmm_alive()
            && sockets.starts_with(supermachine::runtime_dir()?)
        {
            let _ = fs::remove_dir_all(sockets);
        }
        fs::remove_dir_all(&dir).map_err(|e| io_err(format!("removing {}", dir.display()), e))?;
        println!("{}", state.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rule() {
        for ok in ["web", "a", "web-1.b_c", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-web", "we b", "a/b", "..", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("INT"), Some(2));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("0"), None);
    }

    #[test]
    fn log_records_split_at_any_boundary() {
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        bytes.push(2);
        bytes.extend_from_slice(&2u32.to_le_bytes());
        // Cut inside the second record: only the first is written.
        let rest = write_records(bytes.clone());
        assert_eq!(rest, bytes[8..]);
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(supermachine_host::process_start(std::process::id()).is_some());
    }
}
