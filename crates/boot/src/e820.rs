//! The guest's RAM as the loaders see it: the E820 map from
//! [`layout::e820_map`], where a kernel may go and where an initrd fits.

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{BootError, Placement};
use crate::layout::{self, E820Entry, E820Kind};
use vmplay_hypervisor::GuestMemory;

/// Pages are the unit initrds are aligned to.
pub const PAGE_SIZE: u64 = 0x1000;

/// Guest RAM size and map.
#[derive(Debug, Clone)]
pub struct RamMap {
    /// Bytes of RAM in all regions of guest memory.
    pub total: u64,
    pub e820: Vec<E820Entry>,
}

impl RamMap {
    /// The map for `memory`, whose regions the machine laid out with
    /// [`layout::ram_ranges`].
    pub fn of(memory: &GuestMemory) -> Result<Self, BootError> {
        let total: u64 = memory.iter().map(|r| r.len()).sum();
        Self::with_total(total)
    }

    pub fn with_total(total: u64) -> Result<Self, BootError> {
        if total < layout::MIN_MEMORY {
            return Err(BootError::Memory(format!(
                "{total} bytes of RAM, but vmplay needs at least {} bytes",
                layout::MIN_MEMORY
            )));
        }
        Ok(RamMap {
            total,
            e820: layout::e820_map(total),
        })
    }

    /// RAM ranges as `start..end`.
    fn ram(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.e820
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.addr..e.addr + e.size)
    }

    /// End of the RAM that starts at 1 MiB: everything a 32-bit entry or
    /// an initrd can use.
    pub fn top_of_low_ram(&self) -> u64 {
        self.ram()
            .find(|r| r.contains(&layout::HIGH_RAM_START))
            .map_or(layout::HIGH_RAM_START, |r| r.end)
    }

    /// Checks that a kernel may occupy `start..end`: RAM at or above 1 MiB.
    pub fn check_kernel_range(&self, start: u64, end: u64) -> Result<(), Placement> {
        if start < layout::HIGH_RAM_START {
            return Err(Placement::LowMemory);
        }
        if self.ram().any(|r| r.start <= start && end <= r.end) {
            return Ok(());
        }
        if start < layout::MMIO_HOLE_END && end > layout::MMIO_HOLE_START {
            return Err(Placement::MmioHole);
        }
        Err(Placement::BeyondRam { memory: self.total })
    }

    /// The highest page-aligned address for `size` bytes that ends at or
    /// below `limit_end`, lies in RAM above 1 MiB and overlaps none of
    /// `avoid` (the kernel). `None` if there is no such place.
    pub fn place_high(&self, size: u64, limit_end: u64, avoid: &[Range<u64>]) -> Option<u64> {
        let mut top = limit_end.min(self.top_of_low_ram());
        loop {
            let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
            if start < layout::HIGH_RAM_START {
                return None;
            }
            let end = start + size;
            match avoid.iter().find(|r| r.start < end && start < r.end) {
                // Try again just below what is in the way.
                Some(r) => top = r.start,
                None => return Some(start),
            }
        }
    }
}

/// Writes `bytes` at `addr`, naming `what` if that fails.
pub(crate) fn write(
    memory: &GuestMemory,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    memory
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, addr, source })
}

/// Fills `len` bytes at `addr` with zeroes (BSS, stale tables).
pub(crate) fn zero(
    memory: &GuestMemory,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), BootError> {
    static CHUNK: [u8; 0x1_0000] = [0; 0x1_0000];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK.len() as u64);
        write(memory, what, addr + done, &CHUNK[..n as usize])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rejects_memory_below_the_minimum() {
        let err = RamMap::with_total(MIB).unwrap_err();
        assert!(err.to_string().contains("at least"), "{err}");
    }

    #[test]
    fn low_ram_ends_at_the_mmio_hole_for_large_guests() {
        assert_eq!(
            RamMap::with_total(8 << 30).unwrap().top_of_low_ram(),
            layout::MMIO_HOLE_START
        );
        assert_eq!(
            RamMap::with_total(256 * MIB).unwrap().top_of_low_ram(),
            256 * MIB
        );
    }

    #[test]
    fn kernel_ranges_must_be_ram_above_one_mib() {
        let map = RamMap::with_total(64 * MIB).unwrap();
        assert_eq!(map.check_kernel_range(16 * MIB, 32 * MIB), Ok(()));
        assert_eq!(
            map.check_kernel_range(0x8000, 2 * MIB),
            Err(Placement::LowMemory)
        );
        assert_eq!(
            map.check_kernel_range(60 * MIB, 65 * MIB),
            Err(Placement::BeyondRam { memory: 64 * MIB })
        );
        let big = RamMap::with_total(8 << 30).unwrap();
        assert_eq!(
            big.check_kernel_range(layout::MMIO_HOLE_START - MIB, layout::MMIO_HOLE_START + 1),
            Err(Placement::MmioHole)
        );
        assert_eq!(big.check_kernel_range(1 << 32, (1 << 32) + MIB), Ok(()));
    }

    #[test]
    fn places_highest_page_aligned_below_the_limit() {
        let map = RamMap::with_total(64 * MIB).unwrap();
        assert_eq!(
            map.place_high(0x1801, u64::MAX, &[]),
            Some(64 * MIB - 0x2000)
        );
        // The limit is an exclusive end; the result stays page aligned.
        assert_eq!(
            map.place_high(0x1000, 32 * MIB + 0x123, &[]),
            Some(32 * MIB - 0x1000)
        );
    }

    #[test]
    fn placement_steps_below_the_kernel() {
        let map = RamMap::with_total(64 * MIB).unwrap();
        let kernel = 40 * MIB..64 * MIB;
        assert_eq!(
            map.place_high(MIB, u64::MAX, std::slice::from_ref(&kernel)),
            Some(39 * MIB)
        );
        assert_eq!(map.place_high(50 * MIB, u64::MAX, &[kernel]), None);
    }
}
