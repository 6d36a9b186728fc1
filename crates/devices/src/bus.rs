//! A device bus: an ordered map from address ranges to devices, so an exit
//! resolves to its device in one lookup. The machine keeps one bus for
//! port I/O and one for MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the range
/// the device was inserted at, so a device does not know where it lives.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device that does its own locking (`&self` accesses), so a vCPU never
/// waits on a lock someone else holds for longer than one register access:
/// the virtio transports are these. A `Mutex` around a [`BusDevice`] is one.
pub trait BusDeviceSync: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl<T: BusDevice + ?Sized> BusDeviceSync for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(self).read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        lock(self).write(offset, data);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A shared device: the same device may sit on both buses.
pub type SharedDevice = Arc<dyn BusDeviceSync>;

#[derive(Clone)]
struct Entry {
    len: u64,
    /// Added to the offset the device sees: lets one device answer at
    /// several disjoint ranges (the i8042 at 0x60 and 0x64).
    device_offset: u64,
    device: SharedDevice,
}

/// Address ranges to devices. Accesses no device claims read as all-ones
/// and writes vanish, as on a real ISA bus.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base+len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        self.insert_window(device, base, len, 0)
    }

    /// Places `device` at `[base, base+len)`, where it sees offsets from
    /// `device_offset` up.
    pub fn insert_window(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
        device_offset: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other, e)) = before
            && other + e.len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.ranges.insert(
            base,
            Entry {
                len,
                device_offset,
                device,
            },
        );
        Ok(())
    }

    /// The device covering `addr`, with `addr`'s offset into it.
    fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset + entry.device_offset, &entry.device))
    }

    /// Dispatches a read; returns false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device that panicked while holding its lock is still
/// usable: its state is whatever it was, which beats wedging the VM.
fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3ff, &mut b));
        assert_eq!(b, [7]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(2, vec![7])]);
    }

    #[test]
    fn one_device_can_answer_at_two_windows() {
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert_window(dev.clone(), 0x60, 1, 0).unwrap();
        bus.insert_window(dev.clone(), 0x64, 1, 4).unwrap();
        assert!(bus.write(0x64, &[0xfe]));
        assert!(bus.write(0x60, &[0x1]));
        assert!(
            !bus.write(0x61, &[0x1]),
            "0x61 belongs to the PIT, not the i8042"
        );
        assert_eq!(dev.lock().unwrap().0, vec![(4, vec![0xfe]), (0, vec![1])]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let dev: SharedDevice = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x10, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x1f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x8, 9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x0, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev, 0x20, 1).unwrap();
    }
}
