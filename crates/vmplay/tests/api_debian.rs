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
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out[9..12]
        .parse()
        .unwrap_or_else(|_| panic!("bad response {out:?}"))
}

fn seconds_after(out: &str, tag: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(tag))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn debian_boots_over_the_api_pauses_without_clock_jump_and_reboots_on_ctrl_alt_del() {
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, HOOK, &[]) else {
        return;
    };
    let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let sock = dir.path().join("fc.sock");
    let mut child = Command::new(vmplay_exe())
        .args(["firecracker", "--boot-timer", "--api-sock"])
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
    let text = || out.lock().unwrap().clone();
    let wait_for = |needle: &str| {
        let start = Instant::now();
        while !text().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "no {needle:?}:\n{}",
                text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        "boot_args": "console=ttyS0 reboot=k panic=-1 quiet",
    });
    assert_eq!(call(&sock, "PUT", "/boot-source", &boot.to_string()), 204);
    assert_eq!(
        call(
            &sock,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256}"#
        ),
        204
    );
    let drive =
        serde_json::json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false});
    assert_eq!(call(&sock, "PUT", "/drives/data", &drive.to_string()), 204);
    assert_eq!(
        call(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#
        ),
        204
    );

    wait_for("uptime-a");
    assert!(
        text().contains("Guest-boot-time ="),
        "no boot-timer line:\n{}",
        text()
    );
    assert_eq!(call(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#), 204);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(call(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#), 204);
    wait_for("waiting-for-ctrl-alt-del");
    let out_now = text();
    let a = seconds_after(&out_now, "uptime-a").unwrap();
    let b = seconds_after(&out_now, "uptime-b").unwrap();
    // 2 s of guest sleep plus slack for a loaded host; had the guest seen
    // the 5 s pause it would be 7 s or more.
    assert!(b - a < 4.5, "the guest saw the pause: uptime {a} -> {b}");

    assert_eq!(
        call(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type":"SendCtrlAltDel"}"#
        ),
        204
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no exit after Ctrl-Alt-Del:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(status.code(), Some(0), "{}", text());
    assert!(
        text().contains("Firecracker exiting successfully"),
        "{}",
        text()
    );
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written.starts_with(b"vmplay-drive-ok\n"),
        "the guest did not write its drive"
    );
}
