//! The flattened device tree an aarch64 kernel boots with: it is the
//! only description of the machine the kernel gets (no ACPI), so it names
//! everything the VMM emulates: RAM, the vCPUs and how to start them
//! (PSCI through `hvc`), the GICv3, the architected timer, the console
//! UART and every virtio-mmio device, and in `/chosen` the command line
//! and the initrd.

use supermachine_memory::MemoryLayout;
use vm_fdt::FdtWriter;

use super::layout::{
    GIC_DIST_BASE, GIC_DIST_SIZE, GIC_MAINTENANCE_PPI, GIC_REDIST_BASE, GIC_REDIST_SIZE, MAX_CPUS,
    TIMER_PPIS, UART_BASE, UART_SIZE, UART_SPI, VIRTIO_MMIO_SIZE,
};
use crate::{Error, Result};

/// One virtio-mmio device as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Its register window's base (one page).
    pub base: u64,
    /// Its shared peripheral interrupt (SPI number, INTID less 32).
    pub spi: u32,
}

/// The machine a device tree describes.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// vCPUs, numbered from 0 (each one's MPIDR as KVM assigns it).
    pub cpus: u32,
    /// Guest RAM.
    pub memory: &'a MemoryLayout,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initrd's guest address and size, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// The virtio-mmio devices.
    pub virtio: &'a [VirtioMmio],
}

/// The GIC's phandle, which every interrupt specifier refers to.
const GIC_PHANDLE: u32 = 1;
/// Interrupt specifiers (`#interrupt-cells = 3`): kind, number, flags.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_EDGE_RISING: u32 = 1;
const IRQ_LEVEL_HIGH: u32 = 4;
/// The UART's input clock; the guest only uses it to compute divisors the
/// emulated UART ignores.
const UART_CLOCK_HZ: u32 = 1_843_200;

pub use supermachine_hypervisor::aarch64::mpidr;

/// Writes the device tree blob for `machine`.
pub fn write_fdt(machine: &Machine<'_>) -> Result<Vec<u8>> {
    if machine.cpus == 0 || machine.cpus > MAX_CPUS {
        return Err(Error::CpuCount {
            cpus: machine.cpus,
            max: MAX_CPUS,
        });
    }
    build(machine).map_err(|e| Error::Fdt(e.to_string()))
}

