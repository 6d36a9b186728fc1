//! The virtio-mmio transport (virtio 1.x §4.2.2, "modern", version 2):
//! the register window the driver programs. It negotiates features,
//! walks the status state machine, holds each queue's configuration until
//! DRIVER_OK, then activates the device with real queues.
//!
//! Queue notifications normally never get here: each queue's notify is an
//! ioevent the backend signals without an exit. When a backend has no such
//! fast path the write lands in [`MmioTransport::write`], which signals the
//! same eventfd, so the device sees one path either way.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmplay_devices::BusDeviceSync;

use crate::device::{Activation, GuestRam, Interrupt, VirtioDevice, feature};

/// Register offsets (virtio 1.x §4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The queue-notify register's offset in the window (for ioevents).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;
/// Bytes of device configuration space the window exposes.
pub const CONFIG_SPACE_SIZE: u64 = 0x1000 - reg::CONFIG;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "VMPL": what the guest sees as the vendor.
const VENDOR: u32 = 0x4c50_4d56;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A queue as the driver configures it, before it becomes a `Queue`.
#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

struct State {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    /// Whether the device holds queues (between DRIVER_OK and reset).
    active: bool,
}

/// One virtio-mmio window with its device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    ram: GuestRam,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    /// Read only; copied from the device once.
    device_id: u32,
    device_features: u64,
    state: Mutex<State>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MmioTransport {
    /// A transport for `device`; `queue_events[i]` is signalled on a
    /// notify of queue `i` (the caller registers them as ioevents too).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        ram: GuestRam,
        interrupt: Arc<Interrupt>,
        queue_events: Vec<EventFd>,
    ) -> Self {
        let (device_id, device_features, queues) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max_size| QueueConfig {
                    max_size,
                    ..Default::default()
                })
                .collect::<Vec<_>>();
            (d.device_type(), d.features() | feature::VERSION_1, queues)
        };
        assert_eq!(queues.len(), queue_events.len(), "one eventfd per queue");
        MmioTransport {
            device,
            ram,
            interrupt,
            queue_events,
            device_id,
            device_features,
            state: Mutex::new(State {
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues,
                active: false,
            }),
        }
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let st = lock(&self.state);
        self.status_of(&st)
    }

    fn status_of(&self, st: &State) -> u32 {
        let mut s = st.status;
        if self.interrupt.needs_reset() {
            s |= status::NEEDS_RESET;
        }
        s
    }

    fn reset(&self, st: &mut State) {
        if st.active {
            lock(&self.device).reset();
        }
        st.status = 0;
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.queue_sel = 0;
        for q in &mut st.queues {
            *q = QueueConfig {
                max_size: q.max_size,
                ..Default::default()
            };
        }
        st.active = false;
        self.interrupt.reset();
    }

    /// Builds the device's queues from what the driver wrote; `None` (with
    /// a warning) if any enabled queue is unusable.
    fn build_queues(&self, st: &State) -> Option<Vec<Queue>> {
        let event_idx = st.driver_features & feature::RING_EVENT_IDX != 0;
        let mut out = Vec::with_capacity(st.queues.len());
        for (i, c) in st.queues.iter().enumerate() {
            let mut q = match Queue::new(c.max_size) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!("virtio queue {i}: {e:?}");
                    return None;
                }
            };
            if c.ready {
                // Split rings are a power of two long (virtio 1.x §2.7).
                if c.size == 0 || c.size > c.max_size || !c.size.is_power_of_two() {
                    tracing::warn!(
                        "virtio device {}: queue {i} size {} is not a power of two up to {}",
                        self.device_id,
                        c.size,
                        c.max_size
                    );
                    return None;
                }
                q.set_size(c.size);
                q.set_desc_table_address(Some(c.desc as u32), Some((c.desc >> 32) as u32));
                q.set_avail_ring_address(Some(c.driver as u32), Some((c.driver >> 32) as u32));
                q.set_used_ring_address(Some(c.device as u32), Some((c.device >> 32) as u32));
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.ram.mem) {
                    tracing::warn!(
                        "virtio device {}: queue {i} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is invalid",
                        self.device_id,
                        c.size,
                        c.desc,
                        c.driver,
                        c.device
                    );
                    return None;
                }
            }
            out.push(q);
        }
        Some(out)
    }

    fn write_status(&self, st: &mut State, new: u32) {
        if new == 0 {
            self.reset(st);
            return;
        }
        let old = st.status;
        if new & status::FAILED != 0 {
            st.status |= status::FAILED;
            return;
        }
        // The driver only ever adds bits (§3.1.1); anything else is ignored.
        if new & old != old {
            tracing::warn!("virtio status {old:#x} -> {new:#x}: not an allowed transition");
            return;
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let unknown = st.driver_features & !self.device_features;
            if unknown != 0 || st.driver_features & feature::VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver no (§3.1.1 step 6).
                tracing::warn!(
                    "virtio device {}: driver features {:#x} refused (offered {:#x})",
                    self.device_id,
                    st.driver_features,
                    self.device_features
                );
                st.status = new & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                tracing::warn!("virtio DRIVER_OK without FEATURES_OK");
                st.status = new & !status::DRIVER_OK;
                return;
            }
            st.status = new;
            let Some(queues) = self.build_queues(st) else {
                self.interrupt.set_needs_reset();
                return;
            };
            let features = st.driver_features;
            let activation = Activation {
                ram: self.ram.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                features,
            };
            match lock(&self.device).activate(activation) {
                Ok(()) => st.active = true,
                Err(e) => {
                    tracing::warn!("virtio device {}: activation failed: {e}", self.device_id);
                    self.interrupt.set_needs_reset();
                }
            }
            return;
        }
        st.status = new;
    }

    /// Queue registers may change only while the driver is setting up.
    fn queue_writable(st: &State) -> bool {
        st.status & status::DRIVER_OK == 0 && st.status & status::FAILED == 0
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let st = lock(&self.state);
        let q = st.queues.get(st.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match st.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size.into()),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready.into()),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status_of(&st),
            // No shared memory regions: length all-ones means "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_reg(&self, offset: u64, v: u32) {
        let mut st = lock(&self.state);
        let sel = st.queue_sel as usize;
        let writable = Self::queue_writable(&st);
        let set_queue = |st: &mut State, f: &dyn Fn(&mut QueueConfig)| {
            if !writable {
                tracing::warn!("virtio queue register {offset:#x} written after DRIVER_OK");
                return;
            }
            match st.queues.get_mut(sel) {
                Some(q) => f(q),
                None => tracing::debug!("virtio queue {sel} does not exist"),
            }
        };
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => st.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => st.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if st.status & status::FEATURES_OK != 0 || st.status & status::DRIVER == 0 {
                    tracing::warn!("virtio driver features written outside negotiation");
                    return;
                }
                match st.driver_features_sel {
                    0 => st.driver_features = lo(st.driver_features),
                    1 => st.driver_features = hi(st.driver_features),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => st.queue_sel = v,
            reg::QUEUE_NUM => set_queue(&mut st, &|q| q.size = v as u16),
            reg::QUEUE_READY => set_queue(&mut st, &|q| q.ready = v == 1),
            reg::QUEUE_DESC_LOW => set_queue(&mut st, &|q| q.desc = lo(q.desc)),
            reg::QUEUE_DESC_HIGH => set_queue(&mut st, &|q| q.desc = hi(q.desc)),
            reg::QUEUE_DRIVER_LOW => set_queue(&mut st, &|q| q.driver = lo(q.driver)),
            reg::QUEUE_DRIVER_HIGH => set_queue(&mut st, &|q| q.driver = hi(q.driver)),
            reg::QUEUE_DEVICE_LOW => set_queue(&mut st, &|q| q.device = lo(q.device)),
            reg::QUEUE_DEVICE_HIGH => set_queue(&mut st, &|q| q.device = hi(q.device)),
            reg::QUEUE_NOTIFY => match self.queue_events.get(v as usize) {
                Some(fd) => {
                    if let Err(e) = fd.write(1) {
                        tracing::warn!("virtio queue notify: {e}");
                    }
                }
                None => tracing::debug!("virtio notify of queue {v}, which does not exist"),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(&mut st, v),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio write {v:#x} to read-only/unknown {offset:#x}"),
        }
    }
}

