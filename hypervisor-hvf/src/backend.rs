//! The Hypervisor.framework backend: `HvfHypervisor` -> `HvfVm` -> `HvfVcpu`.

use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, ThreadId};
use std::time::Duration;

use supermachine_hypervisor::aarch64::{
    CoreRegs, GicCpuState, GicReg, PowerState, SysReg, SysRegId, gic, mpidr, psci as ids, pstate,
    sys_regs,
};
use supermachine_hypervisor::watch::{Watched, WriteWatches};
use supermachine_hypervisor::{
    self as hv, Datamatch, Hypervisor, InterruptLine, IoAddress, IoNotifier, Regs, Vcpu, VcpuExit,
    VcpuKicker, VcpuState, Vm, VmSpec, VmState,
};

use crate::exit::{self, Exception, MmioAccess};
use crate::psci::{self, Call, PowerTable, Start};
use crate::{Error, ffi, regs};

/// Calls `f`, turning a non-zero `hv_return_t` into an error naming `op`.
fn check(op: &'static str, code: ffi::hv_return_t) -> Result<(), Error> {
    if code == ffi::HV_SUCCESS {
        Ok(())
    } else {
        Err(Error::Framework { op, code })
    }
}

/// Hypervisor.framework allows one VM per process.
static VM_EXISTS: AtomicBool = AtomicBool::new(false);

/// The longest a WFI sleeps without news: interrupts the framework's GIC
/// raises by itself (SGIs between vCPUs) do not tell the backend, so a
/// waiting vCPU looks again this often.
const WFI_POLL: Duration = Duration::from_millis(1);

/// Hypervisor.framework on this Mac.
#[derive(Debug)]
pub struct HvfHypervisor {
    max_vcpus: u32,
}

impl HvfHypervisor {
    /// Checks that the framework can be used by this process.
    pub fn new() -> hv::Result<Self> {
        let mut max = 0u32;
        // SAFETY: writes one u32 through a valid pointer.
        check("hv_vm_get_max_vcpu_count", unsafe {
            ffi::hv_vm_get_max_vcpu_count(&mut max)
        })
        .map_err(|e| hv::Error::Unavailable(e.to_string()))?;
        Ok(Self {
            max_vcpus: max.min(gic::MAX_VCPUS),
        })
    }
}

impl Hypervisor for HvfHypervisor {
    fn name(&self) -> &'static str {
        "hvf"
    }

    fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    fn create_vm(&self, spec: &VmSpec) -> hv::Result<Arc<dyn Vm>> {
        if spec.vcpu_count == 0 || spec.vcpu_count > self.max_vcpus {
            return Err(hv::Error::Invalid(format!(
                "{} vCPUs asked for; Hypervisor.framework here runs 1 to {}",
                spec.vcpu_count, self.max_vcpus
            )));
        }
        if VM_EXISTS.swap(true, Ordering::AcqRel) {
            return Err(hv::Error::Unsupported(
                "Hypervisor.framework runs one VM per process, and this process has one".into(),
            ));
        }
        // SAFETY: a null configuration asks for the defaults.
        if let Err(e) = check("hv_vm_create", unsafe {
            ffi::hv_vm_create(ptr::null_mut())
        }) {
            VM_EXISTS.store(false, Ordering::Release);
            return Err(e.into());
        }
        // From here the VM is destroyed by this guard's drop on any error.
        let guard = VmGuard;
        for region in &spec.ram {
            // SAFETY: `RamRegion`'s contract: the range is mapped in this
            // process and outlives the VM.
            check("hv_vm_map", unsafe {
                ffi::hv_vm_map(
                    region.host_addr() as *mut _,
                    region.guest_addr(),
                    region.len() as usize,
                    ffi::HV_MEMORY_READ | ffi::HV_MEMORY_WRITE | ffi::HV_MEMORY_EXEC,
                )
            })?;
        }
        create_gic()?;
        let mpidrs: Vec<u64> = (0..spec.vcpu_count)
            .map(|i| MPIDR_RES1 | u64::from(mpidr(i)))
            .collect();
        let vcpu_count = spec.vcpu_count as usize;
        let shared = Arc::new(Shared {
            mpidrs: mpidrs.clone(),
            core: Mutex::new(Core {
                power: PowerTable::new(&mpidrs),
                generation: 0,
                created: vec![false; vcpu_count],
                saved_gic: vec![None; vcpu_count],
                pending_gic: vec![None; vcpu_count],
            }),
            wake: Condvar::new(),
            notifiers: WriteWatches::default(),
        });
        let mut timebase = ffi::mach_timebase_info_data_t::default();
        // SAFETY: writes the struct through a valid pointer.
        unsafe { ffi::mach_timebase_info(&mut timebase) };
        Ok(Arc::new(HvfVm {
            shared,
            timebase,
            _guard: guard,
        }))
    }

    fn check_restorable(&self, vcpus: &[VcpuState]) -> hv::Result<()> {
        if vcpus.is_empty() || vcpus.len() as u32 > self.max_vcpus {
            return Err(hv::Error::Invalid(format!(
                "the snapshot has {} vCPUs; Hypervisor.framework here runs 1 to {}",
                vcpus.len(),
                self.max_vcpus
            )));
        }
        for (index, vcpu) in vcpus.iter().enumerate() {
            let expected = MPIDR_RES1 | u64::from(mpidr(index as u32));
            if vcpu.mpidr != expected {
                return Err(hv::Error::Invalid(format!(
                    "saved vCPU {index} has MPIDR {:#x}, not {expected:#x}",
                    vcpu.mpidr
                )));
            }
            let foreign = vcpu
                .sys_regs
                .iter()
                .find(|r| r.id != sys_regs::CNTVCT_EL0 && !regs::SAVED_SYS_REGS.contains(&r.id));
            if let Some(r) = foreign {
                return Err(hv::Error::Invalid(format!(
                    "saved vCPU {index} has system register {:#x}, which this backend does not restore (a snapshot of another hypervisor?)",
                    r.id.0
                )));
            }
        }
        // The CPU itself (MIDR_EL1) is compared when each vCPU is
        // restored: the framework shows a vCPU's MIDR only once it exists.
        Ok(())
    }
}

