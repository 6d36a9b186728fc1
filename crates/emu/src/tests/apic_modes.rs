//! The interrupt controllers through real guest code: IA32_APIC_BASE mode
//! transitions (xAPIC ⇄ x2APIC ⇄ disabled) and their #GPs, the x2APIC MSR
//! interface (ID, 64-bit ICR, SELF IPI, read-only and reserved bits), and
//! IOAPIC level-triggered delivery with remote IRR, EOI broadcast, the EOI
//! register, directed EOI, edge coalescing and masking.
//!
//! Guests log what they see in memory: faults as (vector, error code, RIP)
//! from one handler per exception vector, interrupts as the vector sequence
//! their handlers ran, register values in numbered slots. The host checks
//! faulting RIPs against the assembler's label addresses.

use std::time::{Duration, Instant};

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;

use super::guest::*;

/// Exception log: count, then (vector, error code, RIP) triples.
const FAULT_LOG: u64 = 0x30_0000;
/// Interrupt log: count, then the vector of each handler run.
const IRQ_LOG: u64 = 0x31_0000;
/// Register values the guest read, in 8-byte slots.
const SLOTS: u64 = 0x32_0000;
/// How interrupt handlers EOI: 0 not at all, 1 xAPIC MMIO, 2 x2APIC MSR.
const EOI_HOW: u64 = 0x33_0000;
/// Handlers live here; the code under test at `CODE`.
const HANDLERS: u64 = 0x20_0000;
const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;
const APIC_BASE_MSR: u32 = 0x1b;
/// The port the guest writes its phase number to, for the host to act.
const PHASE_PORT: u16 = 0x80;

/// Vectors the CPU pushes an error code for.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// A VM of `vcpus` vCPUs, running vCPU `id`, with the APIC/IOAPIC page
/// mapped, exception handlers for vectors 0–31 and logging interrupt
/// handlers for `irq_vectors`. Returns the guest and its entry state.
fn setup(vcpus: u32, id: u32, irq_vectors: &[u8]) -> (Guest, vmplay_hypervisor::CpuState) {
    let mut g = Guest::new(vcpus);
    if id != 0 {
        g.vcpu = g.vm.create_vcpu(id).expect("vcpu");
    }
    let s = g.long_mode(CODE);
    // 1 GiB page at 3 GiB: the IOAPIC and LAPIC pages.
    g.write_u64(PML4 + 0x1000 + 3 * 8, 0xc000_0000 | 0x83);
    install_handlers(&g, irq_vectors);
    (g, s)
}

