//! Interrupt and exception delivery through the IVT/IDT in every mode,
//! privilege-changing stacks (TSS, IST), #DF escalation, triple fault,
//! and `iret`.

use crate::cpu::fault::{self, Fault, Res, Stop};
use crate::cpu::flags::{AC, ID, IF, IOPL, NT, RF, TF, VIF, VIP, VM};
use crate::cpu::width::{W16, W32, W64};
use crate::cpu::*;
use crate::mode::segment::sel_code;
use crate::mode::task::{self, Switch};

/// What is being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A fault or abort, with its error code if it has one.
    Exception(Option<u32>),
    /// `int n`, `int3`, `into`: gate DPL is checked, RIP is after it.
    Software,
    /// A trap exception (single-step #DB) with RIP after the instruction.
    Trap,
    /// An external interrupt from the LAPIC or PIC.
    External,
    Nmi,
}

fn contributory(v: u8) -> bool {
    matches!(v, fault::DE | fault::TS | fault::NP | fault::SS | fault::GP)
}

/// Delivers a fault raised by an instruction, escalating to #DF and to a
/// triple fault (shutdown) when delivery itself faults.
pub fn deliver_fault(cpu: &mut Cpu, f: Fault) {
    let mut cur = f;
    // An exception is an event external to the program: a fault while
    // delivering it sets EXT in its error code (SDM 6.13).
    let ext = true;
    loop {
        match try_deliver(cpu, cur.vector, Event::Exception(cur.code), ext) {
            Ok(()) => return,
            Err(Stop::Fault(next)) => {
                if cur.vector == fault::DF {
                    cpu.shutdown = true;
                    return;
                }
                let double = (contributory(cur.vector) && contributory(next.vector))
                    || (cur.vector == fault::PF
                        && (contributory(next.vector) || next.vector == fault::PF));
                cur = if double {
                    Fault {
                        vector: fault::DF,
                        code: Some(0),
                    }
                } else {
                    next
                };
            }
            Err(_) => {
                cpu.shutdown = true;
                return;
            }
        }
    }
}

/// Delivers an interrupt (external, NMI, software, trap); a fault during
/// delivery is then delivered as an exception.
pub fn deliver(cpu: &mut Cpu, vector: u8, ev: Event) {
    match try_deliver(cpu, vector, ev, ev != Event::Software) {
        Ok(()) => {}
        Err(Stop::Fault(f)) => deliver_fault(cpu, f),
        Err(_) => cpu.shutdown = true,
    }
}

/// Delivers `int n`, `int3` or `into` (RIP is after the instruction at
/// `at`). A fault while delivering it is the instruction's own fault, so
/// it is reported at `at` (SDM 6.5: a fault's return address is the
/// faulting instruction), with EXT clear.
pub fn deliver_software(cpu: &mut Cpu, vector: u8, at: u64) {
    match try_deliver(cpu, vector, Event::Software, false) {
        Ok(()) => {}
        Err(Stop::Fault(f)) => {
            cpu.set_rip(at);
            deliver_fault(cpu, f);
        }
        Err(_) => cpu.shutdown = true,
    }
}

fn try_deliver(cpu: &mut Cpu, vector: u8, ev: Event, ext: bool) -> Res {
    cpu.run_state = RunState::Running;
    cpu.stop = true;
    match cpu.mode {
        Mode::Real => deliver_real(cpu, vector),
        Mode::Long | Mode::Compat => deliver_long(cpu, vector, ev, ext),
        Mode::Protected | Mode::Virtual8086 => deliver_protected(cpu, vector, ev, ext),
    }
}

fn deliver_real(cpu: &mut Cpu, vector: u8) -> Res {
    let off = u64::from(vector) * 4;
    if off + 3 > u64::from(cpu.idtr.limit) {
        return Err(Fault::gp(0));
    }
    let ent = cpu.read_sys::<W32>(cpu.idtr.base.wrapping_add(off))?;
    let flags = cpu.get_rflags();
    let (cs, ip) = (cpu.seg[CS].sel, cpu.rip());
    let sp = cpu.gpr[RSP];
    let frame = |cpu: &mut Cpu| -> Res {
        cpu.push::<W16>(flags)?;
        cpu.push::<W16>(u64::from(cs))?;
        cpu.push::<W16>(ip)
    };
    if let Err(e) = frame(cpu) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    cpu.rflags &= !(IF | TF | AC | RF);
    cpu.seg[CS].set_real((ent >> 16) as u16);
    cpu.set_rip(ent & 0xffff);
    cpu.update_mode();
    Ok(())
}

