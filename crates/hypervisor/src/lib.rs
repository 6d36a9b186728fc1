//! The seam between the machine and the ways to run a vCPU.
//!
//! This crate holds only traits and plain data: a [`Hypervisor`] makes a
//! [`Vm`], a `Vm` makes [`Vcpu`]s, and a `Vcpu` runs guest code until
//! something needs the machine, which it reports as a [`VcpuExit`]. The
//! `kvm` and `emu` backends implement these traits; nothing else in the
//! workspace sees a backend's own types. A new backend is one new crate.
//!
//! What the machine leaves to the backend, because KVM does it in the
//! kernel: the interrupt controllers (LAPIC per vCPU, IOAPIC, 8259 PIC),
//! the PIT with port 0x61, CPUID and MSRs. A backend handles those itself
//! and only reports port and MMIO accesses it does not own.

mod state;

pub use state::{CpuState, DescriptorTable, FpuState, Segment};
pub use vm_memory::GuestMemoryMmap;

use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as the machine builds it and every backend reads it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors a backend reports. The text names what failed; backends keep
/// their own detail in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend cannot run on this host (e.g. /dev/kvm cannot be opened).
    #[error("{backend} is not available: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    /// The requested configuration is outside what the backend supports.
    #[error("{0}")]
    Unsupported(String),
    /// A host call failed.
    #[error("{op}: {source}")]
    Host {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed host call, with the operation named.
    pub fn host(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Host {
            op,
            source: source.into(),
        }
    }
}

/// What a VM is made of, as far as a backend needs to know.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Number of vCPUs the machine will create (IDs 0..vcpus; 0 is the BSP).
    pub vcpus: u32,
}

/// A way to run virtual machines: KVM, the software CPU, ...
pub trait Hypervisor: Send + Sync {
    /// Short name used in messages and `--accel` ("kvm", "emu").
    fn name(&self) -> &'static str;
    /// The most vCPUs one VM may have on this backend.
    fn max_vcpus(&self) -> u32;
    /// Creates a VM over `memory`. The backend maps every region of `memory`
    /// as guest RAM; guest-physical addresses outside it are MMIO.
    fn create_vm(&self, spec: &VmSpec, memory: &GuestMemory) -> Result<Arc<dyn Vm>>;
}

/// Where an [`IoEvent`] listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u16),
    Mmio(u64),
}

/// A VM: the vCPUs, the interrupt controllers and the interrupt lines.
pub trait Vm: Send + Sync {
    /// Creates vCPU `id`. The BSP (id 0) starts at the reset vector until
    /// [`Vcpu::set_state`] puts it elsewhere; the others wait for INIT/SIPI
    /// from the BSP, as Linux expects.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;

    /// An interrupt line to IOAPIC pin / GSI `gsi` (ISA IRQs 0-15 are the
    /// same numbers, routed to the 8259 too while it is in use).
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;

    /// Signals `fd` instead of exiting when the guest writes to `addr`
    /// (with the value `datamatch`, if given). Virtio queue notifications
    /// use this; a backend without a fast path may return `Unsupported`, and
    /// the write then reaches the bus as a normal exit.
    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        len: u32,
        datamatch: Option<u64>,
        fd: &EventFd,
    ) -> Result<()>;

    /// Who must hear about writes to guest RAM that bypass the vCPUs
    /// (device DMA): a backend that caches translated guest code returns
    /// an observer that invalidates it. `None`: nothing to tell.
    fn dma_observer(&self) -> Option<Arc<dyn DmaObserver>> {
        None
    }

    /// Stops the guest's clocks (TSC, timers, kvmclock) while the machine
    /// holds every vCPU paused, so that after [`Vm::resume_clock`] the
    /// guest does not see the paused time. Default: nothing to stop.
    fn pause_clock(&self) -> Result<()> {
        Ok(())
    }

    /// Lets the guest's clocks run again after [`Vm::pause_clock`].
    fn resume_clock(&self) -> Result<()> {
        Ok(())
    }
}

/// Told about guest-RAM writes made outside the vCPUs (virtio DMA), so a
/// backend can drop what it derived from those bytes (decoded code).
pub trait DmaObserver: Send + Sync {
    /// Guest-physical `[gpa, gpa+len)` was written.
    fn written(&self, gpa: u64, len: u64);
}

