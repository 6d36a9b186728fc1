//! Virtual memory accesses for handlers: segment checks, the TLB fast path
//! through host pointers, and the slow path (page walk, TLB fill, page
//! crossings, self-modifying code, MMIO).

use super::io::{Pending, Posted};
use super::paging::Access;
use super::tlb::TlbEntry;
use super::{PAGE_MASK, RamLoc};
use crate::cpu::fault::{Fault, Res, Stop};
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::cpu::{CR0_WP, Cpu, Mode, RSP, SS, canonical};
use crate::decode::Insn;

/// Where a linear address led.
#[derive(Clone, Copy)]
pub enum Target {
    Ram(RamLoc),
    Mmio(u64),
}

/// No segment: the access is not a reference through SS.
const NO_SEG: usize = usize::MAX;

/// `translate` raises #GP(0) for a non-canonical address; a reference
/// through SS raises #SS(0) instead (SDM: "memory address referencing the
/// SS segment is in a non-canonical form"). Only the error path pays.
#[inline(always)]
pub fn via_seg<T>(seg: usize, r: Res<T>) -> Res<T> {
    match r {
        Err(e) if seg == SS => Err(stack_fault(e)),
        r => r,
    }
}

#[cold]
fn stack_fault(e: Stop) -> Stop {
    if e == Fault::gp(0) { Fault::ss(0) } else { e }
}

/// Loads `n` bytes (1, 2, 4, 8) from a host pointer.
///
/// # Safety
/// `p..p+n` must be inside guest RAM.
#[inline(always)]
pub unsafe fn host_load(p: *const u8, n: usize) -> u64 {
    // SAFETY: the caller guarantees the range is in mapped guest RAM.
    unsafe {
        match n {
            1 => u64::from(p.read()),
            2 => u64::from(p.cast::<u16>().read_unaligned()),
            4 => u64::from(p.cast::<u32>().read_unaligned()),
            _ => p.cast::<u64>().read_unaligned(),
        }
    }
}

/// Stores the low `n` bytes of `v` to a host pointer.
///
/// # Safety
/// `p..p+n` must be inside guest RAM.
#[inline(always)]
pub unsafe fn host_store(p: *mut u8, n: usize, v: u64) {
    // SAFETY: the caller guarantees the range is in mapped guest RAM.
    unsafe {
        match n {
            1 => p.write(v as u8),
            2 => p.cast::<u16>().write_unaligned(v as u16),
            4 => p.cast::<u32>().write_unaligned(v as u32),
            _ => p.cast::<u64>().write_unaligned(v),
        }
    }
}

impl Cpu {
    /// Effective address (offset) of the memory operand.
    #[inline(always)]
    pub fn ea(&self, i: &Insn) -> u64 {
        self.gpr[usize::from(i.base)]
            .wrapping_add(self.gpr[usize::from(i.index)] << i.scale)
            .wrapping_add(i.disp)
            & i.amask
    }

    #[cold]
    fn seg_fault(seg: usize) -> Stop {
        if seg == SS {
            Fault::ss(0)
        } else {
            Fault::gp(0)
        }
    }

    /// Linear address for reading `n` bytes at `seg:off` (limit/type checked).
    #[inline(always)]
    pub fn lin_r(&self, seg: usize, off: u64, n: usize) -> Res<u64> {
        let s = &self.seg[seg];
        let end = off.wrapping_add(n as u64 - 1);
        if off < s.rlo || end > s.rhi {
            return Err(Self::seg_fault(seg));
        }
        Ok(s.base.wrapping_add(off) & self.lin_mask)
    }

    /// Linear address for writing `n` bytes at `seg:off`.
    #[inline(always)]
    pub fn lin_w(&self, seg: usize, off: u64, n: usize) -> Res<u64> {
        let s = &self.seg[seg];
        let end = off.wrapping_add(n as u64 - 1);
        if off < s.wlo || end > s.whi {
            return Err(Self::seg_fault(seg));
        }
        Ok(s.base.wrapping_add(off) & self.lin_mask)
    }

    #[inline(always)]
    pub fn read_lin<W: Width>(&mut self, lin: u64) -> Res<u64> {
        self.read_lin_seg::<W>(NO_SEG, lin)
    }

