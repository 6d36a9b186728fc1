//! The guest-visible debug architecture (SDM vol. 3, ch. 18): DR0–DR3
//! breakpoints, DR6/DR7, general detect, single step, RF, the MOV SS and
//! STI shadows, `int1` and #DB priority. Each guest's handlers record
//! what they saw (vector, error code, DR6, the pushed RIP and RFLAGS,
//! DR7) in memory; the tests assert those records.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;
use vmplay_hypervisor::{CpuState, Segment};

use super::guest::*;

/// Number of records, then the records.
const COUNT: u64 = DATA;
const LOG: u64 = DATA + 0x40;
/// Words the breakpoints watch.
const WATCHED: u64 = DATA + 0x1000;
const HANDLERS: u64 = 0x30_0000;
const NO_CODE: u64 = u64::MAX;
const TF: u64 = 1 << 8;
const RF: u64 = 1 << 16;
const DR6_BS: u64 = 1 << 14;
const DR6_BD: u64 = 1 << 13;
/// DR6 with no status bits.
const DR6_CLEAR: u64 = 0xffff_0ff0;

/// One event as its handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    vector: u64,
    code: u64,
    dr6: u64,
    rip: u64,
    rflags: u64,
    dr7: u64,
}

impl Rec {
    fn tf(&self) -> bool {
        self.rflags & TF != 0
    }
    fn rf(&self) -> bool {
        self.rflags & RF != 0
    }
}

/// How a recording handler returns.
#[derive(Clone, Copy)]
enum Then {
    Iret,
    /// Sets RF in the image first, as a debugger resuming from an
    /// instruction breakpoint does.
    IretRf,
    /// Clears TF in the image first: stepping ends.
    IretNoTf,
    Halt,
}

/// A handler for `vector` at `at` that appends a [`Rec`] (and resets DR6
/// so each record shows its own status bits), then does `then`.
fn recorder(g: &Guest, at: u64, vector: u8, has_code: bool, then: Then) {
    g.code(64, at, |a| {
        a.push(rax).unwrap();
        a.push(rbx).unwrap();
        a.mov(rbx, qword_ptr(COUNT)).unwrap();
        a.imul_3(rbx, rbx, 48).unwrap();
        a.add(rbx, LOG as i32).unwrap();
        a.mov(qword_ptr(rbx), i32::from(vector)).unwrap();
        let frame = if has_code {
            a.mov(rax, qword_ptr(rsp + 16)).unwrap();
            a.mov(qword_ptr(rbx + 8), rax).unwrap();
            24
        } else {
            a.mov(qword_ptr(rbx + 8), -1).unwrap();
            16
        };
        a.mov(rax, dr6).unwrap();
        a.mov(qword_ptr(rbx + 16), rax).unwrap();
        a.mov(rax, qword_ptr(rsp + frame)).unwrap();
        a.mov(qword_ptr(rbx + 24), rax).unwrap();
        a.mov(rax, qword_ptr(rsp + frame + 16)).unwrap();
        a.mov(qword_ptr(rbx + 32), rax).unwrap();
        a.mov(rax, dr7).unwrap();
        a.mov(qword_ptr(rbx + 40), rax).unwrap();
        a.inc(qword_ptr(COUNT)).unwrap();
        a.xor(eax, eax).unwrap();
        a.mov(dr6, rax).unwrap();
        match then {
            Then::IretRf => a.or(qword_ptr(rsp + frame + 16), RF as i32).unwrap(),
            Then::IretNoTf => a.and(qword_ptr(rsp + frame + 16), !(TF as i32)).unwrap(),
            Then::Iret | Then::Halt => {}
        }
        if let Then::Halt = then {
            a.hlt().unwrap();
            return;
        }
        a.pop(rbx).unwrap();
        a.pop(rax).unwrap();
        if has_code {
            a.add(rsp, 8).unwrap();
        }
        a.iretq().unwrap();
    });
}

