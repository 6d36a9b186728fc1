//! `vmplay-bench`: vmplay's benchmarks. Each one prints what it measured,
//! vmplay's figure, a peer's figure measured in the same run (or, where no
//! peer can run here, the peer's published figure), their ratio, the goal
//! and PASS/MISS.
//!
//! These are whole-process and whole-VM measurements taken with wall
//! clocks and rusage, repeated and reduced to medians; they are not tests
//! and assert nothing about speed. `scripts/bench` builds in release and
//! runs them; BENCHMARKS.md records the figures.

mod api;
mod block;
mod emu_loops;
mod guests;
mod initramfs;
mod kernels;
mod linux;
mod measure;
mod native;
mod net;
mod pio_exit;
mod prompt;
mod report;
mod start;

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmplay_devices::ports;

/// QEMU's isa-debug-exit port, which vmplay implements too.
pub const DEBUG_EXIT_PORT: u16 = ports::DEBUG_EXIT_PORT;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("assembling a guest: {0}")]
    Asm(#[from] iced_x86::IcedError),
    #[error("guest image: {0}")]
    Guest(String),
    #[error("{0}: {1}")]
    Host(&'static str, #[source] std::io::Error),
    #[error("{}: {}", .0.display(), .1)]
    File(PathBuf, #[source] std::io::Error),
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("killed after {0:?} without exiting (stderr: {1})")]
    Timeout(Duration, String),
    #[error("reading smaps: {0}")]
    Smaps(String),
    #[error("{0}")]
    Run(String),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Bench {
    /// Every benchmark below.
    All,
    /// Port-I/O exit round trip through the vmplay vCPU loop and bus vs a bare kvm-ioctls loop.
    PioExit,
    /// VMM start to first guest instruction (CPU ms) and VMM resident memory vs Firecracker's published figures.
    Start,
    /// Guest instructions/s of the emu backend vs QEMU TCG and native, on three loops.
    EmuLoops,
    /// virtio-blk sequential and random I/O under Debian's kernel on emu vs QEMU TCG.
    Block,
    /// Firecracker API: process start to socket accepting (CPU ms) and GET / latency.
    Api,
    /// Debian's kernel to /init and power-off (bzImage and PVH entry) under emu vs QEMU TCG.
    LinuxBoot,
    /// Busybox workloads in Debian's kernel, timed by the guest clock, emu vs QEMU TCG.
    Workloads,
    /// virtio-net TCP throughput each way over a TAP under Debian's kernel on emu vs QEMU TCG (needs root).
    Net,
    /// The README's first command: `vmplay image debian` cold and warm, boot to the shell prompt, emu vs QEMU TCG and vs emu's older CPU model.
    Prompt,
}

#[derive(Parser)]
#[command(
    name = "vmplay-bench",
    about = "vmplay's benchmarks, each a ratio to a peer measured in the same run"
)]
struct Cli {
    /// Which benchmarks to run.
    #[arg(value_enum, default_value = "all")]
    bench: Vec<Bench>,
    /// The vmplay binary to measure [default: `vmplay` next to this program].
    #[arg(long, value_name = "PATH")]
    vmplay: Option<PathBuf>,
    /// The QEMU binary for the TCG peer.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Smaller workloads for a quick smoke run (figures are noisier).
    #[arg(long)]
    quick: bool,
    /// emu-loops only: which loops (default all).
    #[arg(long = "loop", value_name = "int|mem|bignum")]
    loops: Vec<String>,
    /// linux-boot and workloads: the directory with Debian's `vmlinuz` and static `busybox`
    /// (scripts/fetch-debian-kernel fills guest-assets/debian).
    #[arg(long, value_name = "DIR", default_value = "guest-assets/debian")]
    debian: PathBuf,
    /// linux-boot and workloads: skip the extra QEMU runs that count guest instructions.
    #[arg(long)]
    no_insn_count: bool,
    /// Instead of benchmarking, write every benchmark guest into DIR (to
    /// run one by hand under vmplay or QEMU) and exit.
    #[arg(long, value_name = "DIR")]
    write_guests: Option<PathBuf>,
}

