//! The backend-agnostic hypervisor interface: `Hypervisor` -> `Vm` -> `Vcpu`,
//! and the state types of each architecture (`x86_64`, `aarch64`) that
//! backends produce and consume.
//!
//! Nothing here names a particular hypervisor: KVM, HVF and WHP each
//! implement these traits in their own crate. The VMM holds only
//! `Arc<dyn Hypervisor>`, `Arc<dyn Vm>` and `Box<dyn Vcpu>`.

pub mod aarch64;
pub mod watch;
pub mod x86_64;

use std::fmt::Debug;
use std::sync::Arc;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("supermachine runs x86_64 and aarch64 guests on hosts of the same architecture");

/// The host's (and so the guest's) architecture: its state types are the
/// ones the traits below take.
#[cfg(target_arch = "aarch64")]
pub use aarch64 as arch;
/// The host's (and so the guest's) architecture: its state types are the
/// ones the traits below take.
#[cfg(target_arch = "x86_64")]
pub use x86_64 as arch;

#[cfg(target_arch = "aarch64")]
pub use aarch64::{SysReg, SysRegId};
pub use arch::{CpuState, Regs, VcpuState, VmState};
#[cfg(target_arch = "x86_64")]
pub use x86_64::{DescriptorTable, FpuState, MsrEntry, Segment, SpecialRegs};

/// Errors any backend reports through this interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor is not present on this host or cannot be opened.
    #[error("hypervisor not available: {0}")]
    Unavailable(String),
    /// An operation of the hypervisor failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What we asked the hypervisor to do.
        op: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The backend does not support what was asked.
    #[error("not supported by this hypervisor: {0}")]
    Unsupported(String),
    /// The request was invalid (out of range, overlapping, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What a VM needs to know before it is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Number of vCPUs that will be created (1..=max_vcpus()).
    pub vcpu_count: u32,
    /// Guest RAM, mapped before anything else in the VM exists.
    pub ram: Vec<RamRegion>,
}

/// A range of host memory that a VM sees as guest RAM.
///
/// Making one is the `unsafe` step: it is the promise that the host
/// range outlives every VM given it. A backend maps the regions when it
/// creates the VM, in the order its hypervisor makes cheapest (on KVM,
/// before the in-kernel interrupt controllers, see `docs/snapshot.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    guest_addr: u64,
    len: u64,
    host_addr: u64,
}

impl RamRegion {
    /// `len` bytes of host memory at `host_addr`, seen at guest physical
    /// `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr + len` must be a valid, writable mapping in
    /// this process that stays mapped for as long as any VM created with
    /// this region exists; the guest reads and writes it behind Rust's back.
    pub unsafe fn new(guest_addr: u64, len: u64, host_addr: u64) -> Self {
        Self {
            guest_addr,
            len,
            host_addr,
        }
    }

    /// Guest physical start.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the region is mapped in this process.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }
}

/// A hypervisor on this host.
pub trait Hypervisor: Send + Sync + Debug {
    /// Short name ("kvm", "hvf", "whp").
    fn name(&self) -> &'static str;
    /// The most vCPUs one VM may have.
    fn max_vcpus(&self) -> u32;
    /// Creates a VM with its guest RAM mapped and its platform interrupt
    /// controllers and timer.
    fn create_vm(&self, spec: &VmSpec) -> Result<Arc<dyn Vm>>;
    /// Whether vCPUs saved as `vcpus` (on this host or another) can be
    /// restored here: same CPU vendor and model, every CPUID feature the
    /// guest was given available, the TSC frequency reproducible. Checked
    /// before anything is created, so a mismatch fails cleanly.
    fn check_restorable(&self, vcpus: &[VcpuState]) -> Result<()>;
}

/// Where a guest write raises an `IoNotifier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAddress {
    /// An x86 I/O port.
    Port(u16),
    /// A guest physical MMIO address.
    Mmio(u64),
}

/// Which guest writes raise an [`IoNotifier`]: any write, or only a write
/// of exactly this width and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datamatch {
    /// Any write, of any width.
    Any,
    /// A 1-byte write of this value.
    U8(u8),
    /// A 2-byte write of this value.
    U16(u16),
    /// A 4-byte write of this value.
    U32(u32),
    /// An 8-byte write of this value.
    U64(u64),
}

/// A VM: guest memory, vCPUs and interrupt routing.
pub trait Vm: Send + Sync + Debug {
    /// Creates vCPU `index` (0-based, below the `VmSpec`'s count) with its CPU
    /// identity (CPUID, APIC id) set up for a `count`-CPU guest.
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>>;

    /// An edge-triggered interrupt line for global system interrupt `gsi`.
    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>>;

    /// A notifier raised (without a vCPU exit) whenever the guest writes to
    /// `addr` a value that `datamatch` accepts.
    fn io_notifier(&self, addr: IoAddress, datamatch: Datamatch) -> Result<Box<dyn IoNotifier>>;

    /// The interrupt controllers', timer's and clock's state. Call with
    /// every vCPU paused.
    fn save_state(&self) -> Result<VmState>;
    /// Sets what [`Vm::save_state`] returned, before any vCPU is restored.
    fn restore_state(&self, state: &VmState) -> Result<()>;
}