fn records(g: &Guest) -> Vec<Rec> {
    (0..g.read_u64(COUNT))
        .map(|k| {
            let r = LOG + 48 * k;
            Rec {
                vector: g.read_u64(r),
                code: g.read_u64(r + 8),
                dr6: g.read_u64(r + 16),
                rip: g.read_u64(r + 24),
                rflags: g.read_u64(r + 32),
                dr7: g.read_u64(r + 40),
            }
        })
        .collect()
}

/// A long-mode guest whose #DB handler records and returns by `then`,
/// other exceptions reporting through the harness' stubs.
fn guest(then: Then) -> (Guest, CpuState) {
    let g = Guest::with_exception_stubs(1);
    let s = g.long_mode(CODE);
    recorder(&g, HANDLERS, 1, false, then);
    g.idt64(1, HANDLERS, 0);
    (g, s)
}

/// Assembles `f` at `ip`; returns the addresses of the labels `f` lists.
fn place(g: &Guest, ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Vec<CodeLabel>) -> Vec<u64> {
    let mut a = CodeAssembler::new(64).unwrap();
    let labels = f(&mut a);
    let r = a
        .assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    g.write(ip, &r.inner.code_buffer);
    labels.iter().map(|l| r.label_ip(l).unwrap()).collect()
}

/// A label on the next instruction.
fn here(a: &mut CodeAssembler) -> CodeLabel {
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    l
}

/// `mov drN, value` through rax.
fn set_dr(a: &mut CodeAssembler, n: u8, v: u64) {
    a.mov(rax, v).unwrap();
    let r = [dr0, dr1, dr2, dr3, dr4, dr5, dr6, dr7][usize::from(n)];
    a.mov(r, rax).unwrap();
}

/// DR7 bits: breakpoint `n` locally enabled with R/W `rw` and LEN `len`.
fn bp(n: u64, rw: u64, len: u64) -> u64 {
    (1 << (2 * n)) | (rw << (16 + 4 * n)) | (len << (18 + 4 * n))
}

/// pushfq; or TF; popfq: single step starts after the next instruction.
fn set_tf(a: &mut CodeAssembler) {
    a.pushfq().unwrap();
    a.or(qword_ptr(rsp), TF as i32).unwrap();
    a.popfq().unwrap();
}

fn run(g: &mut Guest, s: &CpuState) -> Outcome {
    let o = g.start(s);
    assert!(o.halted(), "{:?} at {:#x}", o.end, o.state.rip);
    o
}

#[test]
fn an_instruction_breakpoint_is_a_fault_and_rf_lets_the_instruction_run() {
    let (mut g, s) = guest(Then::IretRf);
    let target = CODE + 0x100;
    g.code(64, CODE, |a| {
        set_dr(a, 0, target);
        set_dr(a, 7, bp(0, 0, 0));
        a.xor(ecx, ecx).unwrap();
        a.mov(edx, 2).unwrap();
        a.jmp(target).unwrap();
    });
    // The breakpointed instruction runs twice: RF, set by the handler's
    // iret, covers one execution and is cleared after it.
    g.code(64, target, |a| {
        a.inc(ecx).unwrap(); // 2 bytes
        a.dec(edx).unwrap();
        a.jnz(target).unwrap();
        a.hlt().unwrap();
    });
    let o = run(&mut g, &s);
    assert_eq!(o.vector, None, "no other exception");
    assert_eq!(o.state.gpr[1], 2, "the instruction ran each time");
    let r = records(&g);
    assert_eq!(r.len(), 2, "{r:x?}");
    for rec in &r {
        assert_eq!(rec.vector, 1);
        assert_eq!(rec.code, NO_CODE);
        assert_eq!(rec.dr6, DR6_CLEAR | 1, "B0");
        assert_eq!(rec.rip, target, "a fault: RIP at the instruction");
        assert!(
            !rec.rf() && !rec.tf(),
            "RF pushed as it was: {:#x}",
            rec.rflags
        );
        assert_eq!(rec.dr7, 0x400 | bp(0, 0, 0));
    }
    assert_eq!(o.state.rflags & RF, 0, "RF cleared after the instruction");
}

