//! `PUT /actions`: `InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`.

use crate::request::{Method, Parsed, VmmAction, invalid_path, json};
use crate::schema::{ActionBody, ActionType};

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    if method != Method::Put {
        return Err(invalid_path(method, "actions"));
    }
    let action: ActionBody = json(body)?;
    Ok(match action.action_type {
        ActionType::InstanceStart => VmmAction::InstanceStart,
        ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
        ActionType::FlushMetrics => VmmAction::FlushMetrics,
    }
    .into())
}
