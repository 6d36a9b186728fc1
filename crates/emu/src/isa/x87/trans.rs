//! The transcendental instructions: fsin, fcos, fsincos, fptan, fpatan,
//! f2xm1, fyl2x, fyl2xp1.
//!
//! Computed in a 128-bit-significand float ([`Wf`], with sticky bits) and
//! rounded once to 64 bits. fsin/fcos/fsincos/fptan reduce their argument
//! by pi/2 exactly as the hardware does: with a 66-bit pi, so large
//! arguments give the hardware's (not the true) values. Against the host
//! most results are bit-identical and the rest one ulp away (see the
//! tests); the hardware's own algorithms are not public.

use iced_x86::Code;

use super::float80::{self, DE, Env, IE, Kind, PE, UE, ZE};
use super::{C1, C2, note, wait_check};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::fpu::F80;
use crate::decode::{Insn, Table};

/// A wide float: (−1)^neg × m × 2^(e − 127), `m` normalised or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wf {
    neg: bool,
    e: i32,
    m: u128,
}

impl Wf {
    const ZERO: Wf = Wf {
        neg: false,
        e: 0,
        m: 0,
    };
    const ONE: Wf = Wf {
        neg: false,
        e: 0,
        m: 1 << 127,
    };
    /// pi and ln 2 to 128 bits (truncated).
    const PI: Wf = Wf {
        neg: false,
        e: 1,
        m: 0xc90f_daa2_2168_c234_c4c6_628b_80dc_1cd1,
    };
    const LN2: Wf = Wf {
        neg: false,
        e: -1,
        m: 0xb172_17f7_d1cf_79ab_c9e3_b398_03f2_f6af,
    };

    fn norm(neg: bool, e: i32, m: u128) -> Wf {
        if m == 0 {
            return Wf::ZERO;
        }
        let lz = m.leading_zeros();
        Wf {
            neg,
            e: e - lz as i32,
            m: m << lz,
        }
    }

    /// A finite extended value (zero included).
    fn of(x: F80) -> Wf {
        if x.signif == 0 {
            return Wf::ZERO;
        }
        let exp = i32::from(x.exp().max(1));
        Wf::norm(x.sign(), exp - 16383, u128::from(x.signif) << 64)
    }

    fn int(v: i64) -> Wf {
        Wf::norm(v < 0, 127, u128::from(v.unsigned_abs()))
    }

    fn is_zero(self) -> bool {
        self.m == 0
    }

    fn neg(self) -> Wf {
        if self.m == 0 {
            self
        } else {
            Wf {
                neg: !self.neg,
                ..self
            }
        }
    }

    fn abs(self) -> Wf {
        Wf { neg: false, ..self }
    }

    /// × 2^k.
    fn scale(self, k: i32) -> Wf {
        if self.m == 0 {
            self
        } else {
            Wf {
                e: self.e + k,
                ..self
            }
        }
    }

    fn add(self, o: Wf) -> Wf {
        if self.m == 0 {
            return o;
        }
        if o.m == 0 {
            return self;
        }
        let (x, y) = if self.e >= o.e { (self, o) } else { (o, self) };
        let d = (x.e - y.e) as u32;
        // Bits shifted out stick in bit 0, so a tiny addend still moves
        // the sum to the right side of a rounding boundary.
        let xm = (x.m >> 1) | (x.m & 1);
        let ym = if d >= 126 {
            1
        } else {
            (y.m >> (d + 1)) | u128::from(y.m & ((1u128 << (d + 1)) - 1) != 0)
        };
        if x.neg == y.neg {
            Wf::norm(x.neg, x.e + 1, xm + ym)
        } else if xm >= ym {
            Wf::norm(x.neg, x.e + 1, xm - ym)
        } else {
            Wf::norm(y.neg, x.e + 1, ym - xm)
        }
    }

    fn sub(self, o: Wf) -> Wf {
        self.add(o.neg())
    }

