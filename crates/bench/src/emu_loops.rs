//! `emu-loops`: guest instructions per second of vmplay's software CPU on
//! three loops, against QEMU TCG running the same guest and against the
//! same loop body run natively, all measured in this run.
//!
//! Each figure is n × (instructions per iteration) / (t(2n) − t(n)): the
//! difference of two whole runs cancels VMM start, guest boot, the switch
//! to 64-bit mode and teardown, leaving n iterations of the loop. n is
//! grown until that difference is long enough to time reliably.
//!
//! t is taken twice: CPU time (the child's user+sys from wait4; the
//! calling thread's for native) and wall time. The goal is judged on CPU
//! time, which other load on a shared host does not inflate; on an idle
//! host the two agree for these single-vCPU runs.

use crate::guests::{self, EXIT_OK, EXIT_WRONG_RESULT, exit_status};
use crate::kernels::LoopKind;
use crate::measure::{self, RunResult};
use crate::native::NativeLoop;
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// Guest RAM for both VMMs (QEMU's default, and plenty for the guests).
const GUEST_MEMORY: &str = "128M";
/// The goal (issue 8's bar): emu no slower than TCG on each loop.
const GOAL_VS_TCG: f64 = 1.0;
/// A guest run may take this long on top of 3x what the runner's pace so
/// far predicts; past that it is treated as hung and killed.
const RUN_SLACK: Duration = Duration::from_secs(60);

/// A runner's observed pace, so a hung run is caught in proportion to
/// how long a healthy one takes.
#[derive(Default)]
struct Pace {
    secs_per_iter: Option<f64>,
}

impl Pace {
    fn timeout(&self, n: u64) -> Duration {
        let predicted = self.secs_per_iter.map_or(0.0, |s| s * n as f64);
        RUN_SLACK + Duration::from_secs_f64(3.0 * predicted)
    }

    fn observe(&mut self, n: u64, wall: Duration) {
        self.secs_per_iter = Some(wall.as_secs_f64() / n as f64);
    }
}

/// Who runs a guest image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Emu,
    Tcg,
}

impl Runner {
    fn label(self) -> &'static str {
        match self {
            Runner::Emu => "vmplay --accel emu",
            Runner::Tcg => "qemu-system-x86_64 -accel tcg",
        }
    }
}

/// One loop's native checksums by n, so each guest can be checked.
struct Checksums {
    native: NativeLoop,
    by_n: HashMap<u64, u64>,
}

impl Checksums {
    fn get(&mut self, n: u64) -> u64 {
        *self.by_n.entry(n).or_insert_with(|| self.native.run(n).0)
    }
}

/// Δt targets: the difference must be at least this long to count.
fn target(ctx: &Ctx) -> Duration {
    if ctx.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(1500)
    }
}

/// How much to grow n after a difference `d` that was shorter than `want`.
fn growth(d: Duration, want: Duration) -> u64 {
    if d.is_zero() {
        return 16;
    }
    let f = (want.as_secs_f64() * 1.3 / d.as_secs_f64()).ceil();
    (f as u64).clamp(2, 16)
}

fn run_guest(
    ctx: &Ctx,
    runner: Runner,
    kind: LoopKind,
    n: u64,
    sums: &mut Checksums,
    pace: &mut Pace,
) -> Result<RunResult, BenchError> {
    let image = guests::long_mode_loop(kind, n, sums.get(n))?;
    let name = format!("{}-{n}.elf", kind.name());
    let path = ctx.scratch.write(&name, &image)?;
    let mut cmd = match runner {
        Runner::Emu => {
            let mut c = Command::new(&ctx.vmplay);
            c.args(["run", "--accel", "emu", "--serial", "none", "--memory"])
                .arg(GUEST_MEMORY)
                .arg("--kernel")
                .arg(&path);
            c
        }
        Runner::Tcg => {
            let mut c = Command::new(&ctx.qemu);
            c.args(["-accel", "tcg", "-kernel"]).arg(&path).args([
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-nographic",
                "-no-reboot",
                "-m",
                GUEST_MEMORY,
            ]);
            c
        }
    };
    let r = measure::run(&mut cmd, &ctx.scratch, &name, pace.timeout(n));
    let _ = std::fs::remove_file(&path);
    let r = r?;
    pace.observe(n, r.wall);
    if r.status == exit_status(EXIT_OK) {
        Ok(r)
    } else if r.status == exit_status(EXIT_WRONG_RESULT) {
        Err(BenchError::Run(format!(
            "wrong result: the guest's checksum for n={n} differs from the native run's"
        )))
    } else {
        Err(BenchError::Run(format!(
            "exit status {} (expected {} from the guest's debug-exit){}",
            r.status,
            exit_status(EXIT_OK),
            if r.stderr_tail.is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", r.stderr_tail)
            }
        )))
    }
}

