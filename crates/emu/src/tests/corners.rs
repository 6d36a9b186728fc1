//! Architectural corners (issue 10, item 3): #NP/#SS/#GP and their error
//! codes, canonical checks on loadable bases, MSRs, CPUID.APIC following
//! IA32_APIC_BASE, the KVM hypercall ABI, and 32-bit task switches. Each
//! test runs real guest code; its exception handlers record what they saw
//! (vector, error code, frame) for the asserts.

use iced_x86::code_asm::*;
use vmplay_hypervisor::{CpuState, DescriptorTable, Segment};

use super::guest::*;

/// Recording handlers, 32 bytes apart per vector.
const HANDLERS: u64 = 0x20_0000;

fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// 64-bit handlers for vectors 0..32 (IST `ist`): each leaves
/// r13 = vector, r15 = error code (or u64::MAX), r14 = frame address,
/// then halts.
fn record64(g: &Guest, ist: u8) {
    for v in 0..32u8 {
        let at = HANDLERS + 32 * u64::from(v);
        g.code(64, at, |a| {
            if has_error_code(v) {
                a.pop(r15).unwrap();
            } else {
                a.mov(r15, -1i64).unwrap();
            }
            a.mov(r13d, u32::from(v)).unwrap();
            a.mov(r14, rsp).unwrap();
            a.hlt().unwrap();
        });
        g.idt64(v, at, ist);
    }
}

/// What a recording handler saw.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    vector: u64,
    code: u64,
    rip: u64,
}

fn seen64(g: &Guest) -> Seen {
    let st = g.state();
    assert_eq!(st.cs.selector, KCODE, "in the handler");
    Seen {
        vector: st.gpr[13],
        code: st.gpr[15],
        rip: g.read_u64(st.gpr[14]),
    }
}

/// Runs a 64-bit guest whose code is `f`, with the recording handlers
/// and extra GDT entries `extra` from selector 0x50 on.
fn run64(extra: &[u64], ist: u8, f: impl FnOnce(&mut CodeAssembler)) -> (Guest, CpuState) {
    run64_with(extra, ist, f, |_| {})
}

/// [`run64`] with `setup` writing guest memory first.
fn run64_with(
    extra: &[u64],
    ist: u8,
    f: impl FnOnce(&mut CodeAssembler),
    setup: impl FnOnce(&Guest),
) -> (Guest, CpuState) {
    let mut g = Guest::new(1);
    setup(&g);
    let mut s = g.long_mode(CODE);
    for (k, d) in extra.iter().enumerate() {
        g.write_u64(GDT + 0x50 + 8 * k as u64, *d);
    }
    s.gdt.limit = 0x4f + 8 * extra.len() as u16;
    record64(&g, ist);
    g.code(64, CODE, f);
    g.vcpu.set_state(&s).unwrap();
    let o = g.run();
    assert_eq!(o.end, End::Halt, "{o:?}");
    (g, s)
}

const DATA_NOT_PRESENT: u64 = 0x00cf_1300_0000_ffff;
const CODE64_NOT_PRESENT: u64 = 0x00af_1b00_0000_ffff;
const NONCANONICAL: u64 = 0x8000_0000_0000_0000;

#[test]
fn corners_not_present_idt_gate_is_np_with_idt_bit() {
    // `int 0x40` through a not-present gate: #NP(0x40*8 + IDT), EXT clear
    // (a software interrupt is the program's own event).
    let (g, _) = run64_with(
        &[],
        0,
        |a| {
            a.int(0x40).unwrap();
            a.hlt().unwrap();
        },
        |g| {
            g.idt64(0x40, HANDLERS, 0);
            let lo = g.read_u64(IDT + 16 * 0x40);
            g.write_u64(IDT + 16 * 0x40, lo & !(1 << 47));
        },
    );
    let st = g.state();
    assert_eq!(
        seen64(&g),
        Seen {
            vector: 11,
            code: 0x40 * 8 + 2,
            rip: CODE
        }
    );
    assert_eq!(st.rip, HANDLERS + 32 * 11 + 2 + 6 + 3 + 1);
}

