//! The framework's GICv3 registers against the backend-neutral GIC state.
//!
//! The state types hold the GIC as 32-bit words at their offsets (the
//! lists in `supermachine_hypervisor::aarch64::gic`), which is how KVM
//! reads it. `hv_gic_{get,set}_*_reg` name registers by the same offsets
//! but take each whole, so GICD_IROUTER's two halves are one access here;
//! and the framework does not expose the group-modifier registers or
//! GICR_CTLR (it runs the GIC with a single security state, where they
//! have no effect), so those are neither saved nor accepted on restore.

use std::collections::BTreeSet;

use supermachine_hypervisor::aarch64::{GicReg, SysReg, SysRegId, gic};

/// Whether the framework exposes distributor word `offset`.
fn distributor_exposes(offset: u32) -> bool {
    let igrpmodr = gic::GICD_IGRPMODR..gic::GICD_IGRPMODR + 0x80;
    !igrpmodr.contains(&offset)
}

/// Whether `offset` is the high half of a GICD_IROUTER.
fn is_irouter_high(offset: u32) -> bool {
    (gic::GICD_IROUTER..gic::GICD_IROUTER + 0x2000).contains(&offset) && offset % 8 == 4
}

/// Whether `offset` is a GICD_IROUTER (its low half).
fn is_irouter(offset: u32) -> bool {
    (gic::GICD_IROUTER..gic::GICD_IROUTER + 0x2000).contains(&offset) && offset.is_multiple_of(8)
}

/// The distributor registers to read, by their framework ids (offsets),
/// in restore order.
pub(crate) fn distributor_regs() -> Vec<u32> {
    gic::distributor_offsets()
        .into_iter()
        .filter(|&o| distributor_exposes(o) && !is_irouter_high(o))
        .collect()
}

/// The saved words of the distributor registers read as `(id, value)`.
pub(crate) fn distributor_words(reads: &[(u32, u64)]) -> Vec<GicReg> {
    let mut words = Vec::with_capacity(reads.len() * 2);
    for &(offset, value) in reads {
        if is_irouter(offset) {
            words.push(GicReg {
                offset,
                value: value & 0xffff_ffff,
            });
            words.push(GicReg {
                offset: offset + 4,
                value: value >> 32,
            });
        } else {
            words.push(GicReg { offset, value });
        }
    }
    words
}

/// The framework writes that restore the saved distributor `words`:
/// IROUTER halves joined again. Refuses a word the framework cannot
/// write, or an IROUTER half without its other half.
pub(crate) fn distributor_writes(words: &[GicReg]) -> Result<Vec<(u32, u64)>, String> {
    let allowed: BTreeSet<u32> = gic::distributor_offsets().into_iter().collect();
    let mut writes = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        if !allowed.contains(&word.offset) || !distributor_exposes(word.offset) {
            return Err(format!(
                "GIC distributor register {:#x} cannot be restored by Hypervisor.framework",
                word.offset
            ));
        }
        if is_irouter(word.offset) {
            let high = words
                .get(i + 1)
                .filter(|h| h.offset == word.offset + 4)
                .ok_or_else(|| {
                    format!(
                        "GIC distributor register {:#x} (IROUTER) is saved without its high half",
                        word.offset
                    )
                })?;
            writes.push((word.offset, (high.value << 32) | (word.value & 0xffff_ffff)));
            i += 2;
            continue;
        }
        if is_irouter_high(word.offset) {
            return Err(format!(
                "GIC distributor register {:#x} (IROUTER's high half) is saved without its low half",
                word.offset
            ));
        }
        writes.push((word.offset, word.value));
        i += 1;
    }
    Ok(writes)
}

/// The redistributor registers to save, by their framework ids.
pub(crate) fn redistributor_regs() -> Vec<u32> {
    gic::REDISTRIBUTOR_OFFSETS
        .iter()
        .copied()
        .filter(|&o| o != gic::GICR_IGRPMODR0 && o != gic::GICR_CTLR)
        .collect()
}

/// Checks that every saved redistributor word is one the framework writes.
pub(crate) fn check_redistributor(words: &[GicReg]) -> Result<(), String> {
    let allowed = redistributor_regs();
    match words.iter().find(|w| !allowed.contains(&w.offset)) {
        Some(w) => Err(format!(
            "GIC redistributor register {:#x} cannot be restored by Hypervisor.framework",
            w.offset
        )),
        None => Ok(()),
    }
}

