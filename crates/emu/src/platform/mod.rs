//! The platform pieces KVM keeps in the kernel and the machine does not
//! model: a LAPIC per vCPU, the IOAPIC, the 8259 pair, the PIT (+ port
//! 0x61), guest time, and a timer thread that fires LAPIC/PIT deadlines.
//!
//! Shared by all vCPU threads: each device is behind its own mutex, and a
//! vCPU's hot path only loads its attention word ([`signal::Signal`]).

pub mod clock;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod signal;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use clock::Clock;
use ioapic::Ioapic;
use lapic::{Lapic, Msg, Refused};
use pic::Pic;
use pit::Pit;
use signal::Signal;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The timer thread's wake-up.
#[derive(Default)]
pub struct TimerSync {
    lock: Mutex<u64>,
    cv: Condvar,
    pub shutdown: AtomicBool,
}

impl TimerSync {
    /// A deadline changed: the thread recomputes before sleeping.
    pub fn notify(&self) {
        let mut g = lock(&self.lock);
        *g = g.wrapping_add(1);
        self.cv.notify_all();
    }
}

pub struct Platform {
    pub signals: Box<[Signal]>,
    pub lapics: Box<[Mutex<Lapic>]>,
    pub ioapic: Mutex<Ioapic>,
    pub pic: Mutex<Pic>,
    pub pit: Mutex<Pit>,
    pub clock: Clock,
    pub timer: Arc<TimerSync>,
}

impl Platform {
    pub fn new(vcpus: u32) -> Self {
        Platform {
            signals: (0..vcpus).map(|_| Signal::default()).collect(),
            lapics: (0..vcpus).map(|i| Mutex::new(Lapic::new(i))).collect(),
            ioapic: Mutex::new(Ioapic::new()),
            pic: Mutex::new(Pic::new()),
            pit: Mutex::new(Pit::new()),
            clock: Clock::new(),
            timer: Arc::new(TimerSync::default()),
        }
    }

    pub fn vcpus(&self) -> usize {
        self.signals.len()
    }

    /// Delivers an APIC-bus message from `src` (None = IOAPIC); true if a
    /// LAPIC accepted it (a fixed interrupt reached an enabled APIC).
    pub fn send(&self, src: Option<u32>, m: Msg) -> bool {
        let mut accepted = false;
        for (i, l) in self.lapics.iter().enumerate() {
            let me = Some(i as u32) == src;
            let mut lapic = lock(l);
            let hit = match m.shorthand {
                1 => me,
                2 => true,
                3 => !me,
                _ => lapic.matches(m.dest, m.logical),
            };
            if !hit {
                continue;
            }
            let sig = &self.signals[i];
            match m.delivery {
                0 | 1 => {
                    if lapic.accept(m.vector, m.level_triggered) {
                        accepted = true;
                        drop(lapic);
                        sig.raise(signal::IRQ);
                    }
                    if m.delivery == 1 && accepted {
                        // Lowest priority: the first APIC that takes it.
                        return true;
                    }
                }
                4 => {
                    accepted = true;
                    sig.raise(signal::NMI);
                }
                5 if m.level || src.is_none() => {
                    accepted = true;
                    lapic.init_reset();
                    drop(lapic);
                    sig.raise(signal::INIT);
                }
                6 => {
                    accepted = true;
                    sig.set_sipi_vector(m.vector);
                    drop(lapic);
                    sig.raise(signal::SIPI);
                }
                7 => {
                    accepted = true;
                    drop(lapic);
                    sig.raise(signal::IRQ);
                }
                _ => {}
            }
        }
        accepted
    }

    /// Runs `f` on the IOAPIC with a delivery callback. The IOAPIC lock is
    /// held while LAPICs are locked in turn (never the other way round), so
    /// remote IRR changes with the delivery it records.
    fn with_ioapic(&self, f: impl FnOnce(&mut Ioapic, ioapic::Deliver)) {
        let mut io = lock(&self.ioapic);
        f(&mut io, &mut |m| self.send(None, m));
    }

