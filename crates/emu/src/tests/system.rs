//! System-level behaviour: exceptions and their delivery, IST, #PF with
//! CR2 and error code, syscall/sysret, iretq, triple fault, MMIO exits,
//! self-modifying code, unimplemented instructions.

use iced_x86::code_asm::*;

use super::guest::*;

/// A handler that records vector-specific data and halts.
fn halt_handler(g: &Guest, at: u64) {
    g.code(64, at, |a| {
        a.pop(r15).unwrap(); // error code (for vectors that push one)
        a.mov(r14, rsp).unwrap();
        a.hlt().unwrap();
    });
}

#[test]
fn page_fault_reports_cr2_and_error_code() {
    let mut g = Guest::new(1);
    let mut s = g.long_mode(CODE);
    // Make the 2 MiB page at 4 MiB not present.
    g.write_u64(PML4 + 0x2000 + 2 * 8, 0);
    halt_handler(&g, 0x20_0000);
    g.idt64(14, 0x20_0000, 0);
    g.code(64, CODE, |a| {
        a.mov(rax, 0x40_1234u64).unwrap();
        a.mov(qword_ptr(rax), 7).unwrap();
        a.hlt().unwrap();
    });
    s.gpr[4] = STACK;
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    let st = g.state();
    assert_eq!(st.cr2, 0x40_1234);
    assert_eq!(st.gpr[15], 0b010, "not present, write, supervisor");
    // Frame: rip of the faulting mov, cs, rflags, rsp, ss.
    let frame = st.gpr[14];
    assert_eq!(g.read_u64(frame), CODE + 10, "faulting instruction");
    assert_eq!(g.read_u64(frame + 8), u64::from(KCODE));
    assert_eq!(g.read_u64(frame + 24), STACK);
}

#[test]
fn user_write_to_supervisor_page_faults_with_user_bit() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    halt_handler(&g, 0x20_0000);
    g.idt64(14, 0x20_0000, 0);
    // Page at 6 MiB: present, writable, supervisor only.
    g.write_u64(PML4 + 0x2000 + 3 * 8, (3 << 21) | 0x83);
    let user = 0x30_0000u64;
    g.code(64, user, |a| {
        a.mov(rax, 0x60_0010u64).unwrap();
        a.mov(byte_ptr(rax), 1).unwrap();
        a.hlt().unwrap();
    });
    // iretq to ring 3 at `user`.
    g.code(64, CODE, |a| {
        iretq_to_ring3(a, user, 0x2f000, UCODE, 0x2);
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    let st = g.state();
    assert_eq!(st.cr2, 0x60_0010);
    assert_eq!(st.gpr[15], 0b111, "protection, write, user");
    assert_eq!(st.cs.selector, KCODE);
    assert_eq!(
        st.gpr[14],
        STACK - 40,
        "TSS.RSP0 stack: a 6-word frame, error code popped"
    );
}

#[test]
fn ist_stack_is_used_for_its_vector() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, 0x20_0000, |a| {
        a.mov(r14, rsp).unwrap();
        a.hlt().unwrap();
    });
    g.idt64(3, 0x20_0000, 1);
    g.code(64, CODE, |a| {
        a.int3().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[14], IST_STACK - 40);
    assert_eq!(
        g.read_u64(IST_STACK - 40),
        CODE + 1,
        "int3 pushes the next rip"
    );
}

