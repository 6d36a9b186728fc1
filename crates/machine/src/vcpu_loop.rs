//! The loop each vCPU thread runs: exit → bus → device, until the VM stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use vmplay_devices::bus::Bus;
use vmplay_devices::control::{StopReason, VmControl};
use vmplay_hypervisor::{Vcpu, VcpuExit};

/// What every vCPU thread of one VM shares.
pub(crate) struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    /// vCPUs parked after `hlt` with interrupts masked.
    pub halted: AtomicUsize,
    pub vcpu_count: usize,
}

/// Runs `vcpu` until the VM stops. Every way out of the guest that the
/// machine cannot serve becomes a [`StopReason`], so nothing is lost.
pub(crate) fn run(mut vcpu: Box<dyn Vcpu>, ctx: &VcpuContext) {
    let id = vcpu.id();
    loop {
        if ctx.control.is_stopping() {
            return;
        }
        let crash = match vcpu.run() {
            Ok(VcpuExit::IoOut { port, data }) => {
                if !ctx.pio.write(port.into(), data) {
                    tracing::trace!(port, ?data, "write to unclaimed port");
                }
                continue;
            }
            Ok(VcpuExit::IoIn { port, data }) => {
                if !ctx.pio.read(port.into(), data) {
                    tracing::trace!(port, "read from unclaimed port");
                }
                continue;
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::debug!(addr, ?data, "write to unclaimed MMIO");
                }
                continue;
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                if !ctx.mmio.read(addr, data) {
                    tracing::debug!(addr, "read from unclaimed MMIO");
                }
                continue;
            }
            Ok(VcpuExit::Interrupted) => continue,
            Ok(VcpuExit::Halt) => {
                // Nothing but NMI/INIT wakes this vCPU, and vmplay sends
                // neither: it is done. The VM is done when all are.
                tracing::debug!(vcpu = id, "halted with interrupts masked");
                if ctx.halted.fetch_add(1, Ordering::AcqRel) + 1 == ctx.vcpu_count {
                    ctx.control.request_stop(StopReason::Halted);
                }
                return;
            }
            Ok(VcpuExit::Shutdown) => "triple fault (CPU shutdown)".to_string(),
            Ok(VcpuExit::InternalError(why)) => why,
            Err(e) => {
                ctx.control
                    .request_stop(StopReason::HostError(format!("vCPU {id}: {e}")));
                return;
            }
        };
        let registers = match vcpu.state() {
            Ok(state) => state.to_string(),
            Err(e) => format!("(registers unavailable: {e})"),
        };
        ctx.control.request_stop(StopReason::GuestCrash {
            vcpu: id,
            detail: crash,
            registers,
        });
        return;
    }
}
