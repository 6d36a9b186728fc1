//! The block cache: straight-line runs of decoded instructions keyed by
//! the host address of their first byte (so, by guest physical address)
//! and the code size, validated against the page's code generation.

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};

use super::Insn;
use super::table::table;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::{CS, Cpu, Mode};
use crate::mem::access::Target;
use crate::mem::{PAGE_MASK, RamLoc};

/// Most instructions in one block.
pub const MAX_BLOCK: usize = 64;
const SLOTS: usize = 1 << 17;
/// The slab is 4-way set associative: two hot blocks whose keys hash
/// alike no longer evict each other on every pass of a loop.
const WAYS: usize = 4;
const SETS: usize = SLOTS / WAYS;
/// Entries of the jump cache (linear RIP → block), as TCG's `tb_jmp_cache`.
const JUMPS: usize = 1 << 14;

/// A decoded block: its instructions, the iced forms for `--trace`, and
/// the page generation they were decoded at.
type Decoded = (Box<[Insn]>, Box<[Instruction]>, u32);

/// Blocks live in one slab that never moves or shrinks while the cache
/// exists, so a pointer to a block is always safe to read: a link or a
/// jump-cache entry carries the `serial` its target had, and is stale
/// once the slot has been decoded anew (or cleared).
///
/// The fields a block's start needs (serial, page check, instructions)
/// share its first cache line; the links follow.
#[repr(C, align(64))]
pub struct Block {
    /// Unique per decode (never 0 for a live block).
    serial: u64,
    frame: usize,
    generation: u32,
    /// False for the uncached scratch block: never linked.
    cached: bool,
    next_link: u8,
    pub insns: Box<[Insn]>,
    /// Times this block ran (a future JIT tier picks hot blocks by it).
    pub runs: u64,
    /// (host address of the first byte) << 2 | code size; `u64::MAX` empty.
    key: u64,
    /// Successors seen at run time: (rip, block, its serial and
    /// instructions, TLB epoch). Followed only while the serial and the
    /// epoch still match.
    links: [Link; 2],
    /// The iced instructions beside `insns`, kept only for `--trace`.
    pub full: Box<[Instruction]>,
    /// Translation tier: where the block's host code starts (0: none),
    /// where chained jumps enter it, and whether translating failed.
    pub jit_entry: u64,
    pub jit_head: u64,
    /// Where a chained exit that parked the flags in EDX enters.
    pub jit_head_spill: u64,
    pub jit_tried: bool,
    /// Handed to the background compiler in its round `jit_queued` (0:
    /// not); the code is installed when the block next runs after the
    /// compiler is done.
    pub jit_queued: u32,
    /// Co-simulated runs so far, and whether the block may be (no
    /// instruction whose result differs between two runs, as `rdtsc`).
    pub jit_verified: u64,
    pub jit_verifiable: bool,
    /// Flags the block leaves undefined (not compared).
    pub jit_undefined_flags: u64,
}

// SAFETY: the raw pointers in `links` point into the same vCPU's block
// slab, which lives and is used on one thread at a time with its Block.
unsafe impl Send for Block {}

#[derive(Clone, Copy)]
struct Link {
    rip: u64,
    block: *mut Block,
    serial: u64,
    /// The target's first instruction, to prefetch with its header.
    insns: *const Insn,
    tlb_epoch: u32,
}

const NO_LINK: Link = Link {
    rip: u64::MAX,
    block: std::ptr::null_mut(),
    serial: 0,
    insns: std::ptr::null(),
    tlb_epoch: 0,
};

/// Starts loading the cache line at `p` (a hint: any address is fine).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults and has no architectural effect; it
    // only moves a line towards the cache.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
}

/// A jump-cache entry: the block decoded for linear address `lin` in code
/// size `bits` under TLB epoch `epoch`.
#[derive(Clone, Copy)]
struct Jump {
    lin: u64,
    block: *mut Block,
    serial: u64,
    epoch: u32,
    bits: u32,
}

