//! The gdb stub end to end: `vmplay run --gdb tcp:127.0.0.1:0 --gdb-wait`
//! with a test guest, and Debian's gdb in batch mode against it: break,
//! continue, registers and memory, single step, a write watchpoint, a
//! memory write, detach; then the guest must finish with exactly the
//! output the debugger's changes imply.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{TempDir, host_tool, skip_without_kvm, vmplay_exe};

/// A vmplay run with a gdb stub, its address read from stderr.
struct Stubbed {
    child: Child,
    addr: String,
    /// The guest's console, line by line as it comes.
    stdout: mpsc::Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: mpsc::Receiver<String>,
}

fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `vmplay run` with `--gdb` on a free port (`--gdb-wait` if `wait`).
fn start(kernel: &std::path::Path, accel: &str, wait: bool, extra: &[&str]) -> Stubbed {
    let mut child = Command::new(vmplay_exe())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--accel", accel, "--serial", "stdio"])
        .args(["--gdb", "tcp:127.0.0.1:0"])
        .args(if wait { &["--gdb-wait"][..] } else { &[] })
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("VMPLAY_LOG")
        .spawn()
        .expect("start vmplay");
    let stdout = lines(child.stdout.take().expect("stdout"));
    let stderr = lines(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stderr.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("vmplay: gdb stub on tcp:") {
                    break rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                }
                seen.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no gdb stub address on stderr; it said:\n{}",
                    seen.join("\n")
                );
            }
        }
    };
    Stubbed {
        child,
        addr,
        stdout,
        stdout_seen: Vec::new(),
        stderr,
    }
}

impl Stubbed {
    /// Waits for a console line starting with `prefix`; returns the rest.
    fn console_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.stdout_seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_string();
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let err: Vec<String> = self.stderr.try_iter().collect();
                    panic!(
                        "no console line {prefix:?} within {within:?}:\n{}\n--- stderr ---\n{}",
                        self.stdout_seen.join("\n"),
                        err.join("\n")
                    );
                }
            }
        }
    }

    /// Waits for vmplay to exit: (status code, stdout, stderr).
    fn finish(self) -> (i32, String, String) {
        self.finish_within(Duration::from_secs(60))
    }

    fn finish_within(mut self, within: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vmplay did not exit after gdb detached");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close with the process: take every line left.
        let mut stdout = self.stdout_seen;
        stdout.extend(self.stdout.iter());
        let stderr: Vec<String> = self.stderr.iter().collect();
        let mut out = stdout.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        (status.code().unwrap_or(-1), out, stderr.join("\n"))
    }
}

/// gdb -batch with `commands` against `addr`; its stdout+stderr.
fn gdb_batch(gdb: &std::path::Path, addr: &str, commands: &[String]) -> String {
    let mut cmd = Command::new(gdb);
    cmd.args(["-batch", "-nx", "-ex", "set architecture i386:x86-64"])
        .args(["-ex", "set pagination off", "-ex", "set confirm off"])
        .args(["-ex", &format!("target remote {addr}")]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let out = support::run_with_deadline(cmd, Duration::from_secs(120));
    format!("{}{}", out.stdout, out.stderr)
}

/// The value gdb printed for `p/x EXPR` as `$N = 0x...`, in order.
fn printed_values(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix('$'))
        .filter_map(|l| l.split_once(" = 0x"))
        .filter_map(|(_, v)| u64::from_str_radix(v.trim(), 16).ok())
        .collect()
}

/// On kvm_pvm the host emulates the guest's ring-0 code, and its
/// emulator does not check data breakpoints: watchpoints never fire there.
fn data_breakpoints_work(accel: &str) -> bool {
    if accel == "kvm" && std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("not testing the watchpoint: kvm_pvm ignores data breakpoints in ring 0");
        return false;
    }
    true
}

