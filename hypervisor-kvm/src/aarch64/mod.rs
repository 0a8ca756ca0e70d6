//! KVM on aarch64: vCPUs initialised for the host's preferred target with
//! PSCI 0.2 (KVM answers PSCI itself, CPU_ON included, and reports
//! SYSTEM_OFF and SYSTEM_RESET as system events), the in-kernel vGICv3
//! created as a KVM device, and registers through `KVM_{GET,SET}_ONE_REG`.

mod state;

use std::fmt;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_REG_ARM_CORE, KVM_REG_ARM64, KVM_REG_SIZE_U32, KVM_REG_SIZE_U64, KVM_REG_SIZE_U128,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST, kvm_create_device, kvm_device_attr,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init,
};
use kvm_ioctls::{Cap, DeviceFd, Kvm, VcpuFd, VmFd};
use supermachine_hypervisor::aarch64::{gic, sys_regs};
use supermachine_hypervisor::{
    self as hv, Datamatch, Hypervisor, InterruptLine, IoAddress, IoNotifier, Regs, SysRegId, Vcpu,
    VcpuExit, VcpuKicker, VcpuState, Vm, VmSpec, VmState,
};

use crate::{KvmVcpu, ioctl, kick};

/// The host's `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmHypervisor").finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the capabilities the VMM relies on.
    pub fn new() -> hv::Result<Self> {
        let kvm = crate::open_kvm(&[
            (Cap::ArmPsci02, "ARM_PSCI_0_2"),
            (Cap::DeviceCtrl, "DEVICE_CTRL"),
            (Cap::OneReg, "ONE_REG"),
        ])?;
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> u32 {
        (self.kvm.get_max_vcpus() as u32).min(gic::MAX_VCPUS)
    }

    fn create_vm(&self, spec: &VmSpec) -> hv::Result<Arc<dyn Vm>> {
        crate::check_vcpu_count(spec, self.max_vcpus())?;
        let vm = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        crate::map_ram(&vm, spec)?;
        let mut init = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut init)
            .map_err(ioctl("KVM_ARM_PREFERRED_TARGET"))?;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        // The vGIC sizes its redistributors by the vCPUs that exist when
        // it is initialised, and KVM refuses to initialise it while one
        // is missing: every vCPU is created here, the GIC after them, and
        // `create_vcpu` hands out what is ready.
        let mut vcpus = Vec::with_capacity(spec.vcpu_count as usize);
        let mut mpidrs = Vec::with_capacity(spec.vcpu_count as usize);
        for index in 0..spec.vcpu_count {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            let mut this = init;
            if index > 0 {
                // Secondaries wait for the boot CPU's PSCI CPU_ON.
                this.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
            }
            fd.vcpu_init(&this).map_err(ioctl("KVM_ARM_VCPU_INIT"))?;
            let mut mpidr = [0u8; 8];
            fd.get_one_reg(state::sys_reg_id(sys_regs::MPIDR_EL1), &mut mpidr)
                .map_err(ioctl("KVM_GET_ONE_REG (MPIDR_EL1)"))?;
            mpidrs.push(u64::from_le_bytes(mpidr));
            vcpus.push(Some(fd));
        }
        let gic = create_gic(&vm)?;
        Ok(Arc::new(KvmVm {
            vm,
            gic,
            mpidrs,
            vcpus: Mutex::new(vcpus),
        }))
    }

    fn check_restorable(&self, vcpus: &[VcpuState]) -> hv::Result<()> {
        let Some(first) = vcpus.first() else {
            return Err(hv::Error::Invalid("the snapshot has no vCPUs".into()));
        };
        let saved_midr = first
            .sys_regs
            .iter()
            .find(|r| r.id == sys_regs::MIDR_EL1)
            .map(|r| r.value);
        if let (Some(saved), Some(here)) = (saved_midr, state::host_midr())
            && saved != here
        {
            return Err(hv::Error::Invalid(format!(
                "the snapshot was taken on another CPU (MIDR_EL1 {saved:#x}; this host's is {here:#x})"
            )));
        }
        for v in vcpus {
            if v.core.v.len() != 32 {
                return Err(hv::Error::Invalid(format!(
                    "a saved vCPU has {} SIMD registers, not 32",
                    v.core.v.len()
                )));
            }
        }
        Ok(())
    }
}

