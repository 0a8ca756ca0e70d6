//! `Exec`: one process per request, its output streamed back as it comes.
//!
//! A session has these threads: the connection's own thread reads the
//! host's frames (stdin, close, resize, signal, done); one output thread
//! polls the process's stdout and stderr pipes (or its terminal), writes
//! frames until both reach end of file, then waits for the exit and sends
//! `Exit`, killing the process group if the timeout expires first; a
//! feeder, only when there is stdin, writes it to the process. Every frame goes through one lock, so frames never interleave,
//! and nothing is buffered beyond one chunk per stream: a host that stops
//! reading stops the output thread (vsock credit), which stops the
//! process when its pipe fills. Stdin is bounded by the protocol's window.
//!
//! Each process leads its own session and process group, so a timeout or
//! a lost host connection kills everything it started.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use supermachine_agent_protocol::{
    self as proto, AgentError, AgentMessage, CHUNK, ErrorKind, ExecRequest, ExitStatus,
    HostMessage, STDIN_WINDOW, WindowSize,
};

use crate::reaper::Reaped;
use crate::{Agent, Conn, os_error, user};

/// The `PATH` a process gets when its environment has none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Stack size of a session's helper threads.
const THREAD_STACK: usize = 128 << 10;

/// The session's side of the connection for writing, shared by every
/// thread that sends frames.
struct Outbox {
    conn: Box<dyn Write + Send>,
    /// `Exit` has been sent: nothing more may follow (the connection may
    /// already be serving the next request).
    closed: bool,
    /// The exit as sent, for an attach that must send it again.
    exit: Option<ExitStatus>,
    /// Frames are encoded here, so that sending allocates nothing.
    scratch: Vec<u8>,
    /// Kept sessions: output is held for a snapshot.
    parked: bool,
    /// Kept sessions: the connection is gone; output waits for an attach.
    lost: bool,
    /// Which connection `conn` is; each attach makes a new one, so that
    /// the reader of an earlier one cannot mark the current one lost.
    generation: u64,
}

/// The outbox and what waits on it.
struct SharedOutbox {
    state: Mutex<Outbox>,
    /// Signalled when a kept session is resumed or attached.
    changed: Condvar,
    /// The session survives its connection (`ExecRequest::keep`).
    keep: bool,
}

