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
const SLOTS: usize = 1 << 15;

pub struct Block {
    frame: usize,
    generation: u32,
    pub insns: Box<[Insn]>,
    /// Times this block ran (a future JIT tier picks hot blocks by it).
    pub runs: u64,
    /// Successors seen at run time: (rip, block, cache generation, TLB
    /// epoch). Followed only while both stamps still match.
    links: [Link; 2],
    next_link: u8,
    /// False for the uncached scratch block: never linked.
    cached: bool,
}

// SAFETY: the raw pointers in `links` point into the same vCPU's block
// cache, which lives and is used on one thread at a time with its Block.
unsafe impl Send for Block {}

#[derive(Clone, Copy)]
struct Link {
    rip: u64,
    block: *mut Block,
    cache_gen: u64,
    tlb_epoch: u32,
}

const NO_LINK: Link = Link {
    rip: u64::MAX,
    block: std::ptr::null_mut(),
    cache_gen: 0,
    tlb_epoch: 0,
};

impl Block {
    /// No write has hit the block's page since it was decoded.
    #[inline(always)]
    pub fn is_current(&self, code: &crate::mem::CodeMap) -> bool {
        code.generation(self.frame) == self.generation
    }

    /// The linked successor for `rip`, if the link is still valid.
    #[inline(always)]
    pub fn successor(&self, rip: u64, cache_gen: u64, tlb_epoch: u32) -> Option<*mut Block> {
        self.links
            .iter()
            .find(|l| l.rip == rip && l.cache_gen == cache_gen && l.tlb_epoch == tlb_epoch)
            .map(|l| l.block)
    }

    /// Remembers that `next` followed this block at `rip`.
    pub fn link(&mut self, rip: u64, next: *mut Block, cache_gen: u64, tlb_epoch: u32) {
        let k = usize::from(self.next_link & 1);
        self.links[k] = Link {
            rip,
            block: next,
            cache_gen,
            tlb_epoch,
        };
        self.next_link ^= 1;
    }

    pub fn cached(&self) -> bool {
        self.cached
    }
}

pub struct BlockCache {
    /// (key, block): the key sits beside the pointer so a miss costs
    /// no pointer chase.
    slots: Vec<(u64, Option<Box<Block>>)>,
    /// The uncached block for an instruction crossing a page or fetched
    /// from outside RAM.
    scratch: Option<Box<Block>>,
    pub decoded: u64,
    /// The code page the previous block came from: (linear page, host
    /// page, frame). Valid until the CPU changes mode or mappings, which
    /// always ends a block with `cpu.stop` (the loop then forgets it).
    page: Option<(u64, u64, usize)>,
    /// Bumped whenever a block may be freed (slot replaced, scratch
    /// replaced, clear): links stamped with an older value are dead.
    generation: u64,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
fn slot_of(key: u64) -> usize {
    ((key ^ (key >> 15) ^ (key >> 30)) as usize) & (SLOTS - 1)
}

impl BlockCache {
    pub fn new() -> Self {
        BlockCache {
            slots: (0..SLOTS).map(|_| (u64::MAX, None)).collect(),
            scratch: None,
            decoded: 0,
            page: None,
            generation: 1,
        }
    }

    #[inline(always)]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The block at the current CS:RIP, decoding it if needed.
    #[inline]
    pub fn lookup(&mut self, cpu: &mut Cpu) -> Res<&mut Block> {
        let rip = cpu.rip();
        let cs = cpu.seg[CS];
        if cpu.mode != Mode::Long && rip > u64::from(cs.limit) {
            return Err(Fault::gp(0));
        }
        let lin = cs.base.wrapping_add(rip) & cpu.lin_mask;
        let loc = match self.page {
            Some((page, host, frame)) if page == lin & PAGE_MASK => RamLoc {
                host: (host + (lin & 0xfff)) as *mut u8,
                frame,
            },
            _ => {
                let Target::Ram(loc) = cpu.fetch_target(lin)? else {
                    return self.decode_scratch(cpu, lin, None);
                };
                self.page = Some((lin & PAGE_MASK, loc.host as u64 & PAGE_MASK, loc.frame));
                loc
            }
        };
        let key = (loc.host as u64) << 2 | u64::from(cpu.bits >> 5);
        let slot = slot_of(key);
        let entry = &self.slots[slot];
        let hit = entry.0 == key
            && matches!(&entry.1, Some(b) if cpu.vm.code.generation(b.frame) == b.generation);
        if !hit {
            let avail = 0x1000 - (lin & 0xfff) as usize;
            let avail = if cpu.mode != Mode::Long {
                avail.min((u64::from(cs.limit) - rip + 1).min(0x1000) as usize)
            } else {
                avail
            };
            match self.decode(cpu, rip, loc.host, loc.frame, avail)? {
                Some(block) => {
                    self.generation += 1;
                    self.slots[slot] = (key, Some(block));
                }
                None => return self.decode_scratch(cpu, lin, Some(loc.host)),
            }
        }
        match self.slots[slot].1.as_deref_mut() {
            Some(b) => Ok(b),
            None => Err(Fault::ud()),
        }
    }