/// Creates the vGICv3 at the platform's addresses, with every SPI the
/// platform wires, and initialises it (all vCPUs must exist).
fn create_gic(vm: &VmFd) -> hv::Result<Arc<DeviceFd>> {
    let mut device = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut device).map_err(|e| {
        if e.errno() == libc::ENODEV {
            hv::Error::Unsupported("this host's KVM has no GICv3 to give guests".into())
        } else {
            ioctl("KVM_CREATE_DEVICE (vGICv3)")(e)
        }
    })?;
    let set = |group: u32, attr: u64, value: Option<&u64>, op: &'static str| {
        let attr = kvm_device_attr {
            flags: 0,
            group,
            attr,
            addr: value.map_or(0, |v| v as *const u64 as u64),
        };
        gic.set_device_attr(&attr).map_err(ioctl(op))
    };
    set(
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
        Some(&gic::DISTRIBUTOR_BASE),
        "setting the vGIC distributor's address",
    )?;
    set(
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
        Some(&gic::REDISTRIBUTORS_BASE),
        "setting the vGIC redistributors' address",
    )?;
    // NR_IRQS reads a u32 through `addr`.
    let nr_irqs = u64::from(gic::INTERRUPT_COUNT);
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        attr: 0,
        addr: &nr_irqs as *const u64 as u64,
    };
    gic.set_device_attr(&attr)
        .map_err(ioctl("setting the vGIC's interrupt count"))?;
    set(
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        None,
        "initialising the vGIC",
    )?;
    Ok(Arc::new(gic))
}

/// A KVM virtual machine.
pub struct KvmVm {
    vm: VmFd,
    /// The vGIC device, whose registers snapshots read and write.
    gic: Arc<DeviceFd>,
    /// Each vCPU's MPIDR_EL1, by index (how the GIC names it).
    mpidrs: Vec<u64>,
    /// Each vCPU made in `create_vm`, until `create_vcpu` takes it.
    vcpus: Mutex<Vec<Option<VcpuFd>>>,
}

impl fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmVm").finish_non_exhaustive()
    }
}

impl Vm for KvmVm {
    fn create_vcpu(&self, index: u32) -> hv::Result<Box<dyn Vcpu>> {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let count = vcpus.len();
        let fd = vcpus
            .get_mut(index as usize)
            .ok_or_else(|| {
                hv::Error::Invalid(format!(
                    "vCPU index {index} out of range for a {count}-vCPU VM"
                ))
            })?
            .take()
            .ok_or_else(|| hv::Error::Invalid(format!("vCPU {index} was created already")))?;
        Ok(Box::new(KvmVcpu {
            fd,
            index,
            kick: Arc::new(kick::KickState::default()),
            arch: VcpuArch {
                mpidr: self.mpidrs[index as usize],
            },
        }))
    }

    fn interrupt_line(&self, spi: u32) -> hv::Result<Arc<dyn InterruptLine>> {
        if spi >= gic::INTERRUPT_COUNT - gic::SPI_INTID_BASE {
            return Err(hv::Error::Invalid(format!(
                "SPI {spi} is beyond the GIC's {} SPIs",
                gic::INTERRUPT_COUNT - gic::SPI_INTID_BASE
            )));
        }
        // Without a routing table of its own, KVM on arm64 takes an
        // irqfd's GSI as the SPI number.
        crate::interrupt_line(&self.vm, spi)
    }

    fn io_notifier(
        &self,
        addr: IoAddress,
        datamatch: Datamatch,
    ) -> hv::Result<Box<dyn IoNotifier>> {
        if let IoAddress::Port(port) = addr {
            return Err(hv::Error::Invalid(format!(
                "I/O port {port:#x}: arm64 has no I/O ports"
            )));
        }
        crate::io_notifier(&self.vm, addr, datamatch)
    }

