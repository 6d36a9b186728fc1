//! The `firecracker` personality: when the binary is called `firecracker`
//! (a symlink or copy) or run as `vmplay firecracker ...`, it takes
//! Firecracker v1.16's flags, with its parse rules, messages and exit
//! codes, and serves its API on `--api-sock`.

use crate::Accel;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};
use vmplay_api::logger;
use vmplay_api::metrics::Metrics;
use vmplay_api::schema::{Level, Logger};
use vmplay_api::{FIRECRACKER_VERSION, Vmm, VmmOptions};
use vmplay_machine::{RawTerminal, SerialMode, StopReason};

/// Firecracker's exit codes (`FcExitCode`).
const EXIT_GENERIC: u8 = 1;
const EXIT_BAD_CONFIGURATION: u8 = 152;
const EXIT_ARG_PARSING: u8 = 153;

/// (name, takes a value, default, help).
const FLAGS: &[(&str, bool, Option<&str>, &str)] = &[
    (
        "api-sock",
        true,
        Some("/run/firecracker.socket"),
        "Path to unix domain socket used by the API.",
    ),
    (
        "boot-timer",
        false,
        None,
        "Whether or not to load boot timer device for logging elapsed time since InstanceStart command.",
    ),
    (
        "config-file",
        true,
        None,
        "Path to a file that contains the microVM configuration in JSON format.",
    ),
    (
        "describe-snapshot",
        true,
        None,
        "Print the data format version of the provided snapshot state file.",
    ),
    (
        "enable-pci",
        false,
        None,
        "Enables PCIe support (vmplay: accepted; devices use virtio-mmio).",
    ),
    ("help", false, None, "Show the help message."),
    (
        "http-api-max-payload-size",
        true,
        Some("51200"),
        "Http API request payload max size, in bytes.",
    ),
    (
        "id",
        true,
        Some("anonymous-instance"),
        "MicroVM unique identifier.",
    ),
    ("level", true, None, "Set the logger level."),
    (
        "log-path",
        true,
        None,
        "Path to a fifo or a file used for configuring the logger on startup.",
    ),
    (
        "metadata",
        true,
        None,
        "Path to a file that contains metadata in JSON format to add to the mmds.",
    ),
    (
        "metrics-path",
        true,
        None,
        "Path to a fifo or a file used for configuring the metrics on startup.",
    ),
    (
        "mmds-size-limit",
        true,
        None,
        "Mmds data store limit, in bytes.",
    ),
    ("module", true, None, "Set the logger module filter."),
    (
        "no-api",
        false,
        None,
        "Optional parameter which allows starting and using a microVM without an active API socket.",
    ),
    (
        "no-seccomp",
        false,
        None,
        "Optional parameter which allows starting and using a microVM without seccomp filtering.",
    ),
    (
        "parent-cpu-time-us",
        true,
        None,
        "Parent process CPU time (wall clock, microseconds).",
    ),
    (
        "seccomp-filter",
        true,
        None,
        "Optional parameter which allows specifying the path to a custom seccomp filter.",
    ),
    (
        "show-level",
        false,
        None,
        "Whether or not to output the level in the logs.",
    ),
    (
        "show-log-origin",
        false,
        None,
        "Whether or not to include the file path and line number of the log's origin.",
    ),
    (
        "snapshot-version",
        false,
        None,
        "Print the supported data format version.",
    ),
    (
        "start-time-cpu-us",
        true,
        None,
        "Process start CPU time (wall clock, microseconds).",
    ),
    (
        "start-time-us",
        true,
        None,
        "Process start time (wall clock, microseconds).",
    ),
    ("version", false, None, "Print the binary version number."),
];

/// Parsed flags: name → value ("" for a switch).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args(BTreeMap<String, String>);

