//! Applying image layers, in order, to one directory, without ever writing
//! outside it.
//!
//! Every entry name is checked first: absolute names and names with `..`
//! are refused. Parent directories are then resolved one component at a
//! time against what is already on disk, with chroot semantics for
//! absolute symlinks (they mean the image's root, as they will inside the
//! guest) and a refusal for any symlink that climbs out of the root or
//! loops. The resolved parent, which then contains no symlink, is opened
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (`O_NOFOLLOW_ANY`
//! on macOS: `supermachine_host::open_dir_beneath`), so the kernel
//! itself guarantees that nothing below escapes; the entry is created
//! relative to that descriptor with `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`.
//!
//! Whiteouts (`.wh.NAME`) remove `NAME` from lower layers, opaque markers
//! (`.wh..wh..opq`) empty their directory of lower layers' entries.
//! Ownership, modes, xattrs, mtimes, symlinks and hardlinks are kept.
//! Device nodes are skipped with a warning. What an unprivileged process
//! cannot apply (ownership, privileged xattrs) is kept as a [`Fixup`] for
//! the disk-image builder.

use std::ffi::OsString;
#[cfg(unix)]
use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsStr,
    fs::File,
    io::{self, Read},
    os::fd::{AsFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Component, Path, PathBuf},
};

#[cfg(unix)]
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
#[cfg(unix)]
use sha2::{Digest as _, Sha256};

#[cfg(unix)]
use crate::Error;

/// How many symlinks one path may go through (as Linux's `MAXSYMLINKS`).
#[cfg(unix)]
const MAX_SYMLINK_FOLLOWS: usize = 40;
#[cfg(unix)]
const WHITEOUT_PREFIX: &str = ".wh.";
#[cfg(unix)]
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Bounds on what one image may unpack to: a layer that decompresses past
/// them (a tar bomb) is refused.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// File content bytes, over all layers.
    pub max_bytes: u64,
    /// Entries, over all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 30,
            max_entries: 4_000_000,
        }
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`...tar+gzip`, `...tar.gzip`).
    Gzip,
    /// zstd (`...tar+zstd`).
    Zstd,
}

impl Compression {
    /// From a layer's media type (OCI or Docker schema 2); `None` for a
    /// media type that is not a layer this crate can apply.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// From a blob's first bytes (for `docker save` archives, whose layers
    /// carry no media type).
    pub fn sniff(magic: &[u8]) -> Self {
        match magic {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            _ => Self::None,
        }
    }
}

/// Metadata the unpacking process could not apply itself (it is not
/// root), to be applied when the disk image is built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fixup {
    /// Owner the image asks for.
    pub owner: Option<(u32, u32)>,
    /// Extended attributes that could not be set.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Unpacks layers into one directory.
#[cfg(unix)]
#[derive(Debug)]
pub struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    limits: Limits,
    bytes: u64,
    entries: u64,
    privileged: bool,
    fixups: BTreeMap<PathBuf, Fixup>,
    /// Directory mtimes, applied last (creating entries changes them).
    dir_times: BTreeMap<PathBuf, u64>,
}

/// One layer being applied: its name for errors, and what it created.
#[cfg(unix)]
struct Layer<'a> {
    name: &'a str,
    created: HashSet<PathBuf>,
}

