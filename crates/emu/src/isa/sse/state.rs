//! MXCSR loads and stores, FXSAVE/FXRSTOR and EMMS.
//!
//! The FXSAVE image is laid out as the host CPU writes it: in 64-bit mode
//! bytes 0..416 (XMM0-15) are written, reserved bytes as zero, and bytes
//! 416..512 are left alone; outside 64-bit mode only XMM0-7 are written
//! (0..288). `fxsave64` stores 64-bit FIP/FDP; the legacy form stores
//! 32-bit offsets with FCS/FDS, which outside 64-bit mode the x87 family
//! keeps in bits 32..47 of `fip`/`fdp` (in 64-bit mode FCS is the current
//! CS and FDS 0, as FSTENV writes them).

use super::{mmx_ok, sse_ok};
use crate::cpu::fault::{Fault, Res};
use crate::cpu::fpu::{F80, Fpu};
use crate::cpu::width::W32;
use crate::cpu::{CR0_EM, CR0_TS, CS, Cpu, Mode};
use crate::decode::{Insn, Table};
use crate::isa::c;

/// The MXCSR bits this CPU implements (DAZ included), as FXSAVE reports.
pub const MXCSR_MASK: u32 = 0xffff;

/// `ldmxcsr m32`: #GP(0) when a reserved bit is set.
fn ldmxcsr(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = cpu.read_mem::<W32>(i)? as u32;
    if v & !MXCSR_MASK != 0 {
        return Err(Fault::gp(0));
    }
    cpu.fpu.mxcsr = v;
    Ok(())
}

fn stmxcsr(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = u64::from(cpu.fpu.mxcsr);
    cpu.write_mem::<W32>(i, v)
}

/// `emms`: every x87 tag empty and TOP = 0.
fn emms(cpu: &mut Cpu, _: &Insn) -> Res {
    mmx_ok(cpu)?;
    cpu.fpu.ftw = 0;
    cpu.fpu.fsw &= !(7 << 11);
    Ok(())
}

/// How many XMM registers FXSAVE/FXRSTOR move in the current mode.
pub(crate) fn xmm_count(cpu: &Cpu) -> usize {
    if cpu.mode == Mode::Long { 16 } else { 8 }
}

/// The FIP and FDP fields of the image (bytes 8..16 and 16..24).
pub(crate) fn image_pointers(cpu: &Cpu, wide: bool) -> (u64, u64) {
    const SEL_OFF: u64 = 0xffff_ffff_ffff;
    let f = &cpu.fpu;
    if wide {
        (f.fip, f.fdp)
    } else if cpu.mode == Mode::Long {
        let cs = u64::from(cpu.seg[CS].sel);
        ((f.fip & 0xffff_ffff) | cs << 32, f.fdp & 0xffff_ffff)
    } else {
        (f.fip & SEL_OFF, f.fdp & SEL_OFF)
    }
}

/// FIP and FDP from the image's fields.
pub(crate) fn loaded_pointers(cpu: &Cpu, wide: bool, ip: u64, dp: u64) -> (u64, u64) {
    if wide {
        (ip, dp)
    } else if cpu.mode == Mode::Long {
        (ip & 0xffff_ffff, dp & 0xffff_ffff)
    } else {
        (ip & 0xffff_ffff_ffff, dp & 0xffff_ffff_ffff)
    }
}

