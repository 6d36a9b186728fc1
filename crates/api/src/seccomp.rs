//! Seccomp for the API thread (Firecracker's `api` category): what hyper
//! on a current-thread tokio runtime needs to serve the socket, and
//! nothing else. The thread installs it itself, after its runtime is built
//! and before it serves; a syscall outside it raises SIGSYS (Firecracker's
//! `trap`), which the CLI turns into exit 148.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// The syscalls `fc_api` makes while serving (found with `strace -f` over
/// the API tests, plus the allocator's and thread exit's).
const API_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
];

/// What a vCPU thread makes while it runs the guest, on either backend:
/// KVM_RUN and the register ioctls (kvm), kicks (signals, futexes),
/// device work done on the exit (serial output, eventfd writes, the
/// boot-timer log line), the allocator, and thread exit.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_ioctl,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_write,
    libc::SYS_writev,
];

fn filter(list: &[i64]) -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        list.iter().map(|nr| (*nr, vec![])).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// The API thread's filter: [`API_SYSCALLS`] allowed, anything else traps.
pub fn api_filter() -> Result<BpfProgram, String> {
    filter(API_SYSCALLS)
}

/// Each vCPU thread's filter: [`VCPU_SYSCALLS`] allowed, anything else traps.
pub fn vcpu_filter() -> Result<BpfProgram, String> {
    filter(VCPU_SYSCALLS)
}

/// Installs `filter` on the calling thread (after `PR_SET_NO_NEW_PRIVS`).
pub fn install(filter: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter(filter).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_filter_compiles() {
        assert!(!api_filter().unwrap().is_empty());
        assert!(!vcpu_filter().unwrap().is_empty());
    }
}
