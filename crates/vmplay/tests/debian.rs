//! vmplay's main job: Debian's stock cloud kernel (fetched with apt-get by
//! vmplay-image) boots to the image's busybox `/init` on the software CPU,
//! through both Linux entries, runs the image's run hook and powers off.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{TempDir, debian_guest, run_with_deadline, vmplay_exe};

/// A Linux boot on the interpreter takes ~10 s on an idle machine; CI runs
/// tests side by side on two cores.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

/// The guest's steps: print who it is, then power off. `/init` runs
/// [`vmplay_image::RUN_HOOK`] when there is no `root=`.
const WHO_AM_I: &str = r#"#!/bin/sh
echo "vmplay-init: $(uname -sr) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "vmplay-init: $(grep -c ^processor /proc/cpuinfo) cpu(s), $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "vmplay-init: reached init, powering off"
"#;

fn boots_debian_to_init(entry: &str) {
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, WHO_AM_I, &[]) else {
        return;
    };
    let mut cmd = Command::new(vmplay_exe());
    cmd.args([
        "run", "--accel", "emu", "--memory", "512M", "--serial", "stdio",
    ])
    .args(["--kernel-entry", entry])
    .arg("--kernel")
    .arg(&kernel)
    .arg("--initrd")
    .arg(&initrd)
    .args(["--cmdline", "console=ttyS0 panic=-1"]);
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_no_panic();
    assert_eq!(
        run.code(),
        0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    for line in [
        "Linux version 6.1",
        "ACPI: RSDP 0x00000000000E0000",
        "x86/fpu: x87 FPU will use FXSAVE",
        "vmplay-init: Linux 6.1",
        "vmplay emu x86-64 CPU",
        "vmplay-init: reached init, powering off",
        "reboot: Power down",
    ] {
        assert!(run.stdout.contains(line), "no {line:?} in:\n{}", run.stdout);
    }
    assert!(run.stderr.contains("guest powered off"), "{}", run.stderr);
}

#[test]
fn boots_debian_kernel_to_init_through_pvh_on_emu() {
    boots_debian_to_init("pvh");
}

#[test]
fn boots_debian_kernel_to_init_through_the_bzimage_decompressor_on_emu() {
    boots_debian_to_init("bzimage");
}
