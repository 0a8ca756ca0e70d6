//! The architectures the guest kernel, the test host and the binaries are
//! built for.

/// A guest (and host) architecture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86_64: what this machine is.
    #[default]
    #[value(name = "x86_64")]
    X86_64,
    /// aarch64 (arm64), cross-built here.
    Aarch64,
}

impl Arch {
    /// The name in file names, fragments and Rust targets.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The kernel's `ARCH=`.
    pub fn kernel_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The kernel's `CROSS_COMPILE=` prefix and the Debian package with
    /// that compiler, when this machine cannot build for `self` natively.
    pub fn cross_compiler(self) -> Option<(&'static str, &'static str)> {
        match self {
            Arch::X86_64 => None,
            Arch::Aarch64 => Some(("aarch64-linux-gnu-", "gcc-aarch64-linux-gnu")),
        }
    }

    /// The make target of the boot image and where the build leaves it,
    /// relative to the build directory (its file name is the image's name
    /// in the cache too).
    pub fn boot_image(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("bzImage", "arch/x86/boot/bzImage"),
            Arch::Aarch64 => ("Image", "arch/arm64/boot/Image"),
        }
    }

    /// The Rust target of our static (musl) binaries.
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Sets what cargo needs to build (and run, under user-mode QEMU) for
    /// [`Arch::musl_target`] on this x86_64 machine: the cross linker, the
    /// C compiler of crates that build C, the runner.
    pub fn cross_env(self, cmd: &mut std::process::Command) {
        if self == Arch::Aarch64 {
            cmd.env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .env("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc")
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER",
                "qemu-aarch64",
            );
        }
    }

    /// Debian packages that build for `self` here, beyond the native
    /// toolchain.
    pub fn cross_packages(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => crate::deps::MUSL_CC,
            Arch::Aarch64 => crate::deps::AARCH64_CROSS,
        }
    }
}
