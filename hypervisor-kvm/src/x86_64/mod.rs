//! KVM on x86_64: the in-kernel PIC, IOAPIC and PIT, CPUID, and the
//! x86 register and state conversions.

mod cpuid;
mod state;

use std::fmt;
use std::sync::Arc;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use supermachine_hypervisor::{
    self as hv, Datamatch, FpuState, Hypervisor, InterruptLine, IoAddress, IoNotifier, MsrEntry,
    Regs, SpecialRegs, Vcpu, VcpuExit, VcpuKicker, VcpuState, Vm, VmSpec, VmState,
};

use crate::{KvmVcpu, ioctl, kick};

/// Guest physical addresses KVM needs for itself on Intel hosts (real-mode
/// TSS, three pages, and the EPT identity map, one page). They sit at the
/// top of the 32-bit MMIO gap, where the VMM places nothing.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// See [`KVM_IDENTITY_MAP_ADDR`].
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// The host's `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
    support: Arc<state::StateSupport>,
    supported_cpuid: kvm_bindings::CpuId,
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
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Pit2, "PIT2"),
            (Cap::ExtCpuid, "EXT_CPUID"),
        ])?;
        let support = Arc::new(state::StateSupport::probe(&kvm)?);
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Self {
            kvm,
            support,
            supported_cpuid,
        })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> u32 {
        // Local APIC ids are 8 bits in the MP table and xAPIC mode.
        self.kvm.get_max_vcpus().min(254) as u32
    }

    fn create_vm(&self, spec: &VmSpec) -> hv::Result<Arc<dyn Vm>> {
        crate::check_vcpu_count(spec, self.max_vcpus())?;
        let vm = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        // RAM goes in before the interrupt controllers. Each memory slot
        // change waits for an SRCU grace period of the VM; right after
        // KVM_CREATE_IRQCHIP (whose routing and bus setup start grace
        // periods of their own) the first one costs a timer tick or more
        // (4.9 ms measured here, against 0.15 ms in this order), and that
        // tick was most of a restore's time.
        crate::map_ram(&vm, spec)?;
        vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // The PC speaker port is left to the PIT so guests probing it see one.
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Arc::new(KvmVm {
            vm,
            vcpu_count: spec.vcpu_count,
            supported_cpuid: self.supported_cpuid.clone(),
            support: self.support.clone(),
        }))
    }

    fn check_restorable(&self, vcpus: &[VcpuState]) -> hv::Result<()> {
        let Some(first) = vcpus.first() else {
            return Err(hv::Error::Invalid("the snapshot has no vCPUs".into()));
        };
        state::check_cpu_model(&first.cpuid, &self.supported_cpuid)?;
        for v in vcpus {
            if v.xsave.len() > self.support.xsave_bytes {
                return Err(hv::Error::Invalid(format!(
                    "the snapshot's XSAVE area is {} bytes; this host's KVM takes {}",
                    v.xsave.len(),
                    self.support.xsave_bytes
                )));
            }
        }
        Ok(())
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    vm: VmFd,
    vcpu_count: u32,
    supported_cpuid: kvm_bindings::CpuId,
    support: Arc<state::StateSupport>,
}

impl fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmVm")
            .field("vcpu_count", &self.vcpu_count)
            .finish_non_exhaustive()
    }
}

impl Vm for KvmVm {
    fn create_vcpu(&self, index: u32) -> hv::Result<Box<dyn Vcpu>> {
        if index >= self.vcpu_count {
            return Err(hv::Error::Invalid(format!(
                "vCPU index {index} out of range for a {}-vCPU VM",
                self.vcpu_count
            )));
        }
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.supported_cpuid, index, self.vcpu_count);
        fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        configure_lapic_lints(&fd)?;
        Ok(Box::new(KvmVcpu {
            fd,
            index,
            kick: Arc::new(kick::KickState::default()),
            arch: VcpuArch {
                support: self.support.clone(),
            },
        }))
    }

    fn interrupt_line(&self, gsi: u32) -> hv::Result<Arc<dyn InterruptLine>> {
        crate::interrupt_line(&self.vm, gsi)
    }

    fn io_notifier(
        &self,
        addr: IoAddress,
        datamatch: Datamatch,
    ) -> hv::Result<Box<dyn IoNotifier>> {
        crate::io_notifier(&self.vm, addr, datamatch)
    }

    fn save_state(&self) -> hv::Result<VmState> {
        state::save_vm(&self.vm)
    }

    fn restore_state(&self, saved: &VmState) -> hv::Result<()> {
        state::restore_vm(&self.vm, saved)
    }
}

