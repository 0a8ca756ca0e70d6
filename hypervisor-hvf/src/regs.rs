//! How the aarch64 state types map onto Hypervisor.framework's register
//! ids.
//!
//! `hv_reg_t` numbers X0-X30, then PC, FPCR, FPSR and CPSR; `hv_simd_fp_reg_t`
//! Q0-Q31. `hv_sys_reg_t` is the register's `op0:op1:CRn:CRm:op2`
//! encoding, the same as [`SysRegId`], so system registers need no table:
//! only the list of those a snapshot carries. The stack pointers and the
//! EL1 exception registers are system registers to HVF and core registers
//! to the state types.

use supermachine_hypervisor::aarch64::{SysRegId, sys_regs};

/// `hv_reg_t` of X0; Xn is `X0 + n`.
pub(crate) const REG_X0: u32 = 0;
/// `hv_reg_t` of the program counter.
pub(crate) const REG_PC: u32 = 31;
/// `hv_reg_t` of FPCR.
pub(crate) const REG_FPCR: u32 = 32;
/// `hv_reg_t` of FPSR.
pub(crate) const REG_FPSR: u32 = 33;
/// `hv_reg_t` of CPSR (PSTATE, as SPSR encodes it).
pub(crate) const REG_CPSR: u32 = 34;
/// SIMD registers Q0-Q31.
pub(crate) const SIMD_REG_COUNT: u32 = 32;

/// SP_EL0.
pub(crate) const SP_EL0: SysRegId = SysRegId::new(3, 0, 4, 1, 0);
/// SP_EL1.
pub(crate) const SP_EL1: SysRegId = SysRegId::new(3, 4, 4, 1, 0);
/// ELR_EL1.
pub(crate) const ELR_EL1: SysRegId = SysRegId::new(3, 0, 4, 0, 1);
/// SPSR_EL1.
pub(crate) const SPSR_EL1: SysRegId = SysRegId::new(3, 0, 4, 0, 0);

/// The `hv_reg_t` of general-purpose register `n` (0..=30), or `None`
/// for 31, which is XZR in the accesses that name it.
pub(crate) fn x_reg(n: u8) -> Option<u32> {
    (n < 31).then_some(REG_X0 + u32::from(n))
}

/// The EL0/EL1 system registers a snapshot of an HVF vCPU carries, in
/// restore order, the virtual timer last (its count is converted, see
/// [`virtual_count`]). ID registers are not saved: HVF presents the
/// host's, and a restore on another CPU is refused by MIDR_EL1. The
/// pointer-authentication keys are: a restored kernel signs return
/// addresses with them.
pub(crate) const SAVED_SYS_REGS: &[SysRegId] = &[
    sys_regs::MIDR_EL1,
    sys_regs::SCTLR_EL1,
    SysRegId::new(3, 0, 1, 0, 1), // ACTLR_EL1
    SysRegId::new(3, 0, 1, 0, 2), // CPACR_EL1
    sys_regs::TTBR0_EL1,
    sys_regs::TTBR1_EL1,
    sys_regs::TCR_EL1,
    SysRegId::new(3, 0, 2, 1, 0), // APIAKEYLO_EL1
    SysRegId::new(3, 0, 2, 1, 1), // APIAKEYHI_EL1
    SysRegId::new(3, 0, 2, 1, 2), // APIBKEYLO_EL1
    SysRegId::new(3, 0, 2, 1, 3), // APIBKEYHI_EL1
    SysRegId::new(3, 0, 2, 2, 0), // APDAKEYLO_EL1
    SysRegId::new(3, 0, 2, 2, 1), // APDAKEYHI_EL1
    SysRegId::new(3, 0, 2, 2, 2), // APDBKEYLO_EL1
    SysRegId::new(3, 0, 2, 2, 3), // APDBKEYHI_EL1
    SysRegId::new(3, 0, 2, 3, 0), // APGAKEYLO_EL1
    SysRegId::new(3, 0, 2, 3, 1), // APGAKEYHI_EL1
    SysRegId::new(3, 0, 5, 1, 0), // AFSR0_EL1
    SysRegId::new(3, 0, 5, 1, 1), // AFSR1_EL1
    SysRegId::new(3, 0, 5, 2, 0), // ESR_EL1
    SysRegId::new(3, 0, 6, 0, 0), // FAR_EL1
    SysRegId::new(3, 0, 7, 4, 0), // PAR_EL1
    sys_regs::MAIR_EL1,
    SysRegId::new(3, 0, 10, 3, 0), // AMAIR_EL1
    sys_regs::VBAR_EL1,
    SysRegId::new(3, 0, 13, 0, 1), // CONTEXTIDR_EL1
    sys_regs::TPIDR_EL1,
    SysRegId::new(3, 0, 14, 1, 0), // CNTKCTL_EL1
    SysRegId::new(3, 2, 0, 0, 0),  // CSSELR_EL1
    SysRegId::new(3, 3, 13, 0, 2), // TPIDR_EL0
    SysRegId::new(3, 3, 13, 0, 3), // TPIDRRO_EL0
    SysRegId::new(2, 0, 0, 2, 2),  // MDSCR_EL1
    sys_regs::CNTV_CVAL_EL0,
    sys_regs::CNTV_CTL_EL0,
];

