//! Legacy integer odds and ends no other family holds: salc and bound
//! (16/32-bit code only; iced does not decode them in 64-bit mode, so
//! they raise #UD there).

use crate::cpu::Cpu;
use crate::cpu::fault::{BR, Fault, Res};
use crate::cpu::width::{W8, W16, W32, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;

/// salc (undocumented D6, on every x86 since the 8086): AL = CF ? FFh : 0,
/// flags unchanged.
fn salc(cpu: &mut Cpu, _: &Insn) -> Res {
    let v = if cpu.flags.cf() { 0xff } else { 0 };
    W8::set(&mut cpu.gpr, 0, v);
    Ok(())
}

/// bound r, m: #BR unless `lower <= r <= upper`, both bounds signed and
/// read (with their faults) before the check.
fn bound<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let seg = usize::from(i.seg);
    let off = cpu.ea(i);
    let lower = W::sext(cpu.read_virt::<W>(seg, off)?) as i64;
    let upper_off = off.wrapping_add(W::BYTES as u64) & i.amask;
    let upper = W::sext(cpu.read_virt::<W>(seg, upper_off)?) as i64;
    let r = W::sext(W::get(&cpu.gpr, i.r0)) as i64;
    if r < lower || r > upper {
        return Err(Fault::raise(BR, None));
    }
    Ok(())
}

pub fn register(t: &mut Table) {
    t.add(c("Salc"), salc);
    t.add(c("Bound_r16_m1616"), bound::<W16>);
    t.add(c("Bound_r32_m3232"), bound::<W32>);
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use crate::cpu::flags::{CF, OSZAPC};
    use crate::tests::guest::*;

    #[test]
    fn salc_copies_carry_into_al_and_keeps_flags() {
        let mut vm = Guest::with_exception_stubs(1);
        vm.asm(32, CODE, |a| {
            a.salc().unwrap();
            a.hlt().unwrap();
        });
        for flags in [CF, OSZAPC, 0, OSZAPC & !CF] {
            let mut st = vm.protected32(CODE);
            st.gpr[0] = 0x1234_5678;
            st.rflags = flags | 2;
            let o = vm.start(&st);
            assert!(o.halted() && o.vector.is_none(), "{o:?}");
            let low = if flags & CF != 0 { 0xff } else { 0 };
            assert_eq!(o.state.gpr[0], 0x1234_5600 | low, "flags {flags:#x}");
            assert_eq!(o.state.rflags & OSZAPC, flags, "flags kept");
        }
    }

    #[test]
    fn bound_raises_br_outside_signed_bounds_as_a_fault() {
        let mut vm = Guest::with_exception_stubs(1);
        let bounds = DATA as u32;
        // [-5, 300] as words and as dwords.
        vm.write(DATA, &[0xfb, 0xff, 0x2c, 0x01]);
        vm.write(DATA + 8, &[0xfb, 0xff, 0xff, 0xff, 0x2c, 0x01, 0, 0]);
        let w = CODE;
        let d = vm.asm(32, w, |a| {
            a.bound(cx, word_ptr(bounds)).unwrap();
            a.hlt().unwrap();
        });
        vm.asm(32, d, |a| {
            a.bound(ecx, dword_ptr(bounds + 8)).unwrap();
            a.hlt().unwrap();
        });
        let cases: [(u64, u64, bool); 10] = [
            (w, 0, true),
            (w, 0xfffb, true),
            (w, 300, true),
            (w, 0xfffa, false),
            (w, 301, false),
            (w, 0xdead_0000, true), // only CX counts
            (d, (-5i64) as u64, true),
            (d, 300, true),
            (d, 0xffff_fffa, false),
            (d, 0x8000_0000, false),
        ];
        for (rip, count, inside) in cases {
            let mut st = vm.protected32(rip);
            st.gpr[1] = count;
            let o = vm.start(&st);
            if inside {
                assert!(
                    o.halted() && o.vector.is_none(),
                    "{count:#x} in bounds: {o:?}"
                );
            } else {
                assert_eq!(o.vector, Some(5), "#BR for {count:#x}");
                // The pushed EIP is the bound's own.
                assert_eq!(
                    vm.read_u64(STACK - 12) as u32,
                    rip as u32,
                    "EIP of the bound"
                );
            }
        }
    }

    #[test]
    fn salc_and_bound_are_invalid_in_64_bit_mode() {
        let mut vm = Guest::with_exception_stubs(1);
        vm.write(CODE, &[0xd6, 0xf4]);
        let o = vm.start(&vm.long_mode(CODE));
        assert_eq!(o.vector, Some(6), "salc: {o:?}");
    }
}
