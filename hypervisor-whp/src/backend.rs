//! The WHP backend: `WhpHypervisor` -> `WhpVm` -> `WhpVcpu`.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use supermachine_hypervisor::watch::{Watched, WriteWatches};
use supermachine_hypervisor::x86_64::{
    CpuidEntry, DebugRegs, DescriptorTable, FpuState, MpState, MsrEntry, PicState, PitState,
    SpecialRegs, VcpuState, VmState, Xcr,
};
use supermachine_hypervisor::{
    self as hv, Datamatch, Hypervisor, InterruptLine, IoAddress, IoNotifier, Regs, Vcpu, VcpuExit,
    VcpuKicker, Vm, VmSpec,
};
use windows_sys::Win32::System::Hypervisor::*;

// WHP's functions, found at run time (see `api`); these names shadow the
// glob's imported declarations.
use crate::api::{
    self, WHvCancelRunVirtualProcessor, WHvCreatePartition, WHvCreateVirtualProcessor,
    WHvDeletePartition, WHvDeleteVirtualProcessor, WHvEmulatorCreateEmulator,
    WHvEmulatorDestroyEmulator, WHvEmulatorTryMmioEmulation, WHvGetCapability,
    WHvGetVirtualProcessorInterruptControllerState2, WHvGetVirtualProcessorRegisters,
    WHvGetVirtualProcessorXsaveState, WHvMapGpaRange, WHvRequestInterrupt, WHvRunVirtualProcessor,
    WHvSetPartitionProperty, WHvSetVirtualProcessorInterruptControllerState2,
    WHvSetVirtualProcessorRegisters, WHvSetVirtualProcessorXsaveState, WHvSetupPartition,
    WHvTranslateGva,
};

use crate::exit::{self, PortAccess, reason};
use crate::ioapic::{self, Ioapic};
use crate::regs::{self, name};
use crate::{Error, lapic};

// The register names and exit reasons the portable modules spell out are
// the platform's.
const _: () = {
    assert!(name::RAX == WHvX64RegisterRax);
    assert!(name::R15 == WHvX64RegisterR15);
    assert!(name::RIP == WHvX64RegisterRip);
    assert!(name::RFLAGS == WHvX64RegisterRflags);
    assert!(name::ES == WHvX64RegisterEs);
    assert!(name::GDTR == WHvX64RegisterGdtr);
    assert!(name::CR8 == WHvX64RegisterCr8);
    assert!(name::DR7 == WHvX64RegisterDr7);
    assert!(name::XCR0 == WHvX64RegisterXCr0);
    assert!(name::FP_CONTROL_STATUS == WHvX64RegisterFpControlStatus);
    assert!(name::XMM_CONTROL_STATUS == WHvX64RegisterXmmControlStatus);
    assert!(name::TSC == WHvX64RegisterTsc);
    assert!(name::APIC_BASE == WHvX64RegisterApicBase);
    assert!(name::SFMASK == WHvX64RegisterSfmask);
    assert!(name::MTRR_DEF_TYPE == WHvX64RegisterMsrMtrrDefType);
    assert!(name::TSC_AUX == WHvX64RegisterTscAux);
    assert!(name::PENDING_INTERRUPTION == WHvRegisterPendingInterruption);
    assert!(name::INTERRUPT_STATE == WHvRegisterInterruptState);
    assert!(name::INTERNAL_ACTIVITY_STATE == WHvRegisterInternalActivityState);
    assert!(reason::MEMORY_ACCESS == WHvRunVpExitReasonMemoryAccess);
    assert!(reason::IO_PORT_ACCESS == WHvRunVpExitReasonX64IoPortAccess);
    assert!(reason::HALT == WHvRunVpExitReasonX64Halt);
    assert!(reason::MSR_ACCESS == WHvRunVpExitReasonX64MsrAccess);
    assert!(reason::CANCELED == WHvRunVpExitReasonCanceled);
    assert!(reason::UNRECOVERABLE_EXCEPTION == WHvRunVpExitReasonUnrecoverableException);
};

/// The longest a halted vCPU sleeps without news: its local APIC timer is
/// WHP's and fires without telling the backend, so a halted vCPU enters
/// the guest again this often to let it.
const HALT_POLL: Duration = Duration::from_millis(1);

/// `WHV_EXTENDED_VM_EXITS`: exit on RDMSR/WRMSR of MSRs WHP does not
/// handle itself (bit 1).
const EXIT_ON_MSR: u64 = 1 << 1;

/// `WHvRegisterInternalActivityState`: waiting for SIPI (bit 0), halted
/// (bit 1).
const STARTUP_SUSPEND: u64 = 1 << 0;
const HALT_SUSPEND: u64 = 1 << 1;

/// IA32_MISC_ENABLE as processors come out of reset: fast strings on.
const MISC_ENABLE_RESET: u64 = 1;

fn check(op: &'static str, hresult: i32) -> Result<(), Error> {
    if hresult >= 0 {
        Ok(())
    } else {
        Err(Error::Platform { op, hresult })
    }
}

/// WHP on this Windows host.
#[derive(Debug)]
pub struct WhpHypervisor {
    clock_khz: u32,
}

impl WhpHypervisor {
    /// Checks that the platform is present and turned on.
    pub fn new() -> hv::Result<Self> {
        if let Some(why) = api::missing() {
            return Err(hv::Error::Unavailable(format!(
                "{why}: turn on the \"Windows Hypervisor Platform\" feature"
            )));
        }
        let mut present: i32 = 0;
        let mut written = 0u32;
        // SAFETY: writes at most 4 bytes into `present`, whose size is passed.
        let result = unsafe {
            WHvGetCapability(
                WHvCapabilityCodeHypervisorPresent,
                (&mut present as *mut i32).cast(),
                4,
                &mut written,
            )
        };
        if result < 0 || present == 0 {
            return Err(hv::Error::Unavailable(
                "the Windows Hypervisor Platform is off or unsupported here: turn on the \"Windows Hypervisor Platform\" feature"
                    .into(),
            ));
        }
        let mut hz = 0u64;
        // SAFETY: writes at most 8 bytes into `hz`, whose size is passed.
        check("WHvGetCapability(ProcessorClockFrequency)", unsafe {
            WHvGetCapability(
                WHvCapabilityCodeProcessorClockFrequency,
                (&mut hz as *mut u64).cast(),
                8,
                &mut written,
            )
        })?;
        Ok(Self {
            clock_khz: (hz / 1000) as u32,
        })
    }
}

