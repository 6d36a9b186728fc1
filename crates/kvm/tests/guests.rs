//! Tiny guests run on /dev/kvm through the seam traits only: each test
//! assembles a few instructions, loads them with a register state, and
//! checks the exits the machine would see.
//!
//! Where /dev/kvm cannot be opened a test prints "skipping: ..." and
//! passes; any other failure to start KVM fails the test.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmplay_hypervisor::{
    CpuState, DescriptorTable, Error, GuestMemory, Hypervisor, IoEventAddress, Segment, Vcpu,
    VcpuExit, VcpuKicker, Vm, VmSpec,
};
use vmplay_kvm::KvmHypervisor;

/// Where test code is loaded.
const CODE: u64 = 0x1000;
/// Data the guests read or write.
const DATA: u64 = 0x1800;
const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const STACK_TOP: u64 = 0x8000;
const MMIO: u64 = 0xd000_0000;
const RAM: usize = 2 << 20;
/// How long a guest may take before the watchdog kicks it. Ring-0 guest
/// code is emulated on nested PVM hosts, so this is generous.
const WATCHDOG: Duration = Duration::from_secs(20);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------
// Harness

/// KVM, or `None` (after saying so) where /dev/kvm cannot be opened.
fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(h) => Some(h),
        Err(Error::Unavailable { reason, .. }) if reason.starts_with("cannot open /dev/kvm") => {
            eprintln!("skipping: /dev/kvm not available: {reason}");
            None
        }
        Err(e) => panic!("KVM is present but unusable: {e}"),
    }
}

struct Machine {
    vm: Arc<dyn Vm>,
    mem: GuestMemory,
}

impl Machine {
    fn new(h: &KvmHypervisor, vcpus: u32) -> Machine {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let vm = h.create_vm(&VmSpec { vcpus }, &mem).unwrap();
        Machine { vm, mem }
    }

    fn load(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn vcpu(&self, id: u32, state: Option<&CpuState>) -> Box<dyn Vcpu> {
        let mut vcpu = self.vm.create_vcpu(id).unwrap();
        if let Some(state) = state {
            vcpu.set_state(state).unwrap();
        }
        vcpu
    }
}

fn asm(
    bitness: u32,
    ip: u64,
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    build(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// An exit with its data copied out, so tests can compare and keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exit {
    In(u16, usize),
    Out(u16, Vec<u8>),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    Halt,
    Shutdown,
    Internal(String),
    Interrupted,
}

/// Runs to the next exit, answering a read with the first bytes of
/// `answer`.
fn step(vcpu: &mut dyn Vcpu, answer: &[u8]) -> Exit {
    match vcpu.run().expect("KVM_RUN failed") {
        VcpuExit::IoIn { port, data } => {
            data.copy_from_slice(&answer[..data.len()]);
            Exit::In(port, data.len())
        }
        VcpuExit::IoOut { port, data } => Exit::Out(port, data.to_vec()),
        VcpuExit::MmioRead { addr, data } => {
            data.copy_from_slice(&answer[..data.len()]);
            Exit::MmioRead(addr, data.len())
        }
        VcpuExit::MmioWrite { addr, data } => Exit::MmioWrite(addr, data.to_vec()),
        VcpuExit::Halt => Exit::Halt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::InternalError(text) => Exit::Internal(text),
        VcpuExit::Interrupted => Exit::Interrupted,
        VcpuExit::Debug(ev) => Exit::Internal(format!("unexpected debug exit {ev:?}")),
    }
}

/// Kicks a vCPU if the test has not finished with it in time, so a guest
/// stuck in the kernel fails its test instead of hanging the run.
struct Watchdog {
    _stop: mpsc::Sender<()>,
}

impl Watchdog {
    fn new(kicker: Arc<dyn VcpuKicker>) -> Watchdog {
        let (stop, stopped) = mpsc::channel::<()>();
        thread::spawn(move || {
            let mut wait = WATCHDOG;
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                kicker.kick();
                wait = Duration::from_secs(1);
            }
        });
        Watchdog { _stop: stop }
    }
}

/// A vCPU with a watchdog.
fn guarded(vcpu: Box<dyn Vcpu>) -> (Box<dyn Vcpu>, Watchdog) {
    let dog = Watchdog::new(vcpu.kicker());
    (vcpu, dog)
}

// ---------------------------------------------------------------------
// Register states

fn real_mode(ip: u64) -> CpuState {
    CpuState {
        cs: Segment::real_mode(0, true),
        rip: ip,
        gpr: {
            let mut g = [0; 16];
            g[CpuState::RSP] = STACK_TOP;
            g
        },
        ..CpuState::reset()
    }
}

/// A flat GDT: null, 32-bit code (0x08), data (0x10), 64-bit code (0x18).
fn write_gdt(m: &Machine) {
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_9b00_0000_ffff,
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    m.load(GDT, &bytes);
}

fn protected_mode(m: &Machine, ip: u64) -> CpuState {
    write_gdt(m);
    let data = Segment::flat(0x10, 0x3, false, true);
    let mut s = CpuState {
        rip: ip,
        rflags: 0x2,
        cs: Segment::flat(0x08, 0xb, false, true),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment::tss(0, 0, 0x67),
        ldt: Segment::no_ldt(),
        gdt: DescriptorTable {
            base: GDT,
            limit: 0x1f,
        },
        cr0: 0x11,
        ..CpuState::default()
    };
    s.gpr[CpuState::RSP] = STACK_TOP;
    s
}

/// Long mode with the low 4 GiB identity-mapped by 2 MiB pages.
fn long_mode(m: &Machine, ip: u64) -> CpuState {
    let pdpt = PML4 + 0x1000;
    let pd = PML4 + 0x2000;
    m.load(PML4, &(pdpt | 3).to_le_bytes());
    for i in 0..4u64 {
        m.load(pdpt + i * 8, &((pd + i * 0x1000) | 3).to_le_bytes());
    }
    for i in 0..2048u64 {
        m.load(pd + i * 8, &((i << 21) | 0x83).to_le_bytes());
    }
    CpuState {
        cs: Segment::flat(0x18, 0xb, true, false),
        cr0: 0x8000_0011,
        cr3: PML4,
        cr4: 0x20,
        efer: 0x500,
        ..protected_mode(m, ip)
    }
}

// ---------------------------------------------------------------------
// Port I/O

#[test]
fn out_in_real_mode_reaches_the_machine() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.mov(dx, 0x3f8)?;
            a.mov(al, b'A' as i32)?;
            a.out(dx, al)?;
            a.hlt()
        }),
    );
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&real_mode(CODE))));
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x3f8, vec![b'A']));
}

