//! `PUT /logger`.

use crate::request::{Method, Parsed, VmmAction, invalid_path, json};

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    match method {
        Method::Put => Ok(VmmAction::PutLogger(json(body)?).into()),
        _ => Err(invalid_path(method, "logger")),
    }
}
