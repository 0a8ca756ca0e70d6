//! virtio-net: the guest's Ethernet frames to and from a host backend.
//!
//! The device offers a MAC address, link status, an MTU, mergeable
//! receive buffers, transmit checksum offload (the device completes the
//! checksum, so no backend has to) and receive checksum offload (frames
//! from the backend are marked valid). It offers no segmentation
//! offload: neither backend framing can carry a virtio-net header, and a
//! large MTU (passt's 65520) gets a stream the same 64 KiB frames.
//!
//! Every descriptor is the guest's: a chain too short for its header, a
//! frame too large or too small, a checksum offset outside the frame or
//! a segmentation request fails only that frame. Frames from the backend
//! wait in a bounded queue while the guest has no receive buffers; when
//! it is full the device stops reading the backend, which pushes back on
//! the host side.

pub mod backend;
mod packet;
pub mod policy;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
#[cfg(unix)]
use std::os::fd::{AsRawFd, RawFd};

use supermachine_host::{Interest, Poller, Trigger};
use supermachine_memory::GuestMemoryMmapped;
use supermachine_virtio_mmio::{ActiveDevice, QueueState, VirtioDevice};
use supermachine_virtq::{Chain, Reader, Virtqueue, Writer};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_S_LINK_UP,
};

#[cfg(unix)]
pub use backend::{DatagramBackend, StreamBackend};
pub use backend::{FrameBackend, MAX_FRAME};
pub use policy::{EgressPolicy, PolicyMode, Rule, Verdict};

const VIRTIO_ID_NET: u32 = 1;
/// Queue size offered, for each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `struct virtio_net_hdr_v1`: the header before every frame (with
/// VERSION_1 it always has `num_buffers`).
pub const HEADER_SIZE: usize = 12;
/// passt's MTU: the largest IPv4 packet, less an Ethernet header,
/// rounded down to 32 bits.
pub const DEFAULT_MTU: u16 = 65520;
/// The smallest MTU IPv6 allows.
pub const MIN_MTU: u16 = 1280;
/// Frames from the backend held while the guest has no buffers.
pub const MAX_WAITING_FRAMES: usize = 64;

/// Errors making the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MTU is outside what the device carries.
    #[error("MTU {0} is outside {MIN_MTU}..={DEFAULT_MTU}")]
    Mtu(u16),
    /// The MAC address is not a unicast one.
    #[error("MAC address {0} is not a unicast address")]
    Mac(String),
    /// The poller for the backend.
    #[error("network backend poller: {0}")]
    Poll(#[source] io::Error),
}

/// What the device is made with.
#[derive(Debug)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The link MTU (IP packet size) the guest is told.
    pub mtu: u16,
    /// What may leave.
    pub policy: EgressPolicy,
}

/// Counters, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Guest frames dropped as malformed.
    pub tx_dropped: u64,
    /// Guest frames the policy refused.
    pub tx_denied: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Bytes of the frames given to the guest.
    pub rx_bytes: u64,
    /// Bytes of the frames sent to the backend.
    pub tx_bytes: u64,
    /// Backend frames dropped (too large for the guest's buffers or MTU).
    pub rx_dropped: u64,
}

/// A receive chain taken from the ring and not yet used.
#[derive(Debug)]
struct HeldBuffer {
    chain: Chain,
}

/// A virtio network device.
#[derive(Debug)]
pub struct Net {
    config: NetConfig,
    backend: Box<dyn FrameBackend>,
    /// Whether the backend is still there (the link is up).
    connected: bool,
    /// The link went down and the driver has not been told.
    link_news: bool,
    poller: Poller,
    /// What the backend's socket is watched for now.
    interest: Interest,
    /// Frames for the guest, oldest first.
    waiting: VecDeque<Vec<u8>>,
    /// Receive chains taken for the next frame (several when buffers are
    /// merged), in ring order.
    held_rx: Vec<HeldBuffer>,
    stats: NetStats,
    active: Option<ActiveDevice>,
}

