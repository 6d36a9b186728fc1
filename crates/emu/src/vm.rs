//! `EmuVm`: guest memory, the code map and the platform, shared by the
//! vCPU threads; interrupt lines into the IOAPIC and 8259.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;
use vmplay_hypervisor::{
    DmaObserver, Error, GuestMemory, IoEventAddress, IrqLine, Result, Vcpu, Vm, VmSpec,
};

use crate::mem::{CodeMap, PhysMem};
use crate::platform::{Platform, start_timer_thread};
use crate::vcpu::EmuVcpu;

/// What all vCPUs of a VM share.
pub struct VmShared {
    pub phys: PhysMem,
    pub code: CodeMap,
    pub platform: Platform,
    /// Serialises locked accesses that cannot use a host atomic.
    pub split_lock: Mutex<()>,
    /// `--trace FILE`.
    pub trace: Option<Mutex<BufWriter<File>>>,
    /// Guest writes that signal an eventfd instead of exiting (virtio
    /// queue notifies); read on every posted write, written at setup.
    pub ioevents: std::sync::RwLock<Vec<IoEvent>>,
    /// What CPUID and the model-specific MSRs describe.
    pub cpu_model: crate::cpuid::CpuModel,
    /// The translation tier's settings (from the environment when unset).
    pub jit: std::sync::OnceLock<crate::jit::JitConfig>,
    /// The translation tier's counters over all vCPUs.
    pub jit_totals: crate::jit::JitTotals,
}

impl VmShared {
    /// Chooses the tiers; vCPUs created afterwards use them.
    pub fn set_jit(&self, config: crate::jit::JitConfig) {
        let _ = self.jit.set(config);
    }

    /// The tiers' settings.
    pub fn jit_config(&self) -> crate::jit::JitConfig {
        *self.jit.get_or_init(|| {
            crate::jit::JitConfig::from_env(None).unwrap_or_else(|e| {
                tracing::warn!("{e}; using the default emu tiers");
                crate::jit::JitConfig::default()
            })
        })
    }
}

/// One registered ioevent: a write of `len` bytes at `addr` (with
/// `datamatch`, if set) signals `fd` and the vCPU goes on.
pub struct IoEvent {
    pub addr: IoEventAddress,
    pub len: u32,
    pub datamatch: Option<u64>,
    pub fd: EventFd,
}

impl IoEvent {
    /// Whether a guest write of `data` at `addr` is this event's.
    pub fn matches(&self, addr: IoEventAddress, data: &[u8]) -> bool {
        if addr != self.addr || (self.len != 0 && data.len() != self.len as usize) {
            return false;
        }
        match self.datamatch {
            None => true,
            Some(want) => {
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                u64::from_le_bytes(b) == want
            }
        }
    }
}

impl VmShared {
    pub fn new(
        vcpus: u32,
        memory: &GuestMemory,
        trace: Option<&Path>,
        cpu_model: crate::cpuid::CpuModel,
    ) -> Result<Arc<Self>> {
        let phys = PhysMem::new(memory);
        let trace = match trace {
            Some(p) => Some(Mutex::new(BufWriter::new(File::create(p).map_err(
                |e| {
                    Error::host(
                        "creating the trace file",
                        std::io::Error::new(e.kind(), format!("{}: {e}", p.display())),
                    )
                },
            )?))),
            None => None,
        };
        Ok(Arc::new(VmShared {
            code: CodeMap::new(phys.frames()),
            phys,
            platform: Platform::new(vcpus),
            split_lock: Mutex::new(()),
            trace,
            ioevents: std::sync::RwLock::new(Vec::new()),
            cpu_model,
            jit: std::sync::OnceLock::new(),
            jit_totals: Default::default(),
        }))
    }
}

pub struct EmuVm {
    shared: Arc<VmShared>,
    created: Mutex<Vec<bool>>,
}

impl EmuVm {
    pub fn new(
        spec: &VmSpec,
        memory: &GuestMemory,
        trace: Option<&Path>,
        cpu_model: crate::cpuid::CpuModel,
    ) -> Result<Self> {
        Self::with_timer_hook(spec, memory, trace, cpu_model, None)
    }

