//! The IOAPIC at 0xfec00000: 24 redirection entries, edge and level
//! triggering with remote IRR, EOI from the LAPICs (polarity is ignored,
//! as KVM does: lines are reported as asserted/deasserted).

use super::lapic::Msg;

pub const PINS: usize = 24;

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
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;

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
            delivery: ((e >> 8) & 7) as u8,
            logical: e & (1 << 11) != 0,
            level: true,
            dest: (e >> 56) as u32,
            shorthand: 0,
        }
    }

    /// Sets line `pin`; returns a message to deliver if one is due.
    pub fn set_irq(&mut self, pin: usize, high: bool) -> Option<Msg> {
        if pin >= PINS {
            return None;
        }
        let m = 1u32 << pin;
        let was = self.level & m != 0;
        if high {
            self.level |= m;
        } else {
            self.level &= !m;
        }
        let e = self.redir[pin];
        if !high || e & MASKED != 0 {
            return None;
        }
        if e & LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return None;
            }
            self.redir[pin] |= REMOTE_IRR;
            Some(self.msg(pin))
        } else if !was {
            Some(self.msg(pin))
        } else {
            None
        }
    }

    /// A LAPIC retired level-triggered `vector`: clears remote IRR and
    /// returns messages for lines still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        for pin in 0..PINS {
            let e = self.redir[pin];
            if e as u8 == vector && e & LEVEL != 0 && e & REMOTE_IRR != 0 {
                self.redir[pin] &= !REMOTE_IRR;
                if self.level & (1 << pin) != 0 && e & MASKED == 0 {
                    self.redir[pin] |= REMOTE_IRR;
                    out.push(self.msg(pin));
                }
            }
        }
        out
    }

    /// MMIO read at `off` in the IOAPIC page.
    pub fn read(&self, off: u64) -> u32 {
        match off {
            0x00 => self.index,
            0x10 => match self.index {
                0 => self.id << 24,
                1 => 0x0017_0011,
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

    /// MMIO write; may return messages (unmasking an asserted level line).
    pub fn write(&mut self, off: u64, v: u32) -> Vec<Msg> {
        match off {
            0x00 => self.index = v & 0xff,
            0x10 => match self.index {
                0 => self.id = (v >> 24) & 0xf,
                i @ 0x10..=0x3f => {
                    let pin = ((i - 0x10) / 2) as usize;
                    let e = self.redir[pin];
                    let ro = e & (REMOTE_IRR | (1 << 12));
                    self.redir[pin] = if i & 1 == 0 {
                        (e & !0xffff_ffff) | u64::from(v & !(REMOTE_IRR as u32 | 1 << 12)) | ro
                    } else {
                        (e & 0xffff_ffff) | (u64::from(v) << 32)
                    };
                    let e = self.redir[pin];
                    if e & LEVEL == 0 {
                        self.redir[pin] &= !REMOTE_IRR;
                    } else if e & MASKED == 0 && e & REMOTE_IRR == 0 && self.level & (1 << pin) != 0
                    {
                        self.redir[pin] |= REMOTE_IRR;
                        return vec![self.msg(pin)];
                    }
                }
                _ => {}
            },
            0x40 => return self.eoi(v as u8),
            _ => {}
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut Ioapic, pin: u32, lo: u32) {
        io.write(0, 0x10 + 2 * pin);
        io.write(0x10, lo);
    }

    #[test]
    fn level_line_redelivers_after_eoi_while_asserted() {
        let mut io = Ioapic::new();
        program(&mut io, 5, 0x8000 | 0x35);
        assert_eq!(io.set_irq(5, true).map(|m| m.vector), Some(0x35));
        assert_eq!(io.set_irq(5, true), None, "remote IRR holds it");
        assert_eq!(io.eoi(0x35).len(), 1, "still asserted: again");
        io.set_irq(5, false);
        assert!(io.eoi(0x35).is_empty());
    }

    #[test]
    fn masked_edge_is_dropped() {
        let mut io = Ioapic::new();
        assert_eq!(io.set_irq(1, true), None);
        program(&mut io, 1, 0x31);
        io.set_irq(1, false);
        assert_eq!(io.set_irq(1, true).map(|m| m.vector), Some(0x31));
    }
}
