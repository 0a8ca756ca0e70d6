//! Where the device's frames go: anything that moves whole Ethernet
//! frames over a socket without blocking.
//!
//! Two framings are built in. [`StreamBackend`] speaks the protocol of
//! QEMU's `-netdev stream` (each frame preceded by its length as a 32-bit
//! big-endian number), which passt serves and gvisor-tap-vsock's `gvproxy`
//! speaks too. [`DatagramBackend`] sends one frame per datagram (vfkit's
//! style, which `gvproxy` also offers).

use std::fmt::Debug;
use std::io;
#[cfg(unix)]
use std::io::{IoSlice, Read, Write};
#[cfg(unix)]
use std::os::fd::AsFd;
#[cfg(unix)]
use std::os::unix::net::{UnixDatagram, UnixStream};

use supermachine_host::Pollable;

/// The largest frame either framing carries: an Ethernet header, a VLAN
/// tag and a 65535-byte IP packet.
pub const MAX_FRAME: usize = 14 + 4 + 65535;

/// Moves Ethernet frames to and from the host side of the network.
///
/// Nothing blocks: a frame the socket will not take yet is kept (one at
/// most) until [`FrameBackend::flush`] gets it out, and [`FrameBackend::recv`]
/// returns `None` when no whole frame is waiting.
pub trait FrameBackend: Send + Debug {
    /// The socket to wait on, readable or writable.
    fn source(&self) -> Pollable<'_>;
    /// Whether part of a frame is still waiting to be sent; send nothing
    /// more until [`FrameBackend::flush`] has returned true.
    fn busy(&self) -> bool;
    /// Sends `frame` (at most [`MAX_FRAME`] bytes) or keeps what the socket
    /// did not take. An error means the backend is gone.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sends what was kept; true when nothing is left.
    fn flush(&mut self) -> io::Result<bool>;
    /// The next whole frame, if one is waiting. An error means the
    /// backend is gone or broke its framing.
    fn recv(&mut self) -> io::Result<Option<Vec<u8>>>;
}

#[cfg(unix)]
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::ENOBUFS)
}

/// Frames as QEMU's `-netdev stream` frames them: a 4-byte big-endian
/// length, then the frame.
#[cfg(unix)]
#[derive(Debug)]
pub struct StreamBackend {
    socket: UnixStream,
    /// Bytes of a frame the socket has not taken yet.
    unsent: Vec<u8>,
    sent: usize,
    /// Received bytes not yet handed out: `inbox[start..]`.
    inbox: Vec<u8>,
    start: usize,
}

#[cfg(unix)]
impl StreamBackend {
    /// Uses `socket` (connected; made non-blocking here).
    pub fn new(socket: UnixStream) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            unsent: Vec::new(),
            sent: 0,
            inbox: Vec::with_capacity(4 + MAX_FRAME),
            start: 0,
        })
    }

    /// The next frame already in `inbox`, if it is whole.
    fn take_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        let buffered = &self.inbox[self.start..];
        let Some(prefix) = buffered.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the backend sent a {len}-byte frame (at most {MAX_FRAME})"),
            ));
        }
        if buffered.len() < 4 + len {
            return Ok(None);
        }
        let frame = buffered[4..4 + len].to_vec();
        self.start += 4 + len;
        if self.start == self.inbox.len() {
            self.inbox.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }
}

