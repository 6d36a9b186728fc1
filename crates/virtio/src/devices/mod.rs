//! The device models. Each file is one device; `rng.rs` is the smallest
//! whole one and the place to start reading.

pub mod block;
pub mod console;
pub mod net;
pub mod rng;
pub mod vsock;