/// MPIDR_EL1 bit 31 reads as one.
const MPIDR_RES1: u64 = 1 << 31;

/// Destroys the process's VM when dropped.
#[derive(Debug)]
struct VmGuard;

impl Drop for VmGuard {
    fn drop(&mut self) {
        // SAFETY: destroys this process's VM, which this guard stands for;
        // its vCPUs were destroyed by their own threads.
        let code = unsafe { ffi::hv_vm_destroy() };
        if code != ffi::HV_SUCCESS {
            log::warn!("hv_vm_destroy: {}", crate::describe(code));
        }
        VM_EXISTS.store(false, Ordering::Release);
    }
}

/// Creates the framework's GICv3 where the device tree says it is, after
/// checking that its redistributors and SPIs fit the layout.
fn create_gic() -> Result<(), hv::Error> {
    let mut redistributor_size = 0usize;
    // SAFETY: writes one usize through a valid pointer.
    check("hv_gic_get_redistributor_size", unsafe {
        ffi::hv_gic_get_redistributor_size(&mut redistributor_size)
    })?;
    if redistributor_size as u64 != gic::REDISTRIBUTOR_SIZE {
        return Err(hv::Error::Unsupported(format!(
            "the framework's GIC redistributors are {redistributor_size:#x} bytes; the layout has {:#x}",
            gic::REDISTRIBUTOR_SIZE
        )));
    }
    let (mut spi_base, mut spi_count) = (0u32, 0u32);
    // SAFETY: writes two u32s through valid pointers.
    check("hv_gic_get_spi_interrupt_range", unsafe {
        ffi::hv_gic_get_spi_interrupt_range(&mut spi_base, &mut spi_count)
    })?;
    if spi_base > gic::SPI_INTID_BASE || spi_base + spi_count < gic::INTERRUPT_COUNT {
        return Err(hv::Error::Unsupported(format!(
            "the framework's GIC has SPIs {spi_base}..{}; the layout needs {}..{}",
            spi_base + spi_count,
            gic::SPI_INTID_BASE,
            gic::INTERRUPT_COUNT
        )));
    }
    // SAFETY: creates a configuration object, released below.
    let config = unsafe { ffi::hv_gic_config_create() };
    if config.is_null() {
        return Err(hv::Error::Unsupported(
            "hv_gic_config_create returned nothing (the framework's GIC needs macOS 15)".into(),
        ));
    }
    // SAFETY: `config` is the live configuration object created above.
    let result = unsafe {
        check(
            "hv_gic_config_set_distributor_base",
            ffi::hv_gic_config_set_distributor_base(config, gic::DISTRIBUTOR_BASE),
        )
        .and_then(|()| {
            check(
                "hv_gic_config_set_redistributor_base",
                ffi::hv_gic_config_set_redistributor_base(config, gic::REDISTRIBUTORS_BASE),
            )
        })
        .and_then(|()| check("hv_gic_create", ffi::hv_gic_create(config)))
    };
    // SAFETY: releases the object created above, once.
    unsafe { ffi::os_release(config) };
    Ok(result?)
}

/// What the vCPUs of one VM share.
#[derive(Debug)]
struct Shared {
    mpidrs: Vec<u64>,
    core: Mutex<Core>,
    /// Signalled when `Core::generation` moves: an interrupt was raised, a
    /// vCPU was started or kicked.
    wake: Condvar,
    notifiers: WriteWatches<supermachine_host::Event>,
}

