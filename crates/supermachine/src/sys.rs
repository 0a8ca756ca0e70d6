//! What differs between host operating systems at this level: the Unix
//! sockets the agent and vsock connections are made of (Windows 10 and
//! later has `AF_UNIX` too, through `uds_windows`), a private per-user
//! directory, and file identity.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[cfg(unix)]
pub(crate) use std::os::unix::net::{UnixListener, UnixStream};
#[cfg(windows)]
pub(crate) use uds_windows::{UnixListener, UnixStream};

/// Creates `dir` readable by this user only (mode 0700 on Unix; on
/// Windows a directory under the user's profile already is); an existing
/// one is fine.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    let builder = {
        let mut builder = fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
    };
    #[cfg(not(unix))]
    let builder = fs::DirBuilder::new();
    match builder.create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Where this user's private runtime directory goes: `$XDG_RUNTIME_DIR`
/// if set, else a `supermachine-<uid>` directory in the shared temporary
/// directory (which [`check_private`] then insists is ours). On Windows,
/// `%LOCALAPPDATA%\supermachine\run`.
pub(crate) fn runtime_base() -> PathBuf {
    #[cfg(unix)]
    {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() && Path::new(&d).is_dir() => {
                PathBuf::from(d).join("supermachine")
            }
            _ => std::env::temp_dir().join(format!(
                "supermachine-{}",
                rustix::process::getuid().as_raw()
            )),
        }
    }
    #[cfg(windows)]
    {
        match std::env::var_os("LOCALAPPDATA") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("supermachine").join("run"),
            _ => std::env::temp_dir().join("supermachine"),
        }
    }
}

/// Refuses a runtime directory another user could enter or own (a
/// shared `/tmp`). On Windows the profile directory's ACL is the guard.
pub(crate) fn check_private(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a directory",
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if meta.uid() != rustix::process::getuid().as_raw()
            || meta.permissions().mode() & 0o077 != 0
        {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not a private directory owned by this user",
            ));
        }
    }
    Ok(())
}

/// Which file this is, beyond its path: device and inode on Unix; on
/// Windows the creation time (a rebuilt disk is a new file).
pub(crate) fn file_identity(meta: &fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::MetadataExt;
        (0, meta.creation_time())
    }
}

/// Bytes a file occupies on disk: its allocated blocks on Unix (a sparse
/// file's holes are free); on Windows its length.
pub(crate) fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    }
    #[cfg(windows)]
    {
        meta.len()
    }
}

/// True when an idle connection is neither closed nor holding stray
/// bytes: readable while idle means closed, or out of step, so not
/// reusable.
pub(crate) fn still_open(c: &UnixStream) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a descriptor `c` keeps open; a zero
        // timeout only samples its state.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        ready == 0
    }
    #[cfg(windows)]
    {
        use std::io::Read;
        // No poll for a socket handle here: a non-blocking one-byte read
        // samples it instead (a byte read makes it unusable anyway).
        if c.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut reader = c;
        let idle =
            matches!(reader.read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        idle && c.set_nonblocking(false).is_ok()
    }
}
