//! Scalar binary32/binary64 arithmetic as SSE performs it, in software:
//! MXCSR rounding control, DAZ and FTZ, the six exception flags (tininess
//! is detected after rounding, as on x86), and the x86 NaN rules (the
//! first NaN operand wins and is quieted; invalid operations give the QNaN
//! indefinite). Every operation takes bit patterns and MXCSR and returns
//! the result bits with the flags this one element raises; nothing here
//! touches CPU state.
//!
//! Why software: host `f32`/`f64` operations round to nearest only and
//! report no flags, while guests may run in any rounding mode and read the
//! flags. Exact integer arithmetic on wide significands followed by one
//! rounding routine gives every mode and every flag bit for bit. The
//! common case (round to nearest, normal operands, a result clear of
//! overflow and underflow) still uses the host's `f32`/`f64` operations,
//! with an exactness test for PE (`fast`): no `unsafe`, no host MXCSR.

/// MXCSR exception flags (bits 0..5); the masks are the same bits << 7.
pub const IE: u32 = 1 << 0;
pub const DE: u32 = 1 << 1;
pub const ZE: u32 = 1 << 2;
pub const OE: u32 = 1 << 3;
pub const UE: u32 = 1 << 4;
pub const PE: u32 = 1 << 5;
/// Denormal operands are zero.
pub const DAZ: u32 = 1 << 6;
pub const MASK_SHIFT: u32 = 7;
pub const OM: u32 = OE << MASK_SHIFT;
pub const UM: u32 = UE << MASK_SHIFT;
pub const RC_SHIFT: u32 = 13;
/// Tiny results are zero (when underflow is masked).
pub const FTZ: u32 = 1 << 15;
/// The flags detected before computing (their unmasked forms suppress
/// every post-computation flag).
pub const PRE: u32 = IE | DE | ZE;

/// A binary floating-point format, values carried as `u64` bit patterns.
pub trait Fp: Copy + 'static {
    /// Fraction (trailing significand) bits.
    const FRAC: u32;
    /// Exponent bits.
    const EXPW: u32;
    const SIGN: u64 = 1 << (Self::FRAC + Self::EXPW);
    const EXP_MAX: u64 = (1 << Self::EXPW) - 1;
    const BIAS: i32 = (1 << (Self::EXPW - 1)) - 1;
    const QUIET: u64 = 1 << (Self::FRAC - 1);
    const FRAC_MASK: u64 = (1 << Self::FRAC) - 1;
    const INF: u64 = Self::EXP_MAX << Self::FRAC;
    /// The default NaN x86 returns for invalid operations.
    const INDEFINITE: u64 = Self::SIGN | Self::INF | Self::QUIET;
    /// The largest finite magnitude.
    const MAX: u64 = Self::INF - 1;

    /// The host's own round-to-nearest result of `op` on normal operands
    /// and whether it is inexact, when that settles everything (see
    /// `fast`); `None` sends the operation down the exact path.
    fn native(op: Op, a: u64, b: u64) -> Option<(u64, bool)>;
}

/// The operations with a native fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
}

/// The odd part of a nonzero significand product/value (exactness tests).
#[inline(always)]
fn odd(v: u128) -> u128 {
    v >> v.trailing_zeros()
}

/// The significand (with the implicit bit) of a normal binary64 value.
#[inline(always)]
fn sig64(a: u64) -> u128 {
    u128::from((a & F64::FRAC_MASK) | 1 << F64::FRAC)
}

/// TwoSum: the rounding error of `s = x + y` is zero (round to nearest).
macro_rules! sum_is_exact {
    ($x:expr, $y:expr, $s:expr) => {{
        let (x, y, s) = ($x, $y, $s);
        let yy = s - x;
        (x - (s - yy)) + (y - yy) == 0.0
    }};
}

/// binary32 (`ss`/`ps`).
#[derive(Debug, Clone, Copy)]
pub struct F32;
/// binary64 (`sd`/`pd`).
#[derive(Debug, Clone, Copy)]
pub struct F64;

impl Fp for F32 {
    const FRAC: u32 = 23;
    const EXPW: u32 = 8;

    #[inline(always)]
    fn native(op: Op, a: u64, b: u64) -> Option<(u64, bool)> {
        let (x, y) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
        // binary32 products, and the checks below, are exact in binary64.
        let (r, exact) = match op {
            Op::Add => (x + y, sum_is_exact!(x, y, x + y)),
            Op::Sub => (x - y, sum_is_exact!(x, -y, x - y)),
            Op::Mul => {
                let r = x * y;
                (r, f64::from(x) * f64::from(y) == f64::from(r))
            }
            Op::Div => {
                let r = x / y;
                (r, f64::from(r) * f64::from(y) == f64::from(x))
            }
            Op::Sqrt => {
                let r = y.sqrt();
                (r, f64::from(r) * f64::from(r) == f64::from(y))
            }
        };
        Some((u64::from(r.to_bits()), !exact))
    }
}
impl Fp for F64 {
    const FRAC: u32 = 52;
    const EXPW: u32 = 11;

    #[inline(always)]
    fn native(op: Op, a: u64, b: u64) -> Option<(u64, bool)> {
        let (x, y) = (f64::from_bits(a), f64::from_bits(b));
        let (r, exact) = match op {
            Op::Add => (x + y, sum_is_exact!(x, y, x + y)),
            Op::Sub => (x - y, sum_is_exact!(x, -y, x - y)),
            // Exact iff the significand product fits 53 bits; for ÷ and √
            // iff r × b (r × r) has a's odd part (a power-of-two factor is
            // impossible for a correctly rounded r).
            Op::Mul => {
                let r = x * y;
                (r, 128 - odd(sig64(a) * sig64(b)).leading_zeros() <= 53)
            }
            Op::Div => {
                let r = x / y;
                let rb = r.to_bits();
                if !normal::<F64>(rb) {
                    return None;
                }
                (r, odd(sig64(rb) * sig64(b)) == odd(sig64(a)))
            }
            Op::Sqrt => {
                let r = y.sqrt();
                let rb = r.to_bits();
                (r, odd(sig64(rb) * sig64(rb)) == odd(sig64(b)))
            }
        };
        Some((r.to_bits(), !exact))
    }
}

/// A normal value (neither zero, denormal, infinite nor NaN).
#[inline(always)]
fn normal<F: Fp>(a: u64) -> bool {
    let e = exp_of::<F>(a);
    e != 0 && e != F::EXP_MAX
}

