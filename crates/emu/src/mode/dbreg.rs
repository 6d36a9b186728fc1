//! The guest's debug architecture (SDM vol. 3, ch. 18): DR0–DR3
//! breakpoints on execution, data writes, data reads/writes and I/O
//! (CR4.DE), the DR6 status and DR7 controls, the general-detect fault,
//! single step with TF, RF, the MOV SS/POP SS shadow of #DB traps, and
//! `int1`. The debugger's own breakpoints (`crate::debug`) stay separate
//! and invisible to the guest.
//!
//! While the guest arms nothing this costs the run loop one test per
//! block: `exec.rs` takes the precise path (one instruction per block,
//! interpreter only) when TF, RF, an interrupt shadow or
//! [`DebugArch::armed`] is set, and calls [`before`] and [`after`] around
//! that instruction. Data breakpoints share the debugger's watch hooks in
//! `mem/access.rs` (`Debug::watching` covers both), I/O breakpoints are
//! checked in `port_in`/`port_out`.

use crate::cpu::fault::{DB, Fault, Res};
use crate::cpu::flags::{RF, TF};
use crate::cpu::{CR4_DE, CS, Cpu};
use crate::mem::PAGE_MASK;
use crate::mode::interrupt::{self, Event};

/// DR6: debug-register access detected (general detect).
pub const DR6_BD: u64 = 1 << 13;
/// DR6: single step.
pub const DR6_BS: u64 = 1 << 14;
/// DR6: task switch into a TSS with the T (debug trap) bit.
pub const DR6_BT: u64 = 1 << 15;
/// DR6 bits that read as 1 (reserved, and RTM: no transactions here).
pub const DR6_FIXED: u64 = 0xffff_0ff0;
/// DR6 bits a guest can write: B0–B3, BD, BS, BT.
pub const DR6_WRITABLE: u64 = 0xe00f;
/// DR7: general detect enable.
pub const DR7_GD: u64 = 1 << 13;
/// DR7 bit 10 reads as 1.
pub const DR7_FIXED: u64 = 0x400;
/// DR7 bits a guest can write: L0–G3, LE/GE, RTM, GD, R/W and LEN.
pub const DR7_WRITABLE: u64 = 0xffff_2fff;

/// R/W encodings of DR7.
const RW_EXEC: u64 = 0;
const RW_WRITE: u64 = 1;
const RW_IO: u64 = 2;
const RW_ACCESS: u64 = 3;

/// One vCPU's debug state beyond DR0–DR7.
#[derive(Debug, Default, Clone, Copy)]
pub struct DebugArch {
    /// DR7 enables a breakpoint or general detect: instructions run on
    /// the precise path.
    pub armed: bool,
    /// An enabled data breakpoint: accesses to its page take the
    /// checked slow path.
    pub data_armed: bool,
    /// The instruction now running follows MOV SS/POP SS: no
    /// instruction breakpoint before it, no #DB trap after the MOV SS.
    pub ss_shadow: bool,
    /// Set by the instruction now running when its single-step trap does
    /// not follow TF at its start: software interrupts take none,
    /// syscall/sysret deliver their own.
    pub step_after: Option<bool>,
    /// `int1` (ICEBP) is being delivered.
    pub icebp: bool,
    /// B0–B3 of the breakpoints whose condition the running instruction
    /// met, enabled or not (DR6 reports both).
    hits: u64,
    /// An enabled one among `hits`: a #DB trap follows the instruction.
    fire: bool,
    /// #DB trap bits held across a MOV SS/POP SS shadow.
    held: u64,
    /// An instruction runs between [`before`] and [`after`].
    precise: bool,
    /// BT of a task switch the running instruction made, for [`after`].
    task: u64,
}

/// What an instruction on the precise path started with.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    rf: u64,
    ss_shadow: bool,
    tf: bool,
}

fn rw(dr7: u64, n: usize) -> u64 {
    (dr7 >> (16 + 4 * n)) & 3
}

/// Address bits a breakpoint of DR7's LEN ignores (1, 2, 8, 4 bytes).
fn len_mask(dr7: u64, n: usize) -> u64 {
    [0, 1, 7, 3][((dr7 >> (18 + 4 * n)) & 3) as usize]
}

fn enabled(dr7: u64, n: usize) -> bool {
    (dr7 >> (2 * n)) & 3 != 0
}

/// Whether breakpoint `n` watches data accesses of kind `write`.
fn data_kind(dr7: u64, n: usize, write: bool) -> bool {
    match rw(dr7, n) {
        RW_WRITE => write,
        RW_ACCESS => true,
        _ => false,
    }
}

