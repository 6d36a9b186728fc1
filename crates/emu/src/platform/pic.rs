//! The 8259A PIC pair (master 0x20/0x21 cascading the slave 0xa0/0xa1 on
//! IRQ2) with the ELCR edge/level registers at 0x4d0/0x4d1.

#[derive(Debug, Clone, Default)]
struct Chip {
    irr: u8,
    imr: u8,
    isr: u8,
    /// Line levels as last seen (edge detection).
    last: u8,
    priority_add: u8,
    base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init_state: u8,
    init4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    elcr: u8,
    elcr_mask: u8,
}

impl Chip {
    fn set_irq(&mut self, irq: u8, level: bool) {
        let m = 1u8 << irq;
        if self.elcr & m != 0 {
            if level {
                self.irr |= m;
                self.last |= m;
            } else {
                self.irr &= !m;
                self.last &= !m;
            }
        } else if level {
            if self.last & m == 0 {
                self.irr |= m;
            }
            self.last |= m;
        } else {
            self.last &= !m;
        }
    }

    /// Lowest-numbered priority in `mask` (8 = none).
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The IRQ this chip would raise, if any.
    fn get_irq(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut isr = self.isr;
        if self.special_mask {
            isr &= !self.imr;
        }
        let cur = self.priority(isr);
        (p < cur).then_some((p + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        let m = 1 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= m;
        }
        if self.elcr & m == 0 {
            self.irr &= !m;
        }
    }

    fn reset(&mut self) {
        let (elcr, elcr_mask) = (self.elcr, self.elcr_mask);
        *self = Chip {
            elcr,
            elcr_mask,
            ..Chip::default()
        };
    }

    fn write(&mut self, port: u16, v: u8) {
        if port & 1 == 0 {
            if v & 0x10 != 0 {
                self.reset();
                self.init_state = 1;
                self.init4 = v & 1 != 0;
                self.single = v & 2 != 0;
            } else if v & 0x08 != 0 {
                if v & 0x04 != 0 {
                    self.poll = true;
                }
                if v & 0x02 != 0 {
                    self.read_isr = v & 1 != 0;
                }
                if v & 0x40 != 0 {
                    self.special_mask = v & 0x20 != 0;
                }
            } else {
                match v >> 5 {
                    0 | 4 => self.rotate_on_auto_eoi = v >> 5 != 0,
                    1 | 5 => {
                        let p = self.priority(self.isr);
                        if p != 8 {
                            let irq = (p + self.priority_add) & 7;
                            self.isr &= !(1 << irq);
                            if v >> 5 == 5 {
                                self.priority_add = (irq + 1) & 7;
                            }
                        }
                    }
                    3 => self.isr &= !(1 << (v & 7)),
                    6 => self.priority_add = (v + 1) & 7,
                    7 => {
                        let irq = v & 7;
                        self.isr &= !(1 << irq);
                        self.priority_add = (irq + 1) & 7;
                    }
                    _ => {}
                }
            }
        } else {
            match self.init_state {
                0 => self.imr = v,
                1 => {
                    self.base = v & 0xf8;
                    self.init_state = if self.single {
                        if self.init4 { 3 } else { 0 }
                    } else {
                        2
                    };
                }
                2 => self.init_state = if self.init4 { 3 } else { 0 },
                _ => {
                    self.auto_eoi = v & 2 != 0;
                    self.init_state = 0;
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        let mut p = Pic {
            chips: [Chip::default(), Chip::default()],
        };
        p.chips[0].elcr_mask = 0xf8;
        p.chips[1].elcr_mask = 0xde;
        // Masked until the guest programs it (there is no BIOS to do so):
        // an unprogrammed 8259 would otherwise turn ISA lines into
        // vectors 0-15 on the BSP's ExtINT input.
        p.chips[0].imr = 0xff;
        p.chips[1].imr = 0xff;
        p
    }

    fn update_cascade(&mut self) {
        let slave = self.chips[1].get_irq().is_some();
        self.chips[0].set_irq(2, slave);
    }

    /// Drives ISA IRQ `irq` (0..15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq >= 8 {
            self.chips[1].set_irq(irq - 8, level);
            self.update_cascade();
        } else {
            self.chips[0].set_irq(irq, level);
        }
    }

    /// The INTR output: an interrupt is waiting for acknowledgement.
    pub fn output(&self) -> bool {
        self.chips[0].get_irq().is_some()
    }

    /// INTA: the vector of the highest-priority request (spurious IRQ7/15
    /// if it vanished).
    pub fn ack(&mut self) -> u8 {
        let v = match self.chips[0].get_irq() {
            Some(2) => {
                self.chips[0].intack(2);
                match self.chips[1].get_irq() {
                    Some(s) => {
                        self.chips[1].intack(s);
                        self.chips[1].base + s
                    }
                    None => self.chips[1].base + 7,
                }
            }
            Some(irq) => {
                self.chips[0].intack(irq);
                self.chips[0].base + irq
            }
            None => self.chips[0].base + 7,
        };
        self.update_cascade();
        v
    }

    pub fn owns(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1)
    }

    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            0x4d0 | 0x4d1 => self.chips[usize::from(port & 1)].elcr,
            _ => {
                let c = usize::from(port >= 0xa0);
                if self.chips[c].poll {
                    self.chips[c].poll = false;
                    return match self.chips[c].get_irq() {
                        Some(irq) => {
                            self.chips[c].intack(irq);
                            self.update_cascade();
                            0x80 | irq
                        }
                        None => 0,
                    };
                }
                let chip = &self.chips[c];
                if port & 1 == 1 {
                    chip.imr
                } else if chip.read_isr {
                    chip.isr
                } else {
                    chip.irr
                }
            }
        }
    }

    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x4d0 | 0x4d1 => {
                let c = &mut self.chips[usize::from(port & 1)];
                c.elcr = v & c.elcr_mask;
            }
            _ => {
                let c = usize::from(port >= 0xa0);
                self.chips[c].write(port, v);
                self.update_cascade();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut Pic) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 2),
            (0xa1, 1),
        ] {
            p.write(port, v);
        }
        p.write(0x21, 0);
        p.write(0xa1, 0);
    }

    #[test]
    fn edge_irq_delivers_remapped_vector_and_eoi_clears_isr() {
        let mut p = Pic::new();
        init(&mut p);
        p.set_irq(1, true);
        assert!(p.output());
        assert_eq!(p.ack(), 0x21);
        assert!(!p.output());
        p.set_irq(1, false);
        p.set_irq(1, true);
        assert!(!p.output(), "IRQ1 in service blocks itself");
        p.write(0x20, 0x20);
        assert!(p.output());
    }

    #[test]
    fn slave_irq_cascades_through_irq2() {
        let mut p = Pic::new();
        init(&mut p);
        p.set_irq(12, true);
        assert_eq!(p.ack(), 0x2c);
    }

    #[test]
    fn masked_irq_stays_pending() {
        let mut p = Pic::new();
        init(&mut p);
        p.write(0x21, 0x01);
        p.set_irq(0, true);
        assert!(!p.output());
        p.write(0x21, 0);
        assert_eq!(p.ack(), 0x20);
    }
}
