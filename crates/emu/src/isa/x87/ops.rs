//! Data movement, arithmetic, comparisons and stack manipulation.
//!
//! Every handler reads its memory operand first and writes memory last,
//! so a #PF/#GP leaves the FPU untouched (precise faults).

use crate::mem::access::via_seg;
use iced_x86::Code;

use super::float80::{self, Cmp, Env, IE, Kind, OE, Rc, UE};
use super::{C0, C1, C2, C3, note, note_mem, wait_check};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::{CF, PF, ZF};
use crate::cpu::fpu::F80;
use crate::cpu::width::{W16, W32, W64};
use crate::decode::{Insn, Table};

/// Memory operand formats.
const M32: u8 = 0;
const M64: u8 = 1;
const M80: u8 = 2;
const I16: u8 = 3;
const I32: u8 = 4;
const I64: u8 = 5;
const BCD: u8 = 6;

/// The ModRM /digit of the D8/DC group, used as the operation code.
const ADD: u8 = 0;
const MUL: u8 = 1;
const SUB: u8 = 4;
const SUBR: u8 = 5;
const DIV: u8 = 6;
const DIVR: u8 = 7;

fn read10(cpu: &mut Cpu, i: &Insn) -> Res<[u8; 10]> {
    let mut b = [0u8; 10];
    let off = cpu.ea(i);
    cpu.read_bytes(usize::from(i.seg), off, &mut b)?;
    Ok(b)
}

fn f80_of(b: &[u8; 10]) -> F80 {
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[..8]);
    F80 {
        signif: u64::from_le_bytes(s),
        sign_exp: u16::from_le_bytes([b[8], b[9]]),
    }
}

fn bytes_of(x: F80) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&x.signif.to_le_bytes());
    b[8..].copy_from_slice(&x.sign_exp.to_le_bytes());
    b
}

/// Reads a memory operand of format `K` as an extended value. A binary
/// denormal or SNaN is only noted in `env` (the operation decides).
#[inline]
fn load<const K: u8>(cpu: &mut Cpu, i: &Insn, env: &mut Env) -> Res<F80> {
    Ok(match K {
        M32 => float80::from_f32(env, cpu.read_mem::<W32>(i)? as u32),
        M64 => float80::from_f64(env, cpu.read_mem::<W64>(i)?),
        I16 => float80::from_i64(i64::from(cpu.read_mem::<W16>(i)? as i16)),
        I32 => float80::from_i64(i64::from(cpu.read_mem::<W32>(i)? as i32)),
        I64 => float80::from_i64(cpu.read_mem::<W64>(i)? as i64),
        M80 => f80_of(&read10(cpu, i)?),
        _ => float80::from_bcd(&read10(cpu, i)?),
    })
}

/// A value converted for a store of format `K`.
#[derive(Clone, Copy)]
enum Stored {
    Int(u64),
    Ten([u8; 10]),
}

#[inline]
fn convert<const K: u8>(env: &mut Env, x: F80, truncate: bool) -> Stored {
    match K {
        M32 => Stored::Int(u64::from(float80::to_f32(env, x))),
        M64 => Stored::Int(float80::to_f64(env, x)),
        I16 => Stored::Int(float80::to_int(env, x, 16, truncate)),
        I32 => Stored::Int(float80::to_int(env, x, 32, truncate)),
        I64 => Stored::Int(float80::to_int(env, x, 64, truncate)),
        M80 => Stored::Ten(bytes_of(x)),
        _ => Stored::Ten(float80::to_bcd(env, x)),
    }
}

/// What a masked invalid operation stores in format `K`.
fn indefinite<const K: u8>() -> Stored {
    match K {
        M32 => Stored::Int(0xffc0_0000),
        M64 => Stored::Int(0xfff8_0000_0000_0000),
        I16 => Stored::Int(0x8000),
        I32 => Stored::Int(0x8000_0000),
        I64 => Stored::Int(1 << 63),
        M80 => Stored::Ten(bytes_of(F80::INDEFINITE)),
        _ => Stored::Ten(float80::BCD_INDEFINITE),
    }
}

