//! Modes and protection: descriptor loads and segment checks, interrupt
//! and exception delivery, far transfers, fast system calls, task switches,
//! the debug architecture.

pub mod dbreg;
pub mod far;
pub mod interrupt;
pub mod segment;
pub mod syscall;
pub mod task;
