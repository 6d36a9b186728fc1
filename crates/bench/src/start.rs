//! `start`: what it costs to start vmplay, against Firecracker's published
//! figures (its SPECIFICATION.md; Firecracker itself does not run here).
//!
//! - CPU time from `vmplay run` to the first guest instruction: a guest
//!   whose first instruction writes the debug-exit port, so the process
//!   ends right there; the figure is the child's user+sys from wait4's
//!   rusage, so it includes tearing the VM down too (an overestimate).
//! - Resident memory of the VMM excluding guest RAM: a guest that writes a
//!   byte to COM1 and then idles in `hlt`; once the byte arrives, the
//!   child's /proc/<pid>/smaps is summed minus the guest RAM mappings,
//!   recognised as anonymous mappings exactly as large as a RAM range.

use crate::guests::{self, START_EXIT_VALUE, exit_status};
use crate::measure::{self, Child};
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::process::Command;
use std::time::{Duration, Instant};

/// Firecracker's guest size for its published figures.
const GUEST_MEMORY: u64 = 128 << 20;
/// Firecracker SPECIFICATION.md: VMM start ≤ 8 CPU ms, overhead ≤ 5 MiB.
const PEER_CPU_MS: f64 = 8.0;
const PEER_MIB: f64 = 5.0;
const TIMEOUT: Duration = Duration::from_secs(60);

fn vmplay_cmd(ctx: &Ctx, kernel: &std::path::Path, serial: &str) -> Command {
    let mut c = Command::new(&ctx.vmplay);
    c.args(["run", "--accel", "kvm", "--memory"])
        .arg(format!("{}M", GUEST_MEMORY >> 20))
        .arg("--serial")
        .arg(serial)
        .arg("--kernel")
        .arg(kernel);
    c
}

/// Runs the exit-at-once guest `reps` times; returns the median CPU and
/// wall milliseconds.
fn cpu_to_first_instruction(ctx: &Ctx) -> Result<(f64, f64), BenchError> {
    let kernel = ctx
        .scratch
        .write("start-exit.elf", &guests::exit_at_once()?)?;
    let want = exit_status(START_EXIT_VALUE);
    let mut cpu = Vec::new();
    let mut wall = Vec::new();
    // One unmeasured run first: page cache and dynamic loader warm, as
    // they would be for any VMM started more than once.
    for i in 0..=ctx.reps {
        let r = measure::run(
            &mut vmplay_cmd(ctx, &kernel, "none"),
            &ctx.scratch,
            "start-exit",
            TIMEOUT,
        )?;
        if r.status != want {
            return Err(BenchError::Run(format!(
                "vmplay exited with status {} (expected {want}: the guest's first instruction writes AL = {START_EXIT_VALUE:#x} of the multiboot magic to port 0xf4); stderr: {}",
                r.status, r.stderr_tail
            )));
        }
        if i > 0 {
            cpu.push(r.cpu.as_secs_f64() * 1e3);
            wall.push(r.wall.as_secs_f64() * 1e3);
        }
    }
    Ok((
        measure::median(&mut cpu).unwrap_or(f64::NAN),
        measure::median(&mut wall).unwrap_or(f64::NAN),
    ))
}

