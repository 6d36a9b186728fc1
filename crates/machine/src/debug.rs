//! The machine as a debugger sees it ([`vmplay_gdb::Debuggable`]): every
//! request goes through a vCPU thread's command channel (registers,
//! address translation, debug controls) or the shared vCPU set (pause,
//! resume); memory through guest RAM, at physical addresses the vCPU's own
//! page tables give.

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmplay_devices::control::{StopReason, VmControl};
use vmplay_gdb::{Debuggable, VmEvent};
use vmplay_hypervisor::{CpuState, DebugEvent, GuestDebug, GuestMemory, Vm};

use crate::handle::{VCPU_ANSWER_TIMEOUT, VcpuSet};
use crate::vcpu_loop::{DebugRequest, VcpuCommand};

const PAGE: u64 = 4096;

/// The debugger's handle on a running machine.
pub struct MachineDebugger {
    pub(crate) set: Arc<Mutex<VcpuSet>>,
    pub(crate) vm: Arc<dyn Vm>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) memory: GuestMemory,
    pub(crate) events: Receiver<(u32, DebugEvent)>,
}

impl MachineDebugger {
    fn set(&self) -> MutexGuard<'_, VcpuSet> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `make(reply)` to `vcpu`'s thread and waits for the reply.
    fn ask<T>(
        &self,
        vcpu: u32,
        make: impl FnOnce(mpsc::Sender<Result<T, String>>) -> DebugRequest,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        {
            let set = self.set();
            let v = set
                .vcpus
                .iter()
                .find(|v| v.id == vcpu && !v.exited)
                .ok_or_else(|| format!("no vCPU {vcpu}"))?;
            v.commands
                .send(VcpuCommand::Debug(make(tx)))
                .map_err(|_| format!("vCPU {vcpu} has exited"))?;
            v.kicker.kick();
        }
        rx.recv_timeout(VCPU_ANSWER_TIMEOUT)
            .map_err(|_| format!("vCPU {vcpu} did not answer"))?
    }

    fn translate(&self, vcpu: u32, gva: u64) -> Result<Option<u64>, String> {
        self.ask(vcpu, |tx| DebugRequest::Translate(gva, tx))
    }

    /// Walks `[gva, gva+len)` page by page: calls `each(gpa, offset, n)`
    /// for each mapped piece; stops at the first unmapped page. Returns
    /// the bytes covered.
    fn each_page(
        &self,
        vcpu: u32,
        gva: u64,
        len: usize,
        mut each: impl FnMut(u64, usize, usize) -> bool,
    ) -> Result<usize, String> {
        let mut done = 0usize;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let n = ((PAGE - (va & (PAGE - 1))) as usize).min(len - done);
            let Some(gpa) = self.translate(vcpu, va)? else {
                break;
            };
            if !each(gpa, done, n) {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

impl Debuggable for MachineDebugger {
    fn vcpu_count(&self) -> u32 {
        self.set().vcpus.len() as u32
    }

    fn pause_all(&mut self) -> Result<(), String> {
        let vm = self.vm.clone();
        self.set().pause_all(vm.as_ref()).map_err(|e| e.to_string())
    }

    fn resume_all(&mut self) -> Result<(), String> {
        let vm = self.vm.clone();
        self.set()
            .resume_all(vm.as_ref())
            .map_err(|e| e.to_string())
    }

    fn resume_one(&mut self, vcpu: u32) -> Result<(), String> {
        let vm = self.vm.clone();
        self.set()
            .resume(Some(vcpu), vm.as_ref())
            .map_err(|e| e.to_string())
    }

    fn state(&mut self, vcpu: u32) -> Result<CpuState, String> {
        self.ask(vcpu, DebugRequest::State)
    }

    fn set_state(&mut self, vcpu: u32, state: &CpuState) -> Result<(), String> {
        let state = Box::new(state.clone());
        self.ask(vcpu, |tx| DebugRequest::SetState(state, tx))
    }

    fn read_virt(&mut self, vcpu: u32, gva: u64, buf: &mut [u8]) -> Result<usize, String> {
        let memory = self.memory.clone();
        let len = buf.len();
        self.each_page(vcpu, gva, len, |gpa, off, n| {
            memory
                .read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .is_ok()
        })
    }

    fn write_virt(&mut self, vcpu: u32, gva: u64, data: &[u8]) -> Result<(), String> {
        let memory = self.memory.clone();
        let dma = self.vm.dma_observer();
        let done = self.each_page(vcpu, gva, data.len(), |gpa, off, n| {
            let ok = memory
                .write_slice(&data[off..off + n], GuestAddress(gpa))
                .is_ok();
            if ok && let Some(dma) = &dma {
                // emu drops code it decoded from these bytes.
                dma.written(gpa, n as u64);
            }
            ok
        })?;
        if done < data.len() {
            return Err(format!(
                "{:#x} is not mapped to RAM",
                gva.wrapping_add(done as u64)
            ));
        }
        Ok(())
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<usize, String> {
        for (i, b) in buf.iter_mut().enumerate() {
            let mut one = [0u8];
            if self
                .memory
                .read_slice(&mut one, GuestAddress(gpa.wrapping_add(i as u64)))
                .is_err()
            {
                return Ok(i);
            }
            *b = one[0];
        }
        Ok(buf.len())
    }

    fn set_guest_debug(&mut self, vcpu: u32, debug: &GuestDebug) -> Result<(), String> {
        let debug = debug.clone();
        self.ask(vcpu, |tx| DebugRequest::SetGuestDebug(debug, tx))
    }

    fn wait_event(&mut self, timeout: Duration) -> Option<VmEvent> {
        if let Some(reason) = self.control.reason() {
            return Some(VmEvent::Exited(reason.exit_code() as u8));
        }
        let event = if timeout.is_zero() {
            self.events.try_recv().ok()
        } else {
            self.events.recv_timeout(timeout).ok()
        };
        event.map(|(vcpu, event)| VmEvent::Debug { vcpu, event })
    }

    fn kill(&mut self) {
        self.control
            .request_stop(StopReason::HostError("killed from gdb".into()));
    }
}
