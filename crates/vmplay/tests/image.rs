//! `vmplay image debian` builds a bootable image, and the image boots to an
//! interactive shell on the console: commands typed on stdin are answered,
//! and `poweroff` ends vmplay with status 0.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{TempDir, run_with_deadline, vmplay_exe};

/// A Linux boot on the interpreter takes 10-25 s; CI runs tests side by
/// side on two cores.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

fn cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian")
}

/// `vmplay image debian --out DIR` with the workspace's package cache, or
/// `None` (after saying why) where apt cannot fetch; CI fails instead.
fn build_image(out: &Path) -> Option<support::Run> {
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["image", "debian", "--out"])
        .arg(out)
        .arg("--cache")
        .arg(cache());
    let run = run_with_deadline(cmd, Duration::from_secs(300));
    if run.code() != 0 && std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none() {
        eprintln!("skipping: vmplay image debian failed here\n{run}");
        return None;
    }
    run.assert_code(0);
    Some(run)
}

/// `line` without the terminal escapes (bash's bracketed-paste switches)
/// that may open it.
fn strip_escapes(mut line: &str) -> &str {
    while let Some(rest) = line.strip_prefix("\x1b[") {
        let end = rest
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or(rest.len(), |i| i + 1);
        line = &rest[end..];
    }
    line
}

/// A running vmplay whose console we type into and read.
struct Console {
    child: Child,
    output: Arc<Mutex<String>>,
    stdin: std::process::ChildStdin,
}

impl Console {
    fn start(cmd: &mut Command) -> Console {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmplay");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    if let Ok(mut o) = output.lock() {
                        o.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let stdin = child.stdin.take().expect("stdin");
        Console {
            child,
            output,
            stdin,
        }
    }