/// The CPU interface registers the framework has (`hv_gic_icc_reg_t`:
/// one active-priority register per group), in restore order.
pub(crate) fn cpu_interface_ids() -> Vec<SysRegId> {
    // Five priority bits: what one active-priority register per group
    // implies.
    gic::cpu_interface_ids(4 << 8)
}

/// Checks that every saved CPU interface register is one the framework
/// writes.
pub(crate) fn check_cpu_interface(regs: &[SysReg]) -> Result<(), String> {
    let allowed = cpu_interface_ids();
    match regs.iter().find(|r| !allowed.contains(&r.id)) {
        Some(r) => Err(format!(
            "GIC CPU interface register {:#x} cannot be restored by Hypervisor.framework",
            r.id.0
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irouter_is_read_whole_and_saved_as_kvm_saves_it() {
        let regs = distributor_regs();
        let irouter32 = gic::GICD_IROUTER + 8 * 32;
        assert!(regs.contains(&irouter32));
        assert!(!regs.contains(&(irouter32 + 4)));
        assert!(!regs.contains(&gic::GICD_IGRPMODR.saturating_add(4)));
        // hv_gic_distributor_reg_t: IROUTER32 is 0x6100.
        assert_eq!(irouter32, 0x6100);

        let reads: Vec<(u32, u64)> = regs
            .iter()
            .map(|&o| {
                (
                    o,
                    if o == irouter32 {
                        0x0000_0001_0000_0203
                    } else {
                        u64::from(o)
                    },
                )
            })
            .collect();
        let words = distributor_words(&reads);
        let low = words.iter().position(|w| w.offset == irouter32).unwrap();
        assert_eq!(words[low].value, 0x203);
        assert_eq!(
            words[low + 1],
            GicReg {
                offset: irouter32 + 4,
                value: 1
            }
        );
        // What was read is what would be written back.
        assert_eq!(distributor_writes(&words).unwrap(), reads);
    }

    #[test]
    fn words_the_framework_cannot_write_are_refused() {
        let modifier = [GicReg {
            offset: gic::GICD_IGRPMODR + 4,
            value: 0,
        }];
        assert!(distributor_writes(&modifier).unwrap_err().contains("0xd04"));
        let lone_low = [GicReg {
            offset: 0x6100,
            value: 0,
        }];
        assert!(
            distributor_writes(&lone_low)
                .unwrap_err()
                .contains("high half")
        );
        let lone_high = [GicReg {
            offset: 0x6104,
            value: 0,
        }];
        assert!(
            distributor_writes(&lone_high)
                .unwrap_err()
                .contains("low half")
        );
        let unknown = [GicReg {
            offset: 0xfff0,
            value: 0,
        }];
        assert!(distributor_writes(&unknown).is_err());

        assert!(
            check_redistributor(&[GicReg {
                offset: gic::GICR_CTLR,
                value: 0
            }])
            .is_err()
        );
        assert!(
            check_redistributor(&[GicReg {
                offset: 0x1_0100,
                value: 1
            }])
            .is_ok()
        );
        assert!(
            check_cpu_interface(&[SysReg {
                id: gic::icc::ap0r(1),
                value: 0
            }])
            .is_err(),
            "the framework has one active-priority register per group"
        );
        assert!(
            check_cpu_interface(&[SysReg {
                id: gic::icc::PMR_EL1,
                value: 0xf0
            }])
            .is_ok()
        );
    }

    #[test]
    fn cpu_interface_ids_are_the_frameworks() {
        // hv_gic_icc_reg_t values, which are the registers' encodings.
        let ids: Vec<u16> = cpu_interface_ids().iter().map(|id| id.0).collect();
        for expected in [
            0xc230, 0xc643, 0xc644, 0xc648, 0xc663, 0xc664, 0xc665, 0xc666, 0xc667,
        ] {
            assert!(
                ids.contains(&expected),
                "{expected:#x} missing from {ids:x?}"
            );
        }
        assert_eq!(ids.len(), 9);
    }
}