/// The fast path of add/sub/mul/div/sqrt: when rounding to nearest with
/// normal operands (`b` only for √, positive) and a normal result whose
/// exponent is clear of the underflow threshold, the host's arithmetic
/// gives the result, and the only possible flag is PE. DAZ and FTZ cannot
/// matter there. Anything else takes the exact path.
#[inline(always)]
fn fast<F: Fp>(op: Op, a: u64, b: u64, m: u32) -> Option<(u64, u32)> {
    if m & (3 << RC_SHIFT) != 0 || !normal::<F>(b) || (op != Op::Sqrt && !normal::<F>(a)) {
        return None;
    }
    if op == Op::Sqrt && neg::<F>(b) {
        return None;
    }
    let (r, inexact) = F::native(op, a, b)?;
    // Exponent field 1 is excluded: a result there may be tiny before
    // being rounded up to the smallest normal (UE).
    let e = exp_of::<F>(r);
    if e < 2 || e == F::EXP_MAX {
        return None;
    }
    Some((r, if inexact { PE } else { 0 }))
}

/// MXCSR.RC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    Nearest,
    Down,
    Up,
    Zero,
}

impl Round {
    pub fn of(mxcsr: u32) -> Round {
        match (mxcsr >> RC_SHIFT) & 3 {
            0 => Round::Nearest,
            1 => Round::Down,
            2 => Round::Up,
            _ => Round::Zero,
        }
    }
}

#[inline(always)]
fn exp_of<F: Fp>(a: u64) -> u64 {
    (a >> F::FRAC) & F::EXP_MAX
}
#[inline(always)]
pub fn is_nan<F: Fp>(a: u64) -> bool {
    exp_of::<F>(a) == F::EXP_MAX && a & F::FRAC_MASK != 0
}
#[inline(always)]
pub fn is_snan<F: Fp>(a: u64) -> bool {
    is_nan::<F>(a) && a & F::QUIET == 0
}
#[inline(always)]
fn is_inf<F: Fp>(a: u64) -> bool {
    a & !F::SIGN == F::INF
}
#[inline(always)]
fn is_zero<F: Fp>(a: u64) -> bool {
    a & !F::SIGN == 0
}
#[inline(always)]
pub fn is_denormal<F: Fp>(a: u64) -> bool {
    exp_of::<F>(a) == 0 && a & F::FRAC_MASK != 0
}
#[inline(always)]
fn neg<F: Fp>(a: u64) -> bool {
    a & F::SIGN != 0
}

/// An operand after DAZ, and whether it is a denormal that counts (DE).
#[inline(always)]
fn input<F: Fp>(a: u64, m: u32) -> (u64, bool) {
    if is_denormal::<F>(a) {
        if m & DAZ != 0 {
            (a & F::SIGN, false)
        } else {
            (a, true)
        }
    } else {
        (a, false)
    }
}

/// The value of a finite nonzero operand: `sig × 2^e`, sig's top bit at 62.
#[derive(Debug, Clone, Copy)]
struct Unpacked {
    sign: bool,
    e: i32,
    sig: u64,
}

fn unpack<F: Fp>(a: u64) -> Unpacked {
    let exp = exp_of::<F>(a) as i32;
    let frac = a & F::FRAC_MASK;
    let frac_bits = F::FRAC as i32;
    if exp == 0 {
        let s = frac.leading_zeros() as i32 - 1;
        Unpacked {
            sign: neg::<F>(a),
            e: 1 - F::BIAS - frac_bits - s,
            sig: frac << s,
        }
    } else {
        Unpacked {
            sign: neg::<F>(a),
            e: exp - F::BIAS - 62,
            sig: (frac | 1 << F::FRAC) << (62 - F::FRAC),
        }
    }
}

/// Shifts right by `d`, OR-ing every bit shifted out into bit 0 (sticky).
#[inline(always)]
fn shift_right_jam(v: u128, d: i32) -> u128 {
    if d <= 0 {
        v
    } else if d >= 128 {
        u128::from(v != 0)
    } else {
        (v >> d) | u128::from(v & ((1u128 << d) - 1) != 0)
    }
}

/// Drops the low `drop` bits of `sig`, rounding by `rc`. Returns the
/// rounded value (which fits in 64 bits for every caller) and whether
/// anything nonzero was dropped.
#[inline(always)]
fn round_bits(sig: u128, drop: i32, rc: Round, sign: bool) -> (u64, bool) {
    if drop <= 0 {
        return ((sig << -drop) as u64, false);
    }
    let (q, rem_vs_half, inexact) = if drop > 128 {
        (0u128, std::cmp::Ordering::Less, sig != 0)
    } else {
        let q = if drop == 128 { 0 } else { sig >> drop };
        let rem = if drop == 128 {
            sig
        } else {
            sig & ((1u128 << drop) - 1)
        };
        (q, rem.cmp(&(1u128 << (drop - 1))), rem != 0)
    };
    let up = match rc {
        Round::Nearest => rem_vs_half.is_gt() || (rem_vs_half.is_eq() && q & 1 == 1),
        Round::Down => inexact && sign,
        Round::Up => inexact && !sign,
        Round::Zero => false,
    };
    ((q + u128::from(up)) as u64, inexact)
}

/// Rounds `±sig × 2^e` (sig ≠ 0) to `F` under MXCSR `m`: overflow to
/// infinity or the largest finite value, gradual underflow or FTZ, and the
/// OE/UE/PE flags the hardware reports (tininess after rounding; unmasked
/// OE/UE are reported for every overflowing/tiny result, with PE only when
/// the unbounded-exponent rounding was inexact).
fn round_pack<F: Fp>(sign: bool, e: i32, sig: u128, m: u32) -> (u64, u32) {
    debug_assert!(sig != 0);
    let rc = Round::of(m);
    let s = if sign { F::SIGN } else { 0 };
    let p = 127 - sig.leading_zeros() as i32;
    let big_e = e + p;
    let emin = 1 - F::BIAS;
    let emax = F::BIAS;
    let frac_bits = F::FRAC as i32;
    // Rounded to the format's precision with an unbounded exponent.
    let dn = p - frac_bits;
    let (mut qn, inexn) = round_bits(sig, dn, rc, sign);
    let mut en = big_e;
    if qn == 1 << (F::FRAC + 1) {
        qn >>= 1;
        en += 1;
    }
    if en > emax {
        let to_inf = match rc {
            Round::Nearest => true,
            Round::Zero => false,
            Round::Down => sign,
            Round::Up => !sign,
        };
        let r = s | if to_inf { F::INF } else { F::MAX };
        let f = if m & OM != 0 || inexn { OE | PE } else { OE };
        return (r, f);
    }
    if big_e >= emin {
        let r = s | ((en + F::BIAS) as u64) << F::FRAC | (qn & F::FRAC_MASK);
        return (r, if inexn { PE } else { 0 });
    }
    let tiny = en < emin;
    let masked = m & UM != 0;
    if tiny && masked && m & FTZ != 0 {
        return (s, UE | PE);
    }
    // The subnormal grid: a fixed quantum of 2^(emin - FRAC).
    let (qs, inexs) = round_bits(sig, dn + (emin - big_e), rc, sign);
    let f = match (tiny, masked) {
        // Unmasked: UE for every tiny result, PE only when rounding to the
        // format's precision (unbounded exponent) was inexact, as for OE.
        (true, false) if inexn => UE | PE,
        (true, false) => UE,
        (true, true) if inexs => UE | PE,
        _ if inexs => PE,
        _ => 0,
    };
    (s | qs, f)
}