/// The host's CPUID for the leaves a restore compares.
fn host_cpuid() -> Vec<CpuidEntry> {
    [(0, 0, 0), (1, 0, 0), (7, 0, 1), (0x8000_0001, 0, 0)]
        .into_iter()
        .map(|(function, index, flags)| {
            let r = core::arch::x86_64::__cpuid_count(function, index);
            CpuidEntry {
                function,
                index,
                flags,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
            }
        })
        .collect()
}

/// The most vCPUs the MP table describes.
const MAX_VCPUS: u32 = 64;

impl Hypervisor for WhpHypervisor {
    fn name(&self) -> &'static str {
        "whp"
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    fn create_vm(&self, spec: &VmSpec) -> hv::Result<Arc<dyn Vm>> {
        if spec.vcpu_count == 0 || spec.vcpu_count > MAX_VCPUS {
            return Err(hv::Error::Invalid(format!(
                "{} vCPUs asked for; WHP here runs 1 to {MAX_VCPUS}",
                spec.vcpu_count
            )));
        }
        let mut handle: WHV_PARTITION_HANDLE = 0;
        // SAFETY: writes the new partition's handle through a valid pointer.
        check("WHvCreatePartition", unsafe {
            WHvCreatePartition(&mut handle)
        })?;
        // Deleted on any error from here on.
        let partition = Partition(handle);
        partition.set_property(
            "ProcessorCount",
            WHvPartitionPropertyCodeProcessorCount,
            &spec.vcpu_count,
        )?;
        partition.set_property(
            "LocalApicEmulationMode",
            WHvPartitionPropertyCodeLocalApicEmulationMode,
            &WHvX64LocalApicEmulationModeXApic,
        )?;
        partition.set_property(
            "ExtendedVmExits",
            WHvPartitionPropertyCodeExtendedVmExits,
            &EXIT_ON_MSR,
        )?;
        // SAFETY: a plain call on the partition made above.
        check("WHvSetupPartition", unsafe { WHvSetupPartition(handle) })?;
        for region in &spec.ram {
            // SAFETY: `RamRegion`'s contract: the range is mapped in this
            // process and outlives the partition.
            check("WHvMapGpaRange", unsafe {
                WHvMapGpaRange(
                    handle,
                    region.host_addr() as *const c_void,
                    region.guest_addr(),
                    region.len(),
                    WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite | WHvMapGpaRangeFlagExecute,
                )
            })?;
        }
        Ok(Arc::new(WhpVm {
            shared: Arc::new(Shared {
                partition,
                vcpu_count: spec.vcpu_count,
                clock_khz: self.clock_khz,
                // The MP table gives the I/O APIC the id after the CPUs'.
                ioapic: Mutex::new(Ioapic::new(spec.vcpu_count)),
                generation: Mutex::new(0),
                wake: Condvar::new(),
                notifiers: WriteWatches::default(),
            }),
        }))
    }

    fn check_restorable(&self, vcpus: &[VcpuState]) -> hv::Result<()> {
        let Some(first) = vcpus.first() else {
            return Err(hv::Error::Invalid("the snapshot has no vCPUs".into()));
        };
        if vcpus.len() as u32 > MAX_VCPUS {
            return Err(hv::Error::Invalid(format!(
                "the snapshot has {} vCPUs; WHP here runs at most {MAX_VCPUS}",
                vcpus.len()
            )));
        }
        let host = host_cpuid();
        hv::x86_64::check_cpu_model(&first.cpuid, &host)?;
        hv::x86_64::check_cpu_features(&first.cpuid, &host)?;
        if first.tsc_khz != 0 && first.tsc_khz != self.clock_khz {
            return Err(hv::Error::Unsupported(format!(
                "the guest's TSC ran at {} kHz, this host's at {} kHz, and WHP cannot scale it",
                first.tsc_khz, self.clock_khz
            )));
        }
        Ok(())
    }
}

/// A partition, deleted when dropped (after every vCPU, which hold it).
#[derive(Debug)]
struct Partition(WHV_PARTITION_HANDLE);

impl Partition {
    fn set_property<T>(&self, what: &'static str, code: i32, value: &T) -> Result<(), Error> {
        // SAFETY: passes a valid pointer to `value` and its size.
        let result = unsafe {
            WHvSetPartitionProperty(
                self.0,
                code,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as u32,
            )
        };
        check(what, result)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // SAFETY: deletes the partition this value owns, once.
        let result = unsafe { WHvDeletePartition(self.0) };
        if result < 0 {
            log::warn!("WHvDeletePartition: {}", crate::describe(result));
        }
    }
}

/// What the vCPUs of one partition share.
#[derive(Debug)]
struct Shared {
    partition: Partition,
    vcpu_count: u32,
    clock_khz: u32,
    ioapic: Mutex<Ioapic>,
    /// Moves whenever an interrupt is requested or a vCPU kicked; halted
    /// vCPUs wait on `wake` for it to change.
    generation: Mutex<u64>,
    wake: Condvar,
    notifiers: WriteWatches<supermachine_host::Event>,
}

impl Shared {
    fn handle(&self) -> WHV_PARTITION_HANDLE {
        self.partition.0
    }

