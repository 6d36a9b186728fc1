//! The software TLB: guest linear page → host pointer, with separate tags
//! for read, write and execute so each access is one compare. A page that
//! is MMIO, holds cached code, or is not yet dirty simply has no write tag.

pub const TLB_SIZE: usize = 512;
const INVALID: u64 = u64::MAX;

/// One cache line per entry: the translation tier indexes the TLB with
/// one shift and one mask, and a lookup touches one line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct TlbEntry {
    pub tag_r: u64,
    pub tag_w: u64,
    pub tag_x: u64,
    /// Host address minus linear address of the page.
    pub addend: u64,
    /// Code-map frame number of the page.
    pub frame: u32,
    pub global: bool,
    /// log2 of the size of the guest page this entry is part of.
    pub shift: u8,
}

const EMPTY: TlbEntry = TlbEntry {
    tag_r: INVALID,
    tag_w: INVALID,
    tag_x: INVALID,
    addend: 0,
    frame: 0,
    global: false,
    shift: 12,
};

/// Entries a fill displaced, per set, searched before a page walk (as
/// QEMU's victim TLB): two hot pages whose index collides in the
/// direct-mapped TLB (the kernel does this on every system call in some
/// loops) then cost a swap instead of a four-level walk through page
/// tables that are rarely in the host's caches.
const VICTIMS: usize = 8;

/// Two TLBs: supervisor (index 0) and user (index 1) accesses, so a CPL
/// change needs no flush.
pub struct Tlb {
    sets: Box<[[TlbEntry; TLB_SIZE]; 2]>,
    victims: [[TlbEntry; VICTIMS]; 2],
    victim_next: [usize; 2],
    pub cur: usize,
    /// Address of the current set's first entry (`sets[cur]`), for the
    /// translation tier's inline lookups.
    pub cur_base: usize,
    /// Code epochs: what the jump cache, block links and the translation
    /// tier's target cache stamp a linear→physical code mapping with.
    /// `[0]` covers non-global pages and moves with every flush; `[1]`
    /// (bit 31 set) covers global pages and survives CR3 loads, so the
    /// kernel's code stays linked across context switches.
    pub(crate) epochs: [u32; 2],
    /// Linear code pages fetched from under the current epochs (a bit per
    /// page, hashed; non-global and global): an `invlpg` of any other page
    /// leaves the code caches alone.
    code_pages: [[u64; CODE_PAGE_WORDS]; 2],
}

const GLOBAL_EPOCH: u32 = 1 << 31;

const CODE_PAGE_WORDS: usize = 64;

