//! Tier 2: the x86_64 guest programs every backend runs
//! (`supermachine-hypervisor-conformance`), on this host's real `/dev/kvm`.

#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

use supermachine_hypervisor_kvm::KvmHypervisor;

supermachine_hypervisor_conformance::x86_64_programs!(
    KvmHypervisor::new().expect("tier-2 tests need /dev/kvm")
);
