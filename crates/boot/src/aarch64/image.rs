//! The arm64 kernel `Image` (Documentation/arch/arm64/booting.rst): a
//! 64-byte header, then the kernel, loaded `text_offset` bytes above a
//! 2 MiB-aligned base in RAM and entered at its first byte.
//!
//! linux-loader's loader for this format builds only on aarch64 hosts and
//! reports every fault as "invalid Image"; this check runs on any host
//! (so a bad file is refused the same way everywhere, before any VM
//! exists) and says which field is wrong.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use supermachine_memory::{Bytes, GuestAddress, GuestMemoryMmapped, MemoryLayout};

use crate::{Error, Result};

/// `ARM\x64`, little-endian, at offset 56.
const MAGIC: u32 = 0x644d_5241;
const HEADER_SIZE: usize = 64;
/// Flags bit 0: the kernel is big-endian.
const FLAG_BIG_ENDIAN: u64 = 1;
/// Flags bits 1-2: the kernel's page size (0 unspecified, 1 4 KiB,
/// 2 16 KiB, 3 64 KiB).
const FLAG_PAGE_SIZE_SHIFT: u64 = 1;
/// The base the image is placed above must be 2 MiB-aligned.
const BASE_ALIGN: u64 = 2 << 20;

/// A checked arm64 kernel `Image`.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    file_size: u64,
    /// Where the image goes above a 2 MiB-aligned base.
    pub text_offset: u64,
    /// What the kernel occupies from its load address, bss included.
    pub image_size: u64,
    /// The page size the kernel was built for, in bytes, if it says.
    pub page_size: Option<u64>,
}

/// Where [`Image::load`] put the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// The load address, which is also the entry point.
    pub entry: u64,
    /// First address past what the kernel occupies (`image_size`).
    pub end: u64,
}

impl Image {
    /// Opens `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let read_err = crate::kernel_read_error(path);
        let invalid = crate::kernel_invalid(path, "arm64");
        let mut file = File::open(path).map_err(read_err)?;
        let file_size = file.metadata().map_err(read_err)?.len();
        let mut header = [0u8; HEADER_SIZE];
        if file_size < HEADER_SIZE as u64 {
            return Err(invalid(format!(
                "{file_size} bytes, shorter than the {HEADER_SIZE}-byte Image header"
            )));
        }
        file.read_exact(&mut header).map_err(read_err)?;
        let u64_at = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let magic = u32::from_le_bytes([header[56], header[57], header[58], header[59]]);
        if magic != MAGIC {
            return Err(invalid(format!(
                "no arm64 Image magic (\"ARM\\x64\" at offset 56; found {magic:#010x})"
            )));
        }
        let (text_offset, image_size, flags) = (u64_at(8), u64_at(16), u64_at(24));
        if image_size == 0 {
            return Err(invalid(
                "its header gives no image size (a kernel before Linux 3.17)".into(),
            ));
        }
        if flags & FLAG_BIG_ENDIAN != 0 {
            return Err(invalid("it is a big-endian kernel".into()));
        }
        if image_size < file_size {
            return Err(invalid(format!(
                "its header says it occupies {image_size} bytes, less than the file's {file_size}"
            )));
        }
        if text_offset >= BASE_ALIGN || text_offset % 4096 != 0 {
            return Err(invalid(format!(
                "text offset {text_offset:#x} is not a page within the 2 MiB alignment"
            )));
        }
        check_complete(&header, &mut file, file_size).map_err(invalid)?;
        let page_size = match (flags >> FLAG_PAGE_SIZE_SHIFT) & 3 {
            1 => Some(4 << 10),
            2 => Some(16 << 10),
            3 => Some(64 << 10),
            _ => None,
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            file_size,
            text_offset,
            image_size,
            page_size,
        })
    }

    /// Copies the image to the start of RAM (plus `text_offset`), after
    /// checking that all of `image_size` fits.
    pub fn load(&mut self, mem: &GuestMemoryMmapped, layout: &MemoryLayout) -> Result<LoadedImage> {
        let ram = layout.low_range();
        let base = ram.start.0.next_multiple_of(BASE_ALIGN);
        let entry = base + self.text_offset;
        let end = entry
            .checked_add(self.image_size)
            .filter(|end| *end <= ram.end())
            .ok_or_else(|| Error::KernelTooLarge {
                path: self.path.clone(),
                load: entry,
                needed: self.image_size,
            })?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|source| Error::KernelRead {
                path: self.path.clone(),
                source,
            })?;
        let size = usize::try_from(self.file_size).map_err(|_| Error::KernelTooLarge {
            path: self.path.clone(),
            load: entry,
            needed: self.image_size,
        })?;
        mem.read_exact_volatile_from(
            GuestAddress(entry),
            &mut supermachine_memory::VolatileFile::new(&mut self.file),
            size,
        )
        .map_err(crate::mem_err("the kernel Image"))?;
        Ok(LoadedImage { entry, end })
    }
}

