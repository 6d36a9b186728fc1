//! Shifts and rotates: shl/sal, shr, sar, rol, ror, rcl, rcr, shld, shrd.

use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::Flags;
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::*;

/// A shift or rotate: the result of `a` by `n` (already masked and
/// non-zero), and the flags it leaves.
pub trait ShiftOp {
    /// Rotates through carry reduce the count modulo width+1.
    const THROUGH_CARRY: bool = false;
    /// Right rotates through carry compute OF from the result's top bits.
    const ROTATES_RIGHT: bool = false;
    fn apply<W: Width>(a: u64, n: u32, cf: bool) -> u64;
    fn flags<W: Width>(f: &mut Flags, a: u64, n: u32, r: u64, cf: bool);
}

pub struct Shl;
pub struct Shr;
pub struct Sar;
pub struct Rol;
pub struct Ror;
pub struct Rcl;
pub struct Rcr;

fn msb<W: Width>(v: u64) -> bool {
    v & W::SIGN != 0
}

/// A shift's result, CF and OF, with AF set: AF is undefined after
/// shl/shr/sar/shld/shrd by a non-zero count, and AMD (the host the
/// differential tester compares with) sets it.
#[inline(always)]
fn set_shift_flags<W: Width>(f: &mut Flags, r: u64, cf: bool, of: bool) {
    f.set_result_cf_of::<W>(r, cf, of);
    // AF lives in bit 3 of `aux` (see `Flags::af`); set_result_cf_of left
    // it clear.
    f.aux |= 1 << 3;
    debug_assert!(f.af());
}

impl ShiftOp for Shl {
    fn apply<W: Width>(a: u64, n: u32, _: bool) -> u64 {
        if n >= 64 { 0 } else { (a << n) & W::MASK }
    }
    fn flags<W: Width>(f: &mut Flags, a: u64, n: u32, r: u64, _: bool) {
        let cf = n <= W::BITS && (a >> (W::BITS - n)) & 1 != 0;
        set_shift_flags::<W>(f, r, cf, msb::<W>(r) ^ cf);
    }
}
impl ShiftOp for Shr {
    fn apply<W: Width>(a: u64, n: u32, _: bool) -> u64 {
        if n >= 64 { 0 } else { a >> n }
    }
    fn flags<W: Width>(f: &mut Flags, a: u64, n: u32, r: u64, _: bool) {
        let cf = n <= 64 && (a >> (n - 1)) & 1 != 0;
        // OF is defined for a count of 1 only (the operand's sign); for
        // larger counts AMD, the host we match, clears it.
        set_shift_flags::<W>(f, r, cf, n == 1 && msb::<W>(a));
    }
}
impl ShiftOp for Sar {
    fn apply<W: Width>(a: u64, n: u32, _: bool) -> u64 {
        ((W::sext(a) as i64) >> n.min(63)) as u64 & W::MASK
    }
    fn flags<W: Width>(f: &mut Flags, a: u64, n: u32, r: u64, _: bool) {
        let cf = ((W::sext(a) as i64) >> (n - 1).min(63)) & 1 != 0;
        set_shift_flags::<W>(f, r, cf, false);
    }
}
impl ShiftOp for Rol {
    fn apply<W: Width>(a: u64, n: u32, _: bool) -> u64 {
        let n = n % W::BITS;
        if n == 0 {
            a
        } else {
            ((a << n) | (a >> (W::BITS - n))) & W::MASK
        }
    }
    fn flags<W: Width>(f: &mut Flags, _: u64, _: u32, r: u64, _: bool) {
        let cf = r & 1 != 0;
        f.set_cf(cf);
        f.set_of(msb::<W>(r) ^ cf);
    }
}
impl ShiftOp for Ror {
    fn apply<W: Width>(a: u64, n: u32, _: bool) -> u64 {
        let n = n % W::BITS;
        if n == 0 {
            a
        } else {
            ((a >> n) | (a << (W::BITS - n))) & W::MASK
        }
    }
    fn flags<W: Width>(f: &mut Flags, _: u64, _: u32, r: u64, _: bool) {
        f.set_cf(msb::<W>(r));
        f.set_of(msb::<W>(r) ^ ((r >> (W::BITS - 2)) & 1 != 0));
    }
}
impl ShiftOp for Rcl {
    const THROUGH_CARRY: bool = true;
    fn apply<W: Width>(a: u64, n: u32, cf: bool) -> u64 {
        let bits = W::BITS + 1;
        let v = u128::from(a) | (u128::from(cf) << W::BITS);
        let r = ((v << n) | (v >> (bits - n))) & ((1u128 << bits) - 1);
        (r as u64) & W::MASK
    }
    fn flags<W: Width>(f: &mut Flags, a: u64, n: u32, r: u64, cf: bool) {
        let v = u128::from(a) | (u128::from(cf) << W::BITS);
        // The bit that lands in the carry position came from bit N-n.
        let new_cf = (v >> (W::BITS - n)) & 1 != 0;
        f.set_cf(new_cf);
        f.set_of(msb::<W>(r) ^ new_cf);
    }
}
impl ShiftOp for Rcr {
    const THROUGH_CARRY: bool = true;
    const ROTATES_RIGHT: bool = true;
    fn apply<W: Width>(a: u64, n: u32, cf: bool) -> u64 {
        let bits = W::BITS + 1;
        let v = u128::from(a) | (u128::from(cf) << W::BITS);
        let r = ((v >> n) | (v << (bits - n))) & ((1u128 << bits) - 1);
        (r as u64) & W::MASK
    }
    fn flags<W: Width>(f: &mut Flags, a: u64, n: u32, r: u64, cf: bool) {
        let v = u128::from(a) | (u128::from(cf) << W::BITS);
        let new_cf = (v >> (n - 1)) & 1 != 0;
        f.set_cf(new_cf);
        f.set_of(msb::<W>(r) ^ ((r >> (W::BITS - 2)) & 1 != 0));
    }
}

