//! aarch64 CPU and interrupt-controller state in plain types, independent
//! of any hypervisor's layout.
//!
//! Registers are named by the architecture (Arm ARM), system registers by
//! their `op0, op1, CRn, CRm, op2` encoding, GIC registers by their
//! offsets in the GICv3 specification's register maps: KVM
//! (`KVM_{GET,SET}_ONE_REG`, the vGIC device's register groups) and
//! Hypervisor.framework (`hv_vcpu_get_sys_reg`, `hv_gic_get_*_reg`) both
//! address them this way, so each backend converts without tables of its
//! own. Snapshots of aarch64 VMs will serialize these types; no backend
//! produces them yet (see `docs/architecture.md`).

use serde::{Deserialize, Serialize};

/// The registers an EL1 guest's code runs on: general-purpose, stack
/// pointers, program counter and state, exception return state, and the
/// SIMD/floating-point file. (Guests run at EL1 in AArch64; AArch32
/// guests, and their banked SPSRs, are not supported.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreRegs {
    /// X0-X30.
    pub x: [u64; 31],
    /// SP_EL0.
    pub sp_el0: u64,
    /// SP_EL1.
    pub sp_el1: u64,
    /// The program counter.
    pub pc: u64,
    /// PSTATE as SPSR encodes it (mode, DAIF, NZCV, ...).
    pub pstate: u64,
    /// ELR_EL1: where an exception taken to EL1 returns.
    pub elr_el1: u64,
    /// SPSR_EL1: PSTATE saved on an exception taken to EL1.
    pub spsr_el1: u64,
    /// V0-V31 (Q registers).
    pub v: Vec<u128>,
    /// FPSR.
    pub fpsr: u32,
    /// FPCR.
    pub fpcr: u32,
}

/// What the hypervisor calls the core registers on every architecture.
pub type Regs = CoreRegs;

/// Everything a boot protocol sets on a vCPU before its first `run()`;
/// every other register keeps its architectural reset value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// X0-X3 (the arm64 Linux boot protocol: X0 the device tree's address,
    /// X1-X3 zero).
    pub x: [u64; 4],
    /// Where the vCPU starts.
    pub pc: u64,
    /// PSTATE: exception level, stack pointer selection and masks.
    pub pstate: u64,
}

/// PSTATE values, as SPSR encodes them.
pub mod pstate {
    /// EL1, running on SP_EL1.
    pub const MODE_EL1H: u64 = 0b0101;
    /// Debug, SError, IRQ and FIQ masked.
    pub const DAIF_MASKED: u64 = 0b1111 << 6;
}

/// Where every backend places the GICv3 it creates, and how large it is.
/// The addresses are those of QEMU's `virt` machine; the boot crate's
/// device tree describes the same.
pub mod gic {
    /// The distributor (64 KiB).
    pub const DISTRIBUTOR_BASE: u64 = 0x0800_0000;
    /// Size of the distributor.
    pub const DISTRIBUTOR_SIZE: u64 = 0x1_0000;
    /// The first redistributor; each vCPU has one of
    /// [`REDISTRIBUTOR_SIZE`] bytes, back to back, up to
    /// [`REDISTRIBUTORS_END`].
    pub const REDISTRIBUTORS_BASE: u64 = 0x080a_0000;
    /// One redistributor: its RD and SGI frames, 64 KiB each.
    pub const REDISTRIBUTOR_SIZE: u64 = 0x2_0000;
    /// Where the redistributors' space ends (the next device starts).
    pub const REDISTRIBUTORS_END: u64 = 0x0900_0000;
    /// The most vCPUs whose redistributors fit.
    pub const MAX_VCPUS: u32 =
        ((REDISTRIBUTORS_END - REDISTRIBUTORS_BASE) / REDISTRIBUTOR_SIZE) as u32;
    /// INTIDs of shared peripheral interrupts start here (SPI 0).
    pub const SPI_INTID_BASE: u32 = 32;
    /// INTIDs the GIC implements: SGIs, PPIs and 224 SPIs.
    pub const INTERRUPT_COUNT: u32 = 256;
}

/// A system register's encoding: `op0, op1, CRn, CRm, op2`, packed as
/// MRS/MSR instructions (and KVM's and HVF's register ids) pack them:
/// `op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SysRegId(pub u16);

impl SysRegId {
    /// The register `op0, op1, CRn, CRm, op2` (each within its field's
    /// width: 2, 3, 4, 4 and 3 bits).
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Self {
        Self(
            ((op0 as u16 & 0x3) << 14)
                | ((op1 as u16 & 0x7) << 11)
                | ((crn as u16 & 0xf) << 7)
                | ((crm as u16 & 0xf) << 3)
                | (op2 as u16 & 0x7),
        )
    }

    /// `(op0, op1, CRn, CRm, op2)`.
    pub const fn fields(self) -> (u8, u8, u8, u8, u8) {
        let v = self.0;
        (
            (v >> 14) as u8 & 0x3,
            (v >> 11) as u8 & 0x7,
            (v >> 7) as u8 & 0xf,
            (v >> 3) as u8 & 0xf,
            v as u8 & 0x7,
        )
    }
}

