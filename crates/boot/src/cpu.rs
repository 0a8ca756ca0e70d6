//! The GDT, identity page tables and register state for entering a kernel
//! at its 64-bit entry point.

use supermachine_hypervisor::x86_64::consts::{self, msr};
use supermachine_hypervisor::{
    CpuState, DescriptorTable, FpuState, MsrEntry, Regs, Segment, SpecialRegs,
};
use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};

use crate::layout::*;
use crate::{Result, mem_err};

const SELECTOR_CODE: u16 = 0x08;
const SELECTOR_DATA: u16 = 0x10;
const SELECTOR_TSS: u16 = 0x18;

/// The GDT as descriptors: null, 64-bit code, data, and a 32-bit TSS.
const GDT: [u64; 4] = [
    0,
    descriptor(0xa09b, 0, 0xfffff),
    descriptor(0xc093, 0, 0xfffff),
    descriptor(0x808b, 0, 0xfffff),
];

/// Packs a segment descriptor; `flags` holds the access byte in bits 0..8
/// and the G/DB/L/AVL nibble in bits 12..16.
const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden part of a segment register that matches a GDT entry.
fn segment_from_descriptor(entry: u64, selector: u16) -> Segment {
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    Segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g: granular,
        avl: (entry >> 52) & 1 == 1,
        unusable: (entry >> 47) & 1 == 0,
    }
}

/// Writes the GDT, an empty IDT and page tables that identity-map the first
/// [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages.
pub fn write_long_mode_tables(mem: &GuestMemoryMmapped) -> Result<()> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("IDT"))?;

    const PRESENT_WRITABLE: u64 = 0b11;
    const PAGE_SIZE_2M: u64 = 1 << 7;
    mem.write_obj(PDPT_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))
        .map_err(mem_err("PML4"))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | PRESENT_WRITABLE, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(mem_err("PDPT"))?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            mem.write_obj(
                phys | PRESENT_WRITABLE | PAGE_SIZE_2M,
                GuestAddress(pd + i * 8),
            )
            .map_err(mem_err("page directory"))?;
        }
    }
    Ok(())
}

/// The MSR values a freshly booted x86_64 CPU should have.
pub fn boot_msrs() -> Vec<MsrEntry> {
    [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
        (msr::IA32_MTRR_DEF_TYPE, msr::MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect()
}

/// Register state to enter 64-bit code at `entry` with `rsi` holding the
/// zero page (the Linux 64-bit boot protocol), using the tables from
/// [`write_long_mode_tables`].
pub fn boot_cpu_state(entry: u64) -> CpuState {
    let code = segment_from_descriptor(GDT[1], SELECTOR_CODE);
    let data = segment_from_descriptor(GDT[2], SELECTOR_DATA);
    let tss = segment_from_descriptor(GDT[3], SELECTOR_TSS);
    let sregs = SpecialRegs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt: Segment {
            type_: 0x2,
            present: true,
            ..Segment::default()
        },
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: (GDT.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: IDT_ADDR,
            limit: 7,
        },
        cr0: consts::CR0_PE | consts::CR0_PG | consts::CR0_ET,
        cr3: PML4_ADDR,
        cr4: consts::CR4_PAE,
        efer: consts::EFER_LME | consts::EFER_LMA,
        apic_base: u64::from(LAPIC_ADDR) | (1 << 11) | (1 << 8),
        ..SpecialRegs::default()
    };
    CpuState {
        regs: Regs {
            rip: entry,
            rsp: BOOT_STACK_ADDR,
            rbp: BOOT_STACK_ADDR,
            rsi: ZERO_PAGE_ADDR,
            rflags: consts::RFLAGS_RESERVED,
            ..Regs::default()
        },
        sregs,
        fpu: FpuState::default(),
        msrs: boot_msrs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermachine_memory::{GuestRam, MemoryLayout};

    #[test]
    fn descriptors_decode_to_flat_long_mode_segments() {
        let code = segment_from_descriptor(GDT[1], SELECTOR_CODE);
        assert!(code.l && code.present && code.s && code.g && !code.db);
        assert_eq!((code.base, code.limit, code.type_), (0, 0xffff_ffff, 0xb));
        let data = segment_from_descriptor(GDT[2], SELECTOR_DATA);
        assert!(data.db && !data.l && data.present);
        assert_eq!(data.type_, 0x3);
        let tss = segment_from_descriptor(GDT[3], SELECTOR_TSS);
        assert!(!tss.s && tss.present);
        assert_eq!(tss.type_, 0xb);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(64 << 20).unwrap()).unwrap();
        let mem = ram.memory();
        write_long_mode_tables(mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // Walk 0xC020_0000 (GiB 3, 2 MiB page 1).
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 3 * 8)).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress((pdpte & !0xfff) + 8)).unwrap();
        assert_eq!(pde & !0xfff, 0xC020_0000);
        assert_ne!(pde & (1 << 7), 0);
    }

    #[test]
    fn boot_state_is_64_bit_with_zero_page_in_rsi() {
        let s = boot_cpu_state(0x100_0000);
        assert_eq!(s.regs.rip, 0x100_0000);
        assert_eq!(s.regs.rsi, ZERO_PAGE_ADDR);
        assert_ne!(s.sregs.efer & consts::EFER_LMA, 0);
        assert_ne!(s.sregs.cr0 & consts::CR0_PG, 0);
    }
}
