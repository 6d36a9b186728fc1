//! A misbehaving guest never crashes or hangs the VMM.

use super::guest::*;

/// Xorshift, so the test is deterministic without a dependency.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn random_bytes_fault_or_shut_down_without_panicking() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut g = Guest::new(1);
        let mut s = g.long_mode(CODE);
        // No IDT: the first exception escalates to a triple fault.
        if round % 2 == 0 {
            s.idt.limit = 0;
        }
        let bytes: Vec<u8> = (0..4096).map(|_| rng(&mut seed) as u8).collect();
        g.write(CODE, &bytes);
        for r in 0..16 {
            s.gpr[r] = rng(&mut seed);
        }
        s.gpr[4] = STACK;
        g.vcpu.set_state(&s).unwrap();
        let kicker = g.vcpu.kicker();
        let timer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            kicker.kick();
        });
        let o = g.run_with(2000, |_| 0xff, |_| 0xffff_ffff);
        timer.join().unwrap();
        assert_ne!(o.end, End::Error, "round {round}");
    }
}

/// The same in real mode, 32-bit protected mode and ring 3.
#[test]
fn random_bytes_in_every_mode_never_crash_the_vmm() {
    use vmplay_hypervisor::{CpuState, Segment};
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..120 {
        let mut g = Guest::new(1);
        let long = g.long_mode(CODE);
        let mut s = match round % 3 {
            0 => {
                let mut s = CpuState::reset();
                s.cs = Segment::real_mode(0x1000, true);
                s.rip = 0;
                s
            }
            1 => {
                let mut s = CpuState::reset();
                s.cr0 = 0x11;
                s.cs = Segment::flat(0x08, 0xb, false, true);
                let d = Segment::flat(0x10, 0x3, false, true);
                (s.ds, s.es, s.ss, s.fs, s.gs) = (d, d, d, d, d);
                s.rip = CODE;
                s
            }
            _ => {
                let mut s = long.clone();
                s.cs = Segment {
                    selector: UCODE | 3,
                    dpl: 3,
                    ..long.cs
                };
                s.ss = Segment {
                    selector: UDATA | 3,
                    dpl: 3,
                    ..long.ss
                };
                s
            }
        };
        let bytes: Vec<u8> = (0..4096).map(|_| rng(&mut seed) as u8).collect();
        g.write(CODE, &bytes);
        g.write(0x10000, &bytes);
        for r in 0..16 {
            s.gpr[r] = rng(&mut seed) & 0xffff_ffff;
        }
        s.gpr[4] = STACK - 0x100;
        g.vcpu.set_state(&s).unwrap();
        let kicker = g.vcpu.kicker();
        let timer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            kicker.kick();
        });
        let o = g.run_with(2000, |_| 0xff, |_| 0xffff_ffff);
        timer.join().unwrap();
        assert_ne!(o.end, End::Error, "round {round}");
    }
}
