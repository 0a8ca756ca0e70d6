//! Decoding the exception an HVF exit reports: its syndrome (ESR_EL2)
//! and faulting address, into the accesses and calls the backend answers.
//!
//! Architecture facts (Arm ARM D23.2.41, "ESR_EL2"): the exception class
//! is bits 31:26, the instruction-specific syndrome bits 24:0.

use supermachine_hypervisor::aarch64::SysRegId;

/// Exception classes the backend handles.
pub(crate) mod class {
    /// WFI or WFE trapped.
    pub const WFX: u8 = 0x01;
    /// HVC from AArch64.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u8 = 0x17;
    /// MSR/MRS/system instruction trapped.
    pub const SYS_REG: u8 = 0x18;
    /// Data abort from a lower exception level (the guest).
    pub const DATA_ABORT_LOWER: u8 = 0x24;
}

/// A load or store to guest physical memory that is not RAM, described
/// well enough by its syndrome to be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MmioAccess {
    /// Guest physical address.
    pub addr: u64,
    /// Bytes accessed: 1, 2, 4 or 8.
    pub size: usize,
    /// A store (true) or a load.
    pub write: bool,
    /// The general-purpose register transferred; 31 is XZR.
    pub reg: u8,
    /// A load sign-extends the value (LDRSB, LDRSH, LDRSW).
    pub sign_extend: bool,
    /// The register is 64 bits wide (Xn) rather than 32 (Wn).
    pub wide_register: bool,
}

impl MmioAccess {
    /// The value a load puts in its register, from the `size` bytes the
    /// device returned (little-endian).
    pub fn loaded_value(&self, data: &[u8]) -> u64 {
        let mut bytes = [0u8; 8];
        let n = self.size.min(data.len()).min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let raw = u64::from_le_bytes(bytes);
        let bits = (self.size * 8) as u32;
        let mut value = if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            (((raw << shift) as i64) >> shift) as u64
        } else {
            raw
        };
        if !self.wide_register {
            // A write to Wn clears the upper half of Xn.
            value &= 0xffff_ffff;
        }
        value
    }
}

/// A trapped MSR or MRS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SysRegAccess {
    /// Which register.
    pub id: SysRegId,
    /// The general-purpose register transferred; 31 is XZR.
    pub reg: u8,
    /// MRS (a read) rather than MSR.
    pub read: bool,
}

/// What the guest did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exception {
    /// An MMIO load or store the syndrome fully describes.
    Mmio(MmioAccess),
    /// A data abort without a valid instruction syndrome (a load pair, a
    /// store with writeback, ...): it cannot be emulated from the exit.
    UndescribedAbort {
        /// Guest physical address.
        addr: u64,
    },
    /// HVC: a hypervisor call (PSCI, for Linux).
    Hvc,
    /// SMC: a secure monitor call.
    Smc,
    /// WFI: wait for an interrupt.
    WaitForInterrupt,
    /// WFE (or WFIT/WFET): wait for an event; a yield is a valid answer.
    WaitForEvent,
    /// An MSR or MRS the hypervisor did not handle.
    SysReg(SysRegAccess),
    /// Anything else.
    Other {
        /// The exception class.
        class: u8,
    },
}

/// The exception class of `syndrome`.
pub(crate) fn exception_class(syndrome: u64) -> u8 {
    ((syndrome >> 26) & 0x3f) as u8
}

