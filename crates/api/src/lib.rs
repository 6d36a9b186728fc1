//! Firecracker's interface for vmplay: the REST API on a Unix socket and
//! the `--config-file` JSON, over one set of schema types ([`schema`]) and
//! one validation path ([`resources`]), so a file and a sequence of API
//! calls configure the same VM the same way.
//!
//! Threads, as in Firecracker: the API server ([`server`], thread
//! `fc_api`) parses each request ([`request`], one module per endpoint
//! group in [`endpoints`]) and forwards it over a channel to the VMM
//! thread ([`vmm`]), which owns the resources and, after `InstanceStart`,
//! the running machine. The logger ([`logger`]) and metrics ([`metrics`])
//! write Firecracker's formats.
//!
//! This crate drives `vmplay_machine` and never names a backend: the CLI
//! hands it a launcher that picks one.

#![deny(unsafe_code)] // but for two clock reads through libc (logger, metrics)

pub mod config;
pub mod endpoints;
pub mod logger;
pub mod metrics;
pub mod request;
pub mod resources;
pub mod schema;
pub mod seccomp;
pub mod server;
pub mod vmm;

pub use resources::{ConfigError, VmResources};
pub use vmm::{FIRECRACKER_VERSION, Vmm, VmmEvent, VmmOptions};
