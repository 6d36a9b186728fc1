//! The harness itself: it must catch a backend that gets things wrong, and
//! its random-code driver must run. Uses KVM as the working backend.

use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;
use vmplay_difftest::check::Failure;
use vmplay_difftest::{Class, Config, check_class, run_random_bytes};
use vmplay_hypervisor::{
    CpuState, GuestMemory, Hypervisor, IoEventAddress, IrqLine, Result, Vcpu, VcpuExit, VcpuKicker,
    Vm, VmSpec,
};
use vmplay_kvm::KvmHypervisor;

fn kvm() -> Option<KvmHypervisor> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm not available");
        return None;
    }
    Some(KvmHypervisor::new().expect("/dev/kvm exists but KVM does not work"))
}

/// A backend that reports one bit of R11 flipped, or one flag flipped.
struct Broken<H> {
    inner: H,
    what: Corruption,
}

#[derive(Clone, Copy)]
enum Corruption {
    R11Bit,
    CarryFlag,
}

struct BrokenVm {
    inner: Arc<dyn Vm>,
    what: Corruption,
}

struct BrokenVcpu {
    inner: Box<dyn Vcpu>,
    what: Corruption,
}

impl<H: Hypervisor> Hypervisor for Broken<H> {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn max_vcpus(&self) -> u32 {
        self.inner.max_vcpus()
    }
    fn create_vm(&self, spec: &VmSpec, memory: &GuestMemory) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(BrokenVm {
            inner: self.inner.create_vm(spec, memory)?,
            what: self.what,
        }))
    }
}

impl Vm for BrokenVm {
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(BrokenVcpu {
            inner: self.inner.create_vcpu(id)?,
            what: self.what,
        }))
    }
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        self.inner.irq_line(gsi)
    }
    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        len: u32,
        datamatch: Option<u64>,
        fd: &EventFd,
    ) -> Result<()> {
        self.inner.register_ioevent(addr, len, datamatch, fd)
    }
}

impl Vcpu for BrokenVcpu {
    fn id(&self) -> u32 {
        self.inner.id()
    }
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.inner.run()
    }
    fn state(&self) -> Result<CpuState> {
        let mut s = self.inner.state()?;
        match self.what {
            Corruption::R11Bit => s.gpr[11] ^= 1 << 40,
            Corruption::CarryFlag => s.rflags ^= 1,
        }
        Ok(s)
    }
    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        self.inner.set_state(state)
    }
    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.inner.kicker()
    }
}

fn config() -> Config {
    Config {
        seed: 0x5eed,
        cases: 50,
        only_case: None,
        max_failures: 2,
        baseline_only: true,
        page_straddles: false,
    }
}

#[test]
fn harness_reports_a_backend_that_corrupts_a_register() {
    let Some(h) = kvm() else { return };
    let broken = Broken {
        inner: h,
        what: Corruption::R11Bit,
    };
    match check_class(&broken, Class::Moves, &config()) {
        Err(Failure::Differs { report }) => {
            for needle in [
                "r11: host",
                "seed 0x5eed",
                "VMPLAY_DIFFTEST_CASE=",
                "code:",
                "initial state:",
            ] {
                assert!(report.contains(needle), "{needle:?} missing in:\n{report}");
            }
        }
        other => panic!("a corrupted R11 went unnoticed: {other:?}"),
    }
}

#[test]
fn harness_reports_a_backend_that_gets_a_defined_flag_wrong() {
    let Some(h) = kvm() else { return };
    let broken = Broken {
        inner: h,
        what: Corruption::CarryFlag,
    };
    // Every integer ALU case ends with CF defined or inherited: some must
    // be caught.
    match check_class(&broken, Class::IntegerAlu, &config()) {
        Err(Failure::Differs { report }) => {
            assert!(report.contains("CF"), "{report}");
        }
        other => panic!("a flipped CF went unnoticed: {other:?}"),
    }
}

#[test]
fn the_same_seed_reproduces_the_same_verdict() {
    let Some(h) = kvm() else { return };
    let cfg = Config {
        only_case: Some(17),
        ..config()
    };
    let a = check_class(&h, Class::Shifts, &cfg).expect("kvm agrees on shifts");
    let b = check_class(&h, Class::Shifts, &cfg).expect("kvm agrees on shifts");
    assert_eq!((a.cases, a.exceptions), (b.cases, b.exceptions));
    assert_eq!(a.cases, 1);
}

#[test]
fn random_bytes_driver_runs_every_case_on_kvm() {
    let Some(h) = kvm() else { return };
    let report = run_random_bytes(&h, 0xb17e5, 40).expect("kvm survives random code");
    eprintln!("{report:?}");
    assert_eq!(report.cases, 40);
    assert!(
        report.exceptions > 0,
        "random bytes fault sometimes: {report:?}"
    );
}

/// Each case loads its whole state: running the same cases natively in
/// another order (after other predecessors) gives the same results. This
/// holds the x87/SSE classes too, which no backend here can check.
#[test]
fn native_results_do_not_depend_on_the_previous_case() {
    use vmplay_difftest::generate::{Features, Generator};
    use vmplay_difftest::native::NativeRunner;
    let mut native = NativeRunner::new(64).expect("native runner");
    for class in Class::ALL {
        // Extension classes the host lacks cannot run natively.
        let Ok(g) = Generator::new(class, &Features::host(), native.mxcsr_mask()) else {
            continue;
        };
        let cases: Vec<_> = (0..200).map(|i| g.case(0xd1ff, i).expect("case")).collect();
        let forward: Vec<_> = cases.iter().map(|c| (c.code.as_slice(), &c.init)).collect();
        let backward: Vec<_> = forward.iter().rev().copied().collect();
        let a = native.run(&forward).expect("forward run");
        let mut b = native.run(&backward).expect("backward run");
        b.reverse();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "{class} case {i} depends on what ran before it");
        }
        let completed = a
            .iter()
            .filter(|o| o.outcome == vmplay_difftest::state::Outcome::Completed)
            .count();
        eprintln!(
            "{class}: {} forms, {completed}/200 completed natively",
            g.forms()
        );
        assert!(
            completed > 100,
            "{class}: only {completed} of 200 cases ran to the end natively"
        );
    }
}
