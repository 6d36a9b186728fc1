//! The VM being configured: what the config file and the pre-boot API
//! calls accumulate, validated once here for both (Firecracker's
//! `resources.rs`), and turned into a [`vmplay_machine::MachineConfig`] at
//! `InstanceStart`.

use crate::schema::*;
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmplay_machine as machine;

/// Firecracker's default kernel command line.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";
/// The longest command line Firecracker accepts.
pub const MAX_CMDLINE: usize = 2048;
/// Firecracker's limit on vCPUs.
pub const MAX_VCPUS: u8 = 32;
/// The MMDS address when none is configured.
pub const DEFAULT_MMDS_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// A refused configuration. The text is Firecracker's `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("Boot source error: {0}")]
    BootSource(String),
    #[error("Machine config error: {0}")]
    MachineConfig(String),
    #[error("Drive config error: {0}")]
    Drive(String),
    #[error("Network config error: {0}")]
    Network(String),
    #[error("Vsock config error: {0}")]
    Vsock(String),
    #[error("Entropy device error: {0}")]
    Entropy(String),
    #[error("MMMDS config error: {0}")]
    MmdsConfig(String),
    #[error("Metrics error: {0}")]
    Metrics(String),
    #[error("Logger error: {0}")]
    Logger(String),
    /// Something Firecracker has and vmplay does not have yet.
    #[error("{0}")]
    NotYet(String),
}

const VCPU_COUNT_MSG: &str = "The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.";
const MEM_SIZE_MSG: &str =
    "The memory size (MiB) is either 0, or not a multiple of the configured page size.";

/// Everything configured before `InstanceStart`.
#[derive(Debug, Clone, Default)]
pub struct VmResources {
    pub boot_source: Option<BootSource>,
    pub machine_config: MachineConfiguration,
    /// Whether `machine-config` was ever set (GET /vm/config shows it anyway).
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    /// The listener `PUT /vsock` bound at its `uds_path`.
    pub vsock_listener: Option<std::sync::Arc<std::os::unix::net::UnixListener>>,
    pub entropy: Option<Entropy>,
    pub mmds_config: Option<MmdsConfigInfo>,
    pub serial: Option<Serial>,
}

fn io_error_text(e: &std::io::Error) -> String {
    e.to_string()
}

impl VmResources {
    /// Applies a whole config file in Firecracker's order. `logger` and
    /// `metrics` are applied by the caller, which owns them.
    pub fn from_config(config: &VmmConfig) -> Result<VmResources, ConfigError> {
        let mut r = VmResources::default();
        if let Some(m) = &config.machine_config {
            r.set_machine_config(m.clone())?;
        }
        if config.cpu_config.is_some() {
            return Err(not_yet("custom CPU templates (cpu-config)"));
        }
        r.set_boot_source(config.boot_source.clone())?;
        for d in &config.drives {
            r.set_drive(d.clone())?;
        }
        for n in &config.network_interfaces {
            r.set_network_interface(n.clone())?;
        }
        if let Some(v) = &config.vsock {
            r.set_vsock(v.clone())?;
        }
        if config.balloon.is_some() {
            return Err(not_yet("a balloon device"));
        }
        if let Some(m) = &config.mmds_config {
            r.set_mmds_config(m.clone())?;
        }
        if let Some(e) = &config.entropy {
            r.set_entropy(*e)?;
        }
        if !config.pmem.is_empty() {
            return Err(not_yet("pmem devices"));
        }
        if config.memory_hotplug.is_some() {
            return Err(not_yet("memory hotplug"));
        }
        Ok(r)
    }

