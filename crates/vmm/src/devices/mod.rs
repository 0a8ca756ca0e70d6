//! Platform devices (the 16550 serial console, the i8042 reset line) and
//! the glue that puts virtio-mmio devices in the VM.

pub(crate) mod console;
pub(crate) mod i8042;
pub(crate) mod serial;
pub(crate) mod virtio;
