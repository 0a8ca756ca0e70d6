//! PSCI for a hypervisor that leaves it to the VMM: the calls a guest
//! makes with HVC, and which vCPUs are on.
//!
//! Hypervisor.framework traps HVC to the host; KVM answers PSCI in the
//! kernel. Answering it here, inside the backend, keeps the VMM's view the
//! same on both: CPU_ON starts a secondary, SYSTEM_OFF and SYSTEM_RESET
//! become exits.

use supermachine_hypervisor::aarch64::{PowerState, psci};

/// A PSCI call, from X0-X3 at the HVC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Version,
    MigrateInfoType,
    Features(u32),
    CpuOn {
        target: u64,
        entry: u64,
        context: u64,
    },
    CpuOff,
    CpuSuspend,
    AffinityInfo {
        target: u64,
        level: u64,
    },
    SystemOff,
    SystemReset,
    Unknown(u32),
}

/// The SMC32 forms of the calls that also have SMC64 ones.
const CPU_SUSPEND_32: u32 = 0x8400_0001;
const CPU_ON_32: u32 = 0x8400_0003;
const AFFINITY_INFO_32: u32 = 0x8400_0004;

/// Decodes the call in `x` (X0 the function id, X1-X3 its arguments).
/// SMC32 calls take only the low 32 bits of each argument.
pub(crate) fn decode(x: [u64; 4]) -> Call {
    let function = x[0] as u32;
    let arg32 = |v: u64| v & 0xffff_ffff;
    match function {
        psci::VERSION => Call::Version,
        psci::MIGRATE_INFO_TYPE => Call::MigrateInfoType,
        psci::FEATURES => Call::Features(x[1] as u32),
        psci::CPU_ON => Call::CpuOn {
            target: x[1],
            entry: x[2],
            context: x[3],
        },
        CPU_ON_32 => Call::CpuOn {
            target: arg32(x[1]),
            entry: arg32(x[2]),
            context: arg32(x[3]),
        },
        psci::CPU_OFF => Call::CpuOff,
        psci::CPU_SUSPEND | CPU_SUSPEND_32 => Call::CpuSuspend,
        psci::AFFINITY_INFO => Call::AffinityInfo {
            target: x[1],
            level: x[2],
        },
        AFFINITY_INFO_32 => Call::AffinityInfo {
            target: arg32(x[1]),
            level: arg32(x[2]),
        },
        psci::SYSTEM_OFF => Call::SystemOff,
        psci::SYSTEM_RESET => Call::SystemReset,
        other => Call::Unknown(other),
    }
}

/// Whether PSCI_FEATURES reports `function` as implemented.
pub(crate) fn implemented(function: u32) -> bool {
    matches!(
        decode([u64::from(function), 0, 0, 0]),
        Call::Version
            | Call::MigrateInfoType
            | Call::Features(_)
            | Call::CpuOn { .. }
            | Call::CpuOff
            | Call::CpuSuspend
            | Call::AffinityInfo { .. }
            | Call::SystemOff
            | Call::SystemReset
    )
}

/// Where a vCPU started by CPU_ON begins: its entry point, with the
/// caller's context in X0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Start {
    pub entry: u64,
    pub context: u64,
}

#[derive(Debug)]
struct Slot {
    affinity: u64,
    power: PowerState,
    start: Option<Start>,
}

/// Each vCPU's power state, addressed by MPIDR affinity as PSCI does.
#[derive(Debug)]
pub(crate) struct PowerTable {
    slots: Vec<Slot>,
}

/// The affinity fields of an MPIDR (Aff3 and Aff2-0), which is all a
/// PSCI target names.
fn affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

impl PowerTable {
    /// vCPUs with these MPIDRs, the first on and the rest off, as at boot.
    pub fn new(mpidrs: &[u64]) -> Self {
        Self {
            slots: mpidrs
                .iter()
                .enumerate()
                .map(|(i, &m)| Slot {
                    affinity: affinity(m),
                    power: if i == 0 {
                        PowerState::On
                    } else {
                        PowerState::Off
                    },
                    start: None,
                })
                .collect(),
        }
    }