    /// Decodes a cached block; `None` if its first instruction crosses the page.
    fn decode(
        &mut self,
        cpu: &mut Cpu,
        rip: u64,
        host: *mut u8,
        frame: usize,
        avail: usize,
    ) -> Res<Option<Box<Block>>> {
        if cpu.vm.code.mark(frame) {
            // First code on this page: no vCPU may write it through the TLB.
            cpu.tlb.drop_write(frame);
            cpu.vm.platform.code_page_marked(cpu.id);
            let page = (host as u64 & crate::mem::PAGE_MASK) as *const u8;
            // SAFETY: `host` is inside a 4 KiB RAM page (fetch_target).
            cpu.vm
                .code
                .set_hash(frame, unsafe { crate::mem::page_hash(page) });
        }
        let generation = cpu.vm.code.generation(frame);
        let mut buf = [0u8; 0x1000];
        // SAFETY: `host..host+avail` is inside the RAM page `fetch_target`
        // found; other vCPUs may write it concurrently (the generation
        // check catches that), so copy it out once with a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), avail) };
        let bytes = &buf[..avail];
        let t = table();
        let mut decoder = Decoder::with_ip(u32::from(cpu.bits), bytes, rip, DecoderOptions::NONE);
        let mut insns: Vec<Insn> = Vec::with_capacity(16);
        let tracing = cpu.vm.trace.is_some();
        let mut ins = Instruction::default();
        while decoder.can_decode() && insns.len() < MAX_BLOCK {
            decoder.decode_out(&mut ins);
            if ins.is_invalid() && decoder.last_error() == DecoderError::NoMoreBytes {
                break;
            }
            let (h, stop) = t.resolve(&ins);
            if !tracing
                && let Some(prev) = insns.last()
                && let Some(fused) = super::fuse::fuse(prev, &ins)
            {
                insns.pop();
                insns.push(fused);
                break;
            }
            insns.push(Insn::build(&ins, h));
            if stop || ins.flow_control() != FlowControl::Next {
                break;
            }
        }
        if insns.is_empty() {
            return Ok(None);
        }
        self.decoded += insns.len() as u64;
        Ok(Some(Box::new(Block {
            frame,
            generation,
            insns: insns.into_boxed_slice(),
            runs: 0,
            links: [NO_LINK; 2],
            next_link: 0,
            cached: true,
        })))
    }

    /// Decodes one instruction that crosses a page (or is outside RAM,
    /// where fetches read all-ones) into the uncached scratch block.
    #[cold]
    fn decode_scratch(
        &mut self,
        cpu: &mut Cpu,
        lin: u64,
        host: Option<*mut u8>,
    ) -> Res<&mut Block> {
        let mut buf = [0xffu8; 15];
        if host.is_some() {
            let first = (0x1000 - (lin & 0xfff) as usize).min(15);
            for (k, b) in buf.iter_mut().enumerate() {
                let a = lin.wrapping_add(k as u64) & cpu.lin_mask;
                // Bytes from the next page fault as the instruction's own.
                let _ = first;
                if let Target::Ram(loc) = cpu.fetch_target(a)? {
                    // SAFETY: one byte inside a RAM page just translated.
                    *b = unsafe { loc.host.read_volatile() };
                }
            }
        }
        let mut decoder =
            Decoder::with_ip(u32::from(cpu.bits), &buf, cpu.rip(), DecoderOptions::NONE);
        let ins = decoder.decode();
        let (h, _) = table().resolve(&ins);
        self.generation += 1;
        self.scratch = Some(Box::new(Block {
            frame: 0,
            generation: 0,
            insns: vec![Insn::build(&ins, h)].into_boxed_slice(),
            runs: 0,
            links: [NO_LINK; 2],
            next_link: 0,
            cached: false,
        }));
        match self.scratch.as_deref_mut() {
            Some(b) => Ok(b),
            None => Err(Fault::ud()),
        }
    }

    /// The mapping of the last code page may have changed.
    #[inline(always)]
    pub fn forget_page(&mut self) {
        self.page = None;
    }

    /// Forgets every block (tests, INIT).
    pub fn clear(&mut self) {
        self.generation += 1;
        self.slots.iter_mut().for_each(|s| *s = (u64::MAX, None));
    }
}