/// One idle-guest run: starts vmplay, waits for the guest's byte on COM1,
/// reads smaps, stops vmplay with SIGTERM.
fn resident_once(
    ctx: &Ctx,
    kernel: &std::path::Path,
    i: usize,
) -> Result<measure::Resident, BenchError> {
    let serial = ctx.scratch.dir.join(format!("idle-{i}.serial"));
    let child = Child::spawn(
        &mut vmplay_cmd(ctx, kernel, &format!("file:{}", serial.display())),
        &ctx.scratch,
        "start-idle",
    )?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = std::fs::read(&serial).unwrap_or_default();
        if out.contains(&guests::IDLE_READY_BYTE) {
            break;
        }
        if !child.is_running() {
            let r = child.wait(TIMEOUT)?;
            return Err(BenchError::Run(format!(
                "vmplay exited (status {}) before the idle guest wrote to COM1; stderr: {}",
                r.status, r.stderr_tail
            )));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Run(format!(
                "the idle guest wrote nothing to COM1 within {TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let sizes: Vec<u64> = vmplay_boot::layout::ram_ranges(GUEST_MEMORY)
        .iter()
        .map(|&(_, size)| size)
        .collect();
    let resident = measure::resident(child.pid(), &sizes);
    child.signal(libc::SIGTERM);
    let r = child.wait(TIMEOUT)?;
    let resident = resident?;
    if r.status != 128 + libc::SIGTERM {
        return Err(BenchError::Run(format!(
            "vmplay did not stop cleanly on SIGTERM (status {}); stderr: {}",
            r.status, r.stderr_tail
        )));
    }
    if resident.guest_mappings == 0 {
        return Err(BenchError::Run(format!(
            "no anonymous mapping of {} MiB found: cannot tell guest RAM apart",
            GUEST_MEMORY >> 20
        )));
    }
    Ok(resident)
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "start",
        "VMM start to first guest instruction (CPU ms) and VMM resident memory excluding guest RAM",
    );
    report::note(&format!(
        "`{} run --accel kvm --memory {}M --serial none --kernel G`, G's first instruction is `out 0xf4, al`",
        ctx.vmplay.display(),
        GUEST_MEMORY >> 20
    ));
    report::note("CPU ms = the child's user+sys from wait4 rusage: includes VM teardown");
    report::note(
        "peer: Firecracker's published SPECIFICATION.md figures (1 vCPU, 128 MiB), not run here",
    );
    report::note(
        "kvm_pvm host (nested KVM): guest entry and exits are nested round trips through the host",
    );
    match cpu_to_first_instruction(ctx) {
        Ok((cpu, wall)) => {
            report::figure(
                "vmplay CPU to first instruction",
                &format!(
                    "{cpu:.2} CPU ms   (wall {wall:.2} ms, median of {})",
                    ctx.reps
                ),
            );
            report::figure(
                "Firecracker (published)",
                &format!("{PEER_CPU_MS:.2} CPU ms"),
            );
            report::ratio(
                "ratio vmplay/Firecracker",
                cpu / PEER_CPU_MS,
                Goal { at_most: 1.0 },
                "≤ 1 (≤ 8 CPU ms)",
            );
        }
        Err(e) => report::failed("vmplay CPU to first instruction", &e.to_string()),
    }

    let kernel = ctx
        .scratch
        .write("start-idle.elf", &guests::idle_forever()?)?;
    let reps = ctx.reps.min(3);
    let mut vmm = Vec::new();
    let mut last = None;
    let mut error = None;
    for i in 0..reps {
        match resident_once(ctx, &kernel, i) {
            Ok(r) => {
                vmm.push(r.vmm_kib() as f64 / 1024.0);
                last = Some(r);
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    match (error, last) {
        (None, Some(r)) => {
            let mib = measure::median(&mut vmm).unwrap_or(f64::NAN);
            report::note(&format!(
                "guest RAM = {} anonymous mapping(s) of {} MiB, {:.1} MiB of it resident (excluded)",
                r.guest_mappings,
                GUEST_MEMORY >> 20,
                r.guest_kib as f64 / 1024.0
            ));
            report::figure(
                "vmplay resident excl. guest RAM",
                &format!("{mib:.2} MiB   (Rss from smaps, median of {reps}, guest idle in hlt)"),
            );
            report::figure("Firecracker (published)", &format!("{PEER_MIB:.2} MiB"));
            report::ratio(
                "ratio vmplay/Firecracker",
                mib / PEER_MIB,
                Goal { at_most: 1.0 },
                "≤ 1 (≤ 5 MiB)",
            );
        }
        (Some(e), _) => report::failed("vmplay resident excl. guest RAM", &e.to_string()),
        (None, None) => report::failed("vmplay resident excl. guest RAM", "no runs"),
    }
    Ok(())
}
