//! Test guests: memory, 64-bit, 32-bit protected and real-mode
//! environments (GDT, TSS, IDTs, IVT, identity page tables), exception
//! stubs that report their vector, and a run loop that records port
//! output and ends a guest that never exits with a clear failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use iced_x86::code_asm::CodeAssembler;
use vm_memory::{Bytes, GuestAddress};
use vmplay_hypervisor::{
    CpuState, DescriptorTable, GuestMemory, Hypervisor, Segment, Vcpu, VcpuExit, VcpuKicker, Vm,
    VmSpec,
};

use crate::{EmuHypervisor, EmuOptions};

pub const MEM: usize = 8 << 20;
pub const GDT: u64 = 0x500;
pub const TSS: u64 = 0x600;
pub const PML4: u64 = 0x10000;
pub const IDT: u64 = 0x13000;
pub const CODE: u64 = 0x10_0000;
pub const STACK: u64 = 0x8_0000;
pub const IST_STACK: u64 = 0x7_0000;
pub const KCODE: u16 = 0x10;
pub const KDATA: u16 = 0x18;
pub const UDATA: u16 = 0x28;
pub const UCODE: u16 = 0x30;
pub const TR: u16 = 0x40;
/// 32-bit flat kernel code (protected mode).
pub const KCODE32: u16 = 0x08;
/// The 32-bit IDT of [`Guest::protected32`].
pub const IDT32: u64 = 0x2000;
/// [`Guest::exception_stubs`]' code, 8 bytes a vector.
pub const STUBS: u64 = 0x3000;
/// The stack of [`Guest::real_mode`] (reachable with SS = 0).
pub const REAL_STACK: u64 = 0x7000;
/// A scratch data area clear of the tables, stacks and code.
pub const DATA: u64 = 0x20_0000;
/// Exception stubs write their vector here.
pub const VECTOR_PORT: u16 = 0x80;
/// The wall-clock time one run may take before the harness kicks the
/// vCPU and fails the test: a guest looping or faulting forever inside
/// the CPU never exits on its own.
pub const RUN_BUDGET: Duration = Duration::from_secs(60);

pub struct Guest {
    pub vm: Arc<dyn Vm>,
    pub mem: GuestMemory,
    pub vcpu: Box<dyn Vcpu>,
}

/// What a run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes written to COM1 (0x3f8).
    pub serial: Vec<u8>,
    /// Every (port, value) written elsewhere.
    pub ports: Vec<(u16, u64)>,
    pub mmio_writes: Vec<(u64, u64)>,
    pub end: End,
    /// The last vector an exception stub reported on [`VECTOR_PORT`].
    pub vector: Option<u8>,
    /// The vCPU's state when the run ended.
    pub state: CpuState,
}

impl Outcome {
    pub fn halted(&self) -> bool {
        self.end == End::Halt
    }
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub enum End {
    #[default]
    Running,
    Halt,
    Shutdown,
    Interrupted,
    Error,
    /// Stopped for the debugger.
    Debug(vmplay_hypervisor::DebugEvent),
}

pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).expect("test memory")
}

impl Guest {
    pub fn new(vcpus: u32) -> Guest {
        Self::with_options(vcpus, EmuOptions::default())
    }

    /// A guest whose exceptions report through [`Guest::exception_stubs`].
    pub fn with_exception_stubs(vcpus: u32) -> Guest {
        let g = Self::new(vcpus);
        g.exception_stubs();
        g
    }

    /// A guest run by the interpreter alone, with exception stubs: for
    /// tests that pin the interpreter's choice where the SDM leaves a
    /// result undefined (translated code leaves the host CPU's, and
    /// Intel's and AMD's differ; the difftest masks them).
    pub fn interpreted() -> Guest {
        let interp = crate::jit::JitConfig {
            tier: crate::jit::Tier::Interp,
            ..Default::default()
        };
        let opts = EmuOptions {
            jit: Some(interp),
            ..Default::default()
        };
        let g = Self::with_options(1, opts);
        g.exception_stubs();
        g
    }

    pub fn with_options(vcpus: u32, opts: EmuOptions) -> Guest {
        let mem = memory();
        let vm = EmuHypervisor::new(opts)
            .create_vm(&VmSpec { vcpus }, &mem)
            .expect("create vm");
        let vcpu = vm.create_vcpu(0).expect("vcpu 0");
        Guest { vm, mem, vcpu }
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest memory");
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .expect("read guest memory");
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .expect("read guest memory");
        u64::from_le_bytes(b)
    }

