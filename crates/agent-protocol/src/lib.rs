//! The protocol between the supermachine host and its guest agent.
//!
//! The agent is PID 1 in every guest. The host reaches it over
//! virtio-vsock: the agent listens on [`AGENT_PORT`], and once it is ready
//! it connects to the host's [`READY_PORT`] to say so. Each connection
//! carries **frames**: a little-endian `u32` payload length (at most
//! [`MAX_FRAME`]) and a [postcard](https://docs.rs/postcard) message.
//!
//! Every connection starts with a [`Handshake`] frame from each side. The
//! handshake's layout never changes, so a host and an agent of different
//! [`PROTOCOL_VERSION`]s always read each other's and refuse with
//! [`Error::VersionMismatch`] instead of misreading later frames. The
//! initiator sends its handshake and its first message back to back, so a
//! handshake costs no round trip.
//!
//! After the handshake the host sends [`HostMessage`]s and the agent
//! answers with [`AgentMessage`]s. A connection serves one request at a
//! time; concurrency comes from opening more connections, each with its
//! own vsock credit, so a slow reader of one operation never stalls
//! another, and the agent never buffers more than one frame per stream
//! (stdin, which the host could otherwise push without bound, has an
//! explicit window: [`STDIN_WINDOW`]). `docs/agent.md` has the message
//! table and each operation's exchange.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version both sides must speak.
pub const PROTOCOL_VERSION: u32 = 3;
/// The first field of every [`Handshake`]: `SMAG`.
pub const MAGIC: u32 = u32::from_be_bytes(*b"SMAG");
/// The guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The host vsock port the agent connects to once it is ready.
pub const READY_PORT: u32 = 1025;
/// Largest frame payload either side accepts.
pub const MAX_FRAME: u32 = 1 << 20;
/// Largest data chunk (stdout, stdin, file contents) in one frame: a
/// little under 64 KiB, so that a whole frame (length, variant, chunk
/// length, bytes) fits one virtio-vsock packet (at most 64 KiB of payload)
/// instead of spilling a few bytes into a second packet and a second
/// queue notification.
pub const CHUNK: usize = (64 << 10) - 16;
/// Stdin bytes the host may send beyond what the agent has reported
/// written to the process ([`AgentMessage::StdinConsumed`]).
pub const STDIN_WINDOW: u32 = 256 << 10;

/// Errors reading, writing or checking frames.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    FrameTooLarge(u32),
    /// The connection ended inside a frame.
    #[error("connection ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes the frame should have had (with its length prefix).
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A whole frame arrived but is not a message this side knows.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// A message could not be encoded (a value postcard cannot represent).
    #[error("unencodable message: {0}")]
    Encode(String),
    /// The peer is not a supermachine agent or host.
    #[error("the peer is not a supermachine agent endpoint (bad handshake magic {0:#010x})")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: this side speaks version {ours}, the peer version {theirs}; use a guest image built with the same supermachine"
    )]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
}

impl Error {
    /// True when the stream is still in step after this error (the frame
    /// was whole, only its content was wrong), so the connection can go on.
    pub fn stream_intact(&self) -> bool {
        matches!(self, Error::Decode(_))
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The first frame each side sends on every connection. Its layout is
/// frozen: every future version must encode it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// [`MAGIC`].
    pub magic: u32,
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
}

impl Handshake {
    /// This build's handshake.
    pub const CURRENT: Handshake = Handshake {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
    };

    /// Checks a peer's handshake against ours.
    pub fn check(&self) -> Result<()> {
        if self.magic != MAGIC {
            return Err(Error::BadMagic(self.magic));
        }
        if self.version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        Ok(())
    }
}

/// Wall-clock time as seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// Seconds since 1970-01-01 UTC.
    pub secs: i64,
    /// Nanoseconds within the second (below 1e9).
    pub nanos: u32,
}

impl Clock {
    /// This machine's wall clock now.
    pub fn now() -> Clock {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            secs: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: since.subsec_nanos(),
        }
    }
}

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Whom a process runs as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum User {
    /// `docker run -u` syntax, resolved by the agent through the guest's
    /// own /etc/passwd and /etc/group: `name`, `uid`, `name:group`,
    /// `uid:gid`, ... Supplementary groups come from /etc/group.
    Spec(String),
    /// Numeric ids, used as given.
    Ids {
        /// User id.
        uid: u32,
        /// Primary group id.
        gid: u32,
        /// Supplementary group ids.
        groups: Vec<u32>,
    },
}