    fn save_state(&self) -> hv::Result<VmState> {
        let (gic_distributor, gic_cpus) = state::save_gic(&self.gic, &self.mpidrs)?;
        Ok(VmState {
            gic_distributor,
            gic_cpus,
        })
    }

    fn restore_state(&self, saved: &VmState) -> hv::Result<()> {
        let saved_mpidrs: Vec<u64> = saved.gic_cpus.iter().map(|c| c.mpidr).collect();
        if saved_mpidrs != self.mpidrs {
            return Err(hv::Error::Invalid(format!(
                "the saved GIC has {} vCPUs ({saved_mpidrs:x?}); this VM {} ({:x?})",
                saved_mpidrs.len(),
                self.mpidrs.len(),
                self.mpidrs
            )));
        }
        state::restore_gic(&self.gic, &saved.gic_distributor, &saved.gic_cpus)
    }
}

/// What an arm64 vCPU keeps besides its fd.
#[derive(Debug)]
pub(crate) struct VcpuArch {
    /// Its MPIDR_EL1, as KVM assigned it.
    mpidr: u64,
}

/// Ids of the core registers: `struct kvm_regs` offsets in 32-bit words.
mod core_reg {
    use super::*;

    const fn id(size: u64, byte_offset: u64) -> u64 {
        KVM_REG_ARM64 | size | KVM_REG_ARM_CORE as u64 | (byte_offset / 4)
    }

    /// X0-X30, then SP (SP_EL0), PC and PSTATE: `struct user_pt_regs`.
    pub const fn x(n: u64) -> u64 {
        id(KVM_REG_SIZE_U64, 8 * n)
    }
    pub const SP_EL0: u64 = id(KVM_REG_SIZE_U64, 248);
    pub const PC: u64 = id(KVM_REG_SIZE_U64, 256);
    pub const PSTATE: u64 = id(KVM_REG_SIZE_U64, 264);
    pub const SP_EL1: u64 = id(KVM_REG_SIZE_U64, 272);
    pub const ELR_EL1: u64 = id(KVM_REG_SIZE_U64, 280);
    /// `spsr[KVM_SPSR_EL1]`, the first of five.
    pub const SPSR_EL1: u64 = id(KVM_REG_SIZE_U64, 288);
    /// `fp_regs` (16-byte aligned after `spsr[5]`): V0-V31, FPSR, FPCR.
    const FP_REGS: u64 = 336;
    pub const fn v(n: u64) -> u64 {
        id(KVM_REG_SIZE_U128, FP_REGS + 16 * n)
    }
    pub const FPSR: u64 = id(KVM_REG_SIZE_U32, FP_REGS + 512);
    pub const FPCR: u64 = id(KVM_REG_SIZE_U32, FP_REGS + 516);
}

impl KvmVcpu {
    fn get<const N: usize>(&self, id: u64) -> hv::Result<[u8; N]> {
        let mut bytes = [0u8; N];
        self.fd
            .get_one_reg(id, &mut bytes)
            .map_err(ioctl("KVM_GET_ONE_REG"))?;
        Ok(bytes)
    }

    fn get_u64(&self, id: u64) -> hv::Result<u64> {
        self.get::<8>(id).map(u64::from_le_bytes)
    }

    fn set(&self, id: u64, bytes: &[u8]) -> hv::Result<()> {
        self.fd
            .set_one_reg(id, bytes)
            .map(|_| ())
            .map_err(ioctl("KVM_SET_ONE_REG"))
    }
}

