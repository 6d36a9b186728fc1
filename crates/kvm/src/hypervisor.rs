//! Opening `/dev/kvm` and checking that this host's KVM can run a vmplay
//! machine.

use std::ffi::CStr;
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
use vmplay_hypervisor::{Error, GuestMemory, Hypervisor, Result, Vm, VmSpec};

use crate::{host_error, kick, vm};

/// What vmplay needs from KVM, with what each is for.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP (in-kernel LAPIC, IOAPIC and PIC)",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2 (in-kernel PIT)"),
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY (guest RAM from VMM mappings)",
    ),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID (KVM_GET_SUPPORTED_CPUID)"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT (kicking vCPUs)"),
];

/// Linux KVM as a vmplay backend.
pub struct KvmHypervisor {
    kvm: Kvm,
    max_vcpus: u32,
    max_memslots: usize,
    /// What KVM can show a guest; each vCPU gets a normalised copy.
    supported_cpuid: CpuId,
    tsc_deadline: bool,
    xsave: bool,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor")
            .field("max_vcpus", &self.max_vcpus)
            .field("max_memslots", &self.max_memslots)
            .field("tsc_deadline", &self.tsc_deadline)
            .finish_non_exhaustive()
    }
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: "kvm",
        reason,
    }
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the API version and every capability
    /// the backend relies on, so a host that cannot run vmplay is reported
    /// here rather than halfway through building a VM.
    pub fn new() -> Result<KvmHypervisor> {
        Self::open(c"/dev/kvm")
    }

    fn open(path: &CStr) -> Result<KvmHypervisor> {
        let kvm = Kvm::new_with_path(path).map_err(|e| {
            unavailable(format!(
                "cannot open {}: {}",
                path.to_string_lossy(),
                std::io::Error::from(e)
            ))
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(unavailable(format!(
                "/dev/kvm speaks KVM API version {version}, vmplay needs {KVM_API_VERSION}"
            )));
        }
        let missing: Vec<&str> = REQUIRED_CAPS
            .iter()
            .filter(|(cap, _)| !kvm.check_extension(*cap))
            .map(|(_, name)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(unavailable(format!(
                "this KVM lacks {}",
                missing.join(", ")
            )));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| host_error("KVM_GET_SUPPORTED_CPUID", "/dev/kvm", e))?;
        kick::register_signal_handler()?;
        Ok(KvmHypervisor {
            max_vcpus: u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX),
            max_memslots: kvm.get_nr_memslots(),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            xsave: kvm.check_extension(Cap::Xsave),
            supported_cpuid,
            kvm,
        })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    fn create_vm(&self, spec: &VmSpec, memory: &GuestMemory) -> Result<Arc<dyn Vm>> {
        if spec.vcpus == 0 {
            return Err(Error::Unsupported(
                "a VM needs at least one vCPU, 0 were requested".into(),
            ));
        }
        if spec.vcpus > self.max_vcpus {
            return Err(Error::Unsupported(format!(
                "{} vCPUs requested, KVM on this host allows at most {}",
                spec.vcpus, self.max_vcpus
            )));
        }
        let vm = vm::KvmVm::new(
            &self.kvm,
            vm::VmConfig {
                vcpus: spec.vcpus,
                max_memslots: self.max_memslots,
                cpuid: self.supported_cpuid.clone(),
                tsc_deadline: self.tsc_deadline,
                xsave: self.xsave,
            },
            memory,
        )?;
        Ok(Arc::new(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_reported_as_unavailable() {
        match KvmHypervisor::open(c"/nonexistent/kvm") {
            Err(Error::Unavailable { backend, reason }) => {
                assert_eq!(backend, "kvm");
                assert!(
                    reason.starts_with("cannot open /nonexistent/kvm: No such file"),
                    "{reason}"
                );
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
