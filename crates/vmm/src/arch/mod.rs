//! Everything about the machine that depends on the guest's architecture,
//! behind one set of names: the memory layout, where the console UART and
//! the virtio devices sit and which interrupts they raise, how the kernel
//! is loaded and described to (boot tables or a device tree), the boot
//! vCPU's entry state, and the platform's own devices. The rest of the
//! VMM uses only these names.

use std::path::Path;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub(crate) use aarch64::*;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::*;

#[cfg(target_arch = "aarch64")]
pub use aarch64::DEFAULT_CMDLINE;
#[cfg(target_arch = "x86_64")]
pub use x86_64::DEFAULT_CMDLINE;

/// Which bus a device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    dead_code,
    reason = "x86_64 puts its platform devices on ports, aarch64 in MMIO"
)]
pub(crate) enum BusKind {
    /// x86 I/O ports.
    Pio,
    /// Guest physical addresses.
    Mmio,
}

/// Where a device sits and how many addresses it answers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placement {
    pub(crate) bus: BusKind,
    pub(crate) base: u64,
    pub(crate) span: u64,
}

/// What a cold boot loads besides the kernel.
pub(crate) struct BootSetup<'a> {
    pub(crate) cmdline: &'a str,
    pub(crate) initrd: Option<&'a Path>,
    pub(crate) vcpus: u32,
    /// Every virtio-mmio device: (MMIO base, interrupt).
    pub(crate) virtio: &'a [(u64, u32)],
}
