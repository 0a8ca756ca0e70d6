//! Tier 2 on arm64: tiny guest programs on the host's real `/dev/kvm`
//! (inside the arm64 test host here, whose KVM runs in VHE mode).
//!
//! Each test assembles a few A64 instructions, enters them at EL1 with
//! the MMU off (the vCPU's reset state), and checks the exits the VMM
//! would see.

#![cfg(target_arch = "aarch64")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use supermachine_hypervisor::aarch64::{PowerState, pstate, sys_regs};
use supermachine_hypervisor::{CpuState, Hypervisor, RamRegion, Vcpu, VcpuExit, Vm, VmSpec};
use supermachine_hypervisor_kvm::KvmHypervisor;
use supermachine_memory::{AARCH64_RAM_START, Bytes, GuestAddress, GuestRam, MemoryLayout};

/// Where the programs are loaded: the start of RAM.
const CODE_ADDR: u64 = AARCH64_RAM_START;
/// Where a second vCPU's program goes.
const SECONDARY_CODE_ADDR: u64 = AARCH64_RAM_START + 0x1000;
/// An address with nothing behind it: accesses exit to the VMM.
const MMIO_ADDR: u64 = 0x0a00_0000;

/// PSCI 0.2 function ids (SMC calling convention, through HVC).
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
const PSCI_CPU_ON: u64 = 0xc400_0003;

/// A64 encodings of the few instructions the programs use.
mod a64 {
    /// MOVZ/MOVK sequence loading a 64-bit constant into `xd`.
    pub fn mov(xd: u32, value: u64) -> Vec<u32> {
        let mut out = vec![0xd280_0000 | ((value & 0xffff) as u32) << 5 | xd];
        for hw in 1..4u32 {
            let part = ((value >> (16 * hw)) & 0xffff) as u32;
            if part != 0 {
                out.push(0xf280_0000 | hw << 21 | part << 5 | xd);
            }
        }
        out
    }
    /// STR Xt, [Xn].
    pub fn str_x(xt: u32, xn: u32) -> u32 {
        0xf900_0000 | xn << 5 | xt
    }
    /// LDR Wt, [Xn].
    pub fn ldr_w(wt: u32, xn: u32) -> u32 {
        0xb940_0000 | xn << 5 | wt
    }
    /// ADD Xd, Xn, Xm.
    pub fn add(xd: u32, xn: u32, xm: u32) -> u32 {
        0x8b00_0000 | xm << 16 | xn << 5 | xd
    }
    /// ADD Xd, Xn, #imm (12 bits).
    pub fn add_imm(xd: u32, xn: u32, imm: u32) -> u32 {
        0x9100_0000 | (imm & 0xfff) << 10 | xn << 5 | xd
    }
    /// MRS Xt, TPIDR_EL1.
    pub fn mrs_tpidr_el1(xt: u32) -> u32 {
        0xd538_d080 | xt
    }
    /// HVC #0: a hypervisor call (PSCI).
    pub const HVC: u32 = 0xd400_0002;
    /// B . : spin forever.
    pub const SPIN: u32 = 0x1400_0000;

    pub fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// `x0 = SYSTEM_OFF; hvc #0`.
fn power_off() -> Vec<u32> {
    let mut code = a64::mov(0, PSCI_SYSTEM_OFF);
    code.push(a64::HVC);
    code.push(a64::SPIN);
    code
}

struct Guest {
    vm: Arc<dyn Vm>,
    vcpus: Vec<Box<dyn Vcpu>>,
    _ram: GuestRam,
}

fn guest(vcpu_count: u32, programs: &[(u64, Vec<u32>)]) -> Guest {
    let hv = KvmHypervisor::new().expect("tier-2 tests need /dev/kvm");
    let layout = MemoryLayout::aarch64(16 << 20).unwrap();
    let ram = GuestRam::anonymous(&layout).unwrap();
    let regions = ram
        .host_mappings()
        .iter()
        // SAFETY: `ram` lives in the returned Guest next to the VM and
        // outlives it (fields drop in declaration order: vm, vcpus, ram).
        .map(|m| unsafe { RamRegion::new(m.guest_addr, m.len, m.host_addr) })
        .collect();
    let vm = hv
        .create_vm(&VmSpec {
            vcpu_count,
            ram: regions,
        })
        .unwrap();
    for (addr, code) in programs {
        ram.memory()
            .write_slice(&a64::bytes(code), GuestAddress(*addr))
            .unwrap();
    }
    let mut vcpus = Vec::new();
    for index in 0..vcpu_count {
        let mut vcpu = vm.create_vcpu(index).unwrap();
        if index == 0 {
            vcpu.set_cpu_state(&CpuState {
                x: [0; 4],
                pc: CODE_ADDR,
                pstate: pstate::MODE_EL1H | pstate::DAIF_MASKED,
            })
            .unwrap();
        }
        vcpus.push(vcpu);
    }
    Guest {
        vm,
        vcpus,
        _ram: ram,
    }
}

fn expect_write(vcpu: &mut dyn Vcpu) -> (u64, Vec<u8>) {
    match vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => (addr, data.to_vec()),
        other => panic!("expected an MMIO write, got {other:?}"),
    }
}