impl Args {
    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
    fn value(&self, name: &str) -> String {
        self.get(name)
            .map(str::to_string)
            .or_else(|| {
                FLAGS
                    .iter()
                    .find(|f| f.0 == name)
                    .and_then(|f| f.2)
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }
}

/// Firecracker's argument parser rules (`utils/src/arg_parser.rs`).
pub fn parse(argv: &[String]) -> Result<Args, String> {
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Args([("help".to_string(), String::new())].into()));
    }
    if argv.iter().any(|a| a == "--version") {
        return Ok(Args([("version".to_string(), String::new())].into()));
    }
    let mut args = BTreeMap::new();
    let mut it = argv.iter().peekable();
    while let Some(arg) = it.next() {
        if arg == "--" {
            break;
        }
        let Some(name) = arg.strip_prefix("--") else {
            return Err(format!(
                "Found argument '{arg}' which wasn't expected, or isn't valid in this context."
            ));
        };
        let Some(&(_, takes_value, _, _)) = FLAGS.iter().find(|f| f.0 == name) else {
            return Err(format!(
                "Found argument '{name}' which wasn't expected, or isn't valid in this context."
            ));
        };
        if args.contains_key(name) {
            return Err(format!(
                "The argument '{name}' was provided more than once."
            ));
        }
        let value = if takes_value {
            match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().cloned().unwrap_or_default(),
                _ => {
                    return Err(format!(
                        "The argument '{name}' requires a value, but none was supplied."
                    ));
                }
            }
        } else {
            String::new()
        };
        args.insert(name.to_string(), value);
    }
    let args = Args(args);
    if args.has("no-api") && !args.has("config-file") {
        return Err("Argument 'config-file' required, but not found.".into());
    }
    if args.has("no-seccomp") && args.has("seccomp-filter") {
        return Err(
            "Argument 'seccomp-filter' cannot be used together with argument 'no-seccomp'.".into(),
        );
    }
    Ok(args)
}

fn help() -> String {
    let mut text = format!("Firecracker v{FIRECRACKER_VERSION}\n\n");
    for (name, takes_value, default, help) in FLAGS {
        let value = if *takes_value {
            format!(" <{name}>")
        } else {
            String::new()
        };
        text.push_str(&format!("  --{name}{value}: {help}"));
        if let Some(d) = default {
            text.push_str(&format!(" [default: \"{d}\"]"));
        }
        text.push('\n');
    }
    text
}

/// The instance id rule: 1 to 64 characters, alphanumeric or `-`.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Firecracker aborts (a panic with `panic = "abort"`) on these.
fn panic_exit(message: &str) -> ! {
    logger::error(&format!("Firecracker panicked at {message}"));
    eprintln!("Firecracker panicked at {message}");
    std::process::abort()
}

fn number(args: &Args, name: &str) -> Option<usize> {
    args.get(name).map(|v| {
        v.parse()
            .unwrap_or_else(|e| panic_exit(&format!("Invalid value for {name}: {e}")))
    })
}

fn accel_from_env() -> Accel {
    match std::env::var("VMPLAY_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("emu") => Accel::Emu,
        _ => Accel::Auto,
    }
}

fn error_exit(code: u8, message: &str) -> ExitCode {
    logger::error(message);
    eprintln!("{message}");
    logger::error(&format!("Firecracker exiting with error. exit_code={code}"));
    ExitCode::from(code)
}

