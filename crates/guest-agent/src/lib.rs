//! The supermachine guest agent: PID 1 in every guest.
//!
//! At boot ([`system::boot`]) it mounts the image's root file system
//! (EROFS, read-only) under a writable overlay and switches into it, mounts
//! the usual kernel file systems, brings up loopback and sets the hostname.
//! Then it serves the host over vsock ([`Agent::serve`]): each connection
//! carries requests of `supermachine-agent-protocol` one at a time, and
//! many connections are served at once, each on its own thread.
//!
//! The agent never exits on a bad request: a malformed frame, an unknown
//! message or a failing operation is answered with an error, and only that
//! connection (or only that request, when the stream is still in step) is
//! affected.

pub mod exec;
pub mod files;
pub mod net;
pub mod reaper;
pub mod system;
pub mod user;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use supermachine_agent_protocol::{
    self as proto, AgentError, AgentMessage, ErrorKind, HostMessage, Request, Restored,
};

pub use reaper::Reaper;

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The protocol failed (I/O, framing, handshake).
    #[error(transparent)]
    Protocol(#[from] proto::Error),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A byte stream to the host: a vsock connection in the guest, a Unix
/// socket in tests.
pub trait Conn: Read + Write + AsRawFd + Send + Sync + Sized + 'static {
    /// Another handle to the same connection.
    fn duplicate(&self) -> io::Result<Self>;
    /// Half-closes the direction towards the host.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Conn for vsock::VsockStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Conn for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// What the agent serves with.
#[derive(Debug)]
pub struct Agent {
    reaper: Arc<Reaper>,
    /// The guest's `/` (where /etc/passwd is read from).
    root: PathBuf,
    /// The guest's hostname (a restore may give it a new one).
    hostname: Mutex<String>,
    /// `KEY=VALUE` entries under every process's own environment (given
    /// by a restore).
    base_env: Mutex<Vec<String>>,
    /// Sessions of kept processes (`ExecRequest::keep`) by pid, until
    /// their host acknowledges the exit.
    kept: Mutex<HashMap<i32, Arc<exec::Session>>>,
    /// True when this process is the guest's PID 1 and may set the clock,
    /// feed the entropy pool and power the machine off. Tests run the
    /// agent as an ordinary process, where these are refused.
    owns_system: bool,
}

impl Agent {
    /// An agent reaping through `reaper`. `owns_system` only for PID 1.
    pub fn new(reaper: Arc<Reaper>, root: PathBuf, hostname: String, owns_system: bool) -> Self {
        Self {
            reaper,
            root,
            hostname: Mutex::new(hostname),
            base_env: Mutex::new(Vec::new()),
            kept: Mutex::new(HashMap::new()),
            owns_system,
        }
    }

    /// The reaper this agent registers its processes with.
    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    /// True when this agent is PID 1 and manages the machine.
    pub fn owns_system(&self) -> bool {
        self.owns_system
    }

    /// The guest's hostname.
    pub fn hostname(&self) -> String {
        lock(&self.hostname).clone()
    }

    /// The environment entries every process gets beneath its own.
    pub(crate) fn base_env(&self) -> Vec<String> {
        lock(&self.base_env).clone()
    }

    pub(crate) fn keep_session(&self, session: Arc<exec::Session>) {
        lock(&self.kept).insert(session.pid(), session);
    }

    pub(crate) fn kept_session(&self, pid: i32) -> Option<Arc<exec::Session>> {
        lock(&self.kept).get(&pid).cloned()
    }

    pub(crate) fn drop_session(&self, pid: i32) {
        lock(&self.kept).remove(&pid);
    }

    /// Every kept session, for `Quiesce` and `Resume`.
    fn kept_sessions(&self) -> Vec<Arc<exec::Session>> {
        lock(&self.kept).values().cloned().collect()
    }

    /// `Restored`: the clock, the entropy pool, then the identity.
    fn restored(&self, r: Restored) -> Result<(), AgentError> {
        self.system_op("set the clock", || system::set_clock(r.clock))?;
        self.system_op("reseed the entropy pool", || system::reseed(&r.entropy))?;
        for entry in &r.env {
            exec::check_env_entry(entry)?;
        }
        if let Some(name) = &r.hostname {
            self.system_op("set the hostname", || system::rename_host(name))?;
            *lock(&self.hostname) = name.clone();
        }
        *lock(&self.base_env) = r.env;
        Ok(())
    }

    /// Serves a connection the host opened: handshakes, then requests
    /// until the host closes it or it is used up.
    pub fn serve<S: Conn>(&self, mut conn: S) {
        if let Err(e) = proto::expect_handshake(&mut conn) {
            // Say why in a frame the peer can read whatever its version,
            // after our handshake, then hang up.
            let kind = match e {
                proto::Error::VersionMismatch { .. } => ErrorKind::VersionMismatch,
                _ => ErrorKind::Protocol,
            };
            let _ = proto::send_handshake(&mut conn);
            let _ = reply_error(&mut conn, kind, e.to_string());
            log::warn!("refused a connection: {e}");
            return;
        }
        if proto::send_handshake(&mut conn).is_err() {
            return;
        }
        self.serve_requests(conn);
    }

    /// Serves requests on a connection whose handshake is done.
    pub fn serve_requests<S: Conn>(&self, mut conn: S) {
        loop {
            let payload = match proto::read_payload(&mut conn) {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => {
                    // Out of step with the stream: say so and hang up.
                    let _ = reply_error(&mut conn, ErrorKind::Protocol, e.to_string());
                    return;
                }
            };
            let request = match proto::decode::<HostMessage>(&payload) {
                Ok(HostMessage::Request(r)) => r,
                // The frame was whole: say what was wrong and serve on.
                wrong => {
                    let message = match wrong {
                        Ok(other) => format!("expected a request, got {}", other.name()),
                        Err(e) => e.to_string(),
                    };
                    if reply_error(&mut conn, ErrorKind::Protocol, message).is_err() {
                        return;
                    }
                    continue;
                }
            };
            match self.handle(request, conn) {
                Some(c) => conn = c,
                None => return,
            }
        }
    }

    /// Handles one request; gives the connection back unless it is used up.
    fn handle<S: Conn>(&self, request: Request, mut conn: S) -> Option<S> {
        let result: Result<(), AgentError> = match request {
            Request::Ping => Ok(()),
            Request::Exec(req) => return exec::run(self, req, conn),
            Request::WriteFile(req) => {
                let outcome = files::write(&req, &mut conn);
                match outcome {
                    Ok(files::Received::Complete) => Ok(()),
                    Ok(files::Received::Failed(e)) => Err(e),
                    Err(e) => {
                        log::debug!("write_file {}: {e}", req.path);
                        return None;
                    }
                }
            }
            Request::ReadFile { path } => {
                return match files::read(&path, &mut conn) {
                    Ok(()) => Some(conn),
                    Err(e) => {
                        log::debug!("read_file {path}: {e}");
                        None
                    }
                };
            }
            Request::Connect { port } => return connect(port, conn),
            Request::SetClock(clock) => {
                self.system_op("set the clock", || system::set_clock(clock))
            }
            Request::AddEntropy(bytes) => {
                self.system_op("add entropy", || system::add_entropy(&bytes))
            }
            Request::Signal { pid, signal, group } => exec::send_signal(pid, signal, group)
                .map_err(|e| os_error(&format!("kill {pid}"), &e)),
            Request::Attach { pid } => return exec::attach(self, pid, conn),
            Request::Quiesce => {
                for session in self.kept_sessions() {
                    session.park();
                }
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                Ok(())
            }
            Request::Resume => {
                for session in self.kept_sessions() {
                    session.resume();
                }
                Ok(())
            }
            Request::Restored(r) => self.restored(r),
            Request::Shutdown { grace_ms } => {
                if !self.owns_system {
                    Err(not_pid1("power off"))
                } else {
                    // Answer first: the power-off may be over before a
                    // later answer would leave the guest.
                    proto::write_frame(&mut conn, &AgentMessage::Ok).ok()?;
                    let started = std::thread::Builder::new()
                        .name("shutdown".into())
                        .spawn(move || system::shut_down(grace_ms));
                    if let Err(e) = started {
                        log::error!("starting the shutdown: {e}");
                    }
                    return Some(conn);
                }
            }
        };
        let reply = match result {
            Ok(()) => AgentMessage::Ok,
            Err(e) => AgentMessage::Error(e),
        };
        proto::write_frame(&mut conn, &reply).ok()?;
        Some(conn)
    }

    fn system_op(&self, what: &str, op: impl FnOnce() -> io::Result<()>) -> Result<(), AgentError> {
        if !self.owns_system {
            return Err(not_pid1(what));
        }
        op().map_err(|e| os_error(what, &e))
    }
}

fn not_pid1(what: &str) -> AgentError {
    AgentError {
        kind: ErrorKind::Other,
        message: format!("cannot {what}: the agent is not the guest's PID 1"),
    }
}

/// An OS error as the protocol's error.
pub fn os_error(what: &str, e: &io::Error) -> AgentError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
        _ => ErrorKind::Other,
    };
    AgentError {
        kind,
        message: format!("{what}: {e}"),
    }
}