#[test]
fn corners_not_present_gate_for_an_exception_sets_ext() {
    // #UD whose gate is not present: #NP(6*8 + IDT + EXT), the frame
    // still points at the ud2.
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    record64(&g, 0);
    let lo = g.read_u64(IDT + 16 * 6);
    g.write_u64(IDT + 16 * 6, lo & !(1 << 47));
    g.code(64, CODE, |a| {
        a.nop().unwrap();
        a.ud2().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(
        seen64(&g),
        Seen {
            vector: 11,
            code: 6 * 8 + 2 + 1,
            rip: CODE + 1
        }
    );
}

#[test]
fn corners_not_present_data_segment_is_np_and_stack_segment_is_ss() {
    for (load_ss, vector) in [(false, 11), (true, 12)] {
        let (g, _) = run64(&[DATA_NOT_PRESENT], 0, |a| {
            a.mov(eax, 0x50u32).unwrap();
            if load_ss {
                a.mov(ss, ax).unwrap();
            } else {
                a.mov(ds, ax).unwrap();
            }
            a.hlt().unwrap();
        });
        assert_eq!(
            seen64(&g),
            Seen {
                vector,
                code: 0x50,
                rip: CODE + 5
            },
            "load ss: {load_ss}"
        );
        assert_eq!(g.state().ds.selector, KDATA, "DS unchanged");
        assert_eq!(g.state().ss.selector, KDATA, "SS unchanged");
    }
}

#[test]
fn corners_far_transfers_to_a_not_present_code_segment_are_np() {
    // jmp far, call far, retf and iretq to selector 0x58 (not present).
    for kind in 0..4 {
        let (g, _) = run64_with(
            &[DATA_NOT_PRESENT, CODE64_NOT_PRESENT],
            0,
            |a| {
                a.mov(ebx, 0x3000u32).unwrap(); // far pointer 0x58:0x1234
                match kind {
                    0 => a.jmp(fword_ptr(rbx)).unwrap(),
                    1 => a.call(fword_ptr(rbx)).unwrap(),
                    2 => {
                        a.push(0x58).unwrap();
                        a.push(0x1234).unwrap();
                        a.db(&[0x48, 0xcb]).unwrap(); // retfq
                    }
                    _ => {
                        a.mov(eax, ss).unwrap();
                        a.push(rax).unwrap();
                        a.push(rsp).unwrap();
                        a.pushfq().unwrap();
                        a.push(0x58).unwrap();
                        a.push(0x1234).unwrap();
                        a.iretq().unwrap();
                    }
                }
                a.hlt().unwrap();
            },
            |g| g.write(0x3000, &[0x34, 0x12, 0, 0, 0x58, 0]),
        );
        let at = match kind {
            0 | 1 => CODE + 5,
            2 => CODE + 5 + 2 + 5,
            _ => CODE + 5 + 2 + 1 + 1 + 1 + 2 + 5,
        };
        assert_eq!(
            seen64(&g),
            Seen {
                vector: 11,
                code: 0x58,
                rip: at
            },
            "kind {kind}"
        );
    }
}

#[test]
fn corners_non_canonical_stack_references_are_ss_others_gp() {
    // push, pop, call, [rbp] and [rsp+...] use SS: #SS(0); [rax] with the
    // same address: #GP(0). Handlers run on IST1 (RSP is unusable).
    type Op = fn(&mut CodeAssembler);
    let cases: [(Op, u64, u64); 12] = [
        (|a| a.bt(qword_ptr(rsp), 3).unwrap(), 12, RSP_SET),
        (|a| a.bts(qword_ptr(rsp + 8), rcx).unwrap(), 12, RSP_SET),
        (|a| a.cmpxchg8b(qword_ptr(rsp)).unwrap(), 12, RSP_SET),
        (|a| a.movdqu(xmm0, xmmword_ptr(rsp)).unwrap(), 12, RSP_SET),
        (
            |a| a.movups(xmmword_ptr(rsp + 16), xmm1).unwrap(),
            12,
            RSP_SET,
        ),
        (|a| a.push(rax).unwrap(), 12, RSP_SET),
        (|a| a.pop(rax).unwrap(), 12, RSP_SET),
        (|a| a.call(0x10_1000u64).unwrap(), 12, RSP_SET),
        (
            |a| {
                a.mov(rbp, NONCANONICAL).unwrap();
                a.mov(rax, qword_ptr(rbp + 8)).unwrap();
            },
            12,
            RSP_SET + 10,
        ),
        (
            |a| a.add(qword_ptr(rsp + rcx * 8 + 16), 1).unwrap(),
            12,
            RSP_SET,
        ),
        (
            |a| {
                a.mov(rax, NONCANONICAL).unwrap();
                a.mov(qword_ptr(rax), rcx).unwrap();
            },
            13,
            RSP_SET + 10,
        ),
        (
            |a| {
                a.mov(rax, NONCANONICAL).unwrap();
                a.add(qword_ptr(rax + 16), rcx).unwrap();
            },
            13,
            RSP_SET + 10,
        ),
    ];
    for (k, (op, vector, rip)) in cases.into_iter().enumerate() {
        let (g, _) = run64(&[], 1, |a| {
            a.mov(rsp, NONCANONICAL).unwrap(); // 10 bytes
            op(a);
            a.hlt().unwrap();
        });
        assert_eq!(
            seen64(&g),
            Seen {
                vector,
                code: 0,
                rip: CODE + rip
            },
            "case {k}"
        );
        let frame = g.state().gpr[14];
        assert_eq!(g.read_u64(frame + 24), NONCANONICAL, "pushed RSP, case {k}");
        assert_eq!(frame, IST_STACK - 40, "IST1 frame, case {k}");
    }
}

/// Offset of the instruction after `mov rsp, imm64` in the cases above.
const RSP_SET: u64 = 10;

/// Where the stack-reference cases below run (after a prologue at CODE).
const OP_AT: u64 = 0x18_0000;

#[test]
fn corners_non_canonical_stack_references_of_x87_sse_xsave_strings_and_enter_are_ss() {
    // Each case: set-up (mov r64, imm64: 10 bytes each), then the access
    // through SS at a non-canonical address: #SS(0) at that instruction,
    // RF set in the pushed RFLAGS (a fault). The same access through
    // [rax] stays #GP(0).
    type Op = fn(&mut CodeAssembler);
    let rsp_nc: Op = |a| a.mov(rsp, NONCANONICAL).unwrap();
    let rbp_nc: Op = |a| a.mov(rbp, NONCANONICAL).unwrap();
    let rsi_nc: Op = |a| a.mov(rsi, NONCANONICAL).unwrap();
    let rax_nc: Op = |a| a.mov(rax, NONCANONICAL).unwrap();
    let cases: [(&str, Op, Op, u64); 30] = [
        ("fld m64", rsp_nc, |a| a.fld(qword_ptr(rsp)).unwrap(), 12),
        (
            "fld m32",
            rbp_nc,
            |a| a.fld(dword_ptr(rbp + 8)).unwrap(),
            12,
        ),
        ("fld m80", rsp_nc, |a| a.fld(tword_ptr(rsp)).unwrap(), 12),
        ("fst m64", rsp_nc, |a| a.fst(qword_ptr(rsp)).unwrap(), 12),
        ("fstp m80", rbp_nc, |a| a.fstp(tword_ptr(rbp)).unwrap(), 12),
        ("fild m16", rsp_nc, |a| a.fild(word_ptr(rsp)).unwrap(), 12),
        (
            "fistp m32",
            rbp_nc,
            |a| a.fistp(dword_ptr(rbp)).unwrap(),
            12,
        ),
        // Empty stack, IE unmasked: nothing stored, the operand still checked.
        (
            "fstp m64 (IE unmasked)",
            rsp_nc,
            |a| a.fstp(qword_ptr(rsp)).unwrap(),
            12,
        ),
        (
            "fiadd m32",
            rsp_nc,
            |a| a.fiadd(dword_ptr(rsp)).unwrap(),
            12,
        ),
        (
            "fadd m64",
            rbp_nc,
            |a| a.fadd(qword_ptr(rbp - 8)).unwrap(),
            12,
        ),
        ("fnstcw", rsp_nc, |a| a.fnstcw(word_ptr(rsp)).unwrap(), 12),
        ("fldcw", rsp_nc, |a| a.fldcw(word_ptr(rsp)).unwrap(), 12),
        ("fnstenv", rbp_nc, |a| a.fnstenv(ptr(rbp)).unwrap(), 12),
        ("fnsave", rsp_nc, |a| a.fnsave(ptr(rsp)).unwrap(), 12),
        ("frstor", rsp_nc, |a| a.frstor(ptr(rsp)).unwrap(), 12),
        ("fxsave", rsp_nc, |a| a.fxsave(ptr(rsp)).unwrap(), 12),
        ("fxrstor", rbp_nc, |a| a.fxrstor(ptr(rbp)).unwrap(), 12),
        ("xsave", rsp_nc, |a| a.xsave(ptr(rsp)).unwrap(), 12),
        ("xrstor", rbp_nc, |a| a.xrstor(ptr(rbp)).unwrap(), 12),
        (
            "movss load",
            rsp_nc,
            |a| a.movss(xmm0, dword_ptr(rsp)).unwrap(),
            12,
        ),
        (
            "movsd store",
            rbp_nc,
            |a| a.movsd_2(qword_ptr(rbp), xmm1).unwrap(),
            12,
        ),
        (
            "movd load",
            rsp_nc,
            |a| a.movd(xmm0, dword_ptr(rsp)).unwrap(),
            12,
        ),
        (
            "movq store",
            rsp_nc,
            |a| a.movq(qword_ptr(rsp), xmm2).unwrap(),
            12,
        ),
        (
            "stmxcsr",
            rsp_nc,
            |a| a.stmxcsr(dword_ptr(rsp)).unwrap(),
            12,
        ),
        ("ss: lodsb", rsi_nc, |a| a.db(&[0x36, 0xac]).unwrap(), 12),
        (
            "rep ss: movsb",
            rsi_nc,
            |a| {
                a.mov(ecx, 4).unwrap(); // 5 bytes
                a.mov(edi, DATA as u32).unwrap(); // 5 bytes
                a.db(&[0xf3, 0x36, 0xa4]).unwrap();
            },
            12,
        ),
        (
            "ss: maskmovdqu",
            |a| a.mov(rdi, NONCANONICAL).unwrap(),
            |a| {
                a.pcmpeqb(xmm1, xmm1).unwrap(); // 4 bytes: every byte selected
                a.db(&[0x36, 0x66, 0x0f, 0xf7, 0xc1]).unwrap();
            },
            12,
        ),
        ("enter", rsp_nc, |a| a.enter(16u32, 0u32).unwrap(), 12),
        (
            "enter level 2",
            rbp_nc,
            |a| a.enter(16u32, 2u32).unwrap(),
            12,
        ),
        // Not through SS: #GP(0).
        ("fld [rax]", rax_nc, |a| a.fld(qword_ptr(rax)).unwrap(), 13),
    ];
    for (name, set, op, vector) in cases {
        // The offset of the faulting instruction: set-up bytes.
        let skip = match name {
            "rep ss: movsb" => 20,
            "ss: maskmovdqu" => 14,
            _ => 10,
        };
        let (g, _) = run64_with(
            &[],
            1,
            |a| {
                // CR4.OSXSAVE, XCR0 = x87|SSE, then on to the case.
                a.mov(rax, cr4).unwrap();
                a.bts(rax, 18).unwrap();
                a.mov(cr4, rax).unwrap();
                a.xor(ecx, ecx).unwrap();
                a.xor(edx, edx).unwrap();
                a.mov(eax, 3).unwrap();
                a.xsetbv().unwrap();
                if name.contains("IE unmasked") {
                    a.mov(word_ptr(DATA), 0x37eu32).unwrap();
                    a.fldcw(word_ptr(DATA)).unwrap();
                }
                a.mov(rax, OP_AT).unwrap();
                a.jmp(rax).unwrap();
            },
            |g| {
                g.code(64, OP_AT, |a| {
                    set(a);
                    op(a);
                    a.hlt().unwrap();
                });
            },
        );
        assert_eq!(
            seen64(&g),
            Seen {
                vector,
                code: 0,
                rip: OP_AT + skip
            },
            "{name}"
        );
        let frame = g.state().gpr[14];
        assert_eq!(frame, IST_STACK - 40, "IST1 frame, {name}");
        let rflags = g.read_u64(frame + 16);
        assert_eq!(rflags & (1 << 16), 1 << 16, "RF pushed by a fault, {name}");
    }
}

// ---------------------------------------------------------------------
// 32-bit protected mode.

/// An 8-byte code/data/system descriptor.
fn desc(base: u64, limit: u32, access: u8, flags: u8) -> u64 {
    u64::from(limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access) << 40
        | u64::from((limit >> 16) & 0xf) << 48
        | u64::from(flags & 0xf) << 52
        | ((base >> 24) & 0xff) << 56
}

const CODE32: u16 = 0x08;
const DATA32: u16 = 0x10;
/// Base 0x70000, limit 0xfff, ring 0.
const SMALL_DATA: u16 = 0x18;
const UCODE32: u16 = 0x20;
const USMALL_STACK: u16 = 0x28;
const TSS_A: u16 = 0x30;
const TSS_A_AT: u64 = 0x4000;
const IDT32: u64 = 0x13000;

fn gate32(handler: u64, sel: u16, typ: u8) -> u64 {
    (handler & 0xffff)
        | u64::from(sel) << 16
        | u64::from(typ) << 40
        | (handler >> 16 & 0xffff) << 48
}

/// 32-bit handlers for vectors 0..32: each leaves edi = vector,
/// esi = error code (or u32::MAX), ebp = frame address, then halts.
fn record32(g: &Guest) {
    for v in 0..32u8 {
        let at = HANDLERS + 32 * u64::from(v);
        g.code(32, at, |a| {
            if has_error_code(v) {
                a.pop(esi).unwrap();
            } else {
                a.mov(esi, u32::MAX).unwrap();
            }
            a.mov(edi, u32::from(v)).unwrap();
            a.mov(ebp, esp).unwrap();
            a.hlt().unwrap();
        });
        g.write_u64(IDT32 + 8 * u64::from(v), gate32(at, CODE32, 0x8e));
    }
}

fn seen32(g: &Guest) -> Seen {
    let st = g.state();
    Seen {
        vector: st.gpr[7],
        code: st.gpr[6] & 0xffff_ffff,
        rip: g.read_u64(st.ss.base + (st.gpr[5] & 0xffff_ffff)) & 0xffff_ffff,
    }
}

/// A flat 32-bit protected-mode guest without paging: GDT as above,
/// TSS A loaded (ESP0/SS0 = STACK/DATA32), recording handlers.
fn prot32(g: &Guest, rip: u64) -> CpuState {
    let gdt = [
        0,
        desc(0, 0xfffff, 0x9b, 0xc),
        desc(0, 0xfffff, 0x93, 0xc),
        desc(0x7_0000, 0xfff, 0x93, 0x4),
        desc(0, 0xfffff, 0xfb, 0xc),
        desc(0x7_0000, 0xfff, 0xf3, 0x4),
        desc(TSS_A_AT, 0x67, 0x8b, 0),
    ];
    for (k, d) in gdt.iter().enumerate() {
        g.write_u64(GDT + 8 * k as u64, *d);
    }
    g.write_u64(TSS_A_AT + 4, STACK | u64::from(DATA32) << 32);
    record32(g);
    let mut s = CpuState::reset();
    s.cr0 = 0x11;
    s.cs = Segment::flat(CODE32, 0xb, false, true);
    let d = Segment::flat(DATA32, 0x3, false, true);
    (s.ds, s.es, s.ss, s.fs, s.gs) = (d, d, d, d, d);
    s.tr = Segment::tss(TSS_A, TSS_A_AT, 0x67);
    s.gdt = DescriptorTable {
        base: GDT,
        limit: 0xff,
    };
    s.idt = DescriptorTable {
        base: IDT32,
        limit: 0x7ff,
    };
    s.gpr[4] = STACK;
    s.rip = rip;
    s
}

#[test]
fn corners_stack_limit_violations_are_ss_and_other_limits_gp() {
    // [ebp] beyond SS's limit: #SS(0); the same offset through ES: #GP(0).
    for (use_ss, vector) in [(true, 12), (false, 13)] {
        let mut g = Guest::new(1);
        let s = prot32(&g, CODE);
        g.code(32, CODE, |a| {
            a.mov(eax, u32::from(SMALL_DATA)).unwrap();
            a.mov(es, eax).unwrap();
            a.mov(ebp, 0x1000u32).unwrap();
            if use_ss {
                a.mov(ss, eax).unwrap();
                a.mov(esp, 0x800u32).unwrap();
                a.mov(eax, dword_ptr(ebp - 2)).unwrap();
            } else {
                a.mov(eax, dword_ptr(ebp - 2).es()).unwrap();
            }
            a.hlt().unwrap();
        });
        g.vcpu.set_state(&s).unwrap();
        assert_eq!(g.run().end, End::Halt);
        let at = if use_ss { CODE + 19 } else { CODE + 12 };
        assert_eq!(
            seen32(&g),
            Seen {
                vector,
                code: 0,
                rip: at
            },
            "through SS: {use_ss}"
        );
    }
}

#[test]
fn corners_push_below_a_ring3_stack_limit_is_ss_on_the_ring0_stack() {
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    let user = 0x10_2000u64;
    g.code(32, user, |a| {
        a.mov(eax, 0x1234u32).unwrap();
        a.push(eax).unwrap();
        a.hlt().unwrap();
    });
    // iretd to ring 3 with ESP 0x1002 in the 4 KiB stack segment: the
    // push would write 0xffe..0x1001, past the limit.
    g.code(32, CODE, |a| {
        iretd_to(a, UCODE32 | 3, user as u32, USMALL_STACK | 3, 0x1002);
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(
        seen32(&g),
        Seen {
            vector: 12,
            code: 0,
            rip: user + 5
        }
    );
    let st = g.state();
    let frame = st.gpr[5];
    assert_eq!(frame, STACK - 20, "ESP0 from the TSS, 5-dword frame");
    assert_eq!(g.read_u64(frame + 4) as u32, u32::from(UCODE32 | 3));
    assert_eq!(g.read_u64(frame + 12) as u32, 0x1002, "user ESP");
    assert_eq!(g.read_u64(frame + 16) as u16, USMALL_STACK | 3);
    assert_eq!(st.gpr[0] as u32, 0x1234);
}

// ---------------------------------------------------------------------
// Task switches (32-bit TSS).

const TSS_B: u16 = 0x38;
const TSS_B_AT: u64 = 0x5000;
const TSS_C: u16 = 0x40;
const TSS_C_AT: u64 = 0x6000;
/// A task gate in the GDT naming TSS B.
const GATE_B: u16 = 0x48;
/// An LDT at 0x7000 whose entry 0 is a data segment based at 0x9_0000.
const LDT_SEL: u16 = 0x50;
const LDT_AT: u64 = 0x7000;
/// A TSS whose limit (0x50) is too small for a 32-bit TSS.
const TSS_SHORT: u16 = 0x58;
const TSS_SHORT_AT: u64 = 0x6800;
/// A TSS whose DS names a TSS descriptor (invalid after the commit).
const TSS_BAD_DS: u16 = 0x60;
const TSS_BAD_DS_AT: u64 = 0x6c00;
const TASK_B_CODE: u64 = 0x10_3000;
const TASK_C_CODE: u64 = 0x10_4000;
/// Where the tasks store what they saw.
const OUT: u64 = 0x9000;

/// A 32-bit TSS image: EIP, ESP, CS, SS, DS (ES = DATA32), LDT, CR3 and
/// EAX = `eax`, EFLAGS = 2.
#[allow(clippy::too_many_arguments)]
fn tss32(g: &Guest, at: u64, new_eip: u64, new_esp: u64, new_ds: u16, ldt: u16, pd: u64, acc: u32) {
    g.write(at, &[0u8; 0x68]);
    let w32 = |off: u64, v: u64| g.write(at + off, &(v as u32).to_le_bytes());
    w32(0x1c, pd);
    w32(0x20, new_eip);
    w32(0x24, 2);
    w32(0x28, u64::from(acc));
    w32(0x38, new_esp);
    for (k, s) in [DATA32, CODE32, DATA32, new_ds, 0, 0].iter().enumerate() {
        w32(0x48 + 4 * k as u64, u64::from(*s));
    }
    w32(0x60, u64::from(ldt));
    w32(0x64, 0x68 << 16); // no I/O bitmap
}

/// The task-switch GDT entries and the tasks' TSSes on top of [`prot32`].
fn tasks(g: &Guest) {
    let extra = [
        (TSS_B, desc(TSS_B_AT, 0x67, 0x89, 0)),
        (TSS_C, desc(TSS_C_AT, 0x67, 0x89, 0)),
        (GATE_B, u64::from(TSS_B) << 16 | 0x85u64 << 40),
        (LDT_SEL, desc(LDT_AT, 0xf, 0x82, 0)),
        (TSS_SHORT, desc(TSS_SHORT_AT, 0x50, 0x89, 0)),
        (TSS_BAD_DS, desc(TSS_BAD_DS_AT, 0x67, 0x89, 0)),
    ];
    for (sel, d) in extra {
        g.write_u64(GDT + u64::from(sel), d);
    }
    g.write_u64(LDT_AT, desc(0x9_0000, 0xffff, 0x93, 0x4));
    g.write_u64(0x9_0000, 0x1dd1_1dd1);
    tss32(g, TSS_B_AT, TASK_B_CODE, 0x6_0000, 0x04, LDT_SEL, 0, 0xb0b0);
    tss32(
        g,
        TSS_C_AT,
        TASK_C_CODE,
        0x5_8000,
        DATA32,
        0,
        0x15000,
        0xc0c0,
    );
    tss32(g, TSS_SHORT_AT, TASK_B_CODE, 0x6_0000, DATA32, 0, 0, 0);
    tss32(g, TSS_BAD_DS_AT, TASK_B_CODE, 0x5_0000, TSS_A, 0, 0, 0);
}

/// A TSS descriptor's type (9 available, 0xb busy).
fn tss_type(g: &Guest, sel: u16) -> u64 {
    g.read_u64(GDT + u64::from(sel)) >> 40 & 0xf
}

fn rd32(g: &Guest, at: u64) -> u64 {
    g.read_u64(at) & 0xffff_ffff
}

/// Task B's code: records EAX (from its TSS), TR, EFLAGS, its TSS back
/// link, CR0 and a word read through its LDT-based DS, then `iretd`s or
/// halts.
fn task_b(g: &Guest, iret: bool) {
    g.code(32, TASK_B_CODE, |a| {
        a.mov(dword_ptr(OUT).es(), eax).unwrap();
        a.str(eax).unwrap();
        a.mov(dword_ptr(OUT + 4).es(), eax).unwrap();
        a.pushfd().unwrap();
        a.pop(eax).unwrap();
        a.mov(dword_ptr(OUT + 8).es(), eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.mov(dword_ptr(OUT + 12).es(), eax).unwrap();
        a.mov(eax, dword_ptr(0)).unwrap(); // DS: LDT entry 0
        a.mov(dword_ptr(OUT + 16).es(), eax).unwrap();
        a.mov(eax, dr7).unwrap();
        a.mov(dword_ptr(OUT + 20).es(), eax).unwrap();
        a.mov(eax, 0xb1b1u32).unwrap();
        if iret {
            a.iretd().unwrap();
            // Resumed here by a later switch to B (not in these tests).
            a.hlt().unwrap();
        } else {
            a.hlt().unwrap();
        }
    });
}

#[test]
fn corners_call_to_a_tss_nests_and_iret_returns_along_the_back_link() {
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    tasks(&g);
    task_b(&g, true);
    let call_len = g.code(32, CODE, |a| {
        a.mov(eax, 0xffu32).unwrap(); // L0-L3 and G0-G3 (execute at 0)
        a.mov(dr7, eax).unwrap(); // 5 + 3 bytes
        a.mov(eax, 0x1111u32).unwrap();
        a.mov(ebx, 0x2222u32).unwrap();
        a.call_far(TSS_B, 0).unwrap();
        a.mov(dword_ptr(OUT + 32), eax).unwrap();
        a.str(eax).unwrap();
        a.mov(dword_ptr(OUT + 36), eax).unwrap();
        a.pushfd().unwrap();
        a.pop(eax).unwrap();
        a.mov(dword_ptr(OUT + 40), eax).unwrap();
        a.hlt().unwrap();
    });
    assert!(call_len > 17);
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    // Inside B.
    assert_eq!(rd32(&g, OUT), 0xb0b0, "EAX from B's TSS");
    assert_eq!(rd32(&g, OUT + 4), u64::from(TSS_B), "TR");
    assert_ne!(rd32(&g, OUT + 8) & 0x4000, 0, "NT set in the nested task");
    assert_ne!(rd32(&g, OUT + 12) & 0x8, 0, "CR0.TS set by the switch");
    assert_eq!(rd32(&g, OUT + 16), 0x1dd1_1dd1, "DS through B's LDT");
    assert_eq!(rd32(&g, OUT + 20) & 0xff, 0xaa, "DR7 local enables cleared");
    assert_eq!(rd32(&g, TSS_B_AT), u64::from(TSS_A), "back link to A");
    // A's state as the call saved it.
    assert_eq!(
        rd32(&g, TSS_A_AT + 0x20),
        CODE + 8 + 17,
        "A's EIP: after the call"
    );
    assert_eq!(rd32(&g, TSS_A_AT + 0x28), 0x1111, "A's EAX");
    assert_eq!(rd32(&g, TSS_A_AT + 0x34), 0x2222, "A's EBX");
    assert_eq!(rd32(&g, TSS_A_AT + 0x4c), u64::from(CODE32), "A's CS");
    // B's state as its iret saved it.
    assert_eq!(rd32(&g, TSS_B_AT + 0x28), 0xb1b1, "B's EAX");
    assert_eq!(
        rd32(&g, TSS_B_AT + 0x24) & 0x4000,
        0,
        "NT clear in B's image"
    );
    // Back in A, with its registers from its TSS.
    assert_eq!(rd32(&g, OUT + 32), 0x1111);
    assert_eq!(rd32(&g, OUT + 36), u64::from(TSS_A));
    assert_eq!(rd32(&g, OUT + 40) & 0x4000, 0, "A not nested");
    assert_eq!(tss_type(&g, TSS_A), 0xb, "A busy");
    assert_eq!(tss_type(&g, TSS_B), 0x9, "B available again");
    let st = g.state();
    assert_eq!(st.gpr[3] as u32, 0x2222);
    assert_eq!(st.tr.selector, TSS_A);
}

#[test]
fn corners_jmp_through_a_task_gate_switches_without_nesting() {
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    tasks(&g);
    task_b(&g, false);
    g.code(32, CODE, |a| {
        a.mov(eax, 0x3333u32).unwrap();
        a.jmp_far(GATE_B, 0xdead).unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(rd32(&g, OUT), 0xb0b0);
    assert_eq!(rd32(&g, OUT + 4), u64::from(TSS_B));
    assert_eq!(rd32(&g, OUT + 8) & 0x4000, 0, "jmp does not nest");
    assert_eq!(rd32(&g, TSS_B_AT), 0, "no back link");
    assert_eq!(
        rd32(&g, TSS_A_AT + 0x20),
        CODE + 12,
        "A's EIP after the jmp"
    );
    assert_eq!(rd32(&g, TSS_A_AT + 0x28), 0x3333);
    assert_eq!(tss_type(&g, TSS_A), 0x9, "A no longer busy");
    assert_eq!(tss_type(&g, TSS_B), 0xb, "B busy");
    let st = g.state();
    assert_eq!(st.tr.selector, TSS_B);
    assert_eq!(st.tr.base, TSS_B_AT);
    assert_eq!(st.ldt.selector, LDT_SEL);
    assert_eq!(st.ds.base, 0x9_0000);
    assert_eq!(st.gpr[4] as u32, 0x6_0000, "ESP from B's TSS");
}

#[test]
fn corners_a_switch_into_a_tss_with_the_t_bit_traps_with_dr6_bt() {
    // TSS B with T set: #DB (a trap, DR6.BT) in B before its first
    // instruction, pushed EIP = B's EIP. A far jmp through a task gate
    // (no debug registers armed: delivered by the switch) and a far call
    // with DR7.G3 armed (the precise path: delivered after the call).
    const DB_HANDLER: u64 = HANDLERS + 0x1000;
    for call in [false, true] {
        let mut g = Guest::new(1);
        let s = prot32(&g, CODE);
        tasks(&g);
        task_b(&g, false);
        g.write(TSS_B_AT + 0x64, &(0x68u32 << 16 | 1).to_le_bytes());
        g.code(32, DB_HANDLER, |a| {
            a.mov(eax, dr6).unwrap();
            a.mov(dword_ptr(OUT + 48).es(), eax).unwrap();
            a.mov(edi, 1u32).unwrap();
            a.mov(esi, u32::MAX).unwrap();
            a.mov(ebp, esp).unwrap();
            a.hlt().unwrap();
        });
        g.write_u64(IDT32 + 8, gate32(DB_HANDLER, CODE32, 0x8e));
        g.code(32, CODE, |a| {
            if call {
                a.mov(eax, 0x80u32).unwrap(); // G3: armed, breakpoint at 0
                a.mov(dr7, eax).unwrap();
                a.call_far(TSS_B, 0).unwrap();
            } else {
                a.jmp_far(GATE_B, 0).unwrap();
            }
            a.hlt().unwrap();
        });
        g.vcpu.set_state(&s).unwrap();
        assert_eq!(g.run().end, End::Halt);
        assert_eq!(
            seen32(&g),
            Seen {
                vector: 1,
                code: u64::from(u32::MAX),
                rip: TASK_B_CODE
            },
            "call: {call}"
        );
        let st = g.state();
        assert_eq!(st.tr.selector, TSS_B, "in B, call: {call}");
        assert_eq!(
            rd32(&g, OUT),
            0,
            "B's first instruction not run, call: {call}"
        );
        assert_eq!(
            rd32(&g, OUT + 48),
            0xffff_0ff0 | 1 << 15,
            "DR6: BT only, call: {call}"
        );
        let frame = st.gpr[5];
        assert_eq!(rd32(&g, frame + 4), u64::from(CODE32), "pushed CS");
        let eflags = rd32(&g, frame + 8);
        assert_eq!(eflags & 1 << 16, 0, "a trap: RF clear, call: {call}");
        assert_eq!(eflags & 0x4000 != 0, call, "NT only when nested");
        assert_eq!(frame, 0x6_0000 - 12, "on B's stack, call: {call}");
    }
}

/// 32-bit paging: 4 MiB identity pages in a page directory at `pd`.
fn identity_pd(g: &Guest, pd: u64) {
    for k in 0..1024u64 {
        g.write(pd + 4 * k, &(((k << 22) | 0x83) as u32).to_le_bytes());
    }
}

#[test]
fn corners_double_fault_through_a_task_gate_runs_its_task_with_its_cr3() {
    // As 32-bit Linux: #DF's IDT entry is a task gate. `int 0x40` through
    // a not-present gate raises #NP, whose gate is not present either:
    // #DF, delivered by switching to task C (its CR3, its stack, error
    // code 0 pushed there).
    let mut g = Guest::new(1);
    let mut s = prot32(&g, CODE);
    tasks(&g);
    identity_pd(&g, 0x14000);
    identity_pd(&g, 0x15000);
    s.cr0 |= 0x8000_0000;
    s.cr3 = 0x14000;
    s.cr4 = 0x10; // PSE
    g.write_u64(IDT32 + 8 * 8, u64::from(TSS_C) << 16 | 0x85u64 << 40);
    g.write_u64(IDT32 + 8 * 11, 0);
    g.write_u64(IDT32 + 8 * 0x40, gate32(0x10_5000, CODE32, 0x0e));
    g.code(32, TASK_C_CODE, |a| {
        a.pop(esi).unwrap(); // error code
        a.str(ebx).unwrap();
        a.pushfd().unwrap();
        a.pop(ecx).unwrap();
        a.mov(edx, cr3).unwrap();
        a.hlt().unwrap();
    });
    g.code(32, CODE, |a| {
        a.mov(eax, 0x4444u32).unwrap();
        a.int(0x40).unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[6] as u32, 0, "#DF error code on C's stack");
    assert_eq!(st.gpr[4] as u32, 0x5_8000, "ESP back at C's TSS value");
    assert_eq!(st.gpr[3] as u16, TSS_C);
    assert_ne!(st.gpr[1] & 0x4000, 0, "NT: C nests in A");
    assert_eq!(st.gpr[2], 0x15000, "CR3 from C's TSS");
    assert_eq!(st.rip, TASK_C_CODE + 1 + 3 + 1 + 1 + 3 + 1);
    assert_eq!(rd32(&g, TSS_C_AT), u64::from(TSS_A), "back link");
    assert_eq!(rd32(&g, TSS_A_AT + 0x20), CODE + 5, "A's EIP: the int");
    assert_eq!(rd32(&g, TSS_A_AT + 0x28), 0x4444);
    assert_eq!(tss_type(&g, TSS_A), 0xb);
    assert_eq!(tss_type(&g, TSS_C), 0xb);
}

#[test]
fn corners_task_switch_faults_before_the_commit_point_stay_in_the_old_task() {
    // (target, vector, error code): a TSS too short (#TS), the busy
    // current TSS (#GP), a task gate to it (#GP with the TSS selector),
    // a not-present TSS (#NP).
    let not_present: u16 = 0x68;
    let gate_a: u16 = 0x70;
    for (target, vector, code) in [
        (TSS_SHORT, 10, u64::from(TSS_SHORT)),
        (TSS_A, 13, u64::from(TSS_A)),
        (gate_a, 13, u64::from(TSS_A)),
        (not_present, 11, u64::from(not_present)),
    ] {
        let mut g = Guest::new(1);
        let s = prot32(&g, CODE);
        tasks(&g);
        g.write_u64(GDT + u64::from(not_present), desc(TSS_B_AT, 0x67, 0x09, 0));
        g.write_u64(
            GDT + u64::from(gate_a),
            u64::from(TSS_A) << 16 | 0x85u64 << 40,
        );
        g.code(32, CODE, |a| {
            a.mov(eax, 0x5555u32).unwrap();
            a.jmp_far(target, 0).unwrap();
        });
        g.vcpu.set_state(&s).unwrap();
        assert_eq!(g.run().end, End::Halt);
        assert_eq!(
            seen32(&g),
            Seen {
                vector,
                code,
                rip: CODE + 5
            },
            "target {target:#x}"
        );
        let st = g.state();
        assert_eq!(st.tr.selector, TSS_A, "still task A");
        assert_eq!(tss_type(&g, TSS_A), 0xb);
        assert_eq!(rd32(&g, TSS_A_AT + 0x28), 0, "A's TSS untouched");
    }
}

#[test]
fn corners_task_switch_faults_after_the_commit_point_belong_to_the_new_task() {
    // The new task's DS names a TSS descriptor: #TS(DS) raised in the new
    // task, whose handler runs on the new task's stack with its EIP.
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    tasks(&g);
    g.code(32, CODE, |a| {
        a.jmp_far(TSS_BAD_DS, 0).unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(
        seen32(&g),
        Seen {
            vector: 10,
            code: u64::from(TSS_A),
            rip: TASK_B_CODE
        }
    );
    let st = g.state();
    assert_eq!(st.tr.selector, TSS_BAD_DS);
    assert_eq!(
        st.gpr[5] as u32,
        0x5_0000 - 12,
        "frame on the new task's stack"
    );
    assert_eq!(rd32(&g, TSS_A_AT + 0x20), CODE + 7, "A saved");
}

#[test]
fn corners_iret_with_nt_to_a_tss_that_is_not_busy_is_ts() {
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    tasks(&g);
    // A's back link names B, which is available (not busy).
    g.write(TSS_A_AT, &TSS_B.to_le_bytes());
    g.code(32, CODE, |a| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x4000).unwrap();
        a.popfd().unwrap();
        a.iretd().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(
        seen32(&g),
        Seen {
            vector: 10,
            code: u64::from(TSS_B),
            rip: CODE + 1 + 7 + 1
        }
    );
}

#[test]
fn corners_iretq_with_nt_in_long_mode_is_gp() {
    // A valid frame to CODE + 0x200: without the NT check iretq would go
    // there. IA-32e mode has no task return: #GP(0).
    let (g, _) = run64_with(
        &[],
        0,
        |a| {
            a.pushfq().unwrap();
            a.or(qword_ptr(rsp), 0x4000).unwrap();
            a.popfq().unwrap(); // 10 bytes
            a.push(i32::from(KDATA)).unwrap();
            a.push(STACK as i32).unwrap();
            a.push(2).unwrap();
            a.push(i32::from(KCODE)).unwrap();
            a.push((CODE + 0x200) as i32).unwrap(); // 2 + 5 + 2 + 2 + 5
            a.iretq().unwrap();
        },
        |g| {
            g.code(64, CODE + 0x200, |a| {
                a.mov(r13d, 0x99u32).unwrap();
                a.hlt().unwrap();
            });
        },
    );
    assert_eq!(
        seen64(&g),
        Seen {
            vector: 13,
            code: 0,
            rip: CODE + 10 + 16
        }
    );
}

// ---------------------------------------------------------------------
// Canonical bases.

/// A #GP handler for vector 13 that also reads back MSR ECX into r12.
fn gp_reads_msr(g: &Guest) {
    let at = HANDLERS + 32 * 13;
    g.code(64, at, |a| {
        a.pop(r15).unwrap();
        a.rdmsr().unwrap();
        a.shl(rdx, 32).unwrap();
        a.or(rax, rdx).unwrap();
        a.mov(r12, rax).unwrap();
        a.mov(r13d, 13u32).unwrap();
        a.mov(r14, rsp).unwrap();
        a.hlt().unwrap();
    });
}

#[test]
fn corners_wrmsr_of_a_non_canonical_address_is_gp_and_changes_nothing() {
    const UPPER: u64 = 0xffff_8000_1234_5000;
    for msr in [
        0xc000_0100u32, // FS_BASE
        0xc000_0101,    // GS_BASE
        0xc000_0102,    // KERNEL_GS_BASE
        0xc000_0082,    // LSTAR
        0xc000_0083,    // CSTAR
        0x175,          // SYSENTER_ESP
        0x176,          // SYSENTER_EIP
    ] {
        let mut g = Guest::new(1);
        let s = g.long_mode(CODE);
        record64(&g, 0);
        gp_reads_msr(&g);
        g.code(64, CODE, |a| {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, UPPER as u32).unwrap();
            a.mov(edx, (UPPER >> 32) as u32).unwrap();
            a.wrmsr().unwrap(); // canonical: fine
            a.mov(edx, 0x0000_8000u32).unwrap();
            a.wrmsr().unwrap(); // 0x0000_8000_1234_5000: #GP(0)
            a.hlt().unwrap();
        });
        g.vcpu.set_state(&s).unwrap();
        assert_eq!(g.run().end, End::Halt);
        assert_eq!(
            seen64(&g),
            Seen {
                vector: 13,
                code: 0,
                rip: CODE + 17 + 5
            },
            "msr {msr:#x}"
        );
        assert_eq!(g.state().gpr[12], UPPER, "msr {msr:#x} kept its value");
    }
}

#[test]
fn corners_lgdt_and_lidt_with_a_non_canonical_base_are_gp() {
    for idt in [false, true] {
        let (g, s) = run64_with(
            &[],
            0,
            |a| {
                a.mov(eax, 0x3000u32).unwrap();
                if idt {
                    a.lidt(ptr(rax)).unwrap();
                } else {
                    a.lgdt(ptr(rax)).unwrap();
                }
                a.hlt().unwrap();
            },
            |g| {
                g.write(0x3000, &0xfffu16.to_le_bytes());
                g.write_u64(0x3002, 0x0001_0000_0000_0000);
            },
        );
        assert_eq!(
            seen64(&g),
            Seen {
                vector: 13,
                code: 0,
                rip: CODE + 5
            },
            "lidt: {idt}"
        );
        let st = g.state();
        assert_eq!((st.gdt.base, st.idt.base), (s.gdt.base, s.idt.base));
    }
}

#[test]
fn corners_ltr_and_lldt_of_a_non_canonical_16_byte_descriptor_are_gp_selector() {
    // 0x50: 64-bit available TSS, 0x60: LDT; both with base bits 63..32
    // = 0x0000_8000 (not canonical).
    let tss = desc(0x4000, 0x67, 0x89, 0);
    let ldt = desc(0x7000, 0xf, 0x82, 0);
    for (ltr, sel) in [(true, 0x50u16), (false, 0x60)] {
        let (g, _) = run64(&[tss, 0x8000, ldt, 0x8000], 0, |a| {
            a.mov(eax, u32::from(sel)).unwrap();
            if ltr {
                a.ltr(ax).unwrap();
            } else {
                a.lldt(ax).unwrap();
            }
            a.hlt().unwrap();
        });
        assert_eq!(
            seen64(&g),
            Seen {
                vector: 13,
                code: u64::from(sel),
                rip: CODE + 5
            },
            "ltr: {ltr}"
        );
        let st = g.state();
        assert_eq!(st.tr.selector, TR);
        assert_eq!(tss_type(&g, 0x50), 0x9, "not marked busy");
    }
    // The same descriptors with a canonical high half load.
    let (g, _) = run64(&[tss, 0, ldt, 0], 0, |a| {
        a.mov(eax, 0x50u32).unwrap();
        a.ltr(ax).unwrap();
        a.mov(eax, 0x60u32).unwrap();
        a.lldt(ax).unwrap();
        a.hlt().unwrap();
    });
    let st = g.state();
    assert_eq!(st.gpr[13], 0, "no exception");
    assert_eq!((st.tr.selector, st.tr.base), (0x50, 0x4000));
    assert_eq!((st.ldt.selector, st.ldt.base), (0x60, 0x7000));
}

#[test]
fn corners_wrfsbase_of_a_non_canonical_address_is_gp() {
    let mut g = Guest::new(1);
    let mut s = g.long_mode(CODE);
    s.cr4 |= 1 << 16; // FSGSBASE
    record64(&g, 0);
    g.code(64, CODE, |a| {
        a.mov(rax, NONCANONICAL).unwrap();
        a.wrgsbase(rax).unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(
        seen64(&g),
        Seen {
            vector: 13,
            code: 0,
            rip: CODE + 10
        }
    );
    assert_eq!(g.state().gs.base, 0);
}

// ---------------------------------------------------------------------
// MSRs and CPUID.

/// Runs 64-bit `f` to its `hlt` (no exception expected) and returns the
/// final state.
fn run64_ok(f: impl FnOnce(&mut CodeAssembler)) -> CpuState {
    let (g, _) = run64(&[], 0, |a| {
        a.mov(r13, -1i64).unwrap();
        f(a);
    });
    let st = g.state();
    assert_eq!(st.gpr[13], u64::MAX, "no exception (vector {})", st.gpr[13]);
    st
}

#[test]
fn corners_misc_enable_has_fast_strings_and_sdm_writable_bits() {
    let st = run64_ok(|a| {
        a.mov(ecx, 0x1a0u32).unwrap();
        a.rdmsr().unwrap();
        a.mov(r8d, eax).unwrap(); // reset value
        a.and(eax, !1u32 as i32).unwrap(); // fast strings off
        a.or(eax, 1 << 22).unwrap(); // limit CPUID maxval
        a.wrmsr().unwrap();
        a.rdmsr().unwrap();
        a.mov(r9d, eax).unwrap();
        a.xor(eax, eax).unwrap();
        a.cpuid().unwrap();
        a.mov(r10d, eax).unwrap(); // max basic leaf, limited
        a.mov(ecx, 0x1a0u32).unwrap();
        a.mov(eax, 0x1801u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.xor(eax, eax).unwrap();
        a.cpuid().unwrap();
        a.mov(r11d, eax).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(st.gpr[8], 0x1801, "FAST_STRING, BTS and PEBS unavailable");
    assert_eq!(st.gpr[9], 0x1800 | 1 << 22);
    assert_eq!(st.gpr[10], 2, "LIMIT_CPUID caps leaf 0");
    assert!(st.gpr[11] > 2);

    // Reserved bits (MONITOR FSM, bit 18) and XD disable while EFER.NXE
    // is on: #GP(0).
    for (lo, hi) in [(0x1801u32 | 1 << 18, 0u32), (0x1801, 1 << 2)] {
        let (g, _) = run64(&[], 0, |a| {
            a.mov(ecx, 0x1a0u32).unwrap();
            a.mov(eax, lo).unwrap();
            a.mov(edx, hi).unwrap();
            a.wrmsr().unwrap();
            a.hlt().unwrap();
        });
        assert_eq!(
            seen64(&g),
            Seen {
                vector: 13,
                code: 0,
                rip: CODE + 15
            }
        );
    }
}

#[test]
fn corners_xd_disable_hides_nx_and_refuses_efer_nxe() {
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    g.code(32, CODE, |a| {
        a.mov(ecx, 0x1a0u32).unwrap();
        a.rdmsr().unwrap();
        a.or(edx, 1 << 2).unwrap(); // bit 34
        a.wrmsr().unwrap();
        a.mov(eax, 0x8000_0001u32).unwrap();
        a.cpuid().unwrap();
        a.mov(ebx, edx).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.mov(eax, 1u32 << 11).unwrap(); // EFER.NXE
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[3] & 1 << 20, 0, "NX hidden");
    assert_ne!(st.gpr[3] & 1 << 29, 0, "LM still there");
    assert_eq!(
        seen32(&g),
        Seen {
            vector: 13,
            code: 0,
            rip: CODE + 5 + 2 + 3 + 2 + 5 + 2 + 2 + 5 + 5 + 2
        }
    );
}

#[test]
fn corners_unknown_msrs_are_gp_and_intel_ones_linux_reads_exist() {
    let st = run64_ok(|a| {
        a.mov(ecx, 0x17u32).unwrap(); // IA32_PLATFORM_ID
        a.rdmsr().unwrap();
        a.mov(r8d, eax).unwrap();
        a.mov(ecx, 0x3au32).unwrap(); // IA32_FEATURE_CONTROL
        a.rdmsr().unwrap();
        a.mov(r9d, eax).unwrap();
        a.mov(ecx, 0x8bu32).unwrap(); // IA32_BIOS_SIGN_ID
        a.rdmsr().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(st.gpr[8], 0);
    assert_eq!(st.gpr[9], 1, "locked, VMX off");
    for (write, msr) in [
        (false, 0x12345u32),
        (false, 0x1a2),
        (true, 0x3a),
        (true, 0x17),
    ] {
        let (g, _) = run64(&[], 0, |a| {
            a.mov(ecx, msr).unwrap();
            a.xor(eax, eax).unwrap();
            a.xor(edx, edx).unwrap();
            if write {
                a.wrmsr().unwrap();
            } else {
                a.rdmsr().unwrap();
            }
            a.hlt().unwrap();
        });
        assert_eq!(
            seen64(&g),
            Seen {
                vector: 13,
                code: 0,
                rip: CODE + 9
            },
            "msr {msr:#x} write {write}"
        );
    }
}

#[test]
fn corners_cpuid_apic_bit_follows_apic_base_enable() {
    let st = run64_ok(|a| {
        a.mov(eax, 1u32).unwrap();
        a.cpuid().unwrap();
        a.mov(r8d, edx).unwrap();
        a.mov(ecx, 0x1bu32).unwrap();
        a.rdmsr().unwrap();
        a.mov(r11d, eax).unwrap();
        a.and(eax, !0x800u32 as i32).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, 1u32).unwrap();
        a.cpuid().unwrap();
        a.mov(r9d, edx).unwrap();
        a.mov(ecx, 0x1bu32).unwrap();
        a.mov(eax, r11d).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, 1u32).unwrap();
        a.cpuid().unwrap();
        a.mov(r10d, edx).unwrap();
        a.hlt().unwrap();
    });
    assert_ne!(st.gpr[8] & 1 << 9, 0, "APIC on at reset");
    assert_eq!(st.gpr[9] & 1 << 9, 0, "hidden with IA32_APIC_BASE.EN clear");
    assert_ne!(st.gpr[10] & 1 << 9, 0, "back once enabled");
    assert_ne!(st.gpr[11] & 0x800, 0);
}

#[test]
fn corners_cpuid_has_no_kvm_signature_or_paravirt_features() {
    let st = run64_ok(|a| {
        a.mov(eax, 0x4000_0000u32).unwrap();
        a.cpuid().unwrap();
        a.mov(r8d, ebx).unwrap();
        a.mov(eax, 0x4000_0001u32).unwrap();
        a.cpuid().unwrap();
        a.mov(r9d, eax).unwrap();
        a.hlt().unwrap();
    });
    assert_ne!(st.gpr[8] as u32, u32::from_le_bytes(*b"KVMK"));
    assert_eq!(st.gpr[9], 0, "no KVM_FEATURE_* bits");
}

// ---------------------------------------------------------------------
// vmcall / vmmcall: KVM's hypercall ABI.

const ENOSYS: u64 = 1000u64.wrapping_neg();

#[test]
fn corners_hypercalls_answer_as_kvm_at_cpl0() {
    let st = run64_ok(|a| {
        a.mov(rax, 0x1234u64).unwrap(); // unknown
        a.vmcall().unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(eax, 1u32).unwrap(); // KVM_HC_VAPIC_POLL_IRQ
        a.vmmcall().unwrap();
        a.mov(r9, rax).unwrap();
        a.mov(eax, 12u32).unwrap(); // KVM_HC_MAP_GPA_RANGE: not enabled
        a.vmcall().unwrap();
        a.mov(r10, rax).unwrap();
        a.mov(eax, 5u32).unwrap(); // KVM_HC_KICK_CPU, no such APIC ID
        a.mov(ecx, 77u32).unwrap();
        a.vmcall().unwrap();
        a.mov(r11, rax).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(st.gpr[8], ENOSYS);
    assert_eq!(st.gpr[9], 0);
    assert_eq!(st.gpr[10], ENOSYS);
    assert_eq!(st.gpr[11], 0);
}

#[test]
fn corners_hypercalls_from_cpl3_are_eperm_and_32_bit_results_are_32_bits() {
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    record64(&g, 0);
    let user = 0x30_0000u64;
    g.code(64, user, |a| {
        a.mov(eax, 1u32).unwrap();
        a.vmcall().unwrap();
        a.mov(r12, rax).unwrap();
        a.hlt().unwrap(); // #GP at CPL 3
    });
    g.code(64, CODE, |a| {
        iretq_to_ring3(a, user, 0x2f000, UCODE, 0x2);
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(g.state().gpr[12], u64::MAX, "-KVM_EPERM");
    assert_eq!(seen64(&g).vector, 13);

    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    g.code(32, CODE, |a| {
        a.mov(eax, 0x1234u32).unwrap();
        a.vmcall().unwrap();
        a.hlt().unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    assert_eq!(g.state().gpr[0], ENOSYS & 0xffff_ffff);
}

#[test]
fn corners_kvm_kick_cpu_wakes_a_halted_vcpu() {
    let mut g = Guest::new(2);
    let s0 = g.long_mode(CODE);
    let mut s1 = s0.clone();
    s1.rip = CODE + 0x800;
    s1.gpr[4] = STACK - 0x1000;
    g.code(64, CODE + 0x800, |a| {
        a.mov(dword_ptr(OUT), 1).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap(); // IF=1: sleeps until the kick
        a.mov(dword_ptr(OUT + 4), 2).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    // vCPU 0: wait for vCPU 1 to halt, kick APIC ID 1; a kick to itself
    // makes its next hlt return at once.
    g.code(64, CODE, |a| {
        let mut wait = a.create_label();
        a.set_label(&mut wait).unwrap();
        a.pause().unwrap();
        a.cmp(dword_ptr(OUT), 1).unwrap();
        a.jne(wait).unwrap();
        a.mov(ecx, 100_000u32).unwrap();
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(spin).unwrap();
        a.mov(eax, 5u32).unwrap();
        a.mov(ecx, 1u32).unwrap();
        a.vmcall().unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(eax, 5u32).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.vmcall().unwrap();
        a.hlt().unwrap(); // returns at once: pv_unhalted
        a.mov(r9d, 9u32).unwrap();
        a.hlt().unwrap();
    });
    let mut v1 = g.vm.create_vcpu(1).unwrap();
    v1.set_state(&s1).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..1000 {
            if let Ok(vmplay_hypervisor::VcpuExit::Halt) = v1.run() {
                let _ = tx.send(());
                return;
            }
        }
    });
    g.vcpu.set_state(&s0).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.gpr[8], 0);
    assert_eq!(st.gpr[9], 9, "the self-kick made the first hlt return");
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("vCPU 1 woke and halted with IF=0");
    assert_eq!(g.read_u64(OUT + 4) as u32, 2);
}

#[test]
fn corners_an_interrupt_frame_past_the_tss_stack_limit_is_ss_new_ss() {
    // `int 0x30` from ring 3: the ring-0 stack from the TSS (SS0 = the
    // 4 KiB segment, ESP0 = 6) cannot hold the 20-byte frame: #SS(SS0),
    // EXT clear (a software interrupt), taken through a task gate so the
    // handler task sees the error code.
    let mut g = Guest::new(1);
    let s = prot32(&g, CODE);
    tasks(&g);
    g.write_u64(TSS_A_AT + 4, 6 | u64::from(SMALL_DATA) << 32);
    g.write_u64(IDT32 + 8 * 0x30, gate32(HANDLERS, CODE32, 0xee));
    g.write_u64(IDT32 + 8 * 12, u64::from(TSS_C) << 16 | 0x85u64 << 40);
    g.code(32, TASK_C_CODE, |a| {
        a.pop(esi).unwrap();
        a.hlt().unwrap();
    });
    let user = 0x10_2000u64;
    g.code(32, user, |a| {
        a.mov(eax, 0x6666u32).unwrap();
        a.int(0x30).unwrap();
        a.hlt().unwrap();
    });
    g.code(32, CODE, |a| {
        iretd_to(a, UCODE32 | 3, user as u32, USMALL_STACK | 3, 0x800);
    });
    g.vcpu.set_state(&s).unwrap();
    assert_eq!(g.run().end, End::Halt);
    let st = g.state();
    assert_eq!(st.tr.selector, TSS_C);
    assert_eq!(st.gpr[6] as u32, u32::from(SMALL_DATA), "#SS(SS0)");
    assert_eq!(rd32(&g, TSS_A_AT + 0x20), user + 5, "A's EIP: the int");
    assert_eq!(rd32(&g, TSS_A_AT + 0x28), 0x6666);
    assert_eq!(rd32(&g, TSS_A_AT + 0x4c), u64::from(UCODE32 | 3));
    assert_eq!(rd32(&g, TSS_A_AT + 0x38), 0x800, "A's ESP untouched");
}