impl SharedOutbox {
    fn new(conn: Box<dyn Write + Send>, keep: bool) -> Self {
        Self {
            state: Mutex::new(Outbox {
                conn,
                closed: false,
                exit: None,
                scratch: Vec::new(),
                parked: false,
                lost: false,
                generation: 0,
            }),
            changed: Condvar::new(),
            keep,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends one frame. A kept session waits while it is parked or has no
    /// connection, and sends the whole frame again on the next one when a
    /// write fails; any other fails.
    fn send(&self, message: &AgentMessage) -> io::Result<()> {
        let mut o = self.lock();
        loop {
            if o.closed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "session over"));
            }
            if self.keep && (o.parked || o.lost) {
                o = self.changed.wait(o).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let frame = proto::encode_frame_into(message, std::mem::take(&mut o.scratch))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let written = o.conn.write_all(&frame);
            o.scratch = frame;
            match written {
                Ok(()) => {
                    if let AgentMessage::Exit(status) = message {
                        o.closed = true;
                        o.exit = Some(*status);
                    }
                    return Ok(());
                }
                Err(_) if self.keep => o.lost = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `Parked` and holds all further output (a snapshot follows).
    fn park(&self) {
        let mut o = self.lock();
        if !o.closed && !o.lost && proto::write_frame(&mut o.conn, &AgentMessage::Parked).is_err() {
            o.lost = true;
        }
        o.parked = true;
    }

    fn resume(&self) {
        self.lock().parked = false;
        self.changed.notify_all();
    }

    /// The reader of connection `generation` lost it. The connection is
    /// let go at once: a socket kept open here would stay in the guest's
    /// table of connections, where a new connection from the same host
    /// port (a restored VMM's) would meet it instead of the listener.
    fn lose(&self, generation: u64) {
        let mut o = self.lock();
        if o.generation == generation {
            o.lost = true;
            o.conn = Box::new(io::sink());
        }
    }

    /// Moves the session onto `conn`: sends `Started` (and the exit again
    /// if it was sent before) and lets held output go on there. Returns
    /// the new connection's generation.
    fn take_over(&self, pid: i32, mut conn: Box<dyn Write + Send>) -> io::Result<u64> {
        let mut o = self.lock();
        let mut frames = vec![AgentMessage::Started { pid }];
        frames.extend(o.exit.map(AgentMessage::Exit));
        for frame in &frames {
            proto::write_frame(&mut conn, frame).map_err(|e| io::Error::other(e.to_string()))?;
        }
        o.conn = conn;
        o.lost = false;
        o.parked = false;
        o.generation += 1;
        let generation = o.generation;
        drop(o);
        self.changed.notify_all();
        Ok(generation)
    }
}

/// One process's session: what its connection's reader needs, kept in the
/// agent's table while the process outlives a lost connection.
pub(crate) struct Session {
    pid: i32,
    outbox: Arc<SharedOutbox>,
    /// Stdin pieces for the feeder thread (`None` closes).
    feeder: Option<mpsc::Sender<Option<Vec<u8>>>>,
    /// Stdin bytes sent to the feeder and not yet written.
    buffered: Arc<AtomicU32>,
    /// The terminal's master side, for resizes.
    tty: Option<File>,
    output_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Parks the session for a snapshot.
    pub(crate) fn park(&self) {
        self.outbox.park();
    }

    /// Lets a parked session go on.
    pub(crate) fn resume(&self) {
        self.outbox.resume();
    }
}

/// How a connection's part of a session ended.
enum ReaderEnd {
    /// The host acknowledged the exit: the connection is free again.
    Done,
    /// The connection was lost (or broke the protocol).
    Lost,
}

/// The bytes of a data message, to be filled again (so that a stream of
/// chunks reuses one allocation, which matters to a guest where every
/// fresh page is a fault).
pub(crate) fn into_data(message: AgentMessage) -> Vec<u8> {
    match message {
        AgentMessage::Stdout(v) | AgentMessage::Stderr(v) | AgentMessage::FileChunk(v) => v,
        _ => Vec::with_capacity(CHUNK),
    }
}

/// Sends `signal` to `pid`, or to its process group.
pub fn send_signal(pid: i32, signal: i32, group: bool) -> io::Result<()> {
    if pid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        ));
    }
    let target = if group { -pid } else { pid };
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(target, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new pseudo-terminal pair: (master, slave).
fn open_pty(size: WindowSize) -> io::Result<(File, File)> {
    // std opens with O_CLOEXEC: no other child inherits the master.
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?;
    let mut unlock: libc::c_int = 0;
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCSPTLCK reads an int and TIOCGPTN writes an unsigned int,
    // both through valid pointers, on a ptmx descriptor.
    unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK as _, &mut unlock) < 0
            || libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN as _, &mut number) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    set_window_size(&master, size)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(format!("/dev/pts/{number}"))?;
    Ok((master, slave))
}

fn set_window_size(tty: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize through a valid pointer.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ as _, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks one `KEY=VALUE` environment entry; returns its parts.
pub(crate) fn check_env_entry(entry: &str) -> Result<(&str, &str), AgentError> {
    let Some((k, v)) = entry.split_once('=').filter(|(k, _)| !k.is_empty()) else {
        return Err(AgentError {
            kind: ErrorKind::InvalidRequest,
            message: format!("environment entry {entry:?} is not KEY=VALUE"),
        });
    };
    if k.contains('\0') || v.contains('\0') {
        return Err(AgentError {
            kind: ErrorKind::InvalidRequest,
            message: format!("environment entry {k:?} contains a NUL byte"),
        });
    }
    Ok((k, v))
}

/// The environment a process gets: the agent's base entries (from a
/// restore) overridden by the request's, plus `PATH`, `HOME`, `HOSTNAME`
/// and (on a terminal) `TERM` where it has none.
fn environment(
    req: &ExecRequest,
    base: &[String],
    home: &str,
    hostname: &str,
) -> Result<Vec<(String, String)>, AgentError> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(base.len() + req.env.len() + 4);
    for entry in base.iter().chain(&req.env) {
        let (k, v) = check_env_entry(entry)?;
        env.retain(|(existing, _)| existing != k);
        env.push((k.to_string(), v.to_string()));
    }
    let mut default = |k: &str, v: &str| {
        if !env.iter().any(|(e, _)| e == k) {
            env.push((k.to_string(), v.to_string()));
        }
    };
    default("PATH", DEFAULT_PATH);
    default("HOSTNAME", hostname);
    default("HOME", home);
    if req.tty.is_some() {
        default("TERM", "xterm");
    }
    Ok(env)
}

