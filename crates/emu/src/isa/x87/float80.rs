//! Software 80-bit extended precision, as the x87 computes it.
//!
//! Correctly rounded `+ - * / sqrt` in the four rounding modes under the
//! x87 precision control (24/53/64-bit significands with the full 15-bit
//! exponent), conversions to and from the memory formats, and the x87's
//! special cases: exception flags in FSW bit positions, C1 ("rounded up"),
//! denormal and pseudo-denormal operands, unsupported encodings (unnormals,
//! pseudo-NaN/infinity) as invalid operands, the QNaN indefinite, NaN
//! selection by larger significand, and the bias-adjusted results of
//! unmasked overflow/underflow. The model follows Berkeley SoftFloat's
//! `floatx80`; the tests compare it bit for bit with the host FPU.

use std::cmp::Ordering;

use crate::cpu::fpu::F80;

/// Exception flags, in their FSW (and FCW mask) bit positions.
pub const IE: u16 = 0x01;
pub const DE: u16 = 0x02;
pub const ZE: u16 = 0x04;
pub const OE: u16 = 0x08;
pub const UE: u16 = 0x10;
pub const PE: u16 = 0x20;

/// The exponent bias adjustment applied to results of unmasked
/// overflow/underflow stored to a register.
const WRAP: i32 = 24576;

const BIAS: i32 = 16383;
const EXT_EMIN: i32 = 1 - BIAS;
const EXT_EMAX: i32 = BIAS;

/// Rounding control (FCW bits 10..11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rc {
    Nearest,
    Down,
    Up,
    Zero,
}

/// The control word one operation runs under, and what it raised.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    pub fcw: u16,
    /// Exceptions raised (IE..PE).
    pub exc: u16,
    /// The inexact result was rounded away from zero.
    pub c1: bool,
    /// A memory operand was a denormal in its own format; DE is raised
    /// at the operation's DE priority point.
    pub src_denormal: bool,
}

impl Env {
    pub fn new(fcw: u16) -> Env {
        Env {
            fcw,
            exc: 0,
            c1: false,
            src_denormal: false,
        }
    }

    pub fn rc(&self) -> Rc {
        match (self.fcw >> 10) & 3 {
            0 => Rc::Nearest,
            1 => Rc::Down,
            2 => Rc::Up,
            _ => Rc::Zero,
        }
    }

    /// Significand bits the precision control asks for.
    pub fn prec(&self) -> u32 {
        match (self.fcw >> 8) & 3 {
            0 => 24,
            2 => 53,
            // 1 is reserved; the hardware rounds to 64 bits.
            _ => 64,
        }
    }

    #[inline]
    pub fn raise(&mut self, e: u16) {
        self.exc |= e;
    }

    #[inline]
    fn masked(&self, e: u16) -> bool {
        self.fcw & e != 0
    }

    /// Raised exceptions whose mask bit is clear.
    pub fn unmasked(&self) -> u16 {
        self.exc & !self.fcw & 0x3f
    }

    /// An unmasked invalid, denormal or zero-divide exception: the
    /// instruction must not write its result.
    pub fn blocked(&self) -> bool {
        self.unmasked() & (IE | DE | ZE) != 0
    }
}

/// What an 80-bit encoding holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Zero,
    /// Exponent field 0, nonzero significand (including pseudo-denormals).
    Denormal,
    Normal,
    Inf,
    QNan,
    SNan,
    /// Unnormals, pseudo-NaNs and pseudo-infinities: invalid operands.
    Unsupported,
}

impl F80 {
    pub const ZERO: F80 = F80 {
        signif: 0,
        sign_exp: 0,
    };
    pub const ONE: F80 = F80 {
        signif: 1 << 63,
        sign_exp: 0x3fff,
    };
    pub const INF: F80 = F80 {
        signif: 1 << 63,
        sign_exp: 0x7fff,
    };
    /// The QNaN indefinite: the default result of an invalid operation.
    pub const INDEFINITE: F80 = F80 {
        signif: 0xc000_0000_0000_0000,
        sign_exp: 0xffff,
    };

    pub fn new(sign: bool, exp: u16, signif: u64) -> F80 {
        F80 {
            signif,
            sign_exp: (u16::from(sign) << 15) | (exp & 0x7fff),
        }
    }

    #[inline]
    pub fn sign(self) -> bool {
        self.sign_exp & 0x8000 != 0
    }

    #[inline]
    pub fn exp(self) -> u16 {
        self.sign_exp & 0x7fff
    }

    pub fn negated(self) -> F80 {
        F80 {
            signif: self.signif,
            sign_exp: self.sign_exp ^ 0x8000,
        }
    }

    pub fn abs(self) -> F80 {
        F80 {
            signif: self.signif,
            sign_exp: self.sign_exp & 0x7fff,
        }
    }

    pub fn with_sign(self, sign: bool) -> F80 {
        F80::new(sign, self.exp(), self.signif)
    }

    pub fn kind(self) -> Kind {
        let j = self.signif >> 63 != 0;
        match self.exp() {
            0 if self.signif == 0 => Kind::Zero,
            0 => Kind::Denormal,
            0x7fff if !j => Kind::Unsupported,
            0x7fff if self.signif << 1 == 0 => Kind::Inf,
            0x7fff if self.signif & (1 << 62) != 0 => Kind::QNan,
            0x7fff => Kind::SNan,
            _ if j => Kind::Normal,
            _ => Kind::Unsupported,
        }
    }

    /// A denormal proper: exponent field 0, J bit clear (not a
    /// pseudo-denormal).
    pub fn is_true_denormal(self) -> bool {
        self.kind() == Kind::Denormal && self.signif >> 63 == 0
    }

    pub fn is_nan(self) -> bool {
        matches!(self.kind(), Kind::QNan | Kind::SNan)
    }

    /// The NaN with its quiet bit set.
    pub fn quiet(self) -> F80 {
        F80 {
            signif: self.signif | (1 << 62),
            sign_exp: self.sign_exp,
        }
    }
}

/// A finite nonzero value: sign × sig × 2^(e − 63), `sig` normalised.
#[derive(Debug, Clone, Copy)]
struct Fin {
    sign: bool,
    e: i32,
    sig: u64,
}

/// Unpacks a normal, denormal or pseudo-denormal value.
fn fin(x: F80) -> Fin {
    let lz = x.signif.leading_zeros();
    let exp = i32::from(x.exp().max(1));
    Fin {
        sign: x.sign(),
        e: exp - BIAS - lz as i32,
        sig: x.signif << lz,
    }
}

/// Shift right, ORing any bits shifted out into bit 0.
fn shr_jam(x: u128, n: u32) -> u128 {
    if n == 0 {
        x
    } else if n < 128 {
        (x >> n) | u128::from(x << (128 - n) != 0)
    } else {
        u128::from(x != 0)
    }
}

/// A destination format: significand bits and normal exponent range.
#[derive(Debug, Clone, Copy)]
pub struct Fmt {
    pub p: u32,
    pub emin: i32,
    pub emax: i32,
}

pub const F32: Fmt = Fmt {
    p: 24,
    emin: -126,
    emax: 127,
};
pub const F64: Fmt = Fmt {
    p: 53,
    emin: -1022,
    emax: 1023,
};

impl Fmt {
    /// The extended format at precision `p`.
    pub fn ext(p: u32) -> Fmt {
        Fmt {
            p,
            emin: EXT_EMIN,
            emax: EXT_EMAX,
        }
    }
}

/// A rounded value: sign × sig × 2^(e − 63); `sig` has bit 63 set when
/// normal, else it is a denormal (or zero) at `e = emin`.
#[derive(Debug, Clone, Copy)]
pub struct Rnd {
    pub sign: bool,
    pub e: i32,
    pub sig: u64,
    pub inf: bool,
}

