//! `net`: virtio-net TCP throughput under Debian's kernel on emu, against
//! QEMU TCG (`-M microvm` with a virtio-mmio net device) in the same run,
//! with the same kernel, initramfs and TAP. The TAP lives in a network
//! namespace of its own (10.0.2.1/24 on the host side, the guest is
//! 10.0.2.2), so the bench needs root; the host side of each transfer is
//! a thread of this process inside that namespace, and times it: guest to
//! host from the first byte to the guest's close, host to guest from the
//! accept to the guest's close after the last byte. The guest sends with
//! busybox `nc` from a tmpfs file and receives into /dev/null.

use crate::measure;
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(900);
/// `tsc_early_khz`: QEMU TCG's microvm otherwise may hang calibrating the
/// TSC against a PIT it runs too slowly; both sides get the same line.
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet tsc_early_khz=2000000";
const HOST_ADDR: &str = "10.0.2.1";
const G2H_PORT: u16 = 5001;
const H2G_PORT: u16 = 5002;
/// The bar: emu at least as fast as TCG each way.
const GOAL: Goal = Goal { at_most: 1.0 };

#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    /// Seconds for the transfer, guest to host and host to guest.
    g2h: f64,
    h2g: f64,
}

/// A network namespace with a TAP at 10.0.2.1/24; removed when dropped.
struct Netns {
    name: String,
    tap: String,
}

fn ip(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| BenchError::Spawn("ip".into(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Run(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Netns {
    fn new() -> Result<Netns, BenchError> {
        let pid = std::process::id();
        let ns = Netns {
            name: format!("vmplay-bench-{pid}"),
            tap: format!("vmpb{}", pid % 10_000_000),
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["-n", &ns.name, "tuntap", "add", &ns.tap, "mode", "tap"])?;
        ip(&["-n", &ns.name, "addr", "add", "10.0.2.1/24", "dev", &ns.tap])?;
        ip(&["-n", &ns.name, "link", "set", &ns.tap, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Moves the calling thread into the namespace.
    fn enter(name: &str) -> Result<(), BenchError> {
        let path = format!("/var/run/netns/{name}");
        let f = std::fs::File::open(&path).map_err(|e| BenchError::File(path.into(), e))?;
        // SAFETY: setns(2) with a namespace fd open for the whole call; it
        // moves only the calling thread, a thread of our own.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(BenchError::Host("setns", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

struct Assets {
    kernel: PathBuf,
    initramfs: PathBuf,
    bytes: usize,
}

fn prepare(ctx: &Ctx) -> Result<Assets, BenchError> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian");
    let assets = vmplay_image::DebianAssets::open(&cache)
        .map_err(|e| BenchError::Run(format!("{e}; run scripts/fetch-debian-kernel")))?;
    let mib = if ctx.quick { 4 } else { 16 };
    // The receive reads the console for input it never gets, so `nc`
    // leaves only when the host closes (busybox nc quits on the first EOF
    // it sees, its stdin's included).
    let hook = format!(
        "#!/bin/sh\n\
         ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         ping -c 1 -W 60 {HOST_ADDR} >/dev/null\n\
         dd if=/dev/zero of=/tmp/g2h bs=1M count={mib} 2>/dev/null\n\
         nc {HOST_ADDR} {G2H_PORT} </tmp/g2h\n\
         nc {HOST_ADDR} {H2G_PORT} </dev/console >/dev/null\n\
         echo vmplay-net done\n"
    );
    let initramfs = ctx.scratch.dir.join("net.cpio");
    vmplay_image::Initramfs::debian(&assets)
        .and_then(|i| {
            i.file(vmplay_image::RUN_HOOK, hook, 0o755)
                .write(&initramfs)
        })
        .map_err(|e| BenchError::Guest(e.to_string()))?;
    Ok(Assets {
        kernel: assets.kernel().to_path_buf(),
        initramfs,
        bytes: mib << 20,
    })
}

fn accept_by(l: &TcpListener, deadline: Instant) -> Result<TcpStream, BenchError> {
    l.set_nonblocking(true)
        .map_err(|e| BenchError::Host("listener", e))?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| BenchError::Host("socket", e))?;
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| BenchError::Host("socket", e))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(BenchError::Run("the guest never connected".into()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(BenchError::Host("accept", e)),
        }
    }
}

/// The host side of one boot: receives, then sends `bytes`.
fn serve(g2h: TcpListener, h2g: TcpListener, bytes: usize) -> Result<Figures, BenchError> {
    let deadline = Instant::now() + TIMEOUT;
    let mut s = accept_by(&g2h, deadline)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0usize;
    let mut start = None;
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| BenchError::Host("receive", e))?;
        if n == 0 {
            break;
        }
        start.get_or_insert_with(Instant::now);
        got += n;
    }
    let g2h = start.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    drop(s);
    if got != bytes {
        return Err(BenchError::Run(format!(
            "guest to host: {got} bytes, not {bytes}"
        )));
    }
    let mut s = accept_by(&h2g, deadline)?;
    let start = Instant::now();
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])
            .map_err(|e| BenchError::Host("send", e))?;
        left -= n;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| BenchError::Host("shutdown", e))?;
    // The guest closes once it has read everything.
    let _ = s.read(&mut buf);
    Ok(Figures {
        g2h,
        h2g: start.elapsed().as_secs_f64(),
    })
}

fn run_once(ctx: &Ctx, ns: &Netns, a: &Assets, qemu: bool) -> Result<Figures, BenchError> {
    let who = if qemu { "QEMU TCG" } else { "vmplay emu" };
    let console = ctx.scratch.dir.join("net-console.txt");
    let _ = std::fs::remove_file(&console);
    let (tx, rx) = mpsc::channel();
    let name = ns.name.clone();
    let bytes = a.bytes;
    let host = std::thread::spawn(move || {
        let listeners = Netns::enter(&name).and_then(|()| {
            let bind = |port| {
                TcpListener::bind((HOST_ADDR, port)).map_err(|e| BenchError::Host("bind", e))
            };
            Ok((bind(G2H_PORT)?, bind(H2G_PORT)?))
        });
        match listeners {
            Ok((g, h)) => {
                let _ = tx.send(Ok(()));
                serve(g, h, bytes)
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                Err(BenchError::Run("no listeners".into()))
            }
        }
    });
    rx.recv()
        .map_err(|_| BenchError::Run("host thread died".into()))??;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]);
    if qemu {
        cmd.arg(&ctx.qemu)
            .args(["-M", "microvm,acpi=on,pit=on", "-accel", "tcg"])
            .args(["-m", "512", "-smp", "1", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-kernel"])
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(&a.initramfs)
            .args(["-append", CMDLINE])
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                ns.tap
            ))
            .args(["-device", "virtio-net-device,netdev=n0"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()));
    } else {
        cmd.arg(&ctx.vmplay)
            .args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initramfs)
            .args(["--cmdline", CMDLINE])
            .arg("--net")
            .arg(format!("tap={}", ns.tap))
            .arg("--serial")
            .arg(format!("file:{}", console.display()));
    }
    let run = measure::run(&mut cmd, &ctx.scratch, "net", TIMEOUT)?;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    if !text.contains("vmplay-net done") {
        return Err(BenchError::Run(format!(
            "{who}: status {}, the guest did not finish; console ends {:?}; stderr {}",
            run.status,
            text.lines().rev().take(3).collect::<Vec<_>>(),
            run.stderr_tail
        )));
    }
    host.join()
        .map_err(|_| BenchError::Run("host thread panicked".into()))?
        .map_err(|e| BenchError::Run(format!("{who}: {e}")))
}

