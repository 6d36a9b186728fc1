//! One module per endpoint group: each turns a method and body into a
//! [`crate::request::VmmAction`], or a routing error.

pub mod actions;
pub mod boot_source;
pub mod drives;
pub mod entropy;
pub mod logger;
pub mod machine_config;
pub mod metrics;
pub mod mmds;
pub mod net;
pub mod serial;
pub mod unsupported;
pub mod vm;
pub mod vsock;
