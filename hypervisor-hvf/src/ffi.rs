//! The parts of Hypervisor.framework this backend calls, declared from
//! Apple's headers (`Hypervisor/hv_vm.h`, `hv_vcpu.h`, `hv_gic.h`).
//!
//! Our own declarations rather than a bindings crate's: the framework's
//! enums (`hv_reg_t`, `hv_sys_reg_t`, the GIC register ids, the exit
//! reason) are C enums over fixed-width integers, and a register id that
//! comes out of a snapshot, or an exit reason a newer macOS adds, must
//! stay a plain integer rather than a Rust enum value it may not match.
//! The SIMD setter takes its 128-bit value in a vector register (AAPCS64);
//! a `u128` argument would travel in two general-purpose registers, so
//! [`set_simd_fp_reg`] makes that call itself.

#![allow(non_camel_case_types)]

use std::ffi::c_void;

pub type hv_return_t = i32;
pub type hv_vcpu_t = u64;
pub type hv_ipa_t = u64;
pub type os_object_t = *mut c_void;

pub const HV_SUCCESS: hv_return_t = 0;

pub const HV_MEMORY_READ: u64 = 1 << 0;
pub const HV_MEMORY_WRITE: u64 = 1 << 1;
pub const HV_MEMORY_EXEC: u64 = 1 << 2;

pub const HV_EXIT_REASON_CANCELED: u32 = 0;
pub const HV_EXIT_REASON_EXCEPTION: u32 = 1;
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hv_vcpu_exit_exception_t {
    pub syndrome: u64,
    pub virtual_address: u64,
    pub physical_address: hv_ipa_t,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hv_vcpu_exit_t {
    pub reason: u32,
    pub exception: hv_vcpu_exit_exception_t,
}

#[link(name = "Hypervisor", kind = "framework")]
unsafe extern "C" {
    pub fn hv_vm_create(config: os_object_t) -> hv_return_t;
    pub fn hv_vm_destroy() -> hv_return_t;
    pub fn hv_vm_map(addr: *mut c_void, ipa: hv_ipa_t, size: usize, flags: u64) -> hv_return_t;
    pub fn hv_vm_get_max_vcpu_count(max_vcpu_count: *mut u32) -> hv_return_t;

    pub fn hv_vcpu_create(
        vcpu: *mut hv_vcpu_t,
        exit: *mut *const hv_vcpu_exit_t,
        config: os_object_t,
    ) -> hv_return_t;
    pub fn hv_vcpu_destroy(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpu_run(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpus_exit(vcpus: *const hv_vcpu_t, vcpu_count: u32) -> hv_return_t;
    pub fn hv_vcpu_get_reg(vcpu: hv_vcpu_t, reg: u32, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_reg(vcpu: hv_vcpu_t, reg: u32, value: u64) -> hv_return_t;
    pub fn hv_vcpu_get_simd_fp_reg(vcpu: hv_vcpu_t, reg: u32, value: *mut u128) -> hv_return_t;
    /// Takes `(hv_vcpu_t, hv_simd_fp_reg_t, hv_simd_fp_uchar16_t)`, the
    /// last in a vector register, which stable Rust cannot pass through
    /// `extern "C"`: called through `set_simd_fp_reg` below.
    fn hv_vcpu_set_simd_fp_reg();
    pub fn hv_vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: u16, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: u16, value: u64) -> hv_return_t;
    pub fn hv_vcpu_get_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: u64) -> hv_return_t;

    // macOS 15.0 and later.
    pub fn hv_gic_config_create() -> os_object_t;
    pub fn hv_gic_config_set_distributor_base(config: os_object_t, base: hv_ipa_t) -> hv_return_t;
    pub fn hv_gic_config_set_redistributor_base(config: os_object_t, base: hv_ipa_t)
    -> hv_return_t;
    pub fn hv_gic_create(config: os_object_t) -> hv_return_t;
    pub fn hv_gic_get_redistributor_size(size: *mut usize) -> hv_return_t;
    pub fn hv_gic_get_spi_interrupt_range(base: *mut u32, count: *mut u32) -> hv_return_t;
    pub fn hv_gic_set_spi(intid: u32, level: bool) -> hv_return_t;
    pub fn hv_gic_get_distributor_reg(reg: u16, value: *mut u64) -> hv_return_t;
    pub fn hv_gic_set_distributor_reg(reg: u16, value: u64) -> hv_return_t;
    pub fn hv_gic_get_redistributor_reg(vcpu: hv_vcpu_t, reg: u32, value: *mut u64) -> hv_return_t;
    pub fn hv_gic_set_redistributor_reg(vcpu: hv_vcpu_t, reg: u32, value: u64) -> hv_return_t;
    pub fn hv_gic_get_icc_reg(vcpu: hv_vcpu_t, reg: u16, value: *mut u64) -> hv_return_t;
    pub fn hv_gic_set_icc_reg(vcpu: hv_vcpu_t, reg: u16, value: u64) -> hv_return_t;
}

unsafe extern "C" {
    /// libSystem: releases an OS object (the configuration objects).
    pub fn os_release(object: os_object_t);
    /// libSystem: the host's counter, in the ticks the guest's virtual
    /// counter counts.
    pub fn mach_absolute_time() -> u64;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mach_timebase_info_data_t {
    pub numer: u32,
    pub denom: u32,
}

unsafe extern "C" {
    /// libSystem: how many nanoseconds `numer / denom` of a counter tick is.
    pub fn mach_timebase_info(info: *mut mach_timebase_info_data_t) -> i32;
}

/// `hv_vcpu_set_simd_fp_reg(vcpu, reg, value)`, with `value` in Q0 as the
/// C declaration's vector type puts it.
///
/// # Safety
/// The caller must be the thread that owns `vcpu`, as for every vCPU call.
pub unsafe fn set_simd_fp_reg(vcpu: hv_vcpu_t, reg: u32, value: u128) -> hv_return_t {
    let function = hv_vcpu_set_simd_fp_reg as unsafe extern "C" fn() as usize;
    let mut result = vcpu;
    // SAFETY: a call under the C ABI (every caller-saved register
    // clobbered): X0 the vCPU, W1 the register, Q0 the value loaded from
    // a live 16-byte local, the result back in W0.
    unsafe {
        core::arch::asm!(
            "ldr q0, [{value}]",
            "blr {function}",
            value = in(reg) &value,
            function = in(reg) function,
            inlateout("x0") result,
            in("x1") u64::from(reg),
            clobber_abi("C"),
        );
    }
    result as u32 as hv_return_t
}