#[derive(Debug)]
struct Core {
    power: PowerTable,
    generation: u64,
    /// Which vCPUs a thread has created (and not yet destroyed).
    created: Vec<bool>,
    /// Each vCPU's GIC state, saved by its own thread for `Vm::save_state`.
    saved_gic: Vec<Option<GicCpuState>>,
    /// Each vCPU's GIC state from `Vm::restore_state`, for its own thread
    /// to write when it restores.
    pending_gic: Vec<Option<GicCpuState>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every vCPU waiting in WFI or powered off.
    fn wake_all(&self) {
        self.lock().generation += 1;
        self.wake.notify_all();
    }
}

/// A VM of this process.
#[derive(Debug)]
struct HvfVm {
    shared: Arc<Shared>,
    timebase: ffi::mach_timebase_info_data_t,
    _guard: VmGuard,
}

impl Vm for HvfVm {
    fn create_vcpu(&self, index: u32) -> hv::Result<Box<dyn Vcpu>> {
        let i = index as usize;
        let Some(&mpidr) = self.shared.mpidrs.get(i) else {
            return Err(hv::Error::Invalid(format!(
                "vCPU {index} asked for; the VM has {}",
                self.shared.mpidrs.len()
            )));
        };
        if self.shared.lock().created[i] {
            return Err(hv::Error::Invalid(format!("vCPU {index} exists already")));
        }
        let mut handle: ffi::hv_vcpu_t = 0;
        let mut exit: *const ffi::hv_vcpu_exit_t = ptr::null();
        // SAFETY: both out-pointers are valid; a null configuration asks
        // for the defaults. The vCPU belongs to this thread from now on.
        check("hv_vcpu_create", unsafe {
            ffi::hv_vcpu_create(&mut handle, &mut exit, ptr::null_mut())
        })?;
        let vcpu = HvfVcpu {
            index,
            handle,
            exit,
            owner: thread::current().id(),
            shared: self.shared.clone(),
            kicker: Arc::new(HvfKicker {
                kicked: AtomicBool::new(false),
                handle,
                shared: Arc::downgrade(&self.shared),
            }),
            timebase: self.timebase,
            pending: None,
            data: [0; 8],
        };
        vcpu.set_sys(sys_regs::MPIDR_EL1, mpidr)?;
        self.shared.lock().created[i] = true;
        Ok(Box::new(vcpu))
    }

    fn interrupt_line(&self, gsi: u32) -> hv::Result<Arc<dyn InterruptLine>> {
        let spis = gic::INTERRUPT_COUNT - gic::SPI_INTID_BASE;
        if gsi >= spis {
            return Err(hv::Error::Invalid(format!(
                "interrupt {gsi} asked for; the GIC has SPIs 0 to {}",
                spis - 1
            )));
        }
        Ok(Arc::new(SpiLine {
            intid: gic::SPI_INTID_BASE + gsi,
            shared: Arc::downgrade(&self.shared),
        }))
    }

    fn io_notifier(
        &self,
        addr: IoAddress,
        datamatch: Datamatch,
    ) -> hv::Result<Box<dyn IoNotifier>> {
        let IoAddress::Mmio(addr) = addr else {
            return Err(hv::Error::Unsupported("arm64 has no I/O ports".into()));
        };
        let event = supermachine_host::Event::new().map_err(|source| hv::Error::Os {
            op: "creating a notifier event",
            source,
        })?;
        let watched = self
            .shared
            .notifiers
            .add(IoAddress::Mmio(addr), datamatch, event);
        Ok(Box::new(HvfNotifier {
            watched,
            shared: Arc::downgrade(&self.shared),
        }))
    }

    fn save_state(&self) -> hv::Result<VmState> {
        let mut reads = Vec::new();
        for id in crate::gic::distributor_regs() {
            let mut value = 0u64;
            // SAFETY: writes one u64 through a valid pointer; the id is
            // a distributor register offset the framework names.
            check("hv_gic_get_distributor_reg", unsafe {
                ffi::hv_gic_get_distributor_reg(id as u16, &mut value)
            })?;
            reads.push((id, value));
        }
        let core = self.shared.lock();
        let gic_cpus = core
            .saved_gic
            .iter()
            .enumerate()
            .map(|(i, saved)| {
                saved.clone().ok_or_else(|| {
                    hv::Error::Invalid(format!(
                        "vCPU {i} has not saved its state, so its GIC state is missing"
                    ))
                })
            })
            .collect::<hv::Result<Vec<_>>>()?;
        Ok(VmState {
            gic_distributor: crate::gic::distributor_words(&reads),
            gic_cpus,
        })
    }

