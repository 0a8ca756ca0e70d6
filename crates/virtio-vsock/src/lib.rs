//! virtio-vsock with a Unix-socket host side.
//!
//! Guest-to-host: a guest connecting to host port N (CID 2) is connected
//! to the Unix socket `<path>_N`. Host-to-guest: a host program connects to
//! the Unix socket `<path>`, writes `CONNECT <port>\n`, and once the guest
//! accepts reads `OK <host-port>\n`; after that the socket carries the
//! stream. Flow control is virtio's credit scheme in both directions.
//!
//! All host sockets are non-blocking and registered edge-triggered in the
//! device's own poller (epoll on Linux, kqueue on macOS: `supermachine_host`);
//! the VMM's event loop watches that one descriptor
//! (`backend_fd`). Each connection remembers whether its socket is
//! readable or writable, so the device never spins on a socket it cannot
//! serve yet (no guest buffers, no credit) and never misses one it can.

//!
//! The host side is Unix sockets, so the device is built for Unix hosts
//! only; on Windows this crate holds the packet format and the errors.

#[cfg(unix)]
mod connection;
#[cfg(unix)]
mod device;
pub mod packet;

use std::io;
use std::path::PathBuf;

#[cfg(unix)]
pub use device::Vsock;

/// Queue size offered for each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload in one packet, either way.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// Bytes each connection may have in flight from the guest to the host
/// (the credit the guest is given).
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Most connections at once; further requests are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest CID is reserved.
    #[error("vsock guest CID {0} is reserved; use 3 or more")]
    ReservedCid(u64),
    /// The socket path is taken (by a live socket or another file).
    #[error("vsock socket {0} already exists and is in use (or is not a socket)")]
    PathExists(PathBuf),
    /// The listening socket could not be made.
    #[error("vsock socket {path}: {source}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device's poller failed.
    #[error("vsock poller: {0}")]
    Poll(#[source] io::Error),
}
