//! Guest-level tests of the family: code assembled with iced, run through
//! the seam, state and memory read back.

use iced_x86::code_asm::*;
use vmplay_hypervisor::CpuState;

use crate::tests::guest::*;

const DATA: u64 = 0x20_0000;
const HANDLERS: u64 = 0x30_0000;
const NO_FAULT: u64 = 0xdead;

/// A 64-bit guest whose exception handlers 0..=19 put their vector in r13
/// and halt; r13 starts as [`NO_FAULT`].
fn guest(code: impl FnOnce(&mut CodeAssembler)) -> (Guest, CpuState) {
    let g = Guest::new(1);
    let mut s = g.long_mode(CODE);
    for v in 0..20u8 {
        let at = HANDLERS + 16 * u64::from(v);
        g.code(64, at, |a| {
            a.mov(r13d, u32::from(v)).unwrap();
            a.hlt().unwrap();
        });
        g.idt64(v, at, 0);
    }
    g.code(64, CODE, |a| {
        code(a);
        a.hlt().unwrap();
    });
    s.gpr[13] = NO_FAULT;
    (g, s)
}

fn run(mut g: Guest, s: &CpuState) -> (Guest, CpuState) {
    g.vcpu.set_state(s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    let out = g.state();
    (g, out)
}

fn f32s(v: [f32; 4]) -> u128 {
    v.iter()
        .enumerate()
        .fold(0, |r, (k, x)| r | u128::from(x.to_bits()) << (32 * k))
}

fn write128(g: &Guest, at: u64, v: u128) {
    g.write(at, &v.to_le_bytes());
}

fn read128(g: &Guest, at: u64) -> u128 {
    u128::from(g.read_u64(at)) | u128::from(g.read_u64(at + 8)) << 64
}

#[test]
fn packed_float_arithmetic_runs_in_a_guest() {
    let (g, mut s) = guest(|a| {
        a.mov(rax, DATA).unwrap();
        a.movaps(xmm0, xmmword_ptr(rax)).unwrap();
        a.addps(xmm0, xmm1).unwrap();
        a.mulps(xmm0, xmmword_ptr(rax + 16)).unwrap();
        a.sqrtps(xmm2, xmm0).unwrap();
        a.movups(xmmword_ptr(rax + 33), xmm2).unwrap();
    });
    write128(&g, DATA, f32s([1.0, 2.0, 3.0, 4.0]));
    write128(&g, DATA + 16, f32s([2.0, 0.5, 1.0, 4.0]));
    s.fpu.xmm[1] = f32s([1.0, 6.0, 1.0, 12.0]);
    let (g, out) = run(g, &s);
    assert_eq!(out.gpr[13], NO_FAULT);
    assert_eq!(out.fpu.xmm[0], f32s([4.0, 4.0, 4.0, 64.0]));
    assert_eq!(out.fpu.xmm[2], f32s([2.0, 2.0, 2.0, 8.0]));
    assert_eq!(read128(&g, DATA + 33), f32s([2.0, 2.0, 2.0, 8.0]));
    assert_eq!(out.fpu.mxcsr, 0x1f80, "exact results raise nothing");
}

#[test]
fn misaligned_movaps_raises_gp_but_movups_does_not() {
    let (g, s) = guest(|a| {
        a.mov(rax, DATA + 8).unwrap();
        a.movups(xmm0, xmmword_ptr(rax)).unwrap();
        a.movaps(xmm1, xmmword_ptr(rax)).unwrap();
    });
    write128(&g, DATA + 8, 0x1234);
    let (g, out) = run(g, &s);
    assert_eq!(out.gpr[13], 13);
    assert_eq!(out.fpu.xmm[0], 0x1234);
    assert_eq!(out.fpu.xmm[1], 0, "the faulting load wrote nothing");
    assert_eq!(g.read_u64(out.gpr[4]), 0, "error code 0");
}

#[test]
fn sse_needs_osfxsr_and_a_clear_cr0_em_and_ts() {
    let code = |a: &mut CodeAssembler| a.xorps(xmm0, xmm0).unwrap();
    for (what, cr0_set, cr4_clear, vector) in [
        ("CR4.OSFXSR clear", 0, 0x200, 6),
        ("CR0.EM set", 0x4, 0, 6),
        ("CR0.TS set", 0x8, 0, 7),
    ] {
        let (g, mut s) = guest(code);
        s.cr0 |= cr0_set;
        s.cr4 &= !cr4_clear;
        s.fpu.xmm[0] = 5;
        let (_, out) = run(g, &s);
        assert_eq!(out.gpr[13], vector, "{what}");
        assert_eq!(out.fpu.xmm[0], 5, "{what}");
    }
}

#[test]
fn unmasked_simd_exception_raises_xm_and_leaves_the_destination() {
    for (osxmmexcpt, vector) in [(true, 19), (false, 6)] {
        let (g, mut s) = guest(|a| a.divss(xmm0, xmm1).unwrap());
        s.fpu.xmm[0] = f32s([1.0, 0.0, 0.0, 0.0]);
        s.fpu.xmm[1] = 0; // divide by zero
        s.fpu.mxcsr = 0x1f80 & !(0x4 << 7); // ZE unmasked
        if osxmmexcpt {
            s.cr4 |= 0x400;
        }
        let (_, out) = run(g, &s);
        assert_eq!(out.gpr[13], vector);
        assert_eq!(out.fpu.xmm[0], f32s([1.0, 0.0, 0.0, 0.0]));
        assert_eq!(out.fpu.mxcsr, 0x1d80 | 0x4, "ZE recorded");
    }
}

#[test]
fn masked_exceptions_set_sticky_flags_and_honour_rounding() {
    let (g, mut s) = guest(|a| {
        a.divss(xmm0, xmm1).unwrap();
        a.cvtss2si(eax, xmm0).unwrap();
        a.cvttss2si(ecx, xmm0).unwrap();
    });
    s.fpu.xmm[0] = u128::from(2.0f32.to_bits());
    s.fpu.xmm[1] = u128::from(3.0f32.to_bits());
    s.fpu.mxcsr = 0x1f80 | 2 << 13; // round up
    let (_, out) = run(g, &s);
    assert_eq!(out.fpu.xmm[0] as u32, 0x3f2a_aaab, "2/3 rounded up");
    assert_eq!((out.gpr[0], out.gpr[1]), (1, 0));
    assert_eq!(out.fpu.mxcsr, 0x5f80 | 0x20, "PE");
}

#[test]
fn comiss_sets_zf_pf_cf_for_branches() {
    let (g, mut s) = guest(|a| {
        a.comiss(xmm0, xmm1).unwrap();
        a.setb(al).unwrap();
        a.ucomiss(xmm0, xmm2).unwrap();
        a.setp(bl).unwrap();
        a.comiss(xmm1, xmm1).unwrap();
        a.sete(cl).unwrap();
    });
    s.fpu.xmm[0] = u128::from(1.0f32.to_bits());
    s.fpu.xmm[1] = u128::from(2.0f32.to_bits());
    s.fpu.xmm[2] = 0x7fc0_0000; // QNaN: ucomiss stays quiet
    let (_, out) = run(g, &s);
    assert_eq!(
        (out.gpr[0] & 0xff, out.gpr[3] & 0xff, out.gpr[1] & 0xff),
        (1, 1, 1)
    );
    assert_eq!(out.fpu.mxcsr, 0x1f80);
}

#[test]
fn ldmxcsr_rejects_reserved_bits() {
    let (g, s) = guest(|a| {
        a.mov(rax, DATA).unwrap();
        a.ldmxcsr(dword_ptr(rax)).unwrap();
        a.stmxcsr(dword_ptr(rax + 4)).unwrap();
        a.ldmxcsr(dword_ptr(rax + 8)).unwrap();
    });
    g.write(DATA, &0x7f80u32.to_le_bytes());
    g.write(DATA + 8, &0x1_1f80u32.to_le_bytes());
    let (g, out) = run(g, &s);
    assert_eq!(g.read_u64(DATA + 4) as u32, 0x7f80);
    assert_eq!(out.gpr[13], 13);
    assert_eq!(out.fpu.mxcsr, 0x7f80);
}

#[test]
fn mmx_instructions_enter_mmx_state_and_emms_leaves_it() {
    let (g, mut s) = guest(|a| {
        a.mov(rax, DATA).unwrap();
        a.movq(mm0, qword_ptr(rax)).unwrap();
        a.movq(mm1, qword_ptr(rax + 8)).unwrap();
        a.paddusb(mm0, mm1).unwrap();
        a.movd(ecx, mm0).unwrap();
        a.pmovmskb(edx, mm0).unwrap();
    });
    g.write(DATA, &0x80ff_0102_0304_0506u64.to_le_bytes());
    g.write(DATA + 8, &0x0101_0101_0101_0101u64.to_le_bytes());
    s.fpu.fsw = 3 << 11; // TOP = 3
    s.fpu.ftw = 0x01;
    let (_, out) = run(g, &s);
    assert_eq!(out.gpr[1], 0x0405_0607, "movd takes the low dword");
    assert_eq!(out.gpr[2], 0xc0);
    assert_eq!(out.fpu.fsw >> 11 & 7, 0, "TOP = 0");
    assert_eq!(out.fpu.ftw, 0xff);
    assert_eq!(
        &out.fpu.st[0][..10],
        &[7, 6, 5, 4, 3, 2, 0xff, 0x81, 0xff, 0xff]
    );

    let (g, s2) = guest(|a| a.emms().unwrap());
    let mut fpu = out.fpu;
    fpu.fsw |= 5 << 11;
    let (_, out2) = run(g, &CpuState { fpu, ..s2 });
    assert_eq!(out2.fpu.ftw, 0);
    assert_eq!(out2.fpu.fsw >> 11 & 7, 0, "emms also resets TOP");
}

#[test]
fn the_mmx_transition_precedes_xm_but_not_a_page_fault() {
    // cvtpd2pi with an unmasked invalid operation: #XM, yet TOP = 0 and
    // every tag valid, as the host CPU leaves them.
    let (g, mut s) = guest(|a| a.cvtpd2pi(mm0, xmm1).unwrap());
    s.cr4 |= 0x400;
    s.fpu.mxcsr = 0x1f80 & !(1 << 7);
    s.fpu.xmm[1] = u128::from(f64::NAN.to_bits());
    s.fpu.fsw = 3 << 11;
    s.fpu.ftw = 0x08;
    let (_, out) = run(g, &s);
    assert_eq!(out.gpr[13], 19);
    assert_eq!((out.fpu.fsw >> 11 & 7, out.fpu.ftw), (0, 0xff));
    assert_eq!(out.fpu.mxcsr & 0x3f, 1, "IE");

    // movq mm0, [unmapped]: #PF first, x87 state untouched.
    let (g, mut s) = guest(|a| {
        a.mov(rax, 0x40_0000u64).unwrap();
        a.movq(mm0, qword_ptr(rax)).unwrap();
    });
    g.write_u64(PML4 + 0x2000 + 2 * 8, 0);
    s.fpu.fsw = 3 << 11;
    s.fpu.ftw = 0x08;
    let (_, out) = run(g, &s);
    assert_eq!(out.gpr[13], 14);
    assert_eq!((out.fpu.fsw >> 11 & 7, out.fpu.ftw), (3, 0x08));
}

#[test]
fn fxsave64_and_fxrstor64_round_trip_the_state() {
    let (g, mut s) = guest(|a| {
        a.mov(rax, DATA).unwrap();
        a.fxsave64(ptr(rax)).unwrap();
        a.xorps(xmm15, xmm15).unwrap();
        a.ldmxcsr(dword_ptr(rax + 512)).unwrap();
        a.fxrstor64(ptr(rax)).unwrap();
        a.fxsave(ptr(rax + 1024)).unwrap();
    });
    g.write(DATA + 512, &0x1f80u32.to_le_bytes());
    g.write(DATA + 1024 + 416, &[0xaa; 96]);
    s.fpu.xmm[15] = 0xfeed_f00d;
    s.fpu.mxcsr = 0x3f80;
    s.fpu.fcw = 0x27f;
    let (g, out) = run(g, &s);
    assert_eq!(out.gpr[13], NO_FAULT);
    assert_eq!(out.fpu.xmm[15], 0xfeed_f00d);
    assert_eq!(out.fpu.mxcsr, 0x3f80);
    assert_eq!(g.read_u64(DATA) & 0xffff, 0x27f);
    assert_eq!(
        g.read_u64(DATA + 24),
        0xffff_0000_3f80,
        "MXCSR and MXCSR_MASK"
    );
    assert_eq!(read128(&g, DATA + 160 + 16 * 15), 0xfeed_f00d);
    assert_eq!(
        read128(&g, DATA + 1024 + 160 + 16 * 15),
        0xfeed_f00d,
        "64-bit mode saves XMM8-15"
    );
    assert_eq!(
        read128(&g, DATA + 1024 + 416),
        u128::from_le_bytes([0xaa; 16]),
        "416.. untouched"
    );
}

#[test]
fn legacy_fxsave_in_64_bit_mode_stores_a_32_bit_fip_and_cs() {
    let (g, mut s) = guest(|a| {
        a.mov(rax, DATA).unwrap();
        a.fxsave(ptr(rax)).unwrap();
        a.fxrstor(ptr(rax)).unwrap();
    });
    s.fpu.fip = 0x7_1234_5678;
    s.fpu.fdp = 0x9_8765_4321;
    let (g, out) = run(g, &s);
    assert_eq!(
        g.read_u64(DATA + 8),
        0x0010_1234_5678,
        "FIP, FCS = kernel CS"
    );
    assert_eq!(g.read_u64(DATA + 16), 0x8765_4321, "FDP, FDS = 0");
    assert_eq!((out.fpu.fip, out.fpu.fdp), (0x1234_5678, 0x8765_4321));
}

#[test]
fn fxsave_needs_a_16_byte_aligned_operand() {
    let (g, s) = guest(|a| {
        a.mov(rax, DATA + 8).unwrap();
        a.fxsave64(ptr(rax)).unwrap();
    });
    let (_, out) = run(g, &s);
    assert_eq!(out.gpr[13], 13);
}

#[test]
fn a_store_straddling_into_an_unmapped_page_writes_nothing() {
    let (g, s) = guest(|a| {
        a.mov(rax, 0x3f_fff8u64).unwrap();
        a.movups(xmmword_ptr(rax), xmm0).unwrap();
    });
    // The 2 MiB page at 4 MiB is not present.
    g.write_u64(PML4 + 0x2000 + 2 * 8, 0);
    g.write_u64(0x3f_fff8, 0x1111);
    let mut s = s;
    s.fpu.xmm[0] = u128::MAX;
    let (g, out) = run(g, &s);
    assert_eq!(out.gpr[13], 14);
    assert_eq!(out.cr2, 0x40_0000);
    assert_eq!(g.read_u64(0x3f_fff8), 0x1111);
}

#[test]
fn maskmovdqu_stores_only_selected_bytes() {
    let (g, mut s) = guest(|a| {
        a.mov(rdi, DATA).unwrap();
        a.maskmovdqu(xmm0, xmm1).unwrap();
    });
    g.write(DATA, &[0x55; 16]);
    s.fpu.xmm[0] = u128::from_le_bytes(core::array::from_fn(|k| k as u8));
    s.fpu.xmm[1] = 0x80 | 0xff << 16 | 0x7f << 24;
    let (g, _) = run(g, &s);
    let mut want = [0x55u8; 16];
    want[0] = 0;
    want[2] = 2;
    assert_eq!(read128(&g, DATA), u128::from_le_bytes(want));
}

#[test]
fn conversions_between_integers_and_floats() {
    let (g, mut s) = guest(|a| {
        a.mov(rax, -3i64).unwrap();
        a.cvtsi2sd(xmm0, rax).unwrap();
        a.cvtdq2ps(xmm1, xmm2).unwrap();
        a.cvtps2pd(xmm3, xmm1).unwrap();
        a.cvttpd2dq(xmm4, xmm3).unwrap();
        a.cvtpi2ps(xmm5, mm0).unwrap();
    });
    s.fpu.xmm[0] = u128::MAX;
    s.fpu.xmm[2] = 7 | 0xffff_fff9 << 32;
    s.fpu.xmm[5] = u128::MAX;
    s.fpu.st[0][..8].copy_from_slice(&(2u64 | 1 << 32).to_le_bytes());
    let (_, out) = run(g, &s);
    assert_eq!(out.fpu.xmm[0] as u64, (-3.0f64).to_bits());
    assert_eq!(
        out.fpu.xmm[0] >> 64,
        u128::from(u64::MAX),
        "upper half kept"
    );
    assert_eq!(
        out.fpu.xmm[1] as u64,
        u64::from(7.0f32.to_bits()) | u64::from((-7.0f32).to_bits()) << 32
    );
    assert_eq!(
        out.fpu.xmm[3],
        u128::from(7.0f64.to_bits()) | u128::from((-7.0f64).to_bits()) << 64
    );
    assert_eq!(out.fpu.xmm[4], 7 | 0xffff_fff9 << 32);
    assert_eq!(
        out.fpu.xmm[5],
        u128::MAX << 64 | u128::from(f32s([2.0, 1.0, 0.0, 0.0]) as u64)
    );
}

#[test]
fn every_mmx_sse_sse2_sse3_instruction_has_a_handler() {
    use iced_x86::{Code, CpuidFeature as F, EncodingKind, Instruction};
    let table = crate::decode::table::table();
    let missing: Vec<Code> = Code::values()
        .filter(|c| c.op_code().is_instruction() && c.op_code().encoding() == EncodingKind::Legacy)
        .filter(|&c| {
            let mut probe = Instruction::default();
            probe.set_code(c);
            let f = probe.cpuid_features();
            // FISTTP is SSE3 but an x87 instruction (the x87 family's).
            !f.contains(&F::FPU)
                && f.iter()
                    .any(|f| matches!(f, F::MMX | F::SSE | F::SSE2 | F::SSE3 | F::FXSR | F::CLFSH))
        })
        .filter(|&c| !table.has(c))
        .collect();
    assert!(missing.is_empty(), "no handler for {missing:?}");
}
