//! SSE4.1 on XMM registers: blends (immediate and XMM0-variable), dot
//! products, rounding, insert/extract (insertps, extractps, pinsr*,
//! pextr*), mpsadbw, phminposuw, ptest, the sign/zero-extending moves,
//! movntdqa and the new packed integer min/max/multiply/compare/pack.
//! Float operations go through the software engine in [`super::float`]
//! (flags raised for the whole instruction before anything is written).

use super::float::{self, F32, F64, Fp, IE, PE, RC_SHIFT};
use super::int::{lane, map};
use super::ssse3::ext_check;
use super::{Space, Xmm, load128, raise, rm, src};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::{CF, ZF};
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;

#[inline(always)]
fn sx<const E: u32>(x: u64) -> i64 {
    ((x << (64 - E)) as i64) >> (64 - E)
}

const PACKUSDW: u8 = 0;
const PCMPEQQ: u8 = 1;
const PMULDQ: u8 = 2;
const PMULLD: u8 = 3;
const PMAXSB: u8 = 4;
const PMAXSD: u8 = 5;
const PMAXUD: u8 = 6;
const PMAXUW: u8 = 7;
const PMINSB: u8 = 8;
const PMINSD: u8 = 9;
const PMINUD: u8 = 10;
const PMINUW: u8 = 11;

fn apply(op: u8, a: u128, b: u128) -> u128 {
    match op {
        PACKUSDW => {
            let mut r = 0u128;
            for k in 0..8 {
                let v = if k < 4 {
                    lane::<32>(a, k)
                } else {
                    lane::<32>(b, k - 4)
                };
                let s = sx::<32>(v).clamp(0, 0xffff) as u128;
                r |= s << (16 * k);
            }
            r
        }
        PCMPEQQ => map::<64>(a, b, |x, y| if x == y { u64::MAX } else { 0 }),
        PMULDQ => map::<64>(a, b, |x, y| (sx::<32>(x) * sx::<32>(y)) as u64),
        PMULLD => map::<32>(a, b, |x, y| x.wrapping_mul(y)),
        PMAXSB => map::<8>(a, b, |x, y| if sx::<8>(x) >= sx::<8>(y) { x } else { y }),
        PMAXSD => map::<32>(a, b, |x, y| if sx::<32>(x) >= sx::<32>(y) { x } else { y }),
        PMAXUD => map::<32>(a, b, u64::max),
        PMAXUW => map::<16>(a, b, u64::max),
        PMINSB => map::<8>(a, b, |x, y| if sx::<8>(x) <= sx::<8>(y) { x } else { y }),
        PMINSD => map::<32>(a, b, |x, y| if sx::<32>(x) <= sx::<32>(y) { x } else { y }),
        PMINUD => map::<32>(a, b, u64::min),
        _ => map::<16>(a, b, u64::min),
    }
}

fn binop<const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    Xmm::set(cpu, i.r0, apply(OP, a, b));
    Ok(())
}

/// Selects `E`-bit elements of `b` where `sel(k)`, else of `a`.
#[inline(always)]
fn blend<const E: u32>(a: u128, b: u128, sel: impl Fn(usize) -> bool) -> u128 {
    let mask = if E == 64 { u64::MAX } else { (1u64 << E) - 1 };
    let mut r = 0u128;
    for k in 0..(128 / E) as usize {
        let v = if sel(k) {
            lane::<E>(b, k)
        } else {
            lane::<E>(a, k)
        };
        r |= u128::from(v & mask) << (k as u32 * E);
    }
    r
}

/// blendps/blendpd/pblendw: immediate bit k picks element k of the source.
fn blend_imm<const E: u32, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let imm = i.imm;
    Xmm::set(cpu, i.r0, blend::<E>(a, b, |k| imm >> k & 1 != 0));
    Ok(())
}

/// blendvps/blendvpd/pblendvb: the top bit of each XMM0 element picks.
fn blend_var<const E: u32, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let m = Xmm::get(cpu, 0);
    Xmm::set(
        cpu,
        i.r0,
        blend::<E>(a, b, |k| lane::<E>(m, k) >> (E - 1) != 0),
    );
    Ok(())
}