    fn ioapic(&self) -> MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_all(&self) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.wake.notify_all();
    }

    /// Signals the notifier that watches this write, if one does.
    fn notify(&self, addr: IoAddress, data: &[u8]) -> bool {
        self.notifiers.signal_matching(addr, data, |event| {
            if let Err(e) = event.signal() {
                log::warn!("notifier at {addr:?}: {e}");
            }
        })
    }

    /// Delivers an edge on I/O APIC line `pin` where the guest routed it.
    fn raise(&self, pin: usize) -> Result<(), Error> {
        let Some(delivery) = self.ioapic().route(pin) else {
            return Ok(()); // masked: an edge on a masked line is lost
        };
        let Some((bits, destination, vector)) = delivery.interrupt_control() else {
            log::debug!(
                "I/O APIC line {pin}: delivery mode {} not supported",
                delivery.mode
            );
            return Ok(());
        };
        let control = WHV_INTERRUPT_CONTROL {
            _bitfield: bits,
            Destination: destination,
            Vector: vector,
        };
        // SAFETY: passes a valid control block and its size.
        check("WHvRequestInterrupt", unsafe {
            WHvRequestInterrupt(
                self.handle(),
                &control,
                std::mem::size_of::<WHV_INTERRUPT_CONTROL>() as u32,
            )
        })?;
        self.wake_all();
        Ok(())
    }
}

#[derive(Debug)]
struct WhpVm {
    shared: Arc<Shared>,
}

impl Vm for WhpVm {
    fn create_vcpu(&self, index: u32) -> hv::Result<Box<dyn Vcpu>> {
        if index >= self.shared.vcpu_count {
            return Err(hv::Error::Invalid(format!(
                "vCPU {index} asked for; the VM has {}",
                self.shared.vcpu_count
            )));
        }
        // SAFETY: a plain call on this VM's partition.
        check("WHvCreateVirtualProcessor", unsafe {
            WHvCreateVirtualProcessor(self.shared.handle(), index, 0)
        })?;
        let emulator = match Emulator::new() {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: deletes the vCPU just created, which nothing uses.
                unsafe { WHvDeleteVirtualProcessor(self.shared.handle(), index) };
                return Err(e.into());
            }
        };
        let vcpu = WhpVcpu {
            index,
            shared: self.shared.clone(),
            emulator,
            kicker: Arc::new(WhpKicker {
                kicked: AtomicBool::new(false),
                index,
                shared: Arc::downgrade(&self.shared),
            }),
            pending: None,
            data: [0; 8],
            misc_enable: MISC_ENABLE_RESET,
        };
        if index > 0 {
            // Application processors wait for INIT and SIPI from the
            // bootstrap processor's local APIC, which WHP delivers.
            vcpu.set_reg64(name::INTERNAL_ACTIVITY_STATE, STARTUP_SUSPEND)?;
        }
        Ok(Box::new(vcpu))
    }

    fn interrupt_line(&self, gsi: u32) -> hv::Result<Arc<dyn InterruptLine>> {
        if gsi as usize >= ioapic::PINS {
            return Err(hv::Error::Invalid(format!(
                "interrupt {gsi} asked for; the I/O APIC has lines 0 to {}",
                ioapic::PINS - 1
            )));
        }
        Ok(Arc::new(IoapicLine {
            pin: gsi as usize,
            shared: Arc::downgrade(&self.shared),
        }))
    }

    fn io_notifier(
        &self,
        addr: IoAddress,
        datamatch: Datamatch,
    ) -> hv::Result<Box<dyn IoNotifier>> {
        let signal = supermachine_host::Event::new().map_err(|source| hv::Error::Os {
            op: "creating a notifier event",
            source,
        })?;
        let watched = self.shared.notifiers.add(addr, datamatch, signal);
        Ok(Box::new(WhpNotifier {
            watched,
            shared: Arc::downgrade(&self.shared),
        }))
    }

    fn save_state(&self) -> hv::Result<VmState> {
        Ok(VmState {
            // WHP machines have neither 8259s nor an 8254: their state is
            // that of absent chips, and a restore insists on it.
            pic_primary: PicState::default(),
            pic_secondary: PicState::default(),
            pit: PitState::default(),
            ioapic: self.shared.ioapic().state(),
            // No paravirtual clock: the guest's time is its TSC, saved
            // with each vCPU's MSRs.
            clock_ns: 0,
        })
    }

    fn restore_state(&self, state: &VmState) -> hv::Result<()> {
        if state.pic_primary != PicState::default()
            || state.pic_secondary != PicState::default()
            || state.pit != PitState::default()
        {
            return Err(hv::Error::Unsupported(
                "the snapshot's machine had 8259 and 8254 chips, which a WHP machine does not"
                    .into(),
            ));
        }
        *self.shared.ioapic() = Ioapic::from_state(&state.ioapic).map_err(hv::Error::Invalid)?;
        Ok(())
    }
}

#[derive(Debug)]
struct IoapicLine {
    pin: usize,
    shared: Weak<Shared>,
}

impl InterruptLine for IoapicLine {
    fn trigger(&self) -> hv::Result<()> {
        match self.shared.upgrade() {
            Some(shared) => Ok(shared.raise(self.pin)?),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
struct WhpNotifier {
    watched: Arc<Watched<supermachine_host::Event>>,
    shared: Weak<Shared>,
}

impl IoNotifier for WhpNotifier {
    fn as_raw_handle(&self) -> std::os::windows::io::RawHandle {
        use std::os::windows::io::{AsHandle, AsRawHandle};
        self.watched.signal.as_handle().as_raw_handle()
    }

    fn consume(&self) -> hv::Result<u64> {
        self.watched.signal.drain().map_err(|source| hv::Error::Os {
            op: "reading a notifier event",
            source,
        })
    }
}

impl Drop for WhpNotifier {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.notifiers.remove(&self.watched);
        }
    }
}

#[derive(Debug)]
struct WhpKicker {
    kicked: AtomicBool,
    index: u32,
    shared: Weak<Shared>,
}

impl VcpuKicker for WhpKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        if let Some(shared) = self.shared.upgrade() {
            // SAFETY: a plain call; WHP allows it from any thread.
            unsafe { WHvCancelRunVirtualProcessor(shared.handle(), self.index, 0) };
            shared.wake_all();
        }
    }
}

