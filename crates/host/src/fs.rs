//! Opening paths inside a directory tree that must not be escaped (an
//! image's root filesystem, as it is unpacked and read).

use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Opens directory `path` as the base of `*at` calls (`O_PATH` where
/// there is one: no read permission needed).
pub fn open_dir(path: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(path, dir_flags() | OFlags::CLOEXEC, Mode::empty())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn dir_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY
}

/// Opens directory `rel` (relative, no `..`) under `root`, refusing a
/// symlink anywhere on the way: `ELOOP` for a symlink, `EXDEV` for a
/// path that would leave `root`.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    let rel = plain_relative(rel)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::ResolveFlags;
        rustix::fs::openat2(
            root,
            rel,
            dir_flags() | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    }
    #[cfg(target_vendor = "apple")]
    {
        // O_NOFOLLOW_ANY: no component may be a symlink; with no `..`
        // and a relative path, nothing can lead out of `root`.
        rustix::fs::openat(
            root,
            rel,
            dir_flags() | OFlags::NOFOLLOW_ANY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
    {
        walk_dirs(root, rel)
    }
}

/// `rel` as a path of normal components only ("." for empty).
fn plain_relative(rel: &Path) -> rustix::io::Result<&Path> {
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(Errno::XDEV),
            Component::RootDir | Component::Prefix(_) => return Err(Errno::XDEV),
        }
    }
    Ok(if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    })
}

