//! One stream between a guest port and a host Unix socket.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use supermachine_virtq::Reader;

use crate::packet::{Header, op};

/// A connection's identity: the port on the host (CID 2) side and the
/// port on the guest side.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) host_port: u32,
    pub(crate) guest_port: u32,
}

impl Key {
    /// The poller token: both ports, with the top bit clear.
    pub(crate) fn token(self) -> u64 {
        (u64::from(self.host_port & 0x7fff_ffff) << 32) | u64::from(self.guest_port)
    }
    pub(crate) fn from_token(token: u64) -> Self {
        Self {
            host_port: (token >> 32) as u32,
            guest_port: token as u32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: REQUEST sent (or owed), waiting for the guest.
    AwaitingResponse,
    /// Data flows.
    Connected,
}

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) stream: UnixStream,
    /// Made after a restore but before the guest handled the transport
    /// reset, which will reset it in the guest without a word to us.
    pub(crate) before_reset_handled: bool,
    pub(crate) state: State,
    pub(crate) in_control_queue: bool,
    pub(crate) owe_request: bool,
    pub(crate) owe_response: bool,
    pub(crate) owe_credit_update: bool,
    /// Bytes the host socket has not taken yet: first `device_bytes` of
    /// the device's own (the `OK` line), then guest data.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are not guest data, so they are
    /// not counted as forwarded: counting them would tell the guest it
    /// has more in flight than it ever sent, and a Linux driver then sees
    /// no credit at all.
    device_bytes: usize,
    /// Bytes delivered to the host socket (the guest's credit counter).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    reported_fwd_cnt: u32,
    pub(crate) guest_shut_send: bool,
    pub(crate) guest_shut_receive: bool,
    pub(crate) closing: bool,
    host_write_shut: bool,
    /// Host-to-guest bytes sent, and the guest's buffer as it last told us.
    pub(crate) rx_cnt: u32,
    pub(crate) peer_buf_alloc: u32,
    pub(crate) peer_fwd_cnt: u32,
    pub(crate) host_readable: bool,
    pub(crate) host_writable: bool,
    pub(crate) host_eof_sent: bool,
}

impl Connection {
    pub(crate) fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            before_reset_handled: false,
            state,
            in_control_queue: false,
            owe_request: false,
            owe_response: false,
            owe_credit_update: false,
            to_host: VecDeque::new(),
            device_bytes: 0,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            guest_shut_send: false,
            guest_shut_receive: false,
            closing: false,
            host_write_shut: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_readable: false,
            host_writable: false,
            host_eof_sent: false,
        }
    }

    /// Bytes waiting for the host socket.
    pub(crate) fn buffered(&self) -> usize {
        self.to_host.len()
    }

    /// Guest bytes waiting for the host socket (what counts against the
    /// guest's credit).
    pub(crate) fn guest_buffered(&self) -> usize {
        self.to_host.len() - self.device_bytes
    }

    /// How much more the guest can take from us now.
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fills in our credit fields and remembers we told the guest.
    pub(crate) fn stamp(&mut self, h: &mut Header) {
        h.buf_alloc = crate::CONN_BUF_ALLOC;
        h.fwd_cnt = self.fwd_cnt;
        self.reported_fwd_cnt = self.fwd_cnt;
    }

    /// Whether the guest should hear about freed buffer space now: after a
    /// quarter of its credit has been delivered since it last heard.
    pub(crate) fn credit_update_due(&self, buf_alloc: u32) -> bool {
        self.fwd_cnt.wrapping_sub(self.reported_fwd_cnt) >= buf_alloc / 4
    }

    pub(crate) fn has_control(&self) -> bool {
        self.owe_request || self.owe_response || self.owe_credit_update
    }

    /// The next control packet owed: (op, flags).
    pub(crate) fn next_control(&mut self) -> Option<(u16, u32)> {
        if std::mem::take(&mut self.owe_request) {
            return Some((op::REQUEST, 0));
        }
        if std::mem::take(&mut self.owe_response) {
            return Some((op::RESPONSE, 0));
        }
        if std::mem::take(&mut self.owe_credit_update) {
            return Some((op::CREDIT_UPDATE, 0));
        }
        None
    }

    /// Sends the device's own bytes to the host (the `OK <port>` line),
    /// ahead of any guest data and outside the guest's credit.
    pub(crate) fn queue_to_host(&mut self, bytes: &[u8]) -> io::Result<()> {
        debug_assert!(self.to_host.is_empty(), "device bytes go first");
        self.to_host.extend(bytes);
        self.device_bytes += bytes.len();
        self.flush()
    }

    /// Forwards `len` payload bytes from the guest: straight into the host
    /// socket when nothing is queued ahead of them, the rest buffered.
    pub(crate) fn forward(&mut self, payload: &mut Reader<'_>, len: usize) -> io::Result<()> {
        let mut sent = 0;
        if self.to_host.is_empty() && self.host_writable {
            match payload.copy_to(&mut self.stream, len) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) => return Err(e),
            }
            if sent < len {
                self.host_writable = false;
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(sent as u32);
        }
        if sent < len {
            let mut rest = vec![0u8; len - sent];
            io::Read::read_exact(payload, &mut rest)?;
            self.to_host.extend(rest);
        }
        Ok(())
    }

    /// Writes buffered bytes until the socket is full or they are gone.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.device_bytes);
                    self.device_bytes -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The guest will send no more: tell the host by half-closing.
    pub(crate) fn shutdown_host_write(&mut self) {
        if !std::mem::replace(&mut self.host_write_shut, true) {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }
}
