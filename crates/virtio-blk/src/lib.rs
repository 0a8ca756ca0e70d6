//! virtio-blk on a raw image file.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use supermachine_memory::{GuestMemoryMmapped, VolatileFile};
use supermachine_virtio_mmio::{ActiveDevice, VirtioDevice, read_config_bytes};
use supermachine_virtq::{Chain, Reader, Writer};
use virtio_bindings::virtio_blk as vb;
use vm_memory::{ByteValued, Le32, Le64};

/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments a request may have (besides header and status).
pub const SEG_MAX: u32 = 126;
/// Most segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Most sectors one discard or write-zeroes segment may cover (2 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> 1) / SECTOR_SIZE as u32;
/// The ID's length (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
const VIRTIO_ID_BLOCK: u32 = 2;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is not a regular file or block device.
    #[error("disk image {0}: not a regular file")]
    NotAFile(PathBuf),
}

/// The request header the driver sends first.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    kind: Le32,
    reserved: Le32,
    sector: Le64,
}
// SAFETY: plain integers, repr(C), no padding (4 + 4 + 8).
unsafe impl ByteValued for RequestHeader {}

/// One discard or write-zeroes segment.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: plain integers, repr(C), no padding (8 + 4 + 4).
unsafe impl ByteValued for DiscardSegment {}

/// How a request ended, as the status byte tells the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => vb::VIRTIO_BLK_S_OK,
            Status::IoError => vb::VIRTIO_BLK_S_IOERR,
            Status::Unsupported => vb::VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    active: Option<ActiveDevice>,
}

impl Block {
    /// Opens `path` (read-write unless `read_only`). Its size, rounded down
    /// to whole sectors, is the disk's capacity.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let open_error = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        if !meta.is_file() {
            return Err(Error::NotAFile(path.to_path_buf()));
        }
        if meta.len() % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {}: the last {} bytes are not a whole sector and are not visible",
                path.display(),
                meta.len() % SECTOR_SIZE
            );
        }
        let mut id = [0u8; ID_BYTES];
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            read_only,
            capacity: meta.len() / SECTOR_SIZE,
            id,
            active: None,
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &1u32.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]);
        c
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let ActiveDevice {
            mem,
            queues,
            interrupt,
            ..
        } = active;
        let Some(queue) = queues.first_mut() else {
            return;
        };
        let (file, read_only, capacity, id) =
            (&mut self.file, self.read_only, self.capacity, &self.id);
        let result = queue.drain(mem, |chain| {
            handle_request(file, read_only, capacity, id, mem, chain)
        });
        let path = self.path.display();
        if !interrupt.after_queue_work(result, &format_args!("virtio-blk {path}")) {
            self.active = None;
        }
    }
}

/// Serves one request; returns the bytes written into the chain.
fn handle_request(
    file: &mut File,
    read_only: bool,
    capacity: u64,
    id: &[u8; ID_BYTES],
    mem: &GuestMemoryMmapped,
    chain: &Chain,
) -> u32 {
    let mut writer = Writer::new(mem, chain.writable());
    let Some(mut status) = writer.split_tail(1) else {
        log::warn!("virtio-blk: request {} has no status byte", chain.head());
        return 0;
    };
    let mut reader = Reader::new(mem, chain.readable());
    let result = match reader.read_obj::<RequestHeader>() {
        Ok(header) => serve(
            file,
            read_only,
            capacity,
            id,
            header,
            &mut reader,
            &mut writer,
        ),
        Err(_) => {
            log::warn!("virtio-blk: request {} has a short header", chain.head());
            Status::IoError
        }
    };
    if status.write_obj(result.byte()).is_err() {
        return 0;
    }
    // The status byte was counted when split off: data + 1.
    (writer.written() + 1) as u32
}

/// The byte range of `len` bytes at `sector`, if it lies inside the disk.
fn disk_range(capacity: u64, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= capacity.checked_mul(SECTOR_SIZE)?).then_some(offset)
}