/// Exception stubs push (error code, vector) and share a handler that
/// logs them with the faulting RIP. A #GP (the only fault these tests
/// provoke, always on a 2-byte rdmsr/wrmsr) resumes after the instruction;
/// anything else halts, so the log shows what went wrong.
/// Interrupt stubs log their vector and EOI as `EOI_HOW` says.
fn install_handlers(g: &Guest, irq_vectors: &[u8]) {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fault_common = a.create_label();
    let mut irq_common = a.create_label();
    let mut fault_stubs = Vec::new();
    for v in 0u8..32 {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        if !has_error_code(v) {
            a.push(0i32).unwrap();
        }
        a.push(i32::from(v)).unwrap();
        a.jmp(fault_common).unwrap();
        fault_stubs.push((v, l));
    }
    let mut irq_stubs = Vec::new();
    for &v in irq_vectors {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.push(r8).unwrap();
        a.mov(r8d, u32::from(v)).unwrap();
        a.jmp(irq_common).unwrap();
        irq_stubs.push((v, l));
    }

    // [rsp] vector, +8 error code, +16 RIP (after the three pushes: +24).
    let mut stop = a.create_label();
    a.set_label(&mut fault_common).unwrap();
    a.push(r8).unwrap();
    a.push(r9).unwrap();
    a.push(r10).unwrap();
    a.mov(r9, FAULT_LOG).unwrap();
    a.mov(r8, qword_ptr(r9)).unwrap();
    a.imul_3(r10, r8, 24).unwrap();
    a.lea(r10, qword_ptr(r9 + r10 + 8)).unwrap();
    a.mov(r8, qword_ptr(rsp + 24)).unwrap();
    a.mov(qword_ptr(r10), r8).unwrap();
    a.mov(r8, qword_ptr(rsp + 32)).unwrap();
    a.mov(qword_ptr(r10 + 8), r8).unwrap();
    a.mov(r8, qword_ptr(rsp + 40)).unwrap();
    a.mov(qword_ptr(r10 + 16), r8).unwrap();
    a.inc(qword_ptr(r9)).unwrap();
    a.cmp(qword_ptr(rsp + 24), 13).unwrap();
    a.jne(stop).unwrap();
    a.add(qword_ptr(rsp + 40), 2).unwrap();
    a.pop(r10).unwrap();
    a.pop(r9).unwrap();
    a.pop(r8).unwrap();
    a.add(rsp, 16).unwrap();
    a.iretq().unwrap();
    a.set_label(&mut stop).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();

    // r8 = vector (the stub pushed the interrupted r8).
    let mut no_eoi = a.create_label();
    let mut msr_eoi = a.create_label();
    a.set_label(&mut irq_common).unwrap();
    a.push(r9).unwrap();
    a.push(r10).unwrap();
    a.mov(r9, IRQ_LOG).unwrap();
    a.mov(r10, qword_ptr(r9)).unwrap();
    a.mov(qword_ptr(r9 + r10 * 8 + 8), r8).unwrap();
    a.inc(qword_ptr(r9)).unwrap();
    a.mov(r10, EOI_HOW).unwrap();
    a.mov(r10, qword_ptr(r10)).unwrap();
    a.cmp(r10, 0).unwrap();
    a.je(no_eoi).unwrap();
    a.cmp(r10, 2).unwrap();
    a.je(msr_eoi).unwrap();
    a.mov(r10, LAPIC + 0xb0).unwrap();
    a.mov(dword_ptr(r10), 0).unwrap();
    a.jmp(no_eoi).unwrap();
    a.set_label(&mut msr_eoi).unwrap();
    a.push(rax).unwrap();
    a.push(rcx).unwrap();
    a.push(rdx).unwrap();
    a.mov(ecx, 0x80bu32).unwrap();
    a.xor(eax, eax).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.pop(rdx).unwrap();
    a.pop(rcx).unwrap();
    a.pop(rax).unwrap();
    a.set_label(&mut no_eoi).unwrap();
    a.pop(r10).unwrap();
    a.pop(r9).unwrap();
    a.pop(r8).unwrap();
    a.iretq().unwrap();

    let r = a
        .assemble_options(
            HANDLERS,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    g.write(HANDLERS, &r.inner.code_buffer);
    for (v, l) in fault_stubs.iter().chain(irq_stubs.iter()) {
        g.idt64(*v, r.label_ip(l).unwrap(), 0);
    }
}

/// Assembles the code under test at `CODE`; `f` returns the labels whose
/// addresses the test needs (faulting instructions).
fn code<const N: usize>(
    g: &Guest,
    f: impl FnOnce(&mut CodeAssembler) -> [CodeLabel; N],
) -> [u64; N] {
    let mut a = CodeAssembler::new(64).unwrap();
    // r14: the slots; rbx: the LAPIC page; rsi: the IOAPIC page.
    a.mov(r14, SLOTS).unwrap();
    a.mov(rbx, LAPIC).unwrap();
    a.mov(rsi, IOAPIC).unwrap();
    let labels = f(&mut a);
    a.cli().unwrap();
    a.hlt().unwrap();
    let r = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    g.write(CODE, &r.inner.code_buffer);
    labels.map(|l| r.label_ip(&l).unwrap())
}

/// `wrmsr` of `v` to `msr`; `at` (if given) labels the wrmsr itself.
fn wrmsr(a: &mut CodeAssembler, msr: u32, v: u64, at: Option<&mut CodeLabel>) {
    a.mov(ecx, msr).unwrap();
    a.mov(eax, v as u32).unwrap();
    a.mov(edx, (v >> 32) as u32).unwrap();
    if let Some(l) = at {
        a.set_label(l).unwrap();
    }
    a.wrmsr().unwrap();
}

/// `rdmsr` of `msr` into slot `slot` (EDX:EAX; a sentinel if it faults).
fn rdmsr(a: &mut CodeAssembler, msr: u32, slot: i32, at: Option<&mut CodeLabel>) {
    a.mov(ecx, msr).unwrap();
    a.mov(eax, SENTINEL_HALF).unwrap();
    a.mov(edx, SENTINEL_HALF).unwrap();
    if let Some(l) = at {
        a.set_label(l).unwrap();
    }
    a.rdmsr().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(r14 + slot * 8), rax).unwrap();
}

/// A read-modify-write of IA32_APIC_BASE's mode bits: base | `bits`.
fn set_apic_base(a: &mut CodeAssembler, bits: u64, at: Option<&mut CodeLabel>) {
    wrmsr(a, APIC_BASE_MSR, LAPIC | bits, at);
}