/// WHP's instruction emulator, one per vCPU.
#[derive(Debug)]
struct Emulator(*mut c_void);

// SAFETY: the emulator keeps no thread affinity; each is used by one
// vCPU at a time (`&mut WhpVcpu`).
unsafe impl Send for Emulator {}

impl Emulator {
    fn new() -> Result<Self, Error> {
        let callbacks = WHV_EMULATOR_CALLBACKS {
            Size: std::mem::size_of::<WHV_EMULATOR_CALLBACKS>() as u32,
            Reserved: 0,
            WHvEmulatorIoPortCallback: Some(emulator_io_port),
            WHvEmulatorMemoryCallback: Some(emulator_memory),
            WHvEmulatorGetVirtualProcessorRegisters: Some(emulator_get_registers),
            WHvEmulatorSetVirtualProcessorRegisters: Some(emulator_set_registers),
            WHvEmulatorTranslateGvaPage: Some(emulator_translate_gva),
        };
        let mut handle = ptr::null_mut();
        // SAFETY: valid callbacks and out-pointer.
        check("WHvEmulatorCreateEmulator", unsafe {
            WHvEmulatorCreateEmulator(&callbacks, &mut handle)
        })?;
        Ok(Self(handle))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // SAFETY: destroys the emulator this value owns, once.
        unsafe { WHvEmulatorDestroyEmulator(self.0) };
    }
}

/// One MMIO access the emulator made.
#[derive(Clone, Copy, Debug)]
struct MmioAccess {
    addr: u64,
    size: usize,
    write: bool,
    data: [u8; 8],
}

/// What a pass of the emulator is for.
#[derive(Debug)]
enum Pass {
    /// Learn the access, then abandon the emulation.
    Probe(Option<MmioAccess>),
    /// Answer the access with `data` and let the emulation commit.
    Replay { data: [u8; 8], answered: bool },
}

/// The context the emulator's callbacks get.
#[derive(Debug)]
struct EmulationContext {
    partition: WHV_PARTITION_HANDLE,
    index: u32,
    pass: Pass,
}

const E_NOTIMPL: i32 = 0x8000_4001_u32 as i32;
const E_ABORT: i32 = 0x8000_4004_u32 as i32;
const E_FAIL: i32 = 0x8000_4005_u32 as i32;

/// # Safety
/// Called by the emulator with the context we passed it.
unsafe extern "system" fn emulator_io_port(
    _context: *const c_void,
    _access: *mut WHV_EMULATOR_IO_ACCESS_INFO,
) -> i32 {
    // Port I/O is decoded from its exit without the emulator.
    E_NOTIMPL
}

/// # Safety
/// Called by the emulator with the `EmulationContext` we passed it and a
/// valid access record.
unsafe extern "system" fn emulator_memory(
    context: *const c_void,
    access: *mut WHV_EMULATOR_MEMORY_ACCESS_INFO,
) -> i32 {
    // SAFETY: the emulator hands back the exclusive context pointer we
    // gave it, for the duration of the call that gave it.
    let context = unsafe { &mut *(context as *mut EmulationContext) };
    // SAFETY: the emulator passes a valid, exclusive record.
    let access = unsafe { &mut *access };
    let size = usize::from(access.AccessSize).min(8);
    match &mut context.pass {
        Pass::Probe(seen) => {
            *seen = Some(MmioAccess {
                addr: access.GpaAddress,
                size,
                write: access.Direction != 0,
                data: access.Data,
            });
            E_ABORT
        }
        Pass::Replay { data, answered } => {
            if *answered {
                // A second access (MOVS between two devices, say): the
                // VMM answered only one.
                return E_FAIL;
            }
            if access.Direction == 0 {
                access.Data[..size].copy_from_slice(&data[..size]);
            }
            *answered = true;
            0
        }
    }
}

/// # Safety
/// Called by the emulator with our context and arrays of `count` entries.
unsafe extern "system" fn emulator_get_registers(
    context: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *mut WHV_REGISTER_VALUE,
) -> i32 {
    // SAFETY: our context, read only here.
    let context = unsafe { &*(context as *const EmulationContext) };
    // SAFETY: the emulator's arrays hold `count` entries.
    unsafe {
        WHvGetVirtualProcessorRegisters(context.partition, context.index, names, count, values)
    }
}

/// # Safety
/// As `emulator_get_registers`.
unsafe extern "system" fn emulator_set_registers(
    context: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *const WHV_REGISTER_VALUE,
) -> i32 {
    // SAFETY: our context, read only here.
    let context = unsafe { &*(context as *const EmulationContext) };
    if matches!(context.pass, Pass::Probe(_)) {
        // A probe never commits.
        return E_ABORT;
    }
    // SAFETY: the emulator's arrays hold `count` entries.
    unsafe {
        WHvSetVirtualProcessorRegisters(context.partition, context.index, names, count, values)
    }
}

/// # Safety
/// Called by the emulator with our context and valid out-pointers.
unsafe extern "system" fn emulator_translate_gva(
    context: *const c_void,
    gva: u64,
    flags: WHV_TRANSLATE_GVA_FLAGS,
    result: *mut WHV_TRANSLATE_GVA_RESULT_CODE,
    gpa: *mut u64,
) -> i32 {
    // SAFETY: our context, read only here.
    let context = unsafe { &*(context as *const EmulationContext) };
    let mut translation = WHV_TRANSLATE_GVA_RESULT::default();
    // SAFETY: valid out-pointers; `gpa` is the emulator's.
    let hresult = unsafe {
        WHvTranslateGva(
            context.partition,
            context.index,
            gva,
            flags,
            &mut translation,
            gpa,
        )
    };
    // SAFETY: the emulator's out-pointer.
    unsafe { *result = translation.ResultCode };
    hresult
}

