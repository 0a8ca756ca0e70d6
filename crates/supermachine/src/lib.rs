//! supermachine: Linux microVMs behind one small API.
//!
//! Run processes in an image's VM through its guest agent:
//!
//! ```no_run
//! use std::time::Duration;
//! use supermachine::{Image, VmConfig};
//!
//! let image = Image::open("demo")?; // or Image::pull("alpine"), Image::load(path)
//! let vm = image.start(&VmConfig::default())?;
//! let out = vm
//!     .exec(["sh", "-c", "echo $GREETING from $(hostname)"])
//!     .env("GREETING", "hello")
//!     .timeout(Duration::from_secs(10))
//!     .output()?;
//! assert!(out.status.success());
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! // The image's own command, as `supermachine run` starts it:
//! let spec = image.command(&Default::default())?;
//! let status = vm.exec_spec(&spec).output()?.status;
//! vm.write_file("/tmp/data.txt", b"staged by the host")?;
//! let back = vm.read_file("/tmp/data.txt")?;
//! vm.stop()?;
//! # Ok::<(), supermachine::Error>(())
//! ```
//!
//! Boot a bare kernel and initramfs (no agent):
//!
//! ```no_run
//! use supermachine::{Machine, MachineConfig};
//! let mut config = MachineConfig::new("vmlinux");
//! config.initrd = Some("initramfs.cpio".into());
//! let exit = Machine::start(config)?.wait()?;
//! println!("guest ended: {exit:?}");
//! # Ok::<(), supermachine::Error>(())
//! ```

use std::sync::Arc;

mod exec;
mod guest;
mod image;
mod network;
mod pool;
mod ports;
mod shares;
mod snapshot;
mod sys;
mod vm;

pub use exec::{
    ExecBuilder, ExecOutput, ExitInfo, ExitStatus, OutputReader, Process, ProcessController,
    ProcessStdin,
};
pub use guest::GuestImage;
pub use image::Image;
pub use network::{
    GATEWAY_IPV4, GATEWAY_IPV6, GUEST_IPV4, GUEST_IPV6, Network, NetworkMode, RESOLVER_IPV4,
    RESOLVER_IPV6, find_passt, parse_host_entry,
};
pub use pool::{Pool, PoolConfig, PoolStats, PooledVm};
pub use ports::{PortForward, PortMapping};
pub use shares::{Share, find_virtiofsd};
pub use snapshot::{
    BakeOptions, DiskIdentity, SNAPSHOT_INFO_VERSION, Snapshot, SnapshotInfo, Workload,
    WorkloadSpec, baked_snapshots,
};
pub use supermachine_vmm::{NetRule, PolicyMode};
pub use vm::{StartTimings, Vm, VmConfig, runtime_dir};

pub use supermachine_hypervisor::Hypervisor;
/// OCI images: pull, load, the content store, root file system disks.
pub use supermachine_oci as images;
/// A bare VM: kernel, initrd, command line, devices (no image, no agent).
pub use supermachine_vmm::VmConfig as MachineConfig;
pub use supermachine_vmm::{
    Console, DEFAULT_CMDLINE, DiskConfig, ExitReason, RestoreConfig, SnapshotStats, VsockConfig,
};

/// Errors from the library API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable hypervisor on this host.
    #[error(transparent)]
    Hypervisor(#[from] supermachine_hypervisor::Error),
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] supermachine_vmm::Error),
    /// Pulling, loading or preparing an image failed.
    #[error(transparent)]
    Image(#[from] supermachine_oci::Error),
    /// No guest kernel and agent to boot.
    #[error("{0}")]
    GuestImage(String),
    /// An option is out of range.
    #[error("{0}")]
    InvalidOption(String),
    /// A host file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest agent did not come up; `console` is the guest console's
    /// last output, which says why.
    #[error("{why}{}", console_excerpt(console))]
    AgentNotReady {
        /// What happened.
        why: String,
        /// The end of the guest console.
        console: String,
    },
    /// The agent and this host do not understand each other.
    #[error("guest agent protocol: {0}")]
    AgentProtocol(String),
    /// The agent's connection ended: the guest stopped or crashed.
    #[error("the guest agent's connection ended (the VM stopped?)")]
    AgentGone,
    /// A snapshot cannot be used.
    #[error("snapshot {}: {why}", path.display())]
    Snapshot {
        /// Its directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The VM has ended.
    #[error("the VM has ended")]
    VmEnded,
    /// The agent refused or failed a request.
    #[error("{0}")]
    Agent(String),
    /// A process could not be started.
    #[error("{message}")]
    Exec {
        /// Why, in one line.
        message: String,
        /// The program (or its working directory or user) does not exist.
        not_found: bool,
        /// The guest refused to run it.
        permission_denied: bool,
    },
    /// A guest port could not be reached.
    #[error("{0}")]
    GuestPort(String),
    /// The process has ended; it takes no more input or signals.
    #[error("the process has ended")]
    ProcessEnded,
    /// What was asked is not built for this host yet.
    #[error("{0}")]
    Unsupported(String),
}

/// `map_err` for a host I/O failure while doing `what`.
pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The last console line that says something, for one-line errors.
fn console_excerpt(console: &str) -> String {
    console
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| format!(" (guest console: {l})"))
        .unwrap_or_default()
}