    /// [`Cpu::read_lin`] of a reference through segment `seg`: the same
    /// TLB hit; a miss knows the segment for #SS vs #GP.
    #[inline(always)]
    pub fn read_lin_seg<W: Width>(&mut self, seg: usize, lin: u64) -> Res<u64> {
        let e: &TlbEntry = self.tlb.entry(lin);
        if e.tag_r == lin & PAGE_MASK && (lin & 0xfff) as usize <= 0x1000 - W::BYTES {
            // SAFETY: a read tag is only installed for RAM pages, and the
            // access stays inside the page.
            return Ok(unsafe { host_load(e.addend.wrapping_add(lin) as *const u8, W::BYTES) });
        }
        self.read_miss(seg, lin, W::BYTES)
    }

    #[cold]
    #[inline(never)]
    fn read_miss(&mut self, seg: usize, lin: u64, n: usize) -> Res<u64> {
        via_seg(seg, self.read_slow(lin, n, Access::Read))
    }

    #[inline(always)]
    pub fn write_lin<W: Width>(&mut self, lin: u64, v: u64) -> Res {
        self.write_lin_seg::<W>(NO_SEG, lin, v)
    }

    /// [`Cpu::write_lin`] of a reference through segment `seg`.
    #[inline(always)]
    pub fn write_lin_seg<W: Width>(&mut self, seg: usize, lin: u64, v: u64) -> Res {
        let e: &TlbEntry = self.tlb.entry(lin);
        if e.tag_w == lin & PAGE_MASK && (lin & 0xfff) as usize <= 0x1000 - W::BYTES {
            let p = e.addend.wrapping_add(lin) as *mut u8;
            if self.undo.is_some() {
                self.log_undo(p, W::BYTES);
            }
            // SAFETY: a write tag is only installed for RAM pages without
            // cached code, and the access stays inside the page.
            unsafe { host_store(p, W::BYTES, v) };
            return Ok(());
        }
        self.write_miss(seg, lin, W::BYTES, v)
    }

    #[cold]
    #[inline(never)]
    fn write_miss(&mut self, seg: usize, lin: u64, n: usize, v: u64) -> Res {
        via_seg(seg, self.write_slow(lin, n, v))
    }

    /// Read-modify-write of `W` at `lin` (not atomic): one TLB lookup when
    /// the page is writable (a write tag implies read permission).
    #[inline(always)]
    pub fn rmw_lin<W: Width>(&mut self, lin: u64, f: impl FnMut(u64) -> u64) -> Res<u64> {
        self.rmw_lin_seg::<W>(NO_SEG, lin, f)
    }

    /// [`Cpu::rmw_lin`] of a reference through segment `seg`.
    #[inline(always)]
    pub fn rmw_lin_seg<W: Width>(
        &mut self,
        seg: usize,
        lin: u64,
        mut f: impl FnMut(u64) -> u64,
    ) -> Res<u64> {
        let e: &TlbEntry = self.tlb.entry(lin);
        if e.tag_w == lin & PAGE_MASK && (lin & 0xfff) as usize <= 0x1000 - W::BYTES {
            let p = e.addend.wrapping_add(lin) as *mut u8;
            // SAFETY: a write tag is only installed for RAM pages without
            // cached code, and the access stays inside the page.
            let old = unsafe { host_load(p, W::BYTES) };
            if self.undo.is_some() {
                self.log_undo(p, W::BYTES);
            }
            // SAFETY: as above.
            unsafe { host_store(p, W::BYTES, f(old) & W::MASK) };
            return Ok(old);
        }
        let old = self.read_lin_seg::<W>(seg, lin)?;
        self.write_lin_seg::<W>(seg, lin, f(old) & W::MASK)?;
        Ok(old)
    }

    /// Reads the memory operand.
    #[inline(always)]
    pub fn read_mem<W: Width>(&mut self, i: &Insn) -> Res<u64> {
        let seg = usize::from(i.seg);
        let lin = self.lin_r(seg, self.ea(i), W::BYTES)?;
        self.read_lin_seg::<W>(seg, lin)
    }

    /// Writes the memory operand.
    #[inline(always)]
    pub fn write_mem<W: Width>(&mut self, i: &Insn, v: u64) -> Res {
        let seg = usize::from(i.seg);
        let lin = self.lin_w(seg, self.ea(i), W::BYTES)?;
        self.write_lin_seg::<W>(seg, lin, v)
    }