/// An exit the VMM has been handed and that completes on the next `run`.
enum Pending {
    PortIn {
        access: PortAccess,
        rax: u64,
        next_rip: u64,
    },
    PortOut {
        next_rip: u64,
    },
    Mmio(Box<WHV_RUN_VP_EXIT_CONTEXT>),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::PortIn { access, .. } => write!(f, "PortIn({access:?})"),
            Pending::PortOut { next_rip } => write!(f, "PortOut(next {next_rip:#x})"),
            Pending::Mmio(_) => f.write_str("Mmio"),
        }
    }
}

/// What one pass of the run loop decided.
enum Outcome {
    Again,
    PortIn(PortAccess),
    PortOut(PortAccess),
    MmioRead(MmioAccess),
    MmioWrite(MmioAccess),
    Exit(VcpuExit<'static>),
}

#[derive(Debug)]
struct WhpVcpu {
    index: u32,
    shared: Arc<Shared>,
    emulator: Emulator,
    kicker: Arc<WhpKicker>,
    pending: Option<Pending>,
    data: [u8; 8],
    misc_enable: u64,
}

fn zero_value() -> WHV_REGISTER_VALUE {
    WHV_REGISTER_VALUE::default()
}

fn value64(v: u64) -> WHV_REGISTER_VALUE {
    let mut value = zero_value();
    value.Reg64 = v;
    value
}

impl WhpVcpu {
    fn read_regs(&self, names: &[i32]) -> Result<Vec<WHV_REGISTER_VALUE>, Error> {
        let mut values = vec![zero_value(); names.len()];
        // SAFETY: both arrays hold `names.len()` entries.
        check("WHvGetVirtualProcessorRegisters", unsafe {
            WHvGetVirtualProcessorRegisters(
                self.shared.handle(),
                self.index,
                names.as_ptr(),
                names.len() as u32,
                values.as_mut_ptr(),
            )
        })?;
        Ok(values)
    }

    fn write_regs(&self, names: &[i32], values: &[WHV_REGISTER_VALUE]) -> Result<(), Error> {
        debug_assert_eq!(names.len(), values.len());
        // SAFETY: both arrays hold `names.len()` entries.
        check("WHvSetVirtualProcessorRegisters", unsafe {
            WHvSetVirtualProcessorRegisters(
                self.shared.handle(),
                self.index,
                names.as_ptr(),
                names.len().min(values.len()) as u32,
                values.as_ptr(),
            )
        })
    }

    fn get_reg64(&self, name: i32) -> Result<u64, Error> {
        let values = self.read_regs(&[name])?;
        // SAFETY: the 64-bit registers asked for here are written as Reg64.
        Ok(unsafe { values[0].Reg64 })
    }

    fn set_reg64(&self, name: i32, value: u64) -> Result<(), Error> {
        self.write_regs(&[name], &[value64(value)])
    }

    fn set_rip(&self, rip: u64) -> Result<(), Error> {
        self.set_reg64(name::RIP, rip)
    }

    /// Runs the emulator over a memory-access exit for `pass`.
    fn emulate(&self, exit: &WHV_RUN_VP_EXIT_CONTEXT, pass: Pass) -> Result<(bool, Pass), Error> {
        let mut context = EmulationContext {
            partition: self.shared.handle(),
            index: self.index,
            pass,
        };
        let mut status = WHV_EMULATOR_STATUS::default();
        // SAFETY: the exit's union holds a memory access (checked by the
        // caller); the context outlives the call and is only used by the
        // callbacks during it.
        let hresult = unsafe {
            WHvEmulatorTryMmioEmulation(
                self.emulator.0,
                (&mut context as *mut EmulationContext).cast(),
                &exit.VpContext,
                &exit.Anonymous.MemoryAccess,
                &mut status,
            )
        };
        // SAFETY: the status is a bitfield; bit 0 is EmulationSuccessful.
        let succeeded = hresult >= 0 && unsafe { status.AsUINT32 } & 1 != 0;
        Ok((succeeded, context.pass))
    }