/// The process's stdio as the session sees it.
struct Streams {
    stdin: Option<File>,
    stdout: File,
    stderr: Option<File>,
    /// The terminal's master side, for resizes.
    tty: Option<File>,
}

/// Starts the process and registers it; answers errors itself.
fn start(
    agent: &Agent,
    req: &ExecRequest,
) -> Result<(i32, Streams, mpsc::Receiver<Reaped>), AgentError> {
    let invalid = |message: String| AgentError {
        kind: ErrorKind::InvalidRequest,
        message,
    };
    let program = req
        .argv
        .first()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| invalid("exec needs a program (argv is empty)".into()))?;
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("an argument contains a NUL byte".into()));
    }
    let identity = user::resolve(&agent.root, req.user.as_ref()).map_err(|e| AgentError {
        kind: ErrorKind::NotFound,
        message: e.0,
    })?;
    let env = environment(req, &agent.base_env(), &identity.home, &agent.hostname())?;
    let cwd = req.cwd.as_deref().unwrap_or("/");
    if !Path::new(cwd).is_dir() {
        return Err(AgentError {
            kind: ErrorKind::NotFound,
            message: format!("working directory {cwd}: no such directory"),
        });
    }

    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd);
    let (streams, tty) = match req.tty {
        Some(size) => {
            let (master, slave) = open_pty(size).map_err(|e| os_error("opening a terminal", &e))?;
            let dup = |f: &File| {
                f.try_clone()
                    .map_err(|e| os_error("opening a terminal", &e))
            };
            cmd.stdin(dup(&slave)?).stdout(dup(&slave)?).stderr(slave);
            let streams = Streams {
                stdin: Some(dup(&master)?),
                stdout: dup(&master)?,
                stderr: None,
                tty: Some(master),
            };
            (Some(streams), true)
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            (None, false)
        }
    };
    let groups: Vec<libc::gid_t> = identity.groups.clone();
    let (uid, gid) = (identity.uid, identity.gid);
    // SAFETY: the closure runs in the child between fork and exec and
    // only makes async-signal-safe system calls on data prepared before
    // the fork (`groups` is moved in, not allocated there).
    unsafe {
        cmd.pre_exec(move || {
            // PID 1 blocks the signals it forwards; a process starts with
            // none blocked and default dispositions.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let (exit_tx, exit_rx) = mpsc::channel();
    let guard = agent.reaper.lock_for_spawn();
    let mut child = cmd.spawn().map_err(|e| spawn_error(program, &e))?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    guard.register(pid, exit_tx);
    // The terminal's slave copies in `cmd` must close, or the master never
    // sees the end of the session.
    drop(cmd);
    let streams = match streams {
        Some(s) => s,
        None => {
            let pipe = |p: Option<OwnedFd>| p.map(File::from);
            Streams {
                stdin: pipe(child.stdin.take().map(OwnedFd::from)),
                stdout: pipe(child.stdout.take().map(OwnedFd::from))
                    .ok_or_else(|| invalid("no stdout pipe".into()))?,
                stderr: pipe(child.stderr.take().map(OwnedFd::from)),
                tty: None,
            }
        }
    };
    // The reaper, not `child`, collects the exit.
    drop(child);
    Ok((pid, streams, exit_rx))
}

fn spawn_error(program: &str, e: &io::Error) -> AgentError {
    match e.kind() {
        io::ErrorKind::NotFound => AgentError {
            kind: ErrorKind::NotFound,
            message: format!("exec: \"{program}\": executable file not found in $PATH"),
        },
        io::ErrorKind::PermissionDenied => AgentError {
            kind: ErrorKind::PermissionDenied,
            message: format!("exec: \"{program}\": permission denied"),
        },
        _ => os_error(&format!("exec: \"{program}\""), e),
    }
}

/// Runs an `Exec` request to its end. Gives the connection back for the
/// next request once the host has acknowledged the exit; `None` when the
/// connection is lost or out of step. A kept process (`keep`) then lives
/// on in the agent's table until a new connection attaches to it.
pub fn run<S: Conn>(agent: &Agent, req: ExecRequest, mut conn: S) -> Option<S> {
    let (pid, streams, exit_rx) = match start(agent, &req) {
        Ok(x) => x,
        Err(e) => {
            proto::write_frame(&mut conn, &AgentMessage::Error(e)).ok()?;
            return Some(conn);
        }
    };
    let writer = match conn.duplicate() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("exec: duplicating the connection: {e}");
            let _ = send_signal(pid, libc::SIGKILL, true);
            return None;
        }
    };
    let outbox = Arc::new(SharedOutbox::new(Box::new(writer), req.keep));
    let tty_mode = streams.tty.is_some();
    let buffered = Arc::new(AtomicU32::new(0));
    let feeder = streams
        .stdin
        .map(|stdin| feed(stdin, tty_mode, outbox.clone(), buffered.clone()));
    let session = Arc::new(Session {
        pid,
        outbox: outbox.clone(),
        feeder,
        buffered,
        tty: streams.tty,
        output_thread: Mutex::new(None),
    });
    {
        // In the table before the host learns the pid, so that a `Quiesce`
        // it sends the moment it has `Started` finds the session; under the
        // outbox lock, so that such a `Parked` comes after `Started`.
        let mut o = outbox.lock();
        if req.keep {
            agent.keep_session(session.clone());
        }
        // Not `send`: a kept session whose host never learnt the pid could
        // not be attached to, so a failure here ends it like any other.
        if proto::write_frame(&mut o.conn, &AgentMessage::Started { pid }).is_err() {
            drop(o);
            agent.drop_session(pid);
            let _ = send_signal(pid, libc::SIGKILL, true);
            return None;
        }
    }
    let mut outputs = vec![Output::new(streams.stdout, tty_mode, AgentMessage::Stdout)];
    if let Some(stderr) = streams.stderr {
        outputs.push(Output::new(stderr, tty_mode, AgentMessage::Stderr));
    }
    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let output_thread = spawn_thread("exec-output", move || {
        let timed_out = forward_output(pid, outputs, deadline, &outbox);
        finish(pid, exit_rx, deadline, timed_out, &outbox);
    });
    *session
        .output_thread
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = output_thread.ok();
    serve_session(agent, &session, conn, 0)
}

