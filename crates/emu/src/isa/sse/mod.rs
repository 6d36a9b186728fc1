//! MMX, SSE, SSE2 and SSE3: packed integer and float operations on the
//! MMX and XMM registers, MXCSR, FXSAVE/FXRSTOR. Float arithmetic is the
//! software IEEE engine in [`float`], exact in every MXCSR mode.
//!
//! Checks, in hardware order: #UD (CR0.EM, CR4.OSFXSR), #NM (CR0.TS),
//! #MF for instructions touching MMX registers with an x87 exception
//! pending, then memory faults (16-byte alignment #GP for legacy-SSE
//! 128-bit operands other than the unaligned moves), then SIMD float
//! exceptions (#XM, or #UD when CR4.OSXMMEXCPT is clear). Registers change
//! only once nothing can fault any more, except for what an #XM leaves on
//! hardware too: the MXCSR flags and the x87 → MMX transition.
//!
//! MMX and XMM share handlers through [`Space`]: packed integer operations
//! are written once over a `u128` and run on 8 or 16 bytes.

pub mod float;
mod fp;
mod int;
mod moves;
mod sse41;
mod sse42;
mod ssse3;
pub(crate) mod state;

use crate::cpu::fault::{Fault, Res, Stop};
use crate::cpu::fpu::F80;
use crate::cpu::width::W64;
use crate::cpu::{CR0_EM, CR0_NE, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, Cpu};
use crate::decode::{Insn, Table};
use crate::mem::access::via_seg;

/// FSW.ES: an unmasked x87 exception is pending.
const FSW_ES: u16 = 1 << 7;
/// FSW.TOP.
const FSW_TOP: u16 = 7 << 11;

/// Registers every handler of the family.
pub(crate) fn register(t: &mut Table) {
    moves::register(t);
    int::register(t);
    fp::register(t);
    state::register(t);
    ssse3::register(t);
    sse41::register(t);
    sse42::register(t);
}

#[cold]
fn sse_fault(cpu: &Cpu) -> Res {
    if cpu.cr0 & CR0_EM != 0 || cpu.cr4 & CR4_OSFXSR == 0 {
        Err(Fault::ud())
    } else {
        Err(Fault::nm())
    }
}

/// The #UD/#NM checks of an instruction on XMM registers or MXCSR.
#[inline(always)]
pub(crate) fn sse_ok(cpu: &Cpu) -> Res {
    if cpu.cr0 & (CR0_EM | CR0_TS) == 0 && cpu.cr4 & CR4_OSFXSR != 0 {
        return Ok(());
    }
    sse_fault(cpu)
}

#[cold]
fn mmx_fault(cpu: &Cpu) -> Res {
    if cpu.cr0 & CR0_EM != 0 {
        Err(Fault::ud())
    } else if cpu.cr0 & CR0_TS != 0 {
        Err(Fault::nm())
    } else if x87_pending(cpu) {
        Err(Fault::mf())
    } else {
        Ok(())
    }
}

/// An unmasked x87 exception waits to be reported as #MF (with CR0.NE
/// clear the report is the external FERR# line, which is not modelled).
#[inline(always)]
fn x87_pending(cpu: &Cpu) -> bool {
    cpu.fpu.fsw & FSW_ES != 0 && cpu.cr0 & CR0_NE != 0
}

/// The checks of an MMX instruction: #UD (CR0.EM), #NM (CR0.TS), #MF.
#[inline(always)]
pub(crate) fn mmx_ok(cpu: &Cpu) -> Res {
    if cpu.cr0 & (CR0_EM | CR0_TS) == 0 && cpu.fpu.fsw & FSW_ES == 0 {
        return Ok(());
    }
    mmx_fault(cpu)
}

/// The checks of an SSE instruction that reads or writes an MMX register
/// (cvtpi2ps, movq2dq…): SSE's, then a pending x87 exception.
#[inline(always)]
pub(crate) fn sse_mm_ok(cpu: &Cpu) -> Res {
    sse_ok(cpu)?;
    if x87_pending(cpu) {
        return Err(Fault::mf());
    }
    Ok(())
}

/// The fault for an unmasked SIMD float exception.
#[cold]
fn simd_fault(cpu: &Cpu) -> Stop {
    if cpu.cr4 & CR4_OSXMMEXCPT != 0 {
        Fault::xm()
    } else {
        Fault::ud()
    }
}

/// Adds an instruction's float flags to MXCSR, or faults (with the flags
/// the hardware leaves) when one of them is unmasked. Call before writing
/// the destination.
#[inline(always)]
pub(crate) fn raise(cpu: &mut Cpu, flags: u32) -> Res {
    if flags == 0 {
        return Ok(());
    }
    match float::settle(cpu.fpu.mxcsr, flags) {
        Ok(m) => {
            cpu.fpu.mxcsr = m;
            Ok(())
        }
        Err(m) => {
            cpu.fpu.mxcsr = m;
            Err(simd_fault(cpu))
        }
    }
}

/// Linear address of an `n`-byte memory operand, with the legacy-SSE
/// alignment rule (#GP(0) unless `n`-aligned) when `align`.
#[inline(always)]
fn operand_lin(cpu: &Cpu, i: &Insn, n: usize, write: bool, align: bool) -> Res<u64> {
    let (seg, off) = (usize::from(i.seg), cpu.ea(i));
    let lin = if write {
        cpu.lin_w(seg, off, n)?
    } else {
        cpu.lin_r(seg, off, n)?
    };
    if align && lin & (n as u64 - 1) != 0 {
        return Err(Fault::gp(0));
    }
    Ok(lin)
}