    /// Completes what the VMM answered.
    fn complete_pending(&mut self) -> hv::Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(Pending::PortOut { next_rip }) => Ok(self.set_rip(next_rip)?),
            Some(Pending::PortIn {
                access,
                rax,
                next_rip,
            }) => {
                let rax = access.rax_after_in(rax, &self.data[..access.size]);
                Ok(self.write_regs(&[name::RAX, name::RIP], &[value64(rax), value64(next_rip)])?)
            }
            Some(Pending::Mmio(exit)) => {
                let (ok, _) = self.emulate(
                    &exit,
                    Pass::Replay {
                        data: self.data,
                        answered: false,
                    },
                )?;
                if ok {
                    Ok(())
                } else {
                    Err(hv::Error::Invalid(format!(
                        "vCPU {}: WHP's emulator could not complete the MMIO access at RIP {:#x}",
                        self.index, exit.VpContext.Rip
                    )))
                }
            }
        }
    }

    fn wait_while_halted(&self) {
        let generation = self
            .shared
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.kicker.kicked.load(Ordering::SeqCst) {
            return;
        }
        let start = *generation;
        let _unused = self
            .shared
            .wake
            .wait_timeout_while(generation, HALT_POLL, |g| *g == start)
            .unwrap_or_else(|p| p.into_inner());
    }

    fn memory_access(&mut self, exit: &WHV_RUN_VP_EXIT_CONTEXT) -> hv::Result<Outcome> {
        let (_, pass) = self.emulate(exit, Pass::Probe(None))?;
        let Pass::Probe(Some(access)) = pass else {
            return Ok(Outcome::Exit(VcpuExit::InternalError(format!(
                "WHP's emulator could not decode the instruction at RIP {:#x}",
                exit.VpContext.Rip
            ))));
        };
        let mut data = access.data;
        let handled_here = if (ioapic::BASE..ioapic::BASE + ioapic::SIZE).contains(&access.addr) {
            let offset = access.addr - ioapic::BASE;
            if access.write {
                self.shared.ioapic().write(offset, &data[..access.size]);
            } else {
                self.shared.ioapic().read(offset, &mut data[..access.size]);
            }
            true
        } else {
            access.write
                && self
                    .shared
                    .notify(IoAddress::Mmio(access.addr), &data[..access.size])
        };
        if handled_here {
            let (ok, _) = self.emulate(
                exit,
                Pass::Replay {
                    data,
                    answered: false,
                },
            )?;
            if !ok {
                return Ok(Outcome::Exit(VcpuExit::InternalError(format!(
                    "WHP's emulator could not complete the access at {:#x}",
                    access.addr
                ))));
            }
            return Ok(Outcome::Again);
        }
        self.pending = Some(Pending::Mmio(Box::new(*exit)));
        Ok(if access.write {
            Outcome::MmioWrite(access)
        } else {
            Outcome::MmioRead(access)
        })
    }

    fn port_access(&mut self, exit: &WHV_RUN_VP_EXIT_CONTEXT) -> hv::Result<Outcome> {
        // SAFETY: the exit reason says the union holds a port access.
        let io = unsafe { exit.Anonymous.IoPortAccess };
        // SAFETY: a bitfield read as its integer.
        let access = PortAccess::decode(io.PortNumber, unsafe { io.AccessInfo.AsUINT32 });
        let next_rip = exit.VpContext.Rip + exit::instruction_length(exit.VpContext._bitfield);
        if !access.is_simple() {
            return Ok(Outcome::Exit(VcpuExit::InternalError(format!(
                "string or REP port I/O at port {:#x} is not emulated",
                access.port
            ))));
        }
        if access.write {
            let data = access.out_data(io.Rax);
            if self
                .shared
                .notify(IoAddress::Port(access.port), &data[..access.size])
            {
                self.set_rip(next_rip)?;
                return Ok(Outcome::Again);
            }
            self.data[..4].copy_from_slice(&data);
            self.pending = Some(Pending::PortOut { next_rip });
            Ok(Outcome::PortOut(access))
        } else {
            self.data = [0; 8];
            self.pending = Some(Pending::PortIn {
                access,
                rax: io.Rax,
                next_rip,
            });
            Ok(Outcome::PortIn(access))
        }
    }

    fn msr_access(&mut self, exit: &WHV_RUN_VP_EXIT_CONTEXT) -> hv::Result<Outcome> {
        // SAFETY: the exit reason says the union holds an MSR access.
        let msr = unsafe { exit.Anonymous.MsrAccess };
        // SAFETY: a bitfield read as its integer; bit 0 is IsWrite.
        let write = unsafe { msr.AccessInfo.AsUINT32 } & 1 != 0;
        let next_rip = exit.VpContext.Rip + exit::instruction_length(exit.VpContext._bitfield);
        let value = if msr.MsrNumber == regs::MSR_MISC_ENABLE {
            if write {
                self.misc_enable = (msr.Rdx << 32) | (msr.Rax & 0xffff_ffff);
            }
            self.misc_enable
        } else {
            log::debug!(
                "vCPU {}: {} of MSR {:#x}, which reads as zero and ignores writes",
                self.index,
                if write { "WRMSR" } else { "RDMSR" },
                msr.MsrNumber
            );
            0
        };
        if write {
            self.set_rip(next_rip)?;
        } else {
            self.write_regs(
                &[name::RAX, name::RDX, name::RIP],
                &[
                    value64(value & 0xffff_ffff),
                    value64(value >> 32),
                    value64(next_rip),
                ],
            )?;
        }
        Ok(Outcome::Again)
    }

    fn step(&mut self) -> hv::Result<Outcome> {
        if self.kicker.kicked.swap(false, Ordering::SeqCst) {
            return Ok(Outcome::Exit(VcpuExit::Interrupted));
        }
        let mut exit = WHV_RUN_VP_EXIT_CONTEXT::default();
        // SAFETY: the exit context is ours and its size is passed.
        check("WHvRunVirtualProcessor", unsafe {
            WHvRunVirtualProcessor(
                self.shared.handle(),
                self.index,
                (&mut exit as *mut WHV_RUN_VP_EXIT_CONTEXT).cast(),
                std::mem::size_of::<WHV_RUN_VP_EXIT_CONTEXT>() as u32,
            )
        })?;
        match exit.ExitReason {
            reason::MEMORY_ACCESS => self.memory_access(&exit),
            reason::IO_PORT_ACCESS => self.port_access(&exit),
            reason::MSR_ACCESS => self.msr_access(&exit),
            reason::HALT => {
                self.wait_while_halted();
                Ok(Outcome::Again)
            }
            reason::CANCELED => Ok(if self.kicker.kicked.swap(false, Ordering::SeqCst) {
                Outcome::Exit(VcpuExit::Interrupted)
            } else {
                Outcome::Again
            }),
            reason::UNRECOVERABLE_EXCEPTION => Ok(Outcome::Exit(VcpuExit::Shutdown)),
            reason::INVALID_VP_REGISTER_VALUE => Ok(Outcome::Exit(VcpuExit::InternalError(
                "WHP found an invalid register value".into(),
            ))),
            reason::UNSUPPORTED_FEATURE => Ok(Outcome::Exit(VcpuExit::InternalError(
                "the guest used a feature WHP does not support".into(),
            ))),
            reason::INTERRUPT_WINDOW | reason::APIC_EOI => Ok(Outcome::Again),
            other => Ok(Outcome::Exit(VcpuExit::Unhandled(format!(
                "WHP exit reason {other:#x}"
            )))),
        }
    }

    fn special(&self) -> Result<SpecialRegs, Error> {
        let v = self.read_regs(&regs::SPECIAL)?;
        // SAFETY: WHP writes each value in its register's format: the
        // first eight are segments, then two tables, then 64-bit values.
        unsafe {
            let seg = |i: usize| {
                let s = v[i].Segment;
                regs::segment(s.Base, s.Limit, s.Selector, s.Anonymous.Attributes)
            };
            let table = |i: usize| DescriptorTable {
                base: v[i].Table.Base,
                limit: v[i].Table.Limit,
            };
            Ok(SpecialRegs {
                cs: seg(0),
                ds: seg(1),
                es: seg(2),
                fs: seg(3),
                gs: seg(4),
                ss: seg(5),
                tr: seg(6),
                ldt: seg(7),
                gdt: table(8),
                idt: table(9),
                cr0: v[10].Reg64,
                cr2: v[11].Reg64,
                cr3: v[12].Reg64,
                cr4: v[13].Reg64,
                cr8: v[14].Reg64,
                efer: v[15].Reg64,
                apic_base: v[16].Reg64,
            })
        }
    }

    fn set_special(&self, s: &SpecialRegs) -> Result<(), Error> {
        let seg = |x: &hv::Segment| {
            let mut value = zero_value();
            value.Segment = WHV_X64_SEGMENT_REGISTER {
                Base: x.base,
                Limit: x.limit,
                Selector: x.selector,
                Anonymous: WHV_X64_SEGMENT_REGISTER_0 {
                    Attributes: regs::segment_attributes(x),
                },
            };
            value
        };
        let table = |t: &DescriptorTable| {
            let mut value = zero_value();
            value.Table = WHV_X64_TABLE_REGISTER {
                Pad: [0; 3],
                Limit: t.limit,
                Base: t.base,
            };
            value
        };
        let values = [
            seg(&s.cs),
            seg(&s.ds),
            seg(&s.es),
            seg(&s.fs),
            seg(&s.gs),
            seg(&s.ss),
            seg(&s.tr),
            seg(&s.ldt),
            table(&s.gdt),
            table(&s.idt),
            value64(s.cr0),
            value64(s.cr2),
            value64(s.cr3),
            value64(s.cr4),
            value64(s.cr8),
            value64(s.efer),
            value64(s.apic_base),
        ];
        self.write_regs(&regs::SPECIAL, &values)
    }

    fn xsave(&self) -> Result<Vec<u8>, Error> {
        let mut buffer = vec![0u8; 4096];
        loop {
            let mut written = 0u32;
            // SAFETY: the buffer holds the size passed.
            let hresult = unsafe {
                WHvGetVirtualProcessorXsaveState(
                    self.shared.handle(),
                    self.index,
                    buffer.as_mut_ptr().cast(),
                    buffer.len() as u32,
                    &mut written,
                )
            };
            if hresult as u32 == 0x8037_0302 && written as usize > buffer.len() {
                buffer.resize(written as usize, 0); // WHV_E_INSUFFICIENT_BUFFER
                continue;
            }
            check("WHvGetVirtualProcessorXsaveState", hresult)?;
            buffer.truncate(written as usize);
            return Ok(buffer);
        }
    }

    fn lapic_page(&self) -> Result<Vec<u8>, Error> {
        let mut page = vec![0u8; lapic::PAGE_SIZE];
        let mut written = 0u32;
        // SAFETY: the buffer holds the size passed.
        check("WHvGetVirtualProcessorInterruptControllerState2", unsafe {
            WHvGetVirtualProcessorInterruptControllerState2(
                self.shared.handle(),
                self.index,
                page.as_mut_ptr().cast(),
                page.len() as u32,
                &mut written,
            )
        })?;
        page.truncate(written as usize);
        Ok(page)
    }

    fn mp_state(&self) -> Result<MpState, Error> {
        let activity = self.get_reg64(name::INTERNAL_ACTIVITY_STATE)?;
        Ok(if activity & STARTUP_SUSPEND != 0 {
            MpState::InitReceived
        } else if activity & HALT_SUSPEND != 0 {
            MpState::Halted
        } else {
            MpState::Runnable
        })
    }
}

