//! Guest-level tests: every x87 form runs the same bytes on the host CPU
//! (between fxrstor64 and fxsave64) and in the emulator, from random
//! register-stack states, and the FPU state, flags, rax and the memory
//! operand must come out identical. Plus behaviour tests for #MF, #NM,
//! the environment layouts and the transcendentals' accuracy.

use vm_memory::{Bytes, GuestAddress};
use vmplay_hypervisor::{CpuState, FpuState};

use super::float80::host::Rng;
use super::float80::{self, Env};
use crate::cpu::fpu::F80;
use crate::isa::bit::harness::{CODE, DATA, TestVm};

/// An FXSAVE area.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub(crate) struct Fx(pub [u8; 512]);

/// What one host run takes and gives back.
#[derive(Clone, Copy)]
pub(crate) struct HostState {
    pub fx: Fx,
    pub mem: [u8; 128],
    pub rflags: u64,
    pub rax: u64,
}

/// The host half of a form: the instruction bytes run with the FPU loaded
/// from `fx`, rsi pointing at `mem`, rflags and rax given; everything is
/// read back, then the x87/SSE state is reset for the Rust code.
macro_rules! form {
    ($name:literal, $first:literal $(, $b:literal)*) => {{
        fn run(s: &mut HostState) {
            let mxcsr: u32 = 0x1f80;
            // SAFETY: the instruction bytes are one x87 instruction whose
            // only memory operand is `[rsi]` inside `s.mem`; the FPU is
            // loaded from and saved to `s.fx` (16-byte aligned), then
            // reset with fninit/ldmxcsr so Rust code finds the ABI state.
            unsafe {
                core::arch::asm!(
                    "fxrstor64 [{fx}]",
                    "push {fl}",
                    "popfq",
                    concat!(".byte ", stringify!($first) $(, ", ", stringify!($b))*),
                    "pushfq",
                    "pop {fl}",
                    "fxsave64 [{fx}]",
                    "fninit",
                    "ldmxcsr [{mx}]",
                    fx = in(reg) s.fx.0.as_mut_ptr(),
                    mx = in(reg) &mxcsr,
                    fl = inout(reg) s.rflags,
                    inout("rax") s.rax,
                    in("rsi") s.mem.as_mut_ptr(),
                );
            }
        }
        Form { name: $name, bytes: &[$first $(, $b)*], host: run }
    }};
}

