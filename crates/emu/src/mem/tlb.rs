//! The software TLB: guest linear page → host pointer, with separate tags
//! for read, write and execute so each access is one compare. A page that
//! is MMIO, holds cached code, or is not yet dirty simply has no write tag.

pub const TLB_SIZE: usize = 512;
const INVALID: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct TlbEntry {
    pub tag_r: u64,
    pub tag_w: u64,
    pub tag_x: u64,
    /// Host address minus linear address of the page.
    pub addend: u64,
    /// Code-map frame number of the page.
    pub frame: u32,
    pub global: bool,
}

const EMPTY: TlbEntry = TlbEntry {
    tag_r: INVALID,
    tag_w: INVALID,
    tag_x: INVALID,
    addend: 0,
    frame: 0,
    global: false,
};

/// Two TLBs: supervisor (index 0) and user (index 1) accesses, so a CPL
/// change needs no flush.
pub struct Tlb {
    sets: Box<[[TlbEntry; TLB_SIZE]; 2]>,
    pub cur: usize,
    /// Address of the current set's first entry (`sets[cur]`), for the
    /// translation tier's inline lookups.
    pub cur_base: usize,
    /// Bumped by every flush: mappings may have changed since.
    pub(crate) epoch: u32,
    /// Code frames whose bytes were checked in this epoch (direct-mapped
    /// by frame): refilling their exec entries needs no new check.
    verified: Box<[(u32, u32); VERIFIED]>,
}

const VERIFIED: usize = 1024;

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    pub fn new() -> Self {
        let sets = Box::new([[EMPTY; TLB_SIZE]; 2]);
        Tlb {
            cur_base: sets[0].as_ptr() as usize,
            sets,
            cur: 0,
            epoch: 1,
            verified: Box::new([(0, 0); VERIFIED]),
        }
    }

    #[inline(always)]
    pub fn select(&mut self, user: bool) {
        self.cur = usize::from(user);
        self.cur_base = self.sets[self.cur].as_ptr() as usize;
    }

    #[inline(always)]
    pub fn index(lin: u64) -> usize {
        (lin >> 12) as usize & (TLB_SIZE - 1)
    }

    #[inline(always)]
    pub fn entry(&self, lin: u64) -> &TlbEntry {
        &self.sets[self.cur][Self::index(lin)]
    }

    #[inline]
    pub fn entry_mut(&mut self, lin: u64) -> &mut TlbEntry {
        &mut self.sets[self.cur][Self::index(lin)]
    }

    /// Bumped by every flush: cached translations made before are stale.
    #[inline(always)]
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Whether `frame`'s code was checked since the last flush; marks it.
    pub fn verified(&mut self, frame: usize) -> bool {
        let slot = &mut self.verified[frame % VERIFIED];
        let hit = *slot == (frame as u32, self.epoch);
        *slot = (frame as u32, self.epoch);
        hit
    }

    pub fn flush_all(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        for set in self.sets.iter_mut() {
            set.fill(EMPTY);
        }
    }

    /// A CR3 load: global entries survive.
    pub fn flush_nonglobal(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        for e in self.sets.iter_mut().flat_map(|s| s.iter_mut()) {
            if !e.global {
                *e = EMPTY;
            }
        }
    }

    /// Drops write permission on entries for `frame` (it now holds code).
    pub fn drop_write(&mut self, frame: usize) {
        for e in self.sets.iter_mut().flat_map(|s| s.iter_mut()) {
            if e.frame as usize == frame {
                e.tag_w = INVALID;
            }
        }
    }

    /// Drops write permission on every entry for a code frame.
    pub fn drop_write_code(&mut self, code: &super::CodeMap) {
        for e in self.sets.iter_mut().flat_map(|s| s.iter_mut()) {
            if e.tag_w != INVALID && code.is_code(e.frame as usize) {
                e.tag_w = INVALID;
            }
        }
    }
}
