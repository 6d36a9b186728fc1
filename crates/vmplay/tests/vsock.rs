//! virtio-vsock end to end: Debian's kernel on the software CPU with
//! vmplay-image's initramfs (it loads the vsock modules), a static guest helper (`vsock/vsk.c`, built here with
//! `gcc -static`; busybox has no AF_VSOCK), and the host side speaking
//! Firecracker's hybrid protocol on Unix sockets: `CONNECT <port>\n` /
//! `OK <port>\n` on `uds_path`, and guest connections to `<uds_path>_<port>`.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use support::{TempDir, debian_guest, run_with_deadline, vmplay_exe};

/// A Linux boot on the interpreter takes ~15 s; the transfers add a few
/// more, and CI runs tests side by side on two cores.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const MIB: usize = 1 << 20;
const ECHO_BYTES: usize = 64 * 1024;

/// `gcc -static` of the guest helper, or `None` (after saying why) when
/// this host has no C compiler; CI (`VMPLAY_REQUIRE_ASSETS`) must have one.
fn guest_helper(dir: &TempDir) -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vsock/vsk.c");
    let out = dir.path().join("vsk");
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status();
    match built {
        Ok(s) if s.success() => Some(out),
        other => {
            assert!(
                std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_none(),
                "cannot build the guest helper with gcc -static: {other:?}"
            );
            eprintln!("skipping: cannot build the guest helper with gcc -static: {other:?}");
            None
        }
    }
}

