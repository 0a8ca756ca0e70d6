//! The 16550A console UART, on `vm-superio` (where it sits: `arch::SERIAL`).

use std::sync::Arc;

use supermachine_host::Event;
use supermachine_hypervisor::InterruptLine;
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};

use super::console::ConsoleSink;
use crate::bus::BusDevice;

/// Raises the UART's interrupt line.
pub(crate) struct IrqTrigger(pub(crate) Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = supermachine_hypervisor::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger()
    }
}

/// Signals `room` when the guest has drained the input FIFO, so the event
/// loop can resume reading the host's input.
pub(crate) struct InputRoom {
    pub(crate) room: Event,
}

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.room.signal() {
            log::warn!("serial input: signalling room: {e}");
        }
    }
}

pub(crate) struct SerialPort {
    pub(crate) uart: Serial<IrqTrigger, InputRoom, ConsoleSink>,
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([byte], Ok(offset)) = (&mut *data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset))
            && let Err(e) = self.uart.write(offset, *byte)
        {
            log::warn!("serial: {e}");
        }
    }
}
