//! x86_64: a few instructions, assembled with `iced-x86`, entered in
//! 64-bit mode with the boot crate's page tables and boot state, checking
//! the exits a VMM sees.

use std::sync::Arc;
use std::time::Duration;

use iced_x86::code_asm::*;
use supermachine_hypervisor::{
    Datamatch, Hypervisor, IoAddress, MsrEntry, Vcpu, VcpuExit, Vm, VmSpec,
};
use supermachine_memory::{Bytes, GuestAddress, GuestRam, MemoryLayout};
use supermachine_test_guests as guests;

/// Where the programs are loaded.
pub const CODE_ADDR: u64 = 0x10_0000;
/// The port a program writes to when it is done.
pub const DONE_PORT: u16 = 0xf4;
/// An address with nothing behind it: accesses exit to the VMM.
pub const MMIO_ADDR: u64 = 0xd000_0000;

/// A VM with one vCPU about to run a program. Fields drop in order: the
/// VM before the RAM it maps.
struct Guest {
    vm: Arc<dyn Vm>,
    /// In 64-bit mode at the program.
    vcpu: Box<dyn Vcpu>,
    ram: GuestRam,
}

fn assemble(build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a).unwrap();
    a.assemble(CODE_ADDR).unwrap()
}

fn guest_with_ram(hv: &dyn Hypervisor, code: &[u8], ram_bytes: u64) -> Guest {
    let layout = MemoryLayout::x86_64(ram_bytes).unwrap();
    let ram = GuestRam::anonymous(&layout).unwrap();
    // SAFETY: `ram` lives in the returned Guest next to the VM and
    // outlives it (fields drop in declaration order: vm, vcpu, ram).
    let vm = unsafe { crate::vm_over(hv, &ram, 1) };
    supermachine_boot::write_long_mode_tables(ram.memory()).unwrap();
    ram.memory()
        .write_slice(code, GuestAddress(CODE_ADDR))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpu_state(&supermachine_boot::boot_cpu_state(CODE_ADDR))
        .unwrap();
    Guest { vm, vcpu, ram }
}

fn guest(hv: &dyn Hypervisor, code: &[u8]) -> Guest {
    guest_with_ram(hv, code, 16 << 20)
}

/// Runs until the guest writes to DONE_PORT, collecting port writes.
fn run_to_done(vcpu: &mut dyn Vcpu) -> Vec<(u16, Vec<u8>)> {
    let mut outs = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut {
                port: DONE_PORT, ..
            } => return outs,
            VcpuExit::IoOut { port, data } => outs.push((port, data.to_vec())),
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

fn done(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, DONE_PORT as u32)?;
    a.out(dx, al)
}

/// `OUT` of a byte and of a dword each exit with port and data.
pub fn port_writes_exit_with_their_data(hv: &dyn Hypervisor) {
    let code = assemble(|a| {
        a.mov(dx, 0x3f8u32)?;
        for b in b"hi\n" {
            a.mov(al, *b as u32)?;
            a.out(dx, al)?;
        }
        a.mov(eax, 0xdead_beefu32)?;
        a.mov(dx, 0x510u32)?;
        a.out(dx, eax)?;
        done(a)
    });
    let mut g = guest(hv, &code);
    let outs = run_to_done(g.vcpu.as_mut());
    let serial: Vec<u8> = outs
        .iter()
        .filter(|(p, _)| *p == 0x3f8)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(serial, b"hi\n");
    assert_eq!(
        outs.last().unwrap(),
        &(0x510, 0xdead_beefu32.to_le_bytes().to_vec())
    );
}

