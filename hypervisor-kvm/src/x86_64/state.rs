//! Saving and restoring vCPU and VM state: conversions between KVM's ABI
//! structures and the plain types of `supermachine_hypervisor::x86_64`,
//! and the order in which KVM must be given them.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pic_state,
    kvm_pit_channel_state, kvm_pit_state2, kvm_vcpu_events, kvm_xcrs,
};
use kvm_ioctls::{VcpuFd, VmFd};
use supermachine_hypervisor::x86_64::{
    CpuidEntry, DebugRegs, ExceptionEvent, InterruptEvent, IoapicState, MpState, NmiEvent,
    PicState, PitChannel, PitState, SmiEvent, VcpuEvents, VcpuState, VmState, Xcr,
};
use supermachine_hypervisor::{self as hv, MsrEntry, Regs, SpecialRegs};
use vmm_sys_util::fam::FamStruct;

use crate::ioctl;

const IRQCHIP_PIC_PRIMARY: u32 = 0;
const IRQCHIP_PIC_SECONDARY: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;
const LAPIC_BYTES: usize = 1024;
/// MSRs KVM lists but that must not be carried over: reading them is
/// refused or meaningless once the vCPU has moved (none of them is guest
/// state).
const MSRS_NOT_SAVED: &[u32] = &[];

/// What every vCPU save needs from the host, found out once.
#[derive(Clone, Debug)]
pub(crate) struct StateSupport {
    /// MSRs KVM says it saves and restores.
    pub(crate) msrs: Vec<u32>,
    /// Size of the XSAVE area KVM exchanges (`KVM_CAP_XSAVE2`), at least 4 KiB.
    pub(crate) xsave_bytes: usize,
    /// Whether `KVM_GET/SET_XSAVE2` must be used for that size.
    pub(crate) xsave2: bool,
}

impl StateSupport {
    pub(crate) fn probe(kvm: &kvm_ioctls::Kvm) -> hv::Result<Self> {
        let list = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = list
            .as_slice()
            .iter()
            .copied()
            .filter(|m| !MSRS_NOT_SAVED.contains(m))
            .collect();
        let xsave2_size = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
        let legacy = std::mem::size_of::<kvm_bindings::kvm_xsave>();
        let xsave2 = xsave2_size as usize > legacy;
        Ok(Self {
            msrs,
            xsave_bytes: if xsave2 { xsave2_size as usize } else { legacy },
            xsave2,
        })
    }
}

// ---- vCPU ----

pub(crate) fn save_vcpu(
    fd: &VcpuFd,
    support: &StateSupport,
    regs: Regs,
    sregs: SpecialRegs,
) -> hv::Result<VcpuState> {
    // MP state first: reading it makes KVM process pending APIC events
    // (INIT, SIPI) into the rest of the state.
    let mp_state = mp_state_from_kvm(fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?)?;
    let ksregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let xsave = get_xsave(fd, support)?;
    let kxcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
    let xcrs = kxcrs.xcrs[..(kxcrs.nr_xcrs as usize).min(kxcrs.xcrs.len())]
        .iter()
        .map(|x| Xcr {
            index: x.xcr,
            value: x.value,
        })
        .collect();
    let d = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
    let msrs = get_all_msrs(fd, &support.msrs)?;
    let events = events_from_kvm(&fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?);
    let cpuid = entries_of(
        &fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?,
    );
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        pending_interrupts: ksregs.interrupt_bitmap,
        xsave,
        xcrs,
        debug_regs: DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        },
        lapic: lapic.regs.iter().map(|&b| b as u8).collect(),
        msrs,
        events,
    })
}

/// Reads every MSR in `indices` that this vCPU can read. KVM stops at the
/// first one it refuses (an MSR of a feature this CPUID does not give the
/// guest); that one is left out and the rest read on.
fn get_all_msrs(fd: &VcpuFd, indices: &[u32]) -> hv::Result<Vec<MsrEntry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_bindings::kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|e| hv::Error::Invalid(format!("MSR batch: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        // Skip the refused one, if any.
        rest = &rest[(read + usize::from(read < batch.len())).min(rest.len())..];
    }
    Ok(out)
}

