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
