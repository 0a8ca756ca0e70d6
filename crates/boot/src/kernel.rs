//! Recognizing and loading a kernel image.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use supermachine_memory::{GuestAddress, GuestMemoryMmapped, VolatileFile};

use crate::layout::HIMEM_START;
use crate::{Error, Result};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

const BZ_BOOT_FLAG_OFFSET: usize = 0x1fe;
const BZ_HEADER_MAGIC_OFFSET: usize = 0x202;
const BZ_VERSION_OFFSET: usize = 0x206;
const BZ_SETUP_SECTS_OFFSET: usize = 0x1f1;
const BZ_SYSSIZE_OFFSET: usize = 0x1f4;
const BZ_XLOADFLAGS_OFFSET: usize = 0x236;
const BZ_INIT_SIZE_OFFSET: usize = 0x260;
/// Boot protocol 2.12 introduced `xloadflags` and with it the 64-bit entry.
const BZ_MIN_VERSION: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;

/// The two kernel formats we boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`, entered at its ELF entry point.
    Elf,
    /// A `bzImage`, entered at its 64-bit entry point (load address + 0x200).
    BzImage,
}

/// A kernel file that has been checked to be bootable.
#[derive(Debug)]
pub struct KernelImage {
    path: PathBuf,
    file: File,
    format: KernelFormat,
    /// For a bzImage: bytes the decompressor needs from the load address.
    init_size: u64,
}

impl KernelImage {
    /// Opens `path` and checks that it is an x86_64 kernel we can boot:
    /// its headers are well formed and the file is as long as they say.
    pub fn open(path: &Path) -> Result<Self> {
        let read_err = crate::kernel_read_error(path);
        let invalid = crate::kernel_invalid(path, "x86_64");
        let mut file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(invalid("it is not a regular file".into()));
        }
        let len = meta.len();
        if len == 0 {
            return Err(invalid("the file is empty".into()));
        }
        let mut head = vec![0u8; len.min(4096) as usize];
        file.read_exact(&mut head).map_err(read_err)?;

