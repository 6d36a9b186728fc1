//! Data movement and flag-register odds and ends: mov (all forms),
//! movzx/movsx/movsxd, lea, xchg, cmovcc, setcc, bswap, cbw…cqo, xlat,
//! lahf/sahf, clc/stc/cmc/cld/std, segment-register moves and far-pointer
//! loads, nops.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{AF, CF, DF, PF, SF, ZF};
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::cpu::{CS, Cpu, SS};
use crate::decode::{Insn, Table};
use crate::isa::ops::*;
use crate::isa::{CC, c};

fn mov<W: Width, D: Dst, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    D::write::<W>(cpu, i, v)
}

fn movzx<WD: Width, WS: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<WS>(cpu, i)?;
    WD::set(&mut cpu.gpr, i.r0, v);
    Ok(())
}

fn movsx<WD: Width, WS: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<WS>(cpu, i)?;
    WD::set(&mut cpu.gpr, i.r0, WS::sext(v) & WD::MASK);
    Ok(())
}

fn lea<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = cpu.ea(i) & W::MASK;
    W::set(&mut cpu.gpr, i.r0, v);
    Ok(())
}

fn xchg<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let src = W::get(&cpu.gpr, i.r1);
    let old = D::rmw::<W>(cpu, i, |_| src)?;
    W::set(&mut cpu.gpr, i.r1, old);
    Ok(())
}

fn cmov<const CC_: u8, W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    if cpu.flags.cond(CC_) {
        W::set(&mut cpu.gpr, i.r0, v);
    } else if W::BITS == 32 {
        let old = W::get(&cpu.gpr, i.r0);
        W::set(&mut cpu.gpr, i.r0, old);
    }
    Ok(())
}

fn setcc<const CC_: u8, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = u64::from(cpu.flags.cond(CC_));
    D::write::<W8>(cpu, i, v)
}

fn bswap<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = W::get(&cpu.gpr, i.r0);
    let r = match W::BITS {
        32 => u64::from((v as u32).swap_bytes()),
        64 => v.swap_bytes(),
        _ => 0, // 16-bit bswap is undefined; hardware gives 0.
    };
    W::set(&mut cpu.gpr, i.r0, r);
    Ok(())
}

/// cbw/cwde/cdqe: sign-extend the low half of the accumulator.
fn cbw<W: Width, WH: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    let v = WH::sext(WH::get(&cpu.gpr, 0)) & W::MASK;
    W::set(&mut cpu.gpr, 0, v);
    Ok(())
}

/// cwd/cdq/cqo: rDX = sign of rAX.
fn cwd<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    let v = if W::get(&cpu.gpr, 0) & W::SIGN != 0 {
        W::MASK
    } else {
        0
    };
    W::set(&mut cpu.gpr, 2, v);
    Ok(())
}

fn xlat(cpu: &mut Cpu, i: &Insn) -> Res {
    let off = cpu.gpr[3].wrapping_add(cpu.gpr[0] & 0xff) & i.amask;
    let v = cpu.read_virt::<W8>(usize::from(i.seg), off)?;
    W8::set(&mut cpu.gpr, 0, v);
    Ok(())
}

fn lahf(cpu: &mut Cpu, _: &Insn) -> Res {
    let f = (cpu.flags.bits() & (SF | ZF | AF | PF | CF)) | 2;
    W8::set(&mut cpu.gpr, 0x10, f);
    Ok(())
}

fn sahf(cpu: &mut Cpu, _: &Insn) -> Res {
    let ah = W8::get(&cpu.gpr, 0x10);
    let keep = cpu.flags.bits() & !(SF | ZF | AF | PF | CF);
    cpu.flags.set_bits(keep | (ah & (SF | ZF | AF | PF | CF)));
    Ok(())
}

/// salc (undocumented, 32-bit only): AL = CF ? 0xff : 0.
fn salc(cpu: &mut Cpu, _: &Insn) -> Res {
    let v = if cpu.flags.cf() { 0xff } else { 0 };
    W8::set(&mut cpu.gpr, 0, v);
    Ok(())
}

fn clc(cpu: &mut Cpu, _: &Insn) -> Res {
    cpu.flags.set_cf(false);
    Ok(())
}
fn stc(cpu: &mut Cpu, _: &Insn) -> Res {
    cpu.flags.set_cf(true);
    Ok(())
}
fn cmc(cpu: &mut Cpu, _: &Insn) -> Res {
    let cf = cpu.flags.cf();
    cpu.flags.set_cf(!cf);
    Ok(())
}
fn cld(cpu: &mut Cpu, _: &Insn) -> Res {
    cpu.rflags &= !DF;
    Ok(())
}
fn std_(cpu: &mut Cpu, _: &Insn) -> Res {
    cpu.rflags |= DF;
    Ok(())
}

