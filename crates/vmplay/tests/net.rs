//! virtio-net with Debian's kernel on the software CPU: a guest on a host
//! TAP (in a network namespace of its own) pings the host and moves 4 MiB
//! over TCP each way with matching checksums; a guest on `--net user`
//! (passt, no root) reaches a TCP listener on the host's loopback.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Run, TempDir, debian_guest, host_tool, run_with_deadline, vmplay_exe};

/// A Linux boot on the interpreter takes 10-25 s; the transfers a few
/// more; CI runs tests side by side on two cores.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
const MIB4: usize = 4 << 20;

fn require_assets() -> bool {
    std::env::var_os("VMPLAY_REQUIRE_ASSETS").is_some()
}

/// `true` when the test can go on; otherwise says why it skips (or fails,
/// where assets are required, as in CI).
fn have(what: &str, ok: bool) -> bool {
    if !ok {
        assert!(!require_assets(), "{what}");
        eprintln!("skipping: {what}");
    }
    ok
}

/// `vmplay run` on emu with `kernel`, `initrd` and `net`, optionally
/// inside network namespace `netns`.
fn boot(netns: Option<&str>, (kernel, initrd): &(PathBuf, PathBuf), net: &str) -> Run {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(vmplay_exe());
            c
        }
        None => Command::new(vmplay_exe()),
    };
    cmd.args(["run", "--accel", "emu", "--memory", "512M"])
        .args(["--serial", "stdio", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .args(["--net", net]);
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_code(0);
    run
}

/// The value the guest printed after `key `.
fn guest_said<'a>(run: &'a Run, key: &str) -> &'a str {
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("the guest did not say {key:?}\n{run}"))
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum");
    feeder.join().expect("feeder").expect("feed sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Bytes no guest could guess (xorshift from a fixed seed).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Waits for one connection until `deadline`.
fn accept_by(listener: &TcpListener, deadline: Instant) -> Option<TcpStream> {
    listener.set_nonblocking(true).ok()?;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
                s.set_write_timeout(Some(Duration::from_secs(120))).ok()?;
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return None,
        }
    }
    None
}

/// The host side of the transfers: on `port` it reads what the guest
/// sends until the guest closes; on `port + 1` it sends `data` and closes.
/// Returns what it read.
fn serve(g2h: TcpListener, h2g: TcpListener, data: Vec<u8>) -> Vec<u8> {
    let deadline = Instant::now() + BOOT_DEADLINE;
    let mut got = Vec::new();
    if let Some(mut s) = accept_by(&g2h, deadline) {
        let _ = s.read_to_end(&mut got);
    }
    if let Some(mut s) = accept_by(&h2g, deadline) {
        let _ = s.write_all(&data);
    }
    got
}

