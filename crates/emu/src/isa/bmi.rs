//! BMI1 and BMI2: the VEX-encoded general-purpose bit operations (andn,
//! bextr, blsi, blsmsk, blsr; bzhi, mulx, pdep, pext, rorx, sarx, shlx,
//! shrx). lzcnt/tzcnt (LZCNT and BMI1) live with bsf/bsr in `bit.rs`.
//!
//! Operand order follows iced: `i.r0..r2` are operands 0..2, so the
//! VEX.vvvv register is `r1` (andn, mulx, pdep, pext), `r2` (bextr, bzhi,
//! sarx/shlx/shrx) or `r0` (blsi, blsmsk, blsr), and the r/m operand is
//! the memory operand when `MEM`. 32-bit forms zero-extend as usual; VEX
//! raises #UD in real and virtual-8086 mode, and every form raises #UD on
//! a CPU model that does not advertise the set (qemu64), as hardware
//! without BMI does.
//!
//! Flags the manuals leave undefined (PF and AF; SF for bextr) come out
//! as the logic flags of the result with AF clear.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W32, W64, Width};
use crate::cpu::{Cpu, Mode};
use crate::decode::{Insn, Table};
use crate::isa::c;

/// Whether this vCPU's model has the extensions of issue 10 (BMI1/2,
/// LZCNT, MOVBE…): the default model does, qemu64 does not.
#[inline(always)]
pub(crate) fn modern(cpu: &Cpu) -> bool {
    cpu.vm.cpu_model.extensions()
}

/// The checks every VEX GPR instruction makes before its operands.
#[inline(always)]
fn vex_ok(cpu: &Cpu) -> Res {
    if !modern(cpu) || matches!(cpu.mode, Mode::Real | Mode::Virtual8086) {
        return Err(Fault::ud());
    }
    Ok(())
}

/// The r/m operand: register `reg` or, when `MEM`, memory.
#[inline(always)]
fn rm<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn, reg: u8) -> Res<u64> {
    if MEM {
        cpu.read_mem::<W>(i)
    } else {
        Ok(W::get(&cpu.gpr, reg))
    }
}

#[inline(always)]
fn reg<W: Width>(cpu: &Cpu, r: u8) -> u64 {
    W::get(&cpu.gpr, r)
}

/// andn r0, r1, r/m: `!r1 & src`; SF, ZF; CF = OF = 0.
fn andn<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r2)?;
    let r = !reg::<W>(cpu, i.r1) & src & W::MASK;
    W::set(&mut cpu.gpr, i.r0, r);
    cpu.flags.set_result_cf_of::<W>(r, false, false);
    Ok(())
}

/// bextr r0, r/m, r2: `len = r2[15:8]` bits of the source from bit
/// `start = r2[7:0]`; ZF; CF = OF = 0.
fn bextr<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r1)?;
    let ctl = reg::<W>(cpu, i.r2);
    let (start, len) = ((ctl & 0xff) as u32, (ctl >> 8 & 0xff) as u32);
    let shifted = if start >= W::BITS { 0 } else { src >> start };
    let r = if len >= 64 {
        shifted
    } else {
        shifted & ((1u64 << len) - 1)
    };
    W::set(&mut cpu.gpr, i.r0, r);
    cpu.flags.set_result_cf_of::<W>(r, false, false);
    Ok(())
}

/// What blsi/blsmsk/blsr compute from the source.
trait Bls {
    fn apply(src: u64) -> u64;
    /// CF from the source.
    fn cf(src: u64) -> bool;
}

struct Blsi;
struct Blsmsk;
struct Blsr;

impl Bls for Blsi {
    #[inline(always)]
    fn apply(src: u64) -> u64 {
        src & src.wrapping_neg()
    }
    #[inline(always)]
    fn cf(src: u64) -> bool {
        src != 0
    }
}
impl Bls for Blsmsk {
    #[inline(always)]
    fn apply(src: u64) -> u64 {
        src ^ src.wrapping_sub(1)
    }
    #[inline(always)]
    fn cf(src: u64) -> bool {
        src == 0
    }
}
impl Bls for Blsr {
    #[inline(always)]
    fn apply(src: u64) -> u64 {
        src & src.wrapping_sub(1)
    }
    #[inline(always)]
    fn cf(src: u64) -> bool {
        src == 0
    }
}

/// blsi/blsmsk/blsr r0 (VEX.vvvv), r/m: SF, ZF, CF; OF = 0.
fn bls<O: Bls, W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r1)?;
    let r = O::apply(src) & W::MASK;
    W::set(&mut cpu.gpr, i.r0, r);
    cpu.flags.set_result_cf_of::<W>(r, O::cf(src), false);
    Ok(())
}

