//! Guest debugging on KVM: `KVM_SET_GUEST_DEBUG` for single steps
//! (interrupts blocked meanwhile where KVM can), software breakpoints as
//! planted `int3`s with `KVM_GUESTDBG_USE_SW_BP`, hardware breakpoints and
//! watchpoints in the debug registers with `KVM_GUESTDBG_USE_HW_BP`, and
//! `KVM_TRANSLATE` for guest-virtual addresses.
//!
//! Resuming from a software breakpoint puts the original byte back for
//! one single-stepped instruction, then plants the `int3` again; resuming
//! from a hardware instruction breakpoint sets RFLAGS.RF so the same
//! breakpoint does not fire at once.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{
    KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, kvm_debug_exit_arch,
    kvm_guest_debug,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vmplay_hypervisor::{DebugEvent, Error, GuestDebug, GuestMemory, Result, VcpuExit, WatchKind};

use crate::host_error;

const INT3: u8 = 0xcc;
const BP_VECTOR: u32 = 3;
const DB_VECTOR: u32 = 1;
const DR6_BS: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;

/// The VM's planted `int3`s: guest-virtual address → (physical address,
/// the byte it replaced). Every vCPU gets the same list; the first to be
/// told plants, the others find the work done.
#[derive(Default)]
pub(crate) struct Planted(Mutex<BTreeMap<u64, (u64, u8)>>);

impl Planted {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (u64, u8)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The original byte at a planted breakpoint's address.
    pub(crate) fn original(&self, gva: u64) -> Option<(u64, u8)> {
        self.lock().get(&gva).copied()
    }
}

/// What a debug-register slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Exec(u64),
    /// A software breakpoint in a free slot (no int3 needed).
    Soft(u64),
    Watch {
        addr: u64,
        kind: WatchKind,
    },
}

/// One vCPU's debug state.
#[derive(Default)]
pub(crate) struct VcpuDebug {
    debug: GuestDebug,
    slots: Vec<Slot>,
    /// Stopped at the planted `int3` here: the next run steps over it.
    at_breakpoint: Option<u64>,
    /// Stepping over the breakpoint here, its original byte back.
    stepping_over: Option<u64>,
    /// Stopped at a hardware instruction breakpoint: resume with RF.
    resume_rf: bool,
    /// KVM refused KVM_GUESTDBG_BLOCKIRQ once: do without.
    no_blockirq: bool,
}

fn fail(op: &'static str, e: kvm_ioctls::Error) -> Error {
    host_error(op, "guest debug", e)
}

/// The physical address of `gva` through the vCPU's page tables.
pub(crate) fn translate(fd: &VcpuFd, gva: u64) -> Result<Option<u64>> {
    let t = fd
        .translate_gva(gva)
        .map_err(|e| fail("KVM_TRANSLATE", e))?;
    Ok((t.valid != 0).then_some(t.physical_address))
}

impl VcpuDebug {
    /// Installs `d`: plants and removes `int3`s, loads the debug registers.
    pub(crate) fn set(
        &mut self,
        fd: &VcpuFd,
        memory: &GuestMemory,
        planted: &Planted,
        d: &GuestDebug,
    ) -> Result<()> {
        if d.hw_breakpoints.len() + d.watchpoints.len() > 4 {
            return Err(Error::Unsupported(
                "x86 has four debug address registers".into(),
            ));
        }
        self.debug = d.clone();
        self.slots = d
            .hw_breakpoints
            .iter()
            .map(|&a| Slot::Exec(a))
            .chain(d.watchpoints.iter().map(|w| Slot::Watch {
                addr: w.addr,
                kind: w.kind,
            }))
            .collect();
        // Software breakpoints take the free debug registers first (no
        // guest byte changes, and some KVMs, kvm_pvm among them, cannot
        // run a planted int3); the rest become int3s.
        let free = 4 - self.slots.len();
        let (soft, int3) = d.sw_breakpoints.split_at(d.sw_breakpoints.len().min(free));
        self.slots.extend(soft.iter().map(|&a| Slot::Soft(a)));
        if !int3.is_empty() && host_is_pvm() {
            return Err(Error::Unsupported(format!(
                "kvm_pvm cannot run a planted int3: {} breakpoints, 4 debug registers",
                d.sw_breakpoints.len() + d.hw_breakpoints.len() + d.watchpoints.len()
            )));
        }
        self.debug.sw_breakpoints = int3.to_vec();
        sync_planted(fd, memory, planted, int3)?;
        if self.at_breakpoint.is_some_and(|a| !int3.contains(&a)) {
            self.at_breakpoint = None;
        }
        self.load(fd, d.single_step)
    }