/// 32-bit xAPIC MMIO read of register offset `off` into slot `slot`.
fn mmio_read(a: &mut CodeAssembler, off: i32, slot: i32) {
    a.mov(eax, dword_ptr(rbx + off)).unwrap();
    a.mov(qword_ptr(r14 + slot * 8), rax).unwrap();
}

/// Writes IOAPIC register `index`.
fn ioapic_write(a: &mut CodeAssembler, index: u32, v: u32) {
    a.mov(dword_ptr(rsi), index).unwrap();
    a.mov(dword_ptr(rsi + 0x10), v).unwrap();
}

/// Reads IOAPIC register `index` into slot `slot`.
fn ioapic_read(a: &mut CodeAssembler, index: u32, slot: i32) {
    a.mov(dword_ptr(rsi), index).unwrap();
    a.mov(eax, dword_ptr(rsi + 0x10)).unwrap();
    a.mov(qword_ptr(r14 + slot * 8), rax).unwrap();
}

/// Opens an interrupt window of a few instructions.
fn window(a: &mut CodeAssembler) {
    a.sti().unwrap();
    for _ in 0..4 {
        a.nop().unwrap();
    }
    a.cli().unwrap();
}

/// Spins while the qword at `addr` is (`equal`) or is not `value`, for a
/// bounded number of rounds: a broken delivery fails the test's asserts
/// instead of hanging it.
fn spin_while(a: &mut CodeAssembler, addr: u64, value: i32, equal: bool) {
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.mov(r15d, 20_000_000u32).unwrap();
    a.set_label(&mut again).unwrap();
    a.pause().unwrap();
    a.mov(rax, addr).unwrap();
    a.cmp(qword_ptr(rax), value).unwrap();
    if equal {
        a.jne(done).unwrap();
    } else {
        a.je(done).unwrap();
    }
    a.dec(r15).unwrap();
    a.jnz(again).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// Tells the host the guest reached `phase`.
fn phase(a: &mut CodeAssembler, n: u32) {
    a.mov(eax, n).unwrap();
    a.out(u32::from(PHASE_PORT), eax).unwrap();
}

fn faults(g: &Guest) -> Vec<(u64, u64, u64)> {
    let n = g.read_u64(FAULT_LOG);
    (0..n.min(64))
        .map(|k| {
            let e = FAULT_LOG + 8 + 24 * k;
            (g.read_u64(e), g.read_u64(e + 8), g.read_u64(e + 16))
        })
        .collect()
}

fn irqs(g: &Guest) -> Vec<u64> {
    let n = g.read_u64(IRQ_LOG);
    (0..n.min(4096))
        .map(|k| g.read_u64(IRQ_LOG + 8 + 8 * k))
        .collect()
}

fn slot(g: &Guest, k: u64) -> u64 {
    g.read_u64(SLOTS + 8 * k)
}

/// `run_with` under a watchdog: a guest that livelocks without exits (an
/// interrupt storm a bug caused) is kicked after 10 s and fails its
/// asserts (`End::Interrupted`) instead of hanging the test.
fn run_guarded(g: &mut Guest, max: usize, mmio: impl FnMut(u64) -> u64) -> Outcome {
    let kicker = g.vcpu.kicker();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            wait.recv_timeout(Duration::from_secs(10))
        {
            kicker.kick();
        }
    });
    let o = g.run_with(max, |_| 0, mmio);
    let _ = done.send(());
    watchdog.join().unwrap();
    o
}

/// Runs to the next phase write; returns its number.
fn run_to_phase(g: &mut Guest) -> u64 {
    let o = run_guarded(g, 1, |_| 0);
    assert_eq!(o.end, End::Running, "the guest stopped early: {o:?}");
    assert_eq!(o.ports.len(), 1, "{o:?}");
    assert_eq!(o.ports[0].0, PHASE_PORT);
    o.ports[0].1
}

fn run_to_halt(g: &mut Guest) {
    let o = run_guarded(g, 10_000, |_| 0);
    assert_eq!(o.end, End::Halt, "{o:?} faults {:x?}", faults(g));
}

const EN: u64 = 1 << 11;
const EXTD: u64 = 1 << 10;
/// What a faulting rdmsr leaves in its slot (EDX:EAX loaded before it).
const SENTINEL_HALF: u32 = 0x05e4_71e1;
const SENTINEL: u64 = (SENTINEL_HALF as u64) << 32 | SENTINEL_HALF as u64;

