//! `--accel auto` picks kvm only where KVM runs a stock kernel at hardware
//! speed, and says on stderr, in one line, which backend and why; an
//! explicit `--accel kvm` on a kvm_pvm host warns.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use support::{Run, TempDir, kvm_unavailable, run, vmplay_exe};

fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The one `--accel auto` line of a run.
fn auto_line(run: &Run) -> String {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("--accel auto"))
        .collect();
    assert_eq!(lines.len(), 1, "one --accel auto line\n{run}");
    lines[0].to_string()
}

fn tiny_guest(dir: &TempDir) -> std::path::PathBuf {
    dir.file("hello.bin", &vmplay_guests::hello_real_mode())
}

#[test]
fn auto_says_which_backend_it_chose_and_why() {
    let dir = TempDir::new();
    let kernel = tiny_guest(&dir);
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["run", "--serial", "stdio", "--memory", "64M", "--kernel"])
        .arg(&kernel);
    let run = run(cmd);
    run.assert_code(1).assert_stdout("Hello from real mode\n");
    let line = auto_line(&run);
    match kvm_unavailable() {
        Some(_) => assert!(
            line.contains("using emu") && line.contains("/dev/kvm"),
            "{line}"
        ),
        None if host_is_kvm_pvm() => {
            assert!(
                line.contains("using emu") && line.contains("kvm_pvm"),
                "{line}"
            )
        }
        None => assert!(line.contains("using kvm"), "{line}"),
    }
}

#[test]
fn auto_picks_emu_and_says_so_when_dev_kvm_cannot_be_opened() {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    let world_open =
        std::fs::metadata("/dev/kvm").is_ok_and(|m| m.permissions().mode() & 0o006 == 0o006);
    if !is_root || world_open {
        eprintln!("skipping: cannot run vmplay as a user without access to /dev/kvm");
        return;
    }
    let dir = TempDir::new();
    let kernel = tiny_guest(&dir);
    // A copy nobody may execute wherever the build tree lives.
    let exe = dir.path().join("vmplay");
    std::fs::copy(vmplay_exe(), &exe).expect("copy vmplay");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["run", "--serial", "stdio", "--memory", "64M", "--kernel"])
        .arg(&kernel);
    let run = run(cmd);
    run.assert_code(1).assert_stdout("Hello from real mode\n");
    let line = auto_line(&run);
    assert!(
        line.contains("using emu") && line.contains("cannot open /dev/kvm"),
        "{line}"
    );
}

#[test]
fn explicit_kvm_on_kvm_pvm_warns() {
    if kvm_unavailable().is_some() || !host_is_kvm_pvm() {
        eprintln!("skipping: this host's /dev/kvm is not an openable kvm_pvm");
        return;
    }
    let dir = TempDir::new();
    let kernel = tiny_guest(&dir);
    let mut cmd = Command::new(vmplay_exe());
    cmd.args([
        "run", "--accel", "kvm", "--serial", "stdio", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel);
    let run = run(cmd);
    run.assert_code(1)
        .assert_stdout("Hello from real mode\n")
        .assert_stderr_contains("warning: this host's KVM is kvm_pvm");
}

#[test]
fn auto_picks_emu_and_says_so_when_dev_kvm_is_absent() {
    // An empty /dev in a private mount namespace.
    let can = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        eprintln!("skipping: cannot make a mount namespace here");
        return;
    }
    let dir = TempDir::new();
    let kernel = tiny_guest(&dir);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs vmplay-test /dev && exec "$0" "$@""#)
        .arg(vmplay_exe())
        .args(["run", "--serial", "stdio", "--memory", "64M", "--kernel"])
        .arg(&kernel);
    let run = run(cmd);
    run.assert_code(1).assert_stdout("Hello from real mode\n");
    let line = auto_line(&run);
    assert!(
        line.contains("using emu") && line.contains("no /dev/kvm"),
        "{line}"
    );
}
