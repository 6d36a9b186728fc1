//! Whole-process measurements: run a command to completion with wall time
//! and the child's CPU time from wait4's rusage, read a running process's
//! resident memory from /proc/<pid>/smaps, and take medians.

use crate::BenchError;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How one run of a child process ended.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Exit status, or 128 + signal if it was killed by one.
    pub status: i32,
    pub wall: Duration,
    /// user + sys CPU time of the child (all its threads).
    pub cpu: Duration,
    /// The last lines of its stderr, for error messages.
    pub stderr_tail: String,
}

/// A scratch directory removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Result<Self, BenchError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmplay-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::File(dir.clone(), e))?;
        Ok(Scratch { dir })
    }

    /// Writes `bytes` to `name` in the directory, through to the disk,
    /// and returns its path. Durable before any run starts: the host's
    /// writeback of a fresh 160 MiB disk image ran during the first boot
    /// measured (its sequential write 1.7-2.5x the other boots').
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, BenchError> {
        use std::io::Write;
        let path = self.dir.join(name);
        let fail = |e| BenchError::File(path.clone(), e);
        let mut f = std::fs::File::create(&path).map_err(fail)?;
        f.write_all(bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
}

/// CPU time (user + sys) of this whole process so far, every thread
/// included, the ones that have exited too.
pub fn process_cpu() -> Result<Duration, BenchError> {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(BenchError::Host(
            "getrusage",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(timeval(usage.ru_utime) + timeval(usage.ru_stime))
}

/// CPU time (user + sys) of the calling thread so far.
pub fn thread_cpu() -> Result<Duration, BenchError> {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return Err(BenchError::Host(
            "getrusage",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(timeval(usage.ru_utime) + timeval(usage.ru_stime))
}

/// A running child, reaped exactly once with its rusage.
pub struct Child {
    pid: libc::pid_t,
    started: Instant,
    stderr: PathBuf,
    reaped: bool,
}

impl Child {
    /// Starts `cmd` with stdin from /dev/null, stdout discarded and stderr
    /// to a file in `scratch` (a pipe could fill up and stall the child).
    pub fn spawn(cmd: &mut Command, scratch: &Scratch, tag: &str) -> Result<Child, BenchError> {
        let stderr = scratch.dir.join(format!("{tag}.stderr"));
        let file =
            std::fs::File::create(&stderr).map_err(|e| BenchError::File(stderr.clone(), e))?;
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| BenchError::Spawn(cmd.get_program().to_string_lossy().into_owned(), e))?;
        // The std handle is dropped without waiting: this type reaps the
        // child itself so it gets the rusage.
        Ok(Child {
            pid: child.id() as libc::pid_t,
            started,
            stderr,
            reaped: false,
        })
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// True while the child has not exited (it is not reaped here).
    pub fn is_running(&self) -> bool {
        // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child
        // unreaped so `wait` still gets its rusage.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `pid` is our own unreaped child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read for a waitid result.
        r == 0 && unsafe { info.si_pid() } == 0
    }

    pub fn signal(&self, sig: libc::c_int) {
        if !self.reaped {
            // SAFETY: `pid` is our unreaped child, so the id cannot have
            // been reused by another process.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    /// Waits for the child, killing it if it runs longer than `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<RunResult, BenchError> {
        // The watchdog may only kill while the child is unreaped: it
        // checks `exited` under the lock, and the lock is taken to set
        // `exited` after the child has become a zombie but before it is
        // reaped, so a reused pid is never signalled.
        let state = Arc::new((Mutex::new(false), Condvar::new()));
        let watchdog = {
            let state = state.clone();
            let pid = self.pid;
            std::thread::spawn(move || {
                let (lock, cv) = &*state;
                let exited = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (exited, res) = cv
                    .wait_timeout_while(exited, timeout, |e| !*e)
                    .unwrap_or_else(|e| e.into_inner());
                if res.timed_out() && !*exited {
                    // SAFETY: `pid` is still our unreaped child (see above).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return true;
                }
                false
            })
        };
        // SAFETY: waitid writes only into `info`; WNOWAIT keeps the zombie.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: as above.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(BenchError::Host("waitid", e));
            }
        }
        let wall = self.started.elapsed();
        {
            let (lock, cv) = &*state;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let timed_out = watchdog.join().unwrap_or(false);
        let mut status = 0;
        // SAFETY: rusage is plain data written by wait4.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: reaps our own child; the out-pointers are valid locals.
        let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
        if r != self.pid {
            return Err(BenchError::Host("wait4", std::io::Error::last_os_error()));
        }
        self.reaped = true;
        let stderr_tail = tail(&self.stderr, 6);
        if timed_out {
            return Err(BenchError::Timeout(timeout, stderr_tail));
        }
        let status = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        Ok(RunResult {
            status,
            wall,
            cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
            stderr_tail,
        })
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            let mut status = 0;
            // SAFETY: reaps our own child so no zombie is left.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }
}

/// The last `lines` lines of a text file (empty if unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Runs `cmd` to completion.
pub fn run(
    cmd: &mut Command,
    scratch: &Scratch,
    tag: &str,
    timeout: Duration,
) -> Result<RunResult, BenchError> {
    Child::spawn(cmd, scratch, tag)?.wait(timeout)
}

/// Resident memory of a process, split into guest RAM and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Rss of every mapping, in KiB.
    pub total_kib: u64,
    /// Rss of the mappings taken to be guest RAM, in KiB.
    pub guest_kib: u64,
    /// How many mappings were taken to be guest RAM.
    pub guest_mappings: usize,
}

impl Resident {
    pub fn vmm_kib(&self) -> u64 {
        self.total_kib - self.guest_kib
    }
}

/// Sums Rss over an smaps text. Guest RAM is recognised as anonymous
/// mappings (no path) whose size is exactly one of `guest_sizes` bytes:
/// the VMM maps each RAM range as one region of that size.
pub fn parse_smaps(text: &str, guest_sizes: &[u64]) -> Result<Resident, BenchError> {
    let mut r = Resident {
        total_kib: 0,
        guest_kib: 0,
        guest_mappings: 0,
    };
    let mut is_guest = false;
    let mut seen_header = false;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            // Header: range perms offset dev inode [path]
            let rest: Vec<&str> = fields.collect();
            let anonymous = rest.len() == 4 && rest[3] == "0";
            is_guest = anonymous && guest_sizes.contains(&(end - start));
            seen_header = true;
            if is_guest {
                r.guest_mappings += 1;
            }
        } else if first == "Rss:" {
            if !seen_header {
                return Err(BenchError::Smaps(format!("Rss before a mapping: {line:?}")));
            }
            let kib: u64 = fields
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| BenchError::Smaps(format!("bad Rss line {line:?}")))?;
            r.total_kib += kib;
            if is_guest {
                r.guest_kib += kib;
            }
        }
    }
    if !seen_header {
        return Err(BenchError::Smaps("no mappings".into()));
    }
    Ok(r)
}

/// Reads /proc/`pid`/smaps.
pub fn resident(pid: libc::pid_t, guest_sizes: &[u64]) -> Result<Resident, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/smaps"));
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::File(path, e))?;
    parse_smaps(&text, guest_sizes)
}