// SAFETY: as for `Block`: the pointer is into the same vCPU's slab.
unsafe impl Send for Jump {}

const NO_JUMP: Jump = Jump {
    lin: u64::MAX,
    block: std::ptr::null_mut(),
    serial: 0,
    epoch: 0,
    bits: 0,
};

impl Block {
    fn empty(cached: bool) -> Block {
        Block {
            key: u64::MAX,
            frame: 0,
            generation: 0,
            serial: 0,
            insns: Box::new([]),
            full: Box::new([]),
            runs: 0,
            links: [NO_LINK; 2],
            next_link: 0,
            cached,
            jit_entry: 0,
            jit_head: 0,
            jit_head_spill: 0,
            jit_tried: false,
            jit_queued: 0,
            jit_verified: 0,
            jit_verifiable: false,
            jit_undefined_flags: 0,
        }
    }

    /// Unique per decode: names the block to the background compiler.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Records the block's translation.
    pub fn set_jit(&mut self, entry: u64, head: u64, head_spill: u64) {
        self.jit_entry = entry;
        self.jit_head = head;
        self.jit_head_spill = head_spill;
        self.jit_tried = true;
    }

    /// The address of the block's page word in the code map and the
    /// value it holds while the block is current (generation, code bit).
    pub fn generation_word(&self, code: &crate::mem::CodeMap) -> (u64, u32) {
        (code.word_addr(self.frame), (self.generation << 1) | 1)
    }

    /// Host address and length of the block's guest bytes.
    pub fn code_bytes(&self) -> (*const u8, usize) {
        let len = self.insns.iter().map(|i| usize::from(i.len)).sum();
        ((self.key >> 2) as *const u8, len)
    }

    /// No write has hit the block's page since it was decoded.
    #[inline(always)]
    pub fn is_current(&self, code: &crate::mem::CodeMap) -> bool {
        code.generation(self.frame) == self.generation
    }

    /// The linked successor for `rip`, if the link is still valid.
    #[inline(always)]
    pub fn successor(&self, rip: u64, tlb: &crate::mem::tlb::Tlb) -> Option<(*mut Block, u32)> {
        let l = self.links.iter().find(|l| l.rip == rip && l.serial != 0)?;
        // SAFETY: link targets point into the slab, which outlives every
        // block in it; the serial tells whether the slot still holds the
        // block the link was made to.
        (tlb.is_current(l.tlb_epoch) && unsafe { (*l.block).serial } == l.serial)
            .then_some((l.block, l.tlb_epoch))
    }

    /// What a link to this block records: its serial and instructions,
    /// or `None` for the scratch block, which is never linked.
    pub fn link_target(&self) -> Option<(u64, *const Insn)> {
        self.cached.then_some((self.serial, self.insns.as_ptr()))
    }

    /// Remembers that `next` (whose `link_target` is `target`) followed
    /// this block at `rip`, mapped under code epoch `tlb_epoch`.
    pub fn link(&mut self, rip: u64, next: *mut Block, target: (u64, *const Insn), tlb_epoch: u32) {
        let k = usize::from(self.next_link & 1);
        self.links[k] = Link {
            rip,
            block: next,
            serial: target.0,
            insns: target.1,
            tlb_epoch,
        };
        self.next_link ^= 1;
    }

    /// Starts loading the likely next blocks while this one runs: their
    /// headers and first instructions are the interpreter's main cache
    /// misses on branchy code.
    #[inline(always)]
    pub fn prefetch_successors(&self) {
        for l in &self.links {
            if l.serial != 0 {
                prefetch(l.block);
                prefetch(l.insns);
            }
        }
    }

    pub fn cached(&self) -> bool {
        self.cached
    }
}

