//! How the x86_64 state types map onto WHP's register names and values.
//!
//! `WHV_REGISTER_NAME` values are fixed by `WinHvPlatformDefs.h`; they are
//! written out here so that the mapping compiles and is tested on any
//! host, and checked against the `windows-sys` constants when built for
//! Windows.

use supermachine_hypervisor::x86_64::{
    ExceptionEvent, InterruptEvent, NmiEvent, Segment, VcpuEvents, consts::msr,
};

/// `WHV_REGISTER_NAME`s, as `WinHvPlatformDefs.h` numbers them.
pub(crate) mod name {
    pub const RAX: i32 = 0x00;
    pub const RCX: i32 = 0x01;
    pub const RDX: i32 = 0x02;
    pub const RBX: i32 = 0x03;
    pub const RSP: i32 = 0x04;
    pub const RBP: i32 = 0x05;
    pub const RSI: i32 = 0x06;
    pub const RDI: i32 = 0x07;
    pub const R8: i32 = 0x08;
    pub const R15: i32 = 0x0f;
    pub const RIP: i32 = 0x10;
    pub const RFLAGS: i32 = 0x11;
    pub const ES: i32 = 0x12;
    pub const CS: i32 = 0x13;
    pub const SS: i32 = 0x14;
    pub const DS: i32 = 0x15;
    pub const FS: i32 = 0x16;
    pub const GS: i32 = 0x17;
    pub const LDTR: i32 = 0x18;
    pub const TR: i32 = 0x19;
    pub const IDTR: i32 = 0x1a;
    pub const GDTR: i32 = 0x1b;
    pub const CR0: i32 = 0x1c;
    pub const CR2: i32 = 0x1d;
    pub const CR3: i32 = 0x1e;
    pub const CR4: i32 = 0x1f;
    pub const CR8: i32 = 0x20;
    pub const DR0: i32 = 0x21;
    pub const DR6: i32 = 0x25;
    pub const DR7: i32 = 0x26;
    pub const XCR0: i32 = 0x27;
    pub const XMM_CONTROL_STATUS: i32 = 0x1019;
    pub const FP_CONTROL_STATUS: i32 = 0x1018;
    pub const TSC: i32 = 0x2000;
    pub const EFER: i32 = 0x2001;
    pub const KERNEL_GS_BASE: i32 = 0x2002;
    pub const APIC_BASE: i32 = 0x2003;
    pub const PAT: i32 = 0x2004;
    pub const SYSENTER_CS: i32 = 0x2005;
    pub const SYSENTER_EIP: i32 = 0x2006;
    pub const SYSENTER_ESP: i32 = 0x2007;
    pub const STAR: i32 = 0x2008;
    pub const LSTAR: i32 = 0x2009;
    pub const CSTAR: i32 = 0x200a;
    pub const SFMASK: i32 = 0x200b;
    pub const MTRR_DEF_TYPE: i32 = 0x200e;
    pub const TSC_AUX: i32 = 0x207b;
    pub const PENDING_INTERRUPTION: i32 = 0x8000_0000_u32 as i32;
    pub const INTERRUPT_STATE: i32 = 0x8000_0001_u32 as i32;
    pub const INTERNAL_ACTIVITY_STATE: i32 = 0x8000_0005_u32 as i32;
}

/// The general-purpose registers, RIP and RFLAGS, in the order of
/// [`supermachine_hypervisor::Regs`]' fields.
pub(crate) const GENERAL: [i32; 18] = [
    name::RAX,
    name::RBX,
    name::RCX,
    name::RDX,
    name::RSI,
    name::RDI,
    name::RSP,
    name::RBP,
    name::R8,
    name::R8 + 1,
    name::R8 + 2,
    name::R8 + 3,
    name::R8 + 4,
    name::R8 + 5,
    name::R8 + 6,
    name::R15,
    name::RIP,
    name::RFLAGS,
];

/// The segment, table and control registers of
/// [`supermachine_hypervisor::SpecialRegs`], in its field order.
pub(crate) const SPECIAL: [i32; 17] = [
    name::CS,
    name::DS,
    name::ES,
    name::FS,
    name::GS,
    name::SS,
    name::TR,
    name::LDTR,
    name::GDTR,
    name::IDTR,
    name::CR0,
    name::CR2,
    name::CR3,
    name::CR4,
    name::CR8,
    name::EFER,
    name::APIC_BASE,
];

/// Debug registers DR0-DR3, DR6 and DR7, in `DebugRegs`' order.
pub(crate) const DEBUG: [i32; 6] = [
    name::DR0,
    name::DR0 + 1,
    name::DR0 + 2,
    name::DR0 + 3,
    name::DR6,
    name::DR7,
];

