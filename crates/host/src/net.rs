//! Unix-domain sockets the event loop must never block on.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the Unix socket at `path` without blocking: a listener
/// whose backlog is full refuses at once (`WouldBlock`) instead of making
/// the caller wait. The stream is non-blocking and close-on-exec.
pub fn connect_unix_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let fd = {
        // No SOCK_NONBLOCK here: set both flags before the fd is used.
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        use rustix::io::{FdFlags, fcntl_setfd};
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
        fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
        fcntl_setfl(&fd, fcntl_getfl(&fd)? | OFlags::NONBLOCK)?;
        fd
    };
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_without_blocking_and_carries_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = connect_unix_nonblocking(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            client.read(&mut byte).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "the stream does not block"
        );
        server.write_all(b"x").unwrap();
        server.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(client.read(&mut byte).unwrap(), 1);
        assert!(connect_unix_nonblocking(&dir.path().join("none")).is_err());
    }
}
