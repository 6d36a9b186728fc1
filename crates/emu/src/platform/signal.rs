//! Per-vCPU attention word: the one atomic the run loop loads between
//! blocks, plus the condition variable a halted vCPU sleeps on.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// `run()` must return `Interrupted`.
pub const KICK: u32 = 1 << 0;
/// The LAPIC or PIC may have an interrupt for this vCPU.
pub const IRQ: u32 = 1 << 1;
pub const NMI: u32 = 1 << 2;
pub const INIT: u32 = 1 << 3;
pub const SIPI: u32 = 1 << 4;
/// A page became code: drop TLB write tags for code pages.
pub const FLUSH_CODE: u32 = 1 << 5;
/// A KVM_HC_KICK_CPU hypercall: a halted vCPU leaves `hlt`.
pub const UNHALT: u32 = 1 << 6;

#[derive(Default)]
pub struct Signal {
    pub attention: AtomicU32,
    sipi_vector: AtomicU8,
    /// A KVM_HC_KICK_CPU arrived: the next (or current) `hlt` returns at
    /// once (KVM's pv_unhalted).
    unhalt: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Signal {
    /// Sets `bits` and wakes the vCPU if it sleeps.
    pub fn raise(&self, bits: u32) {
        self.attention.fetch_or(bits, Ordering::AcqRel);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    pub fn clear(&self, bits: u32) {
        self.attention.fetch_and(!bits, Ordering::AcqRel);
    }

    /// A PV kick: wakes a halted vCPU, or makes its next `hlt` return.
    pub fn kick_unhalt(&self) {
        self.unhalt.store(true, Ordering::Release);
        self.raise(UNHALT);
    }

    /// Consumes a pending PV kick.
    pub fn take_unhalt(&self) -> bool {
        self.unhalt.swap(false, Ordering::AcqRel)
    }

    pub fn set_sipi_vector(&self, v: u8) {
        self.sipi_vector.store(v, Ordering::Release);
    }

    pub fn sipi_vector(&self) -> u8 {
        self.sipi_vector.load(Ordering::Acquire)
    }

    /// Sleeps until some attention bit is set (bounded, so a lost wake-up
    /// costs at most the timeout).
    pub fn wait(&self) {
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.attention.load(Ordering::Acquire) != 0 {
            return;
        }
        let _ = self.cv.wait_timeout(g, Duration::from_millis(50));
    }
}