#[test]
fn syscall_and_sysret_round_trip_through_ring_3() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    let user = 0x30_0000u64;
    let entry = 0x20_0000u64;
    g.code(64, entry, |a| {
        // In ring 0: rcx = user rip, r11 = rflags.
        a.mov(r12, rcx).unwrap();
        a.mov(r13, r11).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(r14, rax).unwrap();
        a.add(rbx, 1).unwrap();
        a.sysretq().unwrap();
    });
    g.code(64, user, |a| {
        a.mov(rbx, 41u64).unwrap();
        a.syscall().unwrap();
        a.mov(ax, cs).unwrap();
        a.mov(r15, rax).unwrap();
        a.int3().unwrap();
    });
    g.code(64, 0x21_0000, |a| {
        a.hlt().unwrap();
    });
    g.idt64(3, 0x21_0000, 0);
    g.code(64, CODE, |a| {
        a.mov(ecx, 0xc000_0081u32).unwrap();
        a.mov(edx, (0x20u32 << 16) | u32::from(KCODE)).unwrap();
        a.xor(eax, eax).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0xc000_0082u32).unwrap();
        a.mov(eax, entry as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        iretq_to_ring3(a, user, 0x2f000, UCODE, 0x202);
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[3], 42);
    assert_eq!(st.gpr[12], user + 10 + 2, "rcx = rip after syscall");
    assert_eq!(st.gpr[13] & 0x200, 0x200, "r11 = user rflags");
    assert_eq!(st.gpr[14] & 0xffff, u64::from(KDATA), "SS from STAR");
    assert_eq!(
        st.gpr[15] & 0xffff,
        u64::from(UCODE | 3),
        "sysret to STAR[63:48]+16"
    );
}

#[test]
fn divide_error_and_undefined_opcode_reach_their_handlers() {
    for (vector, body) in [(0u8, [0x48u8, 0xf7, 0xf1]), (6, [0x0f, 0x0b, 0x90])] {
        let mut g = Guest::new(1);
        let s = g.long_mode(CODE);
        g.code(64, 0x20_0000, |a| {
            a.mov(r14, qword_ptr(rsp)).unwrap();
            a.hlt().unwrap();
        });
        g.idt64(vector, 0x20_0000, 0);
        // xor ecx, ecx; then div rcx / ud2
        g.write(CODE, &[0x31, 0xc9]);
        g.write(CODE + 2, &body);
        g.vcpu.set_state(&s).unwrap();
        assert_eq!(g.run().end, End::Halt);
        assert_eq!(g.state().gpr[14], CODE + 2, "vector {vector}: faulting rip");
    }
}

