//! virtio-rng under Debian's stock kernel on the software CPU: the guest's
//! hw_random core picks the virtio device and reads from `/dev/hwrng` give
//! host entropy.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{TempDir, debian_guest, run_with_deadline, vmplay_exe};

const SCRIPT: &str = r#"#!/bin/sh
echo "rng current $(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/r bs=4096 count=1 2>/dev/null
echo "rng bytes $(wc -c < /tmp/r)"
echo "rng distinct $(od -An -v -tx1 /tmp/r | tr ' ' '\n' | grep -v '^$' | sort -u | wc -l)"
"#;

#[test]
fn guest_reads_4_kib_of_entropy_from_dev_hwrng() {
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, SCRIPT, &[]) else {
        return;
    };
    let mut cmd = Command::new(vmplay_exe());
    cmd.args([
        "run", "--accel", "emu", "--memory", "512M", "--serial", "stdio", "--rng",
    ])
    .arg("--kernel")
    .arg(&kernel)
    .arg("--initrd")
    .arg(&initrd)
    .args(["--cmdline", "console=ttyS0 panic=-1 quiet"]);
    let run = run_with_deadline(cmd, Duration::from_secs(300));
    run.assert_no_panic();
    assert_eq!(
        run.code(),
        0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("rng current virtio_rng.0"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("rng bytes 4096"), "{}", run.stdout);
    // 4 KiB of random bytes holds (nearly) every byte value.
    let distinct: u32 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("rng distinct "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a distinct-byte count");
    assert!(
        distinct > 240,
        "{distinct} distinct byte values: not random"
    );
}
