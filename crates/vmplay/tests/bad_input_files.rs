//! Bad files: a kernel or initrd that is not a regular file (a directory,
//! `/dev/zero`, a FIFO) or is larger than guest memory is refused before
//! it is read, with one line naming it; `vmplay image` without network or
//! disk space says which and leaves no half-written image.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{TempDir, run, vmplay_exe, vmplay_run};

fn a_good_kernel(dir: &TempDir) -> std::path::PathBuf {
    dir.file("good.elf", &vmplay_guests::debug_exit(0))
}

/// `vmplay run` on emu with `args`, which must be refused quickly (a read
/// of /dev/zero or a FIFO would take until the deadline or forever).
fn refused(args: &[&str], culprit: &str, reason: &str) {
    let mut all = vec!["--accel", "emu", "--serial", "none", "--memory", "16M"];
    all.extend_from_slice(args);
    let start = Instant::now();
    let run = vmplay_run(&all);
    run.assert_one_line_error(culprit)
        .assert_stderr_contains(reason);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}: the file was read\n{run}",
        start.elapsed()
    );
}

#[test]
fn a_directory_as_kernel_or_initrd_is_refused() {
    let dir = TempDir::new();
    let kernel = a_good_kernel(&dir);
    let d = dir.path().to_str().unwrap();
    refused(&["--kernel", d], d, "a directory");
    refused(
        &["--kernel", kernel.to_str().unwrap(), "--initrd", d],
        d,
        "a directory",
    );
}

#[test]
fn dev_zero_as_kernel_or_initrd_is_refused_before_it_is_read() {
    let dir = TempDir::new();
    let kernel = a_good_kernel(&dir);
    refused(&["--kernel", "/dev/zero"], "/dev/zero", "character device");
    refused(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            "/dev/zero",
        ],
        "/dev/zero",
        "character device",
    );
}

#[test]
fn a_fifo_as_kernel_is_refused_without_waiting_for_a_writer() {
    let dir = TempDir::new();
    let fifo = dir.path().join("kernel.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipping: mkfifo failed");
        return;
    }
    let f = fifo.to_str().unwrap();
    refused(&["--kernel", f], f, "a FIFO");
}

#[test]
fn a_kernel_or_initrd_larger_than_guest_memory_is_refused_before_it_is_read() {
    let dir = TempDir::new();
    let kernel = a_good_kernel(&dir);
    let huge = dir.path().join("huge");
    // Sparse: 1 GiB of zeros without writing them.
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(1 << 30))
        .expect("create a sparse file");
    let h = huge.to_str().unwrap();
    refused(&["--kernel", h], h, "larger than guest memory");
    refused(
        &["--kernel", kernel.to_str().unwrap(), "--initrd", h],
        h,
        "does not fit in guest memory",
    );
}

/// `vmplay image` prints progress lines; its error is the one last line.
fn assert_image_error(run: &support::Run, culprit: &str) {
    run.assert_code(1);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line\n{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("vmplay: error:") && last.contains(culprit),
        "{run}"
    );
}

fn cache() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian")
}

/// Whether `unshare` can make private namespaces here (root).
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--mount", "--net", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// What is left in `dir`, recursively, that looks like an image or a
/// half-written file.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                pending.push(path);
            } else if name != ".lock" {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn image_without_network_says_so_and_leaves_nothing_behind() {
    if !can_unshare() {
        eprintln!("skipping: cannot make a network namespace here");
        return;
    }
    let dir = TempDir::new();
    let out = dir.path().join("image");
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--"])
        .arg(vmplay_exe())
        .args(["image", "debian", "--out"])
        .arg(&out);
    let run = run(cmd);
    assert_image_error(&run, "no network");
    assert_eq!(leftovers(&out), Vec::<String>::new(), "\n{run}");
}

#[test]
fn image_on_a_full_disk_says_so_and_leaves_nothing_behind() {
    if !can_unshare() {
        eprintln!("skipping: cannot make a mount namespace here");
        return;
    }
    if vmplay_image::DebianAssets::open(&cache()).is_err() {
        eprintln!("skipping: no fetched packages in {}", cache().display());
        return;
    }
    let dir = TempDir::new();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    // A 1 MiB file system: the kernel alone does not fit.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=1m vmplay-test "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(&small)
        .arg(vmplay_exe())
        .args(["image", "debian", "--cache"])
        .arg(cache())
        .arg("--out")
        .arg(&small);
    let run = run(cmd);
    assert_image_error(&run, "disk is full");
    // The tmpfs went with the namespace; nothing reached the directory below.
    assert_eq!(leftovers(&small), Vec::<String>::new(), "\n{run}");
}

#[test]
fn image_with_an_unknown_package_names_it_and_writes_no_root_file_system() {
    let apt_knows = Command::new("apt-cache")
        .args(["show", "--no-all-versions", "busybox-static"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !apt_knows || vmplay_image::DebianAssets::open(&cache()).is_err() {
        eprintln!("skipping: apt has no package lists or nothing is fetched here");
        return;
    }
    let dir = TempDir::new();
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["image", "debian", "--rootfs", "--packages"])
        .arg("bash,vmplay-no-such-package")
        .arg("--cache")
        .arg(cache())
        .arg("--out")
        .arg(dir.path());
    let run = run(cmd);
    assert_image_error(&run, "vmplay-no-such-package");
    let names: Vec<String> = leftovers(dir.path())
        .into_iter()
        .filter(|p| p.contains("rootfs") || p.contains(".tmp") || p.contains(".tree"))
        .collect();
    assert_eq!(names, Vec::<String>::new(), "\n{run}");
}
