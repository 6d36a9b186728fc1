//! Bit operations: bt/bts/btr/btc, bsf/bsr and popcnt.
//!
//! tzcnt and lzcnt are encoded as `F3 0F BC/BD`; a CPU without BMI1/LZCNT
//! ignores the `F3` and runs bsf/bsr, and our CPUID advertises neither, so
//! iced's `Tzcnt_*`/`Lzcnt_*` codes get the bsf/bsr handlers (a test pins
//! CPUID to that). popcnt is registered, which makes `cpuid.rs` advertise
//! it.
//!
//! Flags the manuals leave undefined follow the AMD EPYC this was measured
//! on: bt* change only CF; bsf/bsr set the logic flags of the index (ZF
//! from the source, so a zero source gives ZF=PF=1 and keeps the
//! destination, all 64 bits of it even for 32-bit operands).

use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::{PF, ZF};
use crate::cpu::width::{W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::{ImmSrc, MemSrc, RegSrc, Src};

/// What a bit-test instruction does to the selected bit.
trait BitOp {
    /// False for bt: the operand is only read.
    const WRITES: bool;
    fn apply(v: u64, mask: u64) -> u64;
}

struct Bt;
struct Bts;
struct Btr;
struct Btc;

impl BitOp for Bt {
    const WRITES: bool = false;
    #[inline(always)]
    fn apply(v: u64, _: u64) -> u64 {
        v
    }
}
impl BitOp for Bts {
    const WRITES: bool = true;
    #[inline(always)]
    fn apply(v: u64, mask: u64) -> u64 {
        v | mask
    }
}
impl BitOp for Btr {
    const WRITES: bool = true;
    #[inline(always)]
    fn apply(v: u64, mask: u64) -> u64 {
        v & !mask
    }
}
impl BitOp for Btc {
    const WRITES: bool = true;
    #[inline(always)]
    fn apply(v: u64, mask: u64) -> u64 {
        v ^ mask
    }
}

/// Register bit base: the offset (register or immediate) is taken modulo
/// the operand size.
fn bt_reg<O: BitOp, W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let bit = S::get::<W>(cpu, i)? & u64::from(W::BITS - 1);
    let v = W::get(&cpu.gpr, i.r0);
    if O::WRITES {
        W::set(&mut cpu.gpr, i.r0, O::apply(v, 1 << bit));
    }
    cpu.flags.set_cf((v >> bit) & 1 != 0);
    Ok(())
}

/// Where a memory bit string's bit lives: the offset of the `W`-sized unit
/// holding it and the bit's index in that unit.
///
/// An immediate offset is taken modulo the operand size. A register
/// offset is a signed index into the bit string that starts at bit 0 of
/// the operand, so it can reach `±2^(size-1)` bits away: the unit is
/// `ea + size/8 * (offset >> log2(size))`, wrapped to the address size.
#[inline(always)]
fn bit_string_addr<W: Width, const IMM: bool>(cpu: &Cpu, i: &Insn) -> (u64, u32) {
    let ea = cpu.ea(i);
    if IMM {
        return (ea, (i.imm as u32) & (W::BITS - 1));
    }
    let off = W::sext(W::get(&cpu.gpr, i.r1)) as i64;
    let units = off >> W::BITS.trailing_zeros();
    let unit = ea.wrapping_add((units as u64).wrapping_mul(W::BYTES as u64)) & i.amask;
    (unit, (off as u32) & (W::BITS - 1))
}

/// Memory bit base; `LOCK` makes the read-modify-write atomic with respect
/// to other vCPUs.
fn bt_mem<O: BitOp, W: Width, const IMM: bool, const LOCK: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (off, bit) = bit_string_addr::<W, IMM>(cpu, i);
    let seg = usize::from(i.seg);
    let mask = 1u64 << bit;
    let old = if !O::WRITES {
        let lin = cpu.lin_r(seg, off, W::BYTES)?;
        cpu.read_lin::<W>(lin)?
    } else if LOCK {
        let lin = cpu.lin_w(seg, off, W::BYTES)?;
        cpu.locked_rmw::<W>(lin, |v| O::apply(v, mask))?
    } else {
        let lin = cpu.lin_w(seg, off, W::BYTES)?;
        let v = cpu.read_lin::<W>(lin)?;
        cpu.write_lin::<W>(lin, O::apply(v, mask) & W::MASK)?;
        v
    };
    cpu.flags.set_cf(old & mask != 0);
    Ok(())
}