/// The median of `v` (mean of the middle two for even lengths).
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fe:01 1234   /usr/bin/vmplay
Size:               1024 kB
Rss:                 700 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                2048 kB
7f0008000000-7f0008100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 300 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
";

    #[test]
    fn smaps_separates_guest_ram_by_size_of_anonymous_mapping() {
        let r = parse_smaps(SMAPS, &[128 << 20]).unwrap();
        assert_eq!(r.total_kib, 700 + 2048 + 300 + 12);
        assert_eq!(r.guest_kib, 2048);
        assert_eq!(r.guest_mappings, 1);
        assert_eq!(r.vmm_kib(), 1012);
        // A size that matches nothing leaves everything to the VMM.
        let none = parse_smaps(SMAPS, &[256 << 20]).unwrap();
        assert_eq!(none.guest_kib, 0);
    }

    #[test]
    fn smaps_rejects_garbage() {
        assert!(parse_smaps("", &[]).is_err());
        assert!(parse_smaps("Rss: 5 kB\n", &[]).is_err());
        assert!(parse_smaps("00-10 r-xp 0 0:0 0\nRss: x kB\n", &[]).is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn run_reports_status_and_cpu_time_of_the_child() {
        let scratch = Scratch::new().unwrap();
        let r = run(
            Command::new("sh").args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo oops >&2; exit 3",
            ]),
            &scratch,
            "t",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(r.status, 3);
        assert!(r.cpu > Duration::ZERO, "a busy child used CPU");
        assert_eq!(r.stderr_tail, "oops");
    }

    #[test]
    fn run_kills_a_child_that_overstays() {
        let scratch = Scratch::new().unwrap();
        let t = Instant::now();
        let r = run(
            Command::new("sleep").arg("30"),
            &scratch,
            "sleep",
            Duration::from_millis(200),
        );
        assert!(matches!(r, Err(BenchError::Timeout(..))));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
