//! Seccomp, per thread as Firecracker's categories: `api` (the API
//! thread), `vcpu` (each vCPU thread) and `vmm`. Firecracker's `vmm`
//! thread is split in two here: the event loop (thread `vmm`, all device
//! work) and the main thread (answers the API, owns the machine), each
//! with its own built-in list; a user's `--seccomp-filter` file has one
//! `vmm` program, which both get. Each thread installs its filter itself
//! before it serves, runs guest code or does device work; a syscall
//! outside it raises SIGSYS (Firecracker's `trap`), which the CLI turns
//! into exit 148.

pub use seccompiler::{BpfProgram, sock_filter};
use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

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

/// What the event-loop thread (`vmm`) makes while it runs the devices:
/// epoll, eventfds and timerfds, block I/O (positioned reads and writes,
/// fdatasync, fallocate), TAP and socket I/O (vsock's Unix sockets,
/// passt), getrandom for virtio-rng, the allocator, and thread exit.
const VMM_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fallocate,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    // A `--net user` interface ends its passt child when it is dropped.
    libc::SYS_kill,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_socket,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_tkill,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

/// What the main thread makes after `InstanceStart`: answering the API
/// (channels, the logger and metrics files, `PATCH /drives` opening a new
/// backing file), pausing and kicking vCPUs, Ctrl-Alt-Del, and at the end
/// joining the threads, restoring the terminal and exiting.
const MAIN_SYSCALLS: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_getrusage,
    libc::SYS_gettid,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// The only ioctls the event loop makes: `FIONBIO` (sockets set
/// non-blocking: vsock connections, passt) and `TUNSETOFFLOAD` (a TAP's
/// offloads follow the driver's features).
const VMM_IOCTLS: &[u64] = &[libc::FIONBIO, libc::TUNSETOFFLOAD];

fn filter(list: &[i64]) -> Result<BpfProgram, String> {
    filter_with(list, &[])
}

/// `list` allowed outright, plus `ioctl` with one of `ioctls` as its
/// request (the second argument); anything else traps.
fn filter_with(list: &[i64], ioctls: &[u64]) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        list.iter().map(|nr| (*nr, vec![])).collect();
    if !ioctls.is_empty() {
        let conditions = ioctls
            .iter()
            .map(|&request| {
                let c = seccompiler::SeccompCondition::new(
                    1,
                    seccompiler::SeccompCmpArgLen::Dword,
                    seccompiler::SeccompCmpOp::Eq,
                    request,
                )
                .map_err(|e| e.to_string())?;
                seccompiler::SeccompRule::new(vec![c]).map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, String>>()?;
        rules.insert(libc::SYS_ioctl, conditions);
    }
    compile(rules, SeccompAction::Trap, SeccompAction::Allow)
}

/// `rules` as a BPF program: `on_match` for the listed syscalls (whose
/// rules hold), `otherwise` for the rest.
fn compile(
    rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, otherwise, on_match, TargetArch::x86_64)
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

/// The event-loop thread's filter: [`VMM_SYSCALLS`] allowed, and `ioctl`
/// for [`VMM_IOCTLS`] only.
pub fn vmm_filter() -> Result<BpfProgram, String> {
    filter_with(VMM_SYSCALLS, VMM_IOCTLS)
}

/// The main thread's filter after `InstanceStart`: [`MAIN_SYSCALLS`] allowed.
pub fn main_filter() -> Result<BpfProgram, String> {
    filter(MAIN_SYSCALLS)
}

/// Installs `filter` on the calling thread (after `PR_SET_NO_NEW_PRIVS`).
/// An empty program installs nothing, as Firecracker.
pub fn install(filter: &BpfProgram) -> Result<(), String> {
    if filter.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter(filter).map_err(|e| e.to_string())
}

/// The programs for each of vmplay's threads. An empty program means no
/// filter on that thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    pub api: BpfProgram,
    pub vcpu: BpfProgram,
    /// The event-loop thread.
    pub vmm: BpfProgram,
    /// The main thread, once the VM is built.
    pub main: BpfProgram,
}

/// Firecracker's thread categories, the keys of a filter file.
const THREAD_CATEGORIES: [&str; 3] = ["vmm", "api", "vcpu"];

