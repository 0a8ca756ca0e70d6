//! Where the boot structures live in low guest memory. All of it sits below
//! 1 MiB, where no kernel is loaded.

/// The GDT (four 8-byte descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (the kernel switches stacks at once).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories (1 GiB of 2 MiB pages each): 0xb000..0xf000.
pub const PD_ADDR: u64 = 0xb000;
/// How many GiB the boot page tables identity-map.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86 COMMAND_LINE_SIZE: the longest command line the kernel accepts, with its NUL.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area, where Linux looks for the MP table.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of conventional memory (the legacy VGA/BIOS hole follows).
pub const LOW_MEMORY_END: u64 = 0xa_0000;
/// The kernel is loaded from here up.
pub const HIMEM_START: u64 = 0x10_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
