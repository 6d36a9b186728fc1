//! The x87 FPU family: the register stack, tags, status and control words,
//! exceptions (FSW.ES and #MF), FIP/FDP/FOP, and every x87 instruction.
//! The arithmetic itself is the software 80-bit float in [`float80`],
//! the transcendentals are in [`trans`].
//!
//! `cpu.fpu.st` holds the *physical* registers R0..R7 (so MMi is `st[i]`);
//! ST(i) is `st[(TOP + i) & 7]` and `ftw` has one valid bit per physical
//! register, as FXSAVE's abridged tag word does.
//!
//! Exceptions follow the hardware: an operation raises flags in FSW; when
//! one is unmasked, FSW.ES/B are set and the *next* waiting x87
//! instruction takes #MF (with CR0.NE; the legacy FERR#/IRQ13 path of
//! CR0.NE = 0 is not modelled, so the error just stays pending). Unmasked
//! invalid, denormal and zero-divide exceptions leave the destination and
//! the stack alone; unmasked overflow/underflow deliver the bias-adjusted
//! result to registers and store nothing to memory.

mod control;
pub mod float80;
mod ops;
mod trans;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests;

use std::sync::OnceLock;

use iced_x86::{Code, Instruction, Register};

use crate::cpu::fault::{Fault, Res};
use crate::cpu::fpu::{F80, Fpu};
use crate::cpu::{CR0_EM, CR0_MP, CR0_NE, CR0_TS, CS, Cpu, Mode};
use crate::decode::{Insn, Table};
use float80::{Env, IE, Kind};

/// FSW bits.
pub const C0: u16 = 1 << 8;
pub const C1: u16 = 1 << 9;
pub const C2: u16 = 1 << 10;
pub const C3: u16 = 1 << 14;
pub const SF: u16 = 1 << 6;
pub const ES: u16 = 1 << 7;
pub const B: u16 = 1 << 15;
const TOP_MASK: u16 = 7 << 11;
const EXC_MASK: u16 = 0x3f;

/// Stack and status-word helpers on the register file.
impl Fpu {
    #[inline]
    pub fn top(&self) -> usize {
        usize::from((self.fsw >> 11) & 7)
    }

    #[inline]
    pub fn set_top(&mut self, top: usize) {
        self.fsw = (self.fsw & !TOP_MASK) | (((top & 7) as u16) << 11);
    }

