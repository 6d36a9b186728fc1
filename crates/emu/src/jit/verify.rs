//! Co-simulation (`VMPLAY_EMU_VERIFY`): a translated block runs twice from
//! the same state, first through the interpreter (its RAM stores logged
//! with their old bytes), then — after the stores are undone and the
//! registers restored — as translated code; registers, flags and the
//! stored bytes must agree. Blocks that reach a device (port or MMIO
//! access) or rewrite their own page keep the interpreter's result
//! unchecked: their effects cannot be run twice.

use vmplay_hypervisor::CpuState;

use super::Jit;
use super::helpers::{GO_ON, IO, LEAVE};
use crate::cpu::Cpu;
use crate::decode::cache::Block;

/// Runs `block` (translated, at the current RIP) under co-simulation;
/// returns the exit code translated code would have returned.
pub fn run(cpu: &mut Cpu, block: &mut Block, jit: &mut Jit) -> u64 {
    let s0 = cpu.save_state();
    let flags0 = cpu.flags;
    let devices0 = cpu.device_accesses;
    let (icount0, shadow0) = (cpu.icount, cpu.int_shadow);
    cpu.undo = Some(Vec::new());
    cpu.stop = false;
    let (_, exit) = crate::exec::run_block_for_verify(cpu, block);
    let log = cpu.undo.take().unwrap_or_default();
    if exit {
        return IO;
    }
    // Effects that cannot be run twice, or a block the interpreter cut
    // short (a store to a code page, a mode change): keep the
    // interpreter's run, unchecked.
    if cpu.device_accesses != devices0
        || !block.is_current(&cpu.vm.code)
        || cpu.shutdown
        || cpu.stop
        || !block.jit_verifiable
    {
        return LEAVE;
    }
    let interp_state = cpu.save_state();
    let interp_flags = cpu.flags.bits();
    let stored: Vec<u64> = log
        .iter()
        // SAFETY: logged addresses are RAM host pointers the interpreter
        // just stored `n` bytes to, inside one page.
        .map(|&(p, _, n)| unsafe { crate::mem::access::host_load(p as *const u8, usize::from(n)) })
        .collect();
    for &(p, old, n) in log.iter().rev() {
        // SAFETY: as above; puts back the bytes the store replaced.
        unsafe { crate::mem::access::host_store(p as *mut u8, usize::from(n), old) };
    }
    cpu.load_state(&s0);
    cpu.flags = flags0;
    cpu.icount = icount0;
    cpu.int_shadow = shadow0;
    cpu.stop = false;
    let code = jit.enter(block.jit_entry, cpu);
    if code == GO_ON && cpu.icount == icount0 && cpu.rip() == s0.rip {
        // The translation left at its head (an interrupt became pending
        // meanwhile): nothing ran; the dispatcher takes it from here.
        return GO_ON;
    }
    jit.stats.verified += 1;
    cpu.vm
        .jit_totals
        .verified
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut diffs = Vec::new();
    if code == IO {
        diffs.push("translated code exited for I/O, the interpreter did not".to_string());
    } else {
        compare(&interp_state, &cpu.save_state(), &mut diffs);
        let f = cpu.flags.bits();
        if f != interp_flags {
            diffs.push(format!("flags: interp {interp_flags:#x}, jit {f:#x}"));
        }
        for (&(p, _, n), &want) in log.iter().zip(&stored) {
            // SAFETY: as above.
            let got = unsafe { crate::mem::access::host_load(p as *const u8, usize::from(n)) };
            if got != want {
                diffs.push(format!(
                    "store at host {p:#x} ({n} bytes): interp {want:#x}, jit {got:#x}"
                ));
            }
        }
    }
    if !diffs.is_empty() {
        jit.stats.mismatches += 1;
        #[cfg(test)]
        eprintln!(
            "emu verify: block at {:#x} differs: {}",
            s0.rip,
            diffs.join("; ")
        );
        cpu.vm
            .jit_totals
            .mismatches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(
            "emu verify: block at {:#x} differs: {} [block: {}]",
            s0.rip,
            diffs.join("; "),
            disassemble(block, s0.rip)
        );
    }
    if code == LEAVE { LEAVE } else { GO_ON }
}

/// The block's guest instructions, for the report.
fn disassemble(block: &Block, rip: u64) -> String {
    use iced_x86::Formatter;
    let (host, len) = block.code_bytes();
    let mut buf = vec![0u8; len];
    // SAFETY: the block's bytes are in one RAM page (see `Block`).
    unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), len) };
    let mut f = iced_x86::IntelFormatter::new();
    let mut out = Vec::new();
    for i in iced_x86::Decoder::with_ip(64, &buf, rip, iced_x86::DecoderOptions::NONE) {
        let mut s = String::new();
        f.format(&i, &mut s);
        out.push(s);
    }
    out.join("; ")
}

fn compare(a: &CpuState, b: &CpuState, diffs: &mut Vec<String>) {
    for (k, (x, y)) in a.gpr.iter().zip(b.gpr.iter()).enumerate() {
        if x != y {
            diffs.push(format!("gpr{k}: interp {x:#x}, jit {y:#x}"));
        }
    }
    if a.rip != b.rip {
        diffs.push(format!("rip: interp {:#x}, jit {:#x}", a.rip, b.rip));
    }
    if a.rflags != b.rflags {
        diffs.push(format!(
            "rflags: interp {:#x}, jit {:#x}",
            a.rflags, b.rflags
        ));
    }
    if a.cr2 != b.cr2 {
        diffs.push(format!("cr2: interp {:#x}, jit {:#x}", a.cr2, b.cr2));
    }
    if a.cs.selector != b.cs.selector || a.ss.selector != b.ss.selector {
        diffs.push("cs/ss differ".to_string());
    }
}