#[inline]
fn store<const K: u8>(cpu: &mut Cpu, i: &Insn, v: Stored) -> Res {
    match v {
        Stored::Int(v) => match K {
            I16 => cpu.write_mem::<W16>(i, v),
            M32 | I32 => cpu.write_mem::<W32>(i, v),
            _ => cpu.write_mem::<W64>(i, v),
        },
        Stored::Ten(b) => {
            let off = cpu.ea(i);
            cpu.write_bytes(usize::from(i.seg), off, &b)
        }
    }
}

#[inline]
fn binop(op: u8, env: &mut Env, a: F80, b: F80) -> F80 {
    match op {
        ADD => float80::add(env, a, b),
        MUL => float80::mul(env, a, b),
        SUB => float80::sub(env, a, b),
        SUBR => float80::sub(env, b, a),
        DIV => float80::div(env, a, b),
        _ => float80::div(env, b, a),
    }
}

/// ST(r0) = ST(r0) op ST(r1), then pop for the -p forms.
fn arith_st<const OP: u8, const POP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let (d, s) = (usize::from(i.r0), usize::from(i.r1));
    let f = &mut cpu.fpu;
    if f.is_empty(d) || f.is_empty(s) {
        if f.underflow() {
            f.set(d, F80::INDEFINITE);
            if POP {
                f.pop();
            }
        }
        return Ok(());
    }
    let mut env = Env::new(f.fcw);
    let r = binop(OP, &mut env, f.get(d), f.get(s));
    if f.apply(&env) {
        f.set(d, r);
        if POP {
            f.pop();
        }
    }
    Ok(())
}

/// ST(0) = ST(0) op m.
fn arith_mem<const OP: u8, const K: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    let mut env = Env::new(cpu.fpu.fcw);
    let b = load::<K>(cpu, i, &mut env)?;
    note_mem(cpu, i);
    let f = &mut cpu.fpu;
    if f.is_empty(0) {
        if f.underflow() {
            f.set(0, F80::INDEFINITE);
        }
        return Ok(());
    }
    let r = binop(OP, &mut env, f.get(0), b);
    if f.apply(&env) {
        f.set(0, r);
    }
    Ok(())
}

fn cc_of(c: Cmp) -> u16 {
    match c {
        Cmp::Greater => 0,
        Cmp::Less => C0,
        Cmp::Equal => C3,
        Cmp::Unordered => C3 | C2 | C0,
    }
}

/// Sets C0..C3 (C1 cleared) to `cc`.
fn set_cc(cpu: &mut Cpu, cc: u16) {
    cpu.fpu.fsw = (cpu.fpu.fsw & !(C0 | C1 | C2 | C3)) | cc;
}

/// Compares ST(0) with `b` (None: an empty register), sets C0/C2/C3 and
/// pops `pops` times unless the exception is unmasked.
fn compare_into_cc(cpu: &mut Cpu, b: Option<F80>, quiet: bool, pops: u8) {
    let a = if cpu.fpu.is_empty(0) {
        None
    } else {
        Some(cpu.fpu.get(0))
    };
    let (Some(a), Some(b)) = (a, b) else {
        set_cc(cpu, C3 | C2 | C0);
        if cpu.fpu.underflow() {
            for _ in 0..pops {
                cpu.fpu.pop();
            }
        }
        return;
    };
    let mut env = Env::new(cpu.fpu.fcw);
    let c = float80::compare(&mut env, a, b, quiet);
    set_cc(cpu, cc_of(c));
    cpu.fpu.raise(env.exc);
    if !env.blocked() {
        for _ in 0..pops {
            cpu.fpu.pop();
        }
    }
}

/// fcom/fcomp/fucom/fucomp st(i).
fn fcom_st<const POPS: u8, const QUIET: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let k = usize::from(i.r1);
    let b = if cpu.fpu.is_empty(k) {
        None
    } else {
        Some(cpu.fpu.get(k))
    };
    compare_into_cc(cpu, b, QUIET, POPS);
    Ok(())
}

/// fcompp/fucompp: ST(0) with ST(1), pop twice.
fn fcompp<const QUIET: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let b = if cpu.fpu.is_empty(1) {
        None
    } else {
        Some(cpu.fpu.get(1))
    };
    compare_into_cc(cpu, b, QUIET, 2);
    Ok(())
}