#[cfg(unix)]
impl Layer<'_> {
    fn error(&self, entry: &Path, reason: impl std::fmt::Display) -> Error {
        Error::Unpack {
            layer: self.name.to_string(),
            entry: entry.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(unix)]
impl Unpacker {
    /// Unpacks into `root`, which must be an existing, empty directory.
    pub fn new(root: &Path, limits: Limits) -> Result<Self, Error> {
        let io_error = |source| Error::Io {
            what: format!("opening {}", root.display()),
            source,
        };
        let fd = supermachine_host::open_dir(root).map_err(|e| io_error(e.into()))?;
        Ok(Self {
            root: fd,
            root_path: root.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
            privileged: rustix::process::geteuid().is_root(),
            fixups: BTreeMap::new(),
            dir_times: BTreeMap::new(),
        })
    }

    /// Applies one layer blob. `name` (its digest, say) appears in errors;
    /// `diff_id`, when given, is the digest the uncompressed tar must have.
    pub fn apply(
        &mut self,
        name: &str,
        blob: impl Read,
        compression: Compression,
        diff_id: Option<&str>,
    ) -> Result<(), Error> {
        let read_error = |source: io::Error| Error::Unpack {
            layer: name.to_string(),
            entry: String::new(),
            reason: format!("reading the layer: {source}"),
        };
        let decompressed: Box<dyn Read> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(crate::zstd::ZstdReader::new(io::BufReader::new(blob))),
        };
        let mut hashed = HashingReader {
            inner: decompressed,
            hash: Sha256::new(),
        };
        let mut layer = Layer {
            name,
            created: HashSet::new(),
        };
        {
            let mut archive = tar::Archive::new(&mut hashed);
            let entries = archive.entries().map_err(read_error)?;
            for entry in entries {
                let entry = entry.map_err(read_error)?;
                self.apply_entry(&mut layer, entry)?;
            }
        }
        // The tar may end (two zero blocks) before the compressed stream
        // does; reading on checks the stream's own end (gzip's CRC, say).
        io::copy(&mut hashed, &mut io::sink()).map_err(read_error)?;
        if let Some(want) = diff_id {
            let got = format!("sha256:{}", hex(&hashed.hash.finalize()));
            if got != want {
                return Err(layer.error(
                    Path::new(""),
                    format!("uncompressed content is {got}, the image config says {want}"),
                ));
            }
        }
        Ok(())
    }

    /// Sets directory mtimes and returns what could not be applied.
    pub fn finish(self) -> Result<BTreeMap<PathBuf, Fixup>, Error> {
        for (path, mtime) in self.dir_times.iter().rev() {
            let times = timestamps(*mtime);
            // A directory removed by a later layer has no time to set.
            let _ = rustix::fs::utimensat(&self.root, path, &times, AtFlags::SYMLINK_NOFOLLOW);
        }
        Ok(self.fixups)
    }

    /// The directory being unpacked into.
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: &mut Layer<'_>,
        mut entry: tar::Entry<'_, R>,
    ) -> Result<(), Error> {
        let raw_path = entry
            .path()
            .map_err(|e| layer.error(Path::new("?"), e))?
            .into_owned();
        let path = entry_path(&raw_path).map_err(|why| layer.error(&raw_path, why))?;
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(layer.error(
                &raw_path,
                format!(
                    "the image has more than {} entries",
                    self.limits.max_entries
                ),
            ));
        }
        let Some(name) = path.file_name().map(OsStr::to_os_string) else {
            // The root itself ("./"): keep the directory we were given.
            return Ok(());
        };
        let parent_rel = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let parent = self
            .resolve_dir(&parent_rel, true)
            .map_err(|why| layer.error(&raw_path, why))?;
        let parent_fd = self
            .open_beneath(&parent)
            .map_err(|e| layer.error(&raw_path, format!("opening its directory: {e}")))?;
        let target = parent.join(&name);

        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE_MARKER.as_bytes() {
            return self
                .make_opaque(layer, &parent, &parent_fd)
                .map_err(|e| layer.error(&raw_path, e));
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(layer.error(&raw_path, "a whiteout for no name"));
            }
            let victim = parent.join(hidden);
            if !layer.created.contains(&victim) {
                self.remove(&parent_fd, hidden, &victim)
                    .map_err(|e| layer.error(&raw_path, e))?;
            }
            return Ok(());
        }

        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = Mode::from_raw_mode(
            // Permission bits fit every host's mode_t (16 bits on macOS).
            (header.mode().map_err(|e| layer.error(&raw_path, e))? & 0o7777) as _,
        );
        let mtime = header.mtime().unwrap_or(0);
        let (mut uid, mut gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mut xattrs = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let (Ok(key), value) = (ext.key(), ext.value_bytes()) else {
                    continue;
                };
                if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((OsString::from(attr), value.to_vec()));
                } else if key == "uid" {
                    uid = parse_decimal(value).unwrap_or(uid);
                } else if key == "gid" {
                    gid = parse_decimal(value).unwrap_or(gid);
                }
            }
        }
        let (uid, gid) = (
            u32::try_from(uid).map_err(|_| layer.error(&raw_path, "owner out of range"))?,
            u32::try_from(gid).map_err(|_| layer.error(&raw_path, "group out of range"))?,
        );

        // Whatever is there goes, except a directory that stays one.
        let existing = stat_kind(&parent_fd, &name);
        if kind.is_dir() {
            if existing.is_some_and(|k| k != FileType::Directory) {
                self.remove(&parent_fd, &name, &target)
                    .map_err(|e| layer.error(&raw_path, e))?;
            }
        } else if existing.is_some() {
            self.remove(&parent_fd, &name, &target)
                .map_err(|e| layer.error(&raw_path, e))?;
        }

        let fail =
            |what: &str, e: rustix::io::Errno| layer.error(&raw_path, format!("{what}: {e}"));
        match kind {
            tar::EntryType::Directory => {
                if existing != Some(FileType::Directory) {
                    rustix::fs::mkdirat(&parent_fd, &name, Mode::RWXU)
                        .map_err(|e| fail("creating the directory", e))?;
                }
                let dir = rustix::fs::openat(
                    &parent_fd,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| fail("opening the directory", e))?;
                self.set_owner_mode_xattrs(&dir, &target, uid, gid, mode, &xattrs)
                    .map_err(|e| layer.error(&raw_path, e))?;
                self.dir_times.insert(target.clone(), mtime);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &parent_fd,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::RUSR | Mode::WUSR,
                )
                .map_err(|e| fail("creating the file", e))?;
                let mut file = File::from(fd);
                let budget = self.limits.max_bytes - self.bytes;
                let copied = io::copy(&mut (&mut entry).take(budget + 1), &mut file)
                    .map_err(|e| layer.error(&raw_path, format!("writing: {e}")))?;
                if copied > budget {
                    return Err(layer.error(
                        &raw_path,
                        format!(
                            "the image unpacks to more than {} bytes",
                            self.limits.max_bytes
                        ),
                    ));
                }
                self.bytes += copied;
                self.set_owner_mode_xattrs(file.as_fd(), &target, uid, gid, mode, &xattrs)
                    .map_err(|e| layer.error(&raw_path, e))?;
                rustix::fs::futimens(&file, &timestamps(mtime))
                    .map_err(|e| fail("setting its time", e))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| layer.error(&raw_path, e))?
                    .ok_or_else(|| layer.error(&raw_path, "a symlink without a target"))?;
                // The target is stored as is: it only matters when
                // something goes through it, and that is checked then.
                rustix::fs::symlinkat(link.as_os_str(), &parent_fd, &name)
                    .map_err(|e| fail("creating the symlink", e))?;
                self.set_link_owner(&parent_fd, &name, &target, uid, gid)
                    .map_err(|e| layer.error(&raw_path, e))?;
                let _ = rustix::fs::utimensat(
                    &parent_fd,
                    &name,
                    &timestamps(mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                );
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| layer.error(&raw_path, e))?
                    .ok_or_else(|| layer.error(&raw_path, "a hardlink without a target"))?
                    .into_owned();
                self.hardlink(&link, &parent_fd, &name)
                    .map_err(|why| layer.error(&raw_path, why))?;
            }
            tar::EntryType::Fifo => {
                supermachine_host::mkfifo_at(parent_fd.as_fd(), &name, mode)
                    .map_err(|e| fail("creating the fifo", e))?;
                self.set_link_owner(&parent_fd, &name, &target, uid, gid)
                    .map_err(|e| layer.error(&raw_path, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // Common in images made by debootstrap-like tools; nothing
                // the user needs to hear about.
                log::debug!(
                    "layer {}: skipping device node {} (devices come from the guest's devtmpfs)",
                    layer.name,
                    raw_path.display()
                );
                return Ok(());
            }
            // Metadata-only entries the tar reader has already folded in.
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => return Ok(()),
            other => {
                return Err(layer.error(&raw_path, format!("unsupported entry type {other:?}")));
            }
        }
        layer.created.insert(target);
        Ok(())
    }

    /// Resolves `rel` (a checked entry directory) to a path inside the root
    /// that contains no symlinks, creating missing directories (0755) when
    /// `create`. Absolute symlink targets are taken from the root.
    fn resolve_dir(&self, rel: &Path, create: bool) -> Result<PathBuf, String> {
        let mut resolved = PathBuf::new();
        let mut pending: Vec<OsString> = rel
            .components()
            .rev()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                _ => None,
            })
            .collect();
        let mut follows = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                if !resolved.pop() {
                    return Err("a symlink on its path leads out of the image root".into());
                }
                continue;
            }
            if part == "." {
                continue;
            }
            let candidate = resolved.join(&part);
            match rustix::fs::statat(&self.root, nonempty(&candidate), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => resolved = candidate,
                    FileType::Symlink => {
                        follows += 1;
                        if follows > MAX_SYMLINK_FOLLOWS {
                            return Err("too many symlinks on its path (a symlink loop?)".into());
                        }
                        let target = rustix::fs::readlinkat(&self.root, &candidate, Vec::new())
                            .map_err(|e| format!("reading symlink {}: {e}", candidate.display()))?;
                        let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                        if target.is_absolute() {
                            resolved = PathBuf::new();
                        }
                        for c in target.components().rev() {
                            match c {
                                Component::Normal(n) => pending.push(n.to_os_string()),
                                Component::ParentDir => pending.push("..".into()),
                                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                            }
                        }
                    }
                    _ => {
                        return Err(format!("{} is not a directory", candidate.display()));
                    }
                },
                Err(rustix::io::Errno::NOENT) if create => {
                    let parent = self
                        .open_beneath(&resolved)
                        .map_err(|e| format!("opening {}: {e}", resolved.display()))?;
                    rustix::fs::mkdirat(&parent, &part, Mode::from_raw_mode(0o755))
                        .map_err(|e| format!("creating {}: {e}", candidate.display()))?;
                    resolved = candidate;
                }
                Err(rustix::io::Errno::NOENT) => {
                    return Err(format!("{} does not exist", candidate.display()));
                }
                Err(e) => return Err(format!("{}: {e}", candidate.display())),
            }
        }
        Ok(resolved)
    }

    /// Opens a resolved directory: the kernel refuses any symlink on the
    /// way and anything outside the root.
    fn open_beneath(&self, resolved: &Path) -> rustix::io::Result<OwnedFd> {
        supermachine_host::open_dir_beneath(self.root.as_fd(), resolved)
    }

    fn hardlink(&mut self, link: &Path, parent_fd: &OwnedFd, name: &OsStr) -> Result<(), String> {
        let mut rel = PathBuf::new();
        for c in link.components() {
            match c {
                Component::Normal(n) => rel.push(n),
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(format!(
                        "a hardlink to {} (outside the image root)",
                        link.display()
                    ));
                }
            }
        }
        let Some(target_name) = rel.file_name().map(OsStr::to_os_string) else {
            return Err("a hardlink to the image root".into());
        };
        let target_dir = self
            .resolve_dir(rel.parent().unwrap_or(Path::new("")), false)
            .map_err(|why| format!("a hardlink to {}: {why}", link.display()))?;
        let target_fd = self
            .open_beneath(&target_dir)
            .map_err(|e| format!("opening {}: {e}", target_dir.display()))?;
        match stat_kind(&target_fd, &target_name) {
            None => Err(format!(
                "a hardlink to {}, which does not exist",
                link.display()
            )),
            Some(FileType::Directory) => Err(format!("a hardlink to directory {}", link.display())),
            Some(_) => {
                rustix::fs::linkat(&target_fd, &target_name, parent_fd, name, AtFlags::empty())
                    .map_err(|e| format!("linking to {}: {e}", link.display()))
            }
        }
    }

    /// Applies an opaque marker: everything lower layers put in `dir` goes.
    fn make_opaque(
        &mut self,
        layer: &Layer<'_>,
        dir: &Path,
        dir_fd: &OwnedFd,
    ) -> Result<(), String> {
        let listing = rustix::fs::openat(
            dir_fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let mut names = Vec::new();
        let it = rustix::fs::Dir::read_from(&listing).map_err(|e| e.to_string())?;
        for entry in it {
            let entry = entry.map_err(|e| e.to_string())?;
            let n = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if n != "." && n != ".." {
                names.push(n);
            }
        }
        for n in names {
            let path = dir.join(&n);
            if !layer.created.contains(&path) {
                self.remove(dir_fd, &n, &path)?;
            }
        }
        Ok(())
    }

    /// Removes `name` in `dir_fd` (recursively for a directory, never
    /// following a symlink); a name that is not there is no error.
    fn remove(&mut self, dir_fd: &OwnedFd, name: &OsStr, path: &Path) -> Result<(), String> {
        self.fixups.retain(|p, _| !p.starts_with(path));
        self.dir_times.retain(|p, _| !p.starts_with(path));
        match stat_kind(dir_fd, name) {
            None => Ok(()),
            Some(FileType::Directory) => {
                // std's remove_dir_all does not follow symlinks; the path has
                // none above `name`, which is a real directory.
                std::fs::remove_dir_all(self.root_path.join(path))
                    .map_err(|e| format!("removing {}: {e}", path.display()))
            }
            Some(_) => rustix::fs::unlinkat(dir_fd, name, AtFlags::empty())
                .map_err(|e| format!("removing {}: {e}", path.display())),
        }
    }

    fn set_owner_mode_xattrs(
        &mut self,
        fd: impl AsFd,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: Mode,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), String> {
        let mut fixup = Fixup::default();
        if rustix::fs::fchown(&fd, Some(uid_of(uid)), Some(gid_of(gid))).is_err() {
            fixup.owner = Some((uid, gid));
        }
        // After chown, which clears set-id bits.
        rustix::fs::fchmod(&fd, mode).map_err(|e| format!("setting its mode: {e}"))?;
        for (name, value) in xattrs {
            if rustix::fs::fsetxattr(
                &fd,
                name.as_os_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            )
            .is_err()
            {
                fixup.xattrs.push((name.clone(), value.clone()));
            }
        }
        self.record(path, fixup);
        Ok(())
    }

    fn set_link_owner(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<(), String> {
        let mut fixup = Fixup::default();
        if rustix::fs::chownat(
            dir,
            name,
            Some(uid_of(uid)),
            Some(gid_of(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_err()
        {
            fixup.owner = Some((uid, gid));
        }
        self.record(path, fixup);
        Ok(())
    }

    fn record(&mut self, path: &Path, fixup: Fixup) {
        if fixup == Fixup::default() {
            self.fixups.remove(path);
        } else {
            if !self.privileged {
                log::debug!(
                    "unprivileged: {} keeps {fixup:?} for the disk image",
                    path.display()
                );
            }
            self.fixups.insert(path.to_path_buf(), fixup);
        }
    }
}

/// Checks an entry name: relative, no `..`; returns it without `.` parts.
#[cfg(unix)]
fn entry_path(raw: &Path) -> Result<PathBuf, String> {
    let mut clean = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("an absolute path".into());
            }
            Component::ParentDir => return Err("a path with `..`".into()),
        }
    }
    Ok(clean)
}

/// "" names the root for the *at calls as ".".
#[cfg(unix)]
fn nonempty(p: &Path) -> &Path {
    if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    }
}

#[cfg(unix)]
fn stat_kind(dir: &OwnedFd, name: &OsStr) -> Option<FileType> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| FileType::from_raw_mode(st.st_mode))
}

#[cfg(unix)]
fn timestamps(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[cfg(unix)]
fn uid_of(uid: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(uid)
}

#[cfg(unix)]
fn gid_of(gid: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(gid)
}

#[cfg(unix)]
fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(unix)]
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

#[cfg(unix)]
impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}
