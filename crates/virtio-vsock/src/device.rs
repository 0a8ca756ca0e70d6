//! The device itself, on Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use supermachine_host::{Interest, Poller, Trigger};
use supermachine_memory::GuestMemoryMmapped;
use supermachine_virtio_mmio::{ActiveDevice, VirtioDevice, read_config_bytes};
use supermachine_virtq::{Chain, Reader, Virtqueue, Writer};

use crate::connection::{Connection, Key, State};
use crate::packet::{HEADER_SIZE, HOST_CID, Header, TYPE_STREAM, op, shutdown};
use crate::*;

/// Most RSTs for unknown connections waiting for a guest buffer; a guest
/// that provokes more loses the oldest.
const MAX_ORPHAN_RSTS: usize = 1024;
/// Longest `CONNECT <port>` line accepted.
const MAX_CONNECT_LINE: usize = 32;
const VIRTIO_ID_VSOCK: u32 = 19;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest must drop every
/// connection (and re-read its CID).
const EVENT_TRANSPORT_RESET: u32 = 0;

const LISTENER_TOKEN: u64 = u64::MAX;
/// Tokens of host sockets still sending their CONNECT line.
const PENDING_BIT: u64 = 1 << 63;
/// First local port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 49152;

/// A host socket that has connected to `<path>` but not yet said which
/// guest port it wants.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    poller: Poller,
    conns: HashMap<Key, Connection>,
    pending: HashMap<u64, PendingHost>,
    next_pending: u64,
    next_host_port: u32,
    /// Connections owing the guest a control packet, in order.
    control: VecDeque<Key>,
    /// RSTs for connections that no longer (or never) existed.
    orphan_rsts: VecDeque<Header>,
    /// A guest RX buffer taken but not yet filled.
    held_rx: Option<Chain>,
    /// Round-robin position over connections with data for the guest.
    data_order: VecDeque<Key>,
    /// Where the guest is in the transport reset a restore owes it.
    reset: ResetPhase,
    /// Host connections made while a reset is under way: their REQUEST
    /// waits until the guest has finished it, or the reset would kill
    /// them (and their owners would have to try again).
    held_requests: Vec<Key>,
    active: Option<ActiveDevice>,
}

impl Vsock {
    /// A device giving the guest CID `cid`, listening on `path` for host
    /// connections (and connecting to `<path>_<port>` for guest ones).
    pub fn new(cid: u64, path: &Path) -> Result<Self, Error> {
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(Error::ReservedCid(cid));
        }
        let listener = bind_replacing_stale(path)?;
        let listen_error = |source| Error::Listen {
            path: path.to_path_buf(),
            source,
        };
        let poller = Poller::new().map_err(Error::Poll)?;
        let dev = Self {
            cid,
            path: path.to_path_buf(),
            listener,
            poller,
            conns: HashMap::new(),
            pending: HashMap::new(),
            next_pending: 0,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            held_rx: None,
            data_order: VecDeque::new(),
            reset: ResetPhase::None,
            held_requests: Vec::new(),
            active: None,
        };
        dev.listener.set_nonblocking(true).map_err(listen_error)?;
        dev.watch(dev.listener.as_fd(), LISTENER_TOKEN, false)
            .map_err(Error::Poll)?;
        Ok(dev)
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Connections open now (for tests and diagnostics).
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Watches `fd` edge-triggered for reading, and writing if asked,
    /// reporting it as `token`. Every watched socket leaves the poller
    /// before it closes (`forget`, `read_connect_line`, `drop_everything`).
    fn watch(&self, fd: BorrowedFd<'_>, token: u64, writable: bool) -> io::Result<()> {
        let interest = if writable {
            Interest::BOTH
        } else {
            Interest::READ
        };
        self.poller.add(fd, token, interest, Trigger::Edge)
    }

    /// Closes a connection's socket, after taking it out of the poller.
    fn forget(&mut self, key: &Key) {
        if let Some(c) = self.conns.remove(key) {
            let _ = self.poller.delete(c.stream.as_fd());
        }
    }

    fn header_to_guest(&self, key: Key, op: u16) -> Header {
        header_to_guest(self.cid, key, op)
    }