/// fcom/fcomp/ficom/ficomp m.
fn fcom_mem<const K: u8, const POP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    let mut env = Env::new(cpu.fpu.fcw);
    let b = load::<K>(cpu, i, &mut env)?;
    note_mem(cpu, i);
    if cpu.fpu.is_empty(0) {
        compare_into_cc(cpu, None, false, u8::from(POP));
        return Ok(());
    }
    let c = float80::compare(&mut env, cpu.fpu.get(0), b, false);
    set_cc(cpu, cc_of(c));
    cpu.fpu.raise(env.exc);
    if POP && !env.blocked() {
        cpu.fpu.pop();
    }
    Ok(())
}

/// ftst: ST(0) against +0.
fn ftst(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    compare_into_cc(cpu, Some(F80::ZERO), false, 0);
    Ok(())
}

/// fcomi/fcomip/fucomi/fucomip: the result in ZF/PF/CF (OF, SF, AF
/// cleared).
fn fcomi<const POP: bool, const QUIET: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let k = usize::from(i.r1);
    let f = &mut cpu.fpu;
    // C1 is left alone unless the stack faults; the flags report the
    // comparison even when an exception is unmasked (as the host does).
    if f.is_empty(0) || f.is_empty(k) {
        cpu.flags.set_bits(ZF | PF | CF);
        if f.underflow() && POP {
            cpu.fpu.pop();
        }
        return Ok(());
    }
    let mut env = Env::new(f.fcw);
    let c = float80::compare(&mut env, f.get(0), f.get(k), QUIET);
    f.raise(env.exc);
    let blocked = env.blocked();
    cpu.flags.set_bits(match c {
        Cmp::Greater => 0,
        Cmp::Less => CF,
        Cmp::Equal => ZF,
        Cmp::Unordered => ZF | PF | CF,
    });
    if POP && !blocked {
        cpu.fpu.pop();
    }
    Ok(())
}

/// fxam: the class of ST(0) in C3/C2/C0, its sign in C1.
fn fxam(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &cpu.fpu;
    let x = f.get(0);
    let class = if f.is_empty(0) {
        C3 | C0
    } else {
        match x.kind() {
            Kind::Unsupported => 0,
            Kind::QNan | Kind::SNan => C0,
            Kind::Normal => C2,
            Kind::Inf => C2 | C0,
            Kind::Zero => C3,
            Kind::Denormal => C3 | C2,
        }
    };
    let sign = if x.sign() { C1 } else { 0 };
    set_cc(cpu, class | sign);
    Ok(())
}

/// fld m32/m64/m80, fild, fbld.
fn fld_mem<const K: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    let mut env = Env::new(cpu.fpu.fcw);
    let v = load::<K>(cpu, i, &mut env)?;
    note_mem(cpu, i);
    let f = &mut cpu.fpu;
    if !f.is_empty(7) {
        if f.overflow() {
            f.push(F80::INDEFINITE);
        }
        return Ok(());
    }
    // Only binary formats can raise (DE, or IE for an SNaN); the value is
    // loaded even when DE is unmasked.
    let v = if K == M32 || K == M64 {
        float80::load(&mut env, v)
    } else {
        v
    };
    f.apply(&env);
    if env.unmasked() & IE == 0 {
        f.push(v);
    }
    Ok(())
}

/// fld st(i).
fn fld_st(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let k = usize::from(i.r0);
    let f = &mut cpu.fpu;
    // An empty source is reported before a full stack.
    if f.is_empty(k) {
        if f.underflow() {
            f.push(F80::INDEFINITE);
        }
        return Ok(());
    }
    let v = f.get(k);
    f.push_checked(v);
    Ok(())
}

/// The load-constant instructions: 1, log2(10), log2(e), pi, log10(2),
/// ln(2), 0. The irrational ones are rounded from the next significand
/// bit by RC (they never raise PE).
const CONSTS: [(u16, u64, Option<bool>); 7] = [
    (0x3fff, 1 << 63, None),
    (0x4000, 0xd49a_784b_cd1b_8afe, Some(false)),
    (0x3fff, 0xb8aa_3b29_5c17_f0bb, Some(true)),
    (0x4000, 0xc90f_daa2_2168_c234, Some(true)),
    (0x3ffd, 0x9a20_9a84_fbcf_f798, Some(true)),
    (0x3ffe, 0xb172_17f7_d1cf_79ab, Some(true)),
    (0, 0, None),
];

