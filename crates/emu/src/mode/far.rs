//! Far jmp, call and ret: real-mode and protected/long-mode transfers to
//! code segments, and task switches through TSS descriptors and task
//! gates (mode/task.rs). Call gates are not supported (#GP).

use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W16, W32, W64};
use crate::cpu::*;
use crate::mode::segment::{Desc, sel_code};
use crate::mode::task::{self, Switch};

fn unsupported_target(sel: u16, what: &str) -> crate::cpu::fault::Stop {
    tracing::warn!(
        "vmplay-emu: far transfer through a {what} (selector {sel:#x}) is not supported"
    );
    Fault::gp(sel_code(sel))
}

/// A far jmp/call to a system descriptor: a task switch through a TSS or
/// task gate in protected mode; IA-32e mode has no task switches
/// (#GP(selector)); call gates are not supported.
fn system_target(cpu: &mut Cpu, sel: u16, d: &Desc, kind: Switch) -> Res {
    let call_gate = matches!(d.typ(), 0x4 | 0xc);
    if cpu.long_mode() && !call_gate {
        return Err(Fault::gp(sel_code(sel)));
    }
    task::far_to_system(cpu, sel, d, kind, |_| {
        Err(unsupported_target(
            sel,
            if call_gate {
                "call gate"
            } else {
                "system descriptor"
            },
        ))
    })
}

/// `jmp far sel:off`.
pub fn jmp_far(cpu: &mut Cpu, sel: u16, off: u64) -> Res {
    if matches!(cpu.mode, Mode::Real | Mode::Virtual8086) {
        cpu.seg[CS].set_real(sel);
        cpu.set_rip(off);
        cpu.update_mode();
        return Ok(());
    }
    if sel & 0xfffc == 0 {
        return Err(Fault::gp(0));
    }
    let d = cpu.read_desc(sel)?;
    if !d.s() {
        return system_target(cpu, sel, &d, Switch::Jmp);
    }
    let cpl = cpu.check_code_target(&d, sel, false)?;
    let is64 = cpu.long_mode() && d.l();
    if !is64 && off > u64::from(d.limit()) {
        return Err(Fault::gp(0));
    }
    cpu.load_cs(&d, sel, cpl)?;
    cpu.set_rip(off);
    Ok(())
}

/// `call far sel:off` with operand size `bytes`.
pub fn call_far(cpu: &mut Cpu, sel: u16, off: u64, bytes: usize) -> Res {
    let (old_cs, old_ip) = (u64::from(cpu.seg[CS].sel), cpu.rip());
    let sp = cpu.gpr[RSP];
    let push = |cpu: &mut Cpu| -> Res {
        match bytes {
            2 => {
                cpu.push::<W16>(old_cs)?;
                cpu.push::<W16>(old_ip)
            }
            4 => {
                cpu.push::<W32>(old_cs)?;
                cpu.push::<W32>(old_ip)
            }
            _ => {
                cpu.push::<W64>(old_cs)?;
                cpu.push::<W64>(old_ip)
            }
        }
    };
    if matches!(cpu.mode, Mode::Real | Mode::Virtual8086) {
        push(cpu)?;
        cpu.seg[CS].set_real(sel);
        cpu.set_rip(off);
        cpu.update_mode();
        return Ok(());
    }
    if sel & 0xfffc == 0 {
        return Err(Fault::gp(0));
    }
    let d = cpu.read_desc(sel)?;
    if !d.s() {
        return system_target(cpu, sel, &d, Switch::Call);
    }
    let cpl = cpu.check_code_target(&d, sel, false)?;
    let is64 = cpu.long_mode() && d.l();
    if !is64 && off > u64::from(d.limit()) {
        return Err(Fault::gp(0));
    }
    if let Err(e) = push(cpu) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    if let Err(e) = cpu.load_cs(&d, sel, cpl) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    cpu.set_rip(off);
    Ok(())
}

/// `retf [imm]` with operand size `bytes`.
pub fn ret_far(cpu: &mut Cpu, bytes: u64, imm: u64) -> Res {
    let rd = |cpu: &mut Cpu, k: u64| -> Res<u64> {
        match bytes {
            2 => cpu.peek::<W16>(k * 2),
            4 => cpu.peek::<W32>(k * 4),
            _ => cpu.peek::<W64>(k * 8),
        }
    };
    let ip = rd(cpu, 0)?;
    let sel = rd(cpu, 1)? as u16;
    let adjust = |cpu: &mut Cpu, n: u64| {
        let sp = cpu.gpr[RSP];
        let nsp = (sp & cpu.sp_mask).wrapping_add(n) & cpu.sp_mask;
        cpu.gpr[RSP] = (sp & !cpu.sp_mask) | nsp;
    };
    if matches!(cpu.mode, Mode::Real | Mode::Virtual8086) {
        adjust(cpu, 2 * bytes + imm);
        cpu.seg[CS].set_real(sel);
        cpu.set_rip(ip);
        cpu.update_mode();
        return Ok(());
    }
    if sel & 0xfffc == 0 {
        return Err(Fault::gp(0));
    }
    let d = cpu.read_desc(sel)?;
    let cpl = cpu.check_code_target(&d, sel, true)?;
    let is64 = cpu.long_mode() && d.l();
    if !is64 && ip > u64::from(d.limit()) {
        return Err(Fault::gp(0));
    }
    if cpl == cpu.cpl {
        cpu.load_cs(&d, sel, cpl)?;
        cpu.set_rip(ip);
        adjust(cpu, 2 * bytes + imm);
        return Ok(());
    }
    // Return to an outer level: the outer stack follows the immediate.
    let sp_val = rd(cpu, 2 + imm / bytes)?;
    let ss_sel = rd(cpu, 3 + imm / bytes)? as u16;
    let null_ok = cpu.long_mode() && is64 && cpl < 3;
    let new_ss = if ss_sel & 0xfffc == 0 {
        if !null_ok {
            return Err(Fault::gp(0));
        }
        Seg {
            sel: ss_sel,
            unusable: true,
            attr: u16::from(cpl) << ATTR_DPL_SHIFT,
            ..Seg::default()
        }
    } else {
        let sd = cpu.read_desc(ss_sel)?;
        if (ss_sel & 3) as u8 != cpl || sd.dpl() != cpl || !sd.s() || sd.typ() & 0xa != 0x2 {
            return Err(Fault::gp(sel_code(ss_sel)));
        }
        if !sd.present() {
            return Err(Fault::ss(sel_code(ss_sel)));
        }
        let mut s = sd.to_seg(ss_sel);
        s.attr |= 1;
        s
    };
    cpu.load_cs(&d, sel, cpl)?;
    cpu.set_rip(ip);
    cpu.seg[SS] = new_ss;
    cpu.refresh_segments();
    let sp = sp_val.wrapping_add(imm);
    cpu.gpr[RSP] = match cpu.sp_mask {
        0xffff => (cpu.gpr[RSP] & !0xffff) | (sp & 0xffff),
        m => sp & m,
    };
    cpu.nullify_data_segments();
    Ok(())
}
