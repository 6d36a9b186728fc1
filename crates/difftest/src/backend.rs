//! Runs cases in a backend, through the `vmplay-hypervisor` seam only.
//!
//! One VM with one vCPU is reused for every case. The guest runs at CPL 0
//! in 64-bit mode with paging: this module writes the page tables (the
//! code, data and stack pages identity-mapped with the same permissions
//! the host child has), a flat GDT with a TSS, and an IDT whose 256 gates
//! all enter a stub on the IST1 stack. A case's code ends in a marker that
//! writes to `END_PORT`; a fault ends in the stub of its vector, which
//! writes to `VECTOR_PORT_BASE + vector`, and the faulting context is the
//! exception frame. Ports, not `hlt`: KVM with an in-kernel LAPIC keeps a
//! halted vCPU in the kernel, even with interrupts off.

use crate::error::{Error, Result};
use crate::layout::*;
use crate::state::{InitialState, Observed, Outcome};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmplay_hypervisor::{
    CpuState, DescriptorTable, GuestMemory, Hypervisor, Segment, Vcpu, VcpuExit, VcpuKicker, Vm,
    VmSpec,
};

/// `mov [rip + SCRATCH], rdx; mov dx, port; out dx, al` for code at `at`.
fn port_marker(at: u64, port: u16) -> [u8; 12] {
    let rel = SCRATCH_ADDR.wrapping_sub(at + 7) as u32;
    let r = rel.to_le_bytes();
    let p = port.to_le_bytes();
    [
        0x48, 0x89, 0x15, r[0], r[1], r[2], r[3], 0x66, 0xba, p[0], p[1], 0xee,
    ]
}