fn break_step_watch_detach(accel: &str) {
    let Some(gdb) = host_tool("gdb") else {
        return;
    };
    let watch = data_breakpoints_work(accel);
    let t = vmplay_guests::gdb_target();
    let dir = TempDir::new();
    let kernel = dir.file("gdb-target.elf", &t.image);
    let vm = start(&kernel, accel, true, &["--memory", "64M"]);
    let counter = format!("*(long *){:#x}", t.counter);
    let mut commands: Vec<String> = vec![
        format!("break *{:#x}", t.bump),
        "continue".into(),
        "p/x $pc".into(),
        format!("p/x {counter}"),
        "info registers rip".into(),
        "info registers efer".into(),
        // The load of the counter (0) into rax.
        "stepi".into(),
        "p/x $pc".into(),
        "p/x $rax".into(),
        "delete".into(),
        // bump stores rax + 1 ...
        "set var $rax = 0x100".into(),
        // ... no, rax + 2 from now on: a patch of decoded code (emu must
        // drop what it decoded from the page).
        format!("set {{char}} {:#x} = 2", t.bump_add_imm),
    ];
    let mut expected = vec![t.bump, 0, t.bump_step, 0];
    let final_counter = if watch {
        commands.extend([
            format!("watch {counter}"),
            "continue".into(),
            "p/x $pc".into(),
            format!("p/x {counter}"),
            "delete".into(),
            format!("set var {counter} = 0x200"),
        ]);
        expected.extend([t.bump_after_store, 0x102]);
        0x204 // two more rounds of + 2
    } else {
        0x106
    };
    // QEMU's xp: the counter's bytes at its physical address.
    commands.push(format!("monitor xp {:#x} 8", t.counter));
    // The full dump, with what gdb's registers leave out.
    commands.push("monitor regs".into());
    commands.push("detach".into());
    let out = gdb_batch(&gdb, &vm.addr, &commands);
    let (code, stdout, stderr) = vm.finish();
    let context =
        format!("--- gdb ---\n{out}\n--- vmplay stderr ---\n{stderr}\n--- guest ---\n{stdout}");
    assert_eq!(
        printed_values(&out),
        expected,
        "gdb's values: pc at the breakpoint, counter 0, pc after stepi, rax loaded; \
         with a watchpoint: pc after the watched store, the counter stored\n{context}"
    );
    assert!(out.contains("Breakpoint 1, "), "{context}");
    // --gdb-wait: gdb found the vCPU before the guest's first instruction.
    let entry = u32::from_le_bytes(t.image[24..28].try_into().expect("ELF32 e_entry"));
    assert_eq!(
        out.lines().find(|l| l.ends_with(" in ?? ()")),
        Some(format!("{entry:#018x} in ?? ()").as_str()),
        "{context}"
    );
    assert!(
        out.contains("efer=500") && out.contains("gdt=") && out.contains("tr  ="),
        "monitor regs\n{context}"
    );
    let xp = if watch { "00 02 00" } else { "00 00 00" };
    assert!(
        out.contains(&format!("{:016x}: {xp} 00 00 00 00 00", t.counter)),
        "monitor xp shows the counter\n{context}"
    );
    assert!(
        out.contains("efer           0x500 "),
        "system registers are in the description (EFER.LME|LMA)\n{context}"
    );
    assert!(
        out.contains(&format!("rip            {:#x}", t.bump)),
        "{context}"
    );
    if watch {
        assert!(
            out.contains(&format!("atchpoint 2: {counter}")),
            "{context}"
        );
        assert!(
            out.contains("Old value = 0") && out.contains("New value = 258"),
            "{context}"
        );
    }
    assert_eq!(
        stdout,
        format!("gdb target\ncounter = {final_counter:#018x}\n"),
        "{context}"
    );
    assert_eq!(code, 1, "debug-exit 0\n{context}");
}

#[test]
fn gdb_breaks_steps_watches_and_detaches_on_emu() {
    break_step_watch_detach("emu");
}

#[test]
fn bad_gdb_address_is_a_clear_error() {
    let t = vmplay_guests::gdb_target();
    let dir = TempDir::new();
    let kernel = dir.file("gdb-target.elf", &t.image);
    let kernel = kernel.to_str().expect("utf-8");
    for (bad, culprit) in [
        ("tcp:127.0.0.1:notaport", "--gdb"),
        ("tcp:no.such.host.invalid:1234", "cannot listen"),
        ("", "--gdb"),
    ] {
        let run = support::vmplay_run(&["--kernel", kernel, "--accel", "emu", "--gdb", bad]);
        run.assert_code(1).assert_stderr_contains(culprit);
        assert!(run.stdout.is_empty(), "the guest must not run\n{run}");
    }
    support::vmplay_run(&["--kernel", kernel, "--accel", "emu", "--gdb-wait"])
        .assert_code(1)
        .assert_stderr_contains("--gdb-wait needs --gdb");
}
#[test]
fn gdb_breaks_steps_watches_and_detaches_on_kvm() {
    if !skip_without_kvm() {
        break_step_watch_detach("kvm");
    }
}