#[test]
fn in_returns_what_the_machine_fills() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.mov(dx, 0x71)?;
            a.in_(al, dx)?;
            a.mov(dx, 0x3f8)?;
            a.out(dx, al)?;
            a.mov(dx, 0x71)?;
            a.in_(eax, dx)?;
            a.mov(dx, 0x3f8)?;
            a.out(dx, eax)?;
            a.hlt()
        }),
    );
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&real_mode(CODE))));
    assert_eq!(step(&mut *vcpu, &[0x5a]), Exit::In(0x71, 1));
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x3f8, vec![0x5a]));
    assert_eq!(step(&mut *vcpu, &[1, 2, 3, 4]), Exit::In(0x71, 4));
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x3f8, vec![1, 2, 3, 4]));
}

#[test]
fn rep_outsb_gives_one_exit_per_byte_in_order() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(DATA, b"hello");
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.mov(si, DATA as i32)?;
            a.mov(cx, 5)?;
            a.mov(dx, 0x3f8)?;
            a.cld()?;
            a.rep().outsb()?;
            // Resumes after the string: the count and pointer are right.
            a.mov(ax, cx)?;
            a.mov(dx, 0x80)?;
            a.out(dx, ax)?;
            a.mov(ax, si)?;
            a.out(dx, ax)?;
            a.hlt()
        }),
    );
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&real_mode(CODE))));
    for &byte in b"hello" {
        assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x3f8, vec![byte]));
    }
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x80, vec![0, 0]));
    let si_after = (DATA as u16 + 5).to_le_bytes().to_vec();
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x80, si_after));
}

