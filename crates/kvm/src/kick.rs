//! Kicking a vCPU out of `KVM_RUN` from another thread.
//!
//! Two halves, as Firecracker and Cloud Hypervisor do it: the kicker sets
//! `immediate_exit` in the vCPU's `kvm_run` page, so a `KVM_RUN` not yet
//! entered returns `EINTR` at once (the kick is sticky), and it sends the
//! vCPU thread a real-time signal with a no-op handler, so a `KVM_RUN`
//! already inside the kernel (running guest code, in an in-kernel HLT, or
//! an AP waiting for SIPI) returns `EINTR` too.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use vmplay_hypervisor::{Error, Result, VcpuKicker};

/// The kick signal is `SIGRTMIN() + KICK_SIGNAL_OFFSET`.
const KICK_SIGNAL_OFFSET: libc::c_int = 0;

pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Its only job is to exist: a handled signal makes KVM_RUN return EINTR.
}

/// Installs the kick signal's handler, once per process.
///
/// Installed by hand rather than through vmm_sys_util so it can carry
/// `SA_RESTART`: a kick that reaches the vCPU thread while it is in some
/// other blocking call (a device doing file I/O on the vCPU thread) must
/// not make that call fail with `EINTR`. `KVM_RUN` itself returns `EINTR`
/// regardless, which is what we want.
pub(crate) fn register_signal_handler() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_kick_signal;
            // SAFETY: sigaction is plain data; all-zero is a valid value
            // that is then filled in.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = handler as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            // SAFETY: a valid sigaction for a real-time signal whose
            // handler is async-signal-safe (it does nothing); the old
            // action is not asked for.
            let ret = unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) };
            if ret != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            Ok(())
        })
        .clone()
        .map_err(|e| Error::Unavailable {
            backend: "kvm",
            reason: format!("cannot install the vCPU kick signal handler: {e}"),
        })
}

std::thread_local! {
    // SAFETY: gettid has no preconditions and cannot fail.
    static THREAD_ID: libc::pid_t = unsafe { libc::gettid() };
}

/// The kernel thread ID of the calling thread.
pub(crate) fn current_thread() -> libc::pid_t {
    THREAD_ID.with(|t| *t)
}

/// What a kicker needs to reach its vCPU; `None` once the vCPU is gone.
struct Target {
    /// `kvm_run.immediate_exit` of the vCPU.
    immediate_exit: NonNull<u8>,
    /// Kernel thread ID of the thread last running the vCPU.
    thread: Option<libc::pid_t>,
}

/// Shared between a vCPU and its kickers.
pub(crate) struct KickShared {
    target: Mutex<Option<Target>>,
}

// SAFETY: the pointer is only dereferenced, atomically, while the mutex is
// held and the target is Some; the vCPU clears the target (under the same
// mutex) before its kvm_run mapping is unmapped.
unsafe impl Send for KickShared {}
// SAFETY: as for Send: every access goes through the mutex.
unsafe impl Sync for KickShared {}

impl KickShared {
    /// # Safety
    /// `immediate_exit` must point at `kvm_run.immediate_exit` of a mapping
    /// that stays valid until [`KickShared::detach`] is called.
    pub(crate) unsafe fn new(immediate_exit: NonNull<u8>) -> Self {
        KickShared {
            target: Mutex::new(Some(Target {
                immediate_exit,
                thread: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Target>> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the thread that now runs the vCPU.
    pub(crate) fn set_thread(&self, thread: libc::pid_t) {
        if let Some(t) = self.lock().as_mut() {
            t.thread = Some(thread);
        }
    }

    /// Called by the vCPU before its `kvm_run` mapping goes away.
    pub(crate) fn detach(&self) {
        *self.lock() = None;
    }
}

/// Writes `kvm_run.immediate_exit` at `ptr`, atomically: kickers write it
/// from other threads while the vCPU thread clears it.
///
/// # Safety
/// `ptr` must point into a live `kvm_run` mapping.
unsafe fn set_immediate_exit(ptr: NonNull<u8>, value: u8) -> u8 {
    // SAFETY: the caller guarantees the byte is mapped; AtomicU8 has the
    // size and alignment of u8, and every Rust access to this byte is
    // atomic (the kernel only reads it at KVM_RUN entry).
    unsafe { AtomicU8::from_ptr(ptr.as_ptr()) }.swap(value, Ordering::SeqCst)
}

/// Clears the vCPU's `immediate_exit` after a kick has been reported.
///
/// # Safety
/// `ptr` must point into a live `kvm_run` mapping.
pub(crate) unsafe fn clear_immediate_exit(ptr: NonNull<u8>) {
    // SAFETY: forwarded from the caller.
    unsafe { set_immediate_exit(ptr, 0) };
}

/// The seam's kicker for a KVM vCPU.
pub(crate) struct KvmKicker {
    pub(crate) shared: std::sync::Arc<KickShared>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let guard = self.shared.lock();
        let Some(target) = guard.as_ref() else {
            return; // The vCPU no longer exists: nothing to interrupt.
        };
        // SAFETY: the target is attached, so the kvm_run mapping is live
        // (detach takes this mutex before unmapping).
        unsafe { set_immediate_exit(target.immediate_exit, 1) };
        if let Some(thread) = target.thread {
            // SAFETY: tgkill only sends a signal. The thread ID is a thread
            // of this process that ran the vCPU; if it has since exited the
            // call fails with ESRCH, which is harmless.
            let ret = unsafe { libc::tgkill(libc::getpid(), thread, kick_signal()) };
            if ret != 0 {
                tracing::debug!(
                    thread,
                    "kick signal not delivered: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
