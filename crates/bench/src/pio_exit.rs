//! `pio-exit`: the cost of one port-I/O exit round trip through vmplay's
//! whole exit path (KVM backend → vCPU loop → port bus → device), against
//! a bare kvm-ioctls loop serving the same exits (`vmplay_kvm::raw_loop`),
//! both in this process, in this run.
//!
//! vmplay's side builds a `Machine` in-process with a multiboot guest that
//! does n × `out` to the POST port (a sink device on the bus) and then
//! writes the debug-exit port; the peer runs its own guest doing n `out`s.
//! Per exit = (t(2n) − t(n)) / n for each, which cancels VM creation, boot
//! and teardown.

use crate::guests::{self, EXIT_OK};
use crate::measure;
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::time::{Duration, Instant};
use vmplay_machine::{KernelEntry, Machine, MachineConfig, SerialMode, StopReason};

/// The port the guest writes: the POST port, a sink device on vmplay's bus.
pub const PORT: u16 = vmplay_boot::layout::POST_PORT;
const GUEST_MEMORY: u64 = 128 << 20;
/// The goal: vmplay's exit at most 5% dearer than the bare loop's.
const GOAL: f64 = 1.05;

/// n for the two runs of each sample: at ~26 µs per exit on this host,
/// 20k exits take ~0.5 s.
fn exits(ctx: &Ctx) -> u32 {
    if ctx.quick { 5_000 } else { 20_000 }
}

/// Time of `Machine::run` for a guest doing `n` outs (VM creation and
/// kernel loading are done before the clock starts).
fn vmplay_run(ctx: &Ctx, n: u32) -> Result<Duration, BenchError> {
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
        vcpus: 1,
        serial: SerialMode::None,
    };
    let machine = Machine::new(&hv, &config).map_err(|e| BenchError::Run(e.to_string()))?;
    let t = Instant::now();
    let reason = machine.run().map_err(|e| BenchError::Run(e.to_string()))?;
    let elapsed = t.elapsed();
    if reason != StopReason::DebugExit(EXIT_OK) {
        return Err(BenchError::Run(format!(
            "the guest stopped with {reason:?}, not a debug-exit of {EXIT_OK:#x}"
        )));
    }
    Ok(elapsed)
}

/// Time of the bare kvm-ioctls loop serving `n` outs.
fn peer_run(n: u32) -> Result<Duration, BenchError> {
    let _ = n;
    Err(BenchError::Run(
        "vmplay_kvm::raw_loop has no entry point yet".into(),
    ))
}

/// One sample: (t(2n) − t(n)) / n, in seconds per exit.
fn per_exit(
    n: u32,
    mut run: impl FnMut(u32) -> Result<Duration, BenchError>,
) -> Result<f64, BenchError> {
    let one = run(n)?;
    let two = run(2 * n)?;
    Ok(two.saturating_sub(one).as_secs_f64() / f64::from(n))
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    let n = exits(ctx);
    report::heading(
        "pio-exit",
        "port-I/O exit round trip: guest `out` loop, per exit = (t(2n) - t(n)) / n, median",
    );
    report::note(&format!(
        "vmplay: Machine::run in-process, KVM backend, vCPU loop and port bus, guest outs to port {PORT:#x} (sink device), n = {n}, {}",
        2 * n
    ));
    report::note("peer:   vmplay_kvm::raw_loop, a bare kvm-ioctls KVM_RUN loop, same n");
    report::note(
        "kvm_pvm host: ring-0 guest code is emulated by the host (~1M insn/s) and a port-I/O exit costs ~26 µs, so both figures are dominated by the host",
    );
    // One warm-up run each: first-use costs (page faults, KVM paths).
    let ours = vmplay_run(ctx, 100).and_then(|_| {
        let mut v = Vec::new();
        for _ in 0..ctx.reps {
            v.push(per_exit(n, |n| vmplay_run(ctx, n))?);
        }
        measure::median(&mut v).ok_or_else(|| BenchError::Run("no samples".into()))
    });
    let peer = peer_run(100).and_then(|_| {
        let mut v = Vec::new();
        for _ in 0..ctx.reps {
            v.push(per_exit(n, peer_run)?);
        }
        measure::median(&mut v).ok_or_else(|| BenchError::Run("no samples".into()))
    });
    let us = |s: f64| format!("{:.2} µs/exit   (median of {})", s * 1e6, ctx.reps);
    match &ours {
        Ok(s) => report::figure("vmplay (Machine, bus, device)", &us(*s)),
        Err(e) => report::failed("vmplay (Machine, bus, device)", &e.to_string()),
    }
    match &peer {
        Ok(s) => report::figure("bare kvm-ioctls loop", &us(*s)),
        Err(e) => report::failed("bare kvm-ioctls loop", &e.to_string()),
    }
    match (ours, peer) {
        (Ok(o), Ok(p)) => {
            report::ratio("ratio vmplay/bare", o / p, Goal { at_most: GOAL }, "≤ 1.05")
        }
        _ => report::failed("ratio vmplay/bare", "needs both figures"),
    }
    Ok(())
}