#[test]
fn rep_insw_fills_guest_memory_one_element_per_exit() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.mov(di, DATA as i32)?;
            a.mov(cx, 3)?;
            a.mov(dx, 0x1f0)?;
            a.cld()?;
            a.rep().insw()?;
            a.mov(dx, 0x80)?;
            a.out(dx, al)?;
            a.hlt()
        }),
    );
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&real_mode(CODE))));
    let words: [[u8; 2]; 3] = [[0x11, 0x22], [0x33, 0x44], [0x55, 0x66]];
    for w in &words {
        assert_eq!(step(&mut *vcpu, w), Exit::In(0x1f0, 2));
    }
    assert!(matches!(step(&mut *vcpu, &[]), Exit::Out(0x80, _)));
    let mut got = [0u8; 6];
    m.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0x11, 0x22, 0x33, 0x44, 0x55, 0x66]);
}

// ---------------------------------------------------------------------
// MMIO

#[test]
fn mmio_exits_in_protected_mode() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(32, CODE, |a| {
            a.mov(eax, dword_ptr(MMIO as u32))?;
            a.mov(dword_ptr(MMIO as u32 + 4), eax)?;
            a.mov(byte_ptr(MMIO as u32 + 0x10), 0x99)?;
            a.hlt()
        }),
    );
    let state = protected_mode(&m, CODE);
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    let value = [0x78, 0x56, 0x34, 0x12];
    assert_eq!(step(&mut *vcpu, &value), Exit::MmioRead(MMIO, 4));
    assert_eq!(
        step(&mut *vcpu, &[]),
        Exit::MmioWrite(MMIO + 4, value.to_vec())
    );
    assert_eq!(
        step(&mut *vcpu, &[]),
        Exit::MmioWrite(MMIO + 0x10, vec![0x99])
    );
}

#[test]
fn mmio_and_port_exits_in_long_mode() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(64, CODE, |a| {
            a.mov(rax, MMIO)?;
            a.mov(rbx, qword_ptr(rax))?;
            a.mov(qword_ptr(rax + 8), rbx)?;
            a.mov(dx, 0x3f8)?;
            a.mov(eax, ebx)?;
            a.out(dx, eax)?;
            a.hlt()
        }),
    );
    let state = long_mode(&m, CODE);
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    let value = 0x0123_4567_89ab_cdef_u64.to_le_bytes();
    assert_eq!(step(&mut *vcpu, &value), Exit::MmioRead(MMIO, 8));
    assert_eq!(
        step(&mut *vcpu, &[]),
        Exit::MmioWrite(MMIO + 8, value.to_vec())
    );
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x3f8, value[..4].to_vec()));
}

// ---------------------------------------------------------------------
// Kicks and halts

/// Runs `vcpu` on its own thread, reporting each exit; the thread stops
/// after `steps` exits and hands the vCPU back.
fn run_on_thread(
    mut vcpu: Box<dyn Vcpu>,
    steps: usize,
) -> (mpsc::Receiver<Exit>, thread::JoinHandle<Box<dyn Vcpu>>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        for _ in 0..steps {
            let exit = step(&mut *vcpu, &[0; 8]);
            if tx.send(exit).is_err() {
                break;
            }
        }
        vcpu
    });
    (rx, handle)
}

fn next(rx: &mpsc::Receiver<Exit>) -> Exit {
    rx.recv_timeout(WATCHDOG)
        .expect("the vCPU thread reported nothing")
}

fn assert_quiet(rx: &mpsc::Receiver<Exit>, what: &str) {
    match rx.recv_timeout(QUIET) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("{what}: expected the vCPU to stay in KVM_RUN, got {other:?}"),
    }
}

/// With the in-kernel LAPIC, KVM keeps a halted vCPU in the kernel rather
/// than reporting KVM_EXIT_HLT, even with interrupts off: only a kick
/// brings `cli; hlt` back to the machine.
#[test]
fn kick_ends_a_vcpu_blocked_in_cli_hlt() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    let code = asm(16, CODE, |a| {
        a.mov(dx, 0x80)?;
        a.out(dx, al)?;
        a.cli()?;
        a.hlt()
    });
    m.load(CODE, &code);
    let vcpu = m.vcpu(0, Some(&real_mode(CODE)));
    let kicker = vcpu.kicker();
    let (rx, handle) = run_on_thread(vcpu, 3);
    assert!(matches!(next(&rx), Exit::Out(0x80, _)));
    assert_quiet(&rx, "cli; hlt");
    kicker.kick();
    assert_eq!(next(&rx), Exit::Interrupted);
    // The kick was consumed: the next run halts again until kicked again.
    assert_quiet(&rx, "cli; hlt after a kick");
    kicker.kick();
    assert_eq!(next(&rx), Exit::Interrupted);
    let vcpu = handle.join().unwrap();
    let state = vcpu.state().unwrap();
    assert_eq!(state.rip, CODE + code.len() as u64, "halted at the hlt");
}