#[test]
fn apic_base_allows_the_sdm_transitions_and_gp_faults_the_others() {
    // vCPU 1 of 2: its x2APIC ID (1) is not a zero that could pass by chance.
    let (mut g, s) = setup(2, 1, &[]);
    let at = code(&g, |a| {
        let [
            mut to_xapic,
            mut invalid,
            mut reserved_low,
            mut reserved_high,
            mut id_when_disabled,
            mut disabled_to_x2,
        ] = [(); 6].map(|_| a.create_label());
        rdmsr(a, APIC_BASE_MSR, 0, None);
        mmio_read(a, 0x20, 1); // xAPIC ID
        set_apic_base(a, EN | EXTD, None); // xAPIC → x2APIC
        rdmsr(a, 0x802, 2, None); // x2APIC ID
        rdmsr(a, 0x80d, 3, None); // LDR, derived from the ID
        set_apic_base(a, EN, Some(&mut to_xapic)); // x2APIC → xAPIC: #GP
        set_apic_base(a, EXTD, Some(&mut invalid)); // EXTD without EN: #GP
        set_apic_base(a, EN | EXTD | 1 << 9, Some(&mut reserved_low));
        set_apic_base(a, EN | EXTD | 1 << 45, Some(&mut reserved_high));
        rdmsr(a, APIC_BASE_MSR, 4, None); // still x2APIC
        set_apic_base(a, 0, None); // x2APIC → disabled
        rdmsr(a, APIC_BASE_MSR, 5, None);
        rdmsr(a, 0x802, 6, Some(&mut id_when_disabled)); // #GP: not x2APIC
        set_apic_base(a, EN | EXTD, Some(&mut disabled_to_x2)); // #GP
        set_apic_base(a, EN, None); // disabled → xAPIC
        mmio_read(a, 0x20, 7);
        set_apic_base(a, EN | EXTD, None); // xAPIC → x2APIC again
        rdmsr(a, APIC_BASE_MSR, 8, None);
        [
            to_xapic,
            invalid,
            reserved_low,
            reserved_high,
            id_when_disabled,
            disabled_to_x2,
        ]
    });
    g.vcpu.set_state(&s).unwrap();
    run_to_halt(&mut g);
    let expected: Vec<_> = at.iter().map(|&rip| (13, 0, rip)).collect();
    assert_eq!(
        faults(&g),
        expected,
        "#GP(0) exactly at the forbidden writes"
    );
    assert_eq!(slot(&g, 0), LAPIC | EN, "an AP: no BSP bit, xAPIC");
    assert_eq!(slot(&g, 1), 1 << 24, "xAPIC ID in bits 31:24");
    assert_eq!(slot(&g, 2), 1, "x2APIC ID");
    assert_eq!(slot(&g, 3), 1 << 1, "x2APIC LDR: cluster 0, bit 1");
    assert_eq!(slot(&g, 4), LAPIC | EN | EXTD);
    assert_eq!(slot(&g, 5), LAPIC);
    assert_eq!(slot(&g, 6), SENTINEL, "the faulting rdmsr wrote nothing");
    assert_eq!(slot(&g, 7), 1 << 24);
    assert_eq!(slot(&g, 8), LAPIC | EN | EXTD);
}

