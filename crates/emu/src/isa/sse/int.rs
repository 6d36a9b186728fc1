//! Packed integer operations on MMX and XMM registers: add/sub (wrapping
//! and saturating), multiplies, logic, compares, averages, min/max, sum of
//! absolute differences, shifts, unpacks, packs, shuffles, and the
//! word/mask extractions. One generic handler per shape; `OP` picks the
//! operation at compile time, `S` the register file.

use super::{Mm, Space, Xmm, rm, src};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::width::{W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;

pub(super) const PADDB: u8 = 0;
pub(super) const PADDW: u8 = 1;
pub(super) const PADDD: u8 = 2;
pub(super) const PADDQ: u8 = 3;
pub(super) const PSUBB: u8 = 4;
pub(super) const PSUBW: u8 = 5;
pub(super) const PSUBD: u8 = 6;
pub(super) const PSUBQ: u8 = 7;
pub(super) const PADDSB: u8 = 8;
pub(super) const PADDSW: u8 = 9;
pub(super) const PADDUSB: u8 = 10;
pub(super) const PADDUSW: u8 = 11;
pub(super) const PSUBSB: u8 = 12;
pub(super) const PSUBSW: u8 = 13;
pub(super) const PSUBUSB: u8 = 14;
pub(super) const PSUBUSW: u8 = 15;
pub(super) const PMULLW: u8 = 16;
pub(super) const PMULHW: u8 = 17;
pub(super) const PMULHUW: u8 = 18;
pub(super) const PMULUDQ: u8 = 19;
pub(super) const PMADDWD: u8 = 20;
pub(super) const PAND: u8 = 21;
pub(super) const PANDN: u8 = 22;
pub(super) const POR: u8 = 23;
pub(super) const PXOR: u8 = 24;
pub(super) const PCMPEQB: u8 = 25;
pub(super) const PCMPEQW: u8 = 26;
pub(super) const PCMPEQD: u8 = 27;
pub(super) const PCMPGTB: u8 = 28;
pub(super) const PCMPGTW: u8 = 29;
pub(super) const PCMPGTD: u8 = 30;
pub(super) const PAVGB: u8 = 31;
pub(super) const PAVGW: u8 = 32;
pub(super) const PMAXUB: u8 = 33;
pub(super) const PMAXSW: u8 = 34;
pub(super) const PMINUB: u8 = 35;
pub(super) const PMINSW: u8 = 36;
pub(super) const PSADBW: u8 = 37;
pub(super) const PSLLW: u8 = 38;
pub(super) const PSLLD: u8 = 39;
pub(super) const PSLLQ: u8 = 40;
pub(super) const PSRLW: u8 = 41;
pub(super) const PSRLD: u8 = 42;
pub(super) const PSRLQ: u8 = 43;
pub(super) const PSRAW: u8 = 44;
pub(super) const PSRAD: u8 = 45;
pub(super) const PUNPCKLBW: u8 = 46;
pub(super) const PUNPCKLWD: u8 = 47;
pub(super) const PUNPCKLDQ: u8 = 48;
pub(super) const PUNPCKLQDQ: u8 = 49;
pub(super) const PUNPCKHBW: u8 = 50;
pub(super) const PUNPCKHWD: u8 = 51;
pub(super) const PUNPCKHDQ: u8 = 52;
pub(super) const PUNPCKHQDQ: u8 = 53;
pub(super) const PACKSSWB: u8 = 54;
pub(super) const PACKSSDW: u8 = 55;
pub(super) const PACKUSWB: u8 = 56;

/// Applies `f` to each `E`-bit lane pair of `a` and `b`.
#[inline(always)]
pub(crate) fn map<const E: u32>(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    let mask = if E == 64 { u64::MAX } else { (1u64 << E) - 1 };
    let mut r = 0u128;
    let mut k = 0;
    while k < 128 {
        let x = (a >> k) as u64 & mask;
        let y = (b >> k) as u64 & mask;
        r |= u128::from(f(x, y) & mask) << k;
        k += E;
    }
    r
}

/// Lane `k` of `E` bits.
#[inline(always)]
pub(crate) fn lane<const E: u32>(v: u128, k: usize) -> u64 {
    let mask = if E == 64 { u64::MAX } else { (1u64 << E) - 1 };
    (v >> (k as u32 * E)) as u64 & mask
}

/// An `E`-bit lane value sign-extended to i64.
#[inline(always)]
fn sx<const E: u32>(x: u64) -> i64 {
    ((x << (64 - E)) as i64) >> (64 - E)
}

#[inline(always)]
fn sat_s<const E: u32>(v: i64) -> u64 {
    let max = (1i64 << (E - 1)) - 1;
    v.clamp(-max - 1, max) as u64
}

#[inline(always)]
fn sat_u<const E: u32>(v: i64) -> u64 {
    v.clamp(0, (1i64 << E) - 1) as u64
}

#[inline(always)]
fn ones(c: bool) -> u64 {
    if c { u64::MAX } else { 0 }
}

/// Shift of every `E`-bit lane by the 64-bit count `n`: counts past the
/// lane width give 0 (logical) or the sign (arithmetic).
#[inline(always)]
fn shift<const E: u32>(a: u128, n: u64, left: bool, arith: bool) -> u128 {
    if n >= u64::from(E) {
        return if arith {
            map::<E>(a, 0, |x, _| (sx::<E>(x) >> (E - 1)) as u64)
        } else {
            0
        };
    }
    let n = n as u32;
    map::<E>(a, 0, |x, _| {
        if left {
            x << n
        } else if arith {
            (sx::<E>(x) >> n) as u64
        } else {
            x >> n
        }
    })
}

/// Interleaves the `E`-bit elements of the low (or high) halves of the
/// first `n` bytes of `a` and `b`: a0 b0 a1 b1 …
#[inline(always)]
fn unpack<const E: u32>(a: u128, b: u128, n: usize, high: bool) -> u128 {
    let per_half = n * 8 / 2 / E as usize;
    let first = if high { per_half } else { 0 };
    let mut r = 0u128;
    for k in 0..per_half {
        r |= u128::from(lane::<E>(a, first + k)) << (2 * k as u32 * E);
        r |= u128::from(lane::<E>(b, first + k)) << ((2 * k as u32 + 1) * E);
    }
    r
}

/// Narrows the `E`-bit elements of the first `n` bytes of `a`, then of
/// `b`, to `E/2` bits with signed (or unsigned) saturation.
#[inline(always)]
fn pack<const E: u32>(a: u128, b: u128, n: usize, signed_out: bool) -> u128 {
    let per = n * 8 / E as usize;
    let half = E / 2;
    let mut r = 0u128;
    for (k, v) in (0..per)
        .map(|k| lane::<E>(a, k))
        .chain((0..per).map(|k| lane::<E>(b, k)))
        .enumerate()
    {
        let s = sx::<E>(v);
        let narrowed = if signed_out {
            if half == 8 {
                sat_s::<8>(s)
            } else {
                sat_s::<16>(s)
            }
        } else if half == 8 {
            sat_u::<8>(s)
        } else {
            sat_u::<16>(s)
        };
        r |= u128::from(narrowed & ((1 << half) - 1)) << (k as u32 * half);
    }
    r
}

/// The operation `OP` on full vectors `a` (destination) and `b` (source),
/// `n` bytes wide.
#[inline(always)]
pub(super) fn apply(op: u8, a: u128, b: u128, n: usize) -> u128 {
    let count = b as u64;
    match op {
        PADDB => map::<8>(a, b, u64::wrapping_add),
        PADDW => map::<16>(a, b, u64::wrapping_add),
        PADDD => map::<32>(a, b, u64::wrapping_add),
        PADDQ => map::<64>(a, b, u64::wrapping_add),
        PSUBB => map::<8>(a, b, u64::wrapping_sub),
        PSUBW => map::<16>(a, b, u64::wrapping_sub),
        PSUBD => map::<32>(a, b, u64::wrapping_sub),
        PSUBQ => map::<64>(a, b, u64::wrapping_sub),
        PADDSB => map::<8>(a, b, |x, y| sat_s::<8>(sx::<8>(x) + sx::<8>(y))),
        PADDSW => map::<16>(a, b, |x, y| sat_s::<16>(sx::<16>(x) + sx::<16>(y))),
        PADDUSB => map::<8>(a, b, |x, y| sat_u::<8>((x + y) as i64)),
        PADDUSW => map::<16>(a, b, |x, y| sat_u::<16>((x + y) as i64)),
        PSUBSB => map::<8>(a, b, |x, y| sat_s::<8>(sx::<8>(x) - sx::<8>(y))),
        PSUBSW => map::<16>(a, b, |x, y| sat_s::<16>(sx::<16>(x) - sx::<16>(y))),
        PSUBUSB => map::<8>(a, b, |x, y| x.saturating_sub(y)),
        PSUBUSW => map::<16>(a, b, |x, y| x.saturating_sub(y)),
        PMULLW => map::<16>(a, b, |x, y| x.wrapping_mul(y)),
        PMULHW => map::<16>(a, b, |x, y| ((sx::<16>(x) * sx::<16>(y)) >> 16) as u64),
        PMULHUW => map::<16>(a, b, |x, y| (x * y) >> 16),
        PMULUDQ => map::<64>(a, b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        PMADDWD => map::<32>(a, b, |x, y| {
            let lo = sx::<16>(x & 0xffff) * sx::<16>(y & 0xffff);
            let hi = sx::<16>(x >> 16) * sx::<16>(y >> 16);
            // Only 0x8000 × 4 wraps (to 0x8000_0000), as on hardware.
            (lo + hi) as u64
        }),
        PAND => a & b,
        PANDN => !a & b,
        POR => a | b,
        PXOR => a ^ b,
        PCMPEQB => map::<8>(a, b, |x, y| ones(x == y)),
        PCMPEQW => map::<16>(a, b, |x, y| ones(x == y)),
        PCMPEQD => map::<32>(a, b, |x, y| ones(x == y)),
        PCMPGTB => map::<8>(a, b, |x, y| ones(sx::<8>(x) > sx::<8>(y))),
        PCMPGTW => map::<16>(a, b, |x, y| ones(sx::<16>(x) > sx::<16>(y))),
        PCMPGTD => map::<32>(a, b, |x, y| ones(sx::<32>(x) > sx::<32>(y))),
        PAVGB => map::<8>(a, b, |x, y| (x + y + 1) >> 1),
        PAVGW => map::<16>(a, b, |x, y| (x + y + 1) >> 1),
        PMAXUB => map::<8>(a, b, u64::max),
        PMAXSW => map::<16>(a, b, |x, y| if sx::<16>(x) >= sx::<16>(y) { x } else { y }),
        PMINUB => map::<8>(a, b, u64::min),
        PMINSW => map::<16>(a, b, |x, y| if sx::<16>(x) <= sx::<16>(y) { x } else { y }),
        PSADBW => map::<64>(a, b, |x, y| {
            (0..8)
                .map(|k| ((x >> (8 * k)) & 0xff).abs_diff((y >> (8 * k)) & 0xff))
                .sum()
        }),
        PSLLW => shift::<16>(a, count, true, false),
        PSLLD => shift::<32>(a, count, true, false),
        PSLLQ => shift::<64>(a, count, true, false),
        PSRLW => shift::<16>(a, count, false, false),
        PSRLD => shift::<32>(a, count, false, false),
        PSRLQ => shift::<64>(a, count, false, false),
        PSRAW => shift::<16>(a, count, false, true),
        PSRAD => shift::<32>(a, count, false, true),
        PUNPCKLBW => unpack::<8>(a, b, n, false),
        PUNPCKLWD => unpack::<16>(a, b, n, false),
        PUNPCKLDQ => unpack::<32>(a, b, n, false),
        PUNPCKLQDQ => unpack::<64>(a, b, n, false),
        PUNPCKHBW => unpack::<8>(a, b, n, true),
        PUNPCKHWD => unpack::<16>(a, b, n, true),
        PUNPCKHDQ => unpack::<32>(a, b, n, true),
        PUNPCKHQDQ => unpack::<64>(a, b, n, true),
        PACKSSWB => pack::<16>(a, b, n, true),
        PACKSSDW => pack::<32>(a, b, n, true),
        PACKUSWB => pack::<16>(a, b, n, false),
        _ => unreachable!("packed integer op {op}"),
    }
}

/// `op reg, reg/mem`.
fn binop<S: Space, const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let b = src::<S, MEM>(cpu, i)?;
    let a = S::get(cpu, i.r0);
    S::set(cpu, i.r0, apply(OP, a, b, S::BYTES));
    S::enter(cpu);
    Ok(())
}

/// MMX `punpckl* mm, mm/m32`: the memory form reads only 32 bits.
fn unpack_low_mm<const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    Mm::check(cpu)?;
    let b = if MEM {
        u128::from(cpu.read_mem::<W32>(i)?)
    } else {
        Mm::get(cpu, i.r1)
    };
    let a = Mm::get(cpu, i.r0);
    Mm::set(cpu, i.r0, apply(OP, a, b, 8));
    Mm::enter(cpu);
    Ok(())
}