/// Start a process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the `PATH` of
    /// `env` (or the default `PATH`) when it has no slash.
    pub argv: Vec<String>,
    /// The environment as `KEY=VALUE`. The agent adds `PATH` and `HOME`
    /// (from the user's passwd entry) when absent, `HOSTNAME`, and
    /// `TERM=xterm` with a terminal.
    pub env: Vec<String>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// Whom to run as (default root).
    pub user: Option<User>,
    /// Give the process a stdin fed by [`HostMessage::Stdin`]; otherwise
    /// its stdin is /dev/null.
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size (stdin, stdout and
    /// stderr are its slave; all output arrives as [`AgentMessage::Stdout`]).
    pub tty: Option<WindowSize>,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Keep the process when its connection is lost (a snapshot's
    /// restore resets every connection): its output waits, and
    /// [`Request::Attach`] on a new connection takes the session over.
    /// [`Request::Quiesce`] parks it.
    pub keep: bool,
}

/// What a restored VM is told first: the time, fresh entropy and its own
/// identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The host's wall clock (the guest's stood still while saved).
    pub clock: Clock,
    /// Random bytes mixed into the guest's pool, which is then reseeded,
    /// so that restores of one snapshot do not share a random stream.
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// A new hostname (also in /etc/hostname and /etc/hosts).
    pub hostname: Option<String>,
    /// `KEY=VALUE` entries every process started from now on gets,
    /// beneath its own request's.
    pub env: Vec<String>,
}

/// Write a file; the contents follow as [`HostMessage::FileChunk`]s and a
/// [`HostMessage::FileEnd`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner (default root).
    pub uid: u32,
    /// Group (default root).
    pub gid: u32,
    /// Create missing parent directories (mode 0755, root).
    pub create_parents: bool,
}

/// What the host asks of the agent; the first message after the
/// handshake, and again after each completed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Answered with [`AgentMessage::Ok`].
    Ping,
    /// Start a process: [`AgentMessage::Started`], then output, then
    /// [`AgentMessage::Exit`], which the host acknowledges with
    /// [`HostMessage::Done`].
    Exec(ExecRequest),
    /// Write a file: chunks follow; answered with `Ok` or `Error`.
    WriteFile(WriteFileRequest),
    /// Read a file: [`AgentMessage::FileInfo`], chunks, `FileEnd`.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
    },
    /// Open a TCP connection to this port on the guest's loopback
    /// (127.0.0.1, then ::1). After `Ok` the connection carries the raw
    /// byte stream both ways, no more frames.
    Connect {
        /// The guest port.
        port: u16,
    },
    /// Step the guest's wall clock.
    SetClock(Clock),
    /// Mix these bytes into the guest's entropy pool (and credit them).
    AddEntropy(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Send a signal to any guest process (or its group).
    Signal {
        /// The process id in the guest.
        pid: i32,
        /// The signal number.
        signal: i32,
        /// Signal the process group whose leader is `pid`.
        group: bool,
    },
    /// Prepare for a snapshot: every kept session sends
    /// [`AgentMessage::Parked`] and then holds its output; file systems
    /// are synced. Answered with `Ok` once all of that is done.
    Quiesce,
    /// The snapshot was taken and this very VM runs on: parked sessions
    /// go on where they stopped, on their connections.
    Resume,
    /// Take over the kept session of process `pid` (its connection was
    /// lost): answered with [`AgentMessage::Started`], then the session
    /// goes on on this connection from where its output stopped.
    Attach {
        /// The process id in the guest.
        pid: i32,
    },
    /// The VM was restored from a snapshot: step the clock, reseed, take
    /// on the identity. Answered with `Ok`.
    Restored(Restored),
    /// Stop every process (SIGTERM, SIGKILL after `grace_ms`), sync and
    /// power off. Answered with `Ok` before it starts.
    Shutdown {
        /// How long processes get to exit after SIGTERM.
        grace_ms: u32,
    },
}

/// Frames from the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// A new request.
    Request(Request),
    /// The answer to [`AgentMessage::Hello`] on the ready connection: the
    /// host's clock and fresh entropy for the guest.
    Welcome {
        /// The host's wall clock.
        clock: Clock,
        /// Random bytes for the guest's pool.
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
    },
    /// Bytes for the running process's stdin.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// No more stdin (on a terminal: an end-of-file character).
    CloseStdin,
    /// The terminal's new size.
    Resize(WindowSize),
    /// Signal the running process (or its group).
    Signal {
        /// The signal number.
        signal: i32,
        /// The whole process group.
        group: bool,
    },
    /// A piece of the file being written.
    FileChunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The file being written is complete.
    FileEnd,
    /// The host has seen the process's exit; the connection is free for
    /// the next request.
    Done,
}

/// What went wrong with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A path, program, user or group does not exist.
    NotFound,
    /// The guest refused access.
    PermissionDenied,
    /// The request is malformed (empty argv, relative path, ...).
    InvalidRequest,
    /// A frame was not understood or came out of order.
    Protocol,
    /// The handshake named another protocol version.
    VersionMismatch,
    /// Nothing listens on the port.
    ConnectionRefused,
    /// Any other failure inside the guest.
    Other,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// One line for the user.
    pub message: String,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal, when one killed it.
    pub signal: Option<i32>,
    /// The timeout expired and the agent killed the process group.
    pub timed_out: bool,
    /// Peak resident set size of the process and its waited-for
    /// descendants, in KiB.
    pub peak_rss_kib: u64,
}

