//! `prompt`: the README's first command, fresh machine to a shell prompt.
//!
//! - image, cold: `vmplay image debian --out DIR` with an empty cache
//!   (apt-get download of the kernel and busybox, unpack, initramfs);
//!   warm: the same again, which reuses what it fetched.
//! - boot to prompt: `vmplay run --accel emu --config DIR/vmplay.json`
//!   with the console on a pipe, from the spawn until the shell's prompt
//!   appears, then `poweroff` typed and the time until the process exits;
//!   beside QEMU TCG booting the same kernel, initramfs and command line,
//!   and beside emu with the older `qemu64` CPU model (what issue 9's
//!   CPU model costs or saves at boot).
//!
//! Times are wall clock (a prompt is a wall-clock experience); the load
//! average printed with the run says how shared the host was.

use crate::measure::{self, Scratch};
use crate::report::{self, Goal};
use crate::{BenchError, Ctx};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The image's shell prompt (`PS1='\u@\h:\w\$ '`, hostname vmplay).
const PROMPT: &[u8] = b"root@vmplay:/# ";
const TIMEOUT: Duration = Duration::from_secs(600);
/// The console text kept while waiting (the prompt is near the end).
const KEEP: usize = 64 << 10;

/// Which VM a boot row runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runner {
    Emu,
    /// emu with `VMPLAY_EMU_CPU=qemu64`.
    EmuQemu64,
    Tcg,
}

