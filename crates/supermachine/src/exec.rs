//! Running processes in the guest: [`ExecBuilder`] sets one up, `output()`
//! runs it to the end and collects everything, `spawn()` gives a
//! [`Process`] with live stdin, stdout and stderr handles.
//!
//! One thread per spawned process reads the agent's frames and hands
//! output to the readers through small bounded queues: like a pipe, a
//! reader that stops reading eventually stops the process (the agent
//! stops reading its pipe when vsock credit runs out). Stdin respects the
//! protocol's window, so neither side ever buffers without bound.

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use supermachine_agent_protocol::{
    self as proto, AgentMessage, CHUNK, ExecRequest, HostMessage, Request, STDIN_WINDOW, User,
    WindowSize,
};

use crate::sys::UnixStream;
use crate::vm::{AgentConn, Vm, agent_io, unexpected};
use crate::{Error, Result, io_error};

/// Output chunks queued per stream before the reading thread waits.
const OUTPUT_QUEUE: usize = 16;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    code: Option<i32>,
    signal: Option<i32>,
}

impl ExitStatus {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The exit status, if the process exited.
    pub fn code(&self) -> Option<i32> {
        self.code
    }

    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.signal
    }

    /// The status as a shell reports it: the exit code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("unknown exit"),
        }
    }
}

/// What a finished process left.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (with a terminal: all its output).
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// From the request to the exit, as the host saw it.
    pub duration: Duration,
    /// The timeout expired and its process group was killed.
    pub timed_out: bool,
    /// Peak resident memory of the process and its waited-for
    /// descendants, in bytes.
    pub peak_rss: u64,
}

/// The end of a spawned process (what `wait` returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// How it ended.
    pub status: ExitStatus,
    /// The timeout expired and its process group was killed.
    pub timed_out: bool,
    /// Peak resident memory in bytes.
    pub peak_rss: u64,
    /// From the request to the exit.
    pub duration: Duration,
}

/// Where a process's stdin comes from.
#[derive(Clone, Debug, Default)]
enum StdinSource {
    #[default]
    Null,
    Bytes(Vec<u8>),
    Piped,
}

/// A process to run in the guest.
#[derive(Debug)]
pub struct ExecBuilder<'vm> {
    vm: &'vm Vm,
    request: ExecRequest,
    stdin: StdinSource,
    staged: Vec<(String, Vec<u8>, u32)>,
}

impl<'vm> ExecBuilder<'vm> {
    pub(crate) fn new(vm: &'vm Vm, argv: Vec<String>) -> Self {
        Self {
            vm,
            request: ExecRequest {
                argv,
                env: Vec::new(),
                cwd: None,
                user: None,
                stdin: false,
                tty: None,
                timeout_ms: None,
                keep: false,
            },
            stdin: StdinSource::Null,
            staged: Vec::new(),
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.request.argv.push(arg.into());
        self
    }

    /// Sets an environment variable (the process gets only these, plus
    /// `PATH`, `HOME` and `HOSTNAME` when they are not set).
    pub fn env(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        let key = key.as_ref();
        self.request
            .env
            .retain(|e| e.split_once('=').is_none_or(|(k, _)| k != key));
        self.request.env.push(format!("{key}={}", value.as_ref()));
        self
    }

    /// Sets several environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// The working directory (default `/`).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// Whom to run as, `docker run -u` style, resolved in the guest's
    /// own /etc/passwd and /etc/group: `name`, `uid`, `name:group`,
    /// `uid:gid`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.request.user = Some(User::Spec(user.into()));
        self
    }

    /// Whom to run as, by numeric ids used as given (no lookup in the
    /// guest).
    pub fn user_ids(mut self, uid: u32, gid: u32, groups: Vec<u32>) -> Self {
        self.request.user = Some(User::Ids { uid, gid, groups });
        self
    }

