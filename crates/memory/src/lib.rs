//! Guest physical memory: the address-space layout of each architecture
//! (x86_64, aarch64) and the mapping that backs it.
//!
//! Everything the VMM reads from or writes to guest memory goes through
//! `vm-memory`'s `Bytes` interface on [`GuestAddress`]es, which checks every
//! access against the mapped regions. The only raw host addresses that leave
//! this crate are the region bases handed to a hypervisor to map.

use std::fs::File;

pub use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, GuestUsize, MemoryRegionAddress, VolatileSlice,
};
use vm_memory::{FileOffset, GuestMemoryMmap};

/// The concrete guest memory type every supermachine crate shares.
pub type GuestMemoryMmapped = GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO gap: RAM below it, devices inside it.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO gap; RAM continues from here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where RAM starts on aarch64: everything below is left to devices (the
/// GIC, the UART, virtio-mmio), as on QEMU's and Firecracker's `virt`
/// machines.
pub const AARCH64_RAM_START: u64 = 0x8000_0000;
/// The smallest guest that makes sense: room for the boot structures, a kernel and its initrd.
pub const MIN_RAM_BYTES: u64 = 16 << 20;
/// A ceiling that keeps size arithmetic far from overflow (1 TiB).
pub const MAX_RAM_BYTES: u64 = 1 << 40;
const PAGE_SIZE: u64 = 4096;

/// Errors from building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested RAM size is outside what we support.
    #[error(
        "guest RAM size {0} bytes is invalid: it must be a multiple of 4 KiB between 16 MiB and 1 TiB"
    )]
    InvalidSize(u64),
    /// The backing file is too small or could not be sized.
    #[error("backing file for guest RAM: {0}")]
    BackingFile(#[source] std::io::Error),
    /// A private file mapping could not be made.
    #[error("mapping guest RAM from a file: {0}")]
    PrivateMap(String),
    /// vm-memory refused the layout or the mapping failed.
    #[error("mapping guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start address.
    pub start: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// First address past the range.
    pub fn end(&self) -> u64 {
        self.start.raw_value() + self.len
    }
}

/// Where RAM sits in the guest physical address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    ranges: Vec<RamRange>,
}

impl MemoryLayout {
    /// The x86_64 layout for `size` bytes of RAM: up to 3 GiB below the MMIO
    /// gap, the remainder from 4 GiB up.
    pub fn x86_64(size: u64) -> Result<Self> {
        if !(MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&size) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidSize(size));
        }
        let low = size.min(MMIO_GAP_START);
        let mut ranges = vec![RamRange {
            start: GuestAddress(0),
            len: low,
        }];
        if size > low {
            ranges.push(RamRange {
                start: GuestAddress(MMIO_GAP_END),
                len: size - low,
            });
        }
        Ok(Self { ranges })
    }

    /// The aarch64 layout for `size` bytes of RAM: one range from
    /// [`AARCH64_RAM_START`] up, with all of the MMIO space below it.
    pub fn aarch64(size: u64) -> Result<Self> {
        if !(MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&size) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidSize(size));
        }
        Ok(Self {
            ranges: vec![RamRange {
                start: GuestAddress(AARCH64_RAM_START),
                len: size,
            }],
        })
    }

    /// The RAM ranges, sorted by address.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// The lowest RAM range (from address 0 on x86_64, from
    /// [`AARCH64_RAM_START`] on aarch64; always present).
    pub fn low_range(&self) -> RamRange {
        self.ranges[0]
    }
}

/// Guest RAM, mapped into this process.
#[derive(Debug)]
pub struct GuestRam {
    layout: MemoryLayout,
    memory: GuestMemoryMmapped,
}

impl GuestRam {
    /// Private anonymous memory, zero-filled, populated on first touch.
    pub fn anonymous(layout: &MemoryLayout) -> Result<Self> {
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = layout
            .ranges
            .iter()
            .map(|r| (r.start, r.len as usize, None))
            .collect();
        Ok(Self {
            layout: layout.clone(),
            memory: GuestMemoryMmap::from_ranges_with_files(ranges)?,
        })
    }

    /// Shared mapping of `file`, the layout's ranges stored back to back from
    /// offset 0. The file is grown to the total RAM size if it is shorter.
    /// Writes by the guest land in the file.
    pub fn file_backed(layout: &MemoryLayout, file: File) -> Result<Self> {
        let total = layout.total_bytes();
        let current = file.metadata().map_err(Error::BackingFile)?.len();
        if current < total {
            file.set_len(total).map_err(Error::BackingFile)?;
        }
        let file = std::sync::Arc::new(file);
        let mut offset = 0u64;
        let mut ranges = Vec::with_capacity(layout.ranges.len());
        for r in &layout.ranges {
            ranges.push((
                r.start,
                r.len as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            ));
            offset += r.len;
        }
        Ok(Self {
            layout: layout.clone(),
            memory: GuestMemoryMmap::from_ranges_with_files(ranges)?,
        })
    }

