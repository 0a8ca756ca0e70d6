//! Stopping every vCPU between two instructions and starting them again,
//! for snapshots: each vCPU thread saves its own state when it parks.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use supermachine_hypervisor::{Vcpu, VcpuKicker, VcpuState};

use crate::lifecycle::Lifecycle;
use crate::{Error, Result};

#[derive(Default)]
struct Inner {
    requested: bool,
    /// What each parked vCPU saved, by index.
    saved: Vec<Option<std::result::Result<VcpuState, String>>>,
    parked: usize,
}

/// Shared by the vCPU threads and whoever pauses them.
#[derive(Default)]
pub(crate) struct PauseControl {
    inner: Mutex<Inner>,
    cond: Condvar,
}

impl PauseControl {
    pub(crate) fn new(vcpus: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                saved: (0..vcpus).map(|_| None).collect(),
                ..Inner::default()
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On a vCPU thread, between runs: if a pause is asked for, saves the
    /// vCPU and waits until it is lifted or the VM ends.
    pub(crate) fn park_if_requested(&self, vcpu: &mut dyn Vcpu, lifecycle: &Lifecycle) {
        if !self.lock().requested {
            return;
        }
        let index = vcpu.index() as usize;
        let saved = vcpu.save_state().map_err(|e| e.to_string());
        let mut inner = self.lock();
        if let Some(slot) = inner.saved.get_mut(index) {
            *slot = Some(saved);
        }
        inner.parked += 1;
        self.cond.notify_all();
        while inner.requested && !lifecycle.is_finished() {
            inner = self
                .cond
                .wait_timeout(inner, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        inner.parked -= 1;
    }

    /// Stops every vCPU and returns their saved states, in index order.
    pub(crate) fn pause_all(
        &self,
        kickers: &[Arc<dyn VcpuKicker>],
        lifecycle: &Lifecycle,
    ) -> Result<Vec<VcpuState>> {
        {
            let mut inner = self.lock();
            if inner.requested {
                return Err(Error::Snapshot("the VM is already paused".into()));
            }
            inner.requested = true;
            inner.saved.iter_mut().for_each(|s| *s = None);
        }
        for k in kickers {
            k.kick();
        }
        let mut inner = self.lock();
        while inner.parked < kickers.len() {
            if lifecycle.is_finished() {
                inner.requested = false;
                return Err(Error::Snapshot(
                    "the VM ended before it could be paused".into(),
                ));
            }
            inner = self
                .cond
                .wait_timeout(inner, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut states = Vec::with_capacity(kickers.len());
        for (index, slot) in inner.saved.iter_mut().enumerate() {
            match slot.take() {
                Some(Ok(state)) => states.push(state),
                Some(Err(why)) => {
                    return Err(Error::Snapshot(format!("saving vCPU {index}: {why}")));
                }
                None => return Err(Error::Snapshot(format!("vCPU {index} did not park"))),
            }
        }
        Ok(states)
    }

    /// Lets every parked vCPU run again.
    pub(crate) fn resume(&self) {
        self.lock().requested = false;
        self.cond.notify_all();
    }
}
