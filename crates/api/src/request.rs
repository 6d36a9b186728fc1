//! From an HTTP request (method, path, body) to a [`VmmAction`], with
//! Firecracker's routing errors (`parsed_request.rs`). Each endpoint group
//! parses its own bodies in [`crate::endpoints`].

use crate::endpoints;
use crate::schema::*;
use serde::de::DeserializeOwned;

/// The HTTP methods Firecracker's API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
    Delete,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        })
    }
}

/// When a request is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before `InstanceStart` only.
    PreBoot,
    /// After `InstanceStart` only.
    PostBoot,
    Any,
}

/// What the VMM thread is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    PutBootSource(BootSource),
    PutMachineConfig(MachineConfiguration),
    PatchMachineConfig(MachineConfigurationUpdate),
    PutDrive(Drive),
    PatchDrive(PartialDrive),
    PutNetworkInterface(NetworkInterface),
    PatchNetworkInterface(PartialNetworkInterface),
    PutVsock(Vsock),
    PutEntropy(Entropy),
    PutSerial(Serial),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutMmdsConfig(MmdsConfig),
    PutMmds(serde_json::Value),
    PatchMmds(serde_json::Value),
    GetMmds,
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    GetBalloon,
    /// A Firecracker feature vmplay does not have: refused in its phase's
    /// terms first, then with `fault_message`.
    NotYet {
        phase: Phase,
        fault_message: String,
    },
}

impl VmmAction {
    /// When this action is allowed (Firecracker's `rpc_interface.rs`).
    pub fn phase(&self) -> Phase {
        use VmmAction::*;
        match self {
            GetInstanceInfo | GetVersion | GetMachineConfig | GetVmConfig | PutMmds(_)
            | PatchMmds(_) | GetMmds | GetBalloon => Phase::Any,
            PutBootSource(_)
            | PutMachineConfig(_)
            | PatchMachineConfig(_)
            | PutDrive(_)
            | PutNetworkInterface(_)
            | PutVsock(_)
            | PutEntropy(_)
            | PutSerial(_)
            | PutLogger(_)
            | PutMetrics(_)
            | PutMmdsConfig(_)
            | InstanceStart => Phase::PreBoot,
            PatchDrive(_)
            | PatchNetworkInterface(_)
            | SendCtrlAltDel
            | FlushMetrics
            | Pause
            | Resume => Phase::PostBoot,
            NotYet { phase, .. } => *phase,
        }
    }
}

/// A parsed request: the action, and whether it used a deprecated form.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub action: VmmAction,
    /// The log warning, when Firecracker answers with `Deprecation: true`.
    pub deprecation: Option<&'static str>,
}

impl From<VmmAction> for ParsedRequest {
    fn from(action: VmmAction) -> Self {
        ParsedRequest {
            action,
            deprecation: None,
        }
    }
}

/// A request the API thread refuses itself (400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

pub type Parsed = Result<ParsedRequest, RequestError>;

pub(crate) fn invalid_path(method: Method, path: &str) -> RequestError {
    RequestError(format!(
        "Invalid request method and/or path: {method} {path}."
    ))
}

/// Deserializes a body with Firecracker's error text.
pub(crate) fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(body).map_err(|e| {
        RequestError(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Checks a path id: not empty, alphanumerics and `_` only.
pub(crate) fn checked_id(id: Option<&str>) -> Result<&str, RequestError> {
    let id = id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| RequestError("The ID cannot be empty.".into()))?;
    if id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(RequestError(
            "API Resource IDs can only contain alphanumeric characters and underscores.".into(),
        ));
    }
    Ok(id)
}

/// Routes one request. `body` is `None` when there is none (Content-Length 0).
pub fn parse(method: Method, uri_path: &str, body: Option<&[u8]>) -> Parsed {
    let path = uri_path.strip_prefix('/').unwrap_or(uri_path);
    let tokens: Vec<&str> = path.split('/').collect();
    let first = tokens[0];
    match (method, body) {
        (Method::Get, Some(_)) => {
            return Err(RequestError("GET request cannot have a body.".into()));
        }
        (Method::Put, None) => return Err(RequestError("Empty PUT request.".into())),
        (Method::Patch, None) => return Err(RequestError("Empty PATCH request.".into())),
        (Method::Delete, Some(_)) => return Err(RequestError("Empty Delete request.".into())),
        _ => {}
    }
    let body = body.unwrap_or_default();
    let rest = &tokens[1..];
    match first {
        "" if rest.is_empty() && method == Method::Get => Ok(VmmAction::GetInstanceInfo.into()),
        "version" if method == Method::Get => Ok(VmmAction::GetVersion.into()),
        "actions" => endpoints::actions::parse(method, body),
        "boot-source" => endpoints::boot_source::parse(method, body),
        "machine-config" => endpoints::machine_config::parse(method, body),
        "drives" => endpoints::drives::parse(method, rest, body),
        "network-interfaces" => endpoints::net::parse(method, rest, body),
        "vsock" => endpoints::vsock::parse(method, body),
        "entropy" => endpoints::entropy::parse(method, body),
        "serial" => endpoints::serial::parse(method, body),
        "logger" => endpoints::logger::parse(method, body),
        "metrics" => endpoints::metrics::parse(method, body),
        "mmds" => endpoints::mmds::parse(method, rest, body),
        "vm" => endpoints::vm::parse(method, rest, body),
        "balloon" | "snapshot" | "cpu-config" | "pmem" | "hotplug" => {
            endpoints::unsupported::parse(method, first, rest, body, uri_path)
        }
        _ => Err(invalid_path(method, first)),
    }
}