    /// The physical register holding ST(i).
    #[inline]
    pub fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }

    #[inline]
    pub fn is_empty(&self, i: usize) -> bool {
        self.ftw & (1 << self.phys(i)) == 0
    }

    /// ST(i).
    #[inline]
    pub fn get(&self, i: usize) -> F80 {
        self.st[self.phys(i)]
    }

    /// Writes ST(i) and marks it valid.
    #[inline]
    pub fn set(&mut self, i: usize, v: F80) {
        let r = self.phys(i);
        self.st[r] = v;
        self.ftw |= 1 << r;
    }

    /// Decrements TOP and writes the new ST(0).
    #[inline]
    pub fn push(&mut self, v: F80) {
        let t = (self.top() + 7) & 7;
        self.set_top(t);
        self.st[t] = v;
        self.ftw |= 1 << t;
    }

    /// Marks ST(0) empty and increments TOP.
    #[inline]
    pub fn pop(&mut self) {
        let t = self.top();
        self.ftw &= !(1 << t);
        self.set_top(t + 1);
    }

    /// ES and B summarise the unmasked exception flags.
    #[inline]
    pub fn update_es(&mut self) {
        if self.fsw & !self.fcw & EXC_MASK != 0 {
            self.fsw |= ES | B;
        } else {
            self.fsw &= !(ES | B);
        }
    }

    /// Raises exception flags (and SF).
    #[inline]
    fn raise(&mut self, bits: u16) {
        self.fsw |= bits;
        self.update_es();
    }

    /// Records one operation's exceptions and C1 ("rounded up"); true when
    /// its result may be written.
    #[inline]
    fn apply(&mut self, env: &Env) -> bool {
        self.fsw = (self.fsw & !C1) | if env.c1 { C1 } else { 0 };
        self.raise(env.exc);
        !env.blocked()
    }

    /// Stack underflow (an empty operand): IE|SF with C1 = 0. True when IE
    /// is masked, i.e. the destination gets the indefinite.
    #[inline]
    fn underflow(&mut self) -> bool {
        self.fsw &= !C1;
        self.raise(IE | SF);
        self.fcw & IE != 0
    }

    /// Stack overflow (pushing onto a valid ST(7)): IE|SF with C1 = 1.
    /// True when masked: the push happens with the indefinite.
    #[inline]
    fn overflow(&mut self) -> bool {
        self.fsw |= C1;
        self.raise(IE | SF);
        self.fcw & IE != 0
    }

    /// Pushes `v`, or signals overflow when ST(7) is in use.
    #[inline]
    fn push_checked(&mut self, v: F80) {
        if !self.is_empty(7) {
            if self.overflow() {
                self.push(F80::INDEFINITE);
            }
            return;
        }
        self.fsw &= !C1;
        self.push(v);
    }

    /// The full 16-bit tag word (fnstenv/fnsave): 00 valid, 01 zero,
    /// 10 special, 11 empty, per physical register.
    pub fn full_tags(&self) -> u16 {
        let mut tw = 0u16;
        for r in 0..8 {
            let tag = if self.ftw & (1 << r) == 0 {
                3
            } else {
                match self.st[r].kind() {
                    Kind::Normal => 0,
                    Kind::Zero => 1,
                    _ => 2,
                }
            };
            tw |= tag << (2 * r);
        }
        tw
    }

    /// Sets the valid bits from a full tag word (11 = empty).
    pub fn set_full_tags(&mut self, tw: u16) {
        self.ftw = (0..8)
            .filter(|r| (tw >> (2 * r)) & 3 != 3)
            .fold(0, |t, r| t | (1 << r));
    }

    /// FNINIT.
    pub fn init(&mut self) {
        self.fcw = 0x037f;
        self.fsw = 0;
        self.ftw = 0;
        self.fop = 0;
        self.fip = 0;
        self.fdp = 0;
    }
}

/// The checks before a waiting x87 instruction: #NM when CR0.EM or
/// CR0.TS, #MF when an unmasked exception is pending and CR0.NE is set.
#[inline]
fn wait_check(cpu: &Cpu) -> Res {
    if cpu.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(Fault::nm());
    }
    if cpu.fpu.fsw & ES != 0 && cpu.cr0 & CR0_NE != 0 {
        return Err(Fault::mf());
    }
    Ok(())
}

/// The check before a non-waiting (fn*) instruction.
#[inline]
fn nowait_check(cpu: &Cpu) -> Res {
    if cpu.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

/// fwait: #NM only when both CR0.MP and CR0.TS are set.
fn fwait(cpu: &mut Cpu, _: &Insn) -> Res {
    if cpu.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
        return Err(Fault::nm());
    }
    if cpu.fpu.fsw & ES != 0 && cpu.cr0 & CR0_NE != 0 {
        return Err(Fault::mf());
    }
    Ok(())
}

/// Records FIP and FOP for a non-control instruction.
#[inline]
fn note(cpu: &mut Cpu, i: &Insn) {
    let ip = cpu.rip().wrapping_sub(u64::from(i.len)) & cpu.ip_mask;
    cpu.fpu.fip = if cpu.mode == Mode::Long {
        ip
    } else {
        (u64::from(cpu.seg[CS].sel) << 32) | (ip & 0xffff_ffff)
    };
    cpu.fpu.fop = fop_fast(i);
}

/// Per `Code`: the FOP of its register form (to which the ST(i) index is
/// added), or of its memory form with [`FOP_MEM`] set (ModRM mod and r/m
/// still to fill in).
fn fop_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        Code::values()
            .map(|code| {
                let oc = code.op_code();
                let op = oc.op_code();
                if !(0xd8..=0xdf).contains(&(op >> 8)) && !(0xd8..=0xdf).contains(&op) {
                    0
                } else if op > 0xff {
                    (((op >> 8) & 7) << 8 | (op & 0xff)) as u16
                } else {
                    FOP_MEM | (((op & 7) << 8) as u16) | ((oc.group_index().max(0) as u16) << 3)
                }
            })
            .collect()
    })
}