        let (format, init_size) = if head.starts_with(ELF_MAGIC) {
            check_elf(&mut file, &head, len).map_err(invalid)?;
            (KernelFormat::Elf, 0)
        } else if head.get(BZ_HEADER_MAGIC_OFFSET..BZ_HEADER_MAGIC_OFFSET + 4) == Some(b"HdrS") {
            (
                KernelFormat::BzImage,
                check_bzimage(&head, len).map_err(invalid)?,
            )
        } else {
            return Err(invalid(
                "neither an ELF vmlinux (no ELF magic) nor a bzImage (no HdrS boot header)".into(),
            ));
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            format,
            init_size,
        })
    }

    /// The file's format.
    pub fn format(&self) -> KernelFormat {
        self.format
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn check_elf(file: &mut File, head: &[u8], len: u64) -> std::result::Result<(), String> {
    let truncated = || "the ELF header is truncated".to_string();
    if head.len() < 64 {
        return Err(truncated());
    }
    if head[4] != ELFCLASS64 {
        return Err("a 32-bit ELF file; an x86_64 vmlinux is ELF64".into());
    }
    if head[5] != ELFDATA2LSB {
        return Err("a big-endian ELF file".into());
    }
    let machine = le16(head, 18).ok_or_else(truncated)?;
    if machine != EM_X86_64 {
        return Err(format!(
            "an ELF file for machine {machine}, not x86_64 (62)"
        ));
    }
    if le16(head, 16) != Some(ET_EXEC) {
        return Err("an ELF file that is not an executable".into());
    }
    let phoff = le64(head, 32).ok_or_else(truncated)?;
    let phentsize = u64::from(le16(head, 54).ok_or_else(truncated)?);
    let phnum = u64::from(le16(head, 56).ok_or_else(truncated)?);
    if phentsize < 56 {
        return Err(format!("program header entries of {phentsize} bytes"));
    }
    let table_len = phentsize * phnum;
    if phoff.checked_add(table_len).is_none_or(|end| end > len) {
        return Err(format!(
            "its program headers end past the end of the file ({len} bytes): truncated?"
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|e| format!("reading its program headers: {e}"))?;
    let mut loadable = 0;
    for entry in table.chunks_exact(phentsize as usize) {
        if le32(entry, 0) != Some(PT_LOAD) {
            continue;
        }
        loadable += 1;
        let offset = le64(entry, 8).unwrap_or(u64::MAX);
        let paddr = le64(entry, 24).unwrap_or(0);
        let filesz = le64(entry, 32).unwrap_or(u64::MAX);
        if offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Err(format!(
                "a loadable segment ends past the end of the file ({len} bytes): truncated?"
            ));
        }
        if paddr < HIMEM_START {
            return Err(format!(
                "a loadable segment at physical address {paddr:#x}, below 1 MiB"
            ));
        }
    }
    if loadable == 0 {
        return Err("an ELF file with no loadable segments".into());
    }
    Ok(())
}

fn check_bzimage(head: &[u8], len: u64) -> std::result::Result<u64, String> {
    let truncated = || "the bzImage setup header is truncated".to_string();
    if le16(head, BZ_BOOT_FLAG_OFFSET) != Some(0xaa55) {
        return Err("the bzImage boot sector lacks its 0xAA55 signature".into());
    }
    let version = le16(head, BZ_VERSION_OFFSET).ok_or_else(truncated)?;
    if version < BZ_MIN_VERSION {
        return Err(format!(
            "boot protocol {}.{:02} is too old: the 64-bit entry needs 2.12 or newer",
            version >> 8,
            version & 0xff
        ));
    }
    let xloadflags = le16(head, BZ_XLOADFLAGS_OFFSET).ok_or_else(truncated)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err("this bzImage has no 64-bit entry point (a 32-bit kernel?)".into());
    }
    let setup_sects = match head
        .get(BZ_SETUP_SECTS_OFFSET)
        .copied()
        .ok_or_else(truncated)?
    {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(le32(head, BZ_SYSSIZE_OFFSET).ok_or_else(truncated)?);
    let needed = (setup_sects + 1) * 512 + syssize * 16;
    if needed > len {
        return Err(format!(
            "the header says {needed} bytes but the file has {len}: truncated?"
        ));
    }
    Ok(u64::from(
        le32(head, BZ_INIT_SIZE_OFFSET).ok_or_else(truncated)?,
    ))
}

/// Where a kernel landed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// First byte past everything the kernel occupies while it starts
    /// (for a bzImage, including its decompression buffer).
    pub end: u64,
    /// A bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads `kernel` into guest memory at its preferred physical address.
pub fn load_kernel(mem: &GuestMemoryMmapped, kernel: &mut KernelImage) -> Result<LoadedKernel> {
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |source| Error::KernelLoad {
        path: kernel.path.clone(),
        source,
    };
    match kernel.format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut VolatileFile::new(&mut kernel.file), himem)
                .map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut VolatileFile::new(&mut kernel.file), himem)
                .map_err(load_err)?;
            let load = r.kernel_load.0;
            Ok(LoadedKernel {
                entry: load + 0x200,
                end: r.kernel_end.max(load + kernel.init_size),
                setup_header: r.setup_header,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn reason(bytes: &[u8]) -> String {
        let f = file_with(bytes);
        match KernelImage::open(f.path()) {
            Err(Error::KernelInvalid { reason, .. }) => reason,
            other => panic!("expected KernelInvalid, got {other:?}"),
        }
    }

    fn minimal_bzimage(version: u16, xloadflags: u16, syssize: u32) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512 + 4096];
        b[BZ_SETUP_SECTS_OFFSET] = 4;
        b[BZ_SYSSIZE_OFFSET..BZ_SYSSIZE_OFFSET + 4].copy_from_slice(&syssize.to_le_bytes());
        b[BZ_BOOT_FLAG_OFFSET..BZ_BOOT_FLAG_OFFSET + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[BZ_HEADER_MAGIC_OFFSET..BZ_HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        b[BZ_VERSION_OFFSET..BZ_VERSION_OFFSET + 2].copy_from_slice(&version.to_le_bytes());
        b[BZ_XLOADFLAGS_OFFSET..BZ_XLOADFLAGS_OFFSET + 2]
            .copy_from_slice(&xloadflags.to_le_bytes());
        b
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = KernelImage::open(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(e, Error::KernelRead { .. }));
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn garbage_and_empty_files_are_refused_with_a_reason() {
        assert!(reason(b"").contains("empty"));
        assert!(reason(b"#!/bin/sh\necho not a kernel\n").contains("neither an ELF"));
    }

    #[test]
    fn wrong_elf_flavours_are_named() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 1;
        assert!(reason(&elf).contains("32-bit"));
        elf[4] = ELFCLASS64;
        elf[5] = ELFDATA2LSB;
        elf[16] = ET_EXEC as u8;
        elf[18] = 183; // aarch64
        assert!(reason(&elf).contains("machine 183"));
        elf[18] = EM_X86_64 as u8;
        elf[32] = 64; // phoff
        elf[54] = 56; // phentsize
        elf[56] = 1; // phnum, but the file ends at 64 bytes
        assert!(reason(&elf).contains("truncated"));
    }

    #[test]
    fn bzimage_checks() {
        let good = minimal_bzimage(0x020f, XLF_KERNEL_64, 4096 / 16);
        let f = file_with(&good);
        let k = KernelImage::open(f.path()).unwrap();
        assert_eq!(k.format(), KernelFormat::BzImage);

        assert!(reason(&minimal_bzimage(0x0206, XLF_KERNEL_64, 1)).contains("too old"));
        assert!(reason(&minimal_bzimage(0x020f, 0, 1)).contains("64-bit entry"));
        assert!(reason(&minimal_bzimage(0x020f, XLF_KERNEL_64, 1 << 20)).contains("truncated"));
        let mut unsigned = good.clone();
        unsigned[BZ_BOOT_FLAG_OFFSET] = 0;
        assert!(reason(&unsigned).contains("0xAA55"));
    }
}
