//! `block`: virtio-blk throughput under Debian's kernel on emu, against
//! QEMU TCG (`-M microvm` with a virtio-mmio block device) in the same
//! run, with the same kernel, initramfs and disk image. The guest runs
//! `tools/blkbench.c` (built here with `cc -static`): 64 MiB sequential
//! read and write in 1 MiB O_DIRECT requests (dd's `iflag=direct` pattern)
//! and 4 KiB random O_DIRECT reads, timed on the guest clock; then the
//! sequential read again, warm, reported beside it without a goal (the
//! first pass is the figure: it includes getting the read path hot).

use crate::measure;
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DISK_MIB: u64 = 160;
const RANDOM_READS: u32 = 2000;
const TIMEOUT: Duration = Duration::from_secs(900);
/// A QEMU run that still crawls is cut short and retried.
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);
const QEMU_TRIES: usize = 3;
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// emu's virtual TSC runs at 2 GHz.
const EMU_TSC_KHZ: u64 = 2_000_000;

/// Each peer is told its own TSC rate (`tsc_early_khz`): QEMU's microvm has
/// no HPET or PM timer, and under TCG on a loaded host its PIT calibration
/// of the TSC fails and boot crawls. TCG's TSC is the host's, so QEMU gets
/// the host's rate (a wrong rate would skew the guest-clock figures).
fn cmdline(tsc_khz: u64) -> String {
    format!("{CMDLINE} tsc_early_khz={tsc_khz}")
}

/// The host TSC rate from /proc/cpuinfo's `cpu MHz`.
fn host_tsc_khz() -> Result<u64, BenchError> {
    let text = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| BenchError::File("/proc/cpuinfo".into(), e))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .ok_or_else(|| BenchError::Run("no `cpu MHz` in /proc/cpuinfo".into()))
}
/// Boots of each peer at most (`--reps`).
const MAX_REPS: usize = 5;
/// The bar: emu at least as fast as TCG on each figure.
const GOAL: Goal = Goal { at_most: 1.0 };

#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    seq_read: f64,
    seq_write: f64,
    rand_read: f64,
    /// The sequential read once more, after everything else.
    seq_read_warm: f64,
}

fn parse(console: &str) -> Option<Figures> {
    let line = console.lines().find(|l| l.contains("vmplay-block "))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let at = f.iter().position(|w| *w == "vmplay-block")?;
    let num = |i: usize| f.get(at + i)?.parse::<f64>().ok();
    Some(Figures {
        seq_read: num(2)?,
        seq_write: num(4)?,
        rand_read: num(6)?,
        seq_read_warm: (f.get(at + 8) == Some(&"seqread2"))
            .then(|| num(9))
            .flatten()?,
    })
}

struct Assets {
    kernel: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
}

