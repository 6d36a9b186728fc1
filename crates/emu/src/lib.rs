//! `vmplay-emu`: a software x86-64 CPU behind the `vmplay-hypervisor` seam.
//!
//! An interpreter tier: instructions are decoded once with iced-x86 into
//! blocks cached by guest-physical address, each instruction resolved to a
//! handler with pre-decoded operands; flags are lazy; memory goes through
//! a software TLB of host pointers. Like KVM's in-kernel irqchip, the VM
//! also owns the LAPICs, IOAPIC, 8259 PIC and PIT (`platform`), CPUID and
//! MSRs. Everything else — devices, loaders, the memory map — belongs to
//! the machine and is reached through `VcpuExit`s.
//!
//! Hot 64-bit blocks are translated to host code (`jit`). It does not
//! model SMM, VMX, call gates or virtual-8086 mode. See DESIGN.md for the
//! structure and how to add an instruction family.

pub(crate) mod cpu;
pub mod cpuid;
pub(crate) mod debug;
pub(crate) mod decode;
pub(crate) mod exec;
pub(crate) mod isa;
pub mod jit;
pub(crate) mod mem;
pub(crate) mod mode;
pub(crate) mod msr;
pub(crate) mod platform;
pub(crate) mod trace;
pub(crate) mod vcpu;
pub(crate) mod vm;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use vmplay_hypervisor::{Error, GuestMemory, Hypervisor, Result, Vm, VmSpec};

pub use vcpu::EmuVcpu;
pub use vm::EmuVm;

/// Options of the software CPU.
#[derive(Debug, Clone, Default)]
pub struct EmuOptions {
    /// Write an instruction trace to this file (`--trace FILE`).
    pub trace: Option<PathBuf>,
    /// The CPU the guest is told it runs on (CPUID, the MSRs that go with it).
    pub cpu_model: cpuid::CpuModel,
    /// The tiers (`--emu-tier`); `None`: from the environment
    /// ([`jit::JitConfig::from_env`]).
    pub jit: Option<jit::JitConfig>,
    /// Runs first on the backend's own `emu-timers` thread, before it does
    /// anything (where the VMM installs that thread's seccomp filter); its
    /// error fails VM creation.
    pub timer_thread_hook: Option<ThreadHook>,
}

/// A function run first on a thread the backend starts.
#[derive(Clone)]
pub struct ThreadHook(pub Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>);

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook")
    }
}

/// The `emu` backend.
#[derive(Debug, Clone, Default)]
pub struct EmuHypervisor {
    opts: EmuOptions,
}

impl EmuHypervisor {
    pub fn new(opts: EmuOptions) -> EmuHypervisor {
        EmuHypervisor { opts }
    }
}

/// Most vCPUs one VM may have (xAPIC IDs stay below the broadcast ID).
pub const MAX_VCPUS: u32 = 254;

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    fn create_vm(&self, spec: &VmSpec, memory: &GuestMemory) -> Result<Arc<dyn Vm>> {
        if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
            return Err(Error::Unavailable {
                backend: "emu",
                reason: "the host CPU lacks cmpxchg16b".into(),
            });
        }
        if spec.vcpus > MAX_VCPUS {
            return Err(Error::Unsupported(format!(
                "emu supports at most {MAX_VCPUS} vCPUs, {} requested",
                spec.vcpus
            )));
        }
        let jit = match self.opts.jit {
            Some(c) => c,
            None => jit::JitConfig::from_env(None).map_err(Error::Unsupported)?,
        };
        let vm = EmuVm::with_timer_hook(
            spec,
            memory,
            self.opts.trace.as_deref(),
            self.opts.cpu_model,
            self.opts.timer_thread_hook.clone(),
        )?;
        vm.shared().set_jit(jit);
        Ok(Arc::new(vm))
    }
}