/// Re-rounds a finite operand that is the exact result (x + 0, x × 1…),
/// so FTZ and underflow apply to it like to any other result.
fn repack<F: Fp>(a: u64, m: u32) -> (u64, u32) {
    if is_denormal::<F>(a) {
        let u = unpack::<F>(a);
        round_pack::<F>(u.sign, u.e, u128::from(u.sig), m)
    } else {
        (a, 0)
    }
}

/// The result when at least one operand is a NaN: the first NaN, quieted;
/// IE when either is signalling.
#[inline]
fn nan2<F: Fp>(a: u64, b: u64) -> (u64, u32) {
    let f = if is_snan::<F>(a) || is_snan::<F>(b) {
        IE
    } else {
        0
    };
    let r = if is_nan::<F>(a) { a } else { b };
    (r | F::QUIET, f)
}

/// Signed zero for an exact cancellation: +0, or −0 when rounding down.
#[inline]
fn cancel_zero<F: Fp>(m: u32) -> u64 {
    if Round::of(m) == Round::Down {
        F::SIGN
    } else {
        0
    }
}

fn addsub<F: Fp>(a: u64, b: u64, negate_b: bool, m: u32) -> (u64, u32) {
    if is_nan::<F>(a) || is_nan::<F>(b) {
        return nan2::<F>(a, b);
    }
    let (a, da) = input::<F>(a, m);
    let (b, db) = input::<F>(b, m);
    let b = if negate_b { b ^ F::SIGN } else { b };
    let de = if da || db { DE } else { 0 };
    if is_inf::<F>(a) {
        if is_inf::<F>(b) && neg::<F>(a) != neg::<F>(b) {
            return (F::INDEFINITE, IE);
        }
        return (a, de);
    }
    if is_inf::<F>(b) {
        return (b, de);
    }
    match (is_zero::<F>(a), is_zero::<F>(b)) {
        (true, true) => {
            let r = if neg::<F>(a) == neg::<F>(b) {
                a
            } else {
                cancel_zero::<F>(m)
            };
            return (r, de);
        }
        (true, false) => {
            let (r, f) = repack::<F>(b, m);
            return (r, f | de);
        }
        (false, true) => {
            let (r, f) = repack::<F>(a, m);
            return (r, f | de);
        }
        (false, false) => {}
    }
    let x = unpack::<F>(a);
    let y = unpack::<F>(b);
    let (big, small) = if (x.e, x.sig) >= (y.e, y.sig) {
        (x, y)
    } else {
        (y, x)
    };
    let bs = u128::from(big.sig) << 64;
    let ss = shift_right_jam(u128::from(small.sig) << 64, big.e - small.e);
    let sig = if big.sign == small.sign {
        bs + ss
    } else {
        bs - ss
    };
    if sig == 0 {
        return (cancel_zero::<F>(m), de);
    }
    let (r, f) = round_pack::<F>(big.sign, big.e - 64, sig, m);
    (r, f | de)
}

/// `a + b`.
pub fn add<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    fast::<F>(Op::Add, a, b, m).unwrap_or_else(|| addsub::<F>(a, b, false, m))
}

/// `a − b`.
pub fn sub<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    fast::<F>(Op::Sub, a, b, m).unwrap_or_else(|| addsub::<F>(a, b, true, m))
}

/// `a × b`.
pub fn mul<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    fast::<F>(Op::Mul, a, b, m).unwrap_or_else(|| exact_mul::<F>(a, b, m))
}

fn exact_mul<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    if is_nan::<F>(a) || is_nan::<F>(b) {
        return nan2::<F>(a, b);
    }
    let (a, da) = input::<F>(a, m);
    let (b, db) = input::<F>(b, m);
    let de = if da || db { DE } else { 0 };
    let s = (a ^ b) & F::SIGN;
    if is_inf::<F>(a) || is_inf::<F>(b) {
        if is_zero::<F>(a) || is_zero::<F>(b) {
            return (F::INDEFINITE, IE);
        }
        return (s | F::INF, de);
    }
    if is_zero::<F>(a) || is_zero::<F>(b) {
        return (s, de);
    }
    let x = unpack::<F>(a);
    let y = unpack::<F>(b);
    let (r, f) = round_pack::<F>(s != 0, x.e + y.e, u128::from(x.sig) * u128::from(y.sig), m);
    (r, f | de)
}

/// `a ÷ b`.
pub fn div<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    fast::<F>(Op::Div, a, b, m).unwrap_or_else(|| exact_div::<F>(a, b, m))
}

fn exact_div<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    if is_nan::<F>(a) || is_nan::<F>(b) {
        return nan2::<F>(a, b);
    }
    let (a, da) = input::<F>(a, m);
    let (b, db) = input::<F>(b, m);
    let de = if da || db { DE } else { 0 };
    let s = (a ^ b) & F::SIGN;
    if is_inf::<F>(a) {
        if is_inf::<F>(b) {
            return (F::INDEFINITE, IE);
        }
        return (s | F::INF, de);
    }
    if is_inf::<F>(b) {
        return (s, de);
    }
    if is_zero::<F>(b) {
        if is_zero::<F>(a) {
            return (F::INDEFINITE, IE);
        }
        return (s | F::INF, ZE);
    }
    if is_zero::<F>(a) {
        return (s, de);
    }
    let x = unpack::<F>(a);
    let y = unpack::<F>(b);
    let num = u128::from(x.sig) << 64;
    let den = u128::from(y.sig);
    let q = (num / den) | u128::from(num % den != 0);
    let (r, f) = round_pack::<F>(s != 0, x.e - y.e - 64, q, m);
    (r, f | de)
}

