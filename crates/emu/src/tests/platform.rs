//! The platform through the guest: LAPIC timer waking hlt, PIT channel 2
//! calibration polling, kicks, and APs started with INIT/SIPI.

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

use super::guest::*;

#[test]
fn lapic_timer_interrupt_wakes_hlt() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, 0x20_0000, |a| {
        a.add(r12, 1).unwrap();
        // EOI
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap();
        a.iretq().unwrap();
    });
    g.idt64(0x40, 0x20_0000, 0);
    // Map the APIC page (1 GiB page at 3 GiB).
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    g.code(64, CODE, |a| {
        let mut again = a.create_label();
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap(); // enable
        a.mov(dword_ptr(rbx + 0x3e0), 0xb).unwrap(); // divide by 1
        a.mov(dword_ptr(rbx + 0x320), 0x2_0040).unwrap(); // periodic, vector 0x40
        a.mov(dword_ptr(rbx + 0x380), 2_000_000).unwrap(); // 2 ms at 1 GHz
        a.set_label(&mut again).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cmp(r12, 5).unwrap();
        a.jb(again).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let t = Instant::now();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    assert_eq!(g.state().gpr[12], 5);
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(8),
        "5 periods of 2 ms took {el:?}"
    );
    assert!(
        el < Duration::from_secs(2),
        "hlt must wake promptly: {el:?}"
    );
}

#[test]
fn kick_interrupts_a_tight_loop_promptly() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, CODE, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.add(rax, 1).unwrap();
        a.jmp(l).unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let k = g.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let at = Instant::now();
        k.kick();
        at
    });
    let o = g.run();
    let done = Instant::now();
    let kicked = t.join().unwrap();
    assert_eq!(o.end, End::Interrupted);
    assert!(done.duration_since(kicked) < Duration::from_millis(20));
    assert!(g.state().gpr[0] > 1000, "the loop ran");
}