    /// `PUT /boot-source`: the files are opened now, as Firecracker does.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), ConfigError> {
        std::fs::File::open(&b.kernel_image_path).map_err(|e| {
            ConfigError::BootSource(format!(
                "The kernel file cannot be opened: {}",
                io_error_text(&e)
            ))
        })?;
        if let Some(initrd) = &b.initrd_path {
            std::fs::File::open(initrd).map_err(|e| {
                ConfigError::BootSource(format!(
                    "The initrd file cannot be opened due to invalid path or invalid permissions. {}",
                    io_error_text(&e)
                ))
            })?;
        }
        let args = b.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS);
        if args.len() >= MAX_CMDLINE {
            return Err(ConfigError::BootSource(
                "The kernel command line is invalid: Command line too large".into(),
            ));
        }
        if args.bytes().any(|c| !(0x20..0x7f).contains(&c)) {
            return Err(ConfigError::BootSource(
                "The kernel command line is invalid: String contains an invalid character".into(),
            ));
        }
        self.boot_source = Some(b);
        Ok(())
    }

    fn check_machine_config(m: &MachineConfiguration) -> Result<(), ConfigError> {
        if m.vcpu_count == 0
            || m.vcpu_count > MAX_VCPUS
            || (m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1)
        {
            return Err(ConfigError::MachineConfig(VCPU_COUNT_MSG.into()));
        }
        if m.mem_size_mib == 0
            || (m.huge_pages != HugePages::None && !m.mem_size_mib.is_multiple_of(2))
        {
            return Err(ConfigError::MachineConfig(MEM_SIZE_MSG.into()));
        }
        // Refused by name rather than silently dropped.
        if m.smt {
            return Err(not_yet("simultaneous multithreading (smt: true)"));
        }
        if m.track_dirty_pages {
            return Err(not_yet("dirty page tracking (track_dirty_pages: true)"));
        }
        if m.huge_pages == HugePages::Hugetlbfs2M {
            return Err(not_yet("huge pages (huge_pages: \"2M\")"));
        }
        if let Some(t) = m.cpu_template.filter(|t| *t != CpuTemplate::None) {
            return Err(not_yet(&format!("CPU templates (cpu_template: {t:?})")));
        }
        Ok(())
    }

    /// `PUT /machine-config`: unspecified optional fields go back to their
    /// defaults (an omitted `cpu_template` keeps the previous one).
    pub fn set_machine_config(&mut self, mut m: MachineConfiguration) -> Result<(), ConfigError> {
        if m.cpu_template.is_none() {
            m.cpu_template = self.machine_config.cpu_template;
        }
        Self::check_machine_config(&m)?;
        self.machine_config = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn update_machine_config(
        &mut self,
        u: &MachineConfigurationUpdate,
    ) -> Result<(), ConfigError> {
        let mut m = self.machine_config.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.cpu_template {
            m.cpu_template = Some(v);
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        Self::check_machine_config(&m)?;
        self.machine_config = m;
        Ok(())
    }

    /// `PUT /drives/{id}`: the backing file is opened now; a second root
    /// device is refused; the same id replaces the earlier drive.
    pub fn set_drive(&mut self, d: Drive) -> Result<(), ConfigError> {
        if d.socket.is_some() {
            return Err(not_yet("vhost-user block devices (socket)"));
        }
        if d.io_engine == Some(IoEngine::Async) {
            return Err(not_yet("the Async io_engine"));
        }
        let path = d.path_on_host.clone().ok_or_else(|| {
            ConfigError::Drive(
                "Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) ".into(),
            )
        })?;
        let read_only = d.is_read_only.unwrap_or(false);
        OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| {
                ConfigError::Drive(format!(
                    "Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {} {path}",
                    io_error_text(&e)
                ))
            })?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(ConfigError::Drive(
                "A root block device already exists!".into(),
            ));
        }
        let mut d = d;
        d.is_read_only = Some(read_only);
        d.io_engine = Some(d.io_engine.unwrap_or_default());
        self.drives.retain(|o| o.drive_id != d.drive_id);
        // The root device is the first the guest sees (/dev/vda).
        if d.is_root_device {
            self.drives.insert(0, d);
        } else {
            self.drives.push(d);
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn set_network_interface(&mut self, n: NetworkInterface) -> Result<(), ConfigError> {
        if let Some(mac) = &n.guest_mac {
            parse_mac(mac)
                .ok_or_else(|| ConfigError::Network(format!("Invalid MAC address: {mac}")))?;
            let mac = mac.to_ascii_lowercase();
            if self.network_interfaces.iter().any(|o| {
                o.iface_id != n.iface_id
                    && o.guest_mac.as_deref().map(str::to_ascii_lowercase) == Some(mac.clone())
            }) {
                return Err(ConfigError::Network(format!(
                    "The MAC address is already in use: {}",
                    n.guest_mac.as_deref().unwrap_or_default()
                )));
            }
        }
        if let Some(mtu) = n.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(ConfigError::Network(format!("Invalid MTU: {mtu}")));
        }
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(ConfigError::Network(format!(
                "Could not create the network device: Open tap device failed: Invalid interface name: {}",
                n.host_dev_name
            )));
        }
        match self
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(slot) => *slot = n,
            None => self.network_interfaces.push(n),
        }
        Ok(())
    }

    /// `PUT /vsock`.
    ///
    /// Binds and listens on `uds_path` now, as Firecracker does: host
    /// connections wait in the backlog until the VM runs. A second PUT
    /// first deletes the previous socket file, then binds the new one; an
    /// existing file at the path (even a stale socket) is a bind error.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), ConfigError> {
        if let Some(old) = self.vsock.take() {
            self.vsock_listener = None;
            if let Err(e) = std::fs::remove_file(&old.uds_path) {
                return Err(ConfigError::Vsock(format!(
                    "Cannot remove the previous vsock socket {}: {e}",
                    old.uds_path
                )));
            }
        }
        let listener = std::os::unix::net::UnixListener::bind(&v.uds_path).map_err(|e| {
            ConfigError::Vsock(format!(
                "Cannot create backend for vsock device: Error binding to the host-side Unix socket: {}",
                machine::vsock_error_text(&e)
            ))
        })?;
        listener.set_nonblocking(true).map_err(|e| {
            ConfigError::Vsock(format!("Cannot create backend for vsock device: {e}"))
        })?;
        self.vsock_listener = Some(std::sync::Arc::new(listener));
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: Entropy) -> Result<(), ConfigError> {
        self.entropy = Some(e);
        Ok(())
    }

    /// `PUT /serial`.
    pub fn set_serial(&mut self, s: Serial) -> Result<(), ConfigError> {
        if s.rate_limiter.is_some() {
            return Err(not_yet("a serial rate_limiter"));
        }
        self.serial = Some(s);
        Ok(())
    }

    /// `PUT /mmds/config`: the interfaces must exist already.
    pub fn set_mmds_config(&mut self, c: MmdsConfig) -> Result<(), ConfigError> {
        if c.network_interfaces.is_empty() {
            return Err(ConfigError::MmdsConfig(
                "The list of network interface IDs that allow forwarding MMDS requests is empty."
                    .into(),
            ));
        }
        if c.network_interfaces
            .iter()
            .any(|id| !self.network_interfaces.iter().any(|n| &n.iface_id == id))
        {
            return Err(ConfigError::MmdsConfig(
                "The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.".into(),
            ));
        }
        let ip = c.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4);
        let o = ip.octets();
        if o[0] != 169 || o[1] != 254 || o[2] == 0 || o[2] == 255 {
            return Err(ConfigError::MmdsConfig(
                "The MMDS IPv4 address is not link local.".into(),
            ));
        }
        self.mmds_config = Some(MmdsConfigInfo {
            version: c.version.unwrap_or_default(),
            network_interfaces: c.network_interfaces,
            ipv4_address: ip,
            imds_compat: c.imds_compat,
        });
        Ok(())
    }

    /// Whether anything that Firecracker counts as a boot resource was set.
    pub fn has_boot_resources(&self) -> bool {
        self.boot_source.is_some()
            || !self.drives.is_empty()
            || !self.network_interfaces.is_empty()
            || self.vsock.is_some()
            || self.entropy.is_some()
            || self.mmds_config.is_some()
    }

    /// `GET /vm/config`.
    pub fn full_config(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            balloon: None,
            drives: self
                .drives
                .iter()
                .map(|d| DriveInfo {
                    drive_id: d.drive_id.clone(),
                    partuuid: d.partuuid.clone(),
                    is_root_device: d.is_root_device,
                    cache_type: d.cache_type,
                    is_read_only: d.is_read_only,
                    path_on_host: d.path_on_host.clone(),
                    rate_limiter: shown_limiter(d.rate_limiter),
                    io_engine: d.io_engine,
                    socket: d.socket.clone(),
                })
                .collect(),
            boot_source: self.boot_source.clone(),
            cpu_config: None,
            logger: None,
            machine_config: Some(self.machine_config.clone()),
            metrics: None,
            mmds_config: self.mmds_config.clone(),
            network_interfaces: self
                .network_interfaces
                .iter()
                .map(|n| NetworkInterface {
                    rx_rate_limiter: shown_limiter(n.rx_rate_limiter),
                    tx_rate_limiter: shown_limiter(n.tx_rate_limiter),
                    ..n.clone()
                })
                .collect(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.map(|e| Entropy {
                rate_limiter: shown_limiter(e.rate_limiter),
            }),
            pmem: Vec::new(),
            memory_hotplug: None,
        }
    }

    /// The boot args (Firecracker's default when none were given).
    pub fn boot_args(&self) -> String {
        self.boot_source
            .as_ref()
            .and_then(|b| b.boot_args.clone())
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.into())
    }

    /// The kernel command line the guest gets: the boot args plus the root
    /// device, as Firecracker's builder appends it (the machine appends
    /// it the same way from the drive list: see `machine_config`).
    pub fn cmdline(&self) -> String {
        let mut line = self.boot_args();
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            match &root.partuuid {
                Some(uuid) => line.push_str(&format!(" root=PARTUUID={uuid}")),
                None => line.push_str(" root=/dev/vda"),
            }
            line.push_str(if root.is_read_only.unwrap_or(false) {
                " ro"
            } else {
                " rw"
            });
        }
        line
    }

    /// What the machine is built from at `InstanceStart`.
    /// `mmds` is the VM's metadata store, served on the interfaces that
    /// `/mmds/config` names.
    pub fn machine_config(
        &self,
        serial: machine::SerialMode,
        mmds: &Arc<Mutex<machine::mmds::Mmds>>,
    ) -> Result<machine::MachineConfig, String> {
        let mmds_net = self.mmds_config.as_ref().map(|m| machine::MmdsNetConfig {
            store: mmds.clone(),
            tokens: Arc::default(),
            ipv4: m.ipv4_address,
            version: match m.version {
                MmdsVersion::V1 => machine::MmdsVersion::V1,
                MmdsVersion::V2 => machine::MmdsVersion::V2,
            },
            imds_compat: m.imds_compat,
        });
        let serves_mmds = |id: &str| {
            self.mmds_config
                .as_ref()
                .is_some_and(|m| m.network_interfaces.iter().any(|i| i == id))
        };
        let boot = self
            .boot_source
            .as_ref()
            .ok_or("Start microvm error: Cannot start microvm without kernel configuration.")?;
        let serial = match self
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_ref())
        {
            Some(path) => machine::SerialMode::File(path.into()),
            None => serial,
        };
        let virtio = machine::VirtioConfig {
            drives: self
                .drives
                .iter()
                .map(|d| machine::DriveConfig {
                    id: d.drive_id.clone(),
                    path: d.path_on_host.clone().unwrap_or_default().into(),
                    read_only: d.is_read_only.unwrap_or(false),
                    root: d.is_root_device,
                    partuuid: d.partuuid.clone(),
                    cache: match d.cache_type {
                        CacheType::Unsafe => machine::CacheType::Unsafe,
                        CacheType::Writeback => machine::CacheType::Writeback,
                    },
                    rate_limiter: d.rate_limiter.map(limiter),
                })
                .collect(),
            nets: self
                .network_interfaces
                .iter()
                .map(|n| machine::NetConfig {
                    id: n.iface_id.clone(),
                    backend: machine::NetBackendConfig::Tap {
                        name: n.host_dev_name.clone(),
                    },
                    mac: n.guest_mac.as_deref().and_then(parse_mac),
                    rx_rate_limiter: n.rx_rate_limiter.map(limiter),
                    tx_rate_limiter: n.tx_rate_limiter.map(limiter),
                    mmds: mmds_net.clone().filter(|_| serves_mmds(&n.iface_id)),
                })
                .collect(),
            vsock: self.vsock.as_ref().map(|v| machine::VsockConfig {
                guest_cid: v.guest_cid,
                uds_path: PathBuf::from(&v.uds_path),
                listener: self.vsock_listener.clone().map(machine::BoundListener),
            }),
            entropy: self.entropy.map(|e| machine::EntropyConfig {
                rate_limiter: e.rate_limiter.map(limiter),
            }),
            console: None,
        };
        Ok(machine::MachineConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            // The machine adds root= and ro/rw for the root drive.
            cmdline: self.boot_args(),
            entry: machine::KernelEntry::Auto,
            memory: (self.machine_config.mem_size_mib as u64) << 20,
            huge_pages: match self.machine_config.huge_pages {
                HugePages::Transparent => machine::HugePages::Transparent,
                // "2M" (hugetlbfs) is refused by check_machine_config.
                HugePages::None | HugePages::Hugetlbfs2M => machine::HugePages::None,
            },
            vcpus: self.machine_config.vcpu_count.into(),
            serial,
            virtio,
        })
    }
}

