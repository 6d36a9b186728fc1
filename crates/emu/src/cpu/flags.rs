//! Lazy arithmetic flags, Bochs-style (`cpu/lazy_flags.h`).
//!
//! An arithmetic instruction stores only its result (sign-extended to 64
//! bits) and a few bits of its carry vector; each flag is derived on demand
//! with a shift or a compare, never with a switch on "the last operation":
//!
//! * CF = aux bit 63, OF = aux bit 63 ^ aux bit 62 (carry out of the top
//!   two bits), AF = aux bit 3 (carry out of bit 3)
//! * ZF = (res == 0), SF = res bit 63 ^ aux bit [`SD`],
//!   PF = even parity of (res low byte ^ aux byte at [`PDB`])
//!
//! The delta bits (SD, PDB) are zero after arithmetic; they let `popf`,
//! `sahf` and friends store any flag combination (e.g. ZF=1 with SF=1).

use super::width::Width;

pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
pub const IOPL: u64 = 3 << 12;
pub const NT: u64 = 1 << 14;
pub const RF: u64 = 1 << 16;
pub const VM: u64 = 1 << 17;
pub const AC: u64 = 1 << 18;
pub const VIF: u64 = 1 << 19;
pub const VIP: u64 = 1 << 20;
pub const ID: u64 = 1 << 21;
/// The six arithmetic flags held lazily.
pub const OSZAPC: u64 = OF | SF | ZF | AF | PF | CF;

const SD: u32 = 8;
const PDB: u32 = 16;

/// Even parity of a byte, as PF reports it.
#[inline(always)]
pub fn parity_even(b: u8) -> bool {
    let x = b ^ (b >> 4);
    (0x6996u16 >> (x & 0xf)) & 1 == 0
}

/// The lazily evaluated OSZAPC flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub res: u64,
    pub aux: u64,
}

impl Flags {
    #[inline(always)]
    pub fn cf(&self) -> bool {
        self.aux >> 63 != 0
    }
    #[inline(always)]
    pub fn of(&self) -> bool {
        ((self.aux >> 63) ^ (self.aux >> 62)) & 1 != 0
    }
    #[inline(always)]
    pub fn af(&self) -> bool {
        (self.aux >> 3) & 1 != 0
    }
    #[inline(always)]
    pub fn zf(&self) -> bool {
        self.res == 0
    }
    #[inline(always)]
    pub fn sf(&self) -> bool {
        ((self.res >> 63) ^ (self.aux >> SD)) & 1 != 0
    }
    #[inline(always)]
    pub fn pf(&self) -> bool {
        parity_even((self.res ^ (self.aux >> PDB)) as u8)
    }

    /// Condition code `cc` in encoding order (O, NO, B, AE, E, NE, BE, A,
    /// S, NS, P, NP, L, GE, LE, G).
    #[inline(always)]
    pub fn cond(&self, cc: u8) -> bool {
        let r = match cc >> 1 {
            0 => self.of(),
            1 => self.cf(),
            2 => self.zf(),
            3 => self.cf() || self.zf(),
            4 => self.sf(),
            5 => self.pf(),
            6 => self.sf() != self.of(),
            _ => self.zf() || (self.sf() != self.of()),
        };
        r ^ (cc & 1 != 0)
    }

    #[inline(always)]
    fn pack<W: Width>(cv: u64) -> u64 {
        (cv & 8) | ((cv >> (W::BITS - 2)) << 62)
    }

    /// Result of a logical operation: CF=OF=AF=0.
    #[inline(always)]
    pub fn logic<W: Width>(&mut self, r: u64) {
        self.res = W::sext(r);
        self.aux = 0;
    }

    /// `r = a + b (+ carry)`, all zero-extended, `r` truncated.
    #[inline(always)]
    pub fn add<W: Width>(&mut self, a: u64, b: u64, r: u64) {
        let cv = (a & b) | ((a | b) & !r);
        self.res = W::sext(r);
        self.aux = Self::pack::<W>(cv & W::MASK);
    }

    /// `r = a - b (- borrow)`.
    #[inline(always)]
    pub fn sub<W: Width>(&mut self, a: u64, b: u64, r: u64) {
        let bv = (!a & b) | (!(a ^ b) & r);
        self.res = W::sext(r);
        self.aux = Self::pack::<W>(bv & W::MASK);
    }

