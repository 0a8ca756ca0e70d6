//! Tier 2 for the Windows Hypervisor Platform: the x86_64 guest programs
//! every backend runs (`supermachine-hypervisor-conformance`), on this
//! machine's WHP.
//!
//! They need x86_64 Windows with the "Windows Hypervisor Platform" feature
//! on (see `docs/platforms.md`). CI compiles them for
//! `x86_64-pc-windows-gnu`; they have not run yet (Wine has no WHP, so the
//! Wine run leaves them out).

#![cfg(all(windows, target_arch = "x86_64"))]
#![allow(clippy::unwrap_used)]

use supermachine_hypervisor_whp::WhpHypervisor;

supermachine_hypervisor_conformance::x86_64_programs!(
    WhpHypervisor::new().expect("tier-2 tests need the Windows Hypervisor Platform")
);
