//! A KVM vCPU: its boot setup (CPUID, MSRs, FPU, LAPIC), `KVM_RUN` with
//! exits turned into seam exits, and register state.

use std::ptr::NonNull;
use std::sync::Arc;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_lapic_state, kvm_msr_entry,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use vmplay_hypervisor::{
    CpuState, Error, FpuState, GuestDebug, Result, Vcpu, VcpuExit, VcpuKicker,
};

use crate::kick::{self, KickShared, KvmKicker};
use crate::vm::VmShared;
use crate::{cpuid, host_error, regs};

/// IA32_MISC_ENABLE bits (SDM vol. 4, table 2-2).
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MISC_ENABLE_BTS_UNAVAILABLE: u64 = 1 << 11;
const MISC_ENABLE_PEBS_UNAVAILABLE: u64 = 1 << 12;

/// MSRs set on every vCPU at creation, with their values: Firecracker's
/// boot set. The syscall MSRs start clear; fast strings on; MTRRs enabled
/// with write-back as the default type so a guest that trusts MTRRs sees
/// cacheable RAM. IA32_MISC_ENABLE keeps the bits KVM's own reset sets
/// (BTS and PEBS unavailable: the guest has no debug store), which
/// Firecracker's plain "fast strings" value clears, and matches emu's
/// power-on value.
const BOOT_MSRS: &[(u32, u64, &str)] = &[
    (0x174, 0, "IA32_SYSENTER_CS"),
    (0x175, 0, "IA32_SYSENTER_ESP"),
    (0x176, 0, "IA32_SYSENTER_EIP"),
    (0xc000_0081, 0, "STAR"),
    (0xc000_0082, 0, "LSTAR"),
    (0xc000_0083, 0, "CSTAR"),
    (0xc000_0084, 0, "SYSCALL_MASK"),
    (0xc000_0102, 0, "KERNEL_GS_BASE"),
    (0x10, 0, "IA32_TSC"),
    (
        0x1a0,
        MISC_ENABLE_FAST_STRING | MISC_ENABLE_BTS_UNAVAILABLE | MISC_ENABLE_PEBS_UNAVAILABLE,
        "IA32_MISC_ENABLE (fast strings; BTS, PEBS unavailable)",
    ),
    (
        0x2ff,
        (1 << 11) | 6,
        "IA32_MTRR_DEF_TYPE (enabled, write-back)",
    ),
];

/// LAPIC local vector table entries for LINT0 and LINT1 (register offsets).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A `rep ins`/`rep outs` exit not yet handed to the machine in full.
/// KVM reports up to a page of elements in one exit; the seam reports one
/// access per exit, so the elements go out one `run` call at a time,
/// without entering KVM. A kick meanwhile is honoured at the next entry,
/// once the string is done.
struct PendingIo {
    out: bool,
    port: u16,
    /// The element data in the kvm_run mapping.
    data: NonNull<u8>,
    size: usize,
    count: usize,
    /// Index of the next element to report.
    next: usize,
}

/// A vCPU on KVM.
pub(crate) struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    /// `kvm_run.immediate_exit` in `fd`'s mapping.
    immediate_exit: NonNull<u8>,
    kick: Arc<KickShared>,
    /// The thread `kick` knows as this vCPU's: kicks signal it.
    thread: Option<libc::pid_t>,
    pending: Option<PendingIo>,
    /// Keeps the VM, hence guest RAM, alive while this vCPU can run.
    vm: Arc<VmShared>,
    /// Breakpoints, steps, watchpoints (`debug.rs`).
    debug: crate::debug::VcpuDebug,
}