/// One element rounded to an integral value: `imm` bits 1:0 the mode
/// unless bit 2 says MXCSR.RC; bit 3 suppresses PE. SNaN → QNaN + IE.
fn round1<F: Fp>(a: u64, imm: u64, mxcsr: u32) -> (u64, u32) {
    if float::is_nan::<F>(a) {
        let flags = if float::is_snan::<F>(a) { IE } else { 0 };
        return (a | F::QUIET, flags);
    }
    let mut a = a;
    if mxcsr & float::DAZ != 0 && float::is_denormal::<F>(a) {
        a &= F::SIGN;
    }
    let rc = if imm & 4 != 0 {
        (mxcsr >> RC_SHIFT) & 3
    } else {
        (imm & 3) as u32
    };
    let r = if F::FRAC == 23 {
        let x = f32::from_bits(a as u32);
        let y = match rc {
            0 => x.round_ties_even(),
            1 => x.floor(),
            2 => x.ceil(),
            _ => x.trunc(),
        };
        u64::from(y.to_bits())
    } else {
        let x = f64::from_bits(a);
        let y = match rc {
            0 => x.round_ties_even(),
            1 => x.floor(),
            2 => x.ceil(),
            _ => x.trunc(),
        };
        y.to_bits()
    };
    let pe = if r != a && imm & 8 == 0 { PE } else { 0 };
    (r, pe)
}

#[inline(always)]
const fn bits<F: Fp>() -> u32 {
    1 + F::EXPW + F::FRAC
}

#[inline(always)]
fn el<F: Fp>(v: u128, k: u32) -> u64 {
    ((v >> (k * bits::<F>())) & ((1u128 << bits::<F>()) - 1)) as u64
}

/// roundps/roundpd.
fn round_packed<F: Fp, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let (mut r, mut flags) = (0u128, 0);
    for k in 0..128 / bits::<F>() {
        let (x, f) = round1::<F>(el::<F>(b, k), i.imm, cpu.fpu.mxcsr);
        r |= u128::from(x) << (k * bits::<F>());
        flags |= f;
    }
    raise(cpu, flags)?;
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// roundss/roundsd: the low element; the rest of the destination kept.
fn round_scalar<F: Fp, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = if MEM {
        if bits::<F>() == 32 {
            cpu.read_mem::<W32>(i)?
        } else {
            cpu.read_mem::<W64>(i)?
        }
    } else {
        el::<F>(Xmm::get(cpu, i.r1), 0)
    };
    let (x, f) = round1::<F>(b, i.imm, cpu.fpu.mxcsr);
    raise(cpu, f)?;
    let a = Xmm::get(cpu, i.r0);
    let mask = (1u128 << bits::<F>()) - 1;
    Xmm::set(cpu, i.r0, (a & !mask) | u128::from(x));
    Ok(())
}

/// dpps/dppd: products of the elements `imm[7:4]` selects (+0.0 for the
/// others), summed pairwise, written to the elements `imm[3:0]` selects.
fn dp<F: Fp, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let m = cpu.fpu.mxcsr;
    let n = 128 / bits::<F>();
    let mut flags = 0;
    let mut t = [0u64; 4];
    for k in 0..n {
        if i.imm >> (4 + k) & 1 != 0 {
            let (p, f) = float::mul::<F>(el::<F>(a, k), el::<F>(b, k), m);
            t[k as usize] = p;
            flags |= f;
        }
    }
    // Each stage (products, pair sums, final sum) settles its flags in
    // MXCSR before the next: an unmasked exception ends the instruction
    // with the earlier stages' flags kept. The sums see the rounded
    // products as operands (a denormal one is DE, or zero under DAZ).
    raise(cpu, flags)?;
    let sum = if n == 4 {
        let (s1, f1) = float::add::<F>(t[0], t[1], m);
        let (s2, f2) = float::add::<F>(t[2], t[3], m);
        raise(cpu, f1 | f2)?;
        let (s, f3) = float::add::<F>(s1, s2, m);
        raise(cpu, f3)?;
        s
    } else {
        let (s, f) = float::add::<F>(t[0], t[1], m);
        raise(cpu, f)?;
        s
    };
    let mut r = 0u128;
    for k in 0..n {
        if i.imm >> k & 1 != 0 {
            r |= u128::from(sum) << (k * bits::<F>());
        }
    }
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// insertps xmm, xmm/m32, imm: element `imm[7:6]` of the source (or the
/// m32) into element `imm[5:4]`, then zero the elements of `imm[3:0]`.
fn insertps<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let imm = i.imm & 0xff;
    let v = if MEM {
        cpu.read_mem::<W32>(i)?
    } else {
        lane::<32>(Xmm::get(cpu, i.r1), (imm >> 6) as usize)
    };
    let d = (imm >> 4 & 3) as u32;
    let mut r = Xmm::get(cpu, i.r0);
    r = (r & !(0xffff_ffffu128 << (32 * d))) | u128::from(v) << (32 * d);
    for k in 0..4 {
        if imm >> k & 1 != 0 {
            r &= !(0xffff_ffffu128 << (32 * k));
        }
    }
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// pextrb/pextrw/pextrd/pextrq/extractps r/m, xmm, imm: element `E` of
/// `imm mod (128/E)` into the r/m operand (`D` wide; registers are
/// zero-extended).
fn extract<E: Width, D: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let v = Xmm::get(cpu, i.r1);
    let k = (i.imm as usize) & (16 / E::BYTES - 1);
    let x = (v >> (k * 8 * E::BYTES)) as u64 & E::MASK;
    if MEM {
        cpu.write_mem::<E>(i, x)
    } else {
        D::set(&mut cpu.gpr, i.r0, x);
        Ok(())
    }
}

