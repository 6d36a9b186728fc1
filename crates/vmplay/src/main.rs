//! The `vmplay` command: parses flags (or a Firecracker config), picks a
//! backend, builds the machine and runs it, then turns why the VM stopped
//! into a message and an exit status. Called `firecracker` (or as
//! `vmplay firecracker`), it is Firecracker's command line instead.

mod accel;
mod device_flags;
mod fc_log;
mod firecracker;
mod image_cmd;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use vmplay_hypervisor::Hypervisor;
use vmplay_machine::{HugePages, KernelEntry, Machine, MachineConfig, SerialMode, StopReason};

#[derive(Parser)]
#[command(
    name = "vmplay",
    version,
    about = "A small virtual machine monitor: KVM or a software x86-64 CPU behind one machine model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Boot a kernel in a new VM and run it until it powers off, resets or exits.
    Run(Box<RunArgs>),
    /// Boot the built-in demo guest: it prints its command line, memory map,
    /// RTC time and CPU vendor, then powers off.
    Demo {
        /// How to run the vCPU.
        #[arg(long, value_enum, default_value_t = Accel::Auto)]
        accel: Accel,
    },
    /// Build a guest image: `vmplay image debian` fetches Debian's cloud
    /// kernel and busybox and writes a bootable kernel + initramfs.
    Image(image_cmd::ImageArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub(crate) enum Accel {
    /// kvm where it runs a stock kernel at hardware speed (a /dev/kvm that
    /// opens and is not kvm_pvm), else emu; says which on stderr.
    Auto,
    /// Hardware virtualization through Linux KVM.
    Kvm,
    /// vmplay's software x86-64 CPU.
    Emu,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum EntryArg {
    /// PVH for ELF kernels with a PVH note and for bzImages whose payload can be unpacked on the host; else the 64-bit boot protocol.
    Auto,
    /// The Linux 64-bit boot protocol (bzImage decompresses itself in the guest).
    Bzimage,
    /// The PVH entry (a bzImage is unpacked on the host first).
    Pvh,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HugePagesArg {
    None,
    Transparent,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel to boot: a bzImage, an ELF vmlinux (PVH or 64-bit entry), or a Multiboot v1 ELF kernel.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk, passed as the initrd (Linux) or module 0 (Multiboot).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest RAM: a number with K/M/G suffix; a bare number is MiB [default: 512M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Guest RAM backing: `none` (ordinary pages, the default, as
    /// Firecracker) or `transparent` (transparent huge pages, as QEMU).
    #[arg(long, value_name = "none|transparent")]
    huge_pages: Option<HugePagesArg>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// How to run the vCPUs.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// How to enter a Linux kernel.
    #[arg(long, value_enum, default_value_t = EntryArg::Auto)]
    kernel_entry: EntryArg,
    /// Where COM1 goes: stdio (stdin in raw mode; Ctrl-A x quits), file:PATH, or none.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio")]
    serial: String,
    /// A Firecracker --config-file JSON (boot-source, machine-config); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// emu only: write an instruction trace to FILE.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// emu only: `interp` runs every instruction in the interpreter; `jit`
    /// (the default, or VMPLAY_EMU_TIER) also translates hot blocks.
    #[arg(long, value_name = "interp|jit")]
    emu_tier: Option<vmplay_emu::jit::Tier>,
    /// A virtio-blk drive, repeatable; the first is /dev/vda. root=on boots from it.
    #[arg(
        long,
        value_name = "path=FILE[,readonly=on][,id=ID][,root=on][,cache=writeback]"
    )]
    drive: Vec<String>,
    /// A virtio-net interface, repeatable: a host TAP, or user-mode networking through passt.
    #[arg(long, value_name = "tap=NAME[,mac=M] | user[,mac=M] | socket=PATH")]
    net: Vec<String>,
    /// A virtio-vsock device with Firecracker's Unix-socket backend.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// The guest console: serial (COM1 only) or virtio (hvc0 on stdio, or file=PATH).
    #[arg(
        long,
        value_name = "serial|virtio[,file=PATH]",
        default_value = "serial"
    )]
    console: String,
    /// Serve Firecracker's REST API on this Unix socket. With a kernel the
    /// VM boots at once; without one it waits for the API's InstanceStart.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Run without the event-loop thread's seccomp filter (on by default:
    /// device work may make only the syscalls it needs; another one
    /// ends vmplay with status 148).
    #[arg(long)]
    no_seccomp: bool,
    /// Serve gdb's remote protocol here (as QEMU's -gdb): tcp:HOST:PORT or a Unix socket path.
    #[arg(long, value_name = "tcp:HOST:PORT|PATH")]
    gdb: Option<String>,
    /// With --gdb: hold the vCPUs before their first instruction until gdb continues (QEMU's -S).
    #[arg(long)]
    gdb_wait: bool,
}

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

fn parse_serial(text: &str) -> Result<SerialMode> {
    Ok(match text {
        "stdio" => SerialMode::Stdio,
        "none" => SerialMode::None,
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => SerialMode::File(path.into()),
            _ => bail!("--serial {text:?}: expected stdio, file:PATH or none"),
        },
    })
}

