//! `api`: the Firecracker API's costs, against Firecracker's published
//! figures (SPECIFICATION.md; Firecracker itself does not run here):
//!
//! - CPU time from process start until the API socket accepts: the sum of
//!   every thread's run time in `/proc/<pid>/task/*/schedstat` (ns) read as
//!   soon as `connect` succeeds on `vmplay firecracker --api-sock S`;
//! - the median wall time of 1000 `GET /` on one keep-alive connection.

use crate::measure::{self, Child};
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Firecracker SPECIFICATION.md: API socket up within 8 CPU ms.
const PEER_START_CPU_MS: f64 = 8.0;
/// The goal for one request.
const GOAL_REQUEST_MS: f64 = 1.0;
const REQUESTS: usize = 1000;

/// CPU time of every thread of `pid`, from schedstat (ns precision).
fn process_cpu_ns(pid: libc::pid_t) -> Result<u64, BenchError> {
    let dir = format!("/proc/{pid}/task");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| BenchError::Host("read /proc task list", e))?;
    let mut total = 0;
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

fn get(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<(), BenchError> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        .map_err(|e| BenchError::Host("send GET /", e))?;
    buf.clear();
    let mut chunk = [0u8; 512];
    // The answer is small: its head and body arrive together; read until
    // the body's closing brace.
    while !buf.ends_with(b"}") {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| BenchError::Host("read GET / answer", e))?;
        if n == 0 {
            return Err(BenchError::Run("the API closed the connection".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "api",
        "process start to the API socket accepting (CPU ms), and GET / latency (median of 1000)",
    );
    report::note(&format!(
        "`{} firecracker --api-sock S`; CPU = all threads' schedstat run time when connect() first succeeds",
        ctx.vmplay.display()
    ));
    report::note(
        "peer: Firecracker's published SPECIFICATION.md figure (≤ 8 CPU ms to the API socket), not run here",
    );
    let mut cpu = Vec::new();
    let mut latency = Vec::new();
    for rep in 0..=ctx.reps {
        let sock = ctx.scratch.dir.join(format!("api-{rep}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Child::spawn(
            Command::new(&ctx.vmplay)
                .arg("firecracker")
                .arg("--api-sock")
                .arg(&sock),
            &ctx.scratch,
            "api",
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if Instant::now() > deadline || !child.is_running() {
                child.signal(libc::SIGKILL);
                return Err(BenchError::Run("the API socket never accepted".into()));
            }
            std::hint::spin_loop();
        };
        let ns = process_cpu_ns(child.pid())?;
        let mut buf = Vec::new();
        let mut times = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            let t = Instant::now();
            get(&mut stream, &mut buf)?;
            times.push(t.elapsed().as_secs_f64());
        }
        child.signal(libc::SIGKILL);
        let _ = child.wait(Duration::from_secs(10));
        let _ = std::fs::remove_file(&sock);
        // The first run warms the page cache and is not counted.
        if rep > 0 {
            cpu.push(ns as f64 / 1e6);
            latency.push(measure::median(&mut times).unwrap_or(f64::NAN));
        }
    }
    let cpu_ms = measure::median(&mut cpu).unwrap_or(f64::NAN);
    let lat = measure::median(&mut latency).unwrap_or(f64::NAN);
    report::figure("vmplay start to socket", &format!("{cpu_ms:.2} CPU ms"));
    report::figure(
        "Firecracker (published)",
        &format!("≤ {PEER_START_CPU_MS:.0} CPU ms"),
    );
    report::ratio(
        "start CPU ms / Firecracker's 8",
        cpu_ms / PEER_START_CPU_MS,
        Goal { at_most: 1.0 },
        "≤ 1",
    );
    report::figure("vmplay GET / median", &report::ms(lat));
    report::ratio(
        "GET / ms / goal 1 ms",
        lat * 1e3 / GOAL_REQUEST_MS,
        Goal { at_most: 1.0 },
        "≤ 1",
    );
    Ok(())
}
