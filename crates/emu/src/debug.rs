//! Debugger support: breakpoints, single step and watchpoints (write,
//! read, access), without ever writing `int3` into guest memory.
//!
//! While anything is set ([`Debug::active`]), the interpreter runs one
//! instruction per block and calls [`boundary`] before each instruction
//! and [`retired`] after it (the only hooks in `exec.rs`). Breakpoints
//! compare the linear address of CS:RIP; a stop at a breakpoint is not
//! taken again when the vCPU resumes from it. Watchpoints take the pages
//! they touch out of the TLB's fast paths, so every data access to them
//! reaches [`wrote`] or [`read`] (checks behind one bool in
//! `mem/access.rs`); instruction fetches are not data accesses.

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
    /// Watchpoints are set: accesses to their pages are checked.
    pub watching: bool,
    sw: Vec<u64>,
    hw: Vec<u64>,
    watch: Vec<Watchpoint>,
    /// The breakpoint the vCPU last stopped at: resuming runs it.
    skip: Option<u64>,
    /// A watched access by the instruction now running.
    hit: Option<Watchpoint>,
    /// A stop to report at the next boundary.
    pending: Option<DebugEvent>,
}

/// Installs `d` (from `Vcpu::set_guest_debug`).
pub fn set(cpu: &mut Cpu, d: &GuestDebug) -> Result<()> {
    if let Some(w) = d.watchpoints.iter().find(|w| w.len == 0) {
        return Err(Error::Unsupported(format!(
            "an empty watchpoint at {:#x}",
            w.addr
        )));
    }
    let dbg = &mut cpu.debug;
    dbg.sw = d.sw_breakpoints.clone();
    dbg.hw = d.hw_breakpoints.clone();
    dbg.watch = d.watchpoints.clone();
    dbg.step = d.single_step;
    dbg.active = !d.is_empty();
    if !dbg.active {
        dbg.skip = None;
        dbg.hit = None;
        dbg.pending = None;
    }
    refresh_watching(cpu);
    cpu.stop = true;
    Ok(())
}

/// Recomputes [`Debug::watching`]: the debugger's watchpoints or the
/// guest's data breakpoints (`mode/dbreg.rs`) share the checked path.
pub fn refresh_watching(cpu: &mut Cpu) {
    cpu.debug.watching = !cpu.debug.watch.is_empty() || cpu.dbg.data_armed;
    // Tags installed before may cover watched pages.
    cpu.tlb.flush_all();
}

fn linear_pc(cpu: &Cpu) -> u64 {
    cpu.seg[CS].base.wrapping_add(cpu.rip()) & cpu.lin_mask
}

