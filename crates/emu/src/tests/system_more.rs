//! More system features through the guest: sysenter/sysexit, NMI
//! delivery and blocking, double faults, int3/into, swapgs.

use iced_x86::code_asm::*;

use super::guest::*;

#[test]
fn sysenter_and_sysexit_round_trip_through_ring_3() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    let user = 0x30_0000u64;
    let entry = 0x20_0000u64;
    let kstack = 0x9_0000u64;
    let resume = 0x30_1000u64;
    g.code(64, entry, |a| {
        a.mov(ax, cs).unwrap();
        a.mov(r12, rax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(r13, rax).unwrap();
        a.mov(r14, rsp).unwrap();
        a.add(rbx, 1).unwrap();
        // sysexit: RSP <- RCX, RIP <- RDX.
        a.mov(rcx, 0x2e000u64).unwrap();
        a.mov(rdx, resume).unwrap();
        a.sysexitq().unwrap();
    });
    g.code(64, user, |a| {
        a.mov(rbx, 41u64).unwrap();
        a.sysenter().unwrap();
        a.ud2().unwrap(); // sysenter does not return here
    });
    g.code(64, resume, |a| {
        a.mov(ax, cs).unwrap();
        a.mov(r15, rax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(r11, rax).unwrap();
        a.mov(r10, rsp).unwrap();
        a.int3().unwrap();
    });
    // int3 handler: CS of its frame (the CPL we came from), then halt.
    g.code(64, 0x21_0000, |a| {
        a.mov(r9, qword_ptr(rsp + 8)).unwrap();
        a.hlt().unwrap();
    });
    g.idt64(3, 0x21_0000, 0);
    g.code(64, CODE, |a| {
        for (msr, v) in [
            (0x174u32, u32::from(KCODE)),
            (0x175, kstack as u32),
            (0x176, entry as u32),
        ] {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, v).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
        }
        iretq_to_ring3(a, user, 0x2f000, UCODE, 0x2);
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[3], 42, "the handler ran once");
    assert_eq!(st.gpr[12] & 0xffff, u64::from(KCODE), "CS = SYSENTER_CS");
    assert_eq!(
        st.gpr[13] & 0xffff,
        u64::from(KDATA),
        "SS = SYSENTER_CS + 8"
    );
    assert_eq!(st.gpr[14], kstack, "RSP = SYSENTER_ESP");
    assert_eq!(
        st.gpr[15] & 0xffff,
        u64::from((KCODE + 32) | 3),
        "sysexit64 to SYSENTER_CS + 32, RPL 3"
    );
    assert_eq!(st.gpr[11] & 0xffff, u64::from((KCODE + 40) | 3));
    assert_eq!(st.gpr[10], 0x2e000, "RSP from RCX");
    assert_eq!(st.gpr[9] & 3, 3, "int3 came from CPL 3");
}

#[test]
fn nmi_from_a_self_ipi_reaches_vector_2() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    // xAPIC ICR: delivery mode NMI (4), level assert, physical dest 0.
    let nmi_icr = 0x4400u32;
    g.code(64, 0x20_0000, |a| {
        let mut done = a.create_label();
        a.add(r12, 1).unwrap();
        a.cmp(r12, 1).unwrap();
        a.jne(done).unwrap();
        // A second NMI while the first is in service stays pending...
        a.mov(dword_ptr(rbx + 0x300), nmi_icr).unwrap();
        // Spin over many block boundaries, where NMIs are checked.
        let mut spin = a.create_label();
        a.mov(ecx, 1000u32).unwrap();
        a.set_label(&mut spin).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(spin).unwrap();
        // ...so no nested handler has bumped r12 by now.
        a.mov(r13, r12).unwrap();
        a.set_label(&mut done).unwrap();
        a.iretq().unwrap();
    });
    g.idt64(2, 0x20_0000, 0);
    // Map the APIC page (1 GiB page at 3 GiB).
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    g.code(64, CODE, |a| {
        let mut wait = a.create_label();
        let mut out = a.create_label();
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap(); // enable
        a.mov(dword_ptr(rbx + 0x310), 0).unwrap(); // ICR high: APIC ID 0
        a.cli().unwrap(); // NMIs ignore IF
        a.mov(dword_ptr(rbx + 0x300), nmi_icr).unwrap();
        a.mov(ecx, 1_000_000u32).unwrap();
        a.set_label(&mut wait).unwrap();
        a.cmp(r12, 2).unwrap();
        a.jae(out).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(wait).unwrap();
        a.set_label(&mut out).unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run_with(10_000, |_| 0, |_| 0);
    assert_eq!(o.end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[13], 1, "NMI blocked inside the NMI handler");
    assert_eq!(st.gpr[12], 2, "both NMIs delivered, the second after iretq");
}

#[test]
fn exception_during_delivery_becomes_double_fault() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, 0x20_0000, |a| {
        a.pop(r15).unwrap(); // #DF error code
        a.mov(r14, rsp).unwrap();
        a.mov(r13, qword_ptr(rsp + 8)).unwrap(); // CS of the frame
        a.hlt().unwrap();
    });
    g.idt64(8, 0x20_0000, 0);
    // Vector 13 is left not present: the #GP below raises #NP during its
    // delivery, and two contributory faults make a #DF.
    g.code(64, CODE, |a| {
        a.mov(r15, 0x55u64).unwrap();
        a.mov(rax, 0x8000_0000_0000_0000u64).unwrap();
        a.mov(qword_ptr(rax), 1).unwrap(); // non-canonical: #GP(0)
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[15], 0, "#DF pushes error code 0");
    assert_eq!(st.gpr[14], STACK - 40, "the #DF frame on RSP0's stack");
    assert_eq!(st.gpr[13], u64::from(KCODE));
}

#[test]
fn int3_and_into_reach_their_handlers() {
    // int3 in 64-bit mode: vector 3, RIP after the one-byte int3.
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, 0x20_0000, |a| {
        a.mov(r14, qword_ptr(rsp)).unwrap();
        a.hlt().unwrap();
    });
    g.idt64(3, 0x20_0000, 0);
    let n = g.code(64, CODE, |a| {
        a.nop().unwrap();
        a.int3().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt, "{}", g.state());
    assert_eq!(g.state().gpr[14], CODE + n as u64);

    // into in 32-bit (compatibility) code: no trap with OF=0, vector 4
    // with OF=1, RIP after the into.
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    let user = 0x30_0000u64;
    let n = g.code(32, user, |a| {
        a.xor(eax, eax).unwrap();
        a.into().unwrap(); // OF clear: falls through
        a.mov(ebx, 7u32).unwrap();
        a.mov(eax, 0x7fff_ffffu32).unwrap();
        a.add(eax, 1).unwrap(); // OF set
        a.into().unwrap();
        a.ud2().unwrap();
    });
    let after = user + n as u64 - 2; // the ud2 after the second into
    g.code(64, 0x20_0000, |a| {
        a.mov(r14, qword_ptr(rsp)).unwrap();
        a.mov(r13, qword_ptr(rsp + 8)).unwrap();
        a.hlt().unwrap();
    });
    g.idt64(4, 0x20_0000, 0);
    g.code(64, CODE, |a| iretq_to_ring3(a, user, 0x2f000, 0x20, 0x2));
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[3], 7, "the first into did not trap");
    assert_eq!(st.gpr[14], after, "into traps with the next rip");
    assert_eq!(st.gpr[13], 0x23);
}

