//! The software CPU against the host CPU, class by class. Thousands of
//! cases each (scale with VMPLAY_DIFFTEST_CASES, reproduce with
//! VMPLAY_DIFFTEST_SEED / VMPLAY_DIFFTEST_CASE). A class the emu lacks,
//! or gets wrong anywhere, fails here.

use vmplay_difftest::{Class, Config, assert_matches_host, run_random_bytes};
use vmplay_emu::jit::{JitConfig, Tier};
use vmplay_emu::{EmuHypervisor, EmuOptions};

const CASES: u64 = 3000;

fn emu() -> EmuHypervisor {
    EmuHypervisor::new(EmuOptions {
        jit: Some(JitConfig {
            tier: Tier::Interp,
            ..JitConfig::default()
        }),
        ..EmuOptions::default()
    })
}

/// The translation tier on every block from its first run (each case's
/// sequence is one or a few blocks that run once).
fn emu_translated() -> EmuHypervisor {
    EmuHypervisor::new(EmuOptions {
        jit: Some(JitConfig {
            tier: Tier::Jit,
            threshold: 0,
            idle_threshold: u64::MAX,
            verify_runs: 0,
            // Each case runs once: translated in line, on its first run.
            background: false,
        }),
        ..EmuOptions::default()
    })
}

macro_rules! emu_tests {
    ($($(#[$attr:meta])* $name:ident, $jit_name:ident => $class:expr,)*) => {$(
        #[test]
        $(#[$attr])*
        fn $name() {
            assert_matches_host(&emu(), $class, CASES);
        }

        #[test]
        $(#[$attr])*
        fn $jit_name() {
            assert_matches_host(&emu_translated(), $class, CASES);
        }
    )*};
}

emu_tests! {
    emu_matches_host_on_integer_alu, translated_emu_matches_host_on_integer_alu => Class::IntegerAlu,
    emu_matches_host_on_shifts, translated_emu_matches_host_on_shifts => Class::Shifts,
    emu_matches_host_on_mul_div, translated_emu_matches_host_on_mul_div => Class::MulDiv,
    emu_matches_host_on_conditional, translated_emu_matches_host_on_conditional => Class::Conditional,
    emu_matches_host_on_exchange, translated_emu_matches_host_on_exchange => Class::Exchange,
    emu_matches_host_on_moves, translated_emu_matches_host_on_moves => Class::Moves,
    emu_matches_host_on_strings, translated_emu_matches_host_on_strings => Class::Strings,
    emu_matches_host_on_stack, translated_emu_matches_host_on_stack => Class::Stack,
    emu_matches_host_on_bit_ops, translated_emu_matches_host_on_bit_ops => Class::BitOps,
    emu_matches_host_on_x87, translated_emu_matches_host_on_x87 => Class::X87,
    emu_matches_host_on_sse_moves, translated_emu_matches_host_on_sse_moves => Class::SseMoves,
    emu_matches_host_on_sse_int, translated_emu_matches_host_on_sse_int => Class::SseInt,
    emu_matches_host_on_sse_float, translated_emu_matches_host_on_sse_float => Class::SseFloat,
    emu_matches_host_on_mmx, translated_emu_matches_host_on_mmx => Class::Mmx,
    emu_matches_host_on_bmi, translated_emu_matches_host_on_bmi => Class::Bmi,
    emu_matches_host_on_sse4_1, translated_emu_matches_host_on_sse4_1 => Class::Sse41,
    emu_matches_host_on_sse4_2, translated_emu_matches_host_on_sse4_2 => Class::Sse42,
    emu_matches_host_on_xsave, translated_emu_matches_host_on_xsave => Class::Xsave,
}

/// Random bytes as ring-0 code: the emu must always come back (an exit,
/// an exception stub, or promptly after a kick), never panic, never give
/// up with an internal error.
#[test]
fn emu_survives_random_code() {
    let cfg = Config::from_env(1000).expect("difftest environment");
    let report = run_random_bytes(&emu(), cfg.seed, cfg.cases)
        .unwrap_or_else(|e| panic!("seed {:#x}: {e}", cfg.seed));
    eprintln!("emu on random code (seed {:#x}): {report:?}", cfg.seed);
    assert_eq!(report.cases, cfg.cases);
    assert_eq!(
        report.internal_errors, 0,
        "seed {:#x}: the emu gave up on guest code: {:?}",
        cfg.seed, report.first_internal_error
    );
}

/// The harness rewrites the code page through guest memory between cases,
/// as virtio DMA or a loader does: the emu must run the new bytes, not
/// blocks it decoded from the old ones.
#[test]
fn emu_runs_code_the_vmm_rewrote() {
    let hv = emu();
    let mut runner = vmplay_difftest::BackendRunner::new(&hv).expect("emu backend");
    let mut init = vmplay_difftest::generate::blank_state();
    init.gpr[0] = 5;
    init.gpr[1] = 7;
    let nop = runner
        .run_case(&[0x90, 0x90, 0x90], &init)
        .expect("nop case");
    assert_eq!(nop.gpr[0], 5);
    // add rax, rcx at the same address.
    let add = runner
        .run_case(&[0x48, 0x01, 0xc8], &init)
        .expect("add case");
    assert_eq!(
        add.gpr[0], 12,
        "the emu ran stale code for the rewritten page"
    );
}
