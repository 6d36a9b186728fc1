//! The local APIC of one vCPU: xAPIC registers (MMIO page) and x2APIC
//! (MSRs 0x800+), the IA32_APIC_BASE mode transitions between them (SDM
//! vol. 3 "x2APIC State Transitions"), priorities, EOI (with the
//! suppress-EOI-broadcast of directed EOI), the timer (one-shot, periodic,
//! TSC-deadline) and the ICR that sends IPIs.

use super::clock::{CRYSTAL_HZ, Clock, ns_to_ticks, ticks_to_ns};

pub const APIC_BASE_DEFAULT: u64 = 0xfee0_0000;
pub const BASE_BSP: u64 = 1 << 8;
pub const BASE_EXTD: u64 = 1 << 10;
pub const BASE_EN: u64 = 1 << 11;

/// Bits of IA32_APIC_BASE a guest may set (BSP is kept, not written).
fn base_writable() -> u64 {
    let phys = (1u64 << crate::mem::paging::PHYS_BITS) - 1;
    (phys & !0xfff) | BASE_EN | BASE_EXTD | BASE_BSP
}

/// Version register: version 0x14, six LVT entries (max LVT 5), and bit 24:
/// EOI-broadcast suppression (directed EOI) is supported — the IOAPIC has
/// the EOI register a guest then needs (its version is 0x20).
const VERSION: u32 = 0x0105_0014;
/// SVR bit 12: a level-triggered EOI is not broadcast to the IOAPIC.
const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;

/// The mode IA32_APIC_BASE selects (EN, EXTD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disabled,
    XApic,
    X2Apic,
}

impl Mode {
    /// None for the invalid EXTD without EN.
    fn of(base: u64) -> Option<Mode> {
        match (base & BASE_EN != 0, base & BASE_EXTD != 0) {
            (false, false) => Some(Mode::Disabled),
            (true, false) => Some(Mode::XApic),
            (true, true) => Some(Mode::X2Apic),
            (false, true) => None,
        }
    }
}

/// A refused register access or IA32_APIC_BASE value: #GP(0) for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

const LVT_MASKED: u32 = 1 << 16;
const LVT_CMCI: usize = 0;
pub const LVT_TIMER: usize = 1;
const LVT_THERMAL: usize = 2;
const LVT_PERF: usize = 3;
pub const LVT_LINT0: usize = 4;
const LVT_LINT1: usize = 5;
const LVT_ERROR: usize = 6;

/// An interrupt message on the APIC bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub vector: u8,
    /// Trigger mode: level (the LAPIC sets TMR and broadcasts the EOI).
    pub level_triggered: bool,
    /// 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 6 SIPI, 7 ExtINT.
    pub delivery: u8,
    pub logical: bool,
    /// Level assert (ICR bit 14); an INIT with it clear is a de-assert.
    pub level: bool,
    pub dest: u32,
    /// 0 none, 1 self, 2 all including self, 3 all excluding self.
    pub shorthand: u8,
}

/// What the ICR write asks the platform to do.
pub type Ipi = Msg;

#[derive(Debug, Clone)]
pub struct Lapic {
    /// The initial APIC ID (the vCPU index): the x2APIC ID, read-only.
    pub id: u32,
    /// The xAPIC ID register (software may write it in xAPIC mode).
    xapic_id: u8,
    pub base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    esr: u32,
    icr_lo: u32,
    icr_hi: u32,
    pub lvt: [u32; 7],
    irr: [u32; 8],
    isr: [u32; 8],
    tmr: [u32; 8],
    initial: u32,
    divide: u32,
    /// When the current count was loaded (ns since VM creation).
    start_ns: u64,
    /// Next timer expiry (ns since VM creation), if armed.
    pub deadline_ns: Option<u64>,
    /// TSC-deadline MSR value (guest TSC units), 0 = disarmed.
    pub tsc_deadline: u64,
}

fn bit(v: u8) -> (usize, u32) {
    (usize::from(v >> 5), 1u32 << (v & 31))
}

fn highest(r: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| r[i] != 0)
        .map(|i| (i * 32 + 31 - r[i].leading_zeros() as usize) as u8)
}

impl Lapic {
    pub fn new(id: u32) -> Self {
        let mut l = Lapic {
            id,
            xapic_id: id as u8,
            base: APIC_BASE_DEFAULT | BASE_EN | if id == 0 { BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            esr: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; 7],
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            initial: 0,
            divide: 0,
            start_ns: 0,
            deadline_ns: None,
            tsc_deadline: 0,
        };
        if id == 0 {
            // As KVM: the BSP's LINT0 is ExtINT so the 8259 reaches it.
            l.lvt[LVT_LINT0] = 7 << 8;
        }
        l
    }

