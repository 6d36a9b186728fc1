//! Multiplication and division: mul, imul (1/2/3 operands), div, idiv
//! (#DE on a zero divisor or quotient overflow).

use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{AF, CF, OF};
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

/// Flags after a multiply. Only CF and OF (the high half is significant)
/// are defined; SF, ZF, AF and PF are kept, as AMD (the host the
/// differential tester compares with) does.
#[inline(always)]
fn mul_flags(cpu: &mut Cpu, overflow: bool) {
    cpu.flags.set_cf(overflow);
    cpu.flags.set_of(overflow);
}

/// Flags after a divide, all undefined: AMD keeps CF and OF, clears SF,
/// ZF and PF and sets AF.
#[inline(always)]
fn div_flags(cpu: &mut Cpu) {
    let keep = cpu.flags.bits() & (CF | OF);
    cpu.flags.set_bits(keep | AF);
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
    mul_flags(cpu, hi != 0);
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
    mul_flags(cpu, !fits);
    Ok(())
}

fn imul_to<W: Width>(cpu: &mut Cpu, i: &Insn, a: u64, b: u64) {
    let p = i128::from(W::sext(a) as i64) * i128::from(W::sext(b) as i64);
    let lo = (p as u64) & W::MASK;
    let fits = i128::from(W::sext(lo) as i64) == p;
    W::set(&mut cpu.gpr, i.r0, lo);
    mul_flags(cpu, !fits);
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
    div_flags(cpu);
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
    div_flags(cpu);
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

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use crate::cpu::flags::{AF, CF, OF, OSZAPC, PF, SF, ZF};
    use crate::tests::guest::*;

    type Emit = fn(&mut CodeAssembler) -> Result<(), IcedError>;

    /// Runs one instruction in a long-mode guest with `v0`-`v2` in rax, rcx
    /// and rdx and the arithmetic flags `f`; returns (rax, rdx, flags).
    /// Runs on the interpreter alone: these tests pin its choice for
    /// flags the SDM leaves undefined ([`Guest::interpreted`]).
    fn guest_run(emit: Emit, v0: u64, v1: u64, v2: u64, f: u64) -> (u64, u64, u64) {
        let mut vm = Guest::interpreted();
        vm.asm(64, CODE, |a| {
            emit(a).unwrap();
            a.hlt().unwrap();
        });
        let mut st = vm.long_mode(CODE);
        (st.gpr[0], st.gpr[1], st.gpr[2]) = (v0, v1, v2);
        st.rflags = f | 2;
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        (o.state.gpr[0], o.state.gpr[2], o.state.rflags & OSZAPC)
    }

    #[test]
    fn multiplies_set_only_cf_and_of_like_amd() {
        // 0xb0 * 1 = 0xb0: no overflow; SF/ZF/PF/AF stay as they were.
        let (r, _, f) = guest_run(|a| a.mul(cl), 0xb0, 1, 0, OSZAPC);
        assert_eq!((r, f), (0xb0, SF | ZF | AF | PF));
        let (r, _, f) = guest_run(|a| a.imul_2(eax, ecx), 0x4000_0000, 4, 0, 0);
        assert_eq!((r, f), (0, CF | OF), "overflow, ZF not set from the result");
        let (_, d, f) = guest_run(|a| a.imul(rcx), 3, 5, 0, ZF);
        assert_eq!((d, f), (0, ZF));
    }

    #[test]
    fn divides_keep_cf_of_and_set_only_af_like_amd() {
        let (q, r, f) = guest_run(|a| a.div(ecx), 7, 2, 0, OSZAPC);
        assert_eq!((q, r, f), (3, 1, CF | OF | AF));
        let (q, r, f) = guest_run(|a| a.idiv(cx), 0xfff9, 2, 0xffff, ZF | SF | PF);
        assert_eq!((q, r, f), (0xfffd, 0xffff, AF));
    }
}
