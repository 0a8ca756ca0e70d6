//! arm64: a few A64 instructions entered at EL1 with the MMU off (the
//! vCPU's reset state).

use std::sync::Arc;
use std::time::Duration;

use supermachine_hypervisor::aarch64::{PowerState, mpidr, pstate, sys_regs};
use supermachine_hypervisor::{CpuState, Hypervisor, Vcpu, VcpuExit, Vm};
use supermachine_memory::{AARCH64_RAM_START, Bytes, GuestAddress, GuestRam, MemoryLayout};

/// Where the programs are loaded: the start of RAM.
pub const CODE_ADDR: u64 = AARCH64_RAM_START;
/// Where a second vCPU's program goes.
pub const SECONDARY_CODE_ADDR: u64 = AARCH64_RAM_START + 0x1000;
/// An address with nothing behind it: accesses exit to the VMM.
pub const MMIO_ADDR: u64 = 0x0a00_0000;

/// PSCI 0.2 function ids (SMC calling convention, through HVC).
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
const PSCI_CPU_ON: u64 = 0xc400_0003;

/// A64 encodings of the few instructions the programs use.
pub mod a64 {
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

    /// The words as little-endian bytes.
    pub fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// `x0 = SYSTEM_OFF; hvc #0`.
pub fn power_off() -> Vec<u32> {
    let mut code = a64::mov(0, PSCI_SYSTEM_OFF);
    code.push(a64::HVC);
    code.push(a64::SPIN);
    code
}

/// A VM with 16 MiB of RAM holding the programs. Fields drop in order:
/// the VM before the RAM it maps.
#[derive(Debug)]
pub struct Guest {
    /// The VM.
    pub vm: Arc<dyn Vm>,
    /// Its RAM.
    pub ram: GuestRam,
}

/// A VM of `vcpu_count` vCPUs (none created yet) with `programs` loaded.
pub fn guest(hv: &dyn Hypervisor, vcpu_count: u32, programs: &[(u64, Vec<u32>)]) -> Guest {
    let layout = MemoryLayout::aarch64(16 << 20).unwrap();
    let ram = GuestRam::anonymous(&layout).unwrap();
    // SAFETY: `ram` lives in the returned Guest next to the VM and
    // outlives it (fields drop in declaration order: vm, then ram).
    let vm = unsafe { crate::vm_over(hv, &ram, vcpu_count) };
    for (addr, code) in programs {
        ram.memory()
            .write_slice(&a64::bytes(code), GuestAddress(*addr))
            .unwrap();
    }
    Guest { vm, ram }
}

/// Creates vCPU `index` on this thread; vCPU 0 gets the boot state
/// (EL1, every exception masked, at [`CODE_ADDR`]).
pub fn vcpu(vm: &dyn Vm, index: u32) -> Box<dyn Vcpu> {
    let mut vcpu = vm.create_vcpu(index).unwrap();
    if index == 0 {
        vcpu.set_cpu_state(&CpuState {
            x: [0; 4],
            pc: CODE_ADDR,
            pstate: pstate::MODE_EL1H | pstate::DAIF_MASKED,
        })
        .unwrap();
    }
    vcpu
}

/// Runs `vcpu` to an MMIO write; returns its address and data.
pub fn expect_write(vcpu: &mut dyn Vcpu) -> (u64, Vec<u8>) {
    match vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => (addr, data.to_vec()),
        other => panic!("expected an MMIO write, got {other:?}"),
    }
}

/// Runs `vcpu` to PSCI SYSTEM_OFF.
pub fn expect_power_off(vcpu: &mut dyn Vcpu) {
    match vcpu.run().unwrap() {
        VcpuExit::SystemPowerOff => {}
        other => panic!("expected PSCI SYSTEM_OFF, got {other:?}"),
    }
}

/// The guest runs from its entry at EL1 to a PSCI SYSTEM_OFF, which is a
/// power-off exit.
pub fn a_guest_at_el1_powers_off_through_psci(hv: &dyn Hypervisor) {
    let code = power_off();
    let hvc_at = CODE_ADDR + 4 * code.iter().position(|&w| w == a64::HVC).unwrap() as u64;
    let g = guest(hv, 1, &[(CODE_ADDR, code)]);
    let mut vcpu = vcpu(g.vm.as_ref(), 0);
    expect_power_off(vcpu.as_mut());
    // It ran from the entry the boot state gave, at EL1, up to the call.
    let regs = vcpu.regs().unwrap();
    assert_eq!(regs.pc, hvc_at + 4);
    assert_eq!(regs.pstate & 0xf, pstate::MODE_EL1H);
}

