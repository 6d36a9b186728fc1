//! Guest time: host monotonic time since VM creation, scaled to a fixed
//! advertised TSC frequency and a fixed LAPIC bus (crystal) frequency.

use std::time::Instant;

/// The TSC frequency CPUID advertises (leaf 0x15 = crystal × 2 / 1).
pub const TSC_HZ: u64 = 2_000_000_000;
/// The core crystal clock, which also drives the LAPIC timer.
pub const CRYSTAL_HZ: u64 = 1_000_000_000;
/// The 8254 PIT input clock.
pub const PIT_HZ: u64 = 1_193_182;

pub struct Clock {
    epoch: Instant,
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
        }
    }

    /// Nanoseconds since the VM was created.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
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