    /// Feeds these bytes to stdin, then closes it.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = StdinSource::Bytes(bytes.into());
        self
    }

    /// Gives the spawned process a stdin to write to
    /// ([`Process::take_stdin`]).
    pub fn pipe_stdin(mut self) -> Self {
        self.stdin = StdinSource::Piped;
        self
    }

    /// Runs the process on a pseudo-terminal of this size; its stdout and
    /// stderr both arrive as stdout, and stdin is piped.
    pub fn tty(mut self, rows: u16, cols: u16) -> Self {
        self.request.tty = Some(WindowSize { rows, cols });
        if matches!(self.stdin, StdinSource::Null) {
            self.stdin = StdinSource::Piped;
        }
        self
    }

    /// Kills the process group after `limit` (the result says
    /// `timed_out`).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.request.timeout_ms = Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Writes a file into the guest (mode 0644) before the process starts.
    pub fn stage_file(mut self, path: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.staged.push((path.into(), contents.into(), 0o644));
        self
    }

    /// Like [`ExecBuilder::stage_file`], with a mode (0o755 for a script).
    pub fn stage_file_mode(
        mut self,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        self.staged.push((path.into(), contents.into(), mode));
        self
    }

    /// Keeps the process across snapshots: a snapshot of the VM parks its
    /// output (nothing of it is lost or in flight in the snapshot), and a
    /// VM restored from that snapshot gets it back with
    /// [`Vm::attach_process`]. Bakes start their workload this way.
    pub fn keep(mut self) -> Self {
        self.request.keep = true;
        self
    }

    /// Runs the process to its end and collects its output.
    pub fn output(self) -> Result<ExecOutput> {
        let mut process = self.spawn()?;
        // Nobody writes to a piped stdin here (a terminal's, say): close
        // it, or a program reading it would wait forever.
        drop(process.stdin.take());
        let stdout = process.stdout.take();
        let stderr = process.stderr.take();
        let collect = |r: Option<OutputReader>| {
            std::thread::Builder::new()
                .name("exec-collect".into())
                .spawn(move || {
                    let mut all = Vec::new();
                    if let Some(mut r) = r {
                        let _ = r.read_to_end(&mut all);
                    }
                    all
                })
        };
        let err_thread = collect(stderr).map_err(io_error("starting a thread"))?;
        let mut out = Vec::new();
        if let Some(mut r) = stdout {
            let _ = r.read_to_end(&mut out);
        }
        let stderr = err_thread.join().unwrap_or_default();
        let info = process.wait()?;
        Ok(ExecOutput {
            status: info.status,
            stdout: out,
            stderr,
            duration: info.duration,
            timed_out: info.timed_out,
            peak_rss: info.peak_rss,
        })
    }

    /// Starts the process and returns its handles.
    pub fn spawn(mut self) -> Result<Process> {
        for (path, contents, mode) in std::mem::take(&mut self.staged) {
            self.vm
                .write_file_from(&path, contents.as_slice(), mode, (0, 0))?;
        }
        let started = Instant::now();
        let keep = self.request.keep;
        self.request.stdin = !matches!(self.stdin, StdinSource::Null);
        let mut conn = self.vm.agent_conn()?;
        conn.send(&HostMessage::Request(Request::Exec(self.request)))?;
        let pid = match conn.recv()? {
            AgentMessage::Started { pid } => pid,
            AgentMessage::Error(e) => {
                self.vm.idle_push(conn.stream);
                return Err(Error::Exec {
                    not_found: e.kind == proto::ErrorKind::NotFound,
                    permission_denied: e.kind == proto::ErrorKind::PermissionDenied,
                    message: e.message,
                });
            }
            other => return Err(unexpected(&other)),
        };
        Process::start(self.vm, conn, pid, started, self.stdin, keep)
    }
}

impl Vm {
    /// Takes over kept process `pid` (started with [`ExecBuilder::keep`]
    /// before the snapshot this VM was restored from): its output from
    /// where the snapshot parked it, its exit, signals. Its stdin stays
    /// /dev/null.
    pub fn attach_process(&self, pid: i32) -> Result<Process> {
        let mut conn = self.agent_conn()?;
        conn.send(&HostMessage::Request(Request::Attach { pid }))?;
        match conn.recv()? {
            AgentMessage::Started { pid: p } if p == pid => {}
            AgentMessage::Error(e) => {
                self.idle_push(conn.stream);
                return Err(Error::Agent(e.message));
            }
            other => return Err(unexpected(&other)),
        }
        Process::start(self, conn, pid, Instant::now(), StdinSource::Null, true)
    }
}

/// The kept processes a VM's host side holds, for snapshots: each must
/// have parked (or ended) before the VM is paused.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeptProcesses(Arc<Mutex<Vec<std::sync::Weak<Control>>>>);

