//! The Intel MultiProcessor Specification (1.4) table: how Linux, without
//! ACPI, learns the CPUs, the IOAPIC and the ISA interrupt routing.
//!
//! The floating pointer goes at the start of the EBDA (where Linux scans for
//! it) and the configuration table right after it, inside the legacy hole
//! below 1 MiB that the e820 map keeps away from the kernel.

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped};

use crate::layout::{EBDA_START, HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::{Error, Result, mem_err};

const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6, as a CPU signature; Linux only logs it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and on-chip APIC feature flags.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

/// The largest vCPU count the table can describe (8-bit APIC ids, with one
/// id left for the IOAPIC and 0xff meaning "all").
pub const MAX_CPUS: u32 = 254;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and the configuration table for `cpus` CPUs,
/// placed at `base`.
fn build(cpus: u32, base: u64) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            id as u8,
            LAPIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n drives IOAPIC pin n, matching the hypervisor's routing.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOATING_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]); // checksum filled below
    header.extend_from_slice(b"SUPERMCH");
    header.extend_from_slice(b"SUPERMACHINE");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the MP table for `cpus` CPUs at the start of the EBDA.
pub fn write_mptable(mem: &GuestMemoryMmapped, cpus: u32) -> Result<()> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    let bytes = build(cpus, EBDA_START);
    debug_assert!(EBDA_START + bytes.len() as u64 <= HIMEM_START);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(mem_err("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_consistent() {
        for cpus in [1, 2, 32, MAX_CPUS] {
            let t = build(cpus, EBDA_START);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as u32;
            assert_eq!(count, cpus + 1 + 1 + 24 + 2);
            assert!(EBDA_START + t.len() as u64 <= HIMEM_START);
            // The first processor is the bootstrap processor, the others are not.
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTSTRAP);
            if cpus > 1 {
                assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
            }
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        use supermachine_memory::{GuestRam, MemoryLayout};
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
        assert!(write_mptable(ram.memory(), 0).is_err());
        assert!(write_mptable(ram.memory(), MAX_CPUS + 1).is_err());
        write_mptable(ram.memory(), 4).unwrap();
    }
}