#[test]
fn data_breakpoints_trap_after_the_access_with_aligned_lengths() {
    let (mut g, s) = guest(Then::Iret);
    let l = place(&g, CODE, |a| {
        // DR1: write, 4 bytes at WATCHED+6 → covers WATCHED+4..+8.
        set_dr(a, 1, WATCHED + 6);
        // DR2: read or write, 8 bytes at WATCHED+0x10.
        set_dr(a, 2, WATCHED + 0x13);
        set_dr(a, 7, bp(1, 1, 3) | bp(2, 3, 2));
        a.mov(eax, dword_ptr(WATCHED + 4)).unwrap(); // a read: DR1 ignores it
        a.mov(byte_ptr(WATCHED + 3), 1).unwrap(); // below the range
        a.mov(byte_ptr(WATCHED + 4), 7).unwrap(); // hits DR1
        let a1 = here(a);
        a.mov(eax, dword_ptr(WATCHED + 0x14)).unwrap(); // hits DR2 (read)
        let a2 = here(a);
        a.mov(al, byte_ptr(WATCHED + 0x18)).unwrap(); // past DR2
        a.mov(word_ptr(WATCHED + 2), 0x55).unwrap(); // up to +3, misses DR1
        a.hlt().unwrap();
        vec![a1, a2]
    });
    let o = run(&mut g, &s);
    assert_eq!(o.vector, None);
    assert_eq!(g.read_u64(WATCHED) >> 32 & 0xff, 7, "the store completed");
    let r = records(&g);
    assert_eq!(r.len(), 2, "{r:x?}");
    assert_eq!((r[0].dr6, r[0].rip), (DR6_CLEAR | 2, l[0]), "B1, a trap");
    assert_eq!((r[1].dr6, r[1].rip), (DR6_CLEAR | 4, l[1]), "B2 on a read");
    assert!(r.iter().all(|r| !r.rf() && !r.tf()));
}

#[test]
fn single_step_and_several_breakpoints_report_in_one_db() {
    let (mut g, s) = guest(Then::IretNoTf);
    let l = place(&g, CODE, |a| {
        set_dr(a, 0, WATCHED);
        // DR1 matches too but is disabled: DR6 still reports it.
        set_dr(a, 1, WATCHED);
        set_dr(a, 3, WATCHED + 4);
        set_dr(a, 7, bp(0, 1, 3) | (1 << 20) | (3 << 22) | bp(3, 3, 0));
        set_tf(a);
        a.mov(qword_ptr(WATCHED), rax).unwrap();
        let after = here(a);
        a.hlt().unwrap();
        vec![after]
    });
    let o = run(&mut g, &s);
    let r = records(&g);
    assert_eq!(r.len(), 1, "one #DB: {r:x?}");
    assert_eq!(r[0].dr6, DR6_CLEAR | DR6_BS | 0b1011, "BS, B0, B1, B3");
    assert_eq!(r[0].rip, l[0]);
    assert!(r[0].tf() && !r[0].rf());
    assert_eq!(o.state.rflags & TF, 0);
}

#[test]
fn io_breakpoints_need_cr4_de() {
    for de in [false, true] {
        let (mut g, mut s) = guest(Then::Iret);
        if de {
            s.cr4 |= 1 << 3;
        }
        let l = place(&g, CODE, |a| {
            set_dr(a, 2, 0x72); // 2 bytes: 0x72, 0x73
            set_dr(a, 7, bp(2, 2, 1));
            a.mov(al, 9).unwrap();
            a.out(0x71, al).unwrap(); // misses
            a.out(0x73, al).unwrap(); // hits
            let after = here(a);
            a.mov(dx, 0x70).unwrap();
            a.out(dx, eax).unwrap(); // 0x70..0x73: hits
            let after2 = here(a);
            a.hlt().unwrap();
            vec![after, after2]
        });
        let o = run(&mut g, &s);
        let out: Vec<_> = o.ports.iter().map(|p| p.0).collect();
        assert_eq!(out, [0x71, 0x73, 0x70], "each out reached the machine once");
        let r = records(&g);
        if de {
            assert_eq!(r.len(), 2, "{r:x?}");
            assert_eq!((r[0].dr6, r[0].rip), (DR6_CLEAR | 4, l[0]));
            assert_eq!((r[1].dr6, r[1].rip), (DR6_CLEAR | 4, l[1]));
        } else {
            assert!(
                r.is_empty(),
                "R/W=10b without CR4.DE matches nothing: {r:x?}"
            );
        }
    }
}

