//! The serial console and the glue that puts virtio-mmio devices in the
//! VM (each architecture's own platform devices live in `arch`).

pub(crate) mod console;
pub(crate) mod serial;
pub(crate) mod virtio;
