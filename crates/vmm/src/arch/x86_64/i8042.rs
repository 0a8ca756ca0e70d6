//! The i8042 keyboard controller, reduced to what a guest uses it for
//! here: pulsing the CPU reset line (command 0xFE on port 0x64).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::lifecycle::Lifecycle;

/// Port of the data register; the command/status register is at +4.
pub(crate) const I8042_DATA_PORT: u64 = 0x60;
pub(crate) const I8042_PORT_SPAN: u64 = 5;

pub(crate) struct ResetLine(Arc<Lifecycle>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.guest_reset();
        Ok(())
    }
}

pub(crate) struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub(crate) fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self(I8042Device::new(ResetLine(lifecycle)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Ports 0x61..0x63 fall inside the span but are not ours.
        let value = if matches!(offset, 0 | 4) && data.len() == 1 {
            self.0.read(offset as u8)
        } else {
            0xff
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], 0 | 4) = (data, offset) {
            let Ok(()) = self.0.write(offset as u8, *value);
        }
    }
}
