//! Random instruction sequences, per instruction class, with iced-x86.
//!
//! A class is a set of iced `Code`s (filtered to 64-bit, CPL-3-usable,
//! legacy-encoded instructions whose CPUID features the backend offers)
//! plus templates for what needs set-up (string ops, branches, calls,
//! divisions). Operands are filled generically from each code's operand
//! kinds. Two registers are reserved in every case and never written: RSP
//! (only stack instructions move it) and a base register that points into
//! the data page; every memory operand is `[base + disp]` or `[rsp + disp]`,
//! so no sequence can touch memory outside the pages both sides map.
//!
//! Flags: the generator tracks, along every path through the sequence,
//! which RFLAGS bits (and x87 C0-C3 bits) iced says are undefined, rejects
//! instructions that would read one, and reports what is still undefined
//! at the end so the comparison can mask it.

use crate::error::{Error, Result};
use crate::layout::{DATA_ADDR, DATA_SIZE, STACK_ADDR, STACK_SIZE, STACK_START};
use crate::rng::Rng;
use crate::state::{FLAGS_DF, InitialState, USER_FLAGS};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, CpuidFeature, EncodingKind, FlowControl, Instruction,
    InstructionBlock, InstructionInfoFactory, MemoryOperand, Mnemonic, OpAccess, OpCodeOperandKind,
    OpKind, Register, RepPrefixKind, RflagsBits,
};
use vmplay_hypervisor::FpuState;

/// An instruction class: one test per class per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    IntegerAlu,
    Shifts,
    MulDiv,
    BitOps,
    Conditional,
    Exchange,
    Moves,
    Strings,
    Stack,
    X87,
    SseMoves,
    SseInt,
    SseFloat,
    Mmx,
    /// BMI1/BMI2 (VEX-encoded), lzcnt/tzcnt and movbe.
    Bmi,
    /// SSE4.1.
    Sse41,
    /// SSE4.2: the string compares, pcmpgtq, crc32.
    Sse42,
    /// XSAVE/XSAVEOPT/XRSTOR (64-bit forms) of x87+SSE images and XGETBV,
    /// between x87/SSE instructions that change the state. The backend
    /// runs with CR4.OSXSAVE and XCR0 = x87|SSE (see
    /// `BackendRunner::enable_xsave`); the host child has the host's.
    Xsave,
}