/// bzhi r0, r/m, r2: the source with bits from `n = r2[7:0]` up cleared;
/// CF when `n` is past the operand; SF, ZF; OF = 0.
fn bzhi<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r1)?;
    let n = (reg::<W>(cpu, i.r2) & 0xff) as u32;
    let r = if n < W::BITS {
        src & ((1u64 << n) - 1)
    } else {
        src
    };
    W::set(&mut cpu.gpr, i.r0, r);
    cpu.flags.set_result_cf_of::<W>(r, n > W::BITS - 1, false);
    Ok(())
}

/// mulx r0 (high), r1 (low), r/m: unsigned `rdx * src`, no flags. With
/// r0 = r1 the register gets the high half.
fn mulx<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r2)?;
    let p = u128::from(reg::<W>(cpu, 2)) * u128::from(src);
    W::set(&mut cpu.gpr, i.r1, p as u64 & W::MASK);
    W::set(&mut cpu.gpr, i.r0, (p >> W::BITS) as u64 & W::MASK);
    Ok(())
}

/// Deposits the low bits of `v` at the set bits of `mask`.
pub(crate) fn pdep64(v: u64, mut mask: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while mask != 0 {
        let low = mask & mask.wrapping_neg();
        if v >> k & 1 != 0 {
            r |= low;
        }
        k += 1;
        mask ^= low;
    }
    r
}

/// Gathers the bits of `v` at the set bits of `mask` into the low bits.
pub(crate) fn pext64(v: u64, mut mask: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while mask != 0 {
        let low = mask & mask.wrapping_neg();
        if v & low != 0 {
            r |= 1 << k;
        }
        k += 1;
        mask ^= low;
    }
    r
}

/// Whether the host runs pdep/pext itself (the same result, one
/// instruction instead of a loop over the mask).
#[inline(always)]
fn host_bmi2() -> bool {
    std::arch::is_x86_feature_detected!("bmi2")
}

#[target_feature(enable = "bmi2")]
fn host_pdep_pext<const EXTRACT: bool>(v: u64, mask: u64) -> u64 {
    if EXTRACT {
        core::arch::x86_64::_pext_u64(v, mask)
    } else {
        core::arch::x86_64::_pdep_u64(v, mask)
    }
}

/// pdep (`EXTRACT` false) / pext r0, r1, r/m (the mask); no flags.
fn pdep_pext<W: Width, const EXTRACT: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let mask = rm::<W, MEM>(cpu, i, i.r2)?;
    let v = reg::<W>(cpu, i.r1);
    let r = if host_bmi2() {
        // SAFETY: the host has BMI2 (checked just above).
        unsafe { host_pdep_pext::<EXTRACT>(v, mask) }
    } else if EXTRACT {
        pext64(v, mask)
    } else {
        pdep64(v, mask)
    };
    W::set(&mut cpu.gpr, i.r0, r & W::MASK);
    Ok(())
}

/// rorx r0, r/m, imm8: rotate right by `imm mod size`, no flags.
fn rorx<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r1)?;
    let n = (i.imm as u32) & (W::BITS - 1);
    let r = if n == 0 {
        src
    } else {
        (src >> n | src << (W::BITS - n)) & W::MASK
    };
    W::set(&mut cpu.gpr, i.r0, r);
    Ok(())
}

/// The shift of sarx/shlx/shrx.
const SAR: u8 = 0;
const SHL: u8 = 1;
const SHR: u8 = 2;

/// sarx/shlx/shrx r0, r/m, r2: shift by `r2 mod size`, no flags.
fn shiftx<W: Width, const OP: u8, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    vex_ok(cpu)?;
    let src = rm::<W, MEM>(cpu, i, i.r1)?;
    let n = (reg::<W>(cpu, i.r2) as u32) & (W::BITS - 1);
    let r = match OP {
        SAR => (W::sext(src) as i64 >> n) as u64,
        SHL => src << n,
        _ => src >> n,
    } & W::MASK;
    W::set(&mut cpu.gpr, i.r0, r);
    Ok(())
}

/// Registers the r32 and r64 forms, register and memory, of `$h`.
macro_rules! forms {
    ($t:expr, $n32:literal, $n64:literal, $h:ident $(, $g:ty)*) => {{
        $t.rm(c($n32), $h::<$($g,)* W32, false>, $h::<$($g,)* W32, true>);
        $t.rm(c($n64), $h::<$($g,)* W64, false>, $h::<$($g,)* W64, true>);
    }};
}

