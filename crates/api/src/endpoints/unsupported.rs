//! Firecracker endpoints for features vmplay does not have yet: balloon,
//! snapshots, custom CPU templates, pmem and memory hotplug. Bodies are
//! still parsed (bad ones get Firecracker's errors) and the phase rules
//! still apply; then the answer is a 400 saying vmplay lacks the feature.

use crate::request::{
    Method, Parsed, Phase, RequestError, VmmAction, checked_id, invalid_path, json,
};
use crate::schema::Balloon;

fn not_yet(phase: Phase, what: &str) -> VmmAction {
    VmmAction::NotYet {
        phase,
        fault_message: format!("vmplay does not have {what} yet."),
    }
}

/// Hotplug (PUT after boot, DELETE) of a device kind.
pub fn hotplug(what: &str) -> VmmAction {
    not_yet(Phase::PostBoot, what)
}

fn any_json(body: &[u8]) -> Result<serde_json::Value, RequestError> {
    json(body)
}

pub fn parse(method: Method, first: &str, rest: &[&str], body: &[u8], full: &str) -> Parsed {
    use Method::*;
    let action = match (first, method, rest) {
        ("balloon", Put, []) => {
            let _: Balloon = json(body)?;
            not_yet(Phase::PreBoot, "a balloon device")
        }
        ("balloon", Get, []) => VmmAction::GetBalloon,
        ("balloon", Patch, [] | ["statistics"]) => {
            any_json(body)?;
            not_yet(Phase::PostBoot, "a balloon device")
        }
        ("balloon", Get, ["statistics"] | ["hinting", "status"])
        | ("balloon", Patch, ["hinting", "start" | "stop"]) => {
            not_yet(Phase::PostBoot, "a balloon device")
        }
        ("snapshot", Put, []) => {
            return Err(RequestError("Missing snapshot operation type.".into()));
        }
        ("snapshot", Put, ["create"]) => {
            any_json(body)?;
            not_yet(Phase::PostBoot, "snapshots")
        }
        ("snapshot", Put, ["load"]) => {
            any_json(body)?;
            not_yet(Phase::PreBoot, "snapshots")
        }
        ("snapshot", _, _) => return Err(invalid_path(method, full)),
        ("cpu-config", Put, []) => {
            any_json(body)?;
            not_yet(Phase::PreBoot, "custom CPU templates")
        }
        ("pmem", Put | Patch, [_]) => {
            checked_id(rest.first().copied())?;
            any_json(body)?;
            not_yet(
                if method == Put {
                    Phase::PreBoot
                } else {
                    Phase::PostBoot
                },
                "pmem devices",
            )
        }
        ("pmem", Put | Patch, []) => return Err(RequestError("The ID cannot be empty.".into())),
        ("hotplug", Put, ["memory"]) => {
            any_json(body)?;
            not_yet(Phase::PreBoot, "memory hotplug")
        }
        ("hotplug", Patch | Get, ["memory"]) => {
            if method == Patch {
                any_json(body)?;
            }
            not_yet(Phase::PostBoot, "memory hotplug")
        }
        _ => return Err(invalid_path(method, first)),
    };
    Ok(action.into())
}