/// Shift by an immediate count: `psllw mm, imm8`…
fn shift_imm<S: Space, const OP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let a = S::get(cpu, i.r0);
    S::set(cpu, i.r0, apply(OP, a, u128::from(i.imm & 0xff), S::BYTES));
    S::enter(cpu);
    Ok(())
}

/// `pslldq`/`psrldq xmm, imm8`: byte shifts of the whole register.
fn byte_shift<const LEFT: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    Xmm::check(cpu)?;
    let a = Xmm::get(cpu, i.r0);
    let n = (i.imm & 0xff) as u32;
    let r = match (n > 15, LEFT) {
        (true, _) => 0,
        (false, true) => a << (8 * n),
        (false, false) => a >> (8 * n),
    };
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// Picks 16-bit lane `sel` (2 bits per result lane) of `v` at `first..first+4`.
#[inline(always)]
fn shuffle_words(v: u128, first: usize, imm: u64) -> u128 {
    let mut r = v & !(0xffff_ffff_ffff_ffffu128 << (first * 16));
    for k in 0..4 {
        let sel = (imm >> (2 * k)) as usize & 3;
        r |= u128::from(lane::<16>(v, first + sel)) << ((first + k) * 16);
    }
    r
}

const PSHUFW: u8 = 0;
const PSHUFD: u8 = 1;
const PSHUFLW: u8 = 2;
const PSHUFHW: u8 = 3;