fn get_xsave(fd: &VcpuFd, support: &StateSupport) -> hv::Result<Vec<u8>> {
    let words: Vec<u32> = if support.xsave2 {
        let legacy = std::mem::size_of::<kvm_bindings::kvm_xsave>();
        let entry = std::mem::size_of::<<kvm_bindings::kvm_xsave2 as FamStruct>::Entry>();
        let mut xsave = kvm_bindings::Xsave::new((support.xsave_bytes - legacy).div_ceil(entry))
            .map_err(|e| hv::Error::Invalid(format!("XSAVE buffer: {e:?}")))?;
        // SAFETY: the buffer holds the size KVM_CAP_XSAVE2 reported, which
        // is what KVM_GET_XSAVE2 writes.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
        let fam = xsave.as_fam_struct_ref();
        fam.xsave
            .region
            .iter()
            .copied()
            .chain(xsave.as_slice().iter().copied())
            .collect()
    } else {
        fd.get_xsave()
            .map_err(ioctl("KVM_GET_XSAVE"))?
            .region
            .to_vec()
    };
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(support.xsave_bytes);
    Ok(bytes)
}

fn set_xsave(fd: &VcpuFd, support: &StateSupport, saved: &[u8]) -> hv::Result<()> {
    if saved.len() > support.xsave_bytes {
        return Err(hv::Error::Invalid(format!(
            "the saved XSAVE area is {} bytes; this host's KVM takes {}",
            saved.len(),
            support.xsave_bytes
        )));
    }
    // A shorter area (saved where fewer features were enabled) is padded:
    // its header says which components are present.
    let mut words = vec![0u32; support.xsave_bytes.div_ceil(4)];
    for (w, chunk) in words.iter_mut().zip(saved.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_le_bytes(b);
    }
    let legacy_words = std::mem::size_of::<kvm_bindings::kvm_xsave>() / 4;
    if support.xsave2 {
        let entry = std::mem::size_of::<<kvm_bindings::kvm_xsave2 as FamStruct>::Entry>();
        let mut xsave =
            kvm_bindings::Xsave::new((support.xsave_bytes - legacy_words * 4).div_ceil(entry))
                .map_err(|e| hv::Error::Invalid(format!("XSAVE buffer: {e:?}")))?;
        // SAFETY: only plain integer arrays of the FAM struct are written.
        unsafe {
            xsave
                .as_mut_fam_struct()
                .xsave
                .region
                .copy_from_slice(&words[..legacy_words]);
        }
        for (dst, src) in xsave.as_mut_slice().iter_mut().zip(&words[legacy_words..]) {
            *dst = *src;
        }
        // SAFETY: the buffer is the size KVM_CAP_XSAVE2 reported.
        unsafe { fd.set_xsave2(&xsave) }.map_err(ioctl("KVM_SET_XSAVE2"))
    } else {
        let mut x = kvm_bindings::kvm_xsave::default();
        x.region.copy_from_slice(&words[..legacy_words]);
        // SAFETY: without XSAVE2 KVM reads exactly the legacy 4 KiB struct.
        unsafe { fd.set_xsave(&x) }.map_err(ioctl("KVM_SET_XSAVE"))
    }
}

