//! `lock`-prefixed read-modify-write, atomic with respect to other vCPU
//! threads: host atomics on aligned RAM, a VM-wide lock for split or
//! unaligned locked accesses (and MMIO, which is serialised anyway).

use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use super::PAGE_MASK;
use super::access::Target;
use super::paging::Access;
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::width::Width;

/// Compare-and-swap of `n` bytes at `p`; returns the value found.
///
/// # Safety
/// `p` must be `n`-aligned and inside guest RAM.
unsafe fn cas(p: *mut u8, n: usize, old: u64, new: u64) -> u64 {
    // SAFETY: alignment and validity are the caller's guarantee.
    unsafe {
        match n {
            1 => match (*AtomicU8::from_ptr(p)).compare_exchange(
                old as u8,
                new as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(v) | Err(v) => u64::from(v),
            },
            2 => match (*AtomicU16::from_ptr(p.cast())).compare_exchange(
                old as u16,
                new as u16,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(v) | Err(v) => u64::from(v),
            },
            4 => match (*AtomicU32::from_ptr(p.cast())).compare_exchange(
                old as u32,
                new as u32,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(v) | Err(v) => u64::from(v),
            },
            _ => match (*AtomicU64::from_ptr(p.cast())).compare_exchange(
                old,
                new,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(v) | Err(v) => v,
            },
        }
    }
}

/// 16-byte compare-and-swap; returns the value found.
///
/// # Safety
/// `p` must be 16-aligned and inside guest RAM.
unsafe fn cas128(p: *mut u128, old: u128, new: u128) -> u128 {
    let (mut lo, mut hi) = (old as u64, (old >> 64) as u64);
    // SAFETY: the caller guarantees alignment and validity; every x86-64
    // host this runs on has cmpxchg16b (checked at VM creation). RBX is
    // reserved by LLVM, so the new low half goes through a scratch register;
    // both operands get fixed registers, or the allocator may pick RBX for
    // one of them (it did, for `p`, which the xchg then overwrote).
    unsafe {
        std::arch::asm!(
            "xchg rsi, rbx",
            "lock cmpxchg16b xmmword ptr [rdi]",
            "mov rbx, rsi",
            in("rdi") p,
            inout("rsi") new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    u128::from(lo) | (u128::from(hi) << 64)
}

impl Cpu {
    /// Host pointer for a locked access of `n` bytes at `lin`, if it is RAM
    /// within one page; stales cached code on the page first.
    fn locked_ptr(&mut self, lin: u64, n: usize) -> Res<Option<*mut u8>> {
        if (lin & 0xfff) as usize + n > 0x1000 {
            self.probe_write(lin, n)?;
            return Ok(None);
        }
        let e = self.tlb.entry(lin);
        if e.tag_w == lin & PAGE_MASK {
            return Ok(Some(e.addend.wrapping_add(lin) as *mut u8));
        }
        let target = self.translate(lin, Access::Write)?;
        if self.debug.watching {
            // The whole operand, not just its first byte (`translate`).
            crate::debug::wrote(self, lin, n);
        }
        match target {
            Target::Ram(loc) => {
                if self.vm.code.is_code(loc.frame) {
                    self.vm.code.invalidate(loc.frame);
                    self.stop = true;
                }
                Ok(Some(loc.host))
            }
            Target::Mmio(_) => Ok(None),
        }
    }

    /// Locked read-modify-write of `W` at `lin`: `f(old)` gives the new
    /// value. Returns the old value.
    pub fn locked_rmw<W: Width>(&mut self, lin: u64, mut f: impl FnMut(u64) -> u64) -> Res<u64> {
        if let Some(p) = self.locked_ptr(lin, W::BYTES)?
            && (p as usize).is_multiple_of(W::BYTES)
        {
            // SAFETY: p is inside guest RAM, within one page, aligned.
            let mut old = unsafe { super::access::host_load(p, W::BYTES) };
            loop {
                let new = f(old) & W::MASK;
                // SAFETY: as above.
                let seen = unsafe { cas(p, W::BYTES, old, new) };
                if seen == old {
                    if let Some(log) = self.undo.as_mut() {
                        log.push((p as usize, old, W::BYTES as u8));
                    }
                    return Ok(old);
                }
                old = seen;
            }
        }
        let vm = self.vm.clone();
        let _guard = vm.split_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.read_lin::<W>(lin)?;
        self.write_lin::<W>(lin, f(old) & W::MASK)?;
        Ok(old)
    }

    /// Locked 16-byte compare-exchange (cmpxchg16b); returns the old value.
    pub fn locked_cmpxchg16(&mut self, lin: u64, expected: u128, new: u128) -> Res<u128> {
        if let Some(p) = self.locked_ptr(lin, 16)?
            && (p as usize).is_multiple_of(16)
        {
            // SAFETY: aligned, one page of guest RAM; cmpxchg16b is part of
            // the host baseline we require.
            let old = unsafe { cas128(p.cast(), expected, new) };
            if old == expected
                && let Some(log) = self.undo.as_mut()
            {
                log.push((p as usize, old as u64, 8));
                log.push((p as usize + 8, (old >> 64) as u64, 8));
            }
            return Ok(old);
        }
        let vm = self.vm.clone();
        let _guard = vm.split_lock.lock().unwrap_or_else(|e| e.into_inner());
        let lo = self.read_lin::<crate::cpu::width::W64>(lin)?;
        let hi = self.read_lin::<crate::cpu::width::W64>(lin.wrapping_add(8))?;
        let old = u128::from(lo) | (u128::from(hi) << 64);
        let store = if old == expected { new } else { old };
        self.write_lin::<crate::cpu::width::W64>(lin, store as u64)?;
        self.write_lin::<crate::cpu::width::W64>(lin.wrapping_add(8), (store >> 64) as u64)?;
        Ok(old)
    }
}
