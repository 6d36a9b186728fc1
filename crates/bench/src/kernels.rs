//! The three CPU loops of `emu-loops`, written once with code_asm and run
//! three ways: inside a guest under `vmplay --accel emu`, inside the same
//! guest under QEMU TCG, and natively from an executable buffer.
//!
//! Every loop is a SysV function `fn(data: *mut u8, n: u64) -> u64`: `data`
//! is a zeroed, 4 KiB-aligned area of [`DATA_SIZE`] bytes, `n` ≥ 1 the
//! iteration count. It touches only caller-saved registers and returns a
//! checksum of its work, so a guest can prove it computed the same thing
//! as the host. The set-up before the loop and the checksum after it run
//! once per call; the loop body runs `n` times and its dynamic instruction
//! count per iteration is counted from the emitted code, not written down.

use crate::BenchError;
use iced_x86::code_asm::*;

/// Bytes of data every loop may use.
pub const DATA_SIZE: u64 = 2 << 20;

/// Limbs per bignum operand: 32 × 64 bits, an RSA-2048 modulus.
const LIMBS: u32 = 32;
/// The memory loop's working set, in qwords (1 MiB).
const MEM_QWORDS: u32 = 1 << 17;
/// Qword stride between the memory loop's accesses: odd, so the walk
/// visits every qword of the working set, and > a cache line.
const MEM_STRIDE: i32 = 97;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoopKind {
    Int,
    Mem,
    Bignum,
}

impl LoopKind {
    pub const ALL: [LoopKind; 3] = [LoopKind::Int, LoopKind::Mem, LoopKind::Bignum];

    pub fn name(self) -> &'static str {
        match self {
            LoopKind::Int => "int",
            LoopKind::Mem => "mem",
            LoopKind::Bignum => "bignum",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            LoopKind::Int => "integer ALU mix: add/imul/xor/rol/lea/shr, cmp+adc, dec+jnz",
            LoopKind::Mem => {
                "memory walk: load/modify/store over 1 MiB at a 776-byte stride, byte load, push/pop"
            }
            LoopKind::Bignum => {
                "bignum: 32x32-limb schoolbook multiply-accumulate (mpihelp_addmul_1 shape: mul, add/adc)"
            }
        }
    }
}

/// A loop assembled for one address.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub code: Vec<u8>,
    /// Instructions executed per iteration of `n` (exact).
    pub insns_per_iter: u64,
}

/// Instructions emitted so far: the marks that count the loop bodies.
fn mark(a: &CodeAssembler) -> u64 {
    a.instructions().len() as u64
}

/// Emits loop `kind` as a function into a 64-bit assembler and returns
/// its instructions per iteration.
pub fn emit(kind: LoopKind, a: &mut CodeAssembler) -> Result<u64, IcedError> {
    match kind {
        LoopKind::Int => emit_int(a),
        LoopKind::Mem => emit_mem(a),
        LoopKind::Bignum => emit_bignum(a),
    }
}

/// Assembles `kind` to run at address `ip`.
pub fn assemble(kind: LoopKind, ip: u64) -> Result<Assembled, BenchError> {
    let mut a = CodeAssembler::new(64)?;
    let insns_per_iter = emit(kind, &mut a)?;
    let code = a.assemble(ip)?;
    Ok(Assembled {
        code,
        insns_per_iter,
    })
}

/// Integer loop: a dependent chain of ALU operations with flags consumed
/// by `adc`, the bread and butter of kernel code.
fn emit_int(a: &mut CodeAssembler) -> Result<u64, IcedError> {
    a.mov(rax, 1u64)?;
    a.mov(rdx, 0x9e37_79b9_7f4a_7c15u64)?;
    a.xor(r8d, r8d)?;
    a.mov(ecx, 12345)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    let start = mark(a);
    a.add(rax, rdx)?;
    a.imul_3(rcx, rax, 31)?;
    a.xor(rax, rcx)?;
    a.rol(rax, 13)?;
    a.sub(r8, rax)?;
    a.lea(rdx, qword_ptr(rdx + r8 * 2 + 7))?;
    a.shr(rcx, 3)?;
    a.add(r8, rcx)?;
    a.cmp(rax, rdx)?;
    a.adc(r8, 0)?;
    a.dec(rsi)?;
    a.jnz(top)?;
    let per_iter = mark(a) - start;
    a.xor(rax, rdx)?;
    a.xor(rax, r8)?;
    a.ret()?;
    Ok(per_iter)
}

