//! Shared by the integration tests: run the built `vmplay` binary with a
//! deadline, capture what it printed, make temporary kernel files, and
//! decide whether the KVM backend can run here.

#![allow(dead_code)] // each test file uses its own subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long one vmplay run may take before the test kills it and fails:
/// the guests finish in well under a second on KVM; the software CPU and a
/// loaded CI machine get a wide margin.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The `flags` line of Debian's `/proc/cpuinfo` on emu's default CPU
/// model: exactly what it implements. The CPUID-backed ones are each
/// checked against the handler table by emu's
/// `every_advertised_instruction_set_is_implemented_whole`; constant_tsc,
/// rep_good, nopl, xtopology, nonstop_tsc, cpuid and tsc_known_freq are
/// Linux's own conclusions from them.
pub const EMU_CPUINFO_FLAGS: &str = "fpu de pse tsc msr pae cx8 apic sep pge cmov pat pse36 \
    clflush mmx fxsr sse sse2 syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology \
    nonstop_tsc cpuid tsc_known_freq pni ssse3 cx16 sse4_1 sse4_2 x2apic movbe popcnt \
    tsc_deadline_timer xsave rdrand hypervisor lahf_lm abm fsgsbase tsc_adjust bmi1 bmi2 erms \
    rdseed xsaveopt fsrm arch_capabilities";

pub fn vmplay_exe() -> &'static str {
    env!("CARGO_BIN_EXE_vmplay")
}

/// What a finished vmplay run left behind.
#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The exit code; fails the test if vmplay died of a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("{} was killed by a signal\n{self}", self.what))
    }

    /// Asserts the exit code, showing everything vmplay printed if not.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), code, "unexpected exit status\n{self}");
        self.assert_no_panic()
    }

    pub fn assert_stdout(&self, expected: &str) -> &Self {
        assert_eq!(self.stdout, expected, "unexpected guest output\n{self}");
        self
    }

    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n{self}"
        );
        self
    }

    pub fn assert_no_panic(&self) -> &Self {
        assert!(
            !self.stdout.contains("panicked") && !self.stderr.contains("panicked"),
            "vmplay panicked\n{self}"
        );
        self
    }

    /// The bad-input contract: exit 1 and exactly one stderr line
    /// `vmplay: error: ...` that names `culprit`.
    pub fn assert_one_line_error(&self, culprit: &str) -> &Self {
        self.assert_code(1);
        let line = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        assert!(!line.contains('\n'), "error is more than one line\n{self}");
        assert!(
            line.starts_with("vmplay: error:"),
            "error does not start with `vmplay: error:`\n{self}"
        );
        assert!(
            line.contains(culprit),
            "error does not name {culprit:?}\n{self}"
        );
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.what, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` (stdin closed, output captured) and waits at most
/// [`DEADLINE`]; on expiry kills it and fails with what it printed so far.
pub fn run(cmd: Command) -> Run {
    run_with_deadline(cmd, DEADLINE)
}

/// [`run`] with its own deadline, for runs that boot a real kernel.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Run {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("VMPLAY_LOG")
        .env_remove("RUST_BACKTRACE");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!(
                    "{what} still running after {deadline:?}; killed ({status:?})\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}\n---",
                    stdout.join().unwrap_or_default(),
                    stderr.join().unwrap_or_default()
                );
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    Run {
        what,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// `vmplay run ARGS...`.
pub fn vmplay_run(args: &[&str]) -> Run {
    let mut cmd = Command::new(vmplay_exe());
    cmd.arg("run").args(args);
    run(cmd)
}

/// A private temporary directory, removed when dropped. World-readable so a
/// test may run vmplay as another user.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmplay-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Why the KVM backend cannot run here, if it cannot: /dev/kvm is missing
/// or cannot be opened read-write.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// The backends vmplay should behave the same on: emu always, kvm when
/// /dev/kvm can be opened.
pub fn backends() -> Vec<&'static str> {
    let mut b = vec!["emu"];
    if kvm_unavailable().is_none() {
        b.push("kvm");
    }
    b
}

/// For `..._on_kvm` tests: `true` (after saying why) when they must skip.
pub fn skip_without_kvm() -> bool {
    match kvm_unavailable() {
        Some(why) => {
            eprintln!("skipping: /dev/kvm not available: {why}");
            true
        }
        None => false,
    }
}

/// The workspace's `guest-assets/debian/<name>` (fetched by
/// `scripts/fetch-debian-kernel`), or `None` after saying why the test
/// skips. With `VMPLAY_REQUIRE_ASSETS` set (CI) a missing asset fails.
pub fn debian_asset(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../guest-assets/debian")
        .join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
        "{} is missing (run scripts/fetch-debian-kernel)",
        path.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-debian-kernel)",
        path.display()
    );
    None
}

/// Debian's kernel and an initramfs (vmplay-image's, as `vmplay image`
/// builds it) whose `/init` runs `run_hook` and powers off; extra files
/// go in too. `None` after saying why when the assets are missing outside CI.
#[allow(dead_code)]
pub fn debian_guest(
    dir: &TempDir,
    run_hook: &str,
    files: &[(&str, &[u8], u32)],
) -> Option<(PathBuf, PathBuf)> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian");
    let assets = match vmplay_image::DebianAssets::fetch(&cache, &mut |l| eprintln!("{l}")) {
        Ok(a) => a,
        Err(e) if std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none() => {
            eprintln!("skipping: {e}");
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let mut image = vmplay_image::Initramfs::debian(&assets)
        .expect("build the initramfs")
        .file(vmplay_image::RUN_HOOK, run_hook, 0o755);
    for (path, data, mode) in files {
        image = image.file(path, data.to_vec(), *mode);
    }
    let out = dir.path().join("initramfs.cpio");
    image.write(&out).expect("write the initramfs");
    Some((assets.kernel().to_path_buf(), out))
}

/// A host tool the test needs, or `None` after saying why it skips
/// (outside CI; in CI, `scripts/test` installs it and a missing one fails).
#[allow(dead_code)]
pub fn host_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
            "{name} is missing (scripts/test installs it)"
        );
        eprintln!("skipping: {name} not found");
    }
    found
}