    #[inline(always)]
    pub fn read_virt<W: Width>(&mut self, seg: usize, off: u64) -> Res<u64> {
        let lin = self.lin_r(seg, off, W::BYTES)?;
        self.read_lin_seg::<W>(seg, lin)
    }

    #[inline(always)]
    pub fn write_virt<W: Width>(&mut self, seg: usize, off: u64, v: u64) -> Res {
        let lin = self.lin_w(seg, off, W::BYTES)?;
        self.write_lin_seg::<W>(seg, lin, v)
    }

    /// Reads `buf.len()` bytes at `seg:off` (m80, m128, FXSAVE images).
    pub fn read_bytes(&mut self, seg: usize, off: u64, buf: &mut [u8]) -> Res {
        if buf.is_empty() {
            return Ok(());
        }
        let lin = self.lin_r(seg, off, buf.len())?;
        for (k, b) in buf.iter_mut().enumerate() {
            *b = self.read_lin_seg::<W8>(seg, lin.wrapping_add(k as u64) & self.lin_mask)? as u8;
        }
        Ok(())
    }

    /// Writes `buf` at `seg:off`, checking every page before the first byte.
    pub fn write_bytes(&mut self, seg: usize, off: u64, buf: &[u8]) -> Res {
        if buf.is_empty() {
            return Ok(());
        }
        let lin = self.lin_w(seg, off, buf.len())?;
        via_seg(seg, self.probe_write(lin, buf.len()))?;
        for (k, &b) in buf.iter().enumerate() {
            self.write_lin::<W8>(lin.wrapping_add(k as u64) & self.lin_mask, u64::from(b))?;
        }
        Ok(())
    }

    /// Faults now if any page of `lin..lin+n` is not writable.
    pub fn probe_write(&mut self, lin: u64, n: usize) -> Res {
        let mut page = lin & PAGE_MASK;
        let last = lin.wrapping_add(n as u64 - 1) & self.lin_mask & PAGE_MASK;
        loop {
            let probe = if page == lin & PAGE_MASK { lin } else { page };
            if self.tlb.entry(probe).tag_w != page {
                self.translate(probe, Access::Write)?;
            }
            if page == last {
                return Ok(());
            }
            page = page.wrapping_add(0x1000) & self.lin_mask;
        }
    }

    /// Supervisor-mode (implicit) read, e.g. of a descriptor table.
    pub fn read_sys<W: Width>(&mut self, lin: u64) -> Res<u64> {
        let saved = self.tlb.cur;
        self.tlb.cur = 0;
        let r = self.read_lin::<W>(lin & self.lin_mask);
        self.tlb.cur = saved;
        r
    }

    /// Supervisor-mode (implicit) write (descriptor busy/accessed bits, TSS).
    pub fn write_sys<W: Width>(&mut self, lin: u64, v: u64) -> Res {
        let saved = self.tlb.cur;
        self.tlb.cur = 0;
        let r = self.write_lin::<W>(lin & self.lin_mask, v);
        self.tlb.cur = saved;
        r
    }

    /// Pushes `W` bytes on the stack.
    #[inline(always)]
    pub fn push<W: Width>(&mut self, v: u64) -> Res {
        let rsp = self.gpr[RSP];
        let new = rsp.wrapping_sub(W::BYTES as u64) & self.sp_mask;
        self.write_virt::<W>(SS, new, v)?;
        self.gpr[RSP] = (rsp & !self.sp_mask) | new;
        Ok(())
    }

    /// Pops `W` bytes off the stack.
    #[inline(always)]
    pub fn pop<W: Width>(&mut self) -> Res<u64> {
        let rsp = self.gpr[RSP];
        let off = rsp & self.sp_mask;
        let v = self.read_virt::<W>(SS, off)?;
        self.gpr[RSP] = (rsp & !self.sp_mask) | (off.wrapping_add(W::BYTES as u64) & self.sp_mask);
        Ok(v)
    }

    /// Reads at the stack pointer + `delta` without moving it.
    pub fn peek<W: Width>(&mut self, delta: u64) -> Res<u64> {
        let off = self.gpr[RSP].wrapping_add(delta) & self.sp_mask;
        self.read_virt::<W>(SS, off)
    }

