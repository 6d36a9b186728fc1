//! The interpreter loop: look up the block at CS:RIP, run its handlers,
//! and between blocks take interrupts, kicks, INIT/SIPI and halts.

use crate::cpu::fault::Stop;
use crate::cpu::flags::{RF, TF};
use crate::cpu::{Cpu, RIP, RunState};
use crate::decode::cache::{Block, BlockCache};
use crate::jit::helpers;
use crate::mode::dbreg;
use crate::mode::interrupt::Event as IntEvent;
use crate::platform::signal;
use crate::vm::VmShared;

/// Why the loop returned to `run()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An access needs the machine (`cpu.io.pending` or `cpu.io.posted`).
    Io,
    /// `hlt` with interrupts disabled.
    Halt,
    /// Triple fault.
    Shutdown,
    /// A kick.
    Interrupted,
    /// A stop for the debugger (`crate::debug`).
    Debug(vmplay_hypervisor::DebugEvent),
}

/// Runs until something needs the caller.
pub fn run(cpu: &mut Cpu, cache: &mut BlockCache) -> Event {
    let vm = cpu.vm.clone();
    let sig = &vm.platform.signals[cpu.id as usize];
    let tracing = vm.trace.is_some();
    // A block that loops onto itself leaves its self-loop when it turns
    // hot, so the dispatcher can translate it (or, once it is queued for
    // the compiler thread, now and then to install the code).
    let hot = cache.jit.as_ref().map_or(u64::MAX, |j| j.config.threshold);
    // The block that just ran to its end: its links lead to the next
    // block without a lookup.
    let mut prev: *mut Block = std::ptr::null_mut();
    loop {
        if cpu.shutdown {
            return Event::Shutdown;
        }
        if !cpu.io.posted.is_empty() || cpu.io.pending.is_some() {
            return Event::Io;
        }
        let att = sig.attention.load(std::sync::atomic::Ordering::Acquire);
        // An interrupt pending while IF=0 needs nothing until IF changes
        // (sti/popf/iret end the block, so this is re-checked then).
        let idle_irq = att == signal::IRQ && (!cpu.iff() || cpu.debug.step);
        if (att != 0 && !idle_irq) || cpu.run_state != RunState::Running {
            // INIT/SIPI reset paging: the cached code page may be stale.
            cache.forget_page();
            prev = std::ptr::null_mut();
            // An event may move RIP: the exit just taken leads elsewhere.
            cpu.jit_link = 0;
            // Halted with nothing pending: time to translate warm code.
            if att == 0
                && cpu.run_state == RunState::Halted
                && cpu.iff()
                && let Some(jit) = cache.jit.as_mut()
                && jit.translate_while_idle(cpu.icount, || {
                    sig.attention.load(std::sync::atomic::Ordering::Acquire) == 0
                })
            {
                cache.clear_jit();
            }
            if let Some(ev) = service(cpu, &vm, att) {
                return ev;
            }
        }
        if cpu.run_state != RunState::Running || cpu.shutdown {
            continue;
        }
        if cpu.debug.active
            && let Some(ev) = crate::debug::boundary(cpu)
        {
            return Event::Debug(ev);
        }
        // The precise path: one instruction, interpreted, between the
        // guest debug architecture's checks (`mode/dbreg.rs`). An
        // instruction breakpoint is taken before the fetch can fault.
        let precise = cpu.int_shadow || cpu.rflags & (TF | RF) != 0 || cpu.dbg.armed;
        let entry = if precise {
            match dbreg::before(cpu) {
                Some(e) => Some(e),
                None => {
                    cache.forget_page();
                    prev = std::ptr::null_mut();
                    continue;
                }
            }
        } else {
            None
        };
        let rip = cpu.gpr[RIP];
        let linked = if prev.is_null() {
            None
        } else {
            // SAFETY: `prev` points into the block slab, which lives as
            // long as `cache`.
            unsafe { &*prev }.successor(rip, &cpu.tlb)
        };
        let live = |b: *mut Block| {
            // SAFETY: as above, for a link target.
            unsafe { &*b }.is_current(&vm.code)
        };
        // The block and the code epoch its mapping was seen under.
        let (block, epoch): (*mut Block, u32) = match linked {
            Some((b, e)) if live(b) => (b, e),
            _ => match cache.lookup(cpu) {
                Ok(bp) => {
                    // SAFETY: `bp` points into the slab or at the scratch
                    // block, alive while `cache` is; no reference is held.
                    let target = unsafe { &*bp }.link_target();
                    if let (false, Some(target)) = (prev.is_null(), target) {
                        // SAFETY: `prev` points into the slab; the shared
                        // borrow of `bp` above has ended.
                        unsafe { (*prev).link(rip, bp, target, cache.found_epoch) };
                    }
                    (bp, cache.found_epoch)
                }
                Err(s) => {
                    cache.forget_page();
                    prev = std::ptr::null_mut();
                    stopped(cpu, s);
                    if let Some(e) = entry {
                        dbreg::after(cpu, e, 0);
                    }
                    continue;
                }
            },
        };
        // SAFETY: `block` is alive (just looked up or validly linked) and
        // nothing else references it while it runs; handlers never touch
        // the block cache.
        let block = unsafe { &mut *block };
        // Single steps, breakpoints and watchpoints go instruction by
        // instruction in the interpreter.
        if !precise
            && !tracing
            && !cpu.debug.active
            && cpu.bits == 64
            && block.cached()
            && cache.jit.is_some()
        {
            match run_translated(cpu, cache, block, epoch) {
                Some(helpers::GO_ON) => {
                    prev = std::ptr::null_mut();
                    continue;
                }
                Some(helpers::IO) => {
                    cpu.jit_link = 0;
                    return Event::Io;
                }
                Some(_) => {
                    cpu.jit_link = 0;
                    prev = std::ptr::null_mut();
                    cpu.stop = false;
                    cache.forget_page();
                    continue;
                }
                None => {}
            }
        }
        cpu.jit_link = 0;
        block.prefetch_successors();
        cpu.int_shadow = false;
        cpu.stop = precise || cpu.debug.active;
        let start = cpu.gpr[RIP];
        let (mut done, mut exit);
        loop {
            block.runs += 1;
            (done, exit) = match (tracing, cpu.bits == 64) {
                (false, true) => run_block::<false, true>(cpu, block),
                (false, false) => run_block::<false, false>(cpu, block),
                (true, _) => run_block::<true, false>(cpu, block),
            };
            // A block that loops onto itself runs again without a lookup
            // while nothing needs attention and its code is unchanged.
            let att = sig.attention.load(std::sync::atomic::Ordering::Relaxed);
            if cpu.stop
                || exit
                || cpu.gpr[RIP] != start
                || (att != 0 && (att != signal::IRQ || cpu.iff()))
                || !block.is_current(&vm.code)
                || block.runs == hot
                // Queued for the compiler thread: look for its code now
                // and then.
                || (block.jit_queued != 0 && block.runs & 63 == 0)
            {
                break;
            }
            cpu.icount += done;
            cache.interpreted += done;
        }
        cpu.icount += done;
        cache.interpreted += done;
        if cpu.stop || exit || !block.cached() {
            prev = std::ptr::null_mut();
        } else {
            prev = block;
        }
        if cpu.stop {
            cache.forget_page();
        }
        if exit {
            if let Some(e) = entry {
                dbreg::restart(cpu, e);
            }
            return Event::Io;
        }
        if cpu.debug.active {
            crate::debug::retired(cpu);
        }
        if !cpu.io.log.is_empty() {
            cpu.io.retire();
        }
        if let Some(e) = entry {
            dbreg::after(cpu, e, done);
        }
    }
}