/// `IN` exits, and the guest computes with what the VMM answered.
pub fn port_reads_return_what_the_vmm_supplies(hv: &dyn Hypervisor) {
    let code = assemble(|a| {
        a.mov(dx, 0x60u32)?;
        a.in_(al, dx)?;
        a.add(al, 1)?;
        a.mov(dx, 0x511u32)?;
        a.out(dx, al)?;
        done(a)
    });
    let mut g = guest(hv, &code);
    match g.vcpu.run().unwrap() {
        VcpuExit::IoIn { port: 0x60, data } => {
            assert_eq!(data.len(), 1);
            data[0] = 41;
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert_eq!(run_to_done(g.vcpu.as_mut()), vec![(0x511, vec![42])]);
}

/// A load and a store outside RAM exit as MMIO, the load taking the VMM's answer.
pub fn mmio_outside_ram_exits_both_ways(hv: &dyn Hypervisor) {
    let code = assemble(|a| {
        a.mov(rbx, MMIO_ADDR)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.add(eax, 0x100)?;
        a.mov(dword_ptr(rbx + 8), eax)?;
        done(a)
    });
    let mut g = guest(hv, &code);
    match g.vcpu.run().unwrap() {
        VcpuExit::MmioRead { addr, data } => {
            assert_eq!((addr, data.len()), (MMIO_ADDR, 4));
            data.copy_from_slice(&0x23u32.to_le_bytes());
        }
        other => panic!("unexpected exit {other:?}"),
    }
    match g.vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!(addr, MMIO_ADDR + 8);
            assert_eq!(data, 0x123u32.to_le_bytes());
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert!(run_to_done(g.vcpu.as_mut()).is_empty());
}

/// General registers set before a run are what the guest computes with; the boot state is 64-bit with the boot crate's page tables.
pub fn registers_round_trip_and_guest_computes_with_them(hv: &dyn Hypervisor) {
    let code = assemble(|a| {
        a.add(rax, rbx)?;
        a.imul_2(rax, rcx)?;
        done(a)
    });
    let mut g = guest(hv, &code);
    let mut regs = g.vcpu.regs().unwrap();
    regs.rax = 5;
    regs.rbx = 7;
    regs.rcx = 0x1_0000_0000;
    regs.r15 = 0x1234_5678_9abc_def0;
    g.vcpu.set_regs(&regs).unwrap();
    assert_eq!(g.vcpu.regs().unwrap(), regs);
    let sregs = g.vcpu.special_regs().unwrap();
    assert_eq!(sregs.cr3, supermachine_boot::layout::PML4_ADDR);
    assert!(sregs.cs.l);
    run_to_done(g.vcpu.as_mut());
    let after = g.vcpu.regs().unwrap();
    assert_eq!(after.rax, 12 * 0x1_0000_0000);
    assert_eq!(after.r15, 0x1234_5678_9abc_def0);
}

/// MSRs set are read back; an MSR that does not exist is refused, not dropped.
pub fn msrs_round_trip(hv: &dyn Hypervisor) {
    let code = assemble(done);
    let mut g = guest(hv, &code);
    const LSTAR: u32 = 0xc000_0082;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    g.vcpu
        .set_msrs(&[
            MsrEntry {
                index: LSTAR,
                data: 0xffff_ffff_8100_0000,
            },
            MsrEntry {
                index: KERNEL_GS_BASE,
                data: 0x4242,
            },
        ])
        .unwrap();
    let read = g.vcpu.msrs(&[LSTAR, KERNEL_GS_BASE]).unwrap();
    assert_eq!(read[0].data, 0xffff_ffff_8100_0000);
    assert_eq!(read[1].data, 0x4242);
    // An MSR that does not exist is refused, not silently dropped.
    assert!(
        g.vcpu
            .set_msrs(&[MsrEntry {
                index: 0x4000_1234,
                data: 1
            }])
            .is_err()
    );
}

/// Guest stores land in RAM below the MMIO gap and above 4 GiB.
pub fn guest_writes_reach_both_memory_slots(hv: &dyn Hypervisor) {
    // 4 GiB + 16 MiB of RAM: slot 0 below the MMIO gap, slot 1 above 4 GiB.
    // Only touched pages are ever allocated.
    let high = 0x1_0000_1000u64;
    let code = assemble(|a| {
        a.mov(rbx, 0x20_0000u64)?;
        a.mov(qword_ptr(rbx), 0x1111_2222)?;
        a.mov(rbx, high)?;
        a.mov(rax, 0x5555_6666_7777_8888u64)?;
        a.mov(qword_ptr(rbx), rax)?;
        done(a)
    });
    // The boot tables identity-map 4 GiB; map the 5th GiB too, through a
    // fifth page directory right after the other four.
    let mut g = guest_with_ram(hv, &code, (3 << 30) + (1 << 30) + (16 << 20));
    let pdpt = supermachine_boot::layout::PDPT_ADDR;
    let pd = supermachine_boot::layout::PD_ADDR + 4 * 0x1000;
    let mem = g.ram.memory();
    mem.write_obj(pd | 0b11, GuestAddress(pdpt + 4 * 8))
        .unwrap();
    mem.write_obj((4u64 << 30) | 0b11 | (1 << 7), GuestAddress(pd))
        .unwrap();
    run_to_done(g.vcpu.as_mut());
    let low: u64 = g.ram.memory().read_obj(GuestAddress(0x20_0000)).unwrap();
    let hi: u64 = g.ram.memory().read_obj(GuestAddress(high)).unwrap();
    assert_eq!(low, 0x1111_2222);
    assert_eq!(hi, 0x5555_6666_7777_8888);
}

/// A write matching a notifier is counted without an exit; one that does not match exits.
pub fn notifier_write_is_counted_without_an_exit(hv: &dyn Hypervisor) {
    let code = assemble(|a| {
        a.mov(rbx, MMIO_ADDR)?;
        a.mov(dword_ptr(rbx), 3)?; // matches: no exit
        a.mov(dword_ptr(rbx), 3)?; // matches: no exit
        a.mov(dword_ptr(rbx), 4)?; // does not match: exits
        done(a)
    });
    let mut g = guest(hv, &code);
    let notifier =
        g.vm.io_notifier(IoAddress::Mmio(MMIO_ADDR), Datamatch::U32(3))
            .unwrap();
    assert_eq!(notifier.consume().unwrap(), 0);
    match g.vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => {
            assert_eq!((addr, data), (MMIO_ADDR, &4u32.to_le_bytes()[..]));
        }
        other => panic!("unexpected exit {other:?}"),
    }
    run_to_done(g.vcpu.as_mut());
    assert_eq!(notifier.consume().unwrap(), 2);
}

/// A kick, before or during a run, ends it with `Interrupted`, and the guest resumes after.
pub fn kick_interrupts_a_spinning_vcpu_and_it_resumes(hv: &dyn Hypervisor) {
    let code = assemble(|a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.inc(rax)?;
        a.jmp(spin)
    });
    let mut g = guest(hv, &code);
    // A kick before run() is not lost.
    let kicker = g.vcpu.kicker();
    kicker.kick();
    assert!(matches!(g.vcpu.run().unwrap(), VcpuExit::Interrupted));
    // A kick while the guest spins.
    for _ in 0..3 {
        let k = kicker.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            k.kick();
        });
        assert!(matches!(g.vcpu.run().unwrap(), VcpuExit::Interrupted));
        t.join().unwrap();
    }
    let spun = g.vcpu.regs().unwrap().rax;
    assert!(spun > 0, "the guest ran between kicks");
}

