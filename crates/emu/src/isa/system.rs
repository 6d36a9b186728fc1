//! System instructions: descriptor-table registers, control and debug
//! registers, cli/sti/hlt, invlpg, MSRs, cpuid, rdtsc(p), fast system
//! calls, lar/lsl/verr/verw/arpl, cache and fence hints, ud0/1/2.

use std::sync::atomic::{Ordering, fence};

use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{IF, IOPL, ZF};
use crate::cpu::width::{W16, W32, W64, Width};
use crate::cpu::*;
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::*;

#[inline]
fn need_cpl0(cpu: &Cpu) -> Res {
    if cpu.cpl != 0 {
        Err(Fault::gp(0))
    } else {
        Ok(())
    }
}

/// lgdt/lidt; `B` = base bytes (3 for 16-bit operand size, 4, or 8).
fn load_dtr<const IDT: bool, const B: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    let off = cpu.ea(i);
    let seg = usize::from(i.seg);
    let limit = cpu.read_virt::<W16>(seg, off)? as u16;
    let base_off = off.wrapping_add(2) & i.amask;
    let base = match B {
        8 => cpu.read_virt::<W64>(seg, base_off)?,
        4 => cpu.read_virt::<W32>(seg, base_off)?,
        _ => cpu.read_virt::<W32>(seg, base_off)? & 0x00ff_ffff,
    };
    if B == 8 && !canonical(base) {
        return Err(Fault::gp(0));
    }
    let t = DescTable { base, limit };
    if IDT {
        cpu.idtr = t;
    } else {
        cpu.gdtr = t;
    }
    Ok(())
}

fn store_dtr<const IDT: bool, const B: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let t = if IDT { cpu.idtr } else { cpu.gdtr };
    let off = cpu.ea(i);
    let seg = usize::from(i.seg);
    cpu.write_virt::<W16>(seg, off, u64::from(t.limit))?;
    let base_off = off.wrapping_add(2) & i.amask;
    if B == 8 {
        cpu.write_virt::<W64>(seg, base_off, t.base)
    } else {
        cpu.write_virt::<W32>(seg, base_off, t.base & 0xffff_ffff)
    }
}

fn protected_only(cpu: &Cpu) -> Res {
    if matches!(cpu.mode, Mode::Real | Mode::Virtual8086) {
        Err(Fault::ud())
    } else {
        Ok(())
    }
}

fn lldt<S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    protected_only(cpu)?;
    need_cpl0(cpu)?;
    let sel = if S::IS_REG_OP0 {
        W16::get(&cpu.gpr, i.r0)
    } else {
        S::get::<W16>(cpu, i)?
    };
    cpu.load_ldt(sel as u16)
}

fn ltr<S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    protected_only(cpu)?;
    need_cpl0(cpu)?;
    let sel = if S::IS_REG_OP0 {
        W16::get(&cpu.gpr, i.r0)
    } else {
        S::get::<W16>(cpu, i)?
    };
    cpu.load_tr(sel as u16)
}

/// sldt/str/smsw: register forms write the operand size, memory 16 bits.
fn store_sel<const WHAT: u8, W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = match WHAT {
        0 => {
            protected_only(cpu)?;
            u64::from(cpu.ldtr.sel)
        }
        1 => {
            protected_only(cpu)?;
            u64::from(cpu.tr.sel)
        }
        _ => cpu.cr0 & W::MASK,
    };
    if D::IS_REG {
        D::write::<W>(cpu, i, v)
    } else {
        D::write::<W16>(cpu, i, v)
    }
}

fn lmsw<S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    let v = if S::IS_REG_OP0 {
        W16::get(&cpu.gpr, i.r0)
    } else {
        S::get::<W16>(cpu, i)?
    };
    // PE can be set but not cleared; MP, EM, TS follow.
    let new = (cpu.cr0 & !0xe) | (v & 0xf) | (cpu.cr0 & 1);
    write_cr0(cpu, new)
}

pub fn write_cr0(cpu: &mut Cpu, v: u64) -> Res {
    if v >> 32 != 0 {
        return Err(Fault::gp(0));
    }
    let v = v | CR0_ET;
    if (v & CR0_PG != 0 && v & CR0_PE == 0) || (v & CR0_NW != 0 && v & CR0_CD == 0) {
        return Err(Fault::gp(0));
    }
    let old = cpu.cr0;
    if v & CR0_PG != 0 && old & CR0_PG == 0 && cpu.efer & EFER_LME != 0 {
        if cpu.cr4 & CR4_PAE == 0 {
            return Err(Fault::gp(0));
        }
        cpu.efer |= EFER_LMA;
    }
    if v & CR0_PG == 0 && old & CR0_PG != 0 {
        if cpu.mode == Mode::Long {
            return Err(Fault::gp(0));
        }
        cpu.efer &= !EFER_LMA;
    }
    cpu.cr0 = v;
    if (old ^ v) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
        cpu.tlb.flush_all();
    }
    cpu.update_mode();
    Ok(())
}

