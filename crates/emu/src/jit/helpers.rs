//! What translated code calls back into: running one instruction through
//! the interpreter, filling the TLB, and converting flags between the host
//! RFLAGS and the interpreter's lazy form. All `extern "C"`, called with
//! the vCPU context as first argument.

use std::sync::LazyLock;

use crate::cpu::Cpu;
use crate::cpu::fault::Stop;
use crate::cpu::flags::{CF, Flags, OF};
use crate::decode::Insn;
use crate::mem::PAGE_MASK;
use crate::mem::access::Target;
use crate::mem::paging::Access;

/// Exit codes of translated code and of [`interp`].
pub const GO_ON: u64 = 0;
/// Leave translated code: the state is architecturally complete (RIP set),
/// something may need the dispatcher (stop, delivered event, I/O log).
pub const LEAVE: u64 = 1;
/// An access needs the machine: RIP is the instruction's, retried later.
pub const IO: u64 = 2;

/// Runs one instruction with its interpreter handler, exactly as the
/// interpreter's block loop does (RIP advanced first, rolled back on a
/// fault or an I/O exit; events delivered here).
pub extern "C" fn interp(cpu: &mut Cpu, insn: &Insn, next: u64) -> u64 {
    run_one(cpu, insn, next).0
}

/// [`interp`]'s work; also whether the instruction completed without an
/// I/O exit or an exception.
fn run_one(cpu: &mut Cpu, insn: &Insn, next: u64) -> (u64, bool) {
    let cur = next.wrapping_sub(u64::from(insn.len));
    cpu.gpr[crate::cpu::RIP] = next;
    match (insn.exec)(cpu, insn) {
        Ok(()) => {
            cpu.icount += 1;
            let io = !cpu.io.log.is_empty() || !cpu.io.posted.is_empty();
            if io {
                cpu.io.retire();
            }
            (if cpu.stop || io { LEAVE } else { GO_ON }, !io)
        }
        Err(Stop::Exit) => {
            cpu.gpr[crate::cpu::RIP] = cur;
            (IO, false)
        }
        Err(Stop::SoftInt(v)) => {
            cpu.icount += 1;
            cpu.io.retire();
            crate::mode::dbreg::software_interrupt(cpu, v, cur);
            (LEAVE, false)
        }
        Err(Stop::Fault(f)) => {
            cpu.gpr[crate::cpu::RIP] = cur;
            cpu.io.retire();
            crate::mode::interrupt::deliver_fault(cpu, f);
            (LEAVE, false)
        }
    }
}

/// [`interp`] for instructions that stop the block only so the
/// dispatcher can act on what they change (`sti`, `iret`, `syscall`,
/// `sysret`: IF, CPL, the code's mode). When the instruction completed
/// and the dispatcher would have nothing to do (64-bit code still, no
/// precise stepping, nothing pending), translated code goes on: through
/// the target cache after a control transfer, or to the next instruction
/// after `sti` (its interrupt shadow stays set for the dispatcher, which
/// honours it whenever an interrupt does become pending).
pub extern "C" fn interp_soft(cpu: &mut Cpu, insn: &Insn, next: u64) -> u64 {
    let (r, completed) = run_one(cpu, insn, next);
    if r == LEAVE && completed && cpu.stop && dispatcher_idle(cpu) {
        cpu.stop = false;
        return GO_ON;
    }
    r
}

/// Whether the dispatcher would have nothing to do after an instruction
/// that stopped the block only for its sake: translated code goes on.
pub fn dispatcher_idle(cpu: &Cpu) -> bool {
    cpu.bits == 64
        && cpu.rflags & (crate::cpu::flags::TF | crate::cpu::flags::RF) == 0
        && !cpu.debug.active
        && !cpu.dbg.armed
        && cpu.run_state == crate::cpu::RunState::Running
        && !cpu.shutdown
        && cpu.vm.platform.signals[cpu.id as usize]
            .attention
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
}

/// The inline TLB check missed for an access of `kind & 0xff` bytes at
/// `lin` (a write if bit 8 is set): walks the page tables and fills the
/// TLB. `GO_ON` if the inline check will now hit; otherwise the
/// instruction must run in the interpreter (fault, MMIO, a page holding
/// code, a page crossing), which redoes the walk and raises any fault.
pub extern "C" fn fill(cpu: &mut Cpu, lin: u64, kind: u64) -> u64 {
    let n = kind & 0xff;
    let write = kind & 0x100 != 0;
    if (lin & 0xfff) + n > 0x1000 {
        return LEAVE;
    }
    let acc = if write { Access::Write } else { Access::Read };
    match cpu.translate(lin, acc) {
        Ok(Target::Ram(_)) => {
            let e = cpu.tlb.entry(lin);
            let tag = if write { e.tag_w } else { e.tag_r };
            if tag == lin & PAGE_MASK { GO_ON } else { LEAVE }
        }
        _ => LEAVE,
    }
}

/// The lazy flags as RFLAGS bits, for `popfq` (bit 1 set, nothing else
/// outside OSZAPC); remembered in `Cpu::jit_flags_memo`.
pub extern "C" fn flags_bits(cpu: &mut Cpu) -> u64 {
    let bits = cpu.flags.bits() | 2;
    cpu.jit_flags_memo = [cpu.flags.res, cpu.flags.aux, parked(bits)];
    bits
}

/// RFLAGS bits in the form `lahf; seto al` parks them in AX.
pub const fn parked(bits: u64) -> u64 {
    ((bits & 0xff) << 8) | ((bits >> 11) & 1)
}

/// The memo's first value: the flags `res = aux = 0` stand for (ZF, PF).
pub const FLAGS_MEMO_INIT: [u64; 3] = [
    0,
    0,
    parked(crate::cpu::flags::ZF | crate::cpu::flags::PF | 2),
];

/// Host RFLAGS → lazy flags, indexed by CF, OF (moved to bit 1), PF, AF,
/// ZF and SF in their RFLAGS positions: `(rflags & 0xd5) | (OF >> 10)`;
/// each entry is (`res`, `aux`).
pub static FLAGS_TABLE: LazyLock<Box<[[u64; 2]; 256]>> = LazyLock::new(|| {
    let mut t = Box::new([[0u64; 2]; 256]);
    for (i, e) in t.iter_mut().enumerate() {
        let i = i as u64;
        let bits = (i & 0xd5 & !CF) | (i & CF) | if i & 2 != 0 { OF } else { 0 };
        let mut f = Flags::default();
        f.set_bits(bits);
        *e = [f.res, f.aux];
    }
    t
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::flags::{AF, PF, SF, ZF};

    #[test]
    fn flags_table_round_trips_every_combination() {
        for bits in 0..64u64 {
            let rflags = [CF, PF, AF, ZF, SF, OF]
                .iter()
                .enumerate()
                .fold(
                    2,
                    |acc, (k, m)| if bits >> k & 1 != 0 { acc | m } else { acc },
                );
            let idx = (rflags & 0xd5) | ((rflags >> 10) & 2);
            let [res, aux] = FLAGS_TABLE[idx as usize];
            let f = Flags { res, aux };
            assert_eq!(f.bits() | 2, rflags, "rflags {rflags:#x}");
        }
    }
}
