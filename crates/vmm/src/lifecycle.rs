//! How a running VM ends: the first outcome reported wins, every vCPU is
//! kicked out of the guest, and the event loop is woken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use supermachine_host::Event;
use supermachine_hypervisor::VcpuKicker;

use crate::{Error, ExitReason, Result};

pub(crate) type Outcome = Result<ExitReason>;

pub(crate) struct Lifecycle {
    finished: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    cond: Condvar,
    kickers: OnceLock<Vec<Arc<dyn VcpuKicker>>>,
    /// The kernel's panic message, once its console has printed one.
    panic_message: Mutex<Option<String>>,
    /// Readable once the VM has finished; wakes the event loop.
    pub(crate) finished_evt: Event,
}

impl Lifecycle {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            finished: AtomicBool::new(false),
            outcome: Mutex::new(None),
            cond: Condvar::new(),
            kickers: OnceLock::new(),
            panic_message: Mutex::new(None),
            finished_evt: Event::new()?,
        })
    }

    pub(crate) fn set_kickers(&self, kickers: Vec<Arc<dyn VcpuKicker>>) {
        let _ = self.kickers.set(kickers);
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Records how the VM ended, unless an earlier outcome already did.
    pub(crate) fn finish(&self, outcome: Outcome) {
        {
            let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                return;
            }
            log::debug!("VM finishing: {outcome:?}");
            *slot = Some(outcome);
            self.finished.store(true, Ordering::Release);
        }
        self.cond.notify_all();
        if let Some(kickers) = self.kickers.get() {
            for k in kickers {
                k.kick();
            }
        }
        if let Err(e) = self.finished_evt.signal() {
            log::warn!("waking the event loop: {e}");
        }
    }

    /// The console saw the kernel's panic line.
    pub(crate) fn note_panic(&self, message: String) {
        let mut m = self.panic_message.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_none() {
            *m = Some(message);
        }
    }

    fn panic_message(&self) -> Option<String> {
        self.panic_message
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The guest reset the machine: a clean reboot, unless the kernel
    /// panicked first (a panicking kernel resets to reboot).
    pub(crate) fn guest_reset(&self) {
        match self.panic_message() {
            Some(message) => self.finish(Err(Error::GuestPanic(message))),
            None => self.finish(Ok(ExitReason::Reboot)),
        }
    }

    /// The kernel finished printing a panic and will hang or reset.
    pub(crate) fn guest_panic_complete(&self) {
        let message = self
            .panic_message()
            .unwrap_or_else(|| "Kernel panic".to_string());
        self.finish(Err(Error::GuestPanic(message)));
    }

    /// Blocks until the VM has finished or `timeout` has passed; true if
    /// it has finished. Leaves the outcome for [`Lifecycle::wait`].
    pub(crate) fn wait_finished(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        while !self.is_finished() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            slot = self
                .cond
                .wait_timeout(slot, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Blocks until the VM has finished; returns the outcome once.
    pub(crate) fn wait(&self) -> Outcome {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = slot.take() {
                return outcome;
            }
            if self.is_finished() {
                return Err(Error::AlreadyWaited);
            }
            slot = self.cond.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }
}