/// IA32_MISC_ENABLE: WHP has no register for it, so the backend keeps it
/// per vCPU and answers the guest's RDMSR/WRMSR exits.
pub(crate) const MSR_MISC_ENABLE: u32 = msr::IA32_MISC_ENABLE;

/// The WHP register holding MSR `index`, for the MSRs that have one.
pub(crate) fn msr_register(index: u32) -> Option<i32> {
    Some(match index {
        msr::IA32_TSC => name::TSC,
        0xc000_0080 => name::EFER,
        msr::KERNEL_GS_BASE => name::KERNEL_GS_BASE,
        0x1b => name::APIC_BASE,
        0x277 => name::PAT,
        msr::IA32_SYSENTER_CS => name::SYSENTER_CS,
        msr::IA32_SYSENTER_EIP => name::SYSENTER_EIP,
        msr::IA32_SYSENTER_ESP => name::SYSENTER_ESP,
        msr::STAR => name::STAR,
        msr::LSTAR => name::LSTAR,
        msr::CSTAR => name::CSTAR,
        msr::SYSCALL_MASK => name::SFMASK,
        msr::IA32_MTRR_DEF_TYPE => name::MTRR_DEF_TYPE,
        0xc000_0103 => name::TSC_AUX,
        _ => return None,
    })
}

/// The MSRs a snapshot of a WHP vCPU carries, TSC last so that it is
/// written after everything that could disturb it.
pub(crate) const SAVED_MSRS: &[u32] = &[
    msr::IA32_SYSENTER_CS,
    msr::IA32_SYSENTER_ESP,
    msr::IA32_SYSENTER_EIP,
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SYSCALL_MASK,
    msr::KERNEL_GS_BASE,
    0x277, // PAT
    msr::IA32_MTRR_DEF_TYPE,
    0xc000_0103, // TSC_AUX
    MSR_MISC_ENABLE,
    msr::IA32_TSC,
];

/// A segment's attributes as `WHV_X64_SEGMENT_REGISTER` packs them: type
/// (3:0), S (4), DPL (6:5), P (7), AVL (12), L (13), D/B (14), G (15).
pub(crate) fn segment_attributes(s: &Segment) -> u16 {
    u16::from(s.type_ & 0xf)
        | (u16::from(s.s) << 4)
        | (u16::from(s.dpl & 0x3) << 5)
        | (u16::from(s.present) << 7)
        | (u16::from(s.avl) << 12)
        | (u16::from(s.l) << 13)
        | (u16::from(s.db) << 14)
        | (u16::from(s.g) << 15)
}

/// The segment WHP describes with these fields. A segment that is not
/// present is unusable, as KVM reports it.
pub(crate) fn segment(base: u64, limit: u32, selector: u16, attributes: u16) -> Segment {
    let present = attributes & (1 << 7) != 0;
    Segment {
        base,
        limit,
        selector,
        type_: (attributes & 0xf) as u8,
        s: attributes & (1 << 4) != 0,
        dpl: ((attributes >> 5) & 0x3) as u8,
        present,
        avl: attributes & (1 << 12) != 0,
        l: attributes & (1 << 13) != 0,
        db: attributes & (1 << 14) != 0,
        g: attributes & (1 << 15) != 0,
        unusable: !present,
    }
}

/// `WHV_X64_PENDING_INTERRUPTION_REGISTER` interruption types.
mod interruption {
    pub const EXTERNAL: u64 = 0;
    pub const NMI: u64 = 2;
    pub const EXCEPTION: u64 = 3;
    pub const SOFTWARE_INTERRUPT: u64 = 4;
}

/// The events in flight that `WHvRegisterPendingInterruption` and
/// `WHvRegisterInterruptState` describe, as the state types hold them.
/// Pending interruption: pending (0), type (3:1), deliver error code (4),
/// instruction length (8:5), vector (31:16), error code (63:32).
/// Interrupt state: interrupt shadow (0), NMI masked (1).
pub(crate) fn events(pending: u64, interrupt_state: u64) -> VcpuEvents {
    let in_flight = pending & 1 != 0;
    let kind = (pending >> 1) & 0x7;
    let vector = ((pending >> 16) & 0xff) as u8;
    let error_code = (pending & (1 << 4) != 0).then_some((pending >> 32) as u32);
    VcpuEvents {
        exception: ExceptionEvent {
            injected: in_flight && kind == interruption::EXCEPTION,
            pending: false,
            vector: if kind == interruption::EXCEPTION {
                vector
            } else {
                0
            },
            error_code: if kind == interruption::EXCEPTION {
                error_code
            } else {
                None
            },
        },
        interrupt: InterruptEvent {
            injected: in_flight
                && (kind == interruption::EXTERNAL || kind == interruption::SOFTWARE_INTERRUPT),
            vector: if kind == interruption::EXTERNAL || kind == interruption::SOFTWARE_INTERRUPT {
                vector
            } else {
                0
            },
            soft: kind == interruption::SOFTWARE_INTERRUPT,
            shadow: (interrupt_state & 1) as u8,
        },
        nmi: NmiEvent {
            injected: in_flight && kind == interruption::NMI,
            pending: false,
            masked: interrupt_state & 2 != 0,
        },
        ..VcpuEvents::default()
    }
}

