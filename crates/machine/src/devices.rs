//! Where the machine attaches its virtio devices: one `attach_*` per kind.
//! Each takes the next 4 KiB window and GSI, wires the queue notifies as
//! ioevents and the interrupt as an `IrqLine`, puts the transport on the
//! MMIO bus, hands the device to the event loop and records the window
//! for the DSDT. Order of attachment is the order the guest enumerates,
//! so the first drive is `/dev/vda`.

use std::sync::{Arc, Mutex};
use vmplay_devices::ports;

use vmm_sys_util::eventfd::EventFd;
use vmplay_boot::{VirtioMmioSlot, layout};
use vmplay_devices::bus::Bus;
use vmplay_hypervisor::{IoEventAddress, Vm};
use vmplay_virtio::device::{GuestRam, Interrupt, VirtioDevice};
use vmplay_virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use vmplay_virtio::{EventLoop, VirtioConfig};

use crate::MachineError;

/// The kernel command line with what the root drive adds, as Firecracker
/// does: `root=/dev/vdX` (or `root=PARTUUID=...`) and `ro` or `rw`.
pub(crate) fn cmdline_with_root(
    cmdline: &str,
    config: &VirtioConfig,
) -> Result<String, MachineError> {
    let mut roots = config.drives.iter().enumerate().filter(|(_, d)| d.root);
    let Some((index, drive)) = roots.next() else {
        return Ok(cmdline.to_string());
    };
    if let Some((_, other)) = roots.next() {
        return Err(MachineError::Device(format!(
            "drives {} and {} are both root devices; only one can be",
            drive.id, other.id
        )));
    }
    if index >= 26 {
        return Err(MachineError::Device(format!(
            "drive {}: a root drive must be one of the first 26",
            drive.id
        )));
    }
    let root = match &drive.partuuid {
        Some(uuid) => format!("root=PARTUUID={uuid}"),
        None => format!("root=/dev/vd{}", (b'a' + index as u8) as char),
    };
    let mode = if drive.read_only { "ro" } else { "rw" };
    Ok(format!("{cmdline} {root} {mode}").trim_start().to_string())
}

/// GSIs the legacy devices and ACPI already use.
const RESERVED_GSIS: [u32; 2] = [ports::RTC_IRQ, ports::ACPI_SCI_IRQ];

/// Hands out windows and GSIs, and remembers them for the DSDT.
pub(crate) struct VirtioAttacher<'a> {
    pub vm: &'a dyn Vm,
    pub ram: GuestRam,
    pub mmio: &'a mut Bus,
    pub event_loop: &'a mut EventLoop,
    pub slots: Vec<VirtioMmioSlot>,
    /// Whether stdin is free for a virtio console (COM1 is not on stdio).
    pub stdin_free: bool,
    /// What the API reaches after boot: every device, drives and
    /// interfaces by id.
    pub handles: VirtioDevices,
    next_gsi: u32,
}

type Shared<T> = Arc<Mutex<T>>;