/// Writes each guest as DIR/<name>.elf; the loop guests run n = 1000.
/// With Debian's busybox in `debian`, also DIR/workloads.cpio.
fn write_guests(dir: &std::path::Path, debian: &std::path::Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::File(dir.to_path_buf(), e))?;
    let mut images = vec![
        (
            "pio-exit-1000".to_string(),
            guests::pio_loop(1000, pio_exit::PORT)?,
        ),
        ("start-exit".to_string(), guests::exit_at_once()?),
        ("start-idle".to_string(), guests::idle_forever()?),
    ];
    for kind in kernels::LoopKind::ALL {
        let n = 1000;
        let expected = native::NativeLoop::new(kind)?.run(n).0;
        images.push((
            format!("loop-{}-{n}", kind.name()),
            guests::long_mode_loop(kind, n, expected)?,
        ));
    }
    for (name, image) in images {
        let path = dir.join(format!("{name}.elf"));
        std::fs::write(&path, image).map_err(|e| BenchError::File(path.clone(), e))?;
        println!("{}", path.display());
    }
    if let Ok(busybox) = std::fs::read(debian.join("busybox")) {
        let path = dir.join("workloads.cpio");
        let image = initramfs::build(&busybox).map_err(|e| BenchError::Guest(e.to_string()))?;
        std::fs::write(&path, image).map_err(|e| BenchError::File(path.clone(), e))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// What every benchmark gets.
pub struct Ctx {
    pub vmplay: PathBuf,
    pub qemu: PathBuf,
    pub reps: usize,
    pub quick: bool,
    pub loops: Vec<kernels::LoopKind>,
    pub debian: PathBuf,
    pub insn_count: bool,
    pub scratch: measure::Scratch,
}

fn default_vmplay() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vmplay")))
        .unwrap_or_else(|| PathBuf::from("vmplay"))
}

/// The 1, 5 and 15 minute load averages: how busy the shared host was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut loops = Vec::new();
    for name in &cli.loops {
        match kernels::LoopKind::ALL.iter().find(|k| k.name() == name) {
            Some(k) => loops.push(*k),
            None => {
                eprintln!("vmplay-bench: --loop {name:?}: expected int, mem or bignum");
                return ExitCode::from(2);
            }
        }
    }
    if loops.is_empty() {
        loops = kernels::LoopKind::ALL.to_vec();
    }
    if cli.reps == 0 {
        eprintln!("vmplay-bench: --reps must be at least 1");
        return ExitCode::from(2);
    }
    if let Some(dir) = &cli.write_guests {
        return match write_guests(dir, &cli.debian) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmplay-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let scratch = match measure::Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmplay-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = Ctx {
        vmplay: cli.vmplay.unwrap_or_else(default_vmplay),
        qemu: cli.qemu,
        reps: cli.reps,
        quick: cli.quick,
        loops,
        debian: cli.debian,
        insn_count: !cli.no_insn_count,
        scratch,
    };
    let mut benches = cli.bench;
    if benches.contains(&Bench::All) {
        benches = vec![
            Bench::PioExit,
            Bench::Start,
            Bench::EmuLoops,
            Bench::Block,
            Bench::Api,
            Bench::LinuxBoot,
            Bench::Workloads,
            Bench::Net,
            Bench::Prompt,
        ];
    }
    benches.dedup();
    println!(
        "vmplay-bench: vmplay = {}, reps = {}{}",
        ctx.vmplay.display(),
        ctx.reps,
        if ctx.quick { ", quick" } else { "" }
    );
    println!("host: {} CPUs, load average {}", cpus(), loadavg());
    let mut ok = true;
    for bench in benches {
        let (name, result) = match bench {
            Bench::PioExit => ("pio-exit", pio_exit::run(&ctx)),
            Bench::Start => ("start", start::run(&ctx)),
            Bench::EmuLoops => ("emu-loops", emu_loops::run(&ctx)),
            Bench::Block => ("block", block::run(&ctx)),
            Bench::Api => ("api", api::run(&ctx)),
            Bench::LinuxBoot => ("linux-boot", linux::run_boot(&ctx)),
            Bench::Workloads => ("workloads", linux::run_workloads(&ctx)),
            Bench::Net => ("net", net::run(&ctx)),
            Bench::Prompt => ("prompt", prompt::run(&ctx)),
            Bench::All => unreachable!("expanded above"),
        };
        if let Err(e) = result {
            report::failed(name, &e.to_string());
            ok = false;
        }
    }
    println!();
    println!("host load average at the end: {}", loadavg());
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