impl Rnd {
    fn to_f80(self) -> F80 {
        if self.inf {
            return F80::INF.with_sign(self.sign);
        }
        let exp = if self.sig >> 63 != 0 {
            (self.e + BIAS) as u16
        } else {
            0
        };
        F80::new(self.sign, exp, self.sig)
    }

    /// Packs into a binary interchange format with `p` significand bits and
    /// `ebits` exponent bits.
    fn to_bin(self, p: u32, ebits: u32) -> u64 {
        let sign = u64::from(self.sign) << (p - 1 + ebits);
        let emask = (1u64 << ebits) - 1;
        if self.inf {
            return sign | (emask << (p - 1));
        }
        let bias = (1i32 << (ebits - 1)) - 1;
        let mant = self.sig >> (64 - p);
        let exp = if mant >> (p - 1) != 0 {
            (self.e + bias) as u64
        } else {
            0
        };
        sign | (exp << (p - 1)) | (mant & ((1u64 << (p - 1)) - 1))
    }
}

/// Rounds a 128-bit significand to `p` bits: (rounded, carried out,
/// inexact, incremented).
fn round_sig(sig: u128, p: u32, rc: Rc, sign: bool) -> (u128, bool, bool, bool) {
    let lsb_pos = 128 - p;
    let mask = (1u128 << lsb_pos) - 1;
    let rem = sig & mask;
    let trunc = sig & !mask;
    if rem == 0 {
        return (sig, false, false, false);
    }
    let half = 1u128 << (lsb_pos - 1);
    let inc = match rc {
        Rc::Nearest => rem > half || (rem == half && (trunc >> lsb_pos) & 1 != 0),
        Rc::Zero => false,
        Rc::Up => !sign,
        Rc::Down => sign,
    };
    if !inc {
        return (trunc, false, true, false);
    }
    match trunc.checked_add(1u128 << lsb_pos) {
        Some(r) => (r, false, true, true),
        None => (1u128 << 127, true, true, true),
    }
}

/// Rounds sign × sig × 2^(e − 127) (`sig` normalised, nonzero) into
/// `fmt`, raising PE/UE/OE and setting C1. `wrap`: the destination is a
/// register, so unmasked overflow/underflow deliver the bias-adjusted
/// result; otherwise they only raise the flag (the caller stores nothing).
pub fn round(env: &mut Env, sign: bool, e: i32, sig: u128, fmt: Fmt, wrap: bool) -> Rnd {
    let rc = env.rc();
    let (r, carry, inexact, up) = round_sig(sig, fmt.p, rc, sign);
    let e_r = e + i32::from(carry);
    let normal = |env: &mut Env, e: i32| {
        if inexact {
            env.raise(PE);
            env.c1 = up;
        }
        Rnd {
            sign,
            e,
            sig: (r >> 64) as u64,
            inf: false,
        }
    };
    // Tininess is detected after rounding (as SoftFloat's 8086 model does).
    if e_r < fmt.emin {
        if !env.masked(UE) {
            env.raise(UE);
            if !wrap {
                // A memory destination is left alone: only the flag.
                return Rnd {
                    sign,
                    e: e_r,
                    sig: 0,
                    inf: false,
                };
            }
            if e_r + WRAP >= fmt.emin {
                return normal(env, e_r + WRAP);
            }
            // Beyond even the adjusted range (fscale): a signed zero.
            env.raise(PE);
            env.c1 = false;
            return Rnd {
                sign,
                e: fmt.emin,
                sig: 0,
                inf: false,
            };
        }
        let d = shr_jam(sig, (fmt.emin - e) as u32);
        let (r, _, inexact, up) = round_sig(d, fmt.p, rc, sign);
        if inexact {
            env.raise(UE | PE);
            env.c1 = up;
        }
        return Rnd {
            sign,
            e: fmt.emin,
            sig: (r >> 64) as u64,
            inf: false,
        };
    }
    if e_r > fmt.emax {
        if !env.masked(OE) {
            env.raise(OE);
            if !wrap {
                return Rnd {
                    sign,
                    e: e_r,
                    sig: 0,
                    inf: false,
                };
            }
            if e_r - WRAP <= fmt.emax {
                return normal(env, e_r - WRAP);
            }
            // Beyond even the adjusted range (fscale): a signed infinity
            // whatever the rounding mode.
            env.raise(PE);
            env.c1 = true;
            return Rnd {
                sign,
                e: 0,
                sig: 0,
                inf: true,
            };
        }
        env.raise(OE | PE);
        let to_inf = match rc {
            Rc::Nearest => true,
            Rc::Zero => false,
            Rc::Up => !sign,
            Rc::Down => sign,
        };
        env.c1 = to_inf;
        if to_inf {
            return Rnd {
                sign,
                e: 0,
                sig: 0,
                inf: true,
            };
        }
        let max = !0u64 << (64 - fmt.p);
        return Rnd {
            sign,
            e: fmt.emax,
            sig: max,
            inf: false,
        };
    }
    normal(env, e_r)
}

/// Rounds into the extended format at the precision control's width.
fn round_ext(env: &mut Env, sign: bool, e: i32, sig: u128) -> F80 {
    let p = env.prec();
    round(env, sign, e, sig, Fmt::ext(p), true).to_f80()
}

/// Rounds into the extended format at full 64-bit precision (instructions
/// the precision control does not affect).
pub fn round64(env: &mut Env, sign: bool, e: i32, sig: u128) -> F80 {
    round(env, sign, e, sig, Fmt::ext(64), true).to_f80()
}

/// `x` unpacked as a 128-bit significand with bit 127 set.
fn wide(x: Fin) -> (bool, i32, u128) {
    (x.sign, x.e, u128::from(x.sig) << 64)
}

/// The NaN result for two operands of which at least one is a NaN.
fn propagate2(env: &mut Env, a: F80, b: F80) -> F80 {
    let (ka, kb) = (a.kind(), b.kind());
    if ka == Kind::SNan || kb == Kind::SNan {
        env.raise(IE);
    }
    match (a.is_nan(), b.is_nan()) {
        (true, false) => a.quiet(),
        (false, true) => b.quiet(),
        _ if ka == Kind::SNan && kb == Kind::QNan => b,
        _ if ka == Kind::QNan && kb == Kind::SNan => a,
        _ => {
            let (qa, qb) = (a.quiet(), b.quiet());
            match qa.signif.cmp(&qb.signif) {
                Ordering::Less => qb,
                Ordering::Greater => qa,
                Ordering::Equal if qa.sign_exp < qb.sign_exp => qa,
                Ordering::Equal => qb,
            }
        }
    }
}

/// The NaN result for one NaN operand.
pub fn propagate1(env: &mut Env, a: F80) -> F80 {
    if a.kind() == Kind::SNan {
        env.raise(IE);
    }
    a.quiet()
}

/// Invalid-operand and NaN screening for two operands: `Some(result)` when
/// the operation is decided by them. Raises DE for denormal operands.
fn screen2(env: &mut Env, a: F80, b: F80) -> Option<F80> {
    let (ka, kb) = (a.kind(), b.kind());
    if ka == Kind::Unsupported || kb == Kind::Unsupported {
        env.raise(IE);
        return Some(F80::INDEFINITE);
    }
    if a.is_nan() || b.is_nan() {
        return Some(propagate2(env, a, b));
    }
    None
}

/// Raises DE if either operand is denormal; true when it is unmasked (the
/// instruction stops there).
fn denormal(env: &mut Env, a: F80, b: F80) -> bool {
    if a.kind() == Kind::Denormal || b.kind() == Kind::Denormal || env.src_denormal {
        env.raise(DE);
        return !env.masked(DE);
    }
    false
}

fn invalid(env: &mut Env) -> F80 {
    env.raise(IE);
    F80::INDEFINITE
}

