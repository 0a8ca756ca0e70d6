//! supermachine: Linux microVMs behind one small API.
//!
//! ```no_run
//! use supermachine::{Machine, VmConfig};
//! let mut config = VmConfig::new("vmlinux");
//! config.initrd = Some("initramfs.cpio".into());
//! let exit = Machine::start(config)?.wait()?;
//! println!("guest ended: {exit:?}");
//! # Ok::<(), supermachine::Error>(())
//! ```

use std::sync::Arc;

pub use supermachine_hypervisor::Hypervisor;
/// OCI images: pull, load, the content store, root file system disks.
pub use supermachine_oci as images;
pub use supermachine_vmm::{
    Console, DEFAULT_CMDLINE, DiskConfig, ExitReason, VmConfig, VsockConfig,
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
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// This platform's hypervisor: KVM on Linux.
pub fn default_hypervisor() -> Result<Arc<dyn Hypervisor>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Arc::new(supermachine_hypervisor_kvm::KvmHypervisor::new()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(supermachine_hypervisor::Error::Unavailable(
            "no hypervisor backend for this platform yet (KVM on Linux only)".into(),
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
    pub fn start(config: VmConfig) -> Result<Self> {
        Self::start_on(default_hypervisor()?, config)
    }

    /// Boots `config` on the given hypervisor.
    pub fn start_on(hypervisor: Arc<dyn Hypervisor>, config: VmConfig) -> Result<Self> {
        let running = supermachine_vmm::start(hypervisor.as_ref(), config)?;
        Ok(Self {
            running,
            _hypervisor: hypervisor,
        })
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        self.running.stop();
    }

    /// Waits until the VM ends.
    pub fn wait(self) -> Result<ExitReason> {
        Ok(self.running.wait()?)
    }
}
