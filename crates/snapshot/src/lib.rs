//! The two files of a snapshot.
//!
//! - The **state file**: a 32-byte header (magic, format version, payload
//!   length, CRC-32 of the payload) and a postcard-encoded payload
//!   whose schema belongs to the caller (the VMM's `MachineState`). Every
//!   byte is checked before anything is decoded: a truncated, extended or
//!   altered file, or one of another format version, is refused with the
//!   reason.
//! - The **memory file**: guest RAM, its ranges back to back, written
//!   sparsely (an all-zero page is a hole that costs no disk), then mapped
//!   private copy-on-write by every restore (`GuestRam::private_file`).
//!
//! Both are written to a temporary name and renamed into place, so a crash
//! never leaves a half-written file under the final name.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use supermachine_memory::{GuestMemoryBackend, GuestMemoryMmapped, GuestMemoryRegion};

/// The first 8 bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"SMSNAPST";
/// Bytes before the payload: magic, version (u32), reserved (u32),
/// payload length (u64), CRC-32 (u32), reserved (u32) - little-endian.
pub const HEADER_LEN: usize = 32;
/// The largest payload we read: far above any real machine's state
/// (about 10 KiB per vCPU), far below what could exhaust memory.
pub const MAX_PAYLOAD: u64 = 64 << 20;
const PAGE: usize = 4096;

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state file is not a snapshot state file, or is damaged.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The state file was written by another format version.
    #[error(
        "{path}: snapshot format version {found}, this build reads version {expected} (take the snapshot again)"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The state could not be encoded.
    #[error("encoding snapshot state: {0}")]
    Encode(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file written under a temporary name beside its final one, renamed
/// into place by `commit` and removed if dropped before.
struct PendingFile {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<File>,
}

impl PendingFile {
    fn create(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(io_at(&tmp))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("present until commit")
    }

    fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("present until commit");
        file.sync_all().map_err(io_at(&self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io_at(&self.path))
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `state` as a state file of format `version` at `path`.
pub fn write_state<T: Serialize>(path: &Path, version: u32, state: &T) -> Result<()> {
    let payload = postcard::to_stdvec(state).map_err(|e| Error::Encode(e.to_string()))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&STATE_MAGIC);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&payload);
    let pending = PendingFile::create(path)?;
    let mut file = pending.file();
    file.write_all(&bytes).map_err(io_at(&pending.tmp))?;
    pending.commit()
}

/// Reads a state file of format `version` written by [`write_state`].
pub fn read_state<T: DeserializeOwned>(path: &Path, version: u32) -> Result<T> {
    let corrupt = |why: String| Error::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let mut file = File::open(path).map_err(io_at(path))?;
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = file.read(&mut header[got..]).map_err(io_at(path))?;
        if n == 0 {
            return Err(corrupt(format!(
                "truncated: {got} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        got += n;
    }
    if header[..8] != STATE_MAGIC {
        return Err(corrupt("not a supermachine snapshot state file".into()));
    }
    let field32 = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let found = field32(8);
    if found != version {
        return Err(Error::Version {
            path: path.to_path_buf(),
            found,
            expected: version,
        });
    }
    let len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(corrupt(format!("payload length {len} is implausible")));
    }
    let mut payload = Vec::with_capacity(len as usize);
    file.take(len + 1)
        .read_to_end(&mut payload)
        .map_err(io_at(path))?;
    if payload.len() as u64 != len {
        return Err(corrupt(if (payload.len() as u64) < len {
            format!(
                "truncated: the header promises {len} bytes of state, the file holds {}",
                payload.len()
            )
        } else {
            "bytes after the end of the state".into()
        }));
    }
    if crc32fast::hash(&payload) != field32(24) {
        return Err(corrupt(
            "checksum mismatch: the state was altered or damaged".into(),
        ));
    }
    let (state, rest) = postcard::take_from_bytes(&payload)
        .map_err(|e| corrupt(format!("malformed state: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} unread bytes after the state",
            rest.len()
        )));
    }
    Ok(state)
}

/// What writing a memory file did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryFileStats {
    /// Guest RAM covered (the file's length).
    pub total_bytes: u64,
    /// Bytes actually written (pages that are not all zero).
    pub data_bytes: u64,
}

/// Writes every region of `mem`, in order and back to back, to a new
/// sparse file at `path`. Call with the guest paused.
pub fn write_memory(path: &Path, mem: &GuestMemoryMmapped) -> Result<MemoryFileStats> {
    const CHUNK: usize = 2 << 20;
    let pending = PendingFile::create(path)?;
    let file = pending.file();
    let at = || io_at(&pending.tmp);
    let mut buf = vec![0u8; CHUNK];
    let mut stats = MemoryFileStats::default();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut done = 0usize;
        while done < len {
            let n = CHUNK.min(len - done);
            let slice = region
                .get_slice(supermachine_memory::MemoryRegionAddress(done as u64), n)
                .map_err(|e| Error::Io {
                    path: pending.tmp.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
            slice.copy_to(&mut buf[..n]);
            // Write the runs of non-zero pages; zero pages stay holes.
            let mut page = 0;
            while page < n {
                if is_zero(&buf[page..page + PAGE]) {
                    page += PAGE;
                    continue;
                }
                let start = page;
                while page < n && !is_zero(&buf[page..page + PAGE]) {
                    page += PAGE;
                }
                write_all_at(file, &buf[start..page], file_offset + (done + start) as u64)
                    .map_err(at())?;
                stats.data_bytes += (page - start) as u64;
            }
            done += n;
        }
        file_offset += len as u64;
    }
    file.set_len(file_offset).map_err(at())?;
    stats.total_bytes = file_offset;
    pending.commit()?;
    Ok(stats)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits
        // the slice at aligned boundaries.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes all of `buf` at `offset` without moving the file's cursor.
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_write(file, buf, offset) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;
    use supermachine_memory::{Bytes, GuestAddress, GuestRam, MemoryLayout};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            values: (0..100).collect(),
        }
    }

    #[test]
    fn state_round_trips_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_state(&path, 3, &sample()).unwrap();
        assert_eq!(read_state::<Sample>(&path, 3).unwrap(), sample());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn every_damaged_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_state(&path, 3, &sample()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad");
        let refused = |bytes: &[u8]| {
            std::fs::write(&bad, bytes).unwrap();
            read_state::<Sample>(&bad, 3).unwrap_err().to_string()
        };
        // Every truncation.
        for cut in 0..good.len() {
            let e = refused(&good[..cut]);
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        // Every single-bit flip anywhere in the file.
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[byte] ^= 1 << bit;
                if (12..16).contains(&byte) || (28..32).contains(&byte) {
                    continue; // reserved fields
                }
                let _ = refused(&b);
            }
        }
        let mut extended = good.clone();
        extended.push(0);
        assert!(refused(&extended).contains("after the end"));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(refused(&flipped).contains("checksum"));
        assert!(refused(b"#!/bin/sh\necho this is not a snapshot state file").contains("not a"));
        let e = read_state::<Sample>(&path, 4).unwrap_err().to_string();
        assert!(
            e.contains("format version 3, this build reads version 4"),
            "{e}"
        );
    }

    #[test]
    fn memory_file_is_sparse_and_maps_back_private() {
        let layout = MemoryLayout::x86_64(64 << 20).unwrap();
        let ram = GuestRam::anonymous(&layout).unwrap();
        let mem = ram.memory();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(40 << 20))
            .unwrap();
        mem.write_slice(b"last", GuestAddress((64 << 20) - 4))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let stats = write_memory(&path, mem).unwrap();
        assert_eq!(stats.total_bytes, 64 << 20);
        assert_eq!(stats.data_bytes, 5 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        }

        // Copy-on-write file views are not written for Windows: a restore
        // there says so instead of mapping.
        #[cfg(windows)]
        {
            let e = GuestRam::private_file(&layout, File::open(&path).unwrap()).unwrap_err();
            assert!(e.to_string().contains("not implemented on Windows"), "{e}");
            return;
        }
        #[cfg_attr(windows, allow(unreachable_code))]
        let before = std::fs::read(&path).unwrap();
        let a = GuestRam::private_file(&layout, File::open(&path).unwrap()).unwrap();
        let b = GuestRam::private_file(&layout, File::open(&path).unwrap()).unwrap();
        let mut word = [0u8; 10];
        a.memory().read_slice(&mut word, GuestAddress(0)).unwrap();
        assert_eq!(&word, b"first page");
        a.memory()
            .write_slice(b"written by a", GuestAddress(0))
            .unwrap();
        b.memory().read_slice(&mut word, GuestAddress(0)).unwrap();
        assert_eq!(&word, b"first page", "b sees a's write");
        assert_eq!(std::fs::read(&path).unwrap(), before, "the file changed");
        let e = GuestRam::private_file(
            &MemoryLayout::x86_64(128 << 20).unwrap(),
            File::open(&path).unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("holds 67108864 bytes"), "{e}");
    }
}
