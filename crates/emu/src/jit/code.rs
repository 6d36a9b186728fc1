//! Executable memory for translated blocks, and the call into it: the
//! translation tier's only unsafe boundary.
//!
//! One arena per vCPU (each vCPU thread owns its block cache): only that
//! vCPU runs and patches this code. Its background compiler thread, if it
//! has one, appends new blocks under the same mutex the vCPU patches
//! under; appended bytes are never run before the vCPU installs them,
//! after the hand-over through a channel. Blocks are appended and never
//! freed one by one: when the arena is full the vCPU forgets every block
//! ([`CodeArena::reset`]) and starts over, which is safe because code only
//! runs from `enter`, never while the arena is being reset (the vCPU
//! resets it, between runs).

use std::ptr::NonNull;

use crate::cpu::Cpu;

/// The signature of `Thunks::enter`: SysV ABI, the vCPU context and the
/// head of the block to run; an exit code back (see `jit::helpers`).
type Enter = unsafe extern "C" fn(*mut Cpu, u64) -> u64;

pub struct CodeArena {
    base: NonNull<u8>,
    size: usize,
    used: usize,
    /// What `reset` keeps (the shared thunks).
    kept: usize,
    /// How much of the mapping has been populated ahead of the code.
    populated: usize,
}

/// How far ahead of the code the arena's pages are populated, in one
/// `madvise` each time the code reaches them: a page fault per 4 KiB
/// (one every ~4 translations) was ~8% of a translation.
const POPULATE_AHEAD: usize = 256 << 10;

// SAFETY: the arena is a private anonymous mapping owned by one vCPU; the
// only other thread that touches it is that vCPU's compiler, through the
// vCPU's mutex (see the module comment).
unsafe impl Send for CodeArena {}

impl CodeArena {
    /// Maps `size` bytes readable, writable and executable, in ordinary
    /// pages. Not transparent huge pages: a huge page's first touch zeroes
    /// 2 MiB in one fault, and where the host is itself a VM with lazily
    /// backed memory (a Firecracker microVM, as CI's machines) that fault
    /// stalled the vCPU 5-30 ms, in the middle of a translation, about
    /// once per 2 MiB of code; the busybox workloads ran as fast without
    /// them (BENCHMARKS.md).
    pub fn new(size: usize) -> std::io::Result<CodeArena> {
        let size = size.next_multiple_of(4096);
        // SAFETY: an anonymous private mapping at an address the kernel
        // picks; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        // Ordinary pages even where the host's THP setting is `always`.
        // SAFETY: advice on exactly the mapping just made.
        let _ = unsafe { libc::madvise(p, size, libc::MADV_NOHUGEPAGE) };
        Ok(CodeArena {
            base,
            size,
            used: 0,
            kept: 0,
            populated: 0,
        })
    }

    /// Where the next block will be placed (code is assembled for it).
    pub fn next_addr(&self) -> u64 {
        self.base.as_ptr() as u64 + self.used as u64
    }

    /// Copies `bytes` (assembled for [`next_addr`](Self::next_addr)) in;
    /// `None` when the arena is full.
    pub fn push(&mut self, bytes: &[u8]) -> Option<u64> {
        // 16-byte aligned starts keep block heads in few cache lines.
        let len = bytes.len().next_multiple_of(16);
        if self.used + len > self.size {
            return None;
        }
        if self.used + len > self.populated {
            self.populate(self.used + len);
        }
        let at = self.next_addr();
        // SAFETY: `used + len <= size`, so the destination is inside the
        // mapping, which nothing else references (no code runs during a
        // push: pushes happen on the vCPU thread between blocks).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(self.used),
                bytes.len(),
            )
        };
        self.used += len;
        Some(at)
    }

    /// Makes the pages up to `end` and `POPULATE_AHEAD` past it present
    /// (`MADV_POPULATE_WRITE`, Linux 5.14); where the host lacks it, the
    /// pages fault in one by one as before.
    fn populate(&mut self, end: usize) {
        let from = self.populated;
        let to = (end + POPULATE_AHEAD).next_multiple_of(4096).min(self.size);
        if to <= from {
            return;
        }
        // SAFETY: `from..to` is inside the mapping (page aligned, at most
        // `size`); populating writes nothing the arena holds. An old
        // kernel's EINVAL is not retried: its pages fault in as before.
        let _ = unsafe {
            libc::madvise(
                self.base.as_ptr().add(from).cast(),
                to - from,
                libc::MADV_POPULATE_WRITE,
            )
        };
        self.populated = to;
    }

    /// Writes `value` at `addr` in a block's code: the rel32 of an exit's
    /// `jmp`, the immediate holding its epoch.
    pub fn patch_u32(&mut self, addr: u64, value: u32) {
        let start = self.base.as_ptr() as u64;
        if addr < start || addr + 4 > start + self.used as u64 {
            return;
        }
        // SAFETY: checked inside the used part of the mapping; this vCPU
        // is not executing arena code while it writes (it is in Rust), and
        // no other thread runs this arena's code.
        unsafe { (addr as *mut u8).cast::<u32>().write_unaligned(value) };
    }

    /// Makes what the arena holds now survive resets.
    pub fn keep(&mut self) {
        self.kept = self.used;
    }

    /// Forgets every block: the caller drops all pointers into the arena.
    pub fn reset(&mut self) {
        self.used = self.kept;
    }

    /// Runs the block whose head is `head` through the entry thunk
    /// `enter` until it leaves translated code.
    ///
    /// # Safety
    /// `enter` must be `Thunks::enter` and `head` the head of a block this
    /// arena holds, both assembled by `jit::emit` for this `cpu`'s layout,
    /// and every pointer embedded in the block (its instructions, the
    /// code map) must still be alive.
    pub unsafe fn enter(enter: u64, head: u64, cpu: &mut Cpu) -> u64 {
        // SAFETY: the caller guarantees `enter` is the entry thunk, which
        // follows the SysV ABI of `Enter`.
        let f: Enter = unsafe { std::mem::transmute::<u64, Enter>(enter) };
        // SAFETY: as above; the block reads and writes only `cpu`, guest
        // RAM through TLB host pointers, and calls `jit::helpers`.
        unsafe { f(cpu, head) }
    }
}

impl Drop for CodeArena {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no pointer
        // into it survives the arena (blocks are dropped with the cache).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_land_intact_across_populated_steps_and_a_reset() {
        let mut arena = CodeArena::new(2 << 20).unwrap();
        let block = |k: usize| -> Vec<u8> { (0..700).map(|i| (i * 7 + k) as u8).collect() };
        let mut at = Vec::new();
        // ~1.1 MiB: four populate steps.
        for k in 0..1600 {
            at.push(arena.push(&block(k)).expect("room"));
        }
        for (k, &a) in at.iter().enumerate() {
            // SAFETY: each block was pushed at `a`, inside the mapping.
            let got = unsafe { std::slice::from_raw_parts(a as *const u8, 700) };
            assert_eq!(got, &block(k)[..], "block {k}");
        }
        arena.reset();
        let again = arena.push(&block(9)).unwrap();
        assert_eq!(again, at[0]);
        // Full: refused, and the last push ends inside the mapping.
        let mut last = 0;
        while let Some(a) = arena.push(&[0x90; 16]) {
            last = a;
        }
        assert!(last + 16 <= arena.base.as_ptr() as u64 + arena.size as u64);
        assert!(arena.push(&[0x90; 16]).is_none());
    }
}