    /// Walks the page tables for `lin` and fills the TLB if it is RAM.
    pub fn translate(&mut self, lin: u64, acc: Access) -> Res<Target> {
        if self.mode == Mode::Long && !canonical(lin) {
            return Err(Fault::gp(0));
        }
        let user = self.tlb.cur == 1;
        if !self.debug.watching {
            let hit = match acc {
                Access::Read => self.tlb.swap_in_victim(lin, |e| e.tag_r),
                Access::Write => self.tlb.swap_in_victim(lin, |e| e.tag_w),
                Access::Exec => self.tlb.swap_in_victim(lin, |e| e.tag_x),
            };
            if let Some(addend) = hit {
                let e = self.tlb.entry(lin);
                return Ok(Target::Ram(RamLoc {
                    host: addend.wrapping_add(lin) as *mut u8,
                    frame: e.frame as usize,
                }));
            }
        }
        let w = self.walk(lin, acc, user)?;
        if self.debug.watching && acc == Access::Write {
            crate::debug::wrote(self, lin, 1);
        }
        let Some(loc) = self.vm.phys.ram(w.pa) else {
            return Ok(Target::Mmio(w.pa | (lin & 0xfff)));
        };
        let page = lin & PAGE_MASK;
        let wp = self.cr0 & CR0_WP != 0;
        // Watched pages keep every data access on the slow path.
        let watched = self.debug.watching && crate::debug::watched_page(self, lin);
        let read_ok = (!user || w.user) && !watched;
        let write_ok = w.dirty
            && if user {
                w.user && w.write
            } else {
                w.write || !wp
            }
            && !self.vm.code.is_code(loc.frame)
            && !watched;
        let exec_ok = !w.nx && (!user || w.user);
        let tag = |ok: bool| if ok { page } else { u64::MAX };
        self.tlb.insert(
            lin,
            TlbEntry {
                tag_r: tag(read_ok),
                tag_w: tag(write_ok),
                tag_x: tag(exec_ok),
                addend: (loc.host as u64).wrapping_sub(page),
                frame: loc.frame as u32,
                global: w.global,
                shift: w.shift,
            },
        );
        Ok(Target::Ram(RamLoc {
            // SAFETY: the offset stays inside the 4 KiB page `ram` found.
            host: unsafe { loc.host.add((lin & 0xfff) as usize) },
            frame: loc.frame,
        }))
    }

    /// Instruction fetch translation: host pointer and frame of `lin`.
    #[inline]
    pub fn fetch_target(&mut self, lin: u64) -> Res<Target> {
        let e = self.tlb.entry(lin);
        if e.tag_x == lin & PAGE_MASK {
            let (host, frame, global) = (e.addend.wrapping_add(lin), e.frame, e.global);
            self.tlb.note_code_page(lin, global);
            return Ok(Target::Ram(RamLoc {
                host: host as *mut u8,
                frame: frame as usize,
            }));
        }
        let t = self.translate(lin, Access::Exec)?;
        let global = self.tlb.entry(lin).global;
        self.tlb.note_code_page(lin, global);
        Ok(t)
    }

    /// The code epoch of `lin`'s mapping, right after `fetch_target`.
    pub fn fetch_epoch(&self, lin: u64) -> u32 {
        self.tlb.code_epoch(self.tlb.entry(lin).global)
    }

    #[cold]
    #[inline(never)]
    pub fn read_slow(&mut self, lin: u64, n: usize, acc: Access) -> Res<u64> {
        let v = self.read_slow_inner(lin, n, acc)?;
        if self.debug.watching {
            crate::debug::read(self, lin, n);
        }
        Ok(v)
    }

    #[inline(always)]
    fn read_slow_inner(&mut self, lin: u64, n: usize, acc: Access) -> Res<u64> {
        if (lin & 0xfff) as usize + n > 0x1000 {
            let mut v = 0u64;
            for k in 0..n {
                let a = lin.wrapping_add(k as u64) & self.lin_mask;
                let b = match self.translate(a, acc)? {
                    // SAFETY: one byte inside the RAM page just translated.
                    Target::Ram(loc) => u64::from(unsafe { loc.host.read() }),
                    Target::Mmio(pa) => self.mmio_read(pa, 1)?,
                };
                v |= b << (8 * k);
            }
            return Ok(v);
        }
        match self.translate(lin, acc)? {
            // SAFETY: inside one RAM page (checked above).
            Target::Ram(loc) => Ok(unsafe { host_load(loc.host, n) }),
            Target::Mmio(pa) => self.mmio_read(pa, n),
        }
    }

