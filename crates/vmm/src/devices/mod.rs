//! Legacy platform devices: the 16550 serial console and the i8042's reset line.

pub(crate) mod console;
pub(crate) mod i8042;
pub(crate) mod serial;
