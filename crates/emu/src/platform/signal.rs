//! Per-vCPU attention word: the one atomic the run loop loads between
//! blocks, plus the condition variable a halted vCPU sleeps on.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

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
    /// How long a halted vCPU spins before it sleeps (KVM's adaptive
    /// `halt_poll_ns`); only the vCPU's own thread touches it.
    halt_poll_ns: AtomicU64,
}

/// Longest spin of a halted vCPU. Waking a sleeping thread costs this
/// host 30-100 µs; a device round trip (a 1 MiB virtio-blk read) is
/// ~300 µs, so the poll must outlast that to catch its interrupt.
const HALT_POLL_MAX_NS: u64 = 500_000;
/// The first poll after a short halt (KVM's `halt_poll_ns_grow_start`).
const HALT_POLL_START_NS: u64 = 10_000;

/// The poll window after a halt that polled for `poll` ns and then slept
/// until `blocked` ns had passed.
fn next_halt_poll(poll: u64, blocked: u64) -> u64 {
    if blocked > HALT_POLL_MAX_NS {
        0
    } else {
        (poll * 2).clamp(HALT_POLL_START_NS, HALT_POLL_MAX_NS)
    }
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

    /// A halted vCPU waits for attention: first spinning (while recent
    /// halts were short enough that polling caught their wake-up), then
    /// sleeping. The poll window grows while halts end within it and is
    /// dropped after one that outlasts the maximum, as KVM's halt polling
    /// does, so an idle guest costs no spinning. The spin yields the CPU
    /// at every turn (KVM stops polling when another task is runnable):
    /// the thread that will wake this vCPU, a host process feeding its
    /// network, may be waiting for this very CPU.
    pub fn wait_halted(&self) {
        let poll = self.halt_poll_ns.load(Ordering::Relaxed);
        let start = Instant::now();
        if poll > 0 {
            loop {
                if self.attention.load(Ordering::Acquire) != 0 {
                    return;
                }
                std::thread::yield_now();
                if start.elapsed().as_nanos() as u64 >= poll {
                    break;
                }
            }
        }
        self.wait();
        let blocked = start.elapsed().as_nanos() as u64;
        self.halt_poll_ns
            .store(next_halt_poll(poll, blocked), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_window_grows_on_short_halts_and_closes_after_a_long_one() {
        let mut poll = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            poll = next_halt_poll(poll, 5_000);
            seen.push(poll);
        }
        assert_eq!(seen[0], HALT_POLL_START_NS);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(poll, HALT_POLL_MAX_NS);
        // An idle guest: one halt longer than the maximum ends the spinning.
        assert_eq!(next_halt_poll(poll, HALT_POLL_MAX_NS + 1), 0);
    }

    #[test]
    fn a_raise_before_the_halt_returns_at_once() {
        let sig = Signal::default();
        sig.raise(IRQ);
        let t = Instant::now();
        sig.wait_halted();
        assert!(t.elapsed() < Duration::from_millis(40));
    }
}
