//! The aarch64 machine (QEMU `virt`'s addresses): RAM from 2 GiB, the
//! GICv3 the hypervisor creates, a 16550 UART, virtio-mmio devices on
//! SPIs, all described by a device tree; the boot vCPU enters the kernel
//! `Image` at EL1 with the device tree's address in X0, the others wait
//! for PSCI CPU_ON.

use std::sync::Arc;

use supermachine_boot::aarch64::{self as boot, layout};
use supermachine_hypervisor::aarch64::pstate;
use supermachine_hypervisor::{CpuState, Vcpu};
use supermachine_memory::{GuestMemoryMmapped, MemoryLayout};

use super::{BootSetup, BusKind, Placement};
use crate::Result;
use crate::bus::SharedDevice;
use crate::lifecycle::Lifecycle;

/// The kernel command line used when the caller gives none: console on
/// the UART, reboot at once on a panic (PSCI SYSTEM_RESET ends the VM).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// The most vCPUs whose GIC redistributors fit.
pub(crate) const MAX_VCPUS: u32 = layout::MAX_CPUS;

/// The 16550-compatible UART.
pub(crate) const SERIAL: Placement = Placement {
    bus: BusKind::Mmio,
    base: layout::UART_BASE,
    span: layout::UART_SIZE,
};
/// The UART's SPI.
pub(crate) const SERIAL_IRQ: u32 = layout::UART_SPI;

/// Most virtio devices one VM can have (each has its page and SPI).
pub(crate) const MAX_VIRTIO_DEVICES: usize = 32;

/// Where virtio device `index` lives: (MMIO base, SPI).
pub(crate) fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    (index < MAX_VIRTIO_DEVICES).then(|| {
        (
            layout::VIRTIO_MMIO_BASE + index as u64 * layout::VIRTIO_MMIO_SIZE,
            layout::VIRTIO_FIRST_SPI + index as u32,
        )
    })
}

/// The guest RAM layout for `bytes` of RAM.
pub(crate) fn memory_layout(bytes: u64) -> Result<MemoryLayout> {
    Ok(MemoryLayout::aarch64(bytes)?)
}

/// The platform has no devices of its own beyond the UART: power-off and
/// reset go through PSCI, which the hypervisor answers.
pub(crate) fn platform_devices(_lifecycle: &Arc<Lifecycle>) -> Vec<(Placement, SharedDevice)> {
    Vec::new()
}

/// A kernel `Image`, checked, not yet loaded.
pub(crate) struct KernelFile(boot::Image);

impl KernelFile {
    pub(crate) fn open(path: &std::path::Path) -> Result<Self> {
        Ok(Self(boot::Image::open(path)?))
    }
}

/// How the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    kernel: u64,
    fdt: u64,
}

/// Loads the kernel and initrd and writes the device tree.
pub(crate) fn load_guest(
    mem: &GuestMemoryMmapped,
    layout: &MemoryLayout,
    kernel: &mut KernelFile,
    setup: &BootSetup<'_>,
) -> Result<Entry> {
    let loaded = kernel.0.load(mem, layout)?;
    let initrd = setup
        .initrd
        .map(|path| boot::load_initrd(mem, layout, loaded.end, path))
        .transpose()?;
    let virtio: Vec<boot::VirtioMmio> = setup
        .virtio
        .iter()
        .map(|&(base, spi)| boot::VirtioMmio { base, spi })
        .collect();
    let blob = boot::write_fdt(&boot::Machine {
        cpus: setup.vcpus,
        memory: layout,
        cmdline: setup.cmdline,
        initrd,
        virtio: &virtio,
    })?;
    let fdt = boot::write_fdt_blob(mem, layout, &blob)?;
    log::debug!(
        "kernel entry {:#x}, initrd {initrd:?}, device tree at {fdt:#x} ({} bytes)",
        loaded.entry,
        blob.len()
    );
    Ok(Entry {
        kernel: loaded.entry,
        fdt,
    })
}

/// Sets vCPU `index`'s state for a cold boot: the boot vCPU enters the
/// kernel; the others stay powered off (the hypervisor made them so)
/// until the kernel starts them with PSCI CPU_ON.
pub(crate) fn boot_vcpu(vcpu: &mut dyn Vcpu, entry: &Entry) -> Result<()> {
    if vcpu.index() == 0 {
        vcpu.set_cpu_state(&CpuState {
            x: [entry.fdt, 0, 0, 0],
            pc: entry.kernel,
            pstate: pstate::MODE_EL1H | pstate::DAIF_MASKED,
        })?;
    }
    Ok(())
}