/// Sets a saved vCPU state on a vCPU that has not run. The order matters:
/// CPUID before anything it gates; MP state and registers; sregs (which
/// enable the local APIC through APIC_BASE) before the LAPIC page; the
/// LAPIC (its timer mode) before the MSRs (TSC_DEADLINE is only taken in
/// TSC-deadline mode); events last, as they are delivered on entry.
pub(crate) fn restore_vcpu(
    fd: &VcpuFd,
    support: &StateSupport,
    state: &VcpuState,
    set_regs: impl FnOnce(&Regs) -> hv::Result<()>,
    set_sregs: impl FnOnce(&SpecialRegs, [u64; 4]) -> hv::Result<()>,
) -> hv::Result<()> {
    let entries: Vec<kvm_cpuid_entry2> = state
        .cpuid
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|e| hv::Error::Invalid(format!("saved CPUID: {e:?}")))?;
    let fresh = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_CPUID2"))?;
    hv::x86_64::check_cpu_features(&state.cpuid, &entries_of(&fresh))?;
    fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    let current_khz = fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
    if state.tsc_khz != 0 && tsc_differs(current_khz, state.tsc_khz) {
        fd.set_tsc_khz(state.tsc_khz).map_err(|e| {
            hv::Error::Unsupported(format!(
                "the guest's TSC ran at {} kHz, this host's at {current_khz} kHz, and KVM cannot scale it: {e}",
                state.tsc_khz
            ))
        })?;
    }
    fd.set_mp_state(kvm_mp_state {
        mp_state: mp_state_to_kvm(state.mp_state),
    })
    .map_err(ioctl("KVM_SET_MP_STATE"))?;
    set_regs(&state.regs)?;
    set_sregs(&state.sregs, state.pending_interrupts)?;
    set_xsave(fd, support, &state.xsave)?;
    let mut xcrs = kvm_xcrs::default();
    if state.xcrs.len() > xcrs.xcrs.len() {
        return Err(hv::Error::Invalid(format!(
            "{} XCRs saved",
            state.xcrs.len()
        )));
    }
    xcrs.nr_xcrs = state.xcrs.len() as u32;
    for (k, x) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
        k.xcr = x.index;
        k.value = x.value;
    }
    fd.set_xcrs(&xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&kvm_debugregs {
        db: state.debug_regs.db,
        dr6: state.debug_regs.dr6,
        dr7: state.debug_regs.dr7,
        ..Default::default()
    })
    .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    if state.lapic.len() != LAPIC_BYTES {
        return Err(hv::Error::Invalid(format!(
            "the saved local APIC page is {} bytes, not {LAPIC_BYTES}",
            state.lapic.len()
        )));
    }
    let mut lapic = kvm_lapic_state::default();
    for (r, &b) in lapic.regs.iter_mut().zip(&state.lapic) {
        *r = b as std::os::raw::c_char;
    }
    fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    set_msrs_all(fd, &state.msrs)?;
    // Start from what this KVM reports so its flags name exactly the
    // fields it accepts.
    let mut events = fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
    events_to_kvm(&state.events, &mut events);
    fd.set_vcpu_events(&events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Writes MSRs in batches KVM accepts; every one must be taken.
pub(crate) fn set_msrs_all(fd: &VcpuFd, msrs: &[MsrEntry]) -> hv::Result<()> {
    for batch in msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|e| hv::Error::Invalid(format!("MSR batch: {e:?}")))?;
        let written = fd.set_msrs(&kvm_msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if written != batch.len() {
            return Err(hv::Error::Unsupported(format!(
                "KVM refuses the value {:#x} for MSR {:#x}",
                batch[written].data, batch[written].index
            )));
        }
    }
    Ok(())
}

/// KVM rounds the frequency it reports; within 250 ppm is the same clock.
fn tsc_differs(a: u32, b: u32) -> bool {
    u64::from(a.abs_diff(b)) * 4000 > u64::from(a.max(b))
}

fn mp_state_from_kvm(k: kvm_mp_state) -> hv::Result<MpState> {
    Ok(match k.mp_state {
        KVM_MP_STATE_RUNNABLE => MpState::Runnable,
        KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
        KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
        KVM_MP_STATE_HALTED => MpState::Halted,
        KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
        other => {
            return Err(hv::Error::Unsupported(format!(
                "vCPU in MP state {other}, which snapshots do not model"
            )));
        }
    })
}

