//! Real, protected and long mode basics, and the switches between them.

use iced_x86::code_asm::*;
use vmplay_hypervisor::{CpuState, Segment};

use super::guest::*;

#[test]
fn real_mode_guest_writes_hello_to_com1() {
    let mut g = Guest::new(1);
    g.code(16, 0x7c00, |a| {
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(si, 0x7e00u32).unwrap();
        a.set_label(&mut next).unwrap();
        a.lodsb().unwrap();
        a.test(al, al).unwrap();
        a.jz(done).unwrap();
        a.out(dx, al).unwrap();
        a.jmp(next).unwrap();
        a.set_label(&mut done).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    g.write(0x7e00, b"hello\0");
    let mut s = CpuState::reset();
    s.cs = Segment::real_mode(0, true);
    s.rip = 0x7c00;
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    assert_eq!(o.serial, b"hello");
}

#[test]
fn long_mode_guest_computes_and_halts_with_registers_read_back() {
    let mut g = Guest::new(1);
    let size = g.code(64, CODE, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
        a.mov(rcx, 10u64).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.add(rbx, rcx).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(l).unwrap();
        a.push(rax).unwrap();
        a.pop(rdx).unwrap();
        a.bswap(edx).unwrap();
        a.imul_3(r8, rbx, 3).unwrap();
        a.mov(r9d, 0xffff_ffffu32).unwrap();
        a.add(r9d, 1).unwrap(); // CF=1, ZF=1
        a.setc(r10b).unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[3], 55);
    assert_eq!(st.gpr[2], 0xf0de_bc9a, "bswap edx zero-extends");
    assert_eq!(st.gpr[8], 165);
    assert_eq!(st.gpr[9], 0);
    assert_eq!(st.gpr[10], 1);
    assert_eq!(st.rflags & 0x41, 0x41, "CF and ZF set");
    assert_eq!(st.rip, CODE + size as u64, "rip after the hlt");
}

/// A 32-bit protected-mode entry as multiboot loaders make it.
#[test]
fn protected_mode_guest_runs_flat_32_bit_code() {
    let mut g = Guest::new(1);
    g.code(32, CODE, |a| {
        a.mov(esi, 0x2000u32).unwrap();
        a.mov(dword_ptr(esi), 0xdead_beefu32).unwrap();
        a.mov(eax, dword_ptr(esi)).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(al, b'P' as u32).unwrap();
        a.out(dx, al).unwrap();
        a.movzx(ebx, word_ptr(esi + 2)).unwrap();
        a.hlt().unwrap();
    });
    let mut s = CpuState::reset();
    s.cr0 = 0x11;
    s.cs = Segment::flat(0x08, 0xb, false, true);
    let d = Segment::flat(0x10, 0x3, false, true);
    (s.ds, s.es, s.ss, s.fs, s.gs) = (d, d, d, d, d);
    s.rip = CODE;
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    assert_eq!(o.serial, b"P");
    let st = g.state();
    assert_eq!(st.gpr[0] & 0xff, u64::from(b'P'));
    assert_eq!(st.gpr[3], 0xdead);
    assert_eq!(g.read_u64(0x2000) as u32, 0xdead_beef);
}

/// Real mode → protected mode → long mode, as a boot loader does it.
#[test]
fn real_mode_switches_to_protected_then_long_mode() {
    let mut g = Guest::new(1);
    // Page tables and GDT from the 64-bit helper; the code builds the rest.
    let _ = g.long_mode(0);
    // A GDT descriptor pointer at 0x4f0 and a 32-bit code segment at 0x48.
    g.write(0x4f0, &[0x4f, 0, 0x00, 0x05, 0, 0]);
    g.write_u64(GDT + 0x48, 0x00cf_9b00_0000_ffff);
    let pm32 = 0x8000u64;
    let lm64 = 0x9000u64;
    g.code(16, 0x7c00, |a| {
        a.cli().unwrap();
        a.lgdt(ptr(0x4f0)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        // jmp far 0x48:pm32 (66 ea)
        a.db(&[0x66, 0xea]).unwrap();
        a.dd(&[pm32 as u32]).unwrap();
        a.dw(&[0x48]).unwrap();
    });
    g.code(32, pm32, |a| {
        a.mov(ax, KDATA as u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, STACK as u32).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PML4 as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.db(&[0xea]).unwrap();
        a.dd(&[lm64 as u32]).unwrap();
        a.dw(&[KCODE]).unwrap();
    });
    g.code(64, lm64, |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.mov(rcx, 0xc000_0080u64).unwrap();
        a.rdmsr().unwrap();
        a.mov(rbx, rax).unwrap();
        a.hlt().unwrap();
    });
    let mut s = CpuState::reset();
    s.cs = Segment::real_mode(0, true);
    s.rip = 0x7c00;
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt, "{}", g.state());
    let st = g.state();
    assert!(st.cs.l, "64-bit code segment");
    assert_eq!(st.gpr[3] & 0x500, 0x500, "EFER.LME and LMA");
}

/// Real-mode IVT delivery of a fault: `bound` out of range raises #BR with
/// the faulting IP on the stack.
#[test]
fn real_mode_bound_raises_br_through_the_ivt() {
    let mut g = Guest::new(1);
    g.write(5 * 4, &[0x00, 0x80, 0x00, 0x00]); // IVT[5] = 0000:8000
    g.code(16, 0x8000, |a| {
        a.mov(bx, 0x55u32).unwrap();
        a.pop(dx).unwrap(); // faulting IP
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    g.write(0x7e00, &[10, 0, 20, 0]);
    let size = g.code(16, 0x7c00, |a| {
        a.mov(sp, 0x7000u32).unwrap();
        a.mov(ax, 15u32).unwrap();
        a.bound(ax, word_ptr(0x7e00)).unwrap(); // in range
        a.mov(ax, 30u32).unwrap();
    });
    g.write(0x7c00 + size as u64, &[0x62, 0x06, 0x00, 0x7e]); // bound ax, [0x7e00]
    let mut s = CpuState::reset();
    s.cs = Segment::real_mode(0, true);
    s.rip = 0x7c00;
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[3], 0x55);
    assert_eq!(
        st.gpr[2],
        0x7c00 + size as u64,
        "#BR is a fault: IP of the bound"
    );
}

/// Fused compare-and-branch pairs keep both the branch and the flags.
#[test]
fn fused_compare_and_branch_keeps_flags_and_targets() {
    let mut g = Guest::new(1);
    g.code(64, CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.xor(ecx, ecx).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rbx, rcx).unwrap();
        a.inc(rcx).unwrap();
        a.cmp(rcx, 100).unwrap();
        a.jne(top).unwrap();
        a.mov(rax, 0u64).unwrap();
        a.test(rax, rax).unwrap();
        a.jz(skip).unwrap();
        a.mov(rbx, 0u64).unwrap();
        a.set_label(&mut skip).unwrap();
        let mut end = a.create_label();
        a.mov(edx, 5u32).unwrap();
        a.cmp(edx, ecx).unwrap(); // 5 - 100: CF=1, SF=1
        a.jae(end).unwrap(); // not taken
        a.mov(r8d, 1u32).unwrap();
        a.set_label(&mut end).unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(
        st.gpr[3], 4950,
        "sum 0..99, and the taken jz skipped the clear"
    );
    assert_eq!(st.gpr[1], 100);
    assert_eq!(st.gpr[8], 1, "jae fell through");
    assert_eq!(st.rflags & 0x81, 0x81, "CF and SF from the fused cmp");
}