    fn restore_state(&self, state: &VmState) -> hv::Result<()> {
        let saved: Vec<u64> = state.gic_cpus.iter().map(|c| c.mpidr).collect();
        if saved != self.shared.mpidrs {
            return Err(hv::Error::Invalid(format!(
                "the saved GIC has vCPUs {saved:x?}; this VM {:x?}",
                self.shared.mpidrs
            )));
        }
        let writes =
            crate::gic::distributor_writes(&state.gic_distributor).map_err(hv::Error::Invalid)?;
        for cpu in &state.gic_cpus {
            crate::gic::check_redistributor(&cpu.redistributor).map_err(hv::Error::Invalid)?;
            crate::gic::check_cpu_interface(&cpu.cpu_interface).map_err(hv::Error::Invalid)?;
        }
        for (id, value) in writes {
            // SAFETY: plain call; the id was checked against the
            // distributor registers the framework names.
            check("hv_gic_set_distributor_reg", unsafe {
                ffi::hv_gic_set_distributor_reg(id as u16, value)
            })?;
        }
        // The redistributors and CPU interfaces are written by each vCPU's
        // own thread when it restores (the calls name the vCPU).
        let mut core = self.shared.lock();
        for (slot, cpu) in core.pending_gic.iter_mut().zip(&state.gic_cpus) {
            *slot = Some(cpu.clone());
        }
        Ok(())
    }
}

/// An SPI of the framework's GIC.
#[derive(Debug)]
struct SpiLine {
    intid: u32,
    shared: Weak<Shared>,
}

impl InterruptLine for SpiLine {
    fn trigger(&self) -> hv::Result<()> {
        // An edge: the SPIs are edge-triggered in the device tree, so the
        // GIC latches the rising edge as pending.
        // SAFETY: plain calls with an SPI the VM's GIC has.
        unsafe {
            check("hv_gic_set_spi", ffi::hv_gic_set_spi(self.intid, true))?;
            check("hv_gic_set_spi", ffi::hv_gic_set_spi(self.intid, false))?;
        }
        if let Some(shared) = self.shared.upgrade() {
            shared.wake_all();
        }
        Ok(())
    }
}

#[derive(Debug)]
struct HvfNotifier {
    watched: Arc<Watched<supermachine_host::Event>>,
    shared: Weak<Shared>,
}

impl IoNotifier for HvfNotifier {
    fn as_raw_fd(&self) -> RawFd {
        self.watched.signal.as_raw_fd()
    }

    fn consume(&self) -> hv::Result<u64> {
        self.watched.signal.drain().map_err(|source| hv::Error::Os {
            op: "reading a notifier event",
            source,
        })
    }
}

impl Drop for HvfNotifier {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.notifiers.remove(&self.watched);
        }
    }
}

#[derive(Debug)]
struct HvfKicker {
    kicked: AtomicBool,
    handle: ffi::hv_vcpu_t,
    shared: Weak<Shared>,
}

impl VcpuKicker for HvfKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        // SAFETY: one valid handle; the framework allows this call from
        // any thread.
        unsafe { ffi::hv_vcpus_exit(&self.handle, 1) };
        if let Some(shared) = self.shared.upgrade() {
            shared.wake_all();
        }
    }
}

/// An exit the VMM has been handed and that completes on the next `run`.
#[derive(Clone, Copy, Debug)]
enum Pending {
    /// An MMIO load: its register gets what the VMM left in `data`.
    Load(MmioAccess),
    /// An MMIO store: nothing to do but step past it.
    Store,
}

/// What one pass of the run loop decided.
enum Outcome {
    Again,
    Load(MmioAccess),
    Store(MmioAccess),
    Exit(VcpuExit<'static>),
}

/// One vCPU, owned by the thread that created it.
#[derive(Debug)]
struct HvfVcpu {
    index: u32,
    handle: ffi::hv_vcpu_t,
    exit: *const ffi::hv_vcpu_exit_t,
    owner: ThreadId,
    shared: Arc<Shared>,
    kicker: Arc<HvfKicker>,
    timebase: ffi::mach_timebase_info_data_t,
    pending: Option<Pending>,
    data: [u8; 8],
}

// SAFETY: the trait asks for `Send` so that a VMM may hand vCPUs between
// threads; this one is only ever used by the thread that created it:
// every method checks `owner` before touching the framework, and `exit`
// points at the framework's per-vCPU exit record, read only by that
// thread after `hv_vcpu_run` returns.
unsafe impl Send for HvfVcpu {}

impl HvfVcpu {
    fn on_owner(&self) -> hv::Result<()> {
        if thread::current().id() == self.owner {
            Ok(())
        } else {
            Err(hv::Error::Invalid(format!(
                "vCPU {} used from a thread other than the one that created it (Hypervisor.framework ties a vCPU to its thread)",
                self.index
            )))
        }
    }

