//! Apple's Hypervisor.framework behind supermachine's `Hypervisor` trait:
//! arm64 guests on Apple Silicon, macOS 15 or later.
//!
//! What the framework gives, and what this crate adds to make it look
//! like KVM to the VMM:
//!
//! - **VM and memory.** One VM per process (`hv_vm_create` is
//!   process-wide); RAM mapped with `hv_vm_map` when the VM is created.
//! - **vCPUs.** A vCPU belongs to the thread that created it: every call
//!   on it, `hv_vcpu_run` included, must come from that thread, so
//!   `Vm::create_vcpu` must be called on the thread that will run it. The
//!   vCPU's MPIDR_EL1 is set to the affinity the device tree gives it.
//! - **Exits.** Data aborts are decoded from their syndrome into MMIO
//!   reads and writes (`exit`); an access whose syndrome does not describe
//!   it fails the VM rather than being guessed at. WFI sleeps until the
//!   virtual timer's deadline or an interrupt; HVC is PSCI (`psci`),
//!   answered here (KVM answers it in the kernel); SMC is refused as
//!   PSCI says; trapped system registers read as zero and ignore writes.
//! - **GIC.** The framework's own GICv3 (`hv_gic_create`, macOS 15), at
//!   the addresses KVM's is placed; it also delivers the virtual timer's
//!   interrupt. Interrupt lines are SPIs raised with `hv_gic_set_spi`.
//!   The framework has no ioeventfd: notifiers are matched on MMIO write
//!   exits inside the backend, which signals them and re-enters the guest
//!   without returning to the VMM.
//! - **Snapshots** use the aarch64 state types KVM's backend uses
//!   (`regs`, `gic`), with the virtual counter saved as a count and
//!   restored through the vCPU's virtual timer offset.
//!
//! The backend is compiled only for `aarch64-apple-darwin`; the decoding
//! and conversion modules compile (and are tested) everywhere. A binary
//! that uses it must be signed with the `com.apple.security.hypervisor`
//! entitlement (see `docs/platforms.md`).

#![cfg_attr(
    not(all(target_os = "macos", target_arch = "aarch64")),
    allow(dead_code)
)]

mod exit;
mod gic;
mod psci;
mod regs;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod backend;
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
mod ffi;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub use backend::HvfHypervisor;

use supermachine_hypervisor as hv;

/// What went wrong in a call to the framework.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A framework call returned an error code.
    #[error("{op}: {}", describe(*code))]
    Framework {
        /// The function called.
        op: &'static str,
        /// Its `hv_return_t`.
        code: i32,
    },
}

impl From<Error> for hv::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Framework { op, code } => hv::Error::Os {
                op,
                source: std::io::Error::other(describe(code)),
            },
        }
    }
}

/// The meaning of an `hv_return_t`, in words (`Hypervisor/hv_error.h`).
pub fn describe(code: i32) -> String {
    let text = match code as u32 {
        0 => "success",
        0xfae9_4001 => "error (HV_ERROR)",
        0xfae9_4002 => "busy (HV_BUSY)",
        0xfae9_4003 => "bad argument (HV_BAD_ARGUMENT)",
        0xfae9_4004 => "illegal guest state (HV_ILLEGAL_GUEST_STATE)",
        0xfae9_4005 => "no resources (HV_NO_RESOURCES)",
        0xfae9_4006 => "no VM or vCPU (HV_NO_DEVICE)",
        0xfae9_4007 => {
            "denied (HV_DENIED): is the binary signed with the com.apple.security.hypervisor entitlement?"
        }
        0xfae9_4008 => "fault (HV_FAULT)",
        0xfae9_400f => "not supported by this Mac or macOS (HV_UNSUPPORTED)",
        _ => return format!("unknown error {code:#x}"),
    };
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framework_errors_read_as_words_and_map_to_the_trait_error() {
        assert!(describe(0xfae9_4007_u32 as i32).contains("com.apple.security.hypervisor"));
        assert_eq!(describe(0x1234), "unknown error 0x1234");
        let e: hv::Error = Error::Framework {
            op: "hv_vm_create",
            code: 0xfae9_400f_u32 as i32,
        }
        .into();
        assert_eq!(
            e.to_string(),
            "hv_vm_create failed: not supported by this Mac or macOS (HV_UNSUPPORTED)"
        );
    }
}
