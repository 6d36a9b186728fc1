//! Runs a benchmark loop natively: its code copied into an executable
//! mapping and called in-process, the third column of `emu-loops`.

use crate::BenchError;
use crate::kernels::{self, DATA_SIZE, LoopKind};
use std::time::{Duration, Instant};

/// The SysV ABI every loop follows (see `kernels`).
type LoopFn = unsafe extern "sysv64" fn(*mut u8, u64) -> u64;

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Self, BenchError> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BenchError::Host("mmap", std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows it now.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One loop, assembled at its own executable address, with its data area.
pub struct NativeLoop {
    code: Mapping,
    data: Mapping,
    pub insns_per_iter: u64,
}

impl NativeLoop {
    pub fn new(kind: LoopKind) -> Result<Self, BenchError> {
        let code_len = 1 << 16;
        let code = Mapping::new(code_len)?;
        let asm = kernels::assemble(kind, code.ptr as u64)?;
        if asm.code.len() > code_len {
            return Err(BenchError::Guest(format!(
                "{} loop is {} bytes, more than {code_len}",
                kind.name(),
                asm.code.len()
            )));
        }
        // SAFETY: the mapping is `code_len` bytes, writable, and not yet executable.
        unsafe { std::ptr::copy_nonoverlapping(asm.code.as_ptr(), code.ptr, asm.code.len()) };
        // Never writable and executable at once.
        // SAFETY: changes protection of our own mapping only.
        if unsafe { libc::mprotect(code.ptr.cast(), code_len, libc::PROT_READ | libc::PROT_EXEC) }
            != 0
        {
            return Err(BenchError::Host(
                "mprotect",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(NativeLoop {
            code,
            data: Mapping::new(DATA_SIZE as usize)?,
            insns_per_iter: asm.insns_per_iter,
        })
    }

    /// The code's address range, for tests that watch it execute.
    #[cfg(test)]
    pub fn code_range(&self) -> std::ops::Range<usize> {
        self.code.ptr as usize..self.code.ptr as usize + self.code.len
    }

    /// Runs `n` iterations on freshly zeroed data, as a guest would see it,
    /// and returns the checksum and the time the call took.
    pub fn run(&mut self, n: u64) -> (u64, Duration) {
        assert!(n >= 1, "loops run at least once");
        // SAFETY: the data mapping is DATA_SIZE writable bytes owned by self.
        unsafe { std::ptr::write_bytes(self.data.ptr, 0, self.data.len) };
        // SAFETY: the code mapping holds a complete function assembled for
        // this address following `LoopFn`'s ABI (caller-saved registers only,
        // balanced stack); `data` is the DATA_SIZE area it expects.
        let f: LoopFn = unsafe { std::mem::transmute::<*mut u8, LoopFn>(self.code.ptr) };
        let t = Instant::now();
        // SAFETY: see above; `n` ≥ 1 as the loops require.
        let sum = unsafe { f(self.data.ptr, n) };
        (sum, t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[test]
    fn checksums_depend_on_the_iteration_count_and_repeat() {
        for kind in LoopKind::ALL {
            let mut l = NativeLoop::new(kind).unwrap();
            let (a, _) = l.run(100);
            let (b, _) = l.run(100);
            let (c, _) = l.run(101);
            assert_eq!(a, b, "{kind:?} is deterministic");
            assert_ne!(a, c, "{kind:?} depends on n");
        }
    }

    static STEPS: AtomicU64 = AtomicU64::new(0);
    static CODE_START: AtomicUsize = AtomicUsize::new(0);
    static CODE_END: AtomicUsize = AtomicUsize::new(0);

    /// Counts single-step traps that land inside the loop's code; once
    /// execution leaves it (the `ret`), clears TF.
    extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
        let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
        let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
        let range = CODE_START.load(Ordering::Relaxed)..CODE_END.load(Ordering::Relaxed);
        // The trap after `call` lands on the first instruction, each later
        // one after an instruction of the loop, the last after `ret`: so
        // traps inside the range = instructions executed, `ret` included.
        if range.contains(&rip) {
            STEPS.fetch_add(1, Ordering::Relaxed);
        } else {
            uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !0x100;
        }
    }

    /// Executes the loop under the trap flag and counts its instructions.
    fn count_instructions(l: &mut NativeLoop, n: u64) -> u64 {
        let range = l.code_range();
        CODE_START.store(range.start, Ordering::Relaxed);
        CODE_END.store(range.end, Ordering::Relaxed);
        STEPS.store(0, Ordering::Relaxed);
        let data = l.data.ptr;
        let f = l.code.ptr;
        // SAFETY: pushf/popf set TF in this thread only; the SIGTRAP
        // handler installed by the caller clears it once the loop returns.
        // The call follows the loop ABI: every caller-saved register is
        // declared clobbered.
        unsafe {
            std::arch::asm!(
                "pushfq",
                "or qword ptr [rsp], 0x100",
                "popfq",
                "call {f}",
                f = in(reg) f,
                in("rdi") data,
                in("rsi") n,
                clobber_abi("sysv64"),
            );
        }
        STEPS.load(Ordering::Relaxed)
    }

    #[test]
    fn single_stepping_confirms_instructions_per_iteration() {
        // SAFETY: installs a SIGTRAP handler for this test process; the
        // handler only touches atomics and the interrupted context.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_trap as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
        }
        for kind in LoopKind::ALL {
            let mut l = NativeLoop::new(kind).unwrap();
            let one = count_instructions(&mut l, 3);
            let two = count_instructions(&mut l, 6);
            assert!(one > 0, "{kind:?}: single-stepping saw nothing");
            assert_eq!(two - one, 3 * l.insns_per_iter, "{kind:?}");
        }
    }
}
