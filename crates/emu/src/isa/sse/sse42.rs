//! SSE4.2 on XMM registers: the packed string compares (pcmpestri,
//! pcmpestrm, pcmpistri, pcmpistrm) and pcmpgtq. crc32 (a GPR
//! instruction) is in `isa/ext.rs`.
//!
//! The string compares follow the SDM's description (volume 2, 4.1):
//! the immediate picks the element format, the aggregation (equal any,
//! ranges, equal each, equal ordered), the polarity and the output
//! (index of the least or most significant set bit into ECX; bit mask or
//! element mask into XMM0). Their memory operand needs no alignment.

use super::int::{lane, map};
use super::ssse3::ext_check;
use super::{Space, Xmm, load128, rm, src};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::{CF, OF, SF, ZF};
use crate::cpu::width::{W32, W64, Width};
use crate::decode::{Insn, Table};

/// The result of the aggregation and polarity steps.
struct StrCmp {
    /// IntRes2, one bit per element.
    res: u32,
    /// Elements per register (16 bytes or 8 words).
    n: u32,
    /// Valid lengths of the two operands.
    la: u32,
    lb: u32,
}

/// Element `k` of `v` in the immediate's format (sign-extended when
/// signed).
#[inline(always)]
fn elem(v: u128, k: u32, imm: u64) -> i64 {
    let words = imm & 1 != 0;
    let signed = imm & 2 != 0;
    let x = if words {
        lane::<16>(v, k as usize)
    } else {
        lane::<8>(v, k as usize)
    };
    match (words, signed) {
        (false, true) => x as u8 as i8 as i64,
        (true, true) => x as u16 as i16 as i64,
        _ => x as i64,
    }
}

/// The implicit length: the index of the first zero element, or `n`.
fn implicit_len(v: u128, imm: u64, n: u32) -> u32 {
    (0..n).find(|&k| elem(v, k, imm) == 0).unwrap_or(n)
}

/// An explicit length from RAX/RDX (EAX/EDX without REX.W): its absolute
/// value, saturated to `n`.
fn explicit_len<W: Width>(cpu: &Cpu, r: u8, n: u32) -> u32 {
    let v = W::sext(W::get(&cpu.gpr, r)) as i64;
    v.unsigned_abs().min(u64::from(n)) as u32
}

fn compare(a: u128, b: u128, la: u32, lb: u32, imm: u64) -> StrCmp {
    let n = if imm & 1 != 0 { 8 } else { 16 };
    let ea = |k: u32| elem(a, k, imm);
    let eb = |k: u32| elem(b, k, imm);
    let mut res1 = 0u32;
    match (imm >> 2) & 3 {
        // Equal any: b[j] is one of a's valid elements.
        0 => {
            for j in 0..lb {
                if (0..la).any(|i| ea(i) == eb(j)) {
                    res1 |= 1 << j;
                }
            }
        }
        // Ranges: a holds (low, high) pairs.
        1 => {
            for j in 0..lb {
                let hit = (0..n / 2).any(|p| {
                    let (lo, hi) = (2 * p, 2 * p + 1);
                    hi < la && ea(lo) <= eb(j) && eb(j) <= ea(hi)
                });
                if hit {
                    res1 |= 1 << j;
                }
            }
        }
        // Equal each: element-wise; both invalid counts as equal.
        2 => {
            for k in 0..n {
                let eq = match (k < la, k < lb) {
                    (true, true) => ea(k) == eb(k),
                    (false, false) => true,
                    _ => false,
                };
                if eq {
                    res1 |= 1 << k;
                }
            }
        }
        // Equal ordered: a (as a substring) starts at b[j].
        _ => {
            for j in 0..n {
                let hit = (0..n - j).all(|k| {
                    if k >= la {
                        true
                    } else if j + k >= lb {
                        false
                    } else {
                        ea(k) == eb(j + k)
                    }
                });
                if hit {
                    res1 |= 1 << j;
                }
            }
        }
    }
    let all = (1u32 << n) - 1;
    let valid_b = (1u32 << lb) - 1;
    let res = match (imm >> 4) & 3 {
        1 => !res1 & all,
        3 => (res1 ^ valid_b) & all,
        _ => res1,
    };
    StrCmp { res, n, la, lb }
}