/// One interrupt input of the VM's interrupt controllers.
pub trait IrqLine: Send + Sync {
    /// Raises and lowers the line: one edge-triggered interrupt.
    fn pulse(&self);
    /// Holds the line at a level (level-triggered devices).
    fn set_level(&self, high: bool);
}

/// Why [`Vcpu::run`] returned. Data buffers borrow the vCPU so the
/// machine can answer a read in place, without copies.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from `port`: fill `data` (1, 2 or 4 bytes).
    IoIn { port: u16, data: &'a mut [u8] },
    /// `out` to `port` of `data`.
    IoOut { port: u16, data: &'a [u8] },
    /// A read of guest-physical `addr` that is not RAM: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// A write to guest-physical `addr` that is not RAM.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The vCPU executed `hlt` with interrupts masked, so nothing but an
    /// NMI/INIT can wake it: the machine treats it as stopped.
    Halt,
    /// The guest shut the CPU down (triple fault).
    Shutdown,
    /// The backend cannot go on (KVM internal error, an exit it cannot
    /// handle). The text says why; [`Vcpu::state`] has the registers.
    InternalError(String),
    /// [`VcpuKicker::kick`] interrupted the run; the machine looks at why.
    Interrupted,
    /// A debug event asked for with [`Vcpu::set_guest_debug`]: the vCPU
    /// stopped at an instruction boundary and the machine holds it for the
    /// debugger. Only a backend given a [`GuestDebug`] reports this.
    Debug(DebugEvent),
}

/// Why a vCPU stopped for the debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugEvent {
    /// One instruction ran ([`GuestDebug::single_step`]).
    Step,
    /// The next instruction is at a software breakpoint (not yet run).
    SwBreakpoint,
    /// The next instruction is at a hardware breakpoint (not yet run).
    HwBreakpoint,
    /// The instruction just run accessed a watched range: `addr` is the
    /// watchpoint's address.
    Watchpoint { addr: u64, kind: WatchKind },
}

/// What a watchpoint watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    Write,
    Read,
    ReadWrite,
}

/// A watched range of guest-virtual addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchpoint {
    pub addr: u64,
    pub len: u64,
    pub kind: WatchKind,
}

/// The debug controls a debugger puts on a vCPU. Addresses are guest
/// virtual (linear) addresses; every vCPU of a VM gets the same lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Stop after each instruction.
    pub single_step: bool,
    /// Stop before executing these addresses. How is the backend's
    /// business (emu checks at instruction boundaries, kvm plants `int3`);
    /// the guest never reads a changed byte through the debugger.
    pub sw_breakpoints: Vec<u64>,
    /// Stop before executing these addresses, with the CPU's own means.
    pub hw_breakpoints: Vec<u64>,
    pub watchpoints: Vec<Watchpoint>,
}

impl GuestDebug {
    /// Nothing to watch: the vCPU runs at full speed.
    pub fn is_empty(&self) -> bool {
        self == &GuestDebug::default()
    }
}

/// A virtual CPU. Each runs on its own thread.
pub trait Vcpu: Send {
    /// This vCPU's ID (= its initial APIC ID).
    fn id(&self) -> u32;
    /// Runs guest code until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// The architectural register state (for dumps and tests).
    fn state(&self) -> Result<CpuState>;
    /// Loads register state: the boot loaders' entry state for the BSP.
    fn set_state(&mut self, state: &CpuState) -> Result<()>;
    /// A handle other threads use to make [`Vcpu::run`] return
    /// [`VcpuExit::Interrupted`] soon.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// Sets what makes [`Vcpu::run`] return [`VcpuExit::Debug`] (an empty
    /// [`GuestDebug`] turns debugging off). Default: a backend without
    /// debug support says so.
    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()> {
        let _ = debug;
        Err(Error::Unsupported(
            "this backend cannot debug guests".into(),
        ))
    }

    /// The guest-physical address that guest-virtual `gva` maps to through
    /// the vCPU's current page tables, without side effects (no accessed
    /// or dirty bits, no CR2): `None` when it is not mapped.
    fn translate_gva(&self, gva: u64) -> Result<Option<u64>> {
        let _ = gva;
        Err(Error::Unsupported(
            "this backend cannot translate guest addresses".into(),
        ))
    }
}

/// Interrupts a running vCPU from another thread.
pub trait VcpuKicker: Send + Sync {
    /// Makes the vCPU's current or next `run` return `Interrupted`.
    fn kick(&self);
}