    fn mul(self, o: Wf) -> Wf {
        if self.m == 0 || o.m == 0 {
            return Wf::ZERO;
        }
        let (ah, al) = (self.m >> 64, self.m & u128::from(u64::MAX));
        let (bh, bl) = (o.m >> 64, o.m & u128::from(u64::MAX));
        let hh = ah * bh;
        let hl = ah * bl;
        let lh = al * bh;
        let ll = al * bl;
        // The high 128 bits of the 256-bit product.
        let mid = (hl & u128::from(u64::MAX)) + (lh & u128::from(u64::MAX)) + (ll >> 64);
        let hi = hh + (hl >> 64) + (lh >> 64) + (mid >> 64);
        let lo_nonzero = (mid & u128::from(u64::MAX)) != 0 || (ll & u128::from(u64::MAX)) != 0;
        Wf::norm(
            self.neg != o.neg,
            self.e + o.e + 1,
            hi | u128::from(lo_nonzero),
        )
    }

    fn div(self, o: Wf) -> Wf {
        if self.m == 0 || o.m == 0 {
            return Wf::ZERO;
        }
        let d = o.m;
        let mut r = self.m;
        let mut q = 0u128;
        let mut carry = false;
        for _ in 0..128 {
            q <<= 1;
            if carry || r >= d {
                r = r.wrapping_sub(d);
                q |= 1;
            }
            carry = r >> 127 != 0;
            r <<= 1;
        }
        Wf::norm(
            self.neg != o.neg,
            self.e - o.e,
            q | u128::from(r != 0 || carry),
        )
    }

    fn sqrt(self) -> Wf {
        if self.m == 0 {
            return Wf::ZERO;
        }
        // A 53-bit start from f64 doubles its precision per Newton step:
        // self = v·2^(2h) with v in [1, 4).
        let h = self.e.div_euclid(2);
        let v =
            (self.m >> 64) as u64 as f64 / (1u64 << 63) as f64 * f64::from(1 + (self.e - 2 * h));
        let g = (v.sqrt() * (1u64 << 62) as f64) as u128;
        let mut y = Wf::norm(false, h + 65, g);
        for _ in 0..3 {
            y = y.add(self.div(y)).scale(-1);
        }
        y
    }

    /// Rounds to 64 bits; `inexact` marks a value that is not exact so the
    /// truncated tail counts as sticky.
    fn round(self, env: &mut Env, inexact: bool) -> F80 {
        if self.m == 0 {
            return F80::ZERO.with_sign(self.neg);
        }
        float80::round64(env, self.neg, self.e, self.m | u128::from(inexact))
    }
}

/// A bound on series terms: every series here converges in well under a
/// hundred, so this only guards against a logic error looping forever.
const SERIES_MAX: usize = 400;

/// A series has converged once its last term (still added, so its sign
/// reaches the low bits) is far below the sum. Stopping there keeps a
/// later term of the other sign from cancelling that sticky information.
fn converged(sum: Wf, term: Wf) -> bool {
    term.m == 0 || (sum.m != 0 && term.e < sum.e - 120)
}

/// sin and cos of |r| ≲ 1 by their Taylor series.
fn sin_cos_small(r: Wf) -> (Wf, Wf) {
    let r2 = r.mul(r);
    let (mut s, mut term) = (r, r);
    let mut n = 1i64;
    for _ in 0..SERIES_MAX {
        term = term.mul(r2).div(Wf::int((n + 1) * (n + 2))).neg();
        n += 2;
        s = s.add(term);
        if converged(s, term) {
            break;
        }
    }
    let (mut c, mut term) = (Wf::ONE, Wf::ONE);
    let mut n = 0i64;
    for _ in 0..SERIES_MAX {
        term = term.mul(r2).div(Wf::int((n + 1) * (n + 2))).neg();
        n += 2;
        c = c.add(term);
        if converged(c, term) {
            break;
        }
    }
    (s, c)
}

/// 320-bit fixed point, 256 fraction bits, little-endian limbs.
type U320 = [u64; 5];

