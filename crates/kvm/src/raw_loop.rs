//! A bare kvm-ioctls exit loop: the peer vmplay's own exit path is
//! benchmarked against.
//!
//! The VM is configured like the backend's (in-kernel irqchip and PIT, so
//! `KVM_RUN` does the same kernel work) but everything else is the least
//! a VMM can do: one vCPU in 32-bit flat protected mode, no CPUID or MSR
//! setup, and a `match` on kvm-ioctls' exit per `out`. The guest is
//!
//! ```text
//!     mov ecx, n ; mov edx, port ; xor eax, eax
//! l:  out dx, al ; dec ecx ; jnz l
//!     mov edx, 0xf4 ; out dx, al ; hlt
//! ```
//!
//! ending with a write to the debug-exit port (0xf4) rather than a bare
//! `hlt`, which the in-kernel LAPIC would keep inside the kernel forever.

use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::{KVM_IDENTITY_MAP, KVM_TSS, host_error};

/// The port the loop's guest ends with (QEMU's isa-debug-exit port).
pub const DONE_PORT: u16 = 0xf4;
/// Where the guest code sits in its 64 KiB of RAM.
const CODE: u64 = 0x1000;
const RAM: usize = 0x1_0000;

/// Why the loop could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum RawLoopError {
    #[error(transparent)]
    Kvm(#[from] vmplay_hypervisor::Error),
    #[error("the raw loop's guest misbehaved: {0}")]
    Guest(String),
    #[error("the raw loop needs at least one out, got n = 0")]
    NoIterations,
}

/// The guest: `n` × `out dx, al` to `port`, then `out` to [`DONE_PORT`].
pub fn guest_code(n: u32, port: u16) -> Vec<u8> {
    let mut code = vec![0xb9]; // mov ecx, imm32
    code.extend_from_slice(&n.to_le_bytes());
    code.push(0xba); // mov edx, imm32
    code.extend_from_slice(&u32::from(port).to_le_bytes());
    code.extend_from_slice(&[
        0x31, 0xc0, // xor eax, eax
        0xee, // l: out dx, al
        0x49, // dec ecx
        0x75, 0xfc, // jnz l
        0xba, 0xf4, 0x00, 0x00, 0x00, // mov edx, 0xf4
        0xee, // out dx, al
        0xf4, // hlt
    ]);
    code
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    }
}

/// Builds a fresh VM, runs the guest to its `DONE_PORT` write and returns
/// the time from the first `KVM_RUN` to that exit: `n` port-I/O exits
/// served by the thinnest possible loop, plus one.
pub fn run(n: u32, port: u16) -> Result<Duration, RawLoopError> {
    if n == 0 {
        return Err(RawLoopError::NoIterations);
    }
    let what = "raw loop";
    let kvm = Kvm::new().map_err(|e| vmplay_hypervisor::Error::Unavailable {
        backend: "kvm",
        reason: format!("cannot open /dev/kvm: {}", std::io::Error::from(e)),
    })?;
    let vm = kvm
        .create_vm()
        .map_err(|e| host_error("KVM_CREATE_VM", what, e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP)
        .map_err(|e| host_error("KVM_SET_IDENTITY_MAP_ADDR", what, e))?;
    vm.set_tss_address(KVM_TSS as usize)
        .map_err(|e| host_error("KVM_SET_TSS_ADDR", what, e))?;
    vm.create_irq_chip()
        .map_err(|e| host_error("KVM_CREATE_IRQCHIP", what, e))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| host_error("KVM_CREATE_PIT2", what, e))?;

    let memory = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)])
        .map_err(|e| RawLoopError::Guest(format!("cannot map {RAM:#x} bytes of RAM: {e}")))?;
    memory
        .write_slice(&guest_code(n, port), GuestAddress(CODE))
        .map_err(|e| RawLoopError::Guest(format!("cannot load the guest: {e}")))?;
    let region = memory
        .iter()
        .next()
        .ok_or_else(|| RawLoopError::Guest("no RAM region".into()))?;
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| RawLoopError::Guest(format!("RAM has no host address: {e}")))?;
    // SAFETY: `host` maps RAM bytes owned by `memory`, which lives until
    // the end of this function, after the VM and vCPU fds are closed.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        })
    }
    .map_err(|e| host_error("KVM_SET_USER_MEMORY_REGION", what, e))?;

    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| host_error("KVM_CREATE_VCPU", what, e))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| host_error("KVM_GET_SREGS", what, e))?;
    sregs.cs = flat(0x8, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1; // protected mode, no paging
    vcpu.set_sregs(&sregs)
        .map_err(|e| host_error("KVM_SET_SREGS", what, e))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| host_error("KVM_GET_REGS", what, e))?;
    regs.rip = CODE;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| host_error("KVM_SET_REGS", what, e))?;

    let mut outs = 0u32;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(p, _)) if p == port => outs += 1,
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => break,
            Ok(other) => {
                return Err(RawLoopError::Guest(format!(
                    "unexpected exit {other:?} after {outs} outs"
                )));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(host_error("KVM_RUN", what, e).into()),
        }
    }
    let elapsed = start.elapsed();
    if outs != n {
        return Err(RawLoopError::Guest(format!(
            "{outs} outs to {port:#x} reached the loop, expected {n}"
        )));
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    #[test]
    fn guest_code_is_the_documented_loop() {
        let code = guest_code(1000, 0x80);
        let mut decoder = Decoder::with_ip(32, &code, CODE, DecoderOptions::NONE);
        let mut formatter = IntelFormatter::new();
        let mut lines = Vec::new();
        for insn in decoder.iter() {
            let mut text = String::new();
            formatter.format(&insn, &mut text);
            lines.push(text);
        }
        assert_eq!(
            lines,
            [
                "mov ecx,3E8h",
                "mov edx,80h",
                "xor eax,eax",
                "out dx,al",
                "dec ecx",
                "jne short 0000100Ch", // back to the out at CODE + 12
                "mov edx,0F4h",
                "out dx,al",
                "hlt",
            ]
            .map(String::from)
        );
    }

    #[test]
    fn zero_iterations_are_refused() {
        assert!(matches!(run(0, 0x80), Err(RawLoopError::NoIterations)));
    }

    #[test]
    fn loop_serves_every_out() {
        match run(50, 0x80) {
            Ok(elapsed) => assert!(elapsed > Duration::ZERO),
            Err(RawLoopError::Kvm(vmplay_hypervisor::Error::Unavailable { reason, .. })) => {
                eprintln!("skipping: /dev/kvm not available: {reason}");
            }
            Err(e) => panic!("raw loop failed: {e}"),
        }
    }
}
