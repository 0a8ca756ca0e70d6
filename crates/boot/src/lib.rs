//! Direct boot of a Linux kernel: on x86_64, load the kernel and initrd,
//! write the boot tables, and compute the 64-bit entry state; on aarch64
//! ([`aarch64`]), the device tree that describes the machine.

pub mod aarch64;
// linux-loader's ELF and bzImage loaders build only for x86 hosts.
#[cfg(target_arch = "x86_64")]
mod cpu;
#[cfg(target_arch = "x86_64")]
mod kernel;
#[cfg(target_arch = "x86_64")]
pub mod layout;
#[cfg(target_arch = "x86_64")]
mod mptable;
#[cfg(target_arch = "x86_64")]
mod zero_page;

use std::path::PathBuf;

#[cfg(target_arch = "x86_64")]
pub use cpu::{boot_cpu_state, boot_msrs, write_long_mode_tables};
#[cfg(target_arch = "x86_64")]
pub use kernel::{KernelFormat, KernelImage, LoadedKernel, load_kernel};
#[cfg(target_arch = "x86_64")]
pub use mptable::{MAX_CPUS, write_mptable};
#[cfg(target_arch = "x86_64")]
pub use zero_page::{InitrdPlacement, load_initrd, write_zero_page};

/// Errors from loading and booting a kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is not a kernel we can boot.
    #[error("{path} is not a bootable {arch} Linux kernel: {reason}")]
    KernelInvalid {
        /// The file.
        path: PathBuf,
        /// The architecture it was checked for.
        arch: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// linux-loader refused to load the kernel into guest memory.
    #[error("loading kernel {path} into guest memory: {source}")]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel does not fit in guest RAM.
    #[error("kernel {path} needs {needed} bytes of RAM from {load:#x}; give the VM more memory")]
    KernelTooLarge {
        /// The file.
        path: PathBuf,
        /// Where it would be loaded.
        load: u64,
        /// What it needs from there (its `image_size`).
        needed: u64,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in guest RAM next to the kernel.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x} above the kernel; give the VM more memory"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is too long or has a NUL.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    /// Too many vCPUs for the MP table.
    #[error("{0} vCPUs do not fit the MP table (at most 254)")]
    TooManyCpus(u32),
    /// A vCPU count the aarch64 machine cannot describe.
    #[error("{cpus} vCPUs: an aarch64 VM has 1 to {max}")]
    CpuCount {
        /// What was asked for.
        cpus: u32,
        /// The most the GIC's redistributor space holds.
        max: u32,
    },
    /// The device tree could not be written.
    #[error("writing the device tree: {0}")]
    Fdt(String),
    /// A write to guest memory failed (the layout does not fit in RAM).
    #[error("writing {what} to guest memory: {source}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// [`Error::KernelRead`] for `path`.
pub(crate) fn kernel_read_error(
    path: &std::path::Path,
) -> impl Fn(std::io::Error) -> Error + Copy + '_ {
    move |source| Error::KernelRead {
        path: path.to_owned(),
        source,
    }
}

/// [`Error::KernelInvalid`] for `path`, checked as an `arch` kernel.
pub(crate) fn kernel_invalid<'a>(
    path: &'a std::path::Path,
    arch: &'static str,
) -> impl Fn(String) -> Error + Copy + 'a {
    move |reason| Error::KernelInvalid {
        path: path.to_owned(),
        arch,
        reason,
    }
}

pub(crate) fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |source| Error::GuestMemory { what, source }
}

/// Opens an initrd and returns it with its size.
pub(crate) fn open_initrd(path: &std::path::Path) -> Result<(std::fs::File, u64)> {
    let read_err = |source| Error::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    Ok((file, meta.len()))
}

/// Reads the whole initrd `file` (`size` bytes) into guest memory at `addr`.
pub(crate) fn read_initrd(
    mem: &supermachine_memory::GuestMemoryMmapped,
    addr: u64,
    file: &mut std::fs::File,
    size: u64,
    path: &std::path::Path,
) -> Result<()> {
    use supermachine_memory::Bytes as _;
    mem.read_exact_volatile_from(
        vm_memory::GuestAddress(addr),
        &mut supermachine_memory::VolatileFile::new(file),
        size as usize,
    )
    .map_err(|e| match e {
        vm_memory::GuestMemoryError::IOError(source) => Error::InitrdRead {
            path: path.to_owned(),
            source,
        },
        other => Error::GuestMemory {
            what: "initrd",
            source: other,
        },
    })
}