    fn owe_control(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.in_control_queue
        {
            c.in_control_queue = true;
            self.control.push_back(key);
        }
    }

    /// Drops a connection (closing its socket) and tells the guest.
    fn reset(&mut self, key: Key) {
        log::debug!("vsock: reset {key:?}");
        self.forget(&key);
        self.orphan_rst(self.header_to_guest(key, op::RST));
    }

    fn orphan_rst(&mut self, h: Header) {
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            log::warn!("vsock: too many pending resets; dropping the oldest");
            self.orphan_rsts.pop_front();
        }
        self.orphan_rsts.push_back(h);
    }

    fn allocate_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.host_port == port) {
                return Some(port);
            }
        }
        None
    }

    // ---- Guest to host -------------------------------------------------

    fn process_tx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let result = active.queues[TX].drain(&mem, |chain| {
            self.guest_packet(&mem, chain);
            0
        });
        if !active.interrupt.after_queue_work(result, &"vsock TX queue") {
            self.drop_everything();
            return;
        }
        self.active = Some(active);
        self.pump();
    }

    fn guest_packet(&mut self, mem: &GuestMemoryMmapped, chain: &Chain) {
        let mut reader = Reader::new(mem, chain.readable());
        let mut raw = [0u8; HEADER_SIZE];
        if reader.read_exact(&mut raw).is_err() {
            log::warn!("vsock: TX packet shorter than its header");
            return;
        }
        let h = Header::decode(&raw);
        if h.src_cid != self.cid {
            log::warn!(
                "vsock: TX packet from CID {} (guest is {})",
                h.src_cid,
                self.cid
            );
            return;
        }
        let key = Key {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        if h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            if h.op != op::RST {
                self.orphan_rst(self.header_to_guest(key, op::RST));
            }
            return;
        }
        if h.len > MAX_PAYLOAD || h.len as usize > reader.remaining() {
            log::warn!("vsock: TX packet claims {} payload bytes", h.len);
            if self.conns.contains_key(&key) {
                self.reset(key);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match (h.op, self.conns.contains_key(&key)) {
            (op::REQUEST, false) => self.guest_connect(key),
            (op::RST, _) => {
                log::debug!("vsock: guest reset {key:?}: {h:?}");
                self.forget(&key);
            }
            (_, false) => self.orphan_rst(self.header_to_guest(key, op::RST)),
            (op::REQUEST, true) => self.reset(key),
            (op::RESPONSE, true) => self.guest_accepted(key),
            (op::RW, true) => {
                let mut payload = reader;
                self.guest_data(key, &mut payload, h.len as usize);
            }
            (op::SHUTDOWN, true) => self.guest_shutdown(key, h.flags),
            (op::CREDIT_REQUEST, true) => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.owe_credit_update = true;
                }
                self.owe_control(key);
            }
            (op::CREDIT_UPDATE, true) => {}
            (other, true) => {
                log::warn!("vsock: unknown op {other}");
                self.reset(key);
            }
        }
    }

    fn guest_connect(&mut self, key: Key) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!(
                "vsock: connection limit reached; refusing port {}",
                key.host_port
            );
            self.orphan_rst(self.header_to_guest(key, op::RST));
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), key.host_port));
        let stream = match connect_nonblocking(&target) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connect to {}: {e}", target.display());
                self.orphan_rst(self.header_to_guest(key, op::RST));
                return;
            }
        };
        if let Err(e) = self.add_connection(key, stream, State::Connected) {
            log::warn!("vsock: {e}");
            self.orphan_rst(self.header_to_guest(key, op::RST));
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.owe_response = true;
        }
        self.owe_control(key);
    }

    fn add_connection(&mut self, key: Key, stream: UnixStream, state: State) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        self.watch(stream.as_fd(), key.token(), true)?;
        let mut connection = Connection::new(stream, state);
        connection.before_reset_handled = matches!(self.reset, ResetPhase::Announced { .. });
        self.conns.insert(key, connection);
        self.data_order.push_back(key);
        Ok(())
    }

    fn guest_accepted(&mut self, key: Key) {
        log::debug!("vsock: guest accepted {key:?}");
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::AwaitingResponse {
            self.reset(key);
            return;
        }
        c.state = State::Connected;
        let line = format!("OK {}\n", key.host_port);
        if let Err(e) = c.queue_to_host(line.as_bytes()) {
            log::debug!("vsock: telling the host connection: {e}");
            self.reset(key);
        }
    }

    fn guest_data(&mut self, key: Key, payload: &mut Reader<'_>, len: usize) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Connected || c.guest_shut_send {
            self.reset(key);
            return;
        }
        if c.guest_buffered() + len > CONN_BUF_ALLOC as usize {
            log::warn!("vsock: guest ignored its credit on port {}", key.host_port);
            self.reset(key);
            return;
        }
        match c.forward(payload, len) {
            Ok(()) => {
                if c.credit_update_due(CONN_BUF_ALLOC) {
                    c.owe_credit_update = true;
                    self.owe_control(key);
                }
            }
            Err(e) => {
                log::debug!("vsock: host side of port {} failed: {e}", key.host_port);
                self.reset(key);
            }
        }
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        log::debug!("vsock: guest shutdown {key:?} flags {flags}");
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if flags & shutdown::SEND != 0 {
            c.guest_shut_send = true;
        }
        if flags & shutdown::RECEIVE != 0 {
            c.guest_shut_receive = true;
        }
        if c.guest_shut_send && c.guest_shut_receive {
            // A full close: answer with RST once what it sent is delivered.
            c.closing = true;
        }
        self.finish_if_done(key);
    }

    /// Applies half-closes and completes closes whose data is delivered.
    fn finish_if_done(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.buffered() > 0 {
            return;
        }
        if c.closing || (c.guest_shut_send && c.host_eof_sent) {
            self.reset(key);
        } else if c.guest_shut_send {
            c.shutdown_host_write();
        }
    }

    // ---- Host to guest -------------------------------------------------

    fn host_events(&mut self) {
        let mut ready = Vec::new();
        loop {
            ready.clear();
            let n = match self
                .poller
                .wait(Some(std::time::Duration::ZERO), &mut ready)
            {
                Ok(n) => n,
                Err(e) => {
                    log::error!("vsock: polling: {e}");
                    return;
                }
            };
            for r in &ready {
                if r.token == LISTENER_TOKEN {
                    self.accept_host_connections();
                } else if r.token & PENDING_BIT != 0 {
                    self.read_connect_line(r.token);
                } else if let Some(c) = self.conns.get_mut(&Key::from_token(r.token)) {
                    if r.readable {
                        c.host_readable = true;
                    }
                    if r.writable {
                        c.host_writable = true;
                    }
                }
            }
            if n < self.poller.batch() {
                return;
            }
        }
    }

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS {
                        log::warn!("vsock: connection limit reached; closing a host connection");
                        continue;
                    }
                    let token = PENDING_BIT | self.next_pending;
                    self.next_pending = (self.next_pending + 1) & !PENDING_BIT;
                    let ok = stream.set_nonblocking(true).is_ok()
                        && self.watch(stream.as_fd(), token, false).is_ok();
                    if ok {
                        self.pending.insert(
                            token,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                        self.read_connect_line(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the CONNECT line a byte at a time, so that no byte of the
    /// stream after it is taken from the socket.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.poller.delete(p.stream.as_fd());
        let Some(guest_port) = port else {
            log::warn!("vsock: host connection sent a bad CONNECT line; closed");
            return;
        };
        let Some(host_port) = self.allocate_host_port() else {
            return;
        };
        let key = Key {
            host_port,
            guest_port,
        };
        log::debug!("vsock: host asks for guest port {guest_port} as {key:?}");
        if let Err(e) = self.add_connection(key, p.stream, State::AwaitingResponse) {
            log::warn!("vsock: {e}");
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.owe_request = true;
            // Data may already wait behind the line; the edge has passed.
            c.host_readable = true;
            if self.reset != ResetPhase::None {
                c.before_reset_handled = false;
                self.held_requests.push(key);
                return;
            }
        }
        self.owe_control(key);
    }

    /// Moves everything that can move: host sockets' events, buffered data
    /// to the host, control packets and data to the guest.
    fn pump(&mut self) {
        if self.active.is_none() {
            return;
        }
        self.host_events();
        self.check_reset_done();
        self.flush_to_host();
        let Some(mut active) = self.active.take() else {
            return;
        };
        let result = self.fill_rx(&active.mem, &mut active.queues[RX]);
        if !active.interrupt.after_queue_work(result, &"vsock RX queue") {
            self.drop_everything();
            return;
        }
        self.active = Some(active);
    }

    fn flush_to_host(&mut self) {
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.host_writable && c.buffered() > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            match c.flush() {
                Ok(()) => {
                    if c.credit_update_due(CONN_BUF_ALLOC) {
                        c.owe_credit_update = true;
                        self.owe_control(key);
                    }
                    self.finish_if_done(key);
                }
                Err(e) => {
                    log::debug!("vsock: host side of port {} failed: {e}", key.host_port);
                    self.reset(key);
                }
            }
        }
    }

    /// Fills guest RX buffers; true if some were returned and the driver
    /// wants an interrupt for them.
    fn fill_rx(
        &mut self,
        mem: &GuestMemoryMmapped,
        queue: &mut Virtqueue,
    ) -> supermachine_virtq::Result<bool> {
        let mut completed = false;
        loop {
            let chain = match self.held_rx.take() {
                Some(chain) => chain,
                None => {
                    queue.disable_notification(mem)?;
                    match queue.pop(mem)? {
                        Some(popped) => match popped.chain {
                            Ok(chain) => chain,
                            Err(_) => {
                                queue.add_used(mem, popped.head, 0)?;
                                completed = true;
                                continue;
                            }
                        },
                        None => {
                            if queue.enable_notification(mem)? {
                                continue;
                            }
                            return Ok(wants_interrupt(queue, mem, completed));
                        }
                    }
                }
            };
            if (chain.writable_len() as usize) < HEADER_SIZE {
                log::warn!("vsock: RX buffer too small for a header");
                queue.add_used(mem, chain.head(), 0)?;
                completed = true;
                continue;
            }
            match self.next_packet(mem, &chain) {
                Some(written) => {
                    queue.add_used(mem, chain.head(), written)?;
                    completed = true;
                }
                None => {
                    self.held_rx = Some(chain);
                    return Ok(wants_interrupt(queue, mem, completed));
                }
            }
        }
    }

    /// Writes the next packet for the guest into `chain`; `None` if there
    /// is nothing to send.
    fn next_packet(&mut self, mem: &GuestMemoryMmapped, chain: &Chain) -> Option<u32> {
        let mut writer = Writer::new(mem, chain.writable());
        if let Some(h) = self.orphan_rsts.pop_front() {
            return write_header(&mut writer, &h);
        }
        while let Some(key) = self.control.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_control_queue = false;
            let Some((op, flags)) = c.next_control() else {
                continue;
            };
            log::debug!("vsock: control op {op} to guest for {key:?}");
            let mut h = self.header_to_guest(key, op);
            h.flags = flags;
            let c = self.conns.get_mut(&key)?;
            c.stamp(&mut h);
            if c.has_control() {
                self.owe_control(key);
            }
            return write_header(&mut writer, &h);
        }
        self.next_data_packet(&mut writer)
    }

    fn next_data_packet(&mut self, writer: &mut Writer<'_>) -> Option<u32> {
        let cid = self.cid;
        for _ in 0..self.data_order.len() {
            let key = self.data_order.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            self.data_order.push_back(key);
            let credit = c.peer_credit();
            if !c.host_readable
                || c.state != State::Connected
                || c.host_eof_sent
                || c.guest_shut_receive
                || credit == 0
            {
                continue;
            }
            let mut payload = writer.clone();
            payload.skip(HEADER_SIZE);
            let room = payload
                .remaining()
                .min(credit as usize)
                .min(MAX_PAYLOAD as usize);
            match payload.copy_from(&mut c.stream, room) {
                Ok(0) => {
                    log::debug!("vsock: host EOF on {key:?}");
                    // The host closed its side: no more data will come.
                    c.host_eof_sent = true;
                    c.host_readable = false;
                    let mut h = header_to_guest(cid, key, op::SHUTDOWN);
                    h.flags = shutdown::SEND;
                    let c = self.conns.get_mut(&key)?;
                    c.stamp(&mut h);
                    let written = write_header(writer, &h);
                    self.finish_if_done(key);
                    return written;
                }
                Ok(n) => {
                    let mut h = header_to_guest(cid, key, op::RW);
                    h.len = n as u32;
                    c.stamp(&mut h);
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    write_header(writer, &h)?;
                    return Some((HEADER_SIZE + n) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.host_readable = false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: reading host side of port {}: {e}", key.host_port);
                    self.forget(&key);
                    let h = header_to_guest(cid, key, op::RST);
                    return write_header(writer, &h);
                }
            }
        }
        None
    }

    /// Sends the owed transport-reset event once the driver has given the
    /// event queue a buffer.
    fn announce_transport_reset(&mut self) {
        if self.reset != ResetPhase::Owed {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (mem, queue) = (&active.mem, &mut active.queues[EVENT]);
        let result = (|| {
            let Some(popped) = queue.pop(mem)? else {
                return Ok(false);
            };
            let written = match popped.chain {
                Ok(chain) => {
                    let mut writer = Writer::new(mem, chain.writable());
                    match writer.write_obj(EVENT_TRANSPORT_RESET.to_le_bytes()) {
                        Ok(()) => 4,
                        Err(_) => {
                            log::warn!("vsock: event buffer too small");
                            0
                        }
                    }
                }
                Err(_) => 0,
            };
            queue.add_used(mem, popped.head, written)?;
            if written != 0 {
                // The driver gives the buffer back once it has handled
                // the event; ask to be told when it does.
                self.reset = ResetPhase::Announced {
                    avail: queue.notify_on_new_buffers(mem)?,
                };
            }
            Ok(queue.needs_notification(mem).unwrap_or(true))
        })();
        if !active
            .interrupt
            .after_queue_work(result, &"vsock event queue")
        {
            self.active = None;
            self.drop_everything();
        }
    }

    /// The guest is handling the transport reset: it resets every
    /// connection it has, silently, including any it opened to the host
    /// since the restore (its TX work can run before its event work).
    /// Those host sockets are closed now, so that their owners see the end
    /// at once instead of waiting for answers that cannot come. (Host
    /// connections made since the restore are held back, not offered.)
    fn reset_begun(&mut self) {
        let ResetPhase::Announced { avail } = self.reset else {
            return;
        };
        self.reset = ResetPhase::Handling { avail };
        let doomed: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.before_reset_handled)
            .map(|(k, _)| *k)
            .collect();
        for key in doomed {
            log::debug!("vsock: {key:?} predates the guest's reset; closing it");
            self.forget(&key);
        }
    }

    /// A Linux driver puts the event buffer back after it has reset its
    /// connections: from then on a new connection is safe, and the held
    /// host connections are offered to the guest.
    fn check_reset_done(&mut self) {
        let (ResetPhase::Announced { avail } | ResetPhase::Handling { avail }) = self.reset else {
            return;
        };
        let Some(active) = self.active.as_ref() else {
            return;
        };
        match active.queues[EVENT].avail_idx(&active.mem) {
            Ok(now) if now != avail => {}
            Ok(_) => return,
            Err(e) => log::warn!("vsock: event queue: {e}; ending the reset"),
        }
        self.reset_begun();
        self.reset = ResetPhase::None;
        log::debug!(
            "vsock: the guest finished its reset; offering {} held connections",
            self.held_requests.len()
        );
        for key in std::mem::take(&mut self.held_requests) {
            self.owe_control(key);
        }
    }

    fn drop_everything(&mut self) {
        for c in self.conns.values() {
            let _ = self.poller.delete(c.stream.as_fd());
        }
        for p in self.pending.values() {
            let _ = self.poller.delete(p.stream.as_fd());
        }
        self.conns.clear();
        self.pending.clear();
        self.control.clear();
        self.orphan_rsts.clear();
        self.data_order.clear();
        self.held_rx = None;
        self.held_requests.clear();
    }
}

