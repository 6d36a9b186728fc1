//! What the machine asks for: one plain struct per device kind. The CLI
//! flags and the Firecracker config file / API (their own schema types)
//! both end up here, so the devices see one shape whatever the front end.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmplay_devices::mmds::Mmds;

pub use crate::devices::net::mmds::http::Tokens;

/// One token bucket: `size` tokens, refilled evenly over `refill_time_ms`,
/// plus a `one_time_burst` spent first and never refilled (Firecracker's
/// `TokenBucket`). `size == 0` or `refill_time_ms == 0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenBucketConfig {
    pub size: u64,
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

/// Firecracker's `RateLimiter`: a byte bucket and an operation bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimiterConfig {
    pub bandwidth: Option<TokenBucketConfig>,
    pub ops: Option<TokenBucketConfig>,
}

/// Firecracker's `cache_type`: whether guest FLUSH reaches the host disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheType {
    /// FLUSH is not advertised; the host page cache decides (Firecracker's default).
    #[default]
    Unsafe,
    /// `VIRTIO_BLK_F_FLUSH` is advertised and a FLUSH is an `fdatasync`.
    Writeback,
}

/// A virtio-blk drive backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// Firecracker's `drive_id`; also the GET_ID serial the guest reads.
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Boot from it: the machine adds `root=/dev/vdX` (or PARTUUID) and `ro`/`rw`.
    pub root: bool,
    pub partuuid: Option<String>,
    pub cache: CacheType,
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Where a virtio-net device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A host TAP device by name (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
    Tap { name: String },
    /// User-mode networking: vmplay starts Debian's `passt` and speaks its
    /// Unix-socket protocol (4-byte big-endian length, then the frame).
    User,
    /// An already-running passt (or any peer of that protocol) at this socket.
    UserSocket { path: PathBuf },
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Firecracker's `iface_id`.
    pub id: String,
    pub backend: NetBackendConfig,
    /// The guest's MAC; `None` lets vmplay pick a locally administered one.
    pub mac: Option<[u8; 6]>,
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The metadata service answers on this interface (`/mmds/config`
    /// names it).
    pub mmds: Option<MmdsNetConfig>,
}

/// Firecracker's MMDS versions: V2 needs session tokens on every GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// The metadata service as an interface sees it. One VM has one store
/// and one set of tokens, shared by every interface that serves it.
#[derive(Clone)]
pub struct MmdsNetConfig {
    pub store: Arc<Mutex<Mmds>>,
    pub tokens: Arc<Tokens>,
    pub ipv4: Ipv4Addr,
    pub version: MmdsVersion,
    /// Always answer in IMDS text, even to `Accept: application/json`.
    pub imds_compat: bool,
}

impl std::fmt::Debug for MmdsNetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsNetConfig")
            .field("ipv4", &self.ipv4)
            .field("version", &self.version)
            .field("imds_compat", &self.imds_compat)
            .finish_non_exhaustive()
    }
}

impl PartialEq for MmdsNetConfig {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.store, &o.store)
            && Arc::ptr_eq(&self.tokens, &o.tokens)
            && (self.ipv4, self.version, self.imds_compat) == (o.ipv4, o.version, o.imds_compat)
    }
}

impl Eq for MmdsNetConfig {}

/// The virtio-vsock device with Firecracker's hybrid Unix-socket backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u32,
    /// Host-initiated connections come in here; guest connections to host
    /// port P go out to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// The listener already bound at `uds_path` (the API binds it at
    /// `PUT /vsock`, as Firecracker); `None`: the device binds it.
    pub listener: Option<BoundListener>,
}

/// A Unix listener bound ahead of the device; host connections wait in
/// its backlog until the event loop serves them.
#[derive(Debug, Clone)]
pub struct BoundListener(pub std::sync::Arc<std::os::unix::net::UnixListener>);

impl PartialEq for BoundListener {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BoundListener {}

/// The virtio-rng device (host `getrandom`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntropyConfig {
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Where a virtio-console (`hvc0`) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// Guest output to stdout, host stdin to the guest.
    Stdio,
    /// Guest output appended to this file; no input.
    File(PathBuf),
}

/// Every virtio device of one VM, in the order the guest sees them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VirtioConfig {
    pub drives: Vec<DriveConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub entropy: Option<EntropyConfig>,
    pub console: Option<ConsoleConfig>,
}
