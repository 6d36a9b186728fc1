//! Float operations on XMM registers: packed and scalar arithmetic, min/max,
//! square root and approximations, compares (cmpps predicates, comiss),
//! conversions between int32/int64/float/double (XMM, MMX and GPR forms),
//! bitwise logic, shuffles and unpacks, and SSE3's horizontal and
//! alternating add/sub. Each element goes through [`super::float`]; the
//! flags of all elements are raised together before anything is written.

use super::float::{self, F32, F64, Fp, Order};
use super::int::{self, PAND, PANDN, POR, PUNPCKHDQ, PUNPCKHQDQ, PUNPCKLDQ, PUNPCKLQDQ, PXOR};
use super::{Mm, Space, Xmm, load128, raise, rm, sse_mm_ok, sse_ok};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::{CF, PF, ZF};
use crate::cpu::width::{W32, W64, Width};
use crate::decode::{Insn, Table};

const ADD: u8 = 0;
const SUB: u8 = 1;
const MUL: u8 = 2;
const DIV: u8 = 3;
const MIN: u8 = 4;
const MAX: u8 = 5;
const SQRT: u8 = 6;
const RCP: u8 = 7;
const RSQRT: u8 = 8;
const CMP: u8 = 9;

/// Bits of one element of `F`.
#[inline(always)]
const fn bits<F: Fp>() -> u32 {
    1 + F::EXPW + F::FRAC
}

#[inline(always)]
fn elem_mask<F: Fp>() -> u128 {
    (1u128 << bits::<F>()) - 1
}

/// Element `k` of `v`.
#[inline(always)]
fn el<F: Fp>(v: u128, k: u32) -> u64 {
    ((v >> (k * bits::<F>())) & elem_mask::<F>()) as u64
}

/// One element of operation `OP` (`pred`: the cmpps predicate).
#[inline(always)]
fn op1<F: Fp>(op: u8, a: u64, b: u64, m: u32, pred: u8) -> (u64, u32) {
    match op {
        ADD => float::add::<F>(a, b, m),
        SUB => float::sub::<F>(a, b, m),
        MUL => float::mul::<F>(a, b, m),
        DIV => float::div::<F>(a, b, m),
        MIN => float::min::<F>(a, b, m),
        MAX => float::max::<F>(a, b, m),
        SQRT => float::sqrt::<F>(b, m),
        RCP => (float::rcp(b), 0),
        RSQRT => (float::rsqrt(b), 0),
        _ => {
            let (t, f) = float::cmp::<F>(a, b, pred, m);
            (if t { elem_mask::<F>() as u64 } else { 0 }, f)
        }
    }
}

/// `op xmm, xmm/m128` on every element (`addps`, `sqrtpd`, `cmpps`…).
fn packed<F: Fp, const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = if MEM {
        load128::<true>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let a = Xmm::get(cpu, i.r0);
    let m = cpu.fpu.mxcsr;
    let pred = (i.imm & 7) as u8;
    let (mut r, mut flags) = (0u128, 0u32);
    for k in 0..128 / bits::<F>() {
        let (x, f) = op1::<F>(OP, el::<F>(a, k), el::<F>(b, k), m, pred);
        r |= u128::from(x) << (k * bits::<F>());
        flags |= f;
    }
    raise(cpu, flags)?;
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// The scalar source: the low element of `r1` or the m32/m64 operand.
#[inline(always)]
fn scalar_src<F: Fp, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res<u64> {
    if MEM {
        if bits::<F>() == 32 {
            cpu.read_mem::<W32>(i)
        } else {
            cpu.read_mem::<W64>(i)
        }
    } else {
        Ok(el::<F>(Xmm::get(cpu, i.r1), 0))
    }
}

/// `op xmm, xmm/m32|m64` on the low element; the rest of xmm is kept.
fn scalar<F: Fp, const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = scalar_src::<F, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let (x, f) = op1::<F>(OP, el::<F>(a, 0), b, cpu.fpu.mxcsr, (i.imm & 7) as u8);
    raise(cpu, f)?;
    Xmm::set(cpu, i.r0, (a & !elem_mask::<F>()) | u128::from(x));
    Ok(())
}