/// pi with 256 fraction bits: the hexadecimal digits of pi (the
/// Blowfish P-array).
const PI_256: U320 = [
    0x082e_fa98_ec4e_6c89,
    0xa409_3822_299f_31d0,
    0x1319_8a2e_0370_7344,
    0x243f_6a88_85a3_08d3,
    3,
];

/// The x87 reduces by a 66-bit pi (Intel documents it; the AMD host
/// matches it too), so arguments far from 0 follow that pi, not the
/// true one.
const PI_BITS: u32 = 66;

/// pi/2 from pi truncated to `bits` significant bits.
fn half_pi(bits: u32) -> U320 {
    let mut pi = PI_256;
    // pi has two integer bits; keep bits − 2 fraction bits.
    let drop = 256u32.saturating_sub(bits.saturating_sub(2));
    for k in 0..4u32 {
        let lo = 64 * k;
        if drop >= lo + 64 {
            pi[k as usize] = 0;
        } else if drop > lo {
            pi[k as usize] &= !0u64 << (drop - lo);
        }
    }
    let mut h = [0u64; 5];
    for k in 0..5 {
        h[k] = (pi[k] >> 1) | if k < 4 { pi[k + 1] << 63 } else { 0 };
    }
    h
}

fn ge(a: &U320, b: &U320) -> bool {
    for k in (0..5).rev() {
        if a[k] != b[k] {
            return a[k] > b[k];
        }
    }
    true
}

fn sub_assign(a: &mut U320, b: &U320) {
    let mut borrow = false;
    for k in 0..5 {
        let (d, b1) = a[k].overflowing_sub(b[k]);
        let (d, b2) = d.overflowing_sub(u64::from(borrow));
        a[k] = d;
        borrow = b1 || b2;
    }
}

fn bit(a: &U320, i: u32) -> u64 {
    (a[(i / 64) as usize] >> (i % 64)) & 1
}

/// The top 128 bits of a 320-bit fixed-point value as a Wf.
fn wf_of(a: &U320, neg: bool) -> Wf {
    let Some(top) = (0..5).rev().find(|&k| a[k] != 0) else {
        return Wf::ZERO;
    };
    let lz = a[top].leading_zeros();
    let msb = top as u32 * 64 + 63 - lz;
    // Gather 128 bits starting at msb (going down).
    let mut m = 0u128;
    for k in 0..128u32 {
        m <<= 1;
        if msb >= k {
            m |= u128::from(bit(a, msb - k));
        }
    }
    Wf::norm(neg, msb as i32 - 256, m)
}

/// x = q·(pi/2) + r with |r| ≤ pi/4: (r, q mod 4). `x` finite, |x| < 2^63.
fn reduce(x: F80) -> (Wf, u32) {
    let w = Wf::of(x);
    if w.is_zero() || w.e < -1 {
        return (w, 0);
    }
    let half_pi = half_pi(PI_BITS);
    // |x| as 320-bit fixed point: sig << (193 + e), e in −1..=62.
    let shift = (193 + w.e) as u32;
    let sig = x.signif << x.signif.leading_zeros();
    let mut xs: U320 = [0; 5];
    let (limb, off) = ((shift / 64) as usize, shift % 64);
    xs[limb] = sig << off;
    if off != 0 && limb + 1 < 5 {
        xs[limb + 1] = sig >> (64 - off);
    }
    // Restoring division by pi/2, one bit of x at a time.
    let mut r: U320 = [0; 5];
    let mut q = 0u32;
    let top = shift + 63;
    for i in (0..=top).rev() {
        for k in (1..5).rev() {
            r[k] = (r[k] << 1) | (r[k - 1] >> 63);
        }
        r[0] = (r[0] << 1) | bit(&xs, i);
        q <<= 1;
        while ge(&r, &half_pi) {
            sub_assign(&mut r, &half_pi);
            q = q.wrapping_add(1);
        }
    }
    // Fold (pi/4, pi/2) down to (−pi/4, 0].
    let mut quarter = half_pi;
    for k in 0..5 {
        quarter[k] = (half_pi[k] >> 1) | if k < 4 { half_pi[k + 1] << 63 } else { 0 };
    }
    let (r, q) = if ge(&r, &quarter) {
        let mut d = half_pi;
        sub_assign(&mut d, &r);
        (wf_of(&d, true), q.wrapping_add(1))
    } else {
        (wf_of(&r, false), q)
    };
    let r = if x.sign() { r.neg() } else { r };
    let q = if x.sign() { q.wrapping_neg() } else { q };
    (r, q & 3)
}

