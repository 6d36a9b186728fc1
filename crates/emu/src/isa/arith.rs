//! Integer arithmetic: add, adc, sub, sbb, cmp, inc, dec, neg, and the
//! atomic-exchange family xadd, cmpxchg, cmpxchg8b, cmpxchg16b.

use crate::alu_forms;
use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{Flags, ZF};
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::*;
use crate::unary_forms;

pub struct Add;
pub struct Adc;
pub struct Sub;
pub struct Sbb;
pub struct Cmp;

impl AluOp for Add {
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a.wrapping_add(b) & W::MASK
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, a: u64, b: u64, r: u64) {
        f.add::<W>(a, b, r);
    }
}
impl AluOp for Adc {
    const CARRY_IN: bool = true;
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, cf: bool) -> u64 {
        a.wrapping_add(b).wrapping_add(u64::from(cf)) & W::MASK
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, a: u64, b: u64, r: u64) {
        f.add::<W>(a, b, r);
    }
}
impl AluOp for Sub {
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a.wrapping_sub(b) & W::MASK
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, a: u64, b: u64, r: u64) {
        f.sub::<W>(a, b, r);
    }
}
impl AluOp for Sbb {
    const CARRY_IN: bool = true;
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, cf: bool) -> u64 {
        a.wrapping_sub(b).wrapping_sub(u64::from(cf)) & W::MASK
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, a: u64, b: u64, r: u64) {
        f.sub::<W>(a, b, r);
    }
}
impl AluOp for Cmp {
    const WRITES: bool = false;
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a.wrapping_sub(b) & W::MASK
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, a: u64, b: u64, r: u64) {
        f.sub::<W>(a, b, r);
    }
}

fn inc<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = D::rmw::<W>(cpu, i, |a| a.wrapping_add(1) & W::MASK)?;
    cpu.flags.inc::<W>(a, a.wrapping_add(1) & W::MASK);
    Ok(())
}

fn dec<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = D::rmw::<W>(cpu, i, |a| a.wrapping_sub(1) & W::MASK)?;
    cpu.flags.dec::<W>(a, a.wrapping_sub(1) & W::MASK);
    Ok(())
}

fn neg<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = D::rmw::<W>(cpu, i, |a| a.wrapping_neg() & W::MASK)?;
    cpu.flags.sub::<W>(0, a, a.wrapping_neg() & W::MASK);
    Ok(())
}

fn xadd<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let src = W::get(&cpu.gpr, i.r1);
    let old = D::rmw::<W>(cpu, i, |d| d.wrapping_add(src) & W::MASK)?;
    let sum = old.wrapping_add(src) & W::MASK;
    W::set(&mut cpu.gpr, i.r1, old);
    if D::IS_REG && i.r0 == i.r1 {
        W::set(&mut cpu.gpr, i.r0, sum);
    }
    cpu.flags.add::<W>(old, src, sum);
    Ok(())
}

fn cmpxchg<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    let acc = W::get(&cpu.gpr, 0);
    let src = W::get(&cpu.gpr, i.r1);
    let old = if D::IS_REG {
        let d = W::get(&cpu.gpr, i.r0);
        if d == acc {
            W::set(&mut cpu.gpr, i.r0, src);
        }
        d
    } else {
        D::rmw::<W>(cpu, i, |d| if d == acc { src } else { d })?
    };
    cpu.flags
        .sub::<W>(acc, old, acc.wrapping_sub(old) & W::MASK);
    if old != acc {
        W::set(&mut cpu.gpr, 0, old);
    }
    Ok(())
}

fn set_zf(cpu: &mut Cpu, z: bool) {
    let b = cpu.flags.bits();
    cpu.flags.set_bits(if z { b | ZF } else { b & !ZF });
}