// SAFETY: the raw pointers point into the kvm_run mapping owned by `fd`,
// which moves with the vCPU; VcpuFd itself is Send.
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    pub(crate) fn new(vm: Arc<VmShared>, id: u32) -> Result<KvmVcpu> {
        let mut fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| host_error("KVM_CREATE_VCPU", format_args!("vCPU {id}"), e))?;
        setup_cpuid(&fd, &vm, id)?;
        setup_msrs(&fd, id)?;
        // FNINIT state with MXCSR at its reset value.
        set_fpu(&fd, &vm, id, &FpuState::default())?;
        setup_lapic(&fd, id)?;
        // Nothing sets registers or MP state here: KVM makes vCPU 0
        // runnable at the reset vector and leaves the others waiting for
        // INIT/SIPI, which is what the seam promises.

        let immediate_exit = NonNull::from(&mut fd.get_kvm_run().immediate_exit);
        // SAFETY: the pointer is into fd's kvm_run mapping; Drop detaches
        // the kick state before fd (and the mapping) goes away.
        let kick = Arc::new(unsafe { KickShared::new(immediate_exit) });
        Ok(KvmVcpu {
            id,
            fd,
            immediate_exit,
            kick,
            thread: None,
            pending: None,
            vm,
            debug: Default::default(),
        })
    }

    /// Points kicks at the calling thread if the vCPU moved to it.
    fn note_thread(&mut self) {
        let thread = kick::current_thread();
        if self.thread != Some(thread) {
            if let Err(e) = vmm_sys_util::signal::unblock_signal(kick::kick_signal()) {
                tracing::warn!(vcpu = self.id, "cannot unblock the kick signal: {e}");
            }
            self.kick.set_thread(thread);
            self.thread = Some(thread);
        }
    }

    fn interrupted(&mut self) -> VcpuExit<'_> {
        // SAFETY: immediate_exit points into self.fd's live mapping.
        unsafe { kick::clear_immediate_exit(self.immediate_exit) };
        VcpuExit::Interrupted
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: KVM_EXIT_INTERNAL_ERROR says `internal` is the union
        // member KVM filled; it is plain data.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit",
            _ => "unknown suberror",
        };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let rip = self
            .fd
            .get_regs()
            .map_or_else(|_| "unknown".to_string(), |r| format!("{:#x}", r.rip));
        format!(
            "KVM internal error {} ({what}) at rip {rip}, data {:x?}",
            internal.suberror,
            &internal.data[..ndata]
        )
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Before `fd` unmaps kvm_run: kickers must stop writing to it.
        self.kick.detach();
    }
}

fn setup_cpuid(fd: &VcpuFd, vm: &VmShared, id: u32) -> Result<()> {
    let entries = cpuid::normalise(vm.cpuid.as_slice(), id, vm.vcpus, vm.tsc_deadline);
    let cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(|_| {
        Error::Unsupported(format!(
            "vCPU {id}: {} CPUID entries exceed KVM's limit",
            entries.len()
        ))
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| host_error("KVM_SET_CPUID2", format_args!("vCPU {id}"), e))
}

/// Loads the x87/SSE state. Through KVM_SET_XSAVE where KVM has it:
/// KVM_SET_FPU ignores MXCSR and leaves the XSAVE header saying "init
/// state", which the guest's XRSTOR would then load instead.
fn set_fpu(fd: &VcpuFd, vm: &VmShared, id: u32, fpu: &FpuState) -> Result<()> {
    if !vm.xsave {
        return fd
            .set_fpu(&regs::to_kvm_fpu(fpu))
            .map_err(|e| host_error("KVM_SET_FPU", format_args!("vCPU {id}"), e));
    }
    let mut xsave = fd
        .get_xsave()
        .map_err(|e| host_error("KVM_GET_XSAVE", format_args!("vCPU {id}"), e))?;
    regs::fpu_to_xsave(fpu, &mut xsave.region);
    // SAFETY: KVM_GET_XSAVE just succeeded on this vCPU, which it only
    // does while the vCPU's XSAVE size fits in kvm_xsave (no dynamically
    // enabled features such as AMX), so KVM_SET_XSAVE reads no further.
    unsafe { fd.set_xsave(&xsave) }.map_err(|e| {
        host_error(
            "KVM_SET_XSAVE",
            format_args!("vCPU {id} (fcw {:#x}, mxcsr {:#x})", fpu.fcw, fpu.mxcsr),
            e,
        )
    })
}

fn setup_msrs(fd: &VcpuFd, id: u32) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data, _)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| {
        Error::Unsupported(format!("vCPU {id}: too many boot MSRs for KVM_SET_MSRS"))
    })?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(|e| host_error("KVM_SET_MSRS", format_args!("vCPU {id}"), e))?;
    // KVM stops at the first MSR it rejects and returns how many it set.
    if let Some(&(index, data, name)) = BOOT_MSRS.get(written) {
        return Err(Error::Unsupported(format!(
            "vCPU {id}: KVM rejected MSR {name} ({index:#x}) = {data:#x}"
        )));
    }
    Ok(())
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as libc::c_char;
    }
}