/// Count source: 0 = the constant 1, 1 = CL, 2 = the immediate.
fn count<W: Width, const CNT: u8>(cpu: &Cpu, i: &Insn) -> u32 {
    let raw = match CNT {
        0 => 1,
        1 => cpu.gpr[1] & 0xff,
        _ => i.imm & 0xff,
    };
    (raw & if W::BITS == 64 { 0x3f } else { 0x1f }) as u32
}

fn shift<O: ShiftOp, W: Width, D: Dst, const CNT: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let masked = count::<W, CNT>(cpu, i);
    let n = if O::THROUGH_CARRY {
        masked % (W::BITS + 1)
    } else {
        masked
    };
    if n == 0 {
        // No flags change; a memory operand is still checked, and a 32-bit
        // register is still written (zero-extended) as on hardware.
        let a = D::read::<W>(cpu, i)?;
        if D::IS_REG && W::BITS == 32 {
            D::write::<W>(cpu, i, a)?;
        }
        if masked != 0 {
            // rcl/rcr by a multiple of width+1: CF stays, OF follows each
            // one's count-1 formula on the unchanged value (as AMD, the
            // host we match, does): rcl MSB ^ CF, rcr MSB ^ MSB-1.
            let of = if O::ROTATES_RIGHT {
                msb::<W>(a) ^ ((a >> (W::BITS - 2)) & 1 != 0)
            } else {
                msb::<W>(a) ^ cpu.flags.cf()
            };
            cpu.flags.set_of(of);
        }
        return Ok(());
    }
    let cf = cpu.flags.cf();
    let a = D::rmw::<W>(cpu, i, |a| O::apply::<W>(a, n, cf))?;
    let r = O::apply::<W>(a, n, cf);
    O::flags::<W>(&mut cpu.flags, a, n, r, cf);
    Ok(())
}

