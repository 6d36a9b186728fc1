//! `PUT /serial`: where the guest's serial output goes.

use crate::request::{Method, Parsed, VmmAction, invalid_path, json};

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    match method {
        Method::Put => Ok(VmmAction::PutSerial(json(body)?).into()),
        _ => Err(invalid_path(method, "serial")),
    }
}