/// Puts the LAPIC in virtual-wire mode as a PC BIOS leaves it: LINT0
/// takes the 8259's ExtINT, LINT1 is NMI. Delivery-mode bits only; masks
/// stay as KVM set them.
fn setup_lapic(fd: &VcpuFd, id: u32) -> Result<()> {
    let mut lapic = fd
        .get_lapic()
        .map_err(|e| host_error("KVM_GET_LAPIC", format_args!("vCPU {id}"), e))?;
    for (reg, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let value = (lapic_reg(&lapic, reg) & !0x700) | (mode << 8);
        set_lapic_reg(&mut lapic, reg, value);
    }
    fd.set_lapic(&lapic)
        .map_err(|e| host_error("KVM_SET_LAPIC", format_args!("vCPU {id}"), e))
}

/// The seam exit for one port access whose data is at `data`.
///
/// # Safety
/// `data` must be valid for `len` bytes for `'a`, and not otherwise
/// accessed while the exit lives.
unsafe fn io_exit<'a>(out: bool, port: u16, data: *mut u8, len: usize) -> VcpuExit<'a> {
    if out {
        // SAFETY: per the caller.
        let data = unsafe { std::slice::from_raw_parts(data, len) };
        VcpuExit::IoOut { port, data }
    } else {
        // SAFETY: per the caller.
        let data = unsafe { std::slice::from_raw_parts_mut(data, len) };
        VcpuExit::IoIn { port, data }
    }
}

/// A `KVM_RUN` outcome with the borrow of the vCPU fd dropped, so the
/// vCPU can be used again while building the seam exit.
enum Raw {
    Io {
        out: bool,
        port: u16,
        data: NonNull<u8>,
        len: usize,
    },
    Mmio {
        write: bool,
        addr: u64,
        data: NonNull<u8>,
        len: usize,
    },
    InternalError,
    Interrupted,
    Debug(kvm_bindings::kvm_debug_exit_arch),
    Done(VcpuExit<'static>),
}

fn system_event(kind: u32, data: &[u64]) -> VcpuExit<'static> {
    match kind {
        // The machine decides what a stopped platform means; for a PC both
        // power-off and reset end this run of the vCPUs.
        KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => VcpuExit::Shutdown,
        KVM_SYSTEM_EVENT_CRASH => VcpuExit::InternalError(format!(
            "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH, data {data:x?})"
        )),
        _ => VcpuExit::InternalError(format!(
            "unhandled KVM system event {kind} (data {data:x?})"
        )),
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.note_thread();

        if let Some(p) = self.pending.as_mut() {
            if p.next < p.count {
                let offset = p.next * p.size;
                p.next += 1;
                let (out, port, size) = (p.out, p.port, p.size);
                // SAFETY: `data` covers count * size bytes of the kvm_run
                // mapping, which lives as long as self; the element is
                // handed out once, and KVM reads it only at the next entry.
                let data = unsafe { p.data.as_ptr().add(offset) };
                // SAFETY: see above.
                return Ok(unsafe { io_exit(out, port, data, size) });
            }
            // Every element has been answered: let KVM finish the string.
            self.pending = None;
        }

        self.debug
            .before_run(&self.fd, &self.vm.memory, &self.vm.breakpoints)?;
        let raw = loop {
            break match self.fd.run() {
                Ok(KvmExit::IoOut(port, data)) => Raw::Io {
                    out: true,
                    port,
                    len: data.len(),
                    data: NonNull::from(data).cast(),
                },
                Ok(KvmExit::IoIn(port, data)) => Raw::Io {
                    out: false,
                    port,
                    len: data.len(),
                    data: NonNull::from(data).cast(),
                },
                Ok(KvmExit::MmioRead(addr, data)) => Raw::Mmio {
                    write: false,
                    addr,
                    len: data.len(),
                    data: NonNull::from(data).cast(),
                },
                Ok(KvmExit::MmioWrite(addr, data)) => Raw::Mmio {
                    write: true,
                    addr,
                    len: data.len(),
                    data: NonNull::from(data).cast(),
                },
                Ok(KvmExit::Hlt) => Raw::Done(VcpuExit::Halt),
                Ok(KvmExit::Shutdown) => Raw::Done(VcpuExit::Shutdown),
                Ok(KvmExit::Intr) => Raw::Interrupted,
                Ok(KvmExit::InternalError) => Raw::InternalError,
                Ok(KvmExit::FailEntry(reason, cpu)) => Raw::Done(VcpuExit::InternalError(format!(
                    "KVM could not enter the guest: hardware entry failure reason {reason:#x} \
                 on host CPU {cpu}"
                ))),
                Ok(KvmExit::SystemEvent(kind, data)) => Raw::Done(system_event(kind, data)),
                Ok(KvmExit::Debug(arch)) => Raw::Debug(arch),
                Ok(other) => Raw::Done(VcpuExit::InternalError(format!(
                    "unexpected KVM exit {other:?}"
                ))),
                Err(e) if e.errno() == libc::EINTR => Raw::Interrupted,
                // KVM asks to be called again, e.g. after an AP waiting for
                // SIPI received INIT. Not a kick: a kick sets immediate_exit,
                // so the retry returns EINTR if one is pending.
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(host_error("KVM_RUN", format_args!("vCPU {}", self.id), e));
                }
            };
        };

