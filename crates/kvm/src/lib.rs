//! The KVM backend: vmplay's [`Hypervisor`](vmplay_hypervisor::Hypervisor)
//! seam implemented on Linux `/dev/kvm` through the rust-vmm crates
//! (kvm-ioctls, kvm-bindings), the way Firecracker and Cloud Hypervisor do.
//!
//! KVM does in the kernel what the seam leaves to a backend: the LAPICs,
//! IOAPIC, 8259 PICs and the PIT (with port 0x61), CPUID and MSRs. This
//! crate sets those up and turns `KVM_RUN` exits into [`VcpuExit`]s, one
//! access per exit. It is not a machine: it builds no memory map, loads no
//! kernel and owns no device; and no KVM type leaves it.
//!
//! What the machine should know about this backend:
//! - With the in-kernel LAPIC, KVM keeps a halted vCPU in the kernel, even
//!   after `cli; hlt`: [`VcpuExit::Halt`] never comes, and only a kick
//!   brings such a vCPU back.
//! - Kicks interrupt `KVM_RUN` with the real-time signal `SIGRTMIN()`,
//!   whose handler this crate installs (a no-op, `SA_RESTART`).
//! - `rep ins`/`rep outs` come out one element per exit.
//! - `KVM_SYSTEM_EVENT` shutdown and reset both end as [`VcpuExit::Shutdown`].
//!
//! [`raw_loop`] is a bare kvm-ioctls exit loop, the peer the machine's own
//! exit path is benchmarked against.
//!
//! [`VcpuExit`]: vmplay_hypervisor::VcpuExit
//! [`VcpuExit::Halt`]: vmplay_hypervisor::VcpuExit::Halt
//! [`VcpuExit::Shutdown`]: vmplay_hypervisor::VcpuExit::Shutdown

mod cpuid;
mod debug;
mod hypervisor;
mod kick;
pub mod raw_loop;
mod regs;
mod vcpu;
mod vm;

pub use hypervisor::KvmHypervisor;

/// The three pages KVM on Intel needs for the real-mode TSS. Must equal
/// `KVM_TSS` in crates/boot/src/layout.rs (copied, not imported, so the
/// backend does not depend on the loaders).
pub(crate) const KVM_TSS: u64 = 0xfffb_d000;
/// The page KVM on Intel needs for its real-mode identity page table. Must
/// equal `KVM_IDENTITY_MAP` in crates/boot/src/layout.rs.
pub(crate) const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// Bytes from `KVM_IDENTITY_MAP` to the end of the TSS pages: guest RAM must
/// stay clear of them.
pub(crate) const KVM_PRIVATE_END: u64 = KVM_TSS + 3 * 0x1000;

/// Number of IOAPIC pins, hence of GSIs the in-kernel irqchip routes by
/// default (`IOAPIC_PINS` in crates/boot/src/layout.rs).
pub(crate) const IOAPIC_PINS: u32 = 24;

use vmplay_hypervisor::Error;

/// A failed ioctl, with what it was applied to in the message.
pub(crate) fn host_error(
    op: &'static str,
    detail: impl std::fmt::Display,
    err: vmm_sys_util::errno::Error,
) -> Error {
    let io = std::io::Error::from(err);
    Error::Host {
        op,
        source: std::io::Error::new(io.kind(), format!("{detail}: {io}")),
    }
}