pub(crate) fn register(t: &mut Table) {
    forms!(t, "VEX_Andn_r32_r32_rm32", "VEX_Andn_r64_r64_rm64", andn);
    forms!(t, "VEX_Bextr_r32_rm32_r32", "VEX_Bextr_r64_rm64_r64", bextr);
    forms!(t, "VEX_Blsi_r32_rm32", "VEX_Blsi_r64_rm64", bls, Blsi);
    forms!(t, "VEX_Blsmsk_r32_rm32", "VEX_Blsmsk_r64_rm64", bls, Blsmsk);
    forms!(t, "VEX_Blsr_r32_rm32", "VEX_Blsr_r64_rm64", bls, Blsr);
    forms!(t, "VEX_Bzhi_r32_rm32_r32", "VEX_Bzhi_r64_rm64_r64", bzhi);
    forms!(t, "VEX_Mulx_r32_r32_rm32", "VEX_Mulx_r64_r64_rm64", mulx);
    t.rm(
        c("VEX_Pdep_r32_r32_rm32"),
        pdep_pext::<W32, false, false>,
        pdep_pext::<W32, false, true>,
    );
    t.rm(
        c("VEX_Pdep_r64_r64_rm64"),
        pdep_pext::<W64, false, false>,
        pdep_pext::<W64, false, true>,
    );
    t.rm(
        c("VEX_Pext_r32_r32_rm32"),
        pdep_pext::<W32, true, false>,
        pdep_pext::<W32, true, true>,
    );
    t.rm(
        c("VEX_Pext_r64_r64_rm64"),
        pdep_pext::<W64, true, false>,
        pdep_pext::<W64, true, true>,
    );
    forms!(t, "VEX_Rorx_r32_rm32_imm8", "VEX_Rorx_r64_rm64_imm8", rorx);
    t.rm(
        c("VEX_Sarx_r32_rm32_r32"),
        shiftx::<W32, SAR, false>,
        shiftx::<W32, SAR, true>,
    );
    t.rm(
        c("VEX_Sarx_r64_rm64_r64"),
        shiftx::<W64, SAR, false>,
        shiftx::<W64, SAR, true>,
    );
    t.rm(
        c("VEX_Shlx_r32_rm32_r32"),
        shiftx::<W32, SHL, false>,
        shiftx::<W32, SHL, true>,
    );
    t.rm(
        c("VEX_Shlx_r64_rm64_r64"),
        shiftx::<W64, SHL, false>,
        shiftx::<W64, SHL, true>,
    );
    t.rm(
        c("VEX_Shrx_r32_rm32_r32"),
        shiftx::<W32, SHR, false>,
        shiftx::<W32, SHR, true>,
    );
    t.rm(
        c("VEX_Shrx_r64_rm64_r64"),
        shiftx::<W64, SHR, false>,
        shiftx::<W64, SHR, true>,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::guest::{CODE, Guest};
    use iced_x86::code_asm::*;

    /// andn and movbe run on the default model and raise #UD on qemu64
    /// (which advertises neither BMI1 nor MOVBE), as on such hardware.
    #[test]
    fn bmi_and_movbe_follow_the_cpu_model() {
        for (model, ud) in [
            (crate::cpuid::CpuModel::Vmplay, false),
            (crate::cpuid::CpuModel::VmplayBaseline, true),
            (crate::cpuid::CpuModel::Qemu64, true),
        ] {
            let opts = crate::EmuOptions {
                cpu_model: model,
                ..Default::default()
            };
            let mut vm = Guest::with_options(1, opts);
            vm.exception_stubs();
            for (k, emit) in [
                |a: &mut CodeAssembler| a.andn(rax, rcx, rdx),
                |a: &mut CodeAssembler| a.movbe(rax, qword_ptr(0x8000)),
            ]
            .into_iter()
            .enumerate()
            {
                let rip = CODE + 0x40 * k as u64;
                vm.asm(64, rip, |a| {
                    emit(a).unwrap();
                    a.hlt().unwrap();
                });
                vm.write_u64(0x8000, 0x0102_0304_0506_0708);
                let mut st = vm.long_mode(rip);
                (st.gpr[0], st.gpr[1], st.gpr[2]) = (0, 0xff00, 0xffff);
                let o = vm.start(&st);
                assert!(o.halted(), "{o:?}");
                if ud {
                    assert_eq!(o.vector, Some(6), "{model:?} form {k}");
                } else {
                    assert_eq!(o.vector, None, "{model:?} form {k}");
                    let want = [0xff, 0x0807_0605_0403_0201][k];
                    assert_eq!(o.state.gpr[0], want, "form {k}");
                }
            }
        }
    }

    #[test]
    fn software_pdep_and_pext_match_the_host() {
        if !std::arch::is_x86_feature_detected!("bmi2") {
            return;
        }
        let vals = [
            0,
            1,
            u64::MAX,
            0x8000_0000_0000_0001,
            0x1234_5678_9abc_def0,
            0xf0f0_0f0f_aaaa_5555,
        ];
        for v in vals {
            for m in vals {
                // SAFETY: the CPU has BMI2 (checked above).
                let (d, e) = unsafe {
                    (
                        core::arch::x86_64::_pdep_u64(v, m),
                        core::arch::x86_64::_pext_u64(v, m),
                    )
                };
                assert_eq!(pdep64(v, m), d, "pdep {v:#x} {m:#x}");
                assert_eq!(pext64(v, m), e, "pext {v:#x} {m:#x}");
            }
        }
    }
}
