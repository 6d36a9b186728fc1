//! `PUT /vsock`.

use crate::request::{Method, Parsed, ParsedRequest, VmmAction, invalid_path, json};
use crate::schema::Vsock;

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    if method != Method::Put {
        return Err(invalid_path(method, "vsock"));
    }
    let v: Vsock = json(body)?;
    let deprecation = v
        .vsock_id
        .is_some()
        .then_some("PUT /vsock: vsock_id field is deprecated.");
    Ok(ParsedRequest {
        action: VmmAction::PutVsock(v),
        deprecation,
    })
}
