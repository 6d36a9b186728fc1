//! The differential check: generate, run on both sides, compare, report.

use crate::backend::BackendRunner;
use crate::compare::{describe_state, differences, disassemble};
use crate::error::{Error, Result};
use crate::generate::{Case, Class, Features, Generator, host_cpuid};
use crate::native::NativeRunner;
use crate::state::Observed;
use std::fmt::Write;
use std::time::Instant;
use vmplay_hypervisor::Hypervisor;

/// Seed, case count and selection for one run.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub cases: u64,
    /// Run only this case index (to reproduce one failure).
    pub only_case: Option<u64>,
    /// Stop after this many differing cases.
    pub max_failures: usize,
    /// Generate only baseline (qemu64-class) instructions, even where the
    /// backend advertises more.
    pub baseline_only: bool,
    /// Let memory operands straddle into the unmapped page after theirs.
    pub page_straddles: bool,
}

pub const ENV_SEED: &str = "VMPLAY_DIFFTEST_SEED";
/// The seed when none is given: every run checks the same cases.
pub const DEFAULT_SEED: u64 = 0x766d_706c_6179;
pub const ENV_CASES: &str = "VMPLAY_DIFFTEST_CASES";
pub const ENV_CASE: &str = "VMPLAY_DIFFTEST_CASE";

fn parse_u64(name: &'static str, value: &str) -> Result<u64> {
    let v = value.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| Error::Env {
        name,
        value: value.into(),
        why: "not a number (decimal or 0x hex)",
    })
}

impl Config {
    /// `default_cases` cases with [`DEFAULT_SEED`], so CI is repeatable,
    /// unless the environment says otherwise: `VMPLAY_DIFFTEST_SEED` (the
    /// seed, or `random` for a fresh one each run, to explore),
    /// `VMPLAY_DIFFTEST_CASES` (a count, or `xF` to scale the default by
    /// F), `VMPLAY_DIFFTEST_CASE` (run only that index).
    pub fn from_env(default_cases: u64) -> Result<Self> {
        let seed = match std::env::var(ENV_SEED) {
            Ok(v) if v.trim() == "random" => fresh_seed(),
            Ok(v) => parse_u64(ENV_SEED, &v)?,
            Err(_) => DEFAULT_SEED,
        };
        let cases = match std::env::var(ENV_CASES) {
            Ok(v) => match v.trim().strip_prefix('x') {
                Some(f) => {
                    let f: f64 = f.parse().map_err(|_| Error::Env {
                        name: ENV_CASES,
                        value: v.clone(),
                        why: "xF needs a number F",
                    })?;
                    ((default_cases as f64) * f).round().max(1.0) as u64
                }
                None => parse_u64(ENV_CASES, &v)?,
            },
            Err(_) => default_cases,
        };
        let only_case = match std::env::var(ENV_CASE) {
            Ok(v) => Some(parse_u64(ENV_CASE, &v)?),
            Err(_) => None,
        };
        Ok(Config {
            seed,
            cases,
            only_case,
            max_failures: 3,
            baseline_only: false,
            page_straddles: true,
        })
    }
}

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::rng::Rng::new(t ^ u64::from(std::process::id()) << 32).next_u64()
}

/// A run that found no difference.
#[derive(Debug, Clone)]
pub struct Summary {
    pub backend: &'static str,
    pub class: Class,
    pub seed: u64,
    pub cases: u64,
    /// Instruction forms the class drew from.
    pub forms: usize,
    /// Cases that ended in an exception (on both sides).
    pub exceptions: u64,
    pub seconds: f64,
}

/// Why a run failed: a harness error, or cases that differ.
#[derive(Debug)]
pub enum Failure {
    Setup(Error),
    Differs { report: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Setup(e) => write!(f, "difftest could not run: {e}"),
            Failure::Differs { report } => f.write_str(report),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Setup(e)
    }
}

/// The features the generator may use for `class` on `backend`, or an
/// error naming the baseline features the class needs and the backend's
/// CPUID does not advertise.
pub fn backend_features(backend: &mut BackendRunner, class: Class) -> Result<Features> {
    let features = Features::from_cpuid(&mut |leaf| backend.cpuid(leaf, 0), &host_cpuid)?;
    let ext = backend.cpuid(0x8000_0001, 0)?;
    let mut missing = features.missing_for(class);
    if ext[3] >> 29 & 1 == 0 {
        missing.push("LM");
    }
    if !missing.is_empty() {
        let leaf1 = backend.cpuid(1, 0)?;
        return Err(Error::BackendRun {
            backend: backend.name(),
            what: format!(
                "CPUID does not advertise {missing:?}, which class {class} needs \
                 (leaf 1 = {leaf1:08x?}, leaf 8000_0001 = {ext:08x?})"
            ),
        });
    }
    Ok(features)
}

