//! The API server: hyper (HTTP/1.1) on a current-thread tokio runtime, on
//! its own thread (`fc_api`), serving the Unix socket. Each request is
//! routed here ([`crate::request::parse`]) and, if it names an action,
//! forwarded to the VMM thread, whose answer it waits for: one request at
//! a time, as Firecracker serves them. Responses are laid out as
//! Firecracker's µhttp writes them (`HTTP/1.1 204 ` with no reason phrase,
//! `Server: Firecracker API`, `Connection: keep-alive`).

use crate::logger;
use crate::metrics::Metrics;
use crate::request::{self, Method};
use crate::vmm::{ApiRequest, ApiResponse, VmmEvent};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response};
use std::convert::Infallible;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, sync_channel};

/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;
/// At most this many connections at once (µhttp's limit).
const MAX_CONNECTIONS: usize = 10;

/// Why the socket could not be served; the text is Firecracker's.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("Failed to open the API socket at: {0}. Check that it is not already used.")]
    InUse(String),
    #[error("Failed to bind and run the HTTP server: {0}")]
    Other(std::io::Error),
}

/// Binds the API socket. Like Firecracker, an existing path (even a stale
/// socket) is an error: the path is never unlinked first.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    UnixListener::bind(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => BindError::InUse(path.display().to_string()),
        _ => BindError::Other(e),
    })
}

/// What the server thread needs.
pub struct ServerConfig {
    pub max_payload: usize,
    pub metrics: Arc<Metrics>,
    /// The API thread's seccomp filter, installed before serving (empty:
    /// none).
    pub seccomp: seccompiler::BpfProgram,
}

/// Starts the `fc_api` thread serving `listener`; requests go to `vmm`.
pub fn spawn(
    listener: UnixListener,
    vmm: Sender<VmmEvent>,
    config: ServerConfig,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    logger::error(&format!("API server: cannot start its runtime: {e}"));
                    return;
                }
            };
            if !config.seccomp.is_empty() {
                // A test hook: make a forbidden call once the filter is on.
                let selftest =
                    std::env::var_os("VMPLAY_SECCOMP_SELFTEST").is_some_and(|v| v == "api");
                match crate::seccomp::install(&config.seccomp) {
                    Ok(()) => {}
                    Err(e) => {
                        logger::error(&format!("Seccomp error: {e}"));
                        return;
                    }
                }
                if selftest {
                    let _ = std::os::unix::process::parent_id();
                }
            }
            rt.block_on(serve(listener, vmm, Arc::new(config)));
        })
}

