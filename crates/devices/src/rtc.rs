//! The CMOS RTC (MC146818) at ports 0x70 (index) and 0x71 (data).
//!
//! The time follows the host clock (UTC), plus whatever offset the guest
//! sets by writing the clock registers. Registers are computed from the
//! clock at each read, so they are always shown in the format register B
//! currently selects (BCD or binary, 12 or 24 hour). UIP (register A bit
//! 7) reads as set only in the 244 µs before each host second boundary,
//! so a reader that sees it clear has that long before the registers
//! change, as on the real part; Linux's `mc146818_avoid_UIP` also rechecks
//! the seconds, so slow (emulated) readers stay consistent.
//!
//! Not modelled: interrupts (no IRQ line; register C only reports the
//! update-ended flag to pollers), alarms (stored, never fire), the divider
//! bits of register A (stored, the clock always runs), daylight saving.
//! The guest's weekday writes are ignored: the weekday follows the date.
//! The other CMOS bytes are plain storage.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::access::{read_bytes, write_bytes};
use crate::bus::BusDevice;

/// Index port offset (writes select a register; bit 7 is the NMI mask).
const INDEX: u64 = 0;
/// Data port offset.
const DATA: u64 = 1;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
const TIME_REGS: [u8; 8] = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY];

const A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: what a BIOS leaves.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// How long before each second boundary UIP is set.
const UIP_WINDOW_NS: u32 = 244_000;

/// Where the RTC reads the time: UTC, as a duration since the Unix epoch.
pub trait Clock: Send {
    fn now(&self) -> Duration;
}

/// The host's real-time clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        // A host clock before 1970 is broken; show 1970 rather than fail.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

impl<F: Fn() -> Duration + Send> Clock for F {
    fn now(&self) -> Duration {
        self()
    }
}

