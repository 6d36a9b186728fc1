//! The x87/MMX/SSE register file. The x87/SSE families own its semantics;
//! the core only moves it in and out of [`FpuState`] (the FXSAVE image).

use vmplay_hypervisor::FpuState;

/// One x87 register: 64-bit significand and sign+15-bit exponent, the
/// 80-bit extended format field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct F80 {
    pub signif: u64,
    pub sign_exp: u16,
}

impl F80 {
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        F80 {
            signif: u64::from_le_bytes(s),
            sign_exp: u16::from_le_bytes([b[8], b[9]]),
        }
    }
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.signif.to_le_bytes());
        b[8..10].copy_from_slice(&self.sign_exp.to_le_bytes());
        b
    }
}

/// x87 + SSE state. `st[i]` is the *physical* register Ri, so MMX
/// registers alias the significands (`st[i].signif` = MMi); ST(j) is
/// `st[(TOP + j) & 7]` (see `isa::x87` for the stack helpers). FXSAVE and
/// [`FpuState`] list ST(0)..ST(7) instead: `from_state`/`to_state` rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fpu {
    pub fcw: u16,
    /// Status word including TOP (bits 11..13).
    pub fsw: u16,
    /// Abridged tag word: bit i set = physical register i holds a value.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub st: [F80; 8],
    pub mxcsr: u32,
    pub xmm: [u128; 16],
}

impl Default for Fpu {
    fn default() -> Self {
        Self::from_state(&FpuState::default())
    }
}

impl Fpu {
    pub fn from_state(s: &FpuState) -> Self {
        let top = usize::from((s.fsw >> 11) & 7);
        let mut st = [F80::default(); 8];
        for (j, b) in s.st.iter().enumerate() {
            st[(top + j) & 7] = F80::from_bytes(b);
        }
        Fpu {
            fcw: s.fcw,
            fsw: s.fsw,
            ftw: s.ftw,
            fop: s.fop,
            fip: s.fip,
            fdp: s.fdp,
            st,
            mxcsr: s.mxcsr,
            xmm: s.xmm,
        }
    }

    pub fn to_state(self) -> FpuState {
        let top = usize::from((self.fsw >> 11) & 7);
        let st = std::array::from_fn(|j| self.st[(top + j) & 7].to_bytes());
        FpuState {
            fcw: self.fcw,
            fsw: self.fsw,
            ftw: self.ftw,
            fop: self.fop,
            fip: self.fip,
            fdp: self.fdp,
            mxcsr: self.mxcsr,
            st,
            xmm: self.xmm,
        }
    }
}