/// Reads the IDT gate for `vector` (8 or 16 bytes), with the checks
/// common to protected and long mode. Returns (low, high) quadwords.
fn read_gate(cpu: &mut Cpu, vector: u8, ev: Event, ext: bool, size: u64) -> Res<(u64, u64)> {
    let e = u32::from(ext);
    let idt_code = u32::from(vector) * 8 + 2 + e;
    let off = u64::from(vector) * size;
    if off + size - 1 > u64::from(cpu.idtr.limit) {
        return Err(Fault::gp(idt_code));
    }
    let lo = cpu.read_sys::<W64>(cpu.idtr.base.wrapping_add(off))?;
    let hi = if size == 16 {
        cpu.read_sys::<W64>(cpu.idtr.base.wrapping_add(off + 8))?
    } else {
        0
    };
    let typ = ((lo >> 40) & 0x1f) as u8;
    let dpl = ((lo >> 45) & 3) as u8;
    let ok = if size == 16 {
        matches!(typ, 0xe | 0xf)
    } else {
        matches!(typ, 0x5 | 0x6 | 0x7 | 0xe | 0xf)
    };
    if !ok {
        return Err(Fault::gp(idt_code));
    }
    if ev == Event::Software && dpl < cpu.cpl {
        return Err(Fault::gp(idt_code));
    }
    if lo & (1 << 47) == 0 {
        return Err(Fault::np(idt_code));
    }
    Ok((lo, hi))
}

/// The code segment a gate points at, checked. Returns (desc, new CPL).
fn gate_target(cpu: &mut Cpu, sel: u16, ext: bool) -> Res<(super::segment::Desc, u8)> {
    let e = u32::from(ext);
    if sel & 0xfffc == 0 {
        return Err(Fault::gp(e));
    }
    let d = cpu
        .read_desc(sel)
        .map_err(|_| Fault::gp(sel_code(sel) + e))?;
    if !d.is_code() || d.dpl() > cpu.cpl {
        return Err(Fault::gp(sel_code(sel) + e));
    }
    if !d.present() {
        return Err(Fault::np(sel_code(sel) + e));
    }
    let cpl = if d.conforming() { cpu.cpl } else { d.dpl() };
    Ok((d, cpl))
}

/// The RFLAGS image an event pushes: faults push RF set, so the
/// instruction they return to is not stopped again by an instruction
/// breakpoint; everything else pushes RF as it is (SDM 18.3.1.1).
fn pushed_flags(cpu: &Cpu, ev: Event) -> u64 {
    match ev {
        Event::Exception(_) => cpu.get_rflags() | RF,
        _ => cpu.get_rflags(),
    }
}

/// Writes a frame of `vals` (first pushed first) ending below `top` on
/// the stack segment described by `base`/`mask`, each `size` bytes, as a
/// supervisor access if `sys`. Returns the new stack offset.
fn write_frame(
    cpu: &mut Cpu,
    base: u64,
    top: u64,
    mask: u64,
    size: u64,
    vals: &[u64],
    sys: bool,
) -> Res<u64> {
    let mut sp = top;
    let saved = cpu.tlb.cur;
    if sys {
        cpu.tlb.cur = 0;
    }
    let mut r = Ok(());
    for &v in vals {
        sp = sp.wrapping_sub(size) & mask;
        let lin = base.wrapping_add(sp) & cpu.lin_mask;
        r = match size {
            2 => cpu.write_lin::<W16>(lin, v),
            4 => cpu.write_lin::<W32>(lin, v),
            _ => cpu.write_lin::<W64>(lin, v),
        };
        if r.is_err() {
            break;
        }
    }
    cpu.tlb.cur = saved;
    r.map(|_| sp)
}

/// Whether `bytes` pushed below offset `top` stay inside stack segment
/// `s` (expand-up: at or below the limit; expand-down: above it) without
/// wrapping.
fn frame_fits(s: &Seg, top: u64, bytes: u64, mask: u64) -> bool {
    let lo = top.wrapping_sub(bytes) & mask;
    let hi = top.wrapping_sub(1) & mask;
    if lo > hi {
        return false;
    }
    let limit = u64::from(s.limit);
    if s.typ() & 0xc == 0x4 {
        lo > limit && hi <= if s.db() { 0xffff_ffff } else { 0xffff }
    } else {
        hi <= limit
    }
}

