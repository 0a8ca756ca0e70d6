//! The supermachine VMM: builds a VM from a [`VmConfig`] and runs it.
//!
//! A boot goes: check the kernel file → lay out and map guest RAM → load
//! the kernel and initrd and write the boot tables → create the VM on the
//! hypervisor and map RAM into it → add the platform devices (serial
//! console, i8042 reset) → create the vCPUs with their boot state → start
//! one thread per vCPU and the event loop. Everything that can fail because
//! of the user's input fails before the hypervisor VM is created.

mod arch;
mod bus;
mod devices;
mod event_loop;
mod lifecycle;
mod pause;
pub mod snapshot;
mod vcpu;

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use supermachine_boot as boot;
use supermachine_hypervisor::{Datamatch, Hypervisor, IoAddress, RamRegion, Vm, VmSpec};
use supermachine_memory::GuestRam;
use supermachine_virtio_mmio::{MMIO_SIZE, MmioTransport, VirtioDevice};

pub use bus::{Bus, BusDevice};
use snapshot::DeviceSnapshot;
pub use snapshot::{DeviceKind, MachineState};
pub use supermachine_virtio_net::{
    DEFAULT_MTU, EgressPolicy, FrameBackend, PolicyMode, Rule as NetRule, format_mac,
    policy::is_private,
};
#[cfg(unix)]
pub use supermachine_virtio_net::{DatagramBackend, StreamBackend};

use devices::console::ConsoleSink;
use devices::serial::{InputRoom, IrqTrigger, SerialPort};
use devices::virtio;
use lifecycle::Lifecycle;

pub use arch::DEFAULT_CMDLINE;

/// Where the guest's serial console goes.
pub enum Console {
    /// This process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Any writer (for embedding: capture the console in memory, say).
    Writer(Box<dyn Write + Send>),
    /// Nowhere (the console is still watched for panics and power-off).
    Discard,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Console::Stdout => f.write_str("Stdout"),
            Console::File(p) => f.debug_tuple("File").field(p).finish(),
            Console::Writer(_) => f.write_str("Writer"),
            Console::Discard => f.write_str("Discard"),
        }
    }
}

/// What a VM is built from.
#[derive(Debug)]
pub struct VmConfig {
    /// x86_64: an ELF vmlinux or a bzImage; aarch64: an Image.
    pub kernel: PathBuf,
    /// Initial ramdisk (a cpio archive, possibly compressed).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Where the serial console's output goes.
    pub console: Console,
    /// Forward this process's standard input to the serial console.
    pub forward_stdin: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Give the guest a virtio-rng entropy device.
    pub entropy: bool,
    /// A virtio-vsock device and its host-side Unix socket.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares, each served by a vhost-user backend (virtiofsd)
    /// already listening on its socket. With any, guest RAM is a shared
    /// memfd mapping the backends map too.
    pub filesystems: Vec<FsConfig>,
    /// A virtio-net device and where its frames go.
    pub net: Option<NetConfig>,
}

/// A virtio-net device: its identity, what may leave through it, and the
/// backend its frames go to.
#[derive(Debug)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The link MTU the guest is told.
    pub mtu: u16,
    /// Enforced on every frame the guest sends.
    pub policy: EgressPolicy,
    /// Where frames go (passt's socket, say).
    pub backend: Box<dyn FrameBackend>,
}

impl NetConfig {
    fn device(self) -> Result<supermachine_virtio_net::Net> {
        Ok(supermachine_virtio_net::Net::new(
            supermachine_virtio_net::NetConfig {
                mac: self.mac,
                mtu: self.mtu,
                policy: self.policy,
            },
            self.backend,
        )?)
    }
}

/// A virtio-fs share: the tag the guest mounts and the vhost-user
/// backend's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// What the guest mounts by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The listening vhost-user socket of the backend.
    pub socket: PathBuf,
}

/// A virtio-vsock device: the guest's CID and the host Unix socket that
/// host programs connect to (`CONNECT <port>`); guest connections to host
/// port N go to `<socket>_N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The listening socket's path; must not exist yet.
    pub socket: PathBuf,
}

/// A virtio-blk disk backed by a raw image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// The guest may not write to it.
    pub read_only: bool,
}

impl VmConfig {
    /// A config for `kernel` with the defaults: 256 MiB, one vCPU,
    /// [`DEFAULT_CMDLINE`], console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_bytes: 256 << 20,
            vcpus: 1,
            console: Console::Stdout,
            forward_stdin: false,
            disks: Vec::new(),
            entropy: true,
            vsock: None,
            filesystems: Vec::new(),
            net: None,
        }
    }
}

