//! `EmuVm`: guest memory, the code map and the platform, shared by the
//! vCPU threads; interrupt lines into the IOAPIC and 8259.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;
use vmplay_hypervisor::{Error, GuestMemory, IoEventAddress, IrqLine, Result, Vcpu, Vm, VmSpec};

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
}

impl VmShared {
    pub fn new(vcpus: u32, memory: &GuestMemory, trace: Option<&Path>) -> Result<Arc<Self>> {
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
        }))
    }
}

pub struct EmuVm {
    shared: Arc<VmShared>,
    created: Mutex<Vec<bool>>,
}

impl EmuVm {
    pub fn new(spec: &VmSpec, memory: &GuestMemory, trace: Option<&Path>) -> Result<Self> {
        if spec.vcpus == 0 {
            return Err(Error::Unsupported("a VM needs at least one vCPU".into()));
        }
        let shared = VmShared::new(spec.vcpus, memory, trace)?;
        let weak = Arc::downgrade(&shared);
        start_timer_thread(shared.platform.timer.clone(), move || {
            let vm = weak.upgrade()?;
            let next = vm.platform.run_timers();
            Some((next, vm.platform.clock.now_ns()))
        })
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
        _: IoEventAddress,
        _: u32,
        _: Option<u64>,
        _: &EventFd,
    ) -> Result<()> {
        Err(Error::Unsupported(
            "emu has no ioeventfd fast path; the write exits instead".into(),
        ))
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
