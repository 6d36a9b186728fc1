//! `PATCH /vm` (pause and resume) and `GET /vm/config`.

use crate::request::{Method, Parsed, VmmAction, invalid_path, json};
use crate::schema::{VmState, VmStateBody};

pub fn parse(method: Method, rest: &[&str], body: &[u8]) -> Parsed {
    match (method, rest) {
        (Method::Patch, []) => {
            let b: VmStateBody = json(body)?;
            Ok(match b.state {
                VmState::Paused => VmmAction::Pause,
                VmState::Resumed => VmmAction::Resume,
            }
            .into())
        }
        (Method::Get, ["config"]) => Ok(VmmAction::GetVmConfig.into()),
        _ => Err(invalid_path(method, "vm")),
    }
}