    /// Assembles `f` for `bits` at `ip`, stores it there, returns its size.
    pub fn code(&self, bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> usize {
        let mut a = CodeAssembler::new(bits).expect("assembler");
        f(&mut a);
        let bytes = a.assemble(ip).expect("assemble");
        self.write(ip, &bytes);
        bytes.len()
    }

    /// As [`Guest::code`], returning the address after the code.
    pub fn asm(&self, bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> u64 {
        ip + self.code(bits, ip, f) as u64
    }

    /// GDT, TSS (RSP0, IST1), identity page tables over 1 GiB with 2 MiB
    /// user-accessible pages, an empty IDT; returns the 64-bit entry state.
    pub fn long_mode(&self, rip: u64) -> CpuState {
        let gdt: [u64; 10] = [
            0,
            0x00cf_9b00_0000_ffff, // 0x08 kernel code 32
            0x00af_9b00_0000_ffff, // 0x10 kernel code 64
            0x00cf_9300_0000_ffff, // 0x18 kernel data
            0x00cf_fb00_0000_ffff, // 0x20 user code 32
            0x00cf_f300_0000_ffff, // 0x28 user data
            0x00af_fb00_0000_ffff, // 0x30 user code 64
            0,
            // 0x40 64-bit TSS at TSS, limit 0x67
            0x0000_8900_0000_0067 | ((TSS & 0xff_ffff) << 16) | (((TSS >> 24) & 0xff) << 56),
            TSS >> 32,
        ];
        for (k, d) in gdt.iter().enumerate() {
            self.write_u64(GDT + 8 * k as u64, *d);
        }
        self.write_u64(TSS + 4, STACK); // RSP0
        self.write_u64(TSS + 0x24, IST_STACK); // IST1
        let pdpt = PML4 + 0x1000;
        let pd = PML4 + 0x2000;
        self.write_u64(PML4, pdpt | 7);
        self.write_u64(pdpt, pd | 7);
        for k in 0..512u64 {
            self.write_u64(pd + 8 * k, (k << 21) | 0x87);
        }
        let code = Segment {
            selector: KCODE,
            type_: 0xb,
            s: true,
            present: true,
            l: true,
            g: true,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        let data = Segment::flat(KDATA, 0x3, false, true);
        CpuState {
            rip,
            rflags: 2,
            cs: code,
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            tr: Segment::tss(TR, TSS, 0x67),
            ldt: Segment::no_ldt(),
            gdt: vmplay_hypervisor::DescriptorTable {
                base: GDT,
                limit: 0x4f,
            },
            idt: vmplay_hypervisor::DescriptorTable {
                base: IDT,
                limit: 0xfff,
            },
            cr0: 0x8005_0033,
            cr3: PML4,
            cr4: 0x220,
            efer: 0xd01,
            gpr: {
                let mut g = [0; 16];
                g[4] = STACK;
                g
            },
            ..Default::default()
        }
    }

    /// Points IDT vector `v` at `handler` (64-bit interrupt gate, DPL 3
    /// so `int n` from ring 3 works, IST `ist`).
    pub fn idt64(&self, v: u8, handler: u64, ist: u8) {
        let lo = (handler & 0xffff)
            | (u64::from(KCODE) << 16)
            | (u64::from(ist) << 32)
            | (0xeeu64 << 40)
            | ((handler >> 16) & 0xffff) << 48;
        self.write_u64(IDT + 16 * u64::from(v), lo);
        self.write_u64(IDT + 16 * u64::from(v) + 8, handler >> 32);
    }

    /// Points vectors 0..32 of the 64-bit IDT (kernel gates), the 32-bit
    /// IDT at [`IDT32`] and the real-mode IVT at stubs that write their
    /// vector to [`VECTOR_PORT`] (rax kept) and halt.
    pub fn exception_stubs(&self) {
        for v in 0..32u64 {
            let stub = STUBS + 8 * v;
            // push rax; mov al, v; out VECTOR_PORT, al; pop rax; hlt: the
            // same bytes in 16-, 32- and 64-bit code.
            self.write(
                stub,
                &[0x50, 0xb0, v as u8, 0xe6, VECTOR_PORT as u8, 0x58, 0xf4],
            );
            let gate = (stub & 0xffff) | ((stub >> 16) & 0xffff) << 48 | 0x8e << 40;
            self.write_u64(IDT + 16 * v, gate | u64::from(KCODE) << 16);
            self.write_u64(IDT + 16 * v + 8, stub >> 32);
            self.write_u64(IDT32 + 8 * v, gate | u64::from(KCODE32) << 16);
            self.write(4 * v, &(stub as u32).to_le_bytes()); // IVT: offset, segment 0
        }
    }

    /// Points 32-bit IDT vector `v` at `handler` (interrupt gate, DPL 3).
    pub fn idt32(&self, v: u8, handler: u32) {
        let h = u64::from(handler);
        let gate = (h & 0xffff) | (h >> 16) << 48 | 0xeeu64 << 40 | u64::from(KCODE32) << 16;
        self.write_u64(IDT32 + 8 * u64::from(v), gate);
    }

    /// 32-bit protected mode without paging at `rip`: the tables of
    /// [`Guest::long_mode`], CS = [`KCODE32`], the IDT at [`IDT32`].
    pub fn protected32(&self, rip: u64) -> CpuState {
        let mut s = self.long_mode(rip);
        s.cs = Segment::flat(KCODE32, 0xb, false, true);
        (s.cr0, s.cr4, s.efer) = (0x33, 0x200, 0);
        s.idt = DescriptorTable {
            base: IDT32,
            limit: 256 * 8 - 1,
        };
        s
    }

    /// Real mode at 0:`rip` with the stack at 0:[`REAL_STACK`].
    pub fn real_mode(&self, rip: u64) -> CpuState {
        let mut s = CpuState::reset();
        s.cs = Segment::real_mode(0, true);
        let d = Segment::real_mode(0, false);
        (s.ds, s.es, s.ss, s.fs, s.gs) = (d, d, d, d, d);
        s.rip = rip;
        s.gpr[4] = REAL_STACK;
        s
    }

    /// Loads `s` and runs it until `hlt` (or something else stops it);
    /// port and MMIO reads read all-ones.
    pub fn start(&mut self, s: &CpuState) -> Outcome {
        self.vcpu.set_state(s).expect("set_state");
        self.run_with(10_000, |_| u64::MAX, |_| u64::MAX)
    }

    /// Runs until halt/shutdown or `max` exits, answering port reads with
    /// `answer(port)` and MMIO reads with `mmio(addr)`.
    pub fn run_with(
        &mut self,
        max: usize,
        answer: impl FnMut(u16) -> u64,
        mmio: impl FnMut(u64) -> u64,
    ) -> Outcome {
        run_vcpu(self.vcpu.as_mut(), max, answer, mmio)
    }

    pub fn run(&mut self) -> Outcome {
        self.run_with(10_000, |_| 0, |_| 0)
    }

    pub fn state(&self) -> CpuState {
        self.vcpu.state().expect("state")
    }
}

/// [`Guest::run_with`] for any vCPU (an AP on its own thread). Panics
/// when the run takes longer than [`RUN_BUDGET`].
pub fn run_vcpu(
    vcpu: &mut dyn Vcpu,
    max: usize,
    answer: impl FnMut(u16) -> u64,
    mmio: impl FnMut(u64) -> u64,
) -> Outcome {
    run_vcpu_within(vcpu, max, RUN_BUDGET, answer, mmio)
}

/// [`run_vcpu`] with a wall-clock `budget` of its own.
pub fn run_vcpu_within(
    vcpu: &mut dyn Vcpu,
    max: usize,
    budget: Duration,
    mut answer: impl FnMut(u16) -> u64,
    mut mmio: impl FnMut(u64) -> u64,
) -> Outcome {
    let watch = Watch::start(vcpu.kicker(), budget);
    let mut o = Outcome::default();
    o.end = run_exits(vcpu, max, &mut o, &mut answer, &mut mmio);
    o.state = vcpu.state().expect("state");
    if watch.fired() {
        panic!(
            "guest ran {budget:?} without halting (RIP {:#x}): looping or faulting forever",
            o.state.rip
        );
    }
    o
}

fn run_exits(
    vcpu: &mut dyn Vcpu,
    max: usize,
    o: &mut Outcome,
    answer: &mut impl FnMut(u16) -> u64,
    mmio: &mut impl FnMut(u64) -> u64,
) -> End {
    for _ in 0..max {
        match vcpu.run() {
            Ok(VcpuExit::IoOut { port: 0x3f8, data }) => o.serial.push(data[0]),
            Ok(VcpuExit::IoOut { port, data }) => {
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                if port == VECTOR_PORT {
                    o.vector = Some(b[0]);
                }
                o.ports.push((port, u64::from_le_bytes(b)));
            }
            Ok(VcpuExit::IoIn { port, data }) => {
                let v = answer(port).to_le_bytes();
                let n = data.len();
                data.copy_from_slice(&v[..n]);
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                let v = mmio(addr).to_le_bytes();
                let n = data.len();
                data.copy_from_slice(&v[..n]);
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                o.mmio_writes.push((addr, u64::from_le_bytes(b)));
            }
            Ok(VcpuExit::Halt) => return End::Halt,
            Ok(VcpuExit::Shutdown) => return End::Shutdown,
            Ok(VcpuExit::Interrupted) => return End::Interrupted,
            Ok(VcpuExit::Debug(ev)) => return End::Debug(ev),
            Ok(VcpuExit::InternalError(_)) | Err(_) => return End::Error,
        }
    }
    End::Running
}

/// A run's entry in the harness' watchdog: kicked once its deadline passes.
struct Watch {
    fired: Arc<AtomicBool>,
}

type Watches = Mutex<Vec<(Instant, Arc<dyn VcpuKicker>, Arc<AtomicBool>)>>;

static WATCHES: OnceLock<Arc<Watches>> = OnceLock::new();

impl Watch {
    fn start(kicker: Arc<dyn VcpuKicker>, budget: Duration) -> Watch {
        let watches = WATCHES.get_or_init(|| {
            let w: Arc<Watches> = Arc::default();
            let list = w.clone();
            // One thread for the whole test binary, polling coarsely.
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = Instant::now();
                    for (deadline, kicker, fired) in list.lock().unwrap().iter() {
                        if now >= *deadline && !fired.swap(true, Ordering::Relaxed) {
                            kicker.kick();
                        }
                    }
                }
            });
            w
        });
        let fired = Arc::new(AtomicBool::new(false));
        watches
            .lock()
            .unwrap()
            .push((Instant::now() + budget, kicker, fired.clone()));
        Watch { fired }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(w) = WATCHES.get() {
            w.lock()
                .unwrap()
                .retain(|e| !Arc::ptr_eq(&e.2, &self.fired));
        }
    }
}