/// `√a`.
pub fn sqrt<F: Fp>(a: u64, m: u32) -> (u64, u32) {
    fast::<F>(Op::Sqrt, 0, a, m).unwrap_or_else(|| exact_sqrt::<F>(a, m))
}

fn exact_sqrt<F: Fp>(a: u64, m: u32) -> (u64, u32) {
    if is_nan::<F>(a) {
        return (a | F::QUIET, if is_snan::<F>(a) { IE } else { 0 });
    }
    let (a, da) = input::<F>(a, m);
    if is_zero::<F>(a) {
        return (a, 0);
    }
    if neg::<F>(a) {
        return (F::INDEFINITE, IE);
    }
    if is_inf::<F>(a) {
        return (a, 0);
    }
    let u = unpack::<F>(a);
    // An even exponent, and at least 126 bits so the root has 63.
    let (n, e) = if u.e & 1 != 0 {
        (u128::from(u.sig) << 65, u.e - 65)
    } else {
        (u128::from(u.sig) << 64, u.e - 64)
    };
    let r = n.isqrt();
    let sig = r | u128::from(n != r * r);
    let (r, f) = round_pack::<F>(false, e / 2, sig, m);
    (r, f | if da { DE } else { 0 })
}

/// `a < b` for ordered (non-NaN) values, ±0 equal.
#[inline]
fn less<F: Fp>(a: u64, b: u64) -> bool {
    if is_zero::<F>(a) && is_zero::<F>(b) {
        return false;
    }
    match (neg::<F>(a), neg::<F>(b)) {
        (false, false) => a < b,
        (true, true) => (a & !F::SIGN) > (b & !F::SIGN),
        (sa, _) => sa,
    }
}

#[inline]
fn equal<F: Fp>(a: u64, b: u64) -> bool {
    a == b || (is_zero::<F>(a) && is_zero::<F>(b))
}

/// `min`/`max`: the second operand when either is NaN (IE even for QNaN)
/// or both are zero.
fn minmax<F: Fp>(a: u64, b: u64, max: bool, m: u32) -> (u64, u32) {
    // DAZ applies first: a denormal second operand comes back as zero.
    let (a, da) = input::<F>(a, m);
    let (b, db) = input::<F>(b, m);
    if is_nan::<F>(a) || is_nan::<F>(b) {
        return (b, IE);
    }
    let de = if da || db { DE } else { 0 };
    let pick_a = if max {
        less::<F>(b, a)
    } else {
        less::<F>(a, b)
    };
    (if pick_a { a } else { b }, de)
}

pub fn min<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    minmax::<F>(a, b, false, m)
}

pub fn max<F: Fp>(a: u64, b: u64, m: u32) -> (u64, u32) {
    minmax::<F>(a, b, true, m)
}

/// `cmpps` predicate `pred` (0..7: EQ LT LE UNORD NEQ NLT NLE ORD).
/// LT/LE/NLT/NLE signal on QNaN too; the others only on SNaN.
pub fn cmp<F: Fp>(a: u64, b: u64, pred: u8, m: u32) -> (bool, u32) {
    let unord = is_nan::<F>(a) || is_nan::<F>(b);
    if unord {
        let signals = is_snan::<F>(a) || is_snan::<F>(b) || matches!(pred & 3, 1 | 2);
        return (matches!(pred & 7, 3..=6), if signals { IE } else { 0 });
    }
    let (a, da) = input::<F>(a, m);
    let (b, db) = input::<F>(b, m);
    let de = if da || db { DE } else { 0 };
    let lt = less::<F>(a, b);
    let eq = equal::<F>(a, b);
    let r = match pred & 7 {
        0 => eq,
        1 => lt,
        2 => lt || eq,
        3 => false,
        4 => !eq,
        5 => !lt,
        6 => !(lt || eq),
        _ => true,
    };
    (r, de)
}

/// The outcome of `comis`/`ucomis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Unordered,
    Less,
    Equal,
    Greater,
}

/// `comis` (`signal_qnan`) / `ucomis`.
pub fn compare<F: Fp>(a: u64, b: u64, signal_qnan: bool, m: u32) -> (Order, u32) {
    if is_nan::<F>(a) || is_nan::<F>(b) {
        let signals = signal_qnan || is_snan::<F>(a) || is_snan::<F>(b);
        return (Order::Unordered, if signals { IE } else { 0 });
    }
    let (a, da) = input::<F>(a, m);
    let (b, db) = input::<F>(b, m);
    let de = if da || db { DE } else { 0 };
    let o = if equal::<F>(a, b) {
        Order::Equal
    } else if less::<F>(a, b) {
        Order::Less
    } else {
        Order::Greater
    };
    (o, de)
}

/// Format conversion (`cvtss2sd`, `cvtpd2ps`…): NaN payloads keep their
/// top fraction bits and are quieted.
pub fn convert<A: Fp, B: Fp>(a: u64, m: u32) -> (u64, u32) {
    let s = if neg::<A>(a) { B::SIGN } else { 0 };
    if is_nan::<A>(a) {
        let frac = a & A::FRAC_MASK;
        let frac = if A::FRAC > B::FRAC {
            frac >> (A::FRAC - B::FRAC)
        } else {
            frac << (B::FRAC - A::FRAC)
        };
        return (
            s | B::INF | B::QUIET | frac,
            if is_snan::<A>(a) { IE } else { 0 },
        );
    }
    let (a, da) = input::<A>(a, m);
    if is_inf::<A>(a) {
        return (s | B::INF, 0);
    }
    if is_zero::<A>(a) {
        return (s, 0);
    }
    let u = unpack::<A>(a);
    let (r, f) = round_pack::<B>(u.sign, u.e, u128::from(u.sig), m);
    (r, f | if da { DE } else { 0 })
}

/// Float to a `bits`-wide signed integer (32 or 64), rounding by MXCSR or
/// truncating. NaN and out-of-range values give the integer indefinite
/// (only the sign bit set) with IE.
pub fn to_int<F: Fp>(a: u64, bits: u32, truncate: bool, m: u32) -> (u64, u32) {
    let indefinite = 1u64 << (bits - 1);
    if is_nan::<F>(a) || is_inf::<F>(a) {
        return (indefinite, IE);
    }
    let (a, _) = input::<F>(a, m);
    if is_zero::<F>(a) {
        return (0, 0);
    }
    let u = unpack::<F>(a);
    let rc = if truncate { Round::Zero } else { Round::of(m) };
    let (mag, inexact) = if u.e >= 0 {
        if u.e >= 2 {
            return (indefinite, IE);
        }
        (u.sig << u.e, false)
    } else {
        round_bits(u128::from(u.sig), -u.e, rc, u.sign)
    };
    let limit = if u.sign { indefinite } else { indefinite - 1 };
    if mag > limit {
        return (indefinite, IE);
    }
    let v = if u.sign { mag.wrapping_neg() } else { mag };
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    (v & mask, if inexact { PE } else { 0 })
}