    /// Drives GSI `gsi`: the IOAPIC pin and, for ISA IRQs, the 8259.
    pub fn set_irq(&self, gsi: u32, high: bool) {
        if gsi < 16 {
            let out = {
                let mut pic = lock(&self.pic);
                pic.set_irq(gsi as u8, high);
                pic.output()
            };
            if out {
                self.signals[0].raise(signal::IRQ);
            }
        }
        self.with_ioapic(|io, deliver| io.set_irq(gsi as usize, high, deliver));
    }

    /// The vector vCPU `id` takes now (LAPIC first, then 8259 ExtINT).
    pub fn ack_interrupt(&self, id: u32) -> Option<u8> {
        let i = id as usize;
        let mut l = lock(&self.lapics[i]);
        if let Some(v) = l.ack() {
            return Some(v);
        }
        if i == 0 && l.accepts_pic() {
            drop(l);
            let mut pic = lock(&self.pic);
            if pic.output() {
                return Some(pic.ack());
            }
        }
        None
    }

    /// A page became code: other vCPUs drop their write tags for it.
    pub fn code_page_marked(&self, id: u32) {
        for (i, s) in self.signals.iter().enumerate() {
            if i as u32 != id {
                s.attention.fetch_or(signal::FLUSH_CODE, Ordering::AcqRel);
            }
        }
    }

    pub fn tpr(&self, id: u32) -> u8 {
        lock(&self.lapics[id as usize]).tpr()
    }

    pub fn set_tpr(&self, id: u32, v: u8) {
        lock(&self.lapics[id as usize]).set_tpr(v);
        self.signals[id as usize].raise(signal::IRQ);
    }

    /// A LAPIC register write (xAPIC MMIO or x2APIC MSR) with its effects.
    pub fn lapic_write(&self, id: u32, reg: u32, v: u32) {
        let now = self.clock.now_ns();
        let (ipi, eoi) = lock(&self.lapics[id as usize]).write(reg, v, now);
        if let Some(m) = ipi {
            self.send(Some(id), m);
        }
        if let Some(vector) = eoi {
            self.with_ioapic(|io, deliver| io.eoi(vector, deliver));
        }
        // Priorities or the timer may have changed.
        self.signals[id as usize].raise(signal::IRQ);
        self.timer.notify();
    }

    pub fn lapic_read(&self, id: u32, reg: u32) -> u32 {
        lock(&self.lapics[id as usize]).read(reg, self.clock.now_ns())
    }

    /// WRMSR IA32_APIC_BASE (see [`Lapic::set_base`]).
    pub fn set_apic_base(&self, id: u32, v: u64) -> Result<(), Refused> {
        lock(&self.lapics[id as usize]).set_base(v)?;
        // A disabled APIC dropped its timer and pending interrupts; one
        // re-enabled may let the 8259 through.
        self.signals[id as usize].raise(signal::IRQ);
        self.timer.notify();
        Ok(())
    }

    /// RDMSR of x2APIC MSR `msr` (0x800..=0x8ff).
    pub fn x2apic_rdmsr(&self, id: u32, msr: u32) -> Result<u64, Refused> {
        lock(&self.lapics[id as usize]).x2apic_read(msr - 0x800, self.clock.now_ns())
    }

    /// WRMSR of x2APIC MSR `msr` (0x800..=0x8ff): checked, then written
    /// with its effects (the ICR as one 64-bit register).
    pub fn x2apic_wrmsr(&self, id: u32, msr: u32, v: u64) -> Result<(), Refused> {
        let reg = msr - 0x800;
        {
            let mut l = lock(&self.lapics[id as usize]);
            l.x2apic_write_ok(reg, v)?;
            if reg == 0x30 {
                l.write(0x31, (v >> 32) as u32, 0);
            }
        }
        self.lapic_write(id, reg, v as u32);
        Ok(())
    }

    /// Physical accesses the platform owns (LAPIC page, IOAPIC page).
    pub fn mmio_read(&self, id: u32, pa: u64, n: usize) -> Option<u64> {
        let base = lock(&self.lapics[id as usize]).base;
        if pa & !0xfff == base & !0xfff
            && base & lapic::BASE_EXTD == 0
            && base & lapic::BASE_EN != 0
        {
            let off = pa & 0xfff;
            let v = self.lapic_read(id, (off >> 4) as u32);
            return Some(u64::from(v >> ((off & 3) * 8)) & mask(n));
        }
        if (0xfec0_0000..0xfec0_1000).contains(&pa) {
            let off = pa & 0xfff;
            let v = lock(&self.ioapic).read(off & !3);
            return Some(u64::from(v >> ((off & 3) * 8)) & mask(n));
        }
        None
    }

