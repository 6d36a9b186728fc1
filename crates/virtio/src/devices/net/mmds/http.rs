//! The guest side of MMDS: HTTP requests to the metadata address, answered
//! as Firecracker's MMDS answers them (`../shared/reference/firecracker-interface.md`
//! §5): GET of a JSON-pointer path as IMDS text or JSON, `PUT
//! /latest/api/token` for V2 session tokens. Requests are parsed with
//! `httparse`; this module only decides the answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmplay_devices::mmds::Mmds;

use crate::config::MmdsVersion;

/// The largest request head (request line and headers) a guest may send.
pub const MAX_HEAD: usize = 16 * 1024;
/// The largest request body taken (token PUTs carry none).
pub const MAX_BODY: usize = 16 * 1024;
/// Firecracker's token lifetime bounds, in seconds.
const TTL_RANGE: std::ops::RangeInclusive<u32> = 1..=21600;
/// Live tokens held at most; the nearest to expiry goes first beyond it.
const MAX_TOKENS: usize = 4096;

const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];

/// Counters in Firecracker's `mmds` metrics group.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MmdsCounters {
    /// Frames the device took for MMDS.
    pub rx_accepted: u64,
    /// Requests answered.
    pub rx_count: u64,
    pub rx_no_token: u64,
    pub rx_invalid_token: u64,
    /// Response bytes handed to TCP.
    pub tx_bytes: u64,
    pub connections_created: u64,
    /// Frames for MMDS dropped: no room, not TCP, a TSO segment.
    pub rx_dropped: u64,
}

/// Session tokens (V2, and accepted in V1): random, kept with their expiry.
/// Shared by every interface of a VM, as one VM has one metadata service.
#[derive(Default)]
pub struct Tokens {
    live: Mutex<HashMap<String, Instant>>,
}

impl Tokens {
    /// A new token valid for `ttl`.
    fn issue(&self, ttl: Duration, now: Instant) -> std::io::Result<String> {
        let mut raw = [0u8; 32];
        crate::sys::getrandom(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, exp| *exp > now);
        while live.len() >= MAX_TOKENS {
            let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) else {
                break;
            };
            live.remove(&oldest);
        }
        live.insert(token.clone(), now + ttl);
        Ok(token)
    }

    fn valid(&self, token: &str, now: Instant) -> bool {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(token).is_some_and(|exp| *exp > now)
    }
}

/// What the responder needs besides the request.
pub struct Context<'a> {
    pub store: &'a Mutex<Mmds>,
    pub tokens: &'a Tokens,
    pub version: MmdsVersion,
    pub imds_compat: bool,
    pub now: Instant,
}

/// One parsed request, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// HTTP/1.0 or `Connection: close`: the connection ends after the answer.
    pub close: bool,
    /// Header names lowercased, values as sent (names in their original
    /// spelling are kept for echoing the TTL header).
    pub headers: Vec<(String, String, String)>,
}

impl Request {
    fn header(&self, lower: &str) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(l, _, _)| l == lower)
            .map(|(_, name, value)| (name.as_str(), value.as_str()))
    }

    fn any_header(&self, names: &[&str]) -> Option<(&str, &str)> {
        names.iter().find_map(|n| self.header(n))
    }
}

/// What reading the head of `buf` gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A request whose head and body take `len` bytes of `buf`.
    Complete { request: Request, len: usize },
    /// Not HTTP: answer 400 and close.
    Invalid,
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Parsed::Invalid,
    };
    let mut out = Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        close: req.version == Some(0),
        headers: Vec::with_capacity(req.headers.len()),
    };
    let mut body = 0usize;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        let lower = h.name.to_ascii_lowercase();
        match lower.as_str() {
            "content-length" => match value.parse::<usize>() {
                Ok(n) if n <= MAX_BODY => body = n,
                _ => return Parsed::Invalid,
            },
            "connection" if value.eq_ignore_ascii_case("close") => out.close = true,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => out.close = false,
            "transfer-encoding" => return Parsed::Invalid,
            _ => {}
        }
        out.headers.push((lower, h.name.to_string(), value));
    }
    if buf.len() < head + body {
        return Parsed::Partial;
    }
    Parsed::Complete {
        request: out,
        len: head + body,
    }
}

/// An answer, before it becomes bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub extra_headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain",
            extra_headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The response's bytes on the wire.
    pub fn to_bytes(&self, close: bool, deprecated: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            501 => "Not Implemented",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nServer: Firecracker API\r\nConnection: {}\r\n",
            self.status,
            if close { "close" } else { "keep-alive" }
        );
        if deprecated {
            head.push_str("Deprecation: true\r\n");
        }
        for (k, v) in &self.extra_headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
            self.content_type,
            self.body.len()
        ));
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The answer to a request that did not parse.
pub fn invalid_request() -> Response {
    Response::text(400, "Invalid request.")
}

