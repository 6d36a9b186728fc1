//! virtio-console (`--console virtio[,file=PATH]`): Debian's kernel on the
//! software CPU writes to and reads from `/dev/hvc0`.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{TempDir, debian_guest, run_with_deadline, vmplay_exe};

const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

fn vmplay(kernel: &std::path::Path, initrd: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["run", "--accel", "emu", "--memory", "256M"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", CMDLINE])
        .args(extra);
    cmd
}

#[test]
fn hvc0_output_goes_to_the_console_file_on_emu() {
    let dir = TempDir::new();
    let script =
        "#!/bin/sh\necho 'vmplay-hvc0: hello from hvc0' > /dev/hvc0\necho 'on the serial line'\n";
    let Some((kernel, initrd)) = debian_guest(&dir, script, &[]) else {
        return;
    };
    let out = dir.path().join("hvc0.log");
    let console = format!("virtio,file={}", out.display());
    let run = run_with_deadline(
        vmplay(
            &kernel,
            &initrd,
            &["--serial", "stdio", "--console", &console],
        ),
        BOOT_DEADLINE,
    );
    run.assert_code(0);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        text.contains("vmplay-hvc0: hello from hvc0"),
        "{text:?}\n{run}"
    );
    assert!(!run.stdout.contains("hello from hvc0"), "{run}");
    assert!(run.stdout.contains("on the serial line"), "{run}");
}

#[test]
fn hvc0_on_stdio_reads_host_input_and_writes_to_stdout_on_emu() {
    let dir = TempDir::new();
    // hvc0 stays open from before the host types until the guest has read
    // the line: input that arrives while no one has the tty open waits in
    // the driver until the next interrupt.
    let script = "#!/bin/sh\nexec 3<>/dev/hvc0\nstty -echo <&3\necho 'vmplay-hvc0: ready' >&3\n\
                  read line <&3\necho \"vmplay-hvc0: got $line\" >&3\necho 'serial: done'\n";
    let Some((kernel, initrd)) = debian_guest(&dir, script, &[]) else {
        return;
    };
    let serial = dir.path().join("serial.log");
    let serial_flag = format!("file:{}", serial.display());
    let mut child = vmplay(
        &kernel,
        &initrd,
        &["--serial", &serial_flag, "--console", "virtio"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .env_remove("VMPLAY_LOG")
    .spawn()
    .expect("start vmplay");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // Types once the guest reads, then collects the rest of stdout.
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut typed = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !typed && String::from_utf8_lossy(&seen).contains("vmplay-hvc0: ready") {
                typed = true;
                let _ = stdin.write_all(b"ping from the host\n");
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > BOOT_DEADLINE {
            let _ = child.kill();
            panic!("vmplay still running after {BOOT_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let serial = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        status.success(),
        "{status}\nstdout:\n{out}\nstderr:\n{err}\nserial:\n{serial}"
    );
    assert!(
        out.contains("vmplay-hvc0: got ping from the host"),
        "stdout:\n{out}\nserial:\n{serial}"
    );
    assert!(serial.contains("serial: done"), "{serial}");
}