/// Merges flags over the config file into one machine description.
fn machine_config(args: &RunArgs) -> Result<MachineConfig> {
    // The file goes through the API's own validation (vmplay_api::resources).
    let mut has_boot_args = false;
    let file = match &args.config {
        Some(path) => {
            let config = vmplay_api::config::load(path)?;
            has_boot_args = config.boot_source.boot_args.is_some();
            let resources = vmplay_api::VmResources::from_config(&config)
                .with_context(|| format!("config {}", path.display()))?;
            Some(
                resources
                    // No API here to fill the store: MMDS answers from an
                    // empty one, as Firecracker without --metadata.
                    .machine_config(parse_serial(&args.serial)?, &Default::default())
                    .map_err(anyhow::Error::msg)?,
            )
        }
        None => None,
    };
    let kernel = args
        .kernel
        .clone()
        .or_else(|| file.as_ref().map(|f| f.kernel.clone()))
        .context("no kernel: give --kernel PATH (or boot-source in --config)")?;
    let memory = match (&args.memory, &file) {
        (Some(text), _) => {
            vmplay_machine::parse_size(text).map_err(|e| anyhow::anyhow!("--memory {e}"))?
        }
        (None, Some(f)) => f.memory,
        (None, None) => 512 << 20,
    };
    // Device flags add to the file's devices.
    let mut virtio = virtio_config(args)?;
    if let Some(f) = &file {
        let mut drives = f.virtio.drives.clone();
        drives.append(&mut virtio.drives);
        virtio.drives = drives;
        let mut nets = f.virtio.nets.clone();
        nets.append(&mut virtio.nets);
        virtio.nets = nets;
        virtio.vsock = virtio.vsock.or(f.virtio.vsock.clone());
        virtio.entropy = virtio.entropy.or(f.virtio.entropy);
    }
    Ok(MachineConfig {
        kernel,
        initrd: args
            .initrd
            .clone()
            .or_else(|| file.as_ref().and_then(|f| f.initrd.clone())),
        cmdline: args
            .cmdline
            .clone()
            // A config file without boot_args keeps vmplay's default.
            .or_else(|| {
                file.as_ref()
                    .filter(|_| has_boot_args)
                    .map(|f| f.cmdline.clone())
            })
            .unwrap_or_else(|| DEFAULT_CMDLINE.into()),
        entry: match args.kernel_entry {
            EntryArg::Auto => KernelEntry::Auto,
            EntryArg::Bzimage => KernelEntry::BzImage,
            EntryArg::Pvh => KernelEntry::Pvh,
        },
        memory,
        huge_pages: match (args.huge_pages, &file) {
            (Some(HugePagesArg::None), _) => HugePages::None,
            (Some(HugePagesArg::Transparent), _) => HugePages::Transparent,
            (None, Some(f)) => f.huge_pages,
            (None, None) => HugePages::None,
        },
        vcpus: args.cpus.or(file.as_ref().map(|f| f.vcpus)).unwrap_or(1),
        serial: parse_serial(&args.serial)?,
        virtio,
    })
}