/// Frames from the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message on the ready connection.
    Hello {
        /// The agent's build (crate version).
        agent_version: String,
        /// Guest time from the kernel's start until the agent ran as
        /// PID 1 (the kernel's own boot), in microseconds.
        kernel_boot_us: u64,
        /// Guest time the agent then spent setting up the machine (mounts,
        /// network, hostname) before this message, in microseconds.
        setup_us: u64,
    },
    /// The request succeeded.
    Ok,
    /// The request failed; the connection serves the next one.
    Error(AgentError),
    /// The process is running.
    Started {
        /// Its process id in the guest.
        pid: i32,
    },
    /// Output on the process's stdout (or its terminal).
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Output on the process's stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// This many more stdin bytes were written to the process.
    StdinConsumed(u32),
    /// The process ended; all its output came before this.
    Exit(ExitStatus),
    /// The file being read: its size and attributes; chunks follow.
    FileInfo {
        /// Size in bytes.
        size: u64,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A piece of the file being read.
    FileChunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The file being read is complete.
    FileEnd,
    /// A kept session's last frame before a snapshot: nothing of its
    /// output is in flight behind it.
    Parked,
}

impl HostMessage {
    /// The message's name (never its contents), for errors about
    /// messages out of place.
    pub fn name(&self) -> &'static str {
        match self {
            HostMessage::Request(_) => "Request",
            HostMessage::Welcome { .. } => "Welcome",
            HostMessage::Stdin(_) => "Stdin",
            HostMessage::CloseStdin => "CloseStdin",
            HostMessage::Resize(_) => "Resize",
            HostMessage::Signal { .. } => "Signal",
            HostMessage::FileChunk(_) => "FileChunk",
            HostMessage::FileEnd => "FileEnd",
            HostMessage::Done => "Done",
        }
    }
}

impl AgentMessage {
    /// The message's name (never its contents: from a hostile guest they
    /// could be a megabyte), for errors about messages out of place.
    pub fn name(&self) -> &'static str {
        match self {
            AgentMessage::Hello { .. } => "Hello",
            AgentMessage::Ok => "Ok",
            AgentMessage::Error(_) => "Error",
            AgentMessage::Started { .. } => "Started",
            AgentMessage::Stdout(_) => "Stdout",
            AgentMessage::Stderr(_) => "Stderr",
            AgentMessage::StdinConsumed(_) => "StdinConsumed",
            AgentMessage::Exit(_) => "Exit",
            AgentMessage::FileInfo { .. } => "FileInfo",
            AgentMessage::FileChunk(_) => "FileChunk",
            AgentMessage::FileEnd => "FileEnd",
            AgentMessage::Parked => "Parked",
        }
    }
}

/// Encodes `msg` as one whole frame (length prefix and payload), so that
/// writers sharing a stream under a lock never interleave frames.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    encode_frame_into(msg, Vec::new())
}

/// [`encode_frame`] into `buf`'s allocation (its contents are replaced):
/// a sender that passes the same buffer back each time allocates nothing
/// per frame.
pub fn encode_frame_into<T: Serialize>(msg: &T, mut buf: Vec<u8>) -> Result<Vec<u8>> {
    buf.clear();
    buf.extend_from_slice(&[0u8; 4]);
    let mut frame = postcard::to_extend(msg, buf).map_err(|e| Error::Encode(e.to_string()))?;
    let len = frame.len() - 4;
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| Error::Encode(format!("a {len}-byte message exceeds the frame limit")))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Writes `msg` as one frame.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    w.write_all(&encode_frame(msg)?)?;
    Ok(())
}

/// Reads one frame's payload; `None` at a clean end of stream (before the
/// first byte of a frame).
pub fn read_payload<R: Read + ?Sized>(r: &mut R) -> Result<Option<Vec<u8>>> {
    let mut payload = Vec::new();
    Ok(read_payload_into(r, &mut payload)?.then_some(payload))
}

/// [`read_payload`] into `payload`'s allocation; false at a clean end of
/// stream.
pub fn read_payload_into<R: Read + ?Sized>(r: &mut R, payload: &mut Vec<u8>) -> Result<bool> {
    let mut len = [0u8; 4];
    let got = read_full(r, &mut len)?;
    if got == 0 {
        return Ok(false);
    }
    if got < len.len() {
        return Err(Error::Truncated { expected: 4, got });
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(len));
    }
    payload.resize(len as usize, 0);
    let got = read_full(r, payload)?;
    if got < payload.len() {
        return Err(Error::Truncated {
            expected: 4 + payload.len(),
            got: 4 + got,
        });
    }
    Ok(true)
}

/// Decodes one message from a frame's payload; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| Error::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Decode(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Reads and decodes one frame; `None` at a clean end of stream.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>> {
    read_payload(r)?.map(|p| decode(&p)).transpose()
}

/// Sends our handshake.
pub fn send_handshake<W: Write + ?Sized>(w: &mut W) -> Result<()> {
    write_frame(w, &Handshake::CURRENT)
}

/// Reads the peer's handshake and checks it.
pub fn expect_handshake<R: Read + ?Sized>(r: &mut R) -> Result<()> {
    match read_frame::<_, Handshake>(r)? {
        Some(h) => h.check(),
        None => Err(Error::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection before its handshake",
        ))),
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
