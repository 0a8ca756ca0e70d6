//! Tier 2 on arm64: tiny guest programs on the host's real `/dev/kvm`
//! (inside the arm64 test host here, whose KVM runs in VHE mode).
//!
//! Each test assembles a few A64 instructions, enters them at EL1 with
//! the MMU off (the vCPU's reset state), and checks the exits the VMM
//! would see.

#![cfg(target_arch = "aarch64")]
#![allow(clippy::unwrap_used)]

use supermachine_hypervisor::{Hypervisor, Vcpu};
use supermachine_hypervisor_conformance::aarch64::{self as conformance, CODE_ADDR, Guest};
use supermachine_hypervisor_kvm::KvmHypervisor;
use supermachine_memory::{Bytes, GuestAddress};

fn kvm() -> KvmHypervisor {
    KvmHypervisor::new().expect("tier-2 tests need /dev/kvm")
}

// The guest programs every backend runs (`supermachine-hypervisor-conformance`).
supermachine_hypervisor_conformance::aarch64_programs!(kvm());

// KVM's own: two VMs in one process at once (Hypervisor.framework allows
// one at a time).

/// A VM with its vCPUs made on this thread (KVM does not mind).
fn guest_with_vcpus(
    hv: &dyn Hypervisor,
    count: u32,
    programs: &[(u64, Vec<u32>)],
) -> (Guest, Vec<Box<dyn Vcpu>>) {
    let g = conformance::guest(hv, count, programs);
    let vcpus = (0..count)
        .map(|i| conformance::vcpu(g.vm.as_ref(), i))
        .collect();
    (g, vcpus)
}

#[test]
fn a_vcpu_and_its_gic_move_to_another_vm_and_go_on_counting() {
    let hv = kvm();
    let (g, mut vcpus) = guest_with_vcpus(&hv, 2, &[(CODE_ADDR, conformance::counter())]);
    for expected in 1..=5 {
        assert_eq!(conformance::next_count(vcpus[0].as_mut()), expected);
    }
    let vcpu_states: Vec<_> = vcpus.iter_mut().map(|v| v.save_state().unwrap()).collect();
    let vm_state = g.vm.save_state().unwrap();
    hv.check_restorable(&vcpu_states).unwrap();

    // A second VM with the first one's memory: it resumes after 5.
    let (other, mut other_vcpus) = guest_with_vcpus(&hv, 2, &[]);
    let mut page = vec![0u8; 4096];
    g.ram
        .memory()
        .read_slice(&mut page, GuestAddress(CODE_ADDR))
        .unwrap();
    other
        .ram
        .memory()
        .write_slice(&page, GuestAddress(CODE_ADDR))
        .unwrap();
    other.vm.restore_state(&vm_state).unwrap();
    for (vcpu, state) in other_vcpus.iter_mut().zip(&vcpu_states) {
        vcpu.restore_state(state).unwrap();
    }
    for expected in 6..=8 {
        assert_eq!(conformance::next_count(other_vcpus[0].as_mut()), expected);
    }
    // The original goes on by itself.
    assert_eq!(conformance::next_count(vcpus[0].as_mut()), 6);
}
