//! Control instructions: fninit, fnclex, fldcw/fnstcw, fnstsw, the
//! environment (fnstenv/fldenv, 14- and 28-byte layouts in real and
//! protected form) and full state (fnsave/frstor). They do not update
//! FIP/FDP/FOP.

use iced_x86::Code;

use super::{nowait_check, wait_check};
use crate::cpu::fault::{Fault, Res};
use crate::cpu::fpu::F80;
use crate::cpu::width::{W16, Width};
use crate::cpu::{CS, Cpu, Mode};
use crate::decode::{Insn, Table};

/// FCW bits that exist (IC, RC, PC, masks); bit 6 always reads as 1.
const FCW_BITS: u16 = 0x1f3f;

fn set_fcw(cpu: &mut Cpu, v: u16) {
    cpu.fpu.fcw = (v & FCW_BITS) | 0x40;
    cpu.fpu.update_es();
}

fn fninit<const WAIT: bool>(cpu: &mut Cpu, _: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    cpu.fpu.init();
    Ok(())
}

fn fnclex<const WAIT: bool>(cpu: &mut Cpu, _: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    cpu.fpu.fsw &= !0x80ff;
    Ok(())
}

fn fldcw(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    let v = cpu.read_mem::<W16>(i)? as u16;
    set_fcw(cpu, v);
    Ok(())
}

fn fnstcw<const WAIT: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    let v = u64::from(cpu.fpu.fcw);
    cpu.write_mem::<W16>(i, v)
}

fn fnstsw<const WAIT: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    let v = u64::from(cpu.fpu.fsw);
    cpu.write_mem::<W16>(i, v)
}

fn fnstsw_ax<const WAIT: bool>(cpu: &mut Cpu, _: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    let v = u64::from(cpu.fpu.fsw);
    W16::set(&mut cpu.gpr, 0, v);
    Ok(())
}

fn real_layout(cpu: &Cpu) -> bool {
    matches!(cpu.mode, Mode::Real | Mode::Virtual8086)
}

/// The environment image: 28 bytes (`wide`, 32-bit operand size) or 14.
fn env_image(cpu: &Cpu, wide: bool) -> ([u8; 28], usize) {
    let f = &cpu.fpu;
    let (fcw, fsw, ftw, fop) = (f.fcw, f.fsw, f.full_tags(), f.fop & 0x7ff);
    // FIP/FDP hold the offset, with the selector in bits 32..47 outside
    // 64-bit mode; a 64-bit RIP keeps only its low half here.
    let long = cpu.mode == Mode::Long;
    let (ip, cs) = (
        f.fip as u32,
        if long {
            cpu.seg[CS].sel
        } else {
            (f.fip >> 32) as u16
        },
    );
    let (dp, ds) = (f.fdp as u32, if long { 0 } else { (f.fdp >> 32) as u16 });
    let w: [u32; 7] = if real_layout(cpu) {
        // Real mode stores 20/32-bit linear pointers split around FOP.
        let lip = (u32::from(cs) << 4).wrapping_add(ip);
        let ldp = (u32::from(ds) << 4).wrapping_add(dp);
        if !wide {
            let h = [
                fcw,
                fsw,
                ftw,
                lip as u16,
                fop | (((lip >> 16) as u16 & 0xf) << 12),
                ldp as u16,
                ((ldp >> 16) as u16 & 0xf) << 12,
            ];
            return (pack16(h), 14);
        }
        [
            0xffff_0000 | u32::from(fcw),
            0xffff_0000 | u32::from(fsw),
            0xffff_0000 | u32::from(ftw),
            0xffff_0000 | (lip & 0xffff),
            u32::from(fop) | ((lip >> 16) << 12),
            0xffff_0000 | (ldp & 0xffff),
            (ldp >> 16) << 12,
        ]
    } else if wide {
        [
            0xffff_0000 | u32::from(fcw),
            0xffff_0000 | u32::from(fsw),
            0xffff_0000 | u32::from(ftw),
            ip,
            u32::from(cs) | (u32::from(fop) << 16),
            dp,
            0xffff_0000 | u32::from(ds),
        ]
    } else {
        return (pack16([fcw, fsw, ftw, ip as u16, cs, dp as u16, ds]), 14);
    };
    let mut b = [0u8; 28];
    for (k, v) in w.iter().enumerate() {
        b[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
    }
    (b, 28)
}

fn pack16(h: [u16; 7]) -> [u8; 28] {
    let mut b = [0u8; 28];
    for (k, v) in h.iter().enumerate() {
        b[2 * k..2 * k + 2].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Loads an environment image written by [`env_image`]'s layouts.
fn load_env(cpu: &mut Cpu, b: &[u8], wide: bool) {
    let h = |k: usize| u16::from_le_bytes([b[k], b[k + 1]]);
    let d = |k: usize| u32::from_le_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]);
    let real = real_layout(cpu);
    let long = cpu.mode == Mode::Long;
    let (fcw, fsw, ftw, fip, fop, fdp);
    if wide {
        (fcw, fsw, ftw) = (h(0), h(4), h(8));
        if real {
            let lip = u64::from(h(12)) | (u64::from(d(16) >> 12) << 16);
            let ldp = u64::from(h(20)) | (u64::from(d(24) >> 12) << 16);
            (fip, fdp, fop) = (lip, ldp, h(16) & 0x7ff);
        } else {
            let (ip, cs) = (u64::from(d(12)), u64::from(h(16)));
            let (dp, ds) = (u64::from(d(20)), u64::from(h(24)));
            fop = h(18) & 0x7ff;
            fip = if long { ip } else { (cs << 32) | ip };
            fdp = if long { dp } else { (ds << 32) | dp };
        }
    } else {
        (fcw, fsw, ftw) = (h(0), h(2), h(4));
        if real {
            let lip = u64::from(h(6)) | (u64::from(h(8) >> 12) << 16);
            let ldp = u64::from(h(10)) | (u64::from(h(12) >> 12) << 16);
            (fip, fdp, fop) = (lip, ldp, h(8) & 0x7ff);
        } else {
            fip = (u64::from(h(8)) << 32) | u64::from(h(6));
            fdp = (u64::from(h(12)) << 32) | u64::from(h(10));
            fop = cpu.fpu.fop;
        }
    }
    let f = &mut cpu.fpu;
    f.fcw = (fcw & FCW_BITS) | 0x40;
    f.fsw = fsw;
    f.set_full_tags(ftw);
    (f.fip, f.fdp, f.fop) = (fip, fdp, fop);
    f.update_es();
}

fn fnstenv<const WAIT: bool, const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    let (img, n) = env_image(cpu, WIDE);
    let off = cpu.ea(i);
    cpu.write_bytes(usize::from(i.seg), off, &img[..n])?;
    // The handler that stores the environment runs with exceptions masked.
    cpu.fpu.fcw |= 0x3f;
    cpu.fpu.update_es();
    Ok(())
}