fn deliver_protected(cpu: &mut Cpu, vector: u8, ev: Event, ext: bool) -> Res {
    let (lo, _) = read_gate(cpu, vector, ev, ext, 8)?;
    let typ = ((lo >> 40) & 0xf) as u8;
    if typ == 0x5 {
        // A task gate: the handler is a whole task.
        let tss = (lo >> 16) as u16;
        let d = task::available_tss(cpu, tss, u32::from(ext))?;
        let code = match ev {
            Event::Exception(c) => c,
            _ => None,
        };
        return task::switch(cpu, tss, &d, Switch::Interrupt, code, u32::from(ext));
    }
    let gate32 = typ & 8 != 0;
    let sel = (lo >> 16) as u16;
    let offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    let (d, new_cpl) = gate_target(cpu, sel, ext)?;
    let size = if gate32 { 4 } else { 2 };
    let flags = pushed_flags(cpu, ev);
    let code = match ev {
        Event::Exception(c) => c,
        _ => None,
    };
    let mut vals = Vec::with_capacity(6);
    let (ss_base, ss_mask, top, new_ss);
    let e = u32::from(ext);
    if new_cpl < cpu.cpl {
        // Inner privilege: stack from the TSS.
        let tss32 = cpu.tr.typ() & 8 != 0;
        let (sp_off, ss_off, step) = if tss32 { (4, 8, 8) } else { (2, 4, 4) };
        let base = cpu.tr.base + u64::from(new_cpl) * step;
        let ss_at = base + ss_off;
        if ss_at + 1 > cpu.tr.base + u64::from(cpu.tr.limit) {
            return Err(Fault::ts(sel_code(cpu.tr.sel)));
        }
        let new_sp = if tss32 {
            cpu.read_sys::<W32>(base + sp_off)?
        } else {
            cpu.read_sys::<W16>(base + sp_off)?
        };
        let ss_sel = cpu.read_sys::<W16>(ss_at)? as u16;
        let ssd = cpu
            .read_desc(ss_sel)
            .map_err(|_| Fault::ts(sel_code(ss_sel)))?;
        if ss_sel & 0xfffc == 0
            || (ss_sel & 3) as u8 != new_cpl
            || ssd.dpl() != new_cpl
            || !ssd.s()
            || ssd.typ() & 0xa != 0x2
        {
            return Err(Fault::ts(sel_code(ss_sel)));
        }
        if !ssd.present() {
            return Err(Fault::ss(sel_code(ss_sel)));
        }
        let s = ssd.to_seg(ss_sel);
        ss_base = s.base;
        ss_mask = if s.db() { 0xffff_ffff } else { 0xffff };
        top = new_sp;
        vals.push(u64::from(cpu.seg[SS].sel));
        vals.push(cpu.gpr[RSP]);
        new_ss = Some(s);
    } else {
        ss_base = cpu.seg[SS].base;
        ss_mask = cpu.sp_mask;
        top = cpu.gpr[RSP] & cpu.sp_mask;
        new_ss = None;
    }
    vals.push(flags);
    vals.push(u64::from(cpu.seg[CS].sel));
    vals.push(cpu.rip());
    if let Some(c) = code {
        vals.push(u64::from(c));
    }
    // The frame must fit the stack's limit: #SS(EXT) on the current
    // stack, #SS(new SS | EXT) on the one from the TSS.
    let (stack, ss_code) = match &new_ss {
        Some(s) => (*s, sel_code(s.sel) | e),
        None => (cpu.seg[SS], e),
    };
    if !frame_fits(&stack, top, size * vals.len() as u64, ss_mask) {
        return Err(Fault::ss(ss_code));
    }
    let sp = write_frame(cpu, ss_base, top, ss_mask, size, &vals, new_cpl < 3)?;
    if let Some(mut s) = new_ss {
        s.attr |= 1;
        cpu.seg[SS] = s;
        cpu.gpr[RSP] = (cpu.gpr[RSP] & !0xffff_ffff) | sp;
        cpu.gpr[RSP] = if ss_mask == 0xffff {
            (cpu.gpr[RSP] & !0xffff) | sp
        } else {
            sp
        };
    } else {
        cpu.gpr[RSP] = (cpu.gpr[RSP] & !ss_mask) | sp;
    }
    cpu.rflags &= !(TF | NT | RF | VM);
    if typ & 1 == 0 {
        cpu.rflags &= !IF;
    }
    cpu.load_cs(&d, sel, new_cpl)?;
    cpu.set_rip(if gate32 { offset } else { offset & 0xffff });
    Ok(())
}