/// (sin x, cos x) for finite |x| < 2^63.
fn sin_cos(x: F80) -> (Wf, Wf) {
    let (r, q) = reduce(x);
    let (s, c) = sin_cos_small(r);
    match q {
        0 => (s, c),
        1 => (c, s.neg()),
        2 => (s.neg(), c.neg()),
        _ => (c.neg(), s),
    }
}

/// atan(t) for any finite t.
fn atan(t: Wf) -> Wf {
    if t.is_zero() {
        return t;
    }
    if t.e >= 0 && t.abs() != Wf::ONE {
        // |t| > 1: pi/2 − atan(1/|t|).
        let a = Wf::PI.scale(-1).sub(atan(Wf::ONE.div(t.abs())));
        return if t.neg { a.neg() } else { a };
    }
    // Halve the angle twice: t / (1 + sqrt(1 + t²)).
    let mut u = t;
    for _ in 0..2 {
        u = u.div(Wf::ONE.add(Wf::ONE.add(u.mul(u)).sqrt()));
    }
    let u2 = u.mul(u);
    let (mut sum, mut pow) = (u, u);
    let mut n = 1i64;
    for _ in 0..SERIES_MAX {
        pow = pow.mul(u2).neg();
        n += 2;
        let term = pow.div(Wf::int(n));
        sum = sum.add(term);
        if converged(sum, term) {
            break;
        }
    }
    sum.scale(2)
}

/// 2·atanh(s) = ln((1 + s)/(1 − s)) for |s| < 1/2.
fn two_atanh(s: Wf) -> Wf {
    let s2 = s.mul(s);
    let (mut sum, mut pow) = (s, s);
    let mut n = 1i64;
    for _ in 0..SERIES_MAX {
        pow = pow.mul(s2);
        n += 2;
        let term = pow.div(Wf::int(n));
        sum = sum.add(term);
        if converged(sum, term) {
            break;
        }
    }
    sum.scale(1)
}

/// log2(x) for finite x > 0; exact (and flagged so) for powers of two.
fn log2(x: Wf) -> (Wf, bool) {
    // x = m·2^k with m in [sqrt(1/2), sqrt(2)).
    let mut k = x.e;
    let mut m = Wf { e: 0, ..x };
    if m.m > 0xb504_f333_f9de_6484_597d_89b3_754a_be9f {
        m = m.scale(-1);
        k += 1;
    }
    let s = m.sub(Wf::ONE).div(m.add(Wf::ONE));
    if s.is_zero() {
        return (Wf::int(i64::from(k)), true);
    }
    (Wf::int(i64::from(k)).add(two_atanh(s).div(Wf::LN2)), false)
}

/// e^y − 1 for |y| ≲ 1 by its Taylor series.
fn expm1_small(y: Wf) -> Wf {
    let (mut sum, mut term) = (y, y);
    let mut n = 1i64;
    for _ in 0..SERIES_MAX {
        n += 1;
        term = term.mul(y).div(Wf::int(n));
        sum = sum.add(term);
        if converged(sum, term) {
            break;
        }
    }
    sum
}