/// The sign of an exact zero sum of opposite-signed values.
fn zero_sum_sign(env: &Env) -> bool {
    env.rc() == Rc::Down
}

/// a + b (or a − b with `negate_b`), rounded under the precision control.
pub fn add(env: &mut Env, a: F80, b: F80) -> F80 {
    add_signed(env, a, b, false)
}

pub fn sub(env: &mut Env, a: F80, b: F80) -> F80 {
    add_signed(env, a, b, true)
}

fn add_signed(env: &mut Env, a: F80, b: F80, negate_b: bool) -> F80 {
    if let Some(r) = screen2(env, a, b) {
        return r;
    }
    let b = if negate_b { b.negated() } else { b };
    let (ka, kb) = (a.kind(), b.kind());
    if ka == Kind::Inf && kb == Kind::Inf && a.sign() != b.sign() {
        return invalid(env);
    }
    if denormal(env, a, b) {
        return a;
    }
    match (ka, kb) {
        (Kind::Inf, _) => return a,
        (_, Kind::Inf) => return b,
        (Kind::Zero, Kind::Zero) => {
            let sign = if a.sign() == b.sign() {
                a.sign()
            } else {
                zero_sum_sign(env)
            };
            return F80::ZERO.with_sign(sign);
        }
        (Kind::Zero, _) => {
            let (s, e, m) = wide(fin(b));
            return round_ext(env, s, e, m);
        }
        (_, Kind::Zero) => {
            let (s, e, m) = wide(fin(a));
            return round_ext(env, s, e, m);
        }
        _ => {}
    }
    let (x, y) = (fin(a), fin(b));
    // x has the larger exponent; both significands keep one bit of headroom.
    let (x, y) = if x.e >= y.e { (x, y) } else { (y, x) };
    let mx = u128::from(x.sig) << 63;
    let my = shr_jam(u128::from(y.sig) << 63, (x.e - y.e) as u32);
    let (sign, sum) = if x.sign == y.sign {
        (x.sign, mx + my)
    } else if mx >= my {
        (x.sign, mx - my)
    } else {
        (y.sign, my - mx)
    };
    if sum == 0 {
        return F80::ZERO.with_sign(zero_sum_sign(env));
    }
    let lz = sum.leading_zeros();
    round_ext(env, sign, x.e + 1 - lz as i32, sum << lz)
}

pub fn mul(env: &mut Env, a: F80, b: F80) -> F80 {
    if let Some(r) = screen2(env, a, b) {
        return r;
    }
    let sign = a.sign() != b.sign();
    match (a.kind(), b.kind()) {
        (Kind::Inf, Kind::Zero) | (Kind::Zero, Kind::Inf) => return invalid(env),
        _ if denormal(env, a, b) => return a,
        (Kind::Inf, _) | (_, Kind::Inf) => return F80::INF.with_sign(sign),
        (Kind::Zero, _) | (_, Kind::Zero) => return F80::ZERO.with_sign(sign),
        _ => {}
    }
    let (x, y) = (fin(a), fin(b));
    let prod = u128::from(x.sig) * u128::from(y.sig);
    let lz = prod.leading_zeros();
    round_ext(env, sign, x.e + y.e + 1 - lz as i32, prod << lz)
}

pub fn div(env: &mut Env, a: F80, b: F80) -> F80 {
    if let Some(r) = screen2(env, a, b) {
        return r;
    }
    let sign = a.sign() != b.sign();
    match (a.kind(), b.kind()) {
        (Kind::Inf, Kind::Inf) | (Kind::Zero, Kind::Zero) => return invalid(env),
        (Kind::Inf, Kind::Zero) => return F80::INF.with_sign(sign),
        (_, Kind::Zero) => {
            env.raise(ZE);
            return F80::INF.with_sign(sign);
        }
        _ if denormal(env, a, b) => return a,
        (Kind::Inf, _) => return F80::INF.with_sign(sign),
        (_, Kind::Inf) => return F80::ZERO.with_sign(sign),
        (Kind::Zero, _) => return F80::ZERO.with_sign(sign),
        _ => {}
    }
    let (x, y) = (fin(a), fin(b));
    let (q, e) = div_sig(x.sig, y.sig);
    round_ext(env, sign, x.e - y.e + e, q)
}

/// The quotient of two normalised significands as a 128-bit significand
/// (bit 127 set, sticky in bit 0) and the exponent of its top bit.
fn div_sig(a: u64, b: u64) -> (u128, i32) {
    let (num, e) = if a >= b {
        (u128::from(a) << 63, 0)
    } else {
        (u128::from(a) << 64, -1)
    };
    let b = u128::from(b);
    let q1 = num / b;
    let r1 = num % b;
    let q2 = (r1 << 64) / b;
    let r2 = (r1 << 64) % b;
    ((q1 << 64) | q2 | u128::from(r2 != 0), e)
}

pub fn sqrt(env: &mut Env, a: F80) -> F80 {
    match a.kind() {
        Kind::Unsupported => invalid(env),
        Kind::QNan | Kind::SNan => propagate1(env, a),
        Kind::Zero => a,
        Kind::Inf if !a.sign() => a,
        _ if a.sign() => invalid(env),
        _ if denormal(env, a, a) => a,
        _ => {
            let x = fin(a);
            let (r, e) = sqrt_sig(x.sig, x.e);
            round_ext(env, false, e, r)
        }
    }
}

/// sqrt(sig × 2^(e − 63)) as a 128-bit significand with sticky bit and the
/// exponent of its top bit.
fn sqrt_sig(sig: u64, e: i32) -> (u128, i32) {
    // m × 2^-126 is in [1, 4): its root is in [1, 2) with 63 fraction bits.
    let (m, half) = if e & 1 == 0 {
        (u128::from(sig) << 63, e / 2)
    } else {
        (u128::from(sig) << 64, (e - 1) / 2)
    };
    let r = m.isqrt();
    let rem = m - r * r;
    // The root is irrational unless rem is 0, so it never lies exactly
    // halfway: rem > r means the fraction is above one half.
    let guard = u128::from(rem > r);
    let sticky = u128::from(rem != 0);
    ((r << 64) | (guard << 63) | sticky, half)
}

/// The result of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Less,
    Equal,
    Greater,
    Unordered,
}

/// Compares `a` with `b`. `quiet` (fucom*): only SNaN operands raise IE;
/// otherwise any NaN does. Unsupported operands always raise IE.
pub fn compare(env: &mut Env, a: F80, b: F80, quiet: bool) -> Cmp {
    let (ka, kb) = (a.kind(), b.kind());
    if ka == Kind::Unsupported || kb == Kind::Unsupported {
        env.raise(IE);
        return Cmp::Unordered;
    }
    if a.is_nan() || b.is_nan() {
        if !quiet || ka == Kind::SNan || kb == Kind::SNan {
            env.raise(IE);
        }
        return Cmp::Unordered;
    }
    denormal(env, a, b);
    match total_cmp(a, b) {
        Ordering::Less => Cmp::Less,
        Ordering::Equal => Cmp::Equal,
        Ordering::Greater => Cmp::Greater,
    }
}

/// Orders two non-NaN supported values numerically (±0 equal).
fn total_cmp(a: F80, b: F80) -> Ordering {
    let za = a.kind() == Kind::Zero;
    let zb = b.kind() == Kind::Zero;
    if za && zb {
        return Ordering::Equal;
    }
    if a.sign() != b.sign() || za || zb {
        let key = |x: F80, z: bool| {
            if z {
                0
            } else if x.sign() {
                -1
            } else {
                1
            }
        };
        return key(a, za).cmp(&key(b, zb));
    }
    // Same sign, both nonzero: compare magnitudes (pseudo-denormals count
    // as exponent 1).
    let mag = |x: F80| (x.exp().max(1), x.signif);
    let m = if a.kind() == Kind::Inf || b.kind() == Kind::Inf {
        (a.kind() == Kind::Inf).cmp(&(b.kind() == Kind::Inf))
    } else {
        let (ea, eb) = (mag(a), mag(b));
        // A denormal with exponent field 0 and J clear is smaller than any
        // pseudo-denormal; (max(1), signif) orders both correctly.
        ea.cmp(&eb)
    };
    if a.sign() { m.reverse() } else { m }
}