impl Class {
    pub const ALL: [Class; 18] = [
        Class::IntegerAlu,
        Class::Shifts,
        Class::MulDiv,
        Class::BitOps,
        Class::Conditional,
        Class::Exchange,
        Class::Moves,
        Class::Strings,
        Class::Stack,
        Class::X87,
        Class::SseMoves,
        Class::SseInt,
        Class::SseFloat,
        Class::Mmx,
        Class::Bmi,
        Class::Sse41,
        Class::Sse42,
        Class::Xsave,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::IntegerAlu => "integer_alu",
            Class::Shifts => "shifts",
            Class::MulDiv => "mul_div",
            Class::BitOps => "bit_ops",
            Class::Conditional => "conditional",
            Class::Exchange => "exchange",
            Class::Moves => "moves",
            Class::Strings => "strings",
            Class::Stack => "stack",
            Class::X87 => "x87",
            Class::SseMoves => "sse_moves",
            Class::SseInt => "sse_int",
            Class::SseFloat => "sse_float",
            Class::Mmx => "mmx",
            Class::Bmi => "bmi",
            Class::Sse41 => "sse4_1",
            Class::Sse42 => "sse4_2",
            Class::Xsave => "xsave",
        }
    }

    #[rustfmt::skip]
    fn mnemonics(self) -> &'static [Mnemonic] {
        use Mnemonic as M;
        match self {
            Class::IntegerAlu => &[
                M::Add, M::Adc, M::Sub, M::Sbb, M::And, M::Or, M::Xor, M::Cmp, M::Test, M::Inc,
                M::Dec, M::Neg, M::Not, M::Clc, M::Stc, M::Cmc, M::Lahf, M::Sahf,
            ],
            Class::Shifts => &[
                M::Shl, M::Shr, M::Sar, M::Rol, M::Ror, M::Rcl, M::Rcr, M::Shld, M::Shrd,
            ],
            Class::MulDiv => &[
                M::Mul, M::Imul, M::Div, M::Idiv,
            ],
            Class::BitOps => &[
                M::Bt, M::Bts, M::Btr, M::Btc, M::Bsf, M::Bsr, M::Bswap, M::Popcnt, M::Lzcnt,
                M::Tzcnt,
            ],
            Class::Conditional => &[
                M::Seto, M::Setno, M::Setb, M::Setae, M::Sete, M::Setne, M::Setbe, M::Seta,
                M::Sets, M::Setns, M::Setp, M::Setnp, M::Setl, M::Setge, M::Setle, M::Setg,
                M::Cmovo, M::Cmovno, M::Cmovb, M::Cmovae, M::Cmove, M::Cmovne, M::Cmovbe, M::Cmova,
                M::Cmovs, M::Cmovns, M::Cmovp, M::Cmovnp, M::Cmovl, M::Cmovge, M::Cmovle, M::Cmovg,
            ],
            Class::Exchange => &[
                M::Xchg, M::Xadd, M::Cmpxchg, M::Cmpxchg8b, M::Cmpxchg16b,
            ],
            Class::Moves => &[
                M::Mov, M::Movzx, M::Movsx, M::Movsxd, M::Cbw, M::Cwde, M::Cdqe, M::Cwd, M::Cdq,
                M::Cqo, M::Lea, M::Movbe,
            ],
            Class::Strings => &[],
            Class::Stack => &[
                M::Push, M::Pop,
            ],
            Class::X87 => &[
                M::Fld, M::Fst, M::Fstp, M::Fild, M::Fist, M::Fistp, M::Fisttp, M::Fadd, M::Faddp,
                M::Fiadd, M::Fsub, M::Fsubp, M::Fsubr, M::Fsubrp, M::Fisub, M::Fisubr, M::Fmul,
                M::Fmulp, M::Fimul, M::Fdiv, M::Fdivp, M::Fdivr, M::Fdivrp, M::Fidiv, M::Fidivr,
                M::Fsqrt, M::Fabs, M::Fchs, M::Fcom, M::Fcomp, M::Fcompp, M::Fucom, M::Fucomp,
                M::Fucompp, M::Fcomi, M::Fcomip, M::Fucomi, M::Fucomip, M::Ficom, M::Ficomp,
                M::Ftst, M::Fxam, M::Fxch, M::Fld1, M::Fldz, M::Fldpi, M::Fldl2e, M::Fldl2t,
                M::Fldlg2, M::Fldln2, M::Fldcw, M::Fnstcw, M::Fnstsw, M::Fnclex, M::Frndint,
                M::Fscale, M::Fxtract, M::Fprem, M::Fprem1, M::Fcmovb, M::Fcmove, M::Fcmovbe,
                M::Fcmovu, M::Fcmovnb, M::Fcmovne, M::Fcmovnbe, M::Fcmovnu, M::Ffree, M::Fincstp,
                M::Fdecstp, M::Fnop,
            ],
            Class::SseMoves => &[
                M::Movaps, M::Movups, M::Movapd, M::Movupd, M::Movss, M::Movsd, M::Movd, M::Movq,
                M::Movdqa, M::Movdqu, M::Movhps, M::Movlps, M::Movhpd, M::Movlpd, M::Movhlps,
                M::Movlhps, M::Movddup, M::Movshdup, M::Movsldup, M::Lddqu, M::Movntps, M::Movntpd,
                M::Movntdq, M::Movnti, M::Pextrw, M::Pinsrw, M::Movmskps, M::Movmskpd, M::Pmovmskb,
                M::Movq2dq, M::Movdq2q, M::Ldmxcsr, M::Stmxcsr,
            ],
            Class::SseInt | Class::Mmx => &[
                M::Paddb, M::Paddw, M::Paddd, M::Paddq, M::Psubb, M::Psubw, M::Psubd, M::Psubq,
                M::Paddsb, M::Paddsw, M::Paddusb, M::Paddusw, M::Psubsb, M::Psubsw, M::Psubusb,
                M::Psubusw, M::Pmullw, M::Pmulhw, M::Pmulhuw, M::Pmuludq, M::Pmaddwd, M::Pand,
                M::Pandn, M::Por, M::Pxor, M::Psllw, M::Pslld, M::Psllq, M::Psrlw, M::Psrld,
                M::Psrlq, M::Psraw, M::Psrad, M::Pslldq, M::Psrldq, M::Pcmpeqb, M::Pcmpeqw,
                M::Pcmpeqd, M::Pcmpgtb, M::Pcmpgtw, M::Pcmpgtd, M::Punpcklbw, M::Punpcklwd,
                M::Punpckldq, M::Punpcklqdq, M::Punpckhbw, M::Punpckhwd, M::Punpckhdq,
                M::Punpckhqdq, M::Packsswb, M::Packssdw, M::Packuswb, M::Pshufd, M::Pshufhw,
                M::Pshuflw, M::Pshufw, M::Pavgb, M::Pavgw, M::Pmaxub, M::Pmaxsw, M::Pminub,
                M::Pminsw, M::Psadbw, M::Shufps, M::Shufpd, M::Unpcklps, M::Unpckhps, M::Unpcklpd,
                M::Unpckhpd, M::Pshufb, M::Phaddw, M::Phaddd, M::Phsubw, M::Phsubd, M::Pabsb,
                M::Pabsw, M::Pabsd, M::Palignr, M::Pmulhrsw, M::Pmaddubsw, M::Psignb, M::Psignw,
                M::Psignd, M::Movd, M::Movq, M::Emms,
            ],
            Class::SseFloat => &[
                M::Addps, M::Addpd, M::Addss, M::Addsd, M::Subps, M::Subpd, M::Subss, M::Subsd,
                M::Mulps, M::Mulpd, M::Mulss, M::Mulsd, M::Divps, M::Divpd, M::Divss, M::Divsd,
                M::Sqrtps, M::Sqrtpd, M::Sqrtss, M::Sqrtsd, M::Minps, M::Minpd, M::Minss, M::Minsd,
                M::Maxps, M::Maxpd, M::Maxss, M::Maxsd, M::Cmpps, M::Cmppd, M::Cmpss, M::Cmpsd,
                M::Comiss, M::Comisd, M::Ucomiss, M::Ucomisd, M::Andps, M::Andpd, M::Andnps,
                M::Andnpd, M::Orps, M::Orpd, M::Xorps, M::Xorpd, M::Cvtsi2ss, M::Cvtsi2sd,
                M::Cvtss2si, M::Cvtsd2si, M::Cvttss2si, M::Cvttsd2si, M::Cvtss2sd, M::Cvtsd2ss,
                M::Cvtps2pd, M::Cvtpd2ps, M::Cvtdq2ps, M::Cvtps2dq, M::Cvttps2dq, M::Cvtdq2pd,
                M::Cvtpd2dq, M::Cvttpd2dq, M::Cvtpi2ps, M::Cvtps2pi, M::Cvttps2pi, M::Cvtpi2pd,
                M::Cvtpd2pi, M::Cvttpd2pi, M::Haddps, M::Haddpd, M::Hsubps, M::Hsubpd, M::Addsubps,
                M::Addsubpd,
            ],
            Class::Bmi => &[
                M::Andn, M::Bextr, M::Blsi, M::Blsmsk, M::Blsr, M::Bzhi, M::Mulx, M::Pdep, M::Pext,
                M::Rorx, M::Sarx, M::Shlx, M::Shrx, M::Lzcnt, M::Tzcnt, M::Movbe, M::Popcnt,
            ],
            Class::Sse41 => &[
                M::Blendps, M::Blendpd, M::Blendvps, M::Blendvpd, M::Pblendvb, M::Pblendw, M::Dpps,
                M::Dppd, M::Extractps, M::Insertps, M::Movntdqa, M::Mpsadbw, M::Packusdw,
                M::Pcmpeqq, M::Pextrb, M::Pextrd, M::Pextrq, M::Pextrw, M::Phminposuw, M::Pinsrb,
                M::Pinsrd, M::Pinsrq, M::Pmaxsb, M::Pmaxsd, M::Pmaxud, M::Pmaxuw, M::Pminsb,
                M::Pminsd, M::Pminud, M::Pminuw, M::Pmovsxbw, M::Pmovsxbd, M::Pmovsxbq,
                M::Pmovsxwd, M::Pmovsxwq, M::Pmovsxdq, M::Pmovzxbw, M::Pmovzxbd, M::Pmovzxbq,
                M::Pmovzxwd, M::Pmovzxwq, M::Pmovzxdq, M::Pmuldq, M::Pmulld, M::Ptest, M::Roundps,
                M::Roundpd, M::Roundss, M::Roundsd,
            ],
            // The state changers between saves and restores; the XSAVE
            // family itself comes from `Builder::xsave_op`.
            Class::Xsave => &[
                M::Fld1, M::Fldz, M::Fldpi, M::Fld, M::Fxch, M::Fincstp, M::Fdecstp, M::Ffree,
                M::Faddp, M::Fmul, M::Fnclex, M::Paddd, M::Pxor, M::Movaps, M::Movd, M::Movq,
                M::Ldmxcsr, M::Fldcw,
            ],
            Class::Sse42 => &[
                M::Pcmpestri, M::Pcmpestri64, M::Pcmpestrm, M::Pcmpestrm64, M::Pcmpistri,
                M::Pcmpistrm, M::Pcmpgtq, M::Crc32,
            ],
        }
    }

    /// Classes whose random initial state varies the x87/SSE control words.
    fn fpu_heavy(self) -> bool {
        matches!(
            self,
            Class::X87
                | Class::SseMoves
                | Class::SseInt
                | Class::SseFloat
                | Class::Mmx
                | Class::Sse41
                | Class::Sse42
                | Class::Xsave
        )
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPUID features instructions may need: the qemu64-class baseline
/// as far as the backend advertises it, plus optional extensions the
/// backend and the host both advertise.
#[derive(Debug, Clone)]
pub struct Features {
    allowed: Vec<CpuidFeature>,
    /// Baseline feature names the backend advertises (see `BASELINE_BITS`).
    pub advertised: Vec<&'static str>,
    /// `lahf`/`sahf` in 64-bit mode (CPUID 8000_0001h ECX bit 0).
    pub lahf_lm: bool,
}

/// What every x86-64 CPU has: no CPUID bit to check.
const CORE: &[CpuidFeature] = &[
    CpuidFeature::INTEL8086,
    CpuidFeature::INTEL186,
    CpuidFeature::INTEL286,
    CpuidFeature::INTEL386,
    CpuidFeature::INTEL486,
    CpuidFeature::X64,
    CpuidFeature::MULTIBYTENOP,
];

/// The qemu64-class baseline: (name, iced features, leaf, register index
/// in [eax, ebx, ecx, edx], bit). A class needing one of these fails on a
/// backend that does not advertise it.
pub const BASELINE_BITS: &[(&str, &[CpuidFeature], u32, usize, u32)] = &[
    (
        "FPU",
        &[
            CpuidFeature::FPU,
            CpuidFeature::FPU287,
            CpuidFeature::FPU387,
        ],
        1,
        3,
        0,
    ),
    ("CX8", &[CpuidFeature::CX8], 1, 3, 8),
    ("CMOV", &[CpuidFeature::CMOV], 1, 3, 15),
    ("MMX", &[CpuidFeature::MMX], 1, 3, 23),
    ("FXSR", &[CpuidFeature::FXSR], 1, 3, 24),
    ("SSE", &[CpuidFeature::SSE], 1, 3, 25),
    ("SSE2", &[CpuidFeature::SSE2], 1, 3, 26),
    ("SSE3", &[CpuidFeature::SSE3], 1, 2, 0),
    ("CX16", &[CpuidFeature::CMPXCHG16B], 1, 2, 13),
];

/// Optional features, used where the backend and the host advertise them:
/// (feature, leaf, register index, bit).
pub const OPTIONAL: &[(CpuidFeature, u32, usize, u32)] = &[
    (CpuidFeature::POPCNT, 1, 2, 23),
    (CpuidFeature::SSSE3, 1, 2, 9),
    (CpuidFeature::MOVBE, 1, 2, 22),
    (CpuidFeature::LZCNT, 0x8000_0001, 2, 5),
    (CpuidFeature::BMI1, 7, 1, 3),
    (CpuidFeature::BMI2, 7, 1, 8),
    (CpuidFeature::SSE4_1, 1, 2, 19),
    (CpuidFeature::SSE4_2, 1, 2, 20),
    (CpuidFeature::XSAVE, 1, 2, 26),
];

impl Class {
    /// Baseline features (names in `BASELINE_BITS`) the class cannot do
    /// without.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            Class::Conditional => &["CMOV"],
            Class::Exchange => &["CX8", "CX16"],
            Class::X87 => &["FPU"],
            Class::Mmx => &["MMX"],
            Class::SseMoves | Class::SseInt | Class::SseFloat | Class::Sse41 | Class::Sse42 => {
                &["FXSR", "SSE", "SSE2", "SSE3"]
            }
            Class::Xsave => &["FPU", "FXSR", "SSE", "SSE2"],
            _ => &[],
        }
    }
}

impl Features {
    /// The whole baseline, without asking anyone.
    pub fn baseline() -> Self {
        let mut allowed = CORE.to_vec();
        for (_, features, ..) in BASELINE_BITS {
            allowed.extend_from_slice(features);
        }
        Features {
            allowed,
            advertised: BASELINE_BITS.iter().map(|b| b.0).collect(),
            lahf_lm: false,
        }
    }

    /// What `backend`'s CPUID advertises of the baseline, plus the
    /// optional features both it and the host (the oracle) advertise.
    pub fn from_cpuid(
        backend: &mut dyn FnMut(u32) -> Result<[u32; 4]>,
        host: &dyn Fn(u32) -> [u32; 4],
    ) -> Result<Self> {
        let mut f = Features {
            allowed: CORE.to_vec(),
            advertised: Vec::new(),
            lahf_lm: false,
        };
        let has = |regs: [u32; 4], reg: usize, bit: u32| regs[reg] >> bit & 1 == 1;
        for &(name, features, leaf, reg, bit) in BASELINE_BITS {
            if has(backend(leaf)?, reg, bit) {
                f.allowed.extend_from_slice(features);
                f.advertised.push(name);
            }
        }
        for &(feature, leaf, reg, bit) in OPTIONAL {
            if has(backend(leaf)?, reg, bit) && has(host(leaf), reg, bit) {
                f.allowed.push(feature);
            }
        }
        f.lahf_lm = has(backend(0x8000_0001)?, 2, 0) && has(host(0x8000_0001), 2, 0);
        Ok(f)
    }

    /// The baseline plus every optional feature the host advertises: what
    /// native runs can execute.
    pub fn host() -> Self {
        let mut f = Self::baseline();
        let has = |regs: [u32; 4], reg: usize, bit: u32| regs[reg] >> bit & 1 == 1;
        for &(feature, leaf, reg, bit) in OPTIONAL {
            if has(host_cpuid(leaf), reg, bit) {
                f.allowed.push(feature);
            }
        }
        f.lahf_lm = has(host_cpuid(0x8000_0001), 2, 0);
        f
    }