/// `Attach`: moves the kept session of `pid` onto this connection.
pub fn attach<S: Conn>(agent: &Agent, pid: i32, mut conn: S) -> Option<S> {
    let Some(session) = agent.kept_session(pid) else {
        let error = AgentError {
            kind: ErrorKind::NotFound,
            message: format!("no kept process {pid} to attach to"),
        };
        proto::write_frame(&mut conn, &AgentMessage::Error(error)).ok()?;
        return Some(conn);
    };
    let generation = conn
        .duplicate()
        .and_then(|writer| session.outbox.take_over(pid, Box::new(writer)))
        .inspect_err(|e| log::debug!("attach {pid}: {e}"))
        .ok()?;
    serve_session(agent, &session, conn, generation)
}

/// Reads the host's frames for `session` on `conn` (its connection
/// number `generation`) until the exit is acknowledged or the connection
/// ends; a kept session then waits for the next attach, any other is
/// killed.
fn serve_session<S: Conn>(
    agent: &Agent,
    session: &Session,
    mut conn: S,
    generation: u64,
) -> Option<S> {
    let pid = session.pid;
    match read_host_frames(session, &mut conn) {
        ReaderEnd::Done => {
            agent.drop_session(pid);
            let thread = session
                .output_thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(t) = thread {
                let _ = t.join();
            }
            Some(conn)
        }
        ReaderEnd::Lost if session.outbox.keep => {
            session.outbox.lose(generation);
            None
        }
        ReaderEnd::Lost => {
            // The host is gone: nothing may outlive its session.
            let _ = send_signal(pid, libc::SIGKILL, true);
            let _ = conn.shutdown_write();
            None
        }
    }
}