/// How a VM ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (or halted for good).
    PowerOff,
    /// The guest rebooted; a supermachine VM ends on reboot.
    Reboot,
    /// The host asked the VM to stop.
    Stopped,
}

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Loading the kernel or writing the boot tables failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// A disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] supermachine_virtio_blk::Error),
    /// A virtio-fs device could not be set up.
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Fs(#[from] supermachine_virtio_fs::Error),
    /// The shared memory file for guest RAM could not be made.
    #[error("creating shared guest memory: {0}")]
    SharedMemory(#[source] std::io::Error),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] supermachine_virtio_vsock::Error),
    /// The network device could not be set up.
    #[error(transparent)]
    Net(#[from] supermachine_virtio_net::Error),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] supermachine_memory::Error),
    /// The hypervisor refused an operation.
    #[error(transparent)]
    Hypervisor(#[from] supermachine_hypervisor::Error),
    /// The console destination could not be opened.
    #[error("console output {path}: {source}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A host resource (thread, event) could not be created.
    #[error("{what}: {source}")]
    Host {
        /// What we tried to create.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The event loop failed.
    #[error("event loop failed: {0}")]
    EventLoop(String),
    /// The guest kernel panicked.
    #[error("guest kernel panicked: {0}")]
    GuestPanic(String),
    /// A vCPU triple-faulted (the CPU shut down).
    #[error("guest triple fault on vCPU {index}: the CPU shut down")]
    TripleFault {
        /// The vCPU.
        index: u32,
    },
    /// A vCPU could not go on.
    #[error("vCPU {index} failed: {detail}")]
    VcpuFailed {
        /// The vCPU.
        index: u32,
        /// What the hypervisor said.
        detail: String,
    },
    /// A vCPU thread panicked (a VMM bug).
    #[error("vCPU thread {0} panicked")]
    VcpuThreadPanicked(u32),
    /// A snapshot could not be taken or restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A snapshot file could not be read or written.
    #[error(transparent)]
    SnapshotFormat(#[from] supermachine_snapshot::Error),
    /// A snapshot file could not be opened.
    #[error("{path}: {source}")]
    SnapshotFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `wait` was called after the outcome had been taken.
    #[error("the VM's outcome was already taken")]
    AlreadyWaited,
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn host(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Host { what, source }
}

fn open_console(console: Console) -> Result<Box<dyn Write + Send>> {
    Ok(match console {
        Console::Stdout => Box::new(io::stdout()),
        Console::File(path) => {
            let file = File::create(&path).map_err(|source| Error::Console {
                path: path.clone(),
                source,
            })?;
            Box::new(LineWriter::new(file))
        }
        Console::Writer(w) => w,
        Console::Discard => Box::new(io::sink()),
    })
}

/// A VM that has been started.
pub struct RunningVm {
    lifecycle: Arc<Lifecycle>,
    vcpu_threads: Vec<(u32, JoinHandle<()>)>,
    event_thread: Option<JoinHandle<()>>,
    serial: Arc<Mutex<SerialPort>>,
    kickers: Vec<Arc<dyn supermachine_hypervisor::VcpuKicker>>,
    pause: Arc<pause::PauseControl>,
    /// The devices, for snapshots. Weak: the event loop owns them, and
    /// when it ends (the VM finished) they must go at once, closing their
    /// host sockets, not when this handle is dropped.
    devices: Vec<SavedDevice>,
    memory_bytes: u64,
    // Dropped in this order: the VM before the RAM it maps.
    vm: Option<Arc<dyn Vm>>,
    ram: Option<Arc<GuestRam>>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.vcpu_threads.len())
            .finish_non_exhaustive()
    }
}

/// What taking a snapshot did.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotStats {
    /// How long the vCPUs were paused.
    pub paused: std::time::Duration,
    /// Guest RAM covered by the memory file.
    pub memory_bytes: u64,
    /// Bytes of it written (non-zero pages).
    pub memory_data_bytes: u64,
}

impl RunningVm {
    /// Pauses the VM between two instructions and writes its state and
    /// memory into `dir` (`state` and `memory`, each renamed into place
    /// when complete); then the VM runs on, or with `stop` ends there
    /// (`wait` returns [`ExitReason::Stopped`]) without running another
    /// instruction. A VM with a device that cannot be saved (a virtio-fs
    /// share) is refused before it is paused.
    pub fn snapshot(&self, dir: &std::path::Path, stop: bool) -> Result<SnapshotStats> {
        if let Some(p) = self.devices.iter().find(|t| t.kind.is_none()) {
            return Err(Error::Snapshot(format!(
                "{} cannot be snapshotted (its state lives in another process)",
                p.name
            )));
        }
        let (Some(vm), Some(ram)) = (self.vm.as_ref(), self.ram.as_ref()) else {
            return Err(Error::Snapshot("the VM has ended".into()));
        };
        std::fs::create_dir_all(dir).map_err(|source| Error::SnapshotFile {
            path: dir.to_path_buf(),
            source,
        })?;
        let began = std::time::Instant::now();
        struct Resume<'a>(&'a pause::PauseControl);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                self.0.resume();
            }
        }
        let _resume = Resume(&self.pause);
        let vcpus = self.pause.pause_all(&self.kickers, &self.lifecycle)?;
        // Hold every device (and the UART) still while their state and
        // guest memory are read: the event loop cannot touch either.
        let strong: Vec<_> = self
            .devices
            .iter()
            .map(|d| d.transport.upgrade())
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Snapshot("the VM has ended".into()))?;
        let transports: Vec<_> = strong
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let devices = self
            .devices
            .iter()
            .zip(&transports)
            .map(|(placed, t)| DeviceSnapshot {
                kind: placed.kind.clone().expect("checked above"),
                base: placed.base,
                irq: placed.irq,
                transport: (&t.save()).into(),
            })
            .collect();
        let state = MachineState {
            arch: std::env::consts::ARCH.to_string(),
            memory_bytes: self.memory_bytes,
            vcpus,
            vm: vm.save_state()?,
            serial: (&serial.uart.state()).into(),
            devices,
        };
        let memory =
            supermachine_snapshot::write_memory(&dir.join(snapshot::MEMORY_FILE), ram.memory())?;
        supermachine_snapshot::write_state(
            &dir.join(snapshot::STATE_FILE),
            snapshot::FORMAT_VERSION,
            &state,
        )?;
        drop(serial);
        drop(transports);
        if stop {
            self.lifecycle.finish(Ok(ExitReason::Stopped));
        }
        Ok(SnapshotStats {
            paused: began.elapsed(),
            memory_bytes: memory.total_bytes,
            memory_data_bytes: memory.data_bytes,
        })
    }

    /// Asks the VM to stop; `wait` then returns [`ExitReason::Stopped`]
    /// unless the guest had already ended.
    pub fn stop(&self) {
        self.lifecycle.finish(Ok(ExitReason::Stopped));
    }

    /// True once the VM has ended (the outcome is still for `wait`).
    pub fn has_ended(&self) -> bool {
        self.lifecycle.is_finished()
    }

    /// Waits up to `timeout` for the VM to end; true if it has.
    pub fn wait_ended(&self, timeout: std::time::Duration) -> bool {
        self.lifecycle.wait_finished(timeout)
    }

    /// Waits for the VM to end and releases everything it held.
    pub fn wait(mut self) -> Result<ExitReason> {
        let outcome = self.lifecycle.wait();
        let mut outcome = outcome;
        for (index, t) in self.vcpu_threads.drain(..) {
            if t.join().is_err() && outcome.is_ok() {
                outcome = Err(Error::VcpuThreadPanicked(index));
            }
        }
        if let Some(t) = self.event_thread.take() {
            let _ = t.join();
        }
        let _ = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .uart
            .writer_mut()
            .flush();
        self.vm.take();
        self.ram.take();
        outcome
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() {
            self.lifecycle.finish(Ok(ExitReason::Stopped));
            for (_, t) in self.vcpu_threads.drain(..) {
                let _ = t.join();
            }
            if let Some(t) = self.event_thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Builds the VM described by `config` on `hypervisor` and starts it.
pub fn start(hypervisor: &dyn Hypervisor, mut config: VmConfig) -> Result<RunningVm> {
    let max_vcpus = arch::MAX_VCPUS.min(hypervisor.max_vcpus());
    if config.vcpus == 0 || config.vcpus > max_vcpus {
        return Err(Error::Config(format!(
            "{} vCPUs requested; between 1 and {max_vcpus} are possible here",
            config.vcpus,
        )));
    }
    // Guest-independent checks and loading first: no hypervisor VM exists
    // until the kernel, initrd and command line have all been accepted.
    let mut kernel_file = arch::KernelFile::open(&config.kernel)?;
    let virtio_devices = virtio_devices(&mut config)?;
    let layout = arch::memory_layout(config.memory_bytes)?;
    let ram = Arc::new(if config.filesystems.is_empty() {
        GuestRam::anonymous(&layout)?
    } else {
        // vhost-user backends map guest RAM themselves: it must be a
        // file they can be handed.
        GuestRam::file_backed(&layout, shared_memory_file()?)?
    });
    let mem = ram.memory();
    let virtio_slots: Vec<(u64, u32)> = virtio_devices.iter().map(|d| (d.base, d.irq)).collect();
    let entry = arch::load_guest(
        mem,
        &layout,
        &mut kernel_file,
        &arch::BootSetup {
            cmdline: &config.cmdline,
            initrd: config.initrd.as_deref(),
            vcpus: config.vcpus,
            virtio: &virtio_slots,
        },
    )?;
    let console_out = open_console(config.console)?;
    log::debug!("kernel {}", config.kernel.display());

    let vm = hypervisor.create_vm(&vm_spec(config.vcpus, &ram))?;
    let lifecycle = Arc::new(Lifecycle::new().map_err(host("creating an event"))?);
    let serial = Arc::new(Mutex::new(SerialPort {
        uart: vm_superio::Serial::with_events(
            IrqTrigger(vm.interrupt_line(arch::SERIAL_IRQ)?),
            serial_input_room()?,
            ConsoleSink::new(console_out, lifecycle.clone()),
        ),
    }));
    let mut transports = Vec::with_capacity(virtio_devices.len());
    for d in virtio_devices {
        let transport = MmioTransport::new(d.device, mem.clone(), vm.interrupt_line(d.irq)?)
            .map_err(|e| Error::Config(e.to_string()))?;
        transports.push(PlacedTransport {
            name: d.name,
            kind: d.kind,
            base: d.base,
            irq: d.irq,
            transport: Arc::new(Mutex::new(transport)),
        });
    }
    let vcpus = (0..config.vcpus).map(|_| VcpuSetup::Boot(entry)).collect();
    launch(Assembled {
        vm,
        ram,
        memory_bytes: config.memory_bytes,
        lifecycle,
        serial,
        transports,
        vcpus,
        forward_stdin: config.forward_stdin,
    })
}

/// How a snapshot is restored: the snapshot directory and this VM's own
/// host-side resources (each restore gets its own console and vsock
/// socket; the disks are the ones the snapshot names).
#[derive(Debug)]
pub struct RestoreConfig {
    /// The directory holding `state` and `memory`.
    pub snapshot: PathBuf,
    /// Where the restored guest's console goes.
    pub console: Console,
    /// Forward this process's standard input to the serial console.
    pub forward_stdin: bool,
    /// The vsock socket for the restored VM; required exactly when the
    /// snapshot has a vsock device.
    pub vsock_socket: Option<PathBuf>,
    /// The network device's backend and policy; required exactly when the
    /// snapshot has one, whose MAC and MTU it must repeat.
    pub net: Option<NetConfig>,
}

impl RestoreConfig {
    /// Restores `snapshot` with its console on stdout and no vsock.
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            console: Console::Stdout,
            forward_stdin: false,
            vsock_socket: None,
            net: None,
        }
    }
}