/// What a backend case runs into after its last instruction at
/// `code_end`: the end-port marker, then `cli; hlt` in case the backend
/// goes on.
pub fn end_marker(code_end: u64) -> Vec<u8> {
    let mut m = port_marker(code_end, END_PORT).to_vec();
    m.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    m
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_NX: u64 = 1 << 63;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
/// The XSAVE components the backend's cases run with: x87 and SSE.
pub const XCR0_X87_SSE: u64 = 3;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// The system area's bytes: page tables, GDT, TSS, IDT and stubs.
fn system_image() -> Vec<u8> {
    let mut img = vec![0u8; SYS_SIZE];
    let mut put = |addr: u64, v: u64| {
        let at = (addr - SYS_ADDR) as usize;
        img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    let table = PTE_P | PTE_RW | PTE_A;
    put(PML4_ADDR, PDPT_ADDR | table);
    put(PDPT_ADDR + 8 * ((CODE_ADDR >> 30) & 511), PD_ADDR | table);
    put(PD_ADDR + 8 * ((CODE_ADDR >> 21) & 511), PT0_ADDR | table);
    put(PD_ADDR + 8 * ((STACK_ADDR >> 21) & 511), PT1_ADDR | table);
    let leaf = PTE_P | PTE_A | PTE_D;
    let pte = |addr: u64| {
        let pt = if addr >> 21 == CODE_ADDR >> 21 {
            PT0_ADDR
        } else {
            PT1_ADDR
        };
        pt + 8 * ((addr >> 12) & 511)
    };
    // Code and the stubs: read + execute. Everything else: read/write, NX.
    put(pte(CODE_ADDR), CODE_ADDR | leaf);
    put(pte(DATA_ADDR), DATA_ADDR | leaf | PTE_RW | PTE_NX);
    put(pte(STACK_ADDR), STACK_ADDR | leaf | PTE_RW | PTE_NX);
    for page in (SYS_ADDR..SYS_ADDR + SYS_SIZE as u64).step_by(0x1000) {
        let flags = if page == STUBS_ADDR {
            leaf
        } else {
            leaf | PTE_RW | PTE_NX
        };
        put(pte(page), page | flags);
    }
    // GDT: null, 64-bit code, data, 64-bit TSS (two slots).
    put(GDT_ADDR + u64::from(CODE_SELECTOR), 0x0020_9a00_0000_0000);
    put(GDT_ADDR + u64::from(DATA_SELECTOR), 0x00cf_9200_0000_ffff);
    let limit = 0x67u64;
    let base = TSS_ADDR;
    put(
        GDT_ADDR + u64::from(TSS_SELECTOR),
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | 0x89 << 40
            | ((limit >> 16) & 0xf) << 48
            | ((base >> 24) & 0xff) << 56,
    );
    put(GDT_ADDR + u64::from(TSS_SELECTOR) + 8, base >> 32);
    // TSS: IST1 at offset 36 (unaligned), no I/O bitmap.
    let ist = (TSS_ADDR - SYS_ADDR) as usize + 36;
    img[ist..ist + 8].copy_from_slice(&IST_STACK_TOP.to_le_bytes());
    let iomap = (TSS_ADDR - SYS_ADDR) as usize + 102;
    img[iomap..iomap + 2].copy_from_slice(&104u16.to_le_bytes());
    // IDT: 64-bit interrupt gates (IF cleared on entry) on IST1.
    let mut put = |addr: u64, v: u64| {
        let at = (addr - SYS_ADDR) as usize;
        img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    for v in 0..256u64 {
        let target = STUBS_ADDR + v * STUB_SIZE;
        put(
            IDT_ADDR + 16 * v,
            (target & 0xffff)
                | u64::from(CODE_SELECTOR) << 16
                | 1 << 32
                | 0x8e << 40
                | ((target >> 16) & 0xffff) << 48,
        );
        put(IDT_ADDR + 16 * v + 8, target >> 32);
    }
    // Stubs: the port marker of their vector, `hlt; jmp $-1`.
    let stubs = (STUBS_ADDR - SYS_ADDR) as usize;
    img[stubs..stubs + 0x1000].fill(0xf4);
    for v in 0..256u64 {
        let addr = STUBS_ADDR + v * STUB_SIZE;
        let at = (addr - SYS_ADDR) as usize;
        img[at..at + 12].copy_from_slice(&port_marker(addr, VECTOR_PORT_BASE + v as u16));
        img[at + 12..at + 15].copy_from_slice(&[0xf4, 0xeb, 0xfd]);
    }
    img
}

/// The register state a case starts with in the guest.
pub fn guest_state(init: &InitialState) -> CpuState {
    let data = Segment::flat(DATA_SELECTOR, 0x3, false, true);
    CpuState {
        gpr: init.gpr,
        rip: CODE_ADDR,
        rflags: init.loaded_rflags(),
        cs: Segment::flat(CODE_SELECTOR, 0xb, true, false),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment::tss(TSS_SELECTOR, TSS_ADDR, 0x67),
        ldt: Segment::no_ldt(),
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: 0x27,
        },
        idt: DescriptorTable {
            base: IDT_ADDR,
            limit: 0xfff,
        },
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr2: 0,
        cr3: PML4_ADDR,
        cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        cr8: 0,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
        fpu: init.fpu,
    }
}

/// Kicks the vCPU when a run overstays, and aborts the process if even a
/// kick does not bring it back: a wedged backend must fail the test, not
/// hang it.
struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    kicked: bool,
    stop: bool,
}

/// How long a kicked vCPU may take to return before the process aborts.
const KICK_GRACE: Duration = Duration::from_secs(10);

impl Watchdog {
    fn new(kicker: Arc<dyn VcpuKicker>, backend: &'static str) -> Self {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let s = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let (lock, cv) = &*s;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.stop {
                    return;
                }
                match st.deadline {
                    None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now < d {
                            st = cv
                                .wait_timeout(st, d - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        } else if !st.kicked {
                            st.kicked = true;
                            st.deadline = Some(now + KICK_GRACE);
                            kicker.kick();
                        } else {
                            eprintln!(
                                "difftest: backend {backend} did not return from Vcpu::run \
                                 within {KICK_GRACE:?} of a kick; aborting"
                            );
                            std::process::abort();
                        }
                    }
                }
            }
        });
        Watchdog {
            shared,
            thread: Some(thread),
        }
    }

    fn arm(&self, timeout: Duration) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.deadline = Some(Instant::now() + timeout);
        st.kicked = false;
        cv.notify_one();
    }

    /// Disarms; true if the vCPU had to be kicked.
    fn disarm(&self) -> bool {
        let (lock, _) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.deadline = None;
        st.kicked
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            st.stop = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How one `Vcpu::run` call ended, owned (the exit borrows the vCPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Halt,
    Shutdown,
    IoIn {
        port: u16,
        size: usize,
    },
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    MmioRead {
        addr: u64,
        size: usize,
    },
    MmioWrite {
        addr: u64,
        data: Vec<u8>,
    },
    InternalError(String),
    Interrupted,
    /// The watchdog had to kick the vCPU: the guest was still running.
    TimedOut,
}

/// A backend with one VM and one vCPU set up for running cases.
pub struct BackendRunner {
    name: &'static str,
    mem: GuestMemory,
    // Dropped after the vCPU (field order), as a VM outlives its vCPUs.
    vcpu: Box<dyn Vcpu>,
    _vm: Arc<dyn Vm>,
    watchdog: Watchdog,
    system: Vec<u8>,
    /// How long one case may run before it is kicked and reported as hung.
    pub timeout: Duration,
    /// CR4 bits every case runs with beyond the base set (CR4.OSXSAVE
    /// after [`BackendRunner::enable_xsave`]).
    cr4_extra: u64,
}

impl BackendRunner {
    pub fn new(hv: &dyn Hypervisor) -> Result<Self> {
        let name = hv.name();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(GUEST_RAM_START), GUEST_RAM_SIZE)])
            .map_err(|e| Error::GuestMemory(format!("creating {GUEST_RAM_SIZE:#x} bytes: {e}")))?;
        let be = |op| {
            move |source| Error::Backend {
                backend: name,
                op,
                source,
            }
        };
        let vm = hv
            .create_vm(&VmSpec { vcpus: 1 }, &mem)
            .map_err(be("create_vm"))?;
        let vcpu = vm.create_vcpu(0).map_err(be("create_vcpu"))?;
        let watchdog = Watchdog::new(vcpu.kicker(), name);
        let runner = BackendRunner {
            name,
            mem,
            vcpu,
            _vm: vm,
            watchdog,
            system: system_image(),
            timeout: Duration::from_secs(5),
            cr4_extra: 0,
        };
        runner.write(SYS_ADDR, &runner.system)?;
        Ok(runner)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| {
                Error::GuestMemory(format!("writing {} bytes at {addr:#x}: {e}", bytes.len()))
            })
    }

    fn read(&self, addr: u64, bytes: &mut [u8]) -> Result<()> {
        self.mem.read_slice(bytes, GuestAddress(addr)).map_err(|e| {
            Error::GuestMemory(format!("reading {} bytes at {addr:#x}: {e}", bytes.len()))
        })
    }

    fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn run_err(&self, what: String) -> Error {
        Error::BackendRun {
            backend: self.name,
            what,
        }
    }

    /// Loads `code` followed by its end marker, and `init`, then runs
    /// once.
    fn load_and_run(&mut self, code: &[u8], init: &InitialState) -> Result<RunEnd> {
        let marker = end_marker(CODE_ADDR + code.len() as u64);
        if code.len() + marker.len() > CODE_SIZE {
            return Err(Error::BadCase(format!("{} bytes of code", code.len())));
        }
        let mut page = vec![0xccu8; CODE_SIZE];
        page[..code.len()].copy_from_slice(code);
        page[code.len()..code.len() + marker.len()].copy_from_slice(&marker);
        self.write(CODE_ADDR, &page)?;
        self.write(DATA_ADDR, &init.data)?;
        self.write(STACK_ADDR, &init.stack)?;
        let name = self.name;
        let mut state = guest_state(init);
        state.cr4 |= self.cr4_extra;
        self.vcpu
            .set_state(&state)
            .map_err(|source| Error::Backend {
                backend: name,
                op: "set_state",
                source,
            })?;
        self.run_once()
    }

    /// One `Vcpu::run` under the watchdog, with panics caught.
    fn run_once(&mut self) -> Result<RunEnd> {
        let name = self.name;
        self.watchdog.arm(self.timeout);
        let vcpu = &mut self.vcpu;
        let result = catch_unwind(AssertUnwindSafe(|| {
            vcpu.run().map(|exit| match exit {
                VcpuExit::Halt => RunEnd::Halt,
                VcpuExit::Shutdown => RunEnd::Shutdown,
                VcpuExit::IoIn { port, data } => {
                    let size = data.len();
                    data.fill(0xff);
                    RunEnd::IoIn { port, size }
                }
                VcpuExit::IoOut { port, data } => RunEnd::IoOut {
                    port,
                    data: data.to_vec(),
                },
                VcpuExit::MmioRead { addr, data } => {
                    let size = data.len();
                    data.fill(0xff);
                    RunEnd::MmioRead { addr, size }
                }
                VcpuExit::MmioWrite { addr, data } => RunEnd::MmioWrite {
                    addr,
                    data: data.to_vec(),
                },
                VcpuExit::InternalError(s) => RunEnd::InternalError(s),
                VcpuExit::Interrupted => RunEnd::Interrupted,
                // difftest never sets guest debugging.
                VcpuExit::Debug(ev) => RunEnd::InternalError(format!("debug exit {ev:?}")),
            })
        }));
        let kicked = self.watchdog.disarm();
        match result {
            Err(panic) => Err(self.run_err(format!("Vcpu::run panicked: {}", panic_text(&panic)))),
            Ok(Err(source)) => Err(Error::Backend {
                backend: name,
                op: "run",
                source,
            }),
            Ok(Ok(RunEnd::Interrupted)) if kicked => Ok(RunEnd::TimedOut),
            Ok(Ok(end)) => Ok(end),
        }
    }

    /// Lets the backend finish the `out` it exited on (KVM completes an
    /// exit's instruction only on the next `KVM_RUN`), without running on:
    /// a kick first makes that run return at once.
    fn complete_exit(&mut self) -> Result<()> {
        self.vcpu.kicker().kick();
        match self.run_once()? {
            RunEnd::InternalError(s) => Err(self.run_err(format!(
                "completing the end-marker exit: internal error {s}"
            ))),
            _ => Ok(()),
        }
    }

    fn state(&self) -> Result<CpuState> {
        self.vcpu.state().map_err(|source| Error::Backend {
            backend: self.name,
            op: "state",
            source,
        })
    }

    /// Runs one case (code without end marker) and reports what happened.
    pub fn run_case(&mut self, code: &[u8], init: &InitialState) -> Result<Observed> {
        let end = self.load_and_run(code, init)?;
        let outcome = match end {
            RunEnd::IoOut { port: END_PORT, .. } => Outcome::Completed,
            RunEnd::IoOut { port, .. }
                if (VECTOR_PORT_BASE..VECTOR_PORT_BASE + 256).contains(&port) =>
            {
                Outcome::Exception {
                    vector: (port - VECTOR_PORT_BASE) as u8,
                }
            }
            RunEnd::TimedOut => {
                return Err(self.run_err(format!(
                    "still running after {:?} (kicked): the case hangs",
                    self.timeout
                )));
            }
            end => {
                let rip = self
                    .state()
                    .map(|s| format!("{:#x}", s.rip))
                    .unwrap_or_default();
                return Err(self.run_err(format!("unexpected exit {end:?} (rip {rip})")));
            }
        };
        let st = self.state()?;
        let mut obs = Observed::blank();
        obs.outcome = outcome;
        obs.gpr = st.gpr;
        obs.gpr[CpuState::RDX] = self.read_u64(SCRATCH_ADDR)?;
        obs.rflags = st.rflags;
        obs.fpu = st.fpu;
        self.read(DATA_ADDR, &mut obs.data)?;
        self.read(STACK_ADDR, &mut obs.stack)?;
        if let Outcome::Exception { vector } = outcome {
            // The IST frame: [error code], rip, cs, rflags, rsp, ss.
            let rsp = st.gpr[CpuState::RSP];
            let frame = if rsp == IST_STACK_TOP - 48 {
                rsp + 8
            } else if rsp == IST_STACK_TOP - 40 {
                rsp
            } else {
                return Err(self.run_err(format!(
                    "exception {vector} left rsp at {rsp:#x}, not an IST frame below \
                     {IST_STACK_TOP:#x}"
                )));
            };
            obs.rip = self.read_u64(frame)?;
            obs.rflags = self.read_u64(frame + 16)?;
            obs.gpr[CpuState::RSP] = self.read_u64(frame + 24)?;
            if vector == 14 {
                obs.cr2 = st.cr2;
            }
        } else {
            obs.rip = CODE_ADDR + code.len() as u64;
        }
        self.complete_exit()?;
        Ok(obs)
    }

    /// From now on cases run with CR4.OSXSAVE and XCR0 = x87|SSE: one
    /// ring-0 `xsetbv` (XCR0 is vCPU state `set_state` leaves alone), then
    /// `xgetbv` to check it took. The host child cannot do this (XSETBV is
    /// privileged); it runs with the host kernel's OSXSAVE and XCR0.
    pub fn enable_xsave(&mut self) -> Result<()> {
        self.cr4_extra |= CR4_OSXSAVE;
        let mut init = crate::generate::blank_state();
        init.gpr[CpuState::RAX] = XCR0_X87_SSE;
        // xsetbv; xor eax, eax; xgetbv (ECX = 0 throughout)
        let obs = self.run_case(&[0x0f, 0x01, 0xd1, 0x31, 0xc0, 0x0f, 0x01, 0xd0], &init)?;
        if obs.outcome != Outcome::Completed || obs.gpr[CpuState::RAX] != XCR0_X87_SSE {
            return Err(self.run_err(format!(
                "setting XCR0 to {XCR0_X87_SSE:#x} with CR4.OSXSAVE: {}, xgetbv {:#x}",
                obs.outcome,
                obs.gpr[CpuState::RAX]
            )));
        }
        Ok(())
    }

    /// CPUID `leaf`/`subleaf` as the guest sees it: [eax, ebx, ecx, edx].
    pub fn cpuid(&mut self, leaf: u32, subleaf: u32) -> Result<[u32; 4]> {
        let mut init = crate::generate::blank_state();
        init.gpr[CpuState::RAX] = u64::from(leaf);
        init.gpr[CpuState::RCX] = u64::from(subleaf);
        let obs = self.run_case(&[0x0f, 0xa2], &init)?;
        if obs.outcome != Outcome::Completed {
            return Err(self.run_err(format!("cpuid leaf {leaf:#x} raised {}", obs.outcome)));
        }
        let g = &obs.gpr;
        Ok([g[0] as u32, g[3] as u32, g[1] as u32, g[2] as u32])
    }

    /// The MXCSR bits the backend accepts, from its FXSAVE image.
    pub fn mxcsr_mask(&mut self) -> Result<u32> {
        let mut init = crate::generate::blank_state();
        init.gpr[CpuState::RBX] = DATA_ADDR;
        // fxsave64 [rbx]
        let obs = self.run_case(&[0x48, 0x0f, 0xae, 0x03], &init)?;
        if obs.outcome != Outcome::Completed {
            return Err(self.run_err(format!("fxsave raised {}", obs.outcome)));
        }
        let mask = u32::from_le_bytes([obs.data[28], obs.data[29], obs.data[30], obs.data[31]]);
        Ok(if mask == 0 { 0xffbf } else { mask })
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".into()
    }
}