impl KeptProcesses {
    fn add(&self, control: &Arc<Control>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|c| c.strong_count() > 0);
        all.push(Arc::downgrade(control));
    }

    fn live(&self) -> Vec<Arc<Control>> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter_map(std::sync::Weak::upgrade).collect()
    }

    /// Waits until every kept process's session has said `Parked` (or
    /// ended): after `Quiesce`, nothing of theirs is in flight then.
    pub(crate) fn wait_parked(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for control in self.live() {
            let mut s = control.lock();
            while !s.parked && !s.finished {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Agent(
                        "a kept process's output did not settle for the snapshot".into(),
                    ));
                }
                s = control
                    .window
                    .wait_timeout(s, left)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        Ok(())
    }

    /// The pids of the kept processes still running.
    pub(crate) fn pids(&self) -> Vec<i32> {
        self.live()
            .iter()
            .filter(|c| !c.lock().finished)
            .map(|c| c.pid)
            .collect()
    }

    /// The snapshot is over and the VM runs on.
    pub(crate) fn unpark(&self) {
        for control in self.live() {
            control.lock().parked = false;
        }
    }
}

/// The host's writing side of a session, shared by stdin, signals,
/// resizes and the reading thread (which sends `Done`).
struct Control {
    pid: i32,
    state: Mutex<ControlState>,
    window: Condvar,
}

struct ControlState {
    writer: UnixStream,
    /// Stdin bytes sent and not yet acknowledged.
    outstanding: u32,
    /// The process has exited (or the connection failed): nothing more is
    /// sent, and the connection may already be serving another request.
    finished: bool,
    /// The agent parked the session for a snapshot (kept processes).
    parked: bool,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, m: &HostMessage) -> Result<()> {
        let mut s = self.lock();
        if s.finished {
            return Err(Error::ProcessEnded);
        }
        proto::write_frame(&mut s.writer, m).map_err(agent_io)
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.window.notify_all();
    }
}

/// A running guest process.
pub struct Process {
    pid: i32,
    stdin: Option<ProcessStdin>,
    stdout: Option<OutputReader>,
    stderr: Option<OutputReader>,
    control: Arc<Control>,
    reader: Option<JoinHandle<Result<ExitInfo>>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Process {
    fn start(
        vm: &Vm,
        conn: AgentConn,
        pid: i32,
        started: Instant,
        stdin: StdinSource,
        keep: bool,
    ) -> Result<Process> {
        let writer = conn
            .stream
            .try_clone()
            .map_err(io_error("agent connection"))?;
        let control = Arc::new(Control {
            pid,
            state: Mutex::new(ControlState {
                writer,
                outstanding: 0,
                finished: false,
                parked: false,
            }),
            window: Condvar::new(),
        });
        if keep {
            vm.kept_processes().add(&control);
        }
        let (out_tx, out_rx) = mpsc::sync_channel(OUTPUT_QUEUE);
        let (err_tx, err_rx) = mpsc::sync_channel(OUTPUT_QUEUE);
        let idle = vm.idle_handle();
        let reader = {
            let control = control.clone();
            std::thread::Builder::new()
                .name(format!("exec-{pid}"))
                .spawn(move || read_session(conn, control, out_tx, err_tx, started, idle))
                .map_err(io_error("starting a thread"))?
        };
        let stdin_handle = ProcessStdin {
            control: control.clone(),
            closed: false,
        };
        let stdin = match stdin {
            StdinSource::Null => None,
            StdinSource::Piped => Some(stdin_handle),
            StdinSource::Bytes(bytes) => {
                // Fed from a thread: the process may write output while it
                // reads, and that output must keep flowing meanwhile.
                let mut feeder = stdin_handle;
                let _ = std::thread::Builder::new()
                    .name(format!("exec-{pid}-stdin"))
                    .spawn(move || {
                        let _ = feeder.write_all(&bytes);
                        let _ = feeder.close();
                    })
                    .map_err(io_error("starting a thread"))?;
                None
            }
        };
        Ok(Process {
            pid,
            stdin,
            stdout: Some(OutputReader::new(out_rx)),
            stderr: Some(OutputReader::new(err_rx)),
            control,
            reader: Some(reader),
        })
    }

    /// The process id in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its stdin (when it was spawned with `pipe_stdin` or `tty`); closing
    /// or dropping it ends the process's input.
    pub fn take_stdin(&mut self) -> Option<ProcessStdin> {
        self.stdin.take()
    }

    /// Its stdout, read as it comes.
    pub fn take_stdout(&mut self) -> Option<OutputReader> {
        self.stdout.take()
    }

    /// Its stderr, read as it comes.
    pub fn take_stderr(&mut self) -> Option<OutputReader> {
        self.stderr.take()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.controller().signal(signal)
    }

    /// Sends a signal to its whole process group.
    pub fn signal_group(&self, signal: i32) -> Result<()> {
        self.controller().signal_group(signal)
    }

    /// Resizes its terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.controller().resize(rows, cols)
    }

    /// A handle that signals and resizes the process from another thread
    /// while this one waits.
    pub fn controller(&self) -> ProcessController {
        ProcessController(self.control.clone())
    }