    fn text(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Waits until the output holds a line that starts with `prefix`
    /// (echoed commands start with the prompt, so they do not count) and
    /// returns the rest of that line.
    fn line_starting(&mut self, prefix: &str, start: Instant) -> String {
        loop {
            let text = self.text();
            if let Some(line) = text
                .split(['\n', '\r'])
                .find_map(|l| strip_escapes(l).strip_prefix(prefix))
            {
                return line.to_string();
            }
            self.check_alive(start, prefix, &text);
        }
    }

    fn wait_for(&mut self, needle: &str, start: Instant) {
        loop {
            let text = self.text();
            if text.contains(needle) {
                return;
            }
            self.check_alive(start, needle, &text);
        }
    }

    fn check_alive(&mut self, start: Instant, what: &str, text: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            std::thread::sleep(Duration::from_millis(200));
            panic!("vmplay exited ({status}) before {what:?}:\n{}", self.text());
        }
        if start.elapsed() > BOOT_DEADLINE {
            let _ = self.child.kill();
            panic!("no {what:?} after {BOOT_DEADLINE:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    fn type_line(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("type into the console");
        self.stdin.flush().ok();
    }

    fn wait_exit(&mut self, start: Instant) -> i32 {
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for vmplay") {
                return status.code().expect("vmplay killed by a signal");
            }
            let text = self.text();
            self.check_alive(start, "vmplay to exit", &text);
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn image_debian_writes_kernel_initramfs_and_a_firecracker_config_and_prints_the_run_command() {
    let dir = TempDir::new();
    let Some(run) = build_image(dir.path()) else {
        return;
    };
    for name in ["vmlinuz", "initramfs.cpio", "vmplay.json"] {
        assert!(dir.path().join(name).is_file(), "no {name}\n{run}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("vmplay.json")).unwrap()).unwrap();
    let boot = &config["boot-source"];
    assert!(
        Path::new(boot["kernel_image_path"].as_str().unwrap()).is_absolute(),
        "{config}"
    );
    assert!(
        boot["initrd_path"]
            .as_str()
            .unwrap()
            .ends_with("initramfs.cpio")
    );
    assert!(
        boot["boot_args"]
            .as_str()
            .unwrap()
            .contains("console=ttyS0")
    );
    assert_eq!(config["machine-config"]["vcpu_count"], 1);
    let command = run.stdout.trim();
    assert!(
        command.contains(" run --kernel ") && command.contains("initramfs.cpio"),
        "stdout is not the run command:\n{run}"
    );
    assert!(run.stderr.contains("vmplay image: "), "no progress\n{run}");
}

#[test]
fn boots_the_debian_image_to_a_shell_that_answers_on_the_console_and_powers_off() {
    let dir = TempDir::new();
    if build_image(dir.path()).is_none() {
        return;
    }
    let release = vmplay_image::DebianAssets::open(&cache())
        .expect("fetched assets")
        .kernel_release()
        .to_string();
    let disk = dir.file("disk.img", &[0x5a; 64 * 1024]);
    let start = Instant::now();
    let mut console = Console::start(
        Command::new(vmplay_exe())
            .args(["run", "--accel", "emu", "--rng", "--config"])
            .arg(dir.path().join("vmplay.json"))
            .arg("--drive")
            .arg(format!("path={},readonly=on", disk.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", dir.path().join("v.sock").display())),
    );
    console.wait_for("a shell on the console", start);
    console.wait_for("root@vmplay:/# ", start);
    console.type_line("echo UNAME=$(uname -r)");
    assert_eq!(console.line_starting("UNAME=", start), release);
    // The configured virtio devices (drives first, then net, vsock, rng,
    // as the machine attaches them), each bound to its driver: modules
    // the image loaded.
    console.type_line("echo VIRTIO=[$(ls /sys/bus/virtio/devices)]");
    assert_eq!(
        console.line_starting("VIRTIO=", start),
        "[virtio0 virtio1 virtio2]"
    );
    console.type_line(
        "echo DRIVERS=$(for d in /sys/bus/virtio/devices/*; do basename $(readlink $d/driver); done)",
    );
    assert_eq!(
        console.line_starting("DRIVERS=", start),
        "virtio_blk vmw_vsock_virtio_transport virtio_rng"
    );
    console.type_line("echo VDA=$(cat /sys/block/vda/size)/$(cat /sys/block/vda/ro)");
    assert_eq!(console.line_starting("VDA=", start), "128/1");
    // Exactly the features the software CPU implements.
    console.type_line("echo FLAGS=$(grep -m1 ^flags /proc/cpuinfo | cut -d: -f2)");
    assert_eq!(
        console.line_starting("FLAGS=", start).trim(),
        support::EMU_CPUINFO_FLAGS
    );
    // Job control: the shell owns the console.
    console.type_line("echo TTY=$(tty)");
    assert_eq!(console.line_starting("TTY=", start), "/dev/ttyS0");
    console.type_line("poweroff");
    let code = console.wait_exit(start);
    let text = console.text();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("guest powered off"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// An ext4 image made with `mkfs.ext4 -d` from `tree`, or `None` without mke2fs.
fn ext4_image(tree: &Path, image: &Path) -> Option<()> {
    let made = Command::new("truncate")
        .args(["-s", "64M"])
        .arg(image)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("mkfs.ext4")
            .args(["-q", "-d"])
            .arg(tree)
            .arg(image)
            .status()
            .is_ok_and(|s| s.success());
    if !made {
        assert!(
            std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
            "mkfs.ext4 -d failed (install e2fsprogs)"
        );
        eprintln!("skipping: mkfs.ext4 -d failed");
        return None;
    }
    Some(())
}

#[test]
fn a_root_drive_is_mounted_and_switched_to_as_the_root_file_system() {
    let dir = TempDir::new();
    let Some(assets) = vmplay_image::DebianAssets::fetch(&cache(), &mut |l| eprintln!("{l}"))
        .map_err(|e| eprintln!("skipping: {e}"))
        .ok()
    else {
        assert!(std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none());
        return;
    };
    let tree = dir.path().join("root");
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy(assets.busybox(), tree.join("bin/busybox")).unwrap();
    let init = tree.join("sbin/init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n\
         /bin/busybox echo \"ROOT=$(/bin/busybox awk '$2 == \"/\" { r = $1 \" \" $3 } END { print r }' /proc/mounts) PID=$$\"\n\
         /bin/busybox poweroff -f\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let disk = dir.path().join("root.ext4");
    if ext4_image(&tree, &disk).is_none() {
        return;
    }
    let initrd = dir.path().join("initramfs.cpio");
    vmplay_image::Initramfs::debian(&assets)
        .unwrap()
        .write(&initrd)
        .unwrap();
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(assets.kernel())
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet", "--drive"])
        .arg(format!("path={},root=on", disk.display()));
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_code(0);
    assert!(
        run.stdout.contains("ROOT=/dev/vda ext4 PID=1"),
        "the disk's /sbin/init did not run as PID 1 on /dev/vda\n{run}"
    );
}

/// The run hook `script` in the Debian image, booted with `cmdline`
/// appended; returns what the guest printed once it powered off.
fn run_hook(script: &str, cmdline: &str, extra: &[&str]) -> Option<support::Run> {
    let dir = TempDir::new();
    let assets = match vmplay_image::DebianAssets::fetch(&cache(), &mut |l| eprintln!("{l}")) {
        Ok(a) => a,
        Err(e) => {
            assert!(std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(), "{e}");
            eprintln!("skipping: {e}");
            return None;
        }
    };
    let initrd = dir.path().join("initramfs.cpio");
    vmplay_image::Initramfs::debian(&assets)
        .unwrap()
        .file(vmplay_image::RUN_HOOK, script, 0o755)
        .write(&initrd)
        .unwrap();
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(assets.kernel())
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(format!("console=ttyS0 panic=-1 quiet {cmdline}"))
        .args(extra);
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_code(0);
    Some(run)
}

#[test]
fn the_kernel_ip_parameter_configures_the_named_interface_address_route_hostname_and_dns() {
    // On `lo`, so it needs no virtio-net; nothing leaves the guest.
    let script = r#"#!/bin/sh
echo "HOST=$(hostname)"
echo "ADDR=$(ip -4 addr show dev lo | grep -o 'inet [0-9./]*')"
echo "ROUTE=$(ip route | grep default | cut -d' ' -f1-3)"
echo "DNS=$(cat /etc/resolv.conf)"
exit 3
"#;
    let Some(run) = run_hook(
        script,
        "ip=10.0.2.15:10.0.2.2:10.0.2.2:255.255.255.0:guesty:lo:off:10.0.2.3",
        &[],
    ) else {
        return;
    };
    for line in [
        "HOST=guesty",
        "ADDR=inet 10.0.2.15/24",
        "ROUTE=default via 10.0.2.2",
        "DNS=nameserver 10.0.2.3",
        // The hook's status is reported, and the VM still powers off.
        "vmplay-init: /etc/vmplay/run exited with status 3",
    ] {
        assert!(run.stdout.contains(line), "no {line:?}\n{run}");
    }
}

/// `vmplay image debian --rootfs` once into the workspace's cache (it takes
/// minutes: mmdebstrap), then a sparse copy for this test to write on.
fn debian_rootfs(dir: &TempDir) -> Option<PathBuf> {
    let built = cache().join("rootfs-test");
    if !built.join("rootfs.ext4").exists() {
        let mut cmd = Command::new(vmplay_exe());
        cmd.args(["image", "debian", "--rootfs", "--size", "512M", "--out"])
            .arg(&built)
            .arg("--cache")
            .arg(cache());
        let run = run_with_deadline(cmd, Duration::from_secs(1200));
        if run.code() != 0 {
            assert!(
                std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
                "vmplay image debian --rootfs failed\n{run}"
            );
            eprintln!("skipping: vmplay image debian --rootfs failed here\n{run}");
            return None;
        }
    }
    let copy = dir.path().join("rootfs.ext4");
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(built.join("rootfs.ext4"))
        .arg(&copy)
        .status()
        .expect("run cp");
    assert!(status.success());
    Some(copy)
}

#[test]
fn a_debian_rootfs_boots_to_bash_with_apt_and_keeps_what_one_boot_wrote_for_the_next() {
    let dir = TempDir::new();
    let Some(disk) = debian_rootfs(&dir) else {
        return;
    };
    let built = cache().join("rootfs-test");
    let boot = |lines: &[(&str, &str, &str)]| {
        let start = Instant::now();
        let mut console = Console::start(
            Command::new(vmplay_exe())
                .args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
                .arg(built.join("vmlinuz"))
                .arg("--initrd")
                .arg(built.join("initramfs.cpio"))
                .args(["--cmdline", "console=ttyS0 panic=-1 quiet", "--drive"])
                .arg(format!("path={},root=on", disk.display())),
        );
        console.wait_for("a root shell on the console", start);
        console.wait_for("root@vmplay:/# ", start);
        for (command, prefix, expected) in lines {
            console.type_line(command);
            let answer = console.line_starting(prefix, start);
            assert!(
                answer.starts_with(expected),
                "{command}: {answer:?}\n{}",
                console.text()
            );
        }
        console.type_line("poweroff");
        let code = console.wait_exit(start);
        assert_eq!(code, 0, "{}", console.text());
    };
    boot(&[
        ("bash -c 'echo BASH=$BASH_VERSION'", "BASH=", "5."),
        ("echo APT=$(apt-get --version | head -1)", "APT=", "apt "),
        (
            "echo ROOT=$(findmnt -no SOURCE,FSTYPE /)",
            "ROOT=",
            "/dev/vda ext4",
        ),
        (
            "echo first-boot > /root/note; sync; echo WROTE=$(cat /root/note)",
            "WROTE=",
            "first-boot",
        ),
    ]);
    boot(&[("echo NOTE=$(cat /root/note)", "NOTE=", "first-boot")]);
}

#[test]
fn ip_dhcp_gets_eth0_a_lease_through_user_networking() {
    if Command::new("passt").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
            "passt is missing (apt-get install passt)"
        );
        eprintln!("skipping: no passt");
        return;
    }
    let script = r#"#!/bin/sh
echo "ADDR=$(ip -4 addr show dev eth0 | grep -o 'inet [0-9.]*')"
echo "GATEWAY=$(ip route | grep -c '^default via')"
"#;
    let Some(run) = run_hook(script, "ip=dhcp", &["--net", "user"]) else {
        return;
    };
    assert!(run.stdout.contains("(DHCP)"), "no lease reported\n{run}");
    assert!(
        run.stdout.contains("ADDR=inet "),
        "eth0 has no address\n{run}"
    );
    assert!(run.stdout.contains("GATEWAY=1"), "no default route\n{run}");
}

#[test]
fn root_partuuid_finds_the_gpt_partition_and_switches_to_it() {
    let dir = TempDir::new();
    let Some(assets) = vmplay_image::DebianAssets::fetch(&cache(), &mut |l| eprintln!("{l}"))
        .map_err(|e| eprintln!("skipping: {e}"))
        .ok()
    else {
        assert!(std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none());
        return;
    };
    let tree = dir.path().join("root");
    for d in ["bin", "sbin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy(assets.busybox(), tree.join("bin/busybox")).unwrap();
    let init = tree.join("sbin/init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n\
         /bin/busybox echo \"ROOT=$(/bin/busybox awk '$2 == \"/\" { r = $1 } END { print r }' /proc/mounts)\"\n\
         /bin/busybox poweroff -f\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A GPT disk: partition 1 from 1 MiB holds the ext4 root.
    let disk = dir.path().join("gpt.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let uuid = "8d1d8b84-5c0f-4f2a-9d6e-1c2b3a4d5e6f";
    let sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(
                format!("label: gpt\nstart=2048, size=120000, uuid={uuid}\n").as_bytes(),
            )?;
            c.wait()
        });
    if !sfdisk.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
            "sfdisk failed (install fdisk)"
        );
        eprintln!("skipping: no sfdisk");
        return;
    }
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("58M")
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "mkfs.ext4 -E offset= -d failed");
    let initrd = dir.path().join("initramfs.cpio");
    vmplay_image::Initramfs::debian(&assets)
        .unwrap()
        .write(&initrd)
        .unwrap();
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(assets.kernel())
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet root=PARTUUID={} rw",
            uuid.to_uppercase()
        ))
        .arg("--drive")
        .arg(format!("path={}", disk.display()));
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_code(0);
    assert!(
        run.stdout.contains("ROOT=/dev/vda1"),
        "not switched to /dev/vda1\n{run}"
    );
}