/// Exits seen while running random code; see [`run_random_bytes`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RandomBytesReport {
    pub cases: u64,
    /// Cases that ran into the end marker.
    pub completed: u64,
    /// Cases that raised an exception (reached a stub).
    pub exceptions: u64,
    pub halts: u64,
    pub shutdowns: u64,
    /// Other port accesses (answered, and the case went on).
    pub io: u64,
    /// MMIO accesses (answered, and the case went on).
    pub mmio: u64,
    /// Cases still running at the time bound (an infinite loop is valid
    /// guest code); the backend returned promptly when kicked.
    pub timeouts: u64,
    /// `VcpuExit::InternalError`s, with the first message.
    pub internal_errors: u64,
    pub first_internal_error: Option<String>,
}

/// Runs `cases` snippets of random bytes as ring-0, long-mode code (every
/// IDT vector has a stub that reports it) and checks that the backend
/// always comes back: every `Vcpu::run` returns, within the time bound or
/// promptly when kicked, and never panics or returns `Err`. Port and MMIO
/// reads are answered with all-ones and the case goes on, up to a few
/// exits. `Vcpu::state` must work after every case.
pub fn run_random_bytes(hv: &dyn Hypervisor, seed: u64, cases: u64) -> Result<RandomBytesReport> {
    const MAX_EXITS: usize = 16;
    let mut runner = BackendRunner::new(hv)?;
    runner.timeout = Duration::from_millis(300);
    let mut report = RandomBytesReport::default();
    let name = hv.name();
    for index in 0..cases {
        let mut rng = crate::rng::Rng::for_case(seed, "random-bytes", index);
        // Mostly short random runs into the end marker, sometimes most of
        // a page of noise.
        let len = if rng.one_in(4) {
            CODE_SIZE - 64
        } else {
            rng.below(48) as usize + 1
        };
        let mut code = vec![0u8; len];
        rng.fill(&mut code);
        let mut init = crate::generate::random_state(&mut rng, &crate::generate::StateProfile::ALL);
        init.gpr[CpuState::RSP] = STACK_START;
        let context = |e: Error| Error::BackendRun {
            backend: name,
            what: format!(
                "random code, seed {seed:#x} case {index}: {e} (code {:02x?})",
                &code[..code.len().min(32)]
            ),
        };
        // The code may have scribbled on the system area last time.
        let system = runner.system.clone();
        runner.write(SYS_ADDR, &system)?;
        let mut end = runner.load_and_run(&code, &init).map_err(context)?;
        report.cases += 1;
        for exit in 1.. {
            let again = match &end {
                RunEnd::IoOut { port: END_PORT, .. } => {
                    report.completed += 1;
                    false
                }
                RunEnd::IoOut { port, .. }
                    if (VECTOR_PORT_BASE..VECTOR_PORT_BASE + 256).contains(port) =>
                {
                    report.exceptions += 1;
                    false
                }
                RunEnd::Halt => {
                    report.halts += 1;
                    false
                }
                RunEnd::Shutdown => {
                    report.shutdowns += 1;
                    false
                }
                RunEnd::TimedOut => {
                    report.timeouts += 1;
                    false
                }
                RunEnd::InternalError(s) => {
                    report.internal_errors += 1;
                    report
                        .first_internal_error
                        .get_or_insert_with(|| format!("seed {seed:#x} case {index}: {s}"));
                    false
                }
                RunEnd::IoIn { .. } | RunEnd::IoOut { .. } => {
                    report.io += 1;
                    true
                }
                RunEnd::MmioRead { .. } | RunEnd::MmioWrite { .. } => {
                    report.mmio += 1;
                    true
                }
                RunEnd::Interrupted => true,
            };
            if !again || exit >= MAX_EXITS {
                break;
            }
            end = runner.run_once().map_err(context)?;
        }
        // The state must still be readable, and the vCPU reusable.
        runner.state().map_err(context)?;
        runner.complete_exit().map_err(context)?;
    }
    Ok(report)
}
