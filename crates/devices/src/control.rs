//! How anything in the VM asks the whole VM to stop, and says why.
//!
//! A device (the i8042 reset line, the ACPI sleep register, the debug-exit
//! port), a vCPU thread (triple fault) or a signal handler thread calls
//! [`VmControl::request_stop`]. The first reason wins; every vCPU is kicked
//! out of its run loop and the main thread, waiting in [`VmControl::wait`],
//! reports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vmplay_hypervisor::VcpuKicker;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (i8042 pulse, ACPI reset register).
    Reset,
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// A host signal (SIGINT, SIGTERM) asked vmplay to stop.
    Signal(i32),
    /// The user typed the serial console escape (Ctrl-A x).
    ConsoleEscape,
    /// Every vCPU executed `hlt` with interrupts masked.
    Halted,
    /// The guest crashed a vCPU: a triple fault, an internal error, an exit
    /// nobody handles. `detail` says what; `registers` is the dump.
    GuestCrash {
        vcpu: u32,
        detail: String,
        registers: String,
    },
    /// vmplay itself failed while the VM ran.
    HostError(String),
}

impl StopReason {
    /// The process exit status this reason maps to (see README).
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::PowerOff
            | StopReason::Reset
            | StopReason::ConsoleEscape
            | StopReason::Halted => 0,
            StopReason::DebugExit(v) => ((v << 1) | 1) as i32 & 0xff,
            StopReason::Signal(sig) => 128 + sig,
            StopReason::GuestCrash { .. } => 4,
            StopReason::HostError(_) => 1,
        }
    }
}

/// Shared stop flag, reason and vCPU kickers of one VM.
#[derive(Default)]
pub struct VmControl {
    stopping: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    stopped: Condvar,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a vCPU to be kicked when the VM stops.
    pub fn add_kicker(&self, kicker: Arc<dyn VcpuKicker>) {
        let mut kickers = self.kickers.lock().unwrap_or_else(|e| e.into_inner());
        kickers.push(kicker.clone());
        drop(kickers);
        // A vCPU registered after the stop must not run on.
        if self.is_stopping() {
            kicker.kick();
        }
    }

    /// Asks the VM to stop. The first reason is kept; later ones are ignored.
    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return;
            }
            tracing::debug!(?reason, "stop requested");
            *slot = Some(reason);
            self.stopping.store(true, Ordering::Release);
        }
        self.stopped.notify_all();
        for kicker in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            kicker.kick();
        }
    }

    /// True once a stop was requested: vCPU loops check this after exits.
    #[inline]
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Blocks until a stop is requested and returns why.
    pub fn wait(&self) -> StopReason {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(reason) = slot.as_ref() {
                return reason.clone();
            }
            slot = self.stopped.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The reason, if a stop was requested.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct CountKicks(AtomicUsize);
    impl VcpuKicker for CountKicks {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_reason_wins_and_kicks_every_vcpu() {
        let control = VmControl::new();
        let k = Arc::new(CountKicks(AtomicUsize::new(0)));
        control.add_kicker(k.clone());
        assert!(!control.is_stopping());
        let waiter = {
            let c = control.clone();
            std::thread::spawn(move || c.wait())
        };
        control.request_stop(StopReason::DebugExit(0x10));
        control.request_stop(StopReason::PowerOff);
        assert_eq!(waiter.join().unwrap(), StopReason::DebugExit(0x10));
        assert_eq!(k.0.load(Ordering::SeqCst), 1);
        // Late registrations are kicked at once.
        let late = Arc::new(CountKicks(AtomicUsize::new(0)));
        control.add_kicker(late.clone());
        assert_eq!(late.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn exit_codes_follow_qemu_debug_exit() {
        assert_eq!(StopReason::DebugExit(0x10).exit_code(), 0x21);
        assert_eq!(StopReason::DebugExit(0).exit_code(), 1);
        assert_eq!(StopReason::PowerOff.exit_code(), 0);
        assert_eq!(StopReason::Signal(15).exit_code(), 143);
    }
}
