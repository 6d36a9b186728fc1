//! The VMM side of the API: one thread owns the VM's resources and, after
//! `InstanceStart`, the running machine, and answers each request the API
//! thread forwards over a channel (Firecracker's `rpc_interface.rs`).

use crate::logger;
use crate::metrics::Metrics;
use crate::request::{ParsedRequest, Phase, VmmAction};
use crate::resources::{ConfigError, VmResources};
use crate::schema::*;
use serde::Serialize;
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmplay_machine::mmds::{Mmds, MmdsError};
use vmplay_machine::{Machine, MachineConfig, RunningMachine, SerialMode, StopReason};

/// The Firecracker release whose interface vmplay copies.
pub const FIRECRACKER_VERSION: &str = "1.16.0";

pub const NOT_SUPPORTED_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
pub const NOT_SUPPORTED_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// How often metrics are written while the VM runs.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// One answer: the status, an optional JSON body, the deprecation flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<String>,
    pub deprecation: bool,
}

impl ApiResponse {
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
            deprecation: false,
        }
    }

    pub fn json<T: Serialize>(value: &T) -> Self {
        ApiResponse {
            status: 200,
            body: Some(serde_json::to_string(value).unwrap_or_else(|_| "{}".into())),
            deprecation: false,
        }
    }

    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        ApiResponse {
            status,
            body: Some(
                serde_json::to_string(&Fault {
                    fault_message: message.into(),
                })
                .unwrap_or_default(),
            ),
            deprecation: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::fault(400, message)
    }
}

/// A request on its way to the VMM thread, with where to answer.
pub struct ApiRequest {
    pub parsed: ParsedRequest,
    pub reply: SyncSender<ApiResponse>,
}

/// What the VMM thread waits for.
pub enum VmmEvent {
    Api(Box<ApiRequest>),
    /// The VM stopped (a device, a vCPU or a signal asked it to).
    Stopped,
}

/// Builds a machine for `InstanceStart`: the CLI picks the backend.
pub type Launcher = Box<dyn FnMut(&MachineConfig) -> Result<Machine, String> + Send>;

/// What the VMM is started with (from Firecracker's flags).
pub struct VmmOptions {
    pub id: String,
    /// COM1 unless `PUT /serial` says otherwise.
    pub serial: SerialMode,
    pub mmds_size_limit: usize,
    pub boot_timer: bool,
    /// The seccomp filters for the vCPU, event-loop and main threads,
    /// installed at `InstanceStart` (empty programs: none).
    pub seccomp: crate::seccomp::Filters,
}

/// The VMM: resources before boot, the machine after.
pub struct Vmm {
    id: String,
    serial: SerialMode,
    boot_timer: bool,
    seccomp: crate::seccomp::Filters,
    pub resources: VmResources,
    running: Option<RunningMachine>,
    launcher: Launcher,
    events: Sender<VmmEvent>,
    pub mmds: Arc<Mutex<Mmds>>,
    pub metrics: Arc<Metrics>,
    /// A `vmplay run` MachineConfig to boot instead of the resources.
    preset: Option<MachineConfig>,
}

impl Vmm {
    pub fn new(
        options: VmmOptions,
        launcher: Launcher,
        events: Sender<VmmEvent>,
        metrics: Arc<Metrics>,
    ) -> Vmm {
        Vmm {
            id: options.id,
            serial: options.serial,
            boot_timer: options.boot_timer,
            seccomp: options.seccomp,
            resources: VmResources::default(),
            running: None,
            launcher,
            events,
            mmds: Arc::new(Mutex::new(Mmds::new(options.mmds_size_limit))),
            metrics,
            preset: None,
        }
    }

    /// Boots `config` (vmplay's own flags) instead of the API resources.
    pub fn set_preset(&mut self, config: MachineConfig) {
        self.resources.boot_source = Some(BootSource {
            kernel_image_path: config.kernel.to_string_lossy().into_owned(),
            initrd_path: config
                .initrd
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            boot_args: Some(config.cmdline.clone()),
        });
        self.resources.machine_config.vcpu_count = config.vcpus.min(255) as u8;
        self.resources.machine_config.mem_size_mib = (config.memory >> 20) as usize;
        self.resources.machine_config.huge_pages = match config.huge_pages {
            vmplay_machine::HugePages::None => crate::schema::HugePages::None,
            vmplay_machine::HugePages::Transparent => crate::schema::HugePages::Transparent,
        };
        self.preset = Some(config);
    }

    pub fn started(&self) -> bool {
        self.running.is_some()
    }

    fn state(&self) -> InstanceState {
        match &self.running {
            None => InstanceState::NotStarted,
            Some(m) if m.is_paused() => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        }
    }

