//! Linux KVM backend for `supermachine-hypervisor`.
//!
//! Everything KVM-specific stays in this crate: the VMM sees only the
//! traits of `supermachine-hypervisor`.

#![cfg(target_os = "linux")]

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod kick;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuFd, VmFd};
use supermachine_hypervisor::{
    self as hv, Datamatch, InterruptLine, IoAddress, IoNotifier, VcpuExit, VmSpec,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
#[cfg(target_arch = "aarch64")]
pub use aarch64::{KvmHypervisor, KvmVm};
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, KvmHypervisor, KvmVm};

/// Errors inside this backend, before they cross the trait boundary.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// The error from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created or used.
    #[error("{op}: {source}")]
    EventFd {
        /// The operation.
        op: &'static str,
        /// The error from the kernel.
        #[source]
        source: std::io::Error,
    },
    /// KVM lacks a capability we rely on.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
}

impl From<KvmError> for hv::Error {
    fn from(e: KvmError) -> Self {
        match e {
            KvmError::Ioctl { op, source } => hv::Error::Os {
                op,
                source: std::io::Error::from_raw_os_error(source.errno()),
            },
            KvmError::EventFd { op, source } => hv::Error::Os { op, source },
            KvmError::MissingCapability(c) => {
                hv::Error::Unsupported(format!("KVM lacks the {c} capability"))
            }
        }
    }
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> hv::Error {
    move |source| KvmError::Ioctl { op, source }.into()
}

/// A KVM vCPU (its `Vcpu` methods are in the architecture's module).
pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    kick: Arc<kick::KickState>,
    /// What the architecture's state code needs besides.
    arch: arch::VcpuArch,
}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kick.detach();
    }
}

/// Opens `/dev/kvm` and checks that it has every capability in `needed`
/// (those of every architecture, then the caller's own).
fn open_kvm(needed: &[(Cap, &'static str)]) -> hv::Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| {
        hv::Error::Unavailable(format!(
            "cannot open /dev/kvm: {e} (is KVM enabled and accessible to this user?)"
        ))
    })?;
    let common = [
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
    ];
    for &(cap, name) in common.iter().chain(needed) {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability(name).into());
        }
    }
    kick::install_signal_handler()?;
    Ok(kvm)
}

/// Refuses a vCPU count outside `1..=max`.
fn check_vcpu_count(spec: &VmSpec, max: u32) -> hv::Result<()> {
    if spec.vcpu_count == 0 || spec.vcpu_count > max {
        return Err(hv::Error::Invalid(format!(
            "{} vCPUs requested; this host allows 1 to {max}",
            spec.vcpu_count
        )));
    }
    Ok(())
}

/// Gives the VM its RAM, one memory slot per region.
fn map_ram(vm: &VmFd, spec: &VmSpec) -> hv::Result<()> {
    for (slot, region) in spec.ram.iter().enumerate() {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: u32::try_from(slot)
                .map_err(|_| hv::Error::Invalid(format!("{} RAM regions", spec.ram.len())))?,
            flags: 0,
            guest_phys_addr: region.guest_addr(),
            memory_size: region.len(),
            userspace_addr: region.host_addr(),
        };
        // SAFETY: a RamRegion is the promise (made unsafely where it was
        // created) that its host range is a live, writable mapping that
        // outlives every VM given it; KVM checks the rest (alignment,
        // overlaps, the range being mapped).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// An irqfd for `gsi` (x86: the IOAPIC pin; arm64: the SPI number).
fn interrupt_line(vm: &VmFd, gsi: u32) -> hv::Result<Arc<dyn InterruptLine>> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| KvmError::EventFd {
        op: "eventfd",
        source,
    })?;
    vm.register_irqfd(&evt, gsi).map_err(ioctl("KVM_IRQFD"))?;
    Ok(Arc::new(KvmInterruptLine { evt }))
}