/// t(2n) − t(n) in CPU and wall time.
#[derive(Debug, Clone, Copy)]
struct Delta {
    cpu: Duration,
    wall: Duration,
}

impl Delta {
    fn between(one: (Duration, Duration), two: (Duration, Duration)) -> Delta {
        Delta {
            cpu: two.0.saturating_sub(one.0),
            wall: two.1.saturating_sub(one.1),
        }
    }
}

/// One sample of a guest runner.
fn sample(
    ctx: &Ctx,
    runner: Runner,
    kind: LoopKind,
    n: u64,
    sums: &mut Checksums,
    pace: &mut Pace,
) -> Result<Delta, BenchError> {
    let one = run_guest(ctx, runner, kind, n, sums, pace)?;
    let two = run_guest(ctx, runner, kind, 2 * n, sums, pace)?;
    Ok(Delta::between((one.cpu, one.wall), (two.cpu, two.wall)))
}

/// One sample of the native loop.
fn native_sample(native: &mut NativeLoop, n: u64) -> Result<Delta, BenchError> {
    let mut timed = |n| -> Result<(Duration, Duration), BenchError> {
        let cpu0 = measure::thread_cpu()?;
        let (_, wall) = native.run(n);
        Ok((measure::thread_cpu()?.saturating_sub(cpu0), wall))
    };
    let one = timed(n)?;
    let two = timed(2 * n)?;
    Ok(Delta::between(one, two))
}

/// Measured rates, instructions per second, and what they came from.
struct Rate {
    cpu_per_sec: f64,
    wall_per_sec: f64,
    n: u64,
    delta_cpu: f64,
}

/// One runner's samples at its calibrated n.
struct Series {
    n: u64,
    insns_per_iter: u64,
    deltas: Vec<Delta>,
}

impl Series {
    /// Instructions per CPU second of sample `i`.
    fn cpu_rate(&self, i: usize) -> f64 {
        (self.n * self.insns_per_iter) as f64 / self.deltas[i].cpu.as_secs_f64()
    }

    /// Median rates over the samples.
    fn rate(&self) -> Result<Rate, BenchError> {
        let mut cpu: Vec<f64> = self.deltas.iter().map(|d| d.cpu.as_secs_f64()).collect();
        let mut wall: Vec<f64> = self.deltas.iter().map(|d| d.wall.as_secs_f64()).collect();
        let cpu = measure::median(&mut cpu).unwrap_or(f64::NAN);
        let wall = measure::median(&mut wall).unwrap_or(f64::NAN);
        if !(cpu > 0.0 && wall > 0.0) {
            return Err(BenchError::Run("t(2n) ≤ t(n): the timing is noise".into()));
        }
        let insns = (self.n * self.insns_per_iter) as f64;
        Ok(Rate {
            cpu_per_sec: insns / cpu,
            wall_per_sec: insns / wall,
            n: self.n,
            delta_cpu: cpu,
        })
    }
}

/// Median over paired samples of `slow`'s slowdown against `fast`.
fn paired_slowdown(fast: &Series, slow: &Series) -> f64 {
    let mut v: Vec<f64> = (0..fast.deltas.len().min(slow.deltas.len()))
        .map(|i| fast.cpu_rate(i) / slow.cpu_rate(i))
        .collect();
    measure::median(&mut v).unwrap_or(f64::NAN)
}