/// The virtio devices the flags ask for, in the order the guest sees them.
fn virtio_config(args: &RunArgs) -> Result<vmplay_machine::VirtioConfig> {
    Ok(vmplay_machine::VirtioConfig {
        drives: args
            .drive
            .iter()
            .enumerate()
            .map(|(i, t)| device_flags::drive(t, i))
            .collect::<Result<_>>()?,
        nets: args
            .net
            .iter()
            .enumerate()
            .map(|(i, t)| device_flags::net(t, i))
            .collect::<Result<_>>()?,
        vsock: args.vsock.as_deref().map(device_flags::vsock).transpose()?,
        entropy: args.rng.then(Default::default),
        console: device_flags::console(&args.console)?,
    })
}

/// The backend, and a line for stderr once the machine is built (why auto
/// chose it, or a warning about the host's KVM).
fn hypervisor(args: &RunArgs) -> Result<(Box<dyn Hypervisor>, Option<String>)> {
    hypervisor_for(args.accel, args.trace.clone(), args.emu_tier, None)
}

/// The backend for `accel`, and the note for stderr.
pub(crate) fn hypervisor_for(
    accel: Accel,
    trace: Option<PathBuf>,
    tier: Option<vmplay_emu::jit::Tier>,
    timer_thread_hook: Option<vmplay_emu::ThreadHook>,
) -> Result<(Box<dyn Hypervisor>, Option<String>)> {
    // VMPLAY_EMU_CPU=qemu64 or vmplay-baseline: other CPU models, for the bench.
    let cpu_model = match std::env::var("VMPLAY_EMU_CPU") {
        Ok(name) => name
            .parse()
            .map_err(|e: String| anyhow::anyhow!("VMPLAY_EMU_CPU: {e}"))?,
        Err(_) => vmplay_emu::cpuid::CpuModel::default(),
    };
    let jit = vmplay_emu::jit::JitConfig::from_env(tier).map_err(|e| anyhow::anyhow!(e))?;
    let emu = || -> Box<dyn Hypervisor> {
        Box::new(vmplay_emu::EmuHypervisor::new(vmplay_emu::EmuOptions {
            trace: trace.clone(),
            cpu_model,
            jit: Some(jit),
            timer_thread_hook: timer_thread_hook.clone(),
        }))
    };
    match accel {
        Accel::Emu => Ok((emu(), None)),
        Accel::Kvm => {
            if trace.is_some() {
                bail!("--trace needs --accel emu");
            }
            let warning = accel::kvm_warning(&accel::probe()).map(str::to_string);
            Ok((Box::new(vmplay_kvm::KvmHypervisor::new()?), warning))
        }
        Accel::Auto => {
            let choice = accel::choose(&accel::probe(), trace.is_some());
            if choice.kvm {
                match vmplay_kvm::KvmHypervisor::new() {
                    Ok(kvm) => return Ok((Box::new(kvm), Some(choice.why))),
                    Err(e) => {
                        let why = format!("vmplay: --accel auto: using emu: kvm failed: {e}");
                        return Ok((emu(), Some(why)));
                    }
                }
            }
            Ok((emu(), Some(choice.why)))
        }
    }
}

/// Blocks SIGINT/SIGTERM in this thread and so in every thread it starts
/// later (backends start their own). Called first thing in `main`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a local, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Turns the blocked SIGINT/SIGTERM into a clean stop on a thread of their
/// own, so the terminal is restored and the exit is orderly. A signal that
/// came before this stays pending and is taken here.
fn handle_signals(set: libc::sigset_t, control: std::sync::Arc<vmplay_machine::VmControl>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set; `sig` is writable.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                control.request_stop(StopReason::Signal(sig));
            }
        })
        .ok();
}

