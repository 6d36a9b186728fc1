//! The state a case starts from and the state each side ends in.

use crate::layout::{CODE_ADDR, DATA_SIZE, STACK_SIZE};
use vmplay_hypervisor::FpuState;

/// What a case loads before its first instruction, identically on the host
/// and in the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialState {
    /// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15.
    pub gpr: [u64; 16],
    /// Only the arithmetic flags and DF are taken; IF is always set and
    /// everything else clear (user mode cannot set more).
    pub rflags: u64,
    pub fpu: FpuState,
    /// The data page (`layout::DATA_ADDR`).
    pub data: Vec<u8>,
    /// The stack page (`layout::STACK_ADDR`).
    pub stack: Vec<u8>,
}

/// RFLAGS bits a case may set and that are compared.
pub const FLAGS_CF: u64 = 1 << 0;
pub const FLAGS_PF: u64 = 1 << 2;
pub const FLAGS_AF: u64 = 1 << 4;
pub const FLAGS_ZF: u64 = 1 << 6;
pub const FLAGS_SF: u64 = 1 << 7;
pub const FLAGS_IF: u64 = 1 << 9;
pub const FLAGS_DF: u64 = 1 << 10;
pub const FLAGS_OF: u64 = 1 << 11;
pub const USER_FLAGS: u64 =
    FLAGS_CF | FLAGS_PF | FLAGS_AF | FLAGS_ZF | FLAGS_SF | FLAGS_DF | FLAGS_OF;

impl InitialState {
    /// The RFLAGS value both sides actually load: the user bits, IF and
    /// the always-one bit 1.
    pub fn loaded_rflags(&self) -> u64 {
        (self.rflags & USER_FLAGS) | FLAGS_IF | 0x2
    }
}

/// How a case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran off its last instruction into the end marker.
    Completed,
    /// It raised exception `vector`; the registers are those at the fault.
    Exception { vector: u8 },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Completed => f.write_str("completed"),
            Outcome::Exception { vector } => {
                write!(f, "exception {} ({vector})", vector_name(*vector))
            }
        }
    }
}

/// The mnemonic of an exception vector.
pub fn vector_name(vector: u8) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "22", "23", "24", "25", "26",
        "27", "#HV", "#VC", "#SX", "31",
    ];
    NAMES.get(usize::from(vector)).copied().unwrap_or("IRQ")
}

/// What one side reports after running a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub outcome: Outcome,
    /// The end of the code for `Completed`, the faulting instruction (or
    /// the one after a trap) for `Exception`.
    pub rip: u64,
    /// The faulting address of a #PF; 0 otherwise.
    pub cr2: u64,
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub fpu: FpuState,
    pub data: Vec<u8>,
    pub stack: Vec<u8>,
}

impl Observed {
    /// A blank observation for `code_len` bytes of code, to be filled in.
    pub fn blank() -> Self {
        Observed {
            outcome: Outcome::Completed,
            rip: CODE_ADDR,
            cr2: 0,
            gpr: [0; 16],
            rflags: 0,
            fpu: FpuState::default(),
            data: vec![0; DATA_SIZE],
            stack: vec![0; STACK_SIZE],
        }
    }
}

/// Size of an FXSAVE image.
pub const FXSAVE_SIZE: usize = 512;

/// The FXSAVE64 image of `fpu` (reserved fields zero).
pub fn fpu_to_fxsave(fpu: &FpuState) -> [u8; FXSAVE_SIZE] {
    let mut img = [0u8; FXSAVE_SIZE];
    img[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    img[4] = fpu.ftw;
    img[6..8].copy_from_slice(&fpu.fop.to_le_bytes());
    img[8..16].copy_from_slice(&fpu.fip.to_le_bytes());
    img[16..24].copy_from_slice(&fpu.fdp.to_le_bytes());
    img[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (i, st) in fpu.st.iter().enumerate() {
        let at = 32 + 16 * i;
        // Bytes 10..16 of each slot are reserved: keep them zero.
        img[at..at + 10].copy_from_slice(&st[..10]);
    }
    for (i, x) in fpu.xmm.iter().enumerate() {
        let at = 160 + 16 * i;
        img[at..at + 16].copy_from_slice(&x.to_le_bytes());
    }
    img
}

/// The FPU state an FXSAVE64 image holds.
pub fn fpu_from_fxsave(img: &[u8; FXSAVE_SIZE]) -> FpuState {
    let u16_at = |at: usize| u16::from_le_bytes([img[at], img[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(img[at..at + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |at: usize| u64::from_le_bytes(img[at..at + 8].try_into().unwrap_or([0; 8]));
    let mut st = [[0u8; 16]; 8];
    for (i, reg) in st.iter_mut().enumerate() {
        let at = 32 + 16 * i;
        reg[..10].copy_from_slice(&img[at..at + 10]);
    }
    let mut xmm = [0u128; 16];
    for (i, reg) in xmm.iter_mut().enumerate() {
        let at = 160 + 16 * i;
        *reg = u128::from_le_bytes(img[at..at + 16].try_into().unwrap_or([0; 16]));
    }
    FpuState {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftw: img[4],
        fop: u16_at(6),
        fip: u64_at(8),
        fdp: u64_at(16),
        mxcsr: u32_at(24),
        st,
        xmm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_image_round_trips() {
        let mut fpu = FpuState {
            fcw: 0x27f,
            fsw: 0x3800,
            ftw: 0x81,
            fop: 0x1d9,
            fip: 0x4000_0010,
            fdp: 0x4010_0020,
            mxcsr: 0x9fc0,
            ..FpuState::default()
        };
        fpu.st[7] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0, 0, 0, 0];
        fpu.xmm[15] = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        let img = fpu_to_fxsave(&fpu);
        assert_eq!(&img[24..28], &0x9fc0u32.to_le_bytes());
        assert_eq!(img[32 + 16 * 7 + 9], 10);
        assert_eq!(fpu_from_fxsave(&img), fpu);
    }

    #[test]
    fn loaded_rflags_keeps_only_user_bits() {
        let s = InitialState {
            gpr: [0; 16],
            rflags: u64::MAX,
            fpu: FpuState::default(),
            data: vec![],
            stack: vec![],
        };
        assert_eq!(s.loaded_rflags(), USER_FLAGS | FLAGS_IF | 2);
    }
}