/// Firecracker's answer to `req`.
pub fn respond(req: &Request, cx: &Context<'_>, counters: &mut MmdsCounters) -> Response {
    counters.rx_count += 1;
    match req.method.as_str() {
        "PUT" => put_token(req, cx),
        "GET" => get(req, cx, counters),
        _ => {
            let mut r = Response::text(405, "Not allowed HTTP method.");
            r.extra_headers.push(("Allow".into(), "GET, PUT".into()));
            r
        }
    }
}

fn put_token(req: &Request, cx: &Context<'_>) -> Response {
    if req.header("x-forwarded-for").is_some() {
        return Response::text(
            400,
            "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
        );
    }
    let path = normalize(&req.path);
    if path != "/latest/api/token" {
        return Response::text(404, format!("Resource not found: {}.", req.path));
    }
    let Some((name, value)) = req.any_header(&TTL_HEADERS) else {
        return Response::text(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::text(
            400,
            format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
        );
    };
    if !TTL_RANGE.contains(&ttl) {
        return Response::text(
            400,
            format!(
                "Invalid time to live value provided for token: {ttl}. Please provide a value \
                 between {} and {}.",
                TTL_RANGE.start(),
                TTL_RANGE.end()
            ),
        );
    }
    match cx.tokens.issue(Duration::from_secs(ttl.into()), cx.now) {
        Ok(token) => {
            let mut r = Response::text(200, token);
            r.extra_headers.push((name.to_string(), ttl.to_string()));
            r
        }
        Err(e) => Response::text(500, format!("Cannot generate a token: {e}")),
    }
}

fn get(req: &Request, cx: &Context<'_>, counters: &mut MmdsCounters) -> Response {
    match req.any_header(&TOKEN_HEADERS) {
        None => {
            counters.rx_no_token += 1;
            if cx.version == MmdsVersion::V2 {
                return Response::text(
                    401,
                    "No MMDS token provided. Use `X-metadata-token` or \
                     `X-aws-ec2-metadata-token` header to specify the session token.",
                );
            }
        }
        Some((_, token)) if !cx.tokens.valid(token, cx.now) => {
            counters.rx_invalid_token += 1;
            if cx.version == MmdsVersion::V2 {
                return Response::text(401, "MMDS token not valid.");
            }
        }
        Some(_) => {}
    }
    if req.path.is_empty() {
        return Response::text(400, "Invalid URI.");
    }
    let path = normalize(&req.path);
    let pointer = if path == "/" { "" } else { path.as_str() };
    let value = {
        let store = cx.store.lock().unwrap_or_else(|e| e.into_inner());
        match store.lookup(pointer) {
            Some(v) => v.clone(),
            // The empty store: null at the root, nothing below it.
            None if pointer.is_empty() => Value::Null,
            None => return Response::text(404, format!("Resource not found: {}.", req.path)),
        }
    };
    let json = !cx.imds_compat
        && req
            .header("accept")
            .is_some_and(|(_, v)| v.eq_ignore_ascii_case("application/json"));
    if json {
        let body = match (&value, pointer) {
            (Value::Null, "") => "{}".to_string(),
            _ => value.to_string(),
        };
        return Response {
            status: 200,
            content_type: "application/json",
            extra_headers: Vec::new(),
            body,
        };
    }
    match value {
        Value::Object(map) => Response::text(
            200,
            map.iter()
                .map(|(k, v)| match v {
                    Value::Object(_) => format!("{k}/"),
                    _ => k.clone(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        Value::String(s) => Response::text(200, s),
        _ => Response::text(
            501,
            "Cannot retrieve value. The value has an unsupported type.",
        ),
    }
}

/// The path without its query, `//` collapsed and a trailing `/` dropped.
fn normalize(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(path.len() + 1);
    for part in path.split('/').filter(|p| !p.is_empty()) {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Mutex<Mmds> {
        let mut m = Mmds::default();
        m.put(json!({
            "latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-1",
                                     "dummy_obj": {"a": 1}, "dummy_array": ["x", 2]}},
            "n": 5
        }))
        .unwrap();
        Mutex::new(m)
    }

    fn request(text: &str) -> Request {
        match parse(text.as_bytes()) {
            Parsed::Complete { request, len } => {
                assert_eq!(len, text.len());
                request
            }
            other => panic!("{other:?}"),
        }
    }

    fn ask(
        text: &str,
        store: &Mutex<Mmds>,
        tokens: &Tokens,
        version: MmdsVersion,
    ) -> (Response, MmdsCounters) {
        let cx = Context {
            store,
            tokens,
            version,
            imds_compat: false,
            now: Instant::now(),
        };
        let mut c = MmdsCounters::default();
        (respond(&request(text), &cx, &mut c), c)
    }

    #[test]
    fn imds_text_lists_keys_with_a_slash_for_objects_and_gives_strings_raw() {
        let (s, t) = (store(), Tokens::default());
        let (r, _) = ask(
            "GET /latest/meta-data/ HTTP/1.1\r\n\r\n",
            &s,
            &t,
            MmdsVersion::V1,
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ami-id\ndummy_array\ndummy_obj/\nreservation-id");
        let (r, _) = ask(
            "GET //latest//meta-data/ami-id HTTP/1.1\r\n\r\n",
            &s,
            &t,
            MmdsVersion::V1,
        );
        assert_eq!((r.status, r.body.as_str()), (200, "ami-12345678"));
        let (r, _) = ask(
            "GET /latest/meta-data/dummy_array/0 HTTP/1.1\r\n\r\n",
            &s,
            &t,
            MmdsVersion::V1,
        );
        assert_eq!(r.body, "x");
        let (r, _) = ask("GET /n HTTP/1.1\r\n\r\n", &s, &t, MmdsVersion::V1);
        assert_eq!(r.status, 501);
        let (r, _) = ask("GET /nope HTTP/1.1\r\n\r\n", &s, &t, MmdsVersion::V1);
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "Resource not found: /nope.")
        );
    }

    #[test]
    fn json_is_given_only_when_asked_for() {
        let (s, t) = (store(), Tokens::default());
        let (r, _) = ask(
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            &s,
            &t,
            MmdsVersion::V1,
        );
        assert_eq!(r.body, "\"ami-12345678\"");
        assert_eq!(r.content_type, "application/json");
        let empty = Mutex::new(Mmds::default());
        let (r, _) = ask(
            "GET / HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            &empty,
            &t,
            MmdsVersion::V1,
        );
        assert_eq!(r.body, "{}");
        let (r, _) = ask("GET / HTTP/1.1\r\n\r\n", &empty, &t, MmdsVersion::V1);
        assert_eq!(r.status, 501);
    }

    #[test]
    fn v2_needs_a_token_from_put_and_v1_only_counts_its_absence() {
        let (s, t) = (store(), Tokens::default());
        let get = "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n";
        let (r, c) = ask(get, &s, &t, MmdsVersion::V2);
        assert_eq!(r.status, 401);
        assert!(r.body.starts_with("No MMDS token provided."));
        assert_eq!(c.rx_no_token, 1);
        let (r, c) = ask(get, &s, &t, MmdsVersion::V1);
        assert_eq!((r.status, c.rx_no_token), (200, 1));

        let (r, _) = ask(
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
            &s,
            &t,
            MmdsVersion::V2,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.extra_headers,
            [("X-aws-ec2-metadata-token-ttl-seconds".into(), "60".into())]
        );
        let token = r.body;
        let (r, _) = ask(
            &format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"),
            &s,
            &t,
            MmdsVersion::V2,
        );
        assert_eq!((r.status, r.body.as_str()), (200, "ami-12345678"));
        let (r, c) = ask(
            "GET / HTTP/1.1\r\nX-metadata-token: forged\r\n\r\n",
            &s,
            &t,
            MmdsVersion::V2,
        );
        assert_eq!((r.status, r.body.as_str()), (401, "MMDS token not valid."));
        assert_eq!(c.rx_invalid_token, 1);
    }

    #[test]
    fn a_token_expires() {
        let t = Tokens::default();
        let now = Instant::now();
        let tok = t.issue(Duration::from_secs(1), now).unwrap();
        assert!(t.valid(&tok, now));
        assert!(!t.valid(&tok, now + Duration::from_secs(2)));
    }

    #[test]
    fn token_puts_are_refused_as_firecracker_refuses_them() {
        let (s, t) = (store(), Tokens::default());
        let cases = [
            (
                "PUT /latest/api/token HTTP/1.1\r\n\r\n",
                400,
                "Token time to live value not found.",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
                400,
                "Invalid time to live value provided for token: 0. Please provide a value between 1 and 21600.",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n",
                400,
                "Invalid header.",
            ),
            (
                "PUT /latest/api/token HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
                400,
                "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
            ),
            (
                "PUT /latest/api/toke HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
                404,
                "Resource not found: /latest/api/toke.",
            ),
            ("POST / HTTP/1.1\r\n\r\n", 405, "Not allowed HTTP method."),
        ];
        for (text, status, start) in cases {
            let (r, _) = ask(text, &s, &t, MmdsVersion::V2);
            assert_eq!(r.status, status, "{text}");
            assert!(r.body.starts_with(start), "{text}: {}", r.body);
        }
    }

    #[test]
    fn parse_waits_for_the_whole_head_and_body_and_refuses_garbage() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x"), Parsed::Partial);
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab"),
            Parsed::Partial
        );
        assert_eq!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Invalid);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Parsed::Invalid
        );
        assert_eq!(parse(&vec![b'a'; MAX_HEAD + 1]), Parsed::Invalid);
        let Parsed::Complete { request, len } =
            parse(b"GET / HTTP/1.0\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
        else {
            panic!()
        };
        assert_eq!((len, request.close), (18, true));
    }

    #[test]
    fn the_response_has_a_length_and_says_whether_the_connection_stays() {
        let r = Response::text(200, "abc").to_bytes(false, true);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Connection: keep-alive\r\n"));
        assert!(text.contains("Deprecation: true\r\n"));
        assert!(text.ends_with("Content-Length: 3\r\n\r\nabc"), "{text}");
    }
}
