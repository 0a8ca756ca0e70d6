//! Readiness of many sources at once: epoll on Linux, kqueue on macOS,
//! an I/O completion port on Windows (through the `polling` crate). On
//! Unix a poller is itself a descriptor that turns readable when any of
//! its own is ready, so a device's poller can sit inside the VMM's.

#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub use unix::Poller;
#[cfg(windows)]
pub use windows::Poller;

/// What a [`Poller`] watches: a descriptor on Unix.
#[cfg(unix)]
pub type Pollable<'a> = std::os::fd::BorrowedFd<'a>;

/// What a [`Poller`] watches on Windows: a socket, or a handle that can
/// be waited on (an event object, say), which reads as readable while it
/// is signalled.
#[cfg(windows)]
#[derive(Clone, Copy, Debug)]
pub enum Pollable<'a> {
    /// A socket, polled for readiness like a Unix descriptor.
    Socket(std::os::windows::io::BorrowedSocket<'a>),
    /// A waitable handle.
    Waitable(std::os::windows::io::BorrowedHandle<'a>),
}

/// Something a [`Poller`] can watch: on Unix, anything with a
/// descriptor.
pub trait AsPollable {
    /// The source, borrowed.
    fn as_pollable(&self) -> Pollable<'_>;
}

#[cfg(unix)]
impl<T: std::os::fd::AsFd + ?Sized> AsPollable for T {
    fn as_pollable(&self) -> Pollable<'_> {
        self.as_fd()
    }
}

/// The standard library's sockets, watched as sockets.
#[cfg(windows)]
macro_rules! pollable_sockets {
    ($($socket:ty),*) => {$(
        impl AsPollable for $socket {
            fn as_pollable(&self) -> Pollable<'_> {
                Pollable::Socket(std::os::windows::io::AsSocket::as_socket(self))
            }
        }
    )*};
}
#[cfg(windows)]
pollable_sockets!(
    std::net::TcpListener,
    std::net::TcpStream,
    std::net::UdpSocket
);

/// What to be told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Readable, or hung up, or in error.
    pub readable: bool,
    /// Writable, or in error.
    pub writable: bool,
}

impl Interest {
    /// Readability only.
    pub const READ: Self = Self {
        readable: true,
        writable: false,
    };
    /// Both.
    pub const BOTH: Self = Self {
        readable: true,
        writable: true,
    };
}

/// When to be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// As long as the descriptor is ready.
    Level,
    /// Once each time it becomes ready.
    Edge,
}

/// A descriptor that is ready, by the token it was added with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The token given to [`Poller::add`].
    pub token: u64,
    /// Readable (or hung up, or in error): a read says which.
    pub readable: bool,
    /// Writable (or in error).
    pub writable: bool,
}
