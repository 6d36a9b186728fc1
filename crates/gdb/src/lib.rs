//! A gdb remote stub (`vmplay run --gdb tcp:HOST:PORT`), on the `gdbstub`
//! crate, as QEMU's `-gdb`/`-S`.
//!
//! The stub reaches the VM only through [`Debuggable`], which the machine
//! implements: pause and resume every vCPU, let one vCPU run alone (a
//! single step), read and write registers and guest-virtual memory, set
//! the breakpoints a backend checks. Each vCPU is a gdb thread (thread id
//! = vCPU id + 1). The stub is all-stop: when one vCPU stops for the
//! debugger, every vCPU and the guest's clock stop with it.

#![forbid(unsafe_code)]

mod arch;
mod regs;
mod target;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use vmplay_hypervisor::{CpuState, DebugEvent, GuestDebug};

pub use target::GdbTarget;

/// What the debugger hears from the VM while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// vCPU `vcpu` stopped for the debugger (it is paused; the others may
    /// still run until [`Debuggable::pause_all`]).
    Debug { vcpu: u32, event: DebugEvent },
    /// The VM stopped for good, with this exit status.
    Exited(u8),
}

/// The VM as the debugger sees it. Errors are messages for the log: gdb
/// only hears that a request failed.
pub trait Debuggable: Send {
    /// Number of vCPUs (ids 0..n).
    fn vcpu_count(&self) -> u32;
    /// Stops every vCPU at an instruction boundary, and the guest's clock.
    fn pause_all(&mut self) -> Result<(), String>;
    /// Lets every vCPU and the clock run.
    fn resume_all(&mut self) -> Result<(), String>;
    /// Lets only `vcpu` (and the clock) run; the others stay paused.
    fn resume_one(&mut self, vcpu: u32) -> Result<(), String>;
    fn state(&mut self, vcpu: u32) -> Result<CpuState, String>;
    fn set_state(&mut self, vcpu: u32, state: &CpuState) -> Result<(), String>;
    /// Reads guest-virtual `gva` through `vcpu`'s page tables; returns the
    /// bytes read before the first unmapped one.
    fn read_virt(&mut self, vcpu: u32, gva: u64, buf: &mut [u8]) -> Result<usize, String>;
    /// Writes guest-virtual `gva` through `vcpu`'s page tables.
    fn write_virt(&mut self, vcpu: u32, gva: u64, data: &[u8]) -> Result<(), String>;
    /// Reads guest-physical memory (`monitor` commands); bytes read.
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<usize, String>;
    fn set_guest_debug(&mut self, vcpu: u32, debug: &GuestDebug) -> Result<(), String>;
    /// The next event, waiting at most `timeout`.
    fn wait_event(&mut self, timeout: Duration) -> Option<VmEvent>;
    /// Stops the VM (gdb's `kill`).
    fn kill(&mut self);
}

/// Where the stub listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GdbAddress {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// A Unix socket path (anything that is not `tcp:`).
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error("--gdb {0:?}: expected tcp:HOST:PORT or a Unix socket path")]
    BadAddress(String),
    #[error("--gdb {addr}: cannot listen: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the gdb thread: {0}")]
    Thread(std::io::Error),
}

impl std::str::FromStr for GdbAddress {
    type Err = GdbError;

    fn from_str(text: &str) -> Result<Self, GdbError> {
        let bad = || GdbError::BadAddress(text.to_string());
        if let Some(rest) = text.strip_prefix("tcp:") {
            // HOST may be empty (all interfaces, as QEMU's tcp::PORT) or an
            // IPv6 literal in brackets; PORT is a number.
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            port.parse::<u16>().map_err(|_| bad())?;
            let host = if host.is_empty() { "0.0.0.0" } else { host };
            return Ok(GdbAddress::Tcp(format!("{host}:{port}")));
        }
        if text.is_empty() || text.contains('\0') {
            return Err(bad());
        }
        Ok(GdbAddress::Unix(PathBuf::from(text)))
    }
}

impl std::fmt::Display for GdbAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddress::Tcp(a) => write!(f, "tcp:{a}"),
            GdbAddress::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A bound, not yet accepting, gdb socket: binding early lets the CLI
/// report a bad address before the guest runs.
pub enum GdbListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl GdbListener {
    pub fn bind(addr: &GdbAddress) -> Result<GdbListener, GdbError> {
        let listen_err = |source| GdbError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            GdbAddress::Tcp(a) => Ok(GdbListener::Tcp(TcpListener::bind(a).map_err(listen_err)?)),
            GdbAddress::Unix(p) => {
                // A stale socket from an earlier run is replaced, as QEMU does.
                if std::fs::symlink_metadata(p)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(p);
                }
                Ok(GdbListener::Unix(
                    UnixListener::bind(p).map_err(listen_err)?,
                    p.clone(),
                ))
            }
        }
    }

    /// The bound address, for messages (`tcp:HOST:PORT` with the real port).
    pub fn local_addr(&self) -> String {
        match self {
            GdbListener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
            GdbListener::Unix(_, p) => p.display().to_string(),
        }
    }

    fn accept(
        &self,
    ) -> std::io::Result<Box<dyn gdbstub::conn::ConnectionExt<Error = std::io::Error>>> {
        Ok(match self {
            GdbListener::Tcp(l) => Box::new(l.accept()?.0),
            GdbListener::Unix(l, _) => Box::new(l.accept()?.0),
        })
    }
}

impl Drop for GdbListener {
    fn drop(&mut self) {
        if let GdbListener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves gdb on `listener` from a thread of its own: one session after
/// another until the VM stops. The VM runs until gdb connects unless the
/// caller started it paused (`--gdb-wait`).
pub fn spawn(
    listener: GdbListener,
    vm: Box<dyn Debuggable>,
) -> Result<std::thread::JoinHandle<()>, GdbError> {
    std::thread::Builder::new()
        .name("gdb".into())
        .spawn(move || serve(listener, vm))
        .map_err(GdbError::Thread)
}

fn serve(listener: GdbListener, vm: Box<dyn Debuggable>) {
    let mut target = GdbTarget::new(vm);
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("gdb: accept failed: {e}");
                return;
            }
        };
        tracing::info!("gdb: debugger connected");
        match target.session(conn) {
            target::SessionEnd::Detached => continue,
            target::SessionEnd::Over => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "tcp:127.0.0.1:1234".parse::<GdbAddress>().unwrap(),
            GdbAddress::Tcp("127.0.0.1:1234".into())
        );
        assert_eq!(
            "tcp::1234".parse::<GdbAddress>().unwrap(),
            GdbAddress::Tcp("0.0.0.0:1234".into())
        );
        assert_eq!(
            "tcp:[::1]:1234".parse::<GdbAddress>().unwrap(),
            GdbAddress::Tcp("[::1]:1234".into())
        );
        assert_eq!(
            "/tmp/gdb.sock".parse::<GdbAddress>().unwrap(),
            GdbAddress::Unix("/tmp/gdb.sock".into())
        );
        for bad in ["tcp:", "tcp:host", "tcp:host:99999", "tcp:host:x", ""] {
            assert!(bad.parse::<GdbAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_host_is_a_listen_error() {
        let addr: GdbAddress = "tcp:no.such.host.invalid:1".parse().unwrap();
        let err = GdbListener::bind(&addr).err().expect("must fail");
        assert!(err.to_string().contains("cannot listen"), "{err}");
    }
}