#[test]
fn kick_before_run_is_honoured_once() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.mov(dx, 0x80)?;
            a.out(dx, al)?;
            a.hlt()
        }),
    );
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&real_mode(CODE))));
    vcpu.kicker().kick();
    vcpu.kicker().kick();
    assert_eq!(step(&mut *vcpu, &[]), Exit::Interrupted);
    assert!(matches!(step(&mut *vcpu, &[]), Exit::Out(0x80, _)));
}

#[test]
fn kicker_outliving_its_vcpu_is_harmless() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    let vcpu = m.vcpu(0, None);
    let kicker = vcpu.kicker();
    drop(vcpu);
    kicker.kick();
}

#[test]
fn application_processor_waits_for_sipi_until_kicked() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 2);
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.mov(dx, 0x3f8)?;
            a.out(dx, al)?;
            a.hlt()
        }),
    );
    let _bsp = m.vcpu(0, None);
    // Registers loaded into an AP do not make it runnable: it still waits
    // for INIT/SIPI (which will replace CS:IP anyway). A runnable AP would
    // report the `out` at once.
    let ap = m.vcpu(1, Some(&real_mode(CODE)));
    let kicker = ap.kicker();
    let (rx, _handle) = run_on_thread(ap, 1);
    assert_quiet(&rx, "AP before SIPI");
    kicker.kick();
    assert_eq!(next(&rx), Exit::Interrupted);
}

/// The BSP sends INIT and SIPI through its in-kernel LAPIC; the AP wakes
/// in real mode at the SIPI page and reads its own APIC ID from CPUID.
#[test]
fn sipi_starts_an_application_processor_with_its_own_apic_id() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 2);
    const AP_CODE: u64 = 0x3000;
    const ICR_LOW: u32 = 0xfee0_0300;
    const ICR_HIGH: u32 = 0xfee0_0310;
    m.load(
        CODE,
        &asm(32, CODE, |a| {
            a.mov(dword_ptr(ICR_HIGH), 1 << 24)?;
            a.mov(dword_ptr(ICR_LOW), 0x4500)?; // INIT, assert
            a.mov(dword_ptr(ICR_LOW), 0x4600 | (AP_CODE >> 12) as i32)?; // SIPI
            a.mov(dx, 0x80)?;
            a.out(dx, al)?;
            a.cli()?;
            a.hlt()
        }),
    );
    m.load(
        AP_CODE,
        &asm(16, AP_CODE, |a| {
            a.mov(eax, 1)?;
            a.cpuid()?;
            a.shr(ebx, 24)?;
            a.mov(al, bl)?;
            a.mov(dx, 0x3f8)?;
            a.out(dx, al)?;
            a.cli()?;
            a.hlt()
        }),
    );
    let state = protected_mode(&m, CODE);
    let (mut bsp, _dog) = guarded(m.vcpu(0, Some(&state)));
    let ap = m.vcpu(1, None);
    let ap_kicker = ap.kicker();
    let (rx, _handle) = run_on_thread(ap, 1);
    let _ap_dog = Watchdog::new(ap_kicker);
    assert!(matches!(step(&mut *bsp, &[]), Exit::Out(0x80, _)));
    assert_eq!(next(&rx), Exit::Out(0x3f8, vec![1]));
}

// ---------------------------------------------------------------------
// CPUID

#[test]
fn cpuid_shows_kvm_signature_and_hypervisor_bit() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(32, CODE, |a| {
            a.mov(eax, 0x4000_0000)?;
            a.cpuid()?;
            a.mov(esi, edx)?;
            a.mov(dx, 0x3f8)?;
            a.out(dx, eax)?;
            a.mov(eax, ebx)?;
            a.out(dx, eax)?;
            a.mov(eax, ecx)?;
            a.out(dx, eax)?;
            a.mov(eax, esi)?;
            a.out(dx, eax)?;
            a.mov(eax, 1)?;
            a.cpuid()?;
            a.mov(dx, 0x3f8)?;
            a.mov(eax, ecx)?;
            a.out(dx, eax)?;
            a.mov(eax, ebx)?;
            a.out(dx, eax)?;
            a.hlt()
        }),
    );
    let state = protected_mode(&m, CODE);
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    let mut words = Vec::new();
    for _ in 0..6 {
        match step(&mut *vcpu, &[]) {
            Exit::Out(0x3f8, data) => words.push(u32::from_le_bytes(data.try_into().unwrap())),
            other => panic!("expected a 4-byte out, got {other:?}"),
        }
    }
    assert_eq!(words[0], 0x4000_0001, "max hypervisor leaf");
    let signature: Vec<u8> = words[1..4].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&signature, b"KVMKVMKVM\0\0\0");
    assert_ne!(words[4] & (1 << 31), 0, "leaf 1 ECX hypervisor bit");
    assert_eq!(words[5] >> 24, 0, "BSP initial APIC ID");
}