    /// Answers CPU_ON of `target`: the PSCI return code.
    pub fn cpu_on(&mut self, target: u64, start: Start) -> i64 {
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.affinity == affinity(target))
        else {
            return psci::INVALID_PARAMETERS;
        };
        if slot.power == PowerState::On || slot.start.is_some() {
            return psci::ALREADY_ON;
        }
        slot.start = Some(start);
        psci::SUCCESS
    }

    /// Answers AFFINITY_INFO of `target` at level 0: 0 on, 1 off, or an
    /// error code.
    pub fn affinity_info(&self, target: u64, level: u64) -> i64 {
        if level != 0 {
            return psci::INVALID_PARAMETERS;
        }
        match self.slots.iter().find(|s| s.affinity == affinity(target)) {
            Some(s) if s.power == PowerState::On || s.start.is_some() => 0,
            Some(_) => 1,
            None => psci::INVALID_PARAMETERS,
        }
    }

    /// Whether vCPU `index` is on.
    pub fn power(&self, index: usize) -> Option<PowerState> {
        self.slots.get(index).map(|s| s.power)
    }

    /// Sets vCPU `index`'s power state (CPU_OFF, or a restore).
    pub fn set_power(&mut self, index: usize, power: PowerState) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.power = power;
            slot.start = None;
        }
    }

    /// A CPU_ON waiting for vCPU `index`: it is on from now.
    pub fn take_start(&mut self, index: usize) -> Option<Start> {
        let slot = self.slots.get_mut(index)?;
        let start = slot.start.take()?;
        slot.power = PowerState::On;
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermachine_hypervisor::aarch64::mpidr;

    #[test]
    fn linux_boot_calls_decode() {
        assert_eq!(decode([0x8400_0000, 0, 0, 0]), Call::Version);
        assert_eq!(decode([0x8400_0006, 0, 0, 0]), Call::MigrateInfoType);
        assert_eq!(
            decode([0xc400_0003, 1, 0x4008_0000, 0x1234]),
            Call::CpuOn {
                target: 1,
                entry: 0x4008_0000,
                context: 0x1234
            }
        );
        // SMC32 CPU_ON ignores the upper halves.
        assert_eq!(
            decode([0x8400_0003, 0xdead_0000_0001, 0x1_8000_0000, 7]),
            Call::CpuOn {
                target: 1,
                entry: 0x8000_0000,
                context: 7
            }
        );
        assert_eq!(decode([0x8400_0008, 0, 0, 0]), Call::SystemOff);
        assert_eq!(decode([0x8400_0009, 0, 0, 0]), Call::SystemReset);
        assert_eq!(decode([0xc400_0012, 0, 0, 0]), Call::Unknown(0xc400_0012));
        assert!(implemented(psci::CPU_ON));
        assert!(!implemented(0xc400_0012));
    }

    #[test]
    fn cpu_on_starts_each_secondary_once() {
        let mpidrs: Vec<u64> = (0..3).map(|i| 0x8000_0000 | u64::from(mpidr(i))).collect();
        let mut table = PowerTable::new(&mpidrs);
        assert_eq!(table.power(0), Some(PowerState::On));
        assert_eq!(table.affinity_info(2, 0), 1);
        let start = Start {
            entry: 0x4000_0000,
            context: 9,
        };
        assert_eq!(table.cpu_on(0, start), psci::ALREADY_ON);
        assert_eq!(table.cpu_on(2, start), psci::SUCCESS);
        assert_eq!(table.cpu_on(2, start), psci::ALREADY_ON);
        assert_eq!(table.affinity_info(2, 0), 0);
        assert_eq!(table.cpu_on(0x100, start), psci::INVALID_PARAMETERS);
        assert_eq!(table.take_start(1), None);
        assert_eq!(table.take_start(2), Some(start));
        assert_eq!(table.power(2), Some(PowerState::On));
        table.set_power(2, PowerState::Off);
        assert_eq!(table.affinity_info(2, 0), 1);
        assert_eq!(table.affinity_info(2, 1), psci::INVALID_PARAMETERS);
    }
}
