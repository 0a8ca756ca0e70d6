//! A VM with the agent running in it: start it from an image's root disk,
//! then run processes, move files and reach guest ports through the agent.
//!
//! The host side of the guest's vsock device is a Unix socket in a private
//! per-VM directory. The agent announces itself by connecting to host
//! port [`READY_PORT`]; the host reaches it by connecting to the socket
//! and asking for guest port [`AGENT_PORT`]. Each operation uses one
//! connection at a time; finished connections are kept for reuse, so a
//! short exec costs one request/response exchange, not a new connection.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_agent_protocol::{
    self as proto, AGENT_PORT, AgentMessage, CHUNK, Clock, HostMessage, READY_PORT, Request,
    WriteFileRequest,
};
use supermachine_vmm::{Console, DEFAULT_CMDLINE, DiskConfig, FsConfig, VsockConfig};

use crate::MachineConfig;

use crate::exec::{ExecBuilder, KeptProcesses};
use crate::guest::GuestImage;
use crate::network::{self, Network, Passt};
use crate::shares::{Share, Virtiofsd, find_virtiofsd};
use crate::snapshot::{DiskIdentity, Snapshot, SnapshotInfo, Workload, check_snapshottable};
use crate::sys::{UnixListener, UnixStream};
use crate::{Error, ExitReason, Machine, Result, images, io_error, sys};

/// The guest's vsock context id (each VM has its own device).
const GUEST_CID: u64 = 3;
/// Idle agent connections kept for reuse.
const MAX_IDLE_CONNECTIONS: usize = 16;
/// How long a refused agent connection is retried.
const AGENT_CONNECT_PATIENCE: Duration = Duration::from_secs(2);
/// How long the guest may take to accept a vsock connection.
const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Console bytes kept for error messages.
const CONSOLE_TAIL: usize = 16 << 10;

/// How to start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The guest's hostname.
    pub hostname: String,
    /// The kernel and agent to boot (default: [`GuestImage::locate`]).
    pub guest: Option<GuestImage>,
    /// A disk for the overlay's writable layer (a formatted ext4 image);
    /// default: guest RAM (tmpfs), gone when the VM stops.
    pub writable_disk: Option<PathBuf>,
    /// Also write the guest console to this file.
    pub console_file: Option<PathBuf>,
    /// Host directories shared live into the guest (virtio-fs, each
    /// served by a virtiofsd this VM starts and stops).
    pub shares: Vec<Share>,
    /// How long the agent may take to come up.
    pub ready_timeout: Duration,
    /// How long processes get to exit on [`Vm::stop`] before they are
    /// killed and the VM is powered off anyway.
    pub stop_grace: Duration,
    /// `KEY=VALUE` entries every process started through the agent gets
    /// beneath its own environment (a restored VM's identity, say).
    pub env: Vec<(String, String)>,
    /// The guest's network (default: passt when it is installed).
    pub network: Network,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory_bytes: 512 << 20,
            hostname: "supermachine".into(),
            guest: None,
            writable_disk: None,
            console_file: None,
            shares: Vec::new(),
            ready_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(5),
            env: Vec::new(),
            network: Network::default(),
        }
    }
}

/// The last bytes the guest console printed.
#[derive(Clone, Default)]
struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = bytes.as_slices();
        let mut all = a.to_vec();
        all.extend_from_slice(b);
        String::from_utf8_lossy(&all).replace('\r', "")
    }
}