/// Reads and checks a snapshot's state file.
pub fn read_snapshot_state(dir: &std::path::Path) -> Result<snapshot::MachineState> {
    Ok(supermachine_snapshot::read_state(
        &dir.join(snapshot::STATE_FILE),
        snapshot::FORMAT_VERSION,
    )?)
}

/// Recreates the machine saved in `config.snapshot` on `hypervisor` and
/// starts it where it paused. Everything is checked (the state file's
/// integrity and version, the CPU, the devices and their host files)
/// before any vCPU runs; guest RAM maps the memory file private
/// copy-on-write, so restores share its clean pages and never change it.
pub fn restore(hypervisor: &dyn Hypervisor, config: RestoreConfig) -> Result<RunningVm> {
    let state = read_snapshot_state(&config.snapshot)?;
    let bad = |why: String| Error::Snapshot(why);
    if state.arch != std::env::consts::ARCH {
        return Err(bad(format!(
            "the snapshot is of an {} machine; this host runs {} guests",
            state.arch,
            std::env::consts::ARCH
        )));
    }
    let vcpu_count = u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX);
    if vcpu_count == 0 || vcpu_count > arch::MAX_VCPUS.min(hypervisor.max_vcpus()) {
        return Err(bad(format!("the snapshot has {vcpu_count} vCPUs")));
    }
    hypervisor.check_restorable(&state.vcpus)?;
    let layout = arch::memory_layout(state.memory_bytes)?;
    let memory_path = config.snapshot.join(snapshot::MEMORY_FILE);
    let memory_file = File::open(&memory_path).map_err(|source| Error::SnapshotFile {
        path: memory_path.clone(),
        source,
    })?;
    let ram = Arc::new(
        GuestRam::private_file(&layout, memory_file)
            .map_err(|e| bad(format!("{}: {e}", memory_path.display())))?,
    );
    let mem = ram.memory();

    // Every device's host side, checked against what the snapshot names.
    let mut devices = Vec::with_capacity(state.devices.len());
    let mut vsock_socket = config.vsock_socket;
    let mut net = config.net;
    for (i, saved) in state.devices.iter().enumerate() {
        let (expected_base, expected_irq) = arch::virtio_slot(i)
            .ok_or_else(|| bad(format!("the snapshot has too many devices ({})", i + 1)))?;
        if (saved.base, saved.irq) != (expected_base, expected_irq) {
            return Err(bad(format!(
                "device {i} sits at {:#x} IRQ {}, where this VMM places {expected_base:#x} IRQ {expected_irq}",
                saved.base, saved.irq
            )));
        }
        let (name, device): (String, Box<dyn VirtioDevice>) = match &saved.kind {
            DeviceKind::Block {
                path,
                read_only,
                size,
            } => {
                let block = supermachine_virtio_blk::Block::open(path, *read_only)?;
                let now = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                if now != *size {
                    return Err(bad(format!(
                        "disk {} was {size} bytes when the snapshot was taken and is {now} now",
                        path.display()
                    )));
                }
                (format!("virtio-blk {}", path.display()), Box::new(block))
            }
            DeviceKind::Vsock { cid } => {
                let socket = vsock_socket.take().ok_or_else(|| {
                    bad("the snapshot has a vsock device: a socket for it is needed".into())
                })?;
                (
                    format!("virtio-vsock {}", socket.display()),
                    vsock_device(*cid, &socket)?,
                )
            }
            DeviceKind::Entropy => (
                "virtio-rng".into(),
                Box::new(supermachine_virtio_rng::Rng::new()),
            ),
            DeviceKind::Net { mac, mtu } => {
                let net = net.take().ok_or_else(|| {
                    bad("the snapshot has a network device: a backend for it is needed".into())
                })?;
                if (net.mac, net.mtu) != (*mac, *mtu) {
                    return Err(bad(format!(
                        "the snapshot's network device has MAC {} and MTU {mtu}; this one {} and {}",
                        format_mac(mac),
                        format_mac(&net.mac),
                        net.mtu
                    )));
                }
                ("virtio-net".into(), Box::new(net.device()?))
            }
        };
        devices.push((name, device));
    }
    if vsock_socket.is_some() {
        return Err(bad(
            "a vsock socket was given, but the snapshot has no vsock device".into(),
        ));
    }
    if net.is_some() {
        return Err(bad(
            "a network backend was given, but the snapshot has no network device".into(),
        ));
    }
    let console_out = open_console(config.console)?;
    let vm = hypervisor.create_vm(&vm_spec(vcpu_count, &ram))?;
    vm.restore_state(&state.vm)?;
    let lifecycle = Arc::new(Lifecycle::new().map_err(host("creating an event"))?);
    let uart = vm_superio::Serial::from_state(
        &(&state.serial).into(),
        IrqTrigger(vm.interrupt_line(arch::SERIAL_IRQ)?),
        serial_input_room()?,
        ConsoleSink::new(console_out, lifecycle.clone()),
    )
    .map_err(|e| bad(format!("serial port state: {e:?}")))?;
    let serial = Arc::new(Mutex::new(SerialPort { uart }));
    let mut transports = Vec::with_capacity(devices.len());
    for ((name, device), saved) in devices.into_iter().zip(&state.devices) {
        let transport = MmioTransport::restore(
            device,
            mem.clone(),
            vm.interrupt_line(saved.irq)?,
            &(&saved.transport).into(),
        )
        .map_err(|e| bad(format!("{name}: {e}")))?;
        transports.push(PlacedTransport {
            name,
            kind: Some(saved.kind.clone()),
            base: saved.base,
            irq: saved.irq,
            transport: Arc::new(Mutex::new(transport)),
        });
    }
    let vcpus = state
        .vcpus
        .into_iter()
        .map(|saved| VcpuSetup::Restore(Box::new(saved)))
        .collect();
    launch(Assembled {
        vm,
        ram,
        memory_bytes: state.memory_bytes,
        lifecycle,
        serial,
        transports,
        vcpus,
        forward_stdin: config.forward_stdin,
    })
}

