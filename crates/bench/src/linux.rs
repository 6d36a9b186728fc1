//! `linux-boot` and `workloads`: Debian's kernel booted to a busybox
//! `/init` under vmplay's software CPU and under QEMU TCG in the same run,
//! with the same kernel file, initramfs and command line.
//!
//! - `linux-boot`: the whole process from start to the guest's power-off,
//!   through the bzImage entry and the PVH entry (QEMU boots the ELF
//!   vmlinux unpacked from the same bzImage), with and without
//!   `cryptomgr.notests` (the crypto self-tests are a large part of boot).
//! - `workloads`: `/init` runs each workload of [`initramfs::WORKLOADS`]
//!   and prints its time on the guest clock.
//!
//! Guest instruction counts come from QEMU with a TCG plugin
//! (`crates/bench/tools/qemu-insn-count.c`, built here with `cc`), in
//! separate runs so the plugin's cost is not in any timing; a
//! workload's count is its run's total minus that of a run doing only
//! its untimed preparation. emu is credited with the same counts (it
//! runs the same guest code, give or take timing-dependent idle loops).

use crate::initramfs::{self, WORKLOADS};
use crate::measure::{self, RunResult};
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MEMORY_MIB: u32 = 512;
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// The bar: emu no slower than TCG.
const GOAL: f64 = 1.0;
const TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    BzImage,
    Pvh,
}

impl Entry {
    fn name(self) -> &'static str {
        match self {
            Entry::BzImage => "bzImage",
            Entry::Pvh => "PVH",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Emu,
    Tcg,
    /// QEMU TCG with the instruction-count plugin (not timed).
    TcgCount,
}

/// The files every run uses.
pub struct Assets {
    bzimage: PathBuf,
    vmlinux: PathBuf,
    initramfs: PathBuf,
    plugin: Option<PathBuf>,
}

impl Assets {
    pub fn prepare(ctx: &Ctx) -> Result<Assets, BenchError> {
        let dir = &ctx.debian;
        let bzimage = dir.join("vmlinuz");
        let busybox = dir.join("busybox");
        let hint = "run scripts/fetch-debian-kernel (or give --debian DIR)";
        let kernel = std::fs::read(&bzimage)
            .map_err(|e| BenchError::Run(format!("{}: {e}; {hint}", bzimage.display())))?;
        let bb = std::fs::read(&busybox)
            .map_err(|e| BenchError::Run(format!("{}: {e}; {hint}", busybox.display())))?;
        let image = vmplay_boot::bzimage::BzImage::parse(&kernel)
            .map_err(|e| BenchError::Guest(format!("{}: {e}", bzimage.display())))?;
        let payload = image
            .payload()
            .ok_or_else(|| BenchError::Guest("bzImage without a payload".into()))?;
        let elf = vmplay_boot::unpack::unpack(payload, 512 << 20)
            .map_err(|e| BenchError::Guest(format!("unpacking the bzImage payload: {e}")))?;
        let vmlinux = ctx.scratch.write("vmlinux", &elf)?;
        let initramfs = ctx.scratch.write(
            "workloads.cpio",
            &initramfs::build(&bb).map_err(guest_image)?,
        )?;
        let plugin = if ctx.insn_count {
            build_plugin(ctx)
        } else {
            None
        };
        Ok(Assets {
            bzimage,
            vmlinux,
            initramfs,
            plugin,
        })
    }
}

fn guest_image(e: vmplay_image::ImageError) -> BenchError {
    BenchError::Guest(e.to_string())
}

/// Builds the TCG instruction-count plugin, if a C compiler is here.
fn build_plugin(ctx: &Ctx) -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/qemu-insn-count.c");
    let out = ctx.scratch.dir.join("libinsncount.so");
    let ok = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(out)
    } else {
        report::note(&format!(
            "cannot build {} with cc: no instruction counts",
            src.display()
        ));
        None
    }
}

/// One guest boot: the process's times and the console text.
struct Boot {
    run: RunResult,
    console: String,
    count: Option<u64>,
}

fn cmdline(notests: bool, run: &str) -> String {
    let mut c = BASE_CMDLINE.to_string();
    if notests {
        c.push_str(" cryptomgr.notests");
    }
    c.push_str(" vmplay_run=");
    c.push_str(run);
    c
}