/// Sends an error answer.
pub fn reply_error<W: Write>(w: &mut W, kind: ErrorKind, message: String) -> proto::Result<()> {
    proto::write_frame(w, &AgentMessage::Error(AgentError { kind, message }))
}

/// `Request::Connect`: a TCP connection to a guest port, spliced to the
/// host's connection both ways until both directions have ended. When the
/// port cannot be reached the answer is an error and the connection
/// serves on.
fn connect<S: Conn>(port: u16, mut conn: S) -> Option<S> {
    let tcp =
        TcpStream::connect(("127.0.0.1", port)).or_else(|_| TcpStream::connect(("::1", port)));
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            proto::write_frame(
                &mut conn,
                &AgentMessage::Error(os_error(&format!("connect to guest port {port}"), &e)),
            )
            .ok()?;
            return Some(conn);
        }
    };
    proto::write_frame(&mut conn, &AgentMessage::Ok).ok()?;
    let (Ok(mut tcp_in), Ok(mut conn_out)) = (tcp.try_clone(), conn.duplicate()) else {
        return None;
    };
    let to_guest = std::thread::Builder::new()
        .name(format!("connect-{port}"))
        .stack_size(128 << 10)
        .spawn(move || {
            let mut tcp = tcp;
            let _ = io::copy(&mut conn, &mut tcp);
            let _ = tcp.shutdown(Shutdown::Write);
        });
    let _ = io::copy(&mut tcp_in, &mut conn_out);
    let _ = conn_out.shutdown_write();
    if let Ok(t) = to_guest {
        let _ = t.join();
    }
    None
}

/// Locks `m`, going on after a panic elsewhere (the data stays usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
