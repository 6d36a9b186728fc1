//! A started machine: its vCPU threads run, and the VMM drives them with
//! commands (pause, resume, exit) and talks to its devices (Ctrl-Alt-Del),
//! until the VM stops and [`RunningMachine::finish`] collects the threads.

use crate::vcpu_loop::{self, VcpuChannels, VcpuCommand, VcpuContext, VcpuCounters, VcpuResponse};
use crate::{Machine, MachineError};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmplay_devices::control::{StopReason, VmControl};
use vmplay_devices::{I8042, Serial};
use vmplay_hypervisor::DebugEvent;
use vmplay_hypervisor::VcpuKicker;

/// How long the vCPUs get to answer a command before vmplay gives up on
/// them: a wedged backend must not wedge the VMM.
pub(crate) const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Run on each vCPU thread before guest code.
pub type VcpuThreadHook = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What runs first on the machine's threads, before guest code or device
/// work (where the VMM installs each thread's seccomp filter).
#[derive(Default)]
pub struct ThreadHooks {
    /// On each vCPU thread.
    pub vcpu: Option<VcpuThreadHook>,
    /// On the `vmm` event-loop thread; [`Machine::start_with`] returns its
    /// error.
    pub vmm: Option<vmplay_virtio::LoopThreadHook>,
}

/// Why a command to the running machine failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("vCPU {0} did not answer within {VCPU_ANSWER_TIMEOUT:?}")]
    Timeout(u32),
    #[error("the machine has stopped")]
    Stopped,
    #[error("{0}")]
    Clock(vmplay_hypervisor::Error),
    #[error("I8042 error: {0}")]
    I8042(#[from] vmplay_devices::i8042::I8042Error),
    #[error("{0}")]
    EventLoop(#[from] vmplay_virtio::EventLoopError),
}

pub(crate) struct VcpuHandle {
    pub id: u32,
    pub commands: Sender<VcpuCommand>,
    pub kicker: Arc<dyn VcpuKicker>,
    pub exited: bool,
}

/// The vCPU threads' command ends, shared by the VMM and the debugger.
pub(crate) struct VcpuSet {
    pub vcpus: Vec<VcpuHandle>,
    responses: Receiver<(u32, VcpuResponse)>,
    /// Every vCPU is paused (and the clock with them).
    pub paused: bool,
    /// The guest's clock is stopped.
    pub clock_paused: bool,
}

/// A machine whose vCPUs are running (or paused).
pub struct RunningMachine {
    control: Arc<VmControl>,
    set: Arc<Mutex<VcpuSet>>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    vm: Arc<dyn vmplay_hypervisor::Vm>,
    /// Debug stops from the vCPUs, until a debugger takes them.
    debug_events: Option<Receiver<(u32, DebugEvent)>>,
    memory_for_debug: vmplay_hypervisor::GuestMemory,
    counters: Arc<VcpuCounters>,
    virtio_devices: Arc<crate::devices::VirtioDevices>,
    /// Stops and joins the device thread when dropped, after the vCPUs.
    event_loop: vmplay_virtio::EventLoopHandle,
    // Keeps the guest RAM mapped while the vCPUs run.
    _memory: vmplay_hypervisor::GuestMemory,
}

/// Firecracker's boot-timer device on x86: one page at 3 GiB, the start of
/// the MMIO hole (never RAM, whatever the RAM size). The guest writes the
/// byte 123 at offset 0 when its init starts.
pub const BOOT_TIMER_ADDR: u64 = vmplay_boot::layout::BOOT_TIMER_START;
const BOOT_TIMER_MAGIC: u8 = 123;

struct BootTimer(Box<dyn Fn() + Send>);

impl vmplay_devices::BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_TIMER_MAGIC] {
            (self.0)();
        }
    }
}

impl Machine {
    /// Attaches Firecracker's boot timer (`--boot-timer`): `on_boot` runs
    /// on each write of 123 to [`BOOT_TIMER_ADDR`].
    pub fn add_boot_timer(&mut self, on_boot: Box<dyn Fn() + Send>) -> Result<(), MachineError> {
        let bus = Arc::get_mut(&mut self.mmio).ok_or_else(|| {
            MachineError::Memory("boot timer".into(), "the MMIO bus is already shared".into())
        })?;
        bus.insert(
            Arc::new(Mutex::new(BootTimer(on_boot))),
            BOOT_TIMER_ADDR,
            0x1000,
        )?;
        Ok(())
    }