/// The two WHP registers that put `events` back: (pending interruption,
/// interrupt state). Refuses what WHP cannot hold: an exception or NMI
/// still waiting to be injected (KVM's `pending`), or an SMI.
pub(crate) fn from_events(events: &VcpuEvents) -> Result<(u64, u64), String> {
    if events.exception.pending || events.nmi.pending {
        return Err(
            "an exception or NMI is pending but not yet injected, which WHP cannot take back"
                .into(),
        );
    }
    if events.smi.smm || events.smi.pending {
        return Err("the vCPU was in or about to enter SMM, which WHP does not run".into());
    }
    let interrupt_state =
        u64::from(events.interrupt.shadow & 1) | (u64::from(events.nmi.masked) << 1);
    let (kind, vector, error_code) = if events.exception.injected {
        (
            interruption::EXCEPTION,
            events.exception.vector,
            events.exception.error_code,
        )
    } else if events.nmi.injected {
        (interruption::NMI, 2, None)
    } else if events.interrupt.injected {
        let kind = if events.interrupt.soft {
            interruption::SOFTWARE_INTERRUPT
        } else {
            interruption::EXTERNAL
        };
        (kind, events.interrupt.vector, None)
    } else {
        return Ok((0, interrupt_state));
    };
    let mut pending = 1 | (kind << 1) | (u64::from(vector) << 16);
    if let Some(code) = error_code {
        pending |= (1 << 4) | (u64::from(code) << 32);
    }
    Ok((pending, interrupt_state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_64_bit_code_segment_packs_as_whp_describes_it() {
        // What a long-mode boot puts in CS: type 0xb, S, P, L, G.
        let cs = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        assert_eq!(segment_attributes(&cs), 0xa09b);
        assert_eq!(segment(0, 0xffff_ffff, 0x10, 0xa09b), cs);
        // A null segment: not present, so unusable.
        assert!(segment(0, 0, 0, 0).unusable);
        let ring3_data = segment(0, 0xfffff, 0x2b, 0xc0f3);
        assert_eq!(
            (ring3_data.dpl, ring3_data.db, ring3_data.type_),
            (3, true, 3)
        );
        assert_eq!(segment_attributes(&ring3_data), 0xc0f3);
    }

    #[test]
    fn register_lists_follow_the_state_types_fields() {
        assert_eq!(GENERAL[1], name::RBX);
        assert_eq!(GENERAL[15], name::R15);
        assert_eq!(GENERAL[16], name::RIP);
        assert_eq!(SPECIAL[0], name::CS);
        assert_eq!(SPECIAL[16], name::APIC_BASE);
        assert_eq!(DEBUG, [0x21, 0x22, 0x23, 0x24, 0x25, 0x26]);
        for index in SAVED_MSRS {
            assert!(
                msr_register(*index).is_some() || *index == MSR_MISC_ENABLE,
                "MSR {index:#x} has nowhere to go"
            );
        }
        assert_eq!(SAVED_MSRS.last(), Some(&msr::IA32_TSC));
        assert_eq!(msr_register(0xc000_0080), Some(0x2001));
        assert_eq!(msr_register(0x8b), None);
    }

    #[test]
    fn events_in_flight_round_trip() {
        // #PF being delivered with error code 2, inside an STI shadow.
        let pending = 1 | (3 << 1) | (1 << 4) | (14 << 16) | (2u64 << 32);
        let e = events(pending, 1);
        assert!(e.exception.injected);
        assert_eq!((e.exception.vector, e.exception.error_code), (14, Some(2)));
        assert_eq!(e.interrupt.shadow, 1);
        assert!(!e.interrupt.injected && !e.nmi.injected);
        assert_eq!(from_events(&e).unwrap(), (pending, 1));
        // An external interrupt, vector 0x30, NMIs masked.
        let pending = 1 | (0x30 << 16);
        let e = events(pending, 2);
        assert!(e.interrupt.injected && !e.interrupt.soft && e.nmi.masked);
        assert_eq!(e.interrupt.vector, 0x30);
        assert_eq!(from_events(&e).unwrap(), (pending, 2));
        // Nothing in flight.
        assert_eq!(from_events(&events(0, 0)).unwrap(), (0, 0));
        // What WHP cannot hold.
        let mut pending_nmi = VcpuEvents::default();
        pending_nmi.nmi.pending = true;
        assert!(from_events(&pending_nmi).is_err());
    }
}