pub struct BlockCache {
    /// The slab, `WAYS` blocks per set of keys. Never reallocated.
    blocks: Box<[Block]>,
    /// Each slot's key, beside the others of its set (one line per set).
    keys: Box<[u64]>,
    /// The way each set replaces next (round robin).
    victim: Box<[u8]>,
    /// Linear RIP → block, checked before the code page is translated.
    jumps: Box<[Jump]>,
    /// The uncached block for an instruction crossing a page or fetched
    /// from outside RAM.
    scratch: Box<Block>,
    /// The last decodes of page-crossing instructions, by RIP.
    cross: Box<[Option<CrossPage>]>,
    /// Instructions decoded, for statistics.
    pub decoded: u64,
    /// Lookups past the jump cache, and how many of them decoded a block.
    pub slow_lookups: u64,
    /// Instructions the interpreter ran (the rest ran translated).
    pub interpreted: u64,
    pub blocks_decoded: u64,
    /// Of those, blocks whose page was written since their last decode.
    pub redecoded_stale: u64,
    /// The code page the previous block came from: (linear page, host
    /// page, frame). Valid until the CPU changes mode or mappings, which
    /// always ends a block with `cpu.stop` (the loop then forgets it).
    page: Option<(u64, u64, usize, u32)>,
    /// The code epoch of the block `lookup` last returned.
    pub found_epoch: u32,
    next_serial: u64,
    /// The translation tier, when on.
    pub jit: Option<crate::jit::Jit>,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

/// Page-crossing instructions remembered (direct-mapped by RIP).
const CROSS_MEMO: usize = 16;

/// A page-crossing instruction's bytes and their decode.
struct CrossPage {
    rip: u64,
    bits: u8,
    bytes: [u8; 15],
    insn: Insn,
    ins: Instruction,
}

#[inline(always)]
fn set_of(key: u64) -> usize {
    ((key ^ (key >> 15) ^ (key >> 30)) as usize >> 2 ^ (key as usize & 3)) & (SETS - 1)
}

#[inline(always)]
fn jump_of(lin: u64) -> usize {
    ((lin ^ (lin >> 12)) as usize) & (JUMPS - 1)
}

impl BlockCache {
    pub fn new() -> Self {
        BlockCache {
            blocks: (0..SLOTS).map(|_| Block::empty(true)).collect(),
            keys: vec![u64::MAX; SLOTS].into_boxed_slice(),
            victim: vec![0; SETS].into_boxed_slice(),
            jumps: vec![NO_JUMP; JUMPS].into_boxed_slice(),
            scratch: Box::new(Block::empty(false)),
            cross: (0..CROSS_MEMO).map(|_| None).collect(),
            decoded: 0,
            slow_lookups: 0,
            interpreted: 0,
            found_epoch: 0,
            blocks_decoded: 0,
            redecoded_stale: 0,
            page: None,
            next_serial: 1,
            jit: None,
        }
    }

    /// The block at the current CS:RIP, decoding it if needed. The
    /// pointer stays readable as long as the cache exists.
    #[inline]
    pub fn lookup(&mut self, cpu: &mut Cpu) -> Res<*mut Block> {
        let rip = cpu.rip();
        let cs = cpu.seg[CS];
        if cpu.mode != Mode::Long && rip > u64::from(cs.limit) {
            return Err(Fault::gp(0));
        }
        let lin = cs.base.wrapping_add(rip) & cpu.lin_mask;
        let bits = u32::from(cpu.bits);
        let j = self.jumps[jump_of(lin)];
        if j.lin == lin && cpu.tlb.is_current(j.epoch) && j.bits == bits && j.serial != 0 {
            // SAFETY: jump targets point into the slab (see `Block`).
            let b = unsafe { &*j.block };
            if b.serial == j.serial && b.is_current(&cpu.vm.code) {
                self.found_epoch = j.epoch;
                return Ok(j.block);
            }
        }
        self.lookup_slow(cpu, rip, lin, bits)
    }

