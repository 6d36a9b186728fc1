//! The 8254 PIT: three channels at 1.193182 MHz following host time;
//! channel 0 drives IRQ0, channel 2's gate and output are on port 0x61
//! (Linux's quick PIT calibration polls them).

use super::clock::{PIT_HZ, ns_to_ticks, ticks_to_ns};

#[derive(Debug, Clone, Default)]
struct Channel {
    /// Reload value (0 means 0x10000).
    count: u32,
    mode: u8,
    rw: u8,
    bcd: bool,
    gate: bool,
    load_ns: u64,
    latched: Option<u16>,
    latch_hi_next: bool,
    status: Option<u8>,
    read_hi_next: bool,
    write_hi_next: bool,
    write_lo: u8,
    null_count: bool,
    /// Next IRQ time for channel 0.
    next_irq: Option<u64>,
}

impl Channel {
    fn ticks(&self, now: u64) -> u64 {
        ns_to_ticks(now.saturating_sub(self.load_ns), PIT_HZ)
    }

    fn get_count(&self, now: u64) -> u16 {
        let d = self.ticks(now);
        let c = u64::from(self.count);
        let v = match self.mode {
            0 | 1 | 4 | 5 => c.wrapping_sub(d) & 0xffff,
            3 => c - ((2 * d) % c),
            _ => c - (d % c),
        };
        v as u16
    }

    fn out(&self, now: u64) -> bool {
        let d = self.ticks(now);
        let c = u64::from(self.count);
        match self.mode {
            1 => d < c,
            2 => d.is_multiple_of(c) && d != 0,
            3 => d % c < c.div_ceil(2),
            4 | 5 => d == c,
            _ => d >= c,
        }
    }

    fn load(&mut self, v: u16, now: u64) {
        self.count = if v == 0 { 0x10000 } else { u32::from(v) };
        self.load_ns = now;
        self.null_count = false;
        self.next_irq = match self.mode {
            0 | 4 => Some(now + ticks_to_ns(u64::from(self.count), PIT_HZ)),
            2 | 3 => Some(now + ticks_to_ns(u64::from(self.count), PIT_HZ)),
            _ => None,
        };
    }
}

#[derive(Debug, Clone)]
pub struct Pit {
    ch: [Channel; 3],
    speaker: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    pub fn new() -> Self {
        let mut p = Pit {
            ch: Default::default(),
            speaker: false,
        };
        for c in p.ch.iter_mut() {
            c.count = 0x10000;
            c.rw = 3;
        }
        p.ch[0].gate = true;
        p.ch[1].gate = true;
        p
    }

