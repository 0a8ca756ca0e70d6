//! The content store: blobs by digest, and a record per image.
//!
//! ```text
//! <root>/blobs/sha256/<hex>      verified blobs (manifests, configs, layers)
//! <root>/images/<key>.json       one record per image reference
//! <root>/rootfs/<key>.<fs>       disk images built from an image
//! <root>/tmp/<pid>-...           files being written
//! ```
//!
//! Nothing appears under `blobs/`, `images/` or `rootfs/` except by an
//! atomic rename of a complete, verified file from `tmp/` (same file
//! system), so an interrupted pull, a crash or a full disk never leaves a
//! corrupt entry. Temporary files of processes that no longer exist are
//! removed when the store is opened.
//!
//! Processes share a store through `<root>/lock`: pulls, loads and disk
//! builds hold it shared while they add blobs and records; garbage
//! collection holds it exclusively, so it never removes a blob that an
//! unfinished pull has stored but not yet recorded.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::digest::{Digest, Hasher};

/// Largest manifest, index or config accepted (registries cap manifests
/// at 4 MiB; configs are small).
pub const MAX_JSON_BLOB: u64 = 16 << 20;

/// The content store.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// A lock on the store, released on drop (see the module docs).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// One layer of a stored image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The compressed blob's digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// The uncompressed tar's digest (from the config).
    pub diff_id: String,
}

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalized reference (`docker.io/library/alpine:latest`).
    pub reference: String,
    /// The manifest's digest (the image ID users see).
    pub manifest_digest: String,
    /// The config blob's digest.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Seconds since the epoch when it was stored.
    pub stored_at: u64,
}

impl ImageRecord {
    /// Compressed size of all layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

impl Store {
    /// The store under the user's cache directory
    /// (`$XDG_CACHE_HOME/supermachine/oci`, else `~/.cache/supermachine/oci`;
    /// `%LOCALAPPDATA%\supermachine\oci` on Windows).
    pub fn open_default() -> Result<Self, Error> {
        let cache = supermachine_host::user_cache_dir().ok_or(Error::NoCacheDir)?;
        Self::open(&cache.join("supermachine").join("oci"))
    }

    /// Opens (creating) a store at `root`.
    pub fn open(root: &Path) -> Result<Self, Error> {
        for dir in ["blobs/sha256", "blobs/sha512", "images", "rootfs", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path)
                .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
        }
        let store = Self {
            root: root.to_path_buf(),
        };
        store.remove_orphaned_temporaries();
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Waits for, and holds, the lock shared by everything that adds to
    /// the store.
    pub fn lock_shared(&self) -> Result<StoreLock, Error> {
        self.lock(fs::File::lock_shared)
    }

    fn lock_exclusive(&self) -> Result<StoreLock, Error> {
        self.lock(fs::File::lock)
    }

    /// A whole-file lock on `<root>/lock` (`flock` on Unix, `LockFileEx`
    /// on Windows): released when the file closes, also when the process
    /// dies.
    fn lock(&self, lock: fn(&fs::File) -> std::io::Result<()>) -> Result<StoreLock, Error> {
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(format!("opening {}", path.display()), e))?;
        lock(&file).map_err(|e| io_error("locking the image store".into(), e))?;
        Ok(StoreLock { _file: file })
    }

