//! `--trace FILE`: one line per executed instruction (CS:RIP, bytes'
//! decoding), and register dumps at fatal events.

use std::io::Write;

use crate::cpu::{CS, Cpu};
/// Logs `insn` about to run at the current RIP.
pub fn record(cpu: &Cpu, insn: Option<&iced_x86::Instruction>) {
    if let Some(t) = &cpu.vm.trace
        && let Some(insn) = insn
        && let Ok(mut w) = t.lock()
    {
        let _ = writeln!(
            w,
            "{} {:04x}:{:016x} {}",
            cpu.id,
            cpu.seg[CS].sel,
            cpu.rip(),
            insn
        );
    }
}

/// Logs a fatal event with the registers.
pub fn note(cpu: &Cpu, what: &str) {
    if let Some(t) = &cpu.vm.trace
        && let Ok(mut w) = t.lock()
    {
        let _ = writeln!(w, "vcpu {}: {what}\n{}", cpu.id, cpu.save_state());
        let _ = w.flush();
    }
}
