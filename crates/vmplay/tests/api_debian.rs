//! The Firecracker flow with Debian's kernel on `emu`, as a Firecracker
//! user drives it: configure over the API, InstanceStart, the guest writes
//! the boot-timer byte and its drive, pause for 5 s and resume (the guest's
//! clock does not see the pause), then SendCtrlAltDel reboots it and vmplay
//! exits 0 as Firecracker does.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{TempDir, debian_guest, vmplay_exe};

const HOOK: &str = r#"#!/bin/sh
devmem 0xc0000000 8 123
echo vmplay-drive-ok | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
echo "uptime-a $(cut -d' ' -f1 /proc/uptime)"
sleep 2
echo "uptime-b $(cut -d' ' -f1 /proc/uptime)"
echo waiting-for-ctrl-alt-del
sleep 600
"#;

fn call(sock: &std::path::Path, method: &str, path: &str, body: &str) -> u16 {
    call_body(sock, method, path, body).0
}

/// The status and body of one API call.
fn call_body(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The number after `tag` on the guest's console. A kernel message may
/// land in the middle of the line, so the first token after the tag that
/// parses wins.
fn seconds_after(out: &str, tag: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let rest = &l[l.find(tag)? + tag.len()..];
        rest.split_whitespace().find_map(|t| t.parse().ok())
    })
}

/// A `vmplay firecracker --api-sock` on emu, its stdout collected.
struct Firecracker {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
    sock: std::path::PathBuf,
}

