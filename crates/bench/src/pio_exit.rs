//! `pio-exit`: the cost of one port-I/O exit round trip through vmplay's
//! whole exit path (KVM backend → vCPU loop → port bus → device), against
//! a bare kvm-ioctls loop serving the same exits (`vmplay_kvm::raw_loop`),
//! both in this process, in this run.
//!
//! vmplay's side builds a `Machine` in-process with a multiboot guest that
//! does n × `out` to the POST port (a sink device on the bus) and then
//! writes the debug-exit port; the peer runs its own guest doing n `out`s.
//! Per exit = (t(2n) − t(n)) / n for each, which cancels VM creation, boot
//! and teardown. t is taken twice: wall time, and this process's CPU time
//! (user + sys of all threads, from getrusage), which the vCPU thread's
//! `KVM_RUN` is charged to. The goal is judged on CPU time: on a shared
//! 2-core host, wall time also measures who else was running.

use crate::guests::{self, EXIT_OK};
use crate::measure;
use crate::measure::process_cpu;
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::time::{Duration, Instant};
use vmplay_devices::ports;
use vmplay_machine::{KernelEntry, Machine, MachineConfig, SerialMode, StopReason};

/// The port the guest writes: the POST port, a sink device on vmplay's bus.
pub const PORT: u16 = ports::POST_PORT;
const GUEST_MEMORY: u64 = 128 << 20;
/// The goal: vmplay's exit at most 5% dearer than the bare loop's.
const GOAL: f64 = 1.05;
/// At least this many pairs: one exit costs µs, and the host is shared.
const MIN_REPS: usize = 9;

/// n for the two runs of each sample: ~10 µs per exit on this host, so
/// 20k + 40k exits take ~0.6 s.
fn exits(ctx: &Ctx) -> u32 {
    if ctx.quick { 5_000 } else { 20_000 }
}

/// What one run cost: wall and process CPU time.
#[derive(Debug, Clone, Copy)]
struct Cost {
    wall: Duration,
    cpu: Duration,
}

/// Runs `f`, measuring wall and process CPU time around it.
fn costed<T>(f: impl FnOnce() -> T) -> Result<(T, Cost), BenchError> {
    let cpu0 = process_cpu()?;
    let t = Instant::now();
    let out = f();
    let wall = t.elapsed();
    let cpu = process_cpu()?.saturating_sub(cpu0);
    Ok((out, Cost { wall, cpu }))
}

/// `Machine::run` for a guest doing `n` outs (VM creation and kernel
/// loading happen before measuring starts).
fn vmplay_run(ctx: &Ctx, n: u32) -> Result<Cost, BenchError> {
    let kernel = ctx
        .scratch
        .write(&format!("pio-{n}.elf"), &guests::pio_loop(n, PORT)?)?;
    let hv = vmplay_kvm::KvmHypervisor::new().map_err(|e| BenchError::Run(e.to_string()))?;
    let config = MachineConfig {
        kernel,
        initrd: None,
        cmdline: String::new(),
        entry: KernelEntry::Auto,
        memory: GUEST_MEMORY,
        huge_pages: Default::default(),
        vcpus: 1,
        serial: SerialMode::None,
        virtio: Default::default(),
    };
    let machine = Machine::new(&hv, &config).map_err(|e| BenchError::Run(e.to_string()))?;
    let (reason, cost) = costed(|| machine.run())?;
    let reason = reason.map_err(|e| BenchError::Run(e.to_string()))?;
    if reason != StopReason::DebugExit(EXIT_OK) {
        return Err(BenchError::Run(format!(
            "the guest stopped with {reason:?}, not a debug-exit of {EXIT_OK:#x}"
        )));
    }
    Ok(cost)
}

/// The bare kvm-ioctls loop serving `n` outs to the same port (it counts
/// them and fails unless all `n` arrived). Its VM set-up is inside the
/// measurement but the same for n and 2n, so it cancels.
fn peer_run(n: u32) -> Result<Cost, BenchError> {
    let (r, cost) = costed(|| vmplay_kvm::raw_loop::run(n, PORT))?;
    r.map_err(|e| BenchError::Run(e.to_string()))?;
    Ok(cost)
}

/// One sample: (t(2n) − t(n)) / n for wall and CPU, in seconds per exit.
fn per_exit(
    n: u32,
    mut run: impl FnMut(u32) -> Result<Cost, BenchError>,
) -> Result<(f64, f64), BenchError> {
    let one = run(n)?;
    let two = run(2 * n)?;
    let per = |a: Duration, b: Duration| b.saturating_sub(a).as_secs_f64() / f64::from(n);
    Ok((per(one.wall, two.wall), per(one.cpu, two.cpu)))
}

/// Median and range of a sample, in µs.
fn summary(v: &mut [f64]) -> String {
    let m = measure::median(v).unwrap_or(f64::NAN);
    format!(
        "{:>7.2} µs/exit   (median; range {:.2}-{:.2})",
        m * 1e6,
        v[0] * 1e6,
        v[v.len() - 1] * 1e6
    )
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    let n = exits(ctx);
    let reps = ctx.reps.max(MIN_REPS);
    report::heading(
        "pio-exit",
        "port-I/O exit round trip: guest `out` loop, per exit = (t(2n) - t(n)) / n",
    );
    report::note(&format!(
        "vmplay: Machine::run in-process, KVM backend, vCPU loop and port bus, guest outs to port {PORT:#x} (sink device), n = {n}, {}",
        2 * n
    ));
    report::note(
        "peer:   vmplay_kvm::raw_loop, a bare kvm-ioctls KVM_RUN loop, same guest loop and n",
    );
    report::note(&format!(
        "{reps} pairs, the two sides alternating; ratio = median of the pairs' ratios; CPU = this process's user+sys"
    ));
    report::note(
        "kvm_pvm host (nested KVM): ring-0 guest code is emulated by the host (~1M insn/s) and every exit is a nested round trip, so both figures are dominated by the host",
    );
    // One warm-up run each: first-use costs (page faults, KVM paths).
    if let Err(e) = vmplay_run(ctx, 100) {
        report::failed("vmplay (Machine, bus, device)", &e.to_string());
        return Ok(());
    }
    if let Err(e) = peer_run(100) {
        report::failed("bare kvm-ioctls loop", &e.to_string());
        return Ok(());
    }
    let (mut ours_wall, mut ours_cpu, mut peer_wall, mut peer_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ratio_wall, mut ratio_cpu) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (ow, oc) = per_exit(n, |n| vmplay_run(ctx, n))?;
        let (pw, pc) = per_exit(n, peer_run)?;
        ours_wall.push(ow);
        ours_cpu.push(oc);
        peer_wall.push(pw);
        peer_cpu.push(pc);
        ratio_wall.push(ow / pw);
        ratio_cpu.push(oc / pc);
    }
    report::figure("vmplay (Machine, bus, device) CPU", &summary(&mut ours_cpu));
    report::figure("bare kvm-ioctls loop CPU", &summary(&mut peer_cpu));
    report::figure(
        "vmplay (Machine, bus, device) wall",
        &summary(&mut ours_wall),
    );
    report::figure("bare kvm-ioctls loop wall", &summary(&mut peer_wall));
    report::ratio(
        "ratio vmplay/bare, CPU time",
        measure::median(&mut ratio_cpu).unwrap_or(f64::NAN),
        Goal { at_most: GOAL },
        "≤ 1.05",
    );
    report::ratio_info(
        "ratio vmplay/bare, wall time",
        measure::median(&mut ratio_wall).unwrap_or(f64::NAN),
    );
    Ok(())
}