impl Net {
    /// A device with `config`, moving frames through `backend`.
    pub fn new(config: NetConfig, backend: Box<dyn FrameBackend>) -> Result<Self, Error> {
        if !(MIN_MTU..=DEFAULT_MTU).contains(&config.mtu) {
            return Err(Error::Mtu(config.mtu));
        }
        if config.mac[0] & 1 != 0 || config.mac == [0; 6] {
            return Err(Error::Mac(format_mac(&config.mac)));
        }
        let poller = Poller::new().map_err(Error::Poll)?;
        let interest = Interest::READ;
        poller
            .add(backend.source(), 0, interest, Trigger::Level)
            .map_err(Error::Poll)?;
        Ok(Self {
            config,
            backend,
            connected: true,
            link_news: false,
            poller,
            interest,
            waiting: VecDeque::new(),
            held_rx: Vec::new(),
            stats: NetStats::default(),
            active: None,
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    fn largest_frame(&self) -> usize {
        packet::ETH_HLEN + 4 + usize::from(self.config.mtu)
    }

    /// The backend failed or closed: the link goes down and stays down.
    fn disconnect(&mut self, why: &io::Error) {
        if !self.connected {
            return;
        }
        log::warn!("virtio-net: the network backend is gone ({why}); link down");
        self.connected = false;
        let _ = self.poller.delete(self.backend.source());
        // Told once the queue work under way is over (`after_work`).
        self.link_news = true;
    }

    /// Tells the driver of a link change, and watches the backend for what
    /// the device can use now: input while there is room for it, output
    /// while a frame waits to go.
    fn after_work(&mut self) {
        if self.link_news
            && let Some(active) = &self.active
        {
            active.interrupt.signal_config();
            self.link_news = false;
        }
        if !self.connected {
            return;
        }
        let want = Interest {
            // Not when full: a readable socket whose frames cannot go
            // anywhere would wake the event loop without end.
            readable: self.waiting.len() < MAX_WAITING_FRAMES,
            writable: self.backend.busy(),
        };
        if want != self.interest {
            match self
                .poller
                .modify(self.backend.source(), 0, want, Trigger::Level)
            {
                Ok(()) => self.interest = want,
                Err(e) => log::error!("virtio-net: polling: {e}"),
            }
        }
    }

    /// Moves everything that can move, in both directions.
    fn pump(&mut self) {
        self.process_tx();
        self.process_rx();
        self.after_work();
    }

    // ---- Guest to backend ---------------------------------------------

    fn process_tx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let csum_offload = active.features & (1 << VIRTIO_NET_F_CSUM) != 0;
        let mut frame = Vec::with_capacity(HEADER_SIZE + self.largest_frame());
        let result = (|| -> supermachine_virtq::Result<bool> {
            let queue = &mut active.queues[TX];
            let mut completed = false;
            loop {
                queue.disable_notification(&mem)?;
                loop {
                    if self.connected && !self.flush_backend() {
                        // Resumed when the socket is writable again.
                        return Ok(completed);
                    }
                    let Some(popped) = queue.pop(&mem)? else {
                        break;
                    };
                    if let Ok(chain) = &popped.chain {
                        frame.clear();
                        let taken =
                            read_chain(&mem, chain, &mut frame, HEADER_SIZE + self.largest_frame());
                        match taken {
                            Some(()) => self.transmit(&mut frame, csum_offload),
                            None => self.stats.tx_dropped += 1,
                        }
                    } else {
                        self.stats.tx_dropped += 1;
                    }
                    queue.add_used(&mem, popped.head, 0)?;
                    completed = true;
                }
                if !queue.enable_notification(&mem)? {
                    return Ok(completed && queue.needs_notification(&mem)?);
                }
            }
        })();
        let keep = active
            .interrupt
            .after_queue_work(result, &"virtio-net TX queue");
        if keep {
            self.active = Some(active);
        } else {
            self.held_rx.clear();
        }
    }

    /// Sends what the backend kept; true when it can take a new frame.
    fn flush_backend(&mut self) -> bool {
        match self.backend.flush() {
            Ok(done) => done,
            Err(e) => {
                self.disconnect(&e);
                true
            }
        }
    }

    /// One guest frame (`header + frame`): checked, its checksum completed,
    /// judged by the policy, sent.
    fn transmit(&mut self, raw: &mut [u8], csum_offload: bool) {
        let (header, frame) = raw.split_at_mut(HEADER_SIZE);
        let flags = u32::from(header[0]);
        let gso_type = u32::from(header[1]);
        if gso_type != VIRTIO_NET_HDR_GSO_NONE || frame.len() < packet::ETH_HLEN {
            log::debug!(
                "virtio-net: dropping a guest frame (gso type {gso_type}, {} bytes)",
                frame.len()
            );
            self.stats.tx_dropped += 1;
            return;
        }
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let start = usize::from(u16::from_le_bytes([header[6], header[7]]));
            let offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
            if !csum_offload || !complete_checksum(frame, start, offset) {
                self.stats.tx_dropped += 1;
                return;
            }
        }
        match self.config.policy.check(frame) {
            Verdict::Allow => {}
            Verdict::Deny { reply } => {
                self.stats.tx_denied += 1;
                if let Some(reply) = reply
                    && self.waiting.len() < MAX_WAITING_FRAMES
                {
                    self.waiting.push_back(reply);
                }
                return;
            }
        }
        if !self.connected {
            self.stats.tx_dropped += 1;
            return;
        }
        match self.backend.send(frame) {
            Ok(()) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += frame.len() as u64;
            }
            Err(e) => self.disconnect(&e),
        }
    }