/// A triple fault is a `Shutdown` exit.
pub fn triple_fault_is_a_shutdown_exit(hv: &dyn Hypervisor) {
    // With a zero-limit IDT any exception escalates to a triple fault.
    let code = assemble(|a| a.ud2());
    let mut g = guest(hv, &code);
    let mut sregs = g.vcpu.special_regs().unwrap();
    sregs.idt.limit = 0;
    g.vcpu.set_special_regs(&sregs).unwrap();
    assert!(matches!(g.vcpu.run().unwrap(), VcpuExit::Shutdown));
}

/// Interrupt lines trigger; vCPU indices and counts out of range are refused.
pub fn interrupt_lines_and_vcpu_indices_are_validated(hv: &dyn Hypervisor) {
    let code = assemble(done);
    let g = guest(hv, &code);
    let line = g.vm.interrupt_line(4).unwrap();
    line.trigger().unwrap();
    assert!(g.vm.create_vcpu(1).is_err(), "only one vCPU was asked for");
    for vcpu_count in [0, 100_000] {
        let spec = VmSpec {
            vcpu_count,
            ram: Vec::new(),
        };
        assert!(hv.create_vm(&spec).is_err(), "{vcpu_count} vCPUs");
    }
}

/// The interrupt line [`an_interrupt_line_reaches_the_guest_through_the_io_apic`] raises.
const LINE: u32 = 4;
/// The vector the guest routes it to.
const VECTOR: u8 = 0x40;
/// Where that program's interrupt handler goes.
const HANDLER_ADDR: u64 = CODE_ADDR + 0x1000;
/// Where its IDT goes.
const IDT_ADDR: u64 = 0x30_0000;
const LAPIC_ADDR: u64 = 0xfee0_0000;
const IO_APIC_ADDR: u64 = 0xfec0_0000;