fn fld_const<const N: usize>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let (exp, sig, round_bit) = CONSTS[N];
    let up = match (round_bit, Env::new(cpu.fpu.fcw).rc()) {
        (None, _) | (Some(_), Rc::Down | Rc::Zero) => false,
        (Some(half_or_more), Rc::Nearest) => half_or_more,
        (Some(_), Rc::Up) => true,
    };
    let v = F80 {
        signif: sig + u64::from(up),
        sign_exp: exp,
    };
    cpu.fpu.push_checked(v);
    Ok(())
}

/// Checks that the destination of a suppressed store is writable: the
/// hardware faults on it (#GP/#SS/#PF) even when it stores nothing.
fn probe<const K: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let n = match K {
        I16 => 2,
        M32 | I32 => 4,
        M64 | I64 => 8,
        _ => 10,
    };
    let off = cpu.ea(i);
    let seg = usize::from(i.seg);
    let lin = cpu.lin_w(seg, off, n)?;
    via_seg(seg, cpu.probe_write(lin, n))
}

/// fst/fstp m32/m64/m80, fist/fistp/fisttp, fbstp.
fn fst_mem<const K: u8, const POP: bool, const TRUNC: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    if cpu.fpu.is_empty(0) {
        if cpu.fpu.fcw & IE != 0 {
            store::<K>(cpu, i, indefinite::<K>())?;
        } else {
            probe::<K>(cpu, i)?;
        }
        note_mem(cpu, i);
        if cpu.fpu.underflow() && POP {
            cpu.fpu.pop();
        }
        return Ok(());
    }
    let mut env = Env::new(cpu.fpu.fcw);
    let v = convert::<K>(&mut env, cpu.fpu.get(0), TRUNC);
    // Unmasked invalid/overflow/underflow: memory and stack are left alone.
    let write = env.unmasked() & (IE | OE | UE) == 0;
    if write {
        store::<K>(cpu, i, v)?;
    } else {
        probe::<K>(cpu, i)?;
    }
    note_mem(cpu, i);
    cpu.fpu.apply(&env);
    if write && POP {
        cpu.fpu.pop();
    }
    Ok(())
}

/// fst/fstp st(i).
fn fst_st<const POP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let k = usize::from(i.r0);
    let f = &mut cpu.fpu;
    if f.is_empty(0) {
        if f.underflow() {
            f.set(k, F80::INDEFINITE);
            if POP {
                f.pop();
            }
        }
        return Ok(());
    }
    f.fsw &= !C1;
    let v = f.get(0);
    f.set(k, v);
    if POP {
        f.pop();
    }
    Ok(())
}

fn fxch(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let k = usize::from(i.r1);
    let f = &mut cpu.fpu;
    let (e0, ek) = (f.is_empty(0), f.is_empty(k));
    if (e0 || ek) && !f.underflow() {
        return Ok(());
    }
    if !(e0 || ek) {
        f.fsw &= !C1;
    }
    let a = if e0 { F80::INDEFINITE } else { f.get(0) };
    let b = if ek { F80::INDEFINITE } else { f.get(k) };
    f.set(0, b);
    f.set(k, a);
    Ok(())
}

/// fchs/fabs: sign operations, no exceptions beyond stack underflow.
fn fsign<const ABS: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &mut cpu.fpu;
    if f.is_empty(0) {
        if f.underflow() {
            f.set(0, F80::INDEFINITE);
        }
        return Ok(());
    }
    f.fsw &= !C1;
    let x = f.get(0);
    f.set(0, if ABS { x.abs() } else { x.negated() });
    Ok(())
}

