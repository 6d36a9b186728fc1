//! Bad input: every mistake a user can make on the command line or in the
//! files they pass gets exit status 1 and one stderr line
//! `vmplay: error: ...` naming the file or value, never a panic. Each case
//! runs on every backend available here (emu always, kvm with /dev/kvm).

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use support::{Run, TempDir, backends, kvm_unavailable, run, vmplay_exe, vmplay_run};

/// `vmplay run --kernel KERNEL --accel ACCEL --serial none EXTRA...`.
fn run_kernel(accel: &str, kernel: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--accel",
        accel,
        "--serial",
        "none",
    ];
    args.extend_from_slice(extra);
    vmplay_run(&args)
}

/// Runs the same bad input on every backend and checks the error names
/// each of `culprits` (compared case-insensitively).
fn rejected_everywhere(kernel: &Path, extra: &[&str], culprits: &[&str]) {
    for accel in backends() {
        let run = run_kernel(accel, kernel, extra);
        run.assert_code(1);
        let lower = Run {
            stderr: run.stderr.to_lowercase(),
            what: format!("[{accel}] {}", run.what),
            ..run
        };
        for culprit in culprits {
            lower.assert_one_line_error(&culprit.to_lowercase());
        }
    }
}

fn a_good_kernel(dir: &TempDir) -> std::path::PathBuf {
    dir.file("good.elf", &vmplay_guests::debug_exit(0))
}

#[test]
fn missing_kernel_file_is_named() {
    let dir = TempDir::new();
    let missing = dir.path().join("no-such-kernel");
    rejected_everywhere(&missing, &[], &[missing.to_str().unwrap()]);
}

#[test]
fn empty_kernel_file_is_rejected() {
    let dir = TempDir::new();
    let empty = dir.file("empty-kernel", b"");
    rejected_everywhere(&empty, &[], &[empty.to_str().unwrap(), "empty"]);
}

#[test]
fn truncated_bzimage_is_rejected() {
    let dir = TempDir::new();
    let image = vmplay_guests::fixtures::synthetic_bzimage();
    let truncated = dir.file("truncated-bzimage", &image[..4096]);
    rejected_everywhere(&truncated, &[], &[truncated.to_str().unwrap(), "truncated"]);
}

#[test]
fn truncated_debian_kernel_is_rejected() {
    let vmlinuz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian/vmlinuz");
    let Ok(bytes) = std::fs::read(&vmlinuz) else {
        assert!(
            std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
            "{} is missing (run scripts/fetch-debian-kernel)",
            vmlinuz.display()
        );
        eprintln!("skipping: {} not fetched", vmlinuz.display());
        return;
    };
    let dir = TempDir::new();
    let truncated = dir.file("vmlinuz-4k", &bytes[..4096.min(bytes.len())]);
    rejected_everywhere(&truncated, &[], &[truncated.to_str().unwrap(), "truncated"]);
}

#[test]
fn kernel_for_another_architecture_is_rejected() {
    let dir = TempDir::new();
    let elf = dir.file(
        "aarch64-kernel.elf",
        &vmplay_guests::fixtures::aarch64_elf(),
    );
    rejected_everywhere(&elf, &[], &[elf.to_str().unwrap()]);
}

#[test]
fn initrd_larger_than_guest_memory_is_named() {
    let dir = TempDir::new();
    let kernel = dir.file("mbinfo.elf", &vmplay_guests::multiboot_info());
    let initrd = dir.path().join("huge-initrd");
    // Sparse: 32 MiB of zeros without writing them.
    std::fs::File::create(&initrd)
        .and_then(|f| f.set_len(32 << 20))
        .expect("create sparse initrd");
    let initrd_arg = initrd.to_str().unwrap();
    rejected_everywhere(
        &kernel,
        &["--memory", "16M", "--initrd", initrd_arg],
        &[initrd_arg],
    );
}

#[test]
fn zero_memory_is_rejected() {
    let dir = TempDir::new();
    rejected_everywhere(&a_good_kernel(&dir), &["--memory", "0"], &["memory", " 0"]);
}

#[test]
fn memory_beyond_the_host_is_rejected() {
    let dir = TempDir::new();
    rejected_everywhere(
        &a_good_kernel(&dir),
        &["--memory", "100T"],
        &["memory", "host"],
    );
}

#[test]
fn zero_cpus_is_rejected() {
    let dir = TempDir::new();
    rejected_everywhere(&a_good_kernel(&dir), &["--cpus", "0"], &["cpu", " 0"]);
}

#[test]
fn a_hundred_thousand_cpus_is_rejected() {
    let dir = TempDir::new();
    rejected_everywhere(
        &a_good_kernel(&dir),
        &["--cpus", "100000"],
        &["cpu", "100000"],
    );
}

#[test]
fn unknown_serial_mode_is_named() {
    let dir = TempDir::new();
    let kernel = a_good_kernel(&dir);
    for accel in backends() {
        let run = vmplay_run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--accel",
            accel,
            "--serial",
            "telnet:4444",
        ]);
        run.assert_one_line_error("telnet:4444");
    }
}

/// How to run a command so /dev/kvm cannot be opened, when it can be now.
enum KvmBlocker {
    /// Run as `nobody` (/dev/kvm is not world read-write).
    Nobody,
    /// Run in a private mount namespace with /dev/null over /dev/kvm.
    NullOverKvm,
}

fn kvm_blocker() -> Result<KvmBlocker, String> {
    let euid = std::fs::metadata("/proc/self")
        .map_err(|e| format!("/proc/self: {e}"))?
        .uid();
    if euid != 0 {
        return Err("not root: cannot drop access to /dev/kvm".into());
    }
    let mode = std::fs::metadata("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?
        .mode();
    if mode & 0o006 != 0o006 {
        Ok(KvmBlocker::Nobody)
    } else {
        Ok(KvmBlocker::NullOverKvm)
    }
}

#[test]
fn unopenable_dev_kvm_is_reported() {
    let dir = TempDir::new();
    let kernel = a_good_kernel(&dir);
    let kernel = kernel.to_str().unwrap();
    let args = [
        "run", "--kernel", kernel, "--accel", "kvm", "--serial", "none",
    ];
    let run = if let Some(why) = kvm_unavailable() {
        eprintln!("/dev/kvm is already unusable here ({why})");
        vmplay_run(&args[1..])
    } else {
        match kvm_blocker() {
            Err(why) => {
                eprintln!("skipping: cannot make /dev/kvm unopenable: {why}");
                return;
            }
            Ok(KvmBlocker::Nobody) => {
                // A copy nobody may execute wherever the build tree lives.
                let exe = dir.path().join("vmplay");
                std::fs::copy(vmplay_exe(), &exe).expect("copy vmplay");
                std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod vmplay");
                let mut cmd = Command::new("setpriv");
                cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                    .arg(&exe)
                    .args(args);
                run(cmd)
            }
            Ok(KvmBlocker::NullOverKvm) => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount --bind /dev/null /dev/kvm && exec "$0" "$@""#)
                    .arg(vmplay_exe())
                    .args(args);
                run(cmd)
            }
        }
    };
    run.assert_one_line_error("/dev/kvm");
}
