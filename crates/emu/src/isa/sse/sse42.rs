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
fn flag_bits(s: &StrCmp) -> u64 {
    let f = |on: bool, bit: u64| if on { bit } else { 0 };
    f(s.res != 0, CF) | f(s.lb < s.n, ZF) | f(s.la < s.n, SF) | f(s.res & 1 != 0, OF)
}

/// The index output: the least (imm bit 6 clear) or most significant
/// result bit, `n` when none.
fn index(s: &StrCmp, imm: u64) -> u32 {
    if s.res == 0 {
        s.n
    } else if imm & 0x40 != 0 {
        31 - s.res.leading_zeros()
    } else {
        s.res.trailing_zeros()
    }
}

/// The mask output: the result bits (imm bit 6 clear) or each bit widened
/// to an element mask.
fn mask(s: &StrCmp, imm: u64) -> u128 {
    if imm & 0x40 == 0 {
        return u128::from(s.res);
    }
    let e = 128 / s.n;
    let ones = (1u128 << e) - 1;
    (0..s.n).fold(0u128, |v, k| {
        if s.res >> k & 1 != 0 {
            v | ones << (k * e)
        } else {
            v
        }
    })
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
    W32::set(&mut cpu.gpr, 1, u64::from(index(&s, i.imm)));
    cpu.flags.set_bits(flag_bits(&s));
    Ok(())
}

