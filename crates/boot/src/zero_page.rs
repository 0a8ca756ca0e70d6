//! The zero page (`struct boot_params`), the command line and the initrd.

use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use supermachine_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmapped, MemoryLayout};

use crate::kernel::LoadedKernel;
use crate::layout::*;
use crate::{Error, Result, mem_err};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: `boot_params` is a `repr(C, packed)` struct of integers and
// arrays of integers: every byte pattern is a valid value and it has no
// padding, which is what `ByteValued` requires.
unsafe impl ByteValued for ZeroPage {}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at `path` at the top of low RAM (page aligned, below the
/// kernel's `initrd_addr_max`), above everything the kernel occupies.
pub fn load_initrd(
    mem: &GuestMemoryMmapped,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<InitrdPlacement> {
    let (mut file, size) = crate::open_initrd(path)?;
    let max_end = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .unwrap_or(u64::MAX)
        .min(layout.low_range().end());
    let too_large = || Error::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit: max_end,
    };
    let addr = max_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.end {
        return Err(too_large());
    }
    crate::read_initrd(mem, addr, &mut file, size, path)?;
    Ok(InitrdPlacement { addr, size })
}

/// The e820 map: conventional memory, the reserved EBDA (which holds the
/// MP table), and all RAM from 1 MiB up.
fn e820_map(layout: &MemoryLayout) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, r#type| boot_e820_entry {
        addr,
        size: end - addr,
        r#type,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, LOW_MEMORY_END, E820_RESERVED),
    ];
    for range in layout.ranges() {
        let start = range.start.0.max(HIMEM_START);
        if range.end() > start {
            map.push(entry(start, range.end(), E820_RAM));
        }
    }
    map
}

/// Writes the command line and the zero page.
pub fn write_zero_page(
    mem: &GuestMemoryMmapped,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<InitrdPlacement>,
) -> Result<()> {
    let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline)
            .map_err(|e| Error::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| Error::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    let map = e820_map(layout);
    if map.len() > params.e820_table.len() {
        return Err(Error::Cmdline("internal: e820 map too long".into()));
    }
    params.e820_entries = map.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = entry;
    }
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_ADDR))
        .map_err(mem_err("zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use supermachine_memory::GuestRam;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_e820() {
        let layout = MemoryLayout::x86_64(4 << 30).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let mem = ram.memory();
        let initrd = InitrdPlacement {
            addr: 0xbf00_0000,
            size: 0x1234,
        };
        write_zero_page(
            mem,
            &layout,
            &elf_kernel(),
            "console=ttyS0 quiet",
            Some(initrd),
        )
        .unwrap();
        let zp: ZeroPage = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let p = zp.0;
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0xbf00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        let mut line = vec![0u8; 20];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 quiet\0");
        assert_eq!(p.e820_entries, 4);
        let table = { p.e820_table };
        assert_eq!({ table[3].addr }, 1 << 32);
        assert_eq!({ table[3].size }, 1 << 30);
        assert_eq!({ table[2].addr }, HIMEM_START);
        assert_eq!({ table[1].r#type }, E820_RESERVED);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        let layout = MemoryLayout::x86_64(64 << 20).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        for bad in [long.as_str(), "console=ttyS0\u{7}"] {
            let e = write_zero_page(ram.memory(), &layout, &elf_kernel(), bad, None).unwrap_err();
            assert!(matches!(e, Error::Cmdline(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_or_is_refused() {
        let layout = MemoryLayout::x86_64(64 << 20).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x5a; 10_000]).unwrap();
        let placed = load_initrd(ram.memory(), &layout, &elf_kernel(), f.path()).unwrap();
        assert_eq!(placed.addr % 4096, 0);
        assert!(placed.addr + placed.size <= 64 << 20);
        assert!(placed.addr >= elf_kernel().end);
        let b: u8 = ram
            .memory()
            .read_obj(GuestAddress(placed.addr + 9_999))
            .unwrap();
        assert_eq!(b, 0x5a);

        let huge_kernel = LoadedKernel {
            end: (64 << 20) - 4096,
            ..elf_kernel()
        };
        let e = load_initrd(ram.memory(), &layout, &huge_kernel, f.path()).unwrap_err();
        assert!(matches!(e, Error::InitrdTooLarge { .. }));
        let e = load_initrd(
            ram.memory(),
            &layout,
            &elf_kernel(),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(matches!(e, Error::InitrdRead { .. }));
    }
}