fn cmpxchg8b(cpu: &mut Cpu, i: &Insn) -> Res {
    let seg = usize::from(i.seg);
    let lin = cpu.lin_w(seg, cpu.ea(i), 8)?;
    let expected = (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32);
    let new = (cpu.gpr[3] & 0xffff_ffff) | (cpu.gpr[1] << 32);
    let old = crate::mem::access::via_seg(
        seg,
        cpu.locked_rmw::<W64>(lin, |d| if d == expected { new } else { d }),
    )?;
    set_zf(cpu, old == expected);
    if old != expected {
        cpu.gpr[0] = old & 0xffff_ffff;
        cpu.gpr[2] = old >> 32;
    }
    Ok(())
}

fn cmpxchg16b(cpu: &mut Cpu, i: &Insn) -> Res {
    let off = cpu.ea(i);
    if off & 15 != 0 {
        return Err(Fault::gp(0));
    }
    let lin = cpu.lin_w(usize::from(i.seg), off, 16)?;
    let expected = u128::from(cpu.gpr[0]) | (u128::from(cpu.gpr[2]) << 64);
    let new = u128::from(cpu.gpr[3]) | (u128::from(cpu.gpr[1]) << 64);
    let old = cpu.locked_cmpxchg16(lin, expected, new)?;
    set_zf(cpu, old == expected);
    if old != expected {
        cpu.gpr[0] = old as u64;
        cpu.gpr[2] = (old >> 64) as u64;
    }
    Ok(())
}

pub fn register(t: &mut Table) {
    alu_forms!(t, "Add", Add);
    alu_forms!(t, "Adc", Adc);
    alu_forms!(t, "Sub", Sub);
    alu_forms!(t, "Sbb", Sbb);
    alu_forms!(t, "Cmp", Cmp);
    unary_forms!(t, "Inc", inc);
    unary_forms!(t, "Dec", dec);
    unary_forms!(t, "Neg", neg);
    t.add(c("Inc_r16"), inc::<W16, RegDst>);
    t.add(c("Inc_r32"), inc::<W32, RegDst>);
    t.add(c("Dec_r16"), dec::<W16, RegDst>);
    t.add(c("Dec_r32"), dec::<W32, RegDst>);
    t.rmw(
        c("Xadd_rm8_r8"),
        xadd::<W8, RegDst>,
        xadd::<W8, MemDst>,
        xadd::<W8, LockDst>,
    );
    t.rmw(
        c("Xadd_rm16_r16"),
        xadd::<W16, RegDst>,
        xadd::<W16, MemDst>,
        xadd::<W16, LockDst>,
    );
    t.rmw(
        c("Xadd_rm32_r32"),
        xadd::<W32, RegDst>,
        xadd::<W32, MemDst>,
        xadd::<W32, LockDst>,
    );
    t.rmw(
        c("Xadd_rm64_r64"),
        xadd::<W64, RegDst>,
        xadd::<W64, MemDst>,
        xadd::<W64, LockDst>,
    );
    t.rmw(
        c("Cmpxchg_rm8_r8"),
        cmpxchg::<W8, RegDst>,
        cmpxchg::<W8, MemDst>,
        cmpxchg::<W8, LockDst>,
    );
    t.rmw(
        c("Cmpxchg_rm16_r16"),
        cmpxchg::<W16, RegDst>,
        cmpxchg::<W16, MemDst>,
        cmpxchg::<W16, LockDst>,
    );
    t.rmw(
        c("Cmpxchg_rm32_r32"),
        cmpxchg::<W32, RegDst>,
        cmpxchg::<W32, MemDst>,
        cmpxchg::<W32, LockDst>,
    );
    t.rmw(
        c("Cmpxchg_rm64_r64"),
        cmpxchg::<W64, RegDst>,
        cmpxchg::<W64, MemDst>,
        cmpxchg::<W64, LockDst>,
    );
    t.add(c("Cmpxchg8b_m64"), cmpxchg8b);
    t.add(c("Cmpxchg16b_m128"), cmpxchg16b);
}