/// Deterministic bytes (xorshift), different per seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Connects to `uds` and asks for guest `port` until the guest listens
/// (it answers RST before that, and the host sees its stream closed).
fn host_connect(uds: &Path, port: u32, stop: &AtomicBool) -> Option<(UnixStream, String)> {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
            let mut line = Vec::new();
            let mut b = [0u8];
            while s.read(&mut b).ok() == Some(1) {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            if line.starts_with(b"OK ") {
                return Some((s, String::from_utf8_lossy(&line).into_owned()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Sends `data` while reading until EOF; returns what came back.
fn exchange(s: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut got = Vec::new();
    let mut r = s;
    let _ = r.read_to_end(&mut got);
    writer.join().unwrap().expect("host write");
    got
}

/// The guest line `vsock-test: <what> <value...>`.
fn guest_says<'a>(stdout: &'a str, what: &str) -> Vec<&'a str> {
    let prefix = format!("vsock-test: {what} ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the guest never said {prefix:?}:\n{stdout}"))
        .split_whitespace()
        .collect()
}

const GUEST_SCRIPT: &str = r#"#!/bin/sh
vsk echo 2000 10 > /dev/null &
echo_pid=$!
head -c 1048576 /dev/urandom > /g2h
echo "vsock-test: g2h $(sha256sum /g2h | cut -d' ' -f1)"
vsk listen 1234 < /g2h > /h2g-1
echo "vsock-test: host-initiated $(sha256sum /h2g-1 | cut -d' ' -f1) $(wc -c < /h2g-1)"
vsk connect 2 5000 < /g2h > /h2g-2
echo "vsock-test: guest-initiated $(sha256sum /h2g-2 | cut -d' ' -f1) $(wc -c < /h2g-2)"
wait $echo_pid
echo "vsock-test: echo done"
"#;

#[test]
fn vsock_moves_a_mebibyte_each_way_both_directions_and_ten_concurrent_streams_on_emu() {
    let dir = TempDir::new();
    let Some(helper) = guest_helper(&dir) else {
        return;
    };
    let helper = std::fs::read(helper).unwrap();
    let Some((kernel, initrd)) = debian_guest(&dir, GUEST_SCRIPT, &[("/bin/vsk", &helper, 0o755)])
    else {
        return;
    };
    let uds = dir.path().join("v.sock");
    // Guest-initiated connections to host port 5000 arrive here.
    let guest_port_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    guest_port_listener.set_nonblocking(true).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let to_guest_1 = bytes(1, MIB);
    let to_guest_2 = bytes(2, MIB);

    let host_initiated: JoinHandle<Option<(String, Vec<u8>)>> = {
        let (uds, stop, data) = (uds.clone(), stop.clone(), to_guest_1.clone());
        std::thread::spawn(move || {
            let (s, ok) = host_connect(&uds, 1234, &stop)?;
            Some((ok, exchange(s, data)))
        })
    };
    let guest_initiated: JoinHandle<Option<Vec<u8>>> = {
        let (stop, data) = (stop.clone(), to_guest_2.clone());
        std::thread::spawn(move || {
            let s = loop {
                match guest_port_listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if stop.load(Ordering::Relaxed) {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            Some(exchange(s, data))
        })
    };
    let echoes: Vec<JoinHandle<Option<bool>>> = (0..10u64)
        .map(|i| {
            let (uds, stop) = (uds.clone(), stop.clone());
            std::thread::spawn(move || {
                let (s, _) = host_connect(&uds, 2000, &stop)?;
                let data = bytes(100 + i, ECHO_BYTES);
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || w.write_all(&sent));
                let mut back = vec![0u8; ECHO_BYTES];
                let mut r = s;
                let ok = r.read_exact(&mut back).is_ok() && back == data;
                writer.join().unwrap().ok()?;
                Some(ok)
            })
        })
        .collect();

    let mut cmd = Command::new(vmplay_exe());
    cmd.args([
        "run", "--accel", "emu", "--memory", "256M", "--serial", "stdio",
    ])
    .arg("--kernel")
    .arg(&kernel)
    .arg("--initrd")
    .arg(&initrd)
    .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
    .arg("--vsock")
    .arg(format!("cid=3,uds={}", uds.display()));
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    stop.store(true, Ordering::Relaxed);
    run.assert_code(0);
    assert!(!run.stdout.contains("cannot load"), "{run}");

    // Host-initiated: the guest's 1 MiB reached the host, the host's the guest.
    let g2h = guest_says(&run.stdout, "g2h")[0].to_string();
    let (ok, from_guest_1) = host_initiated
        .join()
        .unwrap()
        .unwrap_or_else(|| panic!("host-initiated connection never got OK\n{run}"));
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{ok:?} is not `OK <port>\\n`"));
    assert!(
        (1 << 30..1 << 31).contains(&port),
        "{ok:?}: a port from 2^30"
    );
    assert_eq!(from_guest_1.len(), MIB);
    assert_eq!(sha256(&from_guest_1), g2h, "guest to host, host-initiated");
    let said = guest_says(&run.stdout, "host-initiated");
    assert_eq!(
        said,
        [sha256(&to_guest_1).as_str(), "1048576"],
        "host to guest, host-initiated"
    );

    // Guest-initiated: the same, over `<uds_path>_5000`.
    let from_guest_2 = guest_initiated
        .join()
        .unwrap()
        .unwrap_or_else(|| panic!("the guest never connected to {}_5000\n{run}", uds.display()));
    assert_eq!(sha256(&from_guest_2), g2h, "guest to host, guest-initiated");
    let said = guest_says(&run.stdout, "guest-initiated");
    assert_eq!(
        said,
        [sha256(&to_guest_2).as_str(), "1048576"],
        "host to guest, guest-initiated"
    );

    // Ten connections at once through the guest's echo server.
    for (i, e) in echoes.into_iter().enumerate() {
        assert_eq!(e.join().unwrap(), Some(true), "echo connection {i}\n{run}");
    }
    guest_says(&run.stdout, "echo");
}

#[test]
fn a_stale_socket_at_uds_path_is_firecrackers_bind_error() {
    let dir = TempDir::new();
    let uds = dir.path().join("v.sock");
    drop(UnixListener::bind(&uds).unwrap()); // leaves the socket file
    let kernel = dir.file("good.elf", &vmplay_guests::debug_exit(0));
    let run = support::vmplay_run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--accel",
        "emu",
        "--serial",
        "none",
        "--vsock",
        &format!("cid=3,uds={}", uds.display()),
    ]);
    run.assert_one_line_error(
        "Cannot create backend for vsock device: Error binding to the host-side Unix socket: Address in use (os error 98)",
    );
    run.assert_stderr_contains(&uds.display().to_string());
}
