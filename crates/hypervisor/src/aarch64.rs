//! aarch64 CPU and interrupt-controller state in plain types, independent
//! of any hypervisor's layout.
//!
//! Registers are named by the architecture (Arm ARM), system registers by
//! their `op0, op1, CRn, CRm, op2` encoding, GIC registers by their
//! offsets in the GICv3 specification's register maps: KVM
//! (`KVM_{GET,SET}_ONE_REG`, the vGIC device's register groups) and
//! Hypervisor.framework (`hv_vcpu_get_sys_reg`, `hv_gic_get_*_reg`) both
//! address them this way, so each backend converts without tables of its
//! own. Snapshots of aarch64 VMs serialize these types.

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

    /// GICD_IGRPMODR<n>: group modifiers, one bit per interrupt.
    pub const GICD_IGRPMODR: u32 = 0x0d00;
    /// GICD_IROUTER<n>: 64-bit routing of SPI n (8 bytes each).
    pub const GICD_IROUTER: u32 = 0x6000;
    /// GICR_CTLR, in the redistributor's RD frame.
    pub const GICR_CTLR: u32 = 0x0_0000;
    /// GICR_IGRPMODR0, in the redistributor's SGI frame.
    pub const GICR_IGRPMODR0: u32 = 0x1_0d00;

    /// The distributor's state as 32-bit words at these offsets, in the
    /// order a restore writes them: configuration before enables before
    /// pending and active state. 64-bit registers (IROUTER) appear as two
    /// halves, low first, as KVM accesses them; a backend whose GIC takes
    /// them whole pairs the halves up again.
    pub fn distributor_offsets() -> Vec<u32> {
        let spi_words = (SPI_INTID_BASE / 32)..(INTERRUPT_COUNT / 32);
        let mut offsets = vec![0x0000]; // GICD_CTLR
        for base in [0x0080u32, GICD_IGRPMODR] {
            // IGROUPR, IGRPMODR: one bit per interrupt.
            offsets.extend(spi_words.clone().map(|w| base + 4 * w));
        }
        // ICFGR: two bits per interrupt.
        offsets.extend((SPI_INTID_BASE / 16..INTERRUPT_COUNT / 16).map(|w| 0x0c00 + 4 * w));
        // IPRIORITYR: a byte per interrupt.
        offsets.extend((SPI_INTID_BASE / 4..INTERRUPT_COUNT / 4).map(|w| 0x0400 + 4 * w));
        for intid in SPI_INTID_BASE..INTERRUPT_COUNT {
            offsets.push(GICD_IROUTER + 8 * intid);
            offsets.push(GICD_IROUTER + 8 * intid + 4);
        }
        for base in [0x0100u32, 0x0200, 0x0300] {
            // ISENABLER, ISPENDR, ISACTIVER.
            offsets.extend(spi_words.clone().map(|w| base + 4 * w));
        }
        offsets
    }

    /// A redistributor's state as 32-bit words (the SGI frame at +64 KiB),
    /// in restore order as above.
    pub const REDISTRIBUTOR_OFFSETS: &[u32] = &[
        0x1_0080,       // GICR_IGROUPR0
        GICR_IGRPMODR0, // GICR_IGRPMODR0
        0x1_0c00,       // GICR_ICFGR0
        0x1_0c04,       // GICR_ICFGR1
        0x1_0400,
        0x1_0404,
        0x1_0408,
        0x1_040c,
        0x1_0410,
        0x1_0414,
        0x1_0418,
        0x1_041c, // GICR_IPRIORITYR0-7
        0x1_0100, // GICR_ISENABLER0
        0x1_0200, // GICR_ISPENDR0
        0x1_0300, // GICR_ISACTIVER0
        GICR_CTLR,
    ];

    /// The CPU interface's system registers (`ICC_*_EL1`).
    pub mod icc {
        use super::super::SysRegId;

        /// System register enable.
        pub const SRE_EL1: SysRegId = SysRegId::new(3, 0, 12, 12, 5);
        /// Control: EOI mode, priority bits (read only), ...
        pub const CTLR_EL1: SysRegId = SysRegId::new(3, 0, 12, 12, 4);
        /// Priority mask.
        pub const PMR_EL1: SysRegId = SysRegId::new(3, 0, 4, 6, 0);
        /// Binary point, group 0.
        pub const BPR0_EL1: SysRegId = SysRegId::new(3, 0, 12, 8, 3);
        /// Binary point, group 1.
        pub const BPR1_EL1: SysRegId = SysRegId::new(3, 0, 12, 12, 3);
        /// Group 0 enable.
        pub const IGRPEN0_EL1: SysRegId = SysRegId::new(3, 0, 12, 12, 6);
        /// Group 1 enable.
        pub const IGRPEN1_EL1: SysRegId = SysRegId::new(3, 0, 12, 12, 7);
        /// Active priorities, group 0, register `n` (0..=3).
        pub const fn ap0r(n: u8) -> SysRegId {
            SysRegId::new(3, 0, 12, 8, 4 + n)
        }
        /// Active priorities, group 1, register `n` (0..=3).
        pub const fn ap1r(n: u8) -> SysRegId {
            SysRegId::new(3, 0, 12, 9, n)
        }
    }

    /// The CPU interface's registers, in restore order: SRE and CTLR
    /// first, the group enables last. How many active-priority registers
    /// exist depends on the priority bits `ICC_CTLR_EL1` (`ctlr`) reports.
    pub fn cpu_interface_ids(ctlr: u64) -> Vec<super::SysRegId> {
        let priority_bits = ((ctlr >> 8) & 0x7) + 1;
        let apr_count = match priority_bits {
            7 => 4,
            6 => 2,
            _ => 1,
        };
        let mut ids = vec![
            icc::SRE_EL1,
            icc::CTLR_EL1,
            icc::PMR_EL1,
            icc::BPR0_EL1,
            icc::BPR1_EL1,
        ];
        ids.extend((0..apr_count).map(icc::ap0r));
        ids.extend((0..apr_count).map(icc::ap1r));
        ids.extend([icc::IGRPEN0_EL1, icc::IGRPEN1_EL1]);
        ids
    }
}