fn write_cr4(cpu: &mut Cpu, v: u64) -> Res {
    let mut allowed =
        CR4_DE | CR4_PSE | CR4_PAE | CR4_PGE | CR4_PCE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_TSD;
    // FSGSBASE and OSXSAVE where the CPU model advertises them
    // (isa/ext.rs, isa/xsave.rs).
    if crate::isa::bmi::modern(cpu) {
        allowed |= crate::isa::ext::CR4_FSGSBASE | crate::isa::xsave::CR4_OSXSAVE;
    }
    if v & !allowed != 0 || (cpu.long_mode() && v & CR4_PAE == 0) {
        return Err(Fault::gp(0));
    }
    let old = cpu.cr4;
    cpu.cr4 = v;
    if (old ^ v) & (CR4_PGE | CR4_PAE | CR4_PSE) != 0 {
        cpu.tlb.flush_all();
    }
    cpu.stop = true;
    Ok(())
}

fn mov_to_cr<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    let v = W::get(&cpu.gpr, i.r1);
    match i.r0 {
        0 => write_cr0(cpu, v)?,
        2 => cpu.cr2 = v,
        3 => {
            cpu.cr3 = if cpu.long_mode() {
                v & 0x000f_ffff_ffff_ffff
            } else {
                v & 0xffff_ffff
            };
            cpu.tlb.flush_nonglobal();
        }
        4 => write_cr4(cpu, v)?,
        8 if cpu.mode == Mode::Long => {
            if v & !0xf != 0 {
                return Err(Fault::gp(0));
            }
            cpu.vm.platform.set_tpr(cpu.id, (v as u8) << 4);
        }
        _ => return Err(Fault::ud()),
    }
    cpu.stop = true;
    Ok(())
}

fn mov_from_cr<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    let v = match i.r1 {
        0 => cpu.cr0,
        2 => cpu.cr2,
        3 => cpu.cr3,
        4 => cpu.cr4,
        8 if cpu.mode == Mode::Long => u64::from(cpu.vm.platform.tpr(cpu.id) >> 4),
        _ => return Err(Fault::ud()),
    };
    W::set(&mut cpu.gpr, i.r0, v & W::MASK);
    Ok(())
}

fn dr_index(cpu: &Cpu, n: u8) -> Res<usize> {
    match n {
        0..=3 | 6 | 7 => Ok(usize::from(n)),
        4 | 5 if cpu.cr4 & CR4_DE == 0 => Ok(usize::from(n) + 2),
        _ => Err(Fault::ud()),
    }
}

fn mov_to_dr<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    crate::mode::dbreg::general_detect(cpu)?;
    let n = dr_index(cpu, i.r0)?;
    crate::mode::dbreg::write(cpu, n, W::get(&cpu.gpr, i.r1))
}

fn mov_from_dr<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    crate::mode::dbreg::general_detect(cpu)?;
    let n = dr_index(cpu, i.r1)?;
    W::set(&mut cpu.gpr, i.r0, cpu.dr[n] & W::MASK);
    Ok(())
}

fn iopl_ok(cpu: &Cpu) -> bool {
    cpu.mode == Mode::Real || u64::from(cpu.cpl) <= (cpu.rflags & IOPL) >> 12
}

fn cli(cpu: &mut Cpu, _: &Insn) -> Res {
    if !iopl_ok(cpu) {
        return Err(Fault::gp(0));
    }
    cpu.rflags &= !IF;
    Ok(())
}

fn sti(cpu: &mut Cpu, _: &Insn) -> Res {
    if !iopl_ok(cpu) {
        return Err(Fault::gp(0));
    }
    if cpu.rflags & IF == 0 {
        cpu.rflags |= IF;
        cpu.int_shadow = true;
    }
    cpu.stop = true;
    Ok(())
}

fn hlt(cpu: &mut Cpu, _: &Insn) -> Res {
    need_cpl0(cpu)?;
    if cpu.vm.platform.signals[cpu.id as usize].take_unhalt() {
        return Ok(());
    }
    cpu.run_state = RunState::Halted;
    cpu.stop = true;
    Ok(())
}

