//! Firecracker's REST API, driven from outside as a Firecracker user does:
//! `vmplay firecracker --api-sock PATH`, requests over the Unix socket
//! (a small HTTP/1.1 client here, and `curl --unix-socket` where curl is
//! installed), status codes and `fault_message`s asserted.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{TempDir, backends, vmplay_exe};
use vmplay_api::seccomp::BpfProgram;
use vmplay_guests::MultibootImage;
use vmplay_guests::runtime::Runtime32;

const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

/// One answer: status, the raw head, the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn fault(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body));
        v["fault_message"].as_str().unwrap_or_default().to_string()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A keep-alive HTTP/1.1 client on the API socket.
struct Client(UnixStream);

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect to the API socket");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Client(s)
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Answer {
        self.0.write_all(bytes).expect("send request");
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            let n = self.0.read(&mut byte).expect("read response head");
            assert!(
                n == 1,
                "connection closed mid-head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let status = head[9..12].parse().expect("status code");
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.0.read_exact(&mut body).expect("read body");
        Answer {
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    fn call(&mut self, method: &str, path: &str, body: Option<&str>) -> Answer {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.send_raw(req.as_bytes())
    }

    fn get(&mut self, path: &str) -> Answer {
        self.call("GET", path, None)
    }
    fn put(&mut self, path: &str, body: &str) -> Answer {
        self.call("PUT", path, Some(body))
    }
    fn patch(&mut self, path: &str, body: &str) -> Answer {
        self.call("PATCH", path, Some(body))
    }
}

/// A running `vmplay firecracker`, its stdout collected.
struct Fc {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    sock: PathBuf,
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    out
}

impl Fc {
    fn start(dir: &TempDir, accel: &str, extra: &[&str]) -> Fc {
        let sock = dir.path().join("fc.sock");
        let mut child = Command::new(vmplay_exe())
            .arg("firecracker")
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .env("VMPLAY_ACCEL", accel)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmplay firecracker");
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        let start = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "API socket never came up"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Fc {
            child,
            out,
            err,
            sock,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.sock)
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn count(&self, c: char) -> usize {
        self.stdout().matches(c).count()
    }

    fn wait_for(&self, what: impl Fn(&str) -> bool, why: &str) {
        let start = Instant::now();
        while !what(&self.stdout()) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{why}; stdout:\n{}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; returns its code.
    fn wait_exit(&mut self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return s.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "vmplay did not exit; stdout:\n{}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Fc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned();
        if std::thread::panicking() {
            eprintln!(
                "--- vmplay stdout ---\n{}\n--- vmplay stderr ---\n{err}",
                self.stdout()
            );
        }
    }
}

/// A guest that prints `~` forever, with a pause between each, so a test
/// sees at once whether its vCPU runs.
fn tilde_printer() -> Vec<u8> {
    let mut img = MultibootImage::new();
    let scratch = img.zeroed(vmplay_guests::runtime::RUNTIME32_SCRATCH, 16);
    let entry = img
        .code32(|a| {
            let mut rt = Runtime32::new(a, scratch);
            use iced_x86::code_asm::*;
            a.cli()?;
            let mut again = a.create_label();
            let mut delay = a.create_label();
            a.set_label(&mut again)?;
            rt.print(a, "~")?;
            a.mov(ecx, 200_000u32)?;
            a.set_label(&mut delay)?;
            a.dec(ecx)?;
            a.jnz(delay)?;
            a.jmp(again)?;
            rt.finish(a)
        })
        .expect("assemble the printing guest");
    img.set_entry32(entry);
    img.build().expect("build the printing guest")
}

/// A guest that says `ready`, reads four bytes from the i8042 keyboard
/// (polling its status), prints `keys` and resets through the i8042.
fn key_reader() -> Vec<u8> {
    let mut img = MultibootImage::new();
    let scratch = img.zeroed(vmplay_guests::runtime::RUNTIME32_SCRATCH, 16);
    let entry = img
        .code32(|a| {
            let mut rt = Runtime32::new(a, scratch);
            use iced_x86::code_asm::*;
            a.cli()?;
            rt.print(a, "ready\n")?;
            a.mov(ebx, 4u32)?;
            let mut poll = a.create_label();
            a.set_label(&mut poll)?;
            a.in_(al, 0x64)?;
            a.test(al, 1)?;
            a.jz(poll)?;
            a.in_(al, 0x60)?;
            a.dec(ebx)?;
            a.jnz(poll)?;
            rt.print(a, "keys\n")?;
            a.mov(al, 0xfeu32)?;
            a.out(0x64, al)?;
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.jmp(spin)?;
            rt.finish(a)
        })
        .expect("assemble the key reader");
    img.set_entry32(entry);
    img.build().expect("build the key reader")
}

fn boot_source(kernel: &Path) -> String {
    serde_json::json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}).to_string()
}

#[test]
fn every_endpoint_answers_with_firecrackers_codes_before_boot() {
    let dir = TempDir::new();
    let fc = Fc::start(&dir, "emu", &["--mmds-size-limit", "1000"]);
    let mut c = fc.client();
    let disk = dir.file("disk.img", &[0u8; 4096]);
    let disk = disk.to_str().unwrap();
    let kernel = dir.file("k.elf", &vmplay_guests::i8042_reset());

    // (method, path, body, status, fault_message: exact, or prefix with a trailing '*').
    let cases: Vec<(&str, String, Option<String>, u16, String)> = vec![
        ("GET", "/".into(), None, 200, String::new()),
        ("GET", "/version".into(), None, 200, String::new()),
        ("GET", "/".into(), Some("{}".into()), 400, "GET request cannot have a body.".into()),
        ("PUT", "/boot-source".into(), None, 400, "Empty PUT request.".into()),
        ("PATCH", "/boot-source".into(), Some("{}".into()), 400, "Invalid request method and/or path: PATCH boot-source.".into()),
        ("GET", "/nope".into(), None, 400, "Invalid request method and/or path: GET nope.".into()),
        ("PUT", "/boot-source".into(), Some(r#"{"kernel_image_path":"/nonexistent"}"#.into()), 400,
            "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)".into()),
        ("PUT", "/boot-source".into(), Some(r#"{"kernel_image_path":"k","bogus":1}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown field `bogus`*".into()),
        ("PUT", "/boot-source".into(), Some("{not json".into()), 400,
            "An error occurred when deserializing the json body of a request: key must be a string at line 1 column 2.".into()),
        ("PUT", "/boot-source".into(), Some(boot_source(&kernel)), 204, String::new()),
        ("PUT", "/machine-config".into(), Some(r#"{"vcpu_count":1}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: missing field `mem_size_mib` at line 1 column 16.".into()),
        ("PUT", "/machine-config".into(), Some(r#"{"vcpu_count":0,"mem_size_mib":64}"#.into()), 400,
            "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.".into()),
        ("PUT", "/machine-config".into(), Some(r#"{"vcpu_count":1,"mem_size_mib":0}"#.into()), 400,
            "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.".into()),
        ("PUT", "/machine-config".into(), Some(r#"{"vcpu_count":1,"mem_size_mib":64}"#.into()), 204, String::new()),
        ("PATCH", "/machine-config".into(), Some("{}".into()), 400, "Empty PATCH request.".into()),
        ("PATCH", "/machine-config".into(), Some(r#"{"mem_size_mib":32}"#.into()), 204, String::new()),
        ("GET", "/machine-config".into(), None, 200, String::new()),
        ("PUT", "/drives".into(), Some("{}".into()), 400, "The ID cannot be empty.".into()),
        ("PUT", "/drives/a-b".into(), Some("{}".into()), 400, "API Resource IDs can only contain alphanumeric characters and underscores.".into()),
        ("PUT", "/drives/root".into(), Some(format!(r#"{{"drive_id":"other","path_on_host":"{disk}","is_root_device":true}}"#)), 400,
            "The id from the path does not match the id from the body!".into()),
        ("PUT", "/drives/root".into(), Some(r#"{"drive_id":"root","path_on_host":"/nonexistent.img","is_root_device":true}"#.into()), 400,
            "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) /nonexistent.img".into()),
        ("PUT", "/drives/root".into(), Some(format!(r#"{{"drive_id":"root","path_on_host":"{disk}","is_root_device":true}}"#)), 204, String::new()),
        ("PUT", "/drives/second".into(), Some(format!(r#"{{"drive_id":"second","path_on_host":"{disk}","is_root_device":true}}"#)), 400,
            "Drive config error: A root block device already exists!".into()),
        ("PATCH", "/drives/root".into(), Some(r#"{"drive_id":"root"}"#.into()), 400, BEFORE_START.into()),
        ("PATCH", "/drives/root".into(), Some(r#"{"drive_id":"root","is_read_only":true}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown field `is_read_only`*".into()),
        ("PUT", "/network-interfaces/eth0".into(), Some(r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#.into()), 400,
            "The id from the path [eth0] does not match the id from the body [eth1]!".into()),
        ("PUT", "/network-interfaces/eth0".into(), Some(r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#.into()), 204, String::new()),
        ("PUT", "/network-interfaces/eth1".into(), Some(r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"06:00:AC:10:00:02"}"#.into()), 400,
            "Network config error: The MAC address is already in use: 06:00:AC:10:00:02".into()),
        ("PATCH", "/network-interfaces/eth0".into(), Some(r#"{"iface_id":"eth0"}"#.into()), 400, BEFORE_START.into()),
        ("PUT", "/vsock".into(), Some(r#"{"guest_cid":3}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: missing field `uds_path`*".into()),
        ("PUT", "/vsock".into(), Some(format!(r#"{{"guest_cid":3,"uds_path":"{disk}"}}"#)), 400,
            "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: Address in use (os error 98)".into()),
        ("PUT", "/vsock".into(), Some(format!(r#"{{"guest_cid":3,"uds_path":"{}/v.sock"}}"#, dir.path().display())), 204, String::new()),
        ("PUT", "/entropy".into(), Some(r#"{"bogus":1}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown field `bogus`*".into()),
        ("PUT", "/entropy".into(), Some("{}".into()), 204, String::new()),
        ("PUT", "/mmds/config".into(), Some(r#"{"network_interfaces":[]}"#.into()), 400,
            "MMMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty.".into()),
        ("PUT", "/mmds/config".into(), Some(r#"{"network_interfaces":["nope"]}"#.into()), 400,
            "MMMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.".into()),
        ("PUT", "/mmds/config".into(), Some(r#"{"network_interfaces":["eth0"],"version":"V3"}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown variant `V3`, expected `V1` or `V2`*".into()),
        ("PUT", "/mmds/config".into(), Some(r#"{"network_interfaces":["eth0"],"ipv4_address":"10.0.0.1"}"#.into()), 400,
            "MMMDS config error: The MMDS IPv4 address is not link local.".into()),
        ("PUT", "/mmds/config".into(), Some(r#"{"network_interfaces":["eth0"],"version":"V2"}"#.into()), 204, String::new()),
        ("PUT", "/mmds/other".into(), Some("{}".into()), 400, "Unrecognized PUT request path `other`.".into()),
        ("PATCH", "/mmds".into(), Some(r#"{"a":1}"#.into()), 400, "MMDS error: The MMDS data store is not initialized.".into()),
        ("GET", "/mmds".into(), None, 200, String::new()),
        ("PUT", "/mmds".into(), Some(r#"{"latest":{"meta-data":{"ami-id":"ami-1"}}}"#.into()), 204, String::new()),
        ("PATCH", "/mmds".into(), Some(r#"{"latest":{"meta-data":{"x":"y"}}}"#.into()), 204, String::new()),
        ("PUT", "/mmds".into(), Some(format!(r#"{{"big":"{}"}}"#, "x".repeat(2000))), 413,
            "MMDS limit exceeded error: The MMDS patch request doesn't fit.".into()),
        ("PUT", "/logger".into(), Some(r#"{"level":"Loud"}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: Invalid log level: Loud*".into()),
        ("PUT", "/logger".into(), Some(r#"{"level":"Info","show_level":true}"#.into()), 204, String::new()),
        ("PUT", "/metrics".into(), Some("{}".into()), 400,
            "An error occurred when deserializing the json body of a request: missing field `metrics_path`*".into()),
        ("PUT", "/metrics".into(), Some(format!(r#"{{"metrics_path":"{}/m.json"}}"#, dir.path().display())), 204, String::new()),
        ("PUT", "/metrics".into(), Some(format!(r#"{{"metrics_path":"{}/m.json"}}"#, dir.path().display())), 400,
            "Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.".into()),
        ("PUT", "/actions".into(), Some(r#"{"action_type":"Reboot"}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown variant `Reboot`*".into()),
        ("PUT", "/actions".into(), Some(r#"{"action_type":"FlushMetrics"}"#.into()), 400, BEFORE_START.into()),
        ("PUT", "/actions".into(), Some(r#"{"action_type":"SendCtrlAltDel"}"#.into()), 400, BEFORE_START.into()),
        ("PATCH", "/vm".into(), Some(r#"{"state":"Paused"}"#.into()), 400, BEFORE_START.into()),
        ("PATCH", "/vm".into(), Some(r#"{"state":"Frozen"}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown variant `Frozen`*".into()),
        ("GET", "/vm/config".into(), None, 200, String::new()),
        ("GET", "/balloon".into(), None, 400, "Balloon config error: No balloon device found.".into()),
        ("PUT", "/balloon".into(), Some(r#"{"amount_mib":1,"deflate_on_oom":true}"#.into()), 400, "vmplay does not have a balloon device yet.".into()),
        ("PUT", "/balloon".into(), Some(r#"{"amount_mib":1}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: missing field `deflate_on_oom`*".into()),
        ("PATCH", "/balloon".into(), Some(r#"{"amount_mib":1}"#.into()), 400, BEFORE_START.into()),
        ("PUT", "/snapshot".into(), Some("{}".into()), 400, "Missing snapshot operation type.".into()),
        ("PUT", "/snapshot/foo".into(), Some("{}".into()), 400, "Invalid request method and/or path: PUT /snapshot/foo.".into()),
        ("PUT", "/snapshot/create".into(), Some("{}".into()), 400, BEFORE_START.into()),
        ("PUT", "/snapshot/load".into(), Some(r#"{"snapshot_path":"s"}"#.into()), 400, "vmplay does not have snapshots yet.".into()),
        ("PUT", "/cpu-config".into(), Some("{}".into()), 400, "vmplay does not have custom CPU templates yet.".into()),
        ("PUT", "/serial".into(), Some(r#"{"bogus":1}"#.into()), 400,
            "An error occurred when deserializing the json body of a request: unknown field `bogus`*".into()),
        ("PUT", "/serial".into(), Some("{}".into()), 204, String::new()),
    ];
    for (method, path, body, status, fault) in &cases {
        let a = c.call(method, path, body.as_deref());
        assert_eq!(a.status, *status, "{method} {path} {body:?}: {a:?}");
        if fault.is_empty() {
            continue;
        }
        let got = a.fault();
        match fault.strip_suffix('*') {
            Some(prefix) => assert!(
                got.starts_with(prefix),
                "{method} {path}: {got:?} does not start with {prefix:?}"
            ),
            None => assert_eq!(&got, fault, "{method} {path}"),
        }
    }

    // What was configured shows in GET /vm/config, as a config file would hold it.
    let config = c.get("/vm/config").json();
    assert_eq!(config["machine-config"]["mem_size_mib"], 32);
    assert_eq!(config["drives"][0]["drive_id"], "root");
    assert_eq!(config["drives"][0]["is_read_only"], false);
    assert_eq!(config["drives"][0]["io_engine"], "Sync");
    assert_eq!(config["drives"][0]["socket"], serde_json::Value::Null);
    assert_eq!(
        config["network-interfaces"][0]["guest_mac"],
        "06:00:AC:10:00:02"
    );
    assert_eq!(config["mmds-config"]["ipv4_address"], "169.254.169.254");
    assert_eq!(config["mmds-config"]["version"], "V2");
    assert_eq!(config["vsock"]["guest_cid"], 3);
    assert_eq!(config["logger"], serde_json::Value::Null);

    // PUT /vsock bound and listens on uds_path already, as Firecracker: a
    // host connects before the VM starts (it waits in the backlog).
    let first = dir.path().join("v.sock");
    UnixStream::connect(&first).expect("uds_path listens after PUT /vsock");
    // A second PUT deletes the old socket file, then binds the new path.
    let second = dir.path().join("v2.sock");
    let body = serde_json::json!({"guest_cid": 3, "uds_path": second});
    assert_eq!(c.put("/vsock", &body.to_string()).status, 204);
    assert!(!first.exists(), "the first socket file stays");
    UnixStream::connect(&second).expect("the new uds_path listens");
    // PUT the same path again: re-bound in place.
    assert_eq!(c.put("/vsock", &body.to_string()).status, 204);
    UnixStream::connect(&second).expect("re-bound");
    assert_eq!(
        c.get("/mmds").json(),
        serde_json::json!({"latest":{"meta-data":{"ami-id":"ami-1","x":"y"}}})
    );
    let info = c.get("/").json();
    assert_eq!(
        info,
        serde_json::json!({"id":"anonymous-instance","state":"Not started","vmm_version":"1.16.0","app_name":"Firecracker"})
    );
    assert_eq!(
        c.get("/version").json(),
        serde_json::json!({"firecracker_version":"1.16.0"})
    );
}

#[test]
fn responses_are_laid_out_as_firecrackers() {
    let dir = TempDir::new();
    let fc = Fc::start(&dir, "emu", &["--http-api-max-payload-size", "250"]);
    let mut c = fc.client();
    let a = c.put(
        "/mmds/config",
        r#"{"network_interfaces":["x"],"version":"V2"}"#,
    );
    assert!(a.head.starts_with("HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: "), "{:?}", a.head);
    let a = c.put("/mmds", "{}");
    assert_eq!(
        a.head,
        "HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
    );
    // A deprecated form answers with the Deprecation header.
    let a = c.put(
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64,"cpu_template":"None"}"#,
    );
    assert_eq!(a.status, 204);
    assert!(a.head.contains("Deprecation: true\r\n"), "{:?}", a.head);
    // Over the payload limit: µhttp's literal error body.
    let body = format!(r#"{{"a":"{}"}}"#, "x".repeat(252));
    assert_eq!(body.len(), 260);
    let a = c.put("/mmds", &body);
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body,
        "{ \"error\": \"Request payload with size 260 is larger than the limit of 250 allowed by server.\nAll previous unanswered requests will be dropped.\" }"
    );
    // An unsupported method.
    let mut c = fc.client();
    let a = c.call("POST", "/", Some("{}"));
    assert_eq!(a.status, 400);
    assert!(
        a.body
            .contains("Invalid HTTP Method: Unsupported HTTP method."),
        "{}",
        a.body
    );
}

#[test]
fn curl_drives_the_api() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipping: curl is not installed");
        return;
    }
    let dir = TempDir::new();
    let fc = Fc::start(&dir, "emu", &["--id", "curl-vm"]);
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&fc.sock)
        .arg("http://localhost/")
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        body,
        r#"{"id":"curl-vm","state":"Not started","vmm_version":"1.16.0","app_name":"Firecracker"}"#
    );
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--unix-socket",
        ])
        .arg(&fc.sock)
        .args([
            "http://localhost/machine-config",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"vcpu_count":2,"mem_size_mib":256}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204");
}

#[test]
fn instance_start_boots_and_pause_stops_every_vcpu() {
    for accel in backends() {
        let dir = TempDir::new();
        let kernel = dir.file("tilde.elf", &tilde_printer());
        let fc = Fc::start(&dir, accel, &[]);
        let mut c = fc.client();
        assert_eq!(c.put("/boot-source", &boot_source(&kernel)).status, 204);
        assert_eq!(
            c.put("/machine-config", r#"{"vcpu_count":1,"mem_size_mib":64}"#)
                .status,
            204
        );
        let metrics = dir.path().join("metrics.json");
        let body = serde_json::json!({ "metrics_path": metrics }).to_string();
        assert_eq!(c.put("/metrics", &body).status, 204);
        assert_eq!(
            c.put("/actions", r#"{"action_type":"InstanceStart"}"#)
                .status,
            204
        );
        assert_eq!(c.get("/").json()["state"], "Running");
        fc.wait_for(|o| o.matches('~').count() >= 3, "the guest never printed");

        // Pre-boot requests are refused now, InstanceStart too.
        let a = c.put("/boot-source", &boot_source(&kernel));
        assert_eq!((a.status, a.fault()), (400, AFTER_START.to_string()));
        let a = c.put("/actions", r#"{"action_type":"InstanceStart"}"#);
        assert_eq!((a.status, a.fault()), (400, AFTER_START.to_string()));
        assert_eq!(
            c.put("/actions", r#"{"action_type":"FlushMetrics"}"#)
                .status,
            204
        );
        // One line at start, one per flush: JSON, Firecracker's groups.
        let text = std::fs::read_to_string(&metrics).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert!(
            lines[1]["vcpu"]["exit_io_out"].as_u64().unwrap() > 0,
            "{text}"
        );
        // The guest's '~'s went out through COM1.
        assert!(
            lines[1]["uart"]["write_count"].as_u64().unwrap() >= 3,
            "{text}"
        );
        assert_eq!(lines[0]["put_api_requests"]["metrics_count"], 1, "{text}");
        assert_eq!(lines[1]["put_api_requests"]["metrics_count"], 0, "{text}");
        assert_eq!(
            c.get("/vm/config").json()["boot-source"]["boot_args"],
            "console=ttyS0"
        );

        assert_eq!(
            c.patch("/vm", r#"{"state":"Paused"}"#).status,
            204,
            "{accel}"
        );
        assert_eq!(c.get("/").json()["state"], "Paused");
        // Idempotent, as Firecracker.
        assert_eq!(c.patch("/vm", r#"{"state":"Paused"}"#).status, 204);
        let paused = fc.count('~');
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(fc.count('~'), paused, "{accel}: the guest ran while paused");

        assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
        assert_eq!(c.get("/").json()["state"], "Running");
        assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
        fc.wait_for(
            |o| o.matches('~').count() > paused + 2,
            "the guest did not run on after resume",
        );
    }
}

#[test]
fn send_ctrl_alt_del_reaches_the_keyboard_and_vmplay_exits_as_firecracker() {
    for accel in backends() {
        let dir = TempDir::new();
        let kernel = dir.file("keys.elf", &key_reader());
        let mut fc = Fc::start(&dir, accel, &[]);
        let mut c = fc.client();
        assert_eq!(c.put("/boot-source", &boot_source(&kernel)).status, 204);
        assert_eq!(
            c.put("/actions", r#"{"action_type":"InstanceStart"}"#)
                .status,
            204
        );
        fc.wait_for(|o| o.contains("ready"), "the guest never said ready");
        assert_eq!(
            c.put("/actions", r#"{"action_type":"SendCtrlAltDel"}"#)
                .status,
            204
        );
        assert_eq!(fc.wait_exit(), 0, "{accel}");
        let out = fc.stdout();
        assert!(out.contains("keys\n"), "{out}");
        assert!(out.contains("Vmm is stopping."), "{out}");
        assert!(
            out.contains("Firecracker exiting successfully. exit_code=0"),
            "{out}"
        );
    }
}

#[test]
fn api_sock_that_exists_or_has_no_directory_fails_with_firecrackers_message() {
    let dir = TempDir::new();
    let taken = dir.file("taken.sock", b"");
    let out = Command::new(vmplay_exe())
        .args(["firecracker", "--api-sock"])
        .arg(&taken)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "Failed to open the API socket at: {}. Check that it is not already used.",
            taken.display()
        )),
        "{text}"
    );
    let out = Command::new(vmplay_exe())
        .args(["firecracker", "--api-sock"])
        .arg(dir.path().join("missing/dir/fc.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Failed to bind and run the HTTP server: No such file or directory"),
        "{text}"
    );
}

#[test]
fn firecracker_flags_are_parsed_with_firecrackers_rules() {
    let run = |args: &[&str]| {
        Command::new(vmplay_exe())
            .arg("firecracker")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Firecracker v1.16.0\n\n"
    );
    let out = run(&["--no-api"]);
    assert_eq!(out.status.code(), Some(153));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "Arguments parsing error: Argument 'config-file' required, but not found. \n\nFor more information try --help."
    ));
    let out = run(&["--bogus"]);
    assert_eq!(out.status.code(), Some(153));
    let out = run(&["--level", "loud"]);
    assert_eq!(out.status.code(), Some(152));
    let out = run(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--api-sock <api-sock>"));
    // Called `firecracker` (a symlink), the binary is Firecracker.
    let dir = TempDir::new();
    let link = dir.path().join("firecracker");
    std::os::unix::fs::symlink(vmplay_exe(), &link).unwrap();
    let out = Command::new(&link).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Firecracker v1.16.0\n\n"
    );
}

#[test]
fn no_api_config_file_boots_and_a_reset_exits_zero() {
    for accel in backends() {
        let dir = TempDir::new();
        let kernel = dir.file("reset.elf", &vmplay_guests::i8042_reset());
        let config = serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
            "drives": [],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        });
        let path = dir.file("vm.json", config.to_string().as_bytes());
        let mut cmd = Command::new(vmplay_exe());
        cmd.args(["firecracker", "--no-api", "--config-file"])
            .arg(&path)
            .env("VMPLAY_ACCEL", accel);
        let run = support::run(cmd);
        run.assert_code(0);
        assert!(run.stdout.contains("resetting"), "{run}");
        assert!(
            run.stdout
                .contains("Successfully started microvm that was configured from one single json"),
            "{run}"
        );
        assert!(
            run.stdout
                .contains("Firecracker exiting successfully. exit_code=0"),
            "{run}"
        );
        // A bad config fails the whole file, exit 1.
        let bad = dir.file(
            "bad.json",
            br#"{"boot-source":{"kernel_image_path":"/nonexistent"},"drives":[]}"#,
        );
        let mut cmd = Command::new(vmplay_exe());
        cmd.args(["firecracker", "--no-api", "--config-file"])
            .arg(&bad);
        let run = support::run(cmd);
        assert_eq!(run.code(), 1, "{run}");
        assert!(run.stdout.contains("Failed to build MicroVM from Json: Configuration for VMM from one single json failed: Boot source error: The kernel file cannot be opened"), "{run}");
    }
}

#[test]
fn vmplay_run_serves_the_api_beside_its_own_flags() {
    let dir = TempDir::new();
    let kernel = dir.file("tilde.elf", &tilde_printer());
    let sock = dir.path().join("run.sock");
    let mut child = Command::new(vmplay_exe())
        .args([
            "run", "--accel", "emu", "--memory", "64M", "--serial", "none", "--kernel",
        ])
        .arg(&kernel)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "socket never came up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = Client::connect(&sock);
    assert_eq!(c.get("/").json()["state"], "Running");
    assert_eq!(c.patch("/vm", r#"{"state":"Paused"}"#).status, 204);
    assert_eq!(c.get("/").json()["state"], "Paused");
    assert_eq!(c.get("/machine-config").json()["mem_size_mib"], 64);
    assert_eq!(c.patch("/vm", r#"{"state":"Resumed"}"#).status, 204);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_api_threads_seccomp_filter_kills_a_forbidden_syscall_and_no_seccomp_lifts_it() {
    let dir = TempDir::new();
    let sock = dir.path().join("s.sock");
    let run = |extra: &[&str]| {
        let mut child = Command::new(vmplay_exe())
            .args(["firecracker", "--api-sock"])
            .arg(&sock)
            .args(extra)
            .env("VMPLAY_SECCOMP_SELFTEST", "api")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > Duration::from_secs(3) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = std::fs::remove_file(&sock);
        (status.and_then(|s| s.code()), out)
    };
    // getppid is outside the API thread's filter: SIGSYS, exit 148.
    let (code, out) = run(&[]);
    assert_eq!(code, Some(148), "{out}");
    assert!(
        out.contains(&format!(
            "Shutting down VM after intercepting a bad syscall ({}).",
            libc::SYS_getppid
        )),
        "{out}"
    );
    // Without filters the same call is harmless and the API serves on.
    let (code, out) = run(&["--no-seccomp"]);
    assert_eq!(code, None, "{out}");
}

/// A guest that writes Firecracker's boot-timer byte (123 at 0xc0000000),
/// says `timed`, then resets through the i8042.
fn boot_timer_writer() -> Vec<u8> {
    let mut img = MultibootImage::new();
    let scratch = img.zeroed(vmplay_guests::runtime::RUNTIME32_SCRATCH, 16);
    let entry = img
        .code32(|a| {
            let mut rt = Runtime32::new(a, scratch);
            use iced_x86::code_asm::*;
            a.cli()?;
            a.mov(eax, 0xc000_0000u32)?;
            a.mov(byte_ptr(eax), 123u32)?;
            rt.print(a, "timed\n")?;
            a.mov(al, 0xfeu32)?;
            a.out(0x64, al)?;
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.jmp(spin)?;
            rt.finish(a)
        })
        .expect("assemble the boot-timer guest");
    img.set_entry32(entry);
    img.build().expect("build the boot-timer guest")
}

#[test]
fn boot_timer_logs_the_time_since_instance_start() {
    // 3 GiB and up is the MMIO hole whatever the RAM size, so the timer
    // works with 4 GiB of RAM too (RAM above 3 GiB moves past 4 GiB).
    for (accel, mib) in backends().into_iter().flat_map(|a| [(a, 64), (a, 4096)]) {
        let dir = TempDir::new();
        let kernel = dir.file("timer.elf", &boot_timer_writer());
        let config = serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
            "drives": [],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": mib},
        });
        let path = dir.file("vm.json", config.to_string().as_bytes());
        // With the API on, the config file boots at once and the API serves it.
        let mut fc = Fc::start(
            &dir,
            accel,
            &["--boot-timer", "--config-file", path.to_str().unwrap()],
        );
        assert_eq!(fc.wait_exit(), 0, "{accel} {mib} MiB");
        let out = fc.stdout();
        let line = out
            .lines()
            .find(|l| l.contains("Guest-boot-time ="))
            .unwrap_or_else(|| panic!("{accel} {mib} MiB: no boot-timer line:\n{out}"));
        // Firecracker's test parses exactly this shape.
        let tail = line.split("Guest-boot-time =").nth(1).unwrap();
        let words: Vec<&str> = tail.split_whitespace().collect();
        assert_eq!(
            (words[1], words[3], words[5], words[8]),
            ("us", "ms,", "CPU", "CPU"),
            "{line}"
        );
        assert!(
            words[0].parse::<u64>().is_ok() && words[4].parse::<u64>().is_ok(),
            "{line}"
        );
        assert!(out.contains("timed"), "{out}");
    }
}

#[test]
fn each_vcpu_threads_seccomp_filter_kills_a_forbidden_syscall() {
    for accel in backends() {
        let dir = TempDir::new();
        let kernel = dir.file("reset.elf", &vmplay_guests::i8042_reset());
        let config = serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
            "drives": [],
        });
        let path = dir.file("vm.json", config.to_string().as_bytes());
        let run = |extra: &[&str]| {
            let mut cmd = Command::new(vmplay_exe());
            cmd.args(["firecracker", "--no-api", "--config-file"])
                .arg(&path)
                .args(extra)
                .env("VMPLAY_ACCEL", accel)
                .env("VMPLAY_SECCOMP_SELFTEST", "vcpu");
            support::run(cmd)
        };
        // getppid is outside the vCPU filter: SIGSYS before any guest code.
        let r = run(&[]);
        assert_eq!(r.code(), 148, "{accel}: {r}");
        assert!(
            r.stdout.contains(&format!(
                "Shutting down VM after intercepting a bad syscall ({}).",
                libc::SYS_getppid
            )),
            "{r}"
        );
        assert!(!r.stdout.contains("resetting"), "{r}");
        // --no-seccomp: the guest runs and resets, exit 0.
        let r = run(&["--no-seccomp"]);
        assert_eq!(r.code(), 0, "{accel}: {r}");
        assert!(r.stdout.contains("resetting"), "{r}");
    }
}

/// Runs the i8042-reset guest from a config file with `--no-api` on
/// `accel`, with `extra` flags and `VMPLAY_SECCOMP_SELFTEST=selftest`.
fn reset_guest_run(dir: &TempDir, accel: &str, extra: &[&str], selftest: &str) -> support::Run {
    let kernel = dir.file("reset.elf", &vmplay_guests::i8042_reset());
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "drives": [],
        "entropy": {},
    });
    let path = dir.file("vm.json", config.to_string().as_bytes());
    let mut cmd = Command::new(vmplay_exe());
    cmd.args(["firecracker", "--no-api", "--config-file"])
        .arg(&path)
        .args(extra)
        .env("VMPLAY_ACCEL", accel)
        .env("VMPLAY_SECCOMP_SELFTEST", selftest);
    support::run(cmd)
}

fn killed_by_seccomp(r: &support::Run, nr: i64) -> bool {
    r.code() == 148
        && r.stdout.contains(&format!(
            "Shutting down VM after intercepting a bad syscall ({nr})."
        ))
}

#[test]
fn the_event_loop_and_main_threads_seccomp_filters_kill_a_forbidden_syscall() {
    for accel in backends() {
        let dir = TempDir::new();
        // getppid is outside these filters: SIGSYS before any guest code
        // (the vCPUs wait for the main thread's filter; emu's timer thread
        // gets the vmm filter when the VM is created).
        let threads: &[&str] = if accel == "emu" {
            &["vmm", "main", "emu-timers"]
        } else {
            &["vmm", "main"]
        };
        for &thread in threads {
            let r = reset_guest_run(&dir, accel, &[], thread);
            assert!(
                killed_by_seccomp(&r, libc::SYS_getppid),
                "{accel} {thread}: {r}"
            );
            assert!(!r.stdout.contains("resetting"), "{accel} {thread}: {r}");
            // --no-seccomp: the guest runs and resets, exit 0.
            let r = reset_guest_run(&dir, accel, &["--no-seccomp"], thread);
            assert_eq!(r.code(), 0, "{accel} {thread}: {r}");
            assert!(r.stdout.contains("resetting"), "{accel} {thread}: {r}");
        }
        // As Firecracker: with a log path the message goes there, and a
        // last metrics line says `seccomp.num_faults` = 1.
        let log = dir.path().join("fc.log");
        let metrics = dir.path().join("metrics.ndjson");
        let (l, m) = (log.to_str().unwrap(), metrics.to_str().unwrap());
        let r = reset_guest_run(&dir, accel, &["--log-path", l, "--metrics-path", m], "main");
        assert_eq!(r.code(), 148, "{accel}: {r}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(&format!(
                "Shutting down VM after intercepting a bad syscall ({}).",
                libc::SYS_getppid
            )),
            "{accel}: {text}"
        );
        let lines = std::fs::read_to_string(&metrics).unwrap();
        let last: serde_json::Value =
            serde_json::from_str(lines.lines().last().unwrap_or("{}")).unwrap();
        assert_eq!(last["seccomp"]["num_faults"], 1, "{accel}: {lines}");
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&metrics);

        // With every filter on, the guest runs to its reset.
        let r = reset_guest_run(&dir, accel, &[], "");
        assert_eq!(r.code(), 0, "{accel}: {r}");
        assert!(r.stdout.contains("resetting"), "{accel}: {r}");

        // `vmplay run` puts the same event-loop filter on (so every device
        // test runs under it); --no-seccomp takes it off.
        let kernel = dir.path().join("reset.elf");
        let run = |extra: &[&str]| {
            let mut cmd = Command::new(vmplay_exe());
            cmd.args(["run", "--accel", accel, "--serial", "stdio", "--kernel"])
                .arg(&kernel)
                .args(extra)
                .env("VMPLAY_SECCOMP_SELFTEST", "vmm")
                .stdin(Stdio::null());
            support::run(cmd)
        };
        let r = run(&[]);
        assert!(killed_by_seccomp(&r, libc::SYS_getppid), "{accel}: {r}");
        assert!(!r.stdout.contains("resetting"), "{accel}: {r}");
        let r = run(&["--no-seccomp"]);
        assert_eq!(r.code(), 0, "{accel}: {r}");
        assert!(r.stdout.contains("resetting"), "{accel}: {r}");
    }
}

/// A filter file as seccompiler-bin writes it (bitcode of category →
/// instructions).
fn filter_file(dir: &TempDir, name: &str, programs: &[(&str, BpfProgram)]) -> PathBuf {
    let map = programs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    dir.file(name, &vmplay_api::seccomp::serialize(&map).unwrap())
}

#[test]
fn seccomp_filter_loads_a_compiled_filter_file_and_refuses_bad_ones() {
    use vmplay_api::seccomp::{allow_all_but, api_filter, vcpu_filter, vmm_filter};
    let none = BpfProgram::new;
    let dir = TempDir::new();
    let accel = "emu";
    // vmplay's own filters, from a file: the guest runs to its reset.
    let own = filter_file(
        &dir,
        "own.bpf",
        &[
            ("vmm", vmm_filter().unwrap()),
            ("api", api_filter().unwrap()),
            ("vcpu", vcpu_filter().unwrap()),
        ],
    );
    let own = own.to_str().unwrap();
    let r = reset_guest_run(&dir, accel, &["--seccomp-filter", own], "");
    assert_eq!(r.code(), 0, "{r}");
    assert!(r.stdout.contains("resetting"), "{r}");

    // The file's programs are the ones installed: empty ones install
    // nothing, so the vCPU self-test's getppid is harmless...
    let empty = filter_file(
        &dir,
        "empty.bpf",
        &[("vmm", none()), ("api", none()), ("vcpu", none())],
    );
    let empty = empty.to_str().unwrap();
    let r = reset_guest_run(&dir, accel, &["--seccomp-filter", empty], "vcpu");
    assert_eq!(r.code(), 0, "{r}");
    // ...and a vCPU program that traps getppid alone kills it.
    let trap = allow_all_but(&[libc::SYS_getppid]).unwrap();
    let only = filter_file(
        &dir,
        "vcpu-getppid.bpf",
        &[("vmm", none()), ("api", none()), ("vcpu", trap.clone())],
    );
    let only = only.to_str().unwrap();
    let r = reset_guest_run(&dir, accel, &["--seccomp-filter", only], "vcpu");
    assert!(killed_by_seccomp(&r, libc::SYS_getppid), "{r}");
    // The `vmm` program goes on both the event-loop and the main thread.
    let vmm = filter_file(
        &dir,
        "vmm-getppid.bpf",
        &[("vmm", trap), ("api", none()), ("vcpu", none())],
    );
    let vmm = vmm.to_str().unwrap();
    for thread in ["vmm", "main"] {
        let r = reset_guest_run(&dir, accel, &["--seccomp-filter", vmm], thread);
        assert!(killed_by_seccomp(&r, libc::SYS_getppid), "{thread}: {r}");
    }

    // Bad files: Firecracker's messages, exit 1, no guest.
    let garbage = dir.file("garbage.bpf", b"adassafvc");
    let missing = filter_file(&dir, "missing.bpf", &[("vmm", none()), ("api", none())]);
    let extra = filter_file(
        &dir,
        "extra.bpf",
        &[
            ("vmm", none()),
            ("api", none()),
            ("vcpu", none()),
            ("thread1", none()),
        ],
    );
    let nowhere = dir.path().join("nowhere.bpf");
    for (file, message) in [
        (
            &garbage,
            "Seccomp error: Filter deserialization failed: Bitcode deserialization failed: ",
        ),
        (&missing, "Seccomp error: Missing thread category: vcpu"),
        (&extra, "Seccomp error: Invalid thread categories: thread1"),
        (
            &nowhere,
            "Seccomp error: Filter file open error: No such file or directory",
        ),
    ] {
        let r = reset_guest_run(
            &dir,
            accel,
            &["--seccomp-filter", file.to_str().unwrap()],
            "",
        );
        assert_eq!(r.code(), 1, "{file:?}: {r}");
        assert!(r.stderr.contains(message), "{file:?}: {r}");
        assert!(!r.stdout.contains("resetting"), "{file:?}: {r}");
    }
}

/// A guest that sets DRIVER_OK on the first virtio device without
/// negotiating (vmplay warns), then resets through the i8042.
fn bad_virtio_driver() -> Vec<u8> {
    let mut img = MultibootImage::new();
    let scratch = img.zeroed(vmplay_guests::runtime::RUNTIME32_SCRATCH, 16);
    let entry = img
        .code32(|a| {
            let mut rt = Runtime32::new(a, scratch);
            use iced_x86::code_asm::*;
            a.cli()?;
            a.mov(eax, 0xd000_0070u32)?;
            a.mov(dword_ptr(eax), 4u32)?;
            rt.print(a, "poked\n")?;
            a.mov(al, 0xfeu32)?;
            a.out(0x64, al)?;
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.jmp(spin)?;
            rt.finish(a)
        })
        .expect("assemble the guest");
    img.set_entry32(entry);
    img.build().expect("build the guest")
}

#[test]
fn vmplays_own_warnings_go_to_the_log_path_at_the_loggers_level() {
    let dir = TempDir::new();
    let kernel = dir.file("poke.elf", &bad_virtio_driver());
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "drives": [],
        "entropy": {},
    });
    let path = dir.file("vm.json", config.to_string().as_bytes());
    let run = |log: &Path, extra: &[&str]| {
        std::fs::write(log, b"").unwrap();
        let mut cmd = Command::new(vmplay_exe());
        cmd.args(["firecracker", "--no-api", "--config-file"])
            .arg(&path)
            .arg("--log-path")
            .arg(log)
            .args(extra)
            .env("VMPLAY_ACCEL", "emu");
        let r = support::run(cmd);
        assert_eq!(r.code(), 0, "{r}");
        assert!(r.stdout.contains("poked"), "{r}");
        // The log went to the file, not to stdout.
        assert!(!r.stdout.contains("DRIVER_OK"), "{r}");
        std::fs::read_to_string(log).unwrap()
    };
    let warn = dir.path().join("warn.log");
    let text = run(&warn, &["--level", "Warning", "--show-level"]);
    let line = text
        .lines()
        .find(|l| l.contains("virtio DRIVER_OK without FEATURES_OK"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{text}"));
    assert!(line.contains("[anonymous-instance:vcpu0:WARN]"), "{line}");
    assert!(
        !text.contains("machine built"),
        "info at Warning level:\n{text}"
    );

    let info = dir.path().join("info.log");
    let text = run(&info, &["--show-log-origin"]);
    let line = text
        .lines()
        .find(|l| l.contains("virtio DRIVER_OK without FEATURES_OK"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{text}"));
    assert!(
        line.contains("[anonymous-instance:vcpu0:crates/virtio/src/mmio.rs:"),
        "{line}"
    );
    assert!(text.contains("machine built"), "{text}");

    // PUT /logger configures the same logger over the API.
    let dir2 = TempDir::new();
    let fc = Fc::start(&dir2, "emu", &[]);
    let mut c = fc.client();
    let api_log = dir2.path().join("api.log");
    let logger = serde_json::json!({
        "log_path": api_log, "level": "Warning", "show_level": true, "show_log_origin": true,
    });
    assert_eq!(c.put("/logger", &logger.to_string()).status, 204);
    assert_eq!(c.put("/boot-source", &boot_source(&kernel)).status, 204);
    assert_eq!(c.put("/entropy", "{}").status, 204);
    assert_eq!(
        c.put("/actions", r#"{"action_type":"InstanceStart"}"#)
            .status,
        204
    );
    let start = Instant::now();
    let line = loop {
        let text = std::fs::read_to_string(&api_log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("virtio DRIVER_OK without FEATURES_OK"))
        {
            assert!(!text.contains("machine built"), "{text}");
            break l.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no warning in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        line.contains("[anonymous-instance:vcpu0:WARN:crates/virtio/src/mmio.rs:"),
        "{line}"
    );
}