/// The MPIDR_EL1 affinity every backend gives vCPU `index` (KVM's
/// scheme: Aff0 takes the low four bits, Aff1 the next eight), and so
/// the `reg` of its `cpu` node in the device tree.
pub const fn mpidr(index: u32) -> u32 {
    (index & 0xf) | (((index >> 4) & 0xff) << 8)
}

/// PSCI function ids (SMC Calling Convention, PSCI 0.2) a guest calls
/// with HVC; a backend whose hypervisor does not implement PSCI itself
/// answers them.
pub mod psci {
    /// PSCI_VERSION.
    pub const VERSION: u32 = 0x8400_0000;
    /// CPU_SUSPEND (SMC64).
    pub const CPU_SUSPEND: u32 = 0xc400_0001;
    /// CPU_OFF.
    pub const CPU_OFF: u32 = 0x8400_0002;
    /// CPU_ON (SMC64).
    pub const CPU_ON: u32 = 0xc400_0003;
    /// AFFINITY_INFO (SMC64).
    pub const AFFINITY_INFO: u32 = 0xc400_0004;
    /// MIGRATE_INFO_TYPE.
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    /// SYSTEM_OFF.
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    /// SYSTEM_RESET.
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES (PSCI 1.0).
    pub const FEATURES: u32 = 0x8400_000a;

    /// Success.
    pub const SUCCESS: i64 = 0;
    /// The function is not implemented.
    pub const NOT_SUPPORTED: i64 = -1;
    /// An argument was out of range.
    pub const INVALID_PARAMETERS: i64 = -2;
    /// CPU_ON of a vCPU that is already on.
    pub const ALREADY_ON: i64 = -4;
    /// The version answered: 0.2, what the device tree's
    /// `arm,psci-0.2` node promises.
    pub const VERSION_0_2: u64 = 2;
    /// MIGRATE_INFO_TYPE's answer: no Trusted OS needs migrating.
    pub const NO_TRUSTED_OS: u64 = 2;
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

    #[test]
    fn gic_register_lists_cover_what_the_gic_holds() {
        // 5 priority bits: one active-priority register per group.
        assert_eq!(gic::cpu_interface_ids(4 << 8).len(), 9);
        assert_eq!(gic::cpu_interface_ids(6 << 8).len(), 15);
        let offsets = gic::distributor_offsets();
        assert_eq!(offsets[0], 0);
        assert!(offsets.contains(&(gic::GICD_IROUTER + 8 * 32)));
        assert!(offsets.contains(&(gic::GICD_IROUTER + 8 * 255 + 4)));
        assert!(
            !offsets.contains(&0x0100),
            "SGI/PPI enables are the redistributor's"
        );
        // Enables come after configuration, so nothing fires half set up.
        let enable = offsets.iter().position(|&o| o == 0x0104);
        let config = offsets.iter().position(|&o| o == 0x0c08);
        assert!(config < enable);
    }

    #[test]
    fn mpidr_affinity_packs_sixteen_per_cluster() {
        assert_eq!(mpidr(15), 0xf);
        assert_eq!(mpidr(16), 0x100);
        assert_eq!(mpidr(37), 0x205);
    }
}