/// An interrupt line the guest routed through the I/O APIC to its local
/// APIC wakes it from `hlt` into its handler, which acknowledges it: the
/// path every device interrupt takes (KVM's in-kernel chips, or WHP's
/// local APIC behind the backend's own I/O APIC).
pub fn an_interrupt_line_reaches_the_guest_through_the_io_apic(hv: &dyn Hypervisor) {
    const READY_PORT: u16 = 0x521;
    const HANDLED_PORT: u16 = 0x520;
    let code = assemble(|a| {
        // The local APIC, software-enabled (spurious vector 0xff), with
        // LINT0 masked: KVM starts the boot vCPU's in ExtINT (virtual
        // wire), which would pass the legacy PIC's interrupts, and the
        // line is wired to the PIC too.
        a.mov(rbx, LAPIC_ADDR + 0xf0)?;
        a.mov(dword_ptr(rbx), 0x1ff)?;
        a.mov(rbx, LAPIC_ADDR + 0x350)?;
        a.mov(dword_ptr(rbx), 0x1_0000)?;
        // I/O APIC redirection entry LINE: to APIC 0, then fixed delivery
        // of VECTOR, edge, unmasked.
        a.mov(rbx, IO_APIC_ADDR)?;
        a.mov(dword_ptr(rbx), (0x10 + 2 * LINE + 1) as i32)?;
        a.mov(dword_ptr(rbx + 0x10), 0)?;
        a.mov(dword_ptr(rbx), (0x10 + 2 * LINE) as i32)?;
        a.mov(dword_ptr(rbx + 0x10), i32::from(VECTOR))?;
        a.mov(dx, u32::from(READY_PORT))?;
        a.out(dx, al)?;
        // `sti; hlt` loses no interrupt: one pending wakes the `hlt`.
        a.sti()?;
        a.hlt()?;
        done(a)
    });
    let handler = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(dx, u32::from(HANDLED_PORT)).unwrap();
        a.mov(al, u32::from(VECTOR)).unwrap();
        a.out(dx, al).unwrap();
        // End of interrupt.
        a.mov(rbx, LAPIC_ADDR + 0xb0).unwrap();
        a.mov(dword_ptr(rbx), 0).unwrap();
        a.iretq().unwrap();
        a.assemble(HANDLER_ADDR).unwrap()
    };
    let mut g = guest(hv, &code);
    let mem = g.ram.memory();
    mem.write_slice(&handler, GuestAddress(HANDLER_ADDR))
        .unwrap();
    // A 64-bit interrupt gate for VECTOR in an otherwise empty IDT.
    let mut sregs = g.vcpu.special_regs().unwrap();
    let gate_low = (HANDLER_ADDR & 0xffff)
        | u64::from(sregs.cs.selector) << 16
        | 0x8e << 40
        | ((HANDLER_ADDR >> 16) & 0xffff) << 48;
    let gate = IDT_ADDR + 16 * u64::from(VECTOR);
    mem.write_obj(gate_low, GuestAddress(gate)).unwrap();
    mem.write_obj(HANDLER_ADDR >> 32, GuestAddress(gate + 8))
        .unwrap();
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    g.vcpu.set_special_regs(&sregs).unwrap();
    let line = g.vm.interrupt_line(LINE).unwrap();

    match g.vcpu.run().unwrap() {
        VcpuExit::IoOut {
            port: READY_PORT, ..
        } => {}
        other => panic!("unexpected exit {other:?}"),
    }
    // Raised while the guest waits in `hlt`.
    let raiser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        line.trigger().unwrap();
    });
    match g.vcpu.run().unwrap() {
        VcpuExit::IoOut {
            port: HANDLED_PORT,
            data,
        } => assert_eq!(data, [VECTOR]),
        other => panic!("unexpected exit {other:?}"),
    }
    raiser.join().unwrap();
    assert!(run_to_done(g.vcpu.as_mut()).is_empty());
}