    fn lookup_slow(&mut self, cpu: &mut Cpu, rip: u64, lin: u64, bits: u32) -> Res<*mut Block> {
        let cs = cpu.seg[CS];
        self.slow_lookups += 1;
        let (loc, epoch) = match self.page {
            Some((page, host, frame, epoch)) if page == lin & PAGE_MASK => (
                RamLoc {
                    host: (host + (lin & 0xfff)) as *mut u8,
                    frame,
                },
                epoch,
            ),
            _ => {
                let Target::Ram(loc) = cpu.fetch_target(lin)? else {
                    return self.decode_scratch(cpu, lin, None);
                };
                let epoch = cpu.fetch_epoch(lin);
                let page = (
                    lin & PAGE_MASK,
                    loc.host as u64 & PAGE_MASK,
                    loc.frame,
                    epoch,
                );
                self.page = Some(page);
                (loc, epoch)
            }
        };
        self.found_epoch = epoch;
        let key = (loc.host as u64) << 2 | u64::from(cpu.bits >> 5);
        let set = set_of(key) * WAYS;
        let way = (0..WAYS).find(|&w| self.keys[set + w] == key);
        let hit = way.filter(|&w| self.blocks[set + w].is_current(&cpu.vm.code));
        let slot = match hit {
            Some(w) => set + w,
            // A stale block of the same key is replaced in place.
            None => set + way.unwrap_or_else(|| usize::from(self.victim[set / WAYS])),
        };
        if hit.is_none() {
            let avail = 0x1000 - (lin & 0xfff) as usize;
            let avail = if cpu.mode != Mode::Long {
                avail.min((u64::from(cs.limit) - rip + 1).min(0x1000) as usize)
            } else {
                avail
            };
            match self.decode(cpu, rip, loc.host, loc.frame, avail)? {
                Some((insns, full, generation)) => {
                    self.blocks_decoded += 1;
                    if way.is_some() {
                        self.redecoded_stale += 1;
                    }
                    let serial = self.next_serial;
                    self.next_serial += 1;
                    if way.is_none() {
                        let v = &mut self.victim[set / WAYS];
                        *v = (*v + 1) % WAYS as u8;
                    }
                    self.keys[slot] = key;
                    let b = &mut self.blocks[slot];
                    *b = Block::empty(true);
                    b.key = key;
                    b.frame = loc.frame;
                    b.generation = generation;
                    b.serial = serial;
                    b.insns = insns;
                    b.full = full;
                }
                None => return self.decode_scratch(cpu, lin, Some(loc.host)),
            }
        }
        let b = &mut self.blocks[slot];
        self.jumps[jump_of(lin)] = Jump {
            lin,
            block: b,
            serial: b.serial,
            epoch,
            bits,
        };
        Ok(b)
    }

    /// Decodes a cached block; `None` if its first instruction crosses the page.
    fn decode(
        &mut self,
        cpu: &mut Cpu,
        rip: u64,
        host: *mut u8,
        frame: usize,
        avail: usize,
    ) -> Res<Option<Decoded>> {
        if cpu.vm.code.mark(frame) {
            // First code on this page: no vCPU may write it through the TLB.
            cpu.tlb.drop_write(frame);
            cpu.vm.platform.code_page_marked(cpu.id);
        }
        let generation = cpu.vm.code.generation(frame);
        // A block holds at most MAX_BLOCK instructions of at most 15 bytes.
        let avail = avail.min(MAX_BLOCK * 15);
        let mut buf = [0u8; MAX_BLOCK * 15];
        // SAFETY: `host..host+avail` is inside the RAM page `fetch_target`
        // found; other vCPUs may write it concurrently (the generation
        // check catches that), so copy it out once with a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), avail) };
        let bytes = &buf[..avail];
        let t = table();
        let mut decoder = Decoder::with_ip(u32::from(cpu.bits), bytes, rip, DecoderOptions::NONE);
        let mut insns: Vec<Insn> = Vec::with_capacity(16);
        let tracing = cpu.vm.trace.is_some();
        let mut full = Vec::new();
        let mut ins = Instruction::default();
        let mut prev_ins = Instruction::default();
        while decoder.can_decode() && insns.len() < MAX_BLOCK {
            decoder.decode_out(&mut ins);
            if ins.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
                break;
            }
            let (h, stop) = t.resolve(&ins);
            if !tracing
                && let Some(prev) = insns.last()
                && let Some(fused) = super::fuse::fuse(prev, &prev_ins, &ins)
            {
                insns.pop();
                insns.push(fused);
                break;
            }
            insns.push(Insn::build(&ins, h));
            if tracing {
                full.push(ins);
            }
            prev_ins = ins;
            if stop || ins.flow_control() != FlowControl::Next {
                break;
            }
        }
        if insns.is_empty() {
            return Ok(None);
        }
        self.decoded += insns.len() as u64;
        Ok(Some((
            insns.into_boxed_slice(),
            full.into_boxed_slice(),
            generation,
        )))
    }

