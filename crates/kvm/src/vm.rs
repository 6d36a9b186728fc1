//! A KVM VM: guest RAM slots, the in-kernel irqchip and PIT, interrupt
//! lines and ioeventfds.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    CpuId, KVM_PIT_SPEAKER_DUMMY, KVMIO, kvm_ioeventfd, kvm_ioeventfd_flag_nr_datamatch,
    kvm_ioeventfd_flag_nr_pio, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;
use vmplay_hypervisor::{Error, GuestMemory, IoEventAddress, IrqLine, Result, Vcpu, Vm};

use crate::{IOAPIC_PINS, KVM_IDENTITY_MAP, KVM_PRIVATE_END, KVM_TSS, host_error, vcpu};

// kvm-ioctls only offers KVM_IOEVENTFD with the length tied to the
// datamatch type; the seam passes the length on its own.
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// What the hypervisor hands a new VM.
pub(crate) struct VmConfig {
    pub vcpus: u32,
    pub max_memslots: usize,
    pub cpuid: CpuId,
    pub tsc_deadline: bool,
    /// KVM_GET_XSAVE works (the only way to read MXCSR back).
    pub xsave: bool,
}

/// State shared by the VM and every vCPU and interrupt line made from it:
/// vCPUs keep it alive so guest RAM stays mapped while any of them runs.
pub(crate) struct VmShared {
    pub fd: VmFd,
    pub vcpus: u32,
    pub cpuid: CpuId,
    pub tsc_deadline: bool,
    pub xsave: bool,
    /// KVM maps guest RAM by host address: the mappings must outlive the
    /// VM, so it holds its own reference to them.
    pub memory: GuestMemory,
    /// Software breakpoints planted in guest memory (`debug.rs`).
    pub breakpoints: crate::debug::Planted,
    created: Mutex<Vec<bool>>,
}

/// A VM on KVM.
pub struct KvmVm {
    shared: Arc<VmShared>,
    /// kvmclock read at pause, written back at resume.
    paused_clock: Mutex<Option<u64>>,
}

impl KvmVm {
    pub(crate) fn new(kvm: &Kvm, config: VmConfig, memory: &GuestMemory) -> Result<KvmVm> {
        let regions = memory.num_regions();
        if regions > config.max_memslots {
            return Err(Error::Unsupported(format!(
                "guest memory has {regions} regions, KVM on this host has {} slots",
                config.max_memslots
            )));
        }
        for region in memory.iter() {
            let start = region.start_addr().0;
            let end = start + region.len();
            if start < KVM_PRIVATE_END && KVM_IDENTITY_MAP < end {
                return Err(Error::Unsupported(format!(
                    "guest RAM [{start:#x}, {end:#x}) overlaps the pages KVM keeps for its \
                     identity map and TSS at [{KVM_IDENTITY_MAP:#x}, {KVM_PRIVATE_END:#x})"
                )));
            }
        }

        let fd = kvm
            .create_vm()
            .map_err(|e| host_error("KVM_CREATE_VM", "/dev/kvm", e))?;
        // Both must be set before the first vCPU exists (KVM on Intel uses
        // them to run real-mode code without unrestricted guest support).
        fd.set_identity_map_address(KVM_IDENTITY_MAP).map_err(|e| {
            host_error(
                "KVM_SET_IDENTITY_MAP_ADDR",
                format_args!("{KVM_IDENTITY_MAP:#x}"),
                e,
            )
        })?;
        fd.set_tss_address(KVM_TSS as usize)
            .map_err(|e| host_error("KVM_SET_TSS_ADDR", format_args!("{KVM_TSS:#x}"), e))?;
        fd.create_irq_chip()
            .map_err(|e| host_error("KVM_CREATE_IRQCHIP", "VM", e))?;
        // The dummy speaker makes port 0x61 answer in the kernel, which
        // Linux's PIT calibration polls.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| host_error("KVM_CREATE_PIT2", "VM", e))?;

        for (slot, region) in memory.iter().enumerate() {
            let start = region.start_addr().0;
            let len = region.len();
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| {
                    Error::Unsupported(format!(
                        "guest memory region at {start:#x} has no host mapping: {e}"
                    ))
                })?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: start,
                memory_size: len,
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `len` bytes
            // owned by `memory`; VmShared keeps a clone of `memory`, so the
            // mapping outlives the VM fd and every vCPU that can touch it.
            unsafe { fd.set_user_memory_region(desc) }.map_err(|e| {
                host_error(
                    "KVM_SET_USER_MEMORY_REGION",
                    format_args!("slot {slot}, guest {start:#x}, {len:#x} bytes"),
                    e,
                )
            })?;
        }

        Ok(KvmVm {
            shared: Arc::new(VmShared {
                fd,
                vcpus: config.vcpus,
                cpuid: config.cpuid,
                tsc_deadline: config.tsc_deadline,
                xsave: config.xsave,
                memory: memory.clone(),
                breakpoints: Default::default(),
                created: Mutex::new(vec![false; config.vcpus as usize]),
            }),
            paused_clock: Mutex::new(None),
        })
    }
}