    pub fn mmio_write(&self, id: u32, pa: u64, _n: usize, v: u64) -> bool {
        let base = lock(&self.lapics[id as usize]).base;
        if pa & !0xfff == base & !0xfff
            && base & lapic::BASE_EXTD == 0
            && base & lapic::BASE_EN != 0
        {
            self.lapic_write(id, ((pa & 0xfff) >> 4) as u32, v as u32);
            return true;
        }
        if (0xfec0_0000..0xfec0_1000).contains(&pa) {
            self.with_ioapic(|io, deliver| io.write(pa & 0xfff, v as u32, deliver));
            return true;
        }
        false
    }

    /// Port reads the platform owns (PIC, ELCR, PIT, 0x61).
    pub fn pio_read(&self, port: u16, _n: usize) -> Option<u64> {
        if Pic::owns(port) {
            let v = lock(&self.pic).read(port);
            return Some(u64::from(v));
        }
        if Pit::owns(port) {
            let v = lock(&self.pit).read(port, self.clock.now_ns());
            return Some(u64::from(v));
        }
        None
    }

    pub fn pio_write(&self, port: u16, _n: usize, v: u64) -> bool {
        if Pic::owns(port) {
            let out = {
                let mut pic = lock(&self.pic);
                pic.write(port, v as u8);
                pic.output()
            };
            if out {
                self.signals[0].raise(signal::IRQ);
            }
            return true;
        }
        if Pit::owns(port) {
            lock(&self.pit).write(port, v as u8, self.clock.now_ns());
            self.timer.notify();
            return true;
        }
        false
    }

    /// Fires every due timer; returns the next deadline.
    pub fn run_timers(&self) -> Option<u64> {
        let now = self.clock.now_ns();
        let mut next: Option<u64> = None;
        let mut earliest = |t: Option<u64>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: u64| n.min(t)));
            }
        };
        for (i, l) in self.lapics.iter().enumerate() {
            let mut lapic = lock(l);
            if lapic.timer_fire(now) {
                drop(lapic);
                self.signals[i].raise(signal::IRQ);
                lapic = lock(l);
            }
            earliest(lapic.deadline_ns);
        }
        let (fire, pit_next) = {
            let mut pit = lock(&self.pit);
            let f = pit.fire(now);
            (f, pit.next_irq())
        };
        if fire {
            self.set_irq(0, true);
            self.set_irq(0, false);
            // PIT IRQ0 also reaches IOAPIC pin 0 through set_irq (GSI 0).
        }
        earliest(pit_next);
        next
    }
}

#[inline]
fn mask(n: usize) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}

/// Starts the timer thread. `tick` runs due timers and returns (next
/// deadline, now), or `None` once the VM is gone.
pub fn start_timer_thread(
    sync: Arc<TimerSync>,
    tick: impl Fn() -> Option<(Option<u64>, u64)> + Send + 'static,
    hook: Option<Arc<dyn Fn() -> Result<(), String> + Send + Sync>>,
) -> std::io::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("emu-timers".into())
        .spawn(move || {
            // The hook (a seccomp filter) goes on before anything else;
            // the creator waits for its verdict.
            let verdict = hook.map_or(Ok(()), |h| h());
            let failed = verdict.is_err();
            let _ = ready_tx.send(verdict);
            if failed {
                return;
            }
            loop {
                if sync.shutdown.load(Ordering::Acquire) {
                    return;
                }
                let generation = *lock(&sync.lock);
                let Some((next, now)) = tick() else {
                    return;
                };
                let wait = match next {
                    Some(t) => Duration::from_nanos(t.saturating_sub(now).max(10_000)),
                    None => Duration::from_millis(100),
                };
                let g = lock(&sync.lock);
                if *g == generation {
                    let _ = sync
                        .cv
                        .wait_timeout(g, wait.min(Duration::from_millis(100)));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other("the timer thread ended at once")),
    }
}