#[test]
fn missing_idt_entry_escalates_to_triple_fault() {
    let mut g = Guest::new(1);
    let mut s = g.long_mode(CODE);
    s.idt.limit = 0;
    g.code(64, CODE, |a| {
        a.ud2().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Shutdown);
}

#[test]
fn mmio_reads_and_writes_exit_one_access_at_a_time() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    // Map 0xd0000000 (1 GiB page via the PDPT) for MMIO.
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    g.code(64, CODE, |a| {
        a.mov(rsi, 0xd000_0010u64).unwrap();
        a.mov(eax, dword_ptr(rsi)).unwrap();
        a.add(eax, dword_ptr(rsi + 4)).unwrap();
        a.mov(dword_ptr(rsi + 8), eax).unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run_with(100, |_| 0, |addr| addr & 0xff);
    assert_eq!(o.end, End::Halt);
    assert_eq!(g.state().gpr[0], 0x10 + 0x14);
    assert_eq!(o.mmio_writes, vec![(0xd000_0018, 0x24)]);
}

#[test]
fn self_modifying_code_runs_the_new_bytes() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    // Loop twice over `mov eax, imm32`, patching its immediate in between.
    g.code(64, CODE, |a| {
        let mut top = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(eax, 1u32).unwrap();
        a.add(ebx, eax).unwrap();
        a.mov(rdi, CODE + 3).unwrap(); // the imm32 of `mov eax, 1`
        a.mov(dword_ptr(rdi), 100u32).unwrap();
        a.cmp(ebx, 1).unwrap();
        a.je(top).unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let code = g.read_u64(CODE);
    assert_eq!(
        g.state().gpr[3],
        101,
        "code now {code:016x} rdi {:x}",
        g.state().gpr[7]
    );
}

#[test]
fn a_page_crossing_instruction_runs_its_current_bytes() {
    let mut g = Guest::new(1);
    let mut s = g.long_mode(CODE);
    // `mov eax, imm32` from two bytes before a page end: its immediate is
    // mostly on the next page. Called five times, then the immediate is
    // patched (on the second page) and it is called again.
    let f = CODE + 0x2000 - 2;
    g.code(64, f, |a| {
        a.mov(eax, 1u32).unwrap();
        a.ret().unwrap();
    });
    g.code(64, CODE, |a| {
        let mut top = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.mov(ecx, 5u32).unwrap();
        a.mov(rsi, f).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(rsi).unwrap();
        a.add(ebx, eax).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.mov(dword_ptr(rsi + 1), 100u32).unwrap();
        a.call(rsi).unwrap();
        a.add(ebx, eax).unwrap();
        a.hlt().unwrap();
    });
    s.gpr[4] = STACK;
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(g.state().gpr[3], 105, "five 1s, then the patched 100");
}

#[test]
fn unimplemented_instruction_raises_ud() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, 0x20_0000, |a| {
        a.mov(r14, qword_ptr(rsp)).unwrap();
        a.hlt().unwrap();
    });
    g.idt64(6, 0x20_0000, 0);
    // vaddps ymm0, ymm1, ymm2 (AVX: not implemented, not advertised)
    g.write(CODE, &[0xc5, 0xf4, 0x58, 0xc2]);
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(g.state().gpr[14], CODE);
}

#[test]
fn rep_movs_and_stos_copy_across_pages() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    let src = 0x30_0ff0u64;
    let pattern: Vec<u8> = (0..10000u32).map(|k| (k * 7 + 3) as u8).collect();
    g.write(src, &pattern);
    g.code(64, CODE, |a| {
        a.mov(rsi, src).unwrap();
        a.mov(rdi, 0x40_0003u64).unwrap();
        a.mov(rcx, 10000u64).unwrap();
        a.rep().movsb().unwrap();
        a.mov(rdi, 0x50_0000u64).unwrap();
        a.mov(rcx, 3000u64).unwrap();
        a.mov(rax, 0x0102_0304_0506_0708u64).unwrap();
        a.rep().stosq().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run_with(1000, |_| 0, |_| 0).end, End::Halt);
    let mut out = vec![0u8; 10000];
    vm_memory::Bytes::read_slice(&g.mem, &mut out, vm_memory::GuestAddress(0x40_0003)).unwrap();
    assert_eq!(out, pattern);
    assert_eq!(g.read_u64(0x50_0000 + 8 * 2999), 0x0102_0304_0506_0708);
    assert_eq!(g.read_u64(0x50_0000 + 8 * 3000), 0);
    let st = g.state();
    assert_eq!(st.gpr[1], 0);
    assert_eq!(st.gpr[7], 0x50_0000 + 8 * 3000);
}

#[test]
fn compat_mode_user_code_traps_into_a_64_bit_handler() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    let user = 0x30_0000u64;
    g.code(32, user, |a| {
        a.mov(eax, 7u32).unwrap();
        a.add(eax, eax).unwrap();
        a.int(0x80).unwrap();
    });
    g.code(64, 0x20_0000, |a| {
        a.mov(r12, rax).unwrap();
        a.mov(r13, qword_ptr(rsp + 8)).unwrap(); // CS of the frame
        a.mov(r14, qword_ptr(rsp)).unwrap(); // RIP of the frame
        a.hlt().unwrap();
    });
    g.idt64(0x80, 0x20_0000, 0);
    g.code(64, CODE, |a| {
        a.push(i32::from(UDATA | 3)).unwrap();
        a.push(0x2f000i32).unwrap();
        a.push(0x2i32).unwrap();
        a.push(0x23i32).unwrap(); // 32-bit user code, RPL 3
        a.push(user as i32).unwrap();
        a.iretq().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt, "{}", g.state());
    let st = g.state();
    assert_eq!(st.gpr[12], 14);
    assert_eq!(st.gpr[13], 0x23);
    assert_eq!(st.gpr[14], user + 5 + 2 + 2, "int pushes the next rip");
}