fn prepare(ctx: &Ctx) -> Result<Assets, BenchError> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian");
    let assets = vmplay_image::DebianAssets::open(&cache)
        .map_err(|e| BenchError::Run(format!("{e}; run scripts/fetch-debian-kernel")))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/blkbench.c");
    let exe = ctx.scratch.dir.join("blkbench");
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| BenchError::Spawn("cc".into(), e))?;
    if !out.status.success() {
        return Err(BenchError::Run(format!(
            "cc -static {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let exe_bytes = std::fs::read(&exe).map_err(|e| BenchError::File(exe.clone(), e))?;
    let hook = format!("#!/bin/sh\n/bin/blkbench /dev/vda {RANDOM_READS}\n");
    let initramfs = ctx.scratch.dir.join("block.cpio");
    vmplay_image::Initramfs::debian(&assets)
        .and_then(|i| {
            i.file(vmplay_image::RUN_HOOK, hook, 0o755)
                .file("/bin/blkbench", exe_bytes, 0o755)
                .write(&initramfs)
        })
        .map_err(|e| BenchError::Guest(e.to_string()))?;
    // Real bytes, not a sparse file: reads must come from the page cache,
    // as they would from a used disk.
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut disk_bytes = Vec::with_capacity((DISK_MIB << 20) as usize);
    for _ in 0..DISK_MIB {
        disk_bytes.extend_from_slice(&block);
    }
    let disk = ctx.scratch.write("disk.img", &disk_bytes)?;
    Ok(Assets {
        kernel: assets.kernel().to_path_buf(),
        initramfs,
        disk,
    })
}

fn run_once(ctx: &Ctx, a: &Assets, qemu: bool) -> Result<Figures, BenchError> {
    let console = ctx.scratch.dir.join("block-console.txt");
    let _ = std::fs::remove_file(&console);
    let mut cmd = if qemu {
        let mut c = Command::new(&ctx.qemu);
        c.args([
            "-M",
            "microvm,acpi=on,pit=on,pic=on,rtc=on",
            "-accel",
            "tcg",
        ])
        .args([
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initramfs)
        .arg("-append")
        .arg(cmdline(host_tsc_khz()?))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,cache=writeback",
            a.disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()));
        c
    } else {
        let mut c = Command::new(&ctx.vmplay);
        c.args(["run", "--accel", "emu", "--memory", "512M"])
            .arg("--kernel")
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initramfs)
            .arg("--cmdline")
            .arg(cmdline(EMU_TSC_KHZ))
            .arg("--drive")
            .arg(format!("path={},cache=writeback", a.disk.display()))
            .arg("--serial")
            .arg(format!("file:{}", console.display()));
        c
    };
    let timeout = if qemu { QEMU_TIMEOUT } else { TIMEOUT };
    let run = measure::run(&mut cmd, &ctx.scratch, "block", timeout)?;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    parse(&text).ok_or_else(|| {
        BenchError::Run(format!(
            "{}: status {}, no result line; console ends {:?}; stderr {}",
            if qemu { "QEMU TCG" } else { "vmplay emu" },
            run.status,
            text.lines().rev().take(3).collect::<Vec<_>>(),
            run.stderr_tail
        ))
    })
}

/// The emu/TCG time ratio of each pair of runs made back to back: the
/// host's speed drifts by tens of percent between minutes, which a pair
/// shares and the medians do not show.
fn paired(emu: &[Figures], tcg: &[Figures], get: fn(&Figures) -> f64) -> String {
    emu.iter()
        .zip(tcg)
        .map(|(e, t)| format!("{:.3}", get(e) / get(t)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    measure::median(&mut v.collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "block",
        "virtio-blk under Debian's kernel: emu vs QEMU TCG (microvm, virtio-mmio), guest-clock times",
    );
    let a = prepare(ctx)?;
    let reps = if ctx.quick { 1 } else { ctx.reps.min(MAX_REPS) };
    let mut emu = Vec::new();
    let mut tcg = Vec::new();
    for _ in 0..reps {
        emu.push(run_once(ctx, &a, false)?);
        let mut tries = 0;
        tcg.push(loop {
            tries += 1;
            match run_once(ctx, &a, true) {
                Ok(f) => break f,
                Err(e) if tries < QEMU_TRIES => {
                    report::note(&format!("QEMU TCG run {tries} failed, retrying: {e}"))
                }
                Err(e) => return Err(e),
            }
        });
    }
    type Row = (&'static str, fn(&Figures) -> f64, f64, &'static str);
    let rows: [Row; 3] = [
        ("sequential read 64 MiB", |f| f.seq_read, 64.0, "MiB/s"),
        ("sequential write 64 MiB", |f| f.seq_write, 64.0, "MiB/s"),
        (
            "random 4 KiB reads",
            |f| f.rand_read,
            RANDOM_READS.into(),
            "IOPS",
        ),
    ];
    for (name, get, work, unit) in rows {
        let e = median(emu.iter().map(get));
        let t = median(tcg.iter().map(get));
        report::figure(
            &format!("{name}: vmplay emu"),
            &format!("{:.1} {unit}", work / e),
        );
        report::figure(
            &format!("{name}: QEMU TCG"),
            &format!("{:.1} {unit}", work / t),
        );
        report::ratio(&format!("{name}: time emu / TCG"), e / t, GOAL, "<= 1.0");
        if reps > 1 {
            report::note(&format!(
                "{name}: each pair run back to back: {}",
                paired(&emu, &tcg, get)
            ));
        }
    }
    let warm = |v: &[Figures]| median(v.iter().map(|f| f.seq_read_warm));
    let (e, t) = (warm(&emu), warm(&tcg));
    report::figure(
        "sequential read again, warm: vmplay emu",
        &format!("{:.1} MiB/s", 64.0 / e),
    );
    report::figure(
        "sequential read again, warm: QEMU TCG",
        &format!("{:.1} MiB/s", 64.0 / t),
    );
    report::ratio_info("sequential read again, warm: time emu / TCG", e / t);
    report::note(&format!(
        "medians of {reps} boots each; {RANDOM_READS} random reads over 128 MiB; the warm \
         read (the same 64 MiB after the rest) has no goal: the first pass is the figure"
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_ratios_of_runs_made_together() {
        let f = |r| Figures {
            seq_read: r,
            seq_write: 1.0,
            rand_read: 1.0,
            seq_read_warm: 1.0,
        };
        let got = paired(&[f(0.04), f(0.03)], &[f(0.02), f(0.04)], |x| x.seq_read);
        assert_eq!(got, "2.000 0.750");
    }

    #[test]
    fn reads_the_guest_result_line() {
        let f =
            parse("[ 1.0] x\nvmplay-block seqread 0.5000 seqwrite 0.2500 randread 2.0000 2000 seqread2 0.1250\n")
                .unwrap();
        assert_eq!(
            f,
            Figures {
                seq_read: 0.5,
                seq_write: 0.25,
                rand_read: 2.0,
                seq_read_warm: 0.125,
            }
        );
        assert!(parse("vmplay-block seqread x").is_none());
        // A guest program without the warm pass is an error, not a 0.
        assert!(parse("vmplay-block seqread 0.5 seqwrite 0.25 randread 2.0 2000\n").is_none());
    }
}
