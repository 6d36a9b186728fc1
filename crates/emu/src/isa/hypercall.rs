//! `vmcall` / `vmmcall` as KVM's hypercall ABI (arch/x86/kvm/x86.c,
//! `kvm_emulate_hypercall`), so a guest written for KVM gets KVM's answers
//! instead of #UD: number in RAX, arguments in RBX, RCX, RDX, RSI, result
//! in RAX. Only CPL 0 may call (else -KVM_EPERM); outside 64-bit code the
//! number and the result are 32 bits. Both instructions work on either
//! vendor, as under KVM (which patches the other vendor's one).
//!
//! CPUID advertises no KVM signature or paravirt features (leaf
//! 0x4000_0000 says "vmplayemu"), so Linux never calls these; they are
//! here for guests and tests that probe KVM's ABI.

use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::decode::{Insn, Table};
use crate::isa::c;

pub const KVM_ENOSYS: u64 = 1000;
pub const KVM_EPERM: u64 = 1;
pub const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
pub const KVM_HC_KICK_CPU: u64 = 5;
pub const KVM_HC_SCHED_YIELD: u64 = 11;

fn hypercall(cpu: &mut Cpu, _: &Insn) -> Res {
    let long = cpu.mode == crate::cpu::Mode::Long;
    let mask = if long { u64::MAX } else { 0xffff_ffff };
    let nr = cpu.gpr[0] & mask;
    let a1 = cpu.gpr[1] & mask;
    let ret = if cpu.cpl != 0 {
        KVM_EPERM.wrapping_neg()
    } else {
        match nr {
            KVM_HC_VAPIC_POLL_IRQ => 0,
            // Wake the vCPU with APIC ID a1 from `hlt` (PV spinlocks'
            // unlock); a kick that finds it running makes its next `hlt`
            // return at once, as KVM's pv_unhalted does.
            KVM_HC_KICK_CPU => {
                let p = &cpu.vm.platform;
                if let Some(i) = (0..p.vcpus()).find(|&i| {
                    p.lapics[i].lock().unwrap_or_else(|e| e.into_inner()).id == a1 as u32
                }) {
                    p.signals[i].kick_unhalt();
                }
                0
            }
            KVM_HC_SCHED_YIELD => {
                std::thread::yield_now();
                0
            }
            // Clock pairing, PV IPIs and the GPA-range exit need
            // kvmclock, the PV IPI feature or a VMM opt-in that vmplay does
            // not offer: KVM answers ENOSYS for them then too.
            _ => KVM_ENOSYS.wrapping_neg(),
        }
    };
    cpu.gpr[0] = ret & mask;
    Ok(())
}

pub(crate) fn register(t: &mut Table) {
    t.add(c("Vmcall"), hypercall);
    t.add(c("Vmmcall"), hypercall);
}