async fn serve(listener: UnixListener, vmm: Sender<VmmEvent>, config: Arc<ServerConfig>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            logger::error(&format!("API server: {e}"));
            return;
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                logger::warn(&format!("API server: accept failed: {e}"));
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let vmm = vmm.clone();
        let config = config.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let vmm = vmm.clone();
                let config = config.clone();
                async move { Ok::<_, Infallible>(handle(req, &vmm, &config).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .title_case_headers(true)
                .auto_date_header(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// µhttp's answer to a request it cannot take: a 400 whose body is not a
/// fault object, after which the connection is dropped.
fn framing_error(message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "{{ \"error\": \"{message}\nAll previous unanswered requests will be dropped.\" }}"
    );
    let mut r = respond(&ApiResponse {
        status: 400,
        body: Some(body),
        deprecation: false,
    });
    r.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn respond(a: &ApiResponse) -> Response<Full<Bytes>> {
    let body = a.body.clone().unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body.clone())));
    *r.status_mut() =
        hyper::StatusCode::from_u16(a.status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    r.extensions_mut().insert(ReasonPhrase::from_static(b""));
    let h = r.headers_mut();
    h.insert(
        hyper::header::SERVER,
        HeaderValue::from_static("Firecracker API"),
    );
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("keep-alive"),
    );
    if a.deprecation {
        h.insert(
            HeaderName::from_static("deprecation"),
            HeaderValue::from_static("true"),
        );
    }
    if a.body.is_some() {
        h.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    r
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "200 OK",
        204 => "204 No Content",
        413 => "413 Payload too large",
        500 => "500 Internal Server Error",
        _ => "400 Bad Request",
    }
}

/// The Firecracker metric names for a request, if it has any.
fn counter(method: Method, first: &str) -> Option<(&'static str, &'static str, &'static str)> {
    use Method::*;
    Some(match (method, first) {
        (Get, "") => (
            "get_api_requests",
            "instance_info_count",
            "instance_info_fails",
        ),
        (Get, "machine-config") => ("get_api_requests", "machine_cfg_count", "machine_cfg_fails"),
        (Get, "mmds") => ("get_api_requests", "mmds_count", "mmds_fails"),
        (Get, "version") => ("get_api_requests", "vmm_version_count", "vmm_version_fails"),
        (Put, "actions") => ("put_api_requests", "actions_count", "actions_fails"),
        (Put, "boot-source") => ("put_api_requests", "boot_source_count", "boot_source_fails"),
        (Put, "drives") => ("put_api_requests", "drive_count", "drive_fails"),
        (Put, "logger") => ("put_api_requests", "logger_count", "logger_fails"),
        (Put, "machine-config") => ("put_api_requests", "machine_cfg_count", "machine_cfg_fails"),
        (Put, "metrics") => ("put_api_requests", "metrics_count", "metrics_fails"),
        (Put, "network-interfaces") => ("put_api_requests", "network_count", "network_fails"),
        (Put, "mmds") => ("put_api_requests", "mmds_count", "mmds_fails"),
        (Put, "vsock") => ("put_api_requests", "vsock_count", "vsock_fails"),
        (Patch, "drives") => ("patch_api_requests", "drive_count", "drive_fails"),
        (Patch, "machine-config") => (
            "patch_api_requests",
            "machine_cfg_count",
            "machine_cfg_fails",
        ),
        (Patch, "network-interfaces") => ("patch_api_requests", "network_count", "network_fails"),
        (Patch, "mmds") => ("patch_api_requests", "mmds_count", "mmds_fails"),
        _ => return None,
    })
}

async fn handle(
    req: Request<Incoming>,
    vmm: &Sender<VmmEvent>,
    config: &ServerConfig,
) -> Response<Full<Bytes>> {
    let method = match req.method().as_str() {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        "DELETE" => Method::Delete,
        _ => return framing_error("Invalid HTTP Method: Unsupported HTTP method."),
    };
    let limit = config.max_payload;
    if let Some(len) = req.headers().get(hyper::header::CONTENT_LENGTH) {
        let Some(len) = len.to_str().ok().and_then(|s| s.trim().parse::<u32>().ok()) else {
            return framing_error(
                "Invalid header. Reason: Invalid value. Key: Content-Length; Value: ",
            );
        };
        if len as usize > limit {
            return framing_error(&format!(
                "Request payload with size {len} is larger than the limit of {limit} allowed by server."
            ));
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return framing_error(&format!(
                "Request payload is larger than the limit of {limit} allowed by server: {e}"
            ));
        }
    };
    let body = (!body.is_empty()).then_some(body);
    let verb = match method {
        Method::Get => "Get",
        Method::Put => "Put",
        Method::Patch => "Patch",
        Method::Delete => "Delete",
    };
    match (&body, method, path.starts_with("/mmds")) {
        (Some(b), _, false) if method != Method::Get => logger::info(&format!(
            "The API server received a {verb} request on \"{path}\" with body \"{}\".",
            String::from_utf8_lossy(b).escape_default()
        )),
        _ => logger::info(&format!(
            "The API server received a {verb} request on \"{path}\"."
        )),
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let names = counter(method, first);
    if let Some((g, c, _)) = names {
        config.metrics.count(g, c);
    }
    let answer = match request::parse(method, &path, body.as_deref()) {
        Err(e) => ApiResponse::bad_request(e.0),
        Ok(parsed) => {
            if let Some(warning) = parsed.deprecation {
                logger::warn(warning);
                config
                    .metrics
                    .count("deprecated_api", "deprecated_http_api_calls");
            }
            let (tx, rx) = sync_channel(1);
            if vmm
                .send(VmmEvent::Api(Box::new(ApiRequest { parsed, reply: tx })))
                .is_err()
            {
                ApiResponse::fault(400, "The microVM is stopping.")
            } else {
                rx.recv()
                    .unwrap_or_else(|_| ApiResponse::fault(400, "The microVM is stopping."))
            }
        }
    };
    if answer.status < 300 {
        logger::info(&format!(
            "The request was executed successfully. Status code: {}.",
            status_text(answer.status)
        ));
    } else {
        if let Some((g, _, f)) = names {
            config.metrics.count(g, f);
        }
        logger::error(&format!(
            "Received Error. Status code: {}. Message: {}",
            status_text(answer.status),
            answer
                .body
                .as_deref()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                .unwrap_or_default()
        ));
    }
    respond(&answer)
}
