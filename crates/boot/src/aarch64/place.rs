//! Where the device tree and the initrd go in an aarch64 guest's RAM: the
//! device tree at the start of RAM's last 2 MiB (the kernel wants it
//! 8-byte aligned and within one 2 MiB block), the initrd right below it,
//! both clear of the kernel.

use std::path::Path;

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped, MemoryLayout};

use crate::{Error, Result, mem_err};

/// The most a device tree may take.
pub const FDT_MAX_SIZE: u64 = 2 << 20;

/// Where [`write_fdt_blob`] puts the device tree: the start of the last
/// 2 MiB of RAM.
pub fn fdt_address(layout: &MemoryLayout) -> u64 {
    (layout.low_range().end() - FDT_MAX_SIZE) & !(FDT_MAX_SIZE - 1)
}

/// Copies the device tree `blob` to [`fdt_address`]; returns the address.
pub fn write_fdt_blob(mem: &GuestMemoryMmapped, layout: &MemoryLayout, blob: &[u8]) -> Result<u64> {
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(Error::Fdt(format!(
            "the device tree is {} bytes; the kernel takes at most {FDT_MAX_SIZE}",
            blob.len()
        )));
    }
    let addr = fdt_address(layout);
    mem.write_slice(blob, GuestAddress(addr))
        .map_err(mem_err("device tree"))?;
    Ok(addr)
}

/// Loads the initrd at `path` just below the device tree, above
/// `kernel_end`; returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmapped,
    layout: &MemoryLayout,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64)> {
    let (mut file, size) = crate::open_initrd(path)?;
    let limit = fdt_address(layout);
    let too_large = || Error::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    crate::read_initrd(mem, addr, &mut file, size, path)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use supermachine_memory::{AARCH64_RAM_START, GuestRam};

    use super::*;

    #[test]
    fn the_device_tree_and_initrd_sit_at_the_top_of_ram() {
        let layout = MemoryLayout::aarch64(64 << 20).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let fdt = write_fdt_blob(ram.memory(), &layout, &[0xd0, 0x0d, 0xfe, 0xed]).unwrap();
        assert_eq!(fdt, AARCH64_RAM_START + (62 << 20));
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[7u8; 5000]).unwrap();
        let (addr, size) = load_initrd(
            ram.memory(),
            &layout,
            AARCH64_RAM_START + (8 << 20),
            initrd.path(),
        )
        .unwrap();
        assert_eq!((addr, size), ((fdt - 5000) & !0xfff, 5000));
        let mut back = [0u8; 5000];
        ram.memory()
            .read_slice(&mut back, GuestAddress(addr))
            .unwrap();
        assert_eq!(back, [7u8; 5000]);
        // An initrd that would reach down into the kernel is refused.
        let err = load_initrd(ram.memory(), &layout, fdt - 4096, initrd.path()).unwrap_err();
        assert!(matches!(err, Error::InitrdTooLarge { .. }), "{err}");
        // So is a device tree larger than the kernel reads.
        let huge = vec![0u8; (FDT_MAX_SIZE + 1) as usize];
        assert!(write_fdt_blob(ram.memory(), &layout, &huge).is_err());
    }
}