/// Recomputes what DR7 arms, after a DR write, a #DB or a reset.
pub fn refresh(cpu: &mut Cpu) {
    let dr7 = cpu.dr[7];
    cpu.dbg.armed = dr7 & (0xff | DR7_GD) != 0;
    cpu.dbg.data_armed = (0..4).any(|n| enabled(dr7, n) && rw(dr7, n) & 1 != 0);
    // Pages of new data breakpoints lose their fast TLB tags; the block
    // (interpreted or translated) ends so the next runs precisely.
    crate::debug::refresh_watching(cpu);
    cpu.stop = true;
}

/// `mov drN, r`: the value DRn holds after the write; #GP for bits a
/// 64-bit write may not set in DR6/DR7.
pub fn write(cpu: &mut Cpu, n: usize, v: u64) -> Res {
    if matches!(n, 6 | 7) && v >> 32 != 0 {
        return Err(Fault::gp(0));
    }
    cpu.dr[n] = match n {
        6 => (v & DR6_WRITABLE) | DR6_FIXED,
        7 => (v & DR7_WRITABLE) | DR7_FIXED,
        _ => v,
    };
    refresh(cpu);
    Ok(())
}

/// Before `mov` to or from a debug register: the general-detect fault
/// when DR7.GD is set (DR6.BD, GD cleared for the handler).
pub fn general_detect(cpu: &mut Cpu) -> Res {
    if cpu.dr[7] & DR7_GD == 0 {
        return Ok(());
    }
    cpu.dr[6] = (cpu.dr[6] & !0xf) | DR6_BD | DR6_FIXED;
    cpu.dr[7] &= !DR7_GD;
    refresh(cpu);
    Err(Fault::raise(DB, None))
}

/// MOV SS/POP SS: interrupts and #DB traps wait one more instruction.
pub fn ss_loaded(cpu: &mut Cpu) {
    cpu.int_shadow = true;
    cpu.dbg.ss_shadow = true;
    cpu.stop = true;
}

/// Before an instruction on the precise path. An instruction breakpoint
/// at CS:RIP (RF clear, no MOV SS shadow) delivers its #DB (a fault: RIP
/// at the instruction, RF pushed as it is, 0) and gives `None`;
/// otherwise RF is cleared, as at the start of every instruction.
pub fn before(cpu: &mut Cpu) -> Option<Entry> {
    let entry = Entry {
        rf: cpu.rflags & RF,
        ss_shadow: std::mem::take(&mut cpu.dbg.ss_shadow),
        tf: cpu.rflags & TF != 0,
    };
    let d = &mut cpu.dbg;
    (d.step_after, d.icebp, d.hits, d.fire) = (None, false, 0, false);
    if cpu.dbg.armed && entry.rf == 0 && !entry.ss_shadow {
        let pc = cpu.seg[CS].base.wrapping_add(cpu.rip()) & cpu.lin_mask;
        let dr7 = cpu.dr[7];
        let (mut hits, mut fire) = (0, false);
        for n in 0..4 {
            if rw(dr7, n) == RW_EXEC && cpu.dr[n] & cpu.lin_mask == pc {
                hits |= 1 << n;
                fire |= enabled(dr7, n);
            }
        }
        if fire {
            raise(cpu, hits, Event::Trap);
            return None;
        }
    }
    cpu.rflags &= !RF;
    cpu.dbg.precise = true;
    Some(entry)
}

/// The instruction `before` let run exits to the machine and runs again
/// later: it starts over with what it found.
pub fn restart(cpu: &mut Cpu, e: Entry) {
    cpu.rflags |= e.rf;
    cpu.dbg.ss_shadow = e.ss_shadow;
    (cpu.dbg.precise, cpu.dbg.task) = (false, 0);
}

/// After the instruction (`retired` is 0 when it faulted): the #DB trap
/// for single step and data or I/O breakpoints, one exception with all
/// their DR6 bits, or held until after the next instruction by a MOV SS.
pub fn after(cpu: &mut Cpu, e: Entry, retired: u64) {
    let d = &mut cpu.dbg;
    let step = d.step_after.take().unwrap_or(e.tf);
    d.precise = false;
    // A committed task switch traps even when a fault followed it.
    let mut bits = std::mem::take(&mut d.task);
    if retired > 0 {
        if step {
            bits |= DR6_BS;
        }
        if d.fire {
            bits |= d.hits;
        }
    }
    (d.hits, d.fire) = (0, false);
    if d.ss_shadow {
        d.held |= bits;
        return;
    }
    bits |= std::mem::take(&mut d.held);
    if bits != 0 && !cpu.shutdown {
        raise(cpu, bits, Event::Trap);
    }
}