/// CLOCK_MONOTONIC in µs (what `--start-time-us` is measured against).
pub(crate) fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn run(args: &RunArgs) -> Result<StopReason> {
    let signals = block_stop_signals();
    if args.gdb_wait && args.gdb.is_none() {
        bail!("--gdb-wait needs --gdb tcp:HOST:PORT (or a socket path)");
    }
    if let Some(sock) = &args.api_sock {
        if args.gdb.is_some() {
            bail!("--gdb is not available with --api-sock");
        }
        return run_with_api(args, sock, signals);
    }
    // Listen first: a bad address fails before the guest runs.
    let gdb = match &args.gdb {
        Some(text) => Some(vmplay_gdb::GdbListener::bind(&text.parse()?)?),
        None => None,
    };
    let config = machine_config(args)?;
    let (hv, note) = hypervisor(args)?;
    let mut machine = Machine::new(hv.as_ref(), &config)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    handle_signals(signals, machine.control());
    if args.gdb_wait {
        machine.start_paused();
    }
    // The guest's console takes the terminal: raw mode until the VM stops.
    let _raw = match config.serial {
        SerialMode::Stdio => Some(vmplay_machine::RawTerminal::enter()?),
        _ => None,
    };
    let hooks = vmplay_machine::ThreadHooks {
        vcpu: None,
        vmm: Some(event_loop_seccomp(run_filters(args)?.vmm)),
    };
    let mut running = machine.start_with(hooks)?;
    if let Some(listener) = gdb {
        let debugger = running
            .debugger()
            .context("the machine's debugger is already taken")?;
        eprintln!(
            "vmplay: gdb stub on {}{}",
            listener.local_addr(),
            if args.gdb_wait {
                " (vCPUs held until gdb continues)"
            } else {
                ""
            }
        );
        vmplay_gdb::spawn(listener, Box::new(debugger))?;
    }
    Ok(running.wait())
}

/// The filters `vmplay run` installs: the event loop's, unless
/// `--no-seccomp`.
fn run_filters(args: &RunArgs) -> Result<vmplay_api::seccomp::Filters> {
    if args.no_seccomp {
        return Ok(vmplay_api::seccomp::Filters::none());
    }
    firecracker::catch_sigsys();
    Ok(vmplay_api::seccomp::Filters {
        vmm: vmplay_api::seccomp::vmm_filter().map_err(anyhow::Error::msg)?,
        ..Default::default()
    })
}

/// Installs `filter` on the event-loop thread (the self-test hook makes a
/// forbidden call after it, as under `firecracker`).
fn event_loop_seccomp(filter: vmplay_api::seccomp::BpfProgram) -> vmplay_machine::LoopThreadHook {
    Box::new(move || {
        vmplay_api::seccomp::install(&filter)?;
        if !filter.is_empty()
            && std::env::var_os("VMPLAY_SECCOMP_SELFTEST").is_some_and(|v| v == "vmm")
        {
            let _ = std::os::unix::process::parent_id();
        }
        Ok(())
    })
}

/// `vmplay run --api-sock PATH`: Firecracker's API beside vmplay's flags.
fn run_with_api(
    args: &RunArgs,
    sock: &std::path::Path,
    signals: libc::sigset_t,
) -> Result<StopReason> {
    let preset = if args.kernel.is_some() || args.config.is_some() {
        Some(machine_config(args)?)
    } else {
        None
    };
    let serial = parse_serial(&args.serial)?;
    let listener = vmplay_api::server::bind(sock)?;
    let metrics = std::sync::Arc::new(vmplay_api::metrics::Metrics::default());
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let (accel, trace, tier) = (args.accel, args.trace.clone(), args.emu_tier);
    let mut hypervisors = Vec::new();
    let launcher: vmplay_api::vmm::Launcher = Box::new(move |config| {
        let (hv, note) =
            hypervisor_for(accel, trace.clone(), tier, None).map_err(|e| error_line(&e))?;
        let machine = Machine::new(hv.as_ref(), config).map_err(|e| e.to_string())?;
        if let Some(note) = note {
            eprintln!("{note}");
        }
        handle_signals(signals, machine.control());
        hypervisors.push(hv);
        Ok(machine)
    });
    let mut vmm = vmplay_api::Vmm::new(
        vmplay_api::VmmOptions {
            id: "anonymous-instance".into(),
            serial,
            mmds_size_limit: vmplay_api::server::DEFAULT_MAX_PAYLOAD,
            boot_timer: false,
            seccomp: run_filters(args)?,
        },
        launcher,
        events_tx.clone(),
        metrics.clone(),
    );
    vmplay_api::server::spawn(
        listener,
        events_tx,
        vmplay_api::server::ServerConfig {
            max_payload: vmplay_api::server::DEFAULT_MAX_PAYLOAD,
            metrics,
            seccomp: Vec::new(),
        },
    )
    .context("cannot start the API server thread")?;
    if let Some(config) = preset {
        vmm.set_preset(config);
        vmm.start().map_err(anyhow::Error::msg)?;
    }
    Ok(vmm.run(events_rx))
}

