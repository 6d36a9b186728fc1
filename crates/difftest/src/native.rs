//! Runs cases on the host CPU, in one long-lived child process.
//!
//! The child maps the code, data and stack pages at the fixed addresses of
//! [`crate::layout`], loads a case's registers with a small assembly
//! trampoline and jumps to its code, which ends in `int3`. Every way a case
//! can end (the `int3`, or a fault) arrives as a signal; the handler copies
//! the interrupted context (GPRs, RIP, RFLAGS, the hardware vector in
//! `trapno`, CR2, the FXSAVE image) into memory shared with the parent and
//! rewrites the context so `sigreturn` lands back in the trampoline.
//!
//! Cases travel in batches through a `MAP_SHARED` area created before the
//! fork; two pipes carry "run N slots" and "done". The child never
//! allocates: it is forked from a multi-threaded test process.

use crate::error::{Error, Result};
use crate::layout::{CODE_ADDR, CODE_SIZE, DATA_ADDR, DATA_SIZE, STACK_ADDR, STACK_SIZE};
use crate::state::{FXSAVE_SIZE, InitialState, Observed, Outcome, fpu_from_fxsave, fpu_to_fxsave};
use std::cell::UnsafeCell;
use std::io;
use std::mem::{offset_of, size_of};
use std::ptr;
use std::time::Duration;

/// The longest code a case may have (the rest of the page is `int3`).
pub const MAX_CODE: usize = 1024;

/// One case's inputs and outputs in the shared area.
#[repr(C)]
struct Slot {
    fx_in: [u8; FXSAVE_SIZE],
    fx_out: [u8; FXSAVE_SIZE],
    gpr_in: [u64; 16],
    gpr_out: [u64; 16],
    rflags_in: u64,
    code_len: u64,
    /// Set by the signal handler: the signal and the context's fields.
    recorded: u64,
    signo: u64,
    trapno: u64,
    cr2: u64,
    rip: u64,
    rflags: u64,
    /// XSTATE_BV of the signal frame (all ones when it had no XSAVE header).
    xstate_bv: u64,
    code: [u8; MAX_CODE],
    data_in: [u8; DATA_SIZE],
    data_out: [u8; DATA_SIZE],
    stack_in: [u8; STACK_SIZE],
    stack_out: [u8; STACK_SIZE],
}

/// What the trampoline reads and the signal handler writes, in the child.
#[repr(C, align(64))]
struct Ctx {
    fx_in: [u8; FXSAVE_SIZE],
    gpr_in: [u64; 16],
    rflags_in: u64,
    entry: u64,
    saved_rsp: u64,
    resume: u64,
    /// The slot being run; null outside a case (a signal then is the
    /// runner's own bug and kills the child).
    slot: *mut Slot,
    /// A clean FXSAVE image the handler puts back for the runner.
    fx_clean: [u8; FXSAVE_SIZE],
}

struct CtxCell(UnsafeCell<Ctx>);
// SAFETY: only the single-threaded child touches CTX (the trampoline and
// its signal handler, which never run at the same time).
unsafe impl Sync for CtxCell {}

static CTX: CtxCell = CtxCell(UnsafeCell::new(Ctx {
    fx_in: [0; FXSAVE_SIZE],
    gpr_in: [0; 16],
    rflags_in: 0,
    entry: 0,
    saved_rsp: 0,
    resume: 0,
    slot: ptr::null_mut(),
    fx_clean: [0; FXSAVE_SIZE],
}));

const OFF_GPR: usize = offset_of!(Ctx, gpr_in);
const OFF_RFLAGS: usize = offset_of!(Ctx, rflags_in);
const OFF_ENTRY: usize = offset_of!(Ctx, entry);
const OFF_SAVED_RSP: usize = offset_of!(Ctx, saved_rsp);
const OFF_RESUME: usize = offset_of!(Ctx, resume);
const _: () = assert!(offset_of!(Ctx, fx_in) == 0);