fn code_bit(lin: u64) -> (usize, u64) {
    let n = (lin >> 12) as usize & (CODE_PAGE_WORDS * 64 - 1);
    (n / 64, 1 << (n % 64))
}

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
            victims: [[EMPTY; VICTIMS]; 2],
            victim_next: [0; 2],
            cur: 0,
            epochs: [1, GLOBAL_EPOCH | 1],
            code_pages: [[0; CODE_PAGE_WORDS]; 2],
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

    #[cfg(test)]
    pub fn entry_mut(&mut self, lin: u64) -> &mut TlbEntry {
        &mut self.sets[self.cur][Self::index(lin)]
    }

    /// Puts `e` (for `lin`'s page) in the current set; the entry it
    /// displaces becomes a victim.
    pub fn insert(&mut self, lin: u64, e: TlbEntry) {
        let slot = &mut self.sets[self.cur][Self::index(lin)];
        let old = std::mem::replace(slot, e);
        if old.tag_r != INVALID || old.tag_w != INVALID || old.tag_x != INVALID {
            let k = self.victim_next[self.cur];
            self.victims[self.cur][k] = old;
            self.victim_next[self.cur] = (k + 1) % VICTIMS;
        }
    }

    /// A victim holding `lin`'s page with the tag `tag` picks (read,
    /// write or execute) swaps back into the TLB; its addend.
    pub fn swap_in_victim(&mut self, lin: u64, tag: impl Fn(&TlbEntry) -> u64) -> Option<u64> {
        let page = lin & super::PAGE_MASK;
        let cur = self.cur;
        let k = self.victims[cur].iter().position(|v| tag(v) == page)?;
        let slot = &mut self.sets[cur][Self::index(lin)];
        std::mem::swap(slot, &mut self.victims[cur][k]);
        Some(slot.addend)
    }

    /// Every entry, victims included.
    fn all_mut(&mut self) -> impl Iterator<Item = &mut TlbEntry> {
        self.sets
            .iter_mut()
            .flat_map(|s| s.iter_mut())
            .chain(self.victims.iter_mut().flat_map(|s| s.iter_mut()))
    }

    /// Bumped by every flush (a count of flushes).
    #[inline(always)]
    pub fn epoch(&self) -> u32 {
        self.epochs[0]
    }

    /// The code epoch for a page mapped global or not.
    #[inline(always)]
    pub fn code_epoch(&self, global: bool) -> u32 {
        self.epochs[usize::from(global)]
    }

    /// Whether a mapping stamped with code epoch `e` still holds.
    #[inline(always)]
    pub fn is_current(&self, e: u32) -> bool {
        self.epochs[(e >> 31) as usize] == e
    }

    /// Notes that code is fetched from `lin`'s page (mapped `global`)
    /// under the current epochs.
    #[inline(always)]
    pub fn note_code_page(&mut self, lin: u64, global: bool) {
        let (w, b) = code_bit(lin);
        self.code_pages[usize::from(global)][w] |= b;
    }

    /// Non-global mappings may have changed.
    fn new_epoch(&mut self) {
        // 0 never stamps a live mapping.
        self.epochs[0] = (self.epochs[0] + 1) & !GLOBAL_EPOCH;
        if self.epochs[0] == 0 {
            self.epochs[0] = 1;
        }
        self.code_pages[0] = [0; CODE_PAGE_WORDS];
    }

    /// Any mapping may have changed.
    fn new_epochs(&mut self) {
        self.new_epoch();
        self.epochs[1] = ((self.epochs[1] + 1) & !GLOBAL_EPOCH).max(1) | GLOBAL_EPOCH;
        self.code_pages[1] = [0; CODE_PAGE_WORDS];
    }

    /// `invlpg`: drops the entries for `lin`'s page, including those of a
    /// large page containing it. Returns true when cached code may have
    /// depended on the mapping (a fetch from the page this epoch, or a
    /// large page): then the epoch moves on, as after a flush.
    pub fn flush_page(&mut self, lin: u64) -> bool {
        let page = lin & !0xfff;
        let (w, b) = code_bit(page);
        let user_code = self.code_pages[0][w] & b != 0;
        let mut code = self.code_pages[1][w] & b != 0;
        for e in self.all_mut() {
            let tag = [e.tag_r, e.tag_w, e.tag_x]
                .into_iter()
                .find(|t| *t != INVALID);
            let Some(tag) = tag else { continue };
            let shift = u32::from(e.shift);
            if tag >> shift == page >> shift {
                code |= shift > 12;
                *e = EMPTY;
            }
        }
        if code {
            self.new_epochs();
        } else if user_code {
            self.new_epoch();
        }
        code || user_code
    }

    pub fn flush_all(&mut self) {
        self.new_epochs();
        for set in self.sets.iter_mut() {
            set.fill(EMPTY);
        }
        self.victims = [[EMPTY; VICTIMS]; 2];
    }

    /// A CR3 load: global entries survive.
    pub fn flush_nonglobal(&mut self) {
        self.new_epoch();
        for e in self.all_mut() {
            if !e.global {
                *e = EMPTY;
            }
        }
    }

    /// Drops write permission on entries for `frame` (it now holds code).
    pub fn drop_write(&mut self, frame: usize) {
        for e in self.all_mut() {
            if e.frame as usize == frame {
                e.tag_w = INVALID;
            }
        }
    }

    /// Drops write permission on every entry for a code frame.
    pub fn drop_write_code(&mut self, code: &super::CodeMap) {
        for e in self.all_mut() {
            if e.tag_w != INVALID && code.is_code(e.frame as usize) {
                e.tag_w = INVALID;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(t: &mut Tlb, lin: u64, shift: u8) {
        *t.entry_mut(lin) = TlbEntry {
            tag_r: lin & !0xfff,
            tag_w: INVALID,
            tag_x: lin & !0xfff,
            addend: 0,
            frame: 0,
            global: false,
            shift,
        };
    }

    #[test]
    fn a_displaced_entry_comes_back_from_the_victims_until_a_flush() {
        let mut t = Tlb::new();
        let a = 0x40_1000u64;
        let b = a + (TLB_SIZE as u64) * 0x1000; // same index as `a`
        let entry = |page: u64, addend: u64, frame: u32| TlbEntry {
            tag_r: page,
            tag_w: page,
            tag_x: INVALID,
            addend,
            frame,
            global: false,
            shift: 12,
        };
        t.insert(a, entry(a, 0x1000, 7));
        t.insert(b, entry(b, 0x2000, 8));
        assert_eq!(t.entry(a).tag_r, b, "b displaced a");
        assert_eq!(t.swap_in_victim(a, |e| e.tag_r), Some(0x1000));
        assert_eq!(t.entry(a).tag_r, a, "a is back");
        assert_eq!(t.swap_in_victim(b, |e| e.tag_w), Some(0x2000));
        // A frame turning into code loses its write tag in the victims too.
        t.drop_write(7);
        assert_eq!(t.swap_in_victim(a, |e| e.tag_w), None);
        assert_eq!(t.swap_in_victim(a, |e| e.tag_r), Some(0x1000));
        t.flush_nonglobal();
        assert_eq!(t.swap_in_victim(b, |e| e.tag_r), None, "flushed");
        assert_eq!(t.entry(a).tag_r, INVALID);
    }

    #[test]
    fn invlpg_drops_only_its_page_and_keeps_the_epoch_for_data_pages() {
        let mut t = Tlb::new();
        fill(&mut t, 0x40_1000, 12);
        fill(&mut t, 0x40_2000, 12);
        let epoch = t.epoch();
        assert!(!t.flush_page(0x40_1abc));
        assert_eq!(t.entry(0x40_1000).tag_r, INVALID);
        assert_eq!(t.entry(0x40_2000).tag_r, 0x40_2000);
        assert_eq!(t.epoch(), epoch);
    }

    #[test]
    fn invlpg_of_a_code_page_or_inside_a_large_page_moves_the_epoch() {
        let mut t = Tlb::new();
        fill(&mut t, 0x40_1000, 12);
        t.note_code_page(0x40_1000, false);
        let epoch = t.epoch();
        assert!(t.flush_page(0x40_1000));
        assert_ne!(t.epoch(), epoch);
        // A 2 MiB page cached as 4 KiB entries: any page in it drops all.
        fill(&mut t, 0x20_0000, 21);
        fill(&mut t, 0x3f_f000, 21);
        fill(&mut t, 0x40_1000, 12);
        let epoch = t.epoch();
        assert!(t.flush_page(0x21_0000));
        assert_eq!(t.entry(0x20_0000).tag_r, INVALID);
        assert_eq!(t.entry(0x3f_f000).tag_r, INVALID);
        assert_eq!(t.entry(0x40_1000).tag_r, 0x40_1000);
        assert_ne!(t.epoch(), epoch);
    }
}