/// Memory loop: read-modify-write of qwords spread over 1 MiB (so pages
/// and cache lines change all the time), a byte load, and stack traffic.
fn emit_mem(a: &mut CodeAssembler) -> Result<u64, IcedError> {
    a.xor(ecx, ecx)?;
    a.xor(eax, eax)?;
    a.mov(edx, 1)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    let start = mark(a);
    a.mov(r8, qword_ptr(rdi + rcx * 8))?;
    a.add(r8, rdx)?;
    a.mov(qword_ptr(rdi + rcx * 8), r8)?;
    a.xor(rax, r8)?;
    a.movzx(r9d, byte_ptr(rdi + rcx * 8 + 3))?;
    a.add(rdx, r9)?;
    a.push(r8)?;
    a.pop(r10)?;
    a.add(rdx, r10)?;
    a.lea(ecx, dword_ptr(rcx + MEM_STRIDE))?;
    a.and(ecx, (MEM_QWORDS - 1) as i32)?;
    a.dec(rsi)?;
    a.jnz(top)?;
    let per_iter = mark(a) - start;
    a.xor(rax, rdx)?;
    a.ret()?;
    Ok(per_iter)
}

/// Bignum loop: each iteration multiplies two 32-limb numbers into a
/// 64-limb accumulator, one `addmul_1` row per limb of the multiplier, the
/// way the kernel's MPI code does for the RSA self-test; then it perturbs
/// the multiplicand so iterations differ.
///
/// Layout in `data`: a[32] at 0, b[32] at 256, acc[64] at 512.
fn emit_bignum(a: &mut CodeAssembler) -> Result<u64, IcedError> {
    let limbs = LIMBS as i32;
    let b_off = 8 * limbs;
    let acc_off = 16 * limbs;
    // Fill a and b from a 64-bit LCG (Knuth's MMIX constants).
    a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
    a.mov(r8, 6_364_136_223_846_793_005u64)?;
    a.mov(r9, 1_442_695_040_888_963_407u64)?;
    a.xor(ecx, ecx)?;
    let mut fill = a.create_label();
    a.set_label(&mut fill)?;
    a.imul_2(rax, r8)?;
    a.add(rax, r9)?;
    a.mov(qword_ptr(rdi + rcx * 8), rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, 2 * limbs)?;
    a.jne(fill)?;

    let mut outer = a.create_label();
    let mut row = a.create_label();
    let mut inner = a.create_label();
    a.set_label(&mut outer)?;
    let outer_start = mark(a);
    a.xor(r9d, r9d)?; // j
    a.set_label(&mut row)?;
    let row_start = mark(a);
    a.mov(r11, qword_ptr(rdi + r9 * 8 + b_off))?; // v = b[j]
    a.lea(r8, qword_ptr(rdi + r9 * 8 + acc_off))?; // &acc[j]
    a.xor(r10d, r10d)?; // carry limb
    a.xor(ecx, ecx)?; // i
    a.set_label(&mut inner)?;
    let inner_start = mark(a);
    a.mov(rax, qword_ptr(rdi + rcx * 8))?;
    a.mul(r11)?;
    a.add(rax, r10)?;
    a.adc(rdx, 0)?;
    a.add(qword_ptr(r8 + rcx * 8), rax)?;
    a.adc(rdx, 0)?;
    a.mov(r10, rdx)?;
    a.inc(ecx)?;
    a.cmp(ecx, limbs)?;
    a.jne(inner)?;
    let inner_end = mark(a);
    a.add(qword_ptr(r8 + b_off), r10)?; // acc[j + LIMBS] += carry
    a.inc(r9d)?;
    a.cmp(r9d, limbs)?;
    a.jne(row)?;
    let row_end = mark(a);
    a.mov(rax, qword_ptr(rdi + acc_off + 8 * 7))?;
    a.xor(qword_ptr(rdi), rax)?; // a[0] ^= acc[7]
    a.dec(rsi)?;
    a.jnz(outer)?;
    let outer_end = mark(a);

    // Checksum: xor-rotate of the accumulator.
    a.xor(eax, eax)?;
    a.xor(ecx, ecx)?;
    let mut sum = a.create_label();
    a.set_label(&mut sum)?;
    a.rol(rax, 7)?;
    a.xor(rax, qword_ptr(rdi + rcx * 8 + acc_off))?;
    a.inc(ecx)?;
    a.cmp(ecx, 2 * limbs)?;
    a.jne(sum)?;
    a.ret()?;

    let inner_insns = inner_end - inner_start;
    let row_insns = (inner_start - row_start) + (row_end - inner_end);
    let outer_insns = (row_start - outer_start) + (outer_end - row_end);
    let limbs = u64::from(LIMBS);
    Ok(outer_insns + limbs * (row_insns + limbs * inner_insns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_iteration_counts_follow_the_emitted_bodies() {
        assert_eq!(assemble(LoopKind::Int, 0).unwrap().insns_per_iter, 12);
        assert_eq!(assemble(LoopKind::Mem, 0).unwrap().insns_per_iter, 13);
        // 5 outer + 32 rows × (8 + 32 × 10).
        assert_eq!(
            assemble(LoopKind::Bignum, 0).unwrap().insns_per_iter,
            5 + 32 * (8 + 32 * 10)
        );
    }
}