/// Refuses a truncated `Image`. The header has no file size, but two
/// things in a complete file point into it: the branch to the kernel's
/// entry code (in `code0`, or in `code1` after an EFI stub's "MZ" or a
/// nop), which lands in its init text, past most of the kernel; and, in
/// a kernel with an EFI stub, the PE/COFF section table, whose raw data
/// must all be in the file.
fn check_complete(
    header: &[u8],
    file: &mut File,
    file_size: u64,
) -> std::result::Result<(), String> {
    let truncated = |what: String| format!("truncated: {what}, past its {file_size} bytes");
    for at in [0usize, 4] {
        let word = u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        // B imm26: 0b000101 in the top six bits.
        if word & 0xfc00_0000 == 0x1400_0000 {
            let imm26 = i64::from(word & 0x03ff_ffff);
            let offset = (imm26 << 38 >> 38) * 4;
            let target = at as i64 + offset;
            if target < 0 || target as u64 >= file_size {
                return Err(truncated(format!(
                    "its entry branch leads to offset {target:#x}"
                )));
            }
            break;
        }
    }
    if &header[0..2] != b"MZ" {
        return Ok(());
    }
    let pe = u64::from(u32::from_le_bytes([
        header[60], header[61], header[62], header[63],
    ]));
    let mut coff = [0u8; 24];
    file.seek(SeekFrom::Start(pe))
        .and_then(|_| file.read_exact(&mut coff))
        .map_err(|_| truncated(format!("its PE header at {pe:#x} is cut off")))?;
    if &coff[0..4] != b"PE\0\0" {
        return Err(format!(
            "the EFI stub's PE header at {pe:#x} has no PE signature"
        ));
    }
    let sections = u64::from(u16::from_le_bytes([coff[6], coff[7]]));
    let optional = u64::from(u16::from_le_bytes([coff[20], coff[21]]));
    let table = pe + 24 + optional;
    let mut end = 0u64;
    for i in 0..sections.min(96) {
        let mut section = [0u8; 40];
        file.seek(SeekFrom::Start(table + 40 * i))
            .and_then(|_| file.read_exact(&mut section))
            .map_err(|_| truncated(format!("its PE section table at {table:#x} is cut off")))?;
        let raw_size = u64::from(u32::from_le_bytes(
            section[16..20].try_into().unwrap_or([0; 4]),
        ));
        let raw_at = u64::from(u32::from_le_bytes(
            section[20..24].try_into().unwrap_or([0; 4]),
        ));
        end = end.max(raw_at + raw_size);
    }
    if end > file_size {
        return Err(truncated(format!("its PE sections end at {end:#x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use supermachine_memory::{AARCH64_RAM_START, GuestRam};

    fn image(text_offset: u64, image_size: u64, flags: u64, magic: u32, body: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_SIZE];
        bytes[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes());
        bytes[8..16].copy_from_slice(&text_offset.to_le_bytes());
        bytes[16..24].copy_from_slice(&image_size.to_le_bytes());
        bytes[24..32].copy_from_slice(&flags.to_le_bytes());
        bytes[56..60].copy_from_slice(&magic.to_le_bytes());
        bytes.extend((0..body).map(|i| i as u8));
        bytes
    }

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn refusal(bytes: &[u8]) -> String {
        let f = file(bytes);
        let err = Image::open(f.path()).unwrap_err();
        assert!(matches!(err, Error::KernelInvalid { arch: "arm64", .. }));
        let line = err.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        line
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        assert!(refusal(&[0u8; 10]).contains("shorter than the 64-byte"));
        assert!(refusal(&image(0, 1 << 20, 0b10, 0x7f45_4c46, 0)).contains("magic"));
        assert!(refusal(&image(0, 0, 0b10, MAGIC, 0)).contains("3.17"));
        assert!(refusal(&image(0, 1 << 20, 1, MAGIC, 0)).contains("big-endian"));
        assert!(refusal(&image(0, 100, 0b10, MAGIC, 4096)).contains("less than the file"));
        assert!(refusal(&image(0x123, 1 << 20, 0b10, MAGIC, 0)).contains("text offset"));
    }

    #[test]
    fn a_truncated_image_is_refused() {
        // code0 branches to 0x40 + 4 KiB: the file must reach past it.
        let mut bytes = image(0, 1 << 20, 0b10, MAGIC, 8192);
        bytes[0..4].copy_from_slice(&(0x1400_0000u32 | (0x1040 / 4)).to_le_bytes());
        let f = file(&bytes);
        assert!(Image::open(f.path()).is_ok());
        let cut = refusal(&bytes[..0x1000]);
        assert!(
            cut.contains("truncated") && cut.contains("entry branch"),
            "{cut}"
        );
        // A nop, then the branch in code1, as Linux has it.
        bytes[0..4].copy_from_slice(&0xd503_201fu32.to_le_bytes());
        bytes[4..8].copy_from_slice(&(0x1400_0000u32 | (0x1040 / 4)).to_le_bytes());
        assert!(refusal(&bytes[..0x1000]).contains("entry branch"));
        // With an EFI stub: every PE section's data must be in the file.
        let mut efi = image(0, 1 << 20, 0b10, MAGIC, 8192);
        // code0 is "MZ" as Linux writes it: the instruction `ccmp x18, #0,
        // #0xd, pl`, harmless when run.
        efi[0..4].copy_from_slice(&0xfa40_5a4du32.to_le_bytes());
        efi[4..8].copy_from_slice(&(0x1400_0000u32 | (0x1040 / 4)).to_le_bytes());
        efi[60..64].copy_from_slice(&0x40u32.to_le_bytes());
        efi[0x40..0x44].copy_from_slice(b"PE\0\0");
        efi[0x46..0x48].copy_from_slice(&1u16.to_le_bytes());
        efi[0x54..0x56].copy_from_slice(&0u16.to_le_bytes());
        let section = 0x40 + 24;
        efi[section + 16..section + 20].copy_from_slice(&0x1f00u32.to_le_bytes());
        efi[section + 20..section + 24].copy_from_slice(&0x100u32.to_le_bytes());
        let f = file(&efi);
        assert!(Image::open(f.path()).is_ok());
        assert!(refusal(&efi[..0x1800]).contains("PE sections end at 0x2000"));
    }

    #[test]
    fn a_good_image_is_loaded_above_the_ram_base_and_must_fit() {
        let bytes = image(0x8_0000, 4 << 20, 0b10, MAGIC, 8192);
        let f = file(&bytes);
        let mut kernel = Image::open(f.path()).unwrap();
        assert_eq!(kernel.page_size, Some(4096));
        let layout = MemoryLayout::aarch64(16 << 20).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let loaded = kernel.load(ram.memory(), &layout).unwrap();
        assert_eq!(loaded.entry, AARCH64_RAM_START + 0x8_0000);
        assert_eq!(loaded.end, loaded.entry + (4 << 20));
        let mut back = vec![0u8; bytes.len()];
        ram.memory()
            .read_slice(&mut back, GuestAddress(loaded.entry))
            .unwrap();
        assert_eq!(back, bytes);

        let huge = file(&image(0, 64 << 20, 0b10, MAGIC, 4096));
        let err = Image::open(huge.path())
            .unwrap()
            .load(ram.memory(), &layout)
            .unwrap_err();
        assert!(matches!(err, Error::KernelTooLarge { .. }), "{err}");
    }
}
