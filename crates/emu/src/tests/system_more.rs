//! More system features through the guest: sysenter/sysexit, NMI
//! delivery and blocking, double faults, int3/into, swapgs.

use iced_x86::code_asm::*;

use super::guest::*;

/// Leaves ring 0 for 64-bit ring 3 at `user` (stack `user_rsp`).
fn iretq_to_ring3(a: &mut CodeAssembler, user: u64, user_rsp: u64, code_sel: u16) {
    a.push(i32::from(UDATA | 3)).unwrap();
    a.push(user_rsp as i32).unwrap();
    a.push(0x2i32).unwrap();
    a.push(i32::from(code_sel | 3)).unwrap();
    a.push(user as i32).unwrap();
    a.iretq().unwrap();
}

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
        iretq_to_ring3(a, user, 0x2f000, UCODE);
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
