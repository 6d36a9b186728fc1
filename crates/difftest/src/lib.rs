//! Differential testing of vCPU backends against the host CPU.
//!
//! Random instruction sequences (generated with iced-x86, per instruction
//! class) run from the same initial state natively, in a forked child
//! process on the host CPU, and in a backend through the `vmplay-hypervisor`
//! seam. Every GPR, RFLAGS (less the flags iced says are undefined), the
//! x87/SSE state and the touched memory must match. This crate is a test
//! harness: it is not part of the VMM and nothing in the VMM depends on it.

pub mod backend;
pub mod check;
pub mod compare;
pub mod error;
pub mod generate;
pub mod layout;
pub mod native;
pub mod rng;
pub mod state;

pub use backend::{BackendRunner, RandomBytesReport, run_random_bytes};
pub use check::{Config, assert_matches_host, assert_matches_host_with, check_class};
pub use error::{Error, Result};
pub use generate::Class;