/// Decodes an HVF exception exit: `syndrome` is ESR_EL2 as the exit
/// reports it, `physical_address` the faulting IPA.
pub(crate) fn decode(syndrome: u64, physical_address: u64) -> Exception {
    let iss = syndrome & 0x1ff_ffff;
    match exception_class(syndrome) {
        class::DATA_ABORT_LOWER => {
            let valid_syndrome = iss & (1 << 24) != 0;
            if !valid_syndrome {
                return Exception::UndescribedAbort {
                    addr: physical_address,
                };
            }
            Exception::Mmio(MmioAccess {
                addr: physical_address,
                size: 1 << ((iss >> 22) & 0x3),
                write: iss & (1 << 6) != 0,
                reg: ((iss >> 16) & 0x1f) as u8,
                sign_extend: iss & (1 << 21) != 0,
                wide_register: iss & (1 << 15) != 0,
            })
        }
        class::HVC64 => Exception::Hvc,
        class::SMC64 => Exception::Smc,
        class::WFX => {
            // TI, bits 1:0: 0 WFI, 1 WFE, 2 WFIT, 3 WFET.
            if iss & 0x3 == 0 {
                Exception::WaitForInterrupt
            } else {
                Exception::WaitForEvent
            }
        }
        class::SYS_REG => Exception::SysReg(SysRegAccess {
            id: SysRegId::new(
                ((iss >> 20) & 0x3) as u8,
                ((iss >> 14) & 0x7) as u8,
                ((iss >> 10) & 0xf) as u8,
                ((iss >> 1) & 0xf) as u8,
                ((iss >> 17) & 0x7) as u8,
            ),
            reg: ((iss >> 5) & 0x1f) as u8,
            read: iss & 1 != 0,
        }),
        class => Exception::Other { class },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermachine_hypervisor::aarch64::sys_regs;

    /// ESR_EL2 for a data abort with a valid syndrome.
    fn data_abort(sas: u64, sse: bool, srt: u64, sf: bool, write: bool) -> u64 {
        (u64::from(class::DATA_ABORT_LOWER) << 26)
            | (1 << 25) // IL: 32-bit instruction
            | (1 << 24) // ISV
            | (sas << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(write) << 6)
    }

    #[test]
    fn a_32_bit_store_decodes_to_an_mmio_write() {
        // STR W3, [X1] to a virtio-mmio register.
        let exit = decode(data_abort(2, false, 3, false, true), 0x0a00_0050);
        assert_eq!(
            exit,
            Exception::Mmio(MmioAccess {
                addr: 0x0a00_0050,
                size: 4,
                write: true,
                reg: 3,
                sign_extend: false,
                wide_register: false,
            })
        );
    }

    #[test]
    fn loads_extend_as_their_instruction_says() {
        // LDRSB X5: a byte, sign-extended to 64 bits.
        let Exception::Mmio(ldrsb) = decode(data_abort(0, true, 5, true, false), 0x900_0000) else {
            panic!("not an MMIO access");
        };
        assert_eq!((ldrsb.size, ldrsb.write, ldrsb.reg), (1, false, 5));
        assert_eq!(ldrsb.loaded_value(&[0x80]), 0xffff_ffff_ffff_ff80);
        // LDRSH W5: sign-extended to 32 bits, the upper half cleared.
        let Exception::Mmio(ldrsh) = decode(data_abort(1, true, 5, false, false), 0x900_0000)
        else {
            panic!("not an MMIO access");
        };
        assert_eq!(ldrsh.loaded_value(&[0x00, 0x80]), 0xffff_8000);
        // LDR X0: 8 bytes as they are.
        let Exception::Mmio(ldr) = decode(data_abort(3, false, 0, true, false), 0x900_0000) else {
            panic!("not an MMIO access");
        };
        assert_eq!(
            ldr.loaded_value(&0x1122_3344_5566_7788u64.to_le_bytes()),
            0x1122_3344_5566_7788
        );
        // LDRB W1: zero-extended.
        let Exception::Mmio(ldrb) = decode(data_abort(0, false, 1, false, false), 0x900_0000)
        else {
            panic!("not an MMIO access");
        };
        assert_eq!(ldrb.loaded_value(&[0xff]), 0xff);
    }

    #[test]
    fn an_abort_without_syndrome_is_not_guessed_at() {
        // LDP to MMIO: ISV clear.
        let syndrome = (u64::from(class::DATA_ABORT_LOWER) << 26) | (1 << 25);
        assert_eq!(
            decode(syndrome, 0x0a00_0000),
            Exception::UndescribedAbort { addr: 0x0a00_0000 }
        );
    }

    #[test]
    fn calls_and_waits_decode_by_class() {
        assert_eq!(decode(0x5a00_0000, 0), Exception::Hvc); // HVC #0
        assert_eq!(decode(0x5e00_0000, 0), Exception::Smc); // SMC #0
        assert_eq!(decode(0x0600_0000, 0), Exception::WaitForInterrupt);
        assert_eq!(decode(0x0600_0001, 0), Exception::WaitForEvent);
        assert_eq!(
            decode(0xbe00_0000, 0),
            Exception::Other { class: 0x2f } // SError
        );
    }

    #[test]
    fn a_trapped_mrs_names_its_register_as_the_state_types_do() {
        // MRS X2, CNTV_CTL_EL0 (S3_3_C14_C3_1).
        let (op0, op1, crn, crm, op2) = sys_regs::CNTV_CTL_EL0.fields();
        let iss = (u64::from(op0) << 20)
            | (u64::from(op2) << 17)
            | (u64::from(op1) << 14)
            | (u64::from(crn) << 10)
            | (2 << 5)
            | (u64::from(crm) << 1)
            | 1;
        let syndrome = (u64::from(class::SYS_REG) << 26) | (1 << 25) | iss;
        assert_eq!(
            decode(syndrome, 0),
            Exception::SysReg(SysRegAccess {
                id: sys_regs::CNTV_CTL_EL0,
                reg: 2,
                read: true,
            })
        );
        // The same register written (MSR): direction bit clear.
        let Exception::SysReg(write) = decode(syndrome & !1, 0) else {
            panic!("not a system register access");
        };
        assert!(!write.read);
    }
}