/// Delivers #DB with `bits` in DR6 (B0–B3 replaced, BD/BS/BT kept).
fn raise(cpu: &mut Cpu, bits: u64, ev: Event) {
    cpu.dr[6] = (cpu.dr[6] & !0xf) | bits | DR6_FIXED;
    entering_handler(cpu);
    interrupt::deliver(cpu, DB, ev);
}

/// The processor clears DR7.GD on entry to the #DB handler, so the
/// handler can use the debug registers.
fn entering_handler(cpu: &mut Cpu) {
    if cpu.dr[7] & DR7_GD != 0 {
        cpu.dr[7] &= !DR7_GD;
        refresh(cpu);
    }
}

/// Delivers the software interrupt an instruction raised: `int1` as a
/// #DB trap like a hardware event (no gate DPL check, no DR6 status
/// bits), the others through their gates. Neither takes a single-step
/// trap: delivery clears TF (the SDM has debuggers emulate `int n`).
pub fn software_interrupt(cpu: &mut Cpu, vector: u8, at: u64) {
    cpu.dbg.step_after = Some(false);
    if std::mem::take(&mut cpu.dbg.icebp) {
        entering_handler(cpu);
        interrupt::deliver(cpu, DB, Event::Trap);
    } else {
        // A fault while delivering reports the `int` instruction at `at`.
        interrupt::deliver_software(cpu, vector, at);
    }
}

/// syscall/sysret end: the single-step trap follows TF as they leave it
/// (syscall's FMASK usually clears it; sysret sets it from R11 and traps
/// before the first instruction it returns to), delivered now so it
/// comes before any interrupt their new IF lets in.
pub fn fast_system_call_done(cpu: &mut Cpu) {
    cpu.dbg.step_after = Some(false);
    if cpu.rflags & TF != 0 {
        raise(cpu, DR6_BS, Event::Trap);
    }
}

/// A task switch into a TSS with the T bit set has completed: a #DB trap
/// with DR6.BT before the new task's first instruction (SDM 18.2.3,
/// 18.3.1.5). On the precise path it joins the instruction's other trap
/// bits (single step: BS|BT in one #DB); otherwise it is delivered now.
pub fn task_switched(cpu: &mut Cpu) {
    if cpu.dbg.precise {
        cpu.dbg.task = DR6_BT;
        cpu.stop = true;
    } else {
        raise(cpu, DR6_BT, Event::Trap);
    }
}

/// A data access of `n` bytes at linear `lin` (watched pages only).
pub fn data_access(cpu: &mut Cpu, lin: u64, n: usize, write: bool) {
    let dr7 = cpu.dr[7];
    for k in 0..4 {
        if data_kind(dr7, k, write) && overlaps(cpu.dr[k], len_mask(dr7, k), lin, n as u64) {
            cpu.dbg.hits |= 1 << k;
            cpu.dbg.fire |= enabled(dr7, k);
        }
    }
    if cpu.dbg.fire {
        cpu.stop = true;
    }
}

/// An I/O access of `n` bytes at `port`: I/O breakpoints exist only with
/// CR4.DE (R/W = 10b is undefined without it; it matches nothing here).
pub fn io_access(cpu: &mut Cpu, port: u16, n: usize) {
    if cpu.cr4 & CR4_DE == 0 {
        return;
    }
    let dr7 = cpu.dr[7];
    for k in 0..4 {
        if rw(dr7, k) == RW_IO
            && overlaps(cpu.dr[k] & 0xffff, len_mask(dr7, k), port.into(), n as u64)
        {
            cpu.dbg.hits |= 1 << k;
            cpu.dbg.fire |= enabled(dr7, k);
        }
    }
}

/// Whether `[at, at + n)` touches the breakpoint at `addr` (its low
/// `mask` bits ignored, as the SDM's alignment rule has it).
fn overlaps(addr: u64, mask: u64, at: u64, n: u64) -> bool {
    let start = addr & !mask;
    at <= start.wrapping_add(mask) && start <= at.wrapping_add(n - 1)
}

/// Whether an enabled data breakpoint lies on the 4 KiB page of `lin`.
pub fn data_page(cpu: &Cpu, lin: u64) -> bool {
    let dr7 = cpu.dr[7];
    (0..4).any(|k| {
        enabled(dr7, k)
            && rw(dr7, k) & 1 != 0
            && (cpu.dr[k] & cpu.lin_mask) & PAGE_MASK == lin & PAGE_MASK
    })
}