/// The image `vmplay image debian` wrote.
struct Image {
    config: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

impl Image {
    fn open(dir: &Path) -> Result<Image, BenchError> {
        let config = dir.join("vmplay.json");
        let text =
            std::fs::read_to_string(&config).map_err(|e| BenchError::File(config.clone(), e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BenchError::Guest(format!("{}: {e}", config.display())))?;
        let field = |name: &str| {
            json["boot-source"][name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| {
                    BenchError::Guest(format!("{}: no boot-source.{name}", config.display()))
                })
        };
        Ok(Image {
            kernel: field("kernel_image_path")?.into(),
            initrd: field("initrd_path")?.into(),
            cmdline: field("boot_args")?,
            config,
        })
    }
}

/// Wall time of `vmplay image debian --out out [--cache cache]`.
fn build_image(ctx: &Ctx, out: &Path, cache: Option<&Path>) -> Result<Duration, BenchError> {
    let mut cmd = Command::new(&ctx.vmplay);
    cmd.args(["image", "debian", "--out"]).arg(out);
    if let Some(cache) = cache {
        cmd.arg("--cache").arg(cache);
    }
    let run = measure::run(&mut cmd, &ctx.scratch, "image", TIMEOUT)?;
    if run.status != 0 {
        return Err(BenchError::Run(format!(
            "vmplay image debian: status {}: {}",
            run.status, run.stderr_tail
        )));
    }
    Ok(run.wall)
}

/// A child killed and reaped when dropped, so no VM outlives the bench.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// (spawn to prompt, spawn to exit after `poweroff`).
fn boot_to_prompt(
    mut cmd: Command,
    scratch: &Scratch,
    what: &str,
) -> Result<(Duration, Duration), BenchError> {
    let stderr = scratch.dir.join("prompt.stderr");
    let file = std::fs::File::create(&stderr).map_err(|e| BenchError::File(stderr.clone(), e))?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(file);
    let start = Instant::now();
    let mut child = Reaped(
        cmd.spawn()
            .map_err(|e| BenchError::Spawn(what.to_string(), e))?,
    );
    let mut stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| BenchError::Run("no stdout pipe".into()))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let failed = |seen: &[u8], why: &str| {
        let text = String::from_utf8_lossy(seen);
        let last: Vec<&str> = text.lines().rev().take(4).collect();
        let err = std::fs::read_to_string(&stderr).unwrap_or_default();
        BenchError::Run(format!(
            "{what}: {why}; console ends {last:?}; stderr {}",
            err.trim()
        ))
    };
    let to_prompt = loop {
        let left = TIMEOUT
            .checked_sub(start.elapsed())
            .ok_or_else(|| failed(&seen, "no prompt before the timeout"))?;
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                seen.extend_from_slice(&chunk);
                if seen.windows(PROMPT.len()).any(|w| w == PROMPT) {
                    break start.elapsed();
                }
                if seen.len() > KEEP {
                    seen.drain(..seen.len() - KEEP / 2);
                }
            }
            Err(_) => {
                return Err(failed(
                    &seen,
                    "the console closed or stalled before a prompt",
                ));
            }
        }
    };
    let mut stdin = child
        .0
        .stdin
        .take()
        .ok_or_else(|| BenchError::Run("no stdin pipe".into()))?;
    stdin
        .write_all(b"poweroff\n")
        .map_err(|e| BenchError::Host("typing poweroff", e))?;
    loop {
        match child.0.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return Err(failed(&seen, &format!("exited with {status}"))),
            Ok(None) if start.elapsed() > TIMEOUT => {
                return Err(failed(&seen, "still running after poweroff"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(BenchError::Host("waiting for the VM", e)),
        }
    }
    Ok((to_prompt, start.elapsed()))
}

fn command(ctx: &Ctx, image: &Image, runner: Runner) -> Command {
    match runner {
        Runner::Emu | Runner::EmuQemu64 => {
            let mut c = Command::new(&ctx.vmplay);
            c.args(["run", "--accel", "emu", "--config"])
                .arg(&image.config);
            if runner == Runner::EmuQemu64 {
                c.env("VMPLAY_EMU_CPU", "qemu64");
            }
            c
        }
        Runner::Tcg => {
            let mut c = Command::new(&ctx.qemu);
            c.args(["-accel", "tcg", "-nodefaults", "-no-reboot", "-m", "512"])
                .args(["-smp", "1", "-display", "none", "-monitor", "none"])
                .args(["-serial", "stdio", "-kernel"])
                .arg(&image.kernel)
                .arg("-initrd")
                .arg(&image.initrd)
                .arg("-append")
                .arg(&image.cmdline);
            c
        }
    }
}

fn secs(d: &[Duration]) -> Vec<f64> {
    d.iter().map(Duration::as_secs_f64).collect()
}

fn med(v: &[f64]) -> f64 {
    measure::median(&mut v.to_vec()).unwrap_or(f64::NAN)
}

pub fn run(ctx: &Ctx) -> Result<(), BenchError> {
    report::heading(
        "prompt",
        "the README's first command: `vmplay image debian` cold and warm, then boot to the shell prompt, emu vs QEMU TCG",
    );
    let out = ctx.scratch.dir.join("prompt-image");
    let _ = std::fs::remove_dir_all(&out);
    // Cold: an empty cache, so apt-get downloads. Without a network, the
    // fetched assets of `--debian` stand in and the cold figure is absent.
    let cold = match build_image(ctx, &out, None) {
        Ok(t) => Some(t),
        Err(e) => {
            report::note(&format!(
                "cold image failed ({e}); building from {} instead",
                ctx.debian.display()
            ));
            build_image(ctx, &out, Some(&ctx.debian))?;
            None
        }
    };
    let warm = build_image(
        ctx,
        &out,
        if cold.is_some() {
            None
        } else {
            Some(&ctx.debian)
        },
    )?;
    let image = Image::open(&out)?;
    report::note(&format!(
        "vmplay: `{} run --accel emu --config {}`; peer: `{} -accel tcg -nodefaults -no-reboot -m 512 -smp 1 -display none -monitor none -serial stdio -kernel K -initrd I -append \"{}\"`",
        ctx.vmplay.display(),
        image.config.display(),
        ctx.qemu.display(),
        image.cmdline
    ));
    report::note(
        "times are wall clock from spawn to the prompt `root@vmplay:/# ` on the console; exit = after typing `poweroff`",
    );
    let runners = [Runner::Emu, Runner::Tcg, Runner::EmuQemu64];
    let mut prompt: Vec<Vec<Duration>> = vec![Vec::new(); runners.len()];
    let mut exit: Vec<Vec<Duration>> = vec![Vec::new(); runners.len()];
    let (mut vs_tcg, mut vs_old) = (Vec::new(), Vec::new());
    let reps = if ctx.quick { 1 } else { ctx.reps };
    for _ in 0..reps {
        let mut this = [0.0; 3];
        for (k, r) in runners.iter().enumerate() {
            let (p, e) = boot_to_prompt(command(ctx, &image, *r), &ctx.scratch, &format!("{r:?}"))?;
            prompt[k].push(p);
            exit[k].push(e);
            this[k] = p.as_secs_f64();
        }
        vs_tcg.push(this[0] / this[1]);
        vs_old.push(this[0] / this[2]);
    }
    if let Some(cold) = cold {
        report::figure(
            "vmplay image debian, cold (apt-get download)",
            &format!("{:>7.2} s", cold.as_secs_f64()),
        );
    }
    report::figure(
        "vmplay image debian, warm (reuses the fetch)",
        &format!("{:>7.2} s", warm.as_secs_f64()),
    );
    let names = [
        "vmplay --accel emu",
        "qemu-system-x86_64 -accel tcg",
        "vmplay --accel emu, qemu64 CPU model",
    ];
    for (k, name) in names.iter().enumerate() {
        report::figure(
            name,
            &format!(
                "{:>7.2} s to prompt  {:>7.2} s to exit",
                med(&secs(&prompt[k])),
                med(&secs(&exit[k]))
            ),
        );
    }
    let emu_prompt = med(&secs(&prompt[0]));
    if let Some(cold) = cold {
        report::figure(
            "README command cold: image + boot to prompt (emu)",
            &format!("{:>7.2} s", cold.as_secs_f64() + emu_prompt),
        );
    }
    report::figure(
        "README command warm: boot to prompt (emu)",
        &format!("{emu_prompt:>7.2} s"),
    );
    report::ratio(
        "ratio emu/TCG, to prompt",
        med(&vs_tcg),
        Goal { at_most: 1.0 },
        "≤ 1",
    );
    report::ratio_info(
        "ratio vmplay CPU model / qemu64 model, to prompt",
        med(&vs_old),
    );
    Ok(())
}