/// Runs `block` through the translation tier, translating it first if
/// it is hot; `None` if it stays interpreted.
fn run_translated(
    cpu: &mut Cpu,
    cache: &mut BlockCache,
    block: &mut Block,
    epoch: u32,
) -> Option<u64> {
    let jit = cache.jit.as_mut()?;
    if block.jit_entry == 0 {
        if block.jit_tried || block.runs < jit.config.threshold.min(jit.config.idle_threshold) {
            return None;
        }
        let mut reset = false;
        if !jit.compile(cpu, block, || reset = true) {
            if reset {
                cache.clear_jit();
                cpu.jit_link = 0;
            }
            return None;
        }
    }
    // Co-simulation runs a block twice over shared memory: only sound
    // while no other vCPU can write it in between.
    let verify = if cpu.vm.platform.signals.len() == 1 {
        jit.config.verify_runs
    } else {
        0
    };
    if verify != 0 && block.jit_verified < verify {
        block.jit_verified += 1;
        cpu.jit_link = 0;
        return Some(crate::jit::verify::run(cpu, block, jit));
    }
    if cpu.jit_link != 0 {
        // The exit's target is this block's start (the exit set RIP and
        // nothing ran since): chain it.
        if verify == 0 && cpu.jit_link_rip == cpu.gpr[crate::cpu::RIP] {
            let head = if cpu.jit_link_spill != 0 {
                block.jit_head_spill
            } else {
                block.jit_head
            };
            // An exit to another page holds under this mapping's epoch.
            let epoch = (cpu.jit_link_epoch != 0).then_some((cpu.jit_link_epoch, epoch));
            jit.link(cpu.jit_link, head, epoch);
        }
        cpu.jit_link = 0;
    }
    if verify == 0 {
        // Entered from the dispatcher: returns and indirect jumps to this
        // RIP may come straight here next time.
        jit.note_target(cpu.gpr[crate::cpu::RIP], epoch, block);
    }
    cpu.stop = false;
    let code = jit.enter(block.jit_entry, cpu);
    if cpu.jit_link != 0 {
        jit.stats.exits_unlinked += 1;
        cpu.jit_link_rip = cpu.gpr[crate::cpu::RIP];
    }
    Some(code)
}