/// The guest's virtual count when the host's counter reads `host_count`
/// and HVF's virtual timer offset is `offset` (CNTVCT = CNTPCT - offset).
pub(crate) fn virtual_count(host_count: u64, offset: u64) -> u64 {
    host_count.wrapping_sub(offset)
}

/// The virtual timer offset that makes the guest's count read
/// `saved_count` when the host's counter reads `host_count`: a restored
/// guest's time goes on from where it was saved.
pub(crate) fn offset_for(host_count: u64, saved_count: u64) -> u64 {
    host_count.wrapping_sub(saved_count)
}

/// How long, in counter ticks, until the virtual timer fires, if it is
/// enabled and unmasked: CNTV_CTL_EL0 bit 0 ENABLE, bit 1 IMASK.
pub(crate) fn ticks_until_timer(ctl: u64, cval: u64, count: u64) -> Option<u64> {
    let enabled = ctl & 1 != 0;
    let masked = ctl & 2 != 0;
    (enabled && !masked).then(|| cval.saturating_sub(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hvf_reg_ids_follow_the_framework_numbering() {
        assert_eq!(x_reg(0), Some(0));
        assert_eq!(x_reg(30), Some(30));
        assert_eq!(x_reg(31), None, "register 31 is XZR here");
        assert_eq!((REG_PC, REG_FPCR, REG_FPSR, REG_CPSR), (31, 32, 33, 34));
        // hv_sys_reg_t values are the encodings: HV_SYS_REG_SP_EL0 is
        // 0xc208, HV_SYS_REG_SP_EL1 0xe208, HV_SYS_REG_ELR_EL1 0xc201,
        // HV_SYS_REG_SPSR_EL1 0xc200, HV_SYS_REG_CNTV_CTL_EL0 0xdf19.
        assert_eq!(
            (SP_EL0.0, SP_EL1.0, ELR_EL1.0, SPSR_EL1.0),
            (0xc208, 0xe208, 0xc201, 0xc200)
        );
        assert_eq!(sys_regs::CNTV_CTL_EL0.0, 0xdf19);
        assert_eq!(SAVED_SYS_REGS[3].0, 0xc082); // CPACR_EL1
        assert_eq!(SAVED_SYS_REGS[7].0, 0xc108); // APIAKEYLO_EL1
        assert_eq!(SysRegId::new(3, 2, 0, 0, 0).0, 0xd000); // CSSELR_EL1
        assert_eq!(SysRegId::new(2, 0, 0, 2, 2).0, 0x8012); // MDSCR_EL1
    }

    #[test]
    fn saved_registers_are_unique_and_end_with_the_timer() {
        let mut ids = SAVED_SYS_REGS.to_vec();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), SAVED_SYS_REGS.len());
        assert_eq!(SAVED_SYS_REGS.last(), Some(&sys_regs::CNTV_CTL_EL0));
    }

    #[test]
    fn the_virtual_count_resumes_where_it_was_saved() {
        // Saved at host count 1_000_000 with offset 400_000: count 600_000.
        let saved = virtual_count(1_000_000, 400_000);
        assert_eq!(saved, 600_000);
        // Restored later, on a host whose counter reads 9_000_000.
        let offset = offset_for(9_000_000, saved);
        assert_eq!(virtual_count(9_000_000, offset), saved);
        assert_eq!(virtual_count(9_000_024, offset), saved + 24);
        // A count saved on a host that had run longer still round-trips.
        assert_eq!(virtual_count(5, offset_for(5, u64::MAX - 3)), u64::MAX - 3);
    }

    #[test]
    fn the_timer_deadline_needs_it_enabled_and_unmasked() {
        assert_eq!(ticks_until_timer(0b01, 1_000, 400), Some(600));
        assert_eq!(ticks_until_timer(0b01, 100, 400), Some(0));
        assert_eq!(ticks_until_timer(0b11, 1_000, 400), None);
        assert_eq!(ticks_until_timer(0b00, 1_000, 400), None);
    }
}