/// Reads the 128-bit memory operand (`ALIGN`: 16-byte alignment enforced).
#[inline(always)]
pub(crate) fn load128<const ALIGN: bool>(cpu: &mut Cpu, i: &Insn) -> Res<u128> {
    let lin = operand_lin(cpu, i, 16, false, ALIGN)?;
    let seg = usize::from(i.seg);
    let lo = cpu.read_lin_seg::<W64>(seg, lin)?;
    let hi = cpu.read_lin_seg::<W64>(seg, lin.wrapping_add(8) & cpu.lin_mask)?;
    Ok(u128::from(lo) | u128::from(hi) << 64)
}

/// Writes the 128-bit memory operand; both halves are checked writable
/// before either is written.
#[inline(always)]
pub(crate) fn store128<const ALIGN: bool>(cpu: &mut Cpu, i: &Insn, v: u128) -> Res {
    let lin = operand_lin(cpu, i, 16, true, ALIGN)?;
    let seg = usize::from(i.seg);
    if lin & 0xfff > 0xff0 {
        via_seg(seg, cpu.probe_write(lin, 16))?;
    }
    cpu.write_lin_seg::<W64>(seg, lin, v as u64)?;
    cpu.write_lin_seg::<W64>(seg, lin.wrapping_add(8) & cpu.lin_mask, (v >> 64) as u64)
}

/// A register file the packed integer operations run on: XMM (16 bytes)
/// or MMX (8 bytes, aliased on the x87 registers).
pub(crate) trait Space: 'static {
    /// Vector width in bytes.
    const BYTES: usize;
    /// The instruction-class checks (#UD/#NM/#MF).
    fn check(cpu: &Cpu) -> Res;
    fn get(cpu: &Cpu, r: u8) -> u128;
    /// Writes register `r` (the low `BYTES` of `v`).
    fn set(cpu: &mut Cpu, r: u8, v: u128);
    /// The full-width memory operand (16-byte aligned for XMM).
    fn load(cpu: &mut Cpu, i: &Insn) -> Res<u128>;
    /// The MMX transition ([`mmx_enter`]); nothing for XMM.
    fn enter(cpu: &mut Cpu);
}

/// The XMM registers.
pub(crate) struct Xmm;
/// The MMX registers.
pub(crate) struct Mm;

impl Space for Xmm {
    const BYTES: usize = 16;
    #[inline(always)]
    fn check(cpu: &Cpu) -> Res {
        sse_ok(cpu)
    }
    #[inline(always)]
    fn get(cpu: &Cpu, r: u8) -> u128 {
        cpu.fpu.xmm[usize::from(r & 15)]
    }
    #[inline(always)]
    fn set(cpu: &mut Cpu, r: u8, v: u128) {
        cpu.fpu.xmm[usize::from(r & 15)] = v;
    }
    #[inline(always)]
    fn load(cpu: &mut Cpu, i: &Insn) -> Res<u128> {
        load128::<true>(cpu, i)
    }
    #[inline(always)]
    fn enter(_: &mut Cpu) {}
}

/// MMX registers alias the x87 registers: `cpu.fpu.st` holds the physical
/// registers R0..R7 (see `isa::x87`), and MMi is the significand of Ri.
impl Space for Mm {
    const BYTES: usize = 8;
    #[inline(always)]
    fn check(cpu: &Cpu) -> Res {
        mmx_ok(cpu)
    }
    #[inline(always)]
    fn get(cpu: &Cpu, r: u8) -> u128 {
        u128::from(cpu.fpu.st[usize::from(r & 7)].signif)
    }
    /// The sign/exponent field becomes all ones, as hardware leaves it.
    #[inline(always)]
    fn set(cpu: &mut Cpu, r: u8, v: u128) {
        cpu.fpu.st[usize::from(r & 7)] = F80 {
            signif: v as u64,
            sign_exp: 0xffff,
        };
    }
    #[inline(always)]
    fn load(cpu: &mut Cpu, i: &Insn) -> Res<u128> {
        Ok(u128::from(cpu.read_mem::<W64>(i)?))
    }
    #[inline(always)]
    fn enter(cpu: &mut Cpu) {
        mmx_enter(cpu);
    }
}

/// The x87 → MMX transition of every instruction that touches an MMX
/// register (EMMS aside): TOP = 0 and every tag valid. Hardware makes it
/// after the memory operand is read (a #PF leaves the x87 state alone) but
/// before SIMD float exceptions (an #XM finds TOP = 0 and the tags valid).
#[inline(always)]
pub(crate) fn mmx_enter(cpu: &mut Cpu) {
    cpu.fpu.fsw &= !FSW_TOP;
    cpu.fpu.ftw = 0xff;
}

/// Operand 1 of a packed operation: register `r1` or the memory operand.
#[inline(always)]
pub(crate) fn src<S: Space, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res<u128> {
    if MEM {
        S::load(cpu, i)
    } else {
        Ok(S::get(cpu, i.r1))
    }
}

/// Registers `name` with the register and memory forms of
/// `h::<G.., MEM>` (`MEM` is the handler's last generic parameter).
macro_rules! rm {
    ($t:expr, $name:expr, $h:ident) => {
        $t.rm($crate::isa::c($name), $h::<false>, $h::<true>)
    };
    ($t:expr, $name:expr, $h:ident, [$($g:tt),*]) => {
        $t.rm($crate::isa::c($name), $h::<$($g,)* false>, $h::<$($g,)* true>)
    };
}
pub(crate) use rm;

#[cfg(test)]
mod tests;