#[cfg(unix)]
impl FrameBackend for StreamBackend {
    fn source(&self) -> Pollable<'_> {
        self.socket.as_fd()
    }

    fn busy(&self) -> bool {
        self.sent < self.unsent.len()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        debug_assert!(!self.busy(), "send while busy");
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|l| *l as usize <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let prefix = len.to_be_bytes();
        let written = match self
            .socket
            .write_vectored(&[IoSlice::new(&prefix), IoSlice::new(frame)])
        {
            Ok(n) => n,
            Err(e) if would_block(&e) => 0,
            Err(e) => return Err(e),
        };
        let total = prefix.len() + frame.len();
        if written < total {
            self.unsent.clear();
            self.unsent.extend_from_slice(&prefix);
            self.unsent.extend_from_slice(frame);
            self.sent = written;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<bool> {
        while self.busy() {
            match self.socket.write(&self.unsent[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.unsent.clear();
        self.sent = 0;
        Ok(true)
    }

    fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            // Move the partial frame to the front, then read behind it.
            if self.start > 0 {
                self.inbox.drain(..self.start);
                self.start = 0;
            }
            let have = self.inbox.len();
            self.inbox.resize(4 + MAX_FRAME, 0);
            let read = self.socket.read(&mut self.inbox[have..]);
            self.inbox.truncate(have + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed its socket",
                    ));
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

/// One frame per datagram.
#[cfg(unix)]
#[derive(Debug)]
pub struct DatagramBackend {
    socket: UnixDatagram,
    unsent: Option<Vec<u8>>,
    inbox: Vec<u8>,
}

#[cfg(unix)]
impl DatagramBackend {
    /// Uses `socket` (connected to its peer; made non-blocking here).
    pub fn new(socket: UnixDatagram) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            unsent: None,
            inbox: vec![0; MAX_FRAME + 1],
        })
    }
}

#[cfg(unix)]
impl FrameBackend for DatagramBackend {
    fn source(&self) -> Pollable<'_> {
        self.socket.as_fd()
    }

    fn busy(&self) -> bool {
        self.unsent.is_some()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        debug_assert!(!self.busy(), "send while busy");
        match self.socket.send(frame) {
            Ok(_) => Ok(()),
            Err(e) if would_block(&e) => {
                self.unsent = Some(frame.to_vec());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<bool> {
        let Some(frame) = self.unsent.as_deref() else {
            return Ok(true);
        };
        match self.socket.send(frame) {
            Ok(_) => {
                self.unsent = None;
                Ok(true)
            }
            Err(e) if would_block(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            match self.socket.recv(&mut self.inbox) {
                // The buffer is one byte larger than any frame: a datagram
                // that fills it was cut short.
                Ok(n) if n > MAX_FRAME => {
                    log::warn!("virtio-net: dropping an oversized datagram from the backend");
                }
                Ok(n) => return Ok(Some(self.inbox[..n].to_vec())),
                Err(e) if would_block(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8) ^ seed).collect()
    }

    #[test]
    fn stream_frames_are_found_across_any_split_of_the_bytes() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut b = StreamBackend::new(ours).unwrap();
        let frames = [frame(60, 1), frame(MAX_FRAME, 2), frame(1, 3)];
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(f);
        }
        let mut got = Vec::new();
        // Dribbled in: one byte, then 3, then the rest in large pieces.
        let mut at = 0;
        for piece in [1usize, 3, 70, 4096, 65536].iter().cycle() {
            if at == bytes.len() {
                break;
            }
            let end = (at + piece).min(bytes.len());
            peer.write_all(&bytes[at..end]).unwrap();
            at = end;
            while let Some(f) = b.recv().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(b.recv().unwrap().is_none());
    }

    #[test]
    fn a_stream_that_lies_about_a_length_or_ends_is_an_error() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut b = StreamBackend::new(ours).unwrap();
        peer.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
            .unwrap();
        let e = b.recv().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        let (ours, peer) = UnixStream::pair().unwrap();
        let mut b = StreamBackend::new(ours).unwrap();
        drop(peer);
        assert_eq!(b.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn what_a_full_socket_does_not_take_is_kept_and_flushed_later() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut b = StreamBackend::new(ours).unwrap();
        let big = frame(60_000, 4);
        let mut sent = 0;
        while !b.busy() {
            b.send(&big).unwrap();
            sent += 1;
            assert!(sent < 10_000, "the socket never filled");
        }
        assert!(!b.flush().unwrap(), "still full");
        // The peer drains; every frame arrives whole, the kept one last.
        let reader = std::thread::spawn(move || {
            let mut frames = 0;
            let mut len = [0u8; 4];
            let mut buf = vec![0u8; MAX_FRAME];
            while frames < sent {
                peer.read_exact(&mut len).unwrap();
                let n = u32::from_be_bytes(len) as usize;
                peer.read_exact(&mut buf[..n]).unwrap();
                assert_eq!(buf[..n], big[..]);
                frames += 1;
            }
        });
        while !b.flush().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        reader.join().unwrap();
    }

    #[test]
    fn datagrams_are_frames_and_oversized_ones_are_dropped() {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        let mut b = DatagramBackend::new(ours).unwrap();
        peer.send(&frame(MAX_FRAME + 10, 5)).unwrap();
        peer.send(&frame(100, 6)).unwrap();
        assert_eq!(b.recv().unwrap(), Some(frame(100, 6)));
        assert_eq!(b.recv().unwrap(), None);
        b.send(&frame(200, 7)).unwrap();
        let mut buf = [0u8; 300];
        assert_eq!(peer.recv(&mut buf).unwrap(), 200);
    }
}