/// A signed integer to `F`, rounding by MXCSR (PE when inexact).
pub fn from_int<F: Fp>(v: i64, m: u32) -> (u64, u32) {
    if v == 0 {
        return (0, 0);
    }
    round_pack::<F>(v < 0, 0, u128::from(v.unsigned_abs()), m)
}

/// `rcpss`: an approximation of 1/a. This is the correctly rounded value,
/// well inside the architected relative error of 1.5 × 2^-12 (silicon uses
/// vendor-specific tables, so no model matches every CPU). Denormal inputs
/// count as zero, tiny results are flushed to zero, MXCSR rounding is
/// ignored and no flag is ever raised.
pub fn rcp(a: u64) -> u64 {
    if is_nan::<F32>(a) {
        return a | F32::QUIET;
    }
    let a = if is_denormal::<F32>(a) {
        a & F32::SIGN
    } else {
        a
    };
    if is_zero::<F32>(a) {
        return a | F32::INF;
    }
    let (r, _) = div::<F32>(ONE32, a, NEAREST_MASKED);
    if is_denormal::<F32>(r) {
        r & F32::SIGN
    } else {
        r
    }
}

/// `rsqrtss`: an approximation of 1/√a, on the same terms as [`rcp`];
/// negative inputs give the QNaN indefinite, −0 gives −∞.
pub fn rsqrt(a: u64) -> u64 {
    if is_nan::<F32>(a) {
        return a | F32::QUIET;
    }
    let a = if is_denormal::<F32>(a) {
        a & F32::SIGN
    } else {
        a
    };
    if is_zero::<F32>(a) {
        return a | F32::INF;
    }
    if neg::<F32>(a) {
        return F32::INDEFINITE;
    }
    let (s, _) = sqrt::<F32>(a, NEAREST_MASKED);
    div::<F32>(ONE32, s, NEAREST_MASKED).0
}

const ONE32: u64 = 0x3f80_0000;
/// MXCSR's reset value: round to nearest, every exception masked.
const NEAREST_MASKED: u32 = 0x1f80;