/// The transport reset after a restore, step by step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetPhase {
    None,
    /// Restored: the event is owed as soon as the driver gives a buffer.
    Owed,
    /// The event is out; the guest has not started on it. `avail` is the
    /// event queue's available index just after the event was taken.
    Announced {
        avail: u16,
    },
    /// The guest re-read its CID, its first step in handling the event.
    Handling {
        avail: u16,
    },
}

/// Whether returning buffers (`completed`) should interrupt the driver;
/// an unreadable `used_event` errs on the side of interrupting.
fn wants_interrupt(queue: &mut Virtqueue, mem: &GuestMemoryMmapped, completed: bool) -> bool {
    completed && queue.needs_notification(mem).unwrap_or(true)
}

fn header_to_guest(cid: u64, key: Key, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: key.host_port,
        dst_port: key.guest_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

fn write_header(writer: &mut Writer<'_>, h: &Header) -> Option<u32> {
    std::io::Write::write_all(writer, &h.encode()).ok()?;
    Some(HEADER_SIZE as u32)
}

/// Connects to a host Unix socket without ever blocking the event loop:
/// a listener whose backlog is full refuses at once (EAGAIN), and the
/// guest's connection is reset, as a TCP stack does when its backlog
/// overflows.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    supermachine_host::connect_unix_nonblocking(path)
}

