//! The x86_64 machine: RAM from 0 with the 32-bit MMIO gap, COM1 at its
//! ports, the i8042 for the guest's reset, virtio-mmio devices in the gap
//! announced on the command line, and a 64-bit entry through the zero
//! page, MP table and identity-mapped page tables.

mod i8042;

use std::sync::{Arc, Mutex};

use supermachine_boot as boot;
use supermachine_hypervisor::Vcpu;
use supermachine_memory::{GuestMemoryMmapped, MemoryLayout};
use supermachine_virtio_mmio::MMIO_SIZE;

use super::{BootSetup, BusKind, Placement};
use crate::Result;
use crate::bus::SharedDevice;
use crate::lifecycle::Lifecycle;
use i8042::{I8042, I8042_DATA_PORT, I8042_PORT_SPAN};

/// The kernel command line used when the caller gives none: console on
/// COM1, reset through the i8042 (which ends the VM), reboot at once on a
/// panic, no I/O-delay port writes.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 io_delay=none";

/// The most vCPUs the MP table describes.
pub(crate) const MAX_VCPUS: u32 = boot::MAX_CPUS;

/// The 16550A UART at COM1.
pub(crate) const SERIAL: Placement = Placement {
    bus: BusKind::Pio,
    base: 0x3f8,
    span: 8,
};
/// COM1's interrupt line.
pub(crate) const SERIAL_IRQ: u32 = 4;

/// First virtio device's MMIO base: in the 32-bit gap, clear of the IOAPIC
/// and local APIC pages at 0xfec00000/0xfee00000.
const VIRTIO_BASE: u64 = 0xd000_0000;
/// Interrupt lines for virtio devices: after the legacy ones we use
/// (timer 0, keyboard 1, COM1 4), up to the IOAPIC's last pin.
const VIRTIO_FIRST_IRQ: u32 = 5;
const VIRTIO_LAST_IRQ: u32 = 23;

/// Most virtio devices one VM can have.
pub(crate) const MAX_VIRTIO_DEVICES: usize = (VIRTIO_LAST_IRQ - VIRTIO_FIRST_IRQ + 1) as usize;

/// Where virtio device `index` lives: (MMIO base, interrupt line).
pub(crate) fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = VIRTIO_FIRST_IRQ.checked_add(u32::try_from(index).ok()?)?;
    (irq <= VIRTIO_LAST_IRQ).then(|| (VIRTIO_BASE + index as u64 * MMIO_SIZE, irq))
}

/// The guest RAM layout for `bytes` of RAM.
pub(crate) fn memory_layout(bytes: u64) -> Result<MemoryLayout> {
    Ok(MemoryLayout::x86_64(bytes)?)
}

/// The devices of the PC platform itself: the i8042, whose reset line
/// ends the VM (`reboot=k`).
pub(crate) fn platform_devices(lifecycle: &Arc<Lifecycle>) -> Vec<(Placement, SharedDevice)> {
    vec![(
        Placement {
            bus: BusKind::Pio,
            base: I8042_DATA_PORT,
            span: I8042_PORT_SPAN,
        },
        Arc::new(Mutex::new(I8042::new(lifecycle.clone()))),
    )]
}

/// A kernel file, checked, not yet loaded.
pub(crate) struct KernelFile(boot::KernelImage);

impl KernelFile {
    pub(crate) fn open(path: &std::path::Path) -> Result<Self> {
        Ok(Self(boot::KernelImage::open(path)?))
    }
}

/// How the vCPUs start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    kernel: u64,
}

/// Loads the kernel and initrd and writes the boot tables.
pub(crate) fn load_guest(
    mem: &GuestMemoryMmapped,
    layout: &MemoryLayout,
    kernel: &mut KernelFile,
    setup: &BootSetup<'_>,
) -> Result<Entry> {
    // The guest finds virtio-mmio devices on its command line.
    let mut cmdline = setup.cmdline.to_string();
    for &(base, irq) in setup.virtio {
        cmdline.push(' ');
        cmdline.push_str(&supermachine_virtio_mmio::kernel_cmdline_arg(base, irq));
    }
    let loaded = boot::load_kernel(mem, &mut kernel.0)?;
    let initrd = setup
        .initrd
        .map(|path| boot::load_initrd(mem, layout, &loaded, path))
        .transpose()?;
    boot::write_zero_page(mem, layout, &loaded, &cmdline, initrd)?;
    boot::write_mptable(mem, setup.vcpus)?;
    boot::write_long_mode_tables(mem)?;
    log::debug!(
        "kernel ({:?}) entry {:#x}, initrd {initrd:?}",
        kernel.0.format(),
        loaded.entry
    );
    Ok(Entry {
        kernel: loaded.entry,
    })
}

/// Sets vCPU `index`'s state for a cold boot.
pub(crate) fn boot_vcpu(vcpu: &mut dyn Vcpu, entry: &Entry) -> Result<()> {
    if vcpu.index() == 0 {
        vcpu.set_cpu_state(&boot::boot_cpu_state(entry.kernel))?;
    } else {
        // Application processors wait for the boot CPU's INIT/SIPI.
        vcpu.set_msrs(&boot::boot_msrs())?;
    }
    Ok(())
}