#[test]
fn x2apic_msrs_gp_outside_x2apic_mode_and_on_read_only_or_reserved_bits() {
    let (mut g, s) = setup(1, 0, &[]);
    let at = code(&g, |a| {
        let mut gp = [(); 17].map(|_| a.create_label());
        // xAPIC mode: the x2APIC MSRs do not exist.
        rdmsr(a, 0x808, 0, Some(&mut gp[0]));
        wrmsr(a, 0x808, 0x10, Some(&mut gp[1]));
        set_apic_base(a, EN | EXTD | 1 << 8, None);
        // Registers x2APIC does not have, write-only ones read.
        rdmsr(a, 0x80e, 1, Some(&mut gp[2])); // DFR
        rdmsr(a, 0x831, 2, Some(&mut gp[3])); // ICR high half
        rdmsr(a, 0x80b, 3, Some(&mut gp[4])); // EOI
        rdmsr(a, 0x83f, 4, Some(&mut gp[5])); // SELF IPI
        // Read-only registers written.
        wrmsr(a, 0x802, 5, Some(&mut gp[6])); // ID
        wrmsr(a, 0x803, 0, Some(&mut gp[7])); // version
        wrmsr(a, 0x80d, 1, Some(&mut gp[8])); // LDR
        wrmsr(a, 0x80a, 0, Some(&mut gp[9])); // PPR
        wrmsr(a, 0x839, 0, Some(&mut gp[10])); // current count
        // Reserved bits (RsvdZ) and the "write zero only" registers.
        wrmsr(a, 0x80b, 1, Some(&mut gp[11])); // EOI of non-zero
        wrmsr(a, 0x828, 1, Some(&mut gp[12])); // ESR of non-zero
        wrmsr(a, 0x808, 0x100, Some(&mut gp[13])); // TPR bit 8
        wrmsr(a, 0x80f, 1 << 32 | 0x1ff, Some(&mut gp[14])); // upper half
        wrmsr(a, 0x83f, 0x130, Some(&mut gp[15])); // SELF IPI bit 8
        wrmsr(a, 0x830, 1 << 13 | 0x30, Some(&mut gp[16])); // ICR bit 13
        // Allowed accesses still work.
        wrmsr(a, 0x808, 0x20, None);
        rdmsr(a, 0x808, 6, None);
        rdmsr(a, 0x803, 7, None);
        // The MMIO page is not decoded in x2APIC mode: the read leaves
        // the backend as an ordinary MMIO exit.
        mmio_read(a, 0x80, 8);
        gp
    });
    g.vcpu.set_state(&s).unwrap();
    let mut mmio = Vec::new();
    let o = run_guarded(&mut g, 10_000, |addr| {
        mmio.push(addr);
        0xfeed
    });
    assert_eq!(o.end, End::Halt, "{o:?}");
    let expected: Vec<_> = at.iter().map(|&rip| (13, 0, rip)).collect();
    assert_eq!(faults(&g), expected);
    for k in 0..5 {
        assert_eq!(slot(&g, k), SENTINEL, "slot {k}: faulting rdmsr");
    }
    assert_eq!(slot(&g, 6), 0x20, "TPR written and read back");
    assert_eq!(slot(&g, 7) & 0xff, 0x14, "version register");
    assert_ne!(
        slot(&g, 7) & 1 << 24,
        0,
        "EOI-broadcast suppression advertised"
    );
    assert_eq!(
        mmio,
        [LAPIC + 0x80],
        "xAPIC page decoded nowhere in x2APIC mode"
    );
    assert_eq!(slot(&g, 8), 0xfeed);
}

#[test]
fn x2apic_icr_and_self_ipi_deliver_by_x2apic_id_in_priority_order() {
    // vCPU 1 takes IPIs from vCPU 0; vCPU 0 sends one to itself too.
    let vectors = [0x51, 0x52, 0x53, 0x54, 0x55, 0x61];
    let (mut g, s) = setup(2, 0, &vectors);
    g.write_u64(EOI_HOW, 2);
    let mut ap = g.vm.create_vcpu(1).unwrap();
    // AP: x2APIC on, announce readiness in SLOTS+0x100, wait for 0x61.
    let ap_code = 0x18_0000;
    let ap_log = 0x34_0000u64;
    g.code(64, ap_code, |a| {
        let mut wait = a.create_label();
        a.mov(ecx, APIC_BASE_MSR).unwrap();
        a.mov(eax, (LAPIC | EN | EXTD) as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x80fu32).unwrap();
        a.mov(eax, 0x1ffu32).unwrap();
        a.wrmsr().unwrap();
        // Ready; then wait until its handler logged (the BSP waits for
        // that log entry before sending its own IPIs).
        a.mov(rax, ap_log).unwrap();
        a.mov(qword_ptr(rax), 1).unwrap();
        a.set_label(&mut wait).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.mov(rax, IRQ_LOG).unwrap();
        a.mov(rax, qword_ptr(rax)).unwrap();
        a.cmp(rax, 0).unwrap();
        a.je(wait).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    code(&g, |a| {
        spin_while(a, ap_log, 1, false);
        set_apic_base(a, EN | EXTD | 1 << 8, None);
        wrmsr(a, 0x80f, 0x1ff, None);
        // To x2APIC ID 1 (fixed, physical): the AP takes 0x61.
        wrmsr(a, 0x830, 1 << 32 | 0x61, None);
        rdmsr(a, 0x830, 0, None);
        // Wait for the AP's handler.
        spin_while(a, IRQ_LOG, 0, true);
        // With IF=0: to ID 0 by ICR (0x52), by SELF IPI (0x53), and to an
        // ID nobody has (0x51 to x2APIC ID 7).
        wrmsr(a, 0x830, 0x52, None);
        wrmsr(a, 0x83f, 0x53, None);
        wrmsr(a, 0x830, 7 << 32 | 0x51, None);
        // Logical: x2APIC LDR = cluster (ID >> 4) << 16 | 1 << (ID & 15).
        // Cluster 0, bit 0 is this vCPU (0x54); cluster 1 is nobody (0x55).
        wrmsr(a, 0x830, 1 << 32 | 1 << 11 | 0x54, None);
        wrmsr(a, 0x830, 0x1_0001 << 32 | 1 << 11 | 0x55, None);
        rdmsr(a, 0x820 + 2, 1, None); // IRR 0x40-0x5f
        rdmsr(a, 0x818 + 2, 2, None); // TMR 0x40-0x5f: edge, clear
        window(a);
        []
    });
    g.vcpu.set_state(&s).unwrap();
    let mut s1 = s.clone();
    s1.rip = ap_code;
    s1.gpr[4] = STACK - 0x2000;
    ap.set_state(&s1).unwrap();
    // The AP halts once its handler ran; a kick ends a wait that would
    // otherwise never end.
    let ap_kicker = ap.kicker();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let halted = loop {
            match ap.run() {
                Ok(vmplay_hypervisor::VcpuExit::Halt) => break true,
                Ok(vmplay_hypervisor::VcpuExit::Interrupted) | Err(_) => break false,
                Ok(_) => {}
            }
        };
        let _ = done_tx.send(());
        halted
    });
    run_to_halt(&mut g);
    if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        ap_kicker.kick();
    }
    assert!(t.join().unwrap(), "the AP took its IPI and halted");
    assert_eq!(faults(&g), Vec::new());
    assert_eq!(
        irqs(&g),
        [0x61, 0x54, 0x53, 0x52],
        "AP's IPI, then by priority"
    );
    assert_eq!(slot(&g, 0), 1 << 32 | 0x61, "ICR reads back whole");
    assert_eq!(
        slot(&g, 1),
        1 << (0x52 - 0x40) | 1 << (0x53 - 0x40) | 1 << (0x54 - 0x40)
    );
    assert_eq!(slot(&g, 2), 0);
}

