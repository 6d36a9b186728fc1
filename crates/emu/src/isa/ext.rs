//! General-purpose extensions outside BMI: MOVBE (and, as they land,
//! CRC32, RDRAND/RDSEED, FSGSBASE). Each form raises #UD on a CPU model
//! that does not advertise its set (qemu64), as such a CPU does.

use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::bmi::modern;
use crate::isa::c;

/// The low `W::BYTES` bytes of `v` in reverse order.
#[inline(always)]
fn swap<W: Width>(v: u64) -> u64 {
    v.swap_bytes() >> (64 - W::BITS)
}

/// movbe r, m: load with the bytes reversed (16-bit: the low word only).
fn movbe_load<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    let v = cpu.read_mem::<W>(i)?;
    W::set(&mut cpu.gpr, i.r0, swap::<W>(v));
    Ok(())
}

/// movbe m, r: store with the bytes reversed.
fn movbe_store<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    let v = W::get(&cpu.gpr, i.r1);
    cpu.write_mem::<W>(i, swap::<W>(v))
}

pub(crate) fn register(t: &mut Table) {
    t.add(c("Movbe_r16_m16"), movbe_load::<W16>);
    t.add(c("Movbe_r32_m32"), movbe_load::<W32>);
    t.add(c("Movbe_r64_m64"), movbe_load::<W64>);
    t.add(c("Movbe_m16_r16"), movbe_store::<W16>);
    t.add(c("Movbe_m32_r32"), movbe_store::<W32>);
    t.add(c("Movbe_m64_r64"), movbe_store::<W64>);
}
