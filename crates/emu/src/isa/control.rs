//! Control flow: jmp, jcc, call, ret, loop/jcxz, far jmp/call/ret,
//! int n/int3/into/int1, iret.

use crate::cpu::fault::{Fault, Res, Stop};
use crate::cpu::width::{W16, W32, W64, Width};
use crate::cpu::{CS, Cpu, Mode, RSP};
use crate::decode::{Insn, Table};
use crate::isa::ops::*;
use crate::isa::{CC, c};

/// Near transfer to `target`, with the CS limit (legacy) or canonical
/// (64-bit) check a real CPU makes on the branch itself.
#[inline(always)]
fn branch(cpu: &mut Cpu, target: u64) -> Res {
    if cpu.mode == Mode::Long {
        if ((target as i64) << 16 >> 16) as u64 != target {
            return Err(Fault::gp(0));
        }
    } else if target > u64::from(cpu.seg[CS].limit) {
        return Err(Fault::gp(0));
    }
    cpu.set_rip(target);
    Ok(())
}

fn jmp_rel<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let t = cpu.rip().wrapping_add(i.imm) & W::MASK;
    branch(cpu, t)
}

fn jcc<const CC_: u8, W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    if cpu.flags.cond(CC_) {
        let t = cpu.rip().wrapping_add(i.imm) & W::MASK;
        return branch(cpu, t);
    }
    Ok(())
}

fn jmp_ind<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    // Indirect operands use r0 for the register form.
    let t = if S::IS_REG_OP0 {
        W::get(&cpu.gpr, i.r0)
    } else {
        S::get::<W>(cpu, i)?
    };
    branch(cpu, t)
}

fn call_rel<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let ret = cpu.rip();
    let t = ret.wrapping_add(i.imm) & W::MASK;
    let sp = cpu.gpr[RSP];
    cpu.push::<W>(ret)?;
    if let Err(e) = branch(cpu, t) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    Ok(())
}

fn call_ind<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let t = if S::IS_REG_OP0 {
        W::get(&cpu.gpr, i.r0)
    } else {
        S::get::<W>(cpu, i)?
    };
    let ret = cpu.rip();
    let sp = cpu.gpr[RSP];
    cpu.push::<W>(ret)?;
    if let Err(e) = branch(cpu, t) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    Ok(())
}

fn ret_near<W: Width, const IMM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let sp = cpu.gpr[RSP];
    let t = cpu.pop::<W>()?;
    if IMM {
        let nsp = (cpu.gpr[RSP] & cpu.sp_mask).wrapping_add(i.imm & 0xffff) & cpu.sp_mask;
        cpu.gpr[RSP] = (cpu.gpr[RSP] & !cpu.sp_mask) | nsp;
    }
    if let Err(e) = branch(cpu, t) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    Ok(())
}

/// loop/loope/loopne (`KIND` 0/1/2) with counter width `A` and operand size `W`.
fn loop_<const KIND: u8, A: Width, W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let n = A::get(&cpu.gpr, 1).wrapping_sub(1) & A::MASK;
    let take = n != 0
        && match KIND {
            1 => cpu.flags.zf(),
            2 => !cpu.flags.zf(),
            _ => true,
        };
    if take {
        let t = cpu.rip().wrapping_add(i.imm) & W::MASK;
        branch(cpu, t)?;
    }
    A::set(&mut cpu.gpr, 1, n);
    Ok(())
}

fn jcxz<A: Width, W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    if A::get(&cpu.gpr, 1) == 0 {
        let t = cpu.rip().wrapping_add(i.imm) & W::MASK;
        return branch(cpu, t);
    }
    Ok(())
}

fn jmp_ptr(cpu: &mut Cpu, i: &Insn) -> Res {
    crate::mode::far::jmp_far(cpu, i.imm2 as u16, i.imm)
}

fn call_ptr<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    crate::mode::far::call_far(cpu, i.imm2 as u16, i.imm, W::BYTES)
}

fn read_far_ptr<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res<(u16, u64)> {
    let off = cpu.ea(i);
    let seg = usize::from(i.seg);
    let ip = cpu.read_virt::<W>(seg, off)?;
    let sel = cpu.read_virt::<W16>(seg, off.wrapping_add(W::BYTES as u64) & i.amask)? as u16;
    Ok((sel, ip))
}

fn jmp_m<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (sel, ip) = read_far_ptr::<W>(cpu, i)?;
    crate::mode::far::jmp_far(cpu, sel, ip)
}

fn call_m<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (sel, ip) = read_far_ptr::<W>(cpu, i)?;
    crate::mode::far::call_far(cpu, sel, ip, W::BYTES)
}