// ---- conversions -------------------------------------------------------

/// Widens an IEEE binary value with `p` significand bits and `ebits`
/// exponent bits exactly. SNaNs stay signalling and a denormal only sets
/// `env.src_denormal`: the arithmetic decides what they raise.
fn from_bin(env: &mut Env, bits: u64, p: u32, ebits: u32) -> F80 {
    let sign = (bits >> (p - 1 + ebits)) & 1 != 0;
    let emask = (1u64 << ebits) - 1;
    let exp = (bits >> (p - 1)) & emask;
    let mant = bits & ((1u64 << (p - 1)) - 1);
    let bias = (1i32 << (ebits - 1)) - 1;
    let frac = mant << (64 - p);
    if exp == emask {
        return F80::new(sign, 0x7fff, (1 << 63) | frac);
    }
    if exp == 0 {
        if mant == 0 {
            return F80::ZERO.with_sign(sign);
        }
        env.src_denormal = true;
        let lz = frac.leading_zeros();
        let e = 1 - bias - lz as i32;
        return F80::new(sign, (e + BIAS) as u16, frac << lz);
    }
    F80::new(sign, (exp as i32 - bias + BIAS) as u16, (1 << 63) | frac)
}

/// fld m32/m64: DE for a denormal (the value is loaded even when DE is
/// unmasked), IE and a quieted NaN for an SNaN.
pub fn load(env: &mut Env, x: F80) -> F80 {
    if std::mem::take(&mut env.src_denormal) {
        env.raise(DE);
    }
    if x.kind() == Kind::SNan {
        env.raise(IE);
        return x.quiet();
    }
    x
}

/// An m32 operand as an extended value.
pub fn from_f32(env: &mut Env, bits: u32) -> F80 {
    from_bin(env, u64::from(bits), 24, 8)
}

/// An m64 operand as an extended value.
pub fn from_f64(env: &mut Env, bits: u64) -> F80 {
    from_bin(env, bits, 53, 11)
}

/// An integer as an extended value (always exact).
pub fn from_i64(v: i64) -> F80 {
    if v == 0 {
        return F80::ZERO;
    }
    let m = v.unsigned_abs();
    let lz = m.leading_zeros();
    F80::new(v < 0, (BIAS + 63 - lz as i32) as u16, m << lz)
}

/// Narrows to a binary format for a store (rounded by RC, not PC).
fn to_bin(env: &mut Env, x: F80, fmt: Fmt, ebits: u32) -> u64 {
    let p = fmt.p;
    let sign_bit = 1u64 << (p - 1 + ebits);
    let emask = (1u64 << ebits) - 1;
    let s = if x.sign() { sign_bit } else { 0 };
    match x.kind() {
        Kind::Zero => s,
        Kind::Inf => s | (emask << (p - 1)),
        Kind::Unsupported => {
            env.raise(IE);
            sign_bit | (emask << (p - 1)) | (1 << (p - 2))
        }
        Kind::QNan | Kind::SNan => {
            let q = propagate1(env, x);
            s | (emask << (p - 1)) | ((q.signif << 1) >> (64 - p + 1))
        }
        // Stores do not raise DE for an extended denormal source.
        _ => {
            let (sign, e, m) = wide(fin(x));
            round(env, sign, e, m, fmt, false).to_bin(p, ebits)
        }
    }
}

pub fn to_f32(env: &mut Env, x: F80) -> u32 {
    to_bin(env, x, F32, 8) as u32
}

pub fn to_f64(env: &mut Env, x: F80) -> u64 {
    to_bin(env, x, F64, 11)
}

/// Rounds a finite value to an integer magnitude by `rc`: (|value| as
/// u128, inexact, incremented).
fn int_round(x: Fin, rc: Rc) -> (u128, bool, bool) {
    // Fixed point with 64 fraction bits; |x| < 2^16384 but anything
    // above 2^64 only needs to stay above every integer range.
    let shift = x.e + 1;
    let v: u128 = if shift > 64 {
        u128::MAX
    } else if shift >= 0 {
        u128::from(x.sig) << shift
    } else {
        shr_jam(u128::from(x.sig), (-shift) as u32)
    };
    let int = v >> 64;
    let frac = v as u64;
    if frac == 0 {
        return (int, false, false);
    }
    let half = 1u64 << 63;
    let inc = match rc {
        Rc::Nearest => frac > half || (frac == half && int & 1 != 0),
        Rc::Zero => false,
        Rc::Up => !x.sign,
        Rc::Down => x.sign,
    };
    (int + u128::from(inc), true, inc)
}

/// fist/fistp/fisttp: the value as a `bits`-wide two's complement integer
/// (16, 32 or 64), rounded by RC or truncated. Out of range, NaN, infinity
/// and unsupported raise IE and give the integer indefinite.
pub fn to_int(env: &mut Env, x: F80, bits: u32, truncate: bool) -> u64 {
    let indefinite = 1u64 << (bits - 1);
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    match x.kind() {
        Kind::Zero => 0,
        Kind::Inf | Kind::QNan | Kind::SNan | Kind::Unsupported => {
            env.raise(IE);
            indefinite
        }
        _ => {
            let f = fin(x);
            let rc = if truncate { Rc::Zero } else { env.rc() };
            let (m, inexact, up) = int_round(f, rc);
            let limit = if f.sign {
                1u128 << (bits - 1)
            } else {
                (1u128 << (bits - 1)) - 1
            };
            if m > limit {
                env.raise(IE);
                return indefinite;
            }
            if inexact {
                env.raise(PE);
                env.c1 = up;
            }
            let v = m as u64;
            (if f.sign { v.wrapping_neg() } else { v }) & mask
        }
    }
}

/// frndint: rounds to an integral value by RC (precision control does not
/// apply).
pub fn round_to_int(env: &mut Env, x: F80) -> F80 {
    match x.kind() {
        Kind::Unsupported => invalid(env),
        Kind::QNan | Kind::SNan => propagate1(env, x),
        Kind::Zero | Kind::Inf => x,
        _ if denormal(env, x, x) => x,
        _ => {
            let f = fin(x);
            if f.e >= 63 {
                return x;
            }
            let (m, inexact, up) = int_round(f, env.rc());
            if inexact {
                env.raise(PE);
                env.c1 = up;
            }
            if m == 0 {
                return F80::ZERO.with_sign(f.sign);
            }
            // m ≤ 2^63 here, so it fits a significand exactly.
            let m = m as u64;
            let lz = m.leading_zeros();
            F80::new(f.sign, (BIAS + 63 - lz as i32) as u16, m << lz)
        }
    }
}

/// The packed BCD indefinite (fbstp of an invalid value).
pub const BCD_INDEFINITE: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];

/// fbld: 18 packed BCD digits and a sign byte. Digits above 9 are used as
/// their binary value, which is what the hardware's conversion does.
pub fn from_bcd(b: &[u8; 10]) -> F80 {
    let mut v: u64 = 0;
    for k in (0..9).rev() {
        v = v * 100 + u64::from(b[k] >> 4) * 10 + u64::from(b[k] & 0xf);
    }
    let r = from_i64(v as i64);
    if b[9] & 0x80 != 0 {
        r.with_sign(true)
    } else {
        r
    }
}

