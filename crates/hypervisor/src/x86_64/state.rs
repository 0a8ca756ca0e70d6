//! The complete saved state of an x86_64 vCPU and of the platform devices
//! a hypervisor emulates in its kernel (8259 PICs, IOAPIC, 8254 PIT, the
//! paravirtual clock), as plain data.
//!
//! Field meanings follow the architecture (Intel SDM, the 8259A/8254/82093
//! datasheets), not any hypervisor's structure layout, so that a backend
//! can produce and consume them; each backend converts to and from its own
//! ABI. Snapshots serialize these types (`docs/snapshot.md`); a field added
//! here changes the snapshot format version.

use serde::{Deserialize, Serialize};

use super::{MsrEntry, Regs, SpecialRegs};

/// One CPUID leaf/subleaf as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Bit 0: the subleaf (`index`) is significant for this leaf.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Where a vCPU is in the INIT/SIPI protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    /// Executing.
    Runnable,
    /// An application processor that has not received INIT.
    Uninitialized,
    /// INIT received, waiting for SIPI.
    InitReceived,
    /// Halted (`hlt`), waiting for an interrupt.
    Halted,
    /// SIPI received, about to start.
    SipiReceived,
}

/// An extended control register (XCR0 is the only one defined today).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    /// Which XCR.
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// Debug registers DR0-DR3, DR6, DR7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// An exception being delivered or waiting to be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionEvent {
    /// Being injected into the guest right now.
    pub injected: bool,
    /// Raised but not yet injected.
    pub pending: bool,
    /// The vector.
    pub vector: u8,
    /// The error code pushed with it, for exceptions that have one.
    pub error_code: Option<u32>,
}

/// An external or software interrupt being delivered, and the interrupt
/// shadow (`sti`/`mov ss` blocking).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptEvent {
    /// Being injected right now.
    pub injected: bool,
    /// The vector.
    pub vector: u8,
    /// A software interrupt (`int n`).
    pub soft: bool,
    /// Interrupt-shadow bits (1: after `sti`, 2: after `mov ss`/`pop ss`).
    pub shadow: u8,
}

/// Non-maskable interrupt state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct NmiEvent {
    pub injected: bool,
    pub pending: bool,
    /// NMIs blocked (an NMI handler is running).
    pub masked: bool,
}

/// System-management-mode state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SmiEvent {
    pub smm: bool,
    pub pending: bool,
    pub smm_inside_nmi: bool,
    pub latched_init: bool,
}

/// Events in flight on a vCPU: what a snapshot taken between two
/// instructions must carry so that nothing being delivered is lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception: ExceptionEvent,
    pub interrupt: InterruptEvent,
    pub nmi: NmiEvent,
    /// The vector of the last SIPI (for an AP waiting to start).
    pub sipi_vector: u32,
    pub smi: SmiEvent,
}

/// Everything that makes up one vCPU between two instructions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest was given (and has already acted on).
    pub cpuid: Vec<CpuidEntry>,
    /// The guest's TSC frequency in kHz.
    pub tsc_khz: u32,
    /// INIT/SIPI and halt state.
    pub mp_state: MpState,
    /// General-purpose registers.
    pub regs: Regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: SpecialRegs,
    /// External interrupts the local APIC has accepted but not yet
    /// delivered: a 256-bit bitmap by vector.
    pub pending_interrupts: [u64; 4],
    /// The XSAVE area (x87, SSE, AVX, ... state) in the standard
    /// (non-compacted) format of the SDM, vol. 1, 13.4.
    #[serde(with = "serde_bytes")]
    pub xsave: Vec<u8>,
    /// Extended control registers.
    pub xcrs: Vec<Xcr>,
    /// Debug registers.
    pub debug_regs: DebugRegs,
    /// The local APIC's 1 KiB register page, in its MMIO layout.
    #[serde(with = "serde_bytes")]
    pub lapic: Vec<u8>,
    /// Every model-specific register the hypervisor saves (time stamp
    /// counter, TSC deadline, syscall MSRs, paravirtual clock, ...).
    pub msrs: Vec<MsrEntry>,
    /// Events in flight.
    pub events: VcpuEvents,
}

/// One 8259A interrupt controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PicState {
    /// Edge detection: the line levels last seen.
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    /// Edge/level control (the ELCR register of the PIIX).
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The I/O APIC (24 pins).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    /// The redirection table, one 64-bit entry per pin.
    pub redirection: [u64; 24],
}

/// One 8254 timer channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PitChannel {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    /// When the count was loaded, in the hypervisor's clock (ns).
    pub count_load_time: i64,
}

/// The 8254 programmable interval timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0-2.
    pub channels: [PitChannel; 3],
    /// Bit 0: the HPET has taken over channel 0 (legacy replacement).
    pub flags: u32,
}

/// The platform state a hypervisor keeps outside the vCPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The primary 8259 (IRQs 0-7).
    pub pic_primary: PicState,
    /// The secondary 8259 (IRQs 8-15).
    pub pic_secondary: PicState,
    /// The I/O APIC.
    pub ioapic: IoapicState,
    /// The PIT.
    pub pit: PitState,
    /// The paravirtual clock (kvmclock on KVM) in nanoseconds: restored
    /// as saved, so the guest's monotonic time resumes where it paused.
    pub clock_ns: u64,
}