    pub fn x2apic(&self) -> bool {
        self.base & BASE_EXTD != 0
    }

    pub fn mode(&self) -> Mode {
        Mode::of(self.base).unwrap_or(Mode::Disabled)
    }

    /// WRMSR IA32_APIC_BASE. Refuses reserved bits, EXTD without EN and the
    /// transitions the SDM forbids (x2APIC → xAPIC, disabled → x2APIC: both
    /// must go through disabled / xAPIC). Disabling puts the APIC in its
    /// power-on state (pending and in-service interrupts, the timer and
    /// every register but the base are lost); entering x2APIC mode makes
    /// the ID the initial one and the LDR the one derived from it.
    pub fn set_base(&mut self, v: u64) -> Result<(), Refused> {
        if v & !base_writable() != 0 {
            return Err(Refused);
        }
        let to = Mode::of(v).ok_or(Refused)?;
        let from = self.mode();
        match (from, to) {
            (Mode::X2Apic, Mode::XApic) | (Mode::Disabled, Mode::X2Apic) => return Err(Refused),
            _ => {}
        }
        let base = (self.base & BASE_BSP) | (v & !BASE_BSP);
        if to == Mode::Disabled && from != Mode::Disabled {
            *self = Lapic::new(self.id);
        }
        self.base = base;
        Ok(())
    }
    pub fn hw_enabled(&self) -> bool {
        self.base & BASE_EN != 0
    }
    pub fn sw_enabled(&self) -> bool {
        self.svr & 0x100 != 0
    }
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }
    pub fn set_tpr(&mut self, v: u8) {
        self.tpr = u32::from(v);
    }

    fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if (self.tpr >> 4) >= (isrv >> 4) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// Accepts a fixed interrupt; false if the APIC drops it.
    /// A level-triggered one sets its TMR bit, so that its EOI is
    /// broadcast to the IOAPIC.
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.hw_enabled() || !self.sw_enabled() || vector < 16 {
            if vector < 16 {
                self.esr |= 1 << 6;
            }
            return false;
        }
        let (i, m) = bit(vector);
        self.irr[i] |= m;
        if level_triggered {
            self.tmr[i] |= m;
        } else {
            self.tmr[i] &= !m;
        }
        true
    }

    /// The vector to deliver now, if any (IRR above PPR).
    pub fn pending(&self) -> Option<u8> {
        let v = highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The CPU takes `pending()`: IRR → ISR.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending()?;
        let (i, m) = bit(v);
        self.irr[i] &= !m;
        self.isr[i] |= m;
        Some(v)
    }

    /// EOI: retires the highest in-service vector; returns it if it was
    /// level-triggered and the broadcast is not suppressed (then the IOAPIC
    /// must hear about it; with suppression the guest uses the IOAPIC's
    /// EOI register).
    fn eoi(&mut self) -> Option<u8> {
        let v = highest(&self.isr)?;
        let (i, m) = bit(v);
        self.isr[i] &= !m;
        (self.tmr[i] & m != 0 && self.svr & SVR_SUPPRESS_EOI_BROADCAST == 0).then_some(v)
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> 17) & 3
    }

    fn divisor(&self) -> u64 {
        let d = (self.divide & 3) | ((self.divide >> 1) & 4);
        if d == 7 { 1 } else { 2 << d }
    }

    fn current_count(&self, now: u64) -> u32 {
        if self.initial == 0 || self.timer_mode() == 2 {
            return 0;
        }
        let ticks = ns_to_ticks(now.saturating_sub(self.start_ns), CRYSTAL_HZ) / self.divisor();
        let init = u64::from(self.initial);
        match self.timer_mode() {
            1 => (init - ticks % init) as u32,
            _ => init.saturating_sub(ticks) as u32,
        }
    }

    fn arm(&mut self, now: u64) {
        self.start_ns = now;
        self.deadline_ns = if self.initial != 0 && self.timer_mode() != 2 {
            Some(now + ticks_to_ns(u64::from(self.initial) * self.divisor(), CRYSTAL_HZ))
        } else {
            None
        };
    }

    /// Arms the TSC-deadline timer; `tsc_offset` maps guest TSC to host time.
    pub fn set_tsc_deadline(&mut self, v: u64, tsc_offset: i64) {
        self.tsc_deadline = v;
        if self.timer_mode() != 2 {
            return;
        }
        self.deadline_ns =
            (v != 0).then(|| Clock::tsc_to_ns((v as i64).wrapping_sub(tsc_offset).max(0) as u64));
    }

    /// The timer fired at `now`: raises its vector (unless masked) and
    /// re-arms a periodic timer. True if an interrupt became pending.
    pub fn timer_fire(&mut self, now: u64) -> bool {
        let Some(dl) = self.deadline_ns else {
            return false;
        };
        if dl > now {
            return false;
        }
        match self.timer_mode() {
            1 => {
                let period =
                    ticks_to_ns(u64::from(self.initial) * self.divisor(), CRYSTAL_HZ).max(1000);
                let missed = (now - dl) / period;
                self.deadline_ns = Some(dl + (missed + 1) * period);
            }
            2 => {
                self.deadline_ns = None;
                self.tsc_deadline = 0;
            }
            _ => self.deadline_ns = None,
        }
        let lvt = self.lvt[LVT_TIMER];
        lvt & LVT_MASKED == 0 && self.accept(lvt as u8, false)
    }

    /// Reads register `reg` (the xAPIC offset >> 4).
    pub fn read(&self, reg: u32, now: u64) -> u32 {
        match reg {
            0x2 => {
                if self.x2apic() {
                    self.id
                } else {
                    u32::from(self.xapic_id) << 24
                }
            }
            0x3 => VERSION,
            0x8 => self.tpr,
            0x9 => 0,
            0xa => self.ppr(),
            0xd => {
                if self.x2apic() {
                    ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
                } else {
                    self.ldr
                }
            }
            0xe => {
                if self.x2apic() {
                    0
                } else {
                    self.dfr
                }
            }
            0xf => self.svr,
            0x10..=0x17 => self.isr[(reg - 0x10) as usize],
            0x18..=0x1f => self.tmr[(reg - 0x18) as usize],
            0x20..=0x27 => self.irr[(reg - 0x20) as usize],
            0x28 => self.esr,
            0x2f => self.lvt[LVT_CMCI],
            0x30 => self.icr_lo,
            0x31 => self.icr_hi,
            0x32 => self.lvt[LVT_TIMER],
            0x33 => self.lvt[LVT_THERMAL],
            0x34 => self.lvt[LVT_PERF],
            0x35 => self.lvt[LVT_LINT0],
            0x36 => self.lvt[LVT_LINT1],
            0x37 => self.lvt[LVT_ERROR],
            0x38 => self.initial,
            0x39 => self.current_count(now),
            0x3e => self.divide,
            _ => 0,
        }
    }

    /// RDMSR of x2APIC register `reg` (MSR 0x800 + reg). Refused outside
    /// x2APIC mode, for registers x2APIC does not have (DFR 0x80e, ICR high
    /// 0x831, the reserved ones) and for the write-only EOI and SELF IPI.
    pub fn x2apic_read(&self, reg: u32, now: u64) -> Result<u64, Refused> {
        if !self.x2apic() {
            return Err(Refused);
        }
        match reg {
            0x30 => Ok(u64::from(self.icr_lo) | u64::from(self.icr_hi) << 32),
            0x2 | 0x3 | 0x8 | 0xa | 0xd | 0xf | 0x10..=0x28 | 0x2f | 0x32..=0x39 | 0x3e => {
                Ok(u64::from(self.read(reg, now)))
            }
            _ => Err(Refused),
        }
    }

    /// The bits an x2APIC WRMSR may set in `reg`; None for registers that
    /// cannot be written (read-only or absent). Reserved bits are RsvdZ:
    /// setting one is #GP, as is any bit of the upper half but the ICR's.
    fn x2apic_writable(reg: u32) -> Option<u64> {
        const LVT: u64 = 0x1_17ff; // vector, delivery mode, status, mask
        Some(match reg {
            0x8 => 0xff,
            0xb | 0x28 => 0, // EOI and ESR: only zero may be written
            0xf => 0x3ff | u64::from(SVR_SUPPRESS_EOI_BROADCAST),
            0x2f | 0x33 | 0x34 => LVT,
            0x32 => 0x7_10ff,            // vector, status, mask, timer mode
            0x35 | 0x36 => LVT | 0xe000, // + polarity, remote IRR, trigger
            0x37 => 0x1_10ff,
            0x38 => 0xffff_ffff,
            0x3e => 0xb,
            0x3f => 0xff,
            // Vector, delivery, destination mode, level, trigger,
            // shorthand, destination: KVM's X2APIC_ICR_RESERVED_BITS.
            0x30 => !(0xfff0_0000 | 0x3_0000 | 1 << 13),
            _ => return None,
        })
    }

    /// Checks a WRMSR of x2APIC register `reg`; the write itself goes
    /// through [`Lapic::write`] (or the 64-bit ICR path).
    pub fn x2apic_write_ok(&self, reg: u32, v: u64) -> Result<(), Refused> {
        let writable = Self::x2apic_writable(reg).ok_or(Refused)?;
        if !self.x2apic() || v & !writable != 0 {
            return Err(Refused);
        }
        Ok(())
    }

    /// Writes register `reg`. Returns an IPI to send, and whether an EOI
    /// retired a level-triggered vector.
    pub fn write(&mut self, reg: u32, v: u32, now: u64) -> (Option<Ipi>, Option<u8>) {
        match reg {
            0x2 if !self.x2apic() => self.xapic_id = (v >> 24) as u8,
            0x8 => self.tpr = v & 0xff,
            0xb => return (None, self.eoi()),
            0xd if !self.x2apic() => self.ldr = v & 0xff00_0000,
            0xe if !self.x2apic() => self.dfr = v | 0x0fff_ffff,
            0xf => {
                self.svr = v & (0x3ff | SVR_SUPPRESS_EOI_BROADCAST);
                if !self.sw_enabled() {
                    for l in self.lvt.iter_mut() {
                        *l |= LVT_MASKED;
                    }
                }
            }
            0x28 => self.esr = 0,
            0x2f | 0x32..=0x37 => {
                let idx = match reg {
                    0x2f => LVT_CMCI,
                    0x32 => LVT_TIMER,
                    0x33 => LVT_THERMAL,
                    0x34 => LVT_PERF,
                    0x35 => LVT_LINT0,
                    0x36 => LVT_LINT1,
                    _ => LVT_ERROR,
                };
                let mut v = v & 0x0007_17ff;
                if !self.sw_enabled() {
                    v |= LVT_MASKED;
                }
                let old_mode = self.timer_mode();
                self.lvt[idx] = v;
                if idx == LVT_TIMER && self.timer_mode() != old_mode {
                    self.deadline_ns = None;
                    self.tsc_deadline = 0;
                    if self.timer_mode() != 2 {
                        self.arm(now);
                    }
                }
            }
            0x30 => {
                self.icr_lo = v & !(1 << 12);
                let dest = if self.x2apic() {
                    self.icr_hi
                } else {
                    self.icr_hi >> 24
                };
                return (
                    Some(Msg {
                        vector: v as u8,
                        level_triggered: v & (1 << 15) != 0,
                        delivery: ((v >> 8) & 7) as u8,
                        logical: v & (1 << 11) != 0,
                        level: v & (1 << 14) != 0,
                        dest,
                        shorthand: ((v >> 18) & 3) as u8,
                    }),
                    None,
                );
            }
            0x31 => self.icr_hi = v,
            0x38 if self.timer_mode() != 2 => {
                self.initial = v;
                self.arm(now);
            }
            0x3e => self.divide = v & 0xb,
            0x3f if self.x2apic() => {
                // x2APIC SELF IPI: a fixed, edge-triggered IPI to self.
                return (
                    Some(Msg {
                        vector: v as u8,
                        level_triggered: false,
                        delivery: 0,
                        logical: false,
                        level: true,
                        dest: self.id,
                        shorthand: 1,
                    }),
                    None,
                );
            }
            _ => {}
        }
        (None, None)
    }

    /// Whether this APIC is a destination of `dest` in the given mode.
    pub fn matches(&self, dest: u32, logical: bool) -> bool {
        if self.x2apic() {
            if !logical {
                return dest == 0xffff_ffff || dest == self.id;
            }
            let ldr = ((self.id >> 4) << 16) | (1 << (self.id & 0xf));
            return dest == 0xffff_ffff
                || ((dest >> 16) == (ldr >> 16) && dest & ldr & 0xffff != 0);
        }
        let dest = dest & 0xff;
        if !logical {
            return dest == 0xff || dest == u32::from(self.xapic_id);
        }
        if dest == 0xff {
            return true;
        }
        let ldr = self.ldr >> 24;
        if self.dfr >> 28 == 0xf {
            ldr & dest != 0
        } else {
            (ldr >> 4) == (dest >> 4) && ldr & dest & 0xf != 0
        }
    }

    /// INIT: registers back to their power-on values (ID and base kept).
    pub fn init_reset(&mut self) {
        let (id, xapic_id, base) = (self.id, self.xapic_id, self.base);
        *self = Lapic::new(id);
        self.base = base;
        self.xapic_id = xapic_id;
        if id != 0 {
            self.lvt[LVT_LINT0] = LVT_MASKED;
        }
    }

    /// LINT0 is unmasked ExtINT (or the APIC is off): the 8259 may interrupt.
    pub fn accepts_pic(&self) -> bool {
        !self.hw_enabled()
            || (self.lvt[LVT_LINT0] & LVT_MASKED == 0 && (self.lvt[LVT_LINT0] >> 8) & 7 == 7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> Lapic {
        let mut l = Lapic::new(0);
        l.write(0xf, 0x1ff, 0);
        l
    }

    #[test]
    fn priorities_gate_delivery_and_eoi_retires_in_order() {
        let mut l = enabled();
        assert!(l.accept(0x41, false));
        assert!(l.accept(0x82, true));
        assert_eq!(l.ack(), Some(0x82));
        assert_eq!(l.pending(), None, "0x41 is below the in-service 0x82");
        assert_eq!(
            l.write(0xb, 0, 0).1,
            Some(0x82),
            "level-triggered EOI is reported"
        );
        assert_eq!(l.ack(), Some(0x41));
        l.write(0x8, 0x50, 0);
        assert!(l.accept(0x45, false));
        assert_eq!(l.pending(), None, "TPR 0x50 blocks class 4");
    }

    #[test]
    fn one_shot_timer_fires_once_at_its_deadline() {
        let mut l = enabled();
        l.write(0x3e, 0xb, 0); // divide by 1
        l.write(0x32, 0x30, 0);
        l.write(0x38, 1000, 0); // 1000 ticks at 1 GHz = 1 µs
        assert_eq!(l.deadline_ns, Some(1000));
        assert!(!l.timer_fire(999));
        assert!(l.timer_fire(1000));
        assert_eq!(l.deadline_ns, None);
        assert_eq!(l.ack(), Some(0x30));
        assert_eq!(l.read(0x39, 5000), 0);
    }

    #[test]
    fn apic_base_transitions_are_the_sdms() {
        use Mode::*;
        let bits = |m: Mode| match m {
            Disabled => 0,
            XApic => BASE_EN,
            X2Apic => BASE_EN | BASE_EXTD,
        };
        for from in [Disabled, XApic, X2Apic] {
            for to in [Disabled, XApic, X2Apic] {
                let mut l = enabled();
                // Reach `from` the legal way round.
                for step in match from {
                    Disabled => &[Disabled][..],
                    XApic => &[][..],
                    X2Apic => &[X2Apic][..],
                } {
                    l.set_base(APIC_BASE_DEFAULT | bits(*step)).unwrap();
                }
                assert_eq!(l.mode(), from);
                let r = l.set_base(APIC_BASE_DEFAULT | bits(to));
                let legal = !matches!((from, to), (X2Apic, XApic) | (Disabled, X2Apic));
                assert_eq!(r.is_ok(), legal, "{from:?} -> {to:?}");
                assert_eq!(l.mode(), if legal { to } else { from });
            }
        }
        let mut l = enabled();
        assert_eq!(l.set_base(APIC_BASE_DEFAULT | BASE_EXTD), Err(Refused));
        assert_eq!(l.set_base(APIC_BASE_DEFAULT | BASE_EN | 1), Err(Refused));
        let too_high = 1u64 << crate::mem::paging::PHYS_BITS;
        assert_eq!(l.set_base(too_high | BASE_EN), Err(Refused));
        // BSP is read-only: kept on a write without it.
        l.set_base(0xfed0_0000 | BASE_EN).unwrap();
        assert_eq!(l.base, 0xfed0_0000 | BASE_EN | BASE_BSP);
    }

    #[test]
    fn disabling_resets_and_level_eoi_broadcast_follows_svr_bit_12() {
        let mut l = enabled();
        assert!(l.accept(0x80, true));
        assert_eq!(l.ack(), Some(0x80));
        assert_eq!(l.write(0xb, 0, 0).1, Some(0x80), "TMR set: broadcast");
        l.write(0xf, 0x11ff, 0);
        assert!(l.accept(0x80, true));
        assert_eq!(l.ack(), Some(0x80));
        assert_eq!(l.write(0xb, 0, 0).1, None, "suppressed");
        assert!(l.accept(0x90, false));
        l.set_base(APIC_BASE_DEFAULT).unwrap();
        l.set_base(APIC_BASE_DEFAULT | BASE_EN).unwrap();
        assert_eq!((l.read(0xf, 0), l.pending()), (0xff, None));
    }

    #[test]
    fn logical_flat_and_cluster_destinations() {
        let mut l = enabled();
        l.write(0xd, 0x0200_0000, 0);
        assert!(l.matches(0x02, true) && !l.matches(0x01, true));
        l.write(0xe, 0x0fff_ffff, 0); // cluster
        l.write(0xd, 0x1200_0000, 0);
        assert!(l.matches(0x12, true) && !l.matches(0x22, true));
    }
}
