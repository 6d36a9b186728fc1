//! Fast system calls: syscall/sysret (AMD64, EFER.SCE) and
//! sysenter/sysexit (SYSENTER_* MSRs), plus swapgs.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{IF, RF, VM};
use crate::cpu::*;

fn flat_code(sel: u16, dpl: u8, long: bool) -> Seg {
    Seg {
        sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xb
            | ATTR_S
            | (u16::from(dpl) << ATTR_DPL_SHIFT)
            | ATTR_P
            | ATTR_G
            | if long { ATTR_L } else { ATTR_DB },
        ..Seg::default()
    }
}

fn flat_data(sel: u16, dpl: u8) -> Seg {
    Seg {
        sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0x3 | ATTR_S | (u16::from(dpl) << ATTR_DPL_SHIFT) | ATTR_P | ATTR_G | ATTR_DB,
        ..Seg::default()
    }
}

pub fn syscall(cpu: &mut Cpu) -> Res {
    if cpu.efer & EFER_SCE == 0 || cpu.mode == Mode::Real || cpu.mode == Mode::Virtual8086 {
        return Err(Fault::ud());
    }
    let sel = ((cpu.msr.star >> 32) & 0xfffc) as u16;
    let flags = cpu.get_rflags();
    if cpu.long_mode() {
        cpu.gpr[1] = cpu.rip();
        cpu.gpr[11] = flags & !RF;
        let target = if cpu.mode == Mode::Long {
            cpu.msr.lstar
        } else {
            cpu.msr.cstar
        };
        cpu.set_rflags(flags & !cpu.msr.sfmask & !RF);
        cpu.seg[CS] = flat_code(sel, 0, true);
        cpu.seg[SS] = flat_data(sel + 8, 0);
        cpu.cpl = 0;
        cpu.update_mode();
        cpu.set_rip(target);
    } else {
        cpu.gpr[1] = cpu.rip() & 0xffff_ffff;
        cpu.set_rflags(flags & !(VM | IF | RF));
        cpu.seg[CS] = flat_code(sel, 0, false);
        cpu.seg[SS] = flat_data(sel + 8, 0);
        cpu.cpl = 0;
        cpu.update_mode();
        cpu.set_rip(cpu.msr.star & 0xffff_ffff);
    }
    crate::mode::dbreg::fast_system_call_done(cpu);
    Ok(())
}

/// `sysret` (`bytes` = 8 for sysretq).
pub fn sysret(cpu: &mut Cpu, bytes: u8) -> Res {
    if cpu.efer & EFER_SCE == 0 || cpu.mode == Mode::Real || cpu.mode == Mode::Virtual8086 {
        return Err(Fault::ud());
    }
    if cpu.cpl != 0 || !cpu.long_mode() {
        return Err(Fault::gp(0));
    }
    let base = ((cpu.msr.star >> 48) & 0xffff) as u16;
    let target = cpu.gpr[1];
    if bytes == 8 && ((target as i64) << 16 >> 16) as u64 != target {
        return Err(Fault::gp(0));
    }
    let (cs_sel, long) = if bytes == 8 {
        (base + 16, true)
    } else {
        (base, false)
    };
    cpu.set_rflags((cpu.gpr[11] & 0x3c_7fd7) | 2);
    cpu.seg[CS] = flat_code(cs_sel | 3, 3, long);
    // SS keeps its descriptor fields but gets selector and DPL 3.
    cpu.seg[SS] = flat_data((base + 8) | 3, 3);
    cpu.cpl = 3;
    cpu.update_mode();
    cpu.set_rip(if long { target } else { target & 0xffff_ffff });
    crate::mode::dbreg::fast_system_call_done(cpu);
    Ok(())
}

pub fn sysenter(cpu: &mut Cpu) -> Res {
    let sel = (cpu.msr.sysenter_cs & 0xfffc) as u16;
    if cpu.mode == Mode::Real || sel == 0 {
        return Err(Fault::gp(0));
    }
    let long = cpu.long_mode();
    cpu.rflags &= !(VM | IF | RF);
    cpu.seg[CS] = flat_code(sel, 0, long);
    cpu.seg[SS] = flat_data(sel + 8, 0);
    cpu.cpl = 0;
    cpu.update_mode();
    let mask = if long { u64::MAX } else { 0xffff_ffff };
    cpu.gpr[RSP] = cpu.msr.sysenter_esp & mask;
    cpu.set_rip(cpu.msr.sysenter_eip & mask);
    Ok(())
}

/// `sysexit` (`bytes` = 8 for the REX.W form back to 64-bit code).
pub fn sysexit(cpu: &mut Cpu, bytes: u8) -> Res {
    let sel = (cpu.msr.sysenter_cs & 0xfffc) as u16;
    if cpu.mode == Mode::Real || sel == 0 || cpu.cpl != 0 {
        return Err(Fault::gp(0));
    }
    let (cs_sel, ss_sel, long) = if bytes == 8 {
        (sel + 32, sel + 40, true)
    } else {
        (sel + 16, sel + 24, false)
    };
    cpu.seg[CS] = flat_code(cs_sel | 3, 3, long);
    cpu.seg[SS] = flat_data(ss_sel | 3, 3);
    cpu.cpl = 3;
    cpu.update_mode();
    let mask = if long { u64::MAX } else { 0xffff_ffff };
    cpu.gpr[RSP] = cpu.gpr[1] & mask;
    cpu.set_rip(cpu.gpr[2] & mask);
    Ok(())
}

pub fn swapgs(cpu: &mut Cpu) -> Res {
    if cpu.mode != Mode::Long {
        return Err(Fault::ud());
    }
    if cpu.cpl != 0 {
        return Err(Fault::gp(0));
    }
    std::mem::swap(&mut cpu.seg[GS].base, &mut cpu.msr.kernel_gs_base);
    Ok(())
}