/// `firecracker [flags]`.
pub fn main(argv: &[String]) -> ExitCode {
    logger::set_instance_id("anonymous-instance");
    let args = match parse(argv) {
        Ok(a) => a,
        Err(e) => {
            logger::error(&format!("Arguments parsing error: {e}"));
            eprintln!("Arguments parsing error: {e} \n\nFor more information try --help.");
            return ExitCode::from(EXIT_ARG_PARSING);
        }
    };
    if args.has("help") {
        print!("{}", help());
        return ExitCode::SUCCESS;
    }
    if args.has("version") {
        println!("Firecracker v{FIRECRACKER_VERSION}\n");
        return ExitCode::SUCCESS;
    }
    if args.has("snapshot-version") || args.has("describe-snapshot") {
        return error_exit(EXIT_GENERIC, "vmplay does not have snapshots yet.");
    }
    let id = args.value("id");
    if !valid_id(&id) {
        panic_exit("Invalid instance ID: InvalidChar");
    }
    logger::set_instance_id(&id);
    let level = match args.get("level").map(str::parse::<Level>).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "Invalid value for logger level: {e}.Possible values: [Error, Warning, Info, Debug]"
            );
            return ExitCode::from(EXIT_BAD_CONFIGURATION);
        }
    };
    let logger_config = Logger {
        log_path: args.get("log-path").map(str::to_string),
        level,
        show_level: Some(args.has("show-level")),
        show_log_origin: Some(args.has("show-log-origin")),
        module: args.get("module").map(str::to_string),
    };
    if let Err(e) = logger::configure(&logger_config) {
        return error_exit(EXIT_GENERIC, &format!("Logger error: {e}"));
    }
    logger::info(&format!("Running Firecracker v{FIRECRACKER_VERSION}"));

    let metrics = Arc::new(Metrics::default());
    // Firecracker's every line has the group; SIGSYS sets it to 1.
    metrics.store("seccomp", "num_faults", 0);
    let _ = SIGSYS_METRICS.set(metrics.clone());
    if let Some(path) = args.get("metrics-path")
        && let Err(e) = metrics.init(path)
    {
        return error_exit(EXIT_GENERIC, &format!("Metrics error: {e}"));
    }
    let start_us = number(&args, "start-time-us");
    let start_cpu_us = number(&args, "start-time-cpu-us");
    let parent_cpu_us = number(&args, "parent-cpu-time-us").unwrap_or(0);

    // Filters are loaded and checked now, installed by each thread later.
    let filters = if args.has("no-seccomp") {
        vmplay_api::seccomp::Filters::none()
    } else {
        let loaded = match args.get("seccomp-filter") {
            Some(path) => vmplay_api::seccomp::Filters::from_file(std::path::Path::new(path)),
            None => vmplay_api::seccomp::Filters::builtin(),
        };
        match loaded {
            Ok(f) => f,
            Err(e) => return error_exit(EXIT_GENERIC, &format!("Seccomp error: {e}")),
        }
    };
    if !args.has("no-seccomp") {
        catch_sigsys();
    }
    if args.has("enable-pci") {
        eprintln!("vmplay: --enable-pci accepted; vmplay's devices use virtio-mmio");
    }

    let max_payload = number(&args, "http-api-max-payload-size")
        .unwrap_or(vmplay_api::server::DEFAULT_MAX_PAYLOAD);
    let mmds_limit = number(&args, "mmds-size-limit").unwrap_or(max_payload);

    let config_file = args.get("config-file").map(|path| {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|_| panic_exit("Unable to open or read from the configuration file"));
        (path.to_string(), text)
    });
    let metadata = args.get("metadata").map(|path| {
        std::fs::read_to_string(path)
            .unwrap_or_else(|_| panic_exit("Unable to open or read from the mmds content file"))
    });

    // The launcher: the backend is `auto` unless VMPLAY_ACCEL says otherwise.
    let accel = accel_from_env();
    let raw: Arc<Mutex<Option<RawTerminal>>> = Arc::default();
    let raw_for_launch = raw.clone();
    let mut hypervisors = Vec::new();
    // emu's own timer thread is VMM work: it gets the `vmm` filter first.
    let timer_filter = filters.vmm.clone();
    let timer_hook = (!timer_filter.is_empty()).then(|| {
        let selftest =
            std::env::var_os("VMPLAY_SECCOMP_SELFTEST").is_some_and(|v| v == "emu-timers");
        vmplay_emu::ThreadHook(Arc::new(move || {
            vmplay_api::seccomp::install(&timer_filter)?;
            if selftest {
                let _ = std::os::unix::process::parent_id();
            }
            Ok(())
        }))
    });
    let launcher: vmplay_api::vmm::Launcher = Box::new(move |config| {
        let (hv, note) = crate::hypervisor_for(accel, None, None, timer_hook.clone())
            .map_err(|e| e.to_string())?;
        if let Some(note) = note {
            eprintln!("{note}");
        }
        let machine =
            vmplay_machine::Machine::new(hv.as_ref(), config).map_err(|e| e.to_string())?;
        hypervisors.push(hv);
        if config.serial == SerialMode::Stdio {
            let mut slot = raw_for_launch.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = RawTerminal::enter().ok();
            }
        }
        Ok(machine)
    });

    let (events_tx, events_rx) = mpsc::channel();
    let mut vmm = Vmm::new(
        VmmOptions {
            id: id.clone(),
            serial: SerialMode::Stdio,
            mmds_size_limit: mmds_limit,
            boot_timer: args.has("boot-timer"),
            seccomp: filters.clone(),
        },
        launcher,
        events_tx.clone(),
        metrics.clone(),
    );

    if let Some(text) = metadata {
        let value: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                return error_exit(
                    EXIT_GENERIC,
                    &format!("Populating MMDS from file failed: {e}"),
                );
            }
        };
        if let Err(e) = vmm
            .mmds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(value)
        {
            return error_exit(
                EXIT_GENERIC,
                &format!("Populating MMDS from file failed: {e}"),
            );
        }
    }

    let _server = if args.has("no-api") {
        None
    } else {
        let path = PathBuf::from(args.value("api-sock"));
        let listener = match vmplay_api::server::bind(&path) {
            Ok(l) => l,
            Err(e) => return error_exit(EXIT_GENERIC, &format!("RunWithApiError error: {e}")),
        };
        let server = vmplay_api::server::spawn(
            listener,
            events_tx.clone(),
            vmplay_api::server::ServerConfig {
                max_payload,
                metrics: metrics.clone(),
                seccomp: filters.api.clone(),
            },
        );
        match server {
            Ok(s) => Some(s),
            Err(e) => {
                return error_exit(
                    EXIT_GENERIC,
                    &format!("RunWithApiError error: Failed to bind and run the HTTP server: {e}"),
                );
            }
        }
    };
    // Firecracker's start-up metric: process start to the API being served.
    if let Some(start) = start_us {
        metrics.store(
            "api_server",
            "process_startup_time_us",
            monotonic_us().saturating_sub(start as u64),
        );
    }
    if let Some(start) = start_cpu_us {
        metrics.store(
            "api_server",
            "process_startup_time_cpu_us",
            (vmplay_api::metrics::process_cpu_us() + parent_cpu_us as u64)
                .saturating_sub(start as u64),
        );
    }

    if let Some((path, text)) = config_file {
        let wrap = |e: String| {
            if args.has("no-api") {
                format!("Failed to build MicroVM from Json: {e}")
            } else {
                e
            }
        };
        let config = match vmplay_api::config::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                return error_exit(
                    EXIT_GENERIC,
                    &wrap(format!(
                        "Configuration for VMM from one single json failed: Invalid JSON: {e} (in {path})"
                    )),
                );
            }
        };
        if let Some(l) = &config.logger
            && let Err(e) = logger::configure(l)
        {
            return error_exit(
                EXIT_GENERIC,
                &wrap(format!(
                    "Configuration for VMM from one single json failed: Logger error: {e}"
                )),
            );
        }
        if let Some(m) = &config.metrics
            && let Err(e) = metrics.init(&m.metrics_path)
        {
            return error_exit(
                EXIT_GENERIC,
                &wrap(format!(
                    "Configuration for VMM from one single json failed: Metrics error: {e}"
                )),
            );
        }
        match vmplay_api::VmResources::from_config(&config) {
            Ok(r) => vmm.resources = r,
            Err(e) => {
                return error_exit(
                    EXIT_GENERIC,
                    &wrap(format!(
                        "Configuration for VMM from one single json failed: {e}"
                    )),
                );
            }
        }
        if let Err(e) = vmm.start() {
            return error_exit(
                EXIT_GENERIC,
                &wrap(format!("Could not Start MicroVM from one single json: {e}")),
            );
        }
        logger::info("Successfully started microvm that was configured from one single json");
    }
    drop(events_tx);

    let reason = vmm.run(events_rx);
    drop(raw.lock().unwrap_or_else(|e| e.into_inner()).take());
    exit_for(&reason)
}