/// pinsrb/pinsrd/pinsrq xmm, r/m, imm: the low `E` bits of the operand
/// into element `imm mod (128/E)`.
fn insert<E: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let x = if MEM {
        cpu.read_mem::<E>(i)?
    } else {
        W64::get(&cpu.gpr, i.r1) & E::MASK
    };
    let k = (i.imm as usize) & (16 / E::BYTES - 1);
    let sh = k * 8 * E::BYTES;
    let a = Xmm::get(cpu, i.r0);
    let r = (a & !(u128::from(E::MASK) << sh)) | u128::from(x) << sh;
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// pmovsx*/pmovzx*: the low `128 / TO * FROM` bits of the source, each
/// `FROM`-bit element extended to `TO` bits.
fn pmov<const FROM: u32, const TO: u32, const SIGNED: bool, const MEM: bool>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Res {
    ext_check::<Xmm>(cpu)?;
    let n = 128 / TO;
    let v: u128 = if MEM {
        match n * FROM {
            16 => u128::from(cpu.read_mem::<W16>(i)?),
            32 => u128::from(cpu.read_mem::<W32>(i)?),
            _ => u128::from(cpu.read_mem::<W64>(i)?),
        }
    } else {
        Xmm::get(cpu, i.r1)
    };
    let to_mask = if TO == 64 { u64::MAX } else { (1u64 << TO) - 1 };
    let mut r = 0u128;
    for k in 0..n {
        let x = lane::<FROM>(v, k as usize);
        let y = if SIGNED {
            (((x << (64 - FROM)) as i64) >> (64 - FROM)) as u64
        } else {
            x
        };
        r |= u128::from(y & to_mask) << (k * TO);
    }
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// ptest: ZF = (dest & src) == 0, CF = (!dest & src) == 0; the other
/// arithmetic flags clear.
fn ptest<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let zf = if a & b == 0 { ZF } else { 0 };
    let cf = if !a & b == 0 { CF } else { 0 };
    cpu.flags.set_bits(zf | cf);
    Ok(())
}

/// phminposuw: the smallest unsigned word and its (lowest) index.
fn phminposuw<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let (mut best, mut at) = (lane::<16>(b, 0), 0u64);
    for k in 1..8 {
        let v = lane::<16>(b, k);
        if v < best {
            (best, at) = (v, k as u64);
        }
    }
    Xmm::set(cpu, i.r0, u128::from(best | at << 16));
    Ok(())
}