fn invlpg(cpu: &mut Cpu, i: &Insn) -> Res {
    need_cpl0(cpu)?;
    // No segment checks: invlpg never faults on its operand.
    let lin = cpu.seg[usize::from(i.seg)].base.wrapping_add(cpu.ea(i)) & cpu.lin_mask;
    if cpu.tlb.flush_page(lin) {
        // Code mappings may have changed: the block loop forgets its
        // current code page.
        cpu.stop = true;
    }
    Ok(())
}

fn rdmsr(cpu: &mut Cpu, _: &Insn) -> Res {
    need_cpl0(cpu)?;
    let v = cpu.rdmsr(cpu.gpr[1] as u32)?;
    cpu.gpr[0] = v & 0xffff_ffff;
    cpu.gpr[2] = v >> 32;
    Ok(())
}

fn wrmsr(cpu: &mut Cpu, _: &Insn) -> Res {
    need_cpl0(cpu)?;
    let v = (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32);
    cpu.wrmsr(cpu.gpr[1] as u32, v)?;
    cpu.stop = true;
    Ok(())
}

fn cpuid(cpu: &mut Cpu, _: &Insn) -> Res {
    let [a, b, cx, d] = crate::cpuid::cpuid(cpu, cpu.gpr[0] as u32, cpu.gpr[1] as u32);
    cpu.gpr[0] = u64::from(a);
    cpu.gpr[3] = u64::from(b);
    cpu.gpr[1] = u64::from(cx);
    cpu.gpr[2] = u64::from(d);
    Ok(())
}

fn rdtsc(cpu: &mut Cpu, _: &Insn) -> Res {
    if cpu.cr4 & CR4_TSD != 0 && cpu.cpl != 0 {
        return Err(Fault::gp(0));
    }
    let t = cpu.tsc();
    cpu.gpr[0] = t & 0xffff_ffff;
    cpu.gpr[2] = t >> 32;
    Ok(())
}

fn rdtscp(cpu: &mut Cpu, i: &Insn) -> Res {
    rdtsc(cpu, i)?;
    cpu.gpr[1] = cpu.msr.tsc_aux & 0xffff_ffff;
    Ok(())
}

/// rdpmc: no performance counters are advertised, so every index is
/// invalid (#GP), as is any use from ring 3 without CR4.PCE.
fn rdpmc(_: &mut Cpu, _: &Insn) -> Res {
    Err(Fault::gp(0))
}

fn clts(cpu: &mut Cpu, _: &Insn) -> Res {
    need_cpl0(cpu)?;
    cpu.cr0 &= !CR0_TS;
    Ok(())
}

fn privileged_nop(cpu: &mut Cpu, _: &Insn) -> Res {
    need_cpl0(cpu)
}

fn mfence(_: &mut Cpu, _: &Insn) -> Res {
    fence(Ordering::SeqCst);
    Ok(())
}

fn lfence(_: &mut Cpu, _: &Insn) -> Res {
    fence(Ordering::Acquire);
    Ok(())
}

/// clflush & co.: the address must be valid; nothing else to do.
fn clflush(cpu: &mut Cpu, i: &Insn) -> Res {
    cpu.read_mem::<crate::cpu::width::W8>(i).map(|_| ())
}

fn ud(_: &mut Cpu, _: &Insn) -> Res {
    Err(Fault::ud())
}

fn syscall(cpu: &mut Cpu, _: &Insn) -> Res {
    crate::mode::syscall::syscall(cpu)
}
fn sysret<const B: u8>(cpu: &mut Cpu, _: &Insn) -> Res {
    crate::mode::syscall::sysret(cpu, B)
}
fn sysenter(cpu: &mut Cpu, _: &Insn) -> Res {
    crate::mode::syscall::sysenter(cpu)
}
fn sysexit<const B: u8>(cpu: &mut Cpu, _: &Insn) -> Res {
    crate::mode::syscall::sysexit(cpu, B)
}
fn swapgs(cpu: &mut Cpu, _: &Insn) -> Res {
    crate::mode::syscall::swapgs(cpu)
}

fn set_zf(cpu: &mut Cpu, z: bool) {
    let b = cpu.flags.bits();
    cpu.flags.set_bits(if z { b | ZF } else { b & !ZF });
}