    #[cold]
    #[inline(never)]
    pub fn write_slow(&mut self, lin: u64, n: usize, v: u64) -> Res {
        if (lin & 0xfff) as usize + n > 0x1000 {
            // Check both pages before writing anything: faults are precise.
            self.probe_write(lin, n)?;
            for k in 0..n {
                let a = lin.wrapping_add(k as u64) & self.lin_mask;
                self.write_one(a, 1, v >> (8 * k))?;
            }
            return Ok(());
        }
        self.write_one(lin, n, v)
    }

    fn write_one(&mut self, lin: u64, n: usize, v: u64) -> Res {
        let target = self.translate(lin, Access::Write)?;
        if self.debug.watching {
            crate::debug::wrote(self, lin, n);
        }
        match target {
            Target::Ram(loc) => {
                if self.vm.code.is_code(loc.frame) {
                    self.code_written(loc.frame, lin);
                }
                if self.undo.is_some() {
                    self.log_undo(loc.host, n);
                }
                // SAFETY: inside one RAM page (callers split crossings).
                unsafe { host_store(loc.host, n, v) };
                Ok(())
            }
            Target::Mmio(pa) => self.mmio_write(pa, n, v),
        }
    }

    /// Co-simulation: remembers the bytes a store is about to replace.
    #[cold]
    fn log_undo(&mut self, p: *const u8, n: usize) {
        // SAFETY: callers pass a RAM host pointer with `n` bytes inside
        // one page, just checked for the store that follows.
        let old = unsafe { host_load(p, n) };
        if let Some(log) = self.undo.as_mut() {
            log.push((p as usize, old, n as u8));
        }
    }

    /// A write hit a frame holding cached code: stale its blocks, and stop
    /// the current block in case it was one of them.
    #[cold]
    fn code_written(&mut self, frame: usize, lin: u64) {
        self.vm.code.invalidate(frame);
        self.stop = true;
        // The page may be written fast again until code is cached from it.
        let _ = self.translate(lin, Access::Write);
    }

    /// A physical read outside RAM: platform devices, else the machine.
    pub fn mmio_read(&mut self, pa: u64, n: usize) -> Res<u64> {
        self.device_accesses += 1;
        if let Some(v) = self.vm.platform.mmio_read(self.id, pa, n) {
            return Ok(v);
        }
        let v = self.io.read(Pending::MmioRead { addr: pa, len: n })?;
        // The answer was used: end the block so the log is retired.
        self.stop = true;
        Ok(v)
    }

    /// A physical write outside RAM.
    pub fn mmio_write(&mut self, pa: u64, n: usize, v: u64) -> Res {
        self.device_accesses += 1;
        if self.vm.platform.mmio_write(self.id, pa, n, v) {
            return Ok(());
        }
        self.io.write(Posted::Mmio {
            addr: pa,
            data: v.to_le_bytes(),
            len: n,
        });
        self.stop = true;
        Ok(())
    }

    /// Convenience readers of RAM-or-MMIO physical memory (descriptor
    /// tables live in linear space; this is for page-table-like users).
    pub fn read_phys_u64(&self, pa: u64) -> u64 {
        self.vm.phys.read_u64(pa).unwrap_or(u64::MAX)
    }
}

/// Readers by size used where the width is only known at run time.
impl Cpu {
    pub fn read_virt_n(&mut self, seg: usize, off: u64, n: usize) -> Res<u64> {
        match n {
            1 => self.read_virt::<W8>(seg, off),
            2 => self.read_virt::<W16>(seg, off),
            4 => self.read_virt::<W32>(seg, off),
            _ => self.read_virt::<W64>(seg, off),
        }
    }
    pub fn write_virt_n(&mut self, seg: usize, off: u64, n: usize, v: u64) -> Res {
        match n {
            1 => self.write_virt::<W8>(seg, off, v),
            2 => self.write_virt::<W16>(seg, off, v),
            4 => self.write_virt::<W32>(seg, off, v),
            _ => self.write_virt::<W64>(seg, off, v),
        }
    }
}
