//! Why an instruction stopped early: an architectural exception to deliver,
//! or an access the machine must answer first.

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BR: u8 = 5;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;
pub const XM: u8 = 19;

/// An exception with its error code, if the vector pushes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub code: Option<u32>,
}

impl Fault {
    #[inline]
    pub fn raise(vector: u8, code: Option<u32>) -> Stop {
        Stop::Fault(Fault { vector, code })
    }
    #[cold]
    pub fn ud() -> Stop {
        Self::raise(UD, None)
    }
    #[cold]
    pub fn de() -> Stop {
        Self::raise(DE, None)
    }
    #[cold]
    pub fn nm() -> Stop {
        Self::raise(NM, None)
    }
    #[cold]
    pub fn gp(code: u32) -> Stop {
        Self::raise(GP, Some(code))
    }
    #[cold]
    pub fn ss(code: u32) -> Stop {
        Self::raise(SS, Some(code))
    }
    #[cold]
    pub fn np(code: u32) -> Stop {
        Self::raise(NP, Some(code))
    }
    #[cold]
    pub fn ts(code: u32) -> Stop {
        Self::raise(TS, Some(code))
    }
    #[cold]
    pub fn mf() -> Stop {
        Self::raise(MF, None)
    }
    #[cold]
    pub fn xm() -> Stop {
        Self::raise(XM, None)
    }
}

/// Why a handler returned early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Deliver this exception (the instruction has no effect).
    Fault(Fault),
    /// A software interrupt / trap (`int n`, `int3`, `into`): delivered
    /// with RIP after the instruction.
    SoftInt(u8),
    /// The instruction needs the machine (MMIO or port read); it is retried
    /// once the machine has answered.
    Exit,
}

/// What every handler and memory helper returns.
pub type Res<T = ()> = Result<T, Stop>;