#[test]
fn pit_channel2_counts_down_for_calibration() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    // Program ch2 mode 0 with 0xffff, wait until its MSB changes twice.
    g.code(64, CODE, |a| {
        let mut w = a.create_label();
        a.in_(al, 0x61).unwrap();
        a.and(al, 0xfd).unwrap();
        a.or(al, 1).unwrap();
        a.out(0x61, al).unwrap();
        a.mov(al, 0xb0u32).unwrap();
        a.out(0x43, al).unwrap();
        a.mov(al, 0xffu32).unwrap();
        a.out(0x42, al).unwrap();
        a.out(0x42, al).unwrap();
        a.set_label(&mut w).unwrap();
        a.in_(al, 0x42).unwrap(); // LSB
        a.in_(al, 0x42).unwrap(); // MSB
        a.cmp(al, 0xfd).unwrap();
        a.ja(w).unwrap();
        a.rdtsc().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    assert!(
        o.ports.is_empty(),
        "PIT ports stay inside the backend: {:?}",
        o.ports
    );
}

#[test]
fn ap_waits_for_sipi_and_starts_in_real_mode() {
    let mut g = Guest::new(2);
    let mut ap = g.vm.create_vcpu(1).unwrap();
    // AP trampoline at 0x9000: write a byte to COM1 and halt.
    g.code(16, 0x9000, |a| {
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(al, b'A' as u32).unwrap();
        a.out(dx, al).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    g.code(64, CODE, |a| {
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        a.mov(dword_ptr(rbx + 0x310), 1 << 24).unwrap();
        a.mov(dword_ptr(rbx + 0x300), 0x4500).unwrap(); // INIT
        a.mov(dword_ptr(rbx + 0x300), 0x4609).unwrap(); // SIPI vector 9
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let ap_thread = std::thread::spawn(move || {
        let mut out = Vec::new();
        for _ in 0..100 {
            match ap.run() {
                Ok(vmplay_hypervisor::VcpuExit::IoOut { data, .. }) => out.push(data[0]),
                Ok(vmplay_hypervisor::VcpuExit::Halt) => return (out, ap.state().unwrap()),
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
        (out, ap.state().unwrap())
    });
    assert_eq!(g.run().end, End::Halt);
    let (out, st) = ap_thread.join().unwrap();
    assert_eq!(out, b"A");
    assert_eq!(st.cs.selector, 0x900);
}

#[test]
fn ioapic_line_delivers_its_vector_to_the_guest() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    g.code(64, 0x20_0000, |a| {
        a.mov(r12, 0x77u64).unwrap();
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // EOI
        a.iretq().unwrap();
    });
    g.idt64(0x35, 0x20_0000, 0);
    g.code(64, CODE, |a| {
        let mut wait = a.create_label();
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        a.mov(rdx, 0xfec0_0000u64).unwrap();
        a.mov(dword_ptr(rdx), 0x10 + 2 * 9).unwrap(); // redirection entry 9, low
        a.mov(dword_ptr(rdx + 0x10), 0x35).unwrap(); // edge, fixed, vector 0x35
        a.mov(dx, 0x3f8u32).unwrap();
        a.out(dx, al).unwrap(); // tell the host we are ready
        a.set_label(&mut wait).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cmp(r12, 0x77).unwrap();
        a.jne(wait).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    let line = g.vm.irq_line(9).unwrap();
    // The first exit is the "ready" write; raise the line, then run on.
    let o = g.run_with(1, |_| 0, |_| 0);
    assert_eq!(o.serial.len(), 1);
    line.pulse();
    let o = g.run();
    assert_eq!(o.end, End::Halt);
    assert_eq!(g.state().gpr[12], 0x77);
}

#[test]
fn locked_increments_from_two_vcpus_are_atomic() {
    let mut g = Guest::new(2);
    let mut ap = g.vm.create_vcpu(1).unwrap();
    let counter = 0x40_0000u64;
    let n = 200_000u64;
    g.code(64, CODE, |a| {
        let mut l = a.create_label();
        a.mov(rcx, n).unwrap();
        a.mov(rsi, counter).unwrap();
        a.set_label(&mut l).unwrap();
        a.lock().inc(qword_ptr(rsi)).unwrap();
        a.mov(eax, 2u32).unwrap();
        a.lock().xadd(qword_ptr(rsi + 8), rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(l).unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    let mut s1 = s.clone();
    s1.gpr[4] = STACK - 0x1000;
    ap.set_state(&s1).unwrap();
    let t = std::thread::spawn(move || {
        for _ in 0..100 {
            if let Ok(vmplay_hypervisor::VcpuExit::Halt) = ap.run() {
                return true;
            }
        }
        false
    });
    assert_eq!(g.run().end, End::Halt);
    assert!(t.join().unwrap());
    assert_eq!(g.read_u64(counter), 2 * n, "lock inc lost updates");
    assert_eq!(g.read_u64(counter + 8), 4 * n, "lock xadd lost updates");
}

#[test]
fn trace_file_records_executed_instructions() {
    let dir = std::env::temp_dir().join(format!("emu-trace-{}", std::process::id()));
    let mem = memory();
    let hv = crate::EmuHypervisor::new(crate::EmuOptions {
        trace: Some(dir.clone()),
        ..Default::default()
    });
    let vm = vmplay_hypervisor::Hypervisor::create_vm(
        &hv,
        &vmplay_hypervisor::VmSpec { vcpus: 1 },
        &mem,
    )
    .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut g = Guest { vm, mem, vcpu };
    g.code(64, CODE, |a| {
        a.mov(eax, 42u32).unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    drop(g);
    let text = std::fs::read_to_string(&dir).unwrap();
    let _ = std::fs::remove_file(&dir);
    assert!(text.contains("mov eax,2Ah"), "{text}");
    assert!(text.contains("hlt"), "{text}");
}

#[test]
fn x2apic_self_ipi_through_msrs() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    g.code(64, 0x20_0000, |a| {
        a.mov(r12, 0x99u64).unwrap();
        a.mov(ecx, 0x80bu32).unwrap(); // x2APIC EOI
        a.xor(eax, eax).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.iretq().unwrap();
    });
    g.idt64(0x41, 0x20_0000, 0);
    g.code(64, CODE, |a| {
        a.mov(ecx, 0x1bu32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0xc00).unwrap(); // EN | EXTD
        a.wrmsr().unwrap();
        a.mov(ecx, 0x80fu32).unwrap(); // SVR
        a.mov(eax, 0x1ffu32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x802u32).unwrap(); // APIC ID
        a.rdmsr().unwrap();
        a.mov(r13, rax).unwrap();
        a.mov(ecx, 0x83fu32).unwrap(); // SELF IPI
        a.mov(eax, 0x41u32).unwrap();
        a.wrmsr().unwrap();
        a.sti().unwrap();
        a.nop().unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[12], 0x99, "self IPI delivered after sti");
    assert_eq!(st.gpr[13], 0, "x2APIC ID of vCPU 0");
}