impl Firecracker {
    fn start(dir: &TempDir, extra: &[&str]) -> Firecracker {
        let sock = dir.path().join("fc.sock");
        let mut child = Command::new(vmplay_exe())
            .arg("firecracker")
            .args(extra)
            .arg("--api-sock")
            .arg(&sock)
            .env("VMPLAY_ACCEL", "emu")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        {
            let out = out.clone();
            let mut pipe = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let start = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(5));
        }
        Firecracker { child, out, sock }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "no {needle:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> u16 {
        call(&self.sock, method, path, body)
    }

    /// Waits for the exit; its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no exit:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        status
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn debian_boots_over_the_api_pauses_without_clock_jump_and_reboots_on_ctrl_alt_del() {
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, HOOK, &[]) else {
        return;
    };
    let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let mut fc = Firecracker::start(&dir, &["--boot-timer"]);
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        "boot_args": "console=ttyS0 reboot=k panic=-1 quiet",
    });
    assert_eq!(fc.call("PUT", "/boot-source", &boot.to_string()), 204);
    assert_eq!(
        fc.call(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256}"#
        ),
        204
    );
    let drive =
        serde_json::json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false});
    assert_eq!(fc.call("PUT", "/drives/data", &drive.to_string()), 204);
    assert_eq!(
        fc.call("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        204
    );

    fc.wait_for("uptime-a");
    assert!(
        fc.text().contains("Guest-boot-time ="),
        "no boot-timer line:\n{}",
        fc.text()
    );
    assert_eq!(fc.call("PATCH", "/vm", r#"{"state":"Paused"}"#), 204);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(fc.call("PATCH", "/vm", r#"{"state":"Resumed"}"#), 204);
    fc.wait_for("waiting-for-ctrl-alt-del");
    let out_now = fc.text();
    let a = seconds_after(&out_now, "uptime-a")
        .unwrap_or_else(|| panic!("no uptime-a value in:\n{out_now}"));
    let b = seconds_after(&out_now, "uptime-b")
        .unwrap_or_else(|| panic!("no uptime-b value in:\n{out_now}"));
    // 2 s of guest sleep plus slack for a loaded host; had the guest seen
    // the 5 s pause it would be 7 s or more.
    assert!(b - a < 4.5, "the guest saw the pause: uptime {a} -> {b}");

    assert_eq!(
        fc.call("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#),
        204
    );
    let status = fc.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", fc.text());
    assert!(
        fc.text().contains("Firecracker exiting successfully"),
        "{}",
        fc.text()
    );
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written.starts_with(b"vmplay-drive-ok\n"),
        "the guest did not write its drive"
    );
}

/// The guest reads its drive, waits until the host swaps the backing file
/// (the capacity changes), reads the new one and writes it, and draws
/// entropy.
const PATCH_HOOK: &str = r#"#!/bin/sh
echo "first $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 6)"
dd if=/dev/hwrng of=/dev/null bs=4096 count=1 2>/dev/null
echo ready-for-patch
n=0
while [ "$(cat /sys/block/vda/size)" = 2048 ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
sync; echo 3 >/proc/sys/vm/drop_caches
echo "size $(cat /sys/block/vda/size)"
echo "second $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 6)"
echo vmplay-patched | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null
echo patch-done
sleep 600
"#;

#[test]
fn a_running_drive_gets_a_new_backing_file_by_patch_and_device_counters_reach_the_metrics() {
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, PATCH_HOOK, &[]) else {
        return;
    };
    let mut a = b"disk-a".to_vec();
    a.resize(1 << 20, 0);
    let mut b = b"disk-b".to_vec();
    b.resize(2 << 20, 0);
    let (disk_a, disk_b) = (dir.file("a.img", &a), dir.file("b.img", &b));
    let metrics = dir.path().join("metrics.ndjson");
    let fc = Firecracker::start(&dir, &[]);
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        "boot_args": "console=ttyS0 reboot=k panic=-1 quiet",
    });
    assert_eq!(fc.call("PUT", "/boot-source", &boot.to_string()), 204);
    assert_eq!(
        fc.call(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256}"#
        ),
        204
    );
    let drive =
        serde_json::json!({"drive_id": "data", "path_on_host": disk_a, "is_root_device": false});
    assert_eq!(fc.call("PUT", "/drives/data", &drive.to_string()), 204);
    assert_eq!(fc.call("PUT", "/entropy", "{}"), 204);
    let m = serde_json::json!({ "metrics_path": metrics });
    assert_eq!(fc.call("PUT", "/metrics", &m.to_string()), 204);
    assert_eq!(
        fc.call("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        204
    );
    fc.wait_for("ready-for-patch");
    // A file that is not there: Firecracker's wording, and nothing changes.
    let (status, body) = call_body(
        &fc.sock,
        "PATCH",
        "/drives/data",
        r#"{"drive_id":"data","path_on_host":"/nonexistent/b.img"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("Error manipulating the backing file") && body.contains("/nonexistent/b.img"),
        "{body}"
    );
    let patch = serde_json::json!({"drive_id": "data", "path_on_host": disk_b});
    assert_eq!(fc.call("PATCH", "/drives/data", &patch.to_string()), 204);
    fc.wait_for("patch-done");
    let text = fc.text();
    assert!(text.contains("first disk-a"), "{text}");
    assert!(text.contains("size 4096"), "{text}");
    assert!(text.contains("second disk-b"), "{text}");
    let written = std::fs::read(&disk_b).unwrap();
    assert!(written[512..].starts_with(b"vmplay-patched\n"), "{text}");
    assert_eq!(
        std::fs::read(&disk_a).unwrap(),
        a,
        "the old file was written"
    );
    let (_, config) = call_body(&fc.sock, "GET", "/vm/config", "");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        serde_json::json!(disk_b),
        "{config}"
    );

    assert_eq!(
        fc.call("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#),
        204
    );
    // Counters are deltas: sum every line written so far.
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let sum = |group: &str, field: &str| -> u64 {
        lines
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v[group][field].as_u64())
            .sum()
    };
    assert!(sum("block", "read_bytes") >= 1024, "{lines}");
    assert!(sum("block_data", "write_bytes") >= 512, "{lines}");
    assert_eq!(sum("block", "update_count"), 1, "{lines}");
    assert_eq!(
        sum("block", "update_count"),
        sum("block_data", "update_count")
    );
    assert!(sum("entropy", "entropy_bytes") >= 4096, "{lines}");
}