#[test]
fn disabling_the_apic_resets_it_to_its_power_on_state() {
    let (mut g, s) = setup(1, 0, &[0x40, 0x60]);
    g.write_u64(EOI_HOW, 1);
    code(&g, |a| {
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        a.mov(dword_ptr(rbx + 0x80), 0x30).unwrap(); // TPR
        a.mov(dword_ptr(rbx + 0x3e0), 0xb).unwrap();
        a.mov(dword_ptr(rbx + 0x320), 0x2_0040).unwrap(); // periodic 0x40
        a.mov(dword_ptr(rbx + 0x380), 100_000_000).unwrap();
        a.mov(dword_ptr(rbx + 0x300), 0x4_0060).unwrap(); // self IPI 0x60
        mmio_read(a, 0x230, 0); // IRR 0x60-0x7f: pending
        set_apic_base(a, 1 << 8, None); // disabled
        set_apic_base(a, EN | 1 << 8, None); // xAPIC again
        mmio_read(a, 0x80, 1);
        mmio_read(a, 0xf0, 2);
        mmio_read(a, 0x320, 3);
        mmio_read(a, 0x380, 4);
        mmio_read(a, 0x230, 5);
        mmio_read(a, 0xe0, 6);
        // Enabled again, anything that survived in IRR would now run.
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        window(a);
        []
    });
    g.vcpu.set_state(&s).unwrap();
    run_to_halt(&mut g);
    assert_eq!(faults(&g), Vec::new());
    assert_eq!(slot(&g, 0), 1, "0x60 was pending before the disable");
    assert_eq!(slot(&g, 1), 0, "TPR");
    assert_eq!(slot(&g, 2), 0xff, "SVR: software-disabled");
    assert_eq!(slot(&g, 3), 1 << 16, "LVT timer masked");
    assert_eq!(slot(&g, 4), 0, "initial count");
    assert_eq!(slot(&g, 5), 0, "IRR: the pending IPI is gone");
    assert_eq!(slot(&g, 6), 0xffff_ffff, "DFR");
    assert_eq!(irqs(&g), Vec::<u64>::new(), "nothing survives the reset");
}

// IOAPIC. GSIs 16+ are not wired to the 8259, so only the IOAPIC sees them.

/// Low half of a redirection entry: fixed, physical, to APIC 0.
const LEVEL: u32 = 1 << 15;
const MASKED: u32 = 1 << 16;
const REMOTE_IRR: u64 = 1 << 14;

fn redir(pin: u32) -> u32 {
    0x10 + 2 * pin
}