fn deliver_long(cpu: &mut Cpu, vector: u8, ev: Event, ext: bool) -> Res {
    let (lo, hi) = read_gate(cpu, vector, ev, ext, 16)?;
    let typ = ((lo >> 40) & 0xf) as u8;
    let sel = (lo >> 16) as u16;
    let offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
    let ist = (lo >> 32) & 7;
    let (d, new_cpl) = gate_target(cpu, sel, ext)?;
    if !d.l() || d.raw & (1 << 54) != 0 {
        return Err(Fault::gp(sel_code(sel) + u32::from(ext)));
    }
    let code = match ev {
        Event::Exception(c) => c,
        _ => None,
    };
    let mut rsp = if ist != 0 {
        cpu.read_sys::<W64>(cpu.tr.base + 0x24 + (ist - 1) * 8)?
    } else if new_cpl < cpu.cpl {
        cpu.read_sys::<W64>(cpu.tr.base + 4 + u64::from(new_cpl) * 8)?
    } else {
        cpu.gpr[RSP]
    };
    if ist != 0 || new_cpl < cpu.cpl || cpu.mode == Mode::Long {
        rsp &= !0xf;
    }
    let mut vals = vec![
        u64::from(cpu.seg[SS].sel),
        cpu.gpr[RSP],
        pushed_flags(cpu, ev),
        u64::from(cpu.seg[CS].sel),
        cpu.rip(),
    ];
    if let Some(c) = code {
        vals.push(u64::from(c));
    }
    // Long-mode stacks are flat; the frame is written at the new CPL.
    let saved_mask = cpu.lin_mask;
    cpu.lin_mask = u64::MAX;
    let sp = write_frame(cpu, 0, rsp, u64::MAX, 8, &vals, new_cpl < 3);
    cpu.lin_mask = saved_mask;
    // A non-canonical stack is #SS(EXT), not the #GP(0) of `translate`.
    let sp = sp.map_err(|e| {
        if e == Fault::gp(0) {
            Fault::ss(u32::from(ext))
        } else {
            e
        }
    })?;
    if new_cpl < cpu.cpl {
        cpu.seg[SS] = Seg {
            sel: u16::from(new_cpl),
            unusable: true,
            attr: u16::from(new_cpl) << ATTR_DPL_SHIFT,
            ..Seg::default()
        };
    }
    cpu.gpr[RSP] = sp;
    cpu.rflags &= !(TF | NT | RF | VM);
    if typ & 1 == 0 {
        cpu.rflags &= !IF;
    }
    cpu.load_cs(&d, sel, new_cpl)?;
    cpu.set_rip(offset);
    Ok(())
}

/// Applies a popped flags image as `iret`/`popf` may: IOPL only at CPL 0,
/// IF only when CPL <= IOPL. `mask` limits the bits touched (16-bit pops).
pub fn write_flags_checked(cpu: &mut Cpu, v: u64, mask: u64) {
    let old = cpu.get_rflags();
    let mut changeable = crate::cpu::flags::OSZAPC | TF | crate::cpu::flags::DF | NT | AC | ID | RF;
    if cpu.cpl == 0 || cpu.mode == Mode::Real {
        changeable |= IOPL | IF;
    } else if u64::from(cpu.cpl) <= (old & IOPL) >> 12 {
        changeable |= IF;
    }
    changeable &= mask;
    let new = (old & !changeable) | (v & changeable);
    cpu.set_rflags(new & !(VIF | VIP | VM));
}

/// `iret` with operand size `bytes` (2, 4, 8).
pub fn iret(cpu: &mut Cpu, bytes: u64) -> Res {
    cpu.nmi_blocked = false;
    match cpu.mode {
        Mode::Real | Mode::Virtual8086 => {
            if cpu.mode == Mode::Virtual8086 && (cpu.rflags & IOPL) >> 12 != 3 {
                return Err(Fault::gp(0));
            }
            let sp = cpu.gpr[RSP];
            let r = (|| -> Res<(u64, u64, u64)> {
                if bytes == 2 {
                    Ok((cpu.pop::<W16>()?, cpu.pop::<W16>()?, cpu.pop::<W16>()?))
                } else {
                    Ok((cpu.pop::<W32>()?, cpu.pop::<W32>()?, cpu.pop::<W32>()?))
                }
            })();
            let (ip, cs, fl) = match r {
                Ok(v) => v,
                Err(e) => {
                    cpu.gpr[RSP] = sp;
                    return Err(e);
                }
            };
            if cpu.mode == Mode::Real && ip > u64::from(cpu.seg[CS].limit) {
                cpu.gpr[RSP] = sp;
                return Err(Fault::gp(0));
            }
            let mask = if bytes == 2 { 0xffff } else { u64::MAX };
            write_flags_checked(cpu, fl, mask);
            cpu.seg[CS].set_real(cs as u16);
            cpu.set_rip(ip);
            cpu.update_mode();
            Ok(())
        }
        _ => iret_protected(cpu, bytes),
    }
}

