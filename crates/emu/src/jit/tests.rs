//! The translation tier against the interpreter on real guest code: the
//! same program under each tier must end in the same registers and
//! memory, with co-simulation reporting no difference.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use iced_x86::code_asm::*;
use vmplay_hypervisor::{Hypervisor, Vm, VmSpec};

use super::{JitConfig, Tier};
use crate::tests::guest::*;
use crate::vm::VmShared;
use crate::{EmuHypervisor, EmuOptions};

const DATA: u64 = 0x20_0000;

fn guest(jit: JitConfig) -> (Guest, Arc<VmShared>) {
    let mem = memory();
    let vm =
        crate::vm::EmuVm::new(&VmSpec { vcpus: 1 }, &mem, None, Default::default()).expect("vm");
    vm.shared().set_jit(jit);
    let shared = vm.shared().clone();
    let vm: Arc<dyn Vm> = Arc::new(vm);
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    (Guest { vm, mem, vcpu }, shared)
}

fn interp() -> JitConfig {
    JitConfig {
        tier: Tier::Interp,
        ..JitConfig::default()
    }
}

/// Translate on first sight and check every translated run.
fn jit_verified() -> JitConfig {
    JitConfig {
        tier: Tier::Jit,
        threshold: 0,
        idle_threshold: u64::MAX,
        verify_runs: u64::MAX,
        background: false,
    }
}

/// Translate after a few runs, chain, no checking (the fast path).
fn jit_chained() -> JitConfig {
    JitConfig {
        tier: Tier::Jit,
        threshold: 2,
        idle_threshold: u64::MAX,
        verify_runs: 0,
        background: false,
    }
}

/// As [`jit_chained`], translating on the compiler thread (the default
/// outside tests): when code gets installed depends on timing, results
/// must not.
fn jit_background() -> JitConfig {
    JitConfig {
        background: true,
        ..jit_chained()
    }
}

/// A loop mixing what compilers emit: calls and returns, flags carried
/// from add to adc and across memory accesses, every addressing form
/// (base+index*scale+disp, RIP-relative, 32-bit), 8/16/32/64-bit
/// operands, push/pop, cmov/setcc, shifts, xchg and a locked add.
fn mixed_program(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    let mut func = a.create_label();
    let mut skip = a.create_label();
    let mut table = a.create_label();
    a.mov(rsi, DATA).unwrap();
    a.mov(ecx, 3000u32).unwrap();
    a.xor(eax, eax).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.mov(r8, 0x0001_2345_6789_u64).unwrap();
    a.xor(r9d, r9d).unwrap();
    a.xor(r14d, r14d).unwrap();
    a.xor(r15d, r15d).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(func).unwrap();
    // Through registers: an indirect call and an indirect jump.
    let mut after_jump = a.create_label();
    a.lea(rdx, qword_ptr(func)).unwrap();
    a.call(rdx).unwrap();
    a.lea(rdx, qword_ptr(after_jump)).unwrap();
    a.jmp(rdx).unwrap();
    a.int3().unwrap();
    a.set_label(&mut after_jump).unwrap();
    // Through memory: an indirect call and an indirect jump.
    let mut after_jump2 = a.create_label();
    a.lea(rdx, qword_ptr(func)).unwrap();
    a.mov(qword_ptr(rsi + 0x3_0000), rdx).unwrap();
    a.call(qword_ptr(rsi + 0x3_0000)).unwrap();
    a.lea(rdx, qword_ptr(after_jump2)).unwrap();
    a.mov(qword_ptr(rsi + 0x3_0008), rdx).unwrap();
    a.jmp(qword_ptr(rsi + 0x3_0008)).unwrap();
    a.int3().unwrap();
    a.set_label(&mut after_jump2).unwrap();
    // An interpreted instruction ending a block: its exit leaves the
    // flags lazy and chains into the next block's lazy-flags head.
    // High-byte registers with immediates, and cli (CPL 0).
    a.mov(edx, ecx).unwrap();
    a.shl(edx, 5).unwrap();
    a.test(dh, 0x10).unwrap();
    a.setnz(r11b).unwrap();
    a.and(dh, 0x3c).unwrap();
    a.xor(bh, 0x81u32).unwrap();
    a.add(r9, rdx).unwrap();
    a.cli().unwrap();
    let mut next_block = a.create_label();
    a.cdqe().unwrap();
    a.jmp(next_block).unwrap();
    a.set_label(&mut next_block).unwrap();
    a.add(rax, qword_ptr(rsi + rcx * 8 - 8)).unwrap();
    a.adc(rbx, rax).unwrap();
    a.mov(qword_ptr(rsi + rcx * 8 + 0x8000), rbx).unwrap();
    a.movzx(edx, byte_ptr(rsi + rcx)).unwrap();
    a.imul_3(r8, r8, 33).unwrap();
    a.xor(r8, rdx).unwrap();
    a.rol(r8, 5).unwrap();
    a.shr(r9, 1).unwrap();
    a.lea(r9, r9 + r8 * 2 + 7).unwrap();
    a.cmp(r8, rbx).unwrap();
    a.cmovb(r10, r8).unwrap();
    a.setc(r11b).unwrap();
    a.push(r8).unwrap();
    a.push(rbx).unwrap();
    a.pop(r12).unwrap();
    a.pop(r13).unwrap();
    a.mov(word_ptr(rsi + rcx * 2 + 0x10000), r12w).unwrap();
    a.mov(edi, ecx).unwrap();
    a.add(dil, 3).unwrap();
    a.mov(byte_ptr(rsi + rcx + 0x18000), dil).unwrap();
    a.xchg(qword_ptr(rsi + 0x20000), r13).unwrap();
    a.lock().add(qword_ptr(rsi + 0x20008), 1).unwrap();
    a.add(r14d, dword_ptr(esi + ecx * 4 + 0x100)).unwrap();
    a.test(ecx, 1).unwrap();
    a.jz(skip).unwrap();
    a.inc(r14).unwrap();
    a.sub(r15, qword_ptr(table)).unwrap();
    a.set_label(&mut skip).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut func).unwrap();
    a.add(r15, rcx).unwrap();
    a.sbb(eax, 7).unwrap();
    a.ret().unwrap();
    a.set_label(&mut table).unwrap();
    a.dq(&[0x0101_0101_0101_0101]).unwrap();
}

