//! The x87 FPU family: the register stack, tags, status and control words,
//! exceptions (#MF / FSW.ES), FIP/FDP/FOP, and every x87 instruction.
//! The arithmetic itself is the software 80-bit float in [`float80`].

// The handlers land in the next commits; until then only the tests use it.
#[allow(dead_code)]
pub mod float80;