fn boot(
    ctx: &Ctx,
    a: &Assets,
    runner: Runner,
    entry: Entry,
    cmdline: &str,
) -> Result<Boot, BenchError> {
    let console = ctx.scratch.dir.join("console.txt");
    let count_file = ctx.scratch.dir.join("count.txt");
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&count_file);
    let mut cmd = match runner {
        Runner::Emu => {
            let mut c = Command::new(&ctx.vmplay);
            c.args(["run", "--accel", "emu", "--memory"])
                .arg(format!("{MEMORY_MIB}M"))
                .arg("--kernel")
                .arg(&a.bzimage)
                .arg("--kernel-entry")
                .arg(match entry {
                    Entry::BzImage => "bzimage",
                    Entry::Pvh => "pvh",
                })
                .arg("--initrd")
                .arg(&a.initramfs)
                .arg("--cmdline")
                .arg(cmdline)
                .arg("--serial")
                .arg(format!("file:{}", console.display()));
            c
        }
        Runner::Tcg | Runner::TcgCount => {
            let mut c = Command::new(&ctx.qemu);
            c.args([
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-smp", "1", "-m"])
            .arg(MEMORY_MIB.to_string())
            .arg("-kernel")
            .arg(match entry {
                Entry::BzImage => &a.bzimage,
                Entry::Pvh => &a.vmlinux,
            })
            .arg("-initrd")
            .arg(&a.initramfs)
            .arg("-append")
            .arg(cmdline)
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
            if runner == Runner::TcgCount {
                let plugin = a
                    .plugin
                    .as_ref()
                    .ok_or_else(|| BenchError::Run("no instruction-count plugin".to_string()))?;
                c.arg("-plugin")
                    .arg(format!("{},out={}", plugin.display(), count_file.display()))
                    .args(["-d", "plugin"]);
            }
            c
        }
    };
    let run = measure::run(&mut cmd, &ctx.scratch, "linux", TIMEOUT)?;
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    if run.status != 0 || !console_text.contains("vmplay-workload done") {
        let last: Vec<&str> = console_text.lines().rev().take(4).collect();
        return Err(BenchError::Run(format!(
            "{runner:?} {} boot: status {}, console ends {:?}, stderr {}",
            entry.name(),
            run.status,
            last,
            run.stderr_tail
        )));
    }
    let count = if runner == Runner::TcgCount {
        std::fs::read_to_string(&count_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    } else {
        None
    };
    Ok(Boot {
        run,
        console: console_text,
        count,
    })
}

fn count(ctx: &Ctx, a: &Assets, entry: Entry, cmdline: &str) -> Option<u64> {
    a.plugin.as_ref()?;
    match boot(ctx, a, Runner::TcgCount, entry, cmdline) {
        Ok(b) => b.count,
        Err(e) => {
            report::note(&format!("instruction count failed: {e}"));
            None
        }
    }
}

fn med(v: &[f64]) -> f64 {
    measure::median(&mut v.to_vec()).unwrap_or(f64::NAN)
}

fn reps(ctx: &Ctx) -> usize {
    if ctx.quick { 1 } else { ctx.reps }
}

fn mips(count: Option<u64>, secs: f64) -> String {
    match count {
        Some(n) if secs > 0.0 => format!("{:.0} MIPS", n as f64 / secs / 1e6),
        _ => "- MIPS".to_string(),
    }
}

fn emu_flags(entry: Entry) -> &'static str {
    match entry {
        Entry::BzImage => "--kernel-entry bzimage",
        Entry::Pvh => "--kernel-entry pvh",
    }
}

/// `linux-boot`: start to power-off, both entries, with and without the
/// crypto self-tests.
pub fn run_boot(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "linux-boot",
        "Debian's kernel to a busybox /init that powers off, emu vs QEMU TCG, same kernel, initramfs and cmdline",
    );
    let a = Assets::prepare(ctx)?;
    report::note(&format!(
        "vmplay: `{} run --accel emu --memory {MEMORY_MIB}M --kernel {} --kernel-entry bzimage|pvh --initrd INITRAMFS --cmdline C --serial file:F`",
        ctx.vmplay.display(),
        a.bzimage.display()
    ));
    report::note(&format!(
        "peer:   `{} -accel tcg -nodefaults -display none -no-reboot -smp 1 -m {MEMORY_MIB} -kernel bzImage|vmlinux -initrd INITRAMFS -append C -serial file:F` (PVH: the ELF unpacked from the same bzImage)",
        ctx.qemu.display()
    ));
    report::note(&format!(
        "C = \"{BASE_CMDLINE} [cryptomgr.notests] vmplay_run=none\"; times are the child's CPU (user+sys) and wall, start to exit; ratio = median of paired CPU ratios; MIPS = TCG-plugin instruction count / CPU time"
    ));
    let mut ok = true;
    for entry in [Entry::BzImage, Entry::Pvh] {
        for notests in [false, true] {
            let c = cmdline(notests, "none");
            let label = format!(
                "{}{}",
                entry.name(),
                if notests { ", cryptomgr.notests" } else { "" }
            );
            println!();
            println!("   boot `{label}` ({})", emu_flags(entry));
            if let Err(e) = boot_row(ctx, &a, entry, &c) {
                report::failed(&label, &e.to_string());
                ok = false;
            }
        }
    }
    if ok {
        Ok(())
    } else {
        Err(BenchError::Run("a boot row failed".into()))
    }
}