/// System registers a VMM sets or reads by name.
pub mod sys_regs {
    use super::SysRegId;

    /// Multiprocessor affinity: the vCPU's identity in the device tree.
    pub const MPIDR_EL1: SysRegId = SysRegId::new(3, 0, 0, 0, 5);
    /// System control (MMU, caches, alignment).
    pub const SCTLR_EL1: SysRegId = SysRegId::new(3, 0, 1, 0, 0);
    /// Translation table base 0.
    pub const TTBR0_EL1: SysRegId = SysRegId::new(3, 0, 2, 0, 0);
    /// Translation table base 1.
    pub const TTBR1_EL1: SysRegId = SysRegId::new(3, 0, 2, 0, 1);
    /// Translation control.
    pub const TCR_EL1: SysRegId = SysRegId::new(3, 0, 2, 0, 2);
    /// Memory attribute indirection.
    pub const MAIR_EL1: SysRegId = SysRegId::new(3, 0, 10, 2, 0);
    /// Exception vector base.
    pub const VBAR_EL1: SysRegId = SysRegId::new(3, 0, 12, 0, 0);
    /// Kernel thread pointer.
    pub const TPIDR_EL1: SysRegId = SysRegId::new(3, 0, 13, 0, 4);
    /// Virtual timer control.
    pub const CNTV_CTL_EL0: SysRegId = SysRegId::new(3, 3, 14, 3, 1);
    /// Virtual timer compare value.
    pub const CNTV_CVAL_EL0: SysRegId = SysRegId::new(3, 3, 14, 3, 2);
    /// Virtual count.
    pub const CNTVCT_EL0: SysRegId = SysRegId::new(3, 3, 14, 0, 2);
    /// Main ID: the CPU's implementer, part and revision.
    pub const MIDR_EL1: SysRegId = SysRegId::new(3, 0, 0, 0, 0);
}

/// One system register and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysReg {
    /// Which register.
    pub id: SysRegId,
    /// Its value.
    pub value: u64,
}

/// Whether a vCPU runs (PSCI's view of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerState {
    /// Running, or waiting for an interrupt (WFI).
    On,
    /// Off: a secondary not yet started with PSCI CPU_ON, or one that
    /// called CPU_OFF.
    Off,
}

/// A GIC register at `offset` in its frame's register map, as wide as
/// the specification makes it (32 or 64 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicReg {
    /// Byte offset in the distributor or redistributor frame.
    pub offset: u32,
    /// Its value.
    pub value: u64,
}

/// One vCPU's complete state, as its own thread reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// MPIDR_EL1: which vCPU this was (restored to the same index).
    pub mpidr: u64,
    /// Running or off.
    pub power: PowerState,
    /// General-purpose, SIMD and exception registers.
    pub core: CoreRegs,
    /// Every EL0/EL1 system register the hypervisor saves, the virtual
    /// timer's included (`CNTV_CTL_EL0`, `CNTV_CVAL_EL0`, and the virtual
    /// count `CNTVCT_EL0`, whose restore makes the guest's time resume
    /// where it paused).
    pub sys_regs: Vec<SysReg>,
}

/// One vCPU's part of the GIC: its redistributor and its CPU interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicCpuState {
    /// The vCPU's MPIDR_EL1 (how the GIC addresses it).
    pub mpidr: u64,
    /// Its redistributor (SGI/PPI groups, enables, pending and active
    /// state, priorities, configuration).
    pub redistributor: Vec<GicReg>,
    /// Its CPU interface's system registers (`ICC_*_EL1`: priority
    /// mask, binary points, active priorities, group enables).
    pub cpu_interface: Vec<SysReg>,
}

/// The state of the VM outside its vCPUs' own registers: the GIC. (It is
/// read and written while no vCPU runs, which is when a hypervisor lets
/// the GIC's state be touched: KVM refuses while any vCPU is in
/// `KVM_RUN`.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The GICv3 distributor's registers (control, SPI groups, enables,
    /// pending and active state, priorities, configuration, routing).
    pub gic_distributor: Vec<GicReg>,
    /// Each vCPU's redistributor and CPU interface, in vCPU order.
    pub gic_cpus: Vec<GicCpuState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_register_ids_pack_as_mrs_does() {
        // MPIDR_EL1 is S3_0_C0_C0_5: 0xc005.
        assert_eq!(sys_regs::MPIDR_EL1.0, 0xc005);
        // CNTV_CTL_EL0 is S3_3_C14_C3_1: 0xdf19.
        assert_eq!(sys_regs::CNTV_CTL_EL0.0, 0xdf19);
        for id in [sys_regs::SCTLR_EL1, sys_regs::TCR_EL1, sys_regs::CNTVCT_EL0] {
            let (op0, op1, crn, crm, op2) = id.fields();
            assert_eq!(SysRegId::new(op0, op1, crn, crm, op2), id);
        }
        // Out-of-width fields cannot spill into their neighbours.
        assert_eq!(SysRegId::new(3, 0, 0, 0, 0xff).fields(), (3, 0, 0, 0, 7));
    }
}