/// Writes the demo guest to a temporary file and boots it.
fn demo(accel: Accel) -> Result<StopReason> {
    let path = std::env::temp_dir().join(format!("vmplay-demo-{}.elf", std::process::id()));
    std::fs::write(&path, vmplay_guests::demo())
        .with_context(|| format!("cannot write the demo guest to {}", path.display()))?;
    let args = RunArgs::for_demo(path.clone(), accel);
    let result = run(&args);
    std::fs::remove_file(&path).ok();
    result
}

impl RunArgs {
    fn for_demo(kernel: PathBuf, accel: Accel) -> RunArgs {
        RunArgs {
            kernel: Some(kernel),
            initrd: None,
            cmdline: Some("demo from `vmplay demo`".into()),
            memory: None,
            huge_pages: None,
            cpus: None,
            accel,
            kernel_entry: EntryArg::Auto,
            serial: "stdio".into(),
            config: None,
            trace: None,
            emu_tier: None,
            drive: vec![],
            net: vec![],
            vsock: None,
            rng: false,
            console: "serial".into(),
            api_sock: None,
            no_seccomp: false,
            gdb: None,
            gdb_wait: false,
        }
    }
}

/// Prints an error and its causes on one line, skipping a cause whose
/// text the message already carries.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
    }
    line
}

fn report(reason: &StopReason) {
    match reason {
        StopReason::PowerOff => eprintln!("vmplay: guest powered off"),
        StopReason::Reset => eprintln!("vmplay: guest reset the machine"),
        StopReason::DebugExit(v) => tracing::info!(
            "guest wrote {v:#x} to the debug-exit port (status {})",
            reason.exit_code()
        ),
        StopReason::Signal(sig) => eprintln!("vmplay: stopped by signal {sig}"),
        StopReason::ConsoleEscape => eprintln!("vmplay: quit from the console (Ctrl-A x)"),
        StopReason::Halted => {
            eprintln!("vmplay: guest halted (every vCPU ran hlt with interrupts masked)")
        }
        StopReason::GuestCrash {
            vcpu,
            detail,
            registers,
        } => eprintln!("vmplay: guest crashed on vCPU {vcpu}: {detail}\n{registers}"),
        StopReason::HostError(e) => eprintln!("vmplay: error: {e}"),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let called = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if called == "firecracker" {
        fc_log::init();
        return firecracker::main(&argv[1..]);
    }
    if argv.get(1).map(String::as_str) == Some("firecracker") {
        fc_log::init();
        return firecracker::main(&argv[2..]);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMPLAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Demo { accel } => demo(accel),
        Command::Image(args) => {
            return match image_cmd::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmplay: error: {}", error_line(&e));
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(reason) => {
            report(&reason);
            ExitCode::from(reason.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("vmplay: error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serial_modes() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialMode::Stdio);
        assert_eq!(parse_serial("none").unwrap(), SerialMode::None);
        assert_eq!(
            parse_serial("file:/tmp/x").unwrap(),
            SerialMode::File("/tmp/x".into())
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1234").is_err());
    }

    #[test]
    fn flags_override_the_config_file() {
        let cli = Cli::try_parse_from([
            "vmplay", "run", "--kernel", "k", "--memory", "1G", "--cpus", "2",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as run")
        };
        let c = machine_config(&args).unwrap();
        assert_eq!((c.memory, c.vcpus), (1 << 30, 2));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.huge_pages, HugePages::None);
    }

    #[test]
    fn huge_pages_come_from_the_flag_or_the_config_file() {
        let dir = std::env::temp_dir().join(format!("vmplay-huge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, b"not booted").unwrap();
        std::fs::write(
            &file,
            r#"{"boot-source": {"kernel_image_path": "KERNEL"},
                "drives": [],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "Transparent"}}"#
                .replace("KERNEL", kernel.to_str().unwrap()),
        )
        .unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["vmplay", "run", "--config", file.to_str().unwrap()];
            argv.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("parsed as run")
            };
            machine_config(&args)
        };
        assert_eq!(
            parse(&[]).map_err(|e| format!("{e:#}")).unwrap().huge_pages,
            HugePages::Transparent
        );
        assert_eq!(
            parse(&["--huge-pages", "none"]).unwrap().huge_pages,
            HugePages::None
        );
        assert!(
            Cli::try_parse_from(["vmplay", "run", "--kernel", "k", "--huge-pages", "2M"]).is_err()
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