/// shld (`LEFT`) / shrd with the count from CL (`CL`) or the immediate.
fn shxd<W: Width, D: Dst, const LEFT: bool, const CL: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let raw = if CL { cpu.gpr[1] } else { i.imm };
    let n = (raw & if W::BITS == 64 { 0x3f } else { 0x1f }) as u32;
    if n == 0 {
        let a = D::read::<W>(cpu, i)?;
        if D::IS_REG && W::BITS == 32 {
            D::write::<W>(cpu, i, a)?;
        }
        return Ok(());
    }
    let src = W::get(&cpu.gpr, i.r1);
    let bits = W::BITS;
    // 16-bit forms with counts above 16 shift a 48-bit dest:src:src
    // (shld) or src:src:dest (shrd), as AMD and the Pentium do; other
    // widths shift dest:src within 2N bits.
    let wide = |a: u64| -> (u128, u32) {
        if bits == 16 {
            let (a, s) = (u128::from(a), u128::from(src));
            if LEFT {
                (a << 32 | s << 16 | s, 48)
            } else {
                (s << 32 | s << 16 | a, 48)
            }
        } else if LEFT {
            (u128::from(a) << bits | u128::from(src), 2 * bits)
        } else {
            (u128::from(src) << bits | u128::from(a), 2 * bits)
        }
    };
    let calc = move |a: u64| -> u64 {
        let (v, total) = wide(a);
        if LEFT {
            ((v << n) >> (total - bits)) as u64 & W::MASK
        } else {
            (v >> n) as u64 & W::MASK
        }
    };
    let a = D::rmw::<W>(cpu, i, calc)?;
    let r = calc(a);
    let (v, total) = wide(a);
    // 16-bit counts above 16 are undefined; the hosts we compare with
    // (AMD) clear CF there.
    let undefined16 = bits == 16 && n > 16;
    let (cf, of) = if undefined16 {
        // Measured on the host: CF=0; OF=0 for shld, bit 15 ^ bit 14 of
        // the result for shrd.
        (false, !LEFT && msb::<W>(r) ^ ((r >> (bits - 2)) & 1 != 0))
    } else if LEFT {
        let cf = (v >> (total - n)) & 1 != 0;
        (cf, cf ^ msb::<W>(r))
    } else {
        let cf = (v >> (n - 1)) & 1 != 0;
        (cf, msb::<W>(r) ^ ((r >> (bits - 2)) & 1 != 0))
    };
    set_shift_flags::<W>(&mut cpu.flags, r, cf, of);
    Ok(())
}

macro_rules! shift_forms {
    ($t:expr, $name:literal, $op:ty) => {{
        macro_rules! one {
            ($suffix:literal, $w:ty, $cnt:literal) => {
                $t.rm(
                    c(concat!($name, $suffix)),
                    shift::<$op, $w, RegDst, $cnt>,
                    shift::<$op, $w, MemDst, $cnt>,
                )
            };
        }
        one!("_rm8_1", W8, 0);
        one!("_rm16_1", W16, 0);
        one!("_rm32_1", W32, 0);
        one!("_rm64_1", W64, 0);
        one!("_rm8_CL", W8, 1);
        one!("_rm16_CL", W16, 1);
        one!("_rm32_CL", W32, 1);
        one!("_rm64_CL", W64, 1);
        one!("_rm8_imm8", W8, 2);
        one!("_rm16_imm8", W16, 2);
        one!("_rm32_imm8", W32, 2);
        one!("_rm64_imm8", W64, 2);
    }};
}

macro_rules! shxd_forms {
    ($t:expr, $name:literal, $left:literal) => {{
        $t.rm(
            c(concat!($name, "_rm16_r16_imm8")),
            shxd::<W16, RegDst, $left, false>,
            shxd::<W16, MemDst, $left, false>,
        );
        $t.rm(
            c(concat!($name, "_rm32_r32_imm8")),
            shxd::<W32, RegDst, $left, false>,
            shxd::<W32, MemDst, $left, false>,
        );
        $t.rm(
            c(concat!($name, "_rm64_r64_imm8")),
            shxd::<W64, RegDst, $left, false>,
            shxd::<W64, MemDst, $left, false>,
        );
        $t.rm(
            c(concat!($name, "_rm16_r16_CL")),
            shxd::<W16, RegDst, $left, true>,
            shxd::<W16, MemDst, $left, true>,
        );
        $t.rm(
            c(concat!($name, "_rm32_r32_CL")),
            shxd::<W32, RegDst, $left, true>,
            shxd::<W32, MemDst, $left, true>,
        );
        $t.rm(
            c(concat!($name, "_rm64_r64_CL")),
            shxd::<W64, RegDst, $left, true>,
            shxd::<W64, MemDst, $left, true>,
        );
    }};
}