/// Grows n until the CPU t(2n) − t(n) is at least `want`; the sample
/// that qualified is the series' first.
fn calibrate(
    want: Duration,
    insns_per_iter: u64,
    mut sample: impl FnMut(u64) -> Result<Delta, BenchError>,
) -> Result<Series, BenchError> {
    let stuck =
        || BenchError::Run("the run time does not grow with n: is the loop running?".into());
    // Start at ~10M instructions: quick on any backend worth measuring.
    let mut n = (10_000_000 / insns_per_iter).max(1);
    loop {
        let d = sample(n)?;
        if d.cpu >= want {
            return Ok(Series {
                n,
                insns_per_iter,
                deltas: vec![d],
            });
        }
        n = n.checked_mul(growth(d.cpu, want)).ok_or_else(stuck)?;
        if n > 1 << 40 {
            return Err(stuck());
        }
    }
}

/// Adds one sample to a series that is still healthy; a failure ends it.
fn extend(
    series: &mut Result<Series, BenchError>,
    sample: impl FnOnce(u64) -> Result<Delta, BenchError>,
) {
    if let Ok(s) = series {
        match sample(s.n) {
            Ok(d) => s.deltas.push(d),
            Err(e) => *series = Err(e),
        }
    }
}

fn mips(r: &Rate) -> String {
    format!(
        "{:>8.1} M insn/s CPU  {:>8.1} wall   (n = {}, CPU t(2n)-t(n) = {})",
        r.cpu_per_sec / 1e6,
        r.wall_per_sec / 1e6,
        r.n,
        report::ms(r.delta_cpu)
    )
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "emu-loops",
        "guest instructions/s, multiboot guest in 64-bit mode; rate = n*insns/iter / (t(2n) - t(n)), median",
    );
    report::note(&format!(
        "vmplay: `{} run --accel emu --serial none --memory {GUEST_MEMORY} --kernel G`",
        ctx.vmplay.display()
    ));
    report::note(&format!(
        "peer:   `{} -accel tcg -kernel G -device isa-debug-exit,iobase=0xf4,iosize=4 -nographic -no-reboot -m {GUEST_MEMORY}`",
        ctx.qemu.display()
    ));
    report::note("native: the same loop code in an executable mmap, called in-process");
    report::note(
        "CPU = the child's user+sys (wait4 rusage), or the calling thread's for native; the goal is on CPU",
    );
    report::note(&format!(
        "each runner's n is calibrated alone (its qualifying sample is the first of {}), then the runners alternate; slowdowns are medians of the paired samples",
        ctx.reps
    ));
    report::note(
        "every guest checks its checksum against the native run's and exits 0x21 only if equal",
    );
    let want = target(ctx);
    for &kind in &ctx.loops {
        let native = NativeLoop::new(kind)?;
        let per_iter = native.insns_per_iter;
        let mut sums = Checksums {
            native,
            by_n: HashMap::new(),
        };
        println!();
        println!(
            "   loop `{}`: {} ({per_iter} insns/iter)",
            kind.name(),
            kind.description()
        );
        let mut native = NativeLoop::new(kind)?;
        let (mut tcg_pace, mut emu_pace) = (Pace::default(), Pace::default());
        let mut native_s = calibrate(want / 4, per_iter, |n| native_sample(&mut native, n));
        let mut tcg = calibrate(want, per_iter, |n| {
            sample(ctx, Runner::Tcg, kind, n, &mut sums, &mut tcg_pace)
        });
        let mut emu = calibrate(want, per_iter, |n| {
            sample(ctx, Runner::Emu, kind, n, &mut sums, &mut emu_pace)
        });
        for _ in 1..ctx.reps {
            extend(&mut emu, |n| {
                sample(ctx, Runner::Emu, kind, n, &mut sums, &mut emu_pace)
            });
            extend(&mut tcg, |n| {
                sample(ctx, Runner::Tcg, kind, n, &mut sums, &mut tcg_pace)
            });
            extend(&mut native_s, |n| native_sample(&mut native, n));
        }
        for (who, series) in [
            (Runner::Emu.label(), &emu),
            (Runner::Tcg.label(), &tcg),
            ("native", &native_s),
        ] {
            match series
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|s| s.rate().map_err(|e| e.to_string()))
            {
                Ok(r) => report::figure(who, &mips(&r)),
                Err(e) => report::failed(who, &e),
            }
        }
        match (&emu, &tcg) {
            (Ok(e), Ok(t)) => report::ratio(
                "emu slowdown vs TCG (CPU)",
                paired_slowdown(t, e),
                Goal {
                    at_most: GOAL_VS_TCG,
                },
                "≤ 1 (emu at least as fast as TCG)",
            ),
            _ => report::failed("emu slowdown vs TCG", "needs both rates"),
        }
        match (&emu, &native_s) {
            (Ok(e), Ok(n)) => {
                report::ratio_info("emu slowdown vs native (CPU)", paired_slowdown(n, e))
            }
            _ => report::failed("emu slowdown vs native", "needs both rates"),
        }
        if let (Ok(t), Ok(n)) = (&tcg, &native_s) {
            report::ratio_info("TCG slowdown vs native (context)", paired_slowdown(n, t));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_scales_with_the_observed_pace() {
        let mut pace = Pace::default();
        assert_eq!(pace.timeout(1_000_000), RUN_SLACK);
        pace.observe(1000, Duration::from_secs(2));
        assert_eq!(pace.timeout(16_000), RUN_SLACK + Duration::from_secs(96));
    }

    #[test]
    fn growth_aims_past_the_target_within_bounds() {
        let want = Duration::from_secs(1);
        assert_eq!(growth(Duration::ZERO, want), 16);
        assert_eq!(growth(Duration::from_millis(500), want), 3);
        assert_eq!(growth(Duration::from_millis(900), want), 2);
        assert_eq!(growth(Duration::from_millis(1), want), 16);
    }

    #[test]
    fn calibration_grows_n_until_the_difference_is_long_enough() {
        // A fake backend: 1 ns of CPU (2 ns wall) per instruction, 10 insns/iter.
        let mut seen = Vec::new();
        let s = calibrate(Duration::from_millis(50), 10, |n| {
            seen.push(n);
            let t = Duration::from_nanos(10 * n);
            Ok(Delta {
                cpu: t,
                wall: 2 * t,
            })
        })
        .unwrap();
        assert!(seen.len() >= 2 && seen.windows(2).all(|w| w[1] > w[0]));
        let r = s.rate().unwrap();
        assert!(r.delta_cpu >= 0.05);
        assert!((r.cpu_per_sec - 1e9).abs() < 1.0, "{}", r.cpu_per_sec);
        assert!((r.wall_per_sec - 0.5e9).abs() < 1.0, "{}", r.wall_per_sec);
    }

    #[test]
    fn calibration_gives_up_on_a_loop_whose_time_never_grows() {
        let r = calibrate(Duration::from_millis(50), 10, |_| {
            Ok(Delta {
                cpu: Duration::ZERO,
                wall: Duration::ZERO,
            })
        });
        assert!(r.is_err());
    }

    #[test]
    fn slowdown_is_the_median_of_paired_rate_ratios() {
        let series = |n, cpus_ms: &[u64]| Series {
            n,
            insns_per_iter: 1,
            deltas: cpus_ms
                .iter()
                .map(|&ms| Delta {
                    cpu: Duration::from_millis(ms),
                    wall: Duration::from_millis(ms),
                })
                .collect(),
        };
        // fast: 1000 iters per ms; slow: 100 iters in 4, 8, 5 ms, i.e. 40x, 80x, 50x slower.
        let fast = series(1000, &[1, 1, 1]);
        let slow = series(100, &[4, 8, 5]);
        let d = paired_slowdown(&fast, &slow);
        assert!((d - 50.0).abs() < 1e-9, "{d}");
    }

    #[test]
    fn a_failed_sample_ends_the_series() {
        let mut s: Result<Series, BenchError> = Ok(Series {
            n: 5,
            insns_per_iter: 1,
            deltas: vec![],
        });
        extend(&mut s, |_| Err(BenchError::Run("boom".into())));
        assert!(s.is_err());
        extend(&mut s, |_| panic!("a failed series is not sampled again"));
    }
}