/// A load and a store outside RAM exit; the load gets what the VMM
/// answered.
pub fn mmio_outside_ram_exits_both_ways(hv: &dyn Hypervisor) {
    // w1 = *MMIO; x1 += 0x100; *(MMIO + 8) = x1; power off.
    let mut code = a64::mov(2, MMIO_ADDR);
    code.push(a64::ldr_w(1, 2));
    code.push(a64::add_imm(1, 1, 0x100));
    code.push(a64::add_imm(3, 2, 8));
    code.push(a64::str_x(1, 3));
    code.extend(power_off());
    let g = guest(hv, 1, &[(CODE_ADDR, code)]);
    let mut vcpu = vcpu(g.vm.as_ref(), 0);
    match vcpu.run().unwrap() {
        VcpuExit::MmioRead { addr, data } => {
            assert_eq!(addr, MMIO_ADDR);
            assert_eq!(data.len(), 4);
            data.copy_from_slice(&0x23u32.to_le_bytes());
        }
        other => panic!("expected an MMIO read, got {other:?}"),
    }
    assert_eq!(
        expect_write(vcpu.as_mut()),
        (MMIO_ADDR + 8, 0x123u64.to_le_bytes().to_vec())
    );
    expect_power_off(vcpu.as_mut());
}

/// Core, SIMD and system registers the VMM sets are what the guest
/// computes with, and what it leaves is what the VMM reads.
pub fn registers_round_trip_through_the_guest(hv: &dyn Hypervisor) {
    // The VMM sets x1, x2 and TPIDR_EL1; the guest writes x1 + x2 and
    // TPIDR_EL1 out; the VMM reads the sum back from x3 too.
    let mut code = a64::mov(4, MMIO_ADDR);
    code.push(a64::add(3, 1, 2));
    code.push(a64::str_x(3, 4));
    code.push(a64::mrs_tpidr_el1(5));
    code.push(a64::str_x(5, 4));
    code.extend(power_off());
    let g = guest(hv, 1, &[(CODE_ADDR, code)]);
    let mut vcpu = vcpu(g.vm.as_ref(), 0);
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
        expect_write(vcpu.as_mut()),
        (MMIO_ADDR, 0x1111_2222_0000_0003u64.to_le_bytes().to_vec())
    );
    assert_eq!(
        expect_write(vcpu.as_mut()),
        (MMIO_ADDR, 0xfeed_f00du64.to_le_bytes().to_vec())
    );
    let after = vcpu.regs().unwrap();
    assert_eq!(after.x[3], 0x1111_2222_0000_0003);
    assert_eq!(after.v[7], regs.v[7]);
    // Every backend gives vCPU n the affinity the device tree names.
    assert_eq!(
        vcpu.sys_reg(sys_regs::MPIDR_EL1).unwrap() & 0xff_00ff_ffff,
        u64::from(mpidr(0))
    );
    expect_power_off(vcpu.as_mut());
}

/// vCPU 1, powered off, starts at the entry point vCPU 0 gives PSCI
/// CPU_ON, with the context in X0; each vCPU is created on, and runs on,
/// a thread of its own, as the VMM runs them.
pub fn a_second_vcpu_starts_with_psci_cpu_on(hv: &dyn Hypervisor) {
    // vCPU 0: CPU_ON(target MPIDR 1, entry, context 0x5a); report the
    // result; spin. vCPU 1 (powered off until then): report x0, the
    // context; spin. (Neither powers the machine off: SYSTEM_OFF stops
    // every vCPU, and could stop vCPU 0 before its report.)
    let mut boot = a64::mov(0, PSCI_CPU_ON);
    boot.extend(a64::mov(1, u64::from(mpidr(1))));
    boot.extend(a64::mov(2, SECONDARY_CODE_ADDR));
    boot.extend(a64::mov(3, 0x5a));
    boot.push(a64::HVC);
    boot.extend(a64::mov(4, MMIO_ADDR));
    boot.push(a64::str_x(0, 4));
    boot.push(a64::SPIN);
    let mut secondary = a64::mov(4, MMIO_ADDR + 0x10);
    secondary.push(a64::str_x(0, 4));
    secondary.push(a64::SPIN);
    let g = guest(
        hv,
        2,
        &[(CODE_ADDR, boot), (SECONDARY_CODE_ADDR, secondary)],
    );
    // The powered-off vCPU's run() waits until CPU_ON reaches it. A step
    // that does not come fails the test instead of hanging it.
    // Both exist before either runs, as in the VMM.
    let (tx, rx) = std::sync::mpsc::channel();
    let made = Arc::new(std::sync::Barrier::new(2));
    let mut threads = Vec::new();
    for (index, name) in [(0, "boot vCPU"), (1, "secondary")] {
        let (tx, vm, made) = (tx.clone(), g.vm.clone(), made.clone());
        threads.push(std::thread::spawn(move || {
            let mut vcpu = vcpu(vm.as_ref(), index);
            tx.send(Report::Kicker(vcpu.kicker())).unwrap();
            made.wait();
            let written = expect_write(vcpu.as_mut());
            tx.send(Report::Wrote(name, written)).unwrap();
            // It spins now; a kick gets it out.
            assert!(matches!(vcpu.run().unwrap(), VcpuExit::Interrupted));
        }));
    }
    let mut kickers = Vec::new();
    let mut reports = std::collections::HashMap::new();
    while reports.len() < 2 || kickers.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Report::Kicker(k)) => kickers.push(k),
            Ok(Report::Wrote(name, data)) => {
                reports.insert(name, data);
            }
            Err(_) => panic!("only {:?} reported within 30 s", reports.keys()),
        }
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
}