    /// inc/dec: like add/sub but CF is kept.
    #[inline(always)]
    pub fn inc<W: Width>(&mut self, a: u64, r: u64) {
        let cf = self.aux >> 63;
        self.add::<W>(a, 1, r);
        self.keep_cf(cf);
    }
    #[inline(always)]
    pub fn dec<W: Width>(&mut self, a: u64, r: u64) {
        let cf = self.aux >> 63;
        self.sub::<W>(a, 1, r);
        self.keep_cf(cf);
    }
    #[inline(always)]
    fn keep_cf(&mut self, cf: u64) {
        let of = ((self.aux >> 63) ^ (self.aux >> 62)) & 1;
        self.aux = (self.aux & !(3 << 62)) | (cf << 63) | ((cf ^ of) << 62);
    }

    /// A result with explicit CF and OF (shifts, multiplies); AF cleared.
    #[inline(always)]
    pub fn set_result_cf_of<W: Width>(&mut self, r: u64, cf: bool, of: bool) {
        self.res = W::sext(r);
        let (c, o) = (u64::from(cf), u64::from(of));
        self.aux = (c << 63) | ((c ^ o) << 62);
    }

    /// Changes CF only.
    #[inline(always)]
    pub fn set_cf(&mut self, cf: bool) {
        let of = ((self.aux >> 63) ^ (self.aux >> 62)) & 1;
        let c = u64::from(cf);
        self.aux = (self.aux & !(3 << 62)) | (c << 63) | ((c ^ of) << 62);
    }

    /// Changes OF only.
    #[inline(always)]
    pub fn set_of(&mut self, of: bool) {
        let c = self.aux >> 63;
        self.aux = (self.aux & !(1 << 62)) | ((c ^ u64::from(of)) << 62);
    }

    /// The six flags in their RFLAGS positions.
    pub fn bits(&self) -> u64 {
        let b = |on: bool, m: u64| if on { m } else { 0 };
        b(self.cf(), CF)
            | b(self.pf(), PF)
            | b(self.af(), AF)
            | b(self.zf(), ZF)
            | b(self.sf(), SF)
            | b(self.of(), OF)
    }

    /// Loads the six flags from RFLAGS bits (other bits ignored).
    pub fn set_bits(&mut self, f: u64) {
        let b = |m: u64| u64::from(f & m != 0);
        let (cf, pf, af, zf, sf, of) = (b(CF), b(PF), b(AF), b(ZF), b(SF), b(OF));
        // res = 0 for ZF, else 1 (positive, odd parity); deltas fix SF/PF.
        self.res = zf ^ 1;
        let pdb = pf ^ zf;
        self.aux = (cf << 63) | ((cf ^ of) << 62) | (af << 3) | (sf << SD) | (pdb << PDB);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::width::{W8, W16, W32, W64};

    #[test]
    fn add_flags_match_the_manual() {
        let mut f = Flags::default();
        f.add::<W8>(0x7f, 1, 0x80);
        assert!(f.of() && f.sf() && !f.cf() && f.af() && !f.zf());
        f.add::<W8>(0xff, 1, 0);
        assert!(f.cf() && f.zf() && !f.of() && f.af() && f.pf());
        f.add::<W64>(u64::MAX, 1, 0);
        assert!(f.cf() && f.zf() && !f.of());
        f.add::<W32>(0x8000_0000, 0x8000_0000, 0);
        assert!(f.cf() && f.of() && f.zf());
    }

    #[test]
    fn sub_flags_match_the_manual() {
        let mut f = Flags::default();
        f.sub::<W8>(0, 1, 0xff);
        assert!(f.cf() && f.sf() && !f.of() && f.af());
        f.sub::<W8>(0x80, 1, 0x7f);
        assert!(!f.cf() && f.of() && !f.sf());
        f.sub::<W16>(5, 5, 0);
        assert!(f.zf() && !f.cf() && f.pf());
        assert!(f.cond(4) && f.cond(13) && !f.cond(12), "E, GE, not L");
    }

    #[test]
    fn inc_keeps_carry() {
        let mut f = Flags::default();
        f.set_cf(true);
        f.inc::<W8>(0x7f, 0x80);
        assert!(f.cf() && f.of() && f.sf());
        f.set_cf(false);
        f.dec::<W8>(0x80, 0x7f);
        assert!(!f.cf() && f.of());
    }

    #[test]
    fn any_flag_combination_round_trips() {
        let mut f = Flags::default();
        for bits in 0..64u64 {
            let v = [CF, PF, AF, ZF, SF, OF]
                .iter()
                .enumerate()
                .fold(
                    0,
                    |acc, (i, m)| if bits >> i & 1 != 0 { acc | m } else { acc },
                );
            f.set_bits(v);
            assert_eq!(f.bits(), v, "flags {v:#x}");
        }
    }
}