// ---- Saving and restoring state.

/// The counting guest's RAM.
const STATE_RAM: u64 = 32 << 20;

/// A one-vCPU VM for checks that never run it.
const NO_RAM: VmSpec = VmSpec {
    vcpu_count: 1,
    ram: Vec::new(),
};

/// A guest kept running while its state is restored elsewhere. Fields
/// drop in order: the VM before the RAM it maps.
struct RunningGuest {
    _vm: Arc<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    ram: GuestRam,
}

fn vm_with(hv: &dyn Hypervisor, ram: GuestRam) -> (Arc<dyn Vm>, GuestRam) {
    // SAFETY: `ram` is returned next to the VM, and every caller keeps
    // it alive with the VM.
    (unsafe { crate::vm_over(hv, &ram, 1) }, ram)
}

/// Runs until `count` reports have been written; returns them.
fn counting_reports(vcpu: &mut dyn Vcpu, count: usize) -> Vec<u64> {
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

/// A vCPU's and VM's state saved in the middle of a report (the counting
/// guest's) and restored into a second VM with a copy of RAM: the copy
/// finishes that report and goes on, and the original is unaffected.
pub fn a_restored_vcpu_continues_where_it_stopped(hv: &dyn Hypervisor) {
    let layout = MemoryLayout::x86_64(STATE_RAM).unwrap();
    let (vm, ram) = vm_with(hv, GuestRam::anonymous(&layout).unwrap());
    supermachine_boot::write_long_mode_tables(ram.memory()).unwrap();
    ram.memory()
        .write_slice(&guests::counting_code(12), GuestAddress(guests::LOAD_ADDR))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpu_state(&supermachine_boot::boot_cpu_state(guests::LOAD_ADDR))
        .unwrap();
    let mut original = RunningGuest {
        _vm: vm.clone(),
        vcpu,
        ram,
    };
    let before = counting_reports(original.vcpu.as_mut(), 5);
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
    let mut buf = vec![0u8; STATE_RAM as usize];
    original
        .ram
        .memory()
        .read_slice(&mut buf, GuestAddress(0))
        .unwrap();
    copy.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    hv.check_restorable(std::slice::from_ref(&vcpu_state))
        .unwrap();
    let (vm2, copy) = vm_with(hv, copy);
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
    assert_eq!(counting_reports(restored.as_mut(), 2), vec![7, 8]);
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

/// A snapshot whose CPUID names another CPU model is refused before any
/// vCPU runs.
pub fn a_snapshot_from_another_cpu_model_is_refused(hv: &dyn Hypervisor) {
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

/// A vCPU state using a CPU feature this host does not give its guests is
/// refused; the bits that only mirror the guest's CR4 are not features.
pub fn a_vcpu_using_features_this_host_lacks_is_refused(hv: &dyn Hypervisor) {
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

/// Defines one `#[test]` per program of this module, each running it on
/// the backend `$hypervisor` evaluates to (once per test):
/// `x86_64_programs!(KvmHypervisor::new().expect("..."));`.
#[macro_export]
macro_rules! x86_64_programs {
    ($hypervisor:expr) => {
        $crate::tests_for_programs!(x86_64, $hypervisor;
            port_writes_exit_with_their_data,
            port_reads_return_what_the_vmm_supplies,
            mmio_outside_ram_exits_both_ways,
            registers_round_trip_and_guest_computes_with_them,
            msrs_round_trip,
            guest_writes_reach_both_memory_slots,
            notifier_write_is_counted_without_an_exit,
            kick_interrupts_a_spinning_vcpu_and_it_resumes,
            triple_fault_is_a_shutdown_exit,
            interrupt_lines_and_vcpu_indices_are_validated,
            an_interrupt_line_reaches_the_guest_through_the_io_apic,
            a_restored_vcpu_continues_where_it_stopped,
            a_snapshot_from_another_cpu_model_is_refused,
            a_vcpu_using_features_this_host_lacks_is_refused
        );
    };
}