/// The interpreter's run of a translation's instructions `insns` (forms
/// of `ins`), for co-simulation: as `run_block`, but a taken branch leaves
/// (a trace goes on only through fall-throughs) and `sti` goes on where
/// translated code does.
pub fn run_trace_for_verify(
    cpu: &mut Cpu,
    ins: &[iced_x86::Instruction],
    insns: &[crate::decode::Insn],
) -> bool {
    for (k, (i, insn)) in ins.iter().zip(insns).enumerate() {
        if k > 0 && ins[k - 1].mnemonic() == iced_x86::Mnemonic::Sti {
            cpu.int_shadow = false;
        }
        let cur = cpu.gpr[RIP];
        let next = cur.wrapping_add(u64::from(insn.len));
        cpu.gpr[RIP] = next;
        match (insn.exec)(cpu, insn) {
            Ok(()) => {
                if cpu.stop {
                    if i.mnemonic() != iced_x86::Mnemonic::Sti
                        || !crate::jit::helpers::dispatcher_idle(cpu)
                    {
                        break;
                    }
                    cpu.stop = false;
                }
                if cpu.gpr[RIP] != next {
                    break;
                }
            }
            Err(Stop::Exit) => {
                cpu.gpr[RIP] = cur;
                return true;
            }
            Err(Stop::SoftInt(v)) => {
                cpu.io.retire();
                dbreg::software_interrupt(cpu, v, cur);
                break;
            }
            Err(Stop::Fault(f)) => {
                cpu.gpr[RIP] = cur;
                cpu.io.retire();
                crate::mode::interrupt::deliver_fault(cpu, f);
                break;
            }
        }
    }
    false
}