const FOP_MEM: u16 = 0x8000;

/// [`fop`] without scanning the instruction: a table lookup, plus the
/// register operand (one of r0/r1 is ST(0) = 0) or the memory ModRM.
#[inline]
fn fop_fast(i: &Insn) -> u16 {
    let e = fop_table()[usize::from(i.code)];
    if e & FOP_MEM != 0 {
        (e & 0x7ff) | u16::from(i.modrm)
    } else {
        e + u16::from(i.r0 | i.r1)
    }
}

/// Records FIP, FOP and FDP for an instruction with a memory operand.
#[inline]
fn note_mem(cpu: &mut Cpu, i: &Insn) {
    note(cpu, i);
    let off = cpu.ea(i);
    cpu.fpu.fdp = if cpu.mode == Mode::Long {
        off
    } else {
        (u64::from(cpu.seg[usize::from(i.seg)].sel) << 32) | (off & 0xffff_ffff)
    };
}

/// The 11-bit x87 opcode: the low three bits of the escape byte and the
/// ModRM byte, rebuilt from the decoded instruction (the reference that
/// [`fop_fast`] is tested against).
#[cfg(test)]
pub fn fop(ins: &Instruction) -> u16 {
    use iced_x86::OpKind;
    let oc = ins.op_code().op_code();
    if oc > 0xff {
        // Register form "Dx C0+i" or a fixed second byte: the ST operand
        // other than ST(0) (if any) is the +i.
        let sti = (0..ins.op_count())
            .filter(|&k| ins.op_kind(k) == OpKind::Register && ins.op_register(k).is_st())
            .map(|k| ins.op_register(k).number() as u32)
            .max()
            .unwrap_or(0);
        return (((oc >> 8) & 7) << 8 | ((oc & 0xff) + sti)) as u16;
    }
    let reg = ins.op_code().group_index().max(0) as u32;
    (((oc & 7) << 8) | u32::from(modrm_mem(ins)) | (reg << 3)) as u16
}

/// The mod and r/m fields of a memory operand's ModRM byte.
pub(crate) fn modrm_mem(ins: &Instruction) -> u8 {
    let base = ins.memory_base();
    let index = ins.memory_index();
    let dsize = ins.memory_displ_size();
    let md = |base_present: bool| -> u8 {
        match (base_present, dsize) {
            (false, _) | (true, 0) => 0,
            (true, 1) => 1,
            _ => 2,
        }
    };
    let sixteen = base.is_gpr16()
        || index.is_gpr16()
        || (base == Register::None && index == Register::None && dsize == 2);
    if sixteen {
        use Register::*;
        let rm = match (base, index) {
            (BX, SI) | (SI, BX) => 0,
            (BX, DI) | (DI, BX) => 1,
            (BP, SI) | (SI, BP) => 2,
            (BP, DI) | (DI, BP) => 3,
            (SI, None) | (None, SI) => 4,
            (DI, None) | (None, DI) => 5,
            (BP, None) | (None, BP) => 6,
            (BX, None) | (None, BX) => 7,
            _ => return 6, // [disp16]: mod 00, r/m 110
        };
        return (md(true) << 6) | rm;
    }
    if base == Register::RIP || base == Register::EIP {
        return 5;
    }
    if base == Register::None && index == Register::None {
        // [disp32]: r/m 101 outside 64-bit mode, a SIB without base in it.
        return if ins.code_size() == iced_x86::CodeSize::Code64 {
            4
        } else {
            5
        };
    }
    let sib = index != Register::None || base == Register::None || base.number() & 7 == 4;
    let rm = if sib { 4 } else { (base.number() & 7) as u8 };
    (md(base != Register::None) << 6) | rm
}

/// Fills `t` with every x87 instruction.
pub(crate) fn register(t: &mut Table) {
    ops::register(t);
    control::register(t);
    trans::register(t);
    t.add(iced_x86::Code::Wait, fwait);
}