impl Vcpu for WhpVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn run(&mut self) -> hv::Result<VcpuExit<'_>> {
        self.complete_pending()?;
        loop {
            match self.step()? {
                Outcome::Again => continue,
                Outcome::Exit(exit) => return Ok(exit),
                Outcome::PortIn(access) => {
                    return Ok(VcpuExit::IoIn {
                        port: access.port,
                        data: &mut self.data[..access.size],
                    });
                }
                Outcome::PortOut(access) => {
                    return Ok(VcpuExit::IoOut {
                        port: access.port,
                        data: &self.data[..access.size],
                    });
                }
                Outcome::MmioRead(access) => {
                    self.data = [0; 8];
                    return Ok(VcpuExit::MmioRead {
                        addr: access.addr,
                        data: &mut self.data[..access.size],
                    });
                }
                Outcome::MmioWrite(access) => {
                    self.data = access.data;
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
        let v = self.read_regs(&regs::GENERAL)?;
        // SAFETY: general-purpose registers, RIP and RFLAGS are Reg64.
        let r = |i: usize| unsafe { v[i].Reg64 };
        Ok(Regs {
            rax: r(0),
            rbx: r(1),
            rcx: r(2),
            rdx: r(3),
            rsi: r(4),
            rdi: r(5),
            rsp: r(6),
            rbp: r(7),
            r8: r(8),
            r9: r(9),
            r10: r(10),
            r11: r(11),
            r12: r(12),
            r13: r(13),
            r14: r(14),
            r15: r(15),
            rip: r(16),
            rflags: r(17),
        })
    }

    fn set_regs(&mut self, r: &Regs) -> hv::Result<()> {
        let values = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ]
        .map(value64);
        Ok(WhpVcpu::write_regs(self, &regs::GENERAL, &values)?)
    }

    fn special_regs(&self) -> hv::Result<SpecialRegs> {
        Ok(self.special()?)
    }

    fn set_special_regs(&mut self, sregs: &SpecialRegs) -> hv::Result<()> {
        Ok(self.set_special(sregs)?)
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> hv::Result<()> {
        let mut v = self.read_regs(&[name::FP_CONTROL_STATUS, name::XMM_CONTROL_STATUS])?;
        // Each register is written in its own format.
        v[0].FpControlStatus.Anonymous.FpControl = fpu.fcw;
        v[1].XmmControlStatus.Anonymous.XmmStatusControl = fpu.mxcsr;
        Ok(WhpVcpu::write_regs(
            self,
            &[name::FP_CONTROL_STATUS, name::XMM_CONTROL_STATUS],
            &v,
        )?)
    }

    fn msrs(&self, indices: &[u32]) -> hv::Result<Vec<MsrEntry>> {
        indices
            .iter()
            .map(|&index| {
                let data = if index == regs::MSR_MISC_ENABLE {
                    self.misc_enable
                } else {
                    let name = regs::msr_register(index).ok_or_else(|| {
                        hv::Error::Unsupported(format!("MSR {index:#x} has no WHP register"))
                    })?;
                    self.get_reg64(name)?
                };
                Ok(MsrEntry { index, data })
            })
            .collect()
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> hv::Result<()> {
        for msr in msrs {
            if msr.index == regs::MSR_MISC_ENABLE {
                self.misc_enable = msr.data;
                continue;
            }
            let name = regs::msr_register(msr.index).ok_or_else(|| {
                hv::Error::Unsupported(format!("MSR {:#x} has no WHP register", msr.index))
            })?;
            self.set_reg64(name, msr.data)?;
        }
        Ok(())
    }

    fn save_state(&mut self) -> hv::Result<VcpuState> {
        self.complete_pending()?;
        let debug = self.read_regs(&regs::DEBUG)?;
        // SAFETY: debug registers are Reg64.
        let d = |i: usize| unsafe { debug[i].Reg64 };
        let events = self.read_regs(&[name::PENDING_INTERRUPTION, name::INTERRUPT_STATE])?;
        // SAFETY: both are 64-bit bitfields.
        let (pending, interrupt_state) = unsafe { (events[0].Reg64, events[1].Reg64) };
        Ok(VcpuState {
            cpuid: host_cpuid(),
            tsc_khz: self.shared.clock_khz,
            mp_state: self.mp_state()?,
            regs: self.regs()?,
            sregs: self.special()?,
            pending_interrupts: [0; 4],
            xsave: self.xsave()?,
            xcrs: vec![Xcr {
                index: 0,
                value: self.get_reg64(name::XCR0)?,
            }],
            debug_regs: DebugRegs {
                db: [d(0), d(1), d(2), d(3)],
                dr6: d(4),
                dr7: d(5),
            },
            lapic: lapic::saved(&self.lapic_page()?).map_err(hv::Error::Invalid)?,
            msrs: self.msrs(regs::SAVED_MSRS)?,
            events: regs::events(pending, interrupt_state),
        })
    }

    fn restore_state(&mut self, state: &VcpuState) -> hv::Result<()> {
        let (pending, interrupt_state) =
            regs::from_events(&state.events).map_err(hv::Error::Unsupported)?;
        let page = lapic::page(&state.lapic).map_err(hv::Error::Invalid)?;
        // WHP gives vCPU n local APIC id n.
        if lapic::apic_id(&state.lapic) != Some(self.index as u8) {
            return Err(hv::Error::Invalid(format!(
                "the saved local APIC has id {:?}; vCPU {} has id {}",
                lapic::apic_id(&state.lapic),
                self.index,
                self.index
            )));
        }
        self.set_special(&state.sregs)?;
        self.set_regs(&state.regs)?;
        // SAFETY: the buffer holds the size passed.
        check("WHvSetVirtualProcessorXsaveState", unsafe {
            WHvSetVirtualProcessorXsaveState(
                self.shared.handle(),
                self.index,
                state.xsave.as_ptr().cast(),
                state.xsave.len() as u32,
            )
        })?;
        for xcr in &state.xcrs {
            if xcr.index != 0 {
                return Err(hv::Error::Unsupported(format!(
                    "XCR{} has no WHP register",
                    xcr.index
                )));
            }
            self.set_reg64(name::XCR0, xcr.value)?;
        }
        self.set_msrs(&state.msrs)?;
        // SAFETY: the page holds the size passed.
        check("WHvSetVirtualProcessorInterruptControllerState2", unsafe {
            WHvSetVirtualProcessorInterruptControllerState2(
                self.shared.handle(),
                self.index,
                page.as_ptr().cast(),
                page.len() as u32,
            )
        })?;
        let dr = &state.debug_regs;
        let debug = [dr.db[0], dr.db[1], dr.db[2], dr.db[3], dr.dr6, dr.dr7].map(value64);
        WhpVcpu::write_regs(self, &regs::DEBUG, &debug)?;
        WhpVcpu::write_regs(
            self,
            &[name::PENDING_INTERRUPTION, name::INTERRUPT_STATE],
            &[value64(pending), value64(interrupt_state)],
        )?;
        let activity = match state.mp_state {
            MpState::Runnable | MpState::SipiReceived => 0,
            MpState::Uninitialized | MpState::InitReceived => STARTUP_SUSPEND,
            MpState::Halted => HALT_SUSPEND,
        };
        self.set_reg64(name::INTERNAL_ACTIVITY_STATE, activity)?;
        Ok(())
    }
}

impl Drop for WhpVcpu {
    fn drop(&mut self) {
        // SAFETY: deletes this vCPU, whose last use this is.
        let result = unsafe { WHvDeleteVirtualProcessor(self.shared.handle(), self.index) };
        if result < 0 {
            log::warn!("WHvDeleteVirtualProcessor: {}", crate::describe(result));
        }
    }
}