/// Debian's init: print where `sync(2)` and the UTS namespace live (the
/// image's init runs as root, so kallsyms shows real addresses), then call
/// `sync` until the hostname is `gdb`, which only the debugger sets.
const ATTACH_HOOK: &str = r#"#!/bin/sh
sym() { grep " $1\$" /proc/kallsyms | cut -d' ' -f1; }
echo "vmplay-gdb: sync=$(sym __x64_sys_sync) uts=$(sym init_uts_ns) jiffies=$(sym jiffies_64)"
i=0
while [ "$(hostname)" != gdb ] && [ $i -lt 1200 ]; do sync; sleep 0.1; i=$((i+1)); done
echo "vmplay-gdb: hostname $(hostname)"
"#;

/// A kernel developer's session on a running 2-vCPU Debian kernel on emu: attach
/// (the VM stops), break on a syscall, read registers and kernel memory,
/// step, watch `jiffies_64` until the timer tick writes it, write kernel
/// memory (the hostname), detach; the guest sees the write and powers off.
#[test]
fn gdb_attaches_to_a_running_debian_kernel_on_emu() {
    let Some(gdb) = host_tool("gdb") else {
        return;
    };
    let dir = TempDir::new();
    let Some((kernel, initrd)) = support::debian_guest(&dir, ATTACH_HOOK, &[]) else {
        return;
    };
    let initrd = initrd.to_str().expect("utf-8 path").to_string();
    let mut vm = start(
        &kernel,
        "emu",
        false,
        &[
            "--initrd",
            &initrd,
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--cmdline",
            "console=ttyS0 panic=-1",
        ],
    );
    let line = vm.console_line("vmplay-gdb: ", Duration::from_secs(240));
    let addr = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .filter(|&v| v != 0)
            .unwrap_or_else(|| panic!("no {key} address in {line:?}"))
    };
    let (sync, uts, jiffies) = (addr("sync="), addr("uts="), addr("jiffies="));
    // struct new_utsname: sysname[65], then nodename.
    let nodename = uts + 65;
    let out = gdb_batch(
        &gdb,
        &vm.addr,
        &[
            format!("break *{sync:#x}"),
            "continue".into(),
            "p/x $pc".into(),
            "p/x $cs".into(),
            // Both vCPUs are threads, both stopped in the kernel.
            "info threads".into(),
            format!("x/s {:#x}", uts),
            "stepi".into(),
            "p/x $pc".into(),
            "delete".into(),
            // Two seconds stopped: the guest's clock stops with it, so the
            // next tick adds one jiffy, not a burst for the time away.
            "shell sleep 2".into(),
            format!("watch *(long *){jiffies:#x}"),
            "continue".into(),
            "p/x $pc".into(),
            "delete".into(),
            format!("set {{char[4]}} {nodename:#x} = \"gdb\""),
            format!("x/s {nodename:#x}"),
            "detach".into(),
        ],
    );
    let (code, stdout, stderr) = vm.finish_within(Duration::from_secs(240));
    let context =
        format!("--- gdb ---\n{out}\n--- vmplay stderr ---\n{stderr}\n--- guest ---\n{stdout}");
    let values = printed_values(&out);
    assert_eq!(values.len(), 4, "{context}");
    assert_eq!(values[0], sync, "stopped at the breakpoint\n{context}");
    assert_eq!(values[1], 0x10, "kernel code segment\n{context}");
    assert!(
        values[2] > sync && values[2] < sync + 16,
        "one instruction further\n{context}"
    );
    assert!(out.contains("Breakpoint 1, "), "{context}");
    let threads: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("Thread 1.") && l.contains(" 0xffffffff8"))
        .collect();
    assert_eq!(threads.len(), 2, "two vCPUs in kernel code\n{context}");
    assert!(
        out.contains("atchpoint 2: *(long *)")
            && out.contains("Old value = ")
            && out.contains("New value = "),
        "the tick's write to jiffies_64 stops\n{context}"
    );
    assert!(
        values[3] >= 0xffff_ffff_8000_0000,
        "in kernel text\n{context}"
    );
    let jiffy = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {key:?}\n{context}"))
    };
    let ticks = jiffy("New value = ").wrapping_sub(jiffy("Old value = "));
    // Debian's HZ is 250: a burst for the 2 s away would be ~500 jiffies.
    // A loaded host may delay one tick by a few; never by 200 ms.
    assert!(
        (1..50).contains(&ticks),
        "about one tick after a 2 s stop, not {ticks}\n{context}"
    );
    assert!(
        out.contains("\"Linux\""),
        "init_uts_ns starts with sysname\n{context}"
    );
    assert!(out.contains(":\t\"gdb\""), "{context}");
    assert!(stdout.contains("vmplay-gdb: hostname gdb"), "{context}");
    assert!(stdout.contains("reboot: Power down"), "{context}");
    assert_eq!(code, 0, "{context}");
}

