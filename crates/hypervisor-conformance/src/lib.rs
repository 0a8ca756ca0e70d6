//! Guest programs every hypervisor backend must run the same way, written
//! once against the traits (see the README). They panic on the first
//! step that goes wrong: a failed step is a failed test.

#![allow(clippy::unwrap_used)]

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// One `#[test]` per named program of `$crate::$module`, each running it
/// on the backend `$hypervisor` evaluates to; what `x86_64_programs!` and
/// `aarch64_programs!` expand to.
#[doc(hidden)]
#[macro_export]
macro_rules! tests_for_programs {
    ($module:ident, $hypervisor:expr; $($program:ident),* $(,)?) => {$(
        #[test]
        fn $program() {
            $crate::$module::$program(&$hypervisor);
        }
    )*};
}

use std::sync::Arc;

use supermachine_hypervisor::{Hypervisor, RamRegion, Vm, VmSpec};
use supermachine_memory::GuestRam;

/// A VM of `vcpu_count` vCPUs over all of `ram`.
///
/// # Safety
/// `ram` must outlive the VM: callers keep both in one value whose fields
/// drop the VM first.
unsafe fn vm_over(hv: &dyn Hypervisor, ram: &GuestRam, vcpu_count: u32) -> Arc<dyn Vm> {
    let regions = ram
        .host_mappings()
        .iter()
        // SAFETY: the caller keeps `ram` mapped for the VM's life.
        .map(|m| unsafe { RamRegion::new(m.guest_addr, m.len, m.host_addr) })
        .collect();
    hv.create_vm(&VmSpec {
        vcpu_count,
        ram: regions,
    })
    .unwrap()
}