impl BusDeviceSync for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let off = offset - reg::CONFIG;
            data.fill(0);
            if off.saturating_add(data.len() as u64) <= CONFIG_SPACE_SIZE {
                lock(&self.device).read_config(off, data);
            }
            return;
        }
        // The register file is 32-bit only (§4.2.2.2); other widths read 0.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!("virtio-mmio {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            let off = offset - reg::CONFIG;
            if off.saturating_add(data.len() as u64) <= CONFIG_SPACE_SIZE {
                lock(&self.device).write_config(off, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::rng::Rng;
    use crate::testing::{Rig, queue_addrs};

    fn rng_rig() -> Rig {
        Rig::new(Arc::new(Mutex::new(Rng::new(Default::default()))))
    }

    #[test]
    fn identifies_as_a_modern_virtio_mmio_device() {
        let rig = rng_rig();
        assert_eq!(rig.read32(reg::MAGIC), 0x7472_6976);
        assert_eq!(rig.read32(reg::VERSION), 2);
        assert_eq!(rig.read32(reg::DEVICE_ID), 4);
        rig.write32(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rig.read32(reg::DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
        rig.write32(reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rig.read32(reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_a_legacy_driver() {
        let rig = rng_rig();
        rig.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        rig.write32(reg::DRIVER_FEATURES_SEL, 0);
        rig.write32(reg::DRIVER_FEATURES, 1 << 5); // not offered
        rig.write32(reg::DRIVER_FEATURES_SEL, 1);
        rig.write32(reg::DRIVER_FEATURES, 1);
        rig.write32(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rig.read32(reg::STATUS) & status::FEATURES_OK, 0);

        rig.write32(reg::STATUS, 0);
        rig.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        rig.write32(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            rig.read32(reg::STATUS) & status::FEATURES_OK,
            0,
            "no VERSION_1: a legacy driver"
        );
    }

    #[test]
    fn status_only_grows_and_zero_resets_everything() {
        let rig = rng_rig();
        rig.handshake(0, &[256]);
        assert_eq!(rig.read32(reg::STATUS), 15);
        rig.write32(reg::STATUS, 3); // dropping bits is not allowed
        assert_eq!(rig.read32(reg::STATUS), 15);
        rig.write32(reg::STATUS, 0);
        assert_eq!(rig.read32(reg::STATUS), 0);
        rig.write32(reg::QUEUE_SEL, 0);
        assert_eq!(rig.read32(reg::QUEUE_READY), 0, "reset clears the queues");
        rig.write32(reg::STATUS, status::FAILED);
        assert_eq!(rig.read32(reg::STATUS) & status::FAILED, status::FAILED);
    }

    #[test]
    fn a_queue_size_that_is_not_a_power_of_two_needs_reset() {
        let rig = rng_rig();
        rig.handshake(0, &[100]);
        assert_ne!(rig.read32(reg::STATUS) & status::NEEDS_RESET, 0);
        rig.write32(reg::STATUS, 0);
        assert_eq!(rig.read32(reg::STATUS), 0, "reset clears NEEDS_RESET");
        rig.handshake(0, &[256]);
        assert_eq!(rig.read32(reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok() {
        let rig = rng_rig();
        rig.handshake(0, &[256]);
        rig.write32(reg::QUEUE_SEL, 0);
        rig.write32(reg::QUEUE_READY, 0);
        assert_eq!(rig.read32(reg::QUEUE_READY), 1);
        assert_eq!(rig.read32(reg::QUEUE_NUM_MAX), 256);
        rig.write32(reg::QUEUE_SEL, 5);
        assert_eq!(rig.read32(reg::QUEUE_NUM_MAX), 0, "no queue 5");
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let rig = rng_rig();
        let mut b = [0xaau8; 2];
        rig.transport.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        rig.transport.write(reg::STATUS + 1, &[1]);
        rig.transport.write(reg::STATUS, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(rig.read32(reg::STATUS), 0);
        let mut cfg = [0xffu8; 8];
        rig.transport.read(0xffc, &mut cfg);
        assert_eq!(cfg, [0; 8], "a read running past the window reads zero");
    }

    #[test]
    fn a_notify_before_driver_ok_is_ignored() {
        let mut rig = rng_rig();
        rig.push_chain(0, &[(crate::testing::DATA_BASE, 64, true)]);
        rig.notify(0);
        assert_eq!(rig.used_idx(0), 0);
        let _ = queue_addrs(0);
    }

    #[test]
    fn interrupt_status_is_acknowledged_bit_by_bit() {
        let mut rig = rng_rig();
        rig.handshake(0, &[256]);
        rig.push_chain(0, &[(crate::testing::DATA_BASE, 64, true)]);
        rig.notify(0);
        assert_eq!(rig.read32(reg::INTERRUPT_STATUS), 1);
        rig.write32(reg::INTERRUPT_ACK, 2);
        assert_eq!(rig.read32(reg::INTERRUPT_STATUS), 1);
        rig.write32(reg::INTERRUPT_ACK, 1);
        assert_eq!(rig.read32(reg::INTERRUPT_STATUS), 0);
    }
}
