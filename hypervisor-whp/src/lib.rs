//! The Windows Hypervisor Platform (WHP) behind supermachine's
//! `Hypervisor` trait: x86_64 guests on Windows 10 1803 or later with the
//! "Windows Hypervisor Platform" feature turned on.
//!
//! What WHP gives, and what this crate adds to make it look like KVM to
//! the VMM:
//!
//! - **Partition and memory.** A partition with one vCPU per `VmSpec`
//!   vCPU, RAM mapped with `WHvMapGpaRange`.
//! - **Interrupts.** WHP emulates each local APIC (`XApic` mode, with its
//!   timer and IPIs) but has no I/O APIC, 8259 or 8254. The backend
//!   emulates the I/O APIC (`ioapic`) where the MP table says it is, and
//!   an interrupt line becomes a `WHvRequestInterrupt` to wherever the
//!   guest routed it. There is no PIC or PIT: the guest uses the local
//!   APIC timer.
//! - **Exits.** Port I/O is decoded from the exit context (`exit`); MMIO
//!   goes through WHP's instruction emulator in two passes (the first
//!   learns the access and abandons the emulation, the VMM answers, the
//!   second replays it with the answer and commits), so the VMM sees
//!   KVM's model of an exit answered on the next `run`. HLT waits for an
//!   interrupt; RDMSR/WRMSR of IA32_MISC_ENABLE, which WHP has no
//!   register for, are answered here, other unknown MSRs read as zero.
//!   Notifiers are matched on write exits inside the backend.
//! - **Snapshots** use the x86_64 state types KVM's backend uses
//!   (`regs`, `lapic`): registers, XSAVE, XCR0, debug registers, the
//!   local APIC page, MSRs, events in flight and the activity state, with
//!   the emulated I/O APIC as the VM's state.
//!
//! The backend is compiled only for Windows; the decoding, the I/O APIC
//! and the conversions compile (and are tested) everywhere.

#![cfg_attr(not(windows), allow(dead_code))]

mod exit;
mod ioapic;
mod lapic;
mod regs;

#[cfg(windows)]
mod api;
#[cfg(windows)]
mod backend;

#[cfg(windows)]
pub use backend::WhpHypervisor;

use supermachine_hypervisor as hv;

/// What went wrong in a call to WHP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A WHP call returned a failing HRESULT.
    #[error("{op}: {}", describe(*hresult))]
    Platform {
        /// The function called.
        op: &'static str,
        /// Its HRESULT.
        hresult: i32,
    },
}

impl From<Error> for hv::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Platform { op, hresult } => hv::Error::Os {
                op,
                source: std::io::Error::other(describe(hresult)),
            },
        }
    }
}

/// The meaning of a WHP HRESULT, in words (`WinHvPlatformDefs.h`,
/// `winerror.h`).
pub fn describe(hresult: i32) -> String {
    let text = match hresult as u32 {
        0x8037_0301 => "unknown capability (WHV_E_UNKNOWN_CAPABILITY)",
        0x8037_0302 => "buffer too small (WHV_E_INSUFFICIENT_BUFFER)",
        0x8037_0303 => "unknown property (WHV_E_UNKNOWN_PROPERTY)",
        0x8037_0304 => "unsupported hypervisor configuration (WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG)",
        0x8037_0305 => "invalid partition configuration (WHV_E_INVALID_PARTITION_CONFIG)",
        0x8037_0306 => "guest physical range not found (WHV_E_GPA_RANGE_NOT_FOUND)",
        0x8037_0307 => "vCPU exists already (WHV_E_VP_ALREADY_EXISTS)",
        0x8037_0308 => "no such vCPU (WHV_E_VP_DOES_NOT_EXIST)",
        0x8037_0309 => "invalid vCPU state (WHV_E_INVALID_VP_STATE)",
        0x8037_030a => "invalid vCPU register name (WHV_E_INVALID_VP_REGISTER_NAME)",
        0x8007_0005 => "access denied (E_ACCESSDENIED)",
        0x8007_000e => "out of memory (E_OUTOFMEMORY)",
        0x8007_0057 => "invalid argument (E_INVALIDARG)",
        0x8000_4001 => "not implemented (E_NOTIMPL)",
        0x8000_4004 => "aborted (E_ABORT)",
        0x8000_4005 => "unspecified failure (E_FAIL)",
        _ => return format!("HRESULT {:#010x}", hresult as u32),
    };
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the platform is off (or under Wine, which has none) the
    /// process still starts, and `new` says what to turn on.
    #[cfg(windows)]
    #[test]
    fn a_missing_platform_is_reported_in_one_line() {
        match WhpHypervisor::new() {
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("turn on the \"Windows Hypervisor Platform\" feature"),
                    "{text}"
                );
                assert!(!text.contains('\n'), "{text}");
            }
        }
    }

    #[test]
    fn hresults_read_as_words_and_map_to_the_trait_error() {
        assert_eq!(describe(0x1234), "HRESULT 0x00001234");
        let e: hv::Error = Error::Platform {
            op: "WHvSetupPartition",
            hresult: 0x8037_0305_u32 as i32,
        }
        .into();
        assert_eq!(
            e.to_string(),
            "WHvSetupPartition failed: invalid partition configuration (WHV_E_INVALID_PARTITION_CONFIG)"
        );
    }
}