    /// Starts the event loop and one thread per vCPU and returns at once.
    pub fn start(self) -> Result<RunningMachine, MachineError> {
        self.start_with(ThreadHooks::default())
    }

    /// [`Machine::start`], with `hooks` run first on the event-loop thread
    /// (before any device work; its error is returned) and on each vCPU
    /// thread (before any guest code; if it fails the VM stops with its
    /// error).
    pub fn start_with(self, hooks: ThreadHooks) -> Result<RunningMachine, MachineError> {
        let on_vcpu_thread = hooks.vcpu;
        let Machine {
            control,
            vcpus,
            pio,
            mmio,
            serial,
            i8042,
            vm,
            event_loop,
            _memory,
            virtio_devices,
            start_paused,
            ..
        } = self;
        if start_paused {
            // --gdb-wait: not one instruction, not one tick before gdb says so.
            vm.pause_clock().map_err(|source| MachineError::Backend {
                backend: "clock",
                source,
            })?;
        }
        let first = if start_paused {
            vcpu_loop::START_PAUSED
        } else {
            vcpu_loop::START_RUNNING
        };
        let (debug_tx, debug_events) = mpsc::channel();
        // Device work runs on its own thread until the machine is dropped.
        let event_loop = event_loop.start_with(hooks.vmm)?;
        let ctx = Arc::new(VcpuContext {
            pio,
            mmio,
            control: control.clone(),
            halted: AtomicUsize::new(0),
            vcpu_count: vcpus.len(),
            counters: Arc::default(),
            debug_events: debug_tx,
        });
        let counters = ctx.counters.clone();
        let (responses_tx, responses) = mpsc::channel();
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let (commands_tx, commands) = mpsc::channel();
            let id = vcpu.id();
            let kicker = vcpu.kicker();
            let ctx = ctx.clone();
            let chan = VcpuChannels {
                commands,
                responses: responses_tx.clone(),
            };
            let hook = on_vcpu_thread.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Some(hook) = hook
                        && let Err(e) = hook()
                    {
                        ctx.control
                            .request_stop(StopReason::HostError(format!("vCPU {id}: {e}")));
                        let _ = chan.responses.send((id, VcpuResponse::Exited));
                        return;
                    }
                    vcpu_loop::run_guarded(vcpu, &ctx, chan, first)
                })
                .map_err(MachineError::Thread)?;
            handles.push(VcpuHandle {
                id,
                commands: commands_tx,
                kicker,
                exited: false,
            });
        }
        Ok(RunningMachine {
            control,
            set: Arc::new(Mutex::new(VcpuSet {
                vcpus: handles,
                responses,
                paused: start_paused,
                clock_paused: start_paused,
            })),
            serial,
            i8042,
            vm,
            debug_events: Some(debug_events),
            memory_for_debug: _memory.clone(),
            counters,
            virtio_devices,
            event_loop,
            _memory,
        })
    }
}

impl RunningMachine {
    /// The handle to stop this VM from elsewhere and to wait for it.
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// Exit counts of all vCPUs since the start.
    pub fn vcpu_counters(&self) -> Arc<VcpuCounters> {
        self.counters.clone()
    }

    /// COM1's counters (Firecracker's `uart` metrics group).
    pub fn uart_counters(&self) -> Arc<vmplay_devices::serial::UartCounters> {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters()
    }

    /// The virtio devices: their metrics, PATCH after boot.
    pub fn virtio_devices(&self) -> Arc<crate::devices::VirtioDevices> {
        self.virtio_devices.clone()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.set().paused
    }

    fn set(&self) -> MutexGuard<'_, VcpuSet> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every vCPU at an instruction boundary and the guest's clock
    /// with them, then the device work on the event loop (no queue is
    /// processed, no host input reaches guest memory). Pausing a paused
    /// machine does nothing.
    pub fn pause(&mut self) -> Result<(), ControlError> {
        if self.control.is_stopping() {
            return Err(ControlError::Stopped);
        }
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if set.paused {
            return Ok(());
        }
        set.pause_all(self.vm.as_ref())?;
        if let Err(e) = self.event_loop.pause() {
            self.event_loop.resume();
            let _ = set.resume_all(self.vm.as_ref());
            return Err(e.into());
        }
        Ok(())
    }