    fn remove_orphaned_temporaries(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(supermachine_host::process_exists);
            if !alive {
                let path = entry.path();
                let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
            }
        }
    }

    /// A temporary path in the store, on its file system, removed on drop
    /// unless persisted.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, Error> {
        tempfile::Builder::new()
            .prefix(&format!("{}-", std::process::id()))
            .tempfile_in(self.root.join("tmp"))
            .map_err(|e| io_error("creating a temporary file in the store".into(), e))
    }

    /// A temporary directory in the store, removed on drop.
    pub fn temp_dir(&self) -> Result<tempfile::TempDir, Error> {
        tempfile::Builder::new()
            .prefix(&format!("{}-", std::process::id()))
            .tempdir_in(self.root.join("tmp"))
            .map_err(|e| io_error("creating a temporary directory in the store".into(), e))
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.layout_path())
    }

    /// Whether the blob is stored with this size (blobs are verified before
    /// they are stored).
    pub fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// A writer for the blob `digest` of `size` bytes (when known): the
    /// blob is stored by [`BlobWriter::commit`] only if both match.
    pub fn blob_writer(&self, digest: &Digest, size: Option<u64>) -> Result<BlobWriter, Error> {
        Ok(BlobWriter {
            file: self.temp_file()?,
            hasher: digest.hasher(),
            expected: digest.clone(),
            size,
            dest: self.blob_path(digest),
        })
    }

    /// Stores `bytes` as the blob `digest`, verifying it. A blob already
    /// stored is not written again (a cached pull fetches its manifest
    /// every time), but `bytes` are still checked against the digest.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), Error> {
        if self.has_blob(digest, bytes.len() as u64) {
            return digest.verify_bytes(None, bytes);
        }
        let mut w = self.blob_writer(digest, Some(bytes.len() as u64))?;
        w.write_all(bytes)
            .map_err(|e| io_error(format!("writing blob {digest}"), e))?;
        w.commit()
    }

    /// Moves `path`, a file in the store's temporary space whose content
    /// the caller has verified to be `digest`, into place as that blob.
    pub(crate) fn adopt(&self, path: &Path, digest: &Digest) -> Result<(), Error> {
        // Written for syncing: Windows flushes only through a handle that
        // may write.
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(path, self.blob_path(digest)))
            .map_err(|e| io_error(format!("storing blob {digest}"), e))
    }

    /// Opens a stored blob.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, Error> {
        File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::MissingBlob(digest.to_string()),
            _ => io_error(format!("opening blob {digest}"), e),
        })
    }

    /// Reads a small stored blob (a manifest or config), at most
    /// [`MAX_JSON_BLOB`] bytes.
    pub fn read_small_blob(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .take(MAX_JSON_BLOB + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error(format!("reading blob {digest}"), e))?;
        if bytes.len() as u64 > MAX_JSON_BLOB {
            return Err(Error::Invalid(format!(
                "blob {digest} is larger than {MAX_JSON_BLOB} bytes"
            )));
        }
        Ok(bytes)
    }

    fn image_path(&self, reference: &str) -> PathBuf {
        self.root.join("images").join(format!(
            "{}.json",
            Digest::sha256_of(reference.as_bytes()).hex()
        ))
    }

    /// Records an image (replacing the record for the same reference).
    pub fn save_image(&self, record: &ImageRecord) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::Invalid(format!("encoding the image record: {e}")))?;
        self.write_atomically(&self.image_path(&record.reference), &json)
    }

    /// Writes `bytes` to `dest` through a synced temporary file and rename.
    pub fn write_atomically(&self, dest: &Path, bytes: &[u8]) -> Result<(), Error> {
        let mut tmp = self.temp_file()?;
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| io_error(format!("writing {}", dest.display()), e))?;
        tmp.persist(dest)
            .map_err(|e| io_error(format!("storing {}", dest.display()), e.error))?;
        Ok(())
    }

    /// Every stored image, sorted by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>, Error> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&dir).map_err(|e| io_error(format!("listing {}", dir.display()), e))?
        {
            let path = entry
                .map_err(|e| io_error(format!("listing {}", dir.display()), e))?
                .path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = fs::read(&path)
                    .map_err(|e| io_error(format!("reading {}", path.display()), e))?;
                let record = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
                out.push(record);
            }
        }
        out.sort_by(|a: &ImageRecord, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// The record for a normalized reference, if stored.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>, Error> {
        let path = self.image_path(reference);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(format!("reading {}", path.display()), e)),
        }
    }

    /// Removes an image's record, then every blob and disk image no other
    /// record uses. Returns the removed record.
    pub fn remove_image(&self, reference: &str) -> Result<ImageRecord, Error> {
        let record = self
            .image(reference)?
            .ok_or_else(|| Error::NoSuchImage(reference.to_string()))?;
        let path = self.image_path(reference);
        fs::remove_file(&path).map_err(|e| io_error(format!("removing {}", path.display()), e))?;
        self.collect_garbage()?;
        Ok(record)
    }

    /// Removes blobs and disk images that no image record refers to,
    /// waiting until no other process is adding to the store. Must not be
    /// called while holding [`Store::lock_shared`].
    pub fn collect_garbage(&self) -> Result<(), Error> {
        let _exclusive = self.lock_exclusive()?;
        let keep = self.referenced_blobs()?;
        // Indexes pointing at kept manifests are not recorded; they are
        // cheap to fetch again, so they go too.
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join("blobs").join(alg);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = format!("{alg}:{}", entry.file_name().to_string_lossy());
                if !keep.contains(&name) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        let dir = self.root.join("rootfs");
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let used = keep.iter().any(|d| {
                    d.strip_prefix("sha256:")
                        .is_some_and(|hex| name.starts_with(hex))
                });
                if !used {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// Removes those of `digests` that no image record uses, waiting until
    /// no other process is adding to the store (one may be about to record
    /// an image using them). Must not be called while holding
    /// [`Store::lock_shared`].
    pub(crate) fn remove_unreferenced(&self, digests: &[Digest]) -> Result<(), Error> {
        let _exclusive = self.lock_exclusive()?;
        let keep = self.referenced_blobs()?;
        for digest in digests {
            if !keep.contains(&digest.to_string()) {
                let _ = fs::remove_file(self.blob_path(digest));
            }
        }
        Ok(())
    }

    /// The digests of every blob an image record uses.
    fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, Error> {
        let mut keep = std::collections::HashSet::new();
        for image in self.images()? {
            keep.insert(image.manifest_digest);
            keep.insert(image.config_digest);
            keep.extend(image.layers.into_iter().map(|l| l.digest));
        }
        Ok(keep)
    }
}

/// Writes one blob to a temporary file, hashing as it goes.
#[derive(Debug)]
pub struct BlobWriter {
    file: tempfile::NamedTempFile,
    hasher: Hasher,
    expected: Digest,
    size: Option<u64>,
    dest: PathBuf,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Verifies size and digest, syncs, and moves the blob into place. On
    /// any mismatch nothing is stored (the temporary file is removed).
    pub fn commit(self) -> Result<(), Error> {
        let got_size = self.hasher.len();
        let got = self.hasher.finish();
        self.expected.verify(self.size, &got, got_size)?;
        self.file
            .as_file()
            .sync_all()
            .map_err(|e| io_error(format!("syncing blob {got}"), e))?;
        self.file
            .persist(&self.dest)
            .map_err(|e| io_error(format!("storing blob {got}"), e.error))?;
        Ok(())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(size) = self.size
            && self.hasher.len() + buf.len() as u64 > size
        {
            return Err(io::Error::other(format!(
                "blob {} is longer than its {size} bytes",
                self.expected
            )));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

pub(crate) fn io_error(what: String, source: io::Error) -> Error {
    Error::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_stored_blob_is_not_rewritten_but_new_bytes_are_still_checked() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| io_error("tempdir".into(), e))?;
        let store = Store::open(dir.path())?;
        let digest = Digest::sha256_of(b"manifest");
        store.put_blob(&digest, b"manifest")?;
        let stored = fs::metadata(store.blob_path(&digest))
            .and_then(|m| m.modified())
            .map_err(|e| io_error("stat".into(), e))?;
        std::thread::sleep(Duration::from_millis(20));
        store.put_blob(&digest, b"manifest")?;
        let again = fs::metadata(store.blob_path(&digest))
            .and_then(|m| m.modified())
            .map_err(|e| io_error("stat".into(), e))?;
        assert_eq!(stored, again, "not written again");
        // Same length, other bytes: refused although the blob exists.
        assert!(matches!(
            store.put_blob(&digest, b"MANIFEST"),
            Err(Error::DigestMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn garbage_collection_waits_for_a_process_adding_to_the_store() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| io_error("tempdir".into(), e))?;
        let store = Store::open(dir.path())?;
        // A pull in progress: a blob stored, its record not written yet.
        let adding = store.lock_shared()?;
        let blob = Digest::sha256_of(b"a layer");
        store.put_blob(&blob, b"a layer")?;

        let (done, finished) = mpsc::channel();
        let other = store.clone();
        let gc = std::thread::spawn(move || {
            let result = other.collect_garbage();
            let _ = done.send(());
            result
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(300)).is_err(),
            "garbage collection ran while a pull held the store"
        );
        assert!(store.blob_path(&blob).exists());
        drop(adding);
        gc.join()
            .map_err(|_| Error::Invalid("gc thread panicked".into()))??;
        assert!(
            !store.blob_path(&blob).exists(),
            "then it removes the unrecorded blob"
        );
        Ok(())
    }
}