fn expect_power_off(vcpu: &mut dyn Vcpu) {
    match vcpu.run().unwrap() {
        VcpuExit::SystemPowerOff => {}
        other => panic!("expected PSCI SYSTEM_OFF, got {other:?}"),
    }
}

#[test]
fn a_guest_at_el1_powers_off_through_psci() {
    let code = power_off();
    let hvc_at = CODE_ADDR + 4 * code.iter().position(|&w| w == a64::HVC).unwrap() as u64;
    let mut g = guest(1, &[(CODE_ADDR, code)]);
    expect_power_off(g.vcpus[0].as_mut());
    // It ran from the entry the boot state gave, at EL1, up to the call.
    let regs = g.vcpus[0].regs().unwrap();
    assert_eq!(regs.pc, hvc_at + 4);
    assert_eq!(regs.pstate & 0xf, pstate::MODE_EL1H);
}

#[test]
fn mmio_outside_ram_exits_both_ways() {
    // w1 = *MMIO; x1 += 0x100; *(MMIO + 8) = x1; power off.
    let mut code = a64::mov(2, MMIO_ADDR);
    code.push(a64::ldr_w(1, 2));
    code.push(a64::add_imm(1, 1, 0x100));
    code.push(a64::add_imm(3, 2, 8));
    code.push(a64::str_x(1, 3));
    code.extend(power_off());
    let mut g = guest(1, &[(CODE_ADDR, code)]);
    let vcpu = g.vcpus[0].as_mut();
    match vcpu.run().unwrap() {
        VcpuExit::MmioRead { addr, data } => {
            assert_eq!(addr, MMIO_ADDR);
            assert_eq!(data.len(), 4);
            data.copy_from_slice(&0x23u32.to_le_bytes());
        }
        other => panic!("expected an MMIO read, got {other:?}"),
    }
    assert_eq!(
        expect_write(vcpu),
        (MMIO_ADDR + 8, 0x123u64.to_le_bytes().to_vec())
    );
    expect_power_off(vcpu);
}

#[test]
fn registers_round_trip_through_the_guest() {
    // The VMM sets x1, x2 and TPIDR_EL1; the guest writes x1 + x2 and
    // TPIDR_EL1 out; the VMM reads the sum back from x3 too.
    let mut code = a64::mov(4, MMIO_ADDR);
    code.push(a64::add(3, 1, 2));
    code.push(a64::str_x(3, 4));
    code.push(a64::mrs_tpidr_el1(5));
    code.push(a64::str_x(5, 4));
    code.extend(power_off());
    let mut g = guest(1, &[(CODE_ADDR, code)]);
    let vcpu = g.vcpus[0].as_mut();
    let mut regs = vcpu.regs().unwrap();
    assert_eq!(regs.pc, CODE_ADDR);
    assert_eq!(regs.v.len(), 32);
    regs.x[1] = 0x1111_0000_0000_0001;
    regs.x[2] = 0x0000_2222_0000_0002;
    regs.v[7] = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
    vcpu.set_regs(&regs).unwrap();
    vcpu.set_sys_reg(sys_regs::TPIDR_EL1, 0xfeed_f00d).unwrap();
    assert_eq!(vcpu.sys_reg(sys_regs::TPIDR_EL1).unwrap(), 0xfeed_f00d);
    assert_eq!(
        expect_write(vcpu),
        (MMIO_ADDR, 0x1111_2222_0000_0003u64.to_le_bytes().to_vec())
    );
    assert_eq!(
        expect_write(vcpu),
        (MMIO_ADDR, 0xfeed_f00du64.to_le_bytes().to_vec())
    );
    let after = vcpu.regs().unwrap();
    assert_eq!(after.x[3], 0x1111_2222_0000_0003);
    assert_eq!(after.v[7], regs.v[7]);
    // KVM gives each vCPU an MPIDR from its index; the device tree names
    // the same (see supermachine_boot::aarch64::mpidr).
    assert_eq!(
        vcpu.sys_reg(sys_regs::MPIDR_EL1).unwrap() & 0xff_00ff_ffff,
        0
    );
    expect_power_off(vcpu);
}