/// `comiss`/`ucomiss`/`comisd`/`ucomisd`: ZF, PF, CF from the order;
/// OF, SF, AF cleared.
fn comi<F: Fp, const SIGNAL: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = scalar_src::<F, MEM>(cpu, i)?;
    let a = el::<F>(Xmm::get(cpu, i.r0), 0);
    let (o, f) = float::compare::<F>(a, b, SIGNAL, cpu.fpu.mxcsr);
    raise(cpu, f)?;
    cpu.flags.set_bits(match o {
        Order::Unordered => ZF | PF | CF,
        Order::Less => CF,
        Order::Equal => ZF,
        Order::Greater => 0,
    });
    Ok(())
}

const ADDSUB: u8 = 0;
const HADD: u8 = 1;
const HSUB: u8 = 2;

/// SSE3 `addsubp*` (odd elements add, even subtract), `haddp*` and
/// `hsubp*` (pairs within each operand, a's results first).
fn sse3<F: Fp, const KIND: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = if MEM {
        load128::<true>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let a = Xmm::get(cpu, i.r0);
    let m = cpu.fpu.mxcsr;
    let n = 128 / bits::<F>();
    let (mut r, mut flags) = (0u128, 0u32);
    for k in 0..n {
        let (x, f) = match KIND {
            ADDSUB if k % 2 == 0 => float::sub::<F>(el::<F>(a, k), el::<F>(b, k), m),
            ADDSUB => float::add::<F>(el::<F>(a, k), el::<F>(b, k), m),
            _ => {
                let v = if k < n / 2 { a } else { b };
                let j = 2 * (k % (n / 2));
                let (x, y) = (el::<F>(v, j), el::<F>(v, j + 1));
                if KIND == HADD {
                    float::add::<F>(x, y, m)
                } else {
                    float::sub::<F>(x, y, m)
                }
            }
        };
        r |= u128::from(x) << (k * bits::<F>());
        flags |= f;
    }
    raise(cpu, flags)?;
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// `shufps`: two elements chosen from xmm1, then two from the source.
fn shufps<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = if MEM {
        load128::<true>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let a = Xmm::get(cpu, i.r0);
    let imm = i.imm as u32;
    let pick = |v: u128, k: u32| u128::from(el::<F32>(v, (imm >> (2 * k)) & 3)) << (32 * k);
    Xmm::set(cpu, i.r0, pick(a, 0) | pick(a, 1) | pick(b, 2) | pick(b, 3));
    Ok(())
}

/// `shufpd`: one element from xmm1, one from the source.
fn shufpd<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = if MEM {
        load128::<true>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let a = Xmm::get(cpu, i.r0);
    let imm = i.imm as u32;
    let lo = el::<F64>(a, imm & 1);
    let hi = el::<F64>(b, (imm >> 1) & 1);
    Xmm::set(cpu, i.r0, u128::from(lo) | u128::from(hi) << 64);
    Ok(())
}

/// Conversion element kinds: the format each side of a `cvt` holds.
trait Elem: 'static {
    const BITS: u32;
    /// Converts one element to `F` (from-int or format conversion).
    fn to_float<F: Fp>(v: u64, m: u32) -> (u64, u32);
}
/// A signed 32-bit integer element.
struct I32;
impl Elem for I32 {
    const BITS: u32 = 32;
    fn to_float<F: Fp>(v: u64, m: u32) -> (u64, u32) {
        float::from_int::<F>(i64::from(v as u32 as i32), m)
    }
}
impl Elem for F32 {
    const BITS: u32 = 32;
    fn to_float<F: Fp>(v: u64, m: u32) -> (u64, u32) {
        float::convert::<F32, F>(v, m)
    }
}
impl Elem for F64 {
    const BITS: u32 = 64;
    fn to_float<F: Fp>(v: u64, m: u32) -> (u64, u32) {
        float::convert::<F64, F>(v, m)
    }
}

/// Where a conversion's source comes from.
const SRC_XMM: u8 = 0; // xmm register, or m128 (aligned)
const SRC_XMM64: u8 = 1; // low 64 bits of an xmm register, or m64
const SRC_MM: u8 = 2; // mm register, or m64

#[inline(always)]
fn cvt_src<const SRC: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res<u128> {
    match (SRC, MEM) {
        (SRC_XMM, true) => load128::<true>(cpu, i),
        (_, true) => Ok(u128::from(cpu.read_mem::<W64>(i)?)),
        (SRC_MM, false) => Ok(Mm::get(cpu, i.r1)),
        (_, false) => Ok(Xmm::get(cpu, i.r1)),
    }
}

