//! XSAVE, XRSTOR, XSAVEOPT (and their 64-bit forms), XGETBV, XSETBV for
//! the two state components emu has: x87 (XCR0 bit 0) and SSE (bit 1).
//!
//! The image is the standard (non-compacted) format: the 512-byte legacy
//! region laid out as FXSAVE's, then the 64-byte header at 512 whose
//! XSTATE_BV says which components the image holds; 576 bytes in all, as
//! CPUID leaf 0xD reports. XINUSE is taken as always 1 (allowed: a
//! component may count as in use in its initial configuration), so XSAVE
//! and XSAVEOPT store the same thing (XSAVEOPT's optimizations are
//! permitted, never required). XRSTOR of a component whose XSTATE_BV bit
//! is clear loads its initial configuration; MXCSR is loaded whenever the
//! SSE component is requested. Without CR4.OSXSAVE (which only the
//! default CPU model lets a guest set) every one of them raises #UD.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::fpu::F80;
use crate::cpu::{CR0_TS, Cpu};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::sse::state::{MXCSR_MASK, image_pointers, loaded_pointers, xmm_count};
use crate::mem::access::via_seg;

/// CR4.OSXSAVE.
pub(crate) const CR4_OSXSAVE: u64 = 1 << 18;
/// The state components emu supports (x87, SSE).
pub(crate) const XCR0_SUPPORTED: u64 = 3;
/// Legacy region + header.
pub(crate) const XSAVE_SIZE: u32 = 576;
const HEADER: u64 = 512;

/// XCR0 of this vCPU.
pub(crate) fn xcr0(cpu: &Cpu) -> u64 {
    1 | cpu.msr.xcr0_ext
}

#[inline(always)]
fn osxsave(cpu: &Cpu) -> Res {
    if cpu.cr4 & CR4_OSXSAVE == 0 {
        return Err(Fault::ud());
    }
    Ok(())
}

/// The checks of XSAVE/XRSTOR: #UD (CR4.OSXSAVE), #NM (CR0.TS), then the
/// operand: `n` bytes inside the segment, 64-byte aligned (#GP(0)).
fn operand(cpu: &mut Cpu, i: &Insn, write: bool) -> Res<(usize, u64)> {
    osxsave(cpu)?;
    if cpu.cr0 & CR0_TS != 0 {
        return Err(Fault::nm());
    }
    let (seg, off) = (usize::from(i.seg), cpu.ea(i));
    let n = XSAVE_SIZE as usize;
    let lin = if write {
        cpu.lin_w(seg, off, n)?
    } else {
        cpu.lin_r(seg, off, n)?
    };
    if lin & 63 != 0 {
        return Err(Fault::gp(0));
    }
    if write {
        via_seg(seg, cpu.probe_write(lin, n))?;
    }
    Ok((seg, off))
}

/// The requested-feature bitmap: XCR0 & EDX:EAX.
fn rfbm(cpu: &Cpu) -> u64 {
    xcr0(cpu) & ((cpu.gpr[2] & 0xffff_ffff) << 32 | (cpu.gpr[0] & 0xffff_ffff))
}

/// xsave/xsaveopt (`WIDE`: the 64-bit forms, 64-bit FIP/FDP).
fn xsave<const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (seg, off) = operand(cpu, i, true)?;
    let rfbm = rfbm(cpu);
    let n = xmm_count(cpu);
    let (ip, dp) = image_pointers(cpu, WIDE);
    let img = crate::isa::sse::state::fxsave_image(&cpu.fpu, ip, dp, n);
    let at = |k: usize| off.wrapping_add(k as u64);
    if rfbm & 1 != 0 {
        cpu.write_bytes(seg, off, &img[0..24])?;
        cpu.write_bytes(seg, at(32), &img[32..160])?;
    }
    if rfbm & 2 != 0 {
        cpu.write_bytes(seg, at(24), &img[24..32])?;
        cpu.write_bytes(seg, at(160), &img[160..160 + 16 * n])?;
    }
    let mut bv = [0u8; 8];
    cpu.read_bytes(seg, at(HEADER as usize), &mut bv)?;
    // XSTATE_BV[i] = XINUSE[i] (1) for every requested component.
    let bv = u64::from_le_bytes(bv) | rfbm;
    cpu.write_bytes(seg, at(HEADER as usize), &bv.to_le_bytes())
}