/// pcmpestrm/pcmpistrm: XMM0 = the result bits (imm bit 6 clear) or each
/// bit widened to an element mask.
fn pcmpstrm<W: Width, const EXPLICIT: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let s = operands::<W, EXPLICIT, MEM>(cpu, i)?;
    Xmm::set(cpu, 0, mask(&s, i.imm));
    cpu.flags.set_bits(flag_bits(&s));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::flags::{AF, OSZAPC, PF};

    /// The host's ECX, XMM0 and flags after pcmpistri, pcmpistrm,
    /// pcmpestri and pcmpestrm with immediate `IMM` (lengths in EAX/EDX).
    fn host<const IMM: u8>(a: u128, b: u128, la: i32, lb: i32) -> [(u32, u128, u64); 4] {
        let mut out = [(0u32, 0u128, 0u64); 4];
        macro_rules! one {
            ($k:expr, $insn:literal) => {{
                use core::arch::x86_64::__m128i;
                let (ecx, f): (u32, u64);
                let x0: __m128i;
                // SAFETY: u128 and __m128i have the same size.
                let va = unsafe { std::mem::transmute::<u128, __m128i>(a) };
                // SAFETY: as above.
                let vb = unsafe { std::mem::transmute::<u128, __m128i>(b) };
                // SAFETY: register-only SSE4.2 instruction (the caller
                // checked the feature); flags read through the stack.
                unsafe {
                    core::arch::asm!(
                        "xor ecx, ecx",
                        "pxor xmm0, xmm0",
                        concat!($insn, " {a}, {b}, {imm}"),
                        "pushfq",
                        "pop {f}",
                        a = in(xmm_reg) va,
                        b = in(xmm_reg) vb,
                        imm = const IMM,
                        f = out(reg) f,
                        in("eax") la,
                        in("edx") lb,
                        out("ecx") ecx,
                        out("xmm0") x0,
                    );
                }
                // SAFETY: as above.
                let x0 = unsafe { std::mem::transmute::<__m128i, u128>(x0) };
                out[$k] = (ecx, x0, f & OSZAPC);
            }};
        }
        one!(0, "pcmpistri");
        one!(1, "pcmpistrm");
        one!(2, "pcmpestri");
        one!(3, "pcmpestrm");
        out
    }

    fn check<const IMM: u8>(a: u128, b: u128, la: i32, lb: i32) {
        let h = host::<IMM>(a, b, la, lb);
        let imm = u64::from(IMM);
        let n = if imm & 1 != 0 { 8 } else { 16 };
        let implicit = compare(a, b, implicit_len(a, imm, n), implicit_len(b, imm, n), imm);
        let explicit = compare(
            a,
            b,
            u64::from(la.unsigned_abs()).min(u64::from(n)) as u32,
            u64::from(lb.unsigned_abs()).min(u64::from(n)) as u32,
            imm,
        );
        let what = format!("imm {IMM:#x} a {a:#034x} b {b:#034x} la {la} lb {lb}");
        assert_eq!(h[0].0, index(&implicit, imm), "pcmpistri ecx, {what}");
        assert_eq!(h[0].2, flag_bits(&implicit), "pcmpistri flags, {what}");
        assert_eq!(h[1].1, mask(&implicit, imm), "pcmpistrm xmm0, {what}");
        assert_eq!(h[1].2, flag_bits(&implicit), "pcmpistrm flags, {what}");
        assert_eq!(h[2].0, index(&explicit, imm), "pcmpestri ecx, {what}");
        assert_eq!(h[2].2, flag_bits(&explicit), "pcmpestri flags, {what}");
        assert_eq!(h[3].1, mask(&explicit, imm), "pcmpestrm xmm0, {what}");
        assert_eq!(h[3].2, flag_bits(&explicit), "pcmpestrm flags, {what}");
        assert_eq!(flag_bits(&explicit) & (AF | PF), 0);
    }

    type Check = fn(u128, u128, i32, i32);
    const CHECKS: [Check; 128] = [
        check::<0>,
        check::<1>,
        check::<2>,
        check::<3>,
        check::<4>,
        check::<5>,
        check::<6>,
        check::<7>,
        check::<8>,
        check::<9>,
        check::<10>,
        check::<11>,
        check::<12>,
        check::<13>,
        check::<14>,
        check::<15>,
        check::<16>,
        check::<17>,
        check::<18>,
        check::<19>,
        check::<20>,
        check::<21>,
        check::<22>,
        check::<23>,
        check::<24>,
        check::<25>,
        check::<26>,
        check::<27>,
        check::<28>,
        check::<29>,
        check::<30>,
        check::<31>,
        check::<32>,
        check::<33>,
        check::<34>,
        check::<35>,
        check::<36>,
        check::<37>,
        check::<38>,
        check::<39>,
        check::<40>,
        check::<41>,
        check::<42>,
        check::<43>,
        check::<44>,
        check::<45>,
        check::<46>,
        check::<47>,
        check::<48>,
        check::<49>,
        check::<50>,
        check::<51>,
        check::<52>,
        check::<53>,
        check::<54>,
        check::<55>,
        check::<56>,
        check::<57>,
        check::<58>,
        check::<59>,
        check::<60>,
        check::<61>,
        check::<62>,
        check::<63>,
        check::<64>,
        check::<65>,
        check::<66>,
        check::<67>,
        check::<68>,
        check::<69>,
        check::<70>,
        check::<71>,
        check::<72>,
        check::<73>,
        check::<74>,
        check::<75>,
        check::<76>,
        check::<77>,
        check::<78>,
        check::<79>,
        check::<80>,
        check::<81>,
        check::<82>,
        check::<83>,
        check::<84>,
        check::<85>,
        check::<86>,
        check::<87>,
        check::<88>,
        check::<89>,
        check::<90>,
        check::<91>,
        check::<92>,
        check::<93>,
        check::<94>,
        check::<95>,
        check::<96>,
        check::<97>,
        check::<98>,
        check::<99>,
        check::<100>,
        check::<101>,
        check::<102>,
        check::<103>,
        check::<104>,
        check::<105>,
        check::<106>,
        check::<107>,
        check::<108>,
        check::<109>,
        check::<110>,
        check::<111>,
        check::<112>,
        check::<113>,
        check::<114>,
        check::<115>,
        check::<116>,
        check::<117>,
        check::<118>,
        check::<119>,
        check::<120>,
        check::<121>,
        check::<122>,
        check::<123>,
        check::<124>,
        check::<125>,
        check::<126>,
        check::<127>,
    ];

    /// Every immediate (bit 7 is ignored) on string-like operands: a small
    /// alphabet, so matches, partial matches, ranges and early ends are
    /// common, with explicit lengths around and past the register.
    #[test]
    fn string_compares_match_the_host_for_every_immediate() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const ALPHABET: [u8; 6] = [0, b'a', b'b', b'c', 0x80, 0xff];
        for _ in 0..300 {
            let mut v = [0u128; 2];
            for x in v.iter_mut() {
                for k in 0..16 {
                    let byte = ALPHABET[(next() % 6) as usize];
                    // Mostly no NUL, sometimes one or more.
                    let byte = if byte == 0 && next() % 3 != 0 {
                        b'a'
                    } else {
                        byte
                    };
                    *x |= u128::from(byte) << (8 * k);
                }
            }
            let la = (next() % 40) as i32 - 20;
            let lb = (next() % 40) as i32 - 20;
            for c in CHECKS {
                c(v[0], v[1], la, lb);
            }
        }
    }
}
