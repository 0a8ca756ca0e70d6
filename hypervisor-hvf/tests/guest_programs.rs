//! Tier 2 for Hypervisor.framework: the guest programs every backend
//! runs (`supermachine-hypervisor-conformance`), on this Mac's framework.
//!
//! They need an Apple Silicon Mac on macOS 15 or later and a test binary
//! signed with the `com.apple.security.hypervisor` entitlement (see
//! `docs/platforms.md`). CI compiles them for `aarch64-apple-darwin`; they
//! have not run yet. Each makes its own VM, and the framework allows one
//! per process: run them one at a time (`--test-threads 1`).

#![cfg(all(target_os = "macos", target_arch = "aarch64"))]
#![allow(clippy::unwrap_used)]

use supermachine_hypervisor_conformance::aarch64 as conformance;
use supermachine_hypervisor_hvf::HvfHypervisor;

fn hvf() -> HvfHypervisor {
    HvfHypervisor::new().expect("tier-2 tests need Hypervisor.framework and its entitlement")
}

#[test]
fn a_guest_at_el1_powers_off_through_psci() {
    conformance::a_guest_at_el1_powers_off_through_psci(&hvf());
}

#[test]
fn mmio_outside_ram_exits_both_ways() {
    conformance::mmio_outside_ram_exits_both_ways(&hvf());
}

#[test]
fn registers_round_trip_through_the_guest() {
    conformance::registers_round_trip_through_the_guest(&hvf());
}

#[test]
fn a_second_vcpu_starts_with_psci_cpu_on() {
    conformance::a_second_vcpu_starts_with_psci_cpu_on(&hvf());
}

#[test]
fn a_vm_saved_and_gone_resumes_in_a_new_one() {
    conformance::a_vm_saved_and_gone_resumes_in_a_new_one(&hvf());
}