/// The running VM's virtio devices, for metrics and for PATCH after boot.
/// Each lock is the one the event loop takes for the device's work, so a
/// reader waits at most for one event's processing.
#[derive(Default)]
pub struct VirtioDevices {
    all: Vec<Shared<dyn VirtioDevice>>,
    drives: Vec<(String, Shared<vmplay_virtio::devices::block::Block>)>,
    nets: Vec<(String, Shared<vmplay_virtio::devices::net::Net>)>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioDevices {
    /// Every counter as `(group, field, total)`: Firecracker's groups,
    /// `block` and `net` as sums over the devices plus `block_<id>` and
    /// `net_<id>` per device.
    pub fn metrics(&self) -> Vec<(String, String, u64)> {
        let mut sums: std::collections::BTreeMap<(String, String), u64> = Default::default();
        let mut out = Vec::new();
        for d in &self.all {
            let d = lock(d);
            let id = d.metrics_id().map(str::to_string);
            for (group, fields) in d.metrics() {
                for (field, v) in fields {
                    if let Some(id) = &id
                        && matches!(group, "block" | "net")
                    {
                        out.push((format!("{group}_{id}"), field.clone(), v));
                    }
                    *sums.entry((group.to_string(), field)).or_default() += v;
                }
            }
        }
        out.extend(sums.into_iter().map(|((g, f), v)| (g, f, v)));
        out
    }

    /// `PATCH /drives/{id}` after boot: a new backing file (the guest is
    /// told its capacity may have changed) and/or new rate-limiter buckets.
    pub fn update_drive(
        &self,
        id: &str,
        path: Option<&std::path::Path>,
        limiter: Option<&vmplay_virtio::RateLimiterConfig>,
    ) -> Result<(), String> {
        let (_, drive) = self
            .drives
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| format!("no drive {id}"))?;
        let mut drive = lock(drive);
        drive.counters.update_count += 1;
        if let Some(path) = path
            && let Err(e) = drive.replace_backing(path)
        {
            drive.counters.update_fails += 1;
            return Err(e.to_string());
        }
        if let Some(l) = limiter {
            drive
                .limiter_mut()
                .update(l.bandwidth.as_ref(), l.ops.as_ref());
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` after boot: new rate-limiter buckets.
    pub fn update_net(
        &self,
        id: &str,
        rx: Option<&vmplay_virtio::RateLimiterConfig>,
        tx: Option<&vmplay_virtio::RateLimiterConfig>,
    ) -> Result<(), String> {
        let (_, net) = self
            .nets
            .iter()
            .find(|(n, _)| n == id)
            .ok_or_else(|| format!("no network interface {id}"))?;
        let mut net = lock(net);
        let (rx_limiter, tx_limiter) = net.limiters_mut();
        if let Some(l) = rx {
            rx_limiter.update(l.bandwidth.as_ref(), l.ops.as_ref());
        }
        if let Some(l) = tx {
            tx_limiter.update(l.bandwidth.as_ref(), l.ops.as_ref());
        }
        Ok(())
    }
}

impl<'a> VirtioAttacher<'a> {
    pub fn new(
        vm: &'a dyn Vm,
        ram: GuestRam,
        mmio: &'a mut Bus,
        event_loop: &'a mut EventLoop,
    ) -> Self {
        VirtioAttacher {
            vm,
            ram,
            mmio,
            event_loop,
            slots: Vec::new(),
            stdin_free: false,
            handles: VirtioDevices::default(),
            next_gsi: layout::VIRTIO_GSI_START,
        }
    }

    fn next_slot(&mut self, what: &str) -> Result<VirtioMmioSlot, MachineError> {
        while RESERVED_GSIS.contains(&self.next_gsi) {
            self.next_gsi += 1;
        }
        let gsi = self.next_gsi;
        let index = self.slots.len() as u64;
        let addr = layout::VIRTIO_MMIO_START + index * layout::VIRTIO_MMIO_SIZE;
        if gsi >= layout::IOAPIC_PINS || addr + layout::VIRTIO_MMIO_SIZE > layout::IOAPIC_START {
            return Err(MachineError::Device(format!(
                "{what}: too many virtio devices (the IOAPIC has {} pins)",
                layout::IOAPIC_PINS
            )));
        }
        self.next_gsi += 1;
        Ok(VirtioMmioSlot {
            addr,
            len: layout::VIRTIO_MMIO_SIZE,
            gsi,
        })
    }

    /// Wires one device; `what` names it in errors ("drive rootfs").
    pub fn attach(
        &mut self,
        what: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), MachineError> {
        let slot = self.next_slot(what)?;
        let err = |e: String| MachineError::Device(format!("{what}: {e}"));
        let queues = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
        let mut queue_events = Vec::with_capacity(queues);
        for i in 0..queues {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err(format!("eventfd: {e}")))?;
            // A backend without the fast path refuses; the transport then
            // signals the same eventfd from the MMIO exit.
            if let Err(e) = self.vm.register_ioevent(
                IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET),
                4,
                Some(i as u64),
                &fd,
            ) {
                tracing::debug!("{what}: queue {i} notify exits instead of an ioevent: {e}");
            }
            queue_events.push(fd);
        }
        let line = self
            .vm
            .irq_line(slot.gsi)
            .map_err(|e| err(format!("GSI {}: {e}", slot.gsi)))?;
        let interrupt = Arc::new(Interrupt::new(line));
        self.event_loop
            .add_device(device.clone(), &queue_events)
            .map_err(|e| err(e.to_string()))?;
        let transport = MmioTransport::new(device, self.ram.clone(), interrupt, queue_events);
        self.mmio.insert(Arc::new(transport), slot.addr, slot.len)?;
        tracing::info!(
            device = what,
            addr = format_args!("{:#x}", slot.addr),
            gsi = slot.gsi,
            "virtio-mmio device"
        );
        self.slots.push(slot);
        Ok(())
    }

    fn attach_kept(
        &mut self,
        what: &str,
        device: Shared<dyn VirtioDevice>,
    ) -> Result<(), MachineError> {
        self.attach(what, device.clone())?;
        self.handles.all.push(device);
        Ok(())
    }

    /// Every device of `config`, in the guest's enumeration order: drives
    /// first (so the root drive is `/dev/vda`), then network, vsock,
    /// entropy and the console.
    pub fn attach_all(&mut self, config: &VirtioConfig) -> Result<(), MachineError> {
        for d in &config.drives {
            self.attach_block(d)?;
        }
        for n in &config.nets {
            self.attach_net(n)?;
        }
        if let Some(v) = &config.vsock {
            self.attach_vsock(v)?;
        }
        if let Some(e) = &config.entropy {
            self.attach_rng(e)?;
        }
        if let Some(c) = &config.console {
            self.attach_console(c)?;
        }
        Ok(())
    }

    pub fn attach_rng(&mut self, c: &vmplay_virtio::EntropyConfig) -> Result<(), MachineError> {
        let limiter = vmplay_virtio::rate_limiter::RateLimiter::new(
            c.rate_limiter.as_ref(),
            vmplay_virtio::device::BACKEND_TOKEN_BASE,
        )
        .map_err(|e| MachineError::Device(format!("entropy: rate limiter timer: {e}")))?;
        self.attach_kept(
            "entropy",
            Arc::new(Mutex::new(vmplay_virtio::devices::rng::Rng::new(limiter))),
        )
    }

    pub fn attach_block(&mut self, d: &vmplay_virtio::DriveConfig) -> Result<(), MachineError> {
        let block = vmplay_virtio::devices::block::Block::new(d)
            .map_err(|e| MachineError::Device(e.to_string()))?;
        let block = Arc::new(Mutex::new(block));
        self.attach_kept(&format!("drive {}", d.id), block.clone())?;
        self.handles.drives.push((d.id.clone(), block));
        Ok(())
    }

    pub fn attach_net(&mut self, n: &vmplay_virtio::NetConfig) -> Result<(), MachineError> {
        let net = vmplay_virtio::devices::net::Net::new(n)
            .map_err(|e| MachineError::Device(e.to_string()))?;
        let net = Arc::new(Mutex::new(net));
        self.attach_kept(&format!("network interface {}", n.id), net.clone())?;
        self.handles.nets.push((n.id.clone(), net));
        Ok(())
    }

    pub fn attach_vsock(&mut self, v: &vmplay_virtio::VsockConfig) -> Result<(), MachineError> {
        let vsock = vmplay_virtio::devices::vsock::Vsock::new(v)
            .map_err(|e| MachineError::Device(e.to_string()))?;
        self.attach_kept("vsock", Arc::new(Mutex::new(vsock)))
    }

    pub fn attach_console(&mut self, c: &vmplay_virtio::ConsoleConfig) -> Result<(), MachineError> {
        let console = vmplay_virtio::devices::console::Console::from_config(c, self.stdin_free)
            .map_err(|e| MachineError::Device(e.to_string()))?;
        self.attach("virtio console", Arc::new(Mutex::new(console)))
    }
}
