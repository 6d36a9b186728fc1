//! The IOAPIC at 0xfec00000 (version 0x20: it has the EOI register):
//! 24 redirection entries, edge and level triggering with remote IRR, EOI
//! from the LAPICs' broadcast or the EOI register. Polarity is ignored, as
//! KVM does: lines are reported as asserted/deasserted.
//!
//! Delivery goes through a callback that says whether some LAPIC accepted
//! the message: remote IRR is only set then (as KVM), so a level interrupt
//! sent to nobody (e.g. a software-disabled APIC) cannot wedge its line.

use super::lapic::Msg;

pub const PINS: usize = 24;

/// Version 0x20 (the EOI register exists), 24 entries (max index 23).
const VERSION: u32 = 0x0017_0020;

#[derive(Debug, Clone)]
pub struct Ioapic {
    id: u32,
    index: u32,
    redir: [u64; PINS],
    /// Current line levels.
    level: u32,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;

/// Sends a message on the APIC bus; true if some LAPIC accepted it.
pub type Deliver<'a> = &'a mut dyn FnMut(Msg) -> bool;

impl Ioapic {
    pub fn new() -> Self {
        Ioapic {
            id: 0,
            index: 0,
            redir: [MASKED; PINS],
            level: 0,
        }
    }

    fn msg(&self, pin: usize) -> Msg {
        let e = self.redir[pin];
        Msg {
            vector: e as u8,
            level_triggered: e & LEVEL != 0,
            delivery: ((e >> 8) & 7) as u8,
            logical: e & (1 << 11) != 0,
            level: true,
            dest: (e >> 56) as u32,
            shorthand: 0,
        }
    }

    fn asserted(&self, pin: usize) -> bool {
        self.level & (1 << pin) != 0
    }

    /// A level-triggered pin that is asserted, unmasked and not waiting
    /// for its EOI sends its message (and waits for the EOI if accepted).
    fn service_level(&mut self, pin: usize, deliver: Deliver) {
        let e = self.redir[pin];
        if e & LEVEL != 0 && e & (MASKED | REMOTE_IRR) == 0 && self.asserted(pin) {
            let m = self.msg(pin);
            if deliver(m) {
                self.redir[pin] |= REMOTE_IRR;
            }
        }
    }

    /// Sets line `pin`. An edge entry sends on the rising edge only (two
    /// edges before the CPU takes the vector coalesce in the LAPIC's IRR);
    /// a masked edge is lost. A level entry sends while asserted.
    pub fn set_irq(&mut self, pin: usize, high: bool, deliver: Deliver) {
        if pin >= PINS {
            return;
        }
        let was = self.asserted(pin);
        if high {
            self.level |= 1 << pin;
        } else {
            self.level &= !(1 << pin);
        }
        let e = self.redir[pin];
        if e & LEVEL != 0 {
            self.service_level(pin, deliver);
        } else if high && !was && e & MASKED == 0 {
            deliver(self.msg(pin));
        }
    }

    /// A LAPIC broadcast the EOI of level-triggered `vector` (or the guest
    /// wrote it to the EOI register): clears remote IRR of the entries with
    /// that vector and resends for lines still asserted.
    pub fn eoi(&mut self, vector: u8, deliver: Deliver) {
        for pin in 0..PINS {
            let e = self.redir[pin];
            if e as u8 == vector && e & REMOTE_IRR != 0 {
                self.redir[pin] &= !REMOTE_IRR;
                self.service_level(pin, deliver);
            }
        }
    }

    /// MMIO read at `off` in the IOAPIC page.
    pub fn read(&self, off: u64) -> u32 {
        match off {
            0x00 => self.index,
            0x10 => match self.index {
                0 => self.id << 24,
                1 => VERSION,
                2 => self.id << 24,
                i @ 0x10..=0x3f => {
                    let e = self.redir[((i - 0x10) / 2) as usize];
                    if i & 1 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// MMIO write. Unmasking (or switching to level) an asserted level
    /// line sends its message.
    pub fn write(&mut self, off: u64, v: u32, deliver: Deliver) {
        match off {
            0x00 => self.index = v & 0xff,
            0x10 => match self.index {
                0 => self.id = (v >> 24) & 0xf,
                i @ 0x10..=0x3f => {
                    let pin = ((i - 0x10) / 2) as usize;
                    let e = self.redir[pin];
                    let read_only = REMOTE_IRR | DELIVERY_STATUS;
                    self.redir[pin] = if i & 1 == 0 {
                        (e & !0xffff_ffff) | (u64::from(v) & !read_only) | (e & read_only)
                    } else {
                        (e & 0xffff_ffff) | (u64::from(v) << 32)
                    };
                    if self.redir[pin] & LEVEL == 0 {
                        self.redir[pin] &= !REMOTE_IRR;
                    } else {
                        self.service_level(pin, deliver);
                    }
                }
                _ => {}
            },
            0x40 => self.eoi(v as u8, deliver),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut Ioapic, pin: u32, lo: u32) {
        io.write(0, 0x10 + 2 * pin, &mut |_| true);
        io.write(0x10, lo, &mut |_| true);
    }

    /// Runs `f` with a delivery callback that records vectors and accepts.
    fn sent(f: impl FnOnce(Deliver)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut |m| {
            out.push(m.vector);
            true
        });
        out
    }

    #[test]
    fn level_line_redelivers_after_eoi_while_asserted() {
        let mut io = Ioapic::new();
        program(&mut io, 5, 0x8000 | 0x35);
        assert_eq!(sent(|d| io.set_irq(5, true, d)), [0x35]);
        assert!(
            sent(|d| io.set_irq(5, true, d)).is_empty(),
            "remote IRR holds it"
        );
        assert_eq!(sent(|d| io.eoi(0x35, d)), [0x35], "still asserted: again");
        io.set_irq(5, false, &mut |_| true);
        assert!(sent(|d| io.eoi(0x35, d)).is_empty());
        assert_eq!(io.redir[5] & REMOTE_IRR, 0);
    }

    #[test]
    fn level_message_nobody_accepts_leaves_remote_irr_clear() {
        let mut io = Ioapic::new();
        program(&mut io, 3, 0x8000 | 0x33);
        io.set_irq(3, true, &mut |_| false);
        assert_eq!(io.redir[3] & REMOTE_IRR, 0);
        // Reprogramming the entry while the line is high sends again.
        assert_eq!(sent(|d| program_with(&mut io, 3, 0x8000 | 0x34, d)), [0x34]);
        assert_ne!(io.redir[3] & REMOTE_IRR, 0);
    }

    fn program_with(io: &mut Ioapic, pin: u32, lo: u32, d: Deliver) {
        io.write(0, 0x10 + 2 * pin, d);
        io.write(0x10, lo, d);
    }

    #[test]
    fn masked_edge_is_dropped() {
        let mut io = Ioapic::new();
        assert!(sent(|d| io.set_irq(1, true, d)).is_empty());
        program(&mut io, 1, 0x31);
        io.set_irq(1, false, &mut |_| true);
        assert_eq!(sent(|d| io.set_irq(1, true, d)), [0x31]);
    }
}