    /// `InstanceStart`: builds the machine and starts its vCPUs.
    pub fn start(&mut self) -> Result<(), String> {
        let t0 = Instant::now();
        let cpu0 = crate::metrics::process_cpu_us();
        let config = match &self.preset {
            Some(c) => c.clone(),
            None => self
                .resources
                .machine_config(self.serial.clone(), &self.mmds)?,
        };
        let mut machine =
            (self.launcher)(&config).map_err(|e| format!("Start microvm error: {e}"))?;
        if self.boot_timer {
            machine
                .add_boot_timer(Box::new(move || {
                    let us = t0.elapsed().as_micros() as u64;
                    let cpu_us = crate::metrics::process_cpu_us().saturating_sub(cpu0);
                    logger::info(&format!(
                        "Guest-boot-time = {us:>6} us {} ms, {cpu_us:>6} CPU us {} CPU ms",
                        us / 1000,
                        cpu_us / 1000
                    ));
                }))
                .map_err(|e| format!("Start microvm error: {e}"))?;
        }
        // Each thread installs its own filter before guest code or device
        // work; the vCPUs wait until the main thread has its filter too
        // (Firecracker installs the `vmm` filter last, then resumes them).
        let selftest = std::env::var("VMPLAY_SECCOMP_SELFTEST").unwrap_or_default();
        let gate = Arc::new((Mutex::new(None::<bool>), std::sync::Condvar::new()));
        let mut hooks = vmplay_machine::ThreadHooks::default();
        {
            let filter = self.seccomp.vcpu.clone();
            let gate = gate.clone();
            let selftest = selftest == "vcpu" && !filter.is_empty();
            hooks.vcpu = Some(Arc::new(move || {
                crate::seccomp::install(&filter)?;
                if selftest {
                    let _ = std::os::unix::process::parent_id();
                }
                let (lock, cv) = &*gate;
                let mut go = lock.lock().unwrap_or_else(|e| e.into_inner());
                while go.is_none() {
                    go = cv.wait(go).unwrap_or_else(|e| e.into_inner());
                }
                match *go {
                    Some(true) => Ok(()),
                    _ => Err("the VMM did not start".into()),
                }
            }));
        }
        {
            let filter = self.seccomp.vmm.clone();
            let selftest = selftest == "vmm" && !filter.is_empty();
            hooks.vmm = Some(Box::new(move || {
                crate::seccomp::install(&filter)?;
                if selftest {
                    let _ = std::os::unix::process::parent_id();
                }
                Ok(())
            }));
        }
        let open_gate = |go: bool| {
            let (lock, cv) = &*gate;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(go);
            cv.notify_all();
        };
        let running = match machine.start_with(hooks) {
            Ok(r) => r,
            Err(e) => {
                open_gate(false);
                return Err(format!("Start microvm error: {e}"));
            }
        };
        let counters = running.vcpu_counters();
        self.metrics.add_source(Box::new(move || {
            counters
                .snapshot()
                .into_iter()
                .map(|(f, v)| ("vcpu".to_string(), f.to_string(), v))
                .collect()
        }));
        let uart = running.uart_counters();
        self.metrics.add_source(Box::new(move || {
            uart.snapshot()
                .into_iter()
                .map(|(f, v)| ("uart".to_string(), f.to_string(), v))
                .collect()
        }));
        let devices = running.virtio_devices();
        self.metrics.add_source(Box::new(move || devices.metrics()));
        let control = running.control();
        let events = self.events.clone();
        self.running = Some(running);
        // The watcher installs the main thread's filter on itself first; the
        // main thread's goes on last, before the vCPUs go (Firecracker
        // installs its `vmm` filter last, then resumes them).
        let (filtered_tx, filtered_rx) = std::sync::mpsc::sync_channel(1);
        let watch_filter = self.seccomp.main.clone();
        let watcher = std::thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || {
                let installed = crate::seccomp::install(&watch_filter);
                let failed = installed.is_err();
                let _ = filtered_tx.send(installed);
                if !failed {
                    control.wait();
                }
                let _ = events.send(VmmEvent::Stopped);
            });
        let installed = match watcher {
            Ok(_) => filtered_rx
                .recv()
                .unwrap_or_else(|_| Err("the watcher thread ended early".into()))
                .and_then(|()| crate::seccomp::install(&self.seccomp.main)),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = installed {
            open_gate(false);
            return Err(format!("Start microvm error: Seccomp error: {e}"));
        }
        if selftest == "main" && !self.seccomp.main.is_empty() {
            let _ = std::os::unix::process::parent_id();
        }
        open_gate(true);
        // Firecracker writes a first metrics line when the VM starts.
        let _ = self.metrics.flush();
        Ok(())
    }

