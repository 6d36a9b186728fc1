//! Guest memory as the CPU sees it: physical RAM through host pointers,
//! per-page code generations for self-modifying code, the software TLB,
//! page walks, and the virtual-address access API handlers use.

pub mod access;
pub mod atomic;
pub mod io;
pub mod paging;
pub mod peek;
pub mod tlb;

use std::sync::atomic::{AtomicU32, Ordering};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmplay_hypervisor::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_MASK: u64 = !(PAGE_SIZE - 1);

struct RamRegion {
    start: u64,
    len: u64,
    host: *mut u8,
    first_frame: usize,
}

/// Guest RAM: the regions the machine created, as host pointers. Any
/// physical address outside them is MMIO.
pub struct PhysMem {
    regions: Vec<RamRegion>,
    frames: usize,
    /// Keeps the mappings alive as long as the pointers are used.
    _mem: GuestMemory,
}

// SAFETY: the raw pointers address the mmap'ed guest RAM owned by `_mem`,
// which lives as long as `PhysMem`; every access through them is a plain
// load/store or atomic on shared memory (concurrent vCPUs are the guest's
// business, as on real hardware).
unsafe impl Send for PhysMem {}
// SAFETY: as above; `PhysMem` itself is immutable after construction.
unsafe impl Sync for PhysMem {}

/// A RAM location: host pointer to the byte, its frame number in the
/// code map, and bytes left in the page.
#[derive(Clone, Copy)]
pub struct RamLoc {
    pub host: *mut u8,
    pub frame: usize,
}

impl PhysMem {
    pub fn new(mem: &GuestMemory) -> Self {
        let mut regions = Vec::new();
        let mut frames = 0;
        for r in mem.iter() {
            // Whole, aligned pages only: code hashing and the TLB work on
            // 4 KiB pages (a ragged edge would read as MMIO).
            let start = r.start_addr().0;
            let skip = start.wrapping_neg() & 0xfff;
            let len = r.len().saturating_sub(skip) & !0xfff;
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(skip))
                .unwrap_or(std::ptr::null_mut());
            let start = start + skip;
            if host.is_null() || len == 0 {
                continue;
            }
            regions.push(RamRegion {
                start,
                len,
                host,
                first_frame: frames,
            });
            frames += len.div_ceil(PAGE_SIZE) as usize;
        }
        PhysMem {
            regions,
            frames,
            _mem: mem.clone(),
        }
    }

    /// Number of 4 KiB frames of RAM (the code map's size).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Where physical address `pa` lives in host memory, if it is RAM.
    #[inline]
    pub fn ram(&self, pa: u64) -> Option<RamLoc> {
        for r in &self.regions {
            let off = pa.wrapping_sub(r.start);
            if off < r.len {
                return Some(RamLoc {
                    // SAFETY: off < len, so the pointer stays in the mapping.
                    host: unsafe { r.host.add(off as usize) },
                    frame: r.first_frame + (off >> 12) as usize,
                });
            }
        }
        None
    }

    /// Copies out of RAM; false if any byte is not RAM.
    pub fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            match self.ram(pa + i as u64) {
                // SAFETY: `ram` returned a pointer inside guest RAM.
                Some(loc) => *b = unsafe { loc.host.read_volatile() },
                None => return false,
            }
        }
        true
    }

    /// Reads an aligned little-endian u64/u32 page-table entry.
    pub fn read_u64(&self, pa: u64) -> Option<u64> {
        let loc = self.ram(pa)?;
        if pa & 7 != 0 || self.ram(pa + 7).is_none() {
            let mut b = [0u8; 8];
            return self.read(pa, &mut b).then(|| u64::from_le_bytes(b));
        }
        // SAFETY: 8-byte aligned and inside one RAM region (checked above);
        // AtomicU64 because other vCPUs may update the entry concurrently.
        Some(unsafe {
            (*std::sync::atomic::AtomicU64::from_ptr(loc.host.cast())).load(Ordering::Relaxed)
        })
    }

    /// Sets `bits` in the u64 at `pa` atomically (page-table A/D bits).
    pub fn or_u64(&self, pa: u64, bits: u64) {
        if let Some(loc) = self.ram(pa)
            && pa & 7 == 0
        {
            // SAFETY: aligned, inside RAM (checked by `ram`).
            unsafe {
                (*std::sync::atomic::AtomicU64::from_ptr(loc.host.cast()))
                    .fetch_or(bits, Ordering::Relaxed)
            };
        }
    }

    /// Sets `bits` in the u32 at `pa` atomically (32-bit paging A/D bits).
    pub fn or_u32(&self, pa: u64, bits: u32) {
        if let Some(loc) = self.ram(pa)
            && pa & 3 == 0
        {
            // SAFETY: aligned, inside RAM (checked by `ram`).
            unsafe { (*AtomicU32::from_ptr(loc.host.cast())).fetch_or(bits, Ordering::Relaxed) };
        }
    }
}

/// Per-frame code tracking: bit 0 = the frame holds cached code, the rest
/// counts writes to it while it did (the generation blocks compare).
pub struct CodeMap {
    pages: Box<[AtomicU32]>,
}

impl CodeMap {
    pub fn new(frames: usize) -> Self {
        CodeMap {
            pages: (0..frames).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The frame's generation.
    #[inline(always)]
    pub fn generation(&self, frame: usize) -> u32 {
        self.pages[frame].load(Ordering::Acquire) >> 1
    }

    /// Where the frame's word (generation << 1 | code bit) lives, for
    /// translated code that checks it.
    pub fn word_addr(&self, frame: usize) -> u64 {
        self.pages[frame].as_ptr() as u64
    }

    #[inline(always)]
    pub fn is_code(&self, frame: usize) -> bool {
        self.pages[frame].load(Ordering::Relaxed) & 1 != 0
    }

    /// Marks the frame as holding code; true if it did not before.
    pub fn mark(&self, frame: usize) -> bool {
        self.pages[frame].fetch_or(1, Ordering::AcqRel) & 1 == 0
    }

    /// A write hit a code frame: every block from it is now stale.
    pub fn invalidate(&self, frame: usize) {
        // +2 bumps the generation; clearing bit 0 lets writes go fast
        // again until code is decoded from the page anew.
        let _ = self.pages[frame].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some((v.wrapping_add(2)) & !1)
        });
    }
}
