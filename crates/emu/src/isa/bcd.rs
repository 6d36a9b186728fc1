//! Decimal adjust: daa, das, aaa, aas, aam, aad (16/32-bit code only;
//! iced does not decode them in 64-bit mode, so they raise #UD there).
//!
//! Each is a pure function of AX and the arithmetic flags, written from
//! the SDM's pseudo-code. The flags the SDM leaves undefined follow an AMD
//! EPYC, measured over every AL (and AH for aaa/aas/aad) and every CF/AF
//! input in compatibility mode:
//! * daa/das: OF is the signed overflow of the AL adjustment;
//! * aaa/aas: SF/ZF/PF/OF come from the 16-bit `AX ± 0x106` (or unchanged
//!   AX) before AL is masked to its low nibble;
//! * aam: OF=AF=CF=0; aad: OF/AF/CF of the 8-bit `AL + AH*base`.
//!
//! They are rare and slow-path: flags are assembled as RFLAGS bits and
//! stored with `Flags::set_bits`.

use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{AF, CF, OF, PF, SF, ZF, parity_even};
use crate::cpu::width::{W16, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;

/// SF, ZF and PF of an 8-bit result.
fn szp8(r: u8) -> u64 {
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if r & 0x80 != 0 {
        f |= SF;
    }
    if parity_even(r) {
        f |= PF;
    }
    f
}

/// SF and ZF of a 16-bit result, PF of its low byte.
fn szp16(r: u16) -> u64 {
    let mut f = szp8(r as u8) & PF;
    if r == 0 {
        f |= ZF;
    }
    if r & 0x8000 != 0 {
        f |= SF;
    }
    f
}

/// daa: `(AX, flags)` → `(AX, flags)`. Only AL changes.
pub fn daa(ax: u16, flags: u64) -> (u16, u64) {
    let old = ax as u8;
    let mut al = old;
    let mut f = 0;
    if al & 0x0f > 9 || flags & AF != 0 {
        al = al.wrapping_add(6);
        f |= AF;
    }
    // The SDM also ORs in the carry of AL+6, but that carry needs
    // AL > 0xf9, which takes this branch anyway.
    if old > 0x99 || flags & CF != 0 {
        al = al.wrapping_add(0x60);
        f |= CF;
    }
    if old & 0x80 == 0 && al & 0x80 != 0 {
        f |= OF;
    }
    ((ax & 0xff00) | u16::from(al), f | szp8(al))
}

/// das. Unlike daa, CF is also set by a borrow from AL−6 alone.
pub fn das(ax: u16, flags: u64) -> (u16, u64) {
    let old = ax as u8;
    let mut al = old;
    let mut f = 0;
    if al & 0x0f > 9 || flags & AF != 0 {
        if al < 6 {
            f |= CF;
        }
        al = al.wrapping_sub(6);
        f |= AF;
    }
    if old > 0x99 || flags & CF != 0 {
        al = al.wrapping_sub(0x60);
        f |= CF;
    }
    if old & 0x80 != 0 && al & 0x80 == 0 {
        f |= OF;
    }
    ((ax & 0xff00) | u16::from(al), f | szp8(al))
}

/// aaa: on adjust `AX += 0x106` (the carry of AL+6 reaches AH too),
/// AF=CF=1; then AL keeps only its low nibble.
pub fn aaa(ax: u16, flags: u64) -> (u16, u64) {
    let (t, mut f) = if ax & 0x0f > 9 || flags & AF != 0 {
        (ax.wrapping_add(0x106), AF | CF)
    } else {
        (ax, 0)
    };
    if ax & 0x8000 == 0 && t & 0x8000 != 0 {
        f |= OF;
    }
    (t & 0xff0f, f | szp16(t))
}

/// aas: on adjust `AX -= 0x106`, AF=CF=1; then AL keeps its low nibble.
pub fn aas(ax: u16, flags: u64) -> (u16, u64) {
    let (t, mut f) = if ax & 0x0f > 9 || flags & AF != 0 {
        (ax.wrapping_sub(0x106), AF | CF)
    } else {
        (ax, 0)
    };
    if ax & 0x8000 != 0 && t & 0x8000 == 0 {
        f |= OF;
    }
    (t & 0xff0f, f | szp16(t))
}

/// aam base: AH = AL / base, AL = AL % base; `None` for base 0 (#DE).
pub fn aam(ax: u16, base: u8) -> Option<(u16, u64)> {
    let al = ax as u8;
    let (q, r) = (al.checked_div(base)?, al % base);
    Some((u16::from(q) << 8 | u16::from(r), szp8(r)))
}

/// aad base: AL = AL + AH * base (mod 256), AH = 0.
pub fn aad(ax: u16, base: u8) -> (u16, u64) {
    let (ah, al) = ((ax >> 8) as u8, ax as u8);
    let x = ah.wrapping_mul(base);
    let (r, carry) = al.overflowing_add(x);
    let mut f = szp8(r);
    if carry {
        f |= CF;
    }
    if (al & 0x0f) + (x & 0x0f) > 0x0f {
        f |= AF;
    }
    if (al ^ r) & (x ^ r) & 0x80 != 0 {
        f |= OF;
    }
    (u16::from(r), f)
}

/// Stores AX and the six arithmetic flags.
fn commit(cpu: &mut Cpu, (ax, f): (u16, u64)) {
    W16::set(&mut cpu.gpr, 0, u64::from(ax));
    cpu.flags.set_bits(f);
}

fn adjust<const OP: u8>(cpu: &mut Cpu, _: &Insn) -> Res {
    let ax = W16::get(&cpu.gpr, 0) as u16;
    let flags = cpu.flags.bits();
    let r = match OP {
        0 => daa(ax, flags),
        1 => das(ax, flags),
        2 => aaa(ax, flags),
        _ => aas(ax, flags),
    };
    commit(cpu, r);
    Ok(())
}

fn aam_imm(cpu: &mut Cpu, i: &Insn) -> Res {
    let ax = W16::get(&cpu.gpr, 0) as u16;
    let r = aam(ax, i.imm as u8).ok_or_else(Fault::de)?;
    commit(cpu, r);
    Ok(())
}

fn aad_imm(cpu: &mut Cpu, i: &Insn) -> Res {
    let ax = W16::get(&cpu.gpr, 0) as u16;
    commit(cpu, aad(ax, i.imm as u8));
    Ok(())
}

pub fn register(t: &mut Table) {
    t.add(c("Daa"), adjust::<0>);
    t.add(c("Das"), adjust::<1>);
    t.add(c("Aaa"), adjust::<2>);
    t.add(c("Aas"), adjust::<3>);
    t.add(c("Aam_imm8"), aam_imm);
    t.add(c("Aad_imm8"), aad_imm);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a + b + c` on AL as `add`/`adc` leaves it: (result, CF|AF).
    fn add8(a: u8, b: u8, c: bool) -> (u8, u64) {
        let wide = u16::from(a) + u16::from(b) + u16::from(c);
        let mut f = 0;
        if wide > 0xff {
            f |= CF;
        }
        if (a & 0xf) + (b & 0xf) + u8::from(c) > 0xf {
            f |= AF;
        }
        (wide as u8, f)
    }

    /// `a - b - c` on AL as `sub`/`sbb` leaves it: (result, CF|AF).
    fn sub8(a: u8, b: u8, c: bool) -> (u8, u64) {
        let mut f = 0;
        if u16::from(a) < u16::from(b) + u16::from(c) {
            f |= CF;
        }
        if (a & 0xf) < (b & 0xf) + u8::from(c) {
            f |= AF;
        }
        (a.wrapping_sub(b).wrapping_sub(u8::from(c)), f)
    }

    fn bcd(n: u32) -> u8 {
        (((n / 10) << 4) | (n % 10)) as u8
    }

    #[test]
    fn daa_matches_the_sdm_example() {
        // add al, bl with AL=79h, BL=35h gives AEh, no CF/AF; daa: 14h, CF=AF=PF=1.
        let (r, f) = add8(0x79, 0x35, false);
        assert_eq!((r, f), (0xae, 0));
        assert_eq!(daa(0x00ae, f), (0x0014, CF | AF | PF));
    }

    #[test]
    fn das_matches_the_sdm_example() {
        // sub al, bl with AL=35h, BL=47h gives EEh with CF=AF=1; das: 88h, SF=AF=PF=CF=1.
        let (r, f) = sub8(0x35, 0x47, false);
        assert_eq!((r, f), (0xee, CF | AF));
        assert_eq!(das(0x00ee, f), (0x0088, SF | AF | PF | CF));
    }

    #[test]
    fn daa_after_adc_adds_packed_bcd_exactly() {
        for a in 0..100 {
            for b in 0..100 {
                for c in [false, true] {
                    let (r, f) = add8(bcd(a), bcd(b), c);
                    let (ax, f) = daa(0x5500 | u16::from(r), f);
                    let sum = a + b + u32::from(c);
                    assert_eq!(ax, 0x5500 | u16::from(bcd(sum % 100)), "{a} + {b} + {c}");
                    assert_eq!(f & CF != 0, sum >= 100, "carry of {a} + {b} + {c}");
                    assert_eq!(f & ZF != 0, sum % 100 == 0);
                }
            }
        }
    }

    #[test]
    fn das_after_sbb_subtracts_packed_bcd_exactly() {
        for a in 0..100 {
            for b in 0..100 {
                for c in [false, true] {
                    let (r, f) = sub8(bcd(a), bcd(b), c);
                    let (ax, f) = das(u16::from(r), f);
                    let diff = (a + 100 - b - u32::from(c)) % 100;
                    assert_eq!(ax, u16::from(bcd(diff)), "{a} - {b} - {c}");
                    assert_eq!(
                        f & CF != 0,
                        a < b + u32::from(c),
                        "borrow of {a} - {b} - {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn aaa_and_aas_adjust_unpacked_and_ascii_digits() {
        for a in 0..10u8 {
            for b in 0..10u8 {
                for (da, db) in [(a, b), (b'0' + a, b'0' + b)] {
                    let (r, f) = add8(da, db, false);
                    let (ax, f) = aaa(0x3700 | u16::from(r), f);
                    let carry = a + b >= 10;
                    assert_eq!(
                        ax,
                        (0x3700 + (u16::from(carry) << 8)) | u16::from((a + b) % 10),
                        "{da:#x} + {db:#x}"
                    );
                    assert_eq!(f & (CF | AF), if carry { CF | AF } else { 0 });

                    let (r, f) = sub8(da, db, false);
                    let (ax, f) = aas(0x3700 | u16::from(r), f);
                    let borrow = a < b;
                    assert_eq!(
                        ax,
                        (0x3700 - (u16::from(borrow) << 8)) | u16::from((a + 10 - b) % 10),
                        "{da:#x} - {db:#x}"
                    );
                    assert_eq!(f & (CF | AF), if borrow { CF | AF } else { 0 });
                }
            }
        }
    }

    #[test]
    fn aam_divides_al_by_any_base_and_aad_undoes_it() {
        for base in 1..=255u8 {
            for al in 0..=255u8 {
                let (ax, f) = aam(0xee00 | u16::from(al), base).expect("nonzero base");
                assert_eq!(
                    ax,
                    u16::from(al / base) << 8 | u16::from(al % base),
                    "aam {base} of {al}"
                );
                assert_eq!(
                    f & (SF | ZF),
                    if al % base == 0 { ZF } else { 0 } | u64::from(al % base) & SF
                );
                assert_eq!(f & (CF | AF | OF), 0);
                assert_eq!(
                    aad(ax, base).0,
                    u16::from(al),
                    "aad {base} after aam {base} of {al}"
                );
            }
        }
    }

    #[test]
    fn aad_folds_ah_into_al_with_any_base() {
        for base in 0..=255u8 {
            for ax in (0..=0xffffu16).step_by(7) {
                let (ah, al) = (u32::from(ax >> 8), u32::from(ax & 0xff));
                let want = (al + ah * u32::from(base)) & 0xff;
                assert_eq!(aad(ax, base).0, want as u16, "aad {base} of {ax:#x}");
            }
        }
    }

    #[test]
    fn aam_zero_is_a_divide_error() {
        assert_eq!(aam(0x0042, 0), None);
    }

    /// (AX in, flags in, AX out, flags out), measured on an AMD EPYC in
    /// compatibility mode; flags are the OSZAPC bits.
    type Vector = (u16, u64, u16, u64);

    fn check(name: &str, f: fn(u16, u64) -> (u16, u64), vectors: &[Vector]) {
        for &(ax, fin, want_ax, want_f) in vectors {
            assert_eq!(
                f(ax, fin),
                (want_ax, want_f),
                "{name} AX={ax:#06x} flags={fin:#x}"
            );
        }
    }

    #[test]
    fn daa_and_das_match_hardware_including_undefined_of() {
        check(
            "daa",
            daa,
            &[
                (0x1200, 0, 0x1200, 0x044),
                (0x1200, 0x011, 0x1266, 0x015),
                (0x1266, 0x011, 0x12cc, 0x895),
                (0x127f, 0, 0x1285, 0x890),
                (0x127f, 0x011, 0x12e5, 0x891),
                (0x1280, 0x011, 0x12e6, 0x091),
                (0x129a, 0, 0x1200, 0x055),
                (0x12f9, 0, 0x1259, 0x005),
                (0x12f9, 0x011, 0x125f, 0x015),
                (0x12fa, 0, 0x1260, 0x015),
            ],
        );
        check(
            "das",
            das,
            &[
                (0x1200, 0x010, 0x12fa, 0x095),
                (0x1200, 0x011, 0x129a, 0x095),
                (0x1205, 0x010, 0x12ff, 0x095),
                (0x1206, 0x010, 0x1200, 0x054),
                (0x1280, 0x010, 0x127a, 0x810),
                (0x1280, 0x011, 0x121a, 0x811),
                (0x129a, 0, 0x1234, 0x811),
                (0x12fa, 0x011, 0x1294, 0x091),
            ],
        );
    }

    #[test]
    fn aaa_and_aas_match_hardware_including_undefined_flags() {
        check(
            "aaa",
            aaa,
            &[
                (0x0000, 0, 0x0000, 0x044),
                (0x0000, 0x010, 0x0106, 0x015),
                (0x007a, 0, 0x0100, 0x011),
                (0x00fa, 0, 0x0200, 0x015),
                (0x00ff, 0x010, 0x0205, 0x015),
                (0x7f00, 0x010, 0x8006, 0x895),
                (0x7f7a, 0, 0x8000, 0x891),
                (0xff00, 0, 0xff00, 0x084),
                (0xff7a, 0, 0x0000, 0x011),
                (0xfffa, 0, 0x0100, 0x015),
            ],
        );
        check(
            "aas",
            aas,
            &[
                (0x0000, 0x010, 0xfe0a, 0x095),
                (0x0006, 0x010, 0xff00, 0x095),
                (0x00fa, 0, 0xff04, 0x091),
                (0x1206, 0x010, 0x1100, 0x015),
                (0x12fa, 0, 0x1104, 0x011),
                (0x8000, 0, 0x8000, 0x084),
                (0x8000, 0x010, 0x7e0a, 0x815),
                (0x80fa, 0, 0x7f04, 0x811),
                (0xff06, 0x010, 0xfe00, 0x095),
            ],
        );
    }

    #[test]
    fn aam_and_aad_match_hardware_including_undefined_flags() {
        // (base, AX in, AX out, flags out); the input flags were CF=AF=1.
        let aam_vectors: [(u8, u16, u16, u64); 6] = [
            (10, 0x1200, 0x0000, 0x044),
            (10, 0x1280, 0x0c08, 0x000),
            (10, 0x12ff, 0x1905, 0x004),
            (7, 0x12ff, 0x2403, 0x004),
            (255, 0x1280, 0x0080, 0x080),
            (255, 0x12ff, 0x0100, 0x044),
        ];
        for (base, ax, want_ax, want_f) in aam_vectors {
            assert_eq!(
                aam(ax, base),
                Some((want_ax, want_f)),
                "aam {base} AX={ax:#06x}"
            );
        }
        let aad_vectors: [(u8, u16, u16, u64); 6] = [
            (10, 0x1200, 0x00b4, 0x084),
            (10, 0x1280, 0x0034, 0x801),
            (10, 0x12c8, 0x007c, 0x801),
            (10, 0x12fa, 0x00ae, 0x081),
            (10, 0x12ff, 0x00b3, 0x091),
            (10, 0xff37, 0x002d, 0x005),
        ];
        for (base, ax, want_ax, want_f) in aad_vectors {
            assert_eq!(aad(ax, base), (want_ax, want_f), "aad {base} AX={ax:#06x}");
        }
    }

    mod guest {
        use iced_x86::code_asm::*;

        use crate::tests::guest::*;

        #[test]
        fn decimal_adjusts_run_in_32_bit_code() {
            let mut vm = Guest::with_exception_stubs(1);
            let data = DATA as u32;
            vm.write(DATA, &[0x78, 0x56, 0x34, 0x12, 0x29, 0x43, 0x65, 0x87]);
            vm.asm(32, CODE, |a| {
                // Multi-byte packed BCD: 12345678 + 87654329, then 12345678 - 87654329.
                for (op, out) in [(0u32, 8u32), (1, 12)] {
                    let mut next = a.create_label();
                    a.mov(esi, data).unwrap();
                    a.mov(edi, data + 4).unwrap();
                    a.mov(ebx, data + out).unwrap();
                    a.mov(ecx, 4u32).unwrap();
                    a.clc().unwrap();
                    a.set_label(&mut next).unwrap();
                    a.mov(al, byte_ptr(esi)).unwrap();
                    if op == 0 {
                        a.adc(al, byte_ptr(edi)).unwrap();
                        a.daa().unwrap();
                    } else {
                        a.sbb(al, byte_ptr(edi)).unwrap();
                        a.das().unwrap();
                    }
                    a.mov(byte_ptr(ebx), al).unwrap();
                    a.inc(esi).unwrap();
                    a.inc(edi).unwrap();
                    a.inc(ebx).unwrap();
                    a.dec(ecx).unwrap();
                    a.jnz(next).unwrap();
                    a.setc(byte_ptr(data + out + 32)).unwrap();
                }
                // ASCII '9' + '5' = 14; 23 - 5 = 18 in unpacked digits.
                a.mov(eax, 0xdead_0000u32 | u32::from(b'9')).unwrap();
                a.add(al, i32::from(b'5')).unwrap();
                a.aaa().unwrap();
                a.mov(dword_ptr(data + 16), eax).unwrap();
                a.mov(eax, 0xbeef_0203u32).unwrap();
                a.sub(al, 5).unwrap();
                a.aas().unwrap();
                a.mov(dword_ptr(data + 20), eax).unwrap();
                a.mov(eax, 0xcafe_12abu32).unwrap();
                a.aam(16).unwrap();
                a.mov(dword_ptr(data + 24), eax).unwrap();
                a.mov(eax, 0x1234_0305u32).unwrap();
                a.aad(7).unwrap();
                a.mov(dword_ptr(data + 28), eax).unwrap();
                a.hlt().unwrap();
            });
            let o = vm.start(&vm.protected32(CODE));
            assert!(o.halted() && o.vector.is_none(), "{o:?}");
            let q = |off: u64| vm.read_u64(DATA + off);
            assert_eq!(q(8) as u32, 0x0000_0007, "12345678 + 87654329 = 1_00000007");
            assert_eq!(q(40) as u8, 1, "decimal carry out");
            assert_eq!(
                q(12) as u32,
                0x2469_1349,
                "12345678 - 87654329 = -1_00000000 + 24691349"
            );
            assert_eq!(q(44) as u8, 1, "decimal borrow out");
            assert_eq!(q(16) as u32, 0xdead_0104, "aaa: AH=1 AL=4, upper EAX kept");
            assert_eq!(q(20) as u32, 0xbeef_0108, "aas: AH=1 AL=8");
            assert_eq!(q(24) as u32, 0xcafe_0a0b, "aam 16 splits nibbles");
            assert_eq!(q(28) as u32, 0x1234_001a, "aad 7: 3*7+5");
        }

        #[test]
        fn aam_zero_faults_with_divide_error_before_changing_ax() {
            let mut vm = Guest::with_exception_stubs(1);
            let rip = 0x8000;
            vm.asm(16, rip, |a| {
                a.mov(ax, 0x1234u32).unwrap();
                a.aam(0).unwrap();
                a.hlt().unwrap();
            });
            let o = vm.start(&vm.real_mode(rip));
            assert_eq!(o.vector, Some(0), "#DE: {o:?}");
            assert_eq!(o.state.gpr[0] & 0xffff, 0x1234);
            // The pushed IP is the aam's own (a fault, not a trap).
            let frame = vm.read_u64(REAL_STACK - 6);
            assert_eq!(frame & 0xffff, rip + 3, "IP of the aam");
        }

        #[test]
        fn decimal_adjusts_are_invalid_in_64_bit_mode() {
            let mut vm = Guest::with_exception_stubs(1);
            for (k, op) in [
                [0x27u8, 0x90],
                [0x2f, 0x90],
                [0x37, 0x90],
                [0x3f, 0x90],
                [0xd4, 0x0a],
                [0xd5, 0x0a],
            ]
            .iter()
            .enumerate()
            {
                let rip = CODE + 0x10 * k as u64;
                vm.write(rip, &[op[0], op[1], 0xf4]);
                let o = vm.start(&vm.long_mode(rip));
                assert_eq!(o.vector, Some(6), "#UD for {op:02x?}: {o:?}");
            }
        }
    }
}
