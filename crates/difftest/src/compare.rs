//! Comparing what the host did with what a backend did, and saying so.

use crate::generate::Case;
use crate::layout::{CODE_ADDR, DATA_ADDR, STACK_ADDR};
use crate::state::{InitialState, Observed, Outcome, USER_FLAGS};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use std::fmt::Write;

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// The differences between `native` and `backend`, one line each (empty:
/// they agree). Undefined flags and the x87 last-instruction pointers
/// (FIP/FDP/FOP, which AMD's FXSAVE omits) are not compared.
pub fn differences(case: &Case, native: &Observed, backend: &Observed) -> Vec<String> {
    let mut d = Vec::new();
    if native.outcome != backend.outcome {
        d.push(format!(
            "outcome: host {}, backend {}",
            native.outcome, backend.outcome
        ));
    }
    if native.rip != backend.rip {
        d.push(format!(
            "rip: host {:#x}, backend {:#x}",
            native.rip, backend.rip
        ));
    }
    if native.cr2 != backend.cr2 {
        d.push(format!(
            "cr2: host {:#x}, backend {:#x}",
            native.cr2, backend.cr2
        ));
    }
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if native.gpr[i] != backend.gpr[i] {
            d.push(format!(
                "{name}: host {:#018x}, backend {:#018x}",
                native.gpr[i], backend.gpr[i]
            ));
        }
    }
    // A faulting case stops part-way: flags undefined there count as
    // undefined even if a later instruction would have defined them.
    let (undefined_rflags, undefined_fsw) = match native.outcome {
        Outcome::Completed => (case.undefined_rflags, case.undefined_fsw),
        Outcome::Exception { .. } => (
            case.undefined_rflags | case.undefined_rflags_before_fault,
            case.undefined_fsw | case.undefined_fsw_before_fault,
        ),
    };
    let mask = USER_FLAGS & !undefined_rflags;
    if (native.rflags ^ backend.rflags) & mask != 0 {
        d.push(format!(
            "rflags: host {:#x}, backend {:#x} (differing {}; compared {})",
            native.rflags & mask,
            backend.rflags & mask,
            flag_names((native.rflags ^ backend.rflags) & mask),
            flag_names(mask)
        ));
    }
    let (n, b) = (&native.fpu, &backend.fpu);
    if n.fcw != b.fcw {
        d.push(format!("fcw: host {:#06x}, backend {:#06x}", n.fcw, b.fcw));
    }
    // An MMX instruction that faults: Intel's CPUs have already made the
    // x87-to-MMX switch (TOP = 0, every tag valid), AMD's have not. The
    // registers are then compared by physical number, TOP and the tags
    // not at all.
    let mmx_fault = matches!(native.outcome, Outcome::Exception { .. })
        && instruction_at(case, native.rip).is_some_and(|i| uses_mmx(&i));
    let top_mask = if mmx_fault { !FSW_TOP } else { !0 };
    let fsw_mask = !undefined_fsw & top_mask;
    if (n.fsw ^ b.fsw) & fsw_mask != 0 {
        d.push(format!(
            "fsw: host {:#06x}, backend {:#06x} (undefined bits {:#06x} masked)",
            n.fsw, b.fsw, undefined_fsw
        ));
    }
    if n.ftw != b.ftw && !mmx_fault {
        d.push(format!("ftw: host {:#04x}, backend {:#04x}", n.ftw, b.ftw));
    }
    if n.mxcsr != b.mxcsr {
        d.push(format!(
            "mxcsr: host {:#x}, backend {:#x}",
            n.mxcsr, b.mxcsr
        ));
    }
    // ST(i) is physical register (TOP + i) mod 8.
    let top = |fsw: u16| usize::from(fsw >> 11 & 7);
    let (nt, bt) = if mmx_fault {
        (top(n.fsw), top(b.fsw))
    } else {
        (0, 0)
    };
    for p in 0..8 {
        let (ni, bi) = ((p + 8 - nt) % 8, (p + 8 - bt) % 8);
        if n.st[ni][..10] != b.st[bi][..10] {
            let which = if mmx_fault {
                format!("physical {p}")
            } else {
                format!("st{p}/mm{p}")
            };
            d.push(format!(
                "{which}: host {}, backend {}",
                f80(&n.st[ni]),
                f80(&b.st[bi])
            ));
        }
    }
    // DPPS/DPPD with two NaNs among the products: which one each lane
    // gets is the CPU's own (Intel's lanes differ from one another,
    // AMD's do not), so there any NaN matches any NaN.
    let nan_lanes = nan_lanes(case);
    for i in 0..16 {
        let same = n.xmm[i] == b.xmm[i]
            || nan_lanes.is_some_and(|w| lanes_match_up_to_nan(n.xmm[i], b.xmm[i], w));
        if !same {
            d.push(format!(
                "xmm{i}: host {:#034x}, backend {:#034x}",
                n.xmm[i], b.xmm[i]
            ));
        }
    }
    memory_diff(&mut d, "data", DATA_ADDR, &native.data, &backend.data);
    memory_diff(&mut d, "stack", STACK_ADDR, &native.stack, &backend.stack);
    d
}