    /// `PATCH /drives/{id}` after boot: swaps the backing file and/or the
    /// rate limiter of the running device, and what `/vm/config` shows.
    fn patch_drive(&mut self, d: PartialDrive) -> ApiResponse {
        let Some(running) = &self.running else {
            return ApiResponse::bad_request(NOT_SUPPORTED_BEFORE_START);
        };
        let fail = |e: String| {
            ApiResponse::bad_request(format!(
                "Drive config error: Unable to patch the block device: {e}"
            ))
        };
        let path = d.path_on_host.as_ref().map(std::path::PathBuf::from);
        if let Some(p) = &path
            && let Err(e) = std::fs::metadata(p)
        {
            return fail(format!(
                "Error manipulating the backing file: {e} {}",
                p.display()
            ));
        }
        let limiter = d.rate_limiter.map(crate::resources::limiter);
        if let Err(e) =
            running
                .virtio_devices()
                .update_drive(&d.drive_id, path.as_deref(), limiter.as_ref())
        {
            return fail(e);
        }
        if let Some(r) = self
            .resources
            .drives
            .iter_mut()
            .find(|o| o.drive_id == d.drive_id)
        {
            if d.path_on_host.is_some() {
                r.path_on_host = d.path_on_host;
            }
            if d.rate_limiter.is_some() {
                r.rate_limiter = d.rate_limiter;
            }
        }
        ApiResponse::no_content()
    }