fn retf<W: Width, const IMM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    crate::mode::far::ret_far(cpu, W::BYTES as u64, if IMM { i.imm & 0xffff } else { 0 })
}

fn int_n(_: &mut Cpu, i: &Insn) -> Res {
    Err(Stop::SoftInt(i.imm as u8))
}
fn int3(_: &mut Cpu, _: &Insn) -> Res {
    Err(Stop::SoftInt(3))
}
fn int1(cpu: &mut Cpu, _: &Insn) -> Res {
    cpu.dbg.icebp = true;
    Err(Stop::SoftInt(1))
}
fn into(cpu: &mut Cpu, _: &Insn) -> Res {
    if cpu.flags.of() {
        Err(Stop::SoftInt(4))
    } else {
        Ok(())
    }
}

/// bound r, m: #BR unless lower <= index <= upper (signed).
fn bound<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let off = cpu.ea(i);
    let seg = usize::from(i.seg);
    let lo = W::sext(cpu.read_virt::<W>(seg, off)?) as i64;
    let hi = W::sext(cpu.read_virt::<W>(seg, off.wrapping_add(W::BYTES as u64) & i.amask)?) as i64;
    let idx = W::sext(W::get(&cpu.gpr, i.r0)) as i64;
    if idx < lo || idx > hi {
        return Err(Fault::raise(crate::cpu::fault::BR, None));
    }
    Ok(())
}

fn iret<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    crate::mode::interrupt::iret(cpu, W::BYTES as u64)
}

macro_rules! jcc_forms {
    ($t:expr, $cc:literal) => {{
        let n = CC[$cc];
        let name = |s: &str| format!("J{}{}", n, s);
        $t.add(c(&name("_rel8_16")), jcc::<$cc, W16>);
        $t.add(c(&name("_rel8_32")), jcc::<$cc, W32>);
        $t.add(c(&name("_rel8_64")), jcc::<$cc, W64>);
        $t.add(c(&name("_rel16")), jcc::<$cc, W16>);
        $t.add(c(&name("_rel32_32")), jcc::<$cc, W32>);
        $t.add(c(&name("_rel32_64")), jcc::<$cc, W64>);
    }};
}

