//! Tiny guest kernels for testing vmplay end to end, assembled in Rust with
//! iced-x86 and packaged as Multiboot v1 ELF files, so any Multiboot loader
//! (`vmplay run --kernel`, `qemu -kernel`) boots them.
//!
//! Each program in [`programs`] exercises one part of the machine (real
//! mode, long mode, SMP start-up, the Multiboot handoff, the exit devices,
//! the RTC) and reports on COM1, so a test asserts on exactly what the guest
//! printed and how vmplay exited. [`fixtures`] builds malformed kernels for
//! bad-input tests.
//!
//! This crate is not a guest OS: no interrupts, no drivers beyond polled port
//! I/O, nothing a test does not need. It is only for tests and the demo.

pub mod debug;
pub mod fixtures;
pub mod image;
pub mod programs;
pub mod runtime;
pub mod virtio;

pub use debug::{GDB_TARGET_ROUNDS, GdbTarget, gdb_target};
pub use image::MultibootImage;
pub use programs::*;
pub use virtio::virtio_blk;

/// Why a guest image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("assembling guest code: {0}")]
    Asm(#[from] iced_x86::IcedError),
    #[error("low-memory code would end at {end:#x}, past the {limit:#x} limit")]
    LowMemoryFull { end: u64, limit: u32 },
    #[error("no 32-bit entry point: call MultibootImage::set_entry32")]
    NoEntry,
}