pub fn nop(_: &mut Cpu, _: &Insn) -> Res {
    Ok(())
}

/// mov r/m, Sreg: register destinations get the zero-extended selector.
fn mov_from_sreg<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    if i.r1 > 5 {
        return Err(Fault::ud());
    }
    let v = u64::from(cpu.seg[usize::from(i.r1)].sel);
    if D::IS_REG {
        W::set(&mut cpu.gpr, i.r0, v);
        Ok(())
    } else {
        D::write::<W16>(cpu, i, v)
    }
}

fn mov_to_sreg<S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let n = usize::from(i.r0);
    if n == CS || n > 5 {
        return Err(Fault::ud());
    }
    let sel = S::get::<W16>(cpu, i)? as u16;
    cpu.load_seg(n, sel)?;
    if n == SS {
        crate::mode::dbreg::ss_loaded(cpu);
    }
    cpu.stop = true;
    Ok(())
}

/// lds/les/lfs/lgs/lss: offset of width W then a selector.
fn load_far<W: Width, const SEG: usize>(cpu: &mut Cpu, i: &Insn) -> Res {
    let off = cpu.ea(i);
    let seg = usize::from(i.seg);
    let v = cpu.read_virt::<W>(seg, off)?;
    let sel = cpu.read_virt::<W16>(seg, off.wrapping_add(W::BYTES as u64) & i.amask)? as u16;
    cpu.load_seg(SEG, sel)?;
    W::set(&mut cpu.gpr, i.r0, v);
    cpu.stop = true;
    Ok(())
}

macro_rules! cc_forms {
    ($t:expr, $cc:literal) => {{
        let n = CC[$cc];
        let cap = |p: &str| format!("{}{}", p, n);
        $t.rm(
            c(&format!("{}_r16_rm16", cap("Cmov"))),
            cmov::<$cc, W16, RegSrc>,
            cmov::<$cc, W16, MemSrc>,
        );
        $t.rm(
            c(&format!("{}_r32_rm32", cap("Cmov"))),
            cmov::<$cc, W32, RegSrc>,
            cmov::<$cc, W32, MemSrc>,
        );
        $t.rm(
            c(&format!("{}_r64_rm64", cap("Cmov"))),
            cmov::<$cc, W64, RegSrc>,
            cmov::<$cc, W64, MemSrc>,
        );
        $t.rm(
            c(&format!("{}_rm8", cap("Set"))),
            setcc::<$cc, RegDst>,
            setcc::<$cc, MemDst>,
        );
    }};
}

