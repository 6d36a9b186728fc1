//! [`CpuState`] to and from KVM's `kvm_regs`, `kvm_sregs` and `kvm_fpu`.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vmplay_hypervisor::{CpuState, DescriptorTable, FpuState, Segment};

pub(crate) fn to_kvm_regs(s: &CpuState) -> kvm_regs {
    let g = &s.gpr;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: s.rip,
        rflags: s.rflags,
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn from_kvm_segment(k: &kvm_segment) -> Segment {
    Segment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        type_: k.type_,
        s: k.s != 0,
        dpl: k.dpl,
        present: k.present != 0,
        avl: k.avl != 0,
        l: k.l != 0,
        db: k.db != 0,
        g: k.g != 0,
        unusable: k.unusable != 0,
    }
}

fn to_kvm_dtable(t: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        padding: [0; 3],
    }
}

/// Loads `s` into `sregs`, which holds KVM's current values: the APIC base
/// and pending-interrupt bitmap are KVM's own and stay as they are.
pub(crate) fn fill_kvm_sregs(s: &CpuState, sregs: &mut kvm_sregs) {
    sregs.cs = to_kvm_segment(&s.cs);
    sregs.ds = to_kvm_segment(&s.ds);
    sregs.es = to_kvm_segment(&s.es);
    sregs.fs = to_kvm_segment(&s.fs);
    sregs.gs = to_kvm_segment(&s.gs);
    sregs.ss = to_kvm_segment(&s.ss);
    sregs.tr = to_kvm_segment(&s.tr);
    sregs.ldt = to_kvm_segment(&s.ldt);
    sregs.gdt = to_kvm_dtable(&s.gdt);
    sregs.idt = to_kvm_dtable(&s.idt);
    sregs.cr0 = s.cr0;
    sregs.cr2 = s.cr2;
    sregs.cr3 = s.cr3;
    sregs.cr4 = s.cr4;
    sregs.cr8 = s.cr8;
    sregs.efer = s.efer;
}

pub(crate) fn to_kvm_fpu(f: &FpuState) -> kvm_fpu {
    kvm_fpu {
        fpr: f.st,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftw,
        pad1: 0,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        xmm: f.xmm.map(u128::to_le_bytes),
        mxcsr: f.mxcsr,
        pad2: 0,
    }
}

/// Byte offsets in the XSAVE image (its first 512 bytes are the FXSAVE
/// layout, then the XSAVE header).
mod xsave {
    pub const FCW: usize = 0;
    pub const FSW: usize = 2;
    pub const FTW: usize = 4;
    pub const FOP: usize = 6;
    pub const FIP: usize = 8;
    pub const FDP: usize = 16;
    pub const MXCSR: usize = 24;
    pub const ST: usize = 32;
    pub const XMM: usize = 160;
    pub const XSTATE_BV: usize = 512;
    /// XSTATE_BV bits of the x87 and SSE components.
    pub const X87_SSE: u64 = 0b11;
}

fn region_bytes(region: &[u32; 1024]) -> [u8; 4096] {
    let mut bytes = [0; 4096];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(region) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

fn at<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    bytes[offset..offset + N]
        .try_into()
        .expect("offset inside the image")
}

/// Writes `f` into an XSAVE image from KVM_GET_XSAVE, marking the x87 and
/// SSE components as present so the guest gets them rather than their
/// init state. (KVM_SET_FPU cannot do this: it ignores MXCSR.)
pub(crate) fn fpu_to_xsave(f: &FpuState, region: &mut [u32; 1024]) {
    use xsave::*;
    let mut b = region_bytes(region);
    b[FCW..FCW + 2].copy_from_slice(&f.fcw.to_le_bytes());
    b[FSW..FSW + 2].copy_from_slice(&f.fsw.to_le_bytes());
    b[FTW] = f.ftw;
    b[FOP..FOP + 2].copy_from_slice(&f.fop.to_le_bytes());
    b[FIP..FIP + 8].copy_from_slice(&f.fip.to_le_bytes());
    b[FDP..FDP + 8].copy_from_slice(&f.fdp.to_le_bytes());
    b[MXCSR..MXCSR + 4].copy_from_slice(&f.mxcsr.to_le_bytes());
    for (i, st) in f.st.iter().enumerate() {
        b[ST + 16 * i..ST + 16 * (i + 1)].copy_from_slice(st);
    }
    for (i, xmm) in f.xmm.iter().enumerate() {
        b[XMM + 16 * i..XMM + 16 * (i + 1)].copy_from_slice(&xmm.to_le_bytes());
    }
    let bv = u64::from_le_bytes(at(&b, XSTATE_BV)) | X87_SSE;
    b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    for (word, chunk) in region.iter_mut().zip(b.chunks_exact(4)) {
        *word = u32::from_le_bytes(chunk.try_into().expect("4-byte chunk"));
    }
}

/// The x87/SSE state in an XSAVE image from KVM_GET_XSAVE (KVM has
/// already filled in init values for components the guest has not used).
pub(crate) fn fpu_from_xsave(region: &[u32; 1024]) -> FpuState {
    use xsave::*;
    let b = region_bytes(region);
    FpuState {
        fcw: u16::from_le_bytes(at(&b, FCW)),
        fsw: u16::from_le_bytes(at(&b, FSW)),
        ftw: b[FTW],
        fop: u16::from_le_bytes(at(&b, FOP)),
        fip: u64::from_le_bytes(at(&b, FIP)),
        fdp: u64::from_le_bytes(at(&b, FDP)),
        mxcsr: u32::from_le_bytes(at(&b, MXCSR)),
        st: std::array::from_fn(|i| at(&b, ST + 16 * i)),
        xmm: std::array::from_fn(|i| u128::from_le_bytes(at(&b, XMM + 16 * i))),
    }
}

