//! Tier 2: a vCPU's and VM's state saved from one KVM VM and restored into
//! another on the host's real `/dev/kvm`: the guest goes on exactly where
//! it stopped.

#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use supermachine_hypervisor::{Hypervisor, RamRegion, Vcpu, VcpuExit, Vm, VmSpec};
use supermachine_hypervisor_kvm::KvmHypervisor;
use supermachine_memory::{Bytes, GuestAddress, GuestRam, MemoryLayout};
use supermachine_test_guests as guests;

const RAM: u64 = 32 << 20;

/// A one-vCPU VM for checks that never run it.
const NO_RAM: VmSpec = VmSpec {
    vcpu_count: 1,
    ram: Vec::new(),
};

struct Guest {
    _vm: Arc<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    _ram: GuestRam,
}

fn vm_with(hv: &KvmHypervisor, ram: GuestRam) -> (Arc<dyn Vm>, GuestRam) {
    let regions = ram
        .host_mappings()
        .iter()
        // SAFETY: `ram` is returned next to the VM and kept alive with it.
        .map(|m| unsafe { RamRegion::new(m.guest_addr, m.len, m.host_addr) })
        .collect();
    let spec = VmSpec {
        vcpu_count: 1,
        ram: regions,
    };
    (hv.create_vm(&spec).unwrap(), ram)
}

/// Runs until `count` reports have been written; returns them.
fn reports(vcpu: &mut dyn Vcpu, count: usize) -> Vec<u64> {
    let mut line = String::new();
    let mut out = Vec::new();
    while out.len() < count {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut {
                port: guests::REPORT_PORT,
                data,
            } => {
                if data[0] == b'\n' {
                    out.push(u64::from_str_radix(&line, 16).unwrap());
                    line.clear();
                } else {
                    line.push(data[0] as char);
                }
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    out
}

#[test]
fn a_restored_vcpu_continues_where_it_stopped() {
    let hv = KvmHypervisor::new().expect("tier-2 tests need /dev/kvm");
    let layout = MemoryLayout::x86_64(RAM).unwrap();
    let (vm, ram) = vm_with(&hv, GuestRam::anonymous(&layout).unwrap());
    supermachine_boot::write_long_mode_tables(ram.memory()).unwrap();
    ram.memory()
        .write_slice(&guests::counting_code(12), GuestAddress(guests::LOAD_ADDR))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpu_state(&supermachine_boot::boot_cpu_state(guests::LOAD_ADDR))
        .unwrap();
    let mut original = Guest {
        _vm: vm.clone(),
        vcpu,
        _ram: ram,
    };
    let before = reports(original.vcpu.as_mut(), 5);
    assert_eq!(before, vec![1, 2, 3, 4, 5]);
    // Stop in the middle of a report: after the third digit of the sixth.
    for _ in 0..3 {
        assert!(matches!(
            original.vcpu.run().unwrap(),
            VcpuExit::IoOut {
                port: guests::REPORT_PORT,
                ..
            }
        ));
    }
    let vcpu_state = original.vcpu.save_state().unwrap();
    let vm_state = vm.save_state().unwrap();
    assert_eq!(vcpu_state.lapic.len(), 1024);
    assert!(
        vcpu_state.msrs.iter().any(|m| m.index == 0x10),
        "no TSC MSR saved"
    );
    assert!(!vcpu_state.cpuid.is_empty());

    // A copy of guest RAM in a new VM.
    let copy = GuestRam::anonymous(&layout).unwrap();
    let mut buf = vec![0u8; RAM as usize];
    original
        ._ram
        .memory()
        .read_slice(&mut buf, GuestAddress(0))
        .unwrap();
    copy.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    hv.check_restorable(std::slice::from_ref(&vcpu_state))
        .unwrap();
    let (vm2, copy) = vm_with(&hv, copy);
    vm2.restore_state(&vm_state).unwrap();
    let mut restored = vm2.create_vcpu(0).unwrap();
    restored.restore_state(&vcpu_state).unwrap();
    assert_eq!(restored.regs().unwrap(), vcpu_state.regs);

    // The rest of the sixth report, then the seventh, exactly.
    let mut tail = String::new();
    loop {
        match restored.run().unwrap() {
            VcpuExit::IoOut {
                port: guests::REPORT_PORT,
                data,
            } if data[0] == b'\n' => break,
            VcpuExit::IoOut {
                port: guests::REPORT_PORT,
                data,
            } => tail.push(data[0] as char),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(
        tail, "00006",
        "the restored guest finished the sixth report"
    );
    assert_eq!(reports(restored.as_mut(), 2), vec![7, 8]);
    // The original is unaffected and goes on from its own state.
    let mut rest = String::new();
    loop {
        match original.vcpu.run().unwrap() {
            VcpuExit::IoOut { data, .. } if data[0] == b'\n' => break,
            VcpuExit::IoOut { data, .. } => rest.push(data[0] as char),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(rest, "00006");
    drop(copy);
}

#[test]
fn a_snapshot_from_another_cpu_model_is_refused() {
    let hv = KvmHypervisor::new().expect("tier-2 tests need /dev/kvm");
    let vm = hv.create_vm(&NO_RAM).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut state = vcpu.save_state().unwrap();
    hv.check_restorable(std::slice::from_ref(&state)).unwrap();
    let leaf1 = state.cpuid.iter_mut().find(|e| e.function == 1).unwrap();
    leaf1.eax ^= 0x10; // another model
    let e = hv
        .check_restorable(std::slice::from_ref(&state))
        .unwrap_err();
    assert!(e.to_string().contains("the snapshot was taken on a"), "{e}");
}

#[test]
fn a_vcpu_using_features_this_host_lacks_is_refused() {
    let hv = KvmHypervisor::new().expect("tier-2 tests need /dev/kvm");
    let vm = hv.create_vm(&NO_RAM).unwrap();
    let mut state = vm.create_vcpu(0).unwrap().save_state().unwrap();
    let leaf7 = state
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .unwrap();
    // OSPKE mirrors the guest's CR4.PKE (a booted Linux sets it): not a
    // feature the host must have.
    leaf7.ecx |= 1 << 4;
    let mut os_bits_only = state.clone();
    if let Some(leaf1) = os_bits_only.cpuid.iter_mut().find(|e| e.function == 1) {
        leaf1.ecx |= 1 << 27; // OSXSAVE, the same for CR4.OSXSAVE
    }
    let vm1 = hv.create_vm(&NO_RAM).unwrap();
    let mut vcpu1 = vm1.create_vcpu(0).unwrap();
    let checked = vcpu1.restore_state(&os_bits_only);
    assert!(
        !checked
            .as_ref()
            .is_err_and(|e| e.to_string().contains("CPU features this host lacks")),
        "{checked:?}"
    );
    // A feature this host does not give its guests.
    let leaf7 = state
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .unwrap();
    let absent = (0..32)
        .filter(|b| *b != 4)
        .find(|b| leaf7.ecx & (1 << b) == 0)
        .unwrap();
    leaf7.ecx |= 1 << absent;
    let vm2 = hv.create_vm(&NO_RAM).unwrap();
    let e = vm2
        .create_vcpu(0)
        .unwrap()
        .restore_state(&state)
        .unwrap_err();
    assert!(
        e.to_string().contains("CPU features this host lacks"),
        "{e}"
    );
}