fn boot_row(ctx: &Ctx, a: &Assets, entry: Entry, c: &str) -> Result<(), BenchError> {
    let (mut ecpu, mut ewall, mut tcpu, mut twall, mut ratio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps(ctx) {
        let e = boot(ctx, a, Runner::Emu, entry, c)?.run;
        let t = boot(ctx, a, Runner::Tcg, entry, c)?.run;
        ecpu.push(e.cpu.as_secs_f64());
        ewall.push(e.wall.as_secs_f64());
        tcpu.push(t.cpu.as_secs_f64());
        twall.push(t.wall.as_secs_f64());
        ratio.push(e.cpu.as_secs_f64() / t.cpu.as_secs_f64());
    }
    let n = count(ctx, a, entry, c);
    let (ec, tc) = (med(&ecpu), med(&tcpu));
    report::figure(
        "vmplay --accel emu",
        &format!(
            "{:>7.2} s CPU  {:>7.2} s wall  {}",
            ec,
            med(&ewall),
            mips(n, ec)
        ),
    );
    report::figure(
        "qemu-system-x86_64 -accel tcg",
        &format!(
            "{:>7.2} s CPU  {:>7.2} s wall  {}",
            tc,
            med(&twall),
            mips(n, tc)
        ),
    );
    if let Some(n) = n {
        report::figure("guest instructions (TCG plugin)", &format!("{n}"));
    }
    report::ratio(
        "ratio emu/TCG, CPU time",
        med(&ratio),
        Goal { at_most: GOAL },
        "≤ 1",
    );
    Ok(())
}

/// `workloads`: each workload's guest-clock time under both.
pub fn run_workloads(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "workloads",
        "busybox workloads in Debian's kernel, timed by the guest clock, emu vs QEMU TCG in the same run",
    );
    let a = Assets::prepare(ctx)?;
    let entry = Entry::Pvh;
    let names: Vec<&str> = WORKLOADS.iter().map(|w| w.0).collect();
    let c = cmdline(true, &names.join(","));
    report::note(&format!(
        "both boot the PVH entry (as in linux-boot) with C = \"{c}\"; /init times each workload with /proc/uptime (10 ms steps)"
    ));
    report::note(
        "ratio = median over the paired runs of emu time / TCG time; MIPS = TCG-plugin count of the workload run minus that of a run doing only its untimed preparation, over the median time",
    );
    let mut e_ms: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut t_ms: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut r: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..reps(ctx) {
        let e = initramfs::parse_times(&boot(ctx, &a, Runner::Emu, entry, &c)?.console);
        let t = initramfs::parse_times(&boot(ctx, &a, Runner::Tcg, entry, &c)?.console);
        for (k, name) in names.iter().enumerate() {
            let get = |v: &[(String, f64)]| {
                v.iter()
                    .find(|(n, _)| n == name)
                    .map(|x| x.1)
                    .ok_or_else(|| BenchError::Run(format!("no time for workload {name}")))
            };
            let (em, tm) = (get(&e)?, get(&t)?);
            e_ms[k].push(em);
            t_ms[k].push(tm);
            r[k].push(em / tm.max(10.0));
        }
    }
    let base = |run: &str| count(ctx, &a, entry, &cmdline(true, run));
    let mut logs = 0.0;
    for (k, (name, what)) in WORKLOADS.iter().enumerate() {
        let prep = match *name {
            "sha256" => "prep16",
            "gzip" => "prep8",
            _ => "none",
        };
        let n = match (base(name), base(prep)) {
            (Some(w), Some(b)) => Some(w.saturating_sub(b)),
            _ => None,
        };
        let (em, tm) = (med(&e_ms[k]), med(&t_ms[k]));
        let ratio = med(&r[k]);
        logs += ratio.ln();
        println!();
        println!("   workload `{name}`: {what}");
        report::figure(
            "vmplay --accel emu",
            &format!("{em:>9.0} ms guest  {}", mips(n, em / 1e3)),
        );
        report::figure(
            "qemu-system-x86_64 -accel tcg",
            &format!("{tm:>9.0} ms guest  {}", mips(n, tm / 1e3)),
        );
        if let Some(n) = n {
            report::figure("guest instructions (TCG plugin)", &format!("{n}"));
        }
        report::ratio("ratio emu/TCG", ratio, Goal { at_most: GOAL }, "≤ 1");
    }
    println!();
    let geo = (logs / WORKLOADS.len() as f64).exp();
    report::ratio(
        "geometric mean of the ratios",
        geo,
        Goal { at_most: GOAL },
        "≤ 1",
    );
    Ok(())
}