/// Binds the device's listening socket at `path`. A socket file left
/// there by a VMM that was killed (nothing accepts on it any more) is
/// replaced; a live one, or any other file, is an error.
fn bind_replacing_stale(path: &Path) -> Result<UnixListener, Error> {
    let listen_error = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    match path.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(e)),
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            let refused = meta.file_type().is_socket()
                && matches!(
                    UnixStream::connect(path),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                );
            if !refused {
                return Err(Error::PathExists(path.to_path_buf()));
            }
            log::info!("vsock: replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(listen_error)?;
        }
    }
    UnixListener::bind(path).map_err(listen_error)
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The listening socket's path is ours; nothing is left behind.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
        if offset < 8 {
            self.reset_begun();
        }
    }

    fn activate(&mut self, device: ActiveDevice) -> Result<(), supermachine_virtio_mmio::Error> {
        if device.queues.len() != 3 {
            return Err(supermachine_virtio_mmio::Error::Activate(
                "virtio-vsock has three queues".into(),
            ));
        }
        self.active = Some(device);
        self.announce_transport_reset();
        self.pump();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset = ResetPhase::None;
        self.drop_everything();
    }

    fn queue_notified(&mut self, index: usize) {
        match index {
            TX => self.process_tx(),
            EVENT => {
                self.announce_transport_reset();
                self.check_reset_done();
                self.pump();
            }
            _ => self.pump(),
        }
    }

    fn queue_states(&self) -> Option<Vec<supermachine_virtio_mmio::QueueState>> {
        let mut states = self.active.as_ref()?.queue_states();
        // The RX buffer held for the next packet goes back to the driver:
        // it is always the last one taken.
        if self.held_rx.is_some()
            && let Some(rx) = states.get_mut(RX)
        {
            rx.next_avail = rx.next_avail.wrapping_sub(1);
        }
        Some(states)
    }

    /// The next host port to hand out. A restored guest may still hold
    /// sockets of the old VMM's connections until it has handled the
    /// transport reset (and their owners have closed them); a new
    /// connection reusing one of their ports would meet that socket, not a
    /// listener, and get no answer. So the restored device goes on from
    /// where the old one stopped.
    fn save_state(&self) -> Vec<u8> {
        self.next_host_port.to_le_bytes().to_vec()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), supermachine_virtio_mmio::Error> {
        let next = match state {
            // Written before the port was saved.
            [] => FIRST_HOST_PORT,
            [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
            _ => {
                return Err(supermachine_virtio_mmio::Error::Restore(format!(
                    "virtio-vsock state is 4 bytes, the snapshot has {}",
                    state.len()
                )));
            }
        };
        if next < FIRST_HOST_PORT {
            return Err(supermachine_virtio_mmio::Error::Restore(format!(
                "virtio-vsock state: host port {next} is below {FIRST_HOST_PORT}"
            )));
        }
        self.next_host_port = next;
        // Host sockets do not survive the old VMM: the guest's connections
        // are over, and the event tells it so.
        self.reset = ResetPhase::Owed;
        Ok(())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.poller.as_raw_fd())
    }

    fn backend_ready(&mut self) {
        if self.active.is_some() {
            self.pump();
        } else {
            // Not started: keep host sockets from piling up unanswered.
            self.host_events();
        }
    }
}