// ---------------------------------------------------------------------
// State and faults

/// A long-mode state with a distinct value in every register KVM keeps
/// as given (accessed bits set, as the CPU caches them).
fn busy_long_mode_state(m: &Machine) -> CpuState {
    let mut s = long_mode(m, 0x1234);
    for (i, r) in s.gpr.iter_mut().enumerate() {
        *r = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1);
    }
    s.rflags = 0x202;
    s.es.base = 0x1000;
    s.fs.base = 0x7fff_1234_0000;
    s.gs.base = 0xffff_8880_0000_0000;
    s.tr = Segment::tss(0x28, 0x580, 0x67);
    s.idt = DescriptorTable {
        base: 0x520,
        limit: 0xfff,
    };
    s.cr2 = 0xdead_b000;
    s.cr8 = 3;
    s.fpu.fcw = 0x27f;
    s.fpu.mxcsr = 0x1fa0;
    s.fpu.xmm[3] = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff;
    s
}

#[test]
fn state_round_trips_through_kvm() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    let s = busy_long_mode_state(&m);
    let mut vcpu = m.vcpu(0, None);
    vcpu.set_state(&s).unwrap();
    let back = vcpu.state().unwrap();
    assert_eq!(back.gpr, s.gpr);
    assert_eq!((back.rip, back.rflags), (s.rip, s.rflags));
    for (name, got, want) in [
        ("cs", back.cs, s.cs),
        ("ds", back.ds, s.ds),
        ("es", back.es, s.es),
        ("fs", back.fs, s.fs),
        ("gs", back.gs, s.gs),
        ("ss", back.ss, s.ss),
        ("tr", back.tr, s.tr),
    ] {
        assert_eq!(got, want, "{name}");
    }
    assert_eq!((back.gdt, back.idt), (s.gdt, s.idt));
    assert_eq!(
        (back.cr0, back.cr2, back.cr3, back.cr4, back.cr8, back.efer),
        (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer)
    );
    assert_eq!(back.fpu, s.fpu);
    assert_eq!(back, s, "every field, the LDTR included");
}

#[test]
fn state_shows_what_the_guest_computed() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    let code = asm(64, CODE, |a| {
        a.mov(rax, 0x1111_2222_3333_4444u64)?;
        a.add(rax, 0x10)?;
        a.mov(r15, rax)?;
        a.mov(dx, 0x80)?;
        a.out(dx, al)?;
        a.hlt()
    });
    m.load(CODE, &code);
    let state = long_mode(&m, CODE);
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    assert!(matches!(step(&mut *vcpu, &[]), Exit::Out(0x80, _)));
    let s = vcpu.state().unwrap();
    assert_eq!(s.gpr[15], 0x1111_2222_3333_4454);
    assert_eq!(s.rip, CODE + code.len() as u64 - 1, "stopped before hlt");
    assert_eq!(s.efer & 0x400, 0x400, "still in long mode");
}