/// What an x86_64 vCPU's state code needs besides its fd.
#[derive(Debug)]
pub(crate) struct VcpuArch {
    support: Arc<state::StateSupport>,
}

/// Routes the legacy PIC through LINT0 (ExtINT) and NMIs through LINT1,
/// as a PC's BIOS leaves the local APIC.
fn configure_lapic_lints(fd: &VcpuFd) -> hv::Result<()> {
    const APIC_LVT_LINT0: usize = 0x350;
    const APIC_LVT_LINT1: usize = 0x360;
    const DELIVERY_MODE_EXTINT: u32 = 0b111;
    const DELIVERY_MODE_NMI: u32 = 0b100;

    fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
            *b = *r as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
            *r = b as std::os::raw::c_char;
        }
    }

    let mut lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT_LINT0, DELIVERY_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT_LINT1, DELIVERY_MODE_NMI);
    fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
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
        let r = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> hv::Result<()> {
        self.fd
            .set_regs(&regs_to_kvm(r))
            .map_err(ioctl("KVM_SET_REGS"))
    }

    fn special_regs(&self) -> hv::Result<SpecialRegs> {
        let s = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        Ok(SpecialRegs {
            cs: segment_from_kvm(&s.cs),
            ds: segment_from_kvm(&s.ds),
            es: segment_from_kvm(&s.es),
            fs: segment_from_kvm(&s.fs),
            gs: segment_from_kvm(&s.gs),
            ss: segment_from_kvm(&s.ss),
            tr: segment_from_kvm(&s.tr),
            ldt: segment_from_kvm(&s.ldt),
            gdt: hv::DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: hv::DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_special_regs(&mut self, s: &SpecialRegs) -> hv::Result<()> {
        // Start from the current state so fields this interface does not
        // model (the pending-interrupt bitmap) keep their values.
        let mut k = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        sregs_into_kvm(s, &mut k);
        self.fd.set_sregs(&k).map_err(ioctl("KVM_SET_SREGS"))
    }

    fn save_state(&mut self) -> hv::Result<VcpuState> {
        crate::complete_pending_exit(&mut self.fd)?;
        let regs = self.regs()?;
        let sregs = self.special_regs()?;
        state::save_vcpu(&self.fd, &self.arch.support, regs, sregs)
    }

    fn restore_state(&mut self, saved: &VcpuState) -> hv::Result<()> {
        let fd = &self.fd;
        state::restore_vcpu(
            fd,
            &self.arch.support,
            saved,
            |r| fd.set_regs(&regs_to_kvm(r)).map_err(ioctl("KVM_SET_REGS")),
            |s, pending| {
                let mut k = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
                sregs_into_kvm(s, &mut k);
                k.interrupt_bitmap = pending;
                fd.set_sregs(&k).map_err(ioctl("KVM_SET_SREGS"))
            },
        )?;
        // Tell a guest with kvmclock that it was paused, so its watchdogs
        // do not take the gap for a lockup. A guest without kvmclock
        // refuses it, which is fine.
        let _ = self.fd.kvmclock_ctrl();
        Ok(())
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> hv::Result<()> {
        let k = kvm_bindings::kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&k).map_err(ioctl("KVM_SET_FPU"))
    }

    fn msrs(&self, indices: &[u32]) -> hv::Result<Vec<MsrEntry>> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|e| hv::Error::Invalid(format!("too many MSRs: {e:?}")))?;
        let read = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if read != indices.len() {
            return Err(hv::Error::Unsupported(format!(
                "MSR {:#x} cannot be read",
                indices[read]
            )));
        }
        Ok(msrs
            .as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect())
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> hv::Result<()> {
        state::set_msrs_all(&self.fd, msrs)
    }
}

fn regs_to_kvm(r: &Regs) -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn sregs_into_kvm(s: &SpecialRegs, k: &mut kvm_bindings::kvm_sregs) {
    k.cs = segment_to_kvm(&s.cs);
    k.ds = segment_to_kvm(&s.ds);
    k.es = segment_to_kvm(&s.es);
    k.fs = segment_to_kvm(&s.fs);
    k.gs = segment_to_kvm(&s.gs);
    k.ss = segment_to_kvm(&s.ss);
    k.tr = segment_to_kvm(&s.tr);
    k.ldt = segment_to_kvm(&s.ldt);
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

fn segment_from_kvm(s: &kvm_bindings::kvm_segment) -> hv::Segment {
    hv::Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn segment_to_kvm(s: &hv::Segment) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}