#[test]
fn general_detect_faults_before_a_dr_access_and_clears_gd() {
    let (mut g, s) = guest(Then::Iret);
    let l = place(&g, CODE, |a| {
        set_dr(a, 0, 0x1234);
        set_dr(a, 7, 1 << 13);
        let access = here(a);
        a.mov(rbx, dr0).unwrap();
        a.hlt().unwrap();
        vec![access]
    });
    let o = run(&mut g, &s);
    let r = records(&g);
    assert_eq!(r.len(), 1, "{r:x?}");
    assert_eq!(r[0].dr6, DR6_CLEAR | DR6_BD);
    assert_eq!(r[0].rip, l[0], "a fault: RIP at the mov");
    assert!(r[0].rf(), "faults push RF set");
    assert_eq!(r[0].dr7, 0x400, "GD cleared for the handler");
    assert_eq!(o.state.gpr[3], 0x1234, "the mov ran after the handler");
}

#[test]
fn dr4_and_dr5_alias_dr6_and_dr7_unless_cr4_de() {
    let (mut g, s) = guest(Then::Halt);
    g.code(64, CODE, |a| {
        set_dr(a, 6, u64::MAX >> 32); // writable bits only
        a.mov(rbx, dr4).unwrap();
        set_dr(a, 5, 0x30002); // G0, RW0 = 11
        a.mov(rcx, dr7).unwrap();
        a.mov(rax, dr5).unwrap();
        a.mov(rdx, rax).unwrap();
        a.hlt().unwrap();
    });
    let o = run(&mut g, &s);
    assert_eq!(o.state.gpr[3], DR6_CLEAR | 0xe00f, "dr4 reads DR6");
    assert_eq!(o.state.gpr[1], 0x30402, "dr5 wrote DR7");
    assert_eq!(o.state.gpr[2], 0x30402, "dr5 reads DR7");

    let (mut g, mut s) = guest(Then::Halt);
    s.cr4 |= 1 << 3;
    g.code(64, CODE, |a| {
        a.mov(rax, dr4).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(run(&mut g, &s).vector, Some(6), "#UD with CR4.DE");

    // Upper bits of DR6/DR7 are reserved: #GP(0).
    let (mut g, s) = guest(Then::Halt);
    recorder(&g, HANDLERS + 0x200, 13, true, Then::Halt);
    g.idt64(13, HANDLERS + 0x200, 0);
    g.code(64, CODE, |a| set_dr(a, 7, 1 << 32));
    run(&mut g, &s);
    let r = records(&g);
    assert_eq!((r[0].vector, r[0].code, r[0].rip), (13, 0, CODE + 10));
}

#[test]
fn single_step_traps_after_each_instruction_but_not_after_the_one_setting_tf() {
    let (mut g, s) = guest(Then::Iret);
    let l = place(&g, CODE, |a| {
        set_tf(a);
        a.nop().unwrap();
        let l1 = here(a);
        a.inc(ecx).unwrap();
        let l2 = here(a);
        a.pushfq().unwrap();
        let l3 = here(a);
        a.and(qword_ptr(rsp), !(TF as i32)).unwrap();
        let l4 = here(a);
        // TF was set as popf started: it still traps.
        a.popfq().unwrap();
        let l5 = here(a);
        a.nop().unwrap();
        a.hlt().unwrap();
        vec![l1, l2, l3, l4, l5]
    });
    run(&mut g, &s);
    let r = records(&g);
    let rips: Vec<u64> = r.iter().map(|r| r.rip).collect();
    assert_eq!(rips, l, "{r:x?}");
    for (k, rec) in r.iter().enumerate() {
        assert_eq!(rec.dr6, DR6_CLEAR | DR6_BS);
        assert!(!rec.rf());
        assert_eq!(rec.tf(), k < 4, "the popf cleared TF in the last image");
    }
}

#[test]
fn iret_setting_tf_traps_after_the_next_instruction() {
    let (mut g, s) = guest(Then::IretNoTf);
    let l = place(&g, CODE, |a| {
        let mut target = a.create_label();
        a.mov(rax, rsp).unwrap();
        a.push(i32::from(KDATA)).unwrap();
        a.push(rax).unwrap();
        a.push(0x102).unwrap(); // TF
        a.push(i32::from(KCODE)).unwrap();
        a.lea(rax, ptr(target)).unwrap();
        a.push(rax).unwrap();
        a.iretq().unwrap();
        a.set_label(&mut target).unwrap();
        a.inc(ecx).unwrap();
        let after = here(a);
        a.hlt().unwrap();
        vec![after]
    });
    run(&mut g, &s);
    let r = records(&g);
    assert_eq!(r.len(), 1, "{r:x?}");
    assert_eq!((r[0].rip, r[0].dr6), (l[0], DR6_CLEAR | DR6_BS));
}

#[test]
fn sysret_with_tf_traps_before_user_code_and_syscall_masking_tf_does_not_trap() {
    const USER: u64 = CODE + 0x800;
    const ENTRY: u64 = CODE + 0xc00;
    let (mut g, s) = guest(Then::Iret);
    let wrmsr = |a: &mut CodeAssembler, msr: u32, v: u64| {
        a.mov(ecx, msr).unwrap();
        a.mov(eax, v as u32).unwrap();
        a.mov(edx, (v >> 32) as u32).unwrap();
        a.wrmsr().unwrap();
    };
    g.code(64, CODE, |a| {
        wrmsr(a, 0xc000_0081, (0x20u64 << 48) | (u64::from(KCODE) << 32));
        wrmsr(a, 0xc000_0082, ENTRY);
        wrmsr(a, 0xc000_0084, TF | 0x200);
        a.mov(rcx, USER).unwrap();
        a.mov(r11, TF | 2).unwrap();
        a.mov(rsp, STACK - 0x1000).unwrap();
        a.sysretq().unwrap();
    });
    let l = place(&g, USER, |a| {
        let u1 = here(a);
        a.nop().unwrap();
        let u2 = here(a);
        a.syscall().unwrap();
        vec![u1, u2]
    });
    g.code(64, ENTRY, |a| a.hlt().unwrap());
    let o = run(&mut g, &s);
    assert_eq!(o.state.rip, ENTRY + 1, "halted in the kernel entry");
    assert_eq!(o.state.rflags & TF, 0, "FMASK cleared TF");
    let r = records(&g);
    let rips: Vec<u64> = r.iter().map(|r| r.rip).collect();
    assert_eq!(
        rips, l,
        "after sysret, after the nop; none in the kernel: {r:x?}"
    );
    assert!(r.iter().all(|r| r.dr6 == DR6_CLEAR | DR6_BS && r.tf()));
}

#[test]
fn rep_strings_single_step_each_iteration_with_rf_until_the_last() {
    let (mut g, s) = guest(Then::Iret);
    let l = place(&g, CODE, |a| {
        a.mov(rdi, WATCHED).unwrap();
        a.mov(ecx, 3).unwrap();
        a.mov(al, 0xab).unwrap();
        set_tf(a);
        a.nop().unwrap();
        let rep = here(a);
        a.rep().stosb().unwrap();
        let after = here(a);
        // Stepping ends: three more traps (the popf clearing TF too).
        a.pushfq().unwrap();
        a.and(qword_ptr(rsp), !(TF as i32)).unwrap();
        a.popfq().unwrap();
        a.hlt().unwrap();
        vec![rep, after]
    });
    run(&mut g, &s);
    let r = records(&g);
    assert_eq!(r.len(), 7, "{r:x?}");
    let seen: Vec<(u64, bool)> = r[..4].iter().map(|r| (r.rip, r.rf())).collect();
    assert_eq!(
        seen,
        [(l[0], false), (l[0], true), (l[0], true), (l[1], false)],
        "after the nop, then each iteration: {r:x?}"
    );
    assert_eq!(g.read_u64(WATCHED) & 0xff_ffff, 0xab_abab);
}

#[test]
fn a_data_breakpoint_inside_rep_movs_traps_mid_string_once() {
    let (mut g, s) = guest(Then::Iret);
    g.write(WATCHED + 0x100, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let l = place(&g, CODE, |a| {
        set_dr(a, 0, WATCHED + 2);
        set_dr(a, 7, bp(0, 1, 0));
        a.mov(rsi, WATCHED + 0x100).unwrap();
        a.mov(rdi, WATCHED).unwrap();
        a.mov(ecx, 8).unwrap();
        let rep = here(a);
        a.rep().movsb().unwrap();
        a.mov(rbx, rcx).unwrap();
        a.hlt().unwrap();
        vec![rep]
    });
    let o = run(&mut g, &s);
    let r = records(&g);
    assert_eq!(r.len(), 1, "{r:x?}");
    assert_eq!(
        (r[0].rip, r[0].dr6),
        (l[0], DR6_CLEAR | 1),
        "RIP on the rep"
    );
    assert!(r[0].rf(), "iterations remain: RF pushed set");
    assert_eq!(
        g.read_u64(WATCHED),
        0x0807_0605_0403_0201,
        "the copy finished"
    );
    assert_eq!(o.state.gpr[3], 0);
}

#[test]
fn mov_ss_holds_traps_and_breakpoints_for_one_instruction() {
    let (mut g, s) = guest(Then::IretNoTf);
    g.write_u64(WATCHED, u64::from(KDATA));
    let l = place(&g, CODE, |a| {
        let mut next = a.create_label();
        set_dr(a, 0, WATCHED);
        a.lea(rax, ptr(next)).unwrap();
        a.mov(dr1, rax).unwrap();
        // DR0: reads of the selector; DR1: the instruction after mov ss.
        set_dr(a, 7, bp(0, 3, 1) | bp(1, 0, 0));
        // TF traps from the mov ss on (popf itself does not trap).
        set_tf(a);
        a.mov(ss, word_ptr(WATCHED)).unwrap();
        a.set_label(&mut next).unwrap();
        a.inc(ecx).unwrap();
        let after = here(a);
        a.hlt().unwrap();
        vec![next, after]
    });
    run(&mut g, &s);
    let r = records(&g);
    // One #DB after the instruction the shadow covers, with the mov ss's
    // step and data hit; the instruction breakpoint on the shadowed
    // instruction is not taken.
    assert_eq!(r.len(), 1, "{r:x?}");
    assert_eq!(r[0].rip, l[1]);
    assert_eq!(r[0].dr6, DR6_CLEAR | DR6_BS | 1);
    assert!(r[0].tf() && !r[0].rf());
}

#[test]
fn icebp_is_a_db_trap_without_the_gate_dpl_check_or_bs() {
    let (mut g, mut s) = guest(Then::Halt);
    // #DB gate DPL 0: `int 1` from ring 3 faults, `int1` does not.
    g.write(IDT + 16 + 5, &[0x8e]);
    recorder(&g, HANDLERS + 0x200, 13, true, Then::Halt);
    g.idt64(13, HANDLERS + 0x200, 0);
    s.cs = Segment {
        selector: UCODE | 3,
        dpl: 3,
        ..s.cs
    };
    s.ss = Segment {
        selector: UDATA | 3,
        dpl: 3,
        ..s.ss
    };
    s.gpr[4] = STACK - 0x1000;
    for (icebp, want, at) in [(true, 1u64, CODE), (false, 13, CODE + 0x100)] {
        g.write_u64(COUNT, 0);
        s.rip = at;
        let l = place(&g, at, |a| {
            if icebp {
                a.int1().unwrap();
            } else {
                a.int(1).unwrap();
            }
            let after = here(a);
            a.hlt().unwrap();
            vec![after]
        });
        run(&mut g, &s);
        let r = records(&g);
        assert_eq!(r.len(), 1, "{r:x?}");
        assert_eq!(r[0].vector, want);
        if icebp {
            assert_eq!((r[0].rip, r[0].dr6), (l[0], DR6_CLEAR), "a trap, no BS");
        } else {
            assert_eq!(r[0].code, 8 + 2, "#GP(IDT vector 1)");
        }
    }
}

#[test]
fn faults_push_rf_and_software_interrupts_do_not_single_step() {
    let (mut g, s) = guest(Then::Iret);
    recorder(&g, HANDLERS + 0x200, 0x40, false, Then::Iret);
    g.idt64(0x40, HANDLERS + 0x200, 0);
    recorder(&g, HANDLERS + 0x400, 6, false, Then::Halt);
    g.idt64(6, HANDLERS + 0x400, 0);
    let l = place(&g, CODE, |a| {
        set_tf(a);
        a.nop().unwrap();
        let int = here(a);
        a.int(0x40).unwrap();
        let next = here(a);
        a.nop().unwrap();
        let ud = here(a);
        a.ud2().unwrap();
        vec![int, next, ud]
    });
    run(&mut g, &s);
    let r = records(&g);
    let seen: Vec<(u64, u64)> = r.iter().map(|r| (r.vector, r.rip)).collect();
    // #DB after the nop; int 0x40 (no #DB for it, its handler not
    // stepped); #DB after the nop behind it; #UD, a fault, RF pushed set.
    assert_eq!(
        seen,
        [(1, l[0]), (0x40, l[1]), (1, l[2]), (6, l[2])],
        "{r:x?}"
    );
    assert!(
        !r[1].rf() && r[1].tf(),
        "software interrupt: RF 0, TF as it was"
    );
    assert!(r[3].rf() && r[3].tf(), "fault: RF pushed set");
}

#[test]
fn an_instruction_breakpoint_comes_before_the_fetch_page_fault() {
    const UNMAPPED: u64 = 0x4000_0000;
    let (mut g, s) = guest(Then::IretRf);
    recorder(&g, HANDLERS + 0x200, 14, true, Then::Halt);
    g.idt64(14, HANDLERS + 0x200, 0);
    g.code(64, CODE, |a| {
        set_dr(a, 0, UNMAPPED);
        set_dr(a, 7, bp(0, 0, 0));
        a.mov(rax, UNMAPPED).unwrap();
        a.jmp(rax).unwrap();
    });
    run(&mut g, &s);
    let r = records(&g);
    let seen: Vec<(u64, u64)> = r.iter().map(|r| (r.vector, r.rip)).collect();
    assert_eq!(seen, [(1, UNMAPPED), (14, UNMAPPED)], "{r:x?}");
    assert_eq!(r[1].code, 0x10, "#PF: instruction fetch, not present");
    assert!(r[1].rf());
}

#[test]
fn a_trap_db_comes_before_a_pending_interrupt() {
    const LAPIC: u64 = 0xfee0_0000;
    let (mut g, s) = guest(Then::IretNoTf);
    // A 1 GiB page over the LAPIC.
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    recorder(&g, HANDLERS + 0x200, 0x40, false, Then::Iret);
    g.idt64(0x40, HANDLERS + 0x200, 0);
    // The interrupt handler's EOI goes in before its iret.
    let l = place(&g, CODE, |a| {
        a.mov(rbx, LAPIC).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        a.sti().unwrap();
        // TF traps after the next instruction: a self-IPI, pending as
        // that instruction ends, together with the trap.
        set_tf(a);
        a.mov(dword_ptr(rbx + 0x300), 0x4_0040).unwrap();
        let after = here(a);
        a.cli().unwrap();
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap();
        a.hlt().unwrap();
        vec![after]
    });
    run(&mut g, &s);
    let r = records(&g);
    let seen: Vec<(u64, u64)> = r.iter().map(|r| (r.vector, r.rip)).collect();
    assert_eq!(
        seen,
        [(1, l[0]), (0x40, l[0])],
        "the #DB trap of the IPI write, then the interrupt: {r:x?}"
    );
}

#[test]
fn the_sti_shadow_holds_interrupts_but_not_single_step() {
    const LAPIC: u64 = 0xfee0_0000;
    for step in [false, true] {
        let (mut g, s) = guest(Then::IretNoTf);
        g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
        recorder(&g, HANDLERS + 0x200, 0x40, false, Then::Iret);
        g.idt64(0x40, HANDLERS + 0x200, 0);
        let l = place(&g, CODE, |a| {
            a.mov(rbx, LAPIC).unwrap();
            a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
            // Pending while IF=0.
            a.mov(dword_ptr(rbx + 0x300), 0x4_0040).unwrap();
            if step {
                set_tf(a);
            }
            a.sti().unwrap();
            let after_sti = here(a);
            a.nop().unwrap();
            let after_nop = here(a);
            a.cli().unwrap();
            a.hlt().unwrap();
            vec![after_sti, after_nop]
        });
        run(&mut g, &s);
        let r = records(&g);
        let seen: Vec<(u64, u64)> = r.iter().map(|r| (r.vector, r.rip)).collect();
        if step {
            // The trap after sti is not held; the interrupt comes when
            // the #DB handler's iret sets IF, before the nop.
            assert_eq!(seen, [(1, l[0]), (0x40, l[0])], "{r:x?}");
        } else {
            assert_eq!(
                seen,
                [(0x40, l[1])],
                "after the instruction behind sti: {r:x?}"
            );
        }
    }
}

/// 32-bit protected mode: a 32-bit gate, the same rules for RF.
#[test]
fn protected_mode_delivery_pushes_rf_for_faults_only() {
    const SAVED: u64 = DATA + 0x800;
    let mut g = Guest::with_exception_stubs(1);
    let s = g.protected32(CODE);
    // Records EIP, EFLAGS and DR6 of a frame without an error code, then
    // returns with RF set (#DB) or halts (#UD).
    let handler = |g: &Guest, at: u64, slot: u64, resume: bool| {
        g.asm(32, at, |a| {
            a.push(eax).unwrap();
            a.mov(eax, dword_ptr(esp + 4)).unwrap();
            a.mov(dword_ptr(SAVED + slot), eax).unwrap();
            a.mov(eax, dword_ptr(esp + 12)).unwrap();
            a.mov(dword_ptr(SAVED + slot + 4), eax).unwrap();
            a.mov(eax, dr6).unwrap();
            a.mov(dword_ptr(SAVED + slot + 8), eax).unwrap();
            if resume {
                a.or(dword_ptr(esp + 12), RF as i32).unwrap();
                a.pop(eax).unwrap();
                a.iretd().unwrap();
            } else {
                a.hlt().unwrap();
            }
        });
        g.idt32(if resume { 1 } else { 6 }, at as u32);
    };
    handler(&g, HANDLERS, 0, true);
    handler(&g, HANDLERS + 0x100, 16, false);
    let target = CODE + 0x40;
    g.asm(32, CODE, |a| {
        a.mov(eax, target as u32).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(eax, 1).unwrap();
        a.mov(dr7, eax).unwrap();
        a.jmp(target).unwrap();
    });
    g.asm(32, target, |a| a.ud2().unwrap());
    let o = run(&mut g, &s);
    let word = |at: u64| g.read_u64(at) & 0xffff_ffff;
    assert_eq!(word(SAVED), target, "#DB: EIP at the instruction");
    assert_eq!(word(SAVED + 4) & RF, 0, "#DB: RF as it was");
    assert_eq!(word(SAVED + 8), DR6_CLEAR & 0xffff_ffff | 1);
    assert_eq!(word(SAVED + 16), target, "#UD: EIP at the ud2");
    assert_eq!(word(SAVED + 20) & RF, RF, "#UD: a fault pushes RF");
    assert_eq!(o.vector, None);
}
