//! Operand forms shared by the families: where operand 0 (destination)
//! and operand 1 (source) live, as zero-sized types so each handler is
//! monomorphised per form and no form is decided at run time.

use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::Flags;
use crate::cpu::width::Width;
use crate::decode::Insn;

/// Where a source operand (operand 1) comes from.
pub trait Src {
    /// The operand is a register named by `r0` (single-operand forms such
    /// as `jmp r/m` or `push r/m`), not `r1`.
    const IS_REG_OP0: bool = false;
    fn get<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64>;
}

/// Operand 1 is register `r1`.
pub struct RegSrc;
/// Operand 1 is the memory operand.
pub struct MemSrc;
/// Operand 1 is the immediate.
pub struct ImmSrc;

impl Src for RegSrc {
    const IS_REG_OP0: bool = true;
    #[inline(always)]
    fn get<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
        Ok(W::get(&cpu.gpr, i.r1))
    }
}
impl Src for MemSrc {
    #[inline(always)]
    fn get<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
        cpu.read_mem::<W>(i)
    }
}
impl Src for ImmSrc {
    #[inline(always)]
    fn get<W: Width>(_: &mut Cpu, i: &Insn) -> Res<u64> {
        Ok(i.imm & W::MASK)
    }
}

/// Where the destination (operand 0) lives.
pub trait Dst {
    /// The destination is a register (same-register forms need care).
    const IS_REG: bool = false;
    fn read<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64>;
    fn write<W: Width>(cpu: &mut Cpu, i: &Insn, v: u64) -> Res;
    /// Read-modify-write: stores `f(old)`, returns `old`. `f` may run more
    /// than once (locked retries) and must be pure.
    fn rmw<W: Width>(cpu: &mut Cpu, i: &Insn, f: impl FnMut(u64) -> u64) -> Res<u64>;
}

/// Operand 0 is register `r0`.
pub struct RegDst;
/// Operand 0 is memory.
pub struct MemDst;
/// Operand 0 is memory under a `lock` prefix: atomic.
pub struct LockDst;

impl Dst for RegDst {
    const IS_REG: bool = true;
    #[inline(always)]
    fn read<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
        Ok(W::get(&cpu.gpr, i.r0))
    }
    #[inline(always)]
    fn write<W: Width>(cpu: &mut Cpu, i: &Insn, v: u64) -> Res {
        W::set(&mut cpu.gpr, i.r0, v);
        Ok(())
    }
    #[inline(always)]
    fn rmw<W: Width>(cpu: &mut Cpu, i: &Insn, mut f: impl FnMut(u64) -> u64) -> Res<u64> {
        let old = W::get(&cpu.gpr, i.r0);
        W::set(&mut cpu.gpr, i.r0, f(old));
        Ok(old)
    }
}

impl Dst for MemDst {
    #[inline(always)]
    fn read<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
        cpu.read_mem::<W>(i)
    }
    #[inline(always)]
    fn write<W: Width>(cpu: &mut Cpu, i: &Insn, v: u64) -> Res {
        cpu.write_mem::<W>(i, v)
    }
    #[inline(always)]
    fn rmw<W: Width>(cpu: &mut Cpu, i: &Insn, f: impl FnMut(u64) -> u64) -> Res<u64> {
        let seg = usize::from(i.seg);
        let lin = cpu.lin_w(seg, cpu.ea(i), W::BYTES)?;
        cpu.rmw_lin_seg::<W>(seg, lin, f)
    }
}

impl Dst for LockDst {
    #[inline(always)]
    fn read<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
        cpu.read_mem::<W>(i)
    }
    #[inline(always)]
    fn write<W: Width>(cpu: &mut Cpu, i: &Insn, v: u64) -> Res {
        cpu.write_mem::<W>(i, v)
    }
    #[inline(always)]
    fn rmw<W: Width>(cpu: &mut Cpu, i: &Insn, f: impl FnMut(u64) -> u64) -> Res<u64> {
        let seg = usize::from(i.seg);
        let lin = cpu.lin_w(seg, cpu.ea(i), W::BYTES)?;
        crate::mem::access::via_seg(seg, cpu.locked_rmw::<W>(lin, f))
    }
}

/// A two-operand ALU operation (add, sub, and, …).
pub trait AluOp {
    /// False for cmp/test: the destination is only read.
    const WRITES: bool = true;
    /// Whether the carry flag is an input (adc, sbb).
    const CARRY_IN: bool = false;
    fn apply<W: Width>(a: u64, b: u64, cf: bool) -> u64;
    fn flags<W: Width>(f: &mut Flags, a: u64, b: u64, r: u64);
}