    /// `KVM_SET_GUEST_DEBUG` for the current lists, stepping if `step`.
    fn load(&mut self, fd: &VcpuFd, step: bool) -> Result<()> {
        self.load_with(fd, step, 0)
    }

    /// [`VcpuDebug::load`] with one-shot `extra` control bits (an
    /// injected exception).
    fn load_with(&mut self, fd: &VcpuFd, step: bool, extra: u32) -> Result<()> {
        let mut g = kvm_guest_debug::default();
        let d = &self.debug;
        if !d.is_empty() || !self.slots.is_empty() || step {
            g.control = KVM_GUESTDBG_ENABLE;
            if step {
                g.control |= KVM_GUESTDBG_SINGLESTEP;
                if !self.no_blockirq {
                    g.control |= KVM_GUESTDBG_BLOCKIRQ;
                }
            }
            if !d.sw_breakpoints.is_empty() {
                g.control |= KVM_GUESTDBG_USE_SW_BP;
            }
            if !self.slots.is_empty() {
                g.control |= KVM_GUESTDBG_USE_HW_BP;
                let mut dr7 = 0u64;
                for (i, slot) in self.slots.iter().enumerate() {
                    let (addr, rw, len) = match *slot {
                        Slot::Exec(a) | Slot::Soft(a) => (a, 0b00, 0b00),
                        Slot::Watch { addr, kind } => {
                            let rw = if kind == WatchKind::Write { 0b01 } else { 0b11 };
                            let w = d.watchpoints.iter().find(|w| w.addr == addr);
                            let len = match w.map_or(1, |w| w.len) {
                                1 => 0b00,
                                2 => 0b01,
                                8 => 0b10,
                                _ => 0b11,
                            };
                            (addr, rw, len)
                        }
                    };
                    g.arch.debugreg[i] = addr;
                    // Gi enable, R/Wi, LENi.
                    dr7 |= 2 << (2 * i);
                    dr7 |= (rw | len << 2) << (16 + 4 * i);
                }
                // GE and LE (exact data breakpoints), bit 10 always 1.
                g.arch.debugreg[7] = dr7 | 0x700;
            }
            g.control |= extra;
        }
        match fd.set_guest_debug(&g) {
            Ok(()) => Ok(()),
            Err(e) if g.control & KVM_GUESTDBG_BLOCKIRQ != 0 => {
                tracing::debug!("KVM_GUESTDBG_BLOCKIRQ refused ({e}): stepping without it");
                self.no_blockirq = true;
                g.control &= !KVM_GUESTDBG_BLOCKIRQ;
                fd.set_guest_debug(&g)
                    .map_err(|e| fail("KVM_SET_GUEST_DEBUG", e))
            }
            Err(e) => Err(fail("KVM_SET_GUEST_DEBUG", e)),
        }
    }

    /// Before entering the guest: step over a breakpoint the vCPU stopped
    /// at, or set RF after a hardware breakpoint.
    pub(crate) fn before_run(
        &mut self,
        fd: &VcpuFd,
        memory: &GuestMemory,
        planted: &Planted,
    ) -> Result<()> {
        if self.resume_rf {
            self.resume_rf = false;
            let mut regs = fd.get_regs().map_err(|e| fail("KVM_GET_REGS", e))?;
            regs.rflags |= RFLAGS_RF;
            fd.set_regs(&regs).map_err(|e| fail("KVM_SET_REGS", e))?;
        }
        let Some(at) = self.at_breakpoint.take() else {
            return Ok(());
        };
        let rip = fd.get_regs().map_err(|e| fail("KVM_GET_REGS", e))?.rip;
        let Some((gpa, orig)) = planted.original(at) else {
            return Ok(());
        };
        // gdb may have moved the vCPU elsewhere meanwhile.
        let cs = fd
            .get_sregs()
            .map_err(|e| fail("KVM_GET_SREGS", e))?
            .cs
            .base;
        if cs.wrapping_add(rip) != at {
            return Ok(());
        }
        write_byte(memory, gpa, orig)?;
        self.stepping_over = Some(at);
        self.load(fd, true)
    }