/// Before an instruction: a stop to report, if any.
pub fn boundary(cpu: &mut Cpu) -> Option<DebugEvent> {
    let pc = linear_pc(cpu);
    let dbg = &mut cpu.debug;
    if let Some(ev) = dbg.pending.take() {
        return Some(ev);
    }
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
    let pc = linear_pc(cpu);
    let dbg = &mut cpu.debug;
    // Still at the breakpoint (a `rep` string between two elements): it
    // does not fire again, as RF keeps an instruction breakpoint quiet.
    // (A one-instruction loop onto itself therefore stops only once.)
    if dbg.skip != Some(pc) {
        dbg.skip = None;
    }
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
/// no fast read or write tag).
pub fn watched_page(cpu: &Cpu, lin: u64) -> bool {
    let page = lin & PAGE_MASK;
    cpu.debug.watch.iter().any(|w| {
        let last = w.addr.wrapping_add(w.len.max(1) - 1);
        w.addr & PAGE_MASK == page || last & PAGE_MASK == page
    }) || (cpu.dbg.data_armed && crate::mode::dbreg::data_page(cpu, lin))
}

/// A write of `n` bytes at linear `lin` is about to happen.
pub fn wrote(cpu: &mut Cpu, lin: u64, n: usize) {
    hit(cpu, lin, n, |k| k != WatchKind::Read);
    if cpu.dbg.data_armed {
        crate::mode::dbreg::data_access(cpu, lin, n, true);
    }
}

/// `n` bytes at linear `lin` were read.
pub fn read(cpu: &mut Cpu, lin: u64, n: usize) {
    hit(cpu, lin, n, |k| k != WatchKind::Write);
    if cpu.dbg.data_armed {
        crate::mode::dbreg::data_access(cpu, lin, n, false);
    }
}

fn hit(cpu: &mut Cpu, lin: u64, n: usize, kind: impl Fn(WatchKind) -> bool) {
    let end = lin.wrapping_add(n as u64);
    if let Some(w) = cpu
        .debug
        .watch
        .iter()
        .find(|w| kind(w.kind) && lin < w.addr.wrapping_add(w.len) && w.addr < end)
    {
        cpu.debug.hit.get_or_insert(*w);
        cpu.stop = true;
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use crate::tests::guest::{CODE, End, Guest, PML4};

    use super::*;

    const VAR: u64 = 0x20_0000;

    /// `mov eax,1 ; mov ebx,2 ; add eax,ebx ; mov [VAR+0x100],rax ;
    /// mov [VAR],rax ; hlt`, and the address of each instruction.
    fn program(g: &mut Guest) -> Vec<u64> {
        let mut at = vec![CODE];
        let mut ip = CODE;
        let steps: [&dyn Fn(&mut CodeAssembler); 6] = [
            &|a| a.mov(eax, 1).unwrap(),
            &|a| a.mov(ebx, 2).unwrap(),
            &|a| a.add(eax, ebx).unwrap(),
            &|a| a.mov(qword_ptr(VAR + 0x100), rax).unwrap(),
            &|a| a.mov(qword_ptr(VAR), rax).unwrap(),
            &|a| a.hlt().unwrap(),
        ];
        for f in steps {
            ip += g.code(64, ip, f) as u64;
            at.push(ip);
        }
        let s = g.long_mode(CODE);
        g.vcpu.set_state(&s).unwrap();
        at
    }

    fn debug(f: impl FnOnce(&mut GuestDebug)) -> GuestDebug {
        let mut d = GuestDebug::default();
        f(&mut d);
        d
    }

    #[test]
    fn breakpoint_stops_before_the_instruction_without_int3() {
        let mut g = Guest::new(1);
        let at = program(&mut g);
        let original = g.read_u64(at[2]);
        g.vcpu
            .set_guest_debug(&debug(|d| d.sw_breakpoints = vec![at[2]]))
            .unwrap();
        assert_eq!(g.run().end, End::Debug(DebugEvent::SwBreakpoint));
        let s = g.state();
        assert_eq!((s.rip, s.gpr[0], s.gpr[3]), (at[2], 1, 2));
        assert_eq!(g.read_u64(at[2]), original, "guest memory is untouched");
        // Resuming runs the instruction under the breakpoint.
        assert_eq!(g.run().end, End::Halt);
        assert_eq!(g.state().gpr[0], 3);
    }

    #[test]
    fn single_step_retires_one_instruction_per_run() {
        let mut g = Guest::new(1);
        let at = program(&mut g);
        g.vcpu
            .set_guest_debug(&debug(|d| d.single_step = true))
            .unwrap();
        for &next in &at[1..5] {
            assert_eq!(g.run().end, End::Debug(DebugEvent::Step));
            assert_eq!(g.state().rip, next);
        }
        g.vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
        assert_eq!(g.run().end, End::Halt);
    }

    #[test]
    fn write_watchpoint_stops_after_the_writing_instruction() {
        let mut g = Guest::new(1);
        let at = program(&mut g);
        let w = Watchpoint {
            addr: VAR,
            len: 8,
            kind: WatchKind::Write,
        };
        g.vcpu
            .set_guest_debug(&debug(|d| d.watchpoints = vec![w]))
            .unwrap();
        // The store to VAR+0x100 (same page) does not stop.
        assert_eq!(
            g.run().end,
            End::Debug(DebugEvent::Watchpoint {
                addr: VAR,
                kind: WatchKind::Write
            })
        );
        assert_eq!(g.state().rip, at[5]);
        assert_eq!(g.read_u64(VAR), 3);
        assert_eq!(g.run().end, End::Halt);
    }

    #[test]
    fn read_and_access_watchpoints_stop_after_the_reading_instruction() {
        let mut g = Guest::new(1);
        let load = CODE;
        let store = load + g.code(64, load, |a| a.mov(rax, qword_ptr(VAR + 4)).unwrap()) as u64;
        let end = store + g.code(64, store, |a| a.mov(qword_ptr(VAR), rbx).unwrap()) as u64;
        g.code(64, end, |a| a.hlt().unwrap());
        g.write_u64(VAR, 0x1111_2222_3333_4444);
        let s = g.long_mode(CODE);
        g.vcpu.set_state(&s).unwrap();
        let watch = |kind| Watchpoint {
            addr: VAR,
            len: 8,
            kind,
        };
        // A read of VAR+4..VAR+12 overlaps the watched VAR..VAR+8.
        g.vcpu
            .set_guest_debug(&debug(|d| d.watchpoints = vec![watch(WatchKind::Read)]))
            .unwrap();
        assert_eq!(
            g.run().end,
            End::Debug(DebugEvent::Watchpoint {
                addr: VAR,
                kind: WatchKind::Read
            })
        );
        assert_eq!((g.state().rip, g.state().gpr[0]), (store, 0x1111_2222));
        // A read watchpoint ignores the store; an access one sees it.
        g.vcpu
            .set_guest_debug(&debug(|d| {
                d.watchpoints = vec![watch(WatchKind::ReadWrite)]
            }))
            .unwrap();
        assert_eq!(
            g.run().end,
            End::Debug(DebugEvent::Watchpoint {
                addr: VAR,
                kind: WatchKind::ReadWrite
            })
        );
        assert_eq!(g.state().rip, end);
        g.vcpu
            .set_guest_debug(&debug(|d| d.watchpoints = vec![watch(WatchKind::Read)]))
            .unwrap();
        assert_eq!(g.run().end, End::Halt);
    }

    #[test]
    fn single_step_splits_a_fused_compare_and_branch() {
        let mut g = Guest::new(1);
        // cmp rdx,7 (4 bytes) + ja (2 bytes): fused at decode.
        let cmp = CODE;
        let ja = cmp + g.code(64, cmp, |a| a.cmp(rdx, 7).unwrap()) as u64;
        let mut a = CodeAssembler::new(64).unwrap();
        let mut l = a.create_label();
        a.ja(l).unwrap();
        a.nop().unwrap();
        a.set_label(&mut l).unwrap();
        a.hlt().unwrap();
        let bytes = a.assemble(ja).unwrap();
        g.write(ja, &bytes);
        let mut s = g.long_mode(CODE);
        s.gpr[2] = 9;
        g.vcpu.set_state(&s).unwrap();
        g.vcpu
            .set_guest_debug(&debug(|d| d.single_step = true))
            .unwrap();
        assert_eq!(g.run().end, End::Debug(DebugEvent::Step));
        assert_eq!(g.state().rip, ja, "stopped between compare and branch");
        assert_eq!(g.run().end, End::Debug(DebugEvent::Step));
        assert_eq!(g.state().rip, ja + 3, "the branch was taken over the nop");
    }

    #[test]
    fn watchpoint_sees_a_rep_string_store_that_starts_before_it() {
        let mut g = Guest::new(1);
        let stos = CODE;
        let next = stos + g.code(64, stos, |a| a.rep().stosq().unwrap()) as u64;
        g.code(64, next, |a| a.hlt().unwrap());
        let mut s = g.long_mode(CODE);
        // 64 qwords from VAR - 0x100: the watched one (VAR + 0x80) is in
        // the middle of the second page's chunk.
        (s.gpr[0], s.gpr[1], s.gpr[7]) = (7, 64, VAR - 0x100);
        g.vcpu.set_state(&s).unwrap();
        let w = Watchpoint {
            addr: VAR + 0x80,
            len: 8,
            kind: WatchKind::Write,
        };
        g.vcpu
            .set_guest_debug(&debug(|d| d.watchpoints = vec![w]))
            .unwrap();
        assert_eq!(
            g.run().end,
            End::Debug(DebugEvent::Watchpoint {
                addr: VAR + 0x80,
                kind: WatchKind::Write
            })
        );
        assert_eq!(g.read_u64(VAR + 0x80), 7);
        assert_eq!(
            g.read_u64(VAR + 0x88),
            0,
            "stopped right after the watched element"
        );
        g.vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
        assert_eq!(g.run().end, End::Halt);
        assert_eq!(g.state().gpr[1], 0, "the string finished");
        assert_eq!(g.read_u64(VAR + 0xf8), 7);
    }

    #[test]
    fn debugger_translation_has_no_side_effects() {
        let mut g = Guest::new(1);
        let at = program(&mut g);
        let pd = PML4 + 0x2000;
        let entry = g.read_u64(pd);
        assert_eq!(entry & 0x60, 0, "the test's tables start without A/D");
        assert_eq!(g.vcpu.translate_gva(at[1]).unwrap(), Some(at[1]));
        assert_eq!(g.vcpu.translate_gva(VAR + 5).unwrap(), Some(VAR + 5));
        assert_eq!(
            g.vcpu.translate_gva(0x4000_0000).unwrap(),
            None,
            "past 1 GiB"
        );
        assert_eq!(g.read_u64(pd), entry, "no accessed bit");
        assert_eq!(g.state().cr2, 0, "no CR2");
    }
}