/// 2^x − 1 for finite x, and whether it is exact.
fn exp2m1(x: F80) -> (Wf, bool) {
    let w = Wf::of(x);
    if w.e < 0 {
        return (expm1_small(w.mul(Wf::LN2)), false);
    }
    if w.e > 15 {
        // 2^x is far outside the range: −1 (inexact) or an overflow.
        return (
            if w.neg {
                Wf::ONE.neg()
            } else {
                Wf::ONE.scale(20000)
            },
            false,
        );
    }
    // 2^x = 2^n · 2^f with n = round(x), |f| ≤ 1/2.
    let n = {
        let int = (w.m >> (127 - w.e)) as i64;
        let frac_half = (w.m << (w.e + 1)) >> 127 != 0;
        let n = int + i64::from(frac_half);
        if w.neg { -n } else { n }
    };
    let f = w.sub(Wf::int(n));
    let p = Wf::ONE.add(expm1_small(f.mul(Wf::LN2))).scale(n as i32);
    (p.sub(Wf::ONE), f.is_zero())
}

/// Raises DE for a denormal operand; true when it is unmasked, which
/// stops the instruction before anything else is raised.
fn denormal_stops(env: &mut Env) -> bool {
    env.raise(DE);
    env.unmasked() & DE != 0
}

/// Stack checks shared by the handlers: ST(0) (and ST(1) when `two`)
/// must be valid and, when `pushes`, ST(7) free. Returns false after the
/// fault response.
fn operands_ok(cpu: &mut Cpu, two: bool, pushes: bool) -> bool {
    let f = &mut cpu.fpu;
    if f.is_empty(0) || (two && f.is_empty(1)) {
        if f.underflow() {
            if two {
                f.set(1, F80::INDEFINITE);
                f.pop();
            } else {
                f.set(0, F80::INDEFINITE);
                if pushes {
                    f.push(F80::INDEFINITE);
                }
            }
        }
        return false;
    }
    if pushes && !f.is_empty(7) {
        if f.overflow() {
            f.set(0, F80::INDEFINITE);
            f.push(F80::INDEFINITE);
        }
        return false;
    }
    true
}

const SIN: u8 = 0;
const COS: u8 = 1;
const SINCOS: u8 = 2;
const TAN: u8 = 3;

/// fsin/fcos/fsincos/fptan. |x| ≥ 2^63 sets C2 and leaves ST(0) alone.
fn trig<const OP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    let pushes = OP == SINCOS || OP == TAN;
    // C2 ends clear unless the argument is out of range.
    cpu.fpu.fsw &= !C2;
    if !operands_ok(cpu, false, pushes) {
        return Ok(());
    }
    let x = cpu.fpu.get(0);
    let mut env = Env::new(cpu.fpu.fcw);
    let (a, b) = match x.kind() {
        Kind::Unsupported | Kind::Inf => {
            env.raise(IE);
            (F80::INDEFINITE, F80::INDEFINITE)
        }
        Kind::QNan | Kind::SNan => {
            let q = float80::propagate1(&mut env, x);
            (q, q)
        }
        _ if x.exp() >= 16383 + 63 => {
            cpu.fpu.fsw = (cpu.fpu.fsw & !C1) | C2;
            return Ok(());
        }
        k => {
            if k == Kind::Denormal && denormal_stops(&mut env) {
                (x, x)
            } else if k == Kind::Zero {
                // sin ±0 = ±0, cos 0 = 1, tan ±0 = ±0: exact.
                (x, F80::ONE)
            } else {
                let (s, c) = sin_cos(x);
                match OP {
                    SIN => (s.round(&mut env, true), F80::ZERO),
                    // C1 reports the sine's rounding.
                    SINCOS => {
                        let c = c.round(&mut env, true);
                        (s.round(&mut env, true), c)
                    }
                    COS => (c.round(&mut env, true), F80::ZERO),
                    _ => (s.div(c).round(&mut env, true), F80::ONE),
                }
            }
        }
    };
    let f = &mut cpu.fpu;
    if !f.apply(&env) {
        return Ok(());
    }
    match OP {
        SIN => f.set(0, a),
        COS => f.set(0, if x.kind() == Kind::Zero { F80::ONE } else { a }),
        // fsincos: ST(0) = cos, ST(1) = sin.
        SINCOS => {
            f.set(0, a);
            f.push(b);
        }
        // fptan: ST(1) = tan, ST(0) = 1 (a NaN operand pushes the NaN).
        _ => {
            f.set(0, a);
            f.push(if x.is_nan() || a == F80::INDEFINITE {
                a
            } else {
                F80::ONE
            });
        }
    }
    Ok(())
}