    // ---- Backend to guest ---------------------------------------------

    fn process_rx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mergeable = active.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        // Frames come over a local socket from a host program: there is
        // nothing for the guest's checksum check to catch (Linux skips it
        // on loopback for the same reason), and under emulation it is
        // most of the guest's work per frame.
        let flags = if active.features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0 {
            VIRTIO_NET_HDR_F_DATA_VALID as u8
        } else {
            0
        };
        let result = self.fill_rx(&active.mem, &mut active.queues[RX], mergeable, flags);
        if active
            .interrupt
            .after_queue_work(result, &"virtio-net RX queue")
        {
            self.active = Some(active);
        } else {
            self.held_rx.clear();
        }
    }

    /// While the guest has no buffers, takes what the backend has into
    /// `waiting` (up to its bound): a backend that cannot write drops
    /// frames (passt does), and the guest's TCP then resends whole windows.
    fn read_ahead(&mut self) {
        while self.connected && self.waiting.len() < MAX_WAITING_FRAMES {
            match self.backend.recv() {
                Ok(Some(frame)) if self.fits(&frame) => self.waiting.push_back(frame),
                Ok(Some(frame)) => self.drop_oversized(&frame),
                Ok(None) => return,
                Err(e) => self.disconnect(&e),
            }
        }
    }

    fn fits(&self, frame: &[u8]) -> bool {
        (packet::ETH_HLEN..=self.largest_frame()).contains(&frame.len())
    }

    fn drop_oversized(&mut self, frame: &[u8]) {
        log::debug!(
            "virtio-net: dropping a {}-byte frame from the backend",
            frame.len()
        );
        self.stats.rx_dropped += 1;
    }

    /// The next frame for the guest: a waiting one, else one from the
    /// backend.
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(frame) = self.waiting.pop_front() {
            return Some(frame);
        }
        if !self.connected {
            return None;
        }
        loop {
            match self.backend.recv() {
                Ok(Some(frame)) if !self.fits(&frame) => self.drop_oversized(&frame),
                Ok(frame) => return frame,
                Err(e) => {
                    self.disconnect(&e);
                    return None;
                }
            }
        }
    }

    fn fill_rx(
        &mut self,
        mem: &GuestMemoryMmapped,
        queue: &mut Virtqueue,
        mergeable: bool,
        flags: u8,
    ) -> supermachine_virtq::Result<bool> {
        let mut completed = false;
        loop {
            let mut starved = false;
            while let Some(frame) = self.next_frame() {
                let need = HEADER_SIZE + frame.len();
                // Gather receive buffers until the frame fits.
                let mut room: usize = self
                    .held_rx
                    .iter()
                    .map(|b| b.chain.writable_len() as usize)
                    .sum();
                while room < need && (mergeable || self.held_rx.is_empty()) {
                    let Some(popped) = queue.pop(mem)? else {
                        break;
                    };
                    match popped.chain {
                        Ok(chain) if chain.writable_len() as usize >= HEADER_SIZE => {
                            room += chain.writable_len() as usize;
                            self.held_rx.push(HeldBuffer { chain });
                        }
                        _ => {
                            // Unusable (refused, or too short for a header).
                            queue.add_used(mem, popped.head, 0)?;
                            completed = true;
                        }
                    }
                }
                if room < need {
                    if !mergeable && !self.held_rx.is_empty() {
                        // One buffer is all a frame gets; this one is too big.
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    self.waiting.push_front(frame);
                    starved = true;
                    break;
                }
                self.deliver(mem, queue, &frame, flags)?;
                completed = true;
            }
            // Out of buffers with a frame waiting: ask the driver to say
            // when it adds the next one (EVENT_IDX: past those taken), and
            // go on at once if it already has. Without this the device
            // would hear of new buffers only by chance.
            if !starved {
                break;
            }
            if !queue.enable_notification(mem)? {
                // While the guest has no room, frames from the backend
                // queue up in `waiting` (to its bound).
                self.read_ahead();
                break;
            }
        }
        Ok(completed && queue.needs_notification(mem)?)
    }

    /// Writes `frame` behind a header across the held buffers (which
    /// hold enough room) and returns the used ones.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmapped,
        queue: &mut Virtqueue,
        frame: &[u8],
        flags: u8,
    ) -> supermachine_virtq::Result<()> {
        let mut used = Vec::new();
        let mut rest = frame;
        let mut first = true;
        let mut header = [0u8; HEADER_SIZE];
        while first || !rest.is_empty() {
            let held = self.held_rx.remove(0);
            let mut writer = Writer::new(mem, held.chain.writable());
            let mut written = 0;
            if first {
                // num_buffers is filled in once it is known.
                header[0] = flags;
                header[1] = VIRTIO_NET_HDR_GSO_NONE as u8;
                if writer.write_all(&header).is_err() {
                    break;
                }
                written += HEADER_SIZE;
            }
            let n = writer.remaining().min(rest.len());
            if writer.write_all(&rest[..n]).is_err() {
                break;
            }
            written += n;
            rest = &rest[n..];
            used.push((held.chain, written));
            first = false;
        }
        // num_buffers, in the first buffer's header.
        if let Some((chain, _)) = used.first() {
            let count = u16::try_from(used.len()).unwrap_or(u16::MAX);
            let mut writer = Writer::new(mem, chain.writable());
            writer.skip(10);
            let _ = writer.write_all(&count.to_le_bytes());
        }
        for (chain, written) in used {
            queue.add_used(mem, chain.head(), written as u32)?;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame.len() as u64;
        Ok(())
    }
}

