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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use vmplay_devices::bus::Bus;
use vmplay_devices::control::{StopReason, VmControl};
use vmplay_hypervisor::{Vcpu, VcpuExit};

/// What every vCPU thread of one VM shares.
pub(crate) struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    /// vCPUs parked after `hlt` with interrupts masked.
    pub halted: AtomicUsize,
    pub vcpu_count: usize,
    pub counters: Arc<VcpuCounters>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Exit,
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
enum State {
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
fn transition(state: State, command: VcpuCommand) -> (State, VcpuResponse) {
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
    }
}

/// Runs `vcpu` until it is told to exit or the VM stops. Every way out of
/// the guest that the machine cannot serve becomes a [`StopReason`].
pub(crate) fn run(mut vcpu: Box<dyn Vcpu>, ctx: &VcpuContext, chan: VcpuChannels) {
    let id = vcpu.id();
    let mut state = State::Running;
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
                            Ok(cmd) => {
                                let (next, r) = transition(s, cmd);
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
            },
            State::Paused { .. } | State::Halted => match chan.commands.recv() {
                Ok(cmd) => {
                    let (next, r) = transition(state, cmd);
                    if next != State::Exiting {
                        answer(r);
                    }
                    next
                }
                Err(_) => State::Exiting,
            },
            State::Exiting => {
                // Whatever made it leave (a command, the VM stopping, a
                // crash), the machine's join hears it once.
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
            transition(State::Running, Pause),
            (State::Paused { halted: false }, VcpuResponse::Paused)
        );
        assert_eq!(
            transition(State::Paused { halted: false }, Resume),
            (State::Running, VcpuResponse::Resumed)
        );
        assert_eq!(
            transition(State::Halted, Pause),
            (State::Paused { halted: true }, VcpuResponse::Paused)
        );
        assert_eq!(
            transition(State::Paused { halted: true }, Resume),
            (State::Halted, VcpuResponse::Resumed)
        );
        // Idempotent, as Firecracker's PATCH /vm.
        assert_eq!(
            transition(State::Paused { halted: false }, Pause).0,
            State::Paused { halted: false }
        );
        assert_eq!(
            transition(State::Running, Resume),
            (State::Running, VcpuResponse::Resumed)
        );
        assert_eq!(
            transition(State::Halted, Exit),
            (State::Exiting, VcpuResponse::Exited)
        );
    }
}
