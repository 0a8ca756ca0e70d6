//! Address buses: which device answers a port or MMIO access.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the device's base address.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

/// A range could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    /// Base of the range that was refused.
    pub base: u64,
}

impl Bus {
    /// Adds `device` at `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base })?;
        if len == 0
            || self
                .ranges
                .iter()
                .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(Overlap { base });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device whose range holds all of `addr..addr + len`, and the offset.
    fn find(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        let offset = addr - r.base;
        let end = offset.checked_add(len as u64)?;
        (end <= r.len).then_some((&r.device, offset))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) when no
    /// device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_owning_device_at_its_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert_eq!(a.lock().unwrap().writes, vec![(3, vec![7])]);
        let mut b = [0u8; 2];
        assert!(bus.read(0x3fc, &mut b));
        assert_eq!(b, [4, 4]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut b = [0xaau8; 4];
        assert!(!bus.read(0xff, &mut b));
        assert!(!bus.read(0x10e, &mut b), "straddles the end");
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.read(u64::MAX, &mut b));
        assert_eq!(b, [0xaa; 4]);
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::default();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(0x100, 0x10, d()).unwrap();
        assert!(bus.insert(0x10f, 1, d()).is_err());
        assert!(bus.insert(0xf0, 0x11, d()).is_err());
        assert!(bus.insert(0x50, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
        bus.insert(0x110, 1, d()).unwrap();
    }
}