fn run_mixed(jit: JitConfig) -> (Vec<u64>, u64, Arc<VmShared>) {
    run_program(jit, mixed_program, 0x1000, 0x2_1000)
}

/// Runs `program` to `hlt` with `words` pseudo-random words at `DATA`;
/// the registers, a checksum of the first `checked` bytes at `DATA`, and
/// the VM's counters.
fn run_program(
    jit: JitConfig,
    program: impl FnOnce(&mut CodeAssembler),
    words: u64,
    checked: u64,
) -> (Vec<u64>, u64, Arc<VmShared>) {
    let (mut g, shared) = guest(jit);
    g.code(64, CODE, program);
    for k in 0..words {
        g.write_u64(DATA + 8 * k, k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    let s = g.long_mode(CODE);
    let (regs, _, sum) = run_to_halt(&mut g, &s, jit, checked);
    (regs, sum, shared)
}

/// Runs from `s` to `hlt`; the registers and RFLAGS, the XMM registers
/// and a checksum of the first `data` bytes at `DATA`.
fn run_to_halt(
    g: &mut Guest,
    s: &vmplay_hypervisor::CpuState,
    jit: JitConfig,
    data: u64,
) -> (Vec<u64>, [u128; 16], u64) {
    g.vcpu.set_state(s).unwrap();
    let o = g.run_with(100_000, |_| 0, |_| 0);
    assert_eq!(o.end, End::Halt, "{:?}", jit.tier);
    let st = g.state();
    let mut regs = st.gpr.to_vec();
    regs.push(st.rflags);
    let mut sum = 0u64;
    for k in 0..(data / 8) {
        sum = sum.rotate_left(7) ^ g.read_u64(DATA + 8 * k);
    }
    (regs, st.fpu.xmm, sum)
}

#[test]
fn translated_code_ends_where_the_interpreter_does() {
    let (want, want_sum, _) = run_mixed(interp());
    let (got, got_sum, shared) = run_mixed(jit_verified());
    assert_eq!(shared.jit_totals.mismatches.load(Ordering::Relaxed), 0);
    assert!(shared.jit_totals.translated.load(Ordering::Relaxed) > 3);
    assert!(shared.jit_totals.verified.load(Ordering::Relaxed) > 1000);
    assert_eq!(got, want, "registers after the verified jit run");
    assert_eq!(got_sum, want_sum, "memory after the verified jit run");
    let (got, got_sum, shared) = run_mixed(jit_chained());
    assert!(shared.jit_totals.translated.load(Ordering::Relaxed) > 3);
    assert_eq!(got, want, "registers after the chained jit run");
    assert_eq!(got_sum, want_sum, "memory after the chained jit run");
    let (got, got_sum, _) = run_mixed(jit_background());
    assert_eq!(got, want, "registers after the background-compiled run");
    assert_eq!(
        got_sum, want_sum,
        "memory after the background-compiled run"
    );
}

/// The compiler thread's code is installed while the guest runs: a long
/// loop ends with the interpreter's result and was translated.
#[test]
fn the_background_compiler_installs_hot_code_while_the_guest_runs() {
    let (mut g, shared) = guest(jit_background());
    g.code(64, CODE, |a| {
        let mut top = a.create_label();
        a.xor(eax, eax).unwrap();
        a.mov(ecx, 20_000_000u32).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rax, rcx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    let o = g.run_with(100_000, |_| 0, |_| 0);
    assert_eq!(o.end, End::Halt);
    let n = 20_000_000u64;
    assert_eq!(g.state().gpr[0], n * (n + 1) / 2);
    assert!(shared.jit_totals.translated.load(Ordering::Relaxed) >= 1);
}

#[test]
fn page_fault_in_translated_code_is_precise() {
    for jit in [interp(), jit_verified(), jit_chained()] {
        let (mut g, _) = guest(jit);
        const HANDLER: u64 = CODE + 0x800;
        // The handler saves the pushed RIP, CR2 and two registers.
        g.code(64, HANDLER, |a| {
            a.mov(rax, qword_ptr(rsp + 8)).unwrap();
            a.mov(qword_ptr(0x3000u64), rax).unwrap();
            a.mov(rax, cr2).unwrap();
            a.mov(qword_ptr(0x3008u64), rax).unwrap();
            a.mov(qword_ptr(0x3010u64), rbx).unwrap();
            a.mov(qword_ptr(0x3018u64), rdx).unwrap();
            a.hlt().unwrap();
        });
        g.idt64(14, HANDLER, 0);
        let mut fault_at = 0;
        g.code(64, CODE, |a| {
            let mut top = a.create_label();
            let mut fault = a.create_label();
            a.mov(ecx, 10u32).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(rbx, 1).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.add(rbx, 100).unwrap();
            a.set_label(&mut fault).unwrap();
            a.mov(rax, qword_ptr(0x8000_0010u64)).unwrap();
            a.mov(edx, 5u32).unwrap();
            a.hlt().unwrap();
            fault_at = 0; // set below from the assembled layout
        });
        // Find the faulting instruction's address by decoding.
        let mut bytes = vec![0u8; 64];
        for (k, b) in bytes.iter_mut().enumerate() {
            *b = (g.read_u64(CODE + k as u64) & 0xff) as u8;
        }
        let mut d = iced_x86::Decoder::with_ip(64, &bytes, CODE, iced_x86::DecoderOptions::NONE);
        for i in &mut d {
            if i.mnemonic() == iced_x86::Mnemonic::Mov && i.op1_kind() == iced_x86::OpKind::Memory {
                fault_at = i.ip();
                break;
            }
        }
        assert_ne!(fault_at, 0);
        let s = g.long_mode(CODE);
        g.vcpu.set_state(&s).unwrap();
        let o = g.run();
        assert_eq!(o.end, End::Halt);
        assert_eq!(g.read_u64(0x3000), fault_at, "pushed RIP ({:?})", jit.tier);
        assert_eq!(g.read_u64(0x3008), 0x8000_0010, "CR2");
        assert_eq!(
            g.read_u64(0x3010),
            110,
            "rbx: everything before the fault done"
        );
        assert_eq!(g.read_u64(0x3018), 0, "rdx: nothing after the fault done");
    }
}

#[test]
fn code_rewritten_after_translation_runs_its_new_bytes() {
    for jit in [interp(), jit_verified(), jit_chained(), jit_background()] {
        let (mut g, _) = guest(jit);
        const PATCHED: u64 = CODE + 0x400;
        // PATCHED: add rbx, imm32 ; ret — called 50 times, then its
        // immediate is rewritten and it is called 50 times more.
        g.code(64, PATCHED, |a| {
            a.add(rbx, 0x1000_0000).unwrap();
            a.ret().unwrap();
        });
        g.code(64, CODE, |a| {
            let mut l1 = a.create_label();
            let mut l2 = a.create_label();
            a.mov(ecx, 50u32).unwrap();
            a.set_label(&mut l1).unwrap();
            a.mov(rax, PATCHED).unwrap();
            a.call(rax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l1).unwrap();
            // The immediate starts 3 bytes in (REX.W 81 /0 id).
            a.mov(dword_ptr(PATCHED + 3), 1u32).unwrap();
            a.mov(ecx, 50u32).unwrap();
            a.set_label(&mut l2).unwrap();
            a.mov(rax, PATCHED).unwrap();
            a.call(rax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l2).unwrap();
            a.hlt().unwrap();
        });
        let s = g.long_mode(CODE);
        g.vcpu.set_state(&s).unwrap();
        let o = g.run_with(100_000, |_| 0, |_| 0);
        assert_eq!(o.end, End::Halt);
        assert_eq!(g.state().gpr[3], 50 * 0x1000_0000 + 50, "{:?}", jit.tier);
    }
}

/// Calls and returns that do not pair up: recursion deeper than the
/// return-address stack, a return address rewritten on the stack (to one
/// of two places), a callee that returns straight to its caller's
/// caller, and a `ret` with no call. Each return must go where the guest
/// stack says.
fn returns_program(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    let mut rec = a.create_label();
    let mut rec_done = a.create_label();
    let mut redirect = a.create_label();
    let mut redirected = a.create_label();
    let mut redirected_odd = a.create_label();
    let mut joined = a.create_label();
    let mut outer = a.create_label();
    let mut skipper = a.create_label();
    let mut pushed = a.create_label();
    a.mov(ecx, 40u32).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.xor(r12d, r12d).unwrap();
    a.set_label(&mut top).unwrap();
    // rec(600): 600 nested calls, each return adds its depth.
    a.mov(edi, 600u32).unwrap();
    a.call(rec).unwrap();
    a.add(rbx, 1).unwrap();
    // A return address rewritten: comes back at `redirected` or, on odd
    // rounds, `redirected_odd`.
    a.call(redirect).unwrap();
    a.add(rbx, 0x1000).unwrap();
    a.set_label(&mut redirected).unwrap();
    a.add(rbx, 0x10_0000).unwrap();
    a.jmp(joined).unwrap();
    a.set_label(&mut redirected_odd).unwrap();
    a.add(rbx, 0x20_0000).unwrap();
    a.set_label(&mut joined).unwrap();
    // outer calls skipper, which drops outer's frame.
    a.call(outer).unwrap();
    a.add(r12, 3).unwrap();
    // A ret with no call.
    a.lea(rax, qword_ptr(pushed)).unwrap();
    a.push(rax).unwrap();
    a.ret().unwrap();
    a.int3().unwrap();
    a.set_label(&mut pushed).unwrap();
    a.add(r12, 5).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();

    a.set_label(&mut rec).unwrap();
    a.test(edi, edi).unwrap();
    a.jz(rec_done).unwrap();
    a.push(rdi).unwrap();
    a.dec(edi).unwrap();
    a.call(rec).unwrap();
    a.pop(rdi).unwrap();
    a.add(rbx, rdi).unwrap();
    a.set_label(&mut rec_done).unwrap();
    a.ret().unwrap();

    a.set_label(&mut redirect).unwrap();
    let mut even = a.create_label();
    a.lea(rax, qword_ptr(redirected)).unwrap();
    a.test(ecx, 1).unwrap();
    a.jz(even).unwrap();
    a.lea(rax, qword_ptr(redirected_odd)).unwrap();
    a.set_label(&mut even).unwrap();
    a.mov(qword_ptr(rsp), rax).unwrap();
    a.ret().unwrap();

    a.set_label(&mut outer).unwrap();
    a.call(skipper).unwrap();
    a.add(r12, 0x100).unwrap();
    a.ret().unwrap();
    a.set_label(&mut skipper).unwrap();
    a.add(rsp, 8).unwrap();
    a.ret().unwrap();
}

#[test]
fn returns_go_where_the_guest_stack_says() {
    let run = |jit: JitConfig| {
        let (mut g, shared) = guest(jit);
        g.code(64, CODE, returns_program);
        let s = g.long_mode(CODE);
        let (regs, _, _) = run_to_halt(&mut g, &s, jit, 0);
        (regs, shared)
    };
    let (want, _) = run(interp());
    assert_eq!(want[3], 40 * (600 * 601 / 2 + 1) + 20 * 0x30_0000);
    assert_eq!(want[12], 40 * 8);
    let (got, shared) = run(jit_chained());
    assert!(shared.jit_totals.translated.load(Ordering::Relaxed) > 5);
    assert_eq!(got, want, "registers after the chained jit run");
    let (got, shared) = run(jit_verified());
    assert_eq!(shared.jit_totals.mismatches.load(Ordering::Relaxed), 0);
    assert_eq!(got, want, "registers after the verified jit run");
}

#[test]
fn a_call_to_another_page_follows_a_remapping() {
    // Virtual 4 MiB (a 2 MiB page) maps first to code returning 1, then
    // to code returning 2; the caller's page keeps its mapping.
    const TARGET: u64 = 0x40_0000;
    const OTHER: u64 = 0x60_0000;
    let run = |jit: JitConfig| {
        let (mut g, _) = guest(jit);
        g.code(64, TARGET, |a| {
            a.mov(eax, 1u32).unwrap();
            a.ret().unwrap();
        });
        g.code(64, OTHER, |a| {
            a.mov(eax, 2u32).unwrap();
            a.ret().unwrap();
        });
        g.code(64, CODE, |a| {
            // The same call site before and after the remapping.
            let mut outer = a.create_label();
            let mut l1 = a.create_label();
            a.xor(ebx, ebx).unwrap();
            a.mov(r12d, 2u32).unwrap();
            a.set_label(&mut outer).unwrap();
            a.mov(ecx, 20u32).unwrap();
            a.set_label(&mut l1).unwrap();
            a.call(TARGET).unwrap();
            a.add(rbx, rax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l1).unwrap();
            // PD entry 2 → OTHER, then a TLB flush.
            a.mov(rax, OTHER | 0x87).unwrap();
            a.mov(qword_ptr(PML4 + 0x2000 + 16), rax).unwrap();
            a.mov(rax, cr3).unwrap();
            a.mov(cr3, rax).unwrap();
            a.dec(r12d).unwrap();
            a.jnz(outer).unwrap();
            a.hlt().unwrap();
        });
        let s = g.long_mode(CODE);
        run_to_halt(&mut g, &s, jit, 0).0[3]
    };
    for jit in [interp(), jit_chained(), jit_verified()] {
        assert_eq!(run(jit), 20 + 40, "{jit:?}");
    }
}

/// Guest code at `CODE` that programs a periodic LAPIC timer (vector
/// 0x40, `count` ticks of the 1 GHz bus clock; its handler counts ticks
/// in r12, rbx holds the APIC base) and then runs `body`.
fn periodic_timer_guest(g: &Guest, count: u32, body: impl FnOnce(&mut CodeAssembler)) {
    g.code(64, 0x30_0000, |a| {
        a.add(r12, 1).unwrap();
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // EOI
        a.iretq().unwrap();
    });
    g.idt64(0x40, 0x30_0000, 0);
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83); // the APIC page
    g.code(64, CODE, |a| {
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        a.mov(dword_ptr(rbx + 0x3e0), 0xb).unwrap();
        a.mov(dword_ptr(rbx + 0x320), 0x2_0040).unwrap(); // periodic, 0x40
        a.mov(dword_ptr(rbx + 0x380), count).unwrap();
        body(a);
    });
}

#[test]
fn hlt_after_sti_in_a_trace_still_wakes_for_the_timer_across_kicks() {
    // `sti; hlt` in one translation (the trace runs on past `sti`), a
    // periodic LAPIC timer, and kicks (as a pause does) while halted.
    let jit = JitConfig {
        tier: Tier::Jit,
        threshold: 0,
        idle_threshold: u64::MAX,
        verify_runs: 0,
        background: false,
    };
    let (mut g, _) = guest(jit);
    periodic_timer_guest(&g, 1_000_000, |a| {
        let mut again = a.create_label();
        a.set_label(&mut again).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cmp(r12, 20).unwrap();
        a.jb(again).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    let kicker = g.vcpu.kicker();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(3));
            kicker.kick();
        }
    });
    let t0 = std::time::Instant::now();
    let end = loop {
        let o = crate::tests::guest::run_vcpu_within(
            g.vcpu.as_mut(),
            10_000,
            std::time::Duration::from_secs(5),
            |_| 0,
            |_| 0,
        );
        if o.end != End::Interrupted || t0.elapsed() > std::time::Duration::from_secs(5) {
            break o.end;
        }
    };
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert_eq!(end, End::Halt, "timer interrupts stopped waking hlt");
    // One more tick may land between the last `cmp` and the `cli`.
    let ticks = g.state().gpr[12];
    assert!((20..=21).contains(&ticks), "{ticks} ticks");
}

#[test]
fn warm_blocks_are_translated_while_the_vcpu_halts() {
    // Nothing runs often enough to be translated in line; the loop body
    // runs often enough to be queued, and the halts between timer ticks
    // translate it.
    let jit = JitConfig {
        tier: Tier::Jit,
        threshold: 1_000_000,
        idle_threshold: 4,
        verify_runs: 0,
        background: false,
    };
    let (mut g, shared) = guest(jit);
    periodic_timer_guest(&g, 200_000, |a| {
        let mut again = a.create_label();
        let mut body = a.create_label();
        a.set_label(&mut again).unwrap();
        a.mov(ecx, 10u32).unwrap();
        a.set_label(&mut body).unwrap();
        a.add(r13, rcx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(body).unwrap();
        a.add(r14, 1).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cli().unwrap();
        a.cmp(r12, 20).unwrap();
        a.jb(again).unwrap();
        a.hlt().unwrap();
    });
    let s = g.long_mode(CODE);
    g.vcpu.set_state(&s).unwrap();
    let o = crate::tests::guest::run_vcpu_within(
        g.vcpu.as_mut(),
        10_000,
        std::time::Duration::from_secs(10),
        |_| 0,
        |_| 0,
    );
    assert_eq!(o.end, End::Halt);
    let st = g.state();
    // Ticks (r12) can outnumber passes (r14): two may land between an
    // `iret` and the `cli` after the `hlt`.
    assert!(st.gpr[12] >= 20);
    let passes = st.gpr[14];
    assert!((1..=20).contains(&passes), "{passes} passes");
    // Every pass of the loop adds 10+9+...+1, translated or not.
    assert_eq!(st.gpr[13], passes * 55);
    assert!(
        shared.jit_totals.translated.load(Ordering::Relaxed) >= 1,
        "nothing was translated in idle time"
    );
}

#[test]
fn emu_options_choose_the_tier() {
    let mem = memory();
    let hv = EmuHypervisor::new(EmuOptions {
        jit: Some(interp()),
        ..Default::default()
    });
    let _vm = hv.create_vm(&VmSpec { vcpus: 1 }, &mem).unwrap();
    assert!("jit".parse::<Tier>().is_ok());
    assert!(
        "fast"
            .parse::<Tier>()
            .unwrap_err()
            .contains("interp or jit")
    );
}

/// A string-scanning loop of the kind glibc runs (`strlen`, `memchr`):
/// aligned and unaligned loads, compares, byte masks, shuffles, shifts,
/// `ptest` flags, XMM ↔ general register moves and an unaligned store.
fn sse_program(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    a.mov(rdi, DATA).unwrap();
    a.mov(ecx, 400u32).unwrap();
    a.pxor(xmm7, xmm7).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.xor(r8d, r8d).unwrap();
    a.xor(r10d, r10d).unwrap();
    a.set_label(&mut top).unwrap();
    a.movdqa(xmm0, xmmword_ptr(rdi)).unwrap();
    a.movdqu(xmm1, xmmword_ptr(rdi + 3)).unwrap();
    a.pcmpeqb(xmm0, xmm7).unwrap();
    a.pmovmskb(eax, xmm0).unwrap();
    a.add(ebx, eax).unwrap();
    a.paddd(xmm1, xmm0).unwrap();
    a.pshufd(xmm2, xmm1, 0x1b).unwrap();
    a.punpcklbw(xmm2, xmm1).unwrap();
    a.por(xmm3, xmm2).unwrap();
    a.psubb(xmm4, xmm2).unwrap();
    a.psrldq(xmm4, 3).unwrap();
    a.pslld(xmm4, 1).unwrap();
    a.pminub(xmm3, xmm1).unwrap();
    a.pshufb(xmm5, xmm2).unwrap();
    a.movdqu(xmmword_ptr(rdi + 0x8003), xmm3).unwrap();
    a.movq(rdx, xmm4).unwrap();
    a.xor(r8, rdx).unwrap();
    a.movd(xmm6, ebx).unwrap();
    // Flags set before the block's first SSE instruction survive it.
    let mut top2 = a.create_label();
    a.cmp(ebx, 0x1234).unwrap();
    a.jmp(top2).unwrap();
    a.set_label(&mut top2).unwrap();
    a.cmp(ecx, 7).unwrap();
    a.pxor(xmm5, xmm6).unwrap();
    a.setb(r11b).unwrap();
    a.add(r10b, r11b).unwrap();
    a.ptest(xmm6, xmm3).unwrap();
    a.setz(r9b).unwrap();
    a.adc(r10, r9).unwrap();
    // pcmpistri's index lands in ECX (the upper half cleared), its
    // flags in CF/ZF/SF/OF; register and unaligned memory forms.
    a.mov(r12, rcx).unwrap();
    a.mov(rcx, 0xdead_beef_0000_0000u64).unwrap();
    a.pcmpistri(xmm1, xmmword_ptr(rdi + 5), 0x0c).unwrap();
    a.adc(r10, rcx).unwrap();
    a.pcmpistri(xmm2, xmm0, 0x48).unwrap();
    a.seto(r13b).unwrap();
    a.lea(r10, r10 + rcx * 2).unwrap();
    a.add(r10, r13).unwrap();
    a.mov(rcx, r12).unwrap();
    a.add(rdi, 16).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
}

fn run_sse(jit: JitConfig) -> (Vec<u64>, [u128; 16], u64, Arc<VmShared>) {
    let (mut g, shared) = guest(jit);
    g.code(64, CODE, sse_program);
    for k in 0..0x1000u64 {
        // Some zero bytes for the compares to find.
        let v = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        g.write_u64(
            DATA + 8 * k,
            if k % 5 == 0 {
                v & 0xff00_ff00_ffff_00ff
            } else {
                v
            },
        );
    }
    let mut s = g.long_mode(CODE);
    s.cr4 |= crate::cpu::CR4_OSFXSR;
    let (regs, xmm, sum) = run_to_halt(&mut g, &s, jit, 0x1_0000);
    (regs, xmm, sum, shared)
}

#[test]
fn translated_sse_ends_where_the_interpreter_does() {
    let want = run_sse(interp());
    for jit in [jit_verified(), jit_chained()] {
        let got = run_sse(jit);
        assert_eq!(got.3.jit_totals.mismatches.load(Ordering::Relaxed), 0);
        assert!(got.3.jit_totals.translated.load(Ordering::Relaxed) > 0);
        assert_eq!(got.0, want.0, "registers");
        assert_eq!(got.1, want.1, "xmm registers");
        assert_eq!(got.2, want.2, "memory");
    }
}

#[test]
fn translated_sse_faults_like_the_interpreter() {
    // A misaligned movdqa raises #GP(0); with CR0.TS set, #NM. The
    // handler records the vector's RIP; nothing after the fault ran.
    for (ts, misalign, vector) in [(false, 8u64, 13u8), (true, 0, 7)] {
        for jit in [interp(), jit_verified(), jit_chained()] {
            let (mut g, _) = guest(jit);
            const HANDLER: u64 = CODE + 0x800;
            g.code(64, HANDLER, |a| {
                let skip = if vector == 13 { 8 } else { 0 };
                a.mov(rax, qword_ptr(rsp + skip)).unwrap();
                a.mov(qword_ptr(0x3000u64), rax).unwrap();
                a.mov(qword_ptr(0x3008u64), rbx).unwrap();
                a.hlt().unwrap();
            });
            g.idt64(vector, HANDLER, 0);
            g.code(64, CODE, |a| {
                let mut top = a.create_label();
                a.mov(ecx, 20u32).unwrap();
                a.mov(rdi, DATA).unwrap();
                a.set_label(&mut top).unwrap();
                a.add(rbx, 1).unwrap();
                a.dec(ecx).unwrap();
                a.jnz(top).unwrap();
                a.movdqa(xmm0, xmmword_ptr(rdi + misalign as i32)).unwrap();
                a.add(rbx, 100).unwrap();
                a.hlt().unwrap();
            });
            let mut s = g.long_mode(CODE);
            s.cr4 |= crate::cpu::CR4_OSFXSR;
            if ts {
                s.cr0 |= crate::cpu::CR0_TS;
            }
            g.vcpu.set_state(&s).unwrap();
            let o = g.run_with(100_000, |_| 0, |_| 0);
            assert_eq!(o.end, End::Halt, "{:?}", jit.tier);
            assert_eq!(g.read_u64(0x3008), 20, "rbx at the fault ({:?})", jit.tier);
            let at = g.read_u64(0x3000);
            assert!(at > CODE && at < CODE + 0x40, "fault RIP {at:#x}");
        }
    }
}

fn idle_job(serial: u64) -> super::Job {
    let mut bytes = vec![0u8; super::COPY].into_boxed_slice();
    bytes[0] = 0x90;
    super::Job {
        serial,
        code: super::GuestCode {
            rip: 0x1000,
            len: 1,
            avail: 1,
            bytes,
        },
        generation_word: (0, 0),
        attention: 0,
        chain: true,
    }
}

#[test]
fn a_full_idle_queue_drops_its_least_recently_seen_job() {
    let mut q = super::IdleQueue::new();
    let n = super::QUEUE as u64;
    for serial in 1..=n {
        q.push(idle_job(serial), 8, 0);
    }
    // Block 1 ran again: block 2's job is now the least recently seen.
    assert!(q.touch(1, 12, 100, 32));
    for serial in n + 1..=n + 3 {
        q.push(idle_job(serial), 8, 100);
    }
    assert_eq!(q.jobs.len(), super::QUEUE);
    assert!(
        (2..=4).all(|s| !q.jobs.contains_key(&s)),
        "the least recent went"
    );
    assert!(q.jobs.contains_key(&1) && !q.touch(2, 12, 100, 32));
    // Their buffers wait for the next jobs.
    assert_eq!(q.spare.len(), 3);
    // A job taken in line is gone; idle time takes the timed job first,
    // then the newest of the rest.
    assert_eq!(q.take(n + 3).map(|j| j.serial), Some(n + 3));
    assert_eq!(q.pop_next(100).map(|j| j.serial), Some(1));
    assert_eq!(q.pop_next(100).map(|j| j.serial), Some(n + 2));
    let (ins, insns) = q.jobs[&5].job.code.decode().expect("a nop decodes");
    assert_eq!((ins.len(), insns.len()), (1, 1));
    // Jobs taken in line, or seen again and again, never leave the
    // order unbounded.
    for serial in n + 4..n + 4 + 4 * n {
        q.push(idle_job(serial), 8, serial);
        q.touch(5, serial % 24 + 8, serial, 32);
        q.take(serial);
    }
    assert!(q.order.len() <= 2 * super::QUEUE, "{}", q.order.len());
    assert!(q.urgent.len() <= 2 * super::QUEUE, "{}", q.urgent.len());
    q.forget_all();
    assert!(q.jobs.is_empty() && q.order.is_empty() && q.urgent.is_empty());
}

#[test]
fn idle_time_takes_the_block_due_soonest_and_cooled_ones_last() {
    let mut q = super::IdleQueue::new();
    for serial in 1..=4 {
        q.push(idle_job(serial), 8, 0);
    }
    // Block 1: 4 runs in 1,000 instructions, 20 more to go: due at
    // 6,000. Block 2: 4 runs in 400: due at 2,400. Block 3: 4 runs in
    // 100, due at 600, but by 5,000 it has not turned hot: it cooled.
    q.touch(1, 12, 1_000, 32);
    q.touch(2, 12, 400, 32);
    q.touch(3, 12, 100, 32);
    assert_eq!(q.jobs[&2].deadline, 2_400);
    let order: Vec<u64> = std::iter::from_fn(|| q.pop_next(5_000).map(|j| j.serial)).collect();
    // Block 2's deadline passed too (2,400 < 5,000): both cooled ones
    // come after block 4, seen once, newest first.
    assert_eq!(order, [1, 4, 3, 2]);
}

/// Accesses that cross a page always leave translated code for the
/// interpreter (the shared slow path, `helpers::interp_site`): changed
/// guest registers held in host registers, flags live across the access
/// (in the host RFLAGS and parked), a load and a store, and the block
/// goes on after each with the interpreter's results.
#[test]
fn page_crossing_accesses_go_through_the_interpreter_and_back() {
    let program = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.mov(rsi, DATA).unwrap();
        a.mov(ecx, 500u32).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.mov(r8, 0x1234u64).unwrap();
        a.xor(r9d, r9d).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rbx, rcx).unwrap();
        a.lea(r8, r8 + rbx * 2 + 1).unwrap();
        a.mov(edx, ecx).unwrap();
        a.and(edx, 7).unwrap();
        a.cmp(rbx, 60_000).unwrap();
        // Crosses from DATA's first page into its second unless edx is 7.
        a.mov(rax, qword_ptr(rsi + rdx + 0xff9)).unwrap();
        a.adc(rax, r8).unwrap();
        a.cmp(rax, r9).unwrap();
        a.mov(qword_ptr(rsi + rdx + 0x1ffa), rax).unwrap();
        a.sbb(r9, rax).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    };
    let run = |jit: JitConfig| run_program(jit, program, 0x800, 0x4000);
    let (want, want_sum, _) = run(interp());
    for jit in [jit_chained(), jit_verified()] {
        let (got, got_sum, shared) = run(jit);
        assert!(shared.jit_totals.translated.load(Ordering::Relaxed) > 0);
        assert_eq!(shared.jit_totals.mismatches.load(Ordering::Relaxed), 0);
        assert_eq!(got, want, "registers");
        assert_eq!(got_sum, want_sum, "memory");
    }
}