/// A guest that prints `ready\n` and spins forever with interrupts off.
fn ready_then_spin() -> Vec<u8> {
    let mut img = vmplay_guests::MultibootImage::new();
    let scratch = img.zeroed(vmplay_guests::runtime::RUNTIME32_SCRATCH, 16);
    let entry = img
        .code32(|a| {
            let mut rt = vmplay_guests::runtime::Runtime32::new(a, scratch);
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

/// Over a Unix socket, attached to a running 2-vCPU VM: both vCPUs are
/// gdb threads, Ctrl-C (SIGINT to gdb) stops a spinning guest, and `kill`
/// stops the VM (status 1, a message on stderr).
#[test]
fn gdb_interrupts_and_kills_over_a_unix_socket_on_emu() {
    let Some(gdb) = host_tool("gdb") else {
        return;
    };
    let dir = TempDir::new();
    let kernel = dir.file("spin.elf", &ready_then_spin());
    let sock = dir.path().join("gdb.sock");
    let mut vm = Command::new(vmplay_exe())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args([
            "--accel", "emu", "--cpus", "2", "--serial", "stdio", "--gdb",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The stub says when gdb's continue reached it.
        .env("VMPLAY_LOG", "warn,vmplay_gdb=debug")
        .spawn()
        .expect("start vmplay");
    let stdout = lines(vm.stdout.take().expect("stdout"));
    let stderr = lines(vm.stderr.take().expect("stderr"));
    assert_eq!(
        stdout.recv_timeout(Duration::from_secs(30)).as_deref(),
        Ok("ready"),
        "the guest runs before gdb attaches"
    );
    let mut session = Command::new(&gdb)
        .args(["-batch", "-nx", "-ex", "set architecture i386:x86-64"])
        .arg("-ex")
        .arg(format!("target remote {}", sock.display()))
        .args(["-ex", "continue", "-ex", "info threads", "-ex", "kill"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gdb");
    let gdb_out = lines(session.stdout.take().expect("gdb stdout"));
    let gdb_err = lines(session.stderr.take().expect("gdb stderr"));
    // gdb attached (the VM stopped) and continued: now interrupt it.
    let mut seen = Vec::new();
    while !seen
        .last()
        .is_some_and(|l: &String| l.contains("gdb: resuming the VM"))
    {
        match stderr.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = (session.kill(), vm.kill());
                panic!("gdb never continued:\n{}", seen.join("\n"));
            }
        }
    }
    // Let the guest spin a little under gdb's continue.
    std::thread::sleep(Duration::from_millis(300));
    let sent = Command::new("kill")
        .args(["-INT", &session.id().to_string()])
        .status()
        .expect("kill -INT gdb");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let (gdb_status, vm_status) = loop {
        if let (Some(g), Some(v)) = (
            session.try_wait().expect("wait gdb"),
            vm.try_wait().expect("wait vmplay"),
        ) {
            break (g, v);
        }
        if Instant::now() > deadline {
            let _ = session.kill();
            let _ = vm.kill();
            panic!("gdb or vmplay did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out: Vec<String> = gdb_out.iter().chain(gdb_err.iter()).collect();
    let out = out.join("\n");
    let err: Vec<String> = seen.into_iter().chain(stderr.iter()).collect();
    let context = format!(
        "--- gdb ---\n{out}\n--- vmplay stderr ---\n{}",
        err.join("\n")
    );
    // gdb reports the closed connection after `kill` as an error: any status will do.
    let _ = gdb_status;
    assert!(out.contains("received signal SIGINT"), "{context}");
    assert!(
        out.contains("Thread 1.1") && out.contains("Thread 1.2"),
        "{context}"
    );
    assert_eq!(vm_status.code(), Some(1), "{context}");
    assert!(
        err.iter().any(|l| l.contains("killed from gdb")),
        "{context}"
    );
    assert!(!sock.exists(), "the socket is removed at exit\n{context}");
}

/// `hbreak` (a hardware breakpoint on either backend) stops like `break`.
fn hardware_breakpoint(accel: &str) {
    let Some(gdb) = host_tool("gdb") else {
        return;
    };
    let t = vmplay_guests::gdb_target();
    let dir = TempDir::new();
    let kernel = dir.file("gdb-target.elf", &t.image);
    let vm = start(&kernel, accel, true, &["--memory", "64M"]);
    let out = gdb_batch(
        &gdb,
        &vm.addr,
        &[
            format!("hbreak *{:#x}", t.bump),
            "continue".into(),
            "p/x $pc".into(),
            // The second round stops again: resuming does not re-fire at once.
            "continue".into(),
            "p/x $pc".into(),
            format!("p/x *(long *){:#x}", t.counter),
            "detach".into(),
        ],
    );
    let (code, stdout, stderr) = vm.finish();
    let context =
        format!("--- gdb ---\n{out}\n--- vmplay stderr ---\n{stderr}\n--- guest ---\n{stdout}");
    assert!(out.contains("Hardware assisted breakpoint 1"), "{context}");
    assert_eq!(printed_values(&out), vec![t.bump, t.bump, 1], "{context}");
    assert_eq!(
        stdout, "gdb target\ncounter = 0x0000000000000003\n",
        "{context}"
    );
    assert_eq!(code, 1, "{context}");
}

#[test]
fn gdb_hardware_breakpoint_on_emu() {
    hardware_breakpoint("emu");
}

#[test]
fn gdb_hardware_breakpoint_on_kvm() {
    if !skip_without_kvm() {
        hardware_breakpoint("kvm");
    }
}

/// `rwatch` stops after the instruction that reads the counter.
fn read_watchpoint(accel: &str) {
    let Some(gdb) = host_tool("gdb") else {
        return;
    };
    if !data_breakpoints_work(accel) {
        return;
    }
    let t = vmplay_guests::gdb_target();
    let dir = TempDir::new();
    let kernel = dir.file("gdb-target.elf", &t.image);
    let vm = start(&kernel, accel, true, &["--memory", "64M"]);
    let out = gdb_batch(
        &gdb,
        &vm.addr,
        &[
            format!("rwatch *(long *){:#x}", t.counter),
            "continue".into(),
            "p/x $pc".into(),
            "delete".into(),
            "detach".into(),
        ],
    );
    let (code, stdout, stderr) = vm.finish();
    let context =
        format!("--- gdb ---\n{out}\n--- vmplay stderr ---\n{stderr}\n--- guest ---\n{stdout}");
    assert!(out.contains("Hardware read watchpoint 1"), "{context}");
    assert!(out.contains("Value = 0"), "{context}");
    assert_eq!(printed_values(&out), vec![t.bump_step], "{context}");
    assert_eq!(
        stdout, "gdb target\ncounter = 0x0000000000000003\n",
        "{context}"
    );
    assert_eq!(code, 1, "{context}");
}

#[test]
fn gdb_read_watchpoint_on_emu() {
    read_watchpoint("emu");
}

#[test]
fn gdb_read_watchpoint_on_kvm() {
    if !skip_without_kvm() {
        read_watchpoint("kvm");
    }
}

/// gdb detaches and the guest runs on; a second gdb attaches to the same
/// stub later and kills the VM.
#[test]
fn a_second_gdb_attaches_after_the_first_detached_on_emu() {
    let Some(gdb) = host_tool("gdb") else {
        return;
    };
    let dir = TempDir::new();
    let kernel = dir.file("spin.elf", &ready_then_spin());
    let mut vm = start(&kernel, "emu", false, &["--memory", "64M"]);
    vm.console_line("ready", Duration::from_secs(30));
    let first = gdb_batch(&gdb, &vm.addr, &["p/x $pc".into(), "detach".into()]);
    assert!(first.contains("detached"), "{first}");
    let second = gdb_batch(&gdb, &vm.addr, &["p/x $pc".into(), "kill".into()]);
    let (code, stdout, stderr) = vm.finish();
    let context = format!(
        "--- first gdb ---\n{first}\n--- second gdb ---\n{second}\n--- vmplay stderr ---\n\
         {stderr}\n--- guest ---\n{stdout}"
    );
    assert_eq!(printed_values(&first).len(), 1, "{context}");
    assert_eq!(printed_values(&second).len(), 1, "{context}");
    assert_eq!(code, 1, "{context}");
    assert!(stderr.contains("killed from gdb"), "{context}");
}