    /// A `KVM_EXIT_DEBUG`: the exit the machine sees.
    pub(crate) fn exit(
        &mut self,
        fd: &VcpuFd,
        memory: &GuestMemory,
        planted: &Planted,
        arch: kvm_debug_exit_arch,
    ) -> Result<VcpuExit<'static>> {
        if let Some(at) = self.stepping_over.take() {
            // The instruction under the breakpoint ran: plant it again.
            if let Some((gpa, _)) = planted.original(at) {
                write_byte(memory, gpa, INT3)?;
            }
            let step = self.debug.single_step;
            self.load(fd, step)?;
            return Ok(if step {
                VcpuExit::Debug(DebugEvent::Step)
            } else {
                // Not a stop for the debugger: the machine runs on.
                VcpuExit::Interrupted
            });
        }
        match arch.exception {
            BP_VECTOR => {
                // Ours whether or not this KVM left RIP after the int3.
                let ours = [arch.pc, arch.pc.wrapping_sub(1)]
                    .into_iter()
                    .find(|&a| planted.original(a).is_some());
                let Some(pc) = ours else {
                    // The guest's own int3: it gets its #BP, the debugger
                    // hears nothing.
                    self.load_with(fd, self.debug.single_step, KVM_GUESTDBG_INJECT_BP)?;
                    return Ok(VcpuExit::Interrupted);
                };
                let mut regs = fd.get_regs().map_err(|e| fail("KVM_GET_REGS", e))?;
                let cs = fd
                    .get_sregs()
                    .map_err(|e| fail("KVM_GET_SREGS", e))?
                    .cs
                    .base;
                if cs.wrapping_add(regs.rip) != pc {
                    regs.rip = pc.wrapping_sub(cs);
                    fd.set_regs(&regs).map_err(|e| fail("KVM_SET_REGS", e))?;
                }
                self.at_breakpoint = Some(pc);
                Ok(VcpuExit::Debug(DebugEvent::SwBreakpoint))
            }
            DB_VECTOR if arch.dr6 & DR6_BS != 0 && self.debug.single_step => {
                Ok(VcpuExit::Debug(DebugEvent::Step))
            }
            DB_VECTOR => {
                let hit = (0..4).find(|i| arch.dr6 & (1 << i) != 0);
                match hit.and_then(|i| self.slots.get(i)) {
                    Some(Slot::Exec(_)) => {
                        self.resume_rf = true;
                        Ok(VcpuExit::Debug(DebugEvent::HwBreakpoint))
                    }
                    Some(Slot::Soft(_)) => {
                        self.resume_rf = true;
                        Ok(VcpuExit::Debug(DebugEvent::SwBreakpoint))
                    }
                    Some(&Slot::Watch { addr, kind }) => {
                        Ok(VcpuExit::Debug(DebugEvent::Watchpoint { addr, kind }))
                    }
                    // The guest's own single step or debug registers:
                    // its #DB, not the debugger's.
                    None => {
                        self.load_with(fd, self.debug.single_step, KVM_GUESTDBG_INJECT_DB)?;
                        Ok(VcpuExit::Interrupted)
                    }
                }
            }
            other => Ok(VcpuExit::InternalError(format!(
                "KVM debug exit with exception {other} at {:#x}",
                arch.pc
            ))),
        }
    }
}

/// kvm_pvm emulates the guest's ring 0 and fails on a planted `int3`
/// (KVM internal error, emulation failed).
fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn write_byte(memory: &GuestMemory, gpa: u64, b: u8) -> Result<()> {
    memory
        .write_obj(b, GuestAddress(gpa))
        .map_err(|e| Error::Unsupported(format!("breakpoint at physical {gpa:#x}: {e}")))
}

/// Makes the planted set equal `wanted`.
fn sync_planted(
    fd: &VcpuFd,
    memory: &GuestMemory,
    planted: &Planted,
    wanted: &[u64],
) -> Result<()> {
    let mut map = planted.lock();
    let stale: Vec<u64> = map
        .keys()
        .filter(|a| !wanted.contains(a))
        .copied()
        .collect();
    for gva in stale {
        if let Some((gpa, orig)) = map.remove(&gva) {
            write_byte(memory, gpa, orig)?;
        }
    }
    for &gva in wanted {
        if map.contains_key(&gva) {
            continue;
        }
        let gpa = translate(fd, gva)?
            .ok_or_else(|| Error::Unsupported(format!("breakpoint at {gva:#x}: not mapped")))?;
        let orig: u8 = memory
            .read_obj(GuestAddress(gpa))
            .map_err(|e| Error::Unsupported(format!("breakpoint at {gva:#x}: {e}")))?;
        write_byte(memory, gpa, INT3)?;
        map.insert(gva, (gpa, orig));
    }
    Ok(())
}