fn build(machine: &Machine<'_>) -> std::result::Result<Vec<u8>, vm_fdt::Error> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", machine.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{UART_BASE:x}"))?;
    if let Some((start, size)) = machine.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + size)?;
    }
    fdt.end_node(chosen)?;

    let ranges = machine.memory.ranges();
    let memory = fdt.begin_node(&format!("memory@{:x}", ranges[0].start.0))?;
    fdt.property_string("device_type", "memory")?;
    let reg: Vec<u64> = ranges.iter().flat_map(|r| [r.start.0, r.len]).collect();
    fdt.property_array_u64("reg", &reg)?;
    fdt.end_node(memory)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for index in 0..machine.cpus {
        let cpu = fdt.begin_node(&format!("cpu@{:x}", mpidr(index)))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u32("reg", mpidr(index))?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-0.2".to_string(), "arm,psci".to_string()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let gic = fdt.begin_node(&format!("intc@{GIC_DIST_BASE:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_array_u64(
        "reg",
        &[
            GIC_DIST_BASE,
            GIC_DIST_SIZE,
            GIC_REDIST_BASE,
            GIC_REDIST_SIZE * u64::from(machine.cpus),
        ],
    )?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_LEVEL_HIGH],
    )?;
    fdt.property_u32("phandle", GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let interrupts: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|ppi| [GIC_PPI, *ppi, IRQ_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &interrupts)?;
    fdt.end_node(timer)?;

    let uart = fdt.begin_node(&format!("uart@{UART_BASE:x}"))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[UART_BASE, UART_SIZE])?;
    fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, UART_SPI, IRQ_EDGE_RISING])?;
    fdt.end_node(uart)?;

    for device in machine.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", device.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[device.base, VIRTIO_MMIO_SIZE])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, device.spi, IRQ_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    fdt.end_node(root)?;
    fdt.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aarch64::layout::{VIRTIO_FIRST_SPI, VIRTIO_MMIO_BASE};
    use supermachine_memory::AARCH64_RAM_START;

    fn cells(value: &[u8]) -> Vec<u32> {
        value
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn quads(value: &[u8]) -> Vec<u64> {
        value
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn blob(cpus: u32, initrd: Option<(u64, u64)>) -> Vec<u8> {
        let memory = MemoryLayout::aarch64(512 << 20).unwrap();
        let virtio = [
            VirtioMmio {
                base: VIRTIO_MMIO_BASE,
                spi: VIRTIO_FIRST_SPI,
            },
            VirtioMmio {
                base: VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE,
                spi: VIRTIO_FIRST_SPI + 1,
            },
        ];
        write_fdt(&Machine {
            cpus,
            memory: &memory,
            cmdline: "console=ttyS0 panic=1",
            initrd,
            virtio: &virtio,
        })
        .unwrap()
    }

    #[test]
    fn the_tree_names_memory_cpus_and_the_command_line() {
        let bytes = blob(2, Some((0x9000_0000, 0x10_0000)));
        let fdt = ::fdt::Fdt::new(&bytes).expect("a valid device tree");
        let chosen = fdt.find_node("/chosen").unwrap();
        assert_eq!(
            chosen.property("bootargs").unwrap().as_str(),
            Some("console=ttyS0 panic=1")
        );
        assert_eq!(
            chosen.property("stdout-path").unwrap().as_str(),
            Some("/uart@9000000")
        );
        let start = quads(chosen.property("linux,initrd-start").unwrap().value);
        let end = quads(chosen.property("linux,initrd-end").unwrap().value);
        assert_eq!((start[0], end[0]), (0x9000_0000, 0x9010_0000));

        let memory = fdt.find_node("/memory@80000000").unwrap();
        assert_eq!(
            quads(memory.property("reg").unwrap().value),
            [AARCH64_RAM_START, 512 << 20]
        );

        let cpus: Vec<u32> = fdt
            .find_node("/cpus")
            .unwrap()
            .children()
            .map(|c| {
                assert_eq!(c.property("enable-method").unwrap().as_str(), Some("psci"));
                cells(c.property("reg").unwrap().value)[0]
            })
            .collect();
        assert_eq!(cpus, [0, 1]);
        assert_eq!(
            fdt.find_node("/psci")
                .unwrap()
                .property("method")
                .unwrap()
                .as_str(),
            Some("hvc")
        );
    }

    #[test]
    fn interrupts_name_the_gic_and_each_device_its_own_line() {
        let bytes = blob(3, None);
        let fdt = ::fdt::Fdt::new(&bytes).unwrap();
        let root = fdt.find_node("/").unwrap();
        assert_eq!(
            cells(root.property("interrupt-parent").unwrap().value),
            [GIC_PHANDLE]
        );
        let gic = fdt.find_node("/intc@8000000").unwrap();
        assert_eq!(cells(gic.property("phandle").unwrap().value), [GIC_PHANDLE]);
        assert_eq!(
            quads(gic.property("reg").unwrap().value),
            [
                GIC_DIST_BASE,
                GIC_DIST_SIZE,
                GIC_REDIST_BASE,
                3 * GIC_REDIST_SIZE
            ]
        );
        let timer = fdt.find_node("/timer").unwrap();
        assert_eq!(
            cells(timer.property("interrupts").unwrap().value),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );
        let uart = fdt.find_node("/uart@9000000").unwrap();
        assert_eq!(
            cells(uart.property("interrupts").unwrap().value),
            [GIC_SPI, UART_SPI, IRQ_EDGE_RISING]
        );
        for (i, base) in [0xa00_0000u64, 0xa00_1000].into_iter().enumerate() {
            let node = fdt.find_node(&format!("/virtio_mmio@{base:x}")).unwrap();
            assert_eq!(
                node.property("compatible").unwrap().as_str(),
                Some("virtio,mmio")
            );
            assert_eq!(quads(node.property("reg").unwrap().value), [base, 0x1000]);
            assert_eq!(
                cells(node.property("interrupts").unwrap().value),
                [GIC_SPI, VIRTIO_FIRST_SPI + i as u32, IRQ_EDGE_RISING]
            );
        }
        assert!(
            fdt.find_node("/chosen")
                .unwrap()
                .property("linux,initrd-start")
                .is_none()
        );
    }

    #[test]
    fn cpu_ids_follow_kvm_affinity_and_counts_are_bounded() {
        assert_eq!(mpidr(15), 0xf);
        assert_eq!(mpidr(16), 0x100);
        assert_eq!(mpidr(37), 0x205);
        let memory = MemoryLayout::aarch64(64 << 20).unwrap();
        for cpus in [0, MAX_CPUS + 1] {
            let err = write_fdt(&Machine {
                cpus,
                memory: &memory,
                cmdline: "",
                initrd: None,
                virtio: &[],
            })
            .unwrap_err();
            assert!(matches!(err, Error::CpuCount { .. }), "{err}");
        }
        let bytes = blob(MAX_CPUS, None);
        let fdt = ::fdt::Fdt::new(&bytes).unwrap();
        assert_eq!(
            fdt.find_node("/cpus").unwrap().children().count(),
            MAX_CPUS as usize
        );
    }
}