impl From<supermachine_agent_protocol::Error> for Error {
    fn from(e: supermachine_agent_protocol::Error) -> Self {
        vm::agent_io(e)
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// This platform's hypervisor: KVM on Linux, Hypervisor.framework on
/// macOS (Apple Silicon), the Windows Hypervisor Platform on Windows.
pub fn default_hypervisor() -> Result<Arc<dyn Hypervisor>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Arc::new(supermachine_hypervisor_kvm::KvmHypervisor::new()?))
    }
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    {
        Ok(Arc::new(supermachine_hypervisor_hvf::HvfHypervisor::new()?))
    }
    #[cfg(all(windows, target_arch = "x86_64"))]
    {
        Ok(Arc::new(supermachine_hypervisor_whp::WhpHypervisor::new()?))
    }
    #[cfg(not(any(
        target_os = "linux",
        all(target_os = "macos", target_arch = "aarch64"),
        all(windows, target_arch = "x86_64")
    )))]
    {
        Err(supermachine_hypervisor::Error::Unavailable(
            "no hypervisor backend for this platform: KVM on Linux, Hypervisor.framework on Apple Silicon Macs, WHP on x86_64 Windows".into(),
        )
        .into())
    }
}

/// A running microVM.
#[derive(Debug)]
pub struct Machine {
    running: supermachine_vmm::RunningVm,
    _hypervisor: Arc<dyn Hypervisor>,
}

impl Machine {
    /// Boots `config` on this platform's hypervisor.
    pub fn start(config: MachineConfig) -> Result<Self> {
        Self::start_on(default_hypervisor()?, config)
    }

    /// Boots `config` on the given hypervisor.
    pub fn start_on(hypervisor: Arc<dyn Hypervisor>, config: MachineConfig) -> Result<Self> {
        let running = supermachine_vmm::start(hypervisor.as_ref(), config)?;
        Ok(Self {
            running,
            _hypervisor: hypervisor,
        })
    }

    /// Restores a machine saved by [`Machine::snapshot`] (in this process
    /// or any other) on this platform's hypervisor; it runs on from where
    /// it paused.
    pub fn restore(config: RestoreConfig) -> Result<Self> {
        Self::restore_on(default_hypervisor()?, config)
    }

    /// Restores a machine on the given hypervisor.
    pub fn restore_on(hypervisor: Arc<dyn Hypervisor>, config: RestoreConfig) -> Result<Self> {
        let running = supermachine_vmm::restore(hypervisor.as_ref(), config)?;
        Ok(Self {
            running,
            _hypervisor: hypervisor,
        })
    }

    /// Pauses the machine, saves it into `dir` (a state file and a sparse
    /// memory file; see `docs/snapshot.md`) and lets it run on.
    pub fn snapshot(&self, dir: impl AsRef<std::path::Path>) -> Result<SnapshotStats> {
        Ok(self.running.snapshot(dir.as_ref(), false)?)
    }

    /// Like [`Machine::snapshot`], but the machine ends at the pause
    /// without running another instruction.
    pub fn snapshot_and_stop(&self, dir: impl AsRef<std::path::Path>) -> Result<SnapshotStats> {
        Ok(self.running.snapshot(dir.as_ref(), true)?)
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        self.running.stop();
    }

    /// True once the VM has ended.
    pub fn has_ended(&self) -> bool {
        self.running.has_ended()
    }

    /// Waits up to `timeout` for the VM to end; true if it has.
    pub fn wait_ended(&self, timeout: std::time::Duration) -> bool {
        self.running.wait_ended(timeout)
    }

    /// Waits until the VM ends.
    pub fn wait(self) -> Result<ExitReason> {
        Ok(self.running.wait()?)
    }
}