/// lar (`LSL` false) / lsl: access rights or limit of a descriptor the
/// current privilege may see; ZF says whether it was loaded.
fn lar_lsl<W: Width, S: Src, const LSL: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    protected_only(cpu)?;
    let sel = S::get::<W16>(cpu, i)? as u16;
    let ok = (|| -> Option<u64> {
        if sel & 0xfffc == 0 {
            return None;
        }
        let d = cpu.read_desc(sel).ok()?;
        let rpl = (sel & 3) as u8;
        let valid_sys = if LSL {
            matches!(d.typ(), 1 | 2 | 3 | 9 | 0xb)
        } else {
            matches!(d.typ(), 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc)
        };
        if !d.s() && !valid_sys {
            return None;
        }
        if !d.conforming() && (d.dpl() < cpu.cpl || d.dpl() < rpl) {
            return None;
        }
        Some(if LSL {
            u64::from(d.limit())
        } else {
            (d.raw >> 32) & 0x00f0_ff00
        })
    })();
    match ok {
        Some(v) => {
            W::set(&mut cpu.gpr, i.r0, v & W::MASK);
            set_zf(cpu, true);
        }
        None => set_zf(cpu, false),
    }
    Ok(())
}

fn verr_verw<S: Src, const W_: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    protected_only(cpu)?;
    let sel = if S::IS_REG_OP0 {
        W16::get(&cpu.gpr, i.r0)
    } else {
        S::get::<W16>(cpu, i)?
    } as u16;
    let ok = sel & 0xfffc != 0
        && cpu.read_desc(sel).ok().is_some_and(|d| {
            let rpl = (sel & 3) as u8;
            let priv_ok = d.conforming() || (d.dpl() >= cpu.cpl && d.dpl() >= rpl);
            let kind_ok = if W_ {
                d.s() && !d.is_code() && d.typ() & 2 != 0
            } else {
                d.s() && (!d.is_code() || d.typ() & 2 != 0)
            };
            priv_ok && kind_ok
        });
    set_zf(cpu, ok);
    Ok(())
}

fn arpl<D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    protected_only(cpu)?;
    let src = W16::get(&cpu.gpr, i.r1) & 3;
    let mut changed = false;
    D::rmw::<W16>(cpu, i, |d| {
        if d & 3 < src {
            changed = true;
            (d & !3) | src
        } else {
            d
        }
    })?;
    set_zf(cpu, changed);
    Ok(())
}