    pub fn owns(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | 0x61)
    }

    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        if port == 0x61 {
            let refresh = (now / 15_085) & 1 != 0;
            let c2 = &self.ch[2];
            return u8::from(c2.gate)
                | u8::from(self.speaker) << 1
                | u8::from(refresh) << 4
                | u8::from(c2.out(now)) << 5;
        }
        if port == 0x43 {
            return 0xff;
        }
        let c = &mut self.ch[usize::from(port - 0x40)];
        if let Some(s) = c.status.take() {
            return s;
        }
        if let Some(l) = c.latched {
            let b = if c.rw == 3 {
                let hi = c.latch_hi_next;
                c.latch_hi_next = !hi;
                if hi {
                    c.latched = None;
                }
                if hi { (l >> 8) as u8 } else { l as u8 }
            } else {
                c.latched = None;
                if c.rw == 2 { (l >> 8) as u8 } else { l as u8 }
            };
            return b;
        }
        let v = c.get_count(now);
        match c.rw {
            1 => v as u8,
            2 => (v >> 8) as u8,
            _ => {
                let hi = c.read_hi_next;
                c.read_hi_next = !hi;
                if hi { (v >> 8) as u8 } else { v as u8 }
            }
        }
    }

    pub fn write(&mut self, port: u16, v: u8, now: u64) {
        match port {
            0x61 => {
                self.speaker = v & 2 != 0;
                self.set_gate(2, v & 1 != 0, now);
            }
            0x43 => {
                let sel = v >> 6;
                if sel == 3 {
                    // Read-back: bit 5 clear = latch count, bit 4 clear = latch status.
                    for n in 0..3 {
                        if v & (2 << n) == 0 {
                            continue;
                        }
                        let c = &mut self.ch[n];
                        if v & 0x20 == 0 && c.latched.is_none() {
                            c.latched = Some(c.get_count(now));
                            c.latch_hi_next = false;
                        }
                        if v & 0x10 == 0 && c.status.is_none() {
                            c.status = Some(
                                u8::from(c.out(now)) << 7
                                    | u8::from(c.null_count) << 6
                                    | c.rw << 4
                                    | c.mode << 1
                                    | u8::from(c.bcd),
                            );
                        }
                    }
                    return;
                }
                let c = &mut self.ch[usize::from(sel)];
                let rw = (v >> 4) & 3;
                if rw == 0 {
                    if c.latched.is_none() {
                        c.latched = Some(c.get_count(now));
                        c.latch_hi_next = false;
                    }
                } else {
                    c.rw = rw;
                    let mode = (v >> 1) & 7;
                    c.mode = if mode >= 6 { mode - 4 } else { mode };
                    c.bcd = v & 1 != 0;
                    c.read_hi_next = false;
                    c.write_hi_next = false;
                    c.null_count = true;
                    c.next_irq = None;
                }
            }
            _ => {
                let c = &mut self.ch[usize::from(port - 0x40)];
                match c.rw {
                    1 => c.load(u16::from(v), now),
                    2 => c.load(u16::from(v) << 8, now),
                    _ => {
                        if c.write_hi_next {
                            c.write_hi_next = false;
                            c.load(u16::from(c.write_lo) | u16::from(v) << 8, now);
                        } else {
                            c.write_lo = v;
                            c.write_hi_next = true;
                        }
                    }
                }
            }
        }
    }

    fn set_gate(&mut self, n: usize, gate: bool, now: u64) {
        let c = &mut self.ch[n];
        if !c.gate && gate && matches!(c.mode, 1 | 2 | 3 | 5) {
            c.load_ns = now;
        }
        c.gate = gate;
    }

    /// When channel 0 next raises IRQ0.
    pub fn next_irq(&self) -> Option<u64> {
        self.ch[0].next_irq
    }

    /// Channel 0 reached its deadline at `now`: true if IRQ0 pulses.
    pub fn fire(&mut self, now: u64) -> bool {
        let c = &mut self.ch[0];
        let Some(t) = c.next_irq else {
            return false;
        };
        if t > now {
            return false;
        }
        c.next_irq = match c.mode {
            2 | 3 => {
                let period = ticks_to_ns(u64::from(c.count), PIT_HZ).max(1);
                Some(t + ((now - t) / period + 1) * period)
            }
            _ => None,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel2_counts_down_and_raises_out_in_mode0() {
        let mut p = Pit::new();
        p.write(0x61, 1, 0); // gate on
        p.write(0x43, 0xb0, 0); // ch2, lo/hi, mode 0
        p.write(0x42, 0xff, 0);
        p.write(0x42, 0xff, 0);
        let ms = 1_000_000;
        let lo = p.read(0x42, ms);
        let hi = p.read(0x42, ms);
        let count = u16::from(lo) | u16::from(hi) << 8;
        assert_eq!(0xffff - count, 1193, "1 ms is 1193 PIT ticks");
        assert_eq!(p.read(0x61, ms) & 0x20, 0, "out low while counting");
        assert_ne!(
            p.read(0x61, 60 * ms) & 0x20,
            0,
            "out high after 0xffff ticks"
        );
    }

    #[test]
    fn latched_count_is_stable() {
        let mut p = Pit::new();
        p.write(0x43, 0x34, 0); // ch0 lo/hi mode 2
        p.write(0x40, 0x00, 0);
        p.write(0x40, 0x10, 0);
        p.write(0x43, 0x00, 1000);
        let a = u16::from(p.read(0x40, 1000)) | u16::from(p.read(0x40, 9000)) << 8;
        assert_eq!(a, 0x1000 - 1);
        assert_eq!(p.next_irq(), Some(ticks_to_ns(0x1000, PIT_HZ)));
    }
}
