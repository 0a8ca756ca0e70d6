//! A stored image as a disk the guest mounts: its layers unpacked into a
//! temporary tree in the store, turned into an EROFS image with
//! `mkfs.erofs`, cached by manifest digest. Why EROFS and not ext4:
//! docs/images.md.

use std::fs;
use std::path::PathBuf;
#[cfg(unix)]
use std::{io::Read, os::fd::AsFd, path::Path, process::Command};

use crate::Error;
use crate::digest::Digest;
#[cfg(unix)]
use crate::store::io_error;
use crate::store::{ImageRecord, Store};
use crate::unpack::Limits;
#[cfg(unix)]
use crate::unpack::{Compression, Unpacker};

/// Longest /etc/passwd or /etc/group read from an image.
#[cfg(unix)]
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// A built root file system disk and what the image says about accounts.
#[derive(Clone, Debug)]
pub struct RootFs {
    /// The EROFS image (read-only; the guest writes to an overlay).
    pub disk: PathBuf,
    /// The image's /etc/passwd (empty when it has none).
    pub passwd: String,
    /// The image's /etc/group (empty when it has none).
    pub group: String,
    /// True when it was already built.
    pub cached: bool,
}

fn paths(store: &Store, record: &ImageRecord) -> Result<(PathBuf, PathBuf), Error> {
    let digest = Digest::parse(&record.manifest_digest)?;
    let base = store.root().join("rootfs").join(digest.hex());
    Ok((
        base.with_extension("erofs"),
        base.with_extension("accounts.json"),
    ))
}

/// The image's disk, if it has been built.
pub fn built_disk(store: &Store, record: &ImageRecord) -> Result<Option<PathBuf>, Error> {
    let (disk, accounts) = paths(store, record)?;
    Ok((disk.is_file() && accounts.is_file()).then_some(disk))
}

/// The image's disk, built now unless cached.
pub fn build(store: &Store, record: &ImageRecord, limits: Limits) -> Result<RootFs, Error> {
    let (disk, accounts) = paths(store, record)?;
    if disk.is_file()
        && let Ok(bytes) = fs::read(&accounts)
        && let Ok((passwd, group)) = serde_json::from_slice::<(String, String)>(&bytes)
    {
        return Ok(RootFs {
            disk,
            passwd,
            group,
            cached: true,
        });
    }
    #[cfg(unix)]
    return build_uncached(store, record, limits, disk, accounts);
    #[cfg(not(unix))]
    {
        let _ = limits;
        Err(Error::Unsupported(
            "building an image's root disk: unpacking layers needs a POSIX file system, \
             and there is no Windows implementation yet",
        ))
    }
}

/// Unpacks, reads the accounts, runs `mkfs.erofs` and stores the result.
#[cfg(unix)]
fn build_uncached(
    store: &Store,
    record: &ImageRecord,
    limits: Limits,
    disk: PathBuf,
    accounts: PathBuf,
) -> Result<RootFs, Error> {
    let _adding = store.lock_shared()?;
    let work = store.temp_dir()?;
    let tree = work.path().join("tree");
    fs::create_dir(&tree).map_err(|e| io_error(format!("creating {}", tree.display()), e))?;
    let fixups = unpack_image(store, record, &tree, limits)?;
    if !fixups.is_empty() {
        log::warn!(
            "{} entries keep an owner or xattr this unprivileged process could not set; \
             the disk maps every file to root (see docs/images.md)",
            fixups.len()
        );
    }
    let passwd = read_in_root(&tree, "etc/passwd")?;
    let group = read_in_root(&tree, "etc/group")?;

    let out = work.path().join("disk.erofs");
    make_erofs(
        &tree,
        &out,
        &digest_uuid(&record.manifest_digest),
        !fixups.is_empty(),
    )?;
    let json = serde_json::to_vec(&(&passwd, &group))
        .map_err(|e| Error::Invalid(format!("encoding accounts: {e}")))?;
    store.write_atomically(&accounts, &json)?;
    fs::rename(&out, &disk).map_err(|e| io_error(format!("storing {}", disk.display()), e))?;
    Ok(RootFs {
        disk,
        passwd,
        group,
        cached: false,
    })
}

/// Unpacks every layer of a stored image, in order, into the empty
/// directory `tree`, checking each layer's uncompressed digest. Returns
/// what an unprivileged process could not apply.
#[cfg(unix)]
pub fn unpack_image(
    store: &Store,
    record: &ImageRecord,
    tree: &Path,
    limits: Limits,
) -> Result<std::collections::BTreeMap<PathBuf, crate::unpack::Fixup>, Error> {
    let mut unpacker = Unpacker::new(tree, limits)?;
    for layer in &record.layers {
        let digest = Digest::parse(&layer.digest)?;
        // Pull and load record only media types this crate reads (load
        // names docker save layers by their first bytes).
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            Error::Invalid(format!(
                "layer {}: unsupported media type {}",
                layer.digest, layer.media_type
            ))
        })?;
        let blob = std::io::BufReader::new(store.open_blob(&digest)?);
        let diff_id = (!layer.diff_id.is_empty()).then_some(layer.diff_id.as_str());
        unpacker.apply(&layer.digest, blob, compression, diff_id)?;
    }
    unpacker.finish()
}

/// Runs `mkfs.erofs` (uncompressed: building fast matters more than size
/// for a local cache; per-file mtimes kept; a UUID from the digest so the
/// same image always gives the same disk).
#[cfg(unix)]
fn make_erofs(tree: &Path, out: &Path, uuid: &str, all_root: bool) -> Result<(), Error> {
    let mut cmd = Command::new("mkfs.erofs");
    cmd.args(["--quiet", "--preserve-mtime", "-x2"])
        .arg(format!("-U{uuid}"));
    if all_root {
        cmd.arg("--all-root");
    }
    cmd.arg(out).arg(tree);
    let output = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Invalid(
            "mkfs.erofs is not installed (Debian: apt-get install erofs-utils)".into(),
        ),
        _ => io_error("running mkfs.erofs".into(), e),
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::Invalid(format!(
            "mkfs.erofs failed ({}): {}",
            output.status,
            stderr.lines().last().unwrap_or("").trim()
        )));
    }
    Ok(())
}

/// A UUID (8-4-4-4-12 hex) taken from the digest's first bytes.
#[cfg(unix)]
fn digest_uuid(digest: &str) -> String {
    let hex: String = digest
        .split_once(':')
        .map_or(digest, |(_, h)| h)
        .chars()
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Reads `rel` inside `root` with the image's own view of symlinks: an
/// `/etc/passwd` that is a symlink to `/x` means the image's `/x`, never
/// the host's (`RESOLVE_IN_ROOT`). Missing means empty.
#[cfg(unix)]
fn read_in_root(root: &Path, rel: &str) -> Result<String, Error> {
    let dir = supermachine_host::open_dir(root)
        .map_err(|e| io_error(format!("opening {}", root.display()), e.into()))?;
    let fd = match supermachine_host::open_in_root(dir.as_fd(), Path::new(rel)) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
            return Ok(String::new());
        }
        Err(e) => return Err(io_error(format!("opening the image's /{rel}"), e.into())),
    };
    let mut text = Vec::new();
    fs::File::from(fd)
        .take(MAX_ACCOUNT_FILE)
        .read_to_end(&mut text)
        .map_err(|e| io_error(format!("reading the image's /{rel}"), e))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}