/// One printed row: its name and which figure it reads.
type Row = (&'static str, fn(&Figures) -> f64);

fn median(v: impl Iterator<Item = f64>) -> f64 {
    measure::median(&mut v.collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "net",
        "virtio-net TCP throughput under Debian's kernel over a TAP: emu vs QEMU TCG (microvm, virtio-mmio)",
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::Run(
            "needs root (a network namespace with a TAP)".into(),
        ));
    }
    let a = prepare(ctx)?;
    let ns = Netns::new()?;
    let reps = if ctx.quick { 1 } else { ctx.reps.min(3) };
    let mut emu = Vec::new();
    let mut tcg = Vec::new();
    for _ in 0..reps {
        emu.push(run_once(ctx, &ns, &a, false)?);
        tcg.push(run_once(ctx, &ns, &a, true)?);
    }
    let mib = (a.bytes >> 20) as f64;
    let rows: [Row; 2] = [
        ("TCP guest to host", |f| f.g2h),
        ("TCP host to guest", |f| f.h2g),
    ];
    for (name, get) in rows {
        let e = median(emu.iter().map(get));
        let t = median(tcg.iter().map(get));
        report::figure(
            &format!("{name}: vmplay emu"),
            &format!("{:.2} MiB/s", mib / e),
        );
        report::figure(
            &format!("{name}: QEMU TCG"),
            &format!("{:.2} MiB/s", mib / t),
        );
        report::ratio(&format!("{name}: time emu / TCG"), e / t, GOAL, "<= 1.0");
    }
    report::note(&format!(
        "medians of {reps} boots each; {mib} MiB each way with busybox nc; offloads (CSUM, TSO4/6 both ways) and mergeable buffers negotiated on both"
    ));
    Ok(())
}