#[test]
fn swapgs_exchanges_gs_base_with_kernel_gs_base() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    let (user_base, kernel_base) = (0x40_0000u64, 0x50_0000u64);
    g.write_u64(user_base + 8, 0x1111);
    g.write_u64(kernel_base + 8, 0x2222);
    g.code(64, CODE, |a| {
        for (msr, v) in [(0xc000_0101u32, user_base), (0xc000_0102, kernel_base)] {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, v as u32).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
        }
        a.xor(esi, esi).unwrap();
        a.mov(r8, qword_ptr(rsi + 8).gs()).unwrap();
        a.swapgs().unwrap();
        a.mov(r9, qword_ptr(rsi + 8).gs()).unwrap();
        a.mov(ecx, 0xc000_0101u32).unwrap();
        a.rdmsr().unwrap();
        a.mov(r10, rax).unwrap();
        a.mov(ecx, 0xc000_0102u32).unwrap();
        a.rdmsr().unwrap();
        a.mov(r11, rax).unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[8], 0x1111, "gs: reads through GS_BASE");
    assert_eq!(
        st.gpr[9], 0x2222,
        "after swapgs gs: uses the old KERNEL_GS_BASE"
    );
    assert_eq!(st.gpr[10], kernel_base, "GS_BASE now holds the kernel base");
    assert_eq!(
        st.gpr[11], user_base,
        "KERNEL_GS_BASE now holds the user base"
    );
    assert_eq!(st.gs.base, kernel_base);
}
