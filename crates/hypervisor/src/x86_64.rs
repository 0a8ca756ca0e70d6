//! x86_64 CPU state in plain types, independent of any hypervisor's layout.

mod cpuid;
mod state;

use serde::{Deserialize, Serialize};

pub use cpuid::{check_cpu_features, check_cpu_model};
pub use state::{
    CpuidEntry, DebugRegs, ExceptionEvent, InterruptEvent, IoapicState, MpState, NmiEvent,
    PicState, PitChannel, PitState, SmiEvent, VcpuEvents, VcpuState, VmState, Xcr,
};

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (already scaled by granularity).
    pub limit: u32,
    /// Selector value.
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level (0..=3).
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units in the descriptor).
    pub g: bool,
    /// Available for system software.
    pub avl: bool,
    /// Marks a null/unusable segment.
    pub unusable: bool,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The x87 and SSE control words a CPU comes out of reset with, or that a
/// boot protocol asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpuState {
    /// x87 control word.
    pub fcw: u16,
    /// SSE control/status.
    pub mxcsr: u32,
}

impl Default for FpuState {
    fn default() -> Self {
        // The values FNINIT and processor reset establish.
        Self {
            fcw: 0x37f,
            mxcsr: 0x1f80,
        }
    }
}

/// A model-specific register and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Everything a boot protocol sets on a vCPU before its first `run()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// General-purpose registers.
    pub regs: Regs,
    /// Segment and control registers.
    pub sregs: SpecialRegs,
    /// FPU control state.
    pub fpu: FpuState,
    /// MSRs to write.
    pub msrs: Vec<MsrEntry>,
}

/// Architectural constants shared by boot code and backends.
pub mod consts {
    /// CR0: protection enable.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0: extension type (387 present).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4: physical address extension.
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS bit 1 is always set.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;

    /// MSR numbers the boot state writes.
    pub mod msr {
        #![allow(missing_docs)]
        pub const IA32_SYSENTER_CS: u32 = 0x174;
        pub const IA32_SYSENTER_ESP: u32 = 0x175;
        pub const IA32_SYSENTER_EIP: u32 = 0x176;
        pub const IA32_TSC: u32 = 0x10;
        pub const IA32_MISC_ENABLE: u32 = 0x1a0;
        pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
        pub const STAR: u32 = 0xc000_0081;
        pub const LSTAR: u32 = 0xc000_0082;
        pub const CSTAR: u32 = 0xc000_0083;
        pub const SYSCALL_MASK: u32 = 0xc000_0084;
        pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
        pub const MISC_ENABLE_FAST_STRING: u64 = 1;
        /// MTRRdefType: MTRRs enabled, default type write-back.
        pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;
    }
}