pub fn register(t: &mut Table) {
    shift_forms!(t, "Rol", Rol);
    shift_forms!(t, "Ror", Ror);
    shift_forms!(t, "Rcl", Rcl);
    shift_forms!(t, "Rcr", Rcr);
    shift_forms!(t, "Shl", Shl);
    shift_forms!(t, "Sal", Shl);
    shift_forms!(t, "Shr", Shr);
    shift_forms!(t, "Sar", Sar);
    shxd_forms!(t, "Shld", true);
    shxd_forms!(t, "Shrd", false);
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use super::*;
    use crate::cpu::flags::{AF, CF, OF, OSZAPC};
    use crate::tests::guest::*;

    type Emit = fn(&mut CodeAssembler) -> Result<(), IcedError>;

    /// Runs one instruction in a long-mode guest with `v` in rax and the
    /// arithmetic flags `f`; returns (rax, OSZAPC flags). On the
    /// interpreter alone: these tests pin its choice (AMD's) for flags the
    /// SDM leaves undefined, which translated code takes from the host
    /// ([`Guest::interpreted`]).
    fn guest_run(emit: Emit, v: u64, f: u64) -> (u64, u64) {
        let mut vm = Guest::interpreted();
        vm.asm(64, CODE, |a| {
            emit(a).unwrap();
            a.hlt().unwrap();
        });
        let mut st = vm.long_mode(CODE);
        st.gpr[0] = v;
        st.rflags = f | 2;
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        (o.state.gpr[0], o.state.rflags & OSZAPC)
    }

    #[test]
    fn rotate_through_carry_by_width_plus_one_sets_of_like_amd() {
        // rcr al, 9: no rotation; OF = MSB ^ MSB-1 of the value, CF kept.
        let (r, f) = guest_run(|a| a.rcr(al, 9), 0x0e, CF | OF);
        assert_eq!((r, f & (CF | OF)), (0x0e, CF));
        // rcr ax, 17 (0xf1 masks to 17).
        let (r, f) = guest_run(|a| a.rcr(ax, 0xf1), 0xb861, CF);
        assert_eq!((r, f & (CF | OF)), (0xb861, CF | OF));
        // rcl al, 9: OF = MSB ^ CF.
        let (r, f) = guest_run(|a| a.rcl(al, 9), 0x80, 0);
        assert_eq!((r, f & (CF | OF)), (0x80, OF));
    }

    #[test]
    fn shifts_set_af_like_amd_and_rotates_keep_it() {
        let (_, f) = guest_run(|a| a.shl(eax, 3), 0x11, 0);
        assert_eq!(f & AF, AF, "shl");
        let (_, f) = guest_run(|a| a.sar(ax, 1), 0x8000, 0);
        assert_eq!(f & AF, AF, "sar");
        let (_, f) = guest_run(|a| a.shrd(rax, rcx, 4), 0x10, 0);
        assert_eq!(f & AF, AF, "shrd");
        let (_, f) = guest_run(|a| a.rol(al, 3), 0x11, 0);
        assert_eq!(f & AF, 0, "rol keeps AF");
        let (_, f) = guest_run(|a| a.shl(al, 0x20), 0x11, 0);
        assert_eq!(f & AF, 0, "a zero masked count changes nothing");
    }

    #[test]
    fn shr_by_more_than_one_clears_of_like_amd() {
        let (r, f) = guest_run(|a| a.shr(al, 6), 0x80, OF);
        assert_eq!((r, f & (CF | OF)), (0x02, 0));
        let (r, f) = guest_run(|a| a.shr(al, 0xdc), 0x91, OF);
        assert_eq!((r, f & OF), (0, 0), "count 28 on a byte");
        let (r, f) = guest_run(|a| a.shr(al, 1), 0x80, 0);
        assert_eq!((r, f & OF), (0x40, OF), "count 1 keeps the sign in OF");
    }

    #[test]
    fn rotates_through_carry_use_width_plus_one_bits() {
        assert_eq!(Rcl::apply::<W8>(0x80, 1, false), 0);
        assert_eq!(Rcl::apply::<W8>(0x80, 2, false), 1);
        assert_eq!(Rcr::apply::<W8>(0x01, 1, true), 0x80);
        assert_eq!(Rol::apply::<W16>(0x8001, 4, false), 0x0018);
        assert_eq!(Sar::apply::<W8>(0x80, 7, false), 0xff);
    }
}