/// The metrics SIGSYS writes its last line to (`seccomp.num_faults`).
static SIGSYS_METRICS: std::sync::OnceLock<Arc<Metrics>> = std::sync::OnceLock::new();

/// SIGSYS from a seccomp filter, as Firecracker: its message through the
/// logger, a last metrics line with `seccomp.num_faults` = 1, exit 148.
/// Whatever another thread holds (the logger, the metrics) is not waited
/// for: the message then goes straight to stdout.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `_sigsys` (call address, then
    // the syscall number as an int) after the 16-byte siginfo header.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let logged = logger::try_error(&format!(
        "Shutting down VM after intercepting a bad syscall ({nr})."
    ));
    if let Some(m) = SIGSYS_METRICS.get() {
        m.try_store_and_flush("seccomp", "num_faults", 1);
    }
    if logged {
        // SAFETY: _exit(2) is async-signal-safe.
        unsafe { libc::_exit(148) };
    }
    let mut buf = *b"Shutting down VM after intercepting a bad syscall (0000000000).\n\0\0\0";
    let mut len = buf.len() - 16;
    let mut digits = [0u8; 10];
    let mut n = nr.unsigned_abs();
    let mut i = 0;
    loop {
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        i += 1;
        if n == 0 {
            break;
        }
    }
    while i > 0 {
        i -= 1;
        buf[len] = digits[i];
        len += 1;
    }
    for &b in b").\n" {
        buf[len] = b;
        len += 1;
    }
    // One write, so the line is not split by another thread's output.
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is live.
    unsafe {
        libc::write(1, buf.as_ptr().cast(), len);
        libc::_exit(148);
    }
}