/// `pshufw`/`pshufd`/`pshuflw`/`pshufhw reg, reg/mem, imm8`.
fn pshuf<S: Space, const KIND: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let b = src::<S, MEM>(cpu, i)?;
    let imm = i.imm & 0xff;
    let r = match KIND {
        PSHUFW => shuffle_words(b, 0, imm) & u128::from(u64::MAX),
        PSHUFD => (0..4).fold(0u128, |r, k| {
            let sel = (imm >> (2 * k)) as usize & 3;
            r | u128::from(lane::<32>(b, sel)) << (32 * k)
        }),
        PSHUFLW => shuffle_words(b, 0, imm),
        _ => shuffle_words(b, 4, imm),
    };
    S::set(cpu, i.r0, r);
    S::enter(cpu);
    Ok(())
}

/// `pextrw r32/r64, mm/xmm, imm8`: the word, zero-extended.
fn pextrw<S: Space, W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let v = S::get(cpu, i.r1);
    let k = (i.imm as usize) & (S::BYTES / 2 - 1);
    W::set(&mut cpu.gpr, i.r0, lane::<16>(v, k));
    S::enter(cpu);
    Ok(())
}

/// `pinsrw mm/xmm, r32/m16, imm8`.
fn pinsrw<S: Space, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let w = if MEM {
        cpu.read_mem::<W16>(i)?
    } else {
        W16::get(&cpu.gpr, i.r1)
    };
    let k = (i.imm as usize) & (S::BYTES / 2 - 1);
    let a = S::get(cpu, i.r0);
    let r = (a & !(0xffffu128 << (16 * k))) | u128::from(w) << (16 * k);
    S::set(cpu, i.r0, r);
    S::enter(cpu);
    Ok(())
}

