//! The guest image: the kernel every supermachine VM boots and the
//! initramfs holding the agent (its PID 1). `cargo xtask guest` builds
//! both into the cache; an installed copy keeps them beside the binary.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// File names inside a guest image directory: the kernel (an ELF
/// `vmlinux` on x86_64, an `Image` on aarch64).
#[cfg(target_arch = "x86_64")]
pub const KERNEL_FILE: &str = "vmlinux";
/// File names inside a guest image directory: the kernel (an ELF
/// `vmlinux` on x86_64, an `Image` on aarch64).
#[cfg(target_arch = "aarch64")]
pub const KERNEL_FILE: &str = "Image";
/// The initramfs (a cpio archive whose /init is the agent).
pub const INITRAMFS_FILE: &str = "initramfs.cpio";

/// A guest kernel and the agent's initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// x86_64: ELF vmlinux or bzImage; aarch64: Image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The guest image in `dir` ([`KERNEL_FILE`] and `initramfs.cpio`).
    pub fn in_dir(dir: &Path) -> GuestImage {
        GuestImage {
            kernel: dir.join(KERNEL_FILE),
            initramfs: dir.join(INITRAMFS_FILE),
        }
    }

    fn exists(&self) -> bool {
        self.kernel.is_file() && self.initramfs.is_file()
    }

    /// Finds the guest image without being told: `$SUPERMACHINE_GUEST_DIR`,
    /// then `supermachine-guest/` beside the running binary, then
    /// `../share/supermachine/guest/` from it (an installed copy), then the
    /// one `cargo xtask guest` last built (`<cache>/supermachine/guest/current`).
    pub fn locate() -> Result<GuestImage> {
        let mut tried = Vec::new();
        if let Some(dir) = std::env::var_os("SUPERMACHINE_GUEST_DIR").filter(|d| !d.is_empty()) {
            let image = GuestImage::in_dir(Path::new(&dir));
            if image.exists() {
                return Ok(image);
            }
            return Err(Error::GuestImage(format!(
                "SUPERMACHINE_GUEST_DIR={} has no {KERNEL_FILE} and {INITRAMFS_FILE}",
                Path::new(&dir).display()
            )));
        }
        if let Ok(exe) = std::env::current_exe()
            && let Some(bin_dir) = exe.parent()
        {
            tried.push(bin_dir.join("supermachine-guest"));
            tried.push(bin_dir.join("../share/supermachine/guest"));
        }
        if let Some(cache) = supermachine_host::user_cache_dir() {
            tried.push(cache.join("supermachine/guest/current"));
        }
        for dir in &tried {
            let image = GuestImage::in_dir(dir);
            if image.exists() {
                return Ok(image);
            }
        }
        Err(Error::GuestImage(format!(
            "no guest image found (looked in {}); build one with `cargo xtask guest` or set SUPERMACHINE_GUEST_DIR",
            tried
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_directory_holds_the_kernel_and_the_agent_initramfs() {
        let dir = Path::new("/opt/guest");
        assert_eq!(
            GuestImage::in_dir(dir),
            GuestImage {
                kernel: dir.join(KERNEL_FILE),
                initramfs: dir.join("initramfs.cpio"),
            }
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(!GuestImage::in_dir(tmp.path()).exists());
        std::fs::write(tmp.path().join(KERNEL_FILE), b"k").expect("write");
        assert!(!GuestImage::in_dir(tmp.path()).exists());
        std::fs::write(tmp.path().join(INITRAMFS_FILE), b"i").expect("write");
        assert!(GuestImage::in_dir(tmp.path()).exists());
    }
}
