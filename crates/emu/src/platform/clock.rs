//! Guest time: host monotonic time since VM creation, scaled to a fixed
//! advertised TSC frequency and a fixed LAPIC bus (crystal) frequency.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The TSC frequency CPUID advertises (leaf 0x15 = crystal × 2 / 1).
pub const TSC_HZ: u64 = 2_000_000_000;
/// The core crystal clock, which also drives the LAPIC timer.
pub const CRYSTAL_HZ: u64 = 1_000_000_000;
/// The 8254 PIT input clock.
pub const PIT_HZ: u64 = 1_193_182;

pub struct Clock {
    epoch: Instant,
    /// Host nanoseconds the guest did not see (time spent paused).
    hidden_ns: AtomicU64,
    /// While paused: guest time frozen at this value (`u64::MAX`: running).
    frozen_ns: AtomicU64,
    /// Host time since `epoch` when the pause began.
    paused_at: Mutex<Option<u64>>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
            hidden_ns: AtomicU64::new(0),
            frozen_ns: AtomicU64::new(u64::MAX),
            paused_at: Mutex::new(None),
        }
    }

    /// Guest nanoseconds since the VM was created: host time less the
    /// time spent paused, so the virtual TSC and timers do not jump.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        let frozen = self.frozen_ns.load(Ordering::Acquire);
        if frozen != u64::MAX {
            return frozen;
        }
        (self.epoch.elapsed().as_nanos() as u64)
            .saturating_sub(self.hidden_ns.load(Ordering::Acquire))
    }

    /// Freezes guest time (the machine has paused every vCPU).
    pub fn pause(&self) {
        let mut at = self.paused_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.is_none() {
            let host = self.epoch.elapsed().as_nanos() as u64;
            let guest = host.saturating_sub(self.hidden_ns.load(Ordering::Acquire));
            self.frozen_ns.store(guest, Ordering::Release);
            *at = Some(host);
        }
    }

    /// Lets guest time run on from where [`Clock::pause`] froze it.
    pub fn resume(&self) {
        let mut at = self.paused_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(start) = at.take() {
            let host = self.epoch.elapsed().as_nanos() as u64;
            self.hidden_ns
                .fetch_add(host.saturating_sub(start), Ordering::AcqRel);
            self.frozen_ns.store(u64::MAX, Ordering::Release);
        }
    }

    /// TSC ticks for `ns` nanoseconds.
    #[inline]
    pub fn ns_to_tsc(ns: u64) -> u64 {
        (u128::from(ns) * u128::from(TSC_HZ) / 1_000_000_000) as u64
    }

    /// Nanoseconds for `tsc` ticks.
    #[inline]
    pub fn tsc_to_ns(tsc: u64) -> u64 {
        (u128::from(tsc) * 1_000_000_000 / u128::from(TSC_HZ)) as u64
    }

    /// The TSC value now, before a vCPU's own offset.
    #[inline]
    pub fn tsc(&self) -> u64 {
        Self::ns_to_tsc(self.now_ns())
    }
}

/// Converts `ticks` of a clock at `hz` to nanoseconds.
#[inline]
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(hz)) as u64
}

/// Ticks of a clock at `hz` in `ns` nanoseconds.
#[inline]
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    (u128::from(ns) * u128::from(hz) / 1_000_000_000) as u64
}

#[cfg(test)]
mod pause_tests {
    use super::Clock;
    use std::time::Duration;

    #[test]
    fn paused_time_is_hidden_from_the_guest() {
        let c = Clock::new();
        std::thread::sleep(Duration::from_millis(5));
        c.pause();
        let frozen = c.now_ns();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.now_ns(), frozen);
        c.resume();
        let after = c.now_ns();
        assert!(
            after >= frozen && after - frozen < 20_000_000,
            "{frozen} -> {after}"
        );
    }
}