/// The x87/SSE part of the state is what the guest's instructions see.
#[test]
fn fpu_state_reaches_the_guest() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(64, CODE, |a| {
            // fxsave rather than stmxcsr/movq: nested PVM hosts run ring 0
            // through KVM's instruction emulator, which has fxsave only.
            let image = DATA as u32;
            a.mov(dx, 0x3f8)?;
            a.fxsave(ptr(image))?;
            a.mov(eax, dword_ptr(image + 24))?; // MXCSR
            a.out(dx, eax)?;
            a.mov(ax, word_ptr(image))?; // FCW
            a.out(dx, ax)?;
            a.mov(eax, dword_ptr(image + 160 + 5 * 16))?; // XMM5
            a.out(dx, eax)?;
            a.hlt()
        }),
    );
    let mut state = long_mode(&m, CODE);
    state.cr4 |= 0x600; // OSFXSR, OSXMMEXCPT: SSE allowed
    state.fpu.mxcsr = 0x1fa0;
    state.fpu.fcw = 0x27f;
    state.fpu.xmm[5] = 0xcafe_f00d;
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    let outs: Vec<Exit> = (0..3).map(|_| step(&mut *vcpu, &[])).collect();
    assert_eq!(
        outs,
        [
            Exit::Out(0x3f8, 0x1fa0u32.to_le_bytes().to_vec()),
            Exit::Out(0x3f8, 0x27fu16.to_le_bytes().to_vec()),
            Exit::Out(0x3f8, 0xcafe_f00du32.to_le_bytes().to_vec()),
        ]
    );
}

#[test]
fn triple_fault_is_shutdown() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    // ud2 rather than int3: KVM's instruction emulator cannot deliver a
    // software interrupt in protected mode, and nested PVM hosts emulate
    // all ring-0 code, so int3 ends in an emulation error there.
    m.load(
        CODE,
        &asm(32, CODE, |a| {
            a.ud2()?;
            a.hlt()
        }),
    );
    // An empty IDT: #UD cannot be delivered, nor the #GP, nor the #DF.
    let state = CpuState {
        idt: DescriptorTable { base: 0, limit: 0 },
        ..protected_mode(&m, CODE)
    };
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    assert_eq!(step(&mut *vcpu, &[]), Exit::Shutdown);
}

// ---------------------------------------------------------------------
// Configuration errors

fn unsupported_text(result: Result<impl Sized, Error>) -> String {
    match result {
        Err(Error::Unsupported(text)) => text,
        Err(other) => panic!("expected Unsupported, got {other}"),
        Ok(_) => panic!("expected Unsupported, got success"),
    }
}

#[test]
fn vm_without_vcpus_is_refused() {
    let Some(h) = kvm() else { return };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let text = unsupported_text(h.create_vm(&VmSpec { vcpus: 0 }, &mem));
    assert!(text.contains("at least one vCPU"), "{text}");
}

#[test]
fn vm_with_more_vcpus_than_kvm_allows_is_refused() {
    let Some(h) = kvm() else { return };
    assert!(h.max_vcpus() >= 1);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let spec = VmSpec {
        vcpus: h.max_vcpus() + 1,
    };
    let text = unsupported_text(h.create_vm(&spec, &mem));
    assert!(text.contains(&h.max_vcpus().to_string()), "{text}");
}

#[test]
fn vcpu_ids_outside_the_vm_or_reused_are_refused() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 2);
    let text = unsupported_text(m.vm.create_vcpu(2));
    assert!(text.contains("vCPU id 2"), "{text}");
    let _first = m.vm.create_vcpu(1).unwrap();
    let text = unsupported_text(m.vm.create_vcpu(1));
    assert!(text.contains("already exists"), "{text}");
}

#[test]
fn ram_over_kvm_private_pages_is_refused() {
    let Some(h) = kvm() else { return };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0xfff0_0000), 0x10_0000)]).unwrap();
    let text = unsupported_text(h.create_vm(&VmSpec { vcpus: 1 }, &mem));
    assert!(text.contains("0xfffbc000"), "{text}");
}

// ---------------------------------------------------------------------
// Interrupts and ioevents

#[test]
fn irq_lines_exist_for_the_ioapic_pins_only() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    for gsi in 0..24 {
        let line = m.vm.irq_line(gsi).unwrap();
        line.set_level(true);
        line.set_level(false);
        line.pulse();
    }
    let text = unsupported_text(m.vm.irq_line(24));
    assert!(text.contains("GSI 24"), "{text}");
}

