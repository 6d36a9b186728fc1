//! Multiplication and division: mul, imul (1/2/3 operands), div, idiv
//! (#DE on a zero divisor or quotient overflow).

use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::*;

/// The single r/m operand of mul/div forms (operand 0).
#[inline(always)]
fn rm0<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
    if S::IS_REG_OP0 {
        Ok(W::get(&cpu.gpr, i.r0))
    } else {
        S::get::<W>(cpu, i)
    }
}

/// Writes a double-width product/dividend pair: AX for bytes, else rDX:rAX.
fn set_pair<W: Width>(cpu: &mut Cpu, lo: u64, hi: u64) {
    if W::BITS == 8 {
        W16::set(&mut cpu.gpr, 0, (lo & 0xff) | (hi & 0xff) << 8);
    } else {
        W::set(&mut cpu.gpr, 0, lo);
        W::set(&mut cpu.gpr, 2, hi);
    }
}

fn get_pair<W: Width>(cpu: &Cpu) -> u128 {
    if W::BITS == 8 {
        u128::from(W16::get(&cpu.gpr, 0))
    } else {
        u128::from(W::get(&cpu.gpr, 0)) | u128::from(W::get(&cpu.gpr, 2)) << W::BITS
    }
}

fn mul<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let b = rm0::<W, S>(cpu, i)?;
    let a = W::get(&cpu.gpr, 0);
    let p = u128::from(a) * u128::from(b);
    let lo = (p as u64) & W::MASK;
    let hi = (p >> W::BITS) as u64 & W::MASK;
    set_pair::<W>(cpu, lo, hi);
    cpu.flags.set_result_cf_of::<W>(lo, hi != 0, hi != 0);
    Ok(())
}

fn imul1<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let b = W::sext(rm0::<W, S>(cpu, i)?) as i64;
    let a = W::sext(W::get(&cpu.gpr, 0)) as i64;
    let p = i128::from(a) * i128::from(b);
    let lo = (p as u64) & W::MASK;
    let hi = ((p >> W::BITS) as u64) & W::MASK;
    let fits = i128::from(W::sext(lo) as i64) == p;
    set_pair::<W>(cpu, lo, hi);
    cpu.flags.set_result_cf_of::<W>(lo, !fits, !fits);
    Ok(())
}

fn imul_to<W: Width>(cpu: &mut Cpu, i: &Insn, a: u64, b: u64) {
    let p = i128::from(W::sext(a) as i64) * i128::from(W::sext(b) as i64);
    let lo = (p as u64) & W::MASK;
    let fits = i128::from(W::sext(lo) as i64) == p;
    W::set(&mut cpu.gpr, i.r0, lo);
    cpu.flags.set_result_cf_of::<W>(lo, !fits, !fits);
}

/// imul r, r/m
fn imul2<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let b = S::get::<W>(cpu, i)?;
    let a = W::get(&cpu.gpr, i.r0);
    imul_to::<W>(cpu, i, a, b);
    Ok(())
}

/// imul r, r/m, imm
fn imul3<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = S::get::<W>(cpu, i)?;
    imul_to::<W>(cpu, i, a, i.imm & W::MASK);
    Ok(())
}

fn div<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let d = u128::from(rm0::<W, S>(cpu, i)?);
    if d == 0 {
        return Err(Fault::de());
    }
    let n = get_pair::<W>(cpu);
    let q = n / d;
    if q > u128::from(W::MASK) {
        return Err(Fault::de());
    }
    set_pair::<W>(cpu, q as u64, (n % d) as u64);
    Ok(())
}

fn idiv<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let d = i128::from(W::sext(rm0::<W, S>(cpu, i)?) as i64);
    if d == 0 {
        return Err(Fault::de());
    }
    let raw = get_pair::<W>(cpu);
    // Sign-extend the 2N-bit dividend.
    let shift = 128 - 2 * W::BITS;
    let n = ((raw << shift) as i128) >> shift;
    let (q, r) = match (n.checked_div(d), n.checked_rem(d)) {
        (Some(q), Some(r)) => (q, r),
        _ => return Err(Fault::de()),
    };
    let min = -(1i128 << (W::BITS - 1));
    let max = (1i128 << (W::BITS - 1)) - 1;
    if q < min || q > max {
        return Err(Fault::de());
    }
    set_pair::<W>(cpu, (q as u64) & W::MASK, (r as u64) & W::MASK);
    Ok(())
}

macro_rules! one_op {
    ($t:expr, $name:literal, $f:ident) => {{
        $t.rm(
            c(concat!($name, "_rm8")),
            $f::<W8, RegSrc>,
            $f::<W8, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_rm16")),
            $f::<W16, RegSrc>,
            $f::<W16, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_rm32")),
            $f::<W32, RegSrc>,
            $f::<W32, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_rm64")),
            $f::<W64, RegSrc>,
            $f::<W64, MemSrc>,
        );
    }};
}

pub fn register(t: &mut Table) {
    one_op!(t, "Mul", mul);
    one_op!(t, "Imul", imul1);
    one_op!(t, "Div", div);
    one_op!(t, "Idiv", idiv);
    t.rm(
        c("Imul_r16_rm16"),
        imul2::<W16, RegSrc>,
        imul2::<W16, MemSrc>,
    );
    t.rm(
        c("Imul_r32_rm32"),
        imul2::<W32, RegSrc>,
        imul2::<W32, MemSrc>,
    );
    t.rm(
        c("Imul_r64_rm64"),
        imul2::<W64, RegSrc>,
        imul2::<W64, MemSrc>,
    );
    for (name, w) in [
        ("Imul_r16_rm16_imm16", 16),
        ("Imul_r16_rm16_imm8", 16),
        ("Imul_r32_rm32_imm32", 32),
        ("Imul_r32_rm32_imm8", 32),
        ("Imul_r64_rm64_imm32", 64),
        ("Imul_r64_rm64_imm8", 64),
    ] {
        match w {
            16 => t.rm(c(name), imul3::<W16, RegSrc>, imul3::<W16, MemSrc>),
            32 => t.rm(c(name), imul3::<W32, RegSrc>, imul3::<W32, MemSrc>),
            _ => t.rm(c(name), imul3::<W64, RegSrc>, imul3::<W64, MemSrc>),
        }
    }
}