    pub fn allows(&self, feature: CpuidFeature) -> bool {
        self.allowed.contains(&feature)
    }

    /// Allows `feature`, which the caller found in both CPUIDs (one not
    /// in leaf-only `OPTIONAL`, e.g. XSAVEOPT in leaf 0xD subleaf 1).
    pub fn allow(&mut self, feature: CpuidFeature) {
        self.allowed.push(feature);
    }

    /// The baseline features `class` needs that are missing here.
    pub fn missing_for(&self, class: Class) -> Vec<&'static str> {
        class
            .required()
            .iter()
            .copied()
            .filter(|r| !self.advertised.contains(r))
            .collect()
    }
}

/// CPUID on the host.
pub fn host_cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// A drawn sequence: its code, initial state and (flags undefined at the
/// end, flags undefined on entry to some instruction), in iced's layout.
type Drawn = (Vec<u8>, InitialState, (u32, u32));

/// One generated test case.
#[derive(Debug, Clone)]
pub struct Case {
    pub class: Class,
    pub seed: u64,
    pub index: u64,
    /// The encoded sequence, without end marker, for `layout::CODE_ADDR`.
    pub code: Vec<u8>,
    pub init: InitialState,
    /// RFLAGS bits undefined at the end, not compared.
    pub undefined_rflags: u64,
    /// FSW condition bits undefined at the end, not compared.
    pub undefined_fsw: u16,
    /// RFLAGS bits undefined on entry to some instruction: not compared
    /// when the case ends in an exception (the fault may come there).
    pub undefined_rflags_before_fault: u64,
    /// The same for the FSW condition bits.
    pub undefined_fsw_before_fault: u16,
}

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// Registers that may hold the data pointer (not RSP, nor registers that
/// string, shift or multiply instructions use implicitly).
const BASE_CANDIDATES: [Register; 10] = [
    Register::RBX,
    Register::RBP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

fn gpr_index(r: Register) -> usize {
    GPR64
        .iter()
        .position(|&g| g == r.full_register())
        .unwrap_or(0)
}

/// The registers of a width, as iced names them.
fn regs_of_width(width: u32) -> Vec<Register> {
    let base = match width {
        8 => {
            return [
                Register::AL,
                Register::CL,
                Register::DL,
                Register::BL,
                Register::AH,
                Register::CH,
                Register::DH,
                Register::BH,
                Register::SPL,
                Register::BPL,
                Register::SIL,
                Register::DIL,
                Register::R8L,
                Register::R9L,
                Register::R10L,
                Register::R11L,
                Register::R12L,
                Register::R13L,
                Register::R14L,
                Register::R15L,
            ]
            .to_vec();
        }
        16 => Register::AX,
        32 => Register::EAX,
        _ => Register::RAX,
    };
    (0..16).map(|i| base + i).collect()
}

/// Interesting 64-bit values for registers and immediates.
fn interesting(rng: &mut Rng) -> u64 {
    const EDGES: [u64; 20] = [
        0,
        1,
        2,
        u64::MAX,
        0x7f,
        0x80,
        0xff,
        0x7fff,
        0x8000,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0000,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        0xffff_ffff_ffff_fffe,
        0xffff_ffff_8000_0000,
        0x5555_5555_5555_5555,
        0xaaaa_aaaa_aaaa_aaaa,
    ];
    match rng.below(8) {
        0 | 1 => *rng.pick(&EDGES),
        2 => rng.below(64),
        3 => (rng.below(64)).wrapping_neg(),
        4 => u64::from(rng.next_u32()),
        5 => rng.pick(&EDGES).wrapping_add(rng.range_i64(-2, 2) as u64),
        _ => rng.next_u64(),
    }
}

/// An 80-bit x87 value: normals, zeros, infinities, NaNs, denormals, small
/// integers.
fn random_f80(rng: &mut Rng) -> [u8; 16] {
    let sign = u16::from(rng.one_in(2)) << 15;
    let (exp, mant): (u16, u64) = match rng.below(12) {
        0 => (0, 0),
        1 => (0x7fff, 1 << 63),
        2 => (
            0x7fff,
            0xc000_0000_0000_0000 | (rng.next_u64() >> (2 * u64::from(rng.one_in(2)))),
        ),
        3 => (0x7fff, 0x8000_0000_0000_0000 | (rng.next_u64() >> 2).max(1)),
        4 => (0, rng.next_u64() >> 1),
        5 | 6 => {
            let v = rng.below(2000).max(1);
            let lz = v.leading_zeros();
            (0x3fff + (63 - lz) as u16, v << lz)
        }
        7 => (0x3fff, 1 << 63),
        8 => (rng.below(0x7ffe) as u16 + 1, rng.next_u64() | 1 << 63),
        _ => (
            (0x3fff + rng.range_i64(-70, 70)) as u16,
            rng.next_u64() | 1 << 63,
        ),
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&mant.to_le_bytes());
    out[8..10].copy_from_slice(&(exp | sign).to_le_bytes());
    out
}

fn random_f32_bits(rng: &mut Rng) -> u32 {
    const EDGES: [u32; 14] = [
        0x0000_0000,
        0x8000_0000,
        0x3f80_0000,
        0xbf80_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffc0_0000,
        0x7fa0_0000,
        0x0000_0001,
        0x007f_ffff,
        0x7f7f_ffff,
        0x4f00_0000,
        0xcf00_0000,
    ];
    match rng.below(6) {
        0 => *rng.pick(&EDGES),
        1 => rng.next_u32(),
        2 => (rng.range_i64(-100_000, 100_000) as f32).to_bits(),
        _ => {
            let exp = (127 + rng.range_i64(-30, 30)) as u32;
            (rng.next_u32() & 0x807f_ffff) | exp << 23
        }
    }
}

fn random_f64_bits(rng: &mut Rng) -> u64 {
    const EDGES: [u64; 12] = [
        0,
        0x8000_0000_0000_0000,
        0x3ff0_0000_0000_0000,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0x7ff8_0000_0000_0000,
        0x7ff4_0000_0000_0000,
        1,
        0x000f_ffff_ffff_ffff,
        0x7fef_ffff_ffff_ffff,
        0x43e0_0000_0000_0000,
        0xc3e0_0000_0000_0000,
    ];
    match rng.below(6) {
        0 => *rng.pick(&EDGES),
        1 => rng.next_u64(),
        2 => (rng.range_i64(-1_000_000, 1_000_000) as f64).to_bits(),
        _ => {
            let exp = (1023 + rng.range_i64(-60, 60)) as u64;
            (rng.next_u64() & 0x800f_ffff_ffff_ffff) | exp << 52
        }
    }
}

/// 16 bytes of something an SSE or MMX instruction finds interesting.
fn random_vector(rng: &mut Rng) -> u128 {
    let mut v = 0u128;
    match rng.below(4) {
        0 => {
            for i in 0..4 {
                v |= u128::from(random_f32_bits(rng)) << (32 * i);
            }
        }
        1 => {
            for i in 0..2 {
                v |= u128::from(random_f64_bits(rng)) << (64 * i);
            }
        }
        2 => {
            for i in 0..2 {
                v |= u128::from(interesting(rng)) << (64 * i);
            }
        }
        _ => v = u128::from(rng.next_u64()) | u128::from(rng.next_u64()) << 64,
    }
    v
}

/// How much of the FPU state a random initial state varies.
#[derive(Debug, Clone, Copy)]
pub struct StateProfile {
    /// Vary FCW/MXCSR (rounding, precision, masks) and the x87 stack.
    pub fpu_control: bool,
    /// MXCSR bits the host accepts.
    pub mxcsr_mask: u32,
}

impl StateProfile {
    pub const ALL: StateProfile = StateProfile {
        fpu_control: true,
        mxcsr_mask: 0xffbf,
    };
}

/// A state with zeroed registers, RSP in the stack page and default FPU.
pub fn blank_state() -> InitialState {
    let mut gpr = [0u64; 16];
    gpr[4] = STACK_START;
    InitialState {
        gpr,
        rflags: 0,
        fpu: FpuState::default(),
        data: vec![0; DATA_SIZE],
        stack: vec![0; STACK_SIZE],
    }
}

/// A random initial state (RSP and the base register are set by the caller).
pub fn random_state(rng: &mut Rng, profile: &StateProfile) -> InitialState {
    let mut s = blank_state();
    for g in s.gpr.iter_mut() {
        *g = interesting(rng);
    }
    s.rflags = rng.next_u64() & USER_FLAGS & !FLAGS_DF;
    if rng.one_in(4) {
        s.rflags |= FLAGS_DF;
    }
    // Data: random bytes with interesting values at aligned spots.
    rng.fill(&mut s.data);
    for _ in 0..64 {
        let at = (rng.below((DATA_SIZE / 8) as u64) * 8) as usize;
        let v = match rng.below(3) {
            0 => interesting(rng),
            1 => random_f64_bits(rng),
            _ => u64::from(random_f32_bits(rng)) | u64::from(random_f32_bits(rng)) << 32,
        };
        s.data[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    for _ in 0..16 {
        let at = (rng.below((DATA_SIZE / 16) as u64) * 16) as usize;
        let f = random_f80(rng);
        s.data[at..at + 10].copy_from_slice(&f[..10]);
    }
    rng.fill(&mut s.stack);
    // FPU: values always random, control only for FP-heavy classes.
    let fpu = &mut s.fpu;
    for st in fpu.st.iter_mut() {
        *st = random_f80(rng);
    }
    for x in fpu.xmm.iter_mut() {
        *x = random_vector(rng);
    }
    fpu.ftw = rng.next_u32() as u8 | rng.next_u32() as u8;
    let top = rng.below(8) as u16;
    fpu.fsw = top << 11 | (rng.next_u32() as u16 & 0x4700);
    if profile.fpu_control {
        if rng.one_in(3) {
            let pc = *rng.pick(&[0u16, 2, 3]);
            let rc = rng.below(4) as u16;
            let masks = if rng.one_in(10) {
                rng.next_u32() as u16 & 0x3f
            } else {
                0x3f
            };
            fpu.fcw = 0x40 | masks | pc << 8 | rc << 10;
        }
        // Sticky exception flags only where masked (else #MF is pending).
        fpu.fsw |= rng.next_u32() as u16 & fpu.fcw & 0x3f & if rng.one_in(2) { 0x3f } else { 0 };
        if rng.one_in(2) {
            let mut m = 0x1f80u32;
            if rng.one_in(10) {
                m &= !(rng.next_u32() & 0x1f80);
            }
            m |= rng.next_u32() & 0x6000; // RC
            m |= rng.next_u32() & 0x3f & if rng.one_in(2) { 0x3f } else { 0 };
            if rng.one_in(4) {
                m |= 0x8000; // FTZ
            }
            if rng.one_in(4) {
                m |= 0x40; // DAZ
            }
            fpu.mxcsr = m & profile.mxcsr_mask;
        }
    }
    s
}

/// The undefined-flag bits we track, in iced's RflagsBits layout.
const C_BITS: u32 = RflagsBits::C0 | RflagsBits::C1 | RflagsBits::C2 | RflagsBits::C3;

fn rflags_from_iced(bits: u32) -> u64 {
    let mut r = 0;
    for (iced, x86) in [
        (RflagsBits::OF, 1u64 << 11),
        (RflagsBits::SF, 1 << 7),
        (RflagsBits::ZF, 1 << 6),
        (RflagsBits::AF, 1 << 4),
        (RflagsBits::CF, 1 << 0),
        (RflagsBits::PF, 1 << 2),
        (RflagsBits::DF, 1 << 10),
    ] {
        if bits & iced != 0 {
            r |= x86;
        }
    }
    r
}

fn fsw_from_iced(bits: u32) -> u16 {
    let mut r = 0;
    for (iced, fsw) in [
        (RflagsBits::C0, 1u16 << 8),
        (RflagsBits::C1, 1 << 9),
        (RflagsBits::C2, 1 << 10),
        (RflagsBits::C3, 1 << 14),
    ] {
        if bits & iced != 0 {
            r |= fsw;
        }
    }
    r
}

/// Builds cases of one class.
pub struct Generator {
    class: Class,
    /// Codes the generic filler can build, for this class and features.
    codes: Vec<Code>,
    /// Flag setters mixed into `Conditional` sequences.
    setters: Vec<Code>,
    mxcsr_mask: u32,
    /// Whether memory operands sometimes straddle the end of their page.
    straddles: bool,
    /// The XSAVE family the features allow (Class::Xsave).
    xsave: XsaveForms,
}

/// Which XSAVE-family instructions a case may use.
#[derive(Debug, Clone, Copy)]
struct XsaveForms {
    xsave: bool,
    xsaveopt: bool,
}

/// Operand kinds the generic filler handles.
fn fillable(kind: OpCodeOperandKind) -> bool {
    use OpCodeOperandKind as K;
    matches!(
        kind,
        K::None
            | K::mem
            | K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode
            | K::r32_vvvv
            | K::r64_vvvv
            | K::mm_reg
            | K::mm_rm
            | K::mm_or_mem
            | K::xmm_reg
            | K::xmm_rm
            | K::xmm_or_mem
            | K::al
            | K::cl
            | K::ax
            | K::eax
            | K::rax
            | K::st0
            | K::sti_opcode
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm16
            | K::imm32
            | K::imm32sex64
            | K::imm64
    )
}

fn uses_mm(code: Code) -> bool {
    let op = code.op_code();
    op.op_kinds().iter().any(|k| {
        matches!(
            k,
            OpCodeOperandKind::mm_reg | OpCodeOperandKind::mm_rm | OpCodeOperandKind::mm_or_mem
        )
    })
}

/// Codes never generated: undefined results, or needing set-up the
/// generic filler cannot give.
fn excluded(code: Code) -> bool {
    matches!(
        code,
        // Result undefined.
        Code::Bswap_r16
            // MOVSXD without REX.W: vendors disagree on what it loads.
            | Code::Movsxd_r16_rm16
            | Code::Movsxd_r32_rm32
    ) || {
        // Undocumented SAL (/6) aliases of SHL.
        code.mnemonic() == Mnemonic::Sal
    }
}

impl Generator {
    /// A generator of `class` cases using `features`, with MXCSR values
    /// inside `mxcsr_mask`.
    pub fn new(class: Class, features: &Features, mxcsr_mask: u32) -> Result<Self> {
        let mnemonics = class.mnemonics();
        let ok = |code: Code| -> bool {
            let op = code.op_code();
            // VEX only for general-purpose operands (BMI): the XMM/YMM
            // operand kinds of AVX are not fillable.
            if !op.is_instruction()
                || !matches!(op.encoding(), EncodingKind::Legacy | EncodingKind::VEX)
                || !op.mode64()
                || !op.cpl3()
                || op.is_input_output()
                || excluded(code)
                || !op.op_kinds().iter().all(|&k| fillable(k))
            {
                return false;
            }
            let mut probe = Instruction::default();
            probe.set_code(code);
            if !probe.cpuid_features().iter().all(|&f| features.allows(f)) {
                return false;
            }
            if matches!(code.mnemonic(), Mnemonic::Lahf | Mnemonic::Sahf) && !features.lahf_lm {
                return false;
            }
            match class {
                Class::Mmx => uses_mm(code) || code == Code::Emms,
                Class::SseInt => !uses_mm(code) && code != Code::Emms,
                _ => true,
            }
        };
        let codes: Vec<Code> = Code::values()
            .filter(|&c| mnemonics.contains(&c.mnemonic()) && ok(c))
            .collect();
        let setters: Vec<Code> = Code::values()
            .filter(|&c| {
                matches!(
                    c.mnemonic(),
                    Mnemonic::Cmp | Mnemonic::Test | Mnemonic::Sub | Mnemonic::Add | Mnemonic::Xor
                ) && ok(c)
            })
            .collect();
        let xsave = XsaveForms {
            xsave: features.allows(CpuidFeature::XSAVE),
            xsaveopt: features.allows(CpuidFeature::XSAVE)
                && features.allows(CpuidFeature::XSAVEOPT),
        };
        if class == Class::Xsave && !xsave.xsave {
            return Err(Error::Generate(
                "class xsave: the backend or the host does not advertise XSAVE".into(),
            ));
        }
        let templated = matches!(class, Class::Strings | Class::Stack | Class::Conditional);
        if codes.is_empty() && !templated {
            return Err(Error::Generate(format!(
                "class {class} has no instruction the backend's features allow"
            )));
        }
        Ok(Generator {
            class,
            codes,
            setters,
            mxcsr_mask,
            straddles: true,
            xsave,
        })
    }

    /// Turns page-straddling memory operands (a #PF on the second page)
    /// on or off.
    pub fn with_straddles(mut self, on: bool) -> Self {
        self.straddles = on;
        self
    }

    pub fn class(&self) -> Class {
        self.class
    }

    /// How many instruction forms the generic part of this class draws from.
    pub fn forms(&self) -> usize {
        self.codes.len()
    }

    /// Case `index` of `seed`: the same arguments always give the same case.
    pub fn case(&self, seed: u64, index: u64) -> Result<Case> {
        let mut last = None;
        for attempt in 0..64u64 {
            let mut rng = Rng::for_case(seed, self.class.name(), index.wrapping_add(attempt << 48));
            match self.try_case(&mut rng) {
                Ok(Some((code, init, (undef, undef_anywhere)))) => {
                    return Ok(Case {
                        class: self.class,
                        seed,
                        index,
                        code,
                        init,
                        undefined_rflags: rflags_from_iced(undef),
                        undefined_fsw: fsw_from_iced(undef),
                        undefined_rflags_before_fault: rflags_from_iced(undef_anywhere),
                        undefined_fsw_before_fault: fsw_from_iced(undef_anywhere),
                    });
                }
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::Generate(format!(
                "class {} case {index}: no valid sequence in 64 attempts",
                self.class
            ))
        }))
    }

    fn try_case(&self, rng: &mut Rng) -> Result<Option<Drawn>> {
        let profile = StateProfile {
            fpu_control: self.class.fpu_heavy(),
            mxcsr_mask: self.mxcsr_mask,
        };
        let mut init = random_state(rng, &profile);
        let base = *rng.pick(&BASE_CANDIDATES);
        init.gpr[gpr_index(base)] = DATA_ADDR + 0x800 - 0x100 + rng.below(0x200);
        init.gpr[4] = STACK_START - 8 * rng.below(16);
        let mut b = Builder {
            rng,
            base,
            base_value: init.gpr[gpr_index(base)],
            straddles: self.straddles,
            no_memory: false,
            rsp_value: init.gpr[4],
            items: Vec::new(),
            data_patches: Vec::new(),
            info: InstructionInfoFactory::new(),
            xsave: XsaveTrack::default(),
        };
        let len = 1 + b.rng.below(8) as usize;
        let mut failures = 0;
        while b.items.len() < len {
            let (items, patches) = (b.items.len(), b.data_patches.len());
            if !self.emit(&mut b)? {
                // Drop what the failed template left and try another.
                b.items.truncate(items);
                b.data_patches.truncate(patches);
                failures += 1;
                if failures > 16 {
                    return Ok(None);
                }
            }
        }
        for (at, bytes) in b.data_patches.drain(..) {
            init.data[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let Some(undef) = b.check_flags() else {
            return Ok(None);
        };
        let code = b.encode()?;
        if code.len() + 16 >= crate::native::MAX_CODE {
            return Ok(None);
        }
        Ok(Some((code, init, undef)))
    }

    /// Appends one instruction (or a template) of the class. False when
    /// the attempt should start over.
    fn emit(&self, b: &mut Builder<'_>) -> Result<bool> {
        match self.class {
            Class::Strings => return Ok(b.string_op()),
            Class::Xsave if !b.rng.one_in(3) => {
                return Ok(b.xsave_op(self.xsave, self.mxcsr_mask));
            }
            Class::Stack if !b.rng.one_in(3) => return Ok(b.stack_template()),
            Class::Conditional => match b.rng.below(8) {
                0..=2 => {
                    let code = *b.rng.pick(&self.setters);
                    return Ok(b.generic(code, false));
                }
                3 | 4 => return Ok(b.jcc()),
                _ => {}
            },
            _ => {}
        }
        if self.codes.is_empty() {
            return Ok(false);
        }
        let code = *b.rng.pick(&self.codes);
        match code.mnemonic() {
            Mnemonic::Div | Mnemonic::Idiv if b.rng.below(3) != 0 => b.prepare_division(code),
            Mnemonic::Shld | Mnemonic::Shrd
                if code.op_code().op_kind(2) == OpCodeOperandKind::cl =>
            {
                // A 16-bit double shift by more than 16 is undefined:
                // set CL first.
                let limit = if code.op_code().operand_size() == 16 {
                    17
                } else {
                    64
                };
                let v = b.rng.below(limit) as i64;
                b.push(Instruction::with2(Code::Mov_rm8_imm8, Register::CL, v as i32).ok());
            }
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
                if code.op_code().op_kind(1) != OpCodeOperandKind::imm8 =>
            {
                // The register bit offset reaches anywhere from a memory
                // operand: only the template (small offsets) may use one.
                b.no_memory = true;
                let ok = b.bit_test_mem(code) || b.generic(code, false);
                b.no_memory = false;
                return Ok(ok);
            }
            Mnemonic::Ldmxcsr | Mnemonic::Fldcw => return Ok(b.load_control(code, self.mxcsr_mask)),
            Mnemonic::Bsf | Mnemonic::Bsr if code.op_code().operand_size() == 32 => {
                return Ok(b.bit_scan32(code));
            }
            _ if self.class == Class::Xsave => {
                // Register forms only: a store could rewrite an image an
                // XRSTOR later reads, behind `XsaveTrack`'s back.
                b.no_memory = true;
                let ok = b.generic(code, false);
                b.no_memory = false;
                return Ok(ok);
            }
            _ => {}
        }
        Ok(b.generic(code, self.class == Class::Stack))
    }
}

/// Instructions whose result differs between vendors in a way no flag
/// mask covers: the oracle is one real CPU, so these are not generated.
fn vendor_specific(ins: &Instruction) -> bool {
    // A failed `cmpxchg r32, r32` writes the destination back on Intel
    // (zeroing its upper half) but leaves it alone on AMD.
    ins.code() == Code::Cmpxchg_rm32_r32 && ins.op0_kind() == OpKind::Register
        // A 16-bit double shift by more than 16 (the count masked to 5
        // bits) leaves the result undefined, and Intel and AMD differ
        // (the CL form sets CL in range first).
        || matches!(ins.mnemonic(), Mnemonic::Shld | Mnemonic::Shrd)
            && ins.code().op_code().operand_size() == 16
            && ins.op2_kind() == OpKind::Immediate8
            && ins.immediate8() & 31 > 16
}

/// One sequence under construction.
struct Builder<'a> {
    rng: &'a mut Rng,
    base: Register,
    base_value: u64,
    straddles: bool,
    /// `generic` picks registers for every r/m operand.
    no_memory: bool,
    rsp_value: u64,
    items: Vec<Item>,
    /// Bytes written into the initial data page (offset, bytes).
    data_patches: Vec<(usize, Vec<u8>)>,
    info: InstructionInfoFactory,
    xsave: XsaveTrack,
}

/// What the XSAVE family of a case so far lets the next one do: the
/// difftest compares only what the SDM fixes, and XINUSE (the XSTATE_BV
/// XSAVE writes, what XSAVEOPT may skip) and XSAVEOPT's "modified since
/// the last XRSTOR" tracking are the CPU's own business.
#[derive(Default)]
struct XsaveTrack {
    /// Images XSAVE/XSAVEOPT wrote (addresses).
    saved: Vec<u64>,
    /// An XRSTOR ran: no XSAVEOPT after it (it may skip what it restored).
    restored: bool,
    /// An XRSTOR may have loaded a component's initial state (XINUSE may
    /// be clear on the host, set in the backend): no saves after it.
    maybe_init: bool,
}

struct Item {
    ins: Instruction,
    /// Branch target as an item index (`items.len()` at encode time = end).
    target: Option<usize>,
    /// Flags the instruction writes may stay unchanged (count 0, rep with
    /// RCX = 0): its writes do not make flags defined.
    maybe_keeps_flags: bool,
    /// Reads the x87 condition bits (fnstsw).
    reads_c_bits: bool,
}

/// Placeholder IPs that identify items for the block encoder.
const FAKE_IP: u64 = 0x7000_0000_0000;

impl Builder<'_> {
    fn push(&mut self, ins: Option<Instruction>) -> bool {
        let Some(ins) = ins else { return false };
        self.items.push(Item {
            maybe_keeps_flags: false,
            reads_c_bits: false,
            target: None,
            ins,
        });
        true
    }

    /// A `[base + disp]` (or `[rsp + disp]`) operand for an access of
    /// `size` bytes, inside its page (rarely straddling the end).
    fn memory(&mut self, size: u64) -> MemoryOperand {
        self.memory_with_margin(size, 0x40)
    }

    /// As [`Self::memory`], at least `margin` bytes from either page end
    /// (unless it straddles on purpose).
    fn memory_with_margin(&mut self, size: u64, margin: u64) -> MemoryOperand {
        let size = size.clamp(1, 512);
        let (reg, reg_value, page) = if self.rng.one_in(8) {
            (Register::RSP, self.rsp_value, STACK_ADDR)
        } else {
            (self.base, self.base_value, DATA_ADDR)
        };
        let page_size = DATA_SIZE as u64;
        let offset = if self.straddles && self.rng.one_in(64) {
            // Straddle the end of the page: #PF on both sides.
            page_size - self.rng.below(size.min(16)).max(1)
        } else {
            let span = (page_size - size).max(1);
            let mut o = margin + self.rng.below(span.saturating_sub(2 * margin).max(1));
            if self.rng.below(4) != 0 {
                let align = size.next_power_of_two().min(16);
                o &= !(align - 1);
            }
            o
        };
        let disp = (page + offset).wrapping_sub(reg_value) as i64;
        let mut m = MemoryOperand::with_base_displ(reg, disp);
        if self.rng.one_in(4) {
            m.displ_size = 4;
        }
        m
    }

    fn pick_reg(&mut self, width: u32, written: bool) -> Register {
        let regs = regs_of_width(width);
        loop {
            let r = *self.rng.pick(&regs);
            if !written || (r.full_register() != Register::RSP && r.full_register() != self.base) {
                return r;
            }
        }
    }

    fn immediate(&mut self, kind: OpCodeOperandKind, mnemonic: Mnemonic) -> (OpKind, u64) {
        use OpCodeOperandKind as K;
        let v = interesting(self.rng);
        // Compare predicates above 7 are reserved in legacy SSE encodings.
        let pred_mask = if matches!(
            mnemonic,
            Mnemonic::Cmpps | Mnemonic::Cmppd | Mnemonic::Cmpss | Mnemonic::Cmpsd
        ) {
            7
        } else {
            0xff
        };
        match kind {
            K::imm8 => (OpKind::Immediate8, v & pred_mask),
            K::imm8_const_1 => (OpKind::Immediate8, 1),
            K::imm8sex16 => (OpKind::Immediate8to16, v as i8 as i64 as u64),
            K::imm8sex32 => (OpKind::Immediate8to32, v as i8 as i64 as u64),
            K::imm8sex64 => (OpKind::Immediate8to64, v as i8 as i64 as u64),
            K::imm16 => (OpKind::Immediate16, v & 0xffff),
            K::imm32 => (OpKind::Immediate32, v & 0xffff_ffff),
            K::imm32sex64 => (OpKind::Immediate32to64, v as i32 as i64 as u64),
            _ => (OpKind::Immediate64, v),
        }
    }

    /// Fills `code`'s operands at random and appends it if it writes no
    /// reserved register and touches memory only through base/RSP.
    fn generic(&mut self, code: Code, stack_ok: bool) -> bool {
        use OpCodeOperandKind as K;
        let op = code.op_code();
        let mut ins = Instruction::default();
        ins.set_code(code);
        let width = |k: K| match k {
            K::r8_or_mem | K::r8_reg | K::r8_opcode => 8,
            K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode => 16,
            K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode | K::r32_vvvv => 32,
            _ => 64,
        };
        let mem_size = op.memory_size().size() as u64;
        for i in 0..op.op_count() {
            let kind = op.op_kind(i);
            let written = i == 0;
            let use_mem = match kind {
                _ if self.no_memory && kind != K::mem => false,
                K::mem => true,
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => {
                    self.rng.below(5) < 2
                }
                K::mm_or_mem | K::xmm_or_mem => self.rng.below(5) < 2,
                _ => false,
            };
            if use_mem {
                let m = self.memory(mem_size);
                ins.set_op_kind(i, OpKind::Memory);
                ins.set_memory_base(m.base);
                ins.set_memory_index(Register::None);
                ins.set_memory_displ_size(m.displ_size);
                ins.set_memory_displacement64(m.displacement as u64);
                continue;
            }
            let reg = match kind {
                K::r8_or_mem
                | K::r8_reg
                | K::r8_opcode
                | K::r16_or_mem
                | K::r16_reg
                | K::r16_rm
                | K::r16_opcode
                | K::r32_or_mem
                | K::r32_reg
                | K::r32_rm
                | K::r32_opcode
                | K::r64_or_mem
                | K::r64_reg
                | K::r64_rm
                | K::r64_opcode
                | K::r32_vvvv
                | K::r64_vvvv => Some(self.pick_reg(width(kind), written)),
                K::mm_reg | K::mm_rm | K::mm_or_mem => {
                    Some(Register::MM0 + self.rng.below(8) as u32)
                }
                K::xmm_reg | K::xmm_rm | K::xmm_or_mem => {
                    Some(Register::XMM0 + self.rng.below(16) as u32)
                }
                K::al => Some(Register::AL),
                K::cl => Some(Register::CL),
                K::ax => Some(Register::AX),
                K::eax => Some(Register::EAX),
                K::rax => Some(Register::RAX),
                K::st0 => Some(Register::ST0),
                K::sti_opcode => Some(Register::ST0 + self.rng.below(8) as u32),
                _ => None,
            };
            if let Some(r) = reg {
                ins.set_op_kind(i, OpKind::Register);
                ins.set_op_register(i, r);
            } else {
                let (k, v) = self.immediate(kind, code.mnemonic());
                ins.set_op_kind(i, k);
                ins.set_immediate_u64(i, v);
            }
        }
        if op.can_use_lock_prefix() && ins.op0_kind() == OpKind::Memory && self.rng.one_in(4) {
            ins.set_has_lock_prefix(true);
        }
        if !self.acceptable(&ins, stack_ok) || vendor_specific(&ins) {
            return false;
        }
        let maybe_keeps_flags = matches!(
            code.mnemonic(),
            Mnemonic::Shl
                | Mnemonic::Shr
                | Mnemonic::Sar
                | Mnemonic::Rol
                | Mnemonic::Ror
                | Mnemonic::Rcl
                | Mnemonic::Rcr
                | Mnemonic::Shld
                | Mnemonic::Shrd
        ) && (0..op.op_count()).any(|i| op.op_kind(i) == K::cl);
        let reads_c_bits = code.mnemonic() == Mnemonic::Fnstsw;
        self.items.push(Item {
            ins,
            target: None,
            maybe_keeps_flags,
            reads_c_bits,
        });
        true
    }

    /// No reserved register written; memory only through base or RSP.
    fn acceptable(&mut self, ins: &Instruction, stack_ok: bool) -> bool {
        let base = self.base;
        let info = self.info.info(ins);
        for u in info.used_registers() {
            let writes = matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            );
            let full = u.register().full_register();
            if writes && (full == base || (full == Register::RSP && !stack_ok)) {
                return false;
            }
        }
        info.used_memory()
            .iter()
            .all(|m| m.base() == base || m.base() == Register::RSP)
    }

    /// `mov r, small; bt [mem], r`: the bit offset must stay near `mem`.
    fn bit_test_mem(&mut self, code: Code) -> bool {
        if !self.rng.one_in(2) {
            return false;
        }
        let op = code.op_code();
        let w = op.operand_size();
        let reg = self.pick_reg(w.max(16), true);
        let bits = self.rng.range_i64(-512, 512);
        let full = regs_of_width(64)[gpr_index(reg)];
        // ±512 bits is ±64 bytes around the operand.
        let m = self.memory_with_margin(u64::from(w / 8), 0x80);
        let (Ok(set), Ok(bt)) = (
            Instruction::with2(Code::Mov_rm64_imm32, full, bits as i32),
            Instruction::with2(code, m, reg),
        ) else {
            return false;
        };
        let mut bt = bt;
        if op.can_use_lock_prefix() && self.rng.one_in(3) {
            bt.set_has_lock_prefix(true);
        }
        self.push(Some(set)) && self.acceptable(&bt, false) && self.push(Some(bt))
    }

    /// `or src, bit; bsf/bsr r32, src`. With a zero source AMD leaves the
    /// whole destination alone and Intel clears its upper half, so the
    /// 32-bit forms only ever see a non-zero source.
    fn bit_scan32(&mut self, code: Code) -> bool {
        let dst = self.pick_reg(32, true);
        let src = self.pick_reg(32, true);
        let bit = 1i32 << self.rng.below(31);
        self.push(Instruction::with2(Code::Or_rm32_imm32, src, bit).ok())
            && self.push(Instruction::with2(code, dst, src).ok())
    }

    /// Before a division: zero or sign-extend the high half, so most
    /// divisions do not overflow.
    fn prepare_division(&mut self, code: Code) {
        let signed = code.mnemonic() == Mnemonic::Idiv;
        let prep = match (code.op_code().operand_size(), signed) {
            (8, false) => Instruction::with2(Code::Movzx_r32_rm8, Register::EAX, Register::AL),
            (8, true) => Ok(Instruction::with(Code::Cbw)),
            (16, false) => Instruction::with2(Code::Xor_r32_rm32, Register::EDX, Register::EDX),
            (16, true) => Ok(Instruction::with(Code::Cwd)),
            (32, false) => Instruction::with2(Code::Xor_r32_rm32, Register::EDX, Register::EDX),
            (32, true) => Ok(Instruction::with(Code::Cdq)),
            (_, false) => Instruction::with2(Code::Xor_r32_rm32, Register::EDX, Register::EDX),
            (_, true) => Ok(Instruction::with(Code::Cqo)),
        };
        self.push(prep.ok());
    }

    /// `ldmxcsr`/`fldcw` from a memory slot holding a sane value.
    fn load_control(&mut self, code: Code, mxcsr_mask: u32) -> bool {
        let m = self.memory(4);
        let addr = self.base_value.wrapping_add(m.displacement as u64);
        if m.base != self.base || !(DATA_ADDR..DATA_ADDR + DATA_SIZE as u64 - 4).contains(&addr) {
            return false;
        }
        let bytes = if code.mnemonic() == Mnemonic::Ldmxcsr {
            let mut v = 0x1f80 | (self.rng.next_u32() & 0xe07f);
            if self.rng.one_in(8) {
                v &= !(self.rng.next_u32() & 0x1f80);
            }
            (v & mxcsr_mask).to_le_bytes().to_vec()
        } else {
            let pc = *self.rng.pick(&[0u16, 2, 3]);
            let masks = if self.rng.one_in(8) {
                self.rng.next_u32() as u16 & 0x3f
            } else {
                0x3f
            };
            (0x40 | masks | pc << 8 | (self.rng.below(4) as u16) << 10)
                .to_le_bytes()
                .to_vec()
        };
        self.data_patches.push(((addr - DATA_ADDR) as usize, bytes));
        self.push(Instruction::with1(code, m).ok())
    }

    /// One of the XSAVE family on an image in the data page, with its
    /// set-up: EDX:EAX = a requested-feature bitmap of x87 and/or SSE only
    /// (the host's XCR0 has more components than the backend's x87|SSE, so
    /// wider masks would save different things by design), the image
    /// 64-byte aligned (one in 16 misaligned: #GP). XRSTOR reads an image
    /// patched into the data page with a valid header and MXCSR and random
    /// XSTATE_BV (a clear bit loads that component's initial state), or
    /// one an earlier XSAVE of the case wrote. XGETBV's XCR0 is masked to
    /// the components both sides enable.
    fn xsave_op(&mut self, forms: XsaveForms, mxcsr_mask: u32) -> bool {
        const IMAGE: u64 = 576;
        const HEADER: usize = 512;
        let mut kind = self.rng.below(if forms.xsaveopt { 4 } else { 3 });
        if kind == 2 && self.xsave.restored {
            kind = 0;
        }
        if kind == 0 && self.xsave.maybe_init {
            kind = 1;
        }
        if kind == 3 || self.rng.one_in(8) {
            // xgetbv with ECX = 0; the high half is zero on both sides.
            return self
                .push(Instruction::with2(Code::Xor_r32_rm32, Register::ECX, Register::ECX).ok())
                && self.push(Some(Instruction::with(Code::Xgetbv)))
                && self.push(Instruction::with2(Code::And_EAX_imm32, Register::EAX, 3).ok())
                && self.push(
                    Instruction::with2(Code::Xor_r32_rm32, Register::EDX, Register::EDX).ok(),
                );
        }
        let slots = (DATA_SIZE as u64 - IMAGE) / 64;
        let mut target = DATA_ADDR + 64 * self.rng.below(slots - 1);
        if self.rng.one_in(16) {
            target += 8 * (1 + self.rng.below(7));
        }
        let disp = target.wrapping_sub(self.base_value) as i64;
        let mem = MemoryOperand::with_base_displ(self.base, disp);
        let rfbm = self.rng.below(4) as u32;
        let code = match kind {
            0 => Code::Xsave64_mem,
            1 => Code::Xrstor64_mem,
            _ => Code::Xsaveopt64_mem,
        };
        let overlaps_a_save = self
            .xsave
            .saved
            .iter()
            .any(|&s| s < target + IMAGE && target < s + IMAGE);
        if code == Code::Xrstor64_mem {
            self.xsave.restored = true;
        } else {
            self.xsave.saved.push(target);
        }
        if code == Code::Xrstor64_mem && target.is_multiple_of(64) && !self.rng.one_in(8) {
            let at = (target - DATA_ADDR) as usize;
            let mut header = [0u8; 64];
            let bv = self.rng.below(4);
            if overlaps_a_save || bv & u64::from(rfbm) != u64::from(rfbm) {
                self.xsave.maybe_init = true;
            }
            header[..8].copy_from_slice(&bv.to_le_bytes());
            self.data_patches.push((at + HEADER, header.to_vec()));
            let mut mxcsr = 0x1f80 | (self.rng.next_u32() & 0xe07f);
            if self.rng.one_in(8) {
                mxcsr &= !(self.rng.next_u32() & 0x1f80);
            }
            self.data_patches
                .push((at + 24, (mxcsr & mxcsr_mask).to_le_bytes().to_vec()));
            // FIP and FDP canonical: AMD keeps 48 bits of them, so other
            // values load differently by vendor.
            for field in [8, 16] {
                let v = ((self.rng.next_u64() << 16) as i64 >> 16) as u64;
                self.data_patches
                    .push((at + field, v.to_le_bytes().to_vec()));
            }
        } else if code == Code::Xrstor64_mem {
            // Random bytes as the header: most likely #GP, else anything.
            self.xsave.maybe_init = true;
        }
        let ok = self.push(Instruction::with2(Code::Mov_r32_imm32, Register::EAX, rfbm).ok())
            && self.push(Instruction::with2(Code::Xor_r32_rm32, Register::EDX, Register::EDX).ok())
            && self.push(Instruction::with1(code, mem).ok());
        if !ok || code == Code::Xrstor64_mem {
            return ok;
        }
        // MXCSR_MASK (image offset 28) is what each CPU supports (this
        // host's has AMD's MM bit 17): keep only the bits both support.
        let at = |off: i64| MemoryOperand::with_base_displ(self.base, disp + off);
        let (mask, fop, fip, fdp) = (at(28), at(6), at(8), at(16));
        // FOP, FIP and FDP (offsets 6..24) are not compared, as in the
        // other classes: AMD saves them only with an exception pending.
        self.push(Instruction::with2(Code::And_rm32_imm32, mask, mxcsr_mask).ok())
            && self.push(Instruction::with2(Code::Mov_rm16_imm16, fop, 0u32).ok())
            && self.push(Instruction::with2(Code::Mov_rm64_imm32, fip, 0).ok())
            && self.push(Instruction::with2(Code::Mov_rm64_imm32, fdp, 0).ok())
    }

    /// A forward conditional (or unconditional) branch.
    fn jcc(&mut self) -> bool {
        const JCC: [Code; 17] = [
            Code::Jo_rel32_64,
            Code::Jno_rel32_64,
            Code::Jb_rel32_64,
            Code::Jae_rel32_64,
            Code::Je_rel32_64,
            Code::Jne_rel32_64,
            Code::Jbe_rel32_64,
            Code::Ja_rel32_64,
            Code::Js_rel32_64,
            Code::Jns_rel32_64,
            Code::Jp_rel32_64,
            Code::Jnp_rel32_64,
            Code::Jl_rel32_64,
            Code::Jge_rel32_64,
            Code::Jle_rel32_64,
            Code::Jg_rel32_64,
            Code::Jmp_rel32_64,
        ];
        let code = *self.rng.pick(&JCC);
        let Ok(ins) = Instruction::with_branch(code, 0) else {
            return false;
        };
        let here = self.items.len();
        // Targets are fixed at encode time; record the distance now.
        let skip = 1 + self.rng.below(3) as usize;
        self.items.push(Item {
            ins,
            target: Some(here + 1 + skip),
            maybe_keeps_flags: false,
            reads_c_bits: false,
        });
        true
    }

    /// A string instruction with its pointers and count set up.
    fn string_op(&mut self) -> bool {
        let size = *self.rng.pick(&[1u32, 2, 4, 8]);
        let kind = self.rng.below(5);
        let rep = match (kind, self.rng.below(3)) {
            (_, 0) => RepPrefixKind::None,
            (3 | 4, 1) => RepPrefixKind::Repne,
            _ => RepPrefixKind::Repe,
        };
        let count = if self.rng.one_in(8) {
            0
        } else {
            self.rng.below(40)
        };
        let mut setup = Vec::new();
        // rsi/rdi into the middle of the data page, so `count` elements
        // either way stay inside it.
        let base = self.base;
        for reg in [Register::RSI, Register::RDI] {
            let target = DATA_ADDR + 0x400 + self.rng.below(0x800);
            let disp = target.wrapping_sub(self.base_value) as i64;
            setup.push(Instruction::with2(
                Code::Lea_r64_m,
                reg,
                MemoryOperand::with_base_displ(base, disp),
            ));
        }
        if rep != RepPrefixKind::None {
            setup.push(Instruction::with2(
                Code::Mov_r32_imm32,
                Register::ECX,
                count as u32,
            ));
        }
        if self.rng.one_in(4) {
            setup.push(Ok(Instruction::with(if self.rng.one_in(2) {
                Code::Std
            } else {
                Code::Cld
            })));
        }
        let a = 64;
        let none = Register::None;
        let op = match (kind, size) {
            (0, 1) => Instruction::with_movsb(a, none, rep),
            (0, 2) => Instruction::with_movsw(a, none, rep),
            (0, 4) => Instruction::with_movsd(a, none, rep),
            (0, _) => Instruction::with_movsq(a, none, rep),
            (1, 1) => Instruction::with_stosb(a, rep),
            (1, 2) => Instruction::with_stosw(a, rep),
            (1, 4) => Instruction::with_stosd(a, rep),
            (1, _) => Instruction::with_stosq(a, rep),
            (2, 1) => Instruction::with_lodsb(a, none, rep),
            (2, 2) => Instruction::with_lodsw(a, none, rep),
            (2, 4) => Instruction::with_lodsd(a, none, rep),
            (2, _) => Instruction::with_lodsq(a, none, rep),
            (3, 1) => Instruction::with_cmpsb(a, none, rep),
            (3, 2) => Instruction::with_cmpsw(a, none, rep),
            (3, 4) => Instruction::with_cmpsd(a, none, rep),
            (3, _) => Instruction::with_cmpsq(a, none, rep),
            (_, 1) => Instruction::with_scasb(a, rep),
            (_, 2) => Instruction::with_scasw(a, rep),
            (_, 4) => Instruction::with_scasd(a, rep),
            (_, _) => Instruction::with_scasq(a, rep),
        };
        for s in setup {
            if !self.push(s.ok()) {
                return false;
            }
        }
        let Ok(op) = op else { return false };
        self.items.push(Item {
            ins: op,
            target: None,
            maybe_keeps_flags: rep != RepPrefixKind::None,
            reads_c_bits: false,
        });
        true
    }

    /// Stack templates: pushf, push imm + popf, call/pop, call/ret,
    /// enter/leave, ret imm.
    fn stack_template(&mut self) -> bool {
        let here = self.items.len();
        match self.rng.below(6) {
            0 => self.push(Some(Instruction::with(Code::Pushfq))),
            1 => {
                // Only arithmetic flags and DF: IF/IOPL/AC/TF differ by CPL.
                let flags = (self.rng.next_u64() & USER_FLAGS) as u32 | 0x202;
                self.push(Instruction::with1(Code::Pushq_imm32, flags as i32).ok())
                    && self.push(Some(Instruction::with(Code::Popfq)))
            }
            2 => {
                // call next; pop reg: reg = the return address.
                let reg = self.pick_reg(64, true);
                let Ok(call) = Instruction::with_branch(Code::Call_rel32_64, 0) else {
                    return false;
                };
                self.items.push(Item {
                    ins: call,
                    target: Some(here + 1),
                    maybe_keeps_flags: false,
                    reads_c_bits: false,
                });
                self.push(Instruction::with1(Code::Pop_r64, reg).ok())
            }
            3 => {
                // call L; jmp E; L: [ret | ret imm16]; E:
                let (Ok(call), Ok(jmp)) = (
                    Instruction::with_branch(Code::Call_rel32_64, 0),
                    Instruction::with_branch(Code::Jmp_rel32_64, 0),
                ) else {
                    return false;
                };
                let ret = if self.rng.one_in(3) {
                    Instruction::with1(Code::Retnq_imm16, 8 * self.rng.below(4) as i32).ok()
                } else {
                    Some(Instruction::with(Code::Retnq))
                };
                self.items.push(Item {
                    ins: call,
                    target: Some(here + 2),
                    maybe_keeps_flags: false,
                    reads_c_bits: false,
                });
                self.items.push(Item {
                    ins: jmp,
                    target: Some(here + 3),
                    maybe_keeps_flags: false,
                    reads_c_bits: false,
                });
                self.push(ret)
            }
            4 if self.base != Register::RBP => {
                // enter n, 0 ... leave (level 0: no frame copying).
                let n = 8 * self.rng.below(8) as i32;
                self.push(Instruction::with2(Code::Enterq_imm16_imm8, n, 0).ok())
                    && self.push(Some(Instruction::with(Code::Leaveq)))
            }
            _ => {
                let reg = self.pick_reg(64, false);
                let dst = self.pick_reg(64, true);
                self.push(Instruction::with1(Code::Push_r64, reg).ok())
                    && self.push(Instruction::with1(Code::Pop_r64, dst).ok())
            }
        }
    }

    /// Walks every path (branches only go forward) and returns the flags
    /// undefined at the end and those undefined on entry to any reachable
    /// instruction (what a fault there leaves), or None if an instruction
    /// reads an undefined flag.
    fn check_flags(&self) -> Option<(u32, u32)> {
        let n = self.items.len();
        // incoming[i]: flags possibly undefined on entry to item i.
        let mut incoming = vec![0u32; n + 1];
        let mut reachable = vec![false; n + 1];
        reachable[0] = true;
        for (i, item) in self.items.iter().enumerate() {
            if !reachable[i] {
                continue;
            }
            let undef_in = incoming[i];
            let ins = &item.ins;
            let mut reads = ins.rflags_read();
            if item.reads_c_bits {
                reads |= C_BITS;
            }
            if reads & undef_in != 0 {
                return None;
            }
            let defined = ins.rflags_written() | ins.rflags_cleared() | ins.rflags_set();
            let mut out = ins.rflags_undefined();
            out |= if item.maybe_keeps_flags {
                undef_in
            } else {
                undef_in & !defined
            };
            if let Some(t) = item.target {
                let t = t.min(n);
                incoming[t] |= out;
                reachable[t] = true;
            }
            let falls_through = !matches!(ins.flow_control(), FlowControl::UnconditionalBranch);
            // A call continues at its target; the return comes back to i+1
            // through the `ret`, which we treat as falling through.
            if falls_through || ins.flow_control() == FlowControl::Call {
                incoming[i + 1] |= out;
                reachable[i + 1] = true;
            }
            if ins.flow_control() == FlowControl::Return {
                // After ret execution continues after the matching call:
                // conservatively everything after.
                for slot in &mut incoming[i + 1..=n] {
                    *slot |= out;
                }
            }
        }
        let anywhere = (0..=n)
            .filter(|&i| reachable[i])
            .fold(0, |acc, i| acc | incoming[i]);
        Some((incoming[n], anywhere))
    }

    /// Encodes at CODE_ADDR with branch targets resolved.
    fn encode(&mut self) -> Result<Vec<u8>> {
        let n = self.items.len();
        let needs_end = self.items.iter().any(|i| i.target.is_some_and(|t| t >= n));
        let mut list: Vec<Instruction> = Vec::with_capacity(n + 1);
        for (i, item) in self.items.iter().enumerate() {
            let mut ins = item.ins;
            ins.set_ip(FAKE_IP + i as u64);
            if let Some(t) = item.target {
                ins.set_near_branch64(FAKE_IP + t.min(n) as u64);
            }
            list.push(ins);
        }
        if needs_end {
            // A landing pad for branches to the end.
            let mut nop = Instruction::with(Code::Nopd);
            nop.set_ip(FAKE_IP + n as u64);
            list.push(nop);
        }
        let block = InstructionBlock::new(&list, crate::layout::CODE_ADDR);
        BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
            .map(|r| r.code_buffer)
            .map_err(|e| Error::Generate(format!("encoding failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::CODE_ADDR;
    use crate::state::{FLAGS_CF, FLAGS_OF, FLAGS_SF, FLAGS_ZF};
    use iced_x86::{Decoder, DecoderOptions};

    fn generator(class: Class) -> Generator {
        Generator::new(class, &Features::host(), 0xffbf).expect("generator")
    }

    /// The classes this host can run natively (the extension classes need
    /// the host's optional features).
    fn host_classes() -> Vec<Class> {
        Class::ALL
            .into_iter()
            .filter(|&c| Generator::new(c, &Features::host(), 0xffbf).is_ok())
            .collect()
    }

    #[test]
    fn every_class_generates_decodable_reproducible_cases() {
        for class in host_classes() {
            let g = generator(class);
            for i in 0..200 {
                let c = g.case(42, i).expect("case");
                assert!(!c.code.is_empty(), "{class} case {i} is empty");
                let mut dec = Decoder::with_ip(64, &c.code, CODE_ADDR, DecoderOptions::NONE);
                let mut len = 0;
                for ins in &mut dec {
                    assert_ne!(
                        ins.code(),
                        Code::INVALID,
                        "{class} case {i}: {:02x?}",
                        c.code
                    );
                    len += ins.len();
                }
                assert_eq!(len, c.code.len());
                let again = g.case(42, i).expect("case");
                assert_eq!((&again.code, &again.init), (&c.code, &c.init));
            }
        }
    }

    /// Every explicit memory operand uses RSP or a register that starts in
    /// the data page and that no instruction of the sequence writes.
    #[test]
    fn memory_operands_only_use_reserved_registers() {
        let mut info = InstructionInfoFactory::new();
        for class in host_classes() {
            let g = generator(class);
            for i in 0..200 {
                let c = g.case(7, i).expect("case");
                let dec = Decoder::with_ip(64, &c.code, CODE_ADDR, DecoderOptions::NONE);
                let list: Vec<Instruction> = dec.into_iter().collect();
                let mut written = Vec::new();
                for ins in &list {
                    for u in info.info(ins).used_registers() {
                        if matches!(
                            u.access(),
                            OpAccess::Write
                                | OpAccess::ReadWrite
                                | OpAccess::CondWrite
                                | OpAccess::ReadCondWrite
                        ) {
                            written.push(u.register().full_register());
                        }
                    }
                }
                for ins in &list {
                    if ins.mnemonic() == Mnemonic::Lea {
                        continue;
                    }
                    for op in 0..ins.op_count() {
                        if ins.op_kind(op) != OpKind::Memory {
                            continue;
                        }
                        let base = ins.memory_base();
                        let v = c.init.gpr[gpr_index(base)];
                        let ok = base == Register::RSP
                            || ((DATA_ADDR..DATA_ADDR + DATA_SIZE as u64).contains(&v)
                                && !written.contains(&base));
                        assert!(ok, "{class} case {i}: {ins} uses {base:?} = {v:#x}");
                    }
                }
            }
        }
    }

    fn flags_of(list: &[(Instruction, Option<usize>)]) -> Option<u32> {
        flags_at_end_and_anywhere(list).map(|(end, _)| end)
    }

    fn flags_at_end_and_anywhere(list: &[(Instruction, Option<usize>)]) -> Option<(u32, u32)> {
        let mut rng = Rng::new(1);
        let mut b = Builder {
            rng: &mut rng,
            base: Register::RBX,
            base_value: DATA_ADDR + 0x800,
            straddles: false,
            no_memory: false,
            rsp_value: STACK_START,
            items: Vec::new(),
            data_patches: Vec::new(),
            info: InstructionInfoFactory::new(),
            xsave: XsaveTrack::default(),
        };
        for &(ins, target) in list {
            b.items.push(Item {
                ins,
                target,
                maybe_keeps_flags: false,
                reads_c_bits: false,
            });
        }
        b.check_flags()
    }

    fn ins2(code: Code, a: Register, b: Register) -> (Instruction, Option<usize>) {
        (Instruction::with2(code, a, b).expect("instruction"), None)
    }

    #[test]
    fn reading_an_undefined_flag_rejects_the_sequence() {
        let mul = (
            Instruction::with1(Code::Mul_rm32, Register::ECX).expect("mul"),
            None,
        );
        let setz = (
            Instruction::with1(Code::Sete_rm8, Register::AL).expect("sete"),
            None,
        );
        assert_eq!(flags_of(&[mul, setz]), None, "mul leaves ZF undefined");
        let test = ins2(Code::Test_rm32_r32, Register::EAX, Register::EAX);
        let undef = flags_of(&[mul, test, setz]).expect("test defines ZF");
        assert_eq!(rflags_from_iced(undef) & (FLAGS_ZF | FLAGS_SF), 0);
    }

    #[test]
    fn flags_undefined_part_way_are_reported_for_faults() {
        // shr eax, 5 (OF undefined); add eax, ecx (defines OF). At the end
        // OF is defined, but a fault at the add sees it undefined.
        let shr = (
            Instruction::with2(Code::Shr_rm32_imm8, Register::EAX, 5).expect("shr"),
            None,
        );
        let add = ins2(Code::Add_rm32_r32, Register::EAX, Register::ECX);
        let (end, anywhere) = flags_at_end_and_anywhere(&[shr, add]).expect("valid");
        assert_eq!(rflags_from_iced(end) & FLAGS_OF, 0);
        assert_ne!(rflags_from_iced(anywhere) & FLAGS_OF, 0);
    }

    #[test]
    fn a_skipped_instruction_does_not_define_flags() {
        // imul; jc 3; test eax, eax; (3:) end. SF is undefined along the
        // path that jumps over the test.
        let imul = ins2(Code::Imul_r32_rm32, Register::EAX, Register::ECX);
        let jc = (
            Instruction::with_branch(Code::Jb_rel32_64, 0).expect("jc"),
            Some(3),
        );
        let test = ins2(Code::Test_rm32_r32, Register::EAX, Register::EAX);
        let undef = rflags_from_iced(flags_of(&[imul, jc, test]).expect("valid"));
        assert_ne!(undef & FLAGS_SF, 0);
        assert_eq!(undef & FLAGS_CF, 0, "imul defines CF");
        let straight = rflags_from_iced(flags_of(&[imul, test]).expect("valid"));
        assert_eq!(straight & FLAGS_SF, 0);
    }

    #[test]
    fn thirty_two_bit_cmpxchg_into_a_register_is_not_generated() {
        let g = generator(Class::Exchange);
        for i in 0..500 {
            let c = g.case(3, i).expect("case");
            for ins in Decoder::with_ip(64, &c.code, CODE_ADDR, DecoderOptions::NONE) {
                assert!(!vendor_specific(&ins), "case {i}: {ins}");
            }
        }
    }
}
