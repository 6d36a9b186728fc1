//! Differential testing of vCPU backends against the host CPU.
//!
//! Random instruction sequences (generated with iced-x86, per instruction
//! [`Class`]) run from the same initial state natively, in a forked child
//! process on the host CPU ([`native`]), and in a backend through the
//! `vmplay-hypervisor` seam only ([`backend`]). Every GPR, RFLAGS (less the
//! flags iced says are undefined), the x87/SSE state and the data and stack
//! pages must match, and so must the exception a case ends in. This crate
//! is a test harness: nothing in the VMM depends on it.
//!
//! Use: [`assert_matches_host`]`(&hypervisor, Class::Shifts, 3000)` in a
//! test. A failure prints the seed, the case index, the disassembly, the
//! initial state and the differences; `VMPLAY_DIFFTEST_SEED=<seed>` reruns
//! the same cases (the default seed is fixed; `=random` explores),
//! `VMPLAY_DIFFTEST_CASE=<index>` just one of them, and
//! `VMPLAY_DIFFTEST_CASES=<n>` or `=x<factor>` scales the count.
//! [`run_random_bytes`] feeds a backend random ring-0 code and checks it
//! always comes back.
//!
//! The oracle is whatever CPU the tests run on; instructions whose results
//! differ between vendors beyond undefined flags are not generated.

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
