//! Booting Linux on aarch64: the kernel `Image`, the machine's layout
//! below RAM and the device tree that describes it to the kernel. Plain data, built and
//! tested on any host; the aarch64 VMM and backends put it to use.

pub mod fdt;
pub mod image;
pub mod layout;
pub mod place;

pub use fdt::{Machine, VirtioMmio, mpidr, write_fdt};
pub use image::{Image, LoadedImage};
pub use place::{fdt_address, load_initrd, write_fdt_blob};
