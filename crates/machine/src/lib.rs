//! The virtual machine: guest memory laid out per `vmplay_boot::layout`,
//! the port-I/O and MMIO buses with their devices, one thread per vCPU,
//! and the lifecycle from boot to the reason the VM stopped.
//!
//! Data flows one way: a [`MachineConfig`] builds a [`Machine`]; `run`
//! starts the vCPU loops; each exit goes to a bus, each bus to a device;
//! devices ask [`VmControl`] to stop the VM. This crate never names a
//! backend: it drives whatever `Hypervisor` it is handed.

mod debug;
mod devices;
pub use debug::MachineDebugger;
pub use devices::VirtioDevices;
mod handle;
mod memory;
mod vcpu_loop;

pub use handle::{ControlError, RunningMachine, ThreadHooks, VcpuThreadHook};
pub use memory::{HugePages, host_memory_bytes, parse_size};
pub use vcpu_loop::VcpuCounters;
pub use vmplay_boot::{KernelEntry, Protocol};
pub use vmplay_devices::control::{StopReason, VmControl};
pub use vmplay_devices::{RawTerminal, mmds};
pub use vmplay_virtio::LoopThreadHook;
pub use vmplay_virtio::config::*;
/// An I/O error in Firecracker's (musl's) words, for vsock bind errors.
pub use vmplay_virtio::devices::vsock::musl_text as vsock_error_text;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmplay_devices::bus::{Bus, BusError, SharedDevice};
use vmplay_devices::ports;
use vmplay_devices::{AcpiPm, DebugExit, I8042, PostPort, Rtc, Serial, SerialOutput};
use vmplay_hypervisor::{Hypervisor, Vcpu, VmSpec};

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// stdin → guest, guest → stdout (raw mode when stdin is a TTY).
    Stdio,
    /// guest → this file, no input.
    File(PathBuf),
    /// Discarded.
    None,
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub entry: KernelEntry,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub huge_pages: HugePages,
    pub vcpus: u32,
    pub serial: SerialMode,
    /// The virtio devices, in the order the guest enumerates them.
    pub virtio: VirtioConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("memory {0}: {1}")]
    Memory(String, String),
    #[error("vCPU count {count}: {reason}")]
    Vcpus { count: u32, reason: String },
    #[error(transparent)]
    Boot(#[from] vmplay_boot::BootError),
    #[error("{backend}: {source}")]
    Backend {
        backend: &'static str,
        #[source]
        source: vmplay_hypervisor::Error,
    },
    #[error(transparent)]
    Serial(#[from] vmplay_devices::serial::SerialError),
    #[error("device map: {0}")]
    Bus(#[from] BusError),
    #[error("console: {0}")]
    Console(#[from] vmplay_devices::console::ConsoleError),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    EventLoop(#[from] vmplay_virtio::EventLoopError),
}

/// A built VM, ready to run.
pub struct Machine {
    backend: &'static str,
    control: Arc<VmControl>,
    vcpus: Vec<Box<dyn Vcpu>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    event_loop: vmplay_virtio::EventLoop,
    protocol: Protocol,
    // Keeps the guest RAM mapped while the vCPUs run.
    _memory: vmplay_hypervisor::GuestMemory,
    vm: Arc<dyn vmplay_hypervisor::Vm>,
    virtio_devices: Arc<devices::VirtioDevices>,
    /// Start with every vCPU paused (`--gdb-wait`).
    start_paused: bool,
}

impl Machine {
    /// Validates `config`, builds memory, the VM, its devices and vCPUs,
    /// and loads the kernel.
    pub fn new(hv: &dyn Hypervisor, config: &MachineConfig) -> Result<Machine, MachineError> {
        let backend = hv.name();
        let max = hv.max_vcpus();
        if config.vcpus == 0 || config.vcpus > max {
            return Err(MachineError::Vcpus {
                count: config.vcpus,
                reason: format!("must be between 1 and {max} (the {backend} backend's limit)"),
            });
        }
        if config.vcpus > 255 {
            return Err(MachineError::Vcpus {
                count: config.vcpus,
                reason: "xAPIC IDs stop at 254".into(),
            });
        }
        let memory = memory::create(config.memory, config.huge_pages)?;
        let backend_err = |source| MachineError::Backend { backend, source };
        let vm = hv
            .create_vm(
                &VmSpec {
                    vcpus: config.vcpus,
                },
                &memory,
            )
            .map_err(backend_err)?;
        let control = VmControl::new();

        let serial_output = match &config.serial {
            SerialMode::Stdio => SerialOutput::Stdout,
            SerialMode::File(path) => SerialOutput::File(path.clone()),
            SerialMode::None => SerialOutput::Sink,
        }
        .open()?;
        let serial = Arc::new(Mutex::new(Serial::new(
            vm.irq_line(ports::COM1_IRQ).map_err(backend_err)?,
            serial_output,
        )));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), ports::COM1_PORT.into(), 8)?;
        // The i8042 answers at 0x60 and 0x64 only: 0x61 is the PIT's.
        let i8042 = Arc::new(Mutex::new(I8042::with_irq(
            control.clone(),
            vm.irq_line(ports::I8042_IRQ).map_err(backend_err)?,
        )));
        let shared: SharedDevice = i8042.clone();
        pio.insert_window(shared.clone(), ports::I8042_DATA_PORT.into(), 1, 0)?;
        pio.insert_window(shared, ports::I8042_COMMAND_PORT.into(), 1, 4)?;
        pio.insert(Arc::new(Mutex::new(Rtc::new())), ports::RTC_PORT.into(), 2)?;
        pio.insert(
            Arc::new(Mutex::new(DebugExit::new(control.clone()))),
            ports::DEBUG_EXIT_PORT.into(),
            4,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPm::new(control.clone()))),
            ports::ACPI_SLEEP_CONTROL_PORT.into(),
            3,
        )?;
        pio.insert(Arc::new(Mutex::new(PostPort)), ports::POST_PORT.into(), 1)?;
        let mut mmio = Bus::new();
        let mut event_loop = vmplay_virtio::EventLoop::new()?;
        let ram = vmplay_virtio::GuestRam::new(memory.clone(), vm.dma_observer());
        let mut attacher =
            devices::VirtioAttacher::new(vm.as_ref(), ram, &mut mmio, &mut event_loop);
        attacher.stdin_free = config.serial != SerialMode::Stdio;
        attacher.attach_all(&config.virtio)?;
        let slots = std::mem::take(&mut attacher.slots);
        let virtio_devices = Arc::new(std::mem::take(&mut attacher.handles));
        if config.serial == SerialMode::Stdio {
            // COM1's input is one more fd on the event loop.
            let input =
                vmplay_virtio::serial_input::SerialInput::stdin(serial.clone(), control.clone())
                    .map_err(|e| MachineError::Console(vmplay_devices::ConsoleError::Stdin(e)))?;
            event_loop.add_subscriber(Arc::new(Mutex::new(input)));
        }

        let boot = vmplay_boot::load(
            &memory,
            &vmplay_boot::BootConfig {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &devices::cmdline_with_root(&config.cmdline, &config.virtio)?,
                entry: config.entry,
                vcpus: config.vcpus,
                virtio_mmio: &slots,
            },
        )?;

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let mut vcpu = vm.create_vcpu(id).map_err(backend_err)?;
            if id == 0 {
                vcpu.set_state(&boot.bsp_state).map_err(backend_err)?;
            }
            control.add_kicker(vcpu.kicker());
            vcpus.push(vcpu);
        }
        tracing::info!(
            backend,
            protocol = %boot.protocol,
            vcpus = config.vcpus,
            memory = config.memory,
            "machine built"
        );
        Ok(Machine {
            backend,
            control,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            i8042,
            event_loop,
            protocol: boot.protocol,
            _memory: memory,
            vm,
            virtio_devices,
            start_paused: false,
        })
    }

    /// Starts the vCPU threads paused, before their first instruction and
    /// with the guest's clock stopped, until something resumes them (a
    /// debugger's continue: `--gdb-wait`).
    pub fn start_paused(&mut self) {
        self.start_paused = true;
    }

    /// The handle to stop this VM from elsewhere (signal threads, tests).
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// The boot protocol the kernel was loaded with.
    pub fn protocol(&self) -> &Protocol {
        &self.protocol
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Runs the VM until something stops it and returns why. The CLI
    /// puts the terminal in raw mode first, if it wants that.
    pub fn run(self) -> Result<StopReason, MachineError> {
        Ok(self.start()?.wait())
    }
}