fn read_host_frames<S: Conn>(session: &Session, conn: &mut S) -> ReaderEnd {
    let pid = session.pid;
    let mut payload = Vec::new();
    loop {
        let read = proto::read_payload_into(conn, &mut payload).and_then(|more| {
            more.then(|| proto::decode::<HostMessage>(&payload))
                .transpose()
        });
        let message = match read {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return ReaderEnd::Lost,
        };
        match message {
            HostMessage::Stdin(bytes) => {
                let Some(tx) = &session.feeder else {
                    continue;
                };
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                let before = session.buffered.fetch_add(len, Ordering::SeqCst);
                if before.saturating_add(len) > STDIN_WINDOW {
                    log::warn!("exec {pid}: the host overran the stdin window");
                    let _ = send_signal(pid, libc::SIGKILL, true);
                    return ReaderEnd::Lost;
                }
                let _ = tx.send(Some(bytes));
            }
            HostMessage::CloseStdin => {
                if let Some(tx) = &session.feeder {
                    let _ = tx.send(None);
                }
            }
            HostMessage::Resize(size) => {
                if let Some(tty) = &session.tty
                    && let Err(e) = set_window_size(tty, size)
                {
                    log::debug!("exec {pid}: resize: {e}");
                }
            }
            HostMessage::Signal { signal, group } => {
                if let Err(e) = send_signal(pid, signal, group) {
                    log::debug!("exec {pid}: signal {signal}: {e}");
                }
            }
            HostMessage::Done if session.outbox.lock().closed => return ReaderEnd::Done,
            other => {
                log::warn!("exec {pid}: unexpected {} during a session", other.name());
            }
        }
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(f)
        .inspect_err(|e| log::error!("starting a {name} thread: {e}"))
}

/// Pipe capacity for a process's stdout and stderr: enough that a
/// program writing in small pieces runs for a while before it blocks,
/// and its output goes in full chunks instead of one frame per write.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Prepares a pipe's read end for [`forward_output`]: larger, and
/// non-blocking so that one wakeup can gather everything written so far
/// (true when it is). Only pipes: a terminal master's file description
/// is shared with the stdin feeder, whose writes must block.
fn prepare_pipe(pipe: &File) -> bool {
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; a failure only loses the
    // optimisation (the stream is then sent as read).
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    }
}

/// One of the process's output streams.
struct Output {
    file: File,
    frame: fn(Vec<u8>) -> AgentMessage,
    /// Non-blocking: read until it would block, then send.
    gather: bool,
    open: bool,
}

impl Output {
    /// A pipe (made non-blocking here) or, with `tty`, a terminal master.
    fn new(file: File, tty: bool, frame: fn(Vec<u8>) -> AgentMessage) -> Self {
        let gather = !tty && prepare_pipe(&file);
        Self {
            file,
            frame,
            gather,
            open: true,
        }
    }
}

