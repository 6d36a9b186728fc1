//! `CpuState` ⇄ gdb's x86-64 register block (core + SSE).

use crate::arch::Regs;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use vmplay_hypervisor::CpuState;

/// gdb's order (rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15) as
/// indices into `CpuState::gpr` (encoding order).
const GDB_TO_GPR: [usize; 16] = [0, 3, 1, 2, 6, 7, 5, 4, 8, 9, 10, 11, 12, 13, 14, 15];

pub(crate) fn to_gdb(s: &CpuState, all: &mut Regs) {
    all.fs_base = s.fs.base;
    all.gs_base = s.gs.base;
    all.cr0 = s.cr0;
    all.cr2 = s.cr2;
    all.cr3 = s.cr3;
    all.cr4 = s.cr4;
    all.cr8 = s.cr8;
    all.efer = s.efer;
    core_to_gdb(s, &mut all.core);
}

fn core_to_gdb(s: &CpuState, r: &mut X86_64CoreRegs) {
    for (g, &i) in r.regs.iter_mut().zip(&GDB_TO_GPR) {
        *g = s.gpr[i];
    }
    r.rip = s.rip;
    r.eflags = s.rflags as u32;
    r.segments.cs = s.cs.selector.into();
    r.segments.ss = s.ss.selector.into();
    r.segments.ds = s.ds.selector.into();
    r.segments.es = s.es.selector.into();
    r.segments.fs = s.fs.selector.into();
    r.segments.gs = s.gs.selector.into();
    let f = &s.fpu;
    for (d, src) in r.st.iter_mut().zip(&f.st) {
        d.copy_from_slice(&src[..10]);
    }
    r.fpu.fctrl = f.fcw.into();
    r.fpu.fstat = f.fsw.into();
    // FXSAVE's abridged tags (1 = valid) as the full tag word (00 valid, 11 empty).
    r.fpu.ftag = (0..8)
        .map(|i| {
            if f.ftw & (1 << i) != 0 {
                0
            } else {
                3 << (2 * i)
            }
        })
        .sum();
    r.fpu.fioff = f.fip as u32;
    r.fpu.fiseg = (f.fip >> 32) as u32 & 0xffff;
    r.fpu.fooff = f.fdp as u32;
    r.fpu.foseg = (f.fdp >> 32) as u32 & 0xffff;
    r.fpu.fop = f.fop.into();
    r.xmm = f.xmm;
    r.mxcsr = f.mxcsr;
}

/// Applies gdb's registers over `s`. Segment selectors are not written:
/// a selector without its descriptor would desynchronise the hidden part.
/// The segment bases and system registers are written as given (a kernel
/// developer's business, as on QEMU).
pub(crate) fn from_gdb(all: &Regs, s: &mut CpuState) {
    s.fs.base = all.fs_base;
    s.gs.base = all.gs_base;
    s.cr0 = all.cr0;
    s.cr2 = all.cr2;
    s.cr3 = all.cr3;
    s.cr4 = all.cr4;
    s.cr8 = all.cr8;
    s.efer = all.efer;
    core_from_gdb(&all.core, s);
}

fn core_from_gdb(r: &X86_64CoreRegs, s: &mut CpuState) {
    for (g, &i) in r.regs.iter().zip(&GDB_TO_GPR) {
        s.gpr[i] = *g;
    }
    s.rip = r.rip;
    s.rflags = (s.rflags & !0xffff_ffff) | u64::from(r.eflags) | 2;
    let f = &mut s.fpu;
    for (d, src) in f.st.iter_mut().zip(&r.st) {
        d[..10].copy_from_slice(src);
    }
    f.fcw = r.fpu.fctrl as u16;
    f.fsw = r.fpu.fstat as u16;
    f.ftw = (0..8)
        .filter(|i| (r.fpu.ftag >> (2 * i)) & 3 != 3)
        .map(|i| 1u8 << i)
        .sum();
    f.fop = r.fpu.fop as u16;
    f.xmm = r.xmm;
    f.mxcsr = r.mxcsr;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_in_gdb_order() {
        let mut s = CpuState::reset();
        for (i, g) in s.gpr.iter_mut().enumerate() {
            *g = 0x1000 + i as u64;
        }
        s.rip = 0xffff_ffff_8100_0000;
        s.fpu.xmm[3] = 0x1234;
        s.fpu.ftw = 0b101;
        s.cr3 = 0x1000;
        s.gs.base = 0xffff_8880_0000_0000;
        let mut all = Regs::default();
        to_gdb(&s, &mut all);
        assert_eq!((all.cr3, all.gs_base), (0x1000, s.gs.base));
        let r = &all.core;
        assert_eq!(r.regs[1], 0x1003, "gdb's second register is rbx");
        assert_eq!(r.regs[7], 0x1004, "gdb's eighth register is rsp");
        assert_eq!(r.fpu.ftag, 0b1111_1111_1100_1100);
        let mut back = CpuState::reset();
        from_gdb(&all, &mut back);
        assert_eq!((back.cr3, back.gs.base), (0x1000, s.gs.base));
        assert_eq!(back.gpr, s.gpr);
        assert_eq!(
            (back.rip, back.fpu.xmm[3], back.fpu.ftw),
            (s.rip, 0x1234, 0b101)
        );
    }
}
