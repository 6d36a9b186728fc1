//! Debugger support: breakpoints, single step and write watchpoints,
//! without ever writing `int3` into guest memory.
//!
//! While anything is set ([`Debug::active`]), the interpreter runs one
//! instruction per block and calls [`boundary`] before each instruction
//! and [`retired`] after it (the only hooks in `exec.rs`). Breakpoints
//! compare the linear address of CS:RIP; a stop at a breakpoint is not
//! taken again when the vCPU resumes from it. Write watchpoints take
//! pages they touch out of the TLB's fast write path, so every write to
//! them reaches [`wrote`] (the check behind one bool in `mem/access.rs`).

use vmplay_hypervisor::{DebugEvent, Error, GuestDebug, Result, WatchKind, Watchpoint};

use crate::cpu::{CS, Cpu};
use crate::mem::PAGE_MASK;

/// One vCPU's debug controls and the state between two boundaries.
#[derive(Debug, Default)]
pub struct Debug {
    /// Anything is set: run precisely, one instruction at a time.
    pub active: bool,
    /// Stop after each instruction (external interrupts wait meanwhile,
    /// as QEMU's gdbstub masks them while stepping).
    pub step: bool,
    /// Write watchpoints are set: writes to their pages are checked.
    pub watching: bool,
    sw: Vec<u64>,
    hw: Vec<u64>,
    watch: Vec<Watchpoint>,
    /// The breakpoint the vCPU last stopped at: resuming runs it.
    skip: Option<u64>,
    /// A watched write by the instruction now running.
    hit: Option<Watchpoint>,
    /// A stop to report at the next boundary.
    pending: Option<DebugEvent>,
}

/// Installs `d` (from `Vcpu::set_guest_debug`).
pub fn set(cpu: &mut Cpu, d: &GuestDebug) -> Result<()> {
    if let Some(w) = d.watchpoints.iter().find(|w| w.kind != WatchKind::Write) {
        return Err(Error::Unsupported(format!(
            "emu watches writes only, not {:?} at {:#x}",
            w.kind, w.addr
        )));
    }
    let dbg = &mut cpu.debug;
    dbg.sw = d.sw_breakpoints.clone();
    dbg.hw = d.hw_breakpoints.clone();
    dbg.watch = d.watchpoints.clone();
    dbg.step = d.single_step;
    dbg.watching = !dbg.watch.is_empty();
    dbg.active = !d.is_empty();
    if !dbg.active {
        dbg.skip = None;
        dbg.hit = None;
        dbg.pending = None;
    }
    // Write tags installed before may cover watched pages.
    cpu.tlb.flush_all();
    cpu.stop = true;
    Ok(())
}

fn linear_pc(cpu: &Cpu) -> u64 {
    cpu.seg[CS].base.wrapping_add(cpu.rip()) & cpu.lin_mask
}

/// Before an instruction: a stop to report, if any.
pub fn boundary(cpu: &mut Cpu) -> Option<DebugEvent> {
    let dbg = &mut cpu.debug;
    if let Some(ev) = dbg.pending.take() {
        return Some(ev);
    }
    let pc = cpu.seg[CS].base.wrapping_add(cpu.gpr[crate::cpu::RIP]) & cpu.lin_mask;
    if dbg.skip == Some(pc) {
        return None;
    }
    let ev = if dbg.sw.contains(&pc) {
        DebugEvent::SwBreakpoint
    } else if dbg.hw.contains(&pc) {
        DebugEvent::HwBreakpoint
    } else {
        return None;
    };
    dbg.skip = Some(pc);
    Some(ev)
}

/// After an instruction retired (or faulted into its handler): the step
/// or watchpoint stop, reported at the next boundary (after any posted
/// I/O of the instruction reached the machine).
pub fn retired(cpu: &mut Cpu) {
    let dbg = &mut cpu.debug;
    dbg.skip = None;
    if let Some(w) = dbg.hit.take() {
        dbg.pending = Some(DebugEvent::Watchpoint {
            addr: w.addr,
            kind: w.kind,
        });
    } else if dbg.step {
        dbg.pending = Some(DebugEvent::Step);
    }
}

/// Whether a watchpoint lies on the 4 KiB page of `lin` (such pages get
/// no fast write tag).
pub fn watched_page(cpu: &Cpu, lin: u64) -> bool {
    let page = lin & PAGE_MASK;
    cpu.debug.watch.iter().any(|w| {
        let last = w.addr.wrapping_add(w.len.max(1) - 1);
        w.addr & PAGE_MASK == page || last & PAGE_MASK == page
    })
}

/// A write of `n` bytes at linear `lin` is about to happen.
pub fn wrote(cpu: &mut Cpu, lin: u64, n: usize) {
    let end = lin.wrapping_add(n as u64);
    if let Some(w) = cpu
        .debug
        .watch
        .iter()
        .find(|w| lin < w.addr.wrapping_add(w.len) && w.addr < end)
    {
        cpu.debug.hit.get_or_insert(*w);
        cpu.stop = true;
    }
}

/// The current program counter as a linear address (tests, messages).
pub fn pc(cpu: &Cpu) -> u64 {
    linear_pc(cpu)
}
