//! The crate's error type.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host call failed.
    #[error("{op}: {source}")]
    Host {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The native runner (the child process) misbehaved.
    #[error("native runner: {0}")]
    Native(String),
    /// A case the runners cannot take (too long, a bad image, ...).
    #[error("bad case: {0}")]
    BadCase(String),
    /// The backend failed through the seam.
    #[error("backend {backend}: {op}: {source}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        #[source]
        source: vmplay_hypervisor::Error,
    },
    /// The backend ran, but not to an end this harness understands.
    #[error("backend {backend}: {what}")]
    BackendRun { backend: &'static str, what: String },
    /// Guest memory could not be built or accessed.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// An environment variable has a value we cannot use.
    #[error("environment variable {name}={value:?}: {why}")]
    Env {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    /// The generator could not build a case (an encoder error).
    #[error("generator: {0}")]
    Generate(String),
}

pub type Result<T> = std::result::Result<T, Error>;