    /// Lets the guest and its devices run on; its clock continues from
    /// where it paused. Resuming a running machine does nothing.
    pub fn resume(&mut self) -> Result<(), ControlError> {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if !set.paused {
            return Ok(());
        }
        self.event_loop.resume();
        set.resume_all(self.vm.as_ref())
    }

    /// Whether the event loop is parked (device work held).
    pub fn devices_paused(&self) -> bool {
        self.event_loop.is_paused()
    }

    /// The machine's debugger interface (for `vmplay-gdb`): once per
    /// machine, `None` after the first call.
    pub fn debugger(&mut self) -> Option<crate::debug::MachineDebugger> {
        Some(crate::debug::MachineDebugger {
            set: self.set.clone(),
            vm: self.vm.clone(),
            control: self.control.clone(),
            memory: self.memory_for_debug.clone(),
            events: self.debug_events.take()?,
        })
    }

    /// Presses Ctrl-Alt-Del on the i8042 keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), ControlError> {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_ctrl_alt_del()?;
        Ok(())
    }

    /// Blocks until something stops the VM, then collects it.
    pub fn wait(self) -> StopReason {
        self.control.wait();
        self.finish()
    }

    /// Tells every vCPU thread to exit, waits for them (a bounded time)
    /// and flushes the serial output. Returns why the VM stopped; a VM
    /// nothing stopped yet is stopped as a host request.
    pub fn finish(self) -> StopReason {
        self.control
            .request_stop(StopReason::HostError("the VMM stopped the VM".into()));
        let exited = self
            .set()
            .command(None, || VcpuCommand::Exit, VcpuResponse::Exited);
        if exited.is_err() {
            tracing::warn!("a vCPU thread did not stop within {VCPU_ANSWER_TIMEOUT:?}");
        }
        // A last line without a newline must still reach the user.
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_output();
        self.control.wait()
    }
}

impl VcpuSet {
    /// Sends a command to one live vCPU (`only`) or all, kicks each and
    /// waits for `expect` from each (a vCPU that exits meanwhile counts as
    /// done).
    pub(crate) fn command(
        &mut self,
        only: Option<u32>,
        command: impl Fn() -> VcpuCommand,
        expect: VcpuResponse,
    ) -> Result<(), ControlError> {
        let mut waiting = Vec::new();
        for v in self
            .vcpus
            .iter()
            .filter(|v| !v.exited && only.is_none_or(|id| id == v.id))
        {
            if v.commands.send(command()).is_ok() {
                v.kicker.kick();
                waiting.push(v.id);
            }
        }
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        while let Some(&first) = waiting.first() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((id, r)) => {
                    if r == VcpuResponse::Exited
                        && let Some(v) = self.vcpus.iter_mut().find(|v| v.id == id)
                    {
                        v.exited = true;
                    }
                    if r == expect || r == VcpuResponse::Exited {
                        waiting.retain(|w| *w != id);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(ControlError::Timeout(first)),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ControlError::Stopped),
            }
        }
        Ok(())
    }

    /// Every vCPU paused, then the clock.
    pub(crate) fn pause_all(&mut self, vm: &dyn vmplay_hypervisor::Vm) -> Result<(), ControlError> {
        if self.paused {
            return Ok(());
        }
        self.command(None, || VcpuCommand::Pause, VcpuResponse::Paused)?;
        if !self.clock_paused {
            vm.pause_clock().map_err(ControlError::Clock)?;
            self.clock_paused = true;
        }
        self.paused = true;
        Ok(())
    }

    /// The clock runs, then every vCPU (a vCPU the debugger stopped on its
    /// own counts as paused, so this resumes it too).
    pub(crate) fn resume_all(
        &mut self,
        vm: &dyn vmplay_hypervisor::Vm,
    ) -> Result<(), ControlError> {
        self.resume(None, vm)
    }

    /// The clock runs, then `only` (or every vCPU).
    pub(crate) fn resume(
        &mut self,
        only: Option<u32>,
        vm: &dyn vmplay_hypervisor::Vm,
    ) -> Result<(), ControlError> {
        if self.clock_paused {
            vm.resume_clock().map_err(ControlError::Clock)?;
            self.clock_paused = false;
        }
        self.paused = false;
        self.command(only, || VcpuCommand::Resume, VcpuResponse::Resumed)
    }
}