#[test]
fn level_line_holds_remote_irr_until_eoi_and_redelivers_while_asserted() {
    let (mut g, s) = setup(1, 0, &[0x60]);
    let pin = 17;
    code(&g, |a| {
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        ioapic_write(a, redir(pin), LEVEL | 0x60);
        phase(a, 1); // host asserts
        mmio_read(a, 0x230, 0); // IRR
        mmio_read(a, 0x1b0, 1); // TMR: level-triggered
        ioapic_read(a, redir(pin), 2); // remote IRR set
        window(a); // taken once, handler does not EOI
        window(a); // remote IRR: no second delivery
        mmio_read(a, 0x130, 3); // ISR
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // EOI: still asserted
        mmio_read(a, 0x230, 4); // IRR: delivered again
        window(a);
        phase(a, 2); // host deasserts
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // EOI
        ioapic_read(a, redir(pin), 5); // remote IRR clear
        mmio_read(a, 0x230, 6);
        window(a);
        phase(a, 3); // host asserts
        ioapic_read(a, redir(pin), 7);
        window(a); // taken, not EOIed
        phase(a, 4); // host asserts again (a device re-raising it)
        mmio_read(a, 0x230, 8); // remote IRR: no new message
        window(a);
        phase(a, 5); // host deasserts
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap();
        []
    });
    g.vcpu.set_state(&s).unwrap();
    let line = g.vm.irq_line(pin).unwrap();
    assert_eq!(run_to_phase(&mut g), 1);
    line.set_level(true);
    assert_eq!(run_to_phase(&mut g), 2);
    line.set_level(false);
    assert_eq!(run_to_phase(&mut g), 3);
    line.set_level(true);
    assert_eq!(run_to_phase(&mut g), 4);
    line.set_level(true);
    assert_eq!(run_to_phase(&mut g), 5);
    line.set_level(false);
    run_to_halt(&mut g);
    assert_eq!(faults(&g), Vec::new());
    assert_eq!(slot(&g, 0), 1, "IRR 0x60");
    assert_eq!(slot(&g, 1), 1, "TMR 0x60: level");
    assert_eq!(slot(&g, 2), u64::from(LEVEL | 0x60) | REMOTE_IRR);
    assert_eq!(slot(&g, 3), 1, "ISR 0x60 until the EOI");
    assert_eq!(slot(&g, 4), 1, "asserted at EOI: redelivered");
    assert_eq!(
        slot(&g, 5),
        u64::from(LEVEL | 0x60),
        "deasserted at EOI: remote IRR clear"
    );
    assert_eq!(slot(&g, 6), 0);
    assert_eq!(slot(&g, 7), u64::from(LEVEL | 0x60) | REMOTE_IRR);
    assert_eq!(
        slot(&g, 8),
        0,
        "re-asserting under remote IRR sends nothing"
    );
    assert_eq!(irqs(&g), [0x60, 0x60, 0x60]);
}

#[test]
fn ioapic_eoi_register_and_directed_eoi_clear_remote_irr() {
    let (mut g, s) = setup(1, 0, &[0x70]);
    let pin = 18;
    code(&g, |a| {
        // Directed EOI: the LAPIC's EOI is not broadcast.
        a.mov(dword_ptr(rbx + 0xf0), 0x11ff).unwrap();
        mmio_read(a, 0xf0, 0);
        ioapic_read(a, 1, 1); // IOAPIC version
        ioapic_write(a, redir(pin), LEVEL | 0x70);
        phase(a, 1); // host asserts, then deasserts
        window(a);
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // LAPIC EOI: local only
        mmio_read(a, 0x170, 2); // ISR 0x60-0x7f: retired
        ioapic_read(a, redir(pin), 3); // remote IRR still set
        phase(a, 2); // host asserts: held by remote IRR
        window(a);
        a.mov(dword_ptr(rsi + 0x40), 0x70).unwrap(); // IOAPIC EOI register
        ioapic_read(a, redir(pin), 4); // asserted: set again, redelivered
        window(a);
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap();
        phase(a, 3); // host deasserts
        a.mov(dword_ptr(rsi + 0x40), 0x70).unwrap();
        ioapic_read(a, redir(pin), 5);
        []
    });
    g.vcpu.set_state(&s).unwrap();
    let line = g.vm.irq_line(pin).unwrap();
    assert_eq!(run_to_phase(&mut g), 1);
    line.set_level(true);
    line.set_level(false);
    assert_eq!(run_to_phase(&mut g), 2);
    line.set_level(true);
    assert_eq!(run_to_phase(&mut g), 3);
    line.set_level(false);
    run_to_halt(&mut g);
    assert_eq!(faults(&g), Vec::new());
    assert_eq!(slot(&g, 0), 0x11ff, "SVR bit 12 sticks: it is advertised");
    assert_eq!(
        slot(&g, 1) & 0xff,
        0x20,
        "IOAPIC version with the EOI register"
    );
    assert_eq!(slot(&g, 2), 0);
    assert_eq!(slot(&g, 3), u64::from(LEVEL | 0x70) | REMOTE_IRR);
    assert_eq!(slot(&g, 4), u64::from(LEVEL | 0x70) | REMOTE_IRR);
    assert_eq!(slot(&g, 5), u64::from(LEVEL | 0x70));
    assert_eq!(irqs(&g), [0x70, 0x70]);
}