/// A real-mode guest programs the 8259, enables interrupts and halts;
/// a pulse on GSI 3 runs its handler, which reports on a port.
#[test]
fn pulse_delivers_an_interrupt_through_the_pic() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    const HANDLER: u64 = 0x1400;
    const VECTOR: u64 = 0x23; // IRQ 3 with the PIC based at 0x20
    m.load(VECTOR * 4, &(HANDLER as u32).to_le_bytes()); // IVT: 0000:HANDLER
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            for (port, value) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)] {
                a.mov(al, value)?;
                a.out(port, al)?;
            }
            a.mov(al, 0xf7)?; // unmask IRQ 3 only
            a.out(0x21, al)?;
            a.mov(dx, 0x80)?;
            a.out(dx, al)?; // ready
            a.sti()?;
            let mut idle = a.create_label();
            a.set_label(&mut idle)?;
            a.hlt()?;
            a.jmp(idle)
        }),
    );
    m.load(
        HANDLER,
        &asm(16, HANDLER, |a| {
            a.mov(al, 0x20)?;
            a.out(0x20, al)?; // EOI
            a.mov(dx, 0x3f8)?;
            a.mov(al, b'I' as i32)?;
            a.out(dx, al)?;
            a.iret()
        }),
    );
    let line = m.vm.irq_line(3).unwrap();
    let vcpu = m.vcpu(0, Some(&real_mode(CODE)));
    let _dog = Watchdog::new(vcpu.kicker());
    let (rx, _handle) = run_on_thread(vcpu, 3);
    assert!(matches!(next(&rx), Exit::Out(0x80, _)));
    assert_quiet(&rx, "halted with no interrupt");
    line.pulse();
    assert_eq!(next(&rx), Exit::Out(0x3f8, vec![b'I']));
    line.pulse();
    assert_eq!(next(&rx), Exit::Out(0x3f8, vec![b'I']));
}

#[test]
fn ioevent_takes_matching_writes_and_passes_others_on() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    m.vm.register_ioevent(IoEventAddress::Pio(0x500), 1, Some(7), &fd)
        .unwrap();
    let mmio_fd = EventFd::new(EFD_NONBLOCK).unwrap();
    m.vm.register_ioevent(IoEventAddress::Mmio(MMIO + 0x50), 4, None, &mmio_fd)
        .unwrap();
    m.load(
        CODE,
        &asm(32, CODE, |a| {
            a.mov(dx, 0x500)?;
            a.mov(al, 7)?;
            a.out(dx, al)?; // taken by the ioeventfd
            a.out(dx, al)?; // and again
            a.mov(dword_ptr(MMIO as u32 + 0x50), 0x1234)?; // taken
            a.mov(al, 8)?;
            a.out(dx, al)?; // no match: an exit
            a.hlt()
        }),
    );
    let state = protected_mode(&m, CODE);
    let (mut vcpu, _dog) = guarded(m.vcpu(0, Some(&state)));
    assert_eq!(step(&mut *vcpu, &[]), Exit::Out(0x500, vec![8]));
    assert_eq!(fd.read().unwrap(), 2);
    assert_eq!(mmio_fd.read().unwrap(), 1);
}

#[test]
fn ioevent_with_bad_length_or_datamatch_is_refused() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let pio = IoEventAddress::Pio(0x500);
    let text = unsupported_text(m.vm.register_ioevent(pio, 3, None, &fd));
    assert!(text.contains("length 3"), "{text}");
    let text = unsupported_text(m.vm.register_ioevent(pio, 1, Some(0x100), &fd));
    assert!(text.contains("does not fit"), "{text}");
    let text = unsupported_text(m.vm.register_ioevent(pio, 0, Some(1), &fd));
    assert!(text.contains("datamatch needs"), "{text}");
}

/// Many vCPU threads kicked over and over: every kick ends a run, none
/// is lost (the loop would hang), and the vCPUs stay usable.
#[test]
fn kicks_are_never_lost() {
    let Some(h) = kvm() else { return };
    let m = Machine::new(&h, 1);
    m.load(
        CODE,
        &asm(16, CODE, |a| {
            a.cli()?;
            a.hlt()
        }),
    );
    let mut vcpu = m.vcpu(0, Some(&real_mode(CODE)));
    let kicker = vcpu.kicker();
    let results = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&results);
    let (tx, rx) = mpsc::channel::<()>();
    let handle = thread::spawn(move || {
        for _ in 0..200 {
            let exit = step(&mut *vcpu, &[]);
            sink.lock().unwrap().push(exit);
            tx.send(()).unwrap();
        }
    });
    for _ in 0..200 {
        kicker.kick();
        rx.recv_timeout(WATCHDOG).expect("a kick was lost");
    }
    handle.join().unwrap();
    let results = results.lock().unwrap();
    assert!(
        results.iter().all(|e| *e == Exit::Interrupted),
        "{results:?}"
    );
}