/// A calendar time, all fields binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday, as the RTC counts.
    weekday: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> DateTime {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday.
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_bcd(v: u8) -> u8 {
    (v / 10) << 4 | (v % 10)
}

fn from_bcd(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

/// The MC146818 CMOS RTC and its 128 bytes of CMOS memory.
pub struct Rtc {
    clock: Box<dyn Clock>,
    index: u8,
    /// Register A/B, the frozen clock while B.SET is on, alarms, storage.
    cmos: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// The guest second at the last read of register C (for its UF flag).
    last_c_second: i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC showing the host's time.
    pub fn new() -> Rtc {
        Rtc::with_clock(SystemClock)
    }

    /// An RTC reading the time from `clock` (tests use a fixed one).
    pub fn with_clock(clock: impl Clock + 'static) -> Rtc {
        let mut cmos = [0; 128];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_24H;
        let mut rtc = Rtc {
            clock: Box::new(clock),
            index: 0,
            cmos,
            offset: 0,
            last_c_second: 0,
        };
        rtc.last_c_second = rtc.guest_now().0;
        rtc
    }

    /// The guest's time: whole seconds since the epoch, and nanoseconds.
    fn guest_now(&self) -> (i64, u32) {
        let now = self.clock.now();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        (secs.saturating_add(self.offset), now.subsec_nanos())
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & B_DM_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> Option<u8> {
        if self.reg_b() & B_DM_BINARY != 0 {
            Some(v)
        } else {
            from_bcd(v)
        }
    }

    /// Clock register `reg` of `t`, in the format register B selects.
    fn time_register(&self, reg: u8, t: &DateTime) -> u8 {
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS if self.reg_b() & B_24H != 0 => self.encode(t.hour),
            HOURS => {
                let h12 = if t.hour.is_multiple_of(12) {
                    12
                } else {
                    t.hour % 12
                };
                let pm = if t.hour >= 12 { HOUR_PM } else { 0 };
                self.encode(h12) | pm
            }
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u8),
            CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u8),
            _ => self.cmos[usize::from(reg)],
        }
    }

    /// The clock registers as they read now, in `cmos` layout.
    fn live_image(&self) -> [u8; 128] {
        let t = DateTime::from_unix(self.guest_now().0);
        let mut image = self.cmos;
        for reg in TIME_REGS {
            image[usize::from(reg)] = self.time_register(reg, &t);
        }
        image
    }

    /// Decodes the clock registers of `image`, or None if one is invalid.
    fn decode_image(&self, image: &[u8; 128]) -> Option<DateTime> {
        let get = |reg: u8| self.decode(image[usize::from(reg)]);
        let raw_hour = image[usize::from(HOURS)];
        let hour = if self.reg_b() & B_24H != 0 {
            get(HOURS).filter(|&h| h < 24)?
        } else {
            let h12 = self
                .decode(raw_hour & !HOUR_PM)
                .filter(|h| (1..=12).contains(h))?;
            h12 % 12 + if raw_hour & HOUR_PM != 0 { 12 } else { 0 }
        };
        let year = get(YEAR).filter(|&y| y < 100)?;
        let century = get(CENTURY).filter(|&c| c < 100)?;
        Some(DateTime {
            year: i64::from(century) * 100 + i64::from(year),
            month: get(MONTH).filter(|m| (1..=12).contains(m))?,
            day: get(DAY).filter(|d| (1..=31).contains(d))?,
            hour,
            minute: get(MINUTES).filter(|&m| m < 60)?,
            second: get(SECONDS).filter(|&s| s < 60)?,
            weekday: 1,
        })
    }

    /// Makes the clock show the time in `image` from now on.
    fn set_time(&mut self, image: &[u8; 128]) {
        match self.decode_image(image) {
            Some(t) => {
                let host = self.guest_now().0.saturating_sub(self.offset);
                self.offset = t.to_unix().saturating_sub(host);
                tracing::debug!(?t, offset = self.offset, "guest set the RTC");
            }
            None => tracing::debug!("RTC: guest wrote an invalid time; ignored"),
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let set = self.reg_b() & B_SET != 0;
        match reg {
            _ if TIME_REGS.contains(&reg) && !set => {
                self.time_register(reg, &DateTime::from_unix(self.guest_now().0))
            }
            REG_A => {
                let nanos = self.guest_now().1;
                let uip = !set && nanos >= 1_000_000_000 - UIP_WINDOW_NS;
                self.cmos[usize::from(REG_A)] | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let second = self.guest_now().0;
                let mut flags = 0;
                if !set && second != self.last_c_second {
                    flags |= C_UF;
                    if self.reg_b() & B_UIE != 0 {
                        flags |= C_IRQF;
                    }
                }
                self.last_c_second = second;
                flags
            }
            REG_D => D_VRT,
            _ => self.cmos[usize::from(reg)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        let set = self.reg_b() & B_SET != 0;
        match reg {
            _ if TIME_REGS.contains(&reg) => {
                if set {
                    self.cmos[usize::from(reg)] = value;
                } else {
                    let mut image = self.live_image();
                    image[usize::from(reg)] = value;
                    self.set_time(&image);
                }
            }
            REG_A => self.cmos[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                // Setting SET also clears UIE, as on the MC146818.
                let value = if value & B_SET != 0 {
                    value & !B_UIE
                } else {
                    value
                };
                let entering_set = !set && value & B_SET != 0;
                let leaving_set = set && value & B_SET == 0;
                self.cmos[usize::from(REG_B)] = value;
                if entering_set {
                    // Updates stop: freeze what the clock shows now.
                    self.cmos = self.live_image();
                } else if leaving_set {
                    let image = self.cmos;
                    self.set_time(&image);
                }
            }
            // Read-only status registers.
            REG_C | REG_D => {}
            _ => self.cmos[usize::from(reg)] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |off| match off {
            DATA => self.read_register(self.index),
            // The index register is write-only.
            _ => 0xff,
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |off, value| match off {
            // Bit 7 masks NMIs on a PC; there are none to mask here.
            INDEX => self.index = value & 0x7f,
            DATA => self.write_register(self.index, value),
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_214_307;

    /// A clock the test moves by hand, in nanoseconds since the epoch.
    fn manual_clock(start_ns: u64) -> (Arc<AtomicU64>, impl Clock) {
        let t = Arc::new(AtomicU64::new(start_ns));
        let clock = {
            let t = t.clone();
            move || Duration::from_nanos(t.load(Ordering::SeqCst))
        };
        (t, clock)
    }

    fn rtc_at(secs: u64) -> Rtc {
        Rtc::with_clock(move || Duration::from_secs(secs))
    }

    fn get(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(INDEX, &[reg]);
        let mut b = [0];
        rtc.read(DATA, &mut b);
        b[0]
    }

    fn set(rtc: &mut Rtc, reg: u8, value: u8) {
        rtc.write(INDEX, &[reg]);
        rtc.write(DATA, &[value]);
    }

    fn clock_regs(rtc: &mut Rtc) -> [u8; 8] {
        TIME_REGS.map(|r| get(rtc, r))
    }

    #[test]
    fn shows_the_time_in_bcd_24h_by_default() {
        let mut rtc = rtc_at(LEAP_DAY);
        // sec, min, hour, weekday (Thursday = 5), day, month, year, century
        assert_eq!(
            clock_regs(&mut rtc),
            [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        assert_eq!(get(&mut rtc, REG_B), B_24H);
        assert_eq!(get(&mut rtc, REG_D), D_VRT);
    }

    #[test]
    fn binary_mode_follows_register_b() {
        let mut rtc = rtc_at(LEAP_DAY);
        set(&mut rtc, REG_B, B_24H | B_DM_BINARY);
        assert_eq!(clock_regs(&mut rtc), [7, 45, 13, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn twelve_hour_mode_flags_pm_in_bit_7() {
        let mut rtc = rtc_at(LEAP_DAY);
        set(&mut rtc, REG_B, 0);
        assert_eq!(get(&mut rtc, HOURS), 0x80 | 0x01, "1 PM, BCD");
        set(&mut rtc, REG_B, B_DM_BINARY);
        assert_eq!(get(&mut rtc, HOURS), 0x80 | 1, "1 PM, binary");
        let midnight = LEAP_DAY - (13 * 3600 + 45 * 60 + 7);
        let mut rtc = rtc_at(midnight);
        set(&mut rtc, REG_B, 0);
        assert_eq!(get(&mut rtc, HOURS), 0x12, "midnight is 12 AM");
        let mut rtc = rtc_at(midnight + 12 * 3600 + 30);
        set(&mut rtc, REG_B, 0);
        assert_eq!(get(&mut rtc, HOURS), 0x80 | 0x12, "noon is 12 PM");
    }

    #[test]
    fn uip_is_set_only_just_before_a_second_boundary() {
        let (t, clock) = manual_clock(LEAP_DAY * 1_000_000_000);
        let mut rtc = Rtc::with_clock(clock);
        let base = LEAP_DAY * 1_000_000_000;
        for (ns, uip) in [
            (0, false),
            (500_000_000, false),
            (999_755_000, false),
            (999_757_000, true),
            (999_999_999, true),
            (1_000_000_000, false),
        ] {
            t.store(base + ns, Ordering::SeqCst);
            assert_eq!(get(&mut rtc, REG_A) & A_UIP != 0, uip, "at +{ns} ns");
            assert_eq!(get(&mut rtc, REG_A) & !A_UIP, A_DEFAULT);
        }
        // While the guest holds SET, no update is in progress.
        t.store(base + 999_900_000, Ordering::SeqCst);
        set(&mut rtc, REG_B, B_24H | B_SET);
        assert_eq!(get(&mut rtc, REG_A) & A_UIP, 0);
    }

    #[test]
    fn reader_waiting_for_uip_clear_gets_a_consistent_time() {
        // Just before 23:59:59 -> 00:00:00 on New Year's Eve 2023.
        let new_year = 1_704_067_200u64;
        let (t, clock) = manual_clock((new_year - 1) * 1_000_000_000 + 999_800_000);
        let mut rtc = Rtc::with_clock(clock);
        // Each register access takes 30 µs of host time.
        let read = |rtc: &mut Rtc, reg| {
            t.fetch_add(30_000, Ordering::SeqCst);
            get(rtc, reg)
        };
        while read(&mut rtc, REG_A) & A_UIP != 0 {}
        let regs = [SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR].map(|r| read(&mut rtc, r));
        assert_eq!(regs, [0x00, 0x00, 0x00, 0x01, 0x01, 0x24]);
    }

    #[test]
    fn shows_todays_date() {
        let date = || {
            let out = std::process::Command::new("date")
                .args(["-u", "+%y %m %d"])
                .output()
                .expect("run date");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let before = date();
        let mut rtc = Rtc::new();
        let shown = format!(
            "{:02x} {:02x} {:02x}",
            get(&mut rtc, YEAR),
            get(&mut rtc, MONTH),
            get(&mut rtc, DAY)
        );
        let after = date();
        assert!(shown == before || shown == after, "{shown} vs {before}");
    }

    #[test]
    fn guest_can_set_the_time_with_the_set_bit() {
        let (t, clock) = manual_clock(LEAP_DAY * 1_000_000_000);
        let mut rtc = Rtc::with_clock(clock);
        // Linux's mc146818_set_time: SET on, write the clock, SET off.
        set(&mut rtc, REG_B, B_24H | B_SET);
        t.fetch_add(5_000_000_000, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, SECONDS), 0x07, "frozen while SET");
        for (reg, v) in [
            (SECONDS, 0x58),
            (MINUTES, 0x59),
            (HOURS, 0x23),
            (DAY, 0x31),
            (MONTH, 0x12),
            (YEAR, 0x99),
            (CENTURY, 0x19),
        ] {
            set(&mut rtc, reg, v);
        }
        set(&mut rtc, REG_B, B_24H);
        t.fetch_add(3_000_000_000, Ordering::SeqCst);
        // Three seconds after 1999-12-31 23:59:58: a Saturday in 2000.
        assert_eq!(
            clock_regs(&mut rtc),
            [0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn single_register_write_without_set_moves_the_clock() {
        let mut rtc = rtc_at(LEAP_DAY);
        set(&mut rtc, HOURS, 0x02);
        assert_eq!(clock_regs(&mut rtc)[..3], [0x07, 0x45, 0x02]);
        assert_eq!(get(&mut rtc, DAY), 0x29);
    }

    #[test]
    fn invalid_time_writes_are_ignored() {
        let mut rtc = rtc_at(LEAP_DAY);
        set(&mut rtc, MINUTES, 0x7a); // not BCD
        set(&mut rtc, MONTH, 0x13);
        set(&mut rtc, REG_B, B_SET | B_24H | B_DM_BINARY);
        set(&mut rtc, HOURS, 24);
        set(&mut rtc, REG_B, B_24H | B_DM_BINARY);
        assert_eq!(clock_regs(&mut rtc), [7, 45, 13, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn index_masks_the_nmi_bit_and_cmos_is_plain_storage() {
        let mut rtc = rtc_at(LEAP_DAY);
        for reg in 0x0eu8..0x80 {
            if reg == CENTURY {
                continue;
            }
            rtc.write(INDEX, &[0x80 | reg]);
            rtc.write(DATA, &[reg ^ 0x5a]);
        }
        for reg in 0x0eu8..0x80 {
            if reg != CENTURY {
                assert_eq!(get(&mut rtc, reg), reg ^ 0x5a);
            }
        }
        let mut index = [0];
        rtc.read(INDEX, &mut index);
        assert_eq!(index, [0xff], "index is write-only");
    }

    #[test]
    fn status_registers_are_read_only_and_c_reports_updates() {
        let (t, clock) = manual_clock(LEAP_DAY * 1_000_000_000);
        let mut rtc = Rtc::with_clock(clock);
        set(&mut rtc, REG_C, 0xff);
        set(&mut rtc, REG_D, 0x00);
        assert_eq!(get(&mut rtc, REG_C), 0);
        assert_eq!(get(&mut rtc, REG_D), D_VRT);
        t.fetch_add(1_000_000_000, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, REG_C), C_UF);
        assert_eq!(get(&mut rtc, REG_C), 0, "reading C clears it");
        set(&mut rtc, REG_B, B_24H | B_UIE);
        t.fetch_add(1_000_000_000, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, REG_C), C_UF | C_IRQF);
    }

    #[test]
    fn sixteen_bit_write_sets_index_and_data() {
        let mut rtc = rtc_at(LEAP_DAY);
        rtc.write(INDEX, &[0x40, 0xab]);
        assert_eq!(get(&mut rtc, 0x40), 0xab);
        let mut wide = [0u8; 2];
        rtc.write(INDEX, &[SECONDS]);
        rtc.read(INDEX, &mut wide);
        assert_eq!(wide, [0xff, 0x07]);
    }

    #[test]
    fn calendar_conversion_round_trips() {
        for secs in [
            -86_400i64,
            0,
            951_782_400, // 2000-02-29
            LEAP_DAY as i64,
            4_102_444_800, // 2100-01-01
        ] {
            let t = DateTime::from_unix(secs);
            assert_eq!(t.to_unix(), secs, "{t:?}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            DateTime::from_unix(0).weekday,
            5,
            "1970-01-01 was a Thursday"
        );
    }

    #[test]
    fn absurd_host_clocks_do_not_panic() {
        for secs in [0, u64::MAX] {
            let mut rtc = rtc_at(secs);
            clock_regs(&mut rtc);
            set(&mut rtc, YEAR, 0x99);
            clock_regs(&mut rtc);
        }
    }

    #[test]
    fn survives_random_accesses() {
        let mut rtc = Rtc::new();
        crate::access::fuzz::hammer(&mut rtc, 2, 0x146818, 20_000);
    }
}