/// A VM of `vcpu_count` vCPUs whose RAM is `ram`.
fn vm_spec(vcpu_count: u32, ram: &Arc<GuestRam>) -> VmSpec {
    let ram = ram
        .host_mappings()
        .iter()
        // SAFETY: the mapping belongs to `ram`, which RunningVm keeps alive
        // until after the VM (and every vCPU) is dropped.
        .map(|m| unsafe { RamRegion::new(m.guest_addr, m.len, m.host_addr) })
        .collect();
    VmSpec { vcpu_count, ram }
}

fn serial_input_room() -> Result<InputRoom> {
    Ok(InputRoom {
        room: supermachine_host::Event::new().map_err(host("creating an event"))?,
    })
}

/// A virtio transport in the VM.
struct PlacedTransport {
    name: String,
    /// `None` for a device that cannot be snapshotted (virtio-fs).
    kind: Option<DeviceKind>,
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
}

/// A device as [`RunningVm::snapshot`] finds it.
struct SavedDevice {
    name: String,
    kind: Option<DeviceKind>,
    base: u64,
    irq: u32,
    transport: std::sync::Weak<Mutex<MmioTransport>>,
}

/// A VM with its devices and vCPUs made, not yet running.
struct Assembled {
    vm: Arc<dyn Vm>,
    ram: Arc<GuestRam>,
    memory_bytes: u64,
    lifecycle: Arc<Lifecycle>,
    serial: Arc<Mutex<SerialPort>>,
    transports: Vec<PlacedTransport>,
    vcpus: Vec<VcpuSetup>,
    forward_stdin: bool,
}