/// The first `160 + 16 × xmm` bytes of the FXSAVE image of `f`, with the
/// FIP/FDP fields `ip`/`dp`.
pub(crate) fn fxsave_image(f: &Fpu, ip: u64, dp: u64, xmm: usize) -> Vec<u8> {
    let mut b = vec![0u8; 160 + 16 * xmm];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftw;
    b[6..8].copy_from_slice(&f.fop.to_le_bytes());
    b[8..16].copy_from_slice(&ip.to_le_bytes());
    b[16..24].copy_from_slice(&dp.to_le_bytes());
    b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    // The image holds ST(0)..ST(7); `st` holds the physical registers.
    let top = usize::from(f.fsw >> 11) & 7;
    for k in 0..8 {
        let st = f.st[(top + k) & 7];
        b[32 + 16 * k..32 + 16 * k + 10].copy_from_slice(&st.to_bytes()[..10]);
    }
    for (k, x) in f.xmm.iter().take(xmm).enumerate() {
        b[160 + 16 * k..176 + 16 * k].copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// What loading FCW/FSW/FOP from an image (FXRSTOR, XRSTOR) does, as
/// FLDENV: FCW's reserved bits read 0 (bit 6 reads 1), FOP has 11 bits,
/// and ES/B follow the loaded exceptions and masks (the difftest's host
/// does all three).
pub(crate) fn settle_loaded_control(f: &mut Fpu) {
    f.fcw = (f.fcw & 0x1f3f) | 0x40;
    f.fop &= 0x7ff;
    f.update_es();
}

/// Loads an FXSAVE image (as long as [`fxsave_image`] makes it) into `f`,
/// but for FIP/FDP, whose fields it returns. `Err` (and `f` untouched)
/// when the image's MXCSR has reserved bits set.
pub(crate) fn fxrstor_image(f: &mut Fpu, b: &[u8], xmm: usize) -> Result<(u64, u64), ()> {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    let mxcsr = u32_at(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(());
    }
    f.fcw = u16_at(0);
    f.fsw = u16_at(2);
    f.ftw = b[4];
    f.fop = u16_at(6);
    settle_loaded_control(f);
    f.mxcsr = mxcsr;
    let top = usize::from(f.fsw >> 11) & 7;
    for k in 0..8 {
        let mut r = [0u8; 16];
        r[..10].copy_from_slice(&b[32 + 16 * k..42 + 16 * k]);
        f.st[(top + k) & 7] = F80::from_bytes(&r);
    }
    for k in 0..xmm {
        let mut r = [0u8; 16];
        r.copy_from_slice(&b[160 + 16 * k..176 + 16 * k]);
        f.xmm[k] = u128::from_le_bytes(r);
    }
    Ok((u64_at(8), u64_at(16)))
}

/// FXSAVE/FXRSTOR raise #NM for CR0.EM as well as CR0.TS.
fn fx_check(cpu: &Cpu) -> Res {
    if cpu.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

/// Segment and offset of the m512 operand: all 512 bytes inside the
/// segment, 16-byte aligned.
fn fx_operand(cpu: &Cpu, i: &Insn, write: bool) -> Res<(usize, u64)> {
    let (seg, off) = (usize::from(i.seg), cpu.ea(i));
    let lin = if write {
        cpu.lin_w(seg, off, 512)?
    } else {
        cpu.lin_r(seg, off, 512)?
    };
    if lin & 15 != 0 {
        return Err(Fault::gp(0));
    }
    Ok((seg, off))
}

fn fxsave<const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    fx_check(cpu)?;
    let (seg, off) = fx_operand(cpu, i, true)?;
    let (ip, dp) = image_pointers(cpu, WIDE);
    let img = fxsave_image(&cpu.fpu, ip, dp, xmm_count(cpu));
    cpu.write_bytes(seg, off, &img)
}

fn fxrstor<const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    fx_check(cpu)?;
    let (seg, off) = fx_operand(cpu, i, false)?;
    let n = xmm_count(cpu);
    let mut img = vec![0u8; 160 + 16 * n];
    cpu.read_bytes(seg, off, &mut img)?;
    let mut f = cpu.fpu;
    let (ip, dp) = fxrstor_image(&mut f, &img, n).map_err(|()| Fault::gp(0))?;
    (f.fip, f.fdp) = loaded_pointers(cpu, WIDE, ip, dp);
    cpu.fpu = f;
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    t.add(c("Ldmxcsr_m32"), ldmxcsr);
    t.add(c("Stmxcsr_m32"), stmxcsr);
    t.add(c("Emms"), emms);
    t.add(c("Fxsave_m512byte"), fxsave::<false>);
    t.add(c("Fxsave64_m512byte"), fxsave::<true>);
    t.add(c("Fxrstor_m512byte"), fxrstor::<false>);
    t.add(c("Fxrstor64_m512byte"), fxrstor::<true>);
    // The alternative encodings of the fences (modrm.rm ≠ 0), unless the
    // core already has them.
    let alternatives = ["E9", "EA", "EB", "EC", "ED", "EE", "EF"]
        .map(|s| format!("Lfence_{s}"))
        .into_iter()
        .chain(["F1", "F2", "F3", "F4", "F5", "F6", "F7"].map(|s| format!("Mfence_{s}")))
        .chain(["F9", "FA", "FB", "FC", "FD", "FE", "FF"].map(|s| format!("Sfence_{s}")));
    for name in alternatives {
        let code = c(&name);
        if !t.has(code) {
            t.add(code, fence);
        }
    }
}

fn fence(_: &mut Cpu, _: &Insn) -> Res {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Fpu {
        let mut f = Fpu {
            fcw: 0x027f,
            fsw: 0x3800 | 0x41,
            ftw: 0x81,
            fop: 0x5d9,
            fip: 0x0000_0010_1234_5678,
            fdp: 0xffff_8000_0000_1000,
            mxcsr: 0x9fc0,
            ..Fpu::default()
        };
        for (k, st) in f.st.iter_mut().enumerate() {
            *st = F80 {
                signif: 0x8000_0000_0000_0000 | k as u64,
                sign_exp: 0x3fff + k as u16,
            };
        }
        for (k, x) in f.xmm.iter_mut().enumerate() {
            *x = 0x0101_0101_0101_0101_0101_0101_0101_0101u128 * (k as u128 + 1);
        }
        f
    }

    #[test]
    fn fxsave64_image_has_the_hardware_layout() {
        let f = sample();
        let b = fxsave_image(&f, f.fip, f.fdp, 16);
        assert_eq!(b.len(), 416);
        assert_eq!(&b[0..8], &[0x7f, 0x02, 0x41, 0x38, 0x81, 0, 0xd9, 0x05]);
        assert_eq!(&b[8..16], &0x0000_0010_1234_5678u64.to_le_bytes());
        assert_eq!(&b[16..24], &0xffff_8000_0000_1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &[0xc0, 0x9f, 0, 0, 0xff, 0xff, 0, 0]);
        // ST(2) is physical register (TOP=7) + 2 = R1: 10 bytes of value,
        // then 6 reserved zero bytes.
        assert_eq!(&b[64..74], &[1, 0, 0, 0, 0, 0, 0, 0x80, 0x00, 0x40]);
        assert_eq!(&b[74..80], &[0; 6]);
        assert_eq!(&b[160 + 16 * 15..416], &[16; 16]);
        assert_eq!(fxsave_image(&f, 0, 0, 8).len(), 288, "XMM0-7 only");
    }

    #[test]
    fn fxrstor_round_trips_fxsave() {
        let f = sample();
        for n in [16, 8] {
            let img = fxsave_image(&f, 0x1234, 0x5678, n);
            let mut g = Fpu::default();
            assert_eq!(fxrstor_image(&mut g, &img, n), Ok((0x1234, 0x5678)));
            let mut want = f;
            (want.fip, want.fdp) = (g.fip, g.fdp); // returned, not loaded
            want.xmm[n..].copy_from_slice(&Fpu::default().xmm[n..]);
            assert_eq!(g, want, "{n} XMM registers");
        }
    }

    #[test]
    fn fxrstor_rejects_reserved_mxcsr_bits() {
        let mut img = fxsave_image(&sample(), 0, 0, 16);
        img[26] = 1; // MXCSR bit 16
        let mut g = Fpu::default();
        assert_eq!(fxrstor_image(&mut g, &img, 16), Err(()));
        assert_eq!(g, Fpu::default(), "nothing loaded");
    }
}