pub fn register(t: &mut Table) {
    t.add(c("Lgdt_m1632_16"), load_dtr::<false, 3>);
    t.add(c("Lgdt_m1632"), load_dtr::<false, 4>);
    t.add(c("Lgdt_m1664"), load_dtr::<false, 8>);
    t.add(c("Lidt_m1632_16"), load_dtr::<true, 3>);
    t.add(c("Lidt_m1632"), load_dtr::<true, 4>);
    t.add(c("Lidt_m1664"), load_dtr::<true, 8>);
    t.add(c("Sgdt_m1632_16"), store_dtr::<false, 4>);
    t.add(c("Sgdt_m1632"), store_dtr::<false, 4>);
    t.add(c("Sgdt_m1664"), store_dtr::<false, 8>);
    t.add(c("Sidt_m1632_16"), store_dtr::<true, 4>);
    t.add(c("Sidt_m1632"), store_dtr::<true, 4>);
    t.add(c("Sidt_m1664"), store_dtr::<true, 8>);
    for name in ["Lldt_rm16", "Lldt_r32m16", "Lldt_r64m16"] {
        t.rm(c(name), lldt::<RegSrc>, lldt::<MemSrc>);
        t.stop(c(name));
    }
    for name in ["Ltr_rm16", "Ltr_r32m16", "Ltr_r64m16"] {
        t.rm(c(name), ltr::<RegSrc>, ltr::<MemSrc>);
    }
    t.rm(
        c("Sldt_rm16"),
        store_sel::<0, W16, RegDst>,
        store_sel::<0, W16, MemDst>,
    );
    t.rm(
        c("Sldt_r32m16"),
        store_sel::<0, W32, RegDst>,
        store_sel::<0, W32, MemDst>,
    );
    t.rm(
        c("Sldt_r64m16"),
        store_sel::<0, W64, RegDst>,
        store_sel::<0, W64, MemDst>,
    );
    t.rm(
        c("Str_rm16"),
        store_sel::<1, W16, RegDst>,
        store_sel::<1, W16, MemDst>,
    );
    t.rm(
        c("Str_r32m16"),
        store_sel::<1, W32, RegDst>,
        store_sel::<1, W32, MemDst>,
    );
    t.rm(
        c("Str_r64m16"),
        store_sel::<1, W64, RegDst>,
        store_sel::<1, W64, MemDst>,
    );
    t.rm(
        c("Smsw_rm16"),
        store_sel::<2, W16, RegDst>,
        store_sel::<2, W16, MemDst>,
    );
    t.rm(
        c("Smsw_r32m16"),
        store_sel::<2, W32, RegDst>,
        store_sel::<2, W32, MemDst>,
    );
    t.rm(
        c("Smsw_r64m16"),
        store_sel::<2, W64, RegDst>,
        store_sel::<2, W64, MemDst>,
    );
    for name in ["Lmsw_rm16", "Lmsw_r32m16", "Lmsw_r64m16"] {
        t.rm(c(name), lmsw::<RegSrc>, lmsw::<MemSrc>);
        t.stop(c(name));
    }
    t.add_stop(c("Mov_cr_r32"), mov_to_cr::<W32>);
    t.add_stop(c("Mov_cr_r64"), mov_to_cr::<W64>);
    t.add(c("Mov_r32_cr"), mov_from_cr::<W32>);
    t.add(c("Mov_r64_cr"), mov_from_cr::<W64>);
    t.add(c("Mov_dr_r32"), mov_to_dr::<W32>);
    t.add(c("Mov_dr_r64"), mov_to_dr::<W64>);
    t.add(c("Mov_r32_dr"), mov_from_dr::<W32>);
    t.add(c("Mov_r64_dr"), mov_from_dr::<W64>);
    t.add_stop(c("Cli"), cli);
    t.add_stop(c("Sti"), sti);
    t.add_stop(c("Hlt"), hlt);
    t.add_stop(c("Invlpg_m"), invlpg);
    t.add(c("Rdmsr"), rdmsr);
    t.add_stop(c("Wrmsr"), wrmsr);
    t.add(c("Cpuid"), cpuid);
    t.add(c("Rdtsc"), rdtsc);
    t.add(c("Rdtscp"), rdtscp);
    t.add(c("Clts"), clts);
    t.add(c("Rdpmc"), rdpmc);
    t.add(c("Wbinvd"), privileged_nop);
    t.add(c("Invd"), privileged_nop);
    for name in ["Mfence", "Sfence"] {
        t.add(c(name), mfence);
    }
    t.add(c("Lfence"), lfence);
    t.add(c("Clflush_m8"), clflush);
    t.add(c("Clflushopt_m8"), clflush);
    for name in [
        "Ud2",
        "Ud0",
        "Ud0_r16_rm16",
        "Ud0_r32_rm32",
        "Ud0_r64_rm64",
        "Ud1_r16_rm16",
        "Ud1_r32_rm32",
        "Ud1_r64_rm64",
    ] {
        t.add(c(name), ud);
    }
    t.add_stop(c("Syscall"), syscall);
    t.add_stop(c("Sysretd"), sysret::<4>);
    t.add_stop(c("Sysretq"), sysret::<8>);
    t.add_stop(c("Sysenter"), sysenter);
    t.add_stop(c("Sysexitd"), sysexit::<4>);
    t.add_stop(c("Sysexitq"), sysexit::<8>);
    t.add(c("Swapgs"), swapgs);
    t.rm(
        c("Lar_r16_rm16"),
        lar_lsl::<W16, RegSrc, false>,
        lar_lsl::<W16, MemSrc, false>,
    );
    t.rm(
        c("Lar_r32_r32m16"),
        lar_lsl::<W32, RegSrc, false>,
        lar_lsl::<W32, MemSrc, false>,
    );
    t.rm(
        c("Lar_r64_r64m16"),
        lar_lsl::<W64, RegSrc, false>,
        lar_lsl::<W64, MemSrc, false>,
    );
    t.rm(
        c("Lsl_r16_rm16"),
        lar_lsl::<W16, RegSrc, true>,
        lar_lsl::<W16, MemSrc, true>,
    );
    t.rm(
        c("Lsl_r32_r32m16"),
        lar_lsl::<W32, RegSrc, true>,
        lar_lsl::<W32, MemSrc, true>,
    );
    t.rm(
        c("Lsl_r64_r64m16"),
        lar_lsl::<W64, RegSrc, true>,
        lar_lsl::<W64, MemSrc, true>,
    );
    for name in ["Verr_rm16", "Verr_r32m16", "Verr_r64m16"] {
        t.rm(
            c(name),
            verr_verw::<RegSrc, false>,
            verr_verw::<MemSrc, false>,
        );
    }
    for name in ["Verw_rm16", "Verw_r32m16", "Verw_r64m16"] {
        t.rm(
            c(name),
            verr_verw::<RegSrc, true>,
            verr_verw::<MemSrc, true>,
        );
    }
    t.rm(c("Arpl_rm16_r16"), arpl::<RegDst>, arpl::<MemDst>);
    t.rm(c("Arpl_r32m16_r32"), arpl::<RegDst>, arpl::<MemDst>);
}