const FSW_TOP: u16 = 0x3800;

/// The case's instruction at `rip`.
fn instruction_at(case: &Case, rip: u64) -> Option<iced_x86::Instruction> {
    let at = usize::try_from(rip.checked_sub(CODE_ADDR)?).ok()?;
    let code = case.code.get(at..)?;
    let i = Decoder::with_ip(64, code, rip, DecoderOptions::NONE).decode();
    (!i.is_invalid()).then_some(i)
}

fn uses_mmx(i: &iced_x86::Instruction) -> bool {
    (0..i.op_count())
        .any(|o| i.op_kind(o) == iced_x86::OpKind::Register && i.op_register(o).is_mm())
}

/// The lane width (bits) in which XMM results are compared up to NaN
/// payloads: 32 if the case runs DPPS, 64 if only DPPD.
fn nan_lanes(case: &Case) -> Option<u32> {
    let mut width = None;
    for i in Decoder::with_ip(64, &case.code, CODE_ADDR, DecoderOptions::NONE) {
        match i.mnemonic() {
            iced_x86::Mnemonic::Dpps => return Some(32),
            iced_x86::Mnemonic::Dppd => width = Some(64),
            _ => {}
        }
    }
    width
}

/// Every `width`-bit lane equal, or a NaN in both.
fn lanes_match_up_to_nan(a: u128, b: u128, width: u32) -> bool {
    let (exp, frac) = if width == 32 {
        (0xffu128 << 23, (1u128 << 23) - 1)
    } else {
        (0x7ffu128 << 52, (1u128 << 52) - 1)
    };
    let nan = |v: u128| v & exp == exp && v & frac != 0;
    let mask = (1u128 << width) - 1;
    (0..128 / width).all(|k| {
        let (x, y) = (a >> (k * width) & mask, b >> (k * width) & mask);
        x == y || (nan(x) && nan(y))
    })
}

fn f80(v: &[u8; 16]) -> String {
    let exp = u16::from_le_bytes([v[8], v[9]]);
    let mant = u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]));
    format!("{exp:04x}:{mant:016x}")
}