pub(crate) struct Form {
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub host: fn(&mut HostState),
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// The FXSAVE64 image as the seam's FPU state.
pub(crate) fn fpu_of(fx: &Fx) -> FpuState {
    let b = &fx.0;
    let mut st = [[0u8; 16]; 8];
    for (k, r) in st.iter_mut().enumerate() {
        r[..10].copy_from_slice(&b[32 + 16 * k..42 + 16 * k]);
    }
    FpuState {
        fcw: u16_at(b, 0),
        fsw: u16_at(b, 2),
        ftw: b[4],
        fop: u16_at(b, 6),
        fip: u64_at(b, 8),
        fdp: u64_at(b, 16),
        mxcsr: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        st,
        xmm: [0; 16],
    }
}

/// A random x87 state with no exception pending (an unmasked flag
/// would fault the host's instruction).
pub(crate) fn random_fx(rng: &mut Rng) -> Fx {
    let mut b = [0u8; 512];
    let fcw = if rng.below(3) == 0 { rng.fcw() } else { 0x037f };
    let flags = (rng.next() as u16) & fcw & 0x3f & if rng.below(2) == 0 { 0x3f } else { 0 };
    let fsw = ((rng.below(8) as u16) << 11) | (rng.next() as u16 & 0x4700) | flags;
    b[0..2].copy_from_slice(&fcw.to_le_bytes());
    b[2..4].copy_from_slice(&fsw.to_le_bytes());
    b[4] = match rng.below(4) {
        0 => 0xff,
        1 => 0,
        _ => rng.next() as u8,
    };
    b[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for k in 0..8 {
        let x = rng.f80();
        b[32 + 16 * k..42 + 16 * k].copy_from_slice(&x.to_bytes()[..10]);
    }
    Fx(b)
}

/// Memory operand bytes: an f32, f64, f80, integer or BCD pattern.
fn random_mem(rng: &mut Rng) -> [u8; 128] {
    let mut m = [0u8; 128];
    for x in m.iter_mut() {
        *x = rng.next() as u8;
    }
    let x = rng.f80();
    match rng.below(5) {
        0 => m[..10].copy_from_slice(&x.to_bytes()[..10]),
        1 => {
            let mut env = Env::new(0x37f);
            m[..8].copy_from_slice(&float80::to_f64(&mut env, x).to_le_bytes());
        }
        2 => {
            let mut env = Env::new(0x37f);
            m[..4].copy_from_slice(&float80::to_f32(&mut env, x).to_le_bytes());
        }
        3 => {
            for d in m.iter_mut().take(9) {
                *d = ((rng.below(10) as u8) << 4) | rng.below(10) as u8;
            }
            m[9] &= 0x80;
        }
        _ => {}
    }
    m
}

/// Runs `form` in a guest from `init`; `None` if it faulted.
fn guest_run(vm: &mut TestVm, rip: u64, init: &HostState) -> Option<HostState> {
    let mut s: CpuState = vm.long_mode(rip);
    s.fpu = fpu_of(&init.fx);
    s.rflags = init.rflags;
    s.gpr[0] = init.rax;
    s.gpr[6] = DATA;
    vm.write(DATA, &init.mem);
    let o = vm.run(&s);
    if !o.halted || o.vector.is_some() {
        return None;
    }
    let f = &o.state.fpu;
    let mut out = *init;
    let b = &mut out.fx.0;
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftw;
    b[6..8].copy_from_slice(&f.fop.to_le_bytes());
    b[8..16].copy_from_slice(&f.fip.to_le_bytes());
    b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    for k in 0..8 {
        b[32 + 16 * k..42 + 16 * k].copy_from_slice(&f.st[k][..10]);
    }
    out.rflags = o.state.rflags;
    out.rax = o.state.gpr[0];
    let mut mem = [0u8; 128];
    vm.mem
        .read_slice(&mut mem, GuestAddress(DATA))
        .expect("read guest memory");
    out.mem = mem;
    Some(out)
}

/// What differs between the host's and the guest's results (FIP/FDP/FOP
/// are not compared: AMD's FXSAVE does not store them).
fn differences(host: &HostState, guest: &HostState) -> Vec<String> {
    let (h, g) = (fpu_of(&host.fx), fpu_of(&guest.fx));
    let mut d = Vec::new();
    if h.fcw != g.fcw {
        d.push(format!("fcw {:#06x} vs {:#06x}", h.fcw, g.fcw));
    }
    if h.fsw != g.fsw {
        d.push(format!("fsw {:#06x} vs {:#06x}", h.fsw, g.fsw));
    }
    if h.ftw != g.ftw {
        d.push(format!("ftw {:#04x} vs {:#04x}", h.ftw, g.ftw));
    }
    for k in 0..8 {
        if h.st[k] != g.st[k] {
            let x = |b: &[u8; 16]| F80::from_bytes(b);
            d.push(format!("st{k} {:?} vs {:?}", x(&h.st[k]), x(&g.st[k])));
        }
    }
    if (host.rflags ^ guest.rflags) & 0x8d5 != 0 {
        d.push(format!("rflags {:#x} vs {:#x}", host.rflags, guest.rflags));
    }
    if host.rax != guest.rax {
        d.push(format!("rax {:#x} vs {:#x}", host.rax, guest.rax));
    }
    if host.mem != guest.mem {
        d.push(format!(
            "mem {:02x?} vs {:02x?}",
            &host.mem[..28],
            &guest.mem[..28]
        ));
    }
    d
}

/// Every form against the host from `cases` random states each.
fn check_forms(forms: &[Form], cases: usize, seed: u64) {
    let mut vm = TestVm::new(1);
    let mut rng = Rng::new(seed);
    let mut fails = Vec::new();
    for (k, form) in forms.iter().enumerate() {
        let rip = CODE + 0x20 * k as u64;
        let mut code = form.bytes.to_vec();
        code.push(0xf4); // hlt
        vm.write(rip, &code);
        let mut bad = 0;
        for _ in 0..cases {
            let init = HostState {
                fx: random_fx(&mut rng),
                mem: random_mem(&mut rng),
                rflags: 0x2 | (rng.next() & 0x8d5),
                rax: rng.next(),
            };
            let mut host = init;
            (form.host)(&mut host);
            let d = match guest_run(&mut vm, rip, &init) {
                Some(guest) => differences(&host, &guest),
                None => vec!["the guest faulted".to_string()],
            };
            if !d.is_empty() {
                bad += 1;
                if bad <= 2 {
                    let f = fpu_of(&init.fx);
                    let st: Vec<F80> = f.st.iter().map(F80::from_bytes).collect();
                    fails.push(format!(
                        "{}: fcw {:#06x} fsw {:#06x} ftw {:#04x} st {:?} mem {:02x?}\n    {}",
                        form.name,
                        f.fcw,
                        f.fsw,
                        f.ftw,
                        &st[..3],
                        &init.mem[..10],
                        d.join("\n    ")
                    ));
                }
            }
        }
        if bad > 2 {
            fails.push(format!("{}: {bad} of {cases} cases differ", form.name));
        }
    }
    assert!(
        fails.is_empty(),
        "{} problems:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

const CASES: usize = 1000;

#[test]
fn arithmetic_forms_match_the_host() {
    let forms = [
        form!("fadd st0,st1", 0xd8, 0xc1),
        form!("fadd st3,st0", 0xdc, 0xc3),
        form!("faddp st2,st0", 0xde, 0xc2),
        form!("fadd m32", 0xd8, 0x06),
        form!("fadd m64", 0xdc, 0x06),
        form!("fiadd m16", 0xde, 0x06),
        form!("fiadd m32", 0xda, 0x06),
        form!("fmul st0,st2", 0xd8, 0xca),
        form!("fmulp st1,st0", 0xde, 0xc9),
        form!("fmul m64", 0xdc, 0x0e),
        form!("fimul m32", 0xda, 0x0e),
        form!("fsub st0,st1", 0xd8, 0xe1),
        form!("fsub st1,st0", 0xdc, 0xe9),
        form!("fsubp st1,st0", 0xde, 0xe9),
        form!("fsub m32", 0xd8, 0x26),
        form!("fisub m16", 0xde, 0x26),
        form!("fsubr st0,st3", 0xd8, 0xeb),
        form!("fsubr st2,st0", 0xdc, 0xe2),
        form!("fsubrp st1,st0", 0xde, 0xe1),
        form!("fsubr m64", 0xdc, 0x2e),
        form!("fisubr m32", 0xda, 0x2e),
        form!("fdiv st0,st1", 0xd8, 0xf1),
        form!("fdiv st1,st0", 0xdc, 0xf9),
        form!("fdivp st1,st0", 0xde, 0xf9),
        form!("fdiv m32", 0xd8, 0x36),
        form!("fidiv m16", 0xde, 0x36),
        form!("fdivr st0,st2", 0xd8, 0xfa),
        form!("fdivr st1,st0", 0xdc, 0xf1),
        form!("fdivrp st1,st0", 0xde, 0xf1),
        form!("fdivr m64", 0xdc, 0x3e),
        form!("fidivr m32", 0xda, 0x3e),
        form!("fsqrt", 0xd9, 0xfa),
        form!("fabs", 0xd9, 0xe1),
        form!("fchs", 0xd9, 0xe0),
        form!("frndint", 0xd9, 0xfc),
        form!("fscale", 0xd9, 0xfd),
        form!("fxtract", 0xd9, 0xf4),
        form!("fprem", 0xd9, 0xf8),
        form!("fprem1", 0xd9, 0xf5),
    ];
    check_forms(&forms, CASES, 101);
}

#[test]
fn compare_forms_match_the_host() {
    let forms = [
        form!("fcom st2", 0xd8, 0xd2),
        form!("fcomp st1", 0xd8, 0xd9),
        form!("fcompp", 0xde, 0xd9),
        form!("fucom st1", 0xdd, 0xe1),
        form!("fucomp st3", 0xdd, 0xeb),
        form!("fucompp", 0xda, 0xe9),
        form!("fcom m32", 0xd8, 0x16),
        form!("fcomp m64", 0xdc, 0x1e),
        form!("ficom m16", 0xde, 0x16),
        form!("ficomp m32", 0xda, 0x1e),
        form!("fcomi st1", 0xdb, 0xf1),
        form!("fcomip st2", 0xdf, 0xf2),
        form!("fucomi st1", 0xdb, 0xe9),
        form!("fucomip st3", 0xdf, 0xeb),
        form!("ftst", 0xd9, 0xe4),
        form!("fxam", 0xd9, 0xe5),
    ];
    check_forms(&forms, CASES, 102);
}

#[test]
fn load_store_forms_match_the_host() {
    let forms = [
        form!("fld m32", 0xd9, 0x06),
        form!("fld m64", 0xdd, 0x06),
        form!("fld m80", 0xdb, 0x2e),
        form!("fld st3", 0xd9, 0xc3),
        form!("fild m16", 0xdf, 0x06),
        form!("fild m32", 0xdb, 0x06),
        form!("fild m64", 0xdf, 0x2e),
        form!("fbld", 0xdf, 0x26),
        form!("fld1", 0xd9, 0xe8),
        form!("fldl2t", 0xd9, 0xe9),
        form!("fldl2e", 0xd9, 0xea),
        form!("fldpi", 0xd9, 0xeb),
        form!("fldlg2", 0xd9, 0xec),
        form!("fldln2", 0xd9, 0xed),
        form!("fldz", 0xd9, 0xee),
        form!("fst m32", 0xd9, 0x16),
        form!("fst m64", 0xdd, 0x16),
        form!("fstp m32", 0xd9, 0x1e),
        form!("fstp m64", 0xdd, 0x1e),
        form!("fstp m80", 0xdb, 0x3e),
        form!("fst st3", 0xdd, 0xd3),
        form!("fstp st2", 0xdd, 0xda),
        form!("fist m16", 0xdf, 0x16),
        form!("fist m32", 0xdb, 0x16),
        form!("fistp m16", 0xdf, 0x1e),
        form!("fistp m32", 0xdb, 0x1e),
        form!("fistp m64", 0xdf, 0x3e),
        form!("fisttp m16", 0xdf, 0x0e),
        form!("fisttp m32", 0xdb, 0x0e),
        form!("fisttp m64", 0xdd, 0x0e),
        form!("fbstp", 0xdf, 0x36),
    ];
    check_forms(&forms, CASES, 103);
}

#[test]
fn stack_and_control_forms_match_the_host() {
    let forms = [
        form!("fxch st3", 0xd9, 0xcb),
        form!("fincstp", 0xd9, 0xf7),
        form!("fdecstp", 0xd9, 0xf6),
        form!("ffree st2", 0xdd, 0xc2),
        form!("ffreep st1", 0xdf, 0xc1),
        form!("fnop", 0xd9, 0xd0),
        form!("fcmovb st2", 0xda, 0xc2),
        form!("fcmove st1", 0xda, 0xc9),
        form!("fcmovbe st3", 0xda, 0xd3),
        form!("fcmovu st1", 0xda, 0xd9),
        form!("fcmovnb st2", 0xdb, 0xc2),
        form!("fcmovne st1", 0xdb, 0xc9),
        form!("fcmovnbe st3", 0xdb, 0xd3),
        form!("fcmovnu st1", 0xdb, 0xd9),
        form!("fldcw", 0xd9, 0x2e),
        form!("fnstcw", 0xd9, 0x3e),
        form!("fnstsw m16", 0xdd, 0x3e),
        form!("fnstsw ax", 0xdf, 0xe0),
        form!("fnclex", 0xdb, 0xe2),
        form!("fninit", 0xdb, 0xe3),
        form!("fwait", 0x9b),
        form!("fldenv", 0xd9, 0x26),
        form!("frstor", 0xdd, 0x26),
    ];
    check_forms(&forms, CASES, 104);
}