fn mp_state_to_kvm(s: MpState) -> u32 {
    match s {
        MpState::Runnable => KVM_MP_STATE_RUNNABLE,
        MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
        MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
        MpState::Halted => KVM_MP_STATE_HALTED,
        MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
    }
}

fn events_from_kvm(k: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception: ExceptionEvent {
            injected: k.exception.injected != 0,
            pending: k.exception.pending != 0,
            vector: k.exception.nr,
            error_code: (k.exception.has_error_code != 0).then_some(k.exception.error_code),
        },
        interrupt: InterruptEvent {
            injected: k.interrupt.injected != 0,
            vector: k.interrupt.nr,
            soft: k.interrupt.soft != 0,
            shadow: k.interrupt.shadow,
        },
        nmi: NmiEvent {
            injected: k.nmi.injected != 0,
            pending: k.nmi.pending != 0,
            masked: k.nmi.masked != 0,
        },
        sipi_vector: k.sipi_vector,
        smi: SmiEvent {
            smm: k.smi.smm != 0,
            pending: k.smi.pending != 0,
            smm_inside_nmi: k.smi.smm_inside_nmi != 0,
            latched_init: k.smi.latched_init != 0,
        },
    }
}

fn events_to_kvm(e: &VcpuEvents, k: &mut kvm_vcpu_events) {
    k.exception.injected = u8::from(e.exception.injected);
    k.exception.pending = u8::from(e.exception.pending);
    k.exception.nr = e.exception.vector;
    k.exception.has_error_code = u8::from(e.exception.error_code.is_some());
    k.exception.error_code = e.exception.error_code.unwrap_or(0);
    k.interrupt.injected = u8::from(e.interrupt.injected);
    k.interrupt.nr = e.interrupt.vector;
    k.interrupt.soft = u8::from(e.interrupt.soft);
    k.interrupt.shadow = e.interrupt.shadow;
    k.nmi.injected = u8::from(e.nmi.injected);
    k.nmi.pending = u8::from(e.nmi.pending);
    k.nmi.masked = u8::from(e.nmi.masked);
    k.sipi_vector = e.sipi_vector;
    k.smi.smm = u8::from(e.smi.smm);
    k.smi.pending = u8::from(e.smi.pending);
    k.smi.smm_inside_nmi = u8::from(e.smi.smm_inside_nmi);
    k.smi.latched_init = u8::from(e.smi.latched_init);
    // No exception payload or triple-fault capability is enabled, so
    // their flags stay clear.
    k.flags &= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING
        | kvm_bindings::KVM_VCPUEVENT_VALID_SIPI_VECTOR
        | kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW
        | kvm_bindings::KVM_VCPUEVENT_VALID_SMM;
}

// ---- VM ----

pub(crate) fn save_vm(vm: &VmFd) -> hv::Result<VmState> {
    let pic = |chip_id: u32| -> hv::Result<PicState> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        // SAFETY: chip ids 0 and 1 fill the `pic` member of the union.
        Ok(pic_from_kvm(&unsafe { chip.chip.pic }))
    };
    let mut chip = kvm_irqchip {
        chip_id: IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    // SAFETY: chip id 2 fills the `ioapic` member of the union.
    let io = unsafe { chip.chip.ioapic };
    let mut redirection = [0u64; 24];
    for (r, k) in redirection.iter_mut().zip(io.redirtbl.iter()) {
        // SAFETY: every redirection entry is a plain 64-bit word.
        *r = unsafe { k.bits };
    }
    let pit = vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
    Ok(VmState {
        pic_primary: pic(IRQCHIP_PIC_PRIMARY)?,
        pic_secondary: pic(IRQCHIP_PIC_SECONDARY)?,
        ioapic: IoapicState {
            base_address: io.base_address,
            ioregsel: io.ioregsel,
            id: io.id,
            irr: io.irr,
            redirection,
        },
        pit: PitState {
            channels: pit.channels.map(|c| pit_channel_from_kvm(&c)),
            flags: pit.flags,
        },
        clock_ns: clock.clock,
    })
}