/// `pmovmskb r32/r64, mm/xmm`: the byte sign bits.
fn pmovmskb<S: Space, W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let v = S::get(cpu, i.r1);
    let m = (0..S::BYTES).fold(0u64, |m, k| m | (((v >> (8 * k + 7)) & 1) as u64) << k);
    W::set(&mut cpu.gpr, i.r0, m);
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
    both!("Paddb", PADDB);
    both!("Paddw", PADDW);
    both!("Paddd", PADDD);
    both!("Paddq", PADDQ);
    both!("Psubb", PSUBB);
    both!("Psubw", PSUBW);
    both!("Psubd", PSUBD);
    both!("Psubq", PSUBQ);
    both!("Paddsb", PADDSB);
    both!("Paddsw", PADDSW);
    both!("Paddusb", PADDUSB);
    both!("Paddusw", PADDUSW);
    both!("Psubsb", PSUBSB);
    both!("Psubsw", PSUBSW);
    both!("Psubusb", PSUBUSB);
    both!("Psubusw", PSUBUSW);
    both!("Pmullw", PMULLW);
    both!("Pmulhw", PMULHW);
    both!("Pmulhuw", PMULHUW);
    both!("Pmuludq", PMULUDQ);
    both!("Pmaddwd", PMADDWD);
    both!("Pand", PAND);
    both!("Pandn", PANDN);
    both!("Por", POR);
    both!("Pxor", PXOR);
    both!("Pcmpeqb", PCMPEQB);
    both!("Pcmpeqw", PCMPEQW);
    both!("Pcmpeqd", PCMPEQD);
    both!("Pcmpgtb", PCMPGTB);
    both!("Pcmpgtw", PCMPGTW);
    both!("Pcmpgtd", PCMPGTD);
    both!("Pavgb", PAVGB);
    both!("Pavgw", PAVGW);
    both!("Pmaxub", PMAXUB);
    both!("Pmaxsw", PMAXSW);
    both!("Pminub", PMINUB);
    both!("Pminsw", PMINSW);
    both!("Psadbw", PSADBW);
    both!("Psllw", PSLLW);
    both!("Pslld", PSLLD);
    both!("Psllq", PSLLQ);
    both!("Psrlw", PSRLW);
    both!("Psrld", PSRLD);
    both!("Psrlq", PSRLQ);
    both!("Psraw", PSRAW);
    both!("Psrad", PSRAD);
    both!("Punpckhbw", PUNPCKHBW);
    both!("Punpckhwd", PUNPCKHWD);
    both!("Punpckhdq", PUNPCKHDQ);
    both!("Packsswb", PACKSSWB);
    both!("Packssdw", PACKSSDW);
    both!("Packuswb", PACKUSWB);
    rm!(t, "Punpcklbw_mm_mmm32", unpack_low_mm, [PUNPCKLBW]);
    rm!(t, "Punpcklwd_mm_mmm32", unpack_low_mm, [PUNPCKLWD]);
    rm!(t, "Punpckldq_mm_mmm32", unpack_low_mm, [PUNPCKLDQ]);
    rm!(t, "Punpcklbw_xmm_xmmm128", binop, [Xmm, PUNPCKLBW]);
    rm!(t, "Punpcklwd_xmm_xmmm128", binop, [Xmm, PUNPCKLWD]);
    rm!(t, "Punpckldq_xmm_xmmm128", binop, [Xmm, PUNPCKLDQ]);
    rm!(t, "Punpcklqdq_xmm_xmmm128", binop, [Xmm, PUNPCKLQDQ]);
    rm!(t, "Punpckhqdq_xmm_xmmm128", binop, [Xmm, PUNPCKHQDQ]);

    macro_rules! imm_shift {
        ($name:literal, $op:ident) => {
            t.add(c(concat!($name, "_mm_imm8")), shift_imm::<Mm, $op>);
            t.add(c(concat!($name, "_xmm_imm8")), shift_imm::<Xmm, $op>);
        };
    }
    imm_shift!("Psllw", PSLLW);
    imm_shift!("Pslld", PSLLD);
    imm_shift!("Psllq", PSLLQ);
    imm_shift!("Psrlw", PSRLW);
    imm_shift!("Psrld", PSRLD);
    imm_shift!("Psrlq", PSRLQ);
    imm_shift!("Psraw", PSRAW);
    imm_shift!("Psrad", PSRAD);
    t.add(c("Pslldq_xmm_imm8"), byte_shift::<true>);
    t.add(c("Psrldq_xmm_imm8"), byte_shift::<false>);

    rm!(t, "Pshufw_mm_mmm64_imm8", pshuf, [Mm, PSHUFW]);
    rm!(t, "Pshufd_xmm_xmmm128_imm8", pshuf, [Xmm, PSHUFD]);
    rm!(t, "Pshuflw_xmm_xmmm128_imm8", pshuf, [Xmm, PSHUFLW]);
    rm!(t, "Pshufhw_xmm_xmmm128_imm8", pshuf, [Xmm, PSHUFHW]);

    t.add(c("Pextrw_r32_mm_imm8"), pextrw::<Mm, W32>);
    t.add(c("Pextrw_r64_mm_imm8"), pextrw::<Mm, W64>);
    t.add(c("Pextrw_r32_xmm_imm8"), pextrw::<Xmm, W32>);
    t.add(c("Pextrw_r64_xmm_imm8"), pextrw::<Xmm, W64>);
    rm!(t, "Pinsrw_mm_r32m16_imm8", pinsrw, [Mm]);
    rm!(t, "Pinsrw_mm_r64m16_imm8", pinsrw, [Mm]);
    rm!(t, "Pinsrw_xmm_r32m16_imm8", pinsrw, [Xmm]);
    rm!(t, "Pinsrw_xmm_r64m16_imm8", pinsrw, [Xmm]);
    t.add(c("Pmovmskb_r32_mm"), pmovmskb::<Mm, W32>);
    t.add(c("Pmovmskb_r64_mm"), pmovmskb::<Mm, W64>);
    t.add(c("Pmovmskb_r32_xmm"), pmovmskb::<Xmm, W32>);
    t.add(c("Pmovmskb_r64_xmm"), pmovmskb::<Xmm, W64>);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(lanes: [u16; 8]) -> u128 {
        lanes
            .iter()
            .enumerate()
            .fold(0, |r, (k, &w)| r | u128::from(w) << (16 * k))
    }

    #[test]
    fn saturating_adds_clamp_per_lane() {
        let a = x([0x7fff, 0x8000, 0xffff, 1, 0, 0, 0, 0]);
        let b = x([1, 0xffff, 1, 1, 0, 0, 0, 0]);
        assert_eq!(
            apply(PADDSW, a, b, 16),
            x([0x7fff, 0x8000, 0, 2, 0, 0, 0, 0])
        );
        assert_eq!(
            apply(PADDUSW, a, b, 16),
            x([0x8000, 0xffff, 0xffff, 2, 0, 0, 0, 0])
        );
        assert_eq!(apply(PSUBUSB, 0x0105, 0x0206, 16), 0);
        assert_eq!(apply(PSUBSB, 0x80, 0x01, 16), 0x80, "-128 - 1 saturates");
    }

    #[test]
    fn multiplies_take_the_right_halves() {
        let a = x([0x8000, 3, 0xffff, 0, 0, 0, 0, 0]);
        let b = x([0x8000, 5, 0xffff, 0, 0, 0, 0, 0]);
        assert_eq!(apply(PMULLW, a, b, 16), x([0, 15, 1, 0, 0, 0, 0, 0]));
        assert_eq!(apply(PMULHW, a, b, 16), x([0x4000, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(
            apply(PMULHUW, a, b, 16),
            x([0x4000, 0, 0xfffe, 0, 0, 0, 0, 0])
        );
        // pmaddwd: (-32768 × -32768) × 2 wraps to 0x8000_0000.
        assert_eq!(apply(PMADDWD, 0x8000_8000, 0x8000_8000, 16), 0x8000_0000);
        assert_eq!(
            apply(PMULUDQ, 0xffff_ffff_ffff_ffff, 0x1_0000_0002, 16),
            0x1_ffff_fffe
        );
    }

    #[test]
    fn shifts_past_the_lane_width_clear_or_fill_sign() {
        let a = x([0x8001, 0x7fff, 0, 0, 0, 0, 0, 0]);
        assert_eq!(apply(PSRAW, a, 16, 16), x([0xffff, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(
            apply(PSRAW, a, 1 << 40, 16),
            x([0xffff, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(apply(PSLLW, a, 16, 16), 0);
        assert_eq!(apply(PSLLW, a, 1, 16), x([2, 0xfffe, 0, 0, 0, 0, 0, 0]));
        assert_eq!(apply(PSRLQ, u128::MAX, 63, 16), 1 | 1 << 64);
    }

    #[test]
    fn unpacks_and_packs_depend_on_the_register_width() {
        let a = 0x0807_0605_0403_0201u128;
        let b = 0x1817_1615_1413_1211u128;
        // MMX punpcklbw uses the low 4 bytes of each; XMM the low 8.
        assert_eq!(apply(PUNPCKLBW, a, b, 8) as u64, 0x1404_1303_1202_1101);
        assert_eq!(apply(PUNPCKHBW, a, b, 8) as u64, 0x1808_1707_1606_1505);
        assert_eq!(apply(PUNPCKLBW, a, b, 16) >> 64, 0x1808_1707_1606_1505);
        assert_eq!(apply(PUNPCKLQDQ, a, b, 16), a | b << 64);
        // packsswb: MMX packs 4 words of a then 4 of b.
        let w = x([0x7fff, 0x8000, 5, 0xfffb, 0, 0, 0, 0]);
        assert_eq!(apply(PACKSSWB, w, w, 8) as u64, 0xfb05_807f_fb05_807f);
        assert_eq!(apply(PACKUSWB, w, 0, 8) as u64, 0x0000_0000_0005_00ff);
    }

    #[test]
    fn sad_sums_each_quadword() {
        let a = 0x00ff_0000_0000_0010u128 | 5u128 << 64;
        let b = 0x0000_0000_0000_0001u128 | 9u128 << 64;
        assert_eq!(apply(PSADBW, a, b, 16), (0xff + 0xf) | (4u128 << 64));
    }

    #[test]
    fn word_shuffles_keep_the_other_half() {
        let v = x([0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            shuffle_words(v, 0, 0b00_01_10_11),
            x([3, 2, 1, 0, 4, 5, 6, 7])
        );
        assert_eq!(
            shuffle_words(v, 4, 0b00_00_00_11),
            x([0, 1, 2, 3, 7, 4, 4, 4])
        );
    }
}
