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

use super::regs::{HOST, SLOT_CHANGED, SLOT_FREE};

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

/// Where a translated instruction goes when it must run in the
/// interpreter (its TLB fill failed: a fault, MMIO, a page crossing; or
/// an SSE or `cli` check failed): a record the code generator writes
/// beside a two-instruction jump to `Thunks::interp_site`, which saves
/// the host registers in a frame and calls [`interp_site`]. One shared
/// routine reading data instead of ~15 instructions emitted per memory
/// access: a third of a translation's code was these paths, which run
/// rarely.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Site {
    /// The instruction's interpreter form (owned by the translation).
    pub insn: *const Insn,
    /// Where translated code goes on after the instruction (absolute).
    pub resume: u64,
    /// The next instruction's RIP, as an offset from the block's start.
    pub next: i64,
    /// Instructions of the block before this one.
    pub count: u32,
    /// The guest flags are parked in EDX (else lazy in `Cpu::flags`).
    pub from_spill: bool,
    /// Through [`interp_soft`].
    pub soft: bool,
    /// The form translated code expects the flags in at `resume`.
    pub after: SiteFlags,
    /// What each host register holding guest registers holds
    /// (`Regs::slots`).
    pub slots: [u8; 8],
}

/// [`Site::after`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SiteFlags {
    /// Lazy in `Cpu::flags`.
    Lazy,
    /// In the host RFLAGS (the thunk loads them from the memo).
    Host,
    /// Parked in EDX.
    Spill,
}

impl Site {
    pub const BYTES: usize = 8 + 8 + 8 + 4 + 1 + 8;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..8].copy_from_slice(&(self.insn as u64).to_le_bytes());
        b[8..16].copy_from_slice(&self.resume.to_le_bytes());
        b[16..24].copy_from_slice(&self.next.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        let after = match self.after {
            SiteFlags::Lazy => 0,
            SiteFlags::Host => 1,
            SiteFlags::Spill => 2,
        };
        b[28] = u8::from(self.from_spill) | u8::from(self.soft) << 1 | after << 2;
        b[29..37].copy_from_slice(&self.slots);
        b
    }

    pub fn decode(b: &[u8; Self::BYTES]) -> Site {
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        Site {
            insn: word(0) as *const Insn,
            resume: word(8),
            next: word(16) as i64,
            count: u32::from_le_bytes(b[24..28].try_into().unwrap_or([0; 4])),
            from_spill: b[28] & 1 != 0,
            soft: b[28] & 2 != 0,
            after: match b[28] >> 2 & 3 {
                1 => SiteFlags::Host,
                2 => SiteFlags::Spill,
                _ => SiteFlags::Lazy,
            },
            slots: b[29..37].try_into().unwrap_or([SLOT_FREE; 8]),
        }
    }
}

/// The host registers `Thunks::interp_site` saves, as [`interp_site`]
/// sees them: the site record's address, then `regs::HOST` from last to
/// first, then RDX (the parked flags). Ten words keep the stack aligned.
pub const SITE_FRAME: usize = HOST.len() + 2;
const FRAME_RDX: usize = SITE_FRAME - 1;

/// Host register `HOST[s]`'s word in the frame.
const fn frame_slot(s: usize) -> usize {
    HOST.len() - s
}

/// What [`interp_site`] tells its thunk: go on at `resume`, or (0) leave
/// translated code with exit code `code`.
#[repr(C)]
pub struct Resume {
    pub resume: u64,
    pub code: u64,
}