/// Loads the case in CTX and jumps to it; "returns" when the signal
/// handler resumes at label 2 with the saved RSP.
#[unsafe(naked)]
unsafe extern "sysv64" fn enter_case() {
    core::arch::naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "lea rax, [rip + 2f]",
        "mov [rip + {ctx} + {resume}], rax",
        "mov [rip + {ctx} + {saved_rsp}], rsp",
        "fxrstor64 [rip + {ctx}]",
        "push qword ptr [rip + {ctx} + {rflags}]",
        "popfq",
        "mov rax, [rip + {ctx} + {gpr} + 0]",
        "mov rcx, [rip + {ctx} + {gpr} + 8]",
        "mov rdx, [rip + {ctx} + {gpr} + 16]",
        "mov rbx, [rip + {ctx} + {gpr} + 24]",
        "mov rbp, [rip + {ctx} + {gpr} + 40]",
        "mov rsi, [rip + {ctx} + {gpr} + 48]",
        "mov rdi, [rip + {ctx} + {gpr} + 56]",
        "mov r8, [rip + {ctx} + {gpr} + 64]",
        "mov r9, [rip + {ctx} + {gpr} + 72]",
        "mov r10, [rip + {ctx} + {gpr} + 80]",
        "mov r11, [rip + {ctx} + {gpr} + 88]",
        "mov r12, [rip + {ctx} + {gpr} + 96]",
        "mov r13, [rip + {ctx} + {gpr} + 104]",
        "mov r14, [rip + {ctx} + {gpr} + 112]",
        "mov r15, [rip + {ctx} + {gpr} + 120]",
        "mov rsp, [rip + {ctx} + {gpr} + 32]",
        "jmp qword ptr [rip + {ctx} + {entry}]",
        "2:",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        ctx = sym CTX,
        gpr = const OFF_GPR,
        rflags = const OFF_RFLAGS,
        entry = const OFF_ENTRY,
        saved_rsp = const OFF_SAVED_RSP,
        resume = const OFF_RESUME,
    )
}

/// ucontext `gregs` index of each GPR in encoding order.
const GREG_OF_GPR: [usize; 16] = [13, 14, 12, 11, 15, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7];
const REG_RIP: usize = 16;
const REG_EFL: usize = 17;
const REG_TRAPNO: usize = 20;
const REG_CR2: usize = 22;
/// Linux marks an XSAVE-format signal frame with this in the FXSAVE
/// image's software-reserved bytes (offset 464).
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;

extern "C" fn on_signal(sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let ctx = CTX.0.get();
    // SAFETY: the child is single-threaded and the trampoline is not
    // running while its signal handler is; `uc` is the kernel's ucontext
    // for this signal and its `fpregs` points at the frame's FPU image
    // (512 bytes, followed by the XSAVE header when magic1 says so).
    unsafe {
        let slot = (*ctx).slot;
        if slot.is_null() {
            // Not in a case: the runner itself faulted. Die of it, so the
            // parent reports the signal.
            libc::signal(sig, libc::SIG_DFL);
            return;
        }
        (*ctx).slot = ptr::null_mut();
        let uc = uc.cast::<libc::ucontext_t>();
        let g = &mut (*uc).uc_mcontext.gregs;
        for (i, &gi) in GREG_OF_GPR.iter().enumerate() {
            (*slot).gpr_out[i] = g[gi] as u64;
        }
        (*slot).rip = g[REG_RIP] as u64;
        (*slot).rflags = g[REG_EFL] as u64;
        (*slot).trapno = g[REG_TRAPNO] as u64;
        (*slot).cr2 = g[REG_CR2] as u64;
        (*slot).signo = sig as u64;
        let fp = (*uc).uc_mcontext.fpregs.cast::<u8>();
        if fp.is_null() {
            (*slot).recorded = 2;
        } else {
            ptr::copy_nonoverlapping(fp, (*slot).fx_out.as_mut_ptr(), FXSAVE_SIZE);
            let magic = ptr::read_unaligned(fp.add(464).cast::<u32>());
            (*slot).xstate_bv = if magic == FP_XSTATE_MAGIC1 {
                ptr::read_unaligned(fp.add(FXSAVE_SIZE).cast::<u64>())
            } else {
                u64::MAX
            };
            // The runner gets a clean x87/SSE state back. Bytes 464.. are
            // the kernel's and stay.
            ptr::copy_nonoverlapping((*ctx).fx_clean.as_ptr(), fp, 464);
            (*slot).recorded = 1;
        }
        g[REG_RIP] = (*ctx).resume as i64;
        g[REG_GREG_RSP] = (*ctx).saved_rsp as i64;
        // DF, TF and AC clear, as the ABI expects in the runner.
        g[REG_EFL] = 0x202;
    }
}
const REG_GREG_RSP: usize = 15;