/// Opens `rel` a component at a time, none followed if a symlink.
#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
fn walk_dirs(root: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    let mut dir = rustix::io::dup(root)?;
    for c in rel.components() {
        if let Component::Normal(name) = c {
            dir = rustix::fs::openat(
                &dir,
                name,
                dir_flags() | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
        }
    }
    Ok(dir)
}

/// Most symlinks one [`open_in_root`] follows, as Linux allows.
const MAX_SYMLINKS: usize = 40;

/// Opens `rel` for reading as if `root` were `/`: symlinks, absolute or
/// relative, and `..` are resolved inside `root` and never leave it (a
/// chroot's view, `RESOLVE_IN_ROOT`).
pub fn open_in_root(root: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::ResolveFlags;
        rustix::fs::openat2(
            root,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        open_in_root_by_walking(root, rel)
    }
}

/// [`open_in_root`] done in user space: each component is looked at
/// without following it, and symlinks are resolved against the root.
#[cfg_attr(any(target_os = "linux", target_os = "android"), allow(dead_code))]
fn open_in_root_by_walking(root: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // What is left to resolve, innermost last; and where we are.
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    push_components(&mut pending, rel);
    let mut at: Vec<std::ffi::OsString> = Vec::new();
    let mut followed = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            at.pop();
            continue;
        }
        let here: std::path::PathBuf = at.iter().collect();
        let dir = if at.is_empty() {
            rustix::io::dup(root)?
        } else {
            rustix::fs::openat(
                root,
                &here,
                dir_flags() | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        };
        let stat = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink {
            followed += 1;
            if followed > MAX_SYMLINKS {
                return Err(Errno::LOOP);
            }
            let target = rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new())?;
            let target = Path::new(OsStr::from_bytes(target.as_bytes()));
            if target.is_absolute() {
                at.clear();
            }
            push_components(&mut pending, target);
            continue;
        }
        at.push(name);
    }
    let path: std::path::PathBuf = at.iter().collect();
    rustix::fs::openat(
        root,
        if at.is_empty() { Path::new(".") } else { &path },
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Pushes `path`'s components so that the first pops first.
fn push_components(pending: &mut Vec<std::ffi::OsString>, path: &Path) {
    let parts: Vec<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    pending.extend(parts.into_iter().rev());
}

/// Makes a FIFO `name` in directory `dir`.
pub fn mkfifo_at(dir: BorrowedFd<'_>, name: &OsStr, mode: Mode) -> rustix::io::Result<()> {
    #[cfg(not(target_vendor = "apple"))]
    {
        rustix::fs::mknodat(dir, name, FileType::Fifo, mode, 0)
    }
    #[cfg(target_vendor = "apple")]
    {
        apple::mkfifo_at(dir, name, mode)
    }
}

#[cfg(target_vendor = "apple")]
mod apple {
    use std::io;
    use std::os::fd::AsRawFd;

    pub(super) fn mkfifo_at(
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
        mode: rustix::fs::Mode,
    ) -> rustix::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::CString::new(name.as_bytes()).map_err(|_| rustix::io::Errno::INVAL)?;
        // SAFETY: a valid descriptor and NUL-terminated name for the call.
        let rc =
            unsafe { libc::mkfifoat(dir.as_raw_fd(), name.as_ptr(), mode.bits() as libc::mode_t) };
        if rc == 0 {
            Ok(())
        } else {
            Err(
                rustix::io::Errno::from_io_error(&io::Error::last_os_error())
                    .unwrap_or(rustix::io::Errno::IO),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    /// A tree with symlinks that point out of it in every way.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/sub")).unwrap();
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::write(root.join("real/passwd"), "image's").unwrap();
        symlink("/real/passwd", root.join("etc/passwd")).unwrap();
        symlink("../../real/passwd", root.join("etc/sub/rel")).unwrap();
        symlink("../../../../../../etc/hostname", root.join("etc/escape")).unwrap();
        symlink("/etc/loop", root.join("etc/loop")).unwrap();
        symlink("real", root.join("dirlink")).unwrap();
        dir
    }

    fn read(fd: OwnedFd) -> String {
        let mut text = String::new();
        File::from(fd).read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn paths_in_root_resolve_inside_it_the_kernel_way_and_the_walking_way() {
        let dir = tree();
        let root = open_dir(dir.path()).unwrap();
        type Open = fn(BorrowedFd<'_>, &Path) -> rustix::io::Result<OwnedFd>;
        for open in [open_in_root as Open, open_in_root_by_walking as Open] {
            assert_eq!(
                read(open(root.as_fd(), Path::new("etc/passwd")).unwrap()),
                "image's"
            );
            assert_eq!(
                read(open(root.as_fd(), Path::new("etc/sub/rel")).unwrap()),
                "image's"
            );
            assert_eq!(
                read(open(root.as_fd(), Path::new("dirlink/passwd")).unwrap()),
                "image's"
            );
            // Out of the root by `..`, then back in: the root's /real.
            assert_eq!(
                read(open(root.as_fd(), Path::new("../../real/passwd")).unwrap()),
                "image's"
            );
            // Leading out: resolved at the root, where there is no such file.
            assert_eq!(
                open(root.as_fd(), Path::new("etc/escape")).unwrap_err(),
                Errno::NOENT
            );
            assert_eq!(
                open(root.as_fd(), Path::new("etc/loop")).unwrap_err(),
                Errno::LOOP
            );
        }
    }

    #[test]
    fn directories_beneath_refuse_symlinks_and_escapes() {
        let dir = tree();
        let root = open_dir(dir.path()).unwrap();
        assert!(open_dir_beneath(root.as_fd(), Path::new("etc/sub")).is_ok());
        assert!(open_dir_beneath(root.as_fd(), Path::new("")).is_ok());
        // A symlink is refused (which error depends on where it is met).
        let refused = open_dir_beneath(root.as_fd(), Path::new("dirlink")).unwrap_err();
        assert!([Errno::LOOP, Errno::NOTDIR].contains(&refused), "{refused}");
        let refused = open_dir_beneath(root.as_fd(), Path::new("dirlink/x")).unwrap_err();
        assert!(
            [Errno::LOOP, Errno::NOTDIR, Errno::XDEV].contains(&refused),
            "{refused}"
        );
        assert_eq!(
            open_dir_beneath(root.as_fd(), Path::new("etc/../..")).unwrap_err(),
            Errno::XDEV
        );
        let sub = open_dir_beneath(root.as_fd(), Path::new("etc")).unwrap();
        mkfifo_at(sub.as_fd(), OsStr::new("fifo"), Mode::from_raw_mode(0o600)).unwrap();
        let kind = std::fs::symlink_metadata(dir.path().join("etc/fifo")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&kind.file_type()));
    }
}