struct ConsoleWriter {
    tail: ConsoleTail,
    file: Option<fs::File>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut t = self.tail.0.lock().unwrap_or_else(|p| p.into_inner());
            t.extend(buf);
            let excess = t.len().saturating_sub(CONSOLE_TAIL);
            t.drain(..excess);
        }
        if let Some(f) = &mut self.file {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// The guest console for `options`: its tail kept for error messages,
/// and written to `console_file` too when one is given.
fn open_console(options: &VmConfig) -> Result<(ConsoleTail, Console)> {
    let tail = ConsoleTail::default();
    let file = options
        .console_file
        .as_ref()
        .map(|p| fs::File::create(p).map_err(io_error(format!("console file {}", p.display()))))
        .transpose()?;
    let writer = ConsoleWriter {
        tail: tail.clone(),
        file,
    };
    Ok((tail, Console::Writer(Box::new(writer))))
}

/// A private directory for one VM's sockets, removed when dropped.
/// Directories of VMM processes that died without removing theirs are
/// removed when the next one is made.
#[derive(Debug)]
struct RuntimeDir(PathBuf);

static NEXT_VM: AtomicU64 = AtomicU64::new(0);

impl RuntimeDir {
    fn create() -> Result<RuntimeDir> {
        let base = runtime_dir()?;
        remove_stale(&base);
        let dir = base.join(format!(
            "vm-{}-{}",
            std::process::id(),
            NEXT_VM.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        sys::create_private_dir(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        Ok(RuntimeDir(dir))
    }
}

/// This user's private directory for VM sockets and state:
/// `$XDG_RUNTIME_DIR/supermachine`, else `/tmp/supermachine-<uid>`
/// (created mode 0700; refused unless it is a directory only this user
/// can enter); on Windows `%LOCALAPPDATA%\supermachine\run`.
pub fn runtime_dir() -> Result<PathBuf> {
    let base = sys::runtime_base();
    if let Some(parent) = base.parent() {
        fs::create_dir_all(parent).map_err(io_error(format!("creating {}", parent.display())))?;
    }
    sys::create_private_dir(&base).map_err(io_error(format!("creating {}", base.display())))?;
    sys::check_private(&base).map_err(io_error(format!("runtime directory {}", base.display())))?;
    Ok(base)
}

/// Removes `vm-<pid>-<n>` directories whose process no longer exists.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("vm-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !supermachine_host::process_exists(pid) {
            log::debug!("removing stale {}", entry.path().display());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Where the time from [`Vm::start`] to a ready agent went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartTimings {
    /// Host: checking the options and creating the VM (memory, devices,
    /// kernel loaded, vCPUs started).
    pub create: Duration,
    /// Guest clock: the kernel's start until the agent ran as PID 1.
    pub kernel_boot: Duration,
    /// Guest clock: the agent's setup (mounts, hostname) until it said
    /// hello.
    pub agent_setup: Duration,
    /// Host: the whole of `start`, until the agent was answered.
    pub ready: Duration,
}

/// What a snapshot needs to know of the VM it saves.
#[derive(Clone, Debug)]
struct About {
    cpus: u32,
    memory_bytes: u64,
    root_disk: PathBuf,
    /// Why it cannot be snapshotted, if it cannot.
    unsnapshottable: Option<String>,
    /// Restored: the snapshot's kept processes and workload.
    kept_pids: Vec<i32>,
    workload: Option<Workload>,
    restored: bool,
    /// The guest's network settings, if it has a network.
    network: Option<String>,
}

/// The helper processes a VM this process runs keeps.
#[derive(Debug, Default)]
struct Helpers {
    /// Each exits once the VMM's connection closes.
    _virtiofsd: Vec<Virtiofsd>,
    /// Exits once the VMM's end of its socket closes.
    passt: Option<Passt>,
}

/// A running VM whose agent has answered.
pub struct Vm {
    machine: Option<Machine>,
    dialer: AgentDialer,
    console: ConsoleTail,
    stop_grace: Duration,
    hostname: String,
    timings: StartTimings,
    /// Kept processes spawned through this handle (parked for snapshots).
    kept: KeptProcesses,
    /// What a snapshot of this VM records about it (`None`: attached).
    about: Option<About>,
    /// After the machine (which `Drop` stops first).
    helpers: Helpers,
    // Last: the sockets live in it (`None` when another process owns the
    // VM and its directory).
    _dir: Option<RuntimeDir>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("hostname", &self.hostname)
            .field("socket", &self.dialer.socket)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Boots a VM whose root file system is `rootfs` (an EROFS disk, as
    /// [`images::rootfs`] builds) and waits until its agent is ready.
    pub fn start(rootfs: &Path, options: &VmConfig) -> Result<Vm> {
        let started = Instant::now();
        let guest = match &options.guest {
            Some(g) => g.clone(),
            None => GuestImage::locate()?,
        };
        if !rootfs.is_file() {
            return Err(Error::Io {
                what: format!("root disk {}", rootfs.display()),
                source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
            });
        }
        check_hostname(&options.hostname)?;
        // Shares are checked before anything is made.
        let share_dirs = options
            .shares
            .iter()
            .map(Share::host_dir)
            .collect::<Result<Vec<_>>>()?;
        let virtiofsd = if options.shares.is_empty() {
            None
        } else {
            Some(find_virtiofsd()?)
        };
        let network = network::plan(&options.network)?;
        let dir = RuntimeDir::create()?;
        let mut daemons = Vec::new();
        let mut filesystems = Vec::new();
        for (i, (share, host_dir)) in options.shares.iter().zip(&share_dirs).enumerate() {
            let socket = dir.0.join(format!("fs{i}.sock"));
            if let Some(program) = &virtiofsd {
                daemons.push(Virtiofsd::start(
                    program,
                    host_dir,
                    &socket,
                    share.read_only,
                )?);
            }
            filesystems.push(FsConfig {
                tag: format!("fs{i}"),
                socket,
            });
        }
        let socket = dir.0.join("vsock.sock");
        let ready_path = PathBuf::from(format!("{}_{READY_PORT}", socket.display()));
        let ready = UnixListener::bind(&ready_path)
            .map_err(io_error(format!("listening on {}", ready_path.display())))?;
        let (console, console_out) = open_console(options)?;
        let mut cmdline = format!(
            "{DEFAULT_CMDLINE} quiet supermachine.root=/dev/vda supermachine.hostname={}",
            options.hostname
        );
        let mut disks = vec![DiskConfig {
            path: rootfs.to_path_buf(),
            read_only: true,
        }];
        for (share, fs) in options.shares.iter().zip(&filesystems) {
            cmdline.push(' ');
            cmdline.push_str(&share.agent_param(&fs.tag));
        }
        let network = network
            .map(|plan| plan.attach(&options.network))
            .transpose()?;
        let (net, passt, guest_network) = match network {
            Some(a) => {
                cmdline.push(' ');
                cmdline.push_str(&a.cmdline);
                (Some(a.device), a.passt, Some(a.cmdline))
            }
            None => (None, None, None),
        };
        if let Some(upper) = &options.writable_disk {
            cmdline.push_str(" supermachine.upper=/dev/vdb");
            disks.push(DiskConfig {
                path: upper.clone(),
                read_only: false,
            });
        }
        let config = MachineConfig {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initramfs.clone()),
            cmdline,
            memory_bytes: options.memory_bytes,
            vcpus: options.cpus,
            console: console_out,
            forward_stdin: false,
            disks,
            entropy: true,
            vsock: Some(VsockConfig {
                cid: GUEST_CID,
                socket: socket.clone(),
            }),
            filesystems,
            net,
        };
        let machine = Machine::start(config)?;
        let created = started.elapsed();
        let about = About {
            cpus: options.cpus,
            memory_bytes: options.memory_bytes,
            root_disk: rootfs.to_path_buf(),
            unsnapshottable: check_snapshottable(options).err().map(|e| e.to_string()),
            kept_pids: Vec::new(),
            workload: None,
            restored: false,
            network: guest_network,
        };
        let helpers = Helpers {
            _virtiofsd: daemons,
            passt,
        };
        let mut vm = Vm::owned(machine, socket, console, options, about, helpers, dir);
        let (conn, kernel_boot, agent_setup) = vm.await_agent(&ready, options.ready_timeout)?;
        drop(ready);
        let _ = fs::remove_file(&ready_path);
        vm.idle_push(conn);
        vm.check_network();
        if !options.env.is_empty() {
            vm.send_identity(None, &options.env)?;
        }
        vm.timings = StartTimings {
            create: created,
            kernel_boot,
            agent_setup,
            ready: started.elapsed(),
        };
        Ok(vm)
    }

    /// The handle of a VM this process runs (booted or restored), before
    /// its agent has answered.
    fn owned(
        machine: Machine,
        socket: PathBuf,
        console: ConsoleTail,
        options: &VmConfig,
        about: About,
        helpers: Helpers,
        dir: RuntimeDir,
    ) -> Vm {
        Vm {
            machine: Some(machine),
            dialer: AgentDialer {
                socket,
                idle: IdleHandle::default(),
            },
            console,
            stop_grace: options.stop_grace,
            hostname: options.hostname.clone(),
            timings: StartTimings::default(),
            kept: KeptProcesses::default(),
            about: Some(about),
            helpers,
            _dir: Some(dir),
        }
    }

    /// Warns (once the guest is up) if its passt has already ended: the
    /// guest then has a network device whose link is down.
    fn check_network(&mut self) {
        if let Some(why) = self.helpers.passt.as_mut().and_then(Passt::ended) {
            log::warn!("{why}; the VM has no network");
        }
    }

    /// Boots `record`'s root disk (building it first if it is not cached).
    pub fn start_image(
        store: &images::Store,
        record: &images::ImageRecord,
        options: &VmConfig,
    ) -> Result<Vm> {
        let disk = match images::rootfs::built_disk(store, record)? {
            Some(d) => d,
            None => images::rootfs::build(store, record, images::Limits::default())?.disk,
        };
        Vm::start(&disk, options)
    }

    /// Waits for the agent's ready connection and answers its hello;
    /// returns it with the guest's kernel boot and agent setup times.
    fn await_agent(
        &self,
        ready: &UnixListener,
        timeout: Duration,
    ) -> Result<(UnixStream, Duration, Duration)> {
        let deadline = Instant::now() + timeout;
        ready
            .set_nonblocking(true)
            .map_err(io_error("the ready socket"))?;
        let mut conn = loop {
            match ready.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_error("accepting the agent")(e)),
            }
            if self.machine.as_ref().is_none_or(Machine::has_ended) {
                return Err(self.not_ready("the VM ended before its agent was ready"));
            }
            if Instant::now() > deadline {
                return Err(
                    self.not_ready(&format!("the agent did not come up within {timeout:?}"))
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        conn.set_nonblocking(false)
            .map_err(io_error("the agent connection"))?;
        conn.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1)),
        ))
        .map_err(io_error("the agent connection"))?;
        proto::expect_handshake(&mut conn)?;
        let (kernel_boot, setup) = match proto::read_frame::<_, AgentMessage>(&mut conn)? {
            Some(AgentMessage::Hello {
                kernel_boot_us,
                setup_us,
                ..
            }) => (
                Duration::from_micros(kernel_boot_us),
                Duration::from_micros(setup_us),
            ),
            Some(other) => return Err(unexpected(&other)),
            None => return Err(Error::AgentGone),
        };
        let mut entropy = vec![0u8; 64];
        getrandom::fill(&mut entropy).map_err(|e| Error::Io {
            what: "reading host entropy".into(),
            source: io::Error::other(e.to_string()),
        })?;
        proto::send_handshake(&mut conn)?;
        proto::write_frame(
            &mut conn,
            &HostMessage::Welcome {
                clock: Clock::now(),
                entropy,
            },
        )?;
        conn.set_read_timeout(None)
            .map_err(io_error("the agent connection"))?;
        Ok((conn, kernel_boot, setup))
    }

    fn not_ready(&self, why: &str) -> Error {
        Error::AgentNotReady {
            why: why.to_string(),
            console: self.console.text(),
        }
    }

    /// How long the VM took from `start` until its agent answered.
    pub fn ready_in(&self) -> Duration {
        self.timings.ready
    }

    /// Where the time to a ready VM went.
    pub fn start_timings(&self) -> StartTimings {
        self.timings
    }

    /// The guest's hostname.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The last 16 KiB the guest console printed (kernel messages and the
    /// agent's own errors).
    pub fn console_tail(&self) -> String {
        self.console.text()
    }

    /// The Unix socket of the guest's vsock device (connect, then send
    /// `CONNECT <port>\n`).
    pub fn vsock_socket(&self) -> &Path {
        &self.dialer.socket
    }

    /// A raw vsock connection to guest port `port`.
    pub fn connect_vsock(&self, port: u32) -> Result<UnixStream> {
        self.dialer.connect_vsock(port)
    }

    /// An agent connection: an idle one, or a new one (handshake sent; the
    /// agent's is read with the first answer).
    pub(crate) fn agent_conn(&self) -> Result<AgentConn> {
        if self.has_ended() {
            return Err(Error::VmEnded);
        }
        self.dialer.agent_conn().map_err(|e| match e {
            Error::AgentProtocol(_) if self.has_ended() => Error::VmEnded,
            other => other,
        })
    }

    /// What opens connections into this VM, for threads that outlive a
    /// borrow of it.
    pub(crate) fn dialer(&self) -> AgentDialer {
        self.dialer.clone()
    }

    /// Keeps a connection whose last request completed.
    pub(crate) fn idle_push(&self, c: UnixStream) {
        self.dialer.idle.push(c);
    }

    /// The idle pool, for threads that finish requests on their own.
    pub(crate) fn idle_handle(&self) -> IdleHandle {
        self.dialer.idle.clone()
    }

    /// True once the VM has ended.
    pub fn has_ended(&self) -> bool {
        match (&self.machine, &self._dir) {
            (Some(m), _) => m.has_ended(),
            // Attached: its VMM removes the socket when the VM ends (or
            // the socket stops answering when the VMM was killed).
            (None, None) => !self.dialer.socket.exists(),
            (None, Some(_)) => true,
        }
    }

    /// A VM that another process runs (a `run -d` VM's VMM), reached
    /// through the Unix socket of its vsock device. Exec, files and ports
    /// work as on an own VM; ending it is its owner's job (`stop` asks
    /// the guest to power off, then, like `kill`, returns
    /// [`Error::VmEnded`]).
    pub fn attach(vsock_socket: &Path) -> Result<Vm> {
        let vm = Vm {
            machine: None,
            dialer: AgentDialer {
                socket: vsock_socket.to_path_buf(),
                idle: IdleHandle::default(),
            },
            console: ConsoleTail::default(),
            stop_grace: VmConfig::default().stop_grace,
            hostname: String::new(),
            timings: StartTimings::default(),
            kept: KeptProcesses::default(),
            about: None,
            helpers: Helpers::default(),
            _dir: None,
        };
        vm.ping().map_err(|e| match e {
            Error::Io { .. } | Error::AgentGone => Error::VmEnded,
            other => other,
        })?;
        Ok(vm)
    }

    /// One request answered with `Ok` or an error.
    fn simple_request(&self, request: Request) -> Result<()> {
        let mut c = self.agent_conn()?;
        c.send(&HostMessage::Request(request))?;
        self.finish_ok(c)
    }

    /// Reads a request's `Ok` or error answer; the connection is then
    /// idle again.
    fn finish_ok(&self, mut c: AgentConn) -> Result<()> {
        let answer = c.recv()?;
        match answer {
            AgentMessage::Ok | AgentMessage::Error(_) => self.idle_push(c.stream),
            _ => return Err(unexpected(&answer)),
        }
        match answer {
            AgentMessage::Error(e) => Err(Error::Agent(e.message)),
            _ => Ok(()),
        }
    }

    /// Checks that the agent answers.
    pub fn ping(&self) -> Result<()> {
        self.simple_request(Request::Ping)
    }

    /// A process to run in the guest: set it up, then `output()` or
    /// `spawn()`.
    pub fn exec<I, S>(&self, argv: I) -> ExecBuilder<'_>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecBuilder::new(self, argv.into_iter().map(Into::into).collect())
    }

    /// Writes `contents` to `path` in the guest (mode 0644, root), creating
    /// parent directories. The file appears whole or not at all.
    pub fn write_file(&self, path: &str, contents: &[u8]) -> Result<()> {
        self.write_file_from(path, contents, 0o644, (0, 0))
    }

    /// Writes a file of any size from `source`, with a mode and owner.
    pub fn write_file_from(
        &self,
        path: &str,
        mut source: impl Read,
        mode: u32,
        (uid, gid): (u32, u32),
    ) -> Result<()> {
        let mut c = self.agent_conn()?;
        c.send(&HostMessage::Request(Request::WriteFile(
            WriteFileRequest {
                path: path.to_string(),
                mode,
                uid,
                gid,
                create_parents: true,
            },
        )))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The agent drops what it has when the stream ends
                    // without FileEnd; this connection is not reused.
                    return Err(io_error(format!("reading the contents for {path}"))(e));
                }
            };
            c.send(&HostMessage::FileChunk(buf[..n].to_vec()))?;
        }
        c.send(&HostMessage::FileEnd)?;
        self.finish_ok(c)
    }

    /// Reads a whole file from the guest.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_file_to(path, &mut out)?;
        Ok(out)
    }

    /// Streams a file from the guest into `sink`; returns its size.
    pub fn read_file_to(&self, path: &str, mut sink: impl Write) -> Result<u64> {
        let mut c = self.agent_conn()?;
        c.send(&HostMessage::Request(Request::ReadFile {
            path: path.to_string(),
        }))?;
        match c.recv()? {
            AgentMessage::FileInfo { .. } => {}
            AgentMessage::Error(e) => {
                self.idle_push(c.stream);
                return Err(Error::Agent(e.message));
            }
            other => return Err(unexpected(&other)),
        }
        let mut total = 0u64;
        loop {
            match c.recv()? {
                AgentMessage::FileChunk(bytes) => {
                    total += bytes.len() as u64;
                    sink.write_all(&bytes)
                        .map_err(io_error(format!("writing out {path}")))?;
                }
                AgentMessage::FileEnd => {
                    self.idle_push(c.stream);
                    return Ok(total);
                }
                AgentMessage::Error(e) => {
                    self.idle_push(c.stream);
                    return Err(Error::Agent(e.message));
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// A byte stream to TCP port `port` on the guest's loopback (the agent
    /// connects to 127.0.0.1, then ::1). Needs no guest network.
    pub fn connect(&self, port: u16) -> Result<UnixStream> {
        self.dialer.connect_tcp(port)
    }

    /// Sends `signal` to guest process `pid` (or its process group).
    pub fn signal(&self, pid: i32, signal: i32, group: bool) -> Result<()> {
        self.simple_request(Request::Signal { pid, signal, group })
    }

    /// Steps the guest's clock to the host's.
    pub fn sync_clock(&self) -> Result<()> {
        self.simple_request(Request::SetClock(Clock::now()))
    }

    /// Gives the guest a new identity: its hostname (unless `None`) and
    /// the environment every process started from now on gets beneath
    /// its own; the clock is stepped and the entropy pool reseeded with
    /// it. A restore does this with the restoring [`VmConfig`]'s.
    pub fn set_identity(&mut self, hostname: Option<&str>, env: &[(String, String)]) -> Result<()> {
        if let Some(h) = hostname {
            check_hostname(h)?;
        }
        self.send_identity(hostname, env)?;
        if let Some(h) = hostname {
            self.hostname = h.to_string();
        }
        Ok(())
    }

    fn send_identity(&self, hostname: Option<&str>, env: &[(String, String)]) -> Result<()> {
        let mut entropy = vec![0u8; 64];
        getrandom::fill(&mut entropy).map_err(|e| Error::Io {
            what: "reading host entropy".into(),
            source: io::Error::other(e.to_string()),
        })?;
        let mut c = self.agent_conn()?;
        // A guest that cannot answer (a restore gone wrong) must not
        // hold its caller forever.
        c.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_error("agent connection"))?;
        c.send(&HostMessage::Request(Request::Restored(proto::Restored {
            clock: Clock::now(),
            entropy,
            hostname: hostname.map(str::to_string),
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        })))?;
        let answer = c.recv();
        let _ = c.stream.set_read_timeout(None);
        match answer? {
            AgentMessage::Ok => {
                self.idle_push(c.stream);
                Ok(())
            }
            AgentMessage::Error(e) => {
                self.idle_push(c.stream);
                Err(Error::Agent(e.message))
            }
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) fn kept_processes(&self) -> &KeptProcesses {
        &self.kept
    }

    /// True when the VM was restored from a snapshot rather than booted.
    pub fn is_restored(&self) -> bool {
        self.about.as_ref().is_some_and(|a| a.restored)
    }

    /// The workload a restored VM's snapshot holds (its kept process,
    /// to [`Vm::attach_process`] to).
    pub fn workload(&self) -> Option<&Workload> {
        self.about.as_ref().and_then(|a| a.workload.as_ref())
    }

    /// Saves the VM into `dir` (created if need be) and lets it run on:
    /// the agent is told first (it syncs file systems and parks kept
    /// processes' output, so none is in flight), every vCPU paused, the
    /// devices and memory saved, then all resumes. [`Vm::restore`] (in
    /// any process) starts copies of it.
    pub fn snapshot(&self, dir: impl AsRef<Path>) -> Result<crate::SnapshotStats> {
        let info = self.snapshot_info()?;
        self.save(dir.as_ref(), &info, false)
    }

    /// Like [`Vm::snapshot`], but the VM ends at the pause.
    pub fn snapshot_and_stop(self, dir: impl AsRef<Path>) -> Result<crate::SnapshotStats> {
        let info = self.snapshot_info()?;
        self.snapshot_and_stop_into(dir.as_ref(), &info)
    }

    pub(crate) fn snapshot_and_stop_into(
        mut self,
        dir: &Path,
        info: &SnapshotInfo,
    ) -> Result<crate::SnapshotStats> {
        let stats = self.save(dir, info, true)?;
        if let Some(m) = self.machine.take() {
            let _ = m.wait();
        }
        self.dialer.idle.clear();
        Ok(stats)
    }

    /// What `vm.json` says of this VM (a bake adds the image, name and
    /// workload).
    pub(crate) fn snapshot_info(&self) -> Result<SnapshotInfo> {
        let about = self.about.as_ref().ok_or_else(|| {
            Error::InvalidOption("a VM another process runs cannot be snapshotted from here".into())
        })?;
        Ok(SnapshotInfo {
            format: crate::snapshot::SNAPSHOT_INFO_VERSION,
            name: None,
            image_id: None,
            image_reference: None,
            cpus: about.cpus,
            memory_bytes: about.memory_bytes,
            workload: about.workload.clone(),
            kept: about.kept_pids.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            bake_ms: 0,
            root_disk: DiskIdentity::of(&about.root_disk)?,
            network: about.network.clone(),
        })
    }

    fn save(&self, dir: &Path, info: &SnapshotInfo, stop: bool) -> Result<crate::SnapshotStats> {
        let (Some(about), Some(machine)) = (&self.about, &self.machine) else {
            return Err(Error::InvalidOption(
                "a VM another process runs cannot be snapshotted from here".into(),
            ));
        };
        if let Some(why) = &about.unsnapshottable {
            return Err(Error::InvalidOption(why.clone()));
        }
        self.simple_request(Request::Quiesce)?;
        let resume = |vm: &Vm| {
            vm.kept.unpark();
            vm.simple_request(Request::Resume)
        };
        if let Err(e) = self.kept.wait_parked(Duration::from_secs(10)) {
            let _ = resume(self);
            return Err(e);
        }
        let mut info = info.clone();
        info.kept.extend(self.kept.pids());
        info.kept.sort_unstable();
        info.kept.dedup();
        let saved = if stop {
            machine.snapshot_and_stop(dir)
        } else {
            machine.snapshot(dir)
        };
        if !stop {
            resume(self)?;
        }
        let stats = saved?;
        let json = serde_json::to_vec_pretty(&info).map_err(|e| Error::Io {
            what: "encoding vm.json".into(),
            source: io::Error::other(e.to_string()),
        })?;
        let tmp = dir.join(".vm.json.tmp");
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, dir.join("vm.json")))
            .map_err(io_error(format!(
                "writing {}",
                dir.join("vm.json").display()
            )))?;
        Ok(stats)
    }

    /// Starts a copy of the VM saved in `snapshot`: its memory mapped
    /// copy-on-write from the snapshot (pages shared by every restore),
    /// devices and vCPUs as they were, a fresh vsock socket. The agent is
    /// then told the time, given fresh entropy (its pool is reseeded) and
    /// `options`' hostname and environment. vCPUs and memory are the
    /// snapshot's; a writable disk or shares in `options` are refused.
    pub fn restore(snapshot: &Snapshot, options: &VmConfig) -> Result<Vm> {
        let started = Instant::now();
        let info = snapshot.info();
        check_snapshottable(options)?;
        check_hostname(&options.hostname)?;
        let disk = DiskIdentity::of(&info.root_disk.path)?;
        if disk != info.root_disk {
            return Err(Error::Snapshot {
                path: snapshot.path().to_path_buf(),
                why: format!(
                    "its root disk {} changed since it was taken (bake it again)",
                    info.root_disk.path.display()
                ),
            });
        }
        // The guest keeps the network settings it was baked with; this
        // restore gives its device a backend of its own and `options`'
        // policy.
        let network = match &info.network {
            None => None,
            Some(_) => Some(
                network::plan(&options.network)?.ok_or_else(|| Error::Snapshot {
                    path: snapshot.path().to_path_buf(),
                    why: "it has a network device, and this VM is to have no network".into(),
                })?,
            ),
        };
        let dir = RuntimeDir::create()?;
        let socket = dir.0.join("vsock.sock");
        let (console, console_out) = open_console(options)?;
        let network = network
            .map(|plan| plan.attach(&options.network))
            .transpose()?;
        let (net, passt) = match network {
            Some(a) => (Some(a.device), a.passt),
            None => (None, None),
        };
        let machine = Machine::restore(crate::RestoreConfig {
            snapshot: snapshot.path().to_path_buf(),
            console: console_out,
            forward_stdin: false,
            vsock_socket: Some(socket.clone()),
            net,
        })?;
        let created = started.elapsed();
        let about = About {
            cpus: info.cpus,
            memory_bytes: info.memory_bytes,
            root_disk: info.root_disk.path.clone(),
            unsnapshottable: None,
            kept_pids: info.kept.clone(),
            workload: info.workload.clone(),
            restored: true,
            network: info.network.clone(),
        };
        let helpers = Helpers {
            _virtiofsd: Vec::new(),
            passt,
        };
        let mut vm = Vm::owned(machine, socket, console, options, about, helpers, dir);
        // The guest handles the vsock transport reset when it runs again;
        // a connection the host opens before that is reset with the old
        // ones, so the first exchange is retried until it holds.
        let deadline = Instant::now() + options.ready_timeout.min(Duration::from_secs(30));
        loop {
            match vm.send_identity(Some(&options.hostname), &options.env) {
                Ok(()) => break,
                Err(Error::AgentGone | Error::AgentProtocol(_))
                    if Instant::now() < deadline && !vm.has_ended() =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e @ (Error::AgentGone | Error::AgentProtocol(_) | Error::VmEnded)) => {
                    return Err(vm.not_ready(&format!("the restored agent did not answer: {e}")));
                }
                Err(other) => return Err(other),
            }
        }
        vm.timings = StartTimings {
            create: created,
            kernel_boot: Duration::ZERO,
            agent_setup: Duration::ZERO,
            ready: started.elapsed(),
        };
        Ok(vm)
    }

    /// Stops the VM: the agent terminates every process (killing what is
    /// left after the grace period), syncs and powers off; if the guest
    /// has not ended a few seconds after that, it is stopped by force.
    pub fn stop(mut self) -> Result<ExitReason> {
        let grace = self.stop_grace;
        let patience = grace + Duration::from_secs(5);
        let asked = self.request_shutdown(grace, patience);
        let Some(machine) = self.machine.take() else {
            return Err(Error::VmEnded);
        };
        // A connection that ends after the request was sent is the guest
        // going down, as asked; only a refusal to take it means force.
        let going_down = matches!(asked, Ok(()) | Err(Error::AgentGone));
        if let Err(e) = &asked {
            log::debug!("asking the agent to shut down: {e}");
        }
        if !going_down || !machine.wait_ended(patience) {
            machine.stop();
        }
        self.dialer.idle.clear();
        machine.wait()
    }

    /// Sends `Shutdown`, waiting at most `patience` for the answer.
    fn request_shutdown(&self, grace: Duration, patience: Duration) -> Result<()> {
        let mut c = self.agent_conn()?;
        c.stream
            .set_read_timeout(Some(patience))
            .map_err(io_error("agent connection"))?;
        c.send(&HostMessage::Request(Request::Shutdown {
            grace_ms: u32::try_from(grace.as_millis()).unwrap_or(u32::MAX),
        }))?;
        self.finish_ok(c)
    }

    /// Ends the VM at once, from any thread (a watchdog, say): the guest
    /// is not asked, processes and connections in it fail, and the
    /// owner's `stop`, `kill` or drop then returns at once.
    pub fn force_stop(&self) {
        if let Some(m) = &self.machine {
            m.stop();
        }
    }

    /// Stops the VM at once, without asking the guest.
    pub fn kill(mut self) -> Result<ExitReason> {
        let machine = self.machine.take().ok_or(Error::VmEnded)?;
        machine.stop();
        machine.wait()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(m) = self.machine.take() {
            m.stop();
            let _ = m.wait();
        }
    }
}