const VSOCK_HOOK: &str = r#"#!/bin/sh
echo vsock-ready
sleep 600
"#;

/// Sends a CONNECT line the muxer refuses: it closes the stream, so the
/// host reads EOF, but only once the event loop runs.
fn bad_handshake(uds: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect to uds_path");
    s.write_all(b"HELLO 52\n").unwrap();
    s
}

/// Whether the stream reaches EOF within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0))
}

#[test]
fn pausing_the_vm_holds_device_work_until_resume_and_vmplays_own_events_reach_the_log() {
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, VSOCK_HOOK, &[]) else {
        return;
    };
    let uds = dir.path().join("v.sock");
    let log = dir.path().join("fc.log");
    std::fs::write(&log, b"").unwrap();
    let fc = Firecracker::start(
        &dir,
        &[
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
            "--show-level",
            "--show-log-origin",
        ],
    );
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        "boot_args": "console=ttyS0 reboot=k panic=-1 quiet",
    });
    assert_eq!(fc.call("PUT", "/boot-source", &boot.to_string()), 204);
    let vsock = serde_json::json!({"guest_cid": 3, "uds_path": uds});
    assert_eq!(fc.call("PUT", "/vsock", &vsock.to_string()), 204);
    assert_eq!(
        fc.call("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        204
    );
    fc.wait_for("vsock-ready");

    // Running: the muxer reads the line and closes the stream at once.
    let mut s = bad_handshake(&uds);
    assert!(
        closed_within(&mut s, Duration::from_secs(20)),
        "not closed while running"
    );

    // Paused: the connection waits in the listener's backlog and nothing
    // reads it (no device work, nothing into guest memory) ...
    assert_eq!(fc.call("PATCH", "/vm", r#"{"state":"Paused"}"#), 204);
    let mut s = bad_handshake(&uds);
    assert!(
        !closed_within(&mut s, Duration::from_secs(3)),
        "the event loop served the socket while paused"
    );
    // ... until resume.
    assert_eq!(fc.call("PATCH", "/vm", r#"{"state":"Resumed"}"#), 204);
    assert!(
        closed_within(&mut s, Duration::from_secs(20)),
        "not closed after resume"
    );

    // vmplay's own tracing events went through Firecracker's logger to
    // the log file, in its format with level and origin.
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("vsock: bad CONNECT line from the host"))
        .unwrap_or_else(|| panic!("no vsock line in the log:\n{text}"));
    assert!(
        line.contains(":vmm:INFO:crates/virtio/src/devices/vsock/muxer.rs:"),
        "{line}"
    );
    assert_eq!(text.matches("vsock: bad CONNECT line").count(), 2, "{text}");
    assert!(text.contains("Running Firecracker v"), "{text}");
}

#[test]
fn the_boot_timer_fires_for_debian_with_4_gib_of_ram() {
    let dir = TempDir::new();
    // The image's own /init writes the boot timer (no devmem here).
    let hook = "#!/bin/sh\necho \"mem $(grep MemTotal /proc/meminfo)\"\n";
    let Some((kernel, initrd)) = debian_guest(&dir, hook, &[]) else {
        return;
    };
    // RAM past 3 GiB moves above 4 GiB; 0xc0000000 stays the timer's.
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": "console=ttyS0 reboot=k panic=-1 quiet",
        },
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 4096},
    });
    let path = dir.file("vm.json", config.to_string().as_bytes());
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["firecracker", "--no-api", "--boot-timer", "--config-file"])
        .arg(&path)
        .env("VMPLAY_ACCEL", "emu")
        .stdin(Stdio::null());
    let r = support::run_with_deadline(cmd, Duration::from_secs(240));
    assert_eq!(r.code(), 0, "{r}");
    assert!(r.stdout.contains("Guest-boot-time ="), "{r}");
    let kib: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("mem MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line:\n{r}"));
    assert!(kib > 3 << 20, "the guest has {kib} KiB");
}