/// What a vCPU thread tells the test.
enum Report {
    Kicker(Arc<dyn supermachine_hypervisor::VcpuKicker>),
    Wrote(&'static str, (u64, Vec<u8>)),
}

/// `x1 += 1; *MMIO = x1`, forever: each exit reports the count.
pub fn counter() -> Vec<u32> {
    let mut code = a64::mov(2, MMIO_ADDR);
    code.push(a64::add_imm(1, 1, 1));
    code.push(a64::str_x(1, 2));
    // B back to the ADD: two instructions up.
    code.push(0x1400_0000 | (-2i32 as u32 & 0x03ff_ffff));
    code
}

/// Runs `vcpu` to the [`counter`]'s next report.
pub fn next_count(vcpu: &mut dyn Vcpu) -> u64 {
    let (addr, data) = expect_write(vcpu);
    assert_eq!(addr, MMIO_ADDR);
    u64::from_le_bytes(data.try_into().unwrap())
}

/// A counting guest's vCPUs and GIC saved, its VM gone, and all of it
/// restored into a new VM with the old RAM: it counts on from where it
/// stopped. One VM at a time, every vCPU made, saved and restored on this
/// thread, so the round trip is the same on Hypervisor.framework.
pub fn a_vm_saved_and_gone_resumes_in_a_new_one(hv: &dyn Hypervisor) {
    let (ram, vcpu_states, vm_state) = {
        let g = guest(hv, 2, &[(CODE_ADDR, counter())]);
        let mut vcpus: Vec<_> = (0..2).map(|i| vcpu(g.vm.as_ref(), i)).collect();
        for expected in 1..=5 {
            assert_eq!(next_count(vcpus[0].as_mut()), expected);
        }
        let vcpu_states: Vec<_> = vcpus.iter_mut().map(|v| v.save_state().unwrap()).collect();
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
        let mut ram = vec![0u8; 4096];
        g.ram
            .memory()
            .read_slice(&mut ram, GuestAddress(CODE_ADDR))
            .unwrap();
        // The vCPUs go before their VM.
        drop(vcpus);
        (ram, vcpu_states, vm_state)
    };
    hv.check_restorable(&vcpu_states).unwrap();
    let g = guest(hv, 2, &[]);
    g.ram
        .memory()
        .write_slice(&ram, GuestAddress(CODE_ADDR))
        .unwrap();
    let mut vcpus: Vec<_> = (0..2).map(|i| vcpu(g.vm.as_ref(), i)).collect();
    // A saved vCPU cannot become another one.
    assert!(vcpus[1].restore_state(&vcpu_states[0]).is_err());
    g.vm.restore_state(&vm_state).unwrap();
    for (vcpu, state) in vcpus.iter_mut().zip(&vcpu_states) {
        vcpu.restore_state(state).unwrap();
    }
    for expected in 6..=8 {
        assert_eq!(next_count(vcpus[0].as_mut()), expected);
    }
}

/// Defines one `#[test]` per program of this module, each running it on
/// the backend `$hypervisor` evaluates to (once per test, on the test's
/// own thread): `aarch64_programs!(HvfHypervisor::new().expect("..."));`.
#[macro_export]
macro_rules! aarch64_programs {
    ($hypervisor:expr) => {
        $crate::tests_for_programs!(aarch64, $hypervisor;
            a_guest_at_el1_powers_off_through_psci,
            mmio_outside_ram_exits_both_ways,
            registers_round_trip_through_the_guest,
            a_second_vcpu_starts_with_psci_cpu_on,
            a_vm_saved_and_gone_resumes_in_a_new_one
        );
    };
}