/// xrstor (`WIDE`: xrstor64).
fn xrstor<const WIDE: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (seg, off) = operand(cpu, i, false)?;
    let mut img = vec![0u8; XSAVE_SIZE as usize];
    cpu.read_bytes(seg, off, &mut img)?;
    let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    let h = HEADER as usize;
    let bv = u64_at(h);
    // Standard form only: XCOMP_BV and the next 8 bytes must be zero, and
    // XSTATE_BV may only name enabled components.
    if u64_at(h + 8) != 0 || u64_at(h + 16) != 0 || bv & !xcr0(cpu) != 0 {
        return Err(Fault::gp(0));
    }
    let rfbm = rfbm(cpu);
    let mxcsr = u32_at(24);
    if rfbm & 2 != 0 && mxcsr & !MXCSR_MASK != 0 {
        return Err(Fault::gp(0));
    }
    let n = xmm_count(cpu);
    let mut f = cpu.fpu;
    if rfbm & 1 != 0 {
        if bv & 1 != 0 {
            f.fcw = u16_at(0);
            f.fsw = u16_at(2);
            f.ftw = img[4];
            f.fop = u16_at(6);
            crate::isa::sse::state::settle_loaded_control(&mut f);
            (f.fip, f.fdp) = loaded_pointers(cpu, WIDE, u64_at(8), u64_at(16));
            let top = usize::from(f.fsw >> 11) & 7;
            for k in 0..8 {
                let mut r = [0u8; 16];
                r[..10].copy_from_slice(&img[32 + 16 * k..42 + 16 * k]);
                f.st[(top + k) & 7] = F80::from_bytes(&r);
            }
        } else {
            (f.fcw, f.fsw, f.ftw, f.fop, f.fip, f.fdp) = (0x37f, 0, 0, 0, 0, 0);
            f.st = [F80::default(); 8];
        }
    }
    if rfbm & 2 != 0 {
        f.mxcsr = mxcsr;
        for k in 0..n {
            f.xmm[k] = if bv & 2 != 0 {
                let mut r = [0u8; 16];
                r.copy_from_slice(&img[160 + 16 * k..176 + 16 * k]);
                u128::from_le_bytes(r)
            } else {
                0
            };
        }
    }
    cpu.fpu = f;
    Ok(())
}

/// xgetbv: EDX:EAX = XCR[ECX]; only XCR0 exists (XGETBV with ECX = 1 is
/// not advertised).
fn xgetbv(cpu: &mut Cpu, _: &Insn) -> Res {
    osxsave(cpu)?;
    if cpu.gpr[1] & 0xffff_ffff != 0 {
        return Err(Fault::gp(0));
    }
    let v = xcr0(cpu);
    cpu.gpr[0] = v & 0xffff_ffff;
    cpu.gpr[2] = v >> 32;
    Ok(())
}

/// xsetbv: XCR0 = EDX:EAX at CPL 0; x87 must stay on and nothing past
/// SSE can be turned on (#GP(0)).
fn xsetbv(cpu: &mut Cpu, _: &Insn) -> Res {
    osxsave(cpu)?;
    let v = (cpu.gpr[2] & 0xffff_ffff) << 32 | (cpu.gpr[0] & 0xffff_ffff);
    if cpu.cpl != 0 || cpu.gpr[1] & 0xffff_ffff != 0 || v & 1 == 0 || v & !XCR0_SUPPORTED != 0 {
        return Err(Fault::gp(0));
    }
    cpu.msr.xcr0_ext = v & !1;
    Ok(())
}

