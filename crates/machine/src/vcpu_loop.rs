//! The loop each vCPU thread runs, as an explicit state machine driven by
//! commands (Firecracker's `vstate/vcpu.rs`):
//!
//! ```text
//!            Pause                    Exit / VM stopping
//!  Running ─────────▶ Paused ──────────────────────────▶ Exiting
//!     ▲  ◀───────────   │                                  ▲
//!     │     Resume      │ (a halted vCPU pauses and        │
//!     │ hlt, IF=0       │  resumes into Halted)            │
//!     └──────────▶ Halted ─────────────────────────────────┘
//! ```
//!
//! Commands come on the vCPU's own channel, and the sender kicks the vCPU
//! (through the backend's kicker) so a running guest returns to the loop
//! at an instruction boundary. Each command is acknowledged on a shared
//! response channel. While `Running`, every exit goes to a bus and from
//! there to a device.
//!
//! For a debugger: a `Debug` exit (breakpoint, step, watchpoint) moves
//! `Running` to `Paused` on the vCPU's own and is announced on the debug
//! event channel; `VcpuCommand::Debug` requests (registers, address
//! translation, debug controls) are served in any state without changing
//! it, answered on their own channel. `--gdb-wait` starts in `Paused`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use vmplay_devices::bus::Bus;
use vmplay_devices::control::{StopReason, VmControl};
use vmplay_hypervisor::{CpuState, DebugEvent, GuestDebug, Vcpu, VcpuExit};

/// What every vCPU thread of one VM shares.
pub(crate) struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    /// vCPUs parked after `hlt` with interrupts masked.
    pub halted: AtomicUsize,
    pub vcpu_count: usize,
    pub counters: Arc<VcpuCounters>,
    /// Where a vCPU that stopped for the debugger says so (it then waits,
    /// paused, for the debugger's commands).
    pub debug_events: Sender<(u32, DebugEvent)>,
}

/// Exits served by every vCPU of the VM, since it started (Firecracker's
/// `vcpu` metrics group counts the same things).
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub exit_io_in: AtomicU64,
    pub exit_io_out: AtomicU64,
    pub exit_mmio_read: AtomicU64,
    pub exit_mmio_write: AtomicU64,
    /// Exits that stopped the VM: crashes and host errors.
    pub failures: AtomicU64,
}

impl VcpuCounters {
    /// `(field, value)` in Firecracker's names.
    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("exit_io_in", get(&self.exit_io_in)),
            ("exit_io_out", get(&self.exit_io_out)),
            ("exit_mmio_read", get(&self.exit_mmio_read)),
            ("exit_mmio_write", get(&self.exit_mmio_write)),
            ("failures", get(&self.failures)),
        ]
    }
}

/// What the machine tells a vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Exit,
    /// A debugger's request, served on the vCPU's own thread in any state
    /// and answered on the request's own channel.
    Debug(DebugRequest),
}

/// Register and translation access for the debugger: only the thread that
/// owns a vCPU may touch it.
#[derive(Debug)]
pub enum DebugRequest {
    State(Sender<Result<CpuState, String>>),
    SetState(Box<CpuState>, Sender<Result<(), String>>),
    Translate(u64, Sender<Result<Option<u64>, String>>),
    SetGuestDebug(GuestDebug, Sender<Result<(), String>>),
}

/// Serves one debugger request.
fn serve_debug(vcpu: &mut dyn Vcpu, request: DebugRequest) {
    let text = |e: vmplay_hypervisor::Error| e.to_string();
    // A requester that gave up waiting is no error.
    match request {
        DebugRequest::State(tx) => {
            let _ = tx.send(vcpu.state().map_err(text));
        }
        DebugRequest::SetState(state, tx) => {
            let _ = tx.send(vcpu.set_state(&state).map_err(text));
        }
        DebugRequest::Translate(gva, tx) => {
            let _ = tx.send(vcpu.translate_gva(gva).map_err(text));
        }
        DebugRequest::SetGuestDebug(debug, tx) => {
            let _ = tx.send(vcpu.set_guest_debug(&debug).map_err(text));
        }
    }
}

/// What a vCPU thread answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Exited,
}

/// The states of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Running,
    /// Paused; `halted` says which state `Resume` returns to.
    Paused {
        halted: bool,
    },
    /// Ran `hlt` with interrupts masked: only commands wake it.
    Halted,
    Exiting,
}

/// A vCPU thread's ends of its channels.
pub(crate) struct VcpuChannels {
    pub commands: Receiver<VcpuCommand>,
    pub responses: Sender<(u32, VcpuResponse)>,
}

