//! Guest writes a backend watches for itself: for hypervisors without an
//! ioeventfd (Hypervisor.framework, WHP), an [`IoNotifier`](crate::IoNotifier)
//! is an entry here that the backend signals when a write exit matches
//! it, going back into the guest without troubling the VMM.

use std::sync::{Arc, RwLock};

use crate::{Datamatch, IoAddress};

impl Datamatch {
    /// Whether a guest write of `data` (little-endian, 1 to 8 bytes)
    /// is one this accepts.
    pub fn accepts(&self, data: &[u8]) -> bool {
        if data.is_empty() || data.len() > 8 {
            return false;
        }
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        match *self {
            Datamatch::Any => true,
            Datamatch::U8(v) => data.len() == 1 && value == u64::from(v),
            Datamatch::U16(v) => data.len() == 2 && value == u64::from(v),
            Datamatch::U32(v) => data.len() == 4 && value == u64::from(v),
            Datamatch::U64(v) => data.len() == 8 && value == v,
        }
    }
}

/// One watched write and what signals it (`S`: the backend's event).
#[derive(Debug)]
pub struct Watched<S> {
    /// Where the write goes.
    pub addr: IoAddress,
    /// Which writes there count.
    pub datamatch: Datamatch,
    /// What the backend signals.
    pub signal: S,
}

/// The writes a VM's backend watches for.
#[derive(Debug)]
pub struct WriteWatches<S> {
    list: RwLock<Vec<Arc<Watched<S>>>>,
}

impl<S> Default for WriteWatches<S> {
    fn default() -> Self {
        Self {
            list: RwLock::new(Vec::new()),
        }
    }
}

impl<S> WriteWatches<S> {
    /// Watches writes to `addr` that `datamatch` accepts.
    pub fn add(&self, addr: IoAddress, datamatch: Datamatch, signal: S) -> Arc<Watched<S>> {
        let watched = Arc::new(Watched {
            addr,
            datamatch,
            signal,
        });
        self.list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(watched.clone());
        watched
    }

    /// Stops watching what [`WriteWatches::add`] returned.
    pub fn remove(&self, watched: &Arc<Watched<S>>) {
        self.list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| !Arc::ptr_eq(w, watched));
    }

    /// Calls `signal` on the first watch a write of `data` to `addr`
    /// matches; returns whether one did.
    pub fn signal_matching(&self, addr: IoAddress, data: &[u8], signal: impl FnOnce(&S)) -> bool {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        match list
            .iter()
            .find(|w| w.addr == addr && w.datamatch.accepts(data))
        {
            Some(w) => {
                signal(&w.signal);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn datamatch_takes_width_and_value_into_account() {
        assert!(Datamatch::Any.accepts(&[1, 2]));
        assert!(Datamatch::U32(3).accepts(&3u32.to_le_bytes()));
        assert!(!Datamatch::U32(3).accepts(&3u16.to_le_bytes()));
        assert!(!Datamatch::U32(3).accepts(&4u32.to_le_bytes()));
        assert!(Datamatch::U8(0xff).accepts(&[0xff]));
        assert!(Datamatch::U64(u64::MAX).accepts(&[0xff; 8]));
        assert!(!Datamatch::Any.accepts(&[]));
        assert!(!Datamatch::Any.accepts(&[0; 9]));
    }

    #[test]
    fn a_matching_write_signals_its_watch_until_removed() {
        let watches = WriteWatches::default();
        let queue0 = watches.add(
            IoAddress::Mmio(0x50),
            Datamatch::U32(0),
            AtomicUsize::new(0),
        );
        let queue1 = watches.add(
            IoAddress::Mmio(0x50),
            Datamatch::U32(1),
            AtomicUsize::new(0),
        );
        let bump = |s: &AtomicUsize| {
            s.fetch_add(1, Ordering::SeqCst);
        };
        assert!(watches.signal_matching(IoAddress::Mmio(0x50), &1u32.to_le_bytes(), bump));
        assert!(!watches.signal_matching(IoAddress::Mmio(0x54), &1u32.to_le_bytes(), bump));
        assert!(!watches.signal_matching(IoAddress::Port(0x50), &1u32.to_le_bytes(), bump));
        assert_eq!(
            (
                queue0.signal.load(Ordering::SeqCst),
                queue1.signal.load(Ordering::SeqCst)
            ),
            (0, 1)
        );
        watches.remove(&queue1);
        assert!(!watches.signal_matching(IoAddress::Mmio(0x50), &1u32.to_le_bytes(), bump));
        assert!(watches.signal_matching(IoAddress::Mmio(0x50), &0u32.to_le_bytes(), bump));
    }
}