fn iret_protected(cpu: &mut Cpu, bytes: u64) -> Res {
    if cpu.rflags & NT != 0 {
        // IA-32e mode has no task switches: #GP(0) (SDM IRET).
        if cpu.long_mode() {
            return Err(Fault::gp(0));
        }
        return task::iret_to_link(cpu);
    }
    let rd = |cpu: &mut Cpu, k: u64| -> Res<u64> {
        match bytes {
            2 => cpu.peek::<W16>(k * 2),
            4 => cpu.peek::<W32>(k * 4),
            _ => cpu.peek::<W64>(k * 8),
        }
    };
    let ip = rd(cpu, 0)?;
    let cs = rd(cpu, 1)? as u16;
    let fl = rd(cpu, 2)?;
    if bytes == 4 && fl & VM != 0 && cpu.cpl == 0 && !cpu.long_mode() {
        tracing::warn!("vmplay-emu: iret to virtual-8086 mode is not supported");
        return Err(Fault::gp(0));
    }
    if cs & 0xfffc == 0 {
        return Err(Fault::gp(0));
    }
    let d = cpu.read_desc(cs)?;
    let new_cpl = cpu.check_code_target(&d, cs, true)?;
    let outer = new_cpl > cpu.cpl;
    let to64 = cpu.long_mode() && d.l();
    let pops_stack = outer || cpu.mode == Mode::Long;
    let (mut new_sp, mut ss_sel) = (0, 0);
    if pops_stack {
        new_sp = rd(cpu, 3)?;
        ss_sel = rd(cpu, 4)? as u16;
    }
    let mask = match bytes {
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    };
    // Validate the new SS before committing anything.
    let mut new_ss = None;
    if pops_stack {
        if ss_sel & 0xfffc == 0 {
            if !(cpu.long_mode() && to64 && new_cpl < 3) {
                return Err(Fault::gp(0));
            }
        } else {
            let sd = cpu.read_desc(ss_sel)?;
            if (ss_sel & 3) as u8 != new_cpl
                || sd.dpl() != new_cpl
                || !sd.s()
                || sd.typ() & 0xa != 0x2
            {
                return Err(Fault::gp(sel_code(ss_sel)));
            }
            if !sd.present() {
                return Err(Fault::ss(sel_code(ss_sel)));
            }
            new_ss = Some(sd);
        }
    }
    let old_cpl = cpu.cpl;
    if !pops_stack {
        let sp = cpu.gpr[RSP];
        let nsp = (sp & cpu.sp_mask).wrapping_add(3 * bytes) & cpu.sp_mask;
        cpu.gpr[RSP] = (sp & !cpu.sp_mask) | nsp;
    }
    // Flags use the old CPL's rights.
    write_flags_checked(cpu, fl, mask);
    cpu.load_cs(&d, cs, new_cpl)?;
    cpu.set_rip(if to64 { ip } else { ip & mask & 0xffff_ffff });
    if pops_stack {
        match new_ss {
            Some(sd) => {
                let mut s = sd.to_seg(ss_sel);
                s.attr |= 1;
                cpu.seg[SS] = s;
            }
            None => {
                cpu.seg[SS] = Seg {
                    sel: ss_sel,
                    unusable: true,
                    attr: u16::from(new_cpl) << ATTR_DPL_SHIFT,
                    ..Seg::default()
                };
            }
        }
        cpu.refresh_segments();
        cpu.gpr[RSP] = if cpu.mode == Mode::Long {
            new_sp
        } else if cpu.seg[SS].db() {
            new_sp & 0xffff_ffff
        } else {
            (cpu.gpr[RSP] & !0xffff) | (new_sp & 0xffff)
        };
    }
    if new_cpl > old_cpl {
        cpu.nullify_data_segments();
    }
    cpu.stop = true;
    Ok(())
}