/// The state a command moves `state` to, and the answer it gets (an
/// `Exit` is answered once the thread leaves, whatever made it leave).
fn transition(state: State, command: &VcpuCommand) -> (State, VcpuResponse) {
    match (state, command) {
        (_, VcpuCommand::Exit) => (State::Exiting, VcpuResponse::Exited),
        (State::Running, VcpuCommand::Pause) => {
            (State::Paused { halted: false }, VcpuResponse::Paused)
        }
        (State::Halted, VcpuCommand::Pause) => {
            (State::Paused { halted: true }, VcpuResponse::Paused)
        }
        (State::Paused { halted }, VcpuCommand::Resume) => (
            if halted {
                State::Halted
            } else {
                State::Running
            },
            VcpuResponse::Resumed,
        ),
        (s, VcpuCommand::Pause) => (s, VcpuResponse::Paused),
        (s, VcpuCommand::Resume) => (s, VcpuResponse::Resumed),
        // Served apart (`serve_debug`): never a state change.
        (s, VcpuCommand::Debug(_)) => (s, VcpuResponse::Resumed),
    }
}

/// The paused state a machine started with `--gdb-wait` begins in.
pub(crate) const START_PAUSED: State = State::Paused { halted: false };
/// The usual first state.
pub(crate) const START_RUNNING: State = State::Running;

/// Runs `vcpu` until it is told to exit or the VM stops. Every way out of
/// the guest that the machine cannot serve becomes a [`StopReason`].
/// [`run`], except that a bug that panics on the vCPU thread stops the VM
/// with an error instead of leaving the VMM waiting for this vCPU forever.
pub(crate) fn run_guarded(
    vcpu: Box<dyn Vcpu>,
    ctx: &VcpuContext,
    chan: VcpuChannels,
    first: State,
) {
    let id = vcpu.id();
    let responses = chan.responses.clone();
    let body = std::panic::AssertUnwindSafe(|| run(vcpu, ctx, chan, first));
    if let Err(panic) = std::panic::catch_unwind(body) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        ctx.control.request_stop(StopReason::HostError(format!(
            "vCPU {id}: internal error (panic): {what}"
        )));
        let _ = responses.send((id, VcpuResponse::Exited));
    }
}

pub(crate) fn run(mut vcpu: Box<dyn Vcpu>, ctx: &VcpuContext, chan: VcpuChannels, first: State) {
    let id = vcpu.id();
    let mut state = first;
    let answer = |r: VcpuResponse| {
        let _ = chan.responses.send((id, r));
    };
    loop {
        state = match state {
            State::Running if ctx.control.is_stopping() => State::Exiting,
            State::Running => match step(vcpu.as_mut(), ctx) {
                Step::Continue => State::Running,
                Step::Kicked => {
                    // Take every command that came with the kick.
                    let mut s = State::Running;
                    loop {
                        match chan.commands.try_recv() {
                            Ok(VcpuCommand::Debug(req)) => serve_debug(vcpu.as_mut(), req),
                            Ok(cmd) => {
                                let (next, r) = transition(s, &cmd);
                                s = next;
                                if s == State::Exiting {
                                    break;
                                }
                                answer(r);
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                s = State::Exiting;
                                break;
                            }
                        }
                    }
                    s
                }
                Step::Halted => {
                    tracing::debug!(vcpu = id, "halted with interrupts masked");
                    if ctx.halted.fetch_add(1, Ordering::AcqRel) + 1 == ctx.vcpu_count {
                        ctx.control.request_stop(StopReason::Halted);
                    }
                    State::Halted
                }
                Step::Stop => State::Exiting,
                Step::Debug(event) => {
                    // Held for the debugger, which is told (and stops the
                    // other vCPUs); it sends Resume when gdb continues.
                    tracing::debug!(vcpu = id, ?event, "debug stop");
                    let _ = ctx.debug_events.send((id, event));
                    State::Paused { halted: false }
                }
            },
            State::Paused { .. } | State::Halted => match chan.commands.recv() {
                Ok(VcpuCommand::Debug(req)) => {
                    serve_debug(vcpu.as_mut(), req);
                    state
                }
                Ok(cmd) => {
                    let (next, r) = transition(state, &cmd);
                    if next != State::Exiting {
                        answer(r);
                    }
                    next
                }
                Err(_) => State::Exiting,
            },
            State::Exiting => {
                // The backend's vCPU goes first (its last words, as emu's
                // statistics, come before the VMM may exit); then, whatever
                // made it leave (a command, the VM stopping, a crash), the
                // machine's join hears it once.
                drop(vcpu);
                answer(VcpuResponse::Exited);
                return;
            }
        };
    }
}