    /// True once the process has exited (its exit has arrived).
    pub fn has_exited(&self) -> bool {
        self.control.lock().finished
    }

    /// Waits for the exit. Output handles not taken are discarded; taken
    /// ones keep their data.
    pub fn wait(mut self) -> Result<ExitInfo> {
        self.stdout.take();
        self.stderr.take();
        self.stdin.take();
        match self.reader.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(Error::AgentGone),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.reader.is_some() {
            // An abandoned process is killed, like a dropped child should
            // not outlive its owner's interest in it.
            let _ = self.signal_group(9);
        }
    }
}

/// Signals and resizes a spawned process; clones share it. Once the
/// process has ended, each call fails with [`Error::ProcessEnded`].
#[derive(Clone)]
pub struct ProcessController(Arc<Control>);

impl std::fmt::Debug for ProcessController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessController")
    }
}

impl ProcessController {
    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.0.send(&HostMessage::Signal {
            signal,
            group: false,
        })
    }

    /// Sends a signal to its whole process group.
    pub fn signal_group(&self, signal: i32) -> Result<()> {
        self.0.send(&HostMessage::Signal {
            signal,
            group: true,
        })
    }

    /// Resizes its terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.0.send(&HostMessage::Resize(WindowSize { rows, cols }))
    }
}

/// Reads the agent's frames for one session until the exit.
fn read_session(
    mut conn: AgentConn,
    control: Arc<Control>,
    out: SyncSender<Vec<u8>>,
    err: SyncSender<Vec<u8>>,
    started: Instant,
    idle: crate::vm::IdleHandle,
) -> Result<ExitInfo> {
    let result = loop {
        let message = match conn.recv() {
            Ok(m) => m,
            Err(e) => break Err(e),
        };
        match message {
            // A reader that was dropped just discards.
            AgentMessage::Stdout(b) => drop(out.send(b)),
            AgentMessage::Stderr(b) => drop(err.send(b)),
            AgentMessage::Parked => {
                control.lock().parked = true;
                control.window.notify_all();
            }
            AgentMessage::StdinConsumed(n) => {
                let mut s = control.lock();
                s.outstanding = s.outstanding.saturating_sub(n);
                drop(s);
                control.window.notify_all();
            }
            AgentMessage::Exit(status) => {
                let info = ExitInfo {
                    status: ExitStatus {
                        code: status.code,
                        signal: status.signal,
                    },
                    timed_out: status.timed_out,
                    peak_rss: status.peak_rss_kib.saturating_mul(1024),
                    duration: started.elapsed(),
                };
                let done = {
                    let mut s = control.lock();
                    s.finished = true;
                    proto::write_frame(&mut s.writer, &HostMessage::Done).is_ok()
                };
                control.window.notify_all();
                if done {
                    idle.push(conn.stream);
                }
                return Ok(info);
            }
            other => break Err(unexpected(&other)),
        }
    };
    control.finish();
    result
}

/// A spawned process's stdin.
pub struct ProcessStdin {
    control: Arc<Control>,
    closed: bool,
}

impl std::fmt::Debug for ProcessStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessStdin")
    }
}

impl ProcessStdin {
    /// Ends the process's input (on a terminal: sends end-of-file).
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.control.send(&HostMessage::CloseStdin)
    }
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::ProcessEnded => io::Error::new(io::ErrorKind::BrokenPipe, "the process has ended"),
        other => io::Error::other(other.to_string()),
    }
}

impl Write for ProcessStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed"));
        }
        let n = buf.len().min(CHUNK);
        let mut s = self.control.lock();
        loop {
            if s.finished {
                return Err(to_io(Error::ProcessEnded));
            }
            if s.outstanding as usize + n <= STDIN_WINDOW as usize {
                break;
            }
            s = self
                .control
                .window
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        proto::write_frame(&mut s.writer, &HostMessage::Stdin(buf[..n].to_vec()))
            .map_err(|e| to_io(agent_io(e)))?;
        s.outstanding += n as u32;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ProcessStdin {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A spawned process's stdout or stderr.
pub struct OutputReader {
    queue: Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl std::fmt::Debug for OutputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputReader")
    }
}

impl OutputReader {
    fn new(queue: Receiver<Vec<u8>>) -> Self {
        Self {
            queue,
            current: Vec::new(),
            at: 0,
        }
    }
}

impl Read for OutputReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.queue.recv() {
                Ok(next) => {
                    self.current = next;
                    self.at = 0;
                }
                // The session is over: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
