//! The loop each vCPU thread runs: enter the guest, dispatch its exits to
//! the buses, and stop when the VM finishes.

use std::sync::Arc;

use supermachine_hypervisor::{Vcpu, VcpuExit, Vm};

use crate::bus::Bus;
use crate::lifecycle::Lifecycle;
use crate::{Error, ExitReason, Result, VcpuSetup, arch};

#[derive(Clone)]
pub(crate) struct VcpuContext {
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) pause: Arc<crate::pause::PauseControl>,
}

/// Creates vCPU `index` of `vm` and sets it up, on the calling thread:
/// the one that will run it.
pub(crate) fn create(vm: &dyn Vm, index: u32, setup: VcpuSetup) -> Result<Box<dyn Vcpu>> {
    let mut vcpu = vm.create_vcpu(index)?;
    match setup {
        VcpuSetup::Boot(entry) => arch::boot_vcpu(vcpu.as_mut(), &entry)?,
        VcpuSetup::Restore(state) => vcpu.restore_state(&state)?,
    }
    Ok(vcpu)
}

pub(crate) fn run(mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) {
    let index = vcpu.index();
    while !ctx.lifecycle.is_finished() {
        ctx.pause.park_if_requested(vcpu.as_mut(), &ctx.lifecycle);
        if ctx.lifecycle.is_finished() {
            break;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                ctx.lifecycle.finish(Err(Error::Hypervisor(e)));
                break;
            }
        };
        match exit {
            VcpuExit::IoOut { port, data } => {
                if !ctx.pio.write(u64::from(port), data) {
                    log::trace!("vCPU {index}: unclaimed write to port {port:#x}");
                }
            }
            VcpuExit::IoIn { port, data } => {
                if !ctx.pio.read(u64::from(port), data) {
                    // What an ISA bus with nothing on it returns.
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioRead { addr, data } => {
                if !ctx.mmio.read(addr, data) {
                    log::debug!("vCPU {index}: unclaimed MMIO read at {addr:#x}");
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                if !ctx.mmio.write(addr, data) {
                    log::debug!("vCPU {index}: unclaimed MMIO write at {addr:#x}");
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::Halt => {
                // Only a backend without an in-kernel interrupt controller
                // reports this; none of ours does yet.
                ctx.lifecycle.finish(Err(Error::VcpuFailed {
                    index,
                    detail: "halted with no interrupt controller to wake it".into(),
                }));
            }
            VcpuExit::Shutdown => {
                ctx.lifecycle.finish(Err(Error::TripleFault { index }));
            }
            VcpuExit::SystemReset => ctx.lifecycle.guest_reset(),
            VcpuExit::SystemPowerOff => ctx.lifecycle.finish(Ok(ExitReason::PowerOff)),
            VcpuExit::InternalError(detail) | VcpuExit::Unhandled(detail) => {
                ctx.lifecycle
                    .finish(Err(Error::VcpuFailed { index, detail }));
            }
        }
    }
    log::debug!("vCPU {index} stopped");
}