/// fbstp: rounds by RC; |value| ≥ 10^18, NaN, infinity or unsupported
/// raise IE and give the BCD indefinite.
pub fn to_bcd(env: &mut Env, x: F80) -> [u8; 10] {
    let mut out = [0u8; 10];
    match x.kind() {
        Kind::Zero => {
            out[9] = if x.sign() { 0x80 } else { 0 };
            out
        }
        Kind::Inf | Kind::QNan | Kind::SNan | Kind::Unsupported => {
            env.raise(IE);
            BCD_INDEFINITE
        }
        _ => {
            let f = fin(x);
            let (m, inexact, up) = int_round(f, env.rc());
            if m >= 1_000_000_000_000_000_000 {
                env.raise(IE);
                return BCD_INDEFINITE;
            }
            if inexact {
                env.raise(PE);
                env.c1 = up;
            }
            let mut v = m as u64;
            for byte in out.iter_mut().take(9) {
                let lo = (v % 10) as u8;
                v /= 10;
                let hi = (v % 10) as u8;
                v /= 10;
                *byte = (hi << 4) | lo;
            }
            out[9] = if f.sign { 0x80 } else { 0 };
            out
        }
    }
}

/// fscale: a × 2^trunc(b).
pub fn scale(env: &mut Env, a: F80, b: F80) -> F80 {
    if let Some(r) = screen2(env, a, b) {
        return r;
    }
    let (ka, kb) = (a.kind(), b.kind());
    match (ka, kb) {
        (Kind::Zero, Kind::Inf) if !b.sign() => return invalid(env),
        (Kind::Inf, Kind::Inf) if b.sign() => return invalid(env),
        _ if denormal(env, a, b) => return a,
        (Kind::Zero | Kind::Inf, _) => return a,
        (_, Kind::Zero) => return unchanged(env, a),
        (_, Kind::Inf) => {
            return if b.sign() {
                F80::ZERO.with_sign(a.sign())
            } else {
                F80::INF.with_sign(a.sign())
            };
        }
        _ => {}
    }
    let n: i32 = if kb == Kind::Zero {
        0
    } else {
        let f = fin(b);
        if f.e >= 30 {
            // Far beyond the exponent range either way.
            if f.sign { -(1 << 30) } else { 1 << 30 }
        } else if f.e < 0 {
            0
        } else {
            let m = (f.sig >> (63 - f.e)) as i32;
            if f.sign { -m } else { m }
        }
    };
    let x = fin(a);
    let (s, e, m) = wide(x);
    round64(env, s, e + n, m)
}

/// fxtract: (exponent as a value, significand with exponent 0).
/// Zero: ZE, exponent −∞. Denormals are normalised first.
pub fn extract(env: &mut Env, a: F80) -> (F80, F80) {
    match a.kind() {
        Kind::Unsupported => {
            env.raise(IE);
            (F80::INDEFINITE, F80::INDEFINITE)
        }
        Kind::QNan | Kind::SNan => {
            let q = propagate1(env, a);
            (q, q)
        }
        Kind::Zero => {
            env.raise(ZE);
            (F80::INF.with_sign(true), a)
        }
        Kind::Inf => (F80::INF, a),
        _ if denormal(env, a, a) => (a, a),
        _ => {
            let f = fin(a);
            (
                from_i64(i64::from(f.e)),
                F80::new(f.sign, BIAS as u16, f.sig),
            )
        }
    }
}

/// fprem (`ieee` = false, truncating quotient) / fprem1 (nearest). Returns
/// the (partial) remainder, the quotient's low three bits, and whether the
/// reduction is complete (C2 clear).
pub fn rem(env: &mut Env, a: F80, b: F80, ieee: bool) -> (F80, u8, bool) {
    if let Some(r) = screen2(env, a, b) {
        return (r, 0, true);
    }
    match (a.kind(), b.kind()) {
        (Kind::Inf, _) | (_, Kind::Zero) => return (invalid(env), 0, true),
        _ if denormal(env, a, b) => return (a, 0, true),
        (Kind::Zero, _) => return (a, 0, true),
        (_, Kind::Inf) => return (unchanged(env, a), 0, true),
        _ => {}
    }
    let (x, y) = (fin(a), fin(b));
    let d = x.e - y.e;
    if d < -1 || (d == -1 && (!ieee || x.sig <= y.sig)) {
        // The quotient rounds to 0: the remainder is a itself.
        return (normalize(env, x), 0, true);
    }
    if d == -1 {
        // fprem1 with |b|/2 < |a| < |b|: quotient 1, remainder |b| − |a|
        // with the opposite sign, at half b's scale.
        let r = ((u128::from(y.sig) << 1) - u128::from(x.sig)) as u64;
        return (pack_rem(env, !x.sign, y.e - 1, r), 1, true);
    }
    if d >= 64 {
        // Partial: the quotient is truncated at 2^(d − n), n in 32..=63.
        let n = 32 + (d & 31);
        let num = u128::from(x.sig) << n;
        let r = (num % u128::from(y.sig)) as u64;
        return (pack_rem(env, x.sign, y.e + d - n, r), 0, false);
    }
    let num = u128::from(x.sig) << d;
    let bb = u128::from(y.sig);
    let mut q = num / bb;
    let mut r = num % bb;
    let mut sign = x.sign;
    if ieee && (r << 1 > bb || (r << 1 == bb && q & 1 != 0)) {
        q += 1;
        r = bb - r;
        sign = !sign;
    }
    let res = if r == 0 {
        F80::ZERO.with_sign(x.sign)
    } else {
        pack_rem(env, sign, y.e, r as u64)
    };
    (res, (q & 7) as u8, true)
}

/// ST(0) left as it is (FSCALE by ±0, FPREM/FPREM1 by ±∞; the SDM's
/// tables): a pseudo-denormal comes back normalised, a denormal as it is,
/// with no underflow even when UE is unmasked (as Intel's CPUs do, the
/// vendor emu's CPUID reports; AMD's renormalise it and underflow).
fn unchanged(env: &mut Env, a: F80) -> F80 {
    if a.is_true_denormal() {
        return a;
    }
    normalize(env, fin(a))
}

/// Packs an exact remainder r × 2^(e − 63) (r unnormalised).
fn pack_rem(env: &mut Env, sign: bool, e: i32, r: u64) -> F80 {
    if r == 0 {
        return F80::ZERO.with_sign(sign);
    }
    let lz = r.leading_zeros();
    round64(env, sign, e - lz as i32, u128::from(r << lz) << 64)
}