pub fn register(t: &mut Table) {
    t.add(c("Jmp_rel8_16"), jmp_rel::<W16>);
    t.add(c("Jmp_rel8_32"), jmp_rel::<W32>);
    t.add(c("Jmp_rel8_64"), jmp_rel::<W64>);
    t.add(c("Jmp_rel16"), jmp_rel::<W16>);
    t.add(c("Jmp_rel32_32"), jmp_rel::<W32>);
    t.add(c("Jmp_rel32_64"), jmp_rel::<W64>);
    t.rm(
        c("Jmp_rm16"),
        jmp_ind::<W16, RegSrc>,
        jmp_ind::<W16, MemSrc>,
    );
    t.rm(
        c("Jmp_rm32"),
        jmp_ind::<W32, RegSrc>,
        jmp_ind::<W32, MemSrc>,
    );
    t.rm(
        c("Jmp_rm64"),
        jmp_ind::<W64, RegSrc>,
        jmp_ind::<W64, MemSrc>,
    );
    jcc_forms!(t, 0);
    jcc_forms!(t, 1);
    jcc_forms!(t, 2);
    jcc_forms!(t, 3);
    jcc_forms!(t, 4);
    jcc_forms!(t, 5);
    jcc_forms!(t, 6);
    jcc_forms!(t, 7);
    jcc_forms!(t, 8);
    jcc_forms!(t, 9);
    jcc_forms!(t, 10);
    jcc_forms!(t, 11);
    jcc_forms!(t, 12);
    jcc_forms!(t, 13);
    jcc_forms!(t, 14);
    jcc_forms!(t, 15);
    t.add(c("Call_rel16"), call_rel::<W16>);
    t.add(c("Call_rel32_32"), call_rel::<W32>);
    t.add(c("Call_rel32_64"), call_rel::<W64>);
    t.rm(
        c("Call_rm16"),
        call_ind::<W16, RegSrc>,
        call_ind::<W16, MemSrc>,
    );
    t.rm(
        c("Call_rm32"),
        call_ind::<W32, RegSrc>,
        call_ind::<W32, MemSrc>,
    );
    t.rm(
        c("Call_rm64"),
        call_ind::<W64, RegSrc>,
        call_ind::<W64, MemSrc>,
    );
    t.add(c("Retnw"), ret_near::<W16, false>);
    t.add(c("Retnd"), ret_near::<W32, false>);
    t.add(c("Retnq"), ret_near::<W64, false>);
    t.add(c("Retnw_imm16"), ret_near::<W16, true>);
    t.add(c("Retnd_imm16"), ret_near::<W32, true>);
    t.add(c("Retnq_imm16"), ret_near::<W64, true>);

    t.add(c("Loop_rel8_16_CX"), loop_::<0, W16, W16>);
    t.add(c("Loop_rel8_32_CX"), loop_::<0, W16, W32>);
    t.add(c("Loop_rel8_16_ECX"), loop_::<0, W32, W16>);
    t.add(c("Loop_rel8_32_ECX"), loop_::<0, W32, W32>);
    t.add(c("Loop_rel8_64_ECX"), loop_::<0, W32, W64>);
    t.add(c("Loop_rel8_16_RCX"), loop_::<0, W64, W16>);
    t.add(c("Loop_rel8_64_RCX"), loop_::<0, W64, W64>);
    t.add(c("Loope_rel8_16_CX"), loop_::<1, W16, W16>);
    t.add(c("Loope_rel8_32_CX"), loop_::<1, W16, W32>);
    t.add(c("Loope_rel8_16_ECX"), loop_::<1, W32, W16>);
    t.add(c("Loope_rel8_32_ECX"), loop_::<1, W32, W32>);
    t.add(c("Loope_rel8_64_ECX"), loop_::<1, W32, W64>);
    t.add(c("Loope_rel8_16_RCX"), loop_::<1, W64, W16>);
    t.add(c("Loope_rel8_64_RCX"), loop_::<1, W64, W64>);
    t.add(c("Loopne_rel8_16_CX"), loop_::<2, W16, W16>);
    t.add(c("Loopne_rel8_32_CX"), loop_::<2, W16, W32>);
    t.add(c("Loopne_rel8_16_ECX"), loop_::<2, W32, W16>);
    t.add(c("Loopne_rel8_32_ECX"), loop_::<2, W32, W32>);
    t.add(c("Loopne_rel8_64_ECX"), loop_::<2, W32, W64>);
    t.add(c("Loopne_rel8_16_RCX"), loop_::<2, W64, W16>);
    t.add(c("Loopne_rel8_64_RCX"), loop_::<2, W64, W64>);
    t.add(c("Jcxz_rel8_16"), jcxz::<W16, W16>);
    t.add(c("Jcxz_rel8_32"), jcxz::<W16, W32>);
    t.add(c("Jecxz_rel8_16"), jcxz::<W32, W16>);
    t.add(c("Jecxz_rel8_32"), jcxz::<W32, W32>);
    t.add(c("Jecxz_rel8_64"), jcxz::<W32, W64>);
    t.add(c("Jrcxz_rel8_16"), jcxz::<W64, W16>);
    t.add(c("Jrcxz_rel8_64"), jcxz::<W64, W64>);

    t.add_stop(c("Jmp_ptr1616"), jmp_ptr);
    t.add_stop(c("Jmp_ptr1632"), jmp_ptr);
    t.add_stop(c("Jmp_m1616"), jmp_m::<W16>);
    t.add_stop(c("Jmp_m1632"), jmp_m::<W32>);
    t.add_stop(c("Jmp_m1664"), jmp_m::<W64>);
    t.add_stop(c("Call_ptr1616"), call_ptr::<W16>);
    t.add_stop(c("Call_ptr1632"), call_ptr::<W32>);
    t.add_stop(c("Call_m1616"), call_m::<W16>);
    t.add_stop(c("Call_m1632"), call_m::<W32>);
    t.add_stop(c("Call_m1664"), call_m::<W64>);
    t.add_stop(c("Retfw"), retf::<W16, false>);
    t.add_stop(c("Retfd"), retf::<W32, false>);
    t.add_stop(c("Retfq"), retf::<W64, false>);
    t.add_stop(c("Retfw_imm16"), retf::<W16, true>);
    t.add_stop(c("Retfd_imm16"), retf::<W32, true>);
    t.add_stop(c("Retfq_imm16"), retf::<W64, true>);
    t.add(c("Int_imm8"), int_n);
    t.add(c("Int3"), int3);
    t.add(c("Int1"), int1);
    t.add(c("Into"), into);
    t.add(c("Bound_r16_m1616"), bound::<W16>);
    t.add(c("Bound_r32_m3232"), bound::<W32>);
    t.add_stop(c("Iretw"), iret::<W16>);
    t.add_stop(c("Iretd"), iret::<W32>);
    t.add_stop(c("Iretq"), iret::<W64>);
}