fn flag_names(bits: u64) -> String {
    let names = [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (10, "DF"),
        (11, "OF"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| bits >> b & 1 == 1)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

/// Up to 8 differing 8-byte groups of a page.
fn memory_diff(d: &mut Vec<String>, what: &str, base: u64, host: &[u8], backend: &[u8]) {
    let mut shown = 0;
    let mut total = 0;
    for (i, (h, b)) in host.chunks(8).zip(backend.chunks(8)).enumerate() {
        if h != b {
            total += 1;
            if shown < 8 {
                shown += 1;
                d.push(format!(
                    "{what} [{:#x}]: host {:02x?}, backend {:02x?}",
                    base + 8 * i as u64,
                    h,
                    b
                ));
            }
        }
    }
    if total > shown {
        d.push(format!(
            "{what}: {} more differing 8-byte groups",
            total - shown
        ));
    }
}

/// The disassembly of `code` at `CODE_ADDR`, one instruction a line.
pub fn disassemble(code: &[u8]) -> String {
    let mut out = String::new();
    let mut decoder = Decoder::with_ip(64, code, CODE_ADDR, DecoderOptions::NONE);
    let mut fmt = IntelFormatter::new();
    let mut text = String::new();
    for ins in &mut decoder {
        text.clear();
        fmt.format(&ins, &mut text);
        let start = (ins.ip() - CODE_ADDR) as usize;
        let bytes = &code[start..start + ins.len()];
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(out, "    {:08x} {hex:<30} {text}", ins.ip());
    }
    out
}

/// The registers and control words a case starts with.
pub fn describe_state(s: &InitialState) -> String {
    let mut out = String::new();
    for (i, name) in GPR_NAMES.iter().enumerate() {
        let _ = write!(out, "{name:>4}={:016x}", s.gpr[i]);
        out.push(if i % 4 == 3 { '\n' } else { ' ' });
    }
    let f = &s.fpu;
    let _ = writeln!(
        out,
        "rflags={:#x} fcw={:#06x} fsw={:#06x} ftw={:#04x} mxcsr={:#x}",
        s.loaded_rflags(),
        f.fcw,
        f.fsw,
        f.ftw,
        f.mxcsr
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{Class, blank_state};
    use crate::state::{FLAGS_AF, FLAGS_CF, FLAGS_OF, Outcome};

    fn case() -> Case {
        Case {
            class: Class::IntegerAlu,
            seed: 1,
            index: 0,
            code: vec![0x48, 0x01, 0xc8],
            init: blank_state(),
            undefined_rflags: FLAGS_OF,
            undefined_fsw: 0,
            undefined_rflags_before_fault: FLAGS_OF | FLAGS_AF,
            undefined_fsw_before_fault: 0,
        }
    }

    fn obs() -> Observed {
        let mut o = Observed::blank();
        o.outcome = Outcome::Completed;
        o
    }

    #[test]
    fn agreeing_observations_have_no_differences() {
        assert!(differences(&case(), &obs(), &obs()).is_empty());
    }

    #[test]
    fn undefined_flags_are_masked_and_defined_ones_are_not() {
        let mut b = obs();
        b.rflags = FLAGS_OF;
        assert!(differences(&case(), &obs(), &b).is_empty());
        b.rflags = FLAGS_CF;
        let d = differences(&case(), &obs(), &b);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("CF"), "{d:?}");
    }

    #[test]
    fn a_fault_masks_flags_undefined_part_way() {
        let fault = Observed {
            outcome: Outcome::Exception { vector: 14 },
            ..obs()
        };
        let mut b = fault.clone();
        b.rflags = FLAGS_AF;
        assert!(differences(&case(), &fault, &b).is_empty());
        // Completed: AF was defined again by the end, so it counts.
        let mut done = obs();
        done.rflags = FLAGS_AF;
        assert_eq!(differences(&case(), &obs(), &done).len(), 1);
    }

    #[test]
    fn registers_memory_and_outcome_differences_are_named() {
        let mut b = obs();
        b.gpr[13] = 5;
        b.data[0x10] = 1;
        b.fpu.xmm[2] = 9;
        b.outcome = Outcome::Exception { vector: 6 };
        let d = differences(&case(), &obs(), &b).join("\n");
        for needle in ["r13", "data [0x40100010]", "xmm2", "#UD"] {
            assert!(d.contains(needle), "{needle} missing in:\n{d}");
        }
    }

    #[test]
    fn a_faulting_mmx_instruction_compares_x87_registers_by_physical_number() {
        // movq [r9+7ACh],mm5, faulting: Intel has switched to MMX (TOP 0),
        // AMD has not (TOP 6); the same physical registers either way.
        let mut c = case();
        c.code = vec![0x41, 0x0f, 0x7f, 0xa9, 0xac, 0x07, 0x00, 0x00];
        let mut intel = obs();
        intel.outcome = Outcome::Exception { vector: 14 };
        intel.rip = CODE_ADDR;
        let mut amd = intel.clone();
        intel.fpu.fsw = 0x0400;
        amd.fpu.fsw = 0x3400;
        amd.fpu.ftw = 0xbf;
        for p in 0..8u8 {
            intel.fpu.st[usize::from(p)][0] = p + 1;
            amd.fpu.st[usize::from((p + 2) % 8)][0] = p + 1;
        }
        assert!(differences(&c, &intel, &amd).is_empty());
        // A physical register that differs still counts.
        amd.fpu.st[0][1] = 7;
        let d = differences(&c, &intel, &amd);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("physical 6"), "{d:?}");
        // Not an MMX instruction: TOP counts.
        c.code = vec![0x48, 0x01, 0xc8];
        assert!(!differences(&c, &intel, &amd).is_empty());
    }

    #[test]
    fn dpps_results_match_up_to_nan_payloads_and_nothing_else() {
        let mut c = case();
        // dpps xmm3,xmm10,0FFh
        c.code = vec![0x66, 0x41, 0x0f, 0x3a, 0x40, 0xda, 0xff];
        let mut host = obs();
        host.fpu.xmm[3] = 0xffffffc5_ffffffff_ffffffc5_ffffffff;
        let mut emu = obs();
        emu.fpu.xmm[3] = 0xffffffc5_ffffffc5_ffffffc5_ffffffc5;
        assert!(differences(&c, &host, &emu).is_empty());
        // A number against a NaN is a difference.
        emu.fpu.xmm[3] = 0xffffffc5_ffffffc5_ffffffc5_3f800000;
        assert_eq!(differences(&c, &host, &emu).len(), 1);
        // Without DPPS, payloads count.
        c.code = vec![0x48, 0x01, 0xc8];
        emu.fpu.xmm[3] = 0xffffffc5_ffffffc5_ffffffc5_ffffffc5;
        assert_eq!(differences(&c, &host, &emu).len(), 1);
    }

    #[test]
    fn disassembly_shows_the_instruction() {
        assert!(disassemble(&[0x48, 0x01, 0xc8]).contains("add rax,rcx"));
    }
}