    /// [`EmuVm::new`], with `hook` run first on the timer thread.
    pub fn with_timer_hook(
        spec: &VmSpec,
        memory: &GuestMemory,
        trace: Option<&Path>,
        cpu_model: crate::cpuid::CpuModel,
        hook: Option<crate::ThreadHook>,
    ) -> Result<Self> {
        if spec.vcpus == 0 {
            return Err(Error::Unsupported("a VM needs at least one vCPU".into()));
        }
        let shared = VmShared::new(spec.vcpus, memory, trace, cpu_model)?;
        let weak = Arc::downgrade(&shared);
        start_timer_thread(
            shared.platform.timer.clone(),
            move || {
                let vm = weak.upgrade()?;
                let next = vm.platform.run_timers();
                Some((next, vm.platform.clock.now_ns()))
            },
            hook.map(|h| h.0),
        )
        .map_err(|e| Error::host("starting the emu timer thread", e))?;
        Ok(EmuVm {
            shared,
            created: Mutex::new(vec![false; spec.vcpus as usize]),
        })
    }

    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }
}

impl Drop for EmuVm {
    fn drop(&mut self) {
        self.shared
            .platform
            .timer
            .shutdown
            .store(true, Ordering::Release);
        self.shared.platform.timer.notify();
    }
}

impl Vm for EmuVm {
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = created.get_mut(id as usize) else {
            return Err(Error::Unsupported(format!(
                "vCPU id {id} is outside the VM's {} vCPUs",
                self.shared.platform.vcpus()
            )));
        };
        if *slot {
            return Err(Error::Unsupported(format!("vCPU {id} was already created")));
        }
        *slot = true;
        Ok(Box::new(EmuVcpu::new(self.shared.clone(), id)))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if gsi as usize >= crate::platform::ioapic::PINS {
            return Err(Error::Unsupported(format!(
                "GSI {gsi} is beyond the IOAPIC's {} pins",
                crate::platform::ioapic::PINS
            )));
        }
        Ok(Arc::new(EmuIrqLine {
            vm: self.shared.clone(),
            gsi,
        }))
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        len: u32,
        datamatch: Option<u64>,
        fd: &EventFd,
    ) -> Result<()> {
        if !matches!(len, 0 | 1 | 2 | 4 | 8) {
            return Err(Error::Unsupported(format!(
                "ioevent length {len} is not 0, 1, 2, 4 or 8"
            )));
        }
        if let Some(v) = datamatch
            && (len == 0 || (len < 8 && v >> (len * 8) != 0))
        {
            return Err(Error::Unsupported(format!(
                "ioevent datamatch {v:#x} does not fit in {len} bytes"
            )));
        }
        let fd = fd
            .try_clone()
            .map_err(|e| Error::host("duplicating an ioevent fd", e))?;
        self.shared
            .ioevents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(IoEvent {
                addr,
                len,
                datamatch,
                fd,
            });
        Ok(())
    }

    fn dma_observer(&self) -> Option<Arc<dyn DmaObserver>> {
        Some(Arc::new(CodeInvalidator(self.shared.clone())))
    }

    fn pause_clock(&self) -> Result<()> {
        self.shared.platform.clock.pause();
        Ok(())
    }

    fn resume_clock(&self) -> Result<()> {
        self.shared.platform.clock.resume();
        // Timers armed before the pause are due relative to guest time.
        self.shared.platform.timer.notify();
        Ok(())
    }
}

/// Drops cached code on pages a device wrote (virtio DMA into a page the
/// guest later executes, e.g. a program read from disk).
struct CodeInvalidator(Arc<VmShared>);

impl DmaObserver for CodeInvalidator {
    fn written(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa & crate::mem::PAGE_MASK;
        let last = gpa.saturating_add(len - 1) & crate::mem::PAGE_MASK;
        let mut page = first;
        loop {
            if let Some(loc) = self.0.phys.ram(page)
                && self.0.code.is_code(loc.frame)
            {
                self.0.code.invalidate(loc.frame);
            }
            if page >= last {
                break;
            }
            page += crate::mem::PAGE_SIZE;
        }
    }
}

struct EmuIrqLine {
    vm: Arc<VmShared>,
    gsi: u32,
}

impl IrqLine for EmuIrqLine {
    fn pulse(&self) {
        self.vm.platform.set_irq(self.gsi, true);
        self.vm.platform.set_irq(self.gsi, false);
    }

    fn set_level(&self, high: bool) {
        self.vm.platform.set_irq(self.gsi, high);
    }
}