/// The parent's handle on the child. Dropping it ends the child.
pub struct NativeRunner {
    pid: libc::pid_t,
    cmd: std::fs::File,
    done: std::fs::File,
    shared: *mut Slot,
    slots: usize,
    mxcsr_mask: u32,
    timeout: Duration,
}

// SAFETY: the shared area is only touched through `&mut self`.
unsafe impl Send for NativeRunner {}

fn host_err(op: &'static str) -> Error {
    Error::Host {
        op,
        source: io::Error::last_os_error(),
    }
}

/// The MXCSR bits this CPU accepts (FXRSTOR of any other bit faults).
fn host_mxcsr_mask() -> u32 {
    #[repr(C, align(16))]
    struct Img([u8; FXSAVE_SIZE]);
    let mut img = Img([0; FXSAVE_SIZE]);
    // SAFETY: fxsave64 writes exactly 512 bytes to a 16-byte aligned
    // buffer we own; it changes no register.
    unsafe {
        core::arch::asm!("fxsave64 [{}]", in(reg) img.0.as_mut_ptr(), options(nostack));
    }
    let mask = u32::from_le_bytes([img.0[28], img.0[29], img.0[30], img.0[31]]);
    // Zero means the CPU predates the field: the default mask.
    if mask == 0 { 0xffbf } else { mask }
}

