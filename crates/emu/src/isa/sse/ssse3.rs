//! SSSE3: pshufb, phadd/phsub (w, d, sw), pmaddubsw, pmulhrsw, psign,
//! pabs and palignr, on MMX and XMM registers (one handler per shape over
//! [`Space`]). Integer only, so no MXCSR flags; the XMM memory forms need
//! 16-byte alignment like every legacy-SSE 128-bit operand.

use super::int::{lane, map};
use super::{Mm, Space, Xmm, rm, src};
use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::decode::{Insn, Table};
use crate::isa::bmi::modern;

const PSHUFB: u8 = 0;
const PHADDW: u8 = 1;
const PHADDD: u8 = 2;
const PHADDSW: u8 = 3;
const PHSUBW: u8 = 4;
const PHSUBD: u8 = 5;
const PHSUBSW: u8 = 6;
const PMADDUBSW: u8 = 7;
const PMULHRSW: u8 = 8;
const PSIGNB: u8 = 9;
const PSIGNW: u8 = 10;
const PSIGND: u8 = 11;
const PABSB: u8 = 12;
const PABSW: u8 = 13;
const PABSD: u8 = 14;

#[inline(always)]
fn sx<const E: u32>(x: u64) -> i64 {
    ((x << (64 - E)) as i64) >> (64 - E)
}

#[inline(always)]
fn sat16(v: i64) -> u64 {
    v.clamp(-0x8000, 0x7fff) as u64 & 0xffff
}

/// Horizontal pairs: lane k of the result is `f(x[2k], x[2k+1])` with x
/// the lanes of `a` followed by those of `b` (each `n` bytes).
#[inline(always)]
fn horizontal<const E: u32>(a: u128, b: u128, n: usize, f: impl Fn(u64, u64) -> u64) -> u128 {
    let per = n * 8 / E as usize;
    let mask = if E == 64 { u64::MAX } else { (1u64 << E) - 1 };
    let mut r = 0u128;
    for k in 0..per {
        let (src, j) = if k < per / 2 {
            (a, 2 * k)
        } else {
            (b, 2 * k - per)
        };
        let v = f(lane::<E>(src, j), lane::<E>(src, j + 1)) & mask;
        r |= u128::from(v) << (k as u32 * E);
    }
    r
}

/// `a` (destination) op `b` (source) on `n`-byte registers.
#[inline(always)]
fn apply(op: u8, a: u128, b: u128, n: usize) -> u128 {
    let sign = |x: u64, y: u64, e: u32| -> u64 {
        let s = sx_dyn(y, e);
        if s < 0 {
            x.wrapping_neg()
        } else if s == 0 {
            0
        } else {
            x
        }
    };
    match op {
        PSHUFB => {
            let mut r = 0u128;
            for k in 0..n {
                let sel = lane::<8>(b, k);
                if sel & 0x80 == 0 {
                    r |= u128::from(lane::<8>(a, sel as usize & (n - 1))) << (8 * k);
                }
            }
            r
        }
        PHADDW => horizontal::<16>(a, b, n, u64::wrapping_add),
        PHADDD => horizontal::<32>(a, b, n, u64::wrapping_add),
        PHADDSW => horizontal::<16>(a, b, n, |x, y| sat16(sx::<16>(x) + sx::<16>(y))),
        PHSUBW => horizontal::<16>(a, b, n, u64::wrapping_sub),
        PHSUBD => horizontal::<32>(a, b, n, u64::wrapping_sub),
        PHSUBSW => horizontal::<16>(a, b, n, |x, y| sat16(sx::<16>(x) - sx::<16>(y))),
        PMADDUBSW => map::<16>(a, b, |x, y| {
            let lo = (x & 0xff) as i64 * sx::<8>(y & 0xff);
            let hi = (x >> 8) as i64 * sx::<8>(y >> 8);
            sat16(lo + hi)
        }),
        PMULHRSW => map::<16>(a, b, |x, y| {
            ((((sx::<16>(x) * sx::<16>(y)) >> 14) + 1) >> 1) as u64
        }),
        PSIGNB => map::<8>(a, b, |x, y| sign(x, y, 8)),
        PSIGNW => map::<16>(a, b, |x, y| sign(x, y, 16)),
        PSIGND => map::<32>(a, b, |x, y| sign(x, y, 32)),
        PABSB => map::<8>(b, 0, |x, _| sx::<8>(x).unsigned_abs()),
        PABSW => map::<16>(b, 0, |x, _| sx::<16>(x).unsigned_abs()),
        PABSD => map::<32>(b, 0, |x, _| sx::<32>(x).unsigned_abs()),
        _ => unreachable!("ssse3 op {op}"),
    }
}

#[inline(always)]
fn sx_dyn(x: u64, e: u32) -> i64 {
    ((x << (64 - e)) as i64) >> (64 - e)
}

/// The checks of every SSSE3/SSE4 instruction: the set must be in the
/// CPU model (qemu64 has none of them: #UD, as such a CPU), then the
/// register file's own.
#[inline(always)]
pub(super) fn ext_check<S: Space>(cpu: &Cpu) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    S::check(cpu)
}

fn binop<S: Space, const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<S>(cpu)?;
    let b = src::<S, MEM>(cpu, i)?;
    let a = S::get(cpu, i.r0);
    let mask = if S::BYTES == 16 {
        u128::MAX
    } else {
        u128::from(u64::MAX)
    };
    S::set(cpu, i.r0, apply(OP, a, b, S::BYTES) & mask);
    S::enter(cpu);
    Ok(())
}

/// palignr: the `2n`-byte concatenation destination:source shifted right
/// by `imm` bytes, low `n` bytes kept.
fn palignr<S: Space, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<S>(cpu)?;
    let b = src::<S, MEM>(cpu, i)?;
    let a = S::get(cpu, i.r0);
    let n = S::BYTES;
    let shift = (i.imm & 0xff) as usize;
    let mut r = 0u128;
    for k in 0..n {
        let at = k + shift;
        let byte = if at < n {
            lane::<8>(b, at)
        } else if at < 2 * n {
            lane::<8>(a, at - n)
        } else {
            0
        };
        r |= u128::from(byte) << (8 * k);
    }
    S::set(cpu, i.r0, r);
    S::enter(cpu);
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    macro_rules! both {
        ($name:literal, $op:ident) => {
            rm!(t, concat!($name, "_mm_mmm64"), binop, [Mm, $op]);
            rm!(t, concat!($name, "_xmm_xmmm128"), binop, [Xmm, $op]);
        };
    }
    both!("Pshufb", PSHUFB);
    both!("Phaddw", PHADDW);
    both!("Phaddd", PHADDD);
    both!("Phaddsw", PHADDSW);
    both!("Phsubw", PHSUBW);
    both!("Phsubd", PHSUBD);
    both!("Phsubsw", PHSUBSW);
    both!("Pmaddubsw", PMADDUBSW);
    both!("Pmulhrsw", PMULHRSW);
    both!("Psignb", PSIGNB);
    both!("Psignw", PSIGNW);
    both!("Psignd", PSIGND);
    both!("Pabsb", PABSB);
    both!("Pabsw", PABSW);
    both!("Pabsd", PABSD);
    rm!(t, "Palignr_mm_mmm64_imm8", palignr, [Mm]);
    rm!(t, "Palignr_xmm_xmmm128_imm8", palignr, [Xmm]);
}