/// Flags after a bit scan that found bit `index` (AMD's choice for the
/// undefined ones: the logic flags of the index, ZF clear).
#[inline(always)]
fn scan_found(cpu: &mut Cpu, index: u64) {
    if index == 0 {
        cpu.flags.set_bits(PF);
    } else {
        cpu.flags.logic::<W64>(index);
    }
}

/// bsf (and tzcnt without BMI1): index of the lowest set bit; a zero
/// source sets ZF and leaves the destination alone.
fn bsf<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    if v == 0 {
        cpu.flags.set_bits(ZF | PF);
        return Ok(());
    }
    let index = u64::from(v.trailing_zeros());
    W::set(&mut cpu.gpr, i.r0, index);
    scan_found(cpu, index);
    Ok(())
}

/// bsr (and lzcnt without LZCNT): index of the highest set bit.
fn bsr<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    if v == 0 {
        cpu.flags.set_bits(ZF | PF);
        return Ok(());
    }
    let index = u64::from(63 - v.leading_zeros());
    W::set(&mut cpu.gpr, i.r0, index);
    scan_found(cpu, index);
    Ok(())
}

/// popcnt: all flags clear but ZF, which says the source was zero.
fn popcnt<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    W::set(&mut cpu.gpr, i.r0, u64::from(v.count_ones()));
    cpu.flags.set_bits(if v == 0 { ZF } else { 0 });
    Ok(())
}

/// The six forms (three sizes × register/immediate offset) of one bit-test
/// instruction.
macro_rules! bt_forms {
    ($t:expr, $name:literal, $op:ty) => {{
        macro_rules! one {
            ($suffix:literal, $w:ty, $src:ty, $imm:literal) => {
                if <$op as BitOp>::WRITES {
                    $t.rmw(
                        c(concat!($name, $suffix)),
                        bt_reg::<$op, $w, $src>,
                        bt_mem::<$op, $w, $imm, false>,
                        bt_mem::<$op, $w, $imm, true>,
                    );
                } else {
                    $t.rm(
                        c(concat!($name, $suffix)),
                        bt_reg::<$op, $w, $src>,
                        bt_mem::<$op, $w, $imm, false>,
                    );
                }
            };
        }
        one!("_rm16_r16", W16, RegSrc, false);
        one!("_rm32_r32", W32, RegSrc, false);
        one!("_rm64_r64", W64, RegSrc, false);
        one!("_rm16_imm8", W16, ImmSrc, true);
        one!("_rm32_imm8", W32, ImmSrc, true);
        one!("_rm64_imm8", W64, ImmSrc, true);
    }};
}

/// `name_r16_rm16`…`name_r64_rm64` with register and memory sources.
macro_rules! r_rm_forms {
    ($t:expr, $name:literal, $f:ident) => {{
        $t.rm(
            c(concat!($name, "_r16_rm16")),
            $f::<W16, RegSrc>,
            $f::<W16, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_r32_rm32")),
            $f::<W32, RegSrc>,
            $f::<W32, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_r64_rm64")),
            $f::<W64, RegSrc>,
            $f::<W64, MemSrc>,
        );
    }};
}

pub fn register(t: &mut Table) {
    bt_forms!(t, "Bt", Bt);
    bt_forms!(t, "Bts", Bts);
    bt_forms!(t, "Btr", Btr);
    bt_forms!(t, "Btc", Btc);
    r_rm_forms!(t, "Bsf", bsf);
    r_rm_forms!(t, "Bsr", bsr);
    // Without BMI1/LZCNT in CPUID, F3 0F BC/BD are bsf/bsr.
    r_rm_forms!(t, "Tzcnt", bsf);
    r_rm_forms!(t, "Lzcnt", bsr);
    r_rm_forms!(t, "Popcnt", popcnt);
}