impl NativeRunner {
    /// Forks the child that runs up to `slots` cases per batch. The child
    /// dies with the thread that created it (PR_SET_PDEATHSIG), so use the
    /// runner on that thread.
    pub fn new(slots: usize) -> Result<Self> {
        let slots = slots.max(1);
        let bytes = slots * size_of::<Slot>();
        // SAFETY: a fresh anonymous shared mapping; checked for failure.
        let shared = unsafe {
            libc::mmap(
                ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if shared == libc::MAP_FAILED {
            return Err(host_err("mmap of the native runner's shared area"));
        }
        let shared = shared.cast::<Slot>();
        let (cmd_r, cmd_w) = pipe()?;
        let (done_r, done_w) = pipe()?;
        // SAFETY: fork duplicates the process; the child only runs
        // `child_main`, which makes raw syscalls and never allocates, so
        // locks held by the parent's other threads cannot deadlock it.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(host_err("fork of the native runner"));
        }
        if pid == 0 {
            // SAFETY: in the child; the fds and the area are ours.
            unsafe {
                libc::close(cmd_w);
                libc::close(done_r);
                child_main(cmd_r, done_w, shared, slots)
            }
        }
        // SAFETY: the fds are ours and valid; closing the child's ends.
        unsafe {
            libc::close(cmd_r);
            libc::close(done_w);
        }
        use std::os::fd::FromRawFd;
        // SAFETY: each fd is a pipe end this process owns and closes only here.
        let (cmd, done) = unsafe {
            (
                std::fs::File::from_raw_fd(cmd_w),
                std::fs::File::from_raw_fd(done_r),
            )
        };
        let mut runner = NativeRunner {
            pid,
            cmd,
            done,
            shared,
            slots,
            mxcsr_mask: host_mxcsr_mask(),
            timeout: Duration::from_secs(20),
        };
        // The child says it is ready (its fixed mappings worked) with 0.
        let ready = runner.wait_reply(None)?;
        if ready != 0 {
            runner.kill();
            return Err(Error::Native(format!(
                "the child could not set up its fixed mappings (step {ready}: is something \
                 already mapped at {CODE_ADDR:#x}..{:#x}?)",
                STACK_ADDR + STACK_SIZE as u64
            )));
        }
        Ok(runner)
    }

    /// The MXCSR bits the host accepts; a case must stay inside them.
    pub fn mxcsr_mask(&self) -> u32 {
        self.mxcsr_mask
    }

    /// Runs each `(code, state)` on the host. `code` must not include the
    /// end marker (the runner appends `int3`).
    pub fn run(&mut self, cases: &[(&[u8], &InitialState)]) -> Result<Vec<Observed>> {
        let mut out = Vec::with_capacity(cases.len());
        for (batch_no, batch) in cases.chunks(self.slots).enumerate() {
            for (i, (code, state)) in batch.iter().enumerate() {
                self.check_case(code, state)?;
                // SAFETY: i < slots, the area holds `slots` slots, and the
                // child is idle (between batches) so nothing else writes it.
                let slot = unsafe { &mut *self.shared.add(i) };
                slot.code[..code.len()].copy_from_slice(code);
                slot.code_len = code.len() as u64;
                slot.gpr_in = state.gpr;
                slot.rflags_in = state.loaded_rflags();
                slot.fx_in = fpu_to_fxsave(&state.fpu);
                slot.data_in.copy_from_slice(&state.data);
                slot.stack_in.copy_from_slice(&state.stack);
                slot.recorded = 0;
            }
            let n = self
                .wait_reply(Some(batch.len() as u32))
                .map_err(|e| match e {
                    Error::Native(msg) => Error::Native(format!(
                        "{msg} (in batch {batch_no} of up to {} cases)",
                        self.slots
                    )),
                    e => e,
                })?;
            if n as usize != batch.len() {
                return Err(Error::Native(format!(
                    "the child ran {n} cases of {}",
                    batch.len()
                )));
            }
            for (i, (code, _)) in batch.iter().enumerate() {
                // SAFETY: as above; the child is idle again.
                let slot = unsafe { &*self.shared.add(i) };
                out.push(observe(slot, code.len())?);
            }
        }
        Ok(out)
    }

    fn check_case(&self, code: &[u8], state: &InitialState) -> Result<()> {
        if code.len() >= MAX_CODE {
            return Err(Error::BadCase(format!(
                "{} bytes of code, more than {MAX_CODE}",
                code.len()
            )));
        }
        if state.data.len() != DATA_SIZE || state.stack.len() != STACK_SIZE {
            return Err(Error::BadCase(format!(
                "data/stack images of {}/{} bytes, not {DATA_SIZE}/{STACK_SIZE}",
                state.data.len(),
                state.stack.len()
            )));
        }
        if state.fpu.mxcsr & !self.mxcsr_mask != 0 {
            return Err(Error::BadCase(format!(
                "MXCSR {:#x} has bits outside the host's mask {:#x}",
                state.fpu.mxcsr, self.mxcsr_mask
            )));
        }
        Ok(())
    }

    /// Sends `cmd` (if any) and waits for the child's one-word answer.
    fn wait_reply(&mut self, cmd: Option<u32>) -> Result<u32> {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        if let Some(n) = cmd {
            self.cmd
                .write_all(&n.to_le_bytes())
                .map_err(|e| Error::Native(format!("the child is gone ({e}){}", self.reap())))?;
        }
        let mut pfd = libc::pollfd {
            fd: self.done.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = self.timeout.as_millis() as libc::c_int;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(host_err("poll on the native child"));
        }
        if r == 0 {
            self.kill();
            return Err(Error::Native(format!(
                "no answer from the child within {:?}: a case loops or hangs; killed it",
                self.timeout
            )));
        }
        let mut word = [0u8; 4];
        match self.done.read_exact(&mut word) {
            Ok(()) => Ok(u32::from_le_bytes(word)),
            Err(_) => Err(Error::Native(format!(
                "the child died mid-batch{}",
                self.reap()
            ))),
        }
    }

    /// Waits for a dead child and says how it died.
    fn reap(&mut self) -> String {
        if self.pid <= 0 {
            return String::new();
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        self.pid = 0;
        if r <= 0 {
            String::new()
        } else if libc::WIFSIGNALED(status) {
            format!(" (killed by signal {})", libc::WTERMSIG(status))
        } else {
            format!(" (exit status {})", libc::WEXITSTATUS(status))
        }
    }

    fn kill(&mut self) {
        if self.pid > 0 {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.reap();
        }
    }
}

impl Drop for NativeRunner {
    fn drop(&mut self) {
        // The child exits on EOF of its command pipe, but a wedged child
        // must not outlive us either.
        self.kill();
        // SAFETY: unmapping the area mapped in `new`; no references remain.
        unsafe {
            libc::munmap(self.shared.cast(), self.slots * size_of::<Slot>());
        }
    }
}

fn pipe() -> Result<(libc::c_int, libc::c_int)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(host_err("pipe2"));
    }
    Ok((fds[0], fds[1]))
}