/// A network namespace with a TAP at 10.0.2.1/24, removed (TAP and all)
/// when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: &str, tap: &str) -> Netns {
        ip(&["netns", "add", name]);
        let ns = Netns { name: name.into() };
        ip(&["-n", name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", name, "addr", "add", "10.0.2.1/24", "dev", tap]);
        ip(&["-n", name, "link", "set", tap, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) on a namespace fd open for the call; it moves
            // only this thread, which nothing else shares.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the guest does on a TAP: address, ping, 4 MiB out, 4 MiB in.
const TAP_GUEST: &str = r#"#!/bin/sh
ip link set eth0 up
ip addr add 10.0.2.2/24 dev eth0
ping -c 2 -W 10 10.0.2.1 >/dev/null && echo "ping ok"
dd if=/dev/urandom of=/tmp/g2h bs=1M count=4 2>/dev/null
echo "g2h-sha $(sha256sum /tmp/g2h)"
nc 10.0.2.1 5001 </tmp/g2h && echo "g2h sent"
nc 10.0.2.1 5002 </dev/null >/tmp/h2g
echo "h2g-sha $(sha256sum /tmp/h2g)"
"#;

#[test]
fn guest_on_a_tap_pings_the_host_and_moves_4_mib_each_way_over_tcp() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !have("the TAP test needs root (network namespaces)", root)
        || host_tool("ip").is_none()
        || !have("no /dev/net/tun", Path::new("/dev/net/tun").exists())
    {
        return;
    }
    let dir = TempDir::new();
    let Some(guest) = debian_guest(&dir, TAP_GUEST, &[]) else {
        return;
    };
    let pid = std::process::id();
    let tap = format!("vmpt{}", pid % 10_000_000);
    let ns = Netns::new(&format!("vmplay-net-{pid}"), &tap);
    let data = pattern(MIB4, 0x6e65_7476);
    let want_h2g = sha256(&data);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let host = ns.spawn(move || {
        let g2h = TcpListener::bind("10.0.2.1:5001").expect("bind 10.0.2.1:5001");
        let h2g = TcpListener::bind("10.0.2.1:5002").expect("bind 10.0.2.1:5002");
        let _ = ready_tx.send(());
        serve(g2h, h2g, data)
    });
    ready.recv().expect("host listeners");
    let run = boot(Some(&ns.name), &guest, &format!("tap={tap}"));
    let got = host.join().expect("host side");
    assert!(
        run.stdout.contains("ping ok"),
        "the guest cannot ping the host\n{run}"
    );
    assert_eq!(got.len(), MIB4, "guest to host: wrong length\n{run}");
    assert_eq!(
        sha256(&got),
        guest_said(&run, "g2h-sha"),
        "guest to host\n{run}"
    );
    assert_eq!(
        guest_said(&run, "h2g-sha"),
        want_h2g,
        "host to guest\n{run}"
    );
}

#[test]
fn guest_on_user_networking_reaches_a_tcp_listener_on_the_host_loopback() {
    if host_tool("passt").is_none() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("port").port();
    // The gateway 10.0.2.2 is the host's loopback; the guest sends 1 MiB,
    // the host answers with the checksum it computed. The guest stops
    // waiting once the answer is in: Debian 12's passt never passes on
    // the host's close after the guest closed its half first.
    let script = format!(
        r#"#!/bin/sh
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
dd if=/dev/urandom of=/tmp/out bs=1M count=1 2>/dev/null
echo "sent-sha $(sha256sum /tmp/out)"
: >/tmp/reply
nc 10.0.2.2 {port} </tmp/out >/tmp/reply &
n=0
while [ "$(wc -c </tmp/reply)" -lt 65 ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
kill $! 2>/dev/null
echo "reply $(cat /tmp/reply)"
"#
    );
    let dir = TempDir::new();
    let Some(guest) = debian_guest(&dir, &script, &[]) else {
        return;
    };
    let host = std::thread::spawn(move || {
        let mut s = accept_by(&listener, Instant::now() + BOOT_DEADLINE)?;
        let peer = s.peer_addr().ok()?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).ok()?;
        let sha = sha256(&got);
        s.write_all(format!("{sha}\n").as_bytes()).ok()?;
        Some((peer, got.len(), sha))
    });
    let run = boot(None, &guest, "user");
    let (peer, len, sha) = host
        .join()
        .expect("host side")
        .unwrap_or_else(|| panic!("the guest never connected\n{run}"));
    assert!(peer.ip().is_loopback(), "connection from {peer}");
    assert_eq!(len, 1 << 20, "wrong length\n{run}");
    assert_eq!(guest_said(&run, "sent-sha"), sha, "guest to host\n{run}");
    assert_eq!(guest_said(&run, "reply"), sha, "host to guest\n{run}");
}

/// What the guest asks the metadata service: a V2 token over raw TCP
/// (`nc`), then GETs with busybox wget, with and without the token, and
/// a ping through the same interface to the TAP. (No `wget -T`: Debian
/// 12's static busybox wget crashes with it, on any CPU.)
const MMDS_GUEST: &str = r#"#!/bin/sh
ip link set eth0 up
ip addr add 10.0.2.2/24 dev eth0
ip route add 169.254.169.254 dev eth0
printf 'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' \
    | timeout 60 nc 169.254.169.254 80 >/tmp/put
echo "put-status $(head -n1 /tmp/put | cut -d' ' -f2)"
token=$(tail -n1 /tmp/put)
echo "token-length ${#token}"
echo "ami $(timeout 60 wget -q -O - --header "X-metadata-token: $token" http://169.254.169.254/latest/meta-data/ami-id)"
echo "keys $(timeout 60 wget -q -O - --header "X-metadata-token: $token" http://169.254.169.254/latest/meta-data/ | tr '\n' ,)"
timeout 60 wget -q -O - http://169.254.169.254/latest/meta-data/ami-id >/dev/null 2>&1 || echo "no-token refused"
ping -c 1 -W 10 10.0.2.1 >/dev/null && echo "ping ok"
"#;

#[test]
fn the_guest_reads_mmds_v2_metadata_from_its_interface_with_a_session_token() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !have("the MMDS test needs root (network namespaces)", root)
        || host_tool("ip").is_none()
        || !have("no /dev/net/tun", Path::new("/dev/net/tun").exists())
    {
        return;
    }
    let dir = TempDir::new();
    let Some((kernel, initrd)) = debian_guest(&dir, MMDS_GUEST, &[]) else {
        return;
    };
    let pid = std::process::id();
    let tap = format!("vmpm{}", pid % 10_000_000);
    let ns = Netns::new(&format!("vmplay-mmds-{pid}"), &tap);
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": "console=ttyS0 panic=-1 quiet"
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
        "drives": [],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap}],
        "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]}
    });
    let config_path = dir.file("vm.json", config.to_string().as_bytes());
    let metadata = serde_json::json!({
        "latest": {"meta-data": {"ami-id": "ami-0vmplay", "instance": {"id": "i-1"}}}
    });
    let metadata_path = dir.file("metadata.json", metadata.to_string().as_bytes());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(vmplay_exe())
        .args(["firecracker", "--no-api", "--config-file"])
        .arg(&config_path)
        .arg("--metadata")
        .arg(&metadata_path)
        .env("VMPLAY_ACCEL", "emu");
    let run = run_with_deadline(cmd, BOOT_DEADLINE);
    run.assert_code(0);
    assert_eq!(guest_said(&run, "put-status"), "200", "{run}");
    assert_eq!(guest_said(&run, "token-length"), "64", "{run}");
    assert_eq!(guest_said(&run, "ami"), "ami-0vmplay", "{run}");
    assert_eq!(guest_said(&run, "keys"), "ami-id,instance/", "{run}");
    assert!(run.stdout.contains("no-token refused"), "{run}");
    assert!(run.stdout.contains("ping ok"), "{run}");
}