    /// Decodes one instruction that crosses a page (or is outside RAM,
    /// where fetches read all-ones) into the uncached scratch block.
    /// Such an instruction can be on a hot path (a kernel function
    /// straddling a page): its bytes are read afresh each time, and when
    /// they match the last decode at this RIP that decode is reused.
    #[cold]
    fn decode_scratch(
        &mut self,
        cpu: &mut Cpu,
        lin: u64,
        host: Option<*mut u8>,
    ) -> Res<*mut Block> {
        let mut buf = [0xffu8; 15];
        if let Some(host) = host {
            let first = (0x1000 - (lin & 0xfff) as usize).min(15);
            // SAFETY: `host..host+first` is inside the RAM page
            // `fetch_target` found for `lin` (`first` stops at its end);
            // other vCPUs may write it concurrently, so a raw copy.
            unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), first) };
            if first < 15 {
                // Bytes from the next page fault as the instruction's own.
                let next = lin.wrapping_add(first as u64) & cpu.lin_mask;
                if let Target::Ram(loc) = cpu.fetch_target(next)? {
                    // SAFETY: `next` starts a page, so its first
                    // `15 - first` bytes are inside the RAM page found.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            loc.host,
                            buf[first..].as_mut_ptr(),
                            15 - first,
                        )
                    };
                }
            }
        }
        let rip = cpu.rip();
        let slot = (rip ^ (rip >> 12)) as usize % CROSS_MEMO;
        let memo = match &self.cross[slot] {
            Some(m) if m.rip == rip && m.bits == cpu.bits && m.bytes == buf => m,
            _ => {
                let mut decoder =
                    Decoder::with_ip(u32::from(cpu.bits), &buf, rip, DecoderOptions::NONE);
                let ins = decoder.decode();
                let (h, _) = table().resolve(&ins);
                self.cross[slot].insert(CrossPage {
                    rip,
                    bits: cpu.bits,
                    bytes: buf,
                    insn: Insn::build(&ins, h),
                    ins,
                })
            }
        };
        let mut b = Block::empty(false);
        b.insns = Box::new([memo.insn.clone()]);
        if cpu.vm.trace.is_some() {
            b.full = Box::new([memo.ins]);
        }
        *self.scratch = b;
        Ok(&mut *self.scratch)
    }

    /// The mapping of the last code page may have changed.
    #[inline(always)]
    pub fn forget_page(&mut self) {
        self.page = None;
    }

    /// Every block forgets its translation (the tier's arena was reset).
    pub fn clear_jit(&mut self) {
        for b in self.blocks.iter_mut() {
            b.jit_entry = 0;
            b.jit_head = 0;
            b.jit_head_spill = 0;
            b.jit_tried = false;
            b.jit_queued = 0;
        }
    }

    /// Forgets every block (tests, INIT).
    ///
    /// Cheap (tests reset state thousands of times): only the ways in are
    /// cleared. The old blocks stay in the slab but nothing reaches them:
    /// a lookup finds no key and decodes afresh (a new serial), fresh
    /// blocks link only to fresh ones, and the translation tier's target
    /// cache forgets its entries.
    pub fn clear(&mut self) {
        self.keys.fill(u64::MAX);
        self.jumps.fill(NO_JUMP);
        if let Some(jit) = self.jit.as_mut() {
            jit.forget_targets();
        }
    }
}