/// fpatan: ST(1) = atan2(ST(1), ST(0)), pop.
fn fpatan_value(env: &mut Env, y: F80, x: F80) -> F80 {
    let (ky, kx) = (y.kind(), x.kind());
    if ky == Kind::Unsupported || kx == Kind::Unsupported {
        env.raise(IE);
        return F80::INDEFINITE;
    }
    if y.is_nan() || x.is_nan() {
        return nan2(env, y, x);
    }
    if (ky == Kind::Denormal || kx == Kind::Denormal) && denormal_stops(env) {
        return y;
    }
    let pi = Wf::PI;
    let r = match (ky, kx) {
        (Kind::Zero, _) => {
            if x.sign() {
                pi.round(env, true)
            } else {
                F80::ZERO
            }
        }
        (Kind::Inf, Kind::Inf) => {
            let q = pi.scale(-2);
            if x.sign() {
                q.mul(Wf::int(3)).round(env, true)
            } else {
                q.round(env, true)
            }
        }
        (Kind::Inf, _) | (_, Kind::Zero) => pi.scale(-1).round(env, true),
        (_, Kind::Inf) => {
            if x.sign() {
                pi.round(env, true)
            } else {
                F80::ZERO
            }
        }
        _ => {
            let (wy, wx) = (Wf::of(y).abs(), Wf::of(x).abs());
            let a = if wy.e < wx.e || (wy.e == wx.e && wy.m <= wx.m) {
                atan(wy.div(wx))
            } else {
                pi.scale(-1).sub(atan(wx.div(wy)))
            };
            let a = if x.sign() { pi.sub(a) } else { a };
            a.round(env, true)
        }
    };
    r.with_sign(y.sign())
}

fn nan2(env: &mut Env, a: F80, b: F80) -> F80 {
    // Same selection as the arithmetic: add() screens NaNs first.
    let mut e = Env::new(env.fcw | 0x300);
    let r = float80::add(&mut e, a, b);
    env.exc |= e.exc;
    r
}

/// y × l rounded to 64 bits. The hardware reports these products inexact
/// even when they are exact (a power of two's logarithm), so a tiny one
/// underflows as well.
fn log_product(env: &mut Env, y: F80, l: Wf, exact: bool) -> F80 {
    let r = Wf::of(y).mul(l).round(env, !exact);
    if exact {
        env.raise(PE);
        if r.kind() == Kind::Denormal {
            env.raise(UE);
        }
    }
    r
}

/// fyl2x: ST(1) = ST(1) × log2(ST(0)), pop.
fn fyl2x_value(env: &mut Env, x: F80, y: F80) -> F80 {
    let (kx, ky) = (x.kind(), y.kind());
    if kx == Kind::Unsupported || ky == Kind::Unsupported {
        env.raise(IE);
        return F80::INDEFINITE;
    }
    if x.is_nan() || y.is_nan() {
        return nan2(env, x, y);
    }
    if x.sign() && kx != Kind::Zero {
        env.raise(IE);
        return F80::INDEFINITE;
    }
    let inf = |neg: bool| F80::INF.with_sign(neg);
    // log2(0) comes before the denormal check, as in division by zero.
    match (kx, ky) {
        (Kind::Zero, Kind::Zero) | (Kind::Inf, Kind::Zero) => {
            env.raise(IE);
            return F80::INDEFINITE;
        }
        (Kind::Zero, Kind::Inf) => return inf(!y.sign()),
        (Kind::Zero, _) => {
            env.raise(ZE);
            return inf(!y.sign());
        }
        _ => {}
    }
    if (kx == Kind::Denormal || ky == Kind::Denormal) && denormal_stops(env) {
        return y;
    }
    if kx == Kind::Inf {
        return inf(y.sign());
    }
    let (l, exact) = log2(Wf::of(x));
    match ky {
        Kind::Inf if l.is_zero() => {
            env.raise(IE);
            F80::INDEFINITE
        }
        Kind::Inf => inf(y.sign() != l.neg),
        Kind::Zero => F80::ZERO.with_sign(y.sign() != l.neg),
        _ if l.is_zero() => F80::ZERO.with_sign(y.sign()),
        _ => log_product(env, y, l, exact),
    }
}

