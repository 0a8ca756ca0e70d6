//! Guest programs every hypervisor backend must run the same way, written
//! once against the traits (see the README). They panic on the first
//! step that goes wrong: a failed step is a failed test.

#![allow(clippy::unwrap_used)]

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