/// Turns a slot's recorded context into an observation.
fn observe(slot: &Slot, code_len: usize) -> Result<Observed> {
    if slot.recorded == 0 {
        return Err(Error::Native(
            "the child returned without recording a case".into(),
        ));
    }
    if slot.recorded == 2 {
        return Err(Error::Native("the signal frame had no FPU state".into()));
    }
    let mut obs = Observed::blank();
    obs.gpr = slot.gpr_out;
    obs.rflags = slot.rflags;
    let mut fpu = fpu_from_fxsave(&slot.fx_out);
    // A component XSAVE reports in its init state may not have been
    // written at all: take the architectural init values.
    if slot.xstate_bv & 1 == 0 {
        fpu.fcw = 0x37f;
        fpu.fsw = 0;
        fpu.ftw = 0;
        fpu.fop = 0;
        fpu.fip = 0;
        fpu.fdp = 0;
        fpu.st = [[0; 16]; 8];
    }
    if slot.xstate_bv & 2 == 0 {
        fpu.xmm = [0; 16];
    }
    obs.fpu = fpu;
    obs.data.copy_from_slice(&slot.data_out);
    obs.stack.copy_from_slice(&slot.stack_out);
    let end = CODE_ADDR + code_len as u64;
    let vector = slot.trapno as u8;
    if slot.signo == libc::SIGTRAP as u64 && vector == 3 && slot.rip == end + 1 {
        obs.outcome = Outcome::Completed;
        obs.rip = end;
    } else {
        obs.outcome = Outcome::Exception { vector };
        obs.rip = slot.rip;
        if vector == 14 {
            obs.cr2 = slot.cr2;
        }
    }
    Ok(obs)
}

/// The child: set up, then run batches until the command pipe closes.
///
/// # Safety
/// Call only in a freshly forked child with the given fds and area.
unsafe fn child_main(cmd: libc::c_int, done: libc::c_int, shared: *mut Slot, slots: usize) -> ! {
    // SAFETY: plain syscalls on memory and fds this process owns.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let step = child_setup();
        write_word(done, step);
        if step != 0 {
            libc::_exit(2);
        }
        loop {
            let mut word = [0u8; 4];
            if libc::read(cmd, word.as_mut_ptr().cast(), 4) != 4 {
                libc::_exit(0);
            }
            let n = (u32::from_le_bytes(word) as usize).min(slots);
            for i in 0..n {
                run_slot(shared.add(i));
            }
            write_word(done, n as u32);
        }
    }
}

/// # Safety
/// `fd` is an open pipe end.
unsafe fn write_word(fd: libc::c_int, v: u32) {
    let bytes = v.to_le_bytes();
    // SAFETY: writing 4 bytes from a local buffer.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), 4) };
}

/// Maps the fixed pages, the signal stack and the handlers. Returns 0 or
/// the number of the step that failed.
///
/// # Safety
/// Only in the child.
unsafe fn child_setup() -> u32 {
    let fixed = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    for (step, (addr, len)) in [
        (CODE_ADDR, CODE_SIZE),
        (DATA_ADDR, DATA_SIZE),
        (STACK_ADDR, STACK_SIZE),
    ]
    .into_iter()
    .enumerate()
    {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, rw, fixed, -1, 0) };
        if p as u64 != addr {
            return step as u32 + 1;
        }
    }
    const ALT_SIZE: usize = 256 * 1024;
    // SAFETY: a fresh anonymous mapping for the signal stack.
    let alt = unsafe {
        libc::mmap(
            ptr::null_mut(),
            ALT_SIZE,
            rw,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if alt == libc::MAP_FAILED {
        return 4;
    }
    let ss = libc::stack_t {
        ss_sp: alt,
        ss_flags: 0,
        ss_size: ALT_SIZE,
    };
    // SAFETY: the stack_t describes the mapping above.
    if unsafe { libc::sigaltstack(&ss, ptr::null_mut()) } != 0 {
        return 5;
    }
    for sig in [
        libc::SIGTRAP,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
    ] {
        // SAFETY: a zeroed sigaction is valid; we fill handler and flags.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: installing a handler for a synchronous signal.
        if unsafe { libc::sigaction(sig, &sa, ptr::null_mut()) } != 0 {
            return 6;
        }
    }
    // The forking thread's signal mask is inherited: a blocked SIGTRAP or
    // SIGSEGV would kill the child instead of reaching the handler.
    // SAFETY: an empty set from sigemptyset, installed as the mask.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, ptr::null_mut()) != 0 {
            return 7;
        }
    }
    // The clean image the handler restores: the defaults after FNINIT.
    let ctx = CTX.0.get();
    // SAFETY: single-threaded child, no handler running yet.
    unsafe {
        (*ctx).fx_clean = fpu_to_fxsave(&vmplay_hypervisor::FpuState::default());
        (*ctx).entry = CODE_ADDR;
    }
    0
}