/// fyl2xp1: ST(1) = ST(1) × log2(ST(0) + 1), pop.
fn fyl2xp1_value(env: &mut Env, x: F80, y: F80) -> F80 {
    let (kx, ky) = (x.kind(), y.kind());
    if kx == Kind::Unsupported || ky == Kind::Unsupported {
        env.raise(IE);
        return F80::INDEFINITE;
    }
    if x.is_nan() || y.is_nan() {
        return nan2(env, x, y);
    }
    if kx == Kind::Inf && x.sign() {
        env.raise(IE);
        return F80::INDEFINITE;
    }
    if (kx == Kind::Denormal || ky == Kind::Denormal) && denormal_stops(env) {
        return y;
    }
    let wx = Wf::of(x);
    match (kx, ky) {
        (Kind::Zero, Kind::Inf) | (Kind::Inf, Kind::Zero) => {
            env.raise(IE);
            F80::INDEFINITE
        }
        (Kind::Zero, _) | (_, Kind::Zero) => F80::ZERO.with_sign(x.sign() != y.sign()),
        (Kind::Inf, _) | (_, Kind::Inf) => F80::INF.with_sign(x.sign() != y.sign()),
        _ if wx.neg && wx.e >= 0 => {
            // x ≤ −1 has no logarithm: the hardware hands x back, inexact.
            env.raise(PE);
            x
        }
        _ => {
            // ln(1 + x) = 2·atanh(x / (2 + x)) keeps tiny x exact-relative.
            let (l, exact) = if wx.e < -2 {
                (two_atanh(wx.div(Wf::int(2).add(wx))).div(Wf::LN2), false)
            } else {
                log2(Wf::ONE.add(wx))
            };
            log_product(env, y, l, exact)
        }
    }
}

/// The two-operand transcendentals: ST(1) = op(ST(0), ST(1)), pop.
fn binary(cpu: &mut Cpu, i: &Insn, op: fn(&mut Env, F80, F80) -> F80) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    if !operands_ok(cpu, true, false) {
        return Ok(());
    }
    let f = &mut cpu.fpu;
    let mut env = Env::new(f.fcw);
    let r = op(&mut env, f.get(0), f.get(1));
    if f.apply(&env) {
        f.set(1, r);
        f.pop();
    }
    Ok(())
}

fn fpatan(cpu: &mut Cpu, i: &Insn) -> Res {
    binary(cpu, i, |e, x, y| fpatan_value(e, y, x))
}

fn fyl2x(cpu: &mut Cpu, i: &Insn) -> Res {
    binary(cpu, i, fyl2x_value)
}

fn fyl2xp1(cpu: &mut Cpu, i: &Insn) -> Res {
    binary(cpu, i, fyl2xp1_value)
}

/// f2xm1: ST(0) = 2^ST(0) − 1.
fn f2xm1_value(env: &mut Env, x: F80) -> F80 {
    match x.kind() {
        Kind::Unsupported => {
            env.raise(IE);
            F80::INDEFINITE
        }
        Kind::QNan | Kind::SNan => float80::propagate1(env, x),
        Kind::Zero => x,
        Kind::Inf => {
            if x.sign() {
                F80::ONE.negated()
            } else {
                x
            }
        }
        k => {
            if k == Kind::Denormal && denormal_stops(env) {
                return x;
            }
            if x.exp() >= 0x3fff && x.abs() != F80::ONE {
                // Outside −1..1 the hardware hands the operand back, inexact.
                env.raise(PE);
                return x;
            }
            let (r, exact) = exp2m1(x);
            r.round(env, !exact)
        }
    }
}