/// mpsadbw: eight sums of absolute differences of 4-byte groups: the
/// destination's bytes from `4 * imm[2]` (sliding), the source's group
/// `imm[1:0]`.
fn mpsadbw<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let b = src::<Xmm, MEM>(cpu, i)?;
    let a = Xmm::get(cpu, i.r0);
    let da = 4 * ((i.imm >> 2) & 1) as usize;
    let sb = 4 * (i.imm & 3) as usize;
    let mut r = 0u128;
    for k in 0..8 {
        let s: u64 = (0..4)
            .map(|j| lane::<8>(a, da + k + j).abs_diff(lane::<8>(b, sb + j)))
            .sum();
        r |= u128::from(s) << (16 * k);
    }
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// movntdqa xmm, m128 (aligned load; the hint is not modelled).
fn movntdqa(cpu: &mut Cpu, i: &Insn) -> Res {
    ext_check::<Xmm>(cpu)?;
    let v = load128::<true>(cpu, i)?;
    Xmm::set(cpu, i.r0, v);
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    rm!(t, "Packusdw_xmm_xmmm128", binop, [PACKUSDW]);
    rm!(t, "Pcmpeqq_xmm_xmmm128", binop, [PCMPEQQ]);
    rm!(t, "Pmuldq_xmm_xmmm128", binop, [PMULDQ]);
    rm!(t, "Pmulld_xmm_xmmm128", binop, [PMULLD]);
    rm!(t, "Pmaxsb_xmm_xmmm128", binop, [PMAXSB]);
    rm!(t, "Pmaxsd_xmm_xmmm128", binop, [PMAXSD]);
    rm!(t, "Pmaxud_xmm_xmmm128", binop, [PMAXUD]);
    rm!(t, "Pmaxuw_xmm_xmmm128", binop, [PMAXUW]);
    rm!(t, "Pminsb_xmm_xmmm128", binop, [PMINSB]);
    rm!(t, "Pminsd_xmm_xmmm128", binop, [PMINSD]);
    rm!(t, "Pminud_xmm_xmmm128", binop, [PMINUD]);
    rm!(t, "Pminuw_xmm_xmmm128", binop, [PMINUW]);
    rm!(t, "Blendps_xmm_xmmm128_imm8", blend_imm, [32]);
    rm!(t, "Blendpd_xmm_xmmm128_imm8", blend_imm, [64]);
    rm!(t, "Pblendw_xmm_xmmm128_imm8", blend_imm, [16]);
    rm!(t, "Blendvps_xmm_xmmm128", blend_var, [32]);
    rm!(t, "Blendvpd_xmm_xmmm128", blend_var, [64]);
    rm!(t, "Pblendvb_xmm_xmmm128", blend_var, [8]);
    rm!(t, "Roundps_xmm_xmmm128_imm8", round_packed, [F32]);
    rm!(t, "Roundpd_xmm_xmmm128_imm8", round_packed, [F64]);
    rm!(t, "Roundss_xmm_xmmm32_imm8", round_scalar, [F32]);
    rm!(t, "Roundsd_xmm_xmmm64_imm8", round_scalar, [F64]);
    rm!(t, "Dpps_xmm_xmmm128_imm8", dp, [F32]);
    rm!(t, "Dppd_xmm_xmmm128_imm8", dp, [F64]);
    rm!(t, "Insertps_xmm_xmmm32_imm8", insertps);
    rm!(t, "Pextrb_r32m8_xmm_imm8", extract, [W8, W32]);
    rm!(t, "Pextrb_r64m8_xmm_imm8", extract, [W8, W64]);
    rm!(t, "Pextrw_r32m16_xmm_imm8", extract, [W16, W32]);
    rm!(t, "Pextrw_r64m16_xmm_imm8", extract, [W16, W64]);
    rm!(t, "Pextrd_rm32_xmm_imm8", extract, [W32, W32]);
    rm!(t, "Pextrq_rm64_xmm_imm8", extract, [W64, W64]);
    rm!(t, "Extractps_rm32_xmm_imm8", extract, [W32, W32]);
    rm!(t, "Extractps_r64m32_xmm_imm8", extract, [W32, W64]);
    rm!(t, "Pinsrb_xmm_r32m8_imm8", insert, [W8]);
    rm!(t, "Pinsrb_xmm_r64m8_imm8", insert, [W8]);
    rm!(t, "Pinsrd_xmm_rm32_imm8", insert, [W32]);
    rm!(t, "Pinsrq_xmm_rm64_imm8", insert, [W64]);
    rm!(t, "Pmovsxbw_xmm_xmmm64", pmov, [8, 16, true]);
    rm!(t, "Pmovsxbd_xmm_xmmm32", pmov, [8, 32, true]);
    rm!(t, "Pmovsxbq_xmm_xmmm16", pmov, [8, 64, true]);
    rm!(t, "Pmovsxwd_xmm_xmmm64", pmov, [16, 32, true]);
    rm!(t, "Pmovsxwq_xmm_xmmm32", pmov, [16, 64, true]);
    rm!(t, "Pmovsxdq_xmm_xmmm64", pmov, [32, 64, true]);
    rm!(t, "Pmovzxbw_xmm_xmmm64", pmov, [8, 16, false]);
    rm!(t, "Pmovzxbd_xmm_xmmm32", pmov, [8, 32, false]);
    rm!(t, "Pmovzxbq_xmm_xmmm16", pmov, [8, 64, false]);
    rm!(t, "Pmovzxwd_xmm_xmmm64", pmov, [16, 32, false]);
    rm!(t, "Pmovzxwq_xmm_xmmm32", pmov, [16, 64, false]);
    rm!(t, "Pmovzxdq_xmm_xmmm64", pmov, [32, 64, false]);
    rm!(t, "Ptest_xmm_xmmm128", ptest);
    rm!(t, "Phminposuw_xmm_xmmm128", phminposuw);
    rm!(t, "Mpsadbw_xmm_xmmm128_imm8", mpsadbw);
    t.add(c("Movntdqa_xmm_m128"), movntdqa);
}