/// Reads the whole readable part of `chain` into `out`; `None` if it is
/// longer than `max` or cannot be read.
fn read_chain(
    mem: &GuestMemoryMmapped,
    chain: &Chain,
    out: &mut Vec<u8>,
    max: usize,
) -> Option<()> {
    let len = chain.readable_len() as usize;
    if !(HEADER_SIZE..=max).contains(&len) {
        return None;
    }
    out.resize(len, 0);
    let mut reader = Reader::new(mem, chain.readable());
    reader.read_exact(out).ok()
}

/// Completes a partial checksum: the one's-complement sum of
/// `frame[start..]` stored at `start + offset` (where the guest left the
/// pseudo-header sum). False if the offsets fall outside the frame.
fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let Some(at) = start.checked_add(offset) else {
        return false;
    };
    if start >= frame.len() || at + 2 > frame.len() {
        return false;
    }
    let checksum = packet::fold(packet::sum(&frame[start..], 0));
    frame[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

impl Drop for Net {
    fn drop(&mut self) {
        log::debug!("virtio-net: {:?}", self.stats);
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit)
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.config.mac);
        let status = if self.connected {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        data.fill(0);
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(&mut self, device: ActiveDevice) -> Result<(), supermachine_virtio_mmio::Error> {
        if device.queues.len() != 2 {
            return Err(supermachine_virtio_mmio::Error::Activate(
                "virtio-net has two queues (no control queue, no multiqueue)".into(),
            ));
        }
        self.active = Some(device);
        self.pump();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.held_rx.clear();
        self.waiting.clear();
        self.after_work();
    }

    fn queue_notified(&mut self, index: usize) {
        match index {
            TX => {
                self.process_tx();
                // The policy's answers to what the guest just sent (a
                // reset, an ICMP refusal) go back at once, not with the
                // next frame that happens to come from the backend.
                if !self.waiting.is_empty() {
                    self.process_rx();
                }
            }
            _ => self.process_rx(),
        }
        self.after_work();
    }

    #[cfg(unix)]
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.poller.as_raw_fd())
    }

    fn backend_ready(&mut self) {
        if self.active.is_some() {
            self.pump();
        } else if self.connected {
            // Not started: frames for a guest that is not listening are
            // dropped, so the backend never stalls on us.
            loop {
                match self.backend.recv() {
                    Ok(Some(_)) => self.stats.rx_dropped += 1,
                    Ok(None) => break,
                    Err(e) => {
                        self.disconnect(&e);
                        break;
                    }
                }
            }
        }
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        let mut states = self.active.as_ref()?.queue_states();
        // Held receive buffers go back to the driver: they are the last
        // ones taken.
        if let Some(rx) = states.get_mut(RX) {
            rx.next_avail = rx.next_avail.wrapping_sub(self.held_rx.len() as u16);
        }
        Some(states)
    }
}