/// An operation on ST(0) (and ST(1) when `two`): `op` returns the new
/// ST(0). Empty operands give the masked underflow response.
fn unary(cpu: &mut Cpu, i: &Insn, two: bool, op: fn(&mut Env, F80, F80) -> F80) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &mut cpu.fpu;
    if f.is_empty(0) || (two && f.is_empty(1)) {
        if f.underflow() {
            f.set(0, F80::INDEFINITE);
        }
        return Ok(());
    }
    let mut env = Env::new(f.fcw);
    let r = op(&mut env, f.get(0), f.get(1));
    if f.apply(&env) {
        f.set(0, r);
    }
    Ok(())
}

fn fsqrt(cpu: &mut Cpu, i: &Insn) -> Res {
    unary(cpu, i, false, |e, a, _| float80::sqrt(e, a))
}

fn frndint(cpu: &mut Cpu, i: &Insn) -> Res {
    unary(cpu, i, false, |e, a, _| float80::round_to_int(e, a))
}

fn fscale(cpu: &mut Cpu, i: &Insn) -> Res {
    unary(cpu, i, true, float80::scale)
}

/// fxtract: ST(0) becomes the exponent, the significand is pushed.
fn fxtract(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &mut cpu.fpu;
    if f.is_empty(0) || !f.is_empty(7) {
        let masked = if f.is_empty(0) {
            f.underflow()
        } else {
            f.overflow()
        };
        if masked {
            f.set(0, F80::INDEFINITE);
            f.push(F80::INDEFINITE);
        }
        return Ok(());
    }
    let mut env = Env::new(f.fcw);
    let (e, m) = float80::extract(&mut env, f.get(0));
    if f.apply(&env) {
        f.set(0, e);
        f.push(m);
    }
    Ok(())
}

/// fprem/fprem1: C2 set while the reduction is partial; when complete,
/// the quotient's low bits go to C0 (Q2), C3 (Q1), C1 (Q0).
fn fprem<const IEEE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &mut cpu.fpu;
    // C2 ends clear unless a partial remainder completes.
    f.fsw &= !C2;
    if f.is_empty(0) || f.is_empty(1) {
        if f.underflow() {
            f.set(0, F80::INDEFINITE);
        }
        return Ok(());
    }
    let (a, b) = (f.get(0), f.get(1));
    let mut env = Env::new(f.fcw);
    let (r, q, done) = float80::rem(&mut env, a, b, IEEE);
    // NaN and invalid operands clear C2 and leave C0 and C3 alone.
    let special = a.is_nan()
        || b.is_nan()
        || matches!(a.kind(), Kind::Unsupported | Kind::Inf)
        || matches!(b.kind(), Kind::Unsupported | Kind::Zero);
    if !f.apply(&env) {
        return Ok(());
    }
    if special {
        f.set(0, r);
        return Ok(());
    }
    f.set(0, r);
    let cc = if done {
        (if q & 4 != 0 { C0 } else { 0 })
            | (if q & 2 != 0 { C3 } else { 0 })
            | (if q & 1 != 0 { C1 } else { 0 })
    } else {
        C2
    };
    f.fsw = (f.fsw & !(C0 | C1 | C2 | C3)) | cc;
    Ok(())
}

/// fincstp/fdecstp: rotate TOP, tags untouched.
fn fstp_rotate<const UP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &mut cpu.fpu;
    f.fsw &= !C1;
    let t = f.top();
    f.set_top(if UP { t + 1 } else { t + 7 });
    Ok(())
}

/// ffree/ffreep st(i).
fn ffree<const POP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let f = &mut cpu.fpu;
    let r = f.phys(usize::from(i.r0));
    f.ftw &= !(1 << r);
    f.fsw &= !C1;
    if POP {
        f.pop();
    }
    Ok(())
}

fn fnop(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    Ok(())
}

/// fcmovcc st(0), st(i) on the integer condition `CC` (jcc numbering).
fn fcmov<const CC: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let k = usize::from(i.r1);
    let cond = cpu.flags.cond(CC);
    let f = &mut cpu.fpu;
    if f.is_empty(0) || f.is_empty(k) {
        if f.underflow() {
            f.set(0, F80::INDEFINITE);
        }
        return Ok(());
    }
    if cond {
        let v = f.get(k);
        f.set(0, v);
    }
    Ok(())
}