fn serve(
    file: &mut File,
    read_only: bool,
    capacity: u64,
    id: &[u8; ID_BYTES],
    header: RequestHeader,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
) -> Status {
    let sector = header.sector.to_native();
    match header.kind.to_native() {
        vb::VIRTIO_BLK_T_IN => {
            let len = writer.remaining();
            let Some(offset) = disk_range(capacity, sector, len as u64) else {
                log::warn!("virtio-blk: read of {len} bytes at sector {sector} is past the end");
                return Status::IoError;
            };
            io_status(read_into(file, offset, writer, len))
        }
        vb::VIRTIO_BLK_T_OUT => {
            if read_only {
                return Status::IoError;
            }
            let len = reader.remaining();
            let Some(offset) = disk_range(capacity, sector, len as u64) else {
                log::warn!("virtio-blk: write of {len} bytes at sector {sector} is past the end");
                return Status::IoError;
            };
            io_status(write_from(file, offset, reader, len))
        }
        vb::VIRTIO_BLK_T_FLUSH => {
            if read_only {
                Status::Ok
            } else {
                io_status(file.sync_data())
            }
        }
        vb::VIRTIO_BLK_T_GET_ID => {
            let n = writer.remaining().min(ID_BYTES);
            io_status(std::io::Write::write_all(writer, &id[..n]))
        }
        kind @ (vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES) => {
            if read_only {
                return Status::IoError;
            }
            discard_or_zero(file, capacity, kind == vb::VIRTIO_BLK_T_DISCARD, reader)
        }
        other => {
            log::debug!("virtio-blk: unsupported request type {other}");
            Status::Unsupported
        }
    }
}

fn io_status(result: io::Result<()>) -> Status {
    match result {
        Ok(()) => Status::Ok,
        Err(e) => {
            log::warn!("virtio-blk: {e}");
            Status::IoError
        }
    }
}

fn read_into(file: &mut File, offset: u64, writer: &mut Writer<'_>, len: usize) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    let mut done = 0;
    while done < len {
        match writer.copy_from(&mut VolatileFile::new(file), len - done)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image shrank")),
            n => done += n,
        }
    }
    Ok(())
}

fn write_from(file: &mut File, offset: u64, reader: &mut Reader<'_>, len: usize) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    let mut done = 0;
    while done < len {
        match reader.copy_to(&mut VolatileFile::new(file), len - done)? {
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            n => done += n,
        }
    }
    Ok(())
}

fn discard_or_zero(
    file: &mut File,
    capacity: u64,
    discard: bool,
    reader: &mut Reader<'_>,
) -> Status {
    let count = reader.remaining() / std::mem::size_of::<DiscardSegment>();
    if count == 0 || count > MAX_DISCARD_SEGMENTS as usize {
        return Status::IoError;
    }
    for _ in 0..count {
        let Ok(seg) = reader.read_obj::<DiscardSegment>() else {
            return Status::IoError;
        };
        let (sector, sectors, flags) = (
            seg.sector.to_native(),
            seg.num_sectors.to_native(),
            seg.flags.to_native(),
        );
        if sectors > MAX_DISCARD_SECTORS || flags & !vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Status::Unsupported;
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let Some(offset) = disk_range(capacity, sector, len) else {
            return Status::IoError;
        };
        let unmap = discard || flags & vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let result = if unmap {
            supermachine_host::punch_hole(file, offset, len)
        } else {
            supermachine_host::zero_range(file, offset, len)
        };
        match result {
            Ok(()) => {}
            // Discard is a hint: a filesystem without holes may ignore it.
            Err(_) if discard => {}
            Err(e) => {
                log::debug!("virtio-blk: zeroing in place: {e}; writing zeroes");
                if let Err(e) = write_zeroes(file, offset, len) {
                    log::warn!("virtio-blk: write zeroes: {e}");
                    return Status::IoError;
                }
            }
        }
    }
    Status::Ok
}

fn write_zeroes(file: &mut File, offset: u64, len: u64) -> io::Result<()> {
    use std::io::Write;
    let zeroes = vec![0u8; 64 << 10];
    file.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(zeroes.len() as u64) as usize;
        file.write_all(&zeroes[..n])?;
        left -= n as u64;
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << vb::VIRTIO_BLK_F_SEG_MAX)
            | (1 << vb::VIRTIO_BLK_F_BLK_SIZE)
            | (1 << vb::VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << vb::VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << vb::VIRTIO_BLK_F_DISCARD) | (1 << vb::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, device: ActiveDevice) -> Result<(), supermachine_virtio_mmio::Error> {
        if device.queues.len() != 1 {
            return Err(supermachine_virtio_mmio::Error::Activate(format!(
                "virtio-blk has one queue, got {}",
                device.queues.len()
            )));
        }
        self.active = Some(device);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Option<Vec<supermachine_virtio_mmio::QueueState>> {
        // Requests are served whole as they arrive: nothing is held.
        self.active.as_ref().map(ActiveDevice::queue_states)
    }

    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }
}