    fn get(&self, reg: u32) -> Result<u64, Error> {
        let mut value = 0;
        // SAFETY: on the owning thread; writes one u64 through a valid pointer.
        check("hv_vcpu_get_reg", unsafe {
            ffi::hv_vcpu_get_reg(self.handle, reg, &mut value)
        })?;
        Ok(value)
    }

    fn set(&self, reg: u32, value: u64) -> Result<(), Error> {
        // SAFETY: on the owning thread; a plain call.
        check("hv_vcpu_set_reg", unsafe {
            ffi::hv_vcpu_set_reg(self.handle, reg, value)
        })
    }

    fn get_sys(&self, id: SysRegId) -> Result<u64, Error> {
        let mut value = 0;
        // SAFETY: on the owning thread; writes one u64 through a valid pointer.
        check("hv_vcpu_get_sys_reg", unsafe {
            ffi::hv_vcpu_get_sys_reg(self.handle, id.0, &mut value)
        })?;
        Ok(value)
    }

    fn set_sys(&self, id: SysRegId, value: u64) -> Result<(), Error> {
        // SAFETY: on the owning thread; a plain call.
        check("hv_vcpu_set_sys_reg", unsafe {
            ffi::hv_vcpu_set_sys_reg(self.handle, id.0, value)
        })
    }

    fn advance_pc(&self) -> Result<(), Error> {
        self.set(regs::REG_PC, self.get(regs::REG_PC)? + 4)
    }

    fn set_x(&self, n: u8, value: u64) -> Result<(), Error> {
        match regs::x_reg(n) {
            Some(reg) => self.set(reg, value),
            None => Ok(()), // XZR
        }
    }

    fn get_x(&self, n: u8) -> Result<u64, Error> {
        match regs::x_reg(n) {
            Some(reg) => self.get(reg),
            None => Ok(0), // XZR
        }
    }

    /// Completes what the VMM answered: a load's register, the PC.
    fn complete_pending(&mut self) -> Result<(), Error> {
        match self.pending.take() {
            Some(Pending::Load(access)) => {
                self.set_x(access.reg, access.loaded_value(&self.data[..access.size]))?;
                self.advance_pc()
            }
            Some(Pending::Store) => self.advance_pc(),
            None => Ok(()),
        }
    }

    fn virtual_count(&self) -> Result<u64, Error> {
        let mut offset = 0;
        // SAFETY: on the owning thread; writes one u64 through a valid pointer.
        check("hv_vcpu_get_vtimer_offset", unsafe {
            ffi::hv_vcpu_get_vtimer_offset(self.handle, &mut offset)
        })?;
        // SAFETY: a plain call.
        Ok(regs::virtual_count(
            unsafe { ffi::mach_absolute_time() },
            offset,
        ))
    }

    /// Waits, as WFI asks, until the virtual timer is due, an interrupt is
    /// raised, or the vCPU is kicked.
    fn wait_for_interrupt(&self) -> Result<(), Error> {
        let ctl = self.get_sys(sys_regs::CNTV_CTL_EL0)?;
        let cval = self.get_sys(sys_regs::CNTV_CVAL_EL0)?;
        let count = self.virtual_count()?;
        let timeout = match regs::ticks_until_timer(ctl, cval, count) {
            Some(0) => return Ok(()),
            Some(ticks) => {
                let nanos = u128::from(ticks) * u128::from(self.timebase.numer)
                    / u128::from(self.timebase.denom.max(1));
                Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64).min(WFI_POLL)
            }
            None => WFI_POLL,
        };
        let core = self.shared.lock();
        let generation = core.generation;
        if self.kicker.kicked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _unused = self
            .shared
            .wake
            .wait_timeout_while(core, timeout, |c| c.generation == generation)
            .unwrap_or_else(|p| p.into_inner());
        Ok(())
    }

