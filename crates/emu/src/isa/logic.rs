//! Logical operations: and, or, xor, test, not.

use crate::alu_forms;
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::Flags;
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::*;
use crate::unary_forms;

pub struct And;
pub struct Or;
pub struct Xor;
pub struct Test;

impl AluOp for And {
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a & b
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, _: u64, _: u64, r: u64) {
        f.logic::<W>(r);
    }
}
impl AluOp for Or {
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a | b
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, _: u64, _: u64, r: u64) {
        f.logic::<W>(r);
    }
}
impl AluOp for Xor {
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a ^ b
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, _: u64, _: u64, r: u64) {
        f.logic::<W>(r);
    }
}
impl AluOp for Test {
    const WRITES: bool = false;
    #[inline(always)]
    fn apply<W: Width>(a: u64, b: u64, _: bool) -> u64 {
        a & b
    }
    #[inline(always)]
    fn flags<W: Width>(f: &mut Flags, _: u64, _: u64, r: u64) {
        f.logic::<W>(r);
    }
}

fn not<W: Width, D: Dst>(cpu: &mut Cpu, i: &Insn) -> Res {
    D::rmw::<W>(cpu, i, |a| !a & W::MASK)?;
    Ok(())
}

pub fn register(t: &mut Table) {
    alu_forms!(t, "And", And);
    alu_forms!(t, "Or", Or);
    alu_forms!(t, "Xor", Xor);
    unary_forms!(t, "Not", not);
    t.rm(
        c("Test_rm8_r8"),
        alu::<Test, W8, RegDst, RegSrc>,
        alu::<Test, W8, MemDst, RegSrc>,
    );
    t.rm(
        c("Test_rm16_r16"),
        alu::<Test, W16, RegDst, RegSrc>,
        alu::<Test, W16, MemDst, RegSrc>,
    );
    t.rm(
        c("Test_rm32_r32"),
        alu::<Test, W32, RegDst, RegSrc>,
        alu::<Test, W32, MemDst, RegSrc>,
    );
    t.rm(
        c("Test_rm64_r64"),
        alu::<Test, W64, RegDst, RegSrc>,
        alu::<Test, W64, MemDst, RegSrc>,
    );
    t.add(c("Test_AL_imm8"), alu::<Test, W8, RegDst, ImmSrc>);
    t.add(c("Test_AX_imm16"), alu::<Test, W16, RegDst, ImmSrc>);
    t.add(c("Test_EAX_imm32"), alu::<Test, W32, RegDst, ImmSrc>);
    t.add(c("Test_RAX_imm32"), alu::<Test, W64, RegDst, ImmSrc>);
    for name in ["Test_rm8_imm8", "Test_rm8_imm8_F6r1"] {
        t.rm(
            c(name),
            alu::<Test, W8, RegDst, ImmSrc>,
            alu::<Test, W8, MemDst, ImmSrc>,
        );
    }
    for name in ["Test_rm16_imm16", "Test_rm16_imm16_F7r1"] {
        t.rm(
            c(name),
            alu::<Test, W16, RegDst, ImmSrc>,
            alu::<Test, W16, MemDst, ImmSrc>,
        );
    }
    for name in ["Test_rm32_imm32", "Test_rm32_imm32_F7r1"] {
        t.rm(
            c(name),
            alu::<Test, W32, RegDst, ImmSrc>,
            alu::<Test, W32, MemDst, ImmSrc>,
        );
    }
    for name in ["Test_rm64_imm32", "Test_rm64_imm32_F7r1"] {
        t.rm(
            c(name),
            alu::<Test, W64, RegDst, ImmSrc>,
            alu::<Test, W64, MemDst, ImmSrc>,
        );
    }
}
