//! The harness proves itself against KVM: the same cases on the host CPU
//! and in a KVM guest. Under kvm_pvm ring-0 code is emulated by the host
//! kernel's instruction emulator, so counts stay modest and what that
//! emulator cannot do is left out:
//! - popcnt, tzcnt and movbe (emulation fails or raises #UD): the kvm
//!   tests generate baseline instructions only;
//! - a store straddling into an unmapped page writes its first part
//!   before the #PF: no straddling operands;
//! - no x87, MMX or SSE instruction and no cmpxchg16b can be emulated
//!   ("instruction emulation failed"): those classes are ignored here.
//!   They pass their FPU state through set_state/state in every other
//!   class, so the harness's FXSAVE plumbing is still checked.
//!
//! On a real KVM host, run the ignored ones with `-- --ignored`.

use vmplay_difftest::{Class, Config, assert_matches_host_with};
use vmplay_kvm::KvmHypervisor;

const CASES: u64 = 300;

fn kvm() -> Option<KvmHypervisor> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm not available");
        return None;
    }
    match KvmHypervisor::new() {
        Ok(h) => Some(h),
        Err(e) => panic!("/dev/kvm exists but KVM does not work: {e}"),
    }
}

macro_rules! kvm_tests {
    ($($(#[$attr:meta])* $name:ident => $class:expr,)*) => {$(
        #[test]
        $(#[$attr])*
        fn $name() {
            let Some(h) = kvm() else { return };
            let mut cfg = Config::from_env(CASES).expect("difftest environment");
            // kvm_pvm's emulator lacks popcnt/tzcnt/movbe; on real KVM
            // they work, but this test is about the harness.
            cfg.baseline_only = true;
            cfg.page_straddles = false;
            assert_matches_host_with(&h, $class, &cfg);
        }
    )*};
}

kvm_tests! {
    kvm_matches_host_on_integer_alu => Class::IntegerAlu,
    kvm_matches_host_on_shifts => Class::Shifts,
    kvm_matches_host_on_mul_div => Class::MulDiv,
    kvm_matches_host_on_bit_ops => Class::BitOps,
    kvm_matches_host_on_conditional => Class::Conditional,
    #[ignore = "kvm_pvm cannot emulate x87/MMX/SSE/cmpxchg16b in ring 0"]
    kvm_matches_host_on_exchange => Class::Exchange,
    kvm_matches_host_on_moves => Class::Moves,
    kvm_matches_host_on_strings => Class::Strings,
    kvm_matches_host_on_stack => Class::Stack,
    #[ignore = "kvm_pvm cannot emulate x87/MMX/SSE/cmpxchg16b in ring 0"]
    kvm_matches_host_on_x87 => Class::X87,
    #[ignore = "kvm_pvm cannot emulate x87/MMX/SSE/cmpxchg16b in ring 0"]
    kvm_matches_host_on_sse_moves => Class::SseMoves,
    #[ignore = "kvm_pvm cannot emulate x87/MMX/SSE/cmpxchg16b in ring 0"]
    kvm_matches_host_on_sse_int => Class::SseInt,
    #[ignore = "kvm_pvm cannot emulate x87/MMX/SSE/cmpxchg16b in ring 0"]
    kvm_matches_host_on_sse_float => Class::SseFloat,
    #[ignore = "kvm_pvm cannot emulate x87/MMX/SSE/cmpxchg16b in ring 0"]
    kvm_matches_host_on_mmx => Class::Mmx,
    #[ignore = "kvm_pvm cannot emulate xsetbv/xgetbv (nor x87/SSE) in ring 0"]
    kvm_matches_host_on_xsave => Class::Xsave,
}