    /// Waits while this vCPU is powered off, or until it is kicked.
    fn wait_until_on(&self) -> Result<(), Error> {
        let i = self.index as usize;
        let mut core = self.shared.lock();
        loop {
            if core.power.power(i) == Some(PowerState::On)
                || self.kicker.kicked.load(Ordering::SeqCst)
            {
                return Ok(());
            }
            if let Some(start) = core.power.take_start(i) {
                drop(core);
                return self.enter_at(start);
            }
            core = self
                .shared
                .wake
                .wait_timeout(core, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Starts a CPU_ON'd vCPU: at `entry`, X0 the caller's context, EL1
    /// with every exception masked.
    fn enter_at(&self, start: Start) -> Result<(), Error> {
        self.set(regs::REG_PC, start.entry)?;
        self.set(regs::REG_X0, start.context)?;
        self.set(regs::REG_CPSR, pstate::MODE_EL1H | pstate::DAIF_MASKED)
    }

    /// Answers a PSCI call; `Some(exit)` when it ends the VM's run.
    fn psci_call(&self) -> Result<Option<VcpuExit<'static>>, Error> {
        let x = [self.get(0)?, self.get(1)?, self.get(2)?, self.get(3)?];
        let result: i64 = match psci::decode(x) {
            Call::Version => ids::VERSION_0_2 as i64,
            Call::MigrateInfoType => ids::NO_TRUSTED_OS as i64,
            Call::Features(function) => {
                if psci::implemented(function) {
                    ids::SUCCESS
                } else {
                    ids::NOT_SUPPORTED
                }
            }
            Call::CpuOn {
                target,
                entry,
                context,
            } => {
                let code = self
                    .shared
                    .lock()
                    .power
                    .cpu_on(target, Start { entry, context });
                self.shared.wake_all();
                code
            }
            Call::AffinityInfo { target, level } => {
                self.shared.lock().power.affinity_info(target, level)
            }
            Call::CpuSuspend => {
                // A standby suspend is a WFI as far as the guest can tell.
                self.wait_for_interrupt()?;
                ids::SUCCESS
            }
            Call::CpuOff => {
                self.shared
                    .lock()
                    .power
                    .set_power(self.index as usize, PowerState::Off);
                return Ok(None);
            }
            Call::SystemOff => return Ok(Some(VcpuExit::SystemPowerOff)),
            Call::SystemReset => return Ok(Some(VcpuExit::SystemReset)),
            Call::Unknown(function) => {
                log::debug!(
                    "vCPU {}: PSCI function {function:#x} not supported",
                    self.index
                );
                ids::NOT_SUPPORTED
            }
        };
        self.set(regs::REG_X0, result as u64)?;
        Ok(None)
    }

    /// Runs the guest once and decides what its exit means.
    fn step(&mut self) -> Result<Outcome, Error> {
        self.wait_until_on()?;
        if self.kicker.kicked.swap(false, Ordering::SeqCst) {
            return Ok(Outcome::Exit(VcpuExit::Interrupted));
        }
        // SAFETY: on the owning thread.
        check("hv_vcpu_run", unsafe { ffi::hv_vcpu_run(self.handle) })?;
        // SAFETY: the framework's exit record for this vCPU, valid for
        // the vCPU's life and written only by `hv_vcpu_run` on this thread.
        let exit = unsafe { *self.exit };
        match exit.reason {
            ffi::HV_EXIT_REASON_CANCELED => Ok(Outcome::Again),
            ffi::HV_EXIT_REASON_EXCEPTION => {
                self.exception(exit.exception.syndrome, exit.exception.physical_address)
            }
            ffi::HV_EXIT_REASON_VTIMER_ACTIVATED => Ok(Outcome::Exit(VcpuExit::InternalError(
                "a virtual timer exit, which the framework's GIC takes itself".into(),
            ))),
            reason => Ok(Outcome::Exit(VcpuExit::Unhandled(format!(
                "Hypervisor.framework exit reason {reason}"
            )))),
        }
    }

    fn exception(&mut self, syndrome: u64, addr: u64) -> Result<Outcome, Error> {
        match exit::decode(syndrome, addr) {
            Exception::Mmio(access) if access.write => {
                let value = self.get_x(access.reg)?;
                let data = &value.to_le_bytes()[..access.size];
                let signalled = self.shared.notifiers.signal_matching(
                    IoAddress::Mmio(access.addr),
                    data,
                    |event| {
                        if let Err(e) = event.signal() {
                            log::warn!("notifier at {:#x}: {e}", access.addr);
                        }
                    },
                );
                if signalled {
                    self.advance_pc()?;
                    return Ok(Outcome::Again);
                }
                Ok(Outcome::Store(access))
            }
            Exception::Mmio(access) => Ok(Outcome::Load(access)),
            Exception::UndescribedAbort { addr } => {
                Ok(Outcome::Exit(VcpuExit::InternalError(format!(
                    "the guest accessed {addr:#x}, which is not RAM, with an instruction the exit does not describe (syndrome {syndrome:#x})"
                ))))
            }
            Exception::Hvc => Ok(match self.psci_call()? {
                Some(exit) => Outcome::Exit(exit),
                None => Outcome::Again,
            }),
            Exception::Smc => {
                // No secure firmware: what PSCI says an unknown call returns.
                self.set(regs::REG_X0, ids::NOT_SUPPORTED as u64)?;
                self.advance_pc()?;
                Ok(Outcome::Again)
            }
            Exception::WaitForInterrupt => {
                self.wait_for_interrupt()?;
                self.advance_pc()?;
                Ok(Outcome::Again)
            }
            Exception::WaitForEvent => {
                thread::yield_now();
                self.advance_pc()?;
                Ok(Outcome::Again)
            }
            Exception::SysReg(access) => {
                log::debug!(
                    "vCPU {}: trapped {} of system register {:#x}: reads as zero, writes ignored",
                    self.index,
                    if access.read { "read" } else { "write" },
                    access.id.0
                );
                if access.read {
                    self.set_x(access.reg, 0)?;
                }
                self.advance_pc()?;
                Ok(Outcome::Again)
            }
            Exception::Other { class } => Ok(Outcome::Exit(VcpuExit::Unhandled(format!(
                "exception class {class:#x} (syndrome {syndrome:#x}) at {addr:#x}"
            )))),
        }
    }

    fn simd(&self, n: u32) -> Result<u128, Error> {
        let mut value = 0u128;
        // SAFETY: on the owning thread; writes 16 bytes through a valid
        // pointer (lane 0 the least significant byte, little-endian).
        check("hv_vcpu_get_simd_fp_reg", unsafe {
            ffi::hv_vcpu_get_simd_fp_reg(self.handle, n, &mut value)
        })?;
        Ok(value)
    }

    fn set_simd(&self, n: u32, value: u128) -> Result<(), Error> {
        // SAFETY: on the owning thread.
        check("hv_vcpu_set_simd_fp_reg", unsafe {
            ffi::set_simd_fp_reg(self.handle, n, value)
        })
    }

    fn read_core(&self) -> Result<CoreRegs, Error> {
        let mut core = CoreRegs::default();
        for (n, x) in core.x.iter_mut().enumerate() {
            *x = self.get(regs::REG_X0 + n as u32)?;
        }
        core.pc = self.get(regs::REG_PC)?;
        core.pstate = self.get(regs::REG_CPSR)?;
        core.fpcr = self.get(regs::REG_FPCR)? as u32;
        core.fpsr = self.get(regs::REG_FPSR)? as u32;
        core.sp_el0 = self.get_sys(regs::SP_EL0)?;
        core.sp_el1 = self.get_sys(regs::SP_EL1)?;
        core.elr_el1 = self.get_sys(regs::ELR_EL1)?;
        core.spsr_el1 = self.get_sys(regs::SPSR_EL1)?;
        core.v = (0..regs::SIMD_REG_COUNT)
            .map(|n| self.simd(n))
            .collect::<Result<_, _>>()?;
        Ok(core)
    }

    fn write_core(&self, core: &CoreRegs) -> hv::Result<()> {
        if core.v.len() != regs::SIMD_REG_COUNT as usize {
            return Err(hv::Error::Invalid(format!(
                "{} SIMD registers given; there are {}",
                core.v.len(),
                regs::SIMD_REG_COUNT
            )));
        }
        for (n, &x) in core.x.iter().enumerate() {
            self.set(regs::REG_X0 + n as u32, x)?;
        }
        self.set(regs::REG_PC, core.pc)?;
        self.set(regs::REG_CPSR, core.pstate)?;
        self.set(regs::REG_FPCR, u64::from(core.fpcr))?;
        self.set(regs::REG_FPSR, u64::from(core.fpsr))?;
        self.set_sys(regs::SP_EL0, core.sp_el0)?;
        self.set_sys(regs::SP_EL1, core.sp_el1)?;
        self.set_sys(regs::ELR_EL1, core.elr_el1)?;
        self.set_sys(regs::SPSR_EL1, core.spsr_el1)?;
        for (n, &v) in core.v.iter().enumerate() {
            self.set_simd(n as u32, v)?;
        }
        Ok(())
    }

    fn save_gic(&self) -> Result<GicCpuState, Error> {
        let mut redistributor = Vec::new();
        for offset in crate::gic::redistributor_regs() {
            let mut value = 0;
            // SAFETY: on the owning thread; writes one u64 through a valid pointer.
            check("hv_gic_get_redistributor_reg", unsafe {
                ffi::hv_gic_get_redistributor_reg(self.handle, offset, &mut value)
            })?;
            redistributor.push(GicReg { offset, value });
        }
        let mut cpu_interface = Vec::new();
        for id in crate::gic::cpu_interface_ids() {
            let mut value = 0;
            // SAFETY: as above.
            check("hv_gic_get_icc_reg", unsafe {
                ffi::hv_gic_get_icc_reg(self.handle, id.0, &mut value)
            })?;
            cpu_interface.push(SysReg { id, value });
        }
        Ok(GicCpuState {
            mpidr: self.shared.mpidrs[self.index as usize],
            redistributor,
            cpu_interface,
        })
    }

    fn restore_gic(&self, gic: &GicCpuState) -> Result<(), Error> {
        for reg in &gic.redistributor {
            // SAFETY: on the owning thread; the offset was checked by
            // `Vm::restore_state`.
            check("hv_gic_set_redistributor_reg", unsafe {
                ffi::hv_gic_set_redistributor_reg(self.handle, reg.offset, reg.value)
            })?;
        }
        for reg in &gic.cpu_interface {
            // SAFETY: as above.
            check("hv_gic_set_icc_reg", unsafe {
                ffi::hv_gic_set_icc_reg(self.handle, reg.id.0, reg.value)
            })?;
        }
        Ok(())
    }
}

impl Drop for HvfVcpu {
    fn drop(&mut self) {
        if let Some(created) = self.shared.lock().created.get_mut(self.index as usize) {
            *created = false;
        }
        if thread::current().id() != self.owner {
            log::warn!(
                "vCPU {} dropped on another thread; the framework frees it with the VM",
                self.index
            );
            return;
        }
        // SAFETY: on the owning thread, the vCPU's last use.
        let code = unsafe { ffi::hv_vcpu_destroy(self.handle) };
        if code != ffi::HV_SUCCESS {
            log::warn!("hv_vcpu_destroy: {}", crate::describe(code));
        }
    }
}

impl Vcpu for HvfVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn run(&mut self) -> hv::Result<VcpuExit<'_>> {
        self.on_owner()?;
        self.complete_pending()?;
        loop {
            match self.step()? {
                Outcome::Again => continue,
                Outcome::Exit(exit) => return Ok(exit),
                Outcome::Load(access) => {
                    self.pending = Some(Pending::Load(access));
                    self.data = [0; 8];
                    return Ok(VcpuExit::MmioRead {
                        addr: access.addr,
                        data: &mut self.data[..access.size],
                    });
                }
                Outcome::Store(access) => {
                    self.pending = Some(Pending::Store);
                    self.data = self.get_x(access.reg)?.to_le_bytes();
                    return Ok(VcpuExit::MmioWrite {
                        addr: access.addr,
                        data: &self.data[..access.size],
                    });
                }
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn regs(&self) -> hv::Result<Regs> {
        self.on_owner()?;
        Ok(self.read_core()?)
    }

    fn set_regs(&mut self, regs: &Regs) -> hv::Result<()> {
        self.on_owner()?;
        self.write_core(regs)
    }

    fn sys_reg(&self, id: SysRegId) -> hv::Result<u64> {
        self.on_owner()?;
        Ok(self.get_sys(id)?)
    }

    fn set_sys_reg(&mut self, id: SysRegId, value: u64) -> hv::Result<()> {
        self.on_owner()?;
        Ok(self.set_sys(id, value)?)
    }

    fn save_state(&mut self) -> hv::Result<VcpuState> {
        self.on_owner()?;
        self.complete_pending()?;
        let mut sys = Vec::with_capacity(regs::SAVED_SYS_REGS.len() + 1);
        for &id in regs::SAVED_SYS_REGS {
            sys.push(SysReg {
                id,
                value: self.get_sys(id)?,
            });
        }
        sys.push(SysReg {
            id: sys_regs::CNTVCT_EL0,
            value: self.virtual_count()?,
        });
        let gic = self.save_gic()?;
        let i = self.index as usize;
        let power = {
            let mut core = self.shared.lock();
            core.saved_gic[i] = Some(gic);
            core.power.power(i).unwrap_or(PowerState::Off)
        };
        Ok(VcpuState {
            mpidr: self.shared.mpidrs[i],
            power,
            core: self.read_core()?,
            sys_regs: sys,
        })
    }

    fn restore_state(&mut self, state: &VcpuState) -> hv::Result<()> {
        self.on_owner()?;
        let i = self.index as usize;
        if state.mpidr != self.shared.mpidrs[i] {
            return Err(hv::Error::Invalid(format!(
                "saved vCPU has MPIDR {:#x}; vCPU {} is {:#x}",
                state.mpidr, self.index, self.shared.mpidrs[i]
            )));
        }
        let midr = self.get_sys(sys_regs::MIDR_EL1)?;
        if let Some(saved) = state.sys_regs.iter().find(|r| r.id == sys_regs::MIDR_EL1)
            && saved.value != midr
        {
            return Err(hv::Error::Unsupported(format!(
                "the snapshot was taken on another CPU (MIDR_EL1 {:#x}; this Mac's is {midr:#x})",
                saved.value
            )));
        }
        let gic = self.shared.lock().pending_gic[i].take();
        if let Some(gic) = gic {
            self.restore_gic(&gic)?;
        }
        for reg in &state.sys_regs {
            match reg.id {
                sys_regs::MIDR_EL1 => {}
                sys_regs::CNTVCT_EL0 => {
                    // SAFETY: a plain call.
                    let now = unsafe { ffi::mach_absolute_time() };
                    // SAFETY: on the owning thread; a plain call.
                    check("hv_vcpu_set_vtimer_offset", unsafe {
                        ffi::hv_vcpu_set_vtimer_offset(
                            self.handle,
                            regs::offset_for(now, reg.value),
                        )
                    })?;
                }
                id => self.set_sys(id, reg.value)?,
            }
        }
        self.write_core(&state.core)?;
        self.shared.lock().power.set_power(i, state.power);
        Ok(())
    }
}
