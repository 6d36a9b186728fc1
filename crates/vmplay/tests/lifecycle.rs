//! The VM's lifecycle seen from outside: signals stop it cleanly, a
//! Firecracker config boots it, the demo guest runs. Each test runs the
//! real `vmplay` binary.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{TempDir, backends, skip_without_kvm, vmplay_exe, vmplay_run};
use vmplay_guests::MultibootImage;
use vmplay_guests::runtime::Runtime32;

/// A guest that prints `ready\n` and then spins forever with interrupts
/// off: only the VMM can end it.
fn ready_then_spin() -> Vec<u8> {
    let mut img = MultibootImage::new();
    let scratch = img.zeroed(vmplay_guests::runtime::RUNTIME32_SCRATCH, 16);
    let entry = img
        .code32(|a| {
            let mut rt = Runtime32::new(a, scratch);
            a.cli()?;
            rt.print(a, "ready\n")?;
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.pause()?;
            a.jmp(spin)?;
            rt.finish(a)
        })
        .expect("assemble the spinning guest");
    img.set_entry32(entry);
    img.build().expect("build the spinning guest")
}

/// Starts `ready_then_spin` on `accel`, waits for `ready`, sends `signal`
/// and returns (exit status, stderr).
fn signal_a_spinning_guest(accel: &str, signal: i32) -> (Option<i32>, String) {
    let dir = TempDir::new();
    let kernel = dir.file("spin.elf", &ready_then_spin());
    let mut child = Command::new(vmplay_exe())
        .args([
            "run", "--accel", accel, "--memory", "64M", "--serial", "stdio",
        ])
        .arg("--kernel")
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmplay");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    while !seen.ends_with(b"ready\n") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "guest never said ready"
        );
        let n = stdout.read(&mut buf).expect("read guest output");
        assert!(n > 0, "vmplay exited before the guest said ready");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vmplay") {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("vmplay did not stop within 30 s of signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .ok();
    (status.code(), stderr)
}

fn sigterm_and_sigint_stop_the_vm_cleanly(accel: &str) {
    for (signal, name) in [(libc::SIGTERM, 15), (libc::SIGINT, 2)] {
        let (code, stderr) = signal_a_spinning_guest(accel, signal);
        assert_eq!(code, Some(128 + name), "stderr: {stderr}");
        assert!(
            stderr.contains(&format!("stopped by signal {name}")),
            "stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    }
}

#[test]
fn signals_stop_the_vm_cleanly_on_kvm() {
    if !skip_without_kvm() {
        sigterm_and_sigint_stop_the_vm_cleanly("kvm");
    }
}

#[test]
fn signals_stop_the_vm_cleanly_on_emu() {
    sigterm_and_sigint_stop_the_vm_cleanly("emu");
}

#[test]
fn firecracker_config_file_boots_the_guest() {
    for accel in backends() {
        let dir = TempDir::new();
        let kernel = dir.file("mb.elf", &vmplay_guests::multiboot_info());
        let config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "boot_args": "from the config file",
            },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 48, "smt": false },
            "drives": [],
            "network-interfaces": [],
        });
        let path = dir.file("vm.json", config.to_string().as_bytes());
        let run = vmplay_run(&["--config", path.to_str().unwrap(), "--accel", accel]);
        run.assert_code(0).assert_no_panic();
        assert!(
            run.stdout.contains(&format!(
                "cmdline: {} from the config file",
                kernel.display()
            )),
            "{accel}: {}",
            run.stdout
        );
        // 48 MiB: mem_upper counts KiB above 1 MiB.
        assert!(
            run.stdout.contains("mem_upper: 48128 KiB"),
            "{}",
            run.stdout
        );

        // A flag overrides the file.
        let run = vmplay_run(&[
            "--config",
            path.to_str().unwrap(),
            "--accel",
            accel,
            "--cmdline",
            "from a flag",
        ]);
        assert!(run.stdout.contains("from a flag"), "{}", run.stdout);
    }
}

#[test]
fn demo_guest_runs_and_powers_off() {
    for accel in backends() {
        let mut cmd = Command::new(vmplay_exe());
        cmd.args(["demo", "--accel", accel]);
        let run = support::run(cmd);
        run.assert_code(0).assert_no_panic();
        assert!(run.stdout.contains("vmplay demo guest"), "{}", run.stdout);
        assert!(run.stdout.contains("memory map:"), "{}", run.stdout);
        assert!(run.stderr.contains("guest powered off"), "{}", run.stderr);
    }
}