/// An interrupt input of the guest's interrupt controller.
pub trait InterruptLine: Send + Sync + Debug {
    /// Raises an edge on the line. Safe to call from any thread.
    fn trigger(&self) -> Result<()>;
}

/// A host-waitable event that a guest write signals.
pub trait IoNotifier: Send + Sync + Debug {
    /// A file descriptor that becomes readable when the guest has written.
    #[cfg(unix)]
    fn as_raw_fd(&self) -> std::os::fd::RawFd;
    /// A Win32 event that becomes signalled when the guest has written.
    #[cfg(windows)]
    fn as_raw_handle(&self) -> std::os::windows::io::RawHandle;
    /// Consumes pending notifications; returns how many arrived (0 if none).
    fn consume(&self) -> Result<u64>;
}

/// Makes a vCPU's `run()` return [`VcpuExit::Interrupted`] from another thread.
pub trait VcpuKicker: Send + Sync + Debug {
    /// Requests the exit. If the vCPU is not in `run()`, its next `run()`
    /// returns `Interrupted` at once.
    fn kick(&self);
}

/// Why `Vcpu::run` returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest wrote `data` to I/O port `port`, `data.len()` bytes at once.
    IoOut {
        /// First port.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest read I/O port `port`; fill `data` before the next `run()`.
    IoIn {
        /// First port.
        port: u16,
        /// Bytes to return to the guest.
        data: &'a mut [u8],
    },
    /// The guest read unmapped guest physical memory at `addr`; fill `data`.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Bytes to return to the guest.
        data: &'a mut [u8],
    },
    /// The guest wrote `data` to unmapped guest physical memory at `addr`.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The vCPU executed `hlt` with no interrupt controller to wait on it.
    Halt,
    /// The CPU shut down (on x86: a triple fault).
    Shutdown,
    /// The guest asked the platform for a reset (through the hypervisor).
    SystemReset,
    /// The guest asked the platform to power off (through the hypervisor).
    SystemPowerOff,
    /// A [`VcpuKicker`] asked this `run()` to return.
    Interrupted,
    /// The hypervisor could not emulate or enter the guest.
    InternalError(String),
    /// An exit this interface does not model.
    Unhandled(String),
}

/// One virtual CPU. Owned by the thread that runs it.
pub trait Vcpu: Send + Debug {
    /// The vCPU's index in its VM.
    fn index(&self) -> u32;
    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// A handle other threads use to make `run()` return.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// The registers the guest's code runs on (x86_64: general-purpose,
    /// RIP and RFLAGS; aarch64: X0-X30, SP, PC, PSTATE, SIMD).
    fn regs(&self) -> Result<Regs>;
    /// Sets what [`Vcpu::regs`] returns.
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;

    /// Segment, control and descriptor-table registers.
    #[cfg(target_arch = "x86_64")]
    fn special_regs(&self) -> Result<SpecialRegs>;
    /// Sets segment, control and descriptor-table registers.
    #[cfg(target_arch = "x86_64")]
    fn set_special_regs(&mut self, sregs: &SpecialRegs) -> Result<()>;
    /// Sets the x87/SSE control state.
    #[cfg(target_arch = "x86_64")]
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    /// Reads the MSRs named by `indices`.
    #[cfg(target_arch = "x86_64")]
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>>;
    /// Writes MSRs; every entry must be accepted.
    #[cfg(target_arch = "x86_64")]
    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()>;

    /// Reads the EL1/EL0 system register `id`.
    #[cfg(target_arch = "aarch64")]
    fn sys_reg(&self, id: SysRegId) -> Result<u64>;
    /// Writes the EL1/EL0 system register `id`.
    #[cfg(target_arch = "aarch64")]
    fn set_sys_reg(&mut self, id: SysRegId, value: u64) -> Result<()>;

    /// The vCPU's complete state. Call on a vCPU that is not in `run()`;
    /// an exit the VMM has just answered (a port read, say) is completed
    /// first, without running any further guest instruction, so the state
    /// is that between two instructions.
    fn save_state(&mut self) -> Result<VcpuState>;
    /// Sets everything [`Vcpu::save_state`] returned, in the order the
    /// hardware needs, on a vCPU that has never run.
    fn restore_state(&mut self, state: &VcpuState) -> Result<()>;

    /// Sets the complete boot state in one call.
    #[cfg(target_arch = "x86_64")]
    fn set_cpu_state(&mut self, state: &CpuState) -> Result<()> {
        self.set_special_regs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        self.set_fpu(&state.fpu)?;
        self.set_msrs(&state.msrs)
    }

    /// Sets the complete boot state in one call: the boot registers over
    /// the vCPU's reset state.
    #[cfg(target_arch = "aarch64")]
    fn set_cpu_state(&mut self, state: &CpuState) -> Result<()> {
        let mut regs = self.regs()?;
        regs.x[..state.x.len()].copy_from_slice(&state.x);
        regs.pc = state.pc;
        regs.pstate = state.pstate;
        self.set_regs(&regs)
    }
}