/// Refuses a hostname the guest could not take.
fn check_hostname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(Error::InvalidOption(format!(
            "hostname {name:?} is not 1-64 letters, digits, '-' or '.'"
        )));
    }
    Ok(())
}

/// Opens connections into a VM: raw vsock ones, agent ones, TCP ones
/// through the agent.
#[derive(Clone, Debug)]
pub(crate) struct AgentDialer {
    socket: PathBuf,
    idle: IdleHandle,
}

impl AgentDialer {
    fn connect_vsock(&self, port: u32) -> Result<UnixStream> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(io_error(format!("connecting to {}", self.socket.display())))?;
        let refused = || Error::GuestPort(format!("nothing listens on guest vsock port {port}"));
        // The guest answers the connection request; one that cannot (a
        // wedged guest) must not hold the caller forever.
        s.set_read_timeout(Some(VSOCK_CONNECT_TIMEOUT))
            .map_err(io_error("vsock connection"))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|_| refused())?;
        let mut line = Vec::with_capacity(16);
        let mut byte = [0u8; 1];
        loop {
            match s.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if line.len() < 32 => line.push(byte[0]),
                _ => return Err(refused()),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(refused());
        }
        s.set_read_timeout(None)
            .map_err(io_error("vsock connection"))?;
        Ok(s)
    }

    fn agent_conn(&self) -> Result<AgentConn> {
        if let Some(c) = self.idle.pop() {
            return Ok(AgentConn {
                stream: c,
                handshake_pending: false,
            });
        }
        // The agent always listens: a refusal is its backlog overflowing
        // under a burst of connections, which clears in moments.
        let mut delay = Duration::from_millis(1);
        let deadline = Instant::now() + AGENT_CONNECT_PATIENCE;
        let mut stream = loop {
            match self.connect_vsock(AGENT_PORT) {
                Ok(s) => break s,
                Err(Error::GuestPort(_)) if Instant::now() < deadline => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(Error::GuestPort(_)) => {
                    return Err(Error::AgentProtocol("the agent is not listening".into()));
                }
                Err(other) => return Err(other),
            }
        };
        proto::send_handshake(&mut stream)?;
        Ok(AgentConn {
            stream,
            handshake_pending: true,
        })
    }

    /// A stream to TCP `port` on the guest's loopback, through the agent.
    pub(crate) fn connect_tcp(&self, port: u16) -> Result<UnixStream> {
        let mut c = self.agent_conn()?;
        c.send(&HostMessage::Request(Request::Connect { port }))?;
        match c.recv()? {
            AgentMessage::Ok => Ok(c.stream),
            AgentMessage::Error(e) => {
                self.idle.push(c.stream);
                Err(Error::GuestPort(e.message))
            }
            other => Err(unexpected(&other)),
        }
    }
}