/// An exact value re-rounded at 64 bits (only underflow can act on it).
fn normalize(env: &mut Env, x: Fin) -> F80 {
    let (s, e, m) = wide(x);
    round64(env, s, e, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_plus_one_is_two() {
        let mut env = Env::new(0x37f);
        let r = add(&mut env, F80::ONE, F80::ONE);
        assert_eq!(r, F80::new(false, 0x4000, 1 << 63));
        assert_eq!(env.exc, 0);
    }

    /// FSCALE by ±0 and FPREM/FPREM1 by ±∞ leave ST(0) as it is, a
    /// denormal included, even with underflow unmasked: only the
    /// denormal operand is flagged (the SDM, and Intel's CPUs; AMD's
    /// renormalise, so the host tests skip this corner).
    #[test]
    fn identities_leave_a_denormal_unchanged() {
        let d = F80::new(true, 0, 0x3dc8);
        // Every exception masked but underflow.
        let fcw = 0x37f & !UE;
        let mut env = Env::new(fcw);
        assert_eq!(scale(&mut env, d, F80::ZERO), d);
        assert_eq!(env.exc, DE);
        for ieee in [false, true] {
            let mut env = Env::new(fcw);
            assert_eq!(rem(&mut env, d, F80::INF, ieee), (d, 0, true));
            assert_eq!(env.exc, DE);
        }
        // A normal ST(0) too, and with every exception masked.
        let mut env = Env::new(0x37f);
        assert_eq!(
            scale(&mut env, F80::ONE, F80::ZERO.with_sign(true)),
            F80::ONE
        );
        assert_eq!(env.exc, 0);
    }
}

/// The model against the host's x87, on random operands chosen to hit
/// every class and rounding boundary, under random control words.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod host {
    use super::*;

    /// Operands in, results out; offsets are fixed for the asm below.
    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug)]
    pub(crate) struct Buf {
        pub a: [u8; 16],  // 0
        pub b: [u8; 16],  // 16
        pub r: [u8; 16],  // 32: ST0 after the instruction
        pub r2: [u8; 16], // 48: ST1 after the instruction
        pub m: [u8; 16],  // 64: memory destination
        pub fcw: u16,     // 80
        pub fsw: u16,     // 82
        pub masked: u16,  // 84
    }

    /// Runs `$insn` with ST0 = a, ST1 = b under `fcw`, then records FSW,
    /// ST0 and ST1.
    macro_rules! host {
        ($($insn:literal),*) => {{
            fn run(buf: &mut Buf) {
                buf.masked = 0x37f;
                let p: *mut Buf = buf;
                // SAFETY: the code only touches `*p` (offsets as in `Buf`)
                // and ends with fninit, leaving the x87 empty with the
                // default control word as the ABI expects.
                unsafe {
                    core::arch::asm!(
                        "fninit",
                        "fldcw word ptr [{p} + 80]",
                        "fld tbyte ptr [{p} + 16]",
                        "fld tbyte ptr [{p}]",
                        $($insn,)*
                        "fnstsw word ptr [{p} + 82]",
                        "fnclex",
                        "fldcw word ptr [{p} + 84]",
                        "fstp tbyte ptr [{p} + 32]",
                        "fstp tbyte ptr [{p} + 48]",
                        "fninit",
                        p = in(reg) p,
                        options(nostack),
                    );
                }
            }
            run as fn(&mut Buf)
        }};
    }

    fn f80(b: &[u8; 16]) -> F80 {
        F80::from_bytes(b)
    }

    fn bytes(x: F80) -> [u8; 16] {
        x.to_bytes()
    }

    /// xorshift64*: deterministic, dependency-free.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// A significand with J set, biased towards rounding boundaries.
        pub fn sig(&mut self) -> u64 {
            let r = self.next();
            let s = match self.below(8) {
                0 => r,
                1 => u64::MAX,
                2 => 0,
                // Few bits set: exact or exactly-halfway cases.
                3 => (1u64 << self.below(64)) | (1u64 << self.below(64)),
                // Patterns around the 24/53/64-bit rounding points.
                4 => {
                    let pos = [40u64, 11, 0][self.below(3) as usize];
                    let k = self.below(4);
                    (r >> pos << pos)
                        | match k {
                            0 => 0,
                            1 => 1u64.wrapping_shl(pos.saturating_sub(1) as u32),
                            2 => (1u64 << pos).wrapping_sub(1),
                            _ => r & ((1u64 << pos).wrapping_sub(1)),
                        }
                }
                5 => r >> self.below(64),
                6 => !(r >> self.below(64)),
                _ => r & !(u64::MAX >> self.below(64)),
            };
            s | (1 << 63)
        }

        pub fn f80(&mut self) -> F80 {
            let sign = self.next() & 1 != 0;
            let exp = match self.below(10) {
                0 => 0,
                1 => 0x7fff,
                2 => self.below(70) as u16,
                3 => 0x7ffe - self.below(70) as u16,
                4 => 0x3fff - 70 + self.below(140) as u16,
                _ => self.below(0x8000) as u16,
            };
            let mut sig = self.sig();
            let roll = self.below(40);
            if exp == 0 && roll < 30 {
                sig >>= 1 + self.below(63);
            }
            if exp == 0x7fff && roll < 20 {
                sig = 1 << 63;
            }
            if roll == 39 {
                sig &= !(1 << 63); // unnormal / pseudo-NaN / pseudo-infinity
            }
            if self.below(16) == 0 {
                return F80::new(sign, 0, 0);
            }
            F80::new(sign, exp, sig)
        }

        /// A pair, often with close exponents (cancellation, ties).
        pub fn pair(&mut self) -> (F80, F80) {
            let a = self.f80();
            let mut b = self.f80();
            if self.below(3) == 0 && a.exp() > 70 && a.exp() < 0x7ff0 {
                let e = a.exp() - 66 + self.below(132) as u16;
                b = F80::new(b.sign(), e, b.signif | (1 << 63));
            }
            (a, b)
        }

        pub fn fcw(&mut self) -> u16 {
            let masks = match self.below(4) {
                0 => self.below(64) as u16,
                1 => 0x3f & !(UE | OE | PE) | (self.below(8) as u16 & PE),
                _ => 0x3f,
            };
            let pc = [0u16, 2, 3, 3][self.below(4) as usize];
            0x1040 | masks | (pc << 8) | ((self.below(4) as u16) << 10)
        }
    }

    /// FSW bits an arithmetic result is compared on: exceptions, SF, ES,
    /// C0..C3 and B.
    const CMP_MASK: u16 = 0xc7ff & !0x0040;

    fn status(env: &Env, cc: u16) -> u16 {
        let mut sw = env.exc | cc;
        if env.c1 {
            sw |= 1 << 9;
        }
        if env.unmasked() != 0 {
            sw |= 0x8080;
        }
        sw
    }

    #[track_caller]
    fn check(
        name: &str,
        n: usize,
        seed: u64,
        run: fn(&mut Buf),
        model: impl Fn(&Buf) -> Buf,
        what: Fields,
    ) {
        check_with(
            name,
            n,
            seed,
            |rng| {
                let (a, b) = rng.pair();
                Buf {
                    a: bytes(a),
                    b: bytes(b),
                    fcw: rng.fcw(),
                    ..Buf::default()
                }
            },
            run,
            model,
            what,
        )
    }

    #[track_caller]
    fn check_with(
        name: &str,
        n: usize,
        seed: u64,
        mut gen_: impl FnMut(&mut Rng) -> Buf,
        run: fn(&mut Buf),
        model: impl Fn(&Buf) -> Buf,
        what: Fields,
    ) {
        let mut rng = Rng::new(seed);
        let mut fails = Vec::new();
        for _ in 0..n {
            let mut buf = gen_(&mut rng);
            let (a, b) = (f80(&buf.a), f80(&buf.b));
            let want = model(&buf);
            run(&mut buf);
            let ok = (buf.fsw & CMP_MASK) == (want.fsw & CMP_MASK)
                && (!what.r || f80(&buf.r) == f80(&want.r))
                && (!what.r2 || f80(&buf.r2) == f80(&want.r2))
                && (what.m == 0 || buf.m[..what.m] == want.m[..what.m]);
            if !ok && fails.len() < 8 {
                fails.push(format!(
                    "{name}: fcw {:#06x} a {:?} b {:?}\n  host:  fsw {:#06x} r {:?} r2 {:?} m {:02x?}\n  model: fsw {:#06x} r {:?} r2 {:?} m {:02x?}",
                    buf.fcw, a, b,
                    buf.fsw & CMP_MASK, f80(&buf.r), f80(&buf.r2), &buf.m[..what.m],
                    want.fsw & CMP_MASK, f80(&want.r), f80(&want.r2), &want.m[..what.m],
                ));
            }
        }
        assert!(fails.is_empty(), "{}", fails.join("\n"));
    }

    #[derive(Clone, Copy)]
    struct Fields {
        r: bool,
        r2: bool,
        m: usize,
    }

    const ST0: Fields = Fields {
        r: true,
        r2: false,
        m: 0,
    };
    const BOTH: Fields = Fields {
        r: true,
        r2: true,
        m: 0,
    };

    /// Model for `st0 = op(a, b)`: a blocked result leaves ST0 = a.
    fn binop(f: fn(&mut Env, F80, F80) -> F80) -> impl Fn(&Buf) -> Buf {
        move |buf| {
            let (a, b) = (f80(&buf.a), f80(&buf.b));
            let mut env = Env::new(buf.fcw);
            let r = f(&mut env, a, b);
            let r = if env.blocked() { a } else { r };
            Buf {
                r: bytes(r),
                r2: buf.b,
                fsw: status(&env, 0),
                ..*buf
            }
        }
    }

    const N: usize = 200_000;

    #[test]
    fn add_matches_host() {
        check("fadd", N, 1, host!("fadd st(0), st(1)"), binop(add), ST0);
    }

    #[test]
    fn sub_matches_host() {
        check("fsub", N, 2, host!("fsub st(0), st(1)"), binop(sub), ST0);
    }

    #[test]
    fn mul_matches_host() {
        check("fmul", N, 3, host!("fmul st(0), st(1)"), binop(mul), ST0);
    }

    #[test]
    fn div_matches_host() {
        check("fdiv", N, 4, host!("fdiv st(0), st(1)"), binop(div), ST0);
    }

    #[test]
    fn sqrt_matches_host() {
        check(
            "fsqrt",
            N,
            5,
            host!("fsqrt"),
            binop(|e, a, _| sqrt(e, a)),
            ST0,
        );
    }

    const NONE: Fields = Fields {
        r: false,
        r2: false,
        m: 0,
    };

    fn cc_of(c: Cmp) -> u16 {
        match c {
            Cmp::Greater => 0,
            Cmp::Less => 0x0100,
            Cmp::Equal => 0x4000,
            Cmp::Unordered => 0x4500,
        }
    }

    fn cmp_model(quiet: bool) -> impl Fn(&Buf) -> Buf {
        move |buf| {
            let mut env = Env::new(buf.fcw);
            let c = compare(&mut env, f80(&buf.a), f80(&buf.b), quiet);
            Buf {
                fsw: status(&env, cc_of(c)),
                ..*buf
            }
        }
    }

    #[test]
    fn fcom_matches_host() {
        check("fcom", N, 6, host!("fcom st(1)"), cmp_model(false), NONE);
    }

    #[test]
    fn fucom_matches_host() {
        check("fucom", N, 7, host!("fucom st(1)"), cmp_model(true), NONE);
    }

    fn rem_model(ieee: bool) -> impl Fn(&Buf) -> Buf {
        move |buf| {
            let (a, b) = (f80(&buf.a), f80(&buf.b));
            let mut env = Env::new(buf.fcw);
            let (r, q, done) = rem(&mut env, a, b, ieee);
            if env.blocked() {
                return Buf {
                    r: buf.a,
                    r2: buf.b,
                    fsw: status(&env, 0),
                    ..*buf
                };
            }
            let mut cc = if done { 0 } else { 0x0400 };
            if done {
                cc |= u16::from(q & 4 != 0) << 8 | u16::from(q & 2 != 0) << 14;
                env.c1 = q & 1 != 0;
            }
            Buf {
                r: bytes(r),
                r2: buf.b,
                fsw: status(&env, cc),
                ..*buf
            }
        }
    }

    /// A pair and control word outside `skip`: where Intel's and AMD's
    /// CPUs differ, the host cannot be the reference.
    fn draw_except(skip: fn(F80, F80, u16) -> bool) -> impl FnMut(&mut Rng) -> Buf {
        move |rng| loop {
            let (a, b) = rng.pair();
            let fcw = rng.fcw();
            if !skip(a, b, fcw) {
                return Buf {
                    a: bytes(a),
                    b: bytes(b),
                    fcw,
                    ..Buf::default()
                };
            }
        }
    }

    /// A denormal ST(0) passed through unchanged (by ∞ for FPREM, by 0
    /// for FSCALE) with underflow unmasked: Intel leaves it, AMD
    /// renormalises it and raises an unmasked underflow. The model
    /// follows the SDM and Intel (`identities_leave_a_denormal_unchanged`).
    fn denormal_identity(a: F80, b: F80, fcw: u16, by: Kind) -> bool {
        a.is_true_denormal() && b.kind() == by && fcw & UE == 0
    }

    #[test]
    fn fprem_matches_host() {
        let skip = |a, b, fcw| denormal_identity(a, b, fcw, Kind::Inf);
        let (host, model) = (host!("fprem"), rem_model(false));
        check_with("fprem", N, 8, draw_except(skip), host, model, BOTH);
    }

    #[test]
    fn fprem1_matches_host() {
        let skip = |a, b, fcw| denormal_identity(a, b, fcw, Kind::Inf);
        let (host, model) = (host!("fprem1"), rem_model(true));
        check_with("fprem1", N, 9, draw_except(skip), host, model, BOTH);
    }

    #[test]
    fn fscale_matches_host() {
        let skip = |a, b, fcw| denormal_identity(a, b, fcw, Kind::Zero);
        let (host, model) = (host!("fscale"), binop(scale));
        check_with("fscale", N, 10, draw_except(skip), host, model, BOTH);
    }

    #[test]
    fn frndint_matches_host() {
        check(
            "frndint",
            N,
            11,
            host!("frndint"),
            binop(|e, a, _| round_to_int(e, a)),
            BOTH,
        );
    }

    #[test]
    fn fxtract_matches_host() {
        check(
            "fxtract",
            N,
            12,
            host!("fxtract"),
            |buf| {
                let mut env = Env::new(buf.fcw);
                let (e, m) = extract(&mut env, f80(&buf.a));
                if env.blocked() {
                    return Buf {
                        r: buf.a,
                        r2: buf.b,
                        fsw: status(&env, 0),
                        ..*buf
                    };
                }
                Buf {
                    r: bytes(m),
                    r2: bytes(e),
                    fsw: status(&env, 0),
                    ..*buf
                }
            },
            BOTH,
        );
    }

    /// Model for a store of ST0 = a to memory (`len` bytes).
    fn store_model(len: usize, f: fn(&mut Env, F80) -> Vec<u8>) -> impl Fn(&Buf) -> Buf {
        move |buf| {
            let mut env = Env::new(buf.fcw);
            let v = f(&mut env, f80(&buf.a));
            let mut out = Buf {
                fsw: status(&env, 0),
                ..*buf
            };
            if env.unmasked() & (IE | DE | OE | UE) == 0 {
                out.m[..len].copy_from_slice(&v);
            }
            out
        }
    }

    const M2: Fields = Fields {
        r: false,
        r2: false,
        m: 2,
    };
    const M4: Fields = Fields {
        r: false,
        r2: false,
        m: 4,
    };
    const M8: Fields = Fields {
        r: false,
        r2: false,
        m: 8,
    };
    const M10: Fields = Fields {
        r: false,
        r2: false,
        m: 10,
    };

    #[test]
    fn fst_m32_matches_host() {
        check(
            "fst m32",
            N,
            13,
            host!("fst dword ptr [{p} + 64]"),
            store_model(4, |e, a| to_f32(e, a).to_le_bytes().to_vec()),
            M4,
        );
    }

    #[test]
    fn fst_m64_matches_host() {
        check(
            "fst m64",
            N,
            14,
            host!("fst qword ptr [{p} + 64]"),
            store_model(8, |e, a| to_f64(e, a).to_le_bytes().to_vec()),
            M8,
        );
    }

    /// Values near the integer ranges as well as anywhere.
    fn int_gen(rng: &mut Rng) -> Buf {
        let (mut a, b) = rng.pair();
        if rng.below(2) == 0 {
            let e = 0x3fff + rng.below(66) as u16;
            a = F80::new(a.sign(), e, rng.sig());
        }
        Buf {
            a: bytes(a),
            b: bytes(b),
            fcw: rng.fcw(),
            ..Buf::default()
        }
    }

    #[test]
    fn fist_matches_host() {
        check_with(
            "fist m16",
            N,
            15,
            int_gen,
            host!("fist word ptr [{p} + 64]"),
            store_model(2, |e, a| {
                (to_int(e, a, 16, false) as u16).to_le_bytes().to_vec()
            }),
            M2,
        );
        check_with(
            "fist m32",
            N,
            16,
            int_gen,
            host!("fist dword ptr [{p} + 64]"),
            store_model(4, |e, a| {
                (to_int(e, a, 32, false) as u32).to_le_bytes().to_vec()
            }),
            M4,
        );
        check_with(
            "fistp m64",
            N,
            17,
            int_gen,
            host!("fistp qword ptr [{p} + 64]"),
            store_model(8, |e, a| to_int(e, a, 64, false).to_le_bytes().to_vec()),
            M8,
        );
    }

    #[test]
    fn fisttp_matches_host() {
        check_with(
            "fisttp m16",
            N,
            18,
            int_gen,
            host!("fisttp word ptr [{p} + 64]"),
            store_model(2, |e, a| {
                (to_int(e, a, 16, true) as u16).to_le_bytes().to_vec()
            }),
            M2,
        );
        check_with(
            "fisttp m32",
            N,
            19,
            int_gen,
            host!("fisttp dword ptr [{p} + 64]"),
            store_model(4, |e, a| {
                (to_int(e, a, 32, true) as u32).to_le_bytes().to_vec()
            }),
            M4,
        );
        check_with(
            "fisttp m64",
            N,
            20,
            int_gen,
            host!("fisttp qword ptr [{p} + 64]"),
            store_model(8, |e, a| to_int(e, a, 64, true).to_le_bytes().to_vec()),
            M8,
        );
    }

    #[test]
    fn fbstp_matches_host() {
        check_with(
            "fbstp",
            N,
            21,
            int_gen,
            host!("fbstp tbyte ptr [{p} + 64]"),
            store_model(10, |e, a| to_bcd(e, a).to_vec()),
            M10,
        );
    }

    /// A binary32/64 pattern hitting every class.
    fn bin_bits(rng: &mut Rng, p: u32, ebits: u32) -> u64 {
        let emask = (1u64 << ebits) - 1;
        let exp = match rng.below(6) {
            0 => 0,
            1 => emask,
            _ => rng.below(emask + 1),
        };
        let mut mant = rng.sig() >> (64 - p + 1);
        if rng.below(4) == 0 {
            mant = 0;
        }
        (rng.next() & 1) << (p - 1 + ebits) | exp << (p - 1) | mant
    }

    /// ST0 = a, and a binary32/64 operand in `m`.
    fn mem_gen(p: u32, ebits: u32) -> impl FnMut(&mut Rng) -> Buf {
        move |rng| {
            let (a, b) = rng.pair();
            let v = bin_bits(rng, p, ebits);
            let mut m = [0u8; 16];
            m[..8].copy_from_slice(&v.to_le_bytes());
            Buf {
                a: bytes(a),
                b: bytes(b),
                m,
                fcw: rng.fcw(),
                ..Buf::default()
            }
        }
    }

    fn load_model(f: fn(&mut Env, &Buf) -> F80) -> impl Fn(&Buf) -> Buf {
        move |buf| {
            let mut env = Env::new(buf.fcw);
            let v = f(&mut env, buf);
            let v = load(&mut env, v);
            if env.unmasked() & IE != 0 {
                return Buf {
                    r: buf.a,
                    r2: buf.b,
                    fsw: status(&env, 0),
                    ..*buf
                };
            }
            Buf {
                r: bytes(v),
                r2: buf.a,
                fsw: status(&env, 0),
                ..*buf
            }
        }
    }

    fn m32(buf: &Buf) -> u32 {
        u32::from_le_bytes(buf.m[..4].try_into().unwrap_or_default())
    }

    fn m64(buf: &Buf) -> u64 {
        u64::from_le_bytes(buf.m[..8].try_into().unwrap_or_default())
    }

    #[test]
    fn fld_m32_m64_matches_host() {
        check_with(
            "fld m32",
            N,
            22,
            mem_gen(24, 8),
            host!("fld dword ptr [{p} + 64]"),
            load_model(|e, b| from_f32(e, m32(b))),
            BOTH,
        );
        check_with(
            "fld m64",
            N,
            23,
            mem_gen(53, 11),
            host!("fld qword ptr [{p} + 64]"),
            load_model(|e, b| from_f64(e, m64(b))),
            BOTH,
        );
    }

    #[test]
    fn fild_and_fbld_match_host() {
        check_with(
            "fild m64",
            N,
            24,
            mem_gen(53, 11),
            host!("fild qword ptr [{p} + 64]"),
            load_model(|_, b| from_i64(m64(b) as i64)),
            BOTH,
        );
        check_with(
            "fild m16",
            N,
            25,
            mem_gen(53, 11),
            host!("fild word ptr [{p} + 64]"),
            load_model(|_, b| from_i64(i64::from(m64(b) as i16))),
            BOTH,
        );
        let bcd = |rng: &mut Rng| {
            let mut m = [0u8; 16];
            for (k, x) in m.iter_mut().take(10).enumerate() {
                let d = |r: &mut Rng| if r.below(50) == 0 { 10 + r.below(6) } else { r.below(10) } as u8;
                *x = if k == 9 {
                    (rng.next() & 0x80) as u8
                } else {
                    d(rng) << 4 | d(rng)
                };
            }
            let (a, b) = rng.pair();
            Buf {
                a: bytes(a),
                b: bytes(b),
                m,
                fcw: rng.fcw(),
                ..Buf::default()
            }
        };
        check_with(
            "fbld",
            N,
            26,
            bcd,
            host!("fbld tbyte ptr [{p} + 64]"),
            load_model(|_, b| from_bcd(&b.m[..10].try_into().unwrap_or([0; 10]))),
            BOTH,
        );
    }

    fn memop_model(
        load: fn(&mut Env, &Buf) -> F80,
        f: fn(&mut Env, F80, F80) -> F80,
    ) -> impl Fn(&Buf) -> Buf {
        move |buf| {
            let a = f80(&buf.a);
            let mut env = Env::new(buf.fcw);
            let m = load(&mut env, buf);
            let r = f(&mut env, a, m);
            let r = if env.blocked() { a } else { r };
            Buf {
                r: bytes(r),
                r2: buf.b,
                fsw: status(&env, 0),
                ..*buf
            }
        }
    }

    #[test]
    fn arith_with_memory_operands_matches_host() {
        check_with(
            "fadd m32",
            N,
            27,
            mem_gen(24, 8),
            host!("fadd dword ptr [{p} + 64]"),
            memop_model(|e, b| from_f32(e, m32(b)), add),
            BOTH,
        );
        check_with(
            "fdivr m64",
            N,
            28,
            mem_gen(53, 11),
            host!("fdivr qword ptr [{p} + 64]"),
            memop_model(|e, b| from_f64(e, m64(b)), |e, a, m| div(e, m, a)),
            BOTH,
        );
        check_with(
            "fimul m32",
            N,
            29,
            mem_gen(24, 8),
            host!("fimul dword ptr [{p} + 64]"),
            memop_model(|_, b| from_i64(i64::from(m32(b) as i32)), mul),
            BOTH,
        );
        check_with(
            "fcom m64",
            N,
            30,
            mem_gen(53, 11),
            host!("fcom qword ptr [{p} + 64]"),
            |buf| {
                let mut env = Env::new(buf.fcw);
                let m = from_f64(&mut env, m64(buf));
                let c = compare(&mut env, f80(&buf.a), m, false);
                Buf {
                    fsw: status(&env, cc_of(c)),
                    ..*buf
                }
            },
            NONE,
        );
    }
}