    /// `PATCH /network-interfaces/{id}` after boot: new rate limiters.
    fn patch_network_interface(&mut self, n: PartialNetworkInterface) -> ApiResponse {
        let Some(running) = &self.running else {
            return ApiResponse::bad_request(NOT_SUPPORTED_BEFORE_START);
        };
        let rx = n.rx_rate_limiter.map(crate::resources::limiter);
        let tx = n.tx_rate_limiter.map(crate::resources::limiter);
        if let Err(e) = running
            .virtio_devices()
            .update_net(&n.iface_id, rx.as_ref(), tx.as_ref())
        {
            return ApiResponse::bad_request(format!("Network interface update error: {e}"));
        }
        if let Some(r) = self
            .resources
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            if n.rx_rate_limiter.is_some() {
                r.rx_rate_limiter = n.rx_rate_limiter;
            }
            if n.tx_rate_limiter.is_some() {
                r.tx_rate_limiter = n.tx_rate_limiter;
            }
        }
        ApiResponse::no_content()
    }

    /// Answers one request.
    pub fn handle(&mut self, parsed: ParsedRequest) -> ApiResponse {
        let mut response = self.dispatch(parsed.action);
        response.deprecation = parsed.deprecation.is_some();
        response
    }

    fn dispatch(&mut self, action: VmmAction) -> ApiResponse {
        match (action.phase(), self.started()) {
            (Phase::PreBoot, true) => return ApiResponse::bad_request(NOT_SUPPORTED_AFTER_START),
            (Phase::PostBoot, false) => {
                return ApiResponse::bad_request(NOT_SUPPORTED_BEFORE_START);
            }
            _ => {}
        }
        let done = |r: Result<(), ConfigError>| match r {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => ApiResponse::bad_request(e.to_string()),
        };
        match action {
            VmmAction::GetInstanceInfo => ApiResponse::json(&InstanceInfo {
                id: self.id.clone(),
                state: self.state(),
                vmm_version: FIRECRACKER_VERSION.into(),
                app_name: "Firecracker".into(),
            }),
            VmmAction::GetVersion => ApiResponse::json(&Version {
                firecracker_version: FIRECRACKER_VERSION.into(),
            }),
            VmmAction::GetMachineConfig => ApiResponse::json(&self.resources.machine_config),
            VmmAction::GetVmConfig => ApiResponse::json(&self.resources.full_config()),
            VmmAction::PutBootSource(b) => done(self.resources.set_boot_source(b)),
            VmmAction::PutMachineConfig(m) => done(self.resources.set_machine_config(m)),
            VmmAction::PatchMachineConfig(u) => done(self.resources.update_machine_config(&u)),
            VmmAction::PutDrive(d) => done(self.resources.set_drive(d)),
            VmmAction::PatchDrive(d) => {
                if !self
                    .resources
                    .drives
                    .iter()
                    .any(|o| o.drive_id == d.drive_id)
                {
                    return ApiResponse::bad_request(
                        "Drive config error: Invalid block device ID!",
                    );
                }
                self.patch_drive(d)
            }
            VmmAction::PutNetworkInterface(n) => done(self.resources.set_network_interface(n)),
            VmmAction::PatchNetworkInterface(n) => {
                if !self
                    .resources
                    .network_interfaces
                    .iter()
                    .any(|o| o.iface_id == n.iface_id)
                {
                    return ApiResponse::bad_request(format!(
                        "Network interface update error: Invalid network interface ID - not found: {}",
                        n.iface_id
                    ));
                }
                self.patch_network_interface(n)
            }
            VmmAction::PutVsock(v) => done(self.resources.set_vsock(v)),
            VmmAction::PutEntropy(e) => done(self.resources.set_entropy(e)),
            VmmAction::PutSerial(s) => done(self.resources.set_serial(s)),
            VmmAction::PutLogger(l) => match logger::configure(&l) {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::bad_request(format!("Logger error: {e}")),
            },
            VmmAction::PutMetrics(m) => match self.metrics.init(&m.metrics_path) {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::bad_request(format!("Metrics error: {e}")),
            },
            VmmAction::PutMmdsConfig(c) => done(self.resources.set_mmds_config(c)),
            VmmAction::PutMmds(v) => self.mmds_result(|m| m.put(v)),
            VmmAction::PatchMmds(v) => self.mmds_result(|m| m.patch(v)),
            VmmAction::GetMmds => {
                let v = self.mmds.lock().unwrap_or_else(|e| e.into_inner()).get();
                ApiResponse::json(&v)
            }
            VmmAction::InstanceStart => match self.start() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::bad_request(e),
            },
            VmmAction::SendCtrlAltDel => match self.running.as_ref().map(|m| m.send_ctrl_alt_del())
            {
                Some(Ok(())) | None => ApiResponse::no_content(),
                Some(Err(e)) => ApiResponse::bad_request(format!("Internal VMM error: {e}")),
            },
            VmmAction::FlushMetrics => match self.metrics.flush() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::bad_request(format!("Metrics error: {e}")),
            },
            VmmAction::Pause => {
                let t = Instant::now();
                let r = self.running.as_mut().map(|m| m.pause());
                self.metrics.latency("pause_vm", t.elapsed());
                match r {
                    Some(Err(e)) => ApiResponse::bad_request(format!(
                        "Internal VMM error: Failed to pause the vCPUs: {e}"
                    )),
                    _ => ApiResponse::no_content(),
                }
            }
            VmmAction::Resume => {
                let t = Instant::now();
                let r = self.running.as_mut().map(|m| m.resume());
                self.metrics.latency("resume_vm", t.elapsed());
                match r {
                    Some(Err(e)) => ApiResponse::bad_request(format!(
                        "Internal VMM error: Failed to resume the vCPUs: {e}"
                    )),
                    _ => ApiResponse::no_content(),
                }
            }
            VmmAction::GetBalloon => {
                ApiResponse::bad_request("Balloon config error: No balloon device found.")
            }
            VmmAction::NotYet { fault_message, .. } => ApiResponse::bad_request(fault_message),
        }
    }

    fn mmds_result(&self, f: impl FnOnce(&mut Mmds) -> Result<(), MmdsError>) -> ApiResponse {
        match f(&mut self.mmds.lock().unwrap_or_else(|e| e.into_inner())) {
            Ok(()) => ApiResponse::no_content(),
            Err(e @ MmdsError::DataStoreLimitExceeded) => {
                ApiResponse::fault(413, format!("MMDS limit exceeded error: {e}"))
            }
            Err(e) => ApiResponse::bad_request(format!("MMDS error: {e}")),
        }
    }

    /// Serves events until the VM stops (or, before boot, until every
    /// sender is gone); returns why it stopped.
    pub fn run(mut self, events: Receiver<VmmEvent>) -> StopReason {
        let mut next_metrics = Instant::now() + METRICS_PERIOD;
        loop {
            let timeout = next_metrics.saturating_duration_since(Instant::now());
            match events.recv_timeout(timeout) {
                Ok(VmmEvent::Api(req)) => {
                    let response = self.handle(req.parsed);
                    let _ = req.reply.send(response);
                }
                Ok(VmmEvent::Stopped) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.running.as_ref().is_some_and(|m| !m.is_paused()) {
                        let _ = self.metrics.flush();
                    }
                    next_metrics = Instant::now() + METRICS_PERIOD;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        logger::info("Vmm is stopping.");
        let reason = match self.running.take() {
            Some(m) => m.finish(),
            None => StopReason::HostError("the API server stopped".into()),
        };
        let _ = self.metrics.flush();
        reason
    }
}