/// Agent connections whose last request completed, kept for reuse.
#[derive(Clone, Debug, Default)]
pub(crate) struct IdleHandle(Arc<Mutex<Vec<UnixStream>>>);

impl IdleHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<UnixStream>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, c: UnixStream) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(c);
        }
    }

    /// An idle connection the agent has not closed meanwhile.
    fn pop(&self) -> Option<UnixStream> {
        while let Some(c) = self.lock().pop() {
            if sys::still_open(&c) {
                return Some(c);
            }
        }
        None
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// A connection to the agent during one request.
pub(crate) struct AgentConn {
    pub(crate) stream: UnixStream,
    /// A new connection: the agent's handshake precedes its first answer.
    handshake_pending: bool,
}

impl AgentConn {
    pub(crate) fn send(&mut self, m: &HostMessage) -> Result<()> {
        proto::write_frame(&mut self.stream, m).map_err(agent_io)
    }

    pub(crate) fn recv(&mut self) -> Result<AgentMessage> {
        if self.handshake_pending {
            proto::expect_handshake(&mut self.stream).map_err(agent_io)?;
            self.handshake_pending = false;
        }
        match proto::read_frame(&mut self.stream).map_err(agent_io)? {
            Some(m) => Ok(m),
            None => Err(Error::AgentGone),
        }
    }
}

/// A lost connection means the agent (or the VM) is gone; anything else
/// is a protocol failure worth naming.
pub(crate) fn agent_io(e: proto::Error) -> Error {
    match e {
        proto::Error::Io(_) | proto::Error::Truncated { .. } => Error::AgentGone,
        other => Error::AgentProtocol(other.to_string()),
    }
}

pub(crate) fn unexpected(m: &AgentMessage) -> Error {
    Error::AgentProtocol(format!("unexpected answer from the agent: {}", m.name()))
}
