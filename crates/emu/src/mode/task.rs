//! Hardware task switches between 32-bit TSSes (SDM vol. 3, 8.3): far
//! jmp/call to a TSS descriptor or a task gate, interrupts and exceptions
//! through a task gate in the IDT (32-bit Linux takes #DF that way), and
//! `iret` with EFLAGS.NT returning along the back link.
//!
//! Faults found before the commit point (the new TSS, its descriptor,
//! the old TSS being writable) belong to the old task and are returned
//! as usual. Faults after it (the new task's LDT and segments, the error
//! code push, EIP beyond CS's limit) are delivered here, in the new
//! task's context. A 16-bit TSS (types 1 and 3) is not supported: such a
//! switch raises #GP(selector) with a warning.

use crate::cpu::fault::{Fault, Res, Stop};
use crate::cpu::flags::{NT, VM};
use crate::cpu::width::{W8, W16, W32};
use crate::cpu::*;
use crate::mode::segment::{Desc, sel_code};

/// What started the switch: it decides busy bits, NT and the back link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    Jmp,
    Call,
    Iret,
    /// An interrupt or exception through a task gate.
    Interrupt,
}

/// The smallest limit of a 32-bit TSS (its last field ends at 0x67).
const TSS32_LIMIT: u32 = 0x67;
const TSS_AVAILABLE: u8 = 0x9;
const TSS_BUSY: u8 = 0xb;
const TASK_GATE: u8 = 0x5;
/// Offsets in a 32-bit TSS.
const LINK: u64 = 0x00;
const CR3: u64 = 0x1c;
const EIP: u64 = 0x20;
const EFLAGS: u64 = 0x24;
const GPRS: u64 = 0x28;
const SELECTORS: u64 = 0x48;
const LDT: u64 = 0x60;
/// The T (debug trap) bit is bit 0 of the word at 0x64.
const TRAP: u64 = 0x64;
/// Nested post-commit faults (each may switch tasks again) before the
/// CPU gives up with a shutdown; hardware has no such bound, but a
/// guest must not be able to recurse the VMM's stack away.
const MAX_NESTING: u8 = 8;

