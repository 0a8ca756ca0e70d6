//! Saving and restoring arm64 VMs on KVM: a vCPU's core and system
//! registers and power state (`KVM_{GET,SET}_ONE_REG`, `KVM_*_MP_STATE`),
//! and the vGICv3 (distributor, each redistributor, each CPU interface)
//! through the GIC device's register groups.
//!
//! The GIC is read and written while no vCPU runs: KVM refuses with EBUSY
//! while any vCPU is in `KVM_RUN`, which is why its per-vCPU parts are in
//! the VM's state (`Vm::save_state` runs after every vCPU has parked).

use kvm_bindings::{
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED,
    KVM_REG_ARM_COPROC_MASK, KVM_REG_ARM64_SYSREG, KVM_REG_SIZE_MASK, KVM_REG_SIZE_U64,
    kvm_device_attr, kvm_mp_state,
};
use kvm_ioctls::{DeviceFd, VcpuFd};
use supermachine_hypervisor::aarch64::{
    GicCpuState, GicReg, PowerState, SysReg, SysRegId, gic, sys_regs,
};
use supermachine_hypervisor::{self as hv};

use crate::ioctl;

/// KVM's ids for the virtual timer's count and compare value have their
/// encodings swapped against the architecture's (an ABI accident KVM
/// keeps): `KVM_REG_ARM_TIMER_CNT` is (3, 3, 14, 3, 2), which is
/// CNTV_CVAL_EL0, and `KVM_REG_ARM_TIMER_CVAL` is (3, 3, 14, 0, 2), which
/// is CNTVCT_EL0. Saved state names the architectural registers.
fn kvm_to_architectural(id: SysRegId) -> SysRegId {
    match id {
        sys_regs::CNTV_CVAL_EL0 => sys_regs::CNTVCT_EL0,
        sys_regs::CNTVCT_EL0 => sys_regs::CNTV_CVAL_EL0,
        other => other,
    }
}

/// The same swap, back (it is its own inverse).
fn architectural_to_kvm(id: SysRegId) -> SysRegId {
    kvm_to_architectural(id)
}

/// The ONE_REG id of system register `id` as KVM names it.
pub(super) fn sys_reg_id(id: SysRegId) -> u64 {
    kvm_bindings::KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | u64::from(KVM_REG_ARM64_SYSREG)
        | u64::from(id.0)
}

/// Every system register of this vCPU KVM lists, by architectural name.
pub(super) fn save_sys_regs(fd: &VcpuFd) -> hv::Result<Vec<SysReg>> {
    let mut regs = Vec::new();
    for id in reg_list(fd)? {
        let is_sys_reg = (id & u64::from(KVM_REG_ARM_COPROC_MASK))
            == u64::from(KVM_REG_ARM64_SYSREG)
            && (id & KVM_REG_SIZE_MASK) == KVM_REG_SIZE_U64;
        if !is_sys_reg {
            continue;
        }
        let mut value = [0u8; 8];
        fd.get_one_reg(id, &mut value)
            .map_err(ioctl("KVM_GET_ONE_REG (system register)"))?;
        regs.push(SysReg {
            id: kvm_to_architectural(SysRegId(id as u16)),
            value: u64::from_le_bytes(value),
        });
    }
    Ok(regs)
}

vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_REG_LIST,
    kvm_bindings::KVMIO,
    0xb0,
    kvm_bindings::kvm_reg_list
);

/// Every register id this vCPU has (`KVM_GET_REG_LIST`). kvm-ioctls'
/// wrapper holds at most 500, and a vCPU with the PMU and every debug
/// register has more: the list is sized by asking KVM first.
fn reg_list(fd: &VcpuFd) -> hv::Result<Vec<u64>> {
    use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
    let mut capacity = 0u64;
    loop {
        // `struct kvm_reg_list`: the count, then that many ids.
        let mut buf = vec![0u64; capacity as usize + 1];
        buf[0] = capacity;
        // SAFETY: `buf` is a kvm_reg_list whose `n` says how many ids
        // follow it in the allocation; KVM writes at most that many (or
        // only the count it needs, failing with E2BIG).
        let ret = unsafe { ioctl_with_mut_ptr(fd, KVM_GET_REG_LIST(), buf.as_mut_ptr()) };
        if ret == 0 {
            let n = (buf[0] as usize).min(buf.len() - 1);
            buf.truncate(n + 1);
            buf.remove(0);
            return Ok(buf);
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::E2BIG) && buf[0] > capacity && buf[0] < 1 << 16 {
            capacity = buf[0];
            continue;
        }
        return Err(hv::Error::Os {
            op: "KVM_GET_REG_LIST",
            source: error,
        });
    }
}

/// Sets every saved system register, in the order saved.
pub(super) fn restore_sys_regs(fd: &VcpuFd, regs: &[SysReg]) -> hv::Result<()> {
    for reg in regs {
        fd.set_one_reg(
            sys_reg_id(architectural_to_kvm(reg.id)),
            &reg.value.to_le_bytes(),
        )
        .map_err(|e| {
            let (op0, op1, crn, crm, op2) = reg.id.fields();
            hv::Error::Os {
                op: "KVM_SET_ONE_REG (system register)",
                source: std::io::Error::other(format!(
                    "S{op0}_{op1}_C{crn}_C{crm}_{op2} = {:#x}: {e}",
                    reg.value
                )),
            }
        })?;
    }
    Ok(())
}