#[test]
fn edges_coalesce_in_irr_masked_edges_are_lost_masked_levels_wait() {
    let (mut g, s) = setup(1, 0, &[0x61, 0x62, 0x90]);
    g.write_u64(EOI_HOW, 1);
    let (edge, level, other) = (19, 20, 21);
    code(&g, |a| {
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        ioapic_write(a, redir(edge), 0x61);
        ioapic_write(a, redir(level), MASKED | LEVEL | 0x62);
        ioapic_write(a, redir(other), 0x90);
        phase(a, 1); // host: two edges on `edge`, one on `other`, level up
        mmio_read(a, 0x230, 0); // IRR 0x60-0x7f
        mmio_read(a, 0x1b0, 1); // TMR 0x60-0x7f: edge, clear
        window(a); // 0x90 first (higher class), 0x61 once
        ioapic_write(a, redir(edge), MASKED | 0x61);
        phase(a, 2); // host: edge on the masked pin
        ioapic_write(a, redir(edge), 0x61);
        window(a); // nothing: the edge was lost
        // The level handler must not EOI while the line is high: that
        // would deliver it again at once, forever.
        a.mov(rax, EOI_HOW).unwrap();
        a.mov(qword_ptr(rax), 0).unwrap();
        ioapic_write(a, redir(level), LEVEL | 0x62); // unmask: delivers
        window(a);
        phase(a, 3); // host drops the level line before the EOI
        a.mov(dword_ptr(rbx + 0xb0), 0).unwrap();
        ioapic_read(a, redir(level), 2);
        []
    });
    g.vcpu.set_state(&s).unwrap();
    let edge_line = g.vm.irq_line(edge).unwrap();
    let level_line = g.vm.irq_line(level).unwrap();
    let other_line = g.vm.irq_line(other).unwrap();
    assert_eq!(run_to_phase(&mut g), 1);
    edge_line.pulse();
    edge_line.pulse();
    other_line.pulse();
    level_line.set_level(true);
    assert_eq!(run_to_phase(&mut g), 2);
    edge_line.pulse();
    assert_eq!(run_to_phase(&mut g), 3);
    level_line.set_level(false);
    run_to_halt(&mut g);
    assert_eq!(faults(&g), Vec::new());
    assert_eq!(slot(&g, 0), 1 << 1, "0x61 pending once; masked 0x62 not");
    assert_eq!(slot(&g, 1), 0);
    assert_eq!(slot(&g, 2), u64::from(LEVEL | 0x62), "EOI after the drop");
    assert_eq!(irqs(&g), [0x90, 0x61, 0x62]);
}

#[test]
fn a_level_line_stuck_high_does_not_starve_the_vcpu_thread() {
    // The handler EOIs at once and the line never drops: every EOI brings
    // the interrupt back. The vCPU must still answer a kick promptly.
    let (mut g, s) = setup(1, 0, &[0x66]);
    g.write_u64(EOI_HOW, 1);
    let pin = 22;
    code(&g, |a| {
        let mut spin = a.create_label();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
        ioapic_write(a, redir(pin), LEVEL | 0x66);
        phase(a, 1);
        a.sti().unwrap();
        a.set_label(&mut spin).unwrap();
        a.jmp(spin).unwrap();
        []
    });
    g.vcpu.set_state(&s).unwrap();
    let line = g.vm.irq_line(pin).unwrap();
    assert_eq!(run_to_phase(&mut g), 1);
    line.set_level(true);
    let kicker = g.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        kicker.kick();
        at
    });
    let o = g.run();
    let back = Instant::now();
    let kicked = t.join().unwrap();
    assert_eq!(o.end, End::Interrupted);
    assert!(
        back.duration_since(kicked) < Duration::from_millis(100),
        "kick answered after {:?}",
        back.duration_since(kicked)
    );
    let n = g.read_u64(IRQ_LOG);
    assert!(n > 100, "the storm ran: {n} deliveries");
    // Dropping the line ends it: the next EOI does not redeliver.
    line.set_level(false);
    g.write_u64(IRQ_LOG, 0);
    let kicker = g.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(g.run().end, End::Interrupted);
    t.join().unwrap();
    assert!(g.read_u64(IRQ_LOG) <= 1, "at most the one in flight");
}
