//! The `vmplay` command: parses flags (or a Firecracker config), picks a
//! backend, builds the machine and runs it, then turns why the VM stopped
//! into a message and an exit status.

mod accel;
mod config;
mod device_flags;
mod image_cmd;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use vmplay_hypervisor::Hypervisor;
use vmplay_machine::{KernelEntry, Machine, MachineConfig, SerialMode, StopReason};

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
enum Accel {
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
    let file = match &args.config {
        Some(path) => config::FirecrackerConfig::load(path)?,
        None => Default::default(),
    };
    let boot = file.boot_source.as_ref();
    let kernel = args
        .kernel
        .clone()
        .or_else(|| boot.map(|b| b.kernel_image_path.clone()))
        .context("no kernel: give --kernel PATH (or boot-source in --config)")?;
    let memory = match (&args.memory, &file.machine_config) {
        (Some(text), _) => {
            vmplay_machine::parse_size(text).map_err(|e| anyhow::anyhow!("--memory {e}"))?
        }
        (None, Some(m)) => m
            .mem_size_mib
            .checked_mul(1 << 20)
            .context("mem_size_mib is too large")?,
        (None, None) => 512 << 20,
    };
    Ok(MachineConfig {
        kernel,
        initrd: args
            .initrd
            .clone()
            .or_else(|| boot.and_then(|b| b.initrd_path.clone())),
        cmdline: args
            .cmdline
            .clone()
            .or_else(|| boot.and_then(|b| b.boot_args.clone()))
            .unwrap_or_else(|| DEFAULT_CMDLINE.into()),
        entry: match args.kernel_entry {
            EntryArg::Auto => KernelEntry::Auto,
            EntryArg::Bzimage => KernelEntry::BzImage,
            EntryArg::Pvh => KernelEntry::Pvh,
        },
        memory,
        vcpus: args
            .cpus
            .or(file.machine_config.as_ref().map(|m| m.vcpu_count))
            .unwrap_or(1),
        serial: parse_serial(&args.serial)?,
        virtio: virtio_config(args)?,
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
    let emu = || -> Box<dyn Hypervisor> {
        Box::new(vmplay_emu::EmuHypervisor::new(vmplay_emu::EmuOptions {
            trace: args.trace.clone(),
        }))
    };
    match args.accel {
        Accel::Emu => Ok((emu(), None)),
        Accel::Kvm => {
            if args.trace.is_some() {
                bail!("--trace needs --accel emu");
            }
            let warning = accel::kvm_warning(&accel::probe()).map(str::to_string);
            Ok((Box::new(vmplay_kvm::KvmHypervisor::new()?), warning))
        }
        Accel::Auto => {
            let choice = accel::choose(&accel::probe(), args.trace.is_some());
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

fn run(args: &RunArgs) -> Result<StopReason> {
    let signals = block_stop_signals();
    let config = machine_config(args)?;
    let (hv, note) = hypervisor(args)?;
    let machine = Machine::new(hv.as_ref(), &config)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    handle_signals(signals, machine.control());
    Ok(machine.run()?)
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
            cpus: None,
            accel,
            kernel_entry: EntryArg::Auto,
            serial: "stdio".into(),
            config: None,
            trace: None,
            drive: vec![],
            net: vec![],
            vsock: None,
            rng: false,
            console: "serial".into(),
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
    }
}
