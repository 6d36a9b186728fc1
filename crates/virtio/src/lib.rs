#![deny(unsafe_code)]
//! virtio over MMIO (virtio 1.x, spec §4.2): the transport the guest
//! programs, the VMM event loop that runs device work off the vCPU
//! threads, and the devices (block, net, vsock, rng, console).
//!
//! A device never sees its transport: it gets its queues, guest memory and
//! interrupt when the driver sets DRIVER_OK, and gives them back at reset.
//! This crate knows the seam (`IrqLine`, ioevents, guest memory) and the
//! bus trait, never the machine, the boot code or a backend.

pub mod config;

pub use config::*;
pub mod device;
pub mod event_loop;
pub mod mmio;

pub use device::{ActivateError, Activation, GuestRam, Interrupt, VirtioDevice};
pub use event_loop::{EventLoop, EventLoopError, EventLoopHandle, LoopThreadHook};
pub use mmio::MmioTransport;
pub mod devices;
pub mod queue;
pub mod rate_limiter;
pub mod serial_input;
mod sys;
#[cfg(test)]
pub(crate) mod testing;