pub(crate) fn from_kvm(regs: &kvm_regs, sregs: &kvm_sregs, fpu: &kvm_fpu) -> CpuState {
    CpuState {
        gpr: [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        rip: regs.rip,
        rflags: regs.rflags,
        cs: from_kvm_segment(&sregs.cs),
        ds: from_kvm_segment(&sregs.ds),
        es: from_kvm_segment(&sregs.es),
        fs: from_kvm_segment(&sregs.fs),
        gs: from_kvm_segment(&sregs.gs),
        ss: from_kvm_segment(&sregs.ss),
        tr: from_kvm_segment(&sregs.tr),
        ldt: from_kvm_segment(&sregs.ldt),
        gdt: DescriptorTable {
            base: sregs.gdt.base,
            limit: sregs.gdt.limit,
        },
        idt: DescriptorTable {
            base: sregs.idt.base,
            limit: sregs.idt.limit,
        },
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        cr8: sregs.cr8,
        efer: sregs.efer,
        fpu: FpuState {
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftw: fpu.ftwx,
            fop: fpu.last_opcode,
            fip: fpu.last_ip,
            fdp: fpu.last_dp,
            mxcsr: fpu.mxcsr,
            st: fpu.fpr,
            xmm: fpu.xmm.map(u128::from_le_bytes),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state where every field holds a distinct value, so a swapped or
    /// dropped field shows.
    fn busy_state() -> CpuState {
        let mut s = CpuState::reset();
        for (i, r) in s.gpr.iter_mut().enumerate() {
            *r = 0x0101_0101_0000_0000 * (i as u64 + 1) + i as u64;
        }
        s.rip = 0xdead_beef;
        s.rflags = 0x246;
        s.cs = Segment::flat(0x10, 0xb, true, false);
        s.ds = Segment::flat(0x18, 0x3, false, true);
        s.es = Segment {
            base: 0x1000,
            ..s.ds
        };
        s.fs = Segment {
            base: 0x7fff_0000_0000,
            avl: true,
            ..s.ds
        };
        s.gs = Segment { dpl: 3, ..s.ds };
        s.ss = Segment {
            selector: 0x20,
            ..s.ds
        };
        s.tr = Segment::tss(0x28, 0x580, 0x67);
        s.ldt = Segment::no_ldt();
        s.gdt = DescriptorTable {
            base: 0x500,
            limit: 0x2f,
        };
        s.idt = DescriptorTable {
            base: 0x520,
            limit: 0xfff,
        };
        s.cr0 = 0x8005_0033;
        s.cr2 = 0x1234;
        s.cr3 = 0x9000;
        s.cr4 = 0x6b0;
        s.cr8 = 0xf;
        s.efer = 0xd01;
        s.fpu.fsw = 0x3800;
        s.fpu.ftw = 0x81;
        s.fpu.mxcsr = 0x1fa0;
        s.fpu.fop = 0x7ff;
        s.fpu.fip = 0x4000;
        s.fpu.fdp = 0x5000;
        s.fpu.st[7] = [0xaa; 16];
        s.fpu.xmm[15] = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        s
    }

    #[test]
    fn state_survives_the_trip_through_kvm_structs() {
        let s = busy_state();
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        fill_kvm_sregs(&s, &mut sregs);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "KVM's APIC base kept");
        let back = from_kvm(&to_kvm_regs(&s), &sregs, &to_kvm_fpu(&s.fpu));
        assert_eq!(back, s);
    }

    #[test]
    fn fpu_state_survives_the_trip_through_an_xsave_image() {
        let f = busy_state().fpu;
        let mut region = [0u32; 1024];
        region[512 / 4] = 0b100; // AVX in use: kept
        region[1000] = 0xabcd; // other components: kept
        fpu_to_xsave(&f, &mut region);
        assert_eq!(fpu_from_xsave(&region), f);
        assert_eq!(region[512 / 4], 0b111, "x87 and SSE marked present");
        assert_eq!(region[1000], 0xabcd);
        assert_eq!(region[24 / 4], f.mxcsr, "MXCSR at byte 24");
    }

    #[test]
    fn gprs_go_to_their_named_kvm_fields() {
        let mut s = CpuState::default();
        s.gpr[CpuState::RBX] = 3;
        s.gpr[CpuState::RSP] = 4;
        s.gpr[15] = 15;
        let r = to_kvm_regs(&s);
        assert_eq!((r.rbx, r.rsp, r.r15, r.rax), (3, 4, 15, 0));
    }

    #[test]
    fn xmm_registers_are_little_endian_bytes() {
        let mut f = FpuState::default();
        f.xmm[0] = 0x0102;
        let k = to_kvm_fpu(&f);
        assert_eq!(&k.xmm[0][..3], &[0x02, 0x01, 0x00]);
        assert_eq!((k.fcw, k.mxcsr), (0x37f, 0x1f80));
    }
}