impl Vm for KvmVm {
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let shared = &self.shared;
        if id >= shared.vcpus {
            return Err(Error::Unsupported(format!(
                "vCPU id {id} is outside this VM's {} vCPUs (ids 0..{})",
                shared.vcpus, shared.vcpus
            )));
        }
        {
            let mut created = shared
                .created
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if created[id as usize] {
                return Err(Error::Unsupported(format!("vCPU {id} already exists")));
            }
            created[id as usize] = true;
        }
        // A failed setup leaves the id taken: KVM never destroys a vCPU
        // before its VM, so the id could not be created again anyway.
        let vcpu = vcpu::KvmVcpu::new(Arc::clone(shared), id)?;
        Ok(Box::new(vcpu))
    }

    fn pause_clock(&self) -> Result<()> {
        let mut slot = self
            .paused_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            let data = self
                .shared
                .fd
                .get_clock()
                .map_err(|e| Error::host("KVM_GET_CLOCK", e))?;
            *slot = Some(data.clock);
        }
        Ok(())
    }

    fn resume_clock(&self) -> Result<()> {
        let saved = self
            .paused_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(clock) = saved {
            // kvmclock continues from where it stopped: the guest does not
            // see the paused time.
            let data = kvm_bindings::kvm_clock_data {
                clock,
                ..Default::default()
            };
            self.shared
                .fd
                .set_clock(&data)
                .map_err(|e| Error::host("KVM_SET_CLOCK", e))?;
        }
        Ok(())
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if gsi >= IOAPIC_PINS {
            return Err(Error::Unsupported(format!(
                "GSI {gsi} does not exist: the in-kernel IOAPIC has pins 0..{IOAPIC_PINS}"
            )));
        }
        // Edges go through an irqfd, as virtio interrupts will: one write(2)
        // from any thread, no vCPU or VM lock involved.
        let edge =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::host("eventfd for an irqfd", e))?;
        self.shared
            .fd
            .register_irqfd(&edge, gsi)
            .map_err(|e| host_error("KVM_IRQFD", format!("GSI {gsi}"), e))?;
        Ok(Arc::new(KvmIrqLine {
            vm: Arc::clone(&self.shared),
            gsi,
            edge,
        }))
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        len: u32,
        datamatch: Option<u64>,
        fd: &EventFd,
    ) -> Result<()> {
        let where_ = match addr {
            IoEventAddress::Pio(port) => format!("port {port:#x}"),
            IoEventAddress::Mmio(a) => format!("MMIO {a:#x}"),
        };
        if !matches!(len, 0 | 1 | 2 | 4 | 8) {
            return Err(Error::Unsupported(format!(
                "ioevent at {where_}: length {len} is not 0, 1, 2, 4 or 8"
            )));
        }
        let mut flags = 0;
        if let Some(value) = datamatch {
            if len == 0 {
                return Err(Error::Unsupported(format!(
                    "ioevent at {where_}: a datamatch needs a length of 1, 2, 4 or 8"
                )));
            }
            if len < 8 && value >> (len * 8) != 0 {
                return Err(Error::Unsupported(format!(
                    "ioevent at {where_}: datamatch {value:#x} does not fit in {len} bytes"
                )));
            }
            flags |= 1 << kvm_ioeventfd_flag_nr_datamatch;
        }
        let address = match addr {
            IoEventAddress::Pio(port) => {
                flags |= 1 << kvm_ioeventfd_flag_nr_pio;
                u64::from(port)
            }
            IoEventAddress::Mmio(a) => a,
        };
        let ioeventfd = kvm_ioeventfd {
            datamatch: datamatch.unwrap_or(0),
            addr: address,
            len,
            fd: fd.as_raw_fd(),
            flags,
            ..Default::default()
        };
        // SAFETY: a VM fd and a fully initialised kvm_ioeventfd that the
        // kernel only reads; the return value is checked.
        let ret = unsafe { ioctl_with_ref(&self.shared.fd, KVM_IOEVENTFD(), &ioeventfd) };
        if ret != 0 {
            return Err(host_error(
                "KVM_IOEVENTFD",
                where_,
                vmm_sys_util::errno::Error::last(),
            ));
        }
        Ok(())
    }
}

/// One GSI of the in-kernel IOAPIC (and PIC, for ISA IRQs).
struct KvmIrqLine {
    vm: Arc<VmShared>,
    gsi: u32,
    /// Registered with KVM_IRQFD: each write is one edge on `gsi`.
    edge: EventFd,
}

impl KvmIrqLine {
    fn set(&self, level: bool) {
        // The seam has no error path here: the GSI was validated when the
        // line was made, so a failure is a host problem worth a loud log.
        if let Err(e) = self.vm.fd.set_irq_line(self.gsi, level) {
            tracing::error!(
                gsi = self.gsi,
                level,
                "KVM_IRQ_LINE failed: {}",
                std::io::Error::from(e)
            );
        }
    }
}

impl IrqLine for KvmIrqLine {
    fn pulse(&self) {
        if let Err(e) = self.edge.write(1) {
            tracing::error!(gsi = self.gsi, "irqfd write failed: {e}");
        }
    }

    fn set_level(&self, high: bool) {
        self.set(high);
    }
}