/// The MXCSR after an operation raised `flags` (OR of its elements), or
/// `Err(mxcsr)` with the flags an unmasked exception leaves: an unmasked
/// pre-computation exception (IE, DE, ZE) reports only those flags, an
/// unmasked post-computation one reports all.
pub fn settle(mxcsr: u32, flags: u32) -> Result<u32, u32> {
    let unmasked = flags & !(mxcsr >> MASK_SHIFT) & 0x3f;
    if unmasked == 0 {
        Ok(mxcsr | flags)
    } else if unmasked & PRE != 0 {
        Err(mxcsr | (flags & PRE))
    } else {
        Err(mxcsr | flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEAREST: u32 = 0x1f80;
    const DOWN: u32 = 0x1f80 | 1 << RC_SHIFT;
    const UP: u32 = 0x1f80 | 2 << RC_SHIFT;
    const ZERO: u32 = 0x1f80 | 3 << RC_SHIFT;

    fn s(x: f32) -> u64 {
        u64::from(x.to_bits())
    }
    fn d(x: f64) -> u64 {
        x.to_bits()
    }

    /// A small deterministic generator of interesting bit patterns.
    pub(super) struct Gen(pub u64);
    impl Gen {
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Zeros, denormals, infinities, NaNs, values near 1 and near the
        /// underflow threshold, fractions at rounding boundaries.
        pub(super) fn f<F: Fp>(&mut self) -> u64 {
            let r = self.next();
            let exp = match r % 12 {
                0 => 0,
                1 => F::EXP_MAX,
                2 => 1,
                3 => F::EXP_MAX - 1,
                4 => F::BIAS as u64 + (r >> 50) % 3,
                5 => F::BIAS as u64 - 24 + (r >> 50) % 8,
                6 | 7 => F::BIAS as u64 - 1,
                _ => (r >> 8) % F::EXP_MAX,
            };
            let frac = match (r >> 20) % 7 {
                0 => 0,
                1 => 1,
                2 => F::FRAC_MASK,
                3 => F::QUIET,
                4 => F::FRAC_MASK - (r >> 30) % 4,
                5 => self.next() & !((1 << (self.0 % 50)) - 1),
                _ => self.next(),
            } & F::FRAC_MASK;
            let sign = if r >> 40 & 1 != 0 { F::SIGN } else { 0 };
            sign | exp << F::FRAC | frac
        }
    }

    #[test]
    fn nearest_mode_matches_host_arithmetic_bit_for_bit() {
        let mut g = Gen(0x1234_5678_9abc_def1);
        for _ in 0..200_000 {
            let (a, b) = (g.f::<F64>(), g.f::<F64>());
            let (fa, fb) = (f64::from_bits(a), f64::from_bits(b));
            let same =
                |x: u64, y: f64| x == y.to_bits() || (f64::from_bits(x).is_nan() && y.is_nan());
            assert!(
                same(add::<F64>(a, b, NEAREST).0, fa + fb),
                "{fa:e} + {fb:e}"
            );
            assert!(
                same(sub::<F64>(a, b, NEAREST).0, fa - fb),
                "{fa:e} - {fb:e}"
            );
            assert!(
                same(mul::<F64>(a, b, NEAREST).0, fa * fb),
                "{fa:e} * {fb:e}"
            );
            assert!(
                same(div::<F64>(a, b, NEAREST).0, fa / fb),
                "{fa:e} / {fb:e}"
            );
            assert!(same(sqrt::<F64>(a, NEAREST).0, fa.sqrt()), "sqrt {fa:e}");
            let (a, b) = (g.f::<F32>(), g.f::<F32>());
            let (fa, fb) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
            let same = |x: u64, y: f32| {
                x == u64::from(y.to_bits()) || (f32::from_bits(x as u32).is_nan() && y.is_nan())
            };
            assert!(
                same(add::<F32>(a, b, NEAREST).0, fa + fb),
                "{fa:e} + {fb:e}"
            );
            assert!(
                same(mul::<F32>(a, b, NEAREST).0, fa * fb),
                "{fa:e} * {fb:e}"
            );
            assert!(
                same(div::<F32>(a, b, NEAREST).0, fa / fb),
                "{fa:e} / {fb:e}"
            );
            assert!(same(sqrt::<F32>(a, NEAREST).0, fa.sqrt()), "sqrt {fa:e}");
            let w = g.f::<F64>();
            assert!(
                same(convert::<F64, F32>(w, NEAREST).0, f64::from_bits(w) as f32),
                "{w:#x} as f32"
            );
        }
    }

    /// Normal values, often with few significant bits so that exact
    /// results (no PE) are common.
    fn short<F: Fp>(g: &mut Gen) -> u64 {
        let r = g.next();
        let exp = F::BIAS as u64 - 30 + r % 60;
        let keep = (r >> 8) % (u64::from(F::FRAC) + 1);
        let frac = g.next() & F::FRAC_MASK & !(F::FRAC_MASK >> keep);
        (if r >> 20 & 1 != 0 { F::SIGN } else { 0 }) | exp << F::FRAC | frac
    }

    fn fast_agrees<F: Fp>(seed: u64) {
        let mut g = Gen(seed);
        let mut taken = 0;
        for k in 0..300_000 {
            let (a, b) = if k % 2 == 0 {
                (short::<F>(&mut g), short::<F>(&mut g))
            } else {
                (g.f::<F>(), g.f::<F>())
            };
            let exact: [(Op, (u64, u32)); 5] = [
                (Op::Add, addsub::<F>(a, b, false, NEAREST)),
                (Op::Sub, addsub::<F>(a, b, true, NEAREST)),
                (Op::Mul, exact_mul::<F>(a, b, NEAREST)),
                (Op::Div, exact_div::<F>(a, b, NEAREST)),
                (Op::Sqrt, exact_sqrt::<F>(b, NEAREST)),
            ];
            for (op, want) in exact {
                if let Some(got) = fast::<F>(op, a, b, NEAREST | DAZ | FTZ) {
                    taken += 1;
                    assert_eq!(got, want, "{op:?} {a:#x} {b:#x}");
                }
            }
        }
        assert!(taken > 500_000, "the fast path ran only {taken} times");
    }

    #[test]
    fn the_native_fast_path_agrees_with_the_exact_path() {
        fast_agrees::<F32>(0x1357_9bdf_2468_ace0);
        fast_agrees::<F64>(0x0fed_cba9_8765_4321);
    }

    #[test]
    fn directed_modes_bracket_the_exact_product() {
        // binary32 products are exact in binary64: the directed results
        // must be the binary32 neighbours around that exact value.
        let mut g = Gen(0xdead_beef_cafe_f00d);
        for _ in 0..200_000 {
            let (a, b) = (g.f::<F32>(), g.f::<F32>());
            let (fa, fb) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
            let exact = f64::from(fa) * f64::from(fb);
            if !exact.is_finite() || exact == 0.0 {
                continue;
            }
            let dn = f32::from_bits(mul::<F32>(a, b, DOWN).0 as u32);
            let up = f32::from_bits(mul::<F32>(a, b, UP).0 as u32);
            let tz = f32::from_bits(mul::<F32>(a, b, ZERO).0 as u32);
            assert!(
                f64::from(dn) <= exact && exact <= f64::from(up),
                "{fa:e} * {fb:e}"
            );
            if f64::from(dn) == exact {
                assert_eq!(dn, up);
            } else if dn.is_finite() && up.is_finite() {
                assert_eq!(dn.next_up(), up, "{fa:e} * {fb:e}");
            }
            assert_eq!(tz, if exact > 0.0 { dn } else { up });
        }
    }

    #[test]
    fn flags_follow_ieee_exceptions() {
        // Inexact.
        assert_eq!(div::<F32>(s(1.0), s(3.0), NEAREST).1, PE);
        assert_eq!(add::<F32>(s(1.0), s(2.0), NEAREST).1, 0);
        // Overflow: infinity when rounding to nearest, MAX toward zero.
        assert_eq!(
            mul::<F64>(d(f64::MAX), d(2.0), NEAREST),
            (d(f64::INFINITY), OE | PE)
        );
        assert_eq!(
            mul::<F64>(d(f64::MAX), d(2.0), ZERO),
            (d(f64::MAX), OE | PE)
        );
        assert_eq!(
            mul::<F64>(d(-f64::MAX), d(2.0), UP),
            (d(-f64::MAX), OE | PE)
        );
        // Exact subnormal result: no underflow when masked.
        assert_eq!(
            mul::<F32>(s(f32::MIN_POSITIVE), s(0.5), NEAREST),
            (0x0040_0000, 0)
        );
        // Inexact subnormal: underflow.
        assert_eq!(div::<F32>(s(f32::MIN_POSITIVE), s(3.0), NEAREST).1, UE | PE);
        // Divide by zero, invalid, denormal operand.
        assert_eq!(
            div::<F32>(s(-1.0), s(0.0), NEAREST),
            (s(f32::NEG_INFINITY), ZE)
        );
        assert_eq!(div::<F32>(s(0.0), s(0.0), NEAREST), (0xffc0_0000, IE));
        assert_eq!(sqrt::<F64>(d(-1.0), NEAREST), (0xfff8_0000_0000_0000, IE));
        assert_eq!(add::<F32>(1, s(1.0), NEAREST), (s(1.0), DE | PE));
    }

    #[test]
    fn first_nan_operand_wins_and_is_quieted() {
        let snan = 0x7f80_0001;
        let qnan = 0xffc0_1234;
        assert_eq!(add::<F32>(snan, qnan, NEAREST), (0x7fc0_0001, IE));
        assert_eq!(add::<F32>(qnan, snan, NEAREST), (qnan, IE));
        assert_eq!(mul::<F32>(s(2.0), qnan, NEAREST), (qnan, 0));
        // min/max return the second operand unchanged, signalling on QNaN.
        assert_eq!(max::<F32>(qnan, s(1.0), NEAREST), (s(1.0), IE));
        assert_eq!(min::<F32>(s(1.0), snan, NEAREST), (snan, IE));
        assert_eq!(max::<F32>(s(-0.0), s(0.0), NEAREST), (s(0.0), 0));
        assert_eq!(max::<F32>(s(0.0), s(-0.0), NEAREST), (s(-0.0), 0));
    }

    #[test]
    fn daz_and_ftz_flush_denormals() {
        let den = 0x0000_0001;
        assert_eq!(add::<F32>(den, s(0.0), NEAREST | DAZ), (0, 0));
        assert_eq!(add::<F32>(den, s(0.0), NEAREST), (den, DE));
        let (r, f) = div::<F32>(s(f32::MIN_POSITIVE), s(3.0), NEAREST | FTZ);
        assert_eq!((r, f), (0, UE | PE));
        let (r, f) = div::<F32>(s(-f32::MIN_POSITIVE), s(3.0), NEAREST | FTZ);
        assert_eq!((r, f), (s(-0.0), UE | PE));
        // x − x is −0 only when rounding down.
        assert_eq!(sub::<F64>(d(1.5), d(1.5), NEAREST).0, 0);
        assert_eq!(sub::<F64>(d(1.5), d(1.5), DOWN).0, d(-0.0));
    }

    #[test]
    fn integer_conversions_round_and_saturate_to_indefinite() {
        assert_eq!(to_int::<F32>(s(2.5), 32, false, NEAREST), (2, PE));
        assert_eq!(to_int::<F32>(s(3.5), 32, false, NEAREST), (4, PE));
        assert_eq!(to_int::<F32>(s(-2.5), 32, true, NEAREST), (0xffff_fffe, PE));
        assert_eq!(to_int::<F32>(s(-2.5), 32, false, DOWN), (0xffff_fffd, PE));
        assert_eq!(
            to_int::<F64>(d(2147483647.0), 32, false, NEAREST),
            (0x7fff_ffff, 0)
        );
        assert_eq!(
            to_int::<F64>(d(2147483648.0), 32, false, NEAREST),
            (0x8000_0000, IE)
        );
        assert_eq!(
            to_int::<F64>(d(-2147483648.0), 32, false, NEAREST),
            (0x8000_0000, 0)
        );
        assert_eq!(
            to_int::<F64>(d(-2147483648.4), 32, false, NEAREST),
            (0x8000_0000, PE)
        );
        assert_eq!(
            to_int::<F64>(d(-2147483648.6), 32, false, NEAREST),
            (0x8000_0000, IE)
        );
        assert_eq!(to_int::<F64>(d(f64::NAN), 64, true, NEAREST), (1 << 63, IE));
        assert_eq!(
            to_int::<F64>(d(i64::MIN as f64), 64, true, NEAREST),
            (1 << 63, 0)
        );
        assert_eq!(from_int::<F32>(16_777_217, NEAREST), (s(16_777_216.0), PE));
        assert_eq!(from_int::<F32>(16_777_217, UP), (s(16_777_218.0), PE));
        assert_eq!(from_int::<F64>(i64::MIN, NEAREST), (d(i64::MIN as f64), 0));
    }

    #[test]
    fn unmasked_pre_computation_exceptions_hide_post_computation_flags() {
        let all_masked = 0x1f80;
        assert_eq!(settle(all_masked, IE | PE), Ok(all_masked | IE | PE));
        let ie_unmasked = all_masked & !(IE << MASK_SHIFT);
        assert_eq!(settle(ie_unmasked, IE | PE), Err(ie_unmasked | IE));
        let pe_unmasked = all_masked & !(PE << MASK_SHIFT);
        assert_eq!(settle(pe_unmasked, DE | PE), Err(pe_unmasked | DE | PE));
    }
}

/// The engine against the host CPU's own SSE unit, in every rounding mode
/// with DAZ/FTZ (exceptions masked; unmasked ones are covered by the
/// guest tests and the difftest).
#[cfg(all(test, target_arch = "x86_64"))]
mod host {
    use super::tests::Gen;
    use super::*;

    /// Operands in, results out; offsets are fixed for the asm below.
    #[repr(C)]
    #[derive(Default)]
    struct Buf {
        a: u64,      // 0: xmm0
        b: u64,      // 8: xmm1 and rax
        r: u64,      // 16: xmm0 after
        mxcsr: u32,  // 24: in
        flags: u32,  // 28: MXCSR after
        saved: u32,  // 32: the host's MXCSR
        _pad: u32,   // 36
        gpr: u64,    // 40: rax after
        rflags: u64, // 48
    }

    /// A host function running `$insn` on xmm0/xmm1/rax as loaded from a
    /// `Buf`: (xmm0 low qword or rax, MXCSR flags, RFLAGS).
    macro_rules! host {
        ($insn:literal) => {{
            fn run(a: u64, b: u64, m: u32) -> (u64, u64, u32, u64) {
                let mut buf = Buf { a, b, mxcsr: m, ..Buf::default() };
                let p: *mut Buf = &mut buf;
                // SAFETY: the code touches only `*p` (offsets as in `Buf`),
                // the stack (pushfq/pop) and the registers declared as
                // clobbered, and restores the host's MXCSR before returning.
                unsafe {
                    core::arch::asm!(
                        "stmxcsr [{p} + 32]",
                        "ldmxcsr [{p} + 24]",
                        "movq xmm0, [{p}]",
                        "movq xmm1, [{p} + 8]",
                        "mov rax, [{p} + 8]",
                        $insn,
                        "movq [{p} + 16], xmm0",
                        "mov [{p} + 40], rax",
                        "pushfq",
                        "pop rcx",
                        "mov [{p} + 48], rcx",
                        "stmxcsr [{p} + 28]",
                        "ldmxcsr [{p} + 32]",
                        p = in(reg) p,
                        out("xmm0") _,
                        out("xmm1") _,
                        out("rax") _,
                        out("rcx") _,
                    );
                }
                (buf.r, buf.gpr, buf.flags & 0x3f, buf.rflags)
            }
            run as fn(u64, u64, u32) -> (u64, u64, u32, u64)
        }};
    }

    type Host = fn(u64, u64, u32) -> (u64, u64, u32, u64);

    /// A random MXCSR: any rounding mode, DAZ and FTZ, everything masked.
    fn mxcsr(g: &mut Gen) -> u32 {
        let r = g.next() as u32;
        0x1f80
            | (r & 3) << RC_SHIFT
            | if r & 4 != 0 { DAZ } else { 0 }
            | if r & 8 != 0 { FTZ } else { 0 }
    }

    const N: usize = 40_000;

    /// Compares `ours` with the host's xmm0 result for `N` random operand
    /// pairs of format `F`.
    fn check_xmm<F: Fp>(name: &str, host: Host, ours: fn(u64, u64, u32) -> (u64, u32)) {
        check_xmm_to::<F, F>(name, host, ours);
    }

    /// As [`check_xmm`], for a result of format `R`.
    fn check_xmm_to<F: Fp, R: Fp>(name: &str, host: Host, ours: fn(u64, u64, u32) -> (u64, u32)) {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let mask = if R::FRAC == 23 { 0xffff_ffff } else { u64::MAX };
        for _ in 0..N {
            let (a, b, m) = (g.f::<F>(), g.f::<F>(), mxcsr(&mut g));
            let (r, _, f, _) = host(a, b, m);
            assert_eq!(
                ours(a, b, m),
                (r & mask, f),
                "{name} {a:#x}, {b:#x} (mxcsr {m:#x})"
            );
        }
    }

    #[test]
    fn arithmetic_matches_the_host_in_every_mode() {
        check_xmm::<F32>("addss", host!("addss xmm0, xmm1"), add::<F32>);
        check_xmm::<F32>("subss", host!("subss xmm0, xmm1"), sub::<F32>);
        check_xmm::<F32>("mulss", host!("mulss xmm0, xmm1"), mul::<F32>);
        check_xmm::<F32>("divss", host!("divss xmm0, xmm1"), div::<F32>);
        check_xmm::<F32>("sqrtss", host!("sqrtss xmm0, xmm1"), |_, b, m| {
            sqrt::<F32>(b, m)
        });
        check_xmm::<F64>("addsd", host!("addsd xmm0, xmm1"), add::<F64>);
        check_xmm::<F64>("subsd", host!("subsd xmm0, xmm1"), sub::<F64>);
        check_xmm::<F64>("mulsd", host!("mulsd xmm0, xmm1"), mul::<F64>);
        check_xmm::<F64>("divsd", host!("divsd xmm0, xmm1"), div::<F64>);
        check_xmm::<F64>("sqrtsd", host!("sqrtsd xmm0, xmm1"), |_, b, m| {
            sqrt::<F64>(b, m)
        });
    }

    #[test]
    fn min_max_and_compares_match_the_host() {
        check_xmm::<F32>("minss", host!("minss xmm0, xmm1"), min::<F32>);
        check_xmm::<F32>("maxss", host!("maxss xmm0, xmm1"), max::<F32>);
        check_xmm::<F64>("minsd", host!("minsd xmm0, xmm1"), min::<F64>);
        check_xmm::<F64>("maxsd", host!("maxsd xmm0, xmm1"), max::<F64>);
        let preds: [Host; 8] = [
            host!("cmpss xmm0, xmm1, 0"),
            host!("cmpss xmm0, xmm1, 1"),
            host!("cmpss xmm0, xmm1, 2"),
            host!("cmpss xmm0, xmm1, 3"),
            host!("cmpss xmm0, xmm1, 4"),
            host!("cmpss xmm0, xmm1, 5"),
            host!("cmpss xmm0, xmm1, 6"),
            host!("cmpss xmm0, xmm1, 7"),
        ];
        let mut g = Gen(0x5eed);
        for k in 0..N {
            let (a, b, m) = (g.f::<F32>(), g.f::<F32>(), mxcsr(&mut g));
            let pred = (k % 8) as u8;
            let (r, _, f, _) = preds[k % 8](a, b, m);
            let (t, ours) = cmp::<F32>(a, b, pred, m);
            assert_eq!(
                (if t { 0xffff_ffff } else { 0 }, ours),
                (r & 0xffff_ffff, f),
                "cmpss {pred} {a:#x} {b:#x}"
            );
        }
        let order = |o: Order| match o {
            Order::Unordered => 0x45,
            Order::Less => 0x01,
            Order::Equal => 0x40,
            Order::Greater => 0,
        };
        let comisd = host!("comisd xmm0, xmm1");
        let ucomisd = host!("ucomisd xmm0, xmm1");
        for _ in 0..N {
            let (a, b, m) = (g.f::<F64>(), g.f::<F64>(), mxcsr(&mut g));
            for (signal, h) in [(true, comisd), (false, ucomisd)] {
                let (_, _, f, rflags) = h(a, b, m);
                let (o, ours) = compare::<F64>(a, b, signal, m);
                assert_eq!(
                    (order(o), ours),
                    (rflags & 0x8d5, f),
                    "comisd {signal} {a:#x} {b:#x}"
                );
            }
        }
    }

    #[test]
    fn conversions_match_the_host_in_every_mode() {
        check_xmm_to::<F32, F64>("cvtss2sd", host!("cvtss2sd xmm0, xmm1"), |_, b, m| {
            convert::<F32, F64>(b, m)
        });
        check_xmm_to::<F64, F32>("cvtsd2ss", host!("cvtsd2ss xmm0, xmm1"), |_, b, m| {
            convert::<F64, F32>(b, m)
        });
        let to_int_forms: [(Host, bool, u32, bool); 8] = [
            (host!("cvtss2si eax, xmm1"), false, 32, false),
            (host!("cvttss2si eax, xmm1"), false, 32, true),
            (host!("cvtss2si rax, xmm1"), false, 64, false),
            (host!("cvttss2si rax, xmm1"), false, 64, true),
            (host!("cvtsd2si eax, xmm1"), true, 32, false),
            (host!("cvttsd2si eax, xmm1"), true, 32, true),
            (host!("cvtsd2si rax, xmm1"), true, 64, false),
            (host!("cvttsd2si rax, xmm1"), true, 64, true),
        ];
        let mut g = Gen(0xc0ffee);
        for _ in 0..N {
            let m = mxcsr(&mut g);
            let (s, d) = (g.f::<F32>(), g.f::<F64>());
            for (h, double, bits, trunc) in to_int_forms {
                let x = if double { d } else { s };
                let (_, r, f, _) = h(0, x, m);
                let ours = if double {
                    super::to_int::<F64>(x, bits, trunc, m)
                } else {
                    super::to_int::<F32>(x, bits, trunc, m)
                };
                assert_eq!(
                    ours,
                    (r, f),
                    "cvt{} {bits} {x:#x} (mxcsr {m:#x})",
                    if trunc { "t" } else { "" }
                );
            }
        }
        let from_int_forms: [(Host, bool, bool); 4] = [
            (host!("cvtsi2ss xmm0, eax"), false, false),
            (host!("cvtsi2ss xmm0, rax"), false, true),
            (host!("cvtsi2sd xmm0, eax"), true, false),
            (host!("cvtsi2sd xmm0, rax"), true, true),
        ];
        for _ in 0..N {
            let m = mxcsr(&mut g);
            let v = g.next() >> (g.next() % 64);
            let v = if g.next() & 1 != 0 {
                v.wrapping_neg()
            } else {
                v
            };
            for (h, double, wide) in from_int_forms {
                let (r, _, f, _) = h(0, v, m);
                let x = if wide { v as i64 } else { i64::from(v as i32) };
                let (ours, mask) = if double {
                    (from_int::<F64>(x, m), u64::MAX)
                } else {
                    (from_int::<F32>(x, m), 0xffff_ffff)
                };
                assert_eq!(
                    ours,
                    (r & mask, f),
                    "cvtsi2s{} {x}",
                    if double { "d" } else { "s" }
                );
            }
        }
    }
}