/// How each vCPU is set up, on the thread that will run it (some
/// hypervisors, Hypervisor.framework among them, tie a vCPU to the thread
/// that created it).
enum VcpuSetup {
    /// A cold boot's entry state.
    Boot(arch::Entry),
    /// A snapshot's state.
    Restore(Box<supermachine_hypervisor::VcpuState>),
}

/// Puts the devices on their buses, wires the notifications and starts
/// the event loop and one thread per vCPU.
fn launch(a: Assembled) -> Result<RunningVm> {
    let Assembled {
        vm,
        ram,
        memory_bytes,
        lifecycle,
        serial,
        transports,
        vcpus,
        forward_stdin,
    } = a;
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let bus_conflict =
        |o: bus::Overlap| Error::Config(format!("device ranges overlap at {:#x}", o.base));
    let platform = std::iter::once((arch::SERIAL, serial.clone() as bus::SharedDevice))
        .chain(arch::platform_devices(&lifecycle));
    for (place, device) in platform {
        let bus = match place.bus {
            arch::BusKind::Pio => &mut pio,
            arch::BusKind::Mmio => &mut mmio,
        };
        bus.insert(place.base, place.span, device)
            .map_err(bus_conflict)?;
    }
    let pio = Arc::new(pio);
    let mut subscribers = Vec::with_capacity(transports.len());
    for placed in &transports {
        let t = placed.transport.lock().unwrap_or_else(|p| p.into_inner());
        let queue_count = t.queue_count();
        #[cfg(unix)]
        let backend = t.backend_fd();
        drop(t);
        let notifiers = (0..queue_count as u32)
            .map(|q| {
                vm.io_notifier(
                    IoAddress::Mmio(placed.base + virtio::QUEUE_NOTIFY),
                    Datamatch::U32(q),
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        mmio.insert(placed.base, MMIO_SIZE, placed.transport.clone())
            .map_err(bus_conflict)?;
        subscribers.push(virtio::VirtioSubscriber {
            name: placed.name.clone(),
            transport: placed.transport.clone(),
            notifiers,
            #[cfg(unix)]
            backend,
        });
    }
    let mmio = Arc::new(mmio);
    let devices = transports
        .into_iter()
        .map(|t| SavedDevice {
            transport: Arc::downgrade(&t.transport),
            name: t.name,
            kind: t.kind,
            base: t.base,
            irq: t.irq,
        })
        .collect();
    let pause = Arc::new(pause::PauseControl::new(vcpus.len()));
    let restoring = vcpus.iter().any(|v| matches!(v, VcpuSetup::Restore(_)));
    let context = vcpu::VcpuContext {
        pio,
        mmio,
        lifecycle: lifecycle.clone(),
        pause: pause.clone(),
    };
    let (vcpu_threads, kickers, go) = start_vcpus(&vm, vcpus, &context)?;
    lifecycle.set_kickers(kickers.clone());
    if restoring {
        // Only now can an interrupt reach a vCPU and stay pending there.
        for subscriber in &subscribers {
            subscriber
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .raise_pending_interrupt();
        }
    }

    let input = if forward_stdin {
        Some(event_loop::InputForwarder {
            input: stdin_source()?,
            serial: serial.clone(),
            paused: false,
        })
    } else {
        None
    };
    let event_thread = {
        let lifecycle = lifecycle.clone();
        std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || event_loop::run(lifecycle, input, subscribers))
            .map_err(host("spawning the event loop thread"))?
    };
    let running = RunningVm {
        lifecycle: lifecycle.clone(),
        vcpu_threads,
        event_thread: Some(event_thread),
        serial,
        kickers,
        pause: pause.clone(),
        devices,
        memory_bytes,
        vm: Some(vm),
        ram: Some(ram),
    };
    for start in go {
        // A vCPU thread that has gone already has reported why.
        let _ = start.send(());
    }
    Ok(running)
}

/// The threads of vCPUs set up and waiting to run, their kickers, and
/// what tells each to start.
type StartedVcpus = (
    Vec<(u32, std::thread::JoinHandle<()>)>,
    Vec<Arc<dyn supermachine_hypervisor::VcpuKicker>>,
    Vec<std::sync::mpsc::Sender<()>>,
);

/// Spawns one thread per vCPU, which creates its vCPU and sets it up,
/// then waits for the word to run. If any vCPU fails to set up, every
/// thread is told to stop (dropping its vCPU on its own thread) and the
/// first failure is returned.
fn start_vcpus(
    vm: &Arc<dyn Vm>,
    setups: Vec<VcpuSetup>,
    context: &vcpu::VcpuContext,
) -> Result<StartedVcpus> {
    use std::sync::mpsc;
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(setups.len());
    let mut go = Vec::with_capacity(setups.len());
    let mut spawn_error = None;
    for (index, setup) in (0u32..).zip(setups) {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let vm = vm.clone();
        let ready = ready_tx.clone();
        let ctx = context.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let made = vcpu::create(vm.as_ref(), index, setup);
                drop(vm);
                let vcpu = match made {
                    Ok(vcpu) => {
                        let _ = ready.send((index, Ok(vcpu.kicker())));
                        vcpu
                    }
                    Err(e) => {
                        let _ = ready.send((index, Err(e)));
                        return;
                    }
                };
                drop(ready);
                if go_rx.recv().is_ok() {
                    vcpu::run(vcpu, ctx);
                }
            });
        match spawned {
            Ok(thread) => {
                threads.push((index, thread));
                go.push(go_tx);
            }
            Err(e) => {
                spawn_error = Some(host("spawning a vCPU thread")(e));
                break;
            }
        }
    }
    drop(ready_tx);
    let mut kickers: Vec<Option<Arc<dyn supermachine_hypervisor::VcpuKicker>>> =
        vec![None; threads.len()];
    let mut failure = spawn_error;
    for (index, result) in ready_rx.iter() {
        match result {
            Ok(kicker) => kickers[index as usize] = Some(kicker),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let kickers: Option<Vec<_>> = kickers.into_iter().collect();
    match (failure, kickers) {
        (None, Some(kickers)) => Ok((threads, kickers, go)),
        (failure, _) => {
            drop(go);
            for (_, thread) in threads {
                let _ = thread.join();
            }
            Err(failure.unwrap_or_else(|| Error::VcpuFailed {
                index: 0,
                detail: "a vCPU thread ended before its vCPU was made".into(),
            }))
        }
    }
}

/// A virtio device's host side and where the guest finds it.
struct PlacedDevice {
    name: String,
    kind: Option<DeviceKind>,
    device: Box<dyn VirtioDevice>,
    base: u64,
    irq: u32,
}

/// Opens every virtio device's host side (disk images first, so a missing
/// one is reported before anything else is built) and gives each its MMIO
/// base and interrupt line.
fn virtio_devices(config: &mut VmConfig) -> Result<Vec<PlacedDevice>> {
    let mut devices = Vec::new();
    let mut place =
        |name: String, kind: Option<DeviceKind>, device: Box<dyn VirtioDevice>| -> Result<()> {
            let (base, irq) = arch::virtio_slot(devices.len()).ok_or_else(|| {
                Error::Config(format!(
                    "too many virtio devices: at most {} fit",
                    arch::MAX_VIRTIO_DEVICES
                ))
            })?;
            devices.push(PlacedDevice {
                name,
                kind,
                device,
                base,
                irq,
            });
            Ok(())
        };
    for disk in &config.disks {
        let block = supermachine_virtio_blk::Block::open(&disk.path, disk.read_only)?;
        let size = std::fs::metadata(&disk.path).map(|m| m.len()).unwrap_or(0);
        place(
            format!("virtio-blk {}", disk.path.display()),
            Some(DeviceKind::Block {
                path: disk.path.clone(),
                read_only: disk.read_only,
                size,
            }),
            Box::new(block),
        )?;
    }
    if let Some(v) = &config.vsock {
        place(
            format!("virtio-vsock {}", v.socket.display()),
            Some(DeviceKind::Vsock { cid: v.cid }),
            vsock_device(v.cid, &v.socket)?,
        )?;
    }
    if let Some(net) = config.net.take() {
        let kind = DeviceKind::Net {
            mac: net.mac,
            mtu: net.mtu,
        };
        place("virtio-net".into(), Some(kind), Box::new(net.device()?))?;
    }
    #[cfg(target_os = "linux")]
    for fs in &config.filesystems {
        let device = supermachine_virtio_fs::Fs::new(&fs.tag, &fs.socket)?;
        place(format!("virtio-fs {}", fs.tag), None, Box::new(device))?;
    }
    #[cfg(not(target_os = "linux"))]
    if !config.filesystems.is_empty() {
        return Err(Error::Config(NO_VIRTIO_FS.into()));
    }
    if config.entropy {
        place(
            "virtio-rng".into(),
            Some(DeviceKind::Entropy),
            Box::new(supermachine_virtio_rng::Rng::new()),
        )?;
    }
    Ok(devices)
}

/// This process's standard input, as the event loop reads it: polled
/// directly on Unix; on Windows, where neither a console nor a pipe handle
/// can be polled for bytes, read by a thread of its own.
fn stdin_source() -> Result<Box<dyn event_loop::InputSource>> {
    #[cfg(unix)]
    return Ok(Box::new(io::stdin()));
    #[cfg(not(unix))]
    return supermachine_host::ThreadedReader::spawn(io::stdin(), "vmm-stdin")
        .map(|reader| Box::new(reader) as Box<dyn event_loop::InputSource>)
        .map_err(host("starting the console input thread"));
}

/// The virtio-vsock device for guest `cid`, listening on `socket`.
#[cfg(unix)]
fn vsock_device(cid: u64, socket: &std::path::Path) -> Result<Box<dyn VirtioDevice>> {
    Ok(Box::new(supermachine_virtio_vsock::Vsock::new(
        cid, socket,
    )?))
}

/// The vsock device's host side is Unix sockets.
#[cfg(not(unix))]
fn vsock_device(_cid: u64, _socket: &std::path::Path) -> Result<Box<dyn VirtioDevice>> {
    Err(Error::Config(
        "virtio-vsock's host side is Unix sockets, which this build for Windows does not have yet"
            .into(),
    ))
}

/// An anonymous shared-memory file (memfd) for guest RAM, closed on exec.
#[cfg(target_os = "linux")]
fn shared_memory_file() -> Result<std::fs::File> {
    rustix::fs::memfd_create("supermachine-guest-ram", rustix::fs::MemfdFlags::CLOEXEC)
        .map(std::fs::File::from)
        .map_err(|e| Error::SharedMemory(e.into()))
}

/// Why a VM with virtio-fs shares cannot be made here.
#[cfg(not(target_os = "linux"))]
const NO_VIRTIO_FS: &str =
    "sharing host directories needs virtiofsd (vhost-user), which runs on Linux only";

/// Guest RAM is shared with a vhost-user backend only for virtio-fs,
/// which this platform does not have.
#[cfg(not(target_os = "linux"))]
fn shared_memory_file() -> Result<std::fs::File> {
    Err(Error::Config(NO_VIRTIO_FS.into()))
}