/// Runs one block's instructions; returns (retired, exited for I/O).
#[inline(always)]
/// `TRACE` logs each instruction; `LONG` (64-bit code) skips the IP wrap.
fn run_block<const TRACE: bool, const LONG: bool>(cpu: &mut Cpu, block: &Block) -> (u64, bool) {
    let mut done = 0u64;
    for (k, insn) in block.insns.iter().enumerate() {
        let cur = cpu.gpr[RIP];
        if TRACE {
            crate::trace::record(cpu, block.full.get(k));
        }
        let next = cur.wrapping_add(u64::from(insn.len));
        cpu.gpr[RIP] = if LONG { next } else { next & cpu.ip_mask };
        match (insn.exec)(cpu, insn) {
            Ok(()) => {
                done += 1;
                if cpu.stop {
                    break;
                }
            }
            Err(Stop::Exit) => {
                cpu.gpr[RIP] = cur;
                return (done, true);
            }
            Err(Stop::SoftInt(v)) => {
                done += 1;
                cpu.io.retire();
                dbreg::software_interrupt(cpu, v, cur);
                break;
            }
            Err(Stop::Fault(f)) => {
                cpu.gpr[RIP] = cur;
                cpu.io.retire();
                crate::mode::interrupt::deliver_fault(cpu, f);
                break;
            }
        }
    }
    (done, false)
}

/// Delivers a fault raised outside a handler (instruction fetch).
fn stopped(cpu: &mut Cpu, s: Stop) {
    match s {
        Stop::Fault(f) => crate::mode::interrupt::deliver_fault(cpu, f),
        Stop::SoftInt(v) => dbreg::software_interrupt(cpu, v, cpu.gpr[RIP]),
        Stop::Exit => {}
    }
}

/// Handles attention bits and non-running states at a block boundary.
/// Returns an event for `run()` or `None` to go on.
fn service(cpu: &mut Cpu, vm: &VmShared, att: u32) -> Option<Event> {
    let id = cpu.id as usize;
    let sig = &vm.platform.signals[id];
    if att & signal::KICK != 0 {
        sig.clear(signal::KICK);
        return Some(Event::Interrupted);
    }
    if att & signal::UNHALT != 0 {
        sig.clear(signal::UNHALT);
        // Not halted: the kick stays pending for the next `hlt`.
        if cpu.run_state == RunState::Halted && sig.take_unhalt() {
            cpu.run_state = RunState::Running;
        }
    }
    if att & signal::FLUSH_CODE != 0 {
        sig.clear(signal::FLUSH_CODE);
        cpu.tlb.drop_write_code(&vm.code);
    }
    if att & signal::INIT != 0 {
        sig.clear(signal::INIT);
        cpu.reset();
        cpu.run_state = RunState::WaitForSipi;
    }
    if att & signal::SIPI != 0 {
        sig.clear(signal::SIPI);
        if cpu.run_state == RunState::WaitForSipi {
            let vector = sig.sipi_vector();
            cpu.reset();
            cpu.seg[crate::cpu::CS].set_real(u16::from(vector) << 8);
            cpu.set_rip(0);
            cpu.update_mode();
            cpu.run_state = RunState::Running;
        }
    }
    if cpu.run_state == RunState::WaitForSipi {
        sig.wait();
        return None;
    }
    if att & signal::NMI != 0 && !cpu.nmi_blocked {
        sig.clear(signal::NMI);
        cpu.run_state = RunState::Running;
        cpu.nmi_blocked = true;
        crate::mode::interrupt::deliver(cpu, crate::cpu::fault::NMI, IntEvent::Nmi);
        return None;
    }
    if att & signal::IRQ != 0 && cpu.iff() && !cpu.int_shadow {
        sig.clear(signal::IRQ);
        if let Some(vector) = vm.platform.ack_interrupt(cpu.id) {
            // More may be pending: look again at the next boundary.
            sig.raise(signal::IRQ);
            cpu.run_state = RunState::Running;
            crate::mode::interrupt::deliver(cpu, vector, IntEvent::External);
            return None;
        }
    }
    if cpu.run_state == RunState::Halted {
        if !cpu.iff() {
            return Some(Event::Halt);
        }
        sig.wait_halted();
    }
    None
}
