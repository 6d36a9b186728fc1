//! `PUT /metrics`.

use crate::request::{Method, Parsed, VmmAction, invalid_path, json};

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    match method {
        Method::Put => Ok(VmmAction::PutMetrics(json(body)?).into()),
        _ => Err(invalid_path(method, "metrics")),
    }
}