/// A site's slow path (see [`Site`]): stores the changed guest registers
/// from the frame, makes parked flags lazy, runs the instruction in the
/// interpreter; then either leaves (counting the block's instructions
/// before it) or puts the flags in the form the code after it expects
/// and reloads the held registers into the frame.
pub extern "C" fn interp_site(
    cpu: &mut Cpu,
    site: *const [u8; Site::BYTES],
    frame: &mut [u64; SITE_FRAME],
    base: u64,
) -> Resume {
    // SAFETY: `site` is a record `emit::compile` wrote into the code
    // arena beside the jump here; translations are never rewritten while
    // they can run.
    let site = Site::decode(unsafe { &*site });
    for (s, &slot) in site.slots.iter().enumerate() {
        if slot != SLOT_FREE && slot & SLOT_CHANGED != 0 {
            cpu.gpr[usize::from(slot & 0xf)] = frame[frame_slot(s)];
        }
    }
    if site.from_spill {
        materialize(cpu, frame[FRAME_RDX]);
    }
    // SAFETY: the translation owns the instruction (`Jit::insns`) as long
    // as its code can run.
    let insn = unsafe { &*site.insn };
    let next = base.wrapping_add(site.next as u64);
    let code = if site.soft {
        interp_soft(cpu, insn, next)
    } else {
        interp(cpu, insn, next)
    };
    if code != GO_ON {
        cpu.icount += u64::from(site.count);
        return Resume { resume: 0, code };
    }
    match site.after {
        SiteFlags::Lazy => {}
        SiteFlags::Host => {
            flags_bits(cpu);
        }
        SiteFlags::Spill => {
            flags_bits(cpu);
            frame[FRAME_RDX] = cpu.jit_flags_memo[2] & 0xffff_ffff;
        }
    }
    for (s, &slot) in site.slots.iter().enumerate() {
        if slot != SLOT_FREE {
            frame[frame_slot(s)] = cpu.gpr[usize::from(slot & 0xf)];
        }
    }
    Resume {
        resume: site.resume,
        code: 0,
    }
}

/// The lazy form (`res`, `aux`) of flags parked by `lahf; seto al`.
fn lazy_of_parked(spilled: u64) -> [u64; 2] {
    let idx = ((spilled >> 8) & 0xd5) + 2 * (spilled & 0xff);
    FLAGS_TABLE[(idx & 0xff) as usize]
}

/// Parked flags (`lahf; seto al` in the low word of `spilled`) → lazy
/// flags and the memo, as `Thunks::materialize` does.
fn materialize(cpu: &mut Cpu, spilled: u64) {
    let [res, aux] = lazy_of_parked(spilled);
    cpu.flags.res = res;
    cpu.flags.aux = aux;
    cpu.jit_flags_memo = [res, aux, spilled];
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
    fn a_site_record_reads_back_as_written() {
        for (after, from_spill, soft) in [
            (SiteFlags::Lazy, false, true),
            (SiteFlags::Host, true, false),
            (SiteFlags::Spill, true, true),
        ] {
            let site = Site {
                insn: 0x7f00_1234_5678 as *const Insn,
                resume: 0x7f00_dead_beef,
                next: -0x1234,
                count: 95,
                from_spill,
                soft,
                after,
                slots: [
                    0,
                    1 | SLOT_CHANGED,
                    SLOT_FREE,
                    15,
                    4,
                    SLOT_FREE,
                    9 | SLOT_CHANGED,
                    2,
                ],
            };
            assert_eq!(Site::decode(&site.encode()), site);
        }
    }

    /// Every combination of the six status flags, as RFLAGS (bit 1 set).
    fn every_rflags() -> impl Iterator<Item = u64> {
        (0..64u64).map(|bits| {
            [CF, PF, AF, ZF, SF, OF]
                .iter()
                .enumerate()
                .fold(
                    2,
                    |acc, (k, m)| if bits >> k & 1 != 0 { acc | m } else { acc },
                )
        })
    }

    #[test]
    fn flags_table_round_trips_every_combination() {
        for rflags in every_rflags() {
            let idx = (rflags & 0xd5) | ((rflags >> 10) & 2);
            let [res, aux] = FLAGS_TABLE[idx as usize];
            let f = Flags { res, aux };
            assert_eq!(f.bits() | 2, rflags, "rflags {rflags:#x}");
        }
    }

    #[test]
    fn materialized_flags_match_the_parked_form() {
        // `lahf; seto al` of each combination, as translated code parks
        // them (EAX's upper half is whatever RAX held), made lazy by the
        // slow path.
        for rflags in every_rflags() {
            let parked = ((rflags & 0xff) << 8) | (rflags >> 11 & 1) | 0xabcd_0000;
            let [res, aux] = lazy_of_parked(parked);
            let f = Flags { res, aux };
            assert_eq!(f.bits() | 2, rflags, "rflags {rflags:#x}");
        }
    }
}
