//! virtio-fs as a vhost-user device: the guest's FUSE requests go straight
//! from its rings to a vhost-user backend process (virtiofsd) that serves
//! them from a host directory. This VMM only negotiates: it hands the
//! backend the guest memory (which must be shared, file-backed), the
//! rings' addresses and two eventfds per queue, then passes the guest's
//! queue notifications on as kicks and the backend's calls on as
//! interrupts. It never reads a descriptor itself: the backend validates
//! every one against the memory table it was given.
//!
//! Device configuration space (virtio 1.2, 5.11.4): a 36-byte tag the
//! guest mounts by (`mount -t virtiofs TAG DIR`) and the number of request
//! queues (one here, plus the high-priority queue).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use supermachine_virtio_mmio::{
    ActiveDevice, Error as MmioError, Interrupt, QueueState, VirtioDevice,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// virtio device ID of a file system device.
pub const DEVICE_TYPE: u32 = 26;
/// The longest tag (bytes, not NUL-terminated when full).
pub const TAG_LEN: usize = 36;
/// The high-priority queue and one request queue.
const QUEUES: usize = 2;
/// Queue size offered for each.
const QUEUE_SIZE: u16 = 1024;
/// Protocol features used when the backend offers them: only the ones
/// whose absence would change behaviour here.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ;

/// Errors setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tag is empty, too long, or not printable ASCII.
    #[error("virtio-fs tag {0:?} must be 1 to 36 printable ASCII characters")]
    InvalidTag(String),
    /// The backend's socket could not be reached or spoke wrongly.
    #[error("vhost-user backend {socket}: {what}: {source}")]
    Backend {
        /// The backend's socket.
        socket: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: vhost::Error,
    },
    /// An eventfd could not be made.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio-fs device served by a vhost-user backend.
pub struct Fs {
    tag: String,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol_features: bool,
    kicks: Vec<EventFd>,
    /// One call eventfd for both queues: the backend signals it when it
    /// has used buffers; the event loop turns that into an interrupt.
    call: EventFd,
    interrupt: Option<Arc<Interrupt>>,
    queue_sizes: [u16; QUEUES],
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Fs {
    /// Connects to the backend at `socket` and takes ownership of it; the
    /// guest will see the share as `tag`.
    pub fn new(tag: &str, socket: &Path) -> Result<Fs, Error> {
        if tag.is_empty() || tag.len() > TAG_LEN || !tag.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidTag(tag.to_string()));
        }
        let backend = |what: &'static str| {
            let socket = socket.to_path_buf();
            move |source| Error::Backend {
                socket,
                what,
                source,
            }
        };
        let frontend = Frontend::connect(socket, QUEUES as u64).map_err(backend("connecting"))?;
        frontend.set_owner().map_err(backend("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(backend("GET_FEATURES"))?;
        let kicks = (0..QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fs {
            tag: tag.to_string(),
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            protocol_features: backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                != 0,
            kicks,
            call: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            interrupt: None,
            queue_sizes: [QUEUE_SIZE; QUEUES],
        })
    }

    fn backend_error(&self, what: &'static str) -> impl FnOnce(vhost::Error) -> MmioError + '_ {
        move |e| MmioError::Activate(format!("virtio-fs {}: {what}: {e}", self.socket.display()))
    }

    /// Hands the backend everything it needs to serve the rings.
    fn start_backend(&mut self, device: &ActiveDevice) -> Result<(), MmioError> {
        // The transport offers VERSION_1, INDIRECT_DESC and EVENT_IDX on
        // every device; the backend must have agreed to each one the
        // driver took.
        let unsupported = device.features & !self.backend_features;
        if unsupported != 0 {
            return Err(MmioError::Activate(format!(
                "virtio-fs backend lacks features {unsupported:#x} the driver accepted"
            )));
        }
        let mut features = device.features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(self.backend_error("SET_FEATURES"))?;
        if self.protocol_features {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(self.backend_error("GET_PROTOCOL_FEATURES"))?;
            self.frontend
                .set_protocol_features(offered & WANTED_PROTOCOL_FEATURES)
                .map_err(self.backend_error("SET_PROTOCOL_FEATURES"))?;
        }
        let mut regions = Vec::new();
        for region in device.mem.iter() {
            regions.push(
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                    MmioError::Activate(
                        "virtio-fs needs guest memory shared with the backend (file-backed)".into(),
                    )
                })?,
            );
        }
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.backend_error("SET_MEM_TABLE"))?;
        // Ring addresses go to the backend as addresses in this process
        // (vhost-user's rule); it translates them through the memory
        // table's `userspace_addr`. The transport has checked that each
        // ring lies in guest RAM.
        let host_address = |guest: u64| {
            device
                .mem
                .get_host_address(GuestAddress(guest))
                .map(|p| p as u64)
                .map_err(|e| MmioError::Activate(format!("virtio-fs ring at {guest:#x}: {e}")))
        };
        for (index, queue) in device.queues.iter().enumerate() {
            let state = queue.state();
            self.queue_sizes[index] = state.size;
            let config = VringConfigData {
                queue_max_size: state.max_size,
                queue_size: state.size,
                flags: 0,
                desc_table_addr: host_address(queue.desc_table())?,
                used_ring_addr: host_address(queue.used_ring())?,
                avail_ring_addr: host_address(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, state.size)
                .map_err(self.backend_error("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(self.backend_error("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, state.next_avail)
                .map_err(self.backend_error("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, &self.call)
                .map_err(self.backend_error("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &self.kicks[index])
                .map_err(self.backend_error("SET_VRING_KICK"))?;
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(self.backend_error("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn features(&self) -> u64 {
        // Device-specific bits the backend offers (notification support,
        // say); the transport adds the ring features.
        self.backend_features & ((1 << 24) - 1)
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start
                .checked_add(i)
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, device: ActiveDevice) -> Result<(), MmioError> {
        self.start_backend(&device)?;
        self.interrupt = Some(device.interrupt.clone());
        Ok(())
    }

    fn reset(&mut self) {
        if self.interrupt.take().is_none() {
            return;
        }
        // GET_VRING_BASE stops each ring in the backend.
        for index in 0..QUEUES {
            if self.protocol_features {
                let _ = self.frontend.set_vring_enable(index, false);
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!("virtio-fs: stopping ring {index}: {e}");
            }
        }
    }

    fn queue_notified(&mut self, index: usize) {
        if let Some(kick) = self.kicks.get(index)
            && let Err(e) = kick.write(1)
        {
            log::warn!("virtio-fs: kicking queue {index}: {e}");
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.call.as_raw_fd())
    }

    fn backend_ready(&mut self) {
        // Non-blocking: a spurious wake-up reads nothing.
        if self.call.read().is_ok()
            && let Some(interrupt) = &self.interrupt
        {
            interrupt.signal_used();
        }
    }

    /// The rings' positions live in the backend; reading them back would
    /// stop it. A VM with a virtio-fs share cannot be snapshotted yet, and
    /// the device reports no queue state.
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tags_are_refused_before_any_connection() {
        for tag in ["", "has space", &"x".repeat(37), "tab\t"] {
            let e = Fs::new(tag, Path::new("/nonexistent/socket")).unwrap_err();
            assert!(matches!(e, Error::InvalidTag(_)), "{tag}: {e}");
        }
        let e = Fs::new("share", Path::new("/nonexistent/socket")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/socket"), "{e}");
    }
}