enum Step {
    /// Served an exit; run on.
    Continue,
    /// A kick: look at the commands.
    Kicked,
    Halted,
    /// The vCPU asked the VM to stop (crash, host error).
    Stop,
    /// Stopped for the debugger.
    Debug(DebugEvent),
}

fn step(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) -> Step {
    let id = vcpu.id();
    let count = |c: &AtomicU64| {
        c.fetch_add(1, Ordering::Relaxed);
    };
    let crash = match vcpu.run() {
        Ok(VcpuExit::IoOut { port, data }) => {
            count(&ctx.counters.exit_io_out);
            if !ctx.pio.write(port.into(), data) {
                tracing::trace!(port, ?data, "write to unclaimed port");
            }
            return Step::Continue;
        }
        Ok(VcpuExit::IoIn { port, data }) => {
            count(&ctx.counters.exit_io_in);
            if !ctx.pio.read(port.into(), data) {
                tracing::trace!(port, "read from unclaimed port");
            }
            return Step::Continue;
        }
        Ok(VcpuExit::MmioWrite { addr, data }) => {
            count(&ctx.counters.exit_mmio_write);
            if !ctx.mmio.write(addr, data) {
                tracing::debug!(addr, ?data, "write to unclaimed MMIO");
            }
            return Step::Continue;
        }
        Ok(VcpuExit::MmioRead { addr, data }) => {
            count(&ctx.counters.exit_mmio_read);
            if !ctx.mmio.read(addr, data) {
                tracing::debug!(addr, "read from unclaimed MMIO");
            }
            return Step::Continue;
        }
        Ok(VcpuExit::Interrupted) => return Step::Kicked,
        Ok(VcpuExit::Debug(event)) => return Step::Debug(event),
        // Nothing but NMI/INIT wakes this vCPU, and vmplay sends neither.
        Ok(VcpuExit::Halt) => return Step::Halted,
        Ok(VcpuExit::Shutdown) => "triple fault (CPU shutdown)".to_string(),
        Ok(VcpuExit::InternalError(why)) => why,
        Err(e) => {
            count(&ctx.counters.failures);
            ctx.control
                .request_stop(StopReason::HostError(format!("vCPU {id}: {e}")));
            return Step::Stop;
        }
    };
    count(&ctx.counters.failures);
    let registers = match vcpu.state() {
        Ok(state) => state.to_string(),
        Err(e) => format!("(registers unavailable: {e})"),
    };
    ctx.control.request_stop(StopReason::GuestCrash {
        vcpu: id,
        detail: crash,
        registers,
    });
    Step::Stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_move_the_state_machine() {
        use VcpuCommand::*;
        assert_eq!(
            transition(State::Running, &Pause),
            (State::Paused { halted: false }, VcpuResponse::Paused)
        );
        assert_eq!(
            transition(State::Paused { halted: false }, &Resume),
            (State::Running, VcpuResponse::Resumed)
        );
        assert_eq!(
            transition(State::Halted, &Pause),
            (State::Paused { halted: true }, VcpuResponse::Paused)
        );
        assert_eq!(
            transition(State::Paused { halted: true }, &Resume),
            (State::Halted, VcpuResponse::Resumed)
        );
        // Idempotent, as Firecracker's PATCH /vm.
        assert_eq!(
            transition(State::Paused { halted: false }, &Pause).0,
            State::Paused { halted: false }
        );
        assert_eq!(
            transition(State::Running, &Resume),
            (State::Running, VcpuResponse::Resumed)
        );
        assert_eq!(
            transition(State::Halted, &Exit),
            (State::Exiting, VcpuResponse::Exited)
        );
    }

    /// A vCPU that stops for the debugger at once, then would run on.
    struct StopsForDebugger {
        runs: Arc<AtomicUsize>,
        debug: Arc<std::sync::Mutex<Option<GuestDebug>>>,
    }

    impl Vcpu for StopsForDebugger {
        fn id(&self) -> u32 {
            0
        }
        fn run(&mut self) -> vmplay_hypervisor::Result<VcpuExit<'_>> {
            if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
                return Ok(VcpuExit::Debug(DebugEvent::SwBreakpoint));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            Ok(VcpuExit::Interrupted)
        }
        fn state(&self) -> vmplay_hypervisor::Result<CpuState> {
            Ok(CpuState {
                rip: 0x1234,
                ..CpuState::default()
            })
        }
        fn set_state(&mut self, _: &CpuState) -> vmplay_hypervisor::Result<()> {
            Ok(())
        }
        fn set_guest_debug(&mut self, d: &GuestDebug) -> vmplay_hypervisor::Result<()> {
            *self.debug.lock().unwrap() = Some(d.clone());
            Ok(())
        }
        fn kicker(&self) -> Arc<dyn vmplay_hypervisor::VcpuKicker> {
            struct Nobody;
            impl vmplay_hypervisor::VcpuKicker for Nobody {
                fn kick(&self) {}
            }
            Arc::new(Nobody)
        }
    }

    /// A context for one vCPU with empty buses.
    fn one_vcpu_context(debug_events: std::sync::mpsc::Sender<(u32, DebugEvent)>) -> VcpuContext {
        VcpuContext {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            control: VmControl::new(),
            halted: AtomicUsize::new(0),
            vcpu_count: 1,
            counters: Arc::default(),
            debug_events,
        }
    }

    /// A vCPU whose backend panics (a VMM bug).
    struct Panics;

    impl Vcpu for Panics {
        fn id(&self) -> u32 {
            3
        }
        fn run(&mut self) -> vmplay_hypervisor::Result<VcpuExit<'_>> {
            panic!("backend bug")
        }
        fn kicker(&self) -> Arc<dyn vmplay_hypervisor::VcpuKicker> {
            unimplemented!()
        }
        fn state(&self) -> vmplay_hypervisor::Result<CpuState> {
            unimplemented!()
        }
        fn set_state(&mut self, _: &CpuState) -> vmplay_hypervisor::Result<()> {
            unimplemented!()
        }
    }

    #[test]
    fn a_panicking_vcpu_stops_the_vm_with_an_error() {
        let (events_tx, _events) = std::sync::mpsc::channel();
        let ctx = one_vcpu_context(events_tx);
        let (_commands_tx, commands) = std::sync::mpsc::channel();
        let (responses_tx, responses) = std::sync::mpsc::channel();
        let chan = VcpuChannels {
            commands,
            responses: responses_tx,
        };
        run_guarded(Box::new(Panics), &ctx, chan, START_RUNNING);
        assert!(matches!(
            responses.try_recv(),
            Ok((3, VcpuResponse::Exited))
        ));
        match ctx.control.reason() {
            Some(StopReason::HostError(m)) => {
                assert!(m.contains("vCPU 3") && m.contains("backend bug"), "{m}")
            }
            other => panic!("stop reason {other:?}"),
        }
    }

    #[test]
    fn a_debug_exit_pauses_the_vcpu_and_tells_the_debugger() {
        let (events_tx, events) = std::sync::mpsc::channel();
        let ctx = Arc::new(one_vcpu_context(events_tx));
        let (commands_tx, commands) = std::sync::mpsc::channel();
        let (responses_tx, responses) = std::sync::mpsc::channel();
        let runs = Arc::new(AtomicUsize::new(0));
        let debug = Arc::new(std::sync::Mutex::new(None));
        let vcpu = Box::new(StopsForDebugger {
            runs: runs.clone(),
            debug: debug.clone(),
        });
        let thread = {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                run(
                    vcpu,
                    &ctx,
                    VcpuChannels {
                        commands,
                        responses: responses_tx,
                    },
                    START_RUNNING,
                )
            })
        };
        let wait = std::time::Duration::from_secs(5);
        assert_eq!(events.recv_timeout(wait), Ok((0, DebugEvent::SwBreakpoint)));
        // Paused: served in place, and no further run meanwhile.
        let (tx, rx) = std::sync::mpsc::channel();
        commands_tx
            .send(VcpuCommand::Debug(DebugRequest::State(tx)))
            .unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap().unwrap().rip, 0x1234);
        let (tx, rx) = std::sync::mpsc::channel();
        let step = GuestDebug {
            single_step: true,
            ..GuestDebug::default()
        };
        commands_tx
            .send(VcpuCommand::Debug(DebugRequest::SetGuestDebug(
                step.clone(),
                tx,
            )))
            .unwrap();
        rx.recv_timeout(wait).unwrap().unwrap();
        assert_eq!(debug.lock().unwrap().as_ref(), Some(&step));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "held while paused");
        commands_tx.send(VcpuCommand::Resume).unwrap();
        assert_eq!(responses.recv_timeout(wait), Ok((0, VcpuResponse::Resumed)));
        commands_tx.send(VcpuCommand::Exit).unwrap();
        assert_eq!(responses.recv_timeout(wait), Ok((0, VcpuResponse::Exited)));
        thread.join().unwrap();
        assert!(runs.load(Ordering::SeqCst) > 1, "ran again after Resume");
    }
}
