//! The aarch64 machine below RAM (which starts at
//! [`supermachine_memory::AARCH64_RAM_START`]): the interrupt controller,
//! the console UART and the virtio-mmio devices, at the places QEMU's
//! `virt` machine uses, so that guest kernels configured for it find
//! nothing unusual.

use supermachine_hypervisor::aarch64::gic;

/// The GICv3 distributor (64 KiB).
pub const GIC_DIST_BASE: u64 = gic::DISTRIBUTOR_BASE;
/// Size of the GICv3 distributor.
pub const GIC_DIST_SIZE: u64 = gic::DISTRIBUTOR_SIZE;
/// The first GICv3 redistributor; each vCPU has one of
/// [`GIC_REDIST_SIZE`] bytes, back to back.
pub const GIC_REDIST_BASE: u64 = gic::REDISTRIBUTORS_BASE;
/// One redistributor: its RD and SGI frames, 64 KiB each.
pub const GIC_REDIST_SIZE: u64 = gic::REDISTRIBUTOR_SIZE;
/// The most vCPUs whose redistributors fit below [`UART_BASE`].
pub const MAX_CPUS: u32 = gic::MAX_VCPUS;
/// The 16550-compatible console UART (one page).
pub const UART_BASE: u64 = 0x0900_0000;
/// Size of the UART's register window.
pub const UART_SIZE: u64 = 0x1000;
const _: () = assert!(gic::REDISTRIBUTORS_END <= UART_BASE);

/// The UART's interrupt: shared peripheral interrupt (SPI) 1, GIC INTID 33.
pub const UART_SPI: u32 = 1;
/// The first virtio-mmio device; the others follow every
/// [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// One virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first virtio device's SPI; the others take the following ones.
pub const VIRTIO_FIRST_SPI: u32 = 16;
/// GIC INTIDs of shared peripheral interrupts start here (SPI 0).
pub const SPI_INTID_BASE: u32 = gic::SPI_INTID_BASE;
/// The architected timer's private peripheral interrupts (PPI numbers,
/// INTID less 16): secure physical, non-secure physical, virtual and
/// hypervisor, in the order the `arm,armv8-timer` binding lists them.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GIC maintenance interrupt (a PPI).
pub const GIC_MAINTENANCE_PPI: u32 = 9;