/// The flags every string compare sets: CF (any result bit), ZF (b is
/// shorter than a register), SF (a is), OF (result bit 0); AF = PF = 0.
fn set_flags(cpu: &mut Cpu, s: &StrCmp) {
    let f = |on: bool, bit: u64| if on { bit } else { 0 };
    cpu.flags.set_bits(
        f(s.res != 0, CF) | f(s.lb < s.n, ZF) | f(s.la < s.n, SF) | f(s.res & 1 != 0, OF),
    );
}

/// The operands and lengths of one string compare (`EXPLICIT`: from
/// RAX/RDX as `W`).
#[inline(always)]
fn operands<W: Width, const EXPLICIT: bool, const MEM: bool>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Res<StrCmp> {
    ext_check::<Xmm>(cpu)?;
    let b = if MEM {
        load128::<false>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let a = Xmm::get(cpu, i.r0);
    let imm = i.imm & 0xff;
    let n = if imm & 1 != 0 { 8 } else { 16 };
    let (la, lb) = if EXPLICIT {
        (explicit_len::<W>(cpu, 0, n), explicit_len::<W>(cpu, 2, n))
    } else {
        (implicit_len(a, imm, n), implicit_len(b, imm, n))
    };
    Ok(compare(a, b, la, lb, imm))
}

/// pcmpestri/pcmpistri: ECX = index of the least (imm bit 6 clear) or
/// most significant result bit, `n` when none.
fn pcmpstri<W: Width, const EXPLICIT: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let s = operands::<W, EXPLICIT, MEM>(cpu, i)?;
    let idx = if s.res == 0 {
        s.n
    } else if i.imm & 0x40 != 0 {
        31 - s.res.leading_zeros()
    } else {
        s.res.trailing_zeros()
    };
    W32::set(&mut cpu.gpr, 1, u64::from(idx));
    set_flags(cpu, &s);
    Ok(())
}

/// pcmpestrm/pcmpistrm: XMM0 = the result bits (imm bit 6 clear) or each
/// bit widened to an element mask.
fn pcmpstrm<W: Width, const EXPLICIT: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let s = operands::<W, EXPLICIT, MEM>(cpu, i)?;
    let v = if i.imm & 0x40 == 0 {
        u128::from(s.res)
    } else {
        let e = 128 / s.n;
        let ones = (1u128 << e) - 1;
        (0..s.n).fold(0u128, |v, k| {
            if s.res >> k & 1 != 0 {
                v | ones << (k * e)
            } else {
                v
            }
        })
    };
    Xmm::set(cpu, 0, v);
    set_flags(cpu, &s);
    Ok(())
}

fn pcmpgtq<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let r = map::<64>(
        a,
        b,
        |x, y| {
            if (x as i64) > (y as i64) { u64::MAX } else { 0 }
        },
    );
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    rm!(t, "Pcmpgtq_xmm_xmmm128", pcmpgtq);
    rm!(t, "Pcmpestri_xmm_xmmm128_imm8", pcmpstri, [W32, true]);
    rm!(t, "Pcmpestri64_xmm_xmmm128_imm8", pcmpstri, [W64, true]);
    rm!(t, "Pcmpestrm_xmm_xmmm128_imm8", pcmpstrm, [W32, true]);
    rm!(t, "Pcmpestrm64_xmm_xmmm128_imm8", pcmpstrm, [W64, true]);
    rm!(t, "Pcmpistri_xmm_xmmm128_imm8", pcmpstri, [W32, false]);
    rm!(t, "Pcmpistrm_xmm_xmmm128_imm8", pcmpstrm, [W32, false]);
}