/// Runs one slot.
///
/// # Safety
/// Only in the child, after `child_setup`; `slot` points into the area.
unsafe fn run_slot(slot: *mut Slot) {
    let code = CODE_ADDR as *mut u8;
    let ctx = CTX.0.get();
    // SAFETY: the fixed pages are mapped by `child_setup`; the slot is
    // ours while the parent waits; single-threaded.
    unsafe {
        let len = ((*slot).code_len as usize).min(MAX_CODE - 1);
        libc::mprotect(code.cast(), CODE_SIZE, libc::PROT_READ | libc::PROT_WRITE);
        ptr::write_bytes(code, 0xcc, CODE_SIZE);
        ptr::copy_nonoverlapping((*slot).code.as_ptr(), code, len);
        libc::mprotect(code.cast(), CODE_SIZE, libc::PROT_READ | libc::PROT_EXEC);
        ptr::copy_nonoverlapping((*slot).data_in.as_ptr(), DATA_ADDR as *mut u8, DATA_SIZE);
        ptr::copy_nonoverlapping((*slot).stack_in.as_ptr(), STACK_ADDR as *mut u8, STACK_SIZE);
        (*ctx).fx_in = (*slot).fx_in;
        (*ctx).gpr_in = (*slot).gpr_in;
        (*ctx).rflags_in = (*slot).rflags_in;
        (*ctx).slot = slot;
        enter_case();
        ptr::copy_nonoverlapping(
            DATA_ADDR as *const u8,
            (*slot).data_out.as_mut_ptr(),
            DATA_SIZE,
        );
        ptr::copy_nonoverlapping(
            STACK_ADDR as *const u8,
            (*slot).stack_out.as_mut_ptr(),
            STACK_SIZE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{FLAGS_CF, FLAGS_ZF};
    use vmplay_hypervisor::FpuState;

    fn state() -> InitialState {
        let mut gpr = [0u64; 16];
        gpr[4] = crate::layout::STACK_START;
        InitialState {
            gpr,
            rflags: 0,
            fpu: FpuState::default(),
            data: vec![0; DATA_SIZE],
            stack: vec![0; STACK_SIZE],
        }
    }

    #[test]
    fn runs_code_and_reports_registers_flags_and_faults() {
        let mut runner = NativeRunner::new(4).expect("native runner");
        let mut add = state();
        add.gpr[0] = u64::MAX;
        add.gpr[1] = 1;
        add.gpr[15] = 0x1234;
        let mut div0 = state();
        div0.gpr[0] = 7;
        let mut store = state();
        store.gpr[3] = DATA_ADDR + 8;
        store.gpr[0] = 0xab;
        store.fpu.xmm[3] = 0x1122;
        let cases: Vec<(&[u8], &InitialState)> = vec![
            (&[0x48, 0x01, 0xc8], &add),                           // add rax, rcx
            (&[0x48, 0xf7, 0xf1], &div0),                          // div rcx (rcx = 0)
            (&[0x88, 0x03, 0x88, 0x04, 0x25, 0, 0, 0, 0], &store), // mov [rbx], al; mov [0], al
            (&[0x0f, 0x0b], &add),                                 // ud2
            (&[0x66, 0x0f, 0xd4, 0xdb], &store),                   // paddq xmm3, xmm3
        ];
        let obs = runner.run(&cases).expect("run");
        assert_eq!(obs[0].outcome, Outcome::Completed);
        assert_eq!(obs[0].rip, CODE_ADDR + 3);
        assert_eq!(obs[0].gpr[0], 0);
        assert_eq!(obs[0].gpr[15], 0x1234);
        assert_eq!(obs[0].rflags & (FLAGS_CF | FLAGS_ZF), FLAGS_CF | FLAGS_ZF);
        assert_eq!(obs[1].outcome, Outcome::Exception { vector: 0 });
        assert_eq!(obs[1].rip, CODE_ADDR);
        assert_eq!(obs[2].outcome, Outcome::Exception { vector: 14 });
        assert_eq!(obs[2].rip, CODE_ADDR + 2);
        assert_eq!(obs[2].cr2, 0);
        assert_eq!(obs[2].data[8], 0xab, "the store before the fault landed");
        assert_eq!(obs[3].outcome, Outcome::Exception { vector: 6 });
        assert_eq!(obs[4].fpu.xmm[3], 0x2244);
        assert_eq!(obs[4].fpu.mxcsr, 0x1f80);
        // The runner survives all of that and runs more batches.
        let again = runner.run(&cases[..1]).expect("second batch");
        assert_eq!(again[0], obs[0]);
    }
}
