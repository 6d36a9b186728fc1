//! The contract between a virtio device and everything around it.
//!
//! A device is built with its host backend (a file, a TAP, a socket) and
//! knows only its own semantics. The transport hands it an [`Activation`]
//! (queues, guest memory, interrupt) when the driver sets DRIVER_OK and
//! calls [`VirtioDevice::reset`] when the driver writes 0 to the status.
//! All queue work happens on the VMM event-loop thread: the loop calls
//! [`VirtioDevice::queue_notified`] when a queue's notify eventfd fires and
//! [`VirtioDevice::backend_event`] for the fds the device registered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::{EventOps, EventSet};
use virtio_queue::Queue;
use vmplay_hypervisor::{DmaObserver, GuestMemory, IrqLine};

/// Device types (virtio 1.x §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// Feature bits every device shares (virtio 1.x §6).
pub mod feature {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Event-loop tokens a device may choose for its own fds start here;
/// smaller ones are its queues' notify eventfds.
pub const BACKEND_TOKEN_BASE: u32 = 0x100;

/// Guest RAM as a device sees it: vm-memory access, plus the observer
/// that must hear of every write (the `emu` backend drops code it decoded
/// from a page a device rewrote).
#[derive(Clone)]
pub struct GuestRam {
    pub mem: GuestMemory,
    dma: Option<Arc<dyn DmaObserver>>,
}

impl GuestRam {
    pub fn new(mem: GuestMemory, dma: Option<Arc<dyn DmaObserver>>) -> Self {
        GuestRam { mem, dma }
    }

    /// The device wrote guest-physical `[addr, addr+len)`.
    pub fn written(&self, addr: u64, len: u64) {
        if let Some(dma) = &self.dma {
            dma.written(addr, len);
        }
    }
}

/// The interrupt and status bits a transport shares with its device.
pub struct Interrupt {
    line: Arc<dyn IrqLine>,
    /// InterruptStatus: bit 0 used buffer, bit 1 configuration change.
    status: AtomicU32,
    /// Set when the device hit an error it cannot recover from without a
    /// reset (DEVICE_NEEDS_RESET in the status register).
    needs_reset: std::sync::atomic::AtomicBool,
    config_generation: AtomicU32,
}

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

impl Interrupt {
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Interrupt {
            line,
            status: AtomicU32::new(0),
            needs_reset: false.into(),
            config_generation: AtomicU32::new(0),
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::AcqRel);
        self.line.pulse();
    }

    /// The device's configuration space changed.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.status.fetch_or(INT_CONFIG, Ordering::AcqRel);
        self.line.pulse();
    }

    /// The device cannot go on until the driver resets it (virtio §2.1.2).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            tracing::warn!("virtio device needs a reset");
            self.signal_config_change();
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Back to the state after power-on (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub ram: GuestRam,
    /// One per queue the device declared, in order; check `ready()`.
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is required but the driver did not enable it")]
    QueueNotReady(usize),
    #[error("{0}")]
    Backend(String),
}

/// One virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// The largest size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers; [`feature::VERSION_1`] is added by
    /// the transport.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Bytes past its end
    /// read as zero; the transport has already bounded `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver writes to configuration space; most devices ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: from now on the device owns the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues and any guest-visible
    /// state, so a later activation starts afresh.
    fn reset(&mut self);
    /// Registers host-side fds (tokens from [`BACKEND_TOKEN_BASE`]) once,
    /// when the event loop takes the device.
    fn init_backend(&mut self, _ops: &mut EventOps) {}
    /// Queue `index`'s notify eventfd fired (already drained).
    fn queue_notified(&mut self, index: usize, ops: &mut EventOps);
    /// A backend fd the device registered is ready.
    fn backend_event(&mut self, _token: u32, _events: EventSet, _ops: &mut EventOps) {}
    /// Its counters so far, by Firecracker metrics group (`"block"`,
    /// `"net"`, `"mmds"`, ...), each field with its total.
    fn metrics(&self) -> Vec<(&'static str, Vec<(String, u64)>)> {
        Vec::new()
    }
    /// The id that names the device's own metrics group (`block_<id>`,
    /// `net_<id>`), for devices a VM may have several of.
    fn metrics_id(&self) -> Option<&str> {
        None
    }
}

/// The fields of a counters struct (serde's names) and their values.
pub fn counter_fields<T: serde::Serialize>(counters: &T) -> Vec<(String, u64)> {
    match serde_json::to_value(counters) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect(),
        _ => Vec::new(),
    }
}