/// Sets saved VM state: PIT and clock, then the interrupt controllers.
pub(crate) fn restore_vm(vm: &VmFd, state: &VmState) -> hv::Result<()> {
    vm.set_pit2(&kvm_pit_state2 {
        channels: state.pit.channels.map(|c| pit_channel_to_kvm(&c)),
        flags: state.pit.flags,
        ..Default::default()
    })
    .map_err(ioctl("KVM_SET_PIT2"))?;
    vm.set_clock(&kvm_bindings::kvm_clock_data {
        clock: state.clock_ns,
        ..Default::default()
    })
    .map_err(ioctl("KVM_SET_CLOCK"))?;
    for (chip_id, pic) in [
        (IRQCHIP_PIC_PRIMARY, &state.pic_primary),
        (IRQCHIP_PIC_SECONDARY, &state.pic_secondary),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic_to_kvm(pic);
        vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    let mut chip = kvm_irqchip {
        chip_id: IRQCHIP_IOAPIC,
        ..Default::default()
    };
    let mut io = kvm_bindings::kvm_ioapic_state {
        base_address: state.ioapic.base_address,
        ioregsel: state.ioapic.ioregsel,
        id: state.ioapic.id,
        irr: state.ioapic.irr,
        ..Default::default()
    };
    for (k, &r) in io.redirtbl.iter_mut().zip(state.ioapic.redirection.iter()) {
        k.bits = r;
    }
    chip.chip.ioapic = io;
    vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))
}

fn pic_from_kvm(k: &kvm_pic_state) -> PicState {
    PicState {
        last_irr: k.last_irr,
        irr: k.irr,
        imr: k.imr,
        isr: k.isr,
        priority_add: k.priority_add,
        irq_base: k.irq_base,
        read_reg_select: k.read_reg_select,
        poll: k.poll,
        special_mask: k.special_mask,
        init_state: k.init_state,
        auto_eoi: k.auto_eoi,
        rotate_on_auto_eoi: k.rotate_on_auto_eoi,
        special_fully_nested_mode: k.special_fully_nested_mode,
        init4: k.init4,
        elcr: k.elcr,
        elcr_mask: k.elcr_mask,
    }
}

fn pic_to_kvm(p: &PicState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

fn pit_channel_from_kvm(k: &kvm_pit_channel_state) -> PitChannel {
    PitChannel {
        count: k.count,
        latched_count: k.latched_count,
        count_latched: k.count_latched,
        status_latched: k.status_latched,
        status: k.status,
        read_state: k.read_state,
        write_state: k.write_state,
        write_latch: k.write_latch,
        rw_mode: k.rw_mode,
        mode: k.mode,
        bcd: k.bcd,
        gate: k.gate,
        count_load_time: k.count_load_time,
    }
}

fn pit_channel_to_kvm(c: &PitChannel) -> kvm_pit_channel_state {
    kvm_pit_channel_state {
        count: c.count,
        latched_count: c.latched_count,
        count_latched: c.count_latched,
        status_latched: c.status_latched,
        status: c.status,
        read_state: c.read_state,
        write_state: c.write_state,
        write_latch: c.write_latch,
        rw_mode: c.rw_mode,
        mode: c.mode,
        bcd: c.bcd,
        gate: c.gate,
        count_load_time: c.count_load_time,
    }
}

// ---- Compatibility ----

fn entries_of(cpuid: &CpuId) -> Vec<CpuidEntry> {
    cpuid
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// Checks that vCPUs saved with `saved` CPUID were running on this CPU
/// (what KVM supports here reports).
pub(crate) fn check_cpu_model(saved: &[CpuidEntry], supported: &CpuId) -> hv::Result<()> {
    hv::x86_64::check_cpu_model(saved, &entries_of(supported))
}
