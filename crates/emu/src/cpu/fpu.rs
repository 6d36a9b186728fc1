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

/// x87 + SSE state. `st[i]` is ST(i) relative to TOP as FXSAVE stores it;
/// MMX registers alias the significands (`st[i].signif` = MMi).
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
        Fpu {
            fcw: s.fcw,
            fsw: s.fsw,
            ftw: s.ftw,
            fop: s.fop,
            fip: s.fip,
            fdp: s.fdp,
            st: s.st.map(|b| F80::from_bytes(&b)),
            mxcsr: s.mxcsr,
            xmm: s.xmm,
        }
    }

    pub fn to_state(&self) -> FpuState {
        FpuState {
            fcw: self.fcw,
            fsw: self.fsw,
            ftw: self.ftw,
            fop: self.fop,
            fip: self.fip,
            fdp: self.fdp,
            mxcsr: self.mxcsr,
            st: self.st.map(F80::to_bytes),
            xmm: self.xmm,
        }
    }
}