fn not_yet(what: &str) -> ConfigError {
    ConfigError::NotYet(format!("vmplay does not have {what} yet."))
}

/// A bucket as `GET /vm/config` shows it: disabled buckets are null, a
/// zero burst is null.
fn shown_bucket(b: Option<TokenBucket>) -> Option<TokenBucket> {
    b.filter(|b| b.size != 0 && b.refill_time != 0)
        .map(|b| TokenBucket {
            one_time_burst: b.one_time_burst.filter(|v| *v != 0),
            ..b
        })
}

fn shown_limiter(l: Option<RateLimiter>) -> Option<RateLimiter> {
    let l = l?;
    let shown = RateLimiter {
        bandwidth: shown_bucket(l.bandwidth),
        ops: shown_bucket(l.ops),
    };
    (shown.bandwidth.is_some() || shown.ops.is_some()).then_some(shown)
}

fn bucket(b: TokenBucket) -> machine::TokenBucketConfig {
    machine::TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    }
}

pub(crate) fn limiter(l: RateLimiter) -> machine::RateLimiterConfig {
    machine::RateLimiterConfig {
        bandwidth: l.bandwidth.map(bucket),
        ops: l.ops.map(bucket),
    }
}

/// `AA:BB:CC:DD:EE:FF`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> (tempfile_lite::TempPath, String) {
        let p = tempfile_lite::TempPath::new("kernel", b"not really a kernel");
        let s = p.path().to_string_lossy().into_owned();
        (p, s)
    }

    mod tempfile_lite {
        use std::path::{Path, PathBuf};
        pub struct TempPath(PathBuf);
        impl TempPath {
            pub fn new(name: &str, bytes: &[u8]) -> TempPath {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmplay-api-{}-{}-{name}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, bytes).unwrap();
                TempPath(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                std::fs::remove_file(&self.0).ok();
            }
        }
    }

    fn drive(id: &str, path: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            partuuid: None,
            is_root_device: root,
            cache_type: CacheType::Unsafe,
            is_read_only: None,
            path_on_host: Some(path.into()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }

    #[test]
    fn a_second_root_device_is_refused_but_the_same_id_replaces() {
        let (_k, path) = kernel_file();
        let mut r = VmResources::default();
        r.set_drive(drive("rootfs", &path, true)).unwrap();
        r.set_drive(drive("rootfs", &path, true)).unwrap();
        let e = r.set_drive(drive("other", &path, true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Drive config error: A root block device already exists!"
        );
        r.set_drive(drive("data", &path, false)).unwrap();
        assert_eq!(r.drives.len(), 2);
        assert_eq!(r.drives[0].drive_id, "rootfs");
    }

    #[test]
    fn root_device_adds_root_and_rw_to_the_cmdline() {
        let (_k, path) = kernel_file();
        let mut r = VmResources::default();
        r.set_boot_source(BootSource {
            kernel_image_path: path.clone(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        })
        .unwrap();
        let mut d = drive("rootfs", &path, true);
        d.is_read_only = Some(true);
        r.set_drive(d).unwrap();
        assert_eq!(r.cmdline(), "console=ttyS0 root=/dev/vda ro");
        let mut d = drive("rootfs", &path, true);
        d.partuuid = Some("0eaa91a0-01".into());
        r.set_drive(d).unwrap();
        assert_eq!(r.cmdline(), "console=ttyS0 root=PARTUUID=0eaa91a0-01 rw");
    }

    #[test]
    fn missing_kernel_gets_firecrackers_message() {
        let mut r = VmResources::default();
        let e = r
            .set_boot_source(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn machine_config_limits() {
        let mut r = VmResources::default();
        let mut m = MachineConfiguration {
            vcpu_count: 0,
            ..Default::default()
        };
        assert!(
            r.set_machine_config(m.clone())
                .unwrap_err()
                .to_string()
                .contains("greater than 0")
        );
        m.vcpu_count = 2;
        m.mem_size_mib = 0;
        assert!(
            r.set_machine_config(m.clone())
                .unwrap_err()
                .to_string()
                .contains("either 0")
        );
        m.mem_size_mib = 256;
        r.set_machine_config(m.clone()).unwrap();
        assert_eq!(r.machine_config.mem_size_mib, 256);
        // Transparent huge pages reach the machine; hugetlbfs is refused
        // by name; either wants a whole number of 2 MiB pages.
        m.huge_pages = HugePages::Transparent;
        m.mem_size_mib = 255;
        assert!(r.set_machine_config(m.clone()).is_err());
        m.mem_size_mib = 256;
        r.set_machine_config(m.clone()).unwrap();
        r.boot_source = Some(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: None,
        });
        let built = r
            .machine_config(machine::SerialMode::None, &Default::default())
            .unwrap();
        assert_eq!(built.huge_pages, machine::HugePages::Transparent);
        m.huge_pages = HugePages::Hugetlbfs2M;
        assert!(
            r.set_machine_config(m)
                .unwrap_err()
                .to_string()
                .contains("\"2M\"")
        );
    }

    #[test]
    fn duplicate_macs_are_refused() {
        let mut r = VmResources::default();
        let n = |id: &str| NetworkInterface {
            iface_id: id.into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:AC:10:00:02".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        r.set_network_interface(n("eth0")).unwrap();
        r.set_network_interface(n("eth0")).unwrap();
        assert_eq!(
            r.set_network_interface(n("eth1")).unwrap_err().to_string(),
            "Network config error: The MAC address is already in use: 06:00:AC:10:00:02"
        );
    }

    #[test]
    fn shown_limiters_null_what_is_disabled() {
        let l = RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 0,
                one_time_burst: None,
                refill_time: 10,
            }),
            ops: Some(TokenBucket {
                size: 5,
                one_time_burst: Some(0),
                refill_time: 10,
            }),
        };
        let s = shown_limiter(Some(l)).unwrap();
        assert_eq!(s.bandwidth, None);
        assert_eq!(s.ops.unwrap().one_time_burst, None);
        assert_eq!(shown_limiter(Some(RateLimiter::default())), None);
    }

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:02:03"), None);
    }
}