fn f2xm1(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    note(cpu, i);
    if !operands_ok(cpu, false, false) {
        return Ok(());
    }
    let f = &mut cpu.fpu;
    let mut env = Env::new(f.fcw);
    let r = f2xm1_value(&mut env, f.get(0));
    if f.apply(&env) {
        f.set(0, r);
    }
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    t.add(Code::Fsin, trig::<SIN>);
    t.add(Code::Fcos, trig::<COS>);
    t.add(Code::Fsincos, trig::<SINCOS>);
    t.add(Code::Fptan, trig::<TAN>);
    t.add(Code::Fpatan, fpatan);
    t.add(Code::Fyl2x, fyl2x);
    t.add(Code::Fyl2xp1, fyl2xp1);
    t.add(Code::F2xm1, f2xm1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: f64) -> F80 {
        let mut env = Env::new(0x37f);
        float80::from_f64(&mut env, v.to_bits())
    }

    fn to_f64(x: F80) -> f64 {
        let mut env = Env::new(0x37f);
        f64::from_bits(float80::to_f64(&mut env, x))
    }

    #[test]
    fn wide_arithmetic_is_exact_where_it_should_be() {
        let three = Wf::int(3);
        let seven = Wf::int(7);
        assert_eq!(three.mul(seven), Wf::int(21));
        assert_eq!(Wf::int(21).div(seven), three);
        assert_eq!(three.sub(seven), Wf::int(-4));
        assert_eq!(Wf::int(16).sqrt(), Wf::int(4));
    }

    #[test]
    fn sin_and_cos_match_libm_to_double_precision() {
        // Beyond a few multiples of pi/2 the hardware's 66-bit pi shows.
        for v in [0.5, 1.0, 2.0, 3.0, 10.0, 100.0, -7.25, 1e-10] {
            let (s, c) = sin_cos(f(v));
            let mut env = Env::new(0x37f);
            let (s, c) = (
                to_f64(s.round(&mut env, true)),
                to_f64(c.round(&mut env, true)),
            );
            assert!(
                (s - v.sin()).abs() <= 1e-15 * v.sin().abs().max(1e-300),
                "sin {v}: {s} vs {}",
                v.sin()
            );
            assert!(
                (c - v.cos()).abs() <= 1e-15 * v.cos().abs().max(1e-300),
                "cos {v}: {c} vs {}",
                v.cos()
            );
        }
    }

    #[test]
    fn logs_atan_and_exp_match_libm() {
        let mut env = Env::new(0x37f);
        for v in [0.1, 0.5, 1.5, 2.0, 10.0, 1e300, 3e-200] {
            let (l, _) = log2(Wf::of(f(v)));
            let l = to_f64(l.round(&mut env, true));
            assert!(
                (l - v.log2()).abs() <= 1e-15 * v.log2().abs().max(1.0),
                "log2 {v}: {l}"
            );
        }
        for v in [0.1, 0.5, 1.0, 2.0, -3.0, 1e10] {
            let a = to_f64(atan(Wf::of(f(v))).round(&mut env, true));
            assert!((a - v.atan()).abs() <= 1e-15, "atan {v}: {a}");
        }
        for v in [0.5, -0.5, 1e-5, 0.999, -1.0, 3.5, -4.25] {
            let (r, _) = exp2m1(f(v));
            let r = to_f64(r.round(&mut env, true));
            let want = (v * std::f64::consts::LN_2).exp_m1();
            assert!(
                (r - want).abs() <= 1e-15 * want.abs(),
                "2^{v}-1: {r} vs {want}"
            );
        }
    }

    #[test]
    fn powers_of_two_have_exact_logs_flagged_inexact() {
        let mut env = Env::new(0x37f);
        let r = fyl2x_value(&mut env, f(8.0), f(1.5));
        assert_eq!(to_f64(r), 4.5);
        assert_eq!(env.exc, PE, "the host flags PE even here");
        assert!(!env.c1, "not rounded");
    }
}