/// Firecracker's bound on a filter file (4096 instructions per program
/// and a few threads fit well below it).
const DESERIALIZATION_BYTES_LIMIT: usize = 100_000;

/// Why a filter file was refused; the texts are Firecracker's
/// (`Seccomp error: ` goes before them).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("Filter deserialization failed: {0}")]
    Deserialization(String),
    #[error("Invalid thread categories: {0}")]
    ThreadCategories(String),
    #[error("Missing thread category: {0}")]
    MissingThreadCategory(String),
    #[error("Filter file open error: {0}")]
    FileOpen(std::io::Error),
    #[error("Filter installation error: {0}")]
    Install(String),
}

impl Filters {
    /// No filter anywhere (`--no-seccomp`).
    pub fn none() -> Filters {
        Filters::default()
    }

    /// vmplay's own lists.
    pub fn builtin() -> Result<Filters, FilterError> {
        Ok(Filters {
            api: api_filter().map_err(FilterError::Install)?,
            vcpu: vcpu_filter().map_err(FilterError::Install)?,
            vmm: vmm_filter().map_err(FilterError::Install)?,
            main: main_filter().map_err(FilterError::Install)?,
        })
    }

    /// A `--seccomp-filter` file.
    pub fn from_file(path: &std::path::Path) -> Result<Filters, FilterError> {
        let file = std::fs::File::open(path).map_err(FilterError::FileOpen)?;
        Filters::from_reader(file)
    }

    /// Firecracker's compiled filter format, as seccompiler-bin writes it:
    /// `bitcode` (serde) of a map from thread category to BPF
    /// instructions, each a little-endian `u64` packing a `sock_filter`
    /// (code: u16, jt: u8, jf: u8, k: u32). Keys are case-insensitive;
    /// exactly `vmm`, `api` and `vcpu` must be there.
    pub fn from_reader(reader: impl Read) -> Result<Filters, FilterError> {
        let mut buf = Vec::new();
        let n = reader
            .take((DESERIALIZATION_BYTES_LIMIT + 1) as u64)
            .read_to_end(&mut buf)
            .map_err(|e| FilterError::Deserialization(format!("Failed to read input: {e}")))?;
        if n > DESERIALIZATION_BYTES_LIMIT {
            return Err(FilterError::Deserialization(format!(
                "Input size {n} exceeds limit of {DESERIALIZATION_BYTES_LIMIT} bytes"
            )));
        }
        let map: HashMap<String, Vec<u64>> = bitcode::deserialize(&buf).map_err(|e| {
            FilterError::Deserialization(format!("Bitcode deserialization failed: {e}"))
        })?;
        let mut map: BTreeMap<String, Vec<u64>> = map
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let invalid: Vec<&str> = map
            .keys()
            .map(String::as_str)
            .filter(|k| !THREAD_CATEGORIES.contains(k))
            .collect();
        if !invalid.is_empty() {
            return Err(FilterError::ThreadCategories(invalid.join(",")));
        }
        for category in THREAD_CATEGORIES {
            if !map.contains_key(category) {
                return Err(FilterError::MissingThreadCategory(category.into()));
            }
        }
        let mut take = |k: &str| -> BpfProgram {
            map.remove(k)
                .unwrap_or_default()
                .into_iter()
                .map(instruction)
                .collect()
        };
        let vmm = take("vmm");
        Ok(Filters {
            api: take("api"),
            vcpu: take("vcpu"),
            main: vmm.clone(),
            vmm,
        })
    }
}

/// One BPF instruction from its `u64` form.
fn instruction(raw: u64) -> sock_filter {
    let b = raw.to_le_bytes();
    sock_filter {
        code: u16::from_le_bytes([b[0], b[1]]),
        jt: b[2],
        jf: b[3],
        k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

/// The `u64` form of a BPF instruction (for writing filter files).
pub fn instruction_bits(i: &sock_filter) -> u64 {
    let k = i.k.to_le_bytes();
    let c = i.code.to_le_bytes();
    u64::from_le_bytes([c[0], c[1], i.jt, i.jf, k[0], k[1], k[2], k[3]])
}

/// Writes `programs` (category → program) in Firecracker's file format,
/// as seccompiler-bin does: what `--seccomp-filter` reads.
pub fn serialize(programs: &BTreeMap<String, BpfProgram>) -> Result<Vec<u8>, String> {
    let map: HashMap<String, Vec<u64>> = programs
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(instruction_bits).collect()))
        .collect();
    bitcode::serialize(&map).map_err(|e| e.to_string())
}