pub fn register(t: &mut Table) {
    t.rm(
        c("Mov_rm8_r8"),
        mov::<W8, RegDst, RegSrc>,
        mov::<W8, MemDst, RegSrc>,
    );
    t.rm(
        c("Mov_rm16_r16"),
        mov::<W16, RegDst, RegSrc>,
        mov::<W16, MemDst, RegSrc>,
    );
    t.rm(
        c("Mov_rm32_r32"),
        mov::<W32, RegDst, RegSrc>,
        mov::<W32, MemDst, RegSrc>,
    );
    t.rm(
        c("Mov_rm64_r64"),
        mov::<W64, RegDst, RegSrc>,
        mov::<W64, MemDst, RegSrc>,
    );
    t.rm(
        c("Mov_r8_rm8"),
        mov::<W8, RegDst, RegSrc>,
        mov::<W8, RegDst, MemSrc>,
    );
    t.rm(
        c("Mov_r16_rm16"),
        mov::<W16, RegDst, RegSrc>,
        mov::<W16, RegDst, MemSrc>,
    );
    t.rm(
        c("Mov_r32_rm32"),
        mov::<W32, RegDst, RegSrc>,
        mov::<W32, RegDst, MemSrc>,
    );
    t.rm(
        c("Mov_r64_rm64"),
        mov::<W64, RegDst, RegSrc>,
        mov::<W64, RegDst, MemSrc>,
    );
    t.add(c("Mov_r8_imm8"), mov::<W8, RegDst, ImmSrc>);
    t.add(c("Mov_r16_imm16"), mov::<W16, RegDst, ImmSrc>);
    t.add(c("Mov_r32_imm32"), mov::<W32, RegDst, ImmSrc>);
    t.add(c("Mov_r64_imm64"), mov::<W64, RegDst, ImmSrc>);
    t.rm(
        c("Mov_rm8_imm8"),
        mov::<W8, RegDst, ImmSrc>,
        mov::<W8, MemDst, ImmSrc>,
    );
    t.rm(
        c("Mov_rm16_imm16"),
        mov::<W16, RegDst, ImmSrc>,
        mov::<W16, MemDst, ImmSrc>,
    );
    t.rm(
        c("Mov_rm32_imm32"),
        mov::<W32, RegDst, ImmSrc>,
        mov::<W32, MemDst, ImmSrc>,
    );
    t.rm(
        c("Mov_rm64_imm32"),
        mov::<W64, RegDst, ImmSrc>,
        mov::<W64, MemDst, ImmSrc>,
    );
    t.add(c("Mov_AL_moffs8"), mov::<W8, RegDst, MemSrc>);
    t.add(c("Mov_AX_moffs16"), mov::<W16, RegDst, MemSrc>);
    t.add(c("Mov_EAX_moffs32"), mov::<W32, RegDst, MemSrc>);
    t.add(c("Mov_RAX_moffs64"), mov::<W64, RegDst, MemSrc>);
    t.add(c("Mov_moffs8_AL"), mov::<W8, MemDst, RegSrc>);
    t.add(c("Mov_moffs16_AX"), mov::<W16, MemDst, RegSrc>);
    t.add(c("Mov_moffs32_EAX"), mov::<W32, MemDst, RegSrc>);
    t.add(c("Mov_moffs64_RAX"), mov::<W64, MemDst, RegSrc>);
    t.add(c("Movnti_m32_r32"), mov::<W32, MemDst, RegSrc>);
    t.add(c("Movnti_m64_r64"), mov::<W64, MemDst, RegSrc>);

    t.rm(
        c("Movzx_r16_rm8"),
        movzx::<W16, W8, RegSrc>,
        movzx::<W16, W8, MemSrc>,
    );
    t.rm(
        c("Movzx_r32_rm8"),
        movzx::<W32, W8, RegSrc>,
        movzx::<W32, W8, MemSrc>,
    );
    t.rm(
        c("Movzx_r64_rm8"),
        movzx::<W64, W8, RegSrc>,
        movzx::<W64, W8, MemSrc>,
    );
    t.rm(
        c("Movzx_r16_rm16"),
        movzx::<W16, W16, RegSrc>,
        movzx::<W16, W16, MemSrc>,
    );
    t.rm(
        c("Movzx_r32_rm16"),
        movzx::<W32, W16, RegSrc>,
        movzx::<W32, W16, MemSrc>,
    );
    t.rm(
        c("Movzx_r64_rm16"),
        movzx::<W64, W16, RegSrc>,
        movzx::<W64, W16, MemSrc>,
    );
    t.rm(
        c("Movsx_r16_rm8"),
        movsx::<W16, W8, RegSrc>,
        movsx::<W16, W8, MemSrc>,
    );
    t.rm(
        c("Movsx_r32_rm8"),
        movsx::<W32, W8, RegSrc>,
        movsx::<W32, W8, MemSrc>,
    );
    t.rm(
        c("Movsx_r64_rm8"),
        movsx::<W64, W8, RegSrc>,
        movsx::<W64, W8, MemSrc>,
    );
    t.rm(
        c("Movsx_r16_rm16"),
        movsx::<W16, W16, RegSrc>,
        movsx::<W16, W16, MemSrc>,
    );
    t.rm(
        c("Movsx_r32_rm16"),
        movsx::<W32, W16, RegSrc>,
        movsx::<W32, W16, MemSrc>,
    );
    t.rm(
        c("Movsx_r64_rm16"),
        movsx::<W64, W16, RegSrc>,
        movsx::<W64, W16, MemSrc>,
    );
    t.rm(
        c("Movsxd_r16_rm16"),
        movsx::<W16, W16, RegSrc>,
        movsx::<W16, W16, MemSrc>,
    );
    t.rm(
        c("Movsxd_r32_rm32"),
        movsx::<W32, W32, RegSrc>,
        movsx::<W32, W32, MemSrc>,
    );
    t.rm(
        c("Movsxd_r64_rm32"),
        movsx::<W64, W32, RegSrc>,
        movsx::<W64, W32, MemSrc>,
    );

    t.add(c("Lea_r16_m"), lea::<W16>);
    t.add(c("Lea_r32_m"), lea::<W32>);
    t.add(c("Lea_r64_m"), lea::<W64>);

    t.rm(c("Xchg_rm8_r8"), xchg::<W8, RegDst>, xchg::<W8, LockDst>);
    t.rm(
        c("Xchg_rm16_r16"),
        xchg::<W16, RegDst>,
        xchg::<W16, LockDst>,
    );
    t.rm(
        c("Xchg_rm32_r32"),
        xchg::<W32, RegDst>,
        xchg::<W32, LockDst>,
    );
    t.rm(
        c("Xchg_rm64_r64"),
        xchg::<W64, RegDst>,
        xchg::<W64, LockDst>,
    );
    t.add(c("Xchg_r16_AX"), xchg::<W16, RegDst>);
    t.add(c("Xchg_r32_EAX"), xchg::<W32, RegDst>);
    t.add(c("Xchg_r64_RAX"), xchg::<W64, RegDst>);

    cc_forms!(t, 0);
    cc_forms!(t, 1);
    cc_forms!(t, 2);
    cc_forms!(t, 3);
    cc_forms!(t, 4);
    cc_forms!(t, 5);
    cc_forms!(t, 6);
    cc_forms!(t, 7);
    cc_forms!(t, 8);
    cc_forms!(t, 9);
    cc_forms!(t, 10);
    cc_forms!(t, 11);
    cc_forms!(t, 12);
    cc_forms!(t, 13);
    cc_forms!(t, 14);
    cc_forms!(t, 15);

    t.add(c("Bswap_r16"), bswap::<W16>);
    t.add(c("Bswap_r32"), bswap::<W32>);
    t.add(c("Bswap_r64"), bswap::<W64>);
    t.add(c("Cbw"), cbw::<W16, W8>);
    t.add(c("Cwde"), cbw::<W32, W16>);
    t.add(c("Cdqe"), cbw::<W64, W32>);
    t.add(c("Cwd"), cwd::<W16>);
    t.add(c("Cdq"), cwd::<W32>);
    t.add(c("Cqo"), cwd::<W64>);
    t.add(c("Xlat_m8"), xlat);
    t.add(c("Lahf"), lahf);
    t.add(c("Sahf"), sahf);
    t.add(c("Salc"), salc);
    t.add(c("Clc"), clc);
    t.add(c("Stc"), stc);
    t.add(c("Cmc"), cmc);
    t.add(c("Cld"), cld);
    t.add(c("Std"), std_);

    t.rm(
        c("Mov_rm16_Sreg"),
        mov_from_sreg::<W16, RegDst>,
        mov_from_sreg::<W16, MemDst>,
    );
    t.rm(
        c("Mov_r32m16_Sreg"),
        mov_from_sreg::<W32, RegDst>,
        mov_from_sreg::<W32, MemDst>,
    );
    t.rm(
        c("Mov_r64m16_Sreg"),
        mov_from_sreg::<W64, RegDst>,
        mov_from_sreg::<W64, MemDst>,
    );
    for name in ["Mov_Sreg_rm16", "Mov_Sreg_r32m16", "Mov_Sreg_r64m16"] {
        t.rm(c(name), mov_to_sreg::<RegSrc>, mov_to_sreg::<MemSrc>);
        t.stop(c(name));
    }
    t.add_stop(c("Lds_r16_m1616"), load_far::<W16, { crate::cpu::DS }>);
    t.add_stop(c("Lds_r32_m1632"), load_far::<W32, { crate::cpu::DS }>);
    t.add_stop(c("Les_r16_m1616"), load_far::<W16, { crate::cpu::ES }>);
    t.add_stop(c("Les_r32_m1632"), load_far::<W32, { crate::cpu::ES }>);
    t.add_stop(c("Lfs_r16_m1616"), load_far::<W16, { crate::cpu::FS }>);
    t.add_stop(c("Lfs_r32_m1632"), load_far::<W32, { crate::cpu::FS }>);
    t.add_stop(c("Lfs_r64_m1664"), load_far::<W64, { crate::cpu::FS }>);
    t.add_stop(c("Lgs_r16_m1616"), load_far::<W16, { crate::cpu::GS }>);
    t.add_stop(c("Lgs_r32_m1632"), load_far::<W32, { crate::cpu::GS }>);
    t.add_stop(c("Lgs_r64_m1664"), load_far::<W64, { crate::cpu::GS }>);
    t.add_stop(c("Lss_r16_m1616"), load_far::<W16, SS>);
    t.add_stop(c("Lss_r32_m1632"), load_far::<W32, SS>);
    t.add_stop(c("Lss_r64_m1664"), load_far::<W64, SS>);

    for name in [
        "Nopw",
        "Nopd",
        "Nopq",
        "Nop_rm16",
        "Nop_rm32",
        "Nop_rm64",
        "Pause",
        "Endbr64",
        "Endbr32",
        "Prefetch_m8",
        "Prefetchw_m8",
        "Prefetchnta_m8",
        "Prefetcht0_m8",
        "Prefetcht1_m8",
        "Prefetcht2_m8",
    ] {
        t.add(c(name), nop);
    }
}