/// Runs `cfg.cases` cases of `class` on the host and in `hv`.
pub fn check_class(
    hv: &dyn Hypervisor,
    class: Class,
    cfg: &Config,
) -> std::result::Result<Summary, Failure> {
    let start = Instant::now();
    let mut native = NativeRunner::new(256)?;
    let mut backend = BackendRunner::new(hv)?;
    if class == Class::Xsave {
        backend.enable_xsave()?;
    }
    let mut features = backend_features(&mut backend, class)?;
    if cfg.baseline_only {
        features = Features::baseline();
    }
    // XSAVEOPT is leaf 0xD subleaf 1 EAX bit 0, on both sides.
    let xsaveopt = |eax: u32| eax & 1 != 0;
    if xsaveopt(backend.cpuid(0xd, 1)?[0])
        && xsaveopt(core::arch::x86_64::__cpuid_count(0xd, 1).eax)
    {
        features.allow(iced_x86::CpuidFeature::XSAVEOPT);
    }
    let mxcsr_mask = native.mxcsr_mask() & backend.mxcsr_mask()?;
    let generator =
        Generator::new(class, &features, mxcsr_mask)?.with_straddles(cfg.page_straddles);
    let indices: Vec<u64> = match cfg.only_case {
        Some(i) => vec![i],
        None => (0..cfg.cases).collect(),
    };
    let mut report = String::new();
    let mut failures = 0usize;
    let mut exceptions = 0u64;
    let mut ran = 0u64;
    'batches: for chunk in indices.chunks(256) {
        let cases: Vec<Case> = chunk
            .iter()
            .map(|&i| generator.case(cfg.seed, i))
            .collect::<Result<_>>()?;
        let inputs: Vec<(&[u8], &crate::state::InitialState)> =
            cases.iter().map(|c| (c.code.as_slice(), &c.init)).collect();
        let host = native.run(&inputs)?;
        for (case, host) in cases.iter().zip(&host) {
            ran += 1;
            let problem = match backend.run_case(&case.code, &case.init) {
                Ok(obs) => {
                    let d = differences(case, host, &obs);
                    if d.is_empty() {
                        if obs.outcome != crate::state::Outcome::Completed {
                            exceptions += 1;
                        }
                        None
                    } else {
                        Some(d)
                    }
                }
                Err(e) => Some(vec![format!("the backend run failed: {e}")]),
            };
            if let Some(lines) = problem {
                failures += 1;
                describe_failure(&mut report, hv.name(), case, host, &lines);
                if failures >= cfg.max_failures {
                    break 'batches;
                }
            }
        }
    }
    if failures > 0 {
        let mut head = format!(
            "difftest: backend {} differs from the host on class {class}: {failures} failing \
             case(s) in the first {ran} (seed {:#x}{}).\nReproduce: {ENV_SEED}={:#x} \
             {ENV_CASES}={}\n\n",
            hv.name(),
            cfg.seed,
            if failures >= cfg.max_failures {
                ", stopped early"
            } else {
                ""
            },
            cfg.seed,
            cfg.cases
        );
        head.push_str(&report);
        return Err(Failure::Differs { report: head });
    }
    Ok(Summary {
        backend: hv.name(),
        class,
        seed: cfg.seed,
        cases: ran,
        forms: generator.forms(),
        exceptions,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn describe_failure(
    out: &mut String,
    backend: &str,
    case: &Case,
    host: &Observed,
    lines: &[String],
) {
    let _ = writeln!(
        out,
        "--- case {} of seed {:#x} (class {}; alone: {ENV_SEED}={:#x} {ENV_CASE}={})",
        case.index, case.seed, case.class, case.seed, case.index
    );
    let _ = write!(out, "  code:\n{}", disassemble(&case.code));
    let _ = write!(
        out,
        "  initial state:\n{}",
        indent(&describe_state(&case.init))
    );
    let _ = writeln!(out, "  host: {} at {:#x}", host.outcome, host.rip);
    let _ = writeln!(out, "  differences (host vs {backend}):");
    for l in lines {
        let _ = writeln!(out, "    {l}");
    }
    out.push('\n');
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// The test entry point: `default_cases` cases of `class` (scaled by the
/// environment), panicking with the full report on any difference.
pub fn assert_matches_host(hv: &dyn Hypervisor, class: Class, default_cases: u64) {
    match Config::from_env(default_cases) {
        Ok(cfg) => assert_matches_host_with(hv, class, &cfg),
        Err(e) => panic!("{e}"),
    }
}

/// [`assert_matches_host`] with an explicit configuration.
pub fn assert_matches_host_with(hv: &dyn Hypervisor, class: Class, cfg: &Config) {
    match check_class(hv, class, cfg) {
        Ok(s) => eprintln!(
            "difftest {}/{}: {} cases ({} forms, {} ended in exceptions) agree with the host \
             in {:.2}s (seed {:#x})",
            s.backend, s.class, s.cases, s.forms, s.exceptions, s.seconds, s.seed
        ),
        Err(f) => panic!("{f}"),
    }
}