    /// A private copy-on-write mapping of `file` (a snapshot's memory
    /// file), the layout's ranges stored back to back from offset 0. Pages
    /// come in from the page cache on first touch and are shared with
    /// every other private mapping of the same file until written; the
    /// guest's writes stay in this process and never reach the file.
    /// The file must hold the whole layout.
    pub fn private_file(layout: &MemoryLayout, file: File) -> Result<Self> {
        let total = layout.total_bytes();
        let len = file.metadata().map_err(Error::BackingFile)?.len();
        if len != total {
            return Err(Error::BackingFile(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("holds {len} bytes, the layout needs {total}"),
            )));
        }
        let file = std::sync::Arc::new(file);
        let mut offset = 0u64;
        let mut regions = Vec::with_capacity(layout.ranges.len());
        for r in &layout.ranges {
            let mapping = private_region(r.len, FileOffset::from_arc(file.clone(), offset))?;
            regions.push(
                vm_memory::GuestRegionMmap::new(mapping, r.start)
                    .ok_or_else(|| Error::PrivateMap("range overflows the address space".into()))?,
            );
            offset += r.len;
        }
        Ok(Self {
            layout: layout.clone(),
            memory: GuestMemoryMmap::from_regions(regions)
                .map_err(|e| Error::PrivateMap(e.to_string()))?,
        })
    }

    /// The layout this RAM was built from.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The bounds-checked guest memory.
    pub fn memory(&self) -> &GuestMemoryMmapped {
        &self.memory
    }

    /// Every mapped region as (guest address, length, host address), for
    /// registering with a hypervisor. The host addresses stay valid for as
    /// long as this `GuestRam` lives.
    pub fn host_mappings(&self) -> Vec<HostMapping> {
        self.memory
            .iter()
            .map(|region| HostMapping {
                guest_addr: region.start_addr().raw_value(),
                len: region.len(),
                host_addr: region.as_ptr() as u64,
            })
            .collect()
    }
}

/// `len` bytes of `file` from its offset, mapped private copy-on-write.
#[cfg(unix)]
fn private_region(len: u64, file: FileOffset) -> Result<vm_memory::MmapRegion<()>> {
    vm_memory::mmap::MmapRegionBuilder::new(len as usize)
        .with_file_offset(file)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
        .build()
        .map_err(|e| Error::PrivateMap(e.to_string()))
}

/// Copy-on-write file mappings (`MapViewOfFile` with `FILE_MAP_COPY`)
/// are not written for Windows yet.
#[cfg(not(unix))]
fn private_region(_len: u64, _file: FileOffset) -> Result<vm_memory::MmapRegion<()>> {
    Err(Error::PrivateMap(
        "copy-on-write mappings of a snapshot's memory are not implemented on Windows yet".into(),
    ))
}

/// A file that guest memory can be read from and written to on every
/// host, for code generic over vm-memory's `ReadVolatile` and
/// `WriteVolatile` (kernel loaders, block I/O). vm-memory implements those
/// for `File` only with its `rawfd` feature, which it refuses on Windows.
/// On Unix this moves bytes straight between the file and guest memory;
/// elsewhere through a bounce buffer.
#[derive(Debug)]
pub struct VolatileFile<'a> {
    file: &'a mut File,
}

impl<'a> VolatileFile<'a> {
    /// Reads and writes `file` at its current offset.
    pub fn new(file: &'a mut File) -> Self {
        Self { file }
    }
}

impl std::io::Read for VolatileFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl std::io::Write for VolatileFile<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl std::io::Seek for VolatileFile<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl vm_memory::ReadVolatile for VolatileFile<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<'_, B>,
    ) -> std::result::Result<usize, vm_memory::VolatileMemoryError> {
        #[cfg(unix)]
        return self.file.read_volatile(buf);
        #[cfg(not(unix))]
        return read_through_bounce(self.file, buf);
    }
}

impl vm_memory::WriteVolatile for VolatileFile<'_> {
    fn write_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, B>,
    ) -> std::result::Result<usize, vm_memory::VolatileMemoryError> {
        #[cfg(unix)]
        return self.file.write_volatile(buf);
        #[cfg(not(unix))]
        return write_through_bounce(self.file, buf);
    }
}