/// An ioeventfd for guest writes to `addr` that `datamatch` accepts.
fn io_notifier(
    vm: &VmFd,
    addr: IoAddress,
    datamatch: Datamatch,
) -> hv::Result<Box<dyn IoNotifier>> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| KvmError::EventFd {
        op: "eventfd",
        source,
    })?;
    let kvm_addr = match addr {
        IoAddress::Port(port) => kvm_ioctls::IoEventAddress::Pio(u64::from(port)),
        IoAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    };
    let registered = match datamatch {
        Datamatch::Any => vm.register_ioevent(&evt, &kvm_addr, NoDatamatch),
        Datamatch::U8(v) => vm.register_ioevent(&evt, &kvm_addr, v),
        Datamatch::U16(v) => vm.register_ioevent(&evt, &kvm_addr, v),
        Datamatch::U32(v) => vm.register_ioevent(&evt, &kvm_addr, v),
        Datamatch::U64(v) => vm.register_ioevent(&evt, &kvm_addr, v),
    };
    registered.map_err(ioctl("KVM_IOEVENTFD"))?;
    Ok(Box::new(KvmIoNotifier { evt }))
}

#[derive(Debug)]
struct KvmInterruptLine {
    evt: EventFd,
}

impl InterruptLine for KvmInterruptLine {
    fn trigger(&self) -> hv::Result<()> {
        self.evt.write(1).map_err(|source| hv::Error::Os {
            op: "raising an interrupt through its irqfd",
            source,
        })
    }
}

#[derive(Debug)]
struct KvmIoNotifier {
    evt: EventFd,
}

impl IoNotifier for KvmIoNotifier {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.evt.as_raw_fd()
    }

    fn consume(&self) -> hv::Result<u64> {
        match self.evt.read() {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(source) => Err(hv::Error::Os {
                op: "reading an ioeventfd",
                source,
            }),
        }
    }
}

/// Re-enters KVM_RUN with `immediate_exit` set: KVM finishes the exit
/// userspace just answered (the data of a port or MMIO read goes into
/// the guest's registers) and returns before running any instruction.
/// Until then that completion lives only inside KVM, where no state
/// ioctl sees it.
fn complete_pending_exit(fd: &mut VcpuFd) -> hv::Result<()> {
    let run_ptr: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
    // SAFETY: `run_ptr` is this vCPU's kvm_run mapping, alive as long
    // as `self.fd`; this thread owns the vCPU and it is not running.
    unsafe { std::ptr::write_volatile(&raw mut (*run_ptr).immediate_exit, 1) };
    let result = fd.run().map(|_| ());
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(&raw mut (*run_ptr).immediate_exit, 0) };
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(ioctl("KVM_RUN (completing the last exit)")(e)),
        Ok(()) => Err(hv::Error::Invalid(
            "KVM ran the guest although immediate_exit was set".into(),
        )),
    }
}

/// Runs the vCPU until it needs the VMM and says why it returned.
fn run_vcpu<'a>(fd: &'a mut VcpuFd, kick: &kick::KickState) -> hv::Result<VcpuExit<'a>> {
    let run_ptr: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
    if kick.begin_run(run_ptr) {
        return Ok(VcpuExit::Interrupted);
    }
    let result = fd.run();
    kick.end_run();
    let exit = match result {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // SAFETY: `run_ptr` points at this vCPU's kvm_run mapping,
            // which lives as long as `fd`; the run has returned, so
            // only this thread touches it.
            unsafe { (*run_ptr).immediate_exit = 0 };
            kick.clear();
            return Ok(VcpuExit::Interrupted);
        }
        Err(e) => return Err(ioctl("KVM_RUN")(e)),
    };
    use kvm_ioctls::VcpuExit as K;
    Ok(match exit {
        K::IoOut(port, data) => VcpuExit::IoOut { port, data },
        K::IoIn(port, data) => VcpuExit::IoIn { port, data },
        K::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
        K::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
        K::Hlt => VcpuExit::Halt,
        K::Shutdown => VcpuExit::Shutdown,
        K::Intr => VcpuExit::Interrupted,
        K::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExit::SystemReset,
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::SystemPowerOff,
            other => VcpuExit::Unhandled(format!("KVM system event {other}")),
        },
        K::InternalError => {
            // SAFETY: as above; the exit reason says the internal-error
            // member of the union is the valid one.
            let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
            VcpuExit::InternalError(format!(
                "KVM internal error, suberror {} ({})",
                internal.suberror,
                match internal.suberror {
                    1 => "instruction emulation failed",
                    2 => "nested exception while delivering an event",
                    3 => "delivery of an event failed",
                    4 => "unexpected VM exit",
                    _ => "unknown",
                }
            ))
        }
        K::FailEntry(reason, cpu) => VcpuExit::InternalError(format!(
            "KVM could not enter the guest on CPU {cpu}: hardware reason {reason:#x}"
        )),
        other => VcpuExit::Unhandled(format!("{other:?}")),
    })
}