/// The class checks of a conversion that reads (`SRC_MM` register form) or
/// writes (`to_mm`) an MMX register.
#[inline(always)]
fn cvt_check<const SRC: u8, const MEM: bool>(cpu: &Cpu, to_mm: bool) -> Res {
    if to_mm || (SRC == SRC_MM && !MEM) {
        sse_mm_ok(cpu)
    } else {
        sse_ok(cpu)
    }
}

/// Packed conversion to float format `T` from elements `E` into an XMM
/// register: the converted elements fill the low end, the rest of the
/// register is zeroed (`cvtpd2ps`, `cvtdq2pd`…) or, for `KEEP_HIGH`, kept
/// (`cvtpi2ps`).
fn cvt_to_float<E: Elem, T: Fp, const SRC: u8, const KEEP_HIGH: bool, const MEM: bool>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Res {
    cvt_check::<SRC, MEM>(cpu, false)?;
    let v = cvt_src::<SRC, MEM>(cpu, i)?;
    let m = cpu.fpu.mxcsr;
    // As many elements as the narrower side has room for in 128 bits.
    let n = 128 / E::BITS.max(bits::<T>());
    let n = if SRC == SRC_XMM {
        n
    } else {
        n.min(64 / E::BITS)
    };
    let (mut r, mut flags) = (0u128, 0u32);
    for k in 0..n {
        let x = (v >> (k * E::BITS)) as u64 & (u64::MAX >> (64 - E::BITS));
        let (y, f) = E::to_float::<T>(x, m);
        r |= u128::from(y) << (k * bits::<T>());
        flags |= f;
    }
    if SRC == SRC_MM && !MEM {
        Mm::enter(cpu); // before #XM can be raised, as on hardware
    }
    raise(cpu, flags)?;
    if KEEP_HIGH {
        let a = Xmm::get(cpu, i.r0);
        let used = (1u128 << (n * bits::<T>())) - 1;
        r |= a & !used;
    }
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// Packed float `F` to int32 (`cvtps2dq`, `cvttpd2dq`, `cvtps2pi`…), into
/// an XMM register (upper part zeroed) or an MMX register (`TO_MM`).
fn cvt_to_int<F: Fp, const SRC: u8, const TRUNC: bool, const TO_MM: bool, const MEM: bool>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Res {
    cvt_check::<SRC, MEM>(cpu, TO_MM)?;
    let v = cvt_src::<SRC, MEM>(cpu, i)?;
    let m = cpu.fpu.mxcsr;
    let n = if SRC == SRC_XMM64 {
        64 / bits::<F>()
    } else {
        128 / bits::<F>()
    };
    let (mut r, mut flags) = (0u128, 0u32);
    for k in 0..n {
        let (y, f) = float::to_int::<F>(el::<F>(v, k), 32, TRUNC, m);
        r |= u128::from(y) << (32 * k);
        flags |= f;
    }
    if TO_MM {
        Mm::enter(cpu); // before #XM can be raised, as on hardware
    }
    raise(cpu, flags)?;
    if TO_MM {
        Mm::set(cpu, i.r0, r);
    } else {
        Xmm::set(cpu, i.r0, r);
    }
    Ok(())
}

/// Scalar conversion into the low element of xmm (`cvtss2sd`,
/// `cvtsi2sd`…); the rest of the register is kept. `E` is the source:
/// an XMM element or memory, or a GPR/memory integer of width `W`.
fn cvt_scalar_float<E: Elem, T: Fp, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let x = if MEM {
        if E::BITS == 32 {
            cpu.read_mem::<W32>(i)?
        } else {
            cpu.read_mem::<W64>(i)?
        }
    } else {
        Xmm::get(cpu, i.r1) as u64 & (u64::MAX >> (64 - E::BITS))
    };
    let (y, f) = E::to_float::<T>(x, cpu.fpu.mxcsr);
    raise(cpu, f)?;
    let a = Xmm::get(cpu, i.r0);
    Xmm::set(cpu, i.r0, (a & !elem_mask::<T>()) | u128::from(y));
    Ok(())
}

