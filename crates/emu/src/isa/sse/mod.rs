//! MMX, SSE, SSE2 and SSE3: the XMM/MMX register operations, MXCSR,
//! FXSAVE/FXRSTOR. Float arithmetic is the software IEEE engine in
//! [`float`], exact in every MXCSR mode.

// The handlers land in the next commits; until then only the tests use it.
#[allow(dead_code)]
pub mod float;
