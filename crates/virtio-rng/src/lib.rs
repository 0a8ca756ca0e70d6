//! virtio-rng: the guest's buffers filled from the host's `getrandom`.

use std::io::Write;

use supermachine_virtio_mmio::{ActiveDevice, VirtioDevice};
use supermachine_virtq::Writer;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes given for one request.
pub const MAX_REQUEST: usize = 64 << 10;
const VIRTIO_ID_RNG: u32 = 4;

/// A virtio entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    active: Option<ActiveDevice>,
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    fn process_queue(&mut self) {
        let Some(ActiveDevice {
            mem,
            queues,
            interrupt,
            ..
        }) = self.active.as_mut()
        else {
            return;
        };
        let Some(queue) = queues.first_mut() else {
            return;
        };
        let mut random = vec![0u8; MAX_REQUEST];
        let result = queue.drain(mem, |chain| {
            let mut w = Writer::new(mem, chain.writable());
            let n = w.remaining().min(MAX_REQUEST);
            match getrandom::fill(&mut random[..n]) {
                Ok(()) if w.write_all(&random[..n]).is_ok() => n as u32,
                Ok(()) => 0,
                Err(e) => {
                    log::error!("virtio-rng: getrandom: {e}");
                    0
                }
            }
        });
        if !interrupt.after_queue_work(result, &"virtio-rng") {
            self.active = None;
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, device: ActiveDevice) -> Result<(), supermachine_virtio_mmio::Error> {
        if device.queues.len() != 1 {
            return Err(supermachine_virtio_mmio::Error::Activate(
                "virtio-rng has one queue".into(),
            ));
        }
        self.active = Some(device);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_states(&self) -> Option<Vec<supermachine_virtio_mmio::QueueState>> {
        // Requests are served whole as they arrive: nothing is held.
        self.active.as_ref().map(ActiveDevice::queue_states)
    }

    fn queue_notified(&mut self, _index: usize) {
        self.process_queue();
    }
}
