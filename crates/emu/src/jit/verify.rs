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

/// What a block can change of the vCPU (everything but caches).
struct Snapshot {
    gpr: [u64; 18],
    flags: crate::cpu::flags::Flags,
    rflags: u64,
    seg: [crate::cpu::Seg; 6],
    ldtr: crate::cpu::Seg,
    tr: crate::cpu::Seg,
    gdtr: crate::cpu::DescTable,
    idtr: crate::cpu::DescTable,
    cr: [u64; 5],
    dr: [u64; 8],
    msr: crate::cpu::Msrs,
    fpu: crate::cpu::fpu::Fpu,
    mode: crate::cpu::Mode,
    cpl: u8,
    bits: u8,
    masks: [u64; 3],
    int_shadow: bool,
    nmi_blocked: bool,
    run_state: crate::cpu::RunState,
    icount: u64,
}

impl Snapshot {
    fn take(c: &Cpu) -> Snapshot {
        Snapshot {
            gpr: c.gpr,
            flags: c.flags,
            rflags: c.rflags,
            seg: c.seg,
            ldtr: c.ldtr,
            tr: c.tr,
            gdtr: c.gdtr,
            idtr: c.idtr,
            cr: [c.cr0, c.cr2, c.cr3, c.cr4, c.efer],
            dr: c.dr,
            msr: c.msr.clone(),
            fpu: c.fpu,
            mode: c.mode,
            cpl: c.cpl,
            bits: c.bits,
            masks: [c.ip_mask, c.sp_mask, c.lin_mask],
            int_shadow: c.int_shadow,
            nmi_blocked: c.nmi_blocked,
            run_state: c.run_state,
            icount: c.icount,
        }
    }

    fn restore(&self, c: &mut Cpu) {
        c.gpr = self.gpr;
        c.flags = self.flags;
        c.rflags = self.rflags;
        c.seg = self.seg;
        c.ldtr = self.ldtr;
        c.tr = self.tr;
        c.gdtr = self.gdtr;
        c.idtr = self.idtr;
        [c.cr0, c.cr2, c.cr3, c.cr4, c.efer] = self.cr;
        c.dr = self.dr;
        c.msr = self.msr.clone();
        c.fpu = self.fpu;
        c.mode = self.mode;
        c.cpl = self.cpl;
        c.bits = self.bits;
        [c.ip_mask, c.sp_mask, c.lin_mask] = self.masks;
        c.int_shadow = self.int_shadow;
        c.nmi_blocked = self.nmi_blocked;
        c.run_state = self.run_state;
        c.icount = self.icount;
        c.tlb.select(c.cpl == 3);
        c.tlb.flush_all();
    }
}

/// Runs `block` (translated, at the current RIP) under co-simulation;
/// returns the exit code translated code would have returned.
pub fn run(cpu: &mut Cpu, block: &mut Block, jit: &mut Jit) -> u64 {
    // The instructions the translation holds (a trace may run on past
    // the block).
    let Some((ins, insns)) = super::decode_again(cpu, block) else {
        // Its page changed under it: the head check will see that.
        return jit.enter(block.jit_entry, cpu);
    };
    let s0 = Snapshot::take(cpu);
    let devices0 = cpu.device_accesses;
    cpu.undo = Some(Vec::new());
    cpu.stop = false;
    let exit = crate::exec::run_trace_for_verify(cpu, &ins, &insns);
    let log = cpu.undo.take().unwrap_or_default();
    if exit {
        return IO;
    }
    // As after any interpreted block: the answered reads are used up.
    if !cpu.io.log.is_empty() {
        cpu.io.retire();
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
    let undefined = block.jit_undefined_flags;
    let interp_flags = cpu.flags.bits() & !undefined;
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
    s0.restore(cpu);
    cpu.stop = false;
    let code = jit.enter(block.jit_entry, cpu);
    if code == GO_ON
        && cpu.icount == s0.icount
        && cpu.gpr[crate::cpu::RIP] == s0.gpr[crate::cpu::RIP]
    {
        // The translation left at its head (an interrupt became pending
        // meanwhile): nothing ran; the dispatcher takes it from here.
        return GO_ON;
    }
    if code == LEAVE && cpu.gpr[crate::cpu::RIP] != interp_state.rip {
        // Translated code may leave at any instruction boundary after an
        // instruction it ran through the interpreter (an answered read,
        // a stop): there is no interpreter state to compare with there.
        return LEAVE;
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
        let mut jit_state = cpu.save_state();
        jit_state.rflags &= !undefined;
        let mut want = interp_state.clone();
        want.rflags &= !undefined;
        compare(&want, &jit_state, &mut diffs);
        let f = cpu.flags.bits() & !undefined;
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
        cpu.vm
            .jit_totals
            .mismatches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rip = s0.gpr[crate::cpu::RIP];
        #[cfg(test)]
        eprintln!(
            "emu verify: block at {rip:#x} differs: {}",
            diffs.join("; ")
        );
        tracing::error!(
            "emu verify: block at {:#x} differs: {} [block: {}]",
            rip,
            diffs.join("; "),
            disassemble(block, rip)
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
    for (k, (x, y)) in a.fpu.xmm.iter().zip(b.fpu.xmm.iter()).enumerate() {
        if x != y {
            diffs.push(format!("xmm{k}: interp {x:#x}, jit {y:#x}"));
        }
    }
    if a.cr2 != b.cr2 {
        diffs.push(format!("cr2: interp {:#x}, jit {:#x}", a.cr2, b.cr2));
    }
    if a.cs.selector != b.cs.selector || a.ss.selector != b.ss.selector {
        diffs.push("cs/ss differ".to_string());
    }
}
