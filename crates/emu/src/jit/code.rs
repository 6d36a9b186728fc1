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
}

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
        Ok(CodeArena {
            base,
            size,
            used: 0,
            kept: 0,
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