impl Vcpu for KvmVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kick.clone()
    }

    fn run(&mut self) -> hv::Result<VcpuExit<'_>> {
        crate::run_vcpu(&mut self.fd, &self.kick)
    }

    fn regs(&self) -> hv::Result<Regs> {
        let mut x = [0u64; 31];
        for (n, reg) in x.iter_mut().enumerate() {
            *reg = self.get_u64(core_reg::x(n as u64))?;
        }
        let mut v = Vec::with_capacity(32);
        for n in 0..32 {
            v.push(u128::from_le_bytes(self.get::<16>(core_reg::v(n))?));
        }
        Ok(Regs {
            x,
            sp_el0: self.get_u64(core_reg::SP_EL0)?,
            sp_el1: self.get_u64(core_reg::SP_EL1)?,
            pc: self.get_u64(core_reg::PC)?,
            pstate: self.get_u64(core_reg::PSTATE)?,
            elr_el1: self.get_u64(core_reg::ELR_EL1)?,
            spsr_el1: self.get_u64(core_reg::SPSR_EL1)?,
            v,
            fpsr: u32::from_le_bytes(self.get::<4>(core_reg::FPSR)?),
            fpcr: u32::from_le_bytes(self.get::<4>(core_reg::FPCR)?),
        })
    }

    fn set_regs(&mut self, r: &Regs) -> hv::Result<()> {
        if r.v.len() != 32 {
            return Err(hv::Error::Invalid(format!(
                "{} SIMD registers given; aarch64 has 32",
                r.v.len()
            )));
        }
        for (n, value) in r.x.iter().enumerate() {
            self.set(core_reg::x(n as u64), &value.to_le_bytes())?;
        }
        for (id, value) in [
            (core_reg::SP_EL0, r.sp_el0),
            (core_reg::SP_EL1, r.sp_el1),
            (core_reg::PC, r.pc),
            (core_reg::PSTATE, r.pstate),
            (core_reg::ELR_EL1, r.elr_el1),
            (core_reg::SPSR_EL1, r.spsr_el1),
        ] {
            self.set(id, &value.to_le_bytes())?;
        }
        for (n, value) in r.v.iter().enumerate() {
            self.set(core_reg::v(n as u64), &value.to_le_bytes())?;
        }
        self.set(core_reg::FPSR, &r.fpsr.to_le_bytes())?;
        self.set(core_reg::FPCR, &r.fpcr.to_le_bytes())
    }

    fn sys_reg(&self, id: SysRegId) -> hv::Result<u64> {
        self.get_u64(state::sys_reg_id(id))
    }

    fn set_sys_reg(&mut self, id: SysRegId, value: u64) -> hv::Result<()> {
        self.set(state::sys_reg_id(id), &value.to_le_bytes())
    }

    fn save_state(&mut self) -> hv::Result<VcpuState> {
        crate::complete_pending_exit(&mut self.fd)?;
        Ok(VcpuState {
            mpidr: self.arch.mpidr,
            power: state::power_state(&self.fd)?,
            core: self.regs()?,
            sys_regs: state::save_sys_regs(&self.fd)?,
        })
    }

    fn restore_state(&mut self, saved: &VcpuState) -> hv::Result<()> {
        let mpidr = self.arch.mpidr;
        if saved.mpidr != mpidr {
            return Err(hv::Error::Invalid(format!(
                "vCPU {} has MPIDR {mpidr:#x}; the saved one had {:#x}",
                self.index, saved.mpidr
            )));
        }
        self.set_regs(&saved.core)?;
        state::restore_sys_regs(&self.fd, &saved.sys_regs)?;
        state::set_power_state(&self.fd, saved.power)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_are_kvm_regs_offsets_in_words() {
        // The values the kernel's KVM_REG_ARM_CORE_REG() macro gives.
        assert_eq!(core_reg::x(0), 0x6030_0000_0010_0000);
        assert_eq!(core_reg::x(30), 0x6030_0000_0010_003c);
        assert_eq!(core_reg::PC, 0x6030_0000_0010_0040);
        assert_eq!(core_reg::PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(core_reg::v(0), 0x6040_0000_0010_0054);
        assert_eq!(core_reg::FPSR, 0x6020_0000_0010_00d4);
        assert_eq!(core_reg::FPCR, 0x6020_0000_0010_00d5);
    }

    #[test]
    fn system_register_ids_carry_the_encoding() {
        // ARM64_SYS_REG(3, 0, 0, 0, 5), MPIDR_EL1.
        assert_eq!(
            state::sys_reg_id(sys_regs::MPIDR_EL1),
            0x6030_0000_0013_c005
        );
    }
}
