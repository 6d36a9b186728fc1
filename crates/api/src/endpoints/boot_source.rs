//! `PUT /boot-source`.

use crate::request::{Method, Parsed, VmmAction, invalid_path, json};

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    match method {
        Method::Put => Ok(VmmAction::PutBootSource(json(body)?).into()),
        _ => Err(invalid_path(method, "boot-source")),
    }
}
