//! Operand widths as a trait, so each operation is written once and
//! monomorphised per size (no per-execution size switch).
//!
//! Values travel as `u64` holding the zero-extended operand; `W` only says
//! how many bits count, how to sign-extend and how a register write merges.

/// An operand size: 8, 16, 32 or 64 bits.
pub trait Width: Copy + 'static {
    const BITS: u32;
    const BYTES: usize;
    /// All-ones in the operand's bits.
    const MASK: u64;
    /// The sign bit.
    const SIGN: u64 = 1 << (Self::BITS - 1);

    /// Reads register `r` (byte-slot form for 8 bits: `0x10|n` = AH..BH).
    fn get(gpr: &[u64], r: u8) -> u64;
    /// Writes register `r`, merging or zero-extending as x86 does.
    fn set(gpr: &mut [u64], r: u8, v: u64);

    /// `v` sign-extended from this width to 64 bits.
    #[inline(always)]
    fn sext(v: u64) -> u64 {
        let shift = 64 - Self::BITS;
        (((v << shift) as i64) >> shift) as u64
    }
}

#[derive(Clone, Copy, Debug)]
pub struct W8;
#[derive(Clone, Copy, Debug)]
pub struct W16;
#[derive(Clone, Copy, Debug)]
pub struct W32;
#[derive(Clone, Copy, Debug)]
pub struct W64;

impl Width for W8 {
    const BITS: u32 = 8;
    const BYTES: usize = 1;
    const MASK: u64 = 0xff;
    #[inline(always)]
    fn get(gpr: &[u64], r: u8) -> u64 {
        // Byte slot: low nibble = register, bit 4 = high byte (AH..BH).
        let shift = u32::from(r >> 4) * 8;
        (gpr[usize::from(r & 15)] >> shift) & 0xff
    }
    #[inline(always)]
    fn set(gpr: &mut [u64], r: u8, v: u64) {
        let shift = u32::from(r >> 4) * 8;
        let slot = &mut gpr[usize::from(r & 15)];
        *slot = (*slot & !(0xff << shift)) | ((v & 0xff) << shift);
    }
}

impl Width for W16 {
    const BITS: u32 = 16;
    const BYTES: usize = 2;
    const MASK: u64 = 0xffff;
    #[inline(always)]
    fn get(gpr: &[u64], r: u8) -> u64 {
        gpr[usize::from(r)] & 0xffff
    }
    #[inline(always)]
    fn set(gpr: &mut [u64], r: u8, v: u64) {
        let slot = &mut gpr[usize::from(r)];
        *slot = (*slot & !0xffff) | (v & 0xffff);
    }
}

impl Width for W32 {
    const BITS: u32 = 32;
    const BYTES: usize = 4;
    const MASK: u64 = 0xffff_ffff;
    #[inline(always)]
    fn get(gpr: &[u64], r: u8) -> u64 {
        gpr[usize::from(r)] & 0xffff_ffff
    }
    #[inline(always)]
    fn set(gpr: &mut [u64], r: u8, v: u64) {
        // 32-bit writes zero-extend into the full register.
        gpr[usize::from(r)] = v & 0xffff_ffff;
    }
}

impl Width for W64 {
    const BITS: u32 = 64;
    const BYTES: usize = 8;
    const MASK: u64 = u64::MAX;
    #[inline(always)]
    fn get(gpr: &[u64], r: u8) -> u64 {
        gpr[usize::from(r)]
    }
    #[inline(always)]
    fn set(gpr: &mut [u64], r: u8, v: u64) {
        gpr[usize::from(r)] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_slots_reach_high_bytes() {
        let mut g = [0x1122_3344_5566_7788u64; 4];
        assert_eq!(W8::get(&g, 0x10), 0x77);
        W8::set(&mut g, 0x11, 0xab);
        assert_eq!(g[1], 0x1122_3344_5566_ab88);
        W8::set(&mut g, 2, 0xcd);
        assert_eq!(g[2], 0x1122_3344_5566_77cd);
    }

    #[test]
    fn dword_writes_zero_extend_word_writes_merge() {
        let mut g = [u64::MAX; 2];
        W32::set(&mut g, 0, 5);
        W16::set(&mut g, 1, 5);
        assert_eq!(g, [5, 0xffff_ffff_ffff_0005]);
        assert_eq!(W16::sext(0x8000), 0xffff_ffff_ffff_8000);
    }
}