macro_rules! arith_forms {
    ($t:ident, $op:expr, $m32:ident, $m64:ident, $i16:ident, $i32:ident, $st0_sti:ident, $sti_st0:ident, $p:ident) => {
        $t.add(Code::$m32, arith_mem::<{ $op }, M32>);
        $t.add(Code::$m64, arith_mem::<{ $op }, M64>);
        $t.add(Code::$i16, arith_mem::<{ $op }, I16>);
        $t.add(Code::$i32, arith_mem::<{ $op }, I32>);
        $t.add(Code::$st0_sti, arith_st::<{ $op }, false>);
        $t.add(Code::$sti_st0, arith_st::<{ $op }, false>);
        $t.add(Code::$p, arith_st::<{ $op }, true>);
    };
}

pub(super) fn register(t: &mut Table) {
    arith_forms!(
        t,
        ADD,
        Fadd_m32fp,
        Fadd_m64fp,
        Fiadd_m16int,
        Fiadd_m32int,
        Fadd_st0_sti,
        Fadd_sti_st0,
        Faddp_sti_st0
    );
    arith_forms!(
        t,
        MUL,
        Fmul_m32fp,
        Fmul_m64fp,
        Fimul_m16int,
        Fimul_m32int,
        Fmul_st0_sti,
        Fmul_sti_st0,
        Fmulp_sti_st0
    );
    arith_forms!(
        t,
        SUB,
        Fsub_m32fp,
        Fsub_m64fp,
        Fisub_m16int,
        Fisub_m32int,
        Fsub_st0_sti,
        Fsub_sti_st0,
        Fsubp_sti_st0
    );
    arith_forms!(
        t,
        SUBR,
        Fsubr_m32fp,
        Fsubr_m64fp,
        Fisubr_m16int,
        Fisubr_m32int,
        Fsubr_st0_sti,
        Fsubr_sti_st0,
        Fsubrp_sti_st0
    );
    arith_forms!(
        t,
        DIV,
        Fdiv_m32fp,
        Fdiv_m64fp,
        Fidiv_m16int,
        Fidiv_m32int,
        Fdiv_st0_sti,
        Fdiv_sti_st0,
        Fdivp_sti_st0
    );
    arith_forms!(
        t,
        DIVR,
        Fdivr_m32fp,
        Fdivr_m64fp,
        Fidivr_m16int,
        Fidivr_m32int,
        Fdivr_st0_sti,
        Fdivr_sti_st0,
        Fdivrp_sti_st0
    );

    t.add(Code::Fcom_m32fp, fcom_mem::<M32, false>);
    t.add(Code::Fcom_m64fp, fcom_mem::<M64, false>);
    t.add(Code::Fcomp_m32fp, fcom_mem::<M32, true>);
    t.add(Code::Fcomp_m64fp, fcom_mem::<M64, true>);
    t.add(Code::Ficom_m16int, fcom_mem::<I16, false>);
    t.add(Code::Ficom_m32int, fcom_mem::<I32, false>);
    t.add(Code::Ficomp_m16int, fcom_mem::<I16, true>);
    t.add(Code::Ficomp_m32int, fcom_mem::<I32, true>);
    for code in [Code::Fcom_st0_sti, Code::Fcom_st0_sti_DCD0] {
        t.add(code, fcom_st::<0, false>);
    }
    for code in [
        Code::Fcomp_st0_sti,
        Code::Fcomp_st0_sti_DCD8,
        Code::Fcomp_st0_sti_DED0,
    ] {
        t.add(code, fcom_st::<1, false>);
    }
    t.add(Code::Fucom_st0_sti, fcom_st::<0, true>);
    t.add(Code::Fucomp_st0_sti, fcom_st::<1, true>);
    t.add(Code::Fcompp, fcompp::<false>);
    t.add(Code::Fucompp, fcompp::<true>);
    t.add(Code::Fcomi_st0_sti, fcomi::<false, false>);
    t.add(Code::Fcomip_st0_sti, fcomi::<true, false>);
    t.add(Code::Fucomi_st0_sti, fcomi::<false, true>);
    t.add(Code::Fucomip_st0_sti, fcomi::<true, true>);
    t.add(Code::Ftst, ftst);
    t.add(Code::Fxam, fxam);

    t.add(Code::Fld_m32fp, fld_mem::<M32>);
    t.add(Code::Fld_m64fp, fld_mem::<M64>);
    t.add(Code::Fld_m80fp, fld_mem::<M80>);
    t.add(Code::Fild_m16int, fld_mem::<I16>);
    t.add(Code::Fild_m32int, fld_mem::<I32>);
    t.add(Code::Fild_m64int, fld_mem::<I64>);
    t.add(Code::Fbld_m80bcd, fld_mem::<BCD>);
    t.add(Code::Fld_sti, fld_st);
    t.add(Code::Fld1, fld_const::<0>);
    t.add(Code::Fldl2t, fld_const::<1>);
    t.add(Code::Fldl2e, fld_const::<2>);
    t.add(Code::Fldpi, fld_const::<3>);
    t.add(Code::Fldlg2, fld_const::<4>);
    t.add(Code::Fldln2, fld_const::<5>);
    t.add(Code::Fldz, fld_const::<6>);

    t.add(Code::Fst_m32fp, fst_mem::<M32, false, false>);
    t.add(Code::Fst_m64fp, fst_mem::<M64, false, false>);
    t.add(Code::Fstp_m32fp, fst_mem::<M32, true, false>);
    t.add(Code::Fstp_m64fp, fst_mem::<M64, true, false>);
    t.add(Code::Fstp_m80fp, fst_mem::<M80, true, false>);
    t.add(Code::Fist_m16int, fst_mem::<I16, false, false>);
    t.add(Code::Fist_m32int, fst_mem::<I32, false, false>);
    t.add(Code::Fistp_m16int, fst_mem::<I16, true, false>);
    t.add(Code::Fistp_m32int, fst_mem::<I32, true, false>);
    t.add(Code::Fistp_m64int, fst_mem::<I64, true, false>);
    t.add(Code::Fisttp_m16int, fst_mem::<I16, true, true>);
    t.add(Code::Fisttp_m32int, fst_mem::<I32, true, true>);
    t.add(Code::Fisttp_m64int, fst_mem::<I64, true, true>);
    t.add(Code::Fbstp_m80bcd, fst_mem::<BCD, true, false>);
    t.add(Code::Fst_sti, fst_st::<false>);
    for code in [
        Code::Fstp_sti,
        Code::Fstpnce_sti,
        Code::Fstp_sti_DFD0,
        Code::Fstp_sti_DFD8,
    ] {
        t.add(code, fst_st::<true>);
    }

    for code in [
        Code::Fxch_st0_sti,
        Code::Fxch_st0_sti_DDC8,
        Code::Fxch_st0_sti_DFC8,
    ] {
        t.add(code, fxch);
    }
    t.add(Code::Fchs, fsign::<false>);
    t.add(Code::Fabs, fsign::<true>);
    t.add(Code::Fsqrt, fsqrt);
    t.add(Code::Frndint, frndint);
    t.add(Code::Fscale, fscale);
    t.add(Code::Fxtract, fxtract);
    t.add(Code::Fprem, fprem::<false>);
    t.add(Code::Fprem1, fprem::<true>);
    t.add(Code::Fincstp, fstp_rotate::<true>);
    t.add(Code::Fdecstp, fstp_rotate::<false>);
    t.add(Code::Ffree_sti, ffree::<false>);
    t.add(Code::Ffreep_sti, ffree::<true>);
    t.add(Code::Fnop, fnop);

    t.add(Code::Fcmovb_st0_sti, fcmov::<2>);
    t.add(Code::Fcmovnb_st0_sti, fcmov::<3>);
    t.add(Code::Fcmove_st0_sti, fcmov::<4>);
    t.add(Code::Fcmovne_st0_sti, fcmov::<5>);
    t.add(Code::Fcmovbe_st0_sti, fcmov::<6>);
    t.add(Code::Fcmovnbe_st0_sti, fcmov::<7>);
    t.add(Code::Fcmovu_st0_sti, fcmov::<10>);
    t.add(Code::Fcmovnu_st0_sti, fcmov::<11>);
}
