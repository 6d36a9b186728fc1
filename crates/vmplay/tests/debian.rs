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
        // emu's XSAVE: x87 and SSE in the 576-byte standard image.
        "x86/fpu: Enabled xstate features 0x3, context size is 576 bytes, using 'standard' format.",
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

/// What the guest's Linux made of the CPU: its feature flags, family and
/// model, caches, speculation view and whether it isolated page tables.
const CPU_VIEW: &str = r#"#!/bin/sh
echo "CPU-FLAGS:$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
for k in 'cpu family' model stepping 'cache size'; do
    echo "CPU-INFO $k:$(grep -m1 "^$k[[:space:]]*:" /proc/cpuinfo | cut -d: -f2)"
done
for c in /sys/devices/system/cpu/cpu0/cache/index*; do
    echo "CPU-CACHE L$(cat $c/level) $(cat $c/type) $(cat $c/size)"
done
for f in /sys/devices/system/cpu/vulnerabilities/*; do
    echo "CPU-VULN ${f##*/}: $(cat $f)"
done
dmesg | grep -i -E 'page tables isolation|Spectre V2 :|retbleed:|mitigation' | sed 's/^/CPU-DMESG /'
"#;

fn cpu_view(model: &str) -> support::Run {
    let dir = TempDir::new();
    let (kernel, initrd) = debian_guest(&dir, CPU_VIEW, &[]).expect("Debian assets");
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["run", "--accel", "emu", "--serial", "stdio", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .env("VMPLAY_EMU_CPU", model);
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_code(0);
    run
}

fn lines<'a>(run: &'a support::Run, prefix: &str) -> Vec<&'a str> {
    run.stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix))
        .collect()
}

#[test]
fn the_emu_cpu_is_one_linux_knows_does_not_speculate_and_cpuinfo_lists_what_it_implements() {
    if support::debian_asset("vmlinuz").is_none() {
        return;
    }
    let run = cpu_view("vmplay");
    // Exactly the flags of what emu implements.
    let flags = lines(&run, "CPU-FLAGS:");
    assert_eq!(flags, [format!(" {}", support::EMU_CPUINFO_FLAGS)], "{run}");
    // Family 6 model 0x1c stepping 10, caches as leaves 4 and 0x8000_0006 say.
    let info: Vec<String> = lines(&run, "CPU-INFO ")
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        info,
        [
            "cpu family: 6",
            "model: 28",
            "stepping: 10",
            "cache size: 512 KB"
        ],
        "{run}"
    );
    assert_eq!(
        lines(&run, "CPU-CACHE "),
        ["L1 Data 32K", "L1 Instruction 32K", "L2 Unified 512K"],
        "{run}"
    );
    // Every speculation issue Linux knows of: not affected, so no
    // mitigation runs (no page-table isolation, retpolines or RSB filling).
    let vulns = lines(&run, "CPU-VULN ");
    assert!(vulns.len() >= 10, "{run}");
    for v in &vulns {
        assert!(v.ends_with(": Not affected"), "{v}\n{run}");
    }
    assert!(vulns.contains(&"meltdown: Not affected"), "{run}");
    assert_eq!(lines(&run, "CPU-DMESG "), Vec::<&str>::new(), "{run}");

    // The older model, for contrast: the same kernel isolates page tables.
    let old = cpu_view("qemu64");
    let vulns = lines(&old, "CPU-VULN ");
    assert!(vulns.contains(&"meltdown: Mitigation: PTI"), "{old}");
    assert!(
        lines(&old, "CPU-DMESG ")
            .iter()
            .any(|l| l.contains("page tables isolation: enabled")),
        "{old}"
    );
}

/// Real userspace work for the tiers to agree on: a shell loop, hashing,
/// compression, fork+exec and small files, each printing a result the
/// test checks.
const WORKLOADS: &str = r#"#!/bin/sh
i=0; s=0; while [ $i -lt 3000 ]; do i=$((i+1)); s=$(((s*31+i)%1000003)); done; echo "WORK-SH $s"
echo "WORK-SHA $(dd if=/dev/zero bs=64k count=32 2>/dev/null | sha256sum | cut -c1-16)"
echo "WORK-GZ $(seq 1 20000 | gzip -1 | gzip -d | md5sum | cut -c1-16)"
n=0; for k in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do /bin/true && n=$((n+1)); done; echo "WORK-FORK $n"
mkdir -p /tmp/w; for k in $(seq 1 50); do echo "file $k" > /tmp/w/$k; done; echo "WORK-FILES $(cat /tmp/w/* | wc -l)"
"#;

fn run_workloads(tier: &str, env: &[(&str, &str)]) -> support::Run {
    let dir = TempDir::new();
    let (kernel, initrd) = debian_guest(&dir, WORKLOADS, &[]).expect("Debian assets");
    let mut cmd = Command::new(vmplay_exe());
    cmd.args([
        "run",
        "--accel",
        "emu",
        "--emu-tier",
        tier,
        "--memory",
        "256M",
    ])
    .args(["--serial", "stdio", "--kernel"])
    .arg(&kernel)
    .arg("--initrd")
    .arg(&initrd)
    .args(["--cmdline", "console=ttyS0 panic=-1 quiet"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_no_panic();
    run.assert_code(0);
    run
}

/// The expected results of [`WORKLOADS`], which are the same on any
/// correct x86-64 CPU.
fn assert_workload_results(run: &support::Run) {
    let s = (1..=3000u64).fold(0u64, |s, i| (s * 31 + i) % 1_000_003);
    for want in [
        format!("WORK-SH {s}"),
        "WORK-SHA 5647f05ec1895894".to_string(),
        "WORK-FORK 20".to_string(),
        "WORK-FILES 50".to_string(),
    ] {
        assert!(run.stdout.contains(&want), "no {want:?} in:\n{run}");
    }
    assert!(run.stdout.contains("WORK-GZ "), "{run}");
}

#[test]
fn debian_workloads_give_the_same_results_on_both_emu_tiers() {
    if support::debian_asset("vmlinuz").is_none() {
        return;
    }
    let interp = run_workloads("interp", &[]);
    assert_workload_results(&interp);
    let jit = run_workloads("jit", &[]);
    assert_workload_results(&jit);
    // And with the compiler thread: code installed whenever it is ready.
    let background = run_workloads("jit", &[("VMPLAY_EMU_JIT_BACKGROUND", "1")]);
    assert_workload_results(&background);
    let gz = |r: &support::Run| {
        r.stdout
            .lines()
            .find(|l| l.contains("WORK-GZ"))
            .map(str::to_string)
    };
    assert_eq!(gz(&interp), gz(&jit));
    assert_eq!(gz(&interp), gz(&background));
}

/// Co-simulation over a whole boot and the workloads: every translated
/// block's first runs are also run by the interpreter from the same
/// state, and none may differ.
#[test]
fn debian_boot_and_workloads_under_co_simulation_show_no_difference() {
    if support::debian_asset("vmlinuz").is_none() {
        return;
    }
    let run = run_workloads("jit", &[("VMPLAY_EMU_VERIFY", "1")]);
    assert_workload_results(&run);
    let verdict = run
        .stderr
        .lines()
        .find(|l| l.contains("emu verify: vCPU 0:"))
        .unwrap_or_else(|| panic!("no co-simulation verdict in:\n{run}"));
    let checked: u64 = verdict
        .split("vCPU 0: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(checked > 10_000, "too few blocks checked: {verdict}");
    assert!(verdict.ends_with(" 0 differed"), "{verdict}\n{run}");
    assert!(!run.stderr.contains("differs:"), "{run}");
}