pub(crate) fn catch_sigsys() {
    // The handler logs: the time zone is read now, while no filter forbids it.
    logger::prepare();
    // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

fn monotonic_us() -> u64 {
    crate::monotonic_us()
}

/// How Firecracker leaves for each way the VM stopped.
fn exit_for(reason: &StopReason) -> ExitCode {
    match reason {
        StopReason::Reset
        | StopReason::PowerOff
        | StopReason::Halted
        | StopReason::ConsoleEscape => {
            logger::info("Firecracker exiting successfully. exit_code=0");
            ExitCode::SUCCESS
        }
        StopReason::DebugExit(_) | StopReason::Signal(_) => {
            ExitCode::from(reason.exit_code() as u8)
        }
        StopReason::GuestCrash {
            vcpu,
            detail,
            registers,
        } => error_exit(
            EXIT_GENERIC,
            &format!("vCPU {vcpu} emulation error: {detail}\n{registers}"),
        ),
        StopReason::HostError(e) => error_exit(EXIT_GENERIC, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_firecrackers_flags_with_its_messages() {
        let a = p(&["--api-sock", "/tmp/s", "--boot-timer", "--level", "Debug"]).unwrap();
        assert_eq!(a.get("api-sock"), Some("/tmp/s"));
        assert!(a.has("boot-timer"));
        assert_eq!(a.value("id"), "anonymous-instance");
        assert_eq!(
            p(&["foo"]).unwrap_err(),
            "Found argument 'foo' which wasn't expected, or isn't valid in this context."
        );
        assert_eq!(
            p(&["--id", "a", "--id", "b"]).unwrap_err(),
            "The argument 'id' was provided more than once."
        );
        assert_eq!(
            p(&["--api-sock", "--no-api"]).unwrap_err(),
            "The argument 'api-sock' requires a value, but none was supplied."
        );
        assert_eq!(
            p(&["--no-api"]).unwrap_err(),
            "Argument 'config-file' required, but not found."
        );
        assert_eq!(
            p(&["--no-seccomp", "--seccomp-filter", "f"]).unwrap_err(),
            "Argument 'seccomp-filter' cannot be used together with argument 'no-seccomp'."
        );
        // --help and --version win; `--` ends parsing.
        assert!(p(&["bogus", "--version"]).unwrap().has("version"));
        assert!(
            p(&["--boot-timer", "--", "bogus"])
                .unwrap()
                .has("boot-timer")
        );
    }

    #[test]
    fn instance_ids_follow_firecracker() {
        assert!(valid_id("my-vm-1"));
        assert!(!valid_id(""));
        assert!(!valid_id("a_b"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