pub(super) fn power_state(fd: &VcpuFd) -> hv::Result<PowerState> {
    let mp = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    Ok(if mp.mp_state == KVM_MP_STATE_STOPPED {
        PowerState::Off
    } else {
        PowerState::On
    })
}

pub(super) fn set_power_state(fd: &VcpuFd, power: PowerState) -> hv::Result<()> {
    let mp_state = match power {
        PowerState::On => KVM_MP_STATE_RUNNABLE,
        PowerState::Off => KVM_MP_STATE_STOPPED,
    };
    fd.set_mp_state(kvm_mp_state { mp_state })
        .map_err(ioctl("KVM_SET_MP_STATE"))
}

/// The GIC's 32-bit view of a register: KVM reads and writes distributor
/// and redistributor registers 32 bits at a time (64-bit ones as two
/// halves, low first), CPU interface registers 64 bits at a time.
struct GicAccess<'a> {
    gic: &'a DeviceFd,
}

impl GicAccess<'_> {
    fn attr(group: u32, attr: u64, value: &mut u64) -> kvm_device_attr {
        kvm_device_attr {
            flags: 0,
            group,
            attr,
            addr: value as *mut u64 as u64,
        }
    }

    fn get(&self, group: u32, attr: u64) -> hv::Result<u64> {
        let mut value = 0u64;
        let mut a = Self::attr(group, attr, &mut value);
        // SAFETY: `a.addr` points at `value`, a live u64 that outlives the
        // call; KVM writes at most 8 bytes there (4 for the 32-bit groups).
        unsafe { self.gic.get_device_attr(&mut a) }.map_err(ioctl("reading a vGIC register"))?;
        Ok(value)
    }

    fn set(&self, group: u32, attr: u64, mut value: u64) -> hv::Result<()> {
        let a = Self::attr(group, attr, &mut value);
        self.gic
            .set_device_attr(&a)
            .map_err(ioctl("writing a vGIC register"))
    }
}

/// The redistributor attribute's MPIDR field: Aff3 in bits 63:56, Aff2,
/// Aff1, Aff0 below it (the architectural MPIDR has Aff3 at 39:32).
fn gic_mpidr(mpidr: u64) -> u64 {
    let packed = ((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff);
    packed << 32
}

pub(super) fn save_gic(
    gic: &DeviceFd,
    mpidrs: &[u64],
) -> hv::Result<(Vec<GicReg>, Vec<GicCpuState>)> {
    let access = GicAccess { gic };
    let distributor = gic::distributor_offsets()
        .into_iter()
        .map(|offset| {
            Ok(GicReg {
                offset,
                value: access.get(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset))?,
            })
        })
        .collect::<hv::Result<Vec<_>>>()?;
    let mut cpus = Vec::with_capacity(mpidrs.len());
    for &mpidr in mpidrs {
        let attr = gic_mpidr(mpidr);
        let redistributor = gic::REDISTRIBUTOR_OFFSETS
            .iter()
            .map(|&offset| {
                Ok(GicReg {
                    offset,
                    value: access
                        .get(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, attr | u64::from(offset))?,
                })
            })
            .collect::<hv::Result<Vec<_>>>()?;
        let ctlr = access.get(
            KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            attr | u64::from(gic::icc::CTLR_EL1.0),
        )?;
        let cpu_interface = gic::cpu_interface_ids(ctlr)
            .into_iter()
            .map(|id| {
                Ok(SysReg {
                    id,
                    value: access.get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, attr | u64::from(id.0))?,
                })
            })
            .collect::<hv::Result<Vec<_>>>()?;
        cpus.push(GicCpuState {
            mpidr,
            redistributor,
            cpu_interface,
        });
    }
    Ok((distributor, cpus))
}

pub(super) fn restore_gic(
    gic: &DeviceFd,
    distributor: &[GicReg],
    cpus: &[GicCpuState],
) -> hv::Result<()> {
    let access = GicAccess { gic };
    for reg in distributor {
        access.set(
            KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
            u64::from(reg.offset),
            reg.value,
        )?;
    }
    for cpu in cpus {
        let attr = gic_mpidr(cpu.mpidr);
        for reg in &cpu.redistributor {
            access.set(
                KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                attr | u64::from(reg.offset),
                reg.value,
            )?;
        }
        for reg in &cpu.cpu_interface {
            access.set(
                KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                attr | u64::from(reg.id.0),
                reg.value,
            )?;
        }
    }
    Ok(())
}

/// This host's CPU (MIDR_EL1, as the kernel reports it), if it says.
pub(super) fn host_midr() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/regs/identification/midr_el1")
        .ok()?;
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_ids_swap_to_the_architectures_and_back() {
        for id in [
            sys_regs::CNTVCT_EL0,
            sys_regs::CNTV_CVAL_EL0,
            sys_regs::SCTLR_EL1,
        ] {
            assert_eq!(architectural_to_kvm(kvm_to_architectural(id)), id);
        }
        assert_eq!(
            kvm_to_architectural(sys_regs::CNTV_CVAL_EL0),
            sys_regs::CNTVCT_EL0
        );
        assert_eq!(
            kvm_to_architectural(sys_regs::SCTLR_EL1),
            sys_regs::SCTLR_EL1
        );
    }

    #[test]
    fn gic_attributes_carry_the_affinity_kvm_expects() {
        // vCPU 17: Aff0 1, Aff1 1.
        assert_eq!(gic_mpidr(0x8000_0101), 0x0000_0101_0000_0000);
        assert_eq!(gic_mpidr(0x01_0000_0000), 0x0100_0000_0000_0000);
    }
}