/// Fills `buf` from `src` through a 64 KiB buffer, stopping early only at
/// the end of `src` (vm-memory reads each region with one call).
#[cfg_attr(unix, allow(dead_code))]
fn read_through_bounce<R: std::io::Read, B: vm_memory::bitmap::BitmapSlice>(
    src: &mut R,
    buf: &mut VolatileSlice<'_, B>,
) -> std::result::Result<usize, vm_memory::VolatileMemoryError> {
    let mut bounce = vec![0u8; buf.len().min(BOUNCE_BYTES)];
    let mut done = 0;
    while done < buf.len() {
        let want = (buf.len() - done).min(bounce.len());
        let n = match src.read(&mut bounce[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(vm_memory::VolatileMemoryError::IOError(e)),
        };
        buf.offset(done)?.copy_from(&bounce[..n]);
        done += n;
    }
    Ok(done)
}

/// Writes all of `buf` to `dst` through a 64 KiB buffer.
#[cfg_attr(unix, allow(dead_code))]
fn write_through_bounce<W: std::io::Write, B: vm_memory::bitmap::BitmapSlice>(
    dst: &mut W,
    buf: &VolatileSlice<'_, B>,
) -> std::result::Result<usize, vm_memory::VolatileMemoryError> {
    let mut bounce = vec![0u8; buf.len().min(BOUNCE_BYTES)];
    let mut done = 0;
    while done < buf.len() {
        let n = (buf.len() - done).min(bounce.len());
        buf.offset(done)?.copy_to(&mut bounce[..n]);
        dst.write_all(&bounce[..n])
            .map_err(vm_memory::VolatileMemoryError::IOError)?;
        done += n;
    }
    Ok(done)
}

#[cfg_attr(unix, allow(dead_code))]
const BOUNCE_BYTES: usize = 64 << 10;

/// A region of guest RAM and where it is mapped in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMapping {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Start of the mapping in this process.
    pub host_addr: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn file_reader_fills_guest_memory_from_the_file_offset() {
        let data = pattern(300 << 10);
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        file.seek(SeekFrom::Start(1000)).unwrap();
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
        let len = data.len() - 1000;
        ram.memory()
            .read_exact_volatile_from(GuestAddress(0x1234), &mut VolatileFile::new(&mut file), len)
            .unwrap();
        let mut back = vec![0u8; len];
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x1234))
            .unwrap();
        assert_eq!(back, data[1000..]);
    }

    /// The path Windows takes, driven here through any `Read`.
    struct Bounced<R>(R);

    impl<R: Read> vm_memory::ReadVolatile for Bounced<R> {
        fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
            &mut self,
            buf: &mut VolatileSlice<'_, B>,
        ) -> std::result::Result<usize, vm_memory::VolatileMemoryError> {
            read_through_bounce(&mut self.0, buf)
        }
    }

    #[test]
    fn bounced_reads_fill_guest_memory_across_many_buffers() {
        let data = pattern((200 << 10) + 17);
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
        ram.memory()
            .read_exact_volatile_from(GuestAddress(0x10_0001), &mut Bounced(&data[..]), data.len())
            .unwrap();
        let mut back = vec![0u8; data.len()];
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x10_0001))
            .unwrap();
        assert_eq!(back, data);
    }

    impl<W: std::io::Write> vm_memory::WriteVolatile for Bounced<W> {
        fn write_volatile<B: vm_memory::bitmap::BitmapSlice>(
            &mut self,
            buf: &VolatileSlice<'_, B>,
        ) -> std::result::Result<usize, vm_memory::VolatileMemoryError> {
            write_through_bounce(&mut self.0, buf)
        }
    }

    #[test]
    fn bounced_writes_take_guest_memory_across_many_buffers() {
        let data = pattern((150 << 10) + 3);
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
        ram.memory()
            .write_slice(&data, GuestAddress(0x2_0003))
            .unwrap();
        let mut out = Bounced(Vec::new());
        ram.memory()
            .write_all_volatile_to(GuestAddress(0x2_0003), &mut out, data.len())
            .unwrap();
        assert_eq!(out.0, data);
    }

    #[test]
    fn volatile_file_writes_guest_memory_at_the_file_offset() {
        let data = pattern(100 << 10);
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
        ram.memory()
            .write_slice(&data, GuestAddress(0x5000))
            .unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.seek(SeekFrom::Start(512)).unwrap();
        ram.memory()
            .write_all_volatile_to(
                GuestAddress(0x5000),
                &mut VolatileFile::new(&mut file),
                data.len(),
            )
            .unwrap();
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back[..512], [0u8; 512]);
        assert_eq!(back[512..], data);
    }

    #[test]
    fn bounced_read_past_the_end_of_its_source_fails_the_read() {
        let data = pattern(100);
        let ram = GuestRam::anonymous(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
        let err = ram
            .memory()
            .read_exact_volatile_from(GuestAddress(0), &mut Bounced(&data[..]), 101)
            .unwrap_err();
        assert!(
            matches!(err, GuestMemoryError::PartialBuffer { completed: 100, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn small_guest_is_one_low_range() {
        let layout = MemoryLayout::x86_64(256 << 20).unwrap();
        assert_eq!(
            layout.ranges(),
            &[RamRange {
                start: GuestAddress(0),
                len: 256 << 20
            }]
        );
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let layout = MemoryLayout::x86_64(4 << 30).unwrap();
        assert_eq!(layout.ranges().len(), 2);
        assert_eq!(layout.ranges()[0].end(), MMIO_GAP_START);
        assert_eq!(layout.ranges()[1].start, GuestAddress(MMIO_GAP_END));
        assert_eq!(layout.ranges()[1].len, 1 << 30);
        assert_eq!(layout.total_bytes(), 4 << 30);
    }

    #[test]
    fn invalid_sizes_are_refused() {
        for size in [0, 4096, (16 << 20) + 1, MAX_RAM_BYTES + 4096] {
            assert!(
                matches!(MemoryLayout::x86_64(size), Err(Error::InvalidSize(s)) if s == size),
                "{size}"
            );
        }
    }

    #[test]
    fn access_outside_ram_fails_instead_of_touching_host_memory() {
        let layout = MemoryLayout::x86_64(4 << 30).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let mem = ram.memory();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        // Inside the MMIO gap: no RAM there.
        assert!(mem.read_obj::<u32>(GuestAddress(MMIO_GAP_START)).is_err());
        // Straddling the end of the low range.
        assert!(
            mem.write_obj(0u64, GuestAddress(MMIO_GAP_START - 4))
                .is_err()
        );
        // Past the end of all RAM, and at the very top of the address space.
        assert!(
            mem.read_obj::<u8>(GuestAddress(MMIO_GAP_END + (1 << 30)))
                .is_err()
        );
        assert!(mem.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
        // The high range is usable.
        mem.write_obj(7u8, GuestAddress(MMIO_GAP_END)).unwrap();
    }

    #[test]
    fn file_backed_ram_writes_through_to_the_file() {
        let layout = MemoryLayout::x86_64(32 << 20).unwrap();
        let file = tempfile::tempfile().unwrap();
        let mut reader = file.try_clone().unwrap();
        let ram = GuestRam::file_backed(&layout, file).unwrap();
        assert_eq!(reader.metadata().unwrap().len(), 32 << 20);
        ram.memory()
            .write_slice(b"snapshot", GuestAddress(0x20_0000))
            .unwrap();
        reader.seek(SeekFrom::Start(0x20_0000)).unwrap();
        let mut buf = [0u8; 8];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"snapshot");
    }

    #[test]
    fn aarch64_ram_is_one_range_above_the_devices() {
        let layout = MemoryLayout::aarch64(6 << 30).unwrap();
        assert_eq!(
            layout.ranges(),
            &[RamRange {
                start: GuestAddress(AARCH64_RAM_START),
                len: 6 << 30
            }]
        );
        assert_eq!(layout.low_range().start, GuestAddress(AARCH64_RAM_START));
        assert!(MemoryLayout::aarch64(8 << 20).is_err());
        assert!(MemoryLayout::aarch64((64 << 20) + 1).is_err());
        let ram = GuestRam::anonymous(&MemoryLayout::aarch64(32 << 20).unwrap()).unwrap();
        let mem = ram.memory();
        assert!(mem.write_obj(1u8, GuestAddress(0)).is_err(), "no RAM at 0");
        mem.write_obj(1u8, GuestAddress(AARCH64_RAM_START)).unwrap();
        assert!(
            mem.write_obj(1u8, GuestAddress(AARCH64_RAM_START + (32 << 20)))
                .is_err()
        );
    }

    #[test]
    fn host_mappings_cover_every_range() {
        let layout = MemoryLayout::x86_64(4 << 30).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let maps = ram.host_mappings();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].guest_addr, 0);
        assert_eq!(maps[1].guest_addr, MMIO_GAP_END);
        assert!(maps.iter().all(|m| m.host_addr != 0));
    }
}