/// Forwards the process's output streams until both reach end of file,
/// killing the process group when the timeout expires first. Pipes have
/// everything already written sent as one chunk per frame; a terminal is
/// sent as read. One thread does it all: under emulation, each thread a process
/// needs is a noticeable part of a short exec. Returns whether it killed
/// for the timeout.
fn forward_output(
    pid: i32,
    mut outputs: Vec<Output>,
    deadline: Option<Instant>,
    outbox: &SharedOutbox,
) -> bool {
    let mut timed_out = false;
    let mut data = Vec::with_capacity(CHUNK);
    while outputs.iter().any(|o| o.open) {
        let mut fds: Vec<libc::pollfd> = outputs
            .iter()
            .filter(|o| o.open)
            .map(|o| libc::pollfd {
                fd: o.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait_ms = match deadline {
            Some(d) if !timed_out => {
                let left = d.saturating_duration_since(Instant::now());
                libc::c_int::try_from(left.as_millis().saturating_add(1))
                    .unwrap_or(libc::c_int::MAX)
            }
            _ => -1,
        };
        // SAFETY: `fds` is a valid array of pollfds for descriptors the
        // outputs keep open; its length is passed with it.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if deadline.is_some_and(|d| Instant::now() >= d) && !timed_out {
            timed_out = true;
            let _ = send_signal(pid, libc::SIGKILL, true);
        }
        if ready <= 0 {
            continue;
        }
        let mut readable = fds.iter().map(|p| p.revents != 0);
        for o in outputs.iter_mut().filter(|o| o.open) {
            if readable.next() != Some(true) {
                continue;
            }
            data.resize(CHUNK, 0);
            let mut filled = 0;
            while filled < data.len() {
                match o.file.read(&mut data[filled..]) {
                    Ok(0) => {
                        o.open = false;
                        break;
                    }
                    Ok(n) => {
                        filled += n;
                        if !o.gather {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // A terminal's master reads EIO once every slave is
                    // closed: its end of file.
                    Err(_) => {
                        o.open = false;
                        break;
                    }
                }
            }
            // A failed send means the host is gone: keep draining so the
            // process is not stopped by a full pipe.
            if filled > 0 {
                data.truncate(filled);
                let message = (o.frame)(data);
                let _ = outbox.send(&message);
                data = into_data(message);
            }
        }
    }
    timed_out
}

/// Writes stdin to the process, acknowledging each piece. `None` closes
/// stdin (on a terminal: sends the end-of-file character). The thread is
/// never joined: it may be stuck writing to a pipe some descendant holds
/// open and never reads, and it sends nothing once the session is closed.
fn feed(
    stdin: File,
    tty: bool,
    outbox: Arc<SharedOutbox>,
    buffered: Arc<AtomicU32>,
) -> mpsc::Sender<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>();
    let _ = spawn_thread("exec-stdin", move || {
        let mut stdin = Some(stdin);
        for piece in rx {
            match piece {
                Some(bytes) => {
                    if let Some(s) = &mut stdin
                        && s.write_all(&bytes).is_err()
                    {
                        // The process closed its stdin: the rest is dropped.
                        stdin = None;
                    }
                    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                    buffered.fetch_sub(len, Ordering::SeqCst);
                    let _ = outbox.send(&AgentMessage::StdinConsumed(len));
                }
                None if tty => {
                    if let Some(s) = &mut stdin {
                        let _ = s.write_all(&[4]);
                    }
                }
                None => stdin = None,
            }
        }
    });
    tx
}

/// Waits for the exit (killing the process group if the timeout expires
/// first) and sends `Exit`, the session's last frame.
fn finish(
    pid: i32,
    exit: mpsc::Receiver<Reaped>,
    deadline: Option<Instant>,
    mut timed_out: bool,
    outbox: &SharedOutbox,
) {
    let reaped = match deadline {
        Some(deadline) if !timed_out => {
            match exit.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    let _ = send_signal(pid, libc::SIGKILL, true);
                    exit.recv().ok()
                }
                Err(RecvTimeoutError::Disconnected) => None,
            }
        }
        _ => exit.recv().ok(),
    };
    let status = match reaped {
        Some(r) => ExitStatus {
            code: r.code(),
            signal: r.signal(),
            timed_out,
            peak_rss_kib: r.peak_rss_kib,
        },
        None => ExitStatus {
            code: None,
            signal: None,
            timed_out,
            peak_rss_kib: 0,
        },
    };
    if outbox.send(&AgentMessage::Exit(status)).is_err() {
        // The host is gone: the session is over all the same.
        outbox.lock().closed = true;
    }
}