/// `cvtsi2ss`/`cvtsi2sd xmm, r/m32|64`.
fn cvt_si2f<W: Width, T: Fp, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = if MEM {
        cpu.read_mem::<W>(i)?
    } else {
        W::get(&cpu.gpr, i.r1)
    };
    let (y, f) = float::from_int::<T>(W::sext(v) as i64, cpu.fpu.mxcsr);
    raise(cpu, f)?;
    let a = Xmm::get(cpu, i.r0);
    Xmm::set(cpu, i.r0, (a & !elem_mask::<T>()) | u128::from(y));
    Ok(())
}

/// `cvtss2si`/`cvttsd2si… r32|64, xmm/m32|64`.
fn cvt_f2si<W: Width, F: Fp, const TRUNC: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let x = scalar_src::<F, MEM>(cpu, i)?;
    let (y, f) = float::to_int::<F>(x, W::BITS, TRUNC, cpu.fpu.mxcsr);
    raise(cpu, f)?;
    W::set(&mut cpu.gpr, i.r0, y);
    Ok(())
}

/// Bitwise and unpack forms that are the integer operations under another
/// name (`andps` is `pand`, `unpcklps` is `punpckldq`…).
fn alias<const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let b = if MEM {
        load128::<true>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let a = Xmm::get(cpu, i.r0);
    Xmm::set(cpu, i.r0, int::apply(OP, a, b, 16));
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    macro_rules! arith {
        ($name:literal, $op:ident) => {
            rm!(t, concat!($name, "ps_xmm_xmmm128"), packed, [F32, $op]);
            rm!(t, concat!($name, "pd_xmm_xmmm128"), packed, [F64, $op]);
            rm!(t, concat!($name, "ss_xmm_xmmm32"), scalar, [F32, $op]);
            rm!(t, concat!($name, "sd_xmm_xmmm64"), scalar, [F64, $op]);
        };
    }
    arith!("Add", ADD);
    arith!("Sub", SUB);
    arith!("Mul", MUL);
    arith!("Div", DIV);
    arith!("Min", MIN);
    arith!("Max", MAX);
    arith!("Sqrt", SQRT);
    rm!(t, "Cmpps_xmm_xmmm128_imm8", packed, [F32, CMP]);
    rm!(t, "Cmppd_xmm_xmmm128_imm8", packed, [F64, CMP]);
    rm!(t, "Cmpss_xmm_xmmm32_imm8", scalar, [F32, CMP]);
    rm!(t, "Cmpsd_xmm_xmmm64_imm8", scalar, [F64, CMP]);
    rm!(t, "Rcpps_xmm_xmmm128", packed, [F32, RCP]);
    rm!(t, "Rcpss_xmm_xmmm32", scalar, [F32, RCP]);
    rm!(t, "Rsqrtps_xmm_xmmm128", packed, [F32, RSQRT]);
    rm!(t, "Rsqrtss_xmm_xmmm32", scalar, [F32, RSQRT]);
    rm!(t, "Comiss_xmm_xmmm32", comi, [F32, true]);
    rm!(t, "Ucomiss_xmm_xmmm32", comi, [F32, false]);
    rm!(t, "Comisd_xmm_xmmm64", comi, [F64, true]);
    rm!(t, "Ucomisd_xmm_xmmm64", comi, [F64, false]);

    rm!(t, "Addsubps_xmm_xmmm128", sse3, [F32, ADDSUB]);
    rm!(t, "Addsubpd_xmm_xmmm128", sse3, [F64, ADDSUB]);
    rm!(t, "Haddps_xmm_xmmm128", sse3, [F32, HADD]);
    rm!(t, "Haddpd_xmm_xmmm128", sse3, [F64, HADD]);
    rm!(t, "Hsubps_xmm_xmmm128", sse3, [F32, HSUB]);
    rm!(t, "Hsubpd_xmm_xmmm128", sse3, [F64, HSUB]);

    rm!(t, "Andps_xmm_xmmm128", alias, [PAND]);
    rm!(t, "Andpd_xmm_xmmm128", alias, [PAND]);
    rm!(t, "Andnps_xmm_xmmm128", alias, [PANDN]);
    rm!(t, "Andnpd_xmm_xmmm128", alias, [PANDN]);
    rm!(t, "Orps_xmm_xmmm128", alias, [POR]);
    rm!(t, "Orpd_xmm_xmmm128", alias, [POR]);
    rm!(t, "Xorps_xmm_xmmm128", alias, [PXOR]);
    rm!(t, "Xorpd_xmm_xmmm128", alias, [PXOR]);
    rm!(t, "Unpcklps_xmm_xmmm128", alias, [PUNPCKLDQ]);
    rm!(t, "Unpckhps_xmm_xmmm128", alias, [PUNPCKHDQ]);
    rm!(t, "Unpcklpd_xmm_xmmm128", alias, [PUNPCKLQDQ]);
    rm!(t, "Unpckhpd_xmm_xmmm128", alias, [PUNPCKHQDQ]);
    rm!(t, "Shufps_xmm_xmmm128_imm8", shufps);
    rm!(t, "Shufpd_xmm_xmmm128_imm8", shufpd);

    // Packed conversions.
    rm!(
        t,
        "Cvtps2pd_xmm_xmmm64",
        cvt_to_float,
        [F32, F64, SRC_XMM64, false]
    );
    rm!(
        t,
        "Cvtpd2ps_xmm_xmmm128",
        cvt_to_float,
        [F64, F32, SRC_XMM, false]
    );
    rm!(
        t,
        "Cvtdq2ps_xmm_xmmm128",
        cvt_to_float,
        [I32, F32, SRC_XMM, false]
    );
    rm!(
        t,
        "Cvtdq2pd_xmm_xmmm64",
        cvt_to_float,
        [I32, F64, SRC_XMM64, false]
    );
    rm!(
        t,
        "Cvtpi2ps_xmm_mmm64",
        cvt_to_float,
        [I32, F32, SRC_MM, true]
    );
    rm!(
        t,
        "Cvtpi2pd_xmm_mmm64",
        cvt_to_float,
        [I32, F64, SRC_MM, false]
    );
    rm!(
        t,
        "Cvtps2dq_xmm_xmmm128",
        cvt_to_int,
        [F32, SRC_XMM, false, false]
    );
    rm!(
        t,
        "Cvttps2dq_xmm_xmmm128",
        cvt_to_int,
        [F32, SRC_XMM, true, false]
    );
    rm!(
        t,
        "Cvtpd2dq_xmm_xmmm128",
        cvt_to_int,
        [F64, SRC_XMM, false, false]
    );
    rm!(
        t,
        "Cvttpd2dq_xmm_xmmm128",
        cvt_to_int,
        [F64, SRC_XMM, true, false]
    );
    rm!(
        t,
        "Cvtps2pi_mm_xmmm64",
        cvt_to_int,
        [F32, SRC_XMM64, false, true]
    );
    rm!(
        t,
        "Cvttps2pi_mm_xmmm64",
        cvt_to_int,
        [F32, SRC_XMM64, true, true]
    );
    rm!(
        t,
        "Cvtpd2pi_mm_xmmm128",
        cvt_to_int,
        [F64, SRC_XMM, false, true]
    );
    rm!(
        t,
        "Cvttpd2pi_mm_xmmm128",
        cvt_to_int,
        [F64, SRC_XMM, true, true]
    );
    // Scalar conversions.
    rm!(t, "Cvtss2sd_xmm_xmmm32", cvt_scalar_float, [F32, F64]);
    rm!(t, "Cvtsd2ss_xmm_xmmm64", cvt_scalar_float, [F64, F32]);
    rm!(t, "Cvtsi2ss_xmm_rm32", cvt_si2f, [W32, F32]);
    rm!(t, "Cvtsi2ss_xmm_rm64", cvt_si2f, [W64, F32]);
    rm!(t, "Cvtsi2sd_xmm_rm32", cvt_si2f, [W32, F64]);
    rm!(t, "Cvtsi2sd_xmm_rm64", cvt_si2f, [W64, F64]);
    rm!(t, "Cvtss2si_r32_xmmm32", cvt_f2si, [W32, F32, false]);
    rm!(t, "Cvtss2si_r64_xmmm32", cvt_f2si, [W64, F32, false]);
    rm!(t, "Cvttss2si_r32_xmmm32", cvt_f2si, [W32, F32, true]);
    rm!(t, "Cvttss2si_r64_xmmm32", cvt_f2si, [W64, F32, true]);
    rm!(t, "Cvtsd2si_r32_xmmm64", cvt_f2si, [W32, F64, false]);
    rm!(t, "Cvtsd2si_r64_xmmm64", cvt_f2si, [W64, F64, false]);
    rm!(t, "Cvttsd2si_r32_xmmm64", cvt_f2si, [W32, F64, true]);
    rm!(t, "Cvttsd2si_r64_xmmm64", cvt_f2si, [W64, F64, true]);
}