#[test]
fn a_second_vcpu_starts_with_psci_cpu_on() {
    // vCPU 0: CPU_ON(target MPIDR 1, entry, context 0x5a); report the
    // result; spin. vCPU 1 (powered off until then): report x0, the
    // context; spin. (Neither powers the machine off: SYSTEM_OFF stops
    // every vCPU, and could stop vCPU 0 before its report.)
    let mut boot = a64::mov(0, PSCI_CPU_ON);
    boot.extend(a64::mov(1, 1));
    boot.extend(a64::mov(2, SECONDARY_CODE_ADDR));
    boot.extend(a64::mov(3, 0x5a));
    boot.push(a64::HVC);
    boot.extend(a64::mov(4, MMIO_ADDR));
    boot.push(a64::str_x(0, 4));
    boot.push(a64::SPIN);
    let mut secondary = a64::mov(4, MMIO_ADDR + 0x10);
    secondary.push(a64::str_x(0, 4));
    secondary.push(a64::SPIN);
    let g = guest(2, &[(CODE_ADDR, boot), (SECONDARY_CODE_ADDR, secondary)]);
    // Each vCPU on its own thread, as the VMM runs them: the powered-off
    // one's run() waits in KVM until CPU_ON reaches it. A step that does
    // not come fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    let mut kickers = Vec::new();
    for (mut vcpu, name) in g.vcpus.into_iter().zip(["boot vCPU", "secondary"]) {
        let tx = tx.clone();
        kickers.push(vcpu.kicker());
        threads.push(std::thread::spawn(move || {
            let written = expect_write(vcpu.as_mut());
            tx.send((name, written)).unwrap();
            // It spins now; a kick gets it out.
            assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
        }));
    }
    let mut reports = std::collections::HashMap::new();
    for _ in 0..2 {
        let (name, data) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("only {:?} reported within 30 s", reports.keys()));
        reports.insert(name, data);
    }
    assert_eq!(
        reports["boot vCPU"],
        (MMIO_ADDR, 0u64.to_le_bytes().to_vec()),
        "CPU_ON reported failure"
    );
    assert_eq!(
        reports["secondary"],
        (MMIO_ADDR + 0x10, 0x5au64.to_le_bytes().to_vec())
    );
    for kick in &kickers {
        kick.kick();
    }
    for thread in threads {
        thread.join().unwrap();
    }
    drop(g.vm);
}

/// `x1 += 1; *MMIO = x1`, forever: each exit reports the count.
fn counter() -> Vec<u32> {
    let mut code = a64::mov(2, MMIO_ADDR);
    code.push(a64::add_imm(1, 1, 1));
    code.push(a64::str_x(1, 2));
    // B back to the ADD: two instructions up.
    code.push(0x1400_0000 | (-2i32 as u32 & 0x03ff_ffff));
    code
}

fn count(vcpu: &mut dyn Vcpu) -> u64 {
    let (addr, data) = expect_write(vcpu);
    assert_eq!(addr, MMIO_ADDR);
    u64::from_le_bytes(data.try_into().unwrap())
}

#[test]
fn a_vcpu_and_its_gic_move_to_another_vm_and_go_on_counting() {
    let mut g = guest(2, &[(CODE_ADDR, counter())]);
    for expected in 1..=5 {
        assert_eq!(count(g.vcpus[0].as_mut()), expected);
    }
    let vcpu_states: Vec<_> = g
        .vcpus
        .iter_mut()
        .map(|v| v.save_state().unwrap())
        .collect();
    let vm_state = g.vm.save_state().unwrap();
    assert_eq!(vcpu_states[0].power, PowerState::On);
    assert_eq!(vcpu_states[1].power, PowerState::Off, "never started");
    assert_eq!(vm_state.gic_cpus.len(), 2);
    assert!(
        vcpu_states[0]
            .sys_regs
            .iter()
            .any(|r| r.id == sys_regs::CNTVCT_EL0),
        "the virtual count is saved under its architectural name"
    );
    let hv = KvmHypervisor::new().unwrap();
    hv.check_restorable(&vcpu_states).unwrap();

    // A second VM with the first one's memory: it resumes after 5.
    let mut other = guest(2, &[]);
    let mut page = vec![0u8; 4096];
    g._ram
        .memory()
        .read_slice(&mut page, GuestAddress(CODE_ADDR))
        .unwrap();
    other
        ._ram
        .memory()
        .write_slice(&page, GuestAddress(CODE_ADDR))
        .unwrap();
    other.vm.restore_state(&vm_state).unwrap();
    for (vcpu, state) in other.vcpus.iter_mut().zip(&vcpu_states) {
        vcpu.restore_state(state).unwrap();
    }
    for expected in 6..=8 {
        assert_eq!(count(other.vcpus[0].as_mut()), expected);
    }
    // The original goes on by itself.
    assert_eq!(count(g.vcpus[0].as_mut()), 6);

    // A saved vCPU cannot become another one.
    let mut third = guest(2, &[]);
    assert!(third.vcpus[1].restore_state(&vcpu_states[0]).is_err());
}