fn fldenv<const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    let n = if WIDE { 28 } else { 14 };
    let mut b = [0u8; 28];
    let off = cpu.ea(i);
    cpu.read_bytes(usize::from(i.seg), off, &mut b[..n])?;
    load_env(cpu, &b[..n], WIDE);
    Ok(())
}

fn fnsave<const WAIT: bool, const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)?
    } else {
        nowait_check(cpu)?
    }
    let (env, n) = env_image(cpu, WIDE);
    let mut img = [0u8; 108];
    img[..n].copy_from_slice(&env[..n]);
    for k in 0..8 {
        let x = cpu.fpu.get(k);
        let at = n + 10 * k;
        img[at..at + 8].copy_from_slice(&x.signif.to_le_bytes());
        img[at + 8..at + 10].copy_from_slice(&x.sign_exp.to_le_bytes());
    }
    let off = cpu.ea(i);
    cpu.write_bytes(usize::from(i.seg), off, &img[..n + 80])?;
    cpu.fpu.init();
    Ok(())
}

fn frstor<const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    wait_check(cpu)?;
    let n = if WIDE { 28 } else { 14 };
    let mut img = [0u8; 108];
    let off = cpu.ea(i);
    cpu.read_bytes(usize::from(i.seg), off, &mut img[..n + 80])?;
    load_env(cpu, &img[..n], WIDE);
    for k in 0..8 {
        let at = n + 10 * k;
        let mut s = [0u8; 8];
        s.copy_from_slice(&img[at..at + 8]);
        let x = F80 {
            signif: u64::from_le_bytes(s),
            sign_exp: u16::from_le_bytes([img[at + 8], img[at + 9]]),
        };
        // Registers only: the tags came with the environment.
        let r = cpu.fpu.phys(k);
        cpu.fpu.st[r] = x;
    }
    Ok(())
}

/// 8087/287 leftovers (feni, fdisi, fsetpm): no-ops on later FPUs.
fn legacy_nop<const WAIT: bool>(cpu: &mut Cpu, _: &Insn) -> Res {
    if WAIT {
        wait_check(cpu)
    } else {
        nowait_check(cpu)
    }
}

fn undefined(_: &mut Cpu, _: &Insn) -> Res {
    Err(Fault::ud())
}

pub(super) fn register(t: &mut Table) {
    t.add(Code::Fninit, fninit::<false>);
    t.add(Code::Finit, fninit::<true>);
    t.add(Code::Fnclex, fnclex::<false>);
    t.add(Code::Fclex, fnclex::<true>);
    t.add(Code::Fldcw_m2byte, fldcw);
    t.add(Code::Fnstcw_m2byte, fnstcw::<false>);
    t.add(Code::Fstcw_m2byte, fnstcw::<true>);
    t.add(Code::Fnstsw_m2byte, fnstsw::<false>);
    t.add(Code::Fstsw_m2byte, fnstsw::<true>);
    t.add(Code::Fnstsw_AX, fnstsw_ax::<false>);
    t.add(Code::Fstsw_AX, fnstsw_ax::<true>);
    t.add(Code::Fnstenv_m14byte, fnstenv::<false, false>);
    t.add(Code::Fnstenv_m28byte, fnstenv::<false, true>);
    t.add(Code::Fstenv_m14byte, fnstenv::<true, false>);
    t.add(Code::Fstenv_m28byte, fnstenv::<true, true>);
    t.add(Code::Fldenv_m14byte, fldenv::<false>);
    t.add(Code::Fldenv_m28byte, fldenv::<true>);
    t.add(Code::Fnsave_m94byte, fnsave::<false, false>);
    t.add(Code::Fnsave_m108byte, fnsave::<false, true>);
    t.add(Code::Fsave_m94byte, fnsave::<true, false>);
    t.add(Code::Fsave_m108byte, fnsave::<true, true>);
    t.add(Code::Frstor_m94byte, frstor::<false>);
    t.add(Code::Frstor_m108byte, frstor::<true>);
    t.add(Code::Fneni, legacy_nop::<false>);
    t.add(Code::Feni, legacy_nop::<true>);
    t.add(Code::Fndisi, legacy_nop::<false>);
    t.add(Code::Fdisi, legacy_nop::<true>);
    t.add(Code::Fnsetpm, legacy_nop::<false>);
    t.add(Code::Fsetpm, legacy_nop::<true>);
    // 287XL only.
    t.add(Code::Frstpm, undefined);
}
