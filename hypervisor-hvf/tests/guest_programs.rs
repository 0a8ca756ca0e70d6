//! Tier 2 for Hypervisor.framework: the guest programs every backend
//! runs (`supermachine-hypervisor-conformance`), on this Mac's framework.
//!
//! They need an Apple Silicon Mac on macOS 15 or later and a test binary
//! signed with the `com.apple.security.hypervisor` entitlement (see
//! `docs/platforms.md`). CI compiles them for `aarch64-apple-darwin`; they
//! have not run yet. Each makes its own VM, and the framework allows one
//! per process: run them one at a time (`--test-threads 1`).

#![cfg(all(target_os = "macos", target_arch = "aarch64"))]
#![allow(clippy::unwrap_used)]

use supermachine_hypervisor_hvf::HvfHypervisor;

supermachine_hypervisor_conformance::aarch64_programs!(
    HvfHypervisor::new().expect("tier-2 tests need Hypervisor.framework and its entitlement")
);