/// `op dst, src` for any ALU op, width and form.
#[inline(always)]
pub fn alu<O: AluOp, W: Width, D: Dst, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let b = S::get::<W>(cpu, i)?;
    let cf = O::CARRY_IN && cpu.flags.cf();
    let a = if O::WRITES {
        D::rmw::<W>(cpu, i, |a| O::apply::<W>(a, b, cf))?
    } else {
        D::read::<W>(cpu, i)?
    };
    let r = O::apply::<W>(a, b, cf) & W::MASK;
    O::flags::<W>(&mut cpu.flags, a, b, r);
    Ok(())
}

/// Registers the eight classic ALU forms of `$name` (`Add`, `Or`, …).
#[macro_export]
macro_rules! alu_forms {
    ($t:expr, $name:literal, $op:ty) => {{
        use $crate::cpu::width::{W8, W16, W32, W64};
        use $crate::isa::c;
        use $crate::isa::ops::*;
        let t: &mut $crate::decode::Table = $t;
        macro_rules! rm_r {
            ($suffix:literal, $w:ty) => {
                t.rmw(
                    c(concat!($name, $suffix)),
                    alu::<$op, $w, RegDst, RegSrc>,
                    alu::<$op, $w, MemDst, RegSrc>,
                    alu::<$op, $w, LockDst, RegSrc>,
                )
            };
        }
        macro_rules! r_rm {
            ($suffix:literal, $w:ty) => {
                t.rm(
                    c(concat!($name, $suffix)),
                    alu::<$op, $w, RegDst, RegSrc>,
                    alu::<$op, $w, RegDst, MemSrc>,
                )
            };
        }
        macro_rules! rm_i {
            ($suffix:literal, $w:ty) => {
                t.rmw(
                    c(concat!($name, $suffix)),
                    alu::<$op, $w, RegDst, ImmSrc>,
                    alu::<$op, $w, MemDst, ImmSrc>,
                    alu::<$op, $w, LockDst, ImmSrc>,
                )
            };
        }
        rm_r!("_rm8_r8", W8);
        rm_r!("_rm16_r16", W16);
        rm_r!("_rm32_r32", W32);
        rm_r!("_rm64_r64", W64);
        r_rm!("_r8_rm8", W8);
        r_rm!("_r16_rm16", W16);
        r_rm!("_r32_rm32", W32);
        r_rm!("_r64_rm64", W64);
        t.add(
            c(concat!($name, "_AL_imm8")),
            alu::<$op, W8, RegDst, ImmSrc>,
        );
        t.add(
            c(concat!($name, "_AX_imm16")),
            alu::<$op, W16, RegDst, ImmSrc>,
        );
        t.add(
            c(concat!($name, "_EAX_imm32")),
            alu::<$op, W32, RegDst, ImmSrc>,
        );
        t.add(
            c(concat!($name, "_RAX_imm32")),
            alu::<$op, W64, RegDst, ImmSrc>,
        );
        rm_i!("_rm8_imm8", W8);
        rm_i!("_rm8_imm8_82", W8);
        rm_i!("_rm16_imm16", W16);
        rm_i!("_rm32_imm32", W32);
        rm_i!("_rm64_imm32", W64);
        rm_i!("_rm16_imm8", W16);
        rm_i!("_rm32_imm8", W32);
        rm_i!("_rm64_imm8", W64);
    }};
}

/// Registers a one-operand form family (`$name` + `_rm8`…`_rm64`) with
/// register, memory and locked variants of `$f::<W, D>`.
#[macro_export]
macro_rules! unary_forms {
    ($t:expr, $name:literal, $f:ident) => {{
        use $crate::cpu::width::{W8, W16, W32, W64};
        use $crate::isa::c;
        use $crate::isa::ops::*;
        let t: &mut $crate::decode::Table = $t;
        t.rmw(
            c(concat!($name, "_rm8")),
            $f::<W8, RegDst>,
            $f::<W8, MemDst>,
            $f::<W8, LockDst>,
        );
        t.rmw(
            c(concat!($name, "_rm16")),
            $f::<W16, RegDst>,
            $f::<W16, MemDst>,
            $f::<W16, LockDst>,
        );
        t.rmw(
            c(concat!($name, "_rm32")),
            $f::<W32, RegDst>,
            $f::<W32, MemDst>,
            $f::<W32, LockDst>,
        );
        t.rmw(
            c(concat!($name, "_rm64")),
            $f::<W64, RegDst>,
            $f::<W64, MemDst>,
            $f::<W64, LockDst>,
        );
    }};
}