thread_local! {
    /// Post-commit faults being delivered on this vCPU thread's stack.
    static NESTING: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

fn unsupported_16bit(sel: u16, ext: u32) -> Stop {
    tracing::warn!(
        "vmplay-emu: task switch with a 16-bit TSS (selector {sel:#x}) is not supported"
    );
    Fault::gp(sel_code(sel) | ext)
}

/// A descriptor read for a task switch: a selector outside the GDT is
/// `fault(selector)` rather than read_desc's #GP.
fn read_gdt(cpu: &mut Cpu, sel: u16, fault: fn(u32) -> Stop, ext: u32) -> Res<Desc> {
    let code = sel_code(sel) | ext;
    if sel & 4 != 0 {
        return Err(fault(code));
    }
    match cpu.read_desc(sel) {
        Err(Stop::Fault(f)) if f.vector == crate::cpu::fault::GP => Err(fault(code)),
        r => r,
    }
}

/// The TSS a task gate names, or a far jmp/call's TSS selector: an
/// available, present 32-bit TSS in the GDT.
pub fn available_tss(cpu: &mut Cpu, sel: u16, ext: u32) -> Res<Desc> {
    let d = read_gdt(cpu, sel, Fault::gp, ext)?;
    if d.s() || d.typ() & 0x5 != 0x1 {
        return Err(Fault::gp(sel_code(sel) | ext));
    }
    if d.typ() != TSS_AVAILABLE {
        // Busy (0xb, 0x3) or a 16-bit available TSS (0x1).
        return Err(if d.typ() == 0x1 {
            unsupported_16bit(sel, ext)
        } else {
            Fault::gp(sel_code(sel) | ext)
        });
    }
    if !d.present() {
        return Err(Fault::np(sel_code(sel) | ext));
    }
    Ok(d)
}

/// Far `jmp`/`call` to a system descriptor in protected mode: an
/// available TSS or a task gate switches tasks; anything else (call
/// gates) is `other`'s to answer.
pub fn far_to_system(
    cpu: &mut Cpu,
    sel: u16,
    d: &Desc,
    kind: Switch,
    other: impl FnOnce(&mut Cpu) -> Res,
) -> Res {
    let code = sel_code(sel);
    let max = cpu.cpl.max((sel & 3) as u8);
    match d.typ() {
        TSS_AVAILABLE | 0x1 | TSS_BUSY | 0x3 => {
            if d.dpl() < max || d.typ() != TSS_AVAILABLE {
                return Err(if d.typ() == 0x1 {
                    unsupported_16bit(sel, 0)
                } else {
                    Fault::gp(code)
                });
            }
            if !d.present() {
                return Err(Fault::np(code));
            }
            switch(cpu, sel, d, kind, None, 0)
        }
        TASK_GATE => {
            if d.dpl() < max {
                return Err(Fault::gp(code));
            }
            if !d.present() {
                return Err(Fault::np(code));
            }
            let tss = (d.raw >> 16) as u16;
            let td = available_tss(cpu, tss, 0)?;
            switch(cpu, tss, &td, kind, None, 0)
        }
        _ => other(cpu),
    }
}

/// `iret` with NT set (protected mode): back to the task in the current
/// TSS's link field, which must be a busy TSS.
pub fn iret_to_link(cpu: &mut Cpu) -> Res {
    let link = cpu.read_sys::<W16>(cpu.tr.base.wrapping_add(LINK))? as u16;
    let d = read_gdt(cpu, link, Fault::ts, 0)?;
    if d.s() || d.typ() != TSS_BUSY {
        return Err(if d.typ() == 0x3 && !d.s() {
            unsupported_16bit(link, 0)
        } else {
            Fault::ts(sel_code(link))
        });
    }
    if !d.present() {
        return Err(Fault::np(sel_code(link)));
    }
    switch(cpu, link, &d, Switch::Iret, None, 0)
}

/// Faults now if the supervisor cannot write `n` bytes at `lin`.
fn probe_sys(cpu: &mut Cpu, lin: u64, n: usize) -> Res {
    let saved = cpu.tlb.cur;
    cpu.tlb.cur = 0;
    let r = cpu.probe_write(lin & cpu.lin_mask, n);
    cpu.tlb.cur = saved;
    r
}

/// The new task's state as its TSS holds it.
struct Image {
    cr3: u32,
    eip: u32,
    eflags: u32,
    gpr: [u32; 8],
    sel: [u16; 6],
    ldt: u16,
    /// The T bit: #DB (DR6.BT) once the switch completes.
    trap: bool,
}

fn read_image(cpu: &mut Cpu, base: u64) -> Res<Image> {
    let mut rd = |off: u64| {
        cpu.read_sys::<W32>(base.wrapping_add(off))
            .map(|v| v as u32)
    };
    let cr3 = rd(CR3)?;
    let eip = rd(EIP)?;
    let eflags = rd(EFLAGS)?;
    let mut gpr = [0u32; 8];
    for (k, g) in gpr.iter_mut().enumerate() {
        *g = rd(GPRS + 4 * k as u64)?;
    }
    let mut sel = [0u16; 6];
    for (k, s) in sel.iter_mut().enumerate() {
        *s = rd(SELECTORS + 4 * k as u64)? as u16;
    }
    let ldt = rd(LDT)? as u16;
    let trap = rd(TRAP)? & 1 != 0;
    Ok(Image {
        cr3,
        eip,
        eflags,
        gpr,
        sel,
        ldt,
        trap,
    })
}

/// Switches to the task whose TSS descriptor `d` (selector `sel`) was
/// checked by the caller (available for jmp/call/interrupt, busy for
/// iret, present). `code` is the error code to push on the new task's
/// stack; `ext` the EXT bit of error codes raised on the way.
pub fn switch(cpu: &mut Cpu, sel: u16, d: &Desc, kind: Switch, code: Option<u32>, ext: u32) -> Res {
    // Before the commit point: faults here belong to the outgoing task.
    if d.limit() < TSS32_LIMIT {
        return Err(Fault::ts(sel_code(sel) | ext));
    }
    if cpu.tr.unusable || cpu.tr.typ() & 8 == 0 {
        return Err(unsupported_16bit(cpu.tr.sel, ext));
    }
    if cpu.tr.limit < TSS32_LIMIT {
        return Err(Fault::ts(sel_code(cpu.tr.sel) | ext));
    }
    let (old_base, old_sel) = (cpu.tr.base, cpu.tr.sel);
    let old_desc = cpu.read_desc(old_sel)?;
    let new_base = d.base();
    let mut img = read_image(cpu, new_base)?;
    probe_sys(cpu, old_base.wrapping_add(EIP), (LDT - EIP) as usize)?;
    let nesting = matches!(kind, Switch::Call | Switch::Interrupt);
    if nesting {
        probe_sys(cpu, new_base.wrapping_add(LINK), 2)?;
    }

    // Commit: save the outgoing task, mark descriptors, load TR.
    if matches!(kind, Switch::Jmp | Switch::Iret) {
        let b = cpu.read_sys::<W8>(old_desc.addr + 5)?;
        cpu.write_sys::<W8>(old_desc.addr + 5, b & !0x2)?;
    }
    let mut flags = cpu.get_rflags() as u32;
    if kind == Switch::Iret {
        flags &= !(NT as u32);
    }
    cpu.write_sys::<W32>(old_base + EIP, cpu.rip() & 0xffff_ffff)?;
    cpu.write_sys::<W32>(old_base + EFLAGS, u64::from(flags))?;
    for k in 0..8 {
        cpu.write_sys::<W32>(old_base + GPRS + 4 * k as u64, cpu.gpr[k] & 0xffff_ffff)?;
    }
    for k in 0..6 {
        let s = u64::from(cpu.seg[k].sel);
        cpu.write_sys::<W16>(old_base + SELECTORS + 4 * k as u64, s)?;
    }
    if nesting {
        cpu.write_sys::<W16>(new_base + LINK, u64::from(old_sel))?;
        img.eflags |= NT as u32;
    }
    if kind != Switch::Iret {
        let b = cpu.read_sys::<W8>(d.addr + 5)?;
        cpu.write_sys::<W8>(d.addr + 5, b | 0x2)?;
    }
    let mut tr = d.to_seg(sel);
    tr.attr = (tr.attr & !ATTR_TYPE) | u16::from(TSS_BUSY);
    cpu.tr = tr;
    cpu.cr0 |= CR0_TS;
    // Local breakpoint enables (L0-L3) belong to the old task (SDM 18.2.4).
    cpu.dr[7] &= !0x55;
    if cpu.cr0 & CR0_PG != 0 {
        cpu.cr3 = u64::from(img.cr3);
        cpu.tlb.flush_nonglobal();
    }
    cpu.stop = true;

    // After the commit point: faults belong to the incoming task.
    if let Err(e) = enter(cpu, &img, code, ext) {
        let depth = NESTING.get();
        match e {
            Stop::Fault(f) if depth < MAX_NESTING => {
                NESTING.set(depth + 1);
                crate::mode::interrupt::deliver_fault(cpu, f);
                NESTING.set(depth);
            }
            _ => cpu.shutdown = true,
        }
    } else if img.trap {
        crate::mode::dbreg::task_switched(cpu);
    }
    Ok(())
}

/// Loads the incoming task's registers, LDT and segments (each checked
/// as the SDM lists for task switches: #TS, or #NP/#SS when only the
/// present bit fails), pushes the error code, checks EIP.
fn enter(cpu: &mut Cpu, img: &Image, code: Option<u32>, ext: u32) -> Res {
    for (k, v) in img.gpr.iter().enumerate() {
        cpu.gpr[k] = u64::from(*v);
    }
    cpu.set_rip(u64::from(img.eip));
    // Every selector is loaded unusable first: a fault below sees them.
    cpu.ldtr = Seg {
        sel: img.ldt,
        unusable: true,
        ..Seg::default()
    };
    for (k, s) in img.sel.iter().enumerate() {
        cpu.seg[k] = Seg {
            sel: *s,
            unusable: true,
            ..Seg::default()
        };
    }
    cpu.set_rflags(u64::from(img.eflags) | 2);
    if u64::from(img.eflags) & VM != 0 {
        // A virtual-8086 task: real-mode style segments at CPL 3.
        for (k, s) in img.sel.iter().enumerate() {
            cpu.seg[k].set_real(*s);
            cpu.seg[k].limit = 0xffff;
            cpu.seg[k].attr = 0xf3 | ATTR_P;
        }
        cpu.cpl = 3;
        cpu.update_mode();
    } else {
        cpu.cpl = (img.sel[CS] & 3) as u8;
        cpu.update_mode();
        load_ldt(cpu, img.ldt, ext)?;
        load_cs(cpu, img.sel[CS], ext)?;
        load_ss(cpu, img.sel[SS], ext)?;
        for n in [DS, ES, FS, GS] {
            load_data(cpu, n, img.sel[n], ext)?;
        }
    }
    if let Some(c) = code {
        cpu.push::<W32>(u64::from(c)).map_err(|e| match e {
            Stop::Fault(f) if f.vector == crate::cpu::fault::SS => Fault::ss(ext),
            e => e,
        })?;
    }
    if u64::from(img.eip) > u64::from(cpu.seg[CS].limit) {
        return Err(Fault::gp(ext));
    }
    Ok(())
}

fn load_ldt(cpu: &mut Cpu, sel: u16, ext: u32) -> Res {
    if sel & 0xfffc == 0 {
        return Ok(());
    }
    let d = read_gdt(cpu, sel, Fault::ts, ext)?;
    if d.s() || d.typ() != 0x2 || !d.present() {
        return Err(Fault::ts(sel_code(sel) | ext));
    }
    cpu.ldtr = d.to_seg(sel);
    Ok(())
}

/// A segment descriptor from the GDT or the new LDT; outside the table
/// is #TS(selector).
fn read_seg(cpu: &mut Cpu, sel: u16, ext: u32) -> Res<Desc> {
    match cpu.read_desc(sel) {
        Err(Stop::Fault(f)) if f.vector == crate::cpu::fault::GP => {
            Err(Fault::ts(sel_code(sel) | ext))
        }
        r => r,
    }
}

fn load_cs(cpu: &mut Cpu, sel: u16, ext: u32) -> Res {
    let code = sel_code(sel) | ext;
    if sel & 0xfffc == 0 {
        return Err(Fault::ts(code));
    }
    let d = read_seg(cpu, sel, ext)?;
    let rpl = (sel & 3) as u8;
    if !d.is_code() || (d.conforming() && d.dpl() > rpl) || (!d.conforming() && d.dpl() != rpl) {
        return Err(Fault::ts(code));
    }
    if !d.present() {
        return Err(Fault::np(code));
    }
    cpu.load_cs(&d, sel, rpl)
}

fn load_ss(cpu: &mut Cpu, sel: u16, ext: u32) -> Res {
    let code = sel_code(sel) | ext;
    if sel & 0xfffc == 0 {
        return Err(Fault::ts(code));
    }
    let d = read_seg(cpu, sel, ext)?;
    let writable_data = d.s() && d.typ() & 0xa == 0x2;
    if !writable_data || (sel & 3) as u8 != cpu.cpl || d.dpl() != cpu.cpl {
        return Err(Fault::ts(code));
    }
    if !d.present() {
        return Err(Fault::ss(code));
    }
    cpu.set_accessed(&d)?;
    cpu.seg[SS] = d.to_seg(sel);
    cpu.seg[SS].attr |= 1;
    cpu.refresh_segment(SS);
    Ok(())
}

fn load_data(cpu: &mut Cpu, n: usize, sel: u16, ext: u32) -> Res {
    let code = sel_code(sel) | ext;
    if sel & 0xfffc == 0 {
        cpu.seg[n] = Seg {
            sel,
            unusable: true,
            ..Seg::default()
        };
        cpu.refresh_segment(n);
        return Ok(());
    }
    let d = read_seg(cpu, sel, ext)?;
    let readable = d.s() && (d.typ() & 8 == 0 || d.typ() & 2 != 0);
    let rpl = (sel & 3) as u8;
    if !readable || (!d.conforming() && (rpl > d.dpl() || cpu.cpl > d.dpl())) {
        return Err(Fault::ts(code));
    }
    if !d.present() {
        return Err(Fault::np(code));
    }
    cpu.set_accessed(&d)?;
    cpu.seg[n] = d.to_seg(sel);
    cpu.seg[n].attr |= 1;
    cpu.refresh_segment(n);
    Ok(())
}