        match raw {
            Raw::Io {
                out,
                port,
                data,
                len,
            } => {
                // SAFETY: KVM_EXIT_IO says `io` is the union member KVM
                // filled; it is plain data.
                let io = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io };
                let (size, count) = (usize::from(io.size), io.count as usize);
                if count > 1 && size * count == len {
                    self.pending = Some(PendingIo {
                        out,
                        port,
                        data,
                        size,
                        count,
                        next: 1,
                    });
                    // SAFETY: the first element of the string, inside the
                    // kvm_run mapping that lives as long as self.
                    return Ok(unsafe { io_exit(out, port, data.as_ptr(), size) });
                }
                // SAFETY: the slice kvm-ioctls made for this exit, in the
                // kvm_run mapping that lives as long as self.
                Ok(unsafe { io_exit(out, port, data.as_ptr(), len) })
            }
            Raw::Mmio {
                write,
                addr,
                data,
                len,
            } => Ok(if write {
                // SAFETY: kvm_run.mmio.data, valid for `len` (<= 8) bytes
                // for as long as self.
                let data = unsafe { std::slice::from_raw_parts(data.as_ptr(), len) };
                VcpuExit::MmioWrite { addr, data }
            } else {
                // SAFETY: as above; the machine fills it before the next run.
                let data = unsafe { std::slice::from_raw_parts_mut(data.as_ptr(), len) };
                VcpuExit::MmioRead { addr, data }
            }),
            Raw::InternalError => Ok(VcpuExit::InternalError(self.internal_error())),
            Raw::Interrupted => Ok(self.interrupted()),
            Raw::Debug(arch) => {
                self.debug
                    .exit(&self.fd, &self.vm.memory, &self.vm.breakpoints, arch)
            }
            Raw::Done(exit) => Ok(exit),
        }
    }

    fn state(&self) -> Result<CpuState> {
        let what = format_args!("vCPU {}", self.id);
        let r = self
            .fd
            .get_regs()
            .map_err(|e| host_error("KVM_GET_REGS", what, e))?;
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| host_error("KVM_GET_SREGS", what, e))?;
        let f = self
            .fd
            .get_fpu()
            .map_err(|e| host_error("KVM_GET_FPU", what, e))?;
        let mut state = regs::from_kvm(&r, &s, &f);
        // KVM_GET_FPU leaves MXCSR out; the XSAVE image has everything.
        if self.vm.xsave {
            let xsave = self
                .fd
                .get_xsave()
                .map_err(|e| host_error("KVM_GET_XSAVE", what, e))?;
            state.fpu = regs::fpu_from_xsave(&xsave.region);
        }
        Ok(state)
    }

    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        let id = self.id;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| host_error("KVM_GET_SREGS", format_args!("vCPU {id}"), e))?;
        regs::fill_kvm_sregs(state, &mut sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| host_error("KVM_SET_SREGS", format_args!("vCPU {id}"), e))?;
        self.fd
            .set_regs(&regs::to_kvm_regs(state))
            .map_err(|e| host_error("KVM_SET_REGS", format_args!("vCPU {id}"), e))?;
        set_fpu(&self.fd, &self.vm, id, &state.fpu)
    }

    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()> {
        self.debug
            .set(&self.fd, &self.vm.memory, &self.vm.breakpoints, debug)
    }

    fn translate_gva(&self, gva: u64) -> Result<Option<u64>> {
        crate::debug::translate(&self.fd, gva)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(KvmKicker {
            shared: Arc::clone(&self.kick),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_registers_are_little_endian_words() {
        let mut lapic = kvm_lapic_state { regs: [0; 1024] };
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0700);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1], 0x07);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2], 0x01);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
    }

    #[test]
    fn system_events_map_to_seam_exits() {
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_RESET, &[]),
            VcpuExit::Shutdown
        ));
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
            VcpuExit::Shutdown
        ));
        match system_event(KVM_SYSTEM_EVENT_CRASH, &[7]) {
            VcpuExit::InternalError(text) => assert!(text.contains("crash"), "{text}"),
            other => panic!("crash mapped to {other:?}"),
        }
    }
}