pub(crate) fn register(t: &mut Table) {
    t.add(c("Xsave_mem"), xsave::<false>);
    t.add(c("Xsave64_mem"), xsave::<true>);
    t.add(c("Xsaveopt_mem"), xsave::<false>);
    t.add(c("Xsaveopt64_mem"), xsave::<true>);
    t.add(c("Xrstor_mem"), xrstor::<false>);
    t.add(c("Xrstor64_mem"), xrstor::<true>);
    t.add(c("Xgetbv"), xgetbv);
    t.add_stop(c("Xsetbv"), xsetbv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::guest::{CODE, DATA, Guest};
    use iced_x86::code_asm::*;
    use vm_memory::{Bytes, GuestAddress};

    fn read(vm: &Guest, addr: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        vm.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn leaf_0xd_describes_the_standard_image_as_the_host_lays_it_out() {
        let m = crate::cpuid::CpuModel::Vmplay;
        assert_eq!(crate::cpuid::model_leaf(m, 1, 0, 0xd, 0), [3, 576, 576, 0]);
        assert_eq!(crate::cpuid::model_leaf(m, 1, 0, 0xd, 1), [1, 0, 0, 0]);
        assert_eq!(crate::cpuid::model_leaf(m, 1, 0, 1, 0)[2] >> 26 & 3, 1);
        let q = crate::cpuid::CpuModel::Qemu64;
        assert_eq!(crate::cpuid::model_leaf(q, 1, 0, 0xd, 0), [0; 4]);
        assert_eq!(crate::cpuid::model_leaf(q, 1, 0, 1, 0)[2] >> 26 & 1, 0);
        // The host's first extended component (AVX) starts right after
        // the legacy region and header: 576 bytes, as reported here.
        let host = core::arch::x86_64::__cpuid_count(0xd, 2);
        if host.eax != 0 {
            assert_eq!(host.ebx, XSAVE_SIZE);
        }
    }

    /// On this host, XSAVE of x87+SSE writes exactly FXSAVE's image in
    /// bytes 0..416, leaves 416..512 and the header past XSTATE_BV alone,
    /// and sets XSTATE_BV for components in use: the layout emu copies.
    #[test]
    fn the_hosts_xsave_legacy_region_is_its_fxsave_image() {
        if !std::arch::is_x86_feature_detected!("xsave") {
            return;
        }
        #[repr(align(64))]
        struct Buf([u8; 1024]);
        let mut fx = Buf([0x55; 1024]);
        let mut xs = Buf([0xaa; 1024]);
        // SAFETY: both buffers are 64-byte aligned and large enough; the
        // x87 stack is pushed and popped again, xmm0 is declared clobbered.
        unsafe {
            core::arch::asm!(
                "fld1",
                "pcmpeqd xmm0, xmm0",
                "fxsave64 [{fx}]",
                "xsave64 [{xs}]",
                "fstp st(0)",
                fx = in(reg) fx.0.as_mut_ptr(),
                xs = in(reg) xs.0.as_mut_ptr(),
                in("eax") 3,
                in("edx") 0,
                out("xmm0") _,
            );
        }
        assert_eq!(&xs.0[..416], &fx.0[..416]);
        assert_eq!(&xs.0[416..512], &[0xaa; 96][..]);
        assert_eq!(xs.0[512], 0xab);
        assert_eq!(&xs.0[513..576], &[0xaa; 63][..]);
    }

    /// Runs `f` (then hlt) at CODE in long mode with CR4.OSXSAVE as given.
    fn run(
        vm: &mut Guest,
        osxsave: bool,
        f: impl FnOnce(&mut CodeAssembler),
        prep: impl FnOnce(&mut vmplay_hypervisor::CpuState),
    ) -> crate::tests::guest::Outcome {
        vm.asm(64, CODE, |a| {
            f(a);
            a.hlt().unwrap();
        });
        let mut st = vm.long_mode(CODE);
        st.cr4 |= crate::cpu::CR4_OSFXSR;
        if osxsave {
            st.cr4 |= CR4_OSXSAVE;
        }
        prep(&mut st);
        vm.start(&st)
    }

    #[test]
    fn xgetbv_xsetbv_and_cpuid_follow_cr4_osxsave() {
        let mut vm = Guest::with_exception_stubs(1);
        let o = run(&mut vm, false, |a| a.xgetbv().unwrap(), |_| {});
        assert_eq!(o.vector, Some(6), "#UD without CR4.OSXSAVE");
        let o = run(&mut vm, true, |a| a.xgetbv().unwrap(), |s| s.gpr[1] = 0);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        assert_eq!(
            (o.state.gpr[0], o.state.gpr[2]),
            (1, 0),
            "XCR0 = x87 after reset"
        );
        let o = run(
            &mut vm,
            true,
            |a| {
                a.xsetbv().unwrap();
                a.xgetbv().unwrap();
                a.mov(esi, eax).unwrap();
                a.mov(eax, 1).unwrap();
                a.cpuid().unwrap();
            },
            |s| (s.gpr[0], s.gpr[1], s.gpr[2]) = (3, 0, 0),
        );
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        assert_eq!(o.state.gpr[6] & 0xffff_ffff, 3);
        assert_eq!(o.state.gpr[1] >> 26 & 3, 3, "XSAVE and OSXSAVE");
        for (lo, sel) in [(2, 0), (7, 0), (3, 1)] {
            let o = run(
                &mut vm,
                true,
                |a| a.xsetbv().unwrap(),
                |s| (s.gpr[0], s.gpr[1], s.gpr[2]) = (lo, sel, 0),
            );
            assert_eq!(o.vector, Some(13), "xsetbv eax={lo} ecx={sel}");
        }
        // mov cr4 sets OSXSAVE on this model.
        let o = run(
            &mut vm,
            false,
            |a| {
                a.mov(rax, cr4).unwrap();
                a.or(eax, 1 << 18).unwrap();
                a.mov(cr4, rax).unwrap();
                a.xgetbv().unwrap();
            },
            |s| s.gpr[1] = 0,
        );
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
    }

    fn fpu_sample(s: &mut vmplay_hypervisor::CpuState) {
        s.fpu.fcw = 0x027f;
        s.fpu.fsw = 0x3800;
        s.fpu.ftw = 0x81;
        s.fpu.mxcsr = 0x9fc0;
        for (k, x) in s.fpu.xmm.iter_mut().enumerate() {
            *x = 0x0101_0101_0101_0101_0101_0101_0101_0101u128 * (k as u128 + 1);
        }
        for (k, st) in s.fpu.st.iter_mut().enumerate() {
            st[7] = 0x80;
            st[0] = k as u8;
            st[8] = 0xff;
            st[9] = 0x3f;
        }
        // XCR0 = 3 is set by the code; EDX:EAX = 3 requests both.
        (s.gpr[0], s.gpr[1], s.gpr[2]) = (3, 0, 0);
    }

    #[test]
    fn xsave_writes_the_fxsave_layout_and_the_header_only() {
        let mut vm = Guest::with_exception_stubs(1);
        let (fx, xs) = (DATA, DATA + 0x1000);
        vm.write(xs, &[0xaa; 1024]);
        let o = run(
            &mut vm,
            true,
            |a| {
                a.xsetbv().unwrap();
                a.fxsave64(ptr(fx)).unwrap();
                a.xsave64(ptr(xs)).unwrap();
                a.mov(eax, 1).unwrap();
                a.xsaveopt64(ptr(xs + 0x308)).unwrap();
            },
            fpu_sample,
        );
        assert_eq!(o.vector, Some(13), "xsaveopt to a misaligned image: #GP");
        let want = read(&vm, fx, 416);
        let got = read(&vm, xs, 1024);
        assert_eq!(&got[..416], &want[..]);
        assert_eq!(&got[416..512], &[0xaa; 96][..], "reserved bytes untouched");
        // XSTATE_BV: bits 0 and 1 (requested, in use) set, others kept.
        assert_eq!(
            &got[512..520],
            &[0xab, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa]
        );
        assert_eq!(
            &got[520..],
            &[0xaa; 504][..],
            "XCOMP_BV and beyond untouched"
        );
    }

    #[test]
    fn xrstor_loads_requested_components_or_their_initial_state() {
        let mut vm = Guest::with_exception_stubs(1);
        let img = DATA + 0x2000;
        // An image with x87 only: XMM registers come back zero, MXCSR and
        // x87 from the image.
        let mut b = vec![0u8; 576];
        b[0..2].copy_from_slice(&0x0123u16.to_le_bytes()); // FCW
        b[24..28].copy_from_slice(&0x1f00u32.to_le_bytes()); // MXCSR
        b[160] = 0x55; // XMM0, ignored
        b[512] = 1; // XSTATE_BV = x87
        vm.write(img, &b);
        let o = run(
            &mut vm,
            true,
            |a| {
                a.xsetbv().unwrap();
                a.xrstor64(ptr(img)).unwrap();
            },
            fpu_sample,
        );
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        let f = &o.state.fpu;
        // FCW as FLDCW loads it (bit 6 reads 1), as the host does.
        assert_eq!((f.fcw, f.mxcsr), (0x0163, 0x1f00));
        assert!(f.xmm.iter().all(|&x| x == 0), "SSE in its initial state");
        // XSTATE_BV = 0, RFBM = x87: the x87 initial state; SSE untouched.
        b[512] = 0;
        vm.write(img, &b);
        let o = run(
            &mut vm,
            true,
            |a| {
                a.xsetbv().unwrap();
                a.mov(eax, 1).unwrap();
                a.xrstor64(ptr(img)).unwrap();
            },
            fpu_sample,
        );
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        let f = &o.state.fpu;
        assert_eq!((f.fcw, f.fsw, f.ftw, f.mxcsr), (0x37f, 0, 0, 0x9fc0));
        assert_eq!(f.xmm[3], 0x0404_0404_0404_0404_0404_0404_0404_0404);
        // A compacted or otherwise bad header: #GP.
        for (at, v) in [(520, 0x80u8), (527, 0x80), (530, 1), (512, 4)] {
            let mut bad = b.clone();
            bad[at] = v;
            vm.write(img, &bad);
            let o = run(
                &mut vm,
                true,
                |a| {
                    a.xsetbv().unwrap();
                    a.xrstor64(ptr(img)).unwrap();
                },
                fpu_sample,
            );
            assert_eq!(o.vector, Some(13), "header byte {at} = {v:#x}");
        }
        // XSAVE then XRSTOR round-trips the whole state.
        vm.write(img, &[0; 576]);
        let o = run(
            &mut vm,
            true,
            |a| {
                a.xsetbv().unwrap();
                a.xsave64(ptr(img)).unwrap();
                a.fninit().unwrap();
                a.pxor(xmm5, xmm5).unwrap();
                a.xrstor64(ptr(img)).unwrap();
            },
            fpu_sample,
        );
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        let mut want = vmplay_hypervisor::CpuState::default();
        fpu_sample(&mut want);
        assert_eq!(o.state.fpu.xmm, want.fpu.xmm);
        assert_eq!(o.state.fpu.fcw, want.fpu.fcw);
        assert_eq!(o.state.fpu.st, want.fpu.st);
    }
}