/// The harness' own environments: a 32-bit gate set with [`Guest::idt32`]
/// reaches its handler, and an exception stub reports its vector.
#[test]
fn idt32_gates_and_stubs_report() {
    use iced_x86::code_asm::*;
    let mut g = Guest::with_exception_stubs(1);
    let handler = g.asm(32, CODE, |a| {
        a.int(0x40).unwrap();
        a.ud2().unwrap();
    });
    g.asm(32, handler, |a| {
        a.mov(al, 0x40).unwrap();
        a.out(0x81, al).unwrap();
        a.iretd().unwrap();
    });
    g.idt32(0x40, handler as u32);
    let o = g.start(&g.protected32(CODE));
    assert_eq!(o.ports, [(0x81, 0x40), (VECTOR_PORT, 6)]);
    assert_eq!(o.vector, Some(6), "#UD after the iret");
    assert!(o.halted());
}

/// A guest faulting forever inside the CPU (its #PF handler faults
/// again at once, never exiting) ends with the watchdog's failure.
#[test]
#[should_panic(expected = "looping or faulting forever")]
fn a_guest_faulting_forever_fails_at_its_budget() {
    use iced_x86::code_asm::*;
    let mut g = Guest::new(1);
    let s = g.long_mode(CODE);
    // The handler returns to the faulting load, which faults again.
    g.code(64, CODE + 0x100, |a| {
        a.add(rsp, 8).unwrap();
        a.iretq().unwrap();
    });
    g.idt64(14, CODE + 0x100, 0);
    g.code(64, CODE, |a| {
        a.mov(rax, 0x4000_0000u64).unwrap();
        a.mov(rbx, qword_ptr(rax)).unwrap();
    });
    g.vcpu.set_state(&s).unwrap();
    run_vcpu_within(
        g.vcpu.as_mut(),
        10,
        Duration::from_millis(300),
        |_| 0,
        |_| 0,
    );
}

/// Leaves ring 0 for ring 3 at `user` (code selector `code_sel`, stack
/// `user_rsp`, `rflags`) with an `iretq`.
pub fn iretq_to_ring3(a: &mut CodeAssembler, user: u64, user_rsp: u64, code_sel: u16, rflags: i32) {
    a.push(i32::from(UDATA | 3)).unwrap();
    a.push(user_rsp as i32).unwrap();
    a.push(rflags).unwrap();
    a.push(i32::from(code_sel | 3)).unwrap();
    a.push(user as i32).unwrap();
    a.iretq().unwrap();
}

/// Emits an `iretd` to `cs:eip` with stack `ss:esp` (32-bit code).
pub fn iretd_to(a: &mut CodeAssembler, cs: u16, eip: u32, ss: u16, esp: u32) {
    a.push(u32::from(ss)).unwrap();
    a.push(esp).unwrap();
    a.push(0x2).unwrap();
    a.push(u32::from(cs)).unwrap();
    a.push(eip).unwrap();
    a.iretd().unwrap();
}