/// A filter that allows everything except `trapped` (for tests and for
/// building small custom filter files).
pub fn allow_all_but(trapped: &[i64]) -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        trapped.iter().map(|nr| (*nr, vec![])).collect();
    compile(rules, SeccompAction::Allow, SeccompAction::Trap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_filter_compiles() {
        assert!(!api_filter().unwrap().is_empty());
        assert!(!vcpu_filter().unwrap().is_empty());
        assert!(!vmm_filter().unwrap().is_empty());
        assert!(!main_filter().unwrap().is_empty());
    }

    fn file(map: &[(&str, BpfProgram)]) -> Vec<u8> {
        serialize(
            &map.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_filter_file_round_trips_and_is_checked_as_firecracker() {
        let vcpu = vcpu_filter().unwrap();
        let bytes = file(&[
            ("VMM", vec![]),
            ("api", api_filter().unwrap()),
            ("vcpu", vcpu.clone()),
        ]);
        let f = Filters::from_reader(&bytes[..]).unwrap();
        assert_eq!(f.vcpu, vcpu);
        assert_eq!(f.api, api_filter().unwrap());
        assert!(f.vmm.is_empty() && f.main.is_empty());

        let e = Filters::from_reader(&b"adassafvc"[..]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Filter deserialization failed: Bitcode deserialization failed: "),
            "{e}"
        );
        let e = Filters::from_reader(&vec![0u8; DESERIALIZATION_BYTES_LIMIT + 1][..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Filter deserialization failed: Input size 100001 exceeds limit of 100000 bytes"
        );
        let e = Filters::from_reader(&file(&[("vmm", vec![]), ("api", vec![])])[..]).unwrap_err();
        assert_eq!(e.to_string(), "Missing thread category: vcpu");
        let e = Filters::from_reader(
            &file(&[
                ("vmm", vec![]),
                ("api", vec![]),
                ("vcpu", vec![]),
                ("t1", vec![]),
                ("t2", vec![]),
            ])[..],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Invalid thread categories: t1,t2");
    }

    /// Runs `body` in a forked child under `filter`; how the child ended
    /// (`Ok(exit code)` or `Err(signal)`).
    #[allow(unsafe_code)]
    fn in_child(filter: &BpfProgram, body: fn()) -> Result<i32, i32> {
        // SAFETY: the child only installs the filter (no allocation), makes
        // raw syscalls and leaves with _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if seccompiler::apply_filter(filter).is_err() {
                    libc::_exit(99);
                }
                body();
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFEXITED(status) {
                Ok(libc::WEXITSTATUS(status))
            } else {
                Err(libc::WTERMSIG(status))
            }
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn the_event_loops_filter_allows_only_its_ioctls() {
        let f = vmm_filter().unwrap();
        // FIONBIO passes (on a bad fd it fails with EBADF, but is allowed).
        assert_eq!(
            in_child(&f, || {
                let mut on = 1i32;
                // SAFETY: FIONBIO reads one int.
                unsafe { libc::ioctl(-1, libc::FIONBIO, &mut on) };
            }),
            Ok(0)
        );
        // Any other request traps.
        assert_eq!(
            in_child(&f, || {
                let mut ws = [0u16; 4];
                // SAFETY: TIOCGWINSZ writes one winsize.
                unsafe { libc::ioctl(-1, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
            }),
            Err(libc::SIGSYS)
        );
        // So does a syscall outside the list.
        assert_eq!(
            in_child(&f, || {
                // SAFETY: getppid takes nothing.
                unsafe { libc::getppid() };
            }),
            Err(libc::SIGSYS)
        );
    }

    #[test]
    #[allow(unsafe_code)]
    fn an_empty_program_installs_nothing() {
        std::thread::spawn(|| {
            install(&vec![]).unwrap();
            // SAFETY: PR_GET_SECCOMP takes no pointers.
            assert_eq!(unsafe { libc::prctl(libc::PR_GET_SECCOMP) }, 0);
        })
        .join()
        .unwrap();
    }
}
