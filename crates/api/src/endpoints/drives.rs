//! `PUT|PATCH /drives/{drive_id}`.

use crate::request::{Method, Parsed, RequestError, VmmAction, checked_id, invalid_path, json};
use crate::schema::{Drive, PartialDrive};

const ID_MISMATCH: &str = "The id from the path does not match the id from the body!";

pub fn parse(method: Method, rest: &[&str], body: &[u8]) -> Parsed {
    if rest.len() > 1 {
        return Err(invalid_path(method, "drives"));
    }
    match method {
        Method::Put => {
            let id = checked_id(rest.first().copied())?;
            let d: Drive = json(body)?;
            if d.drive_id != id {
                return Err(RequestError(ID_MISMATCH.into()));
            }
            Ok(VmmAction::PutDrive(d).into())
        }
        Method::Patch => {
            let id = checked_id(rest.first().copied())?;
            let d: PartialDrive = json(body)?;
            if d.drive_id != id {
                return Err(RequestError(ID_MISMATCH.into()));
            }
            Ok(VmmAction::PatchDrive(d).into())
        }
        Method::Delete => {
            checked_id(rest.first().copied())?;
            Ok(crate::endpoints::unsupported::hotplug("hot-unplugging drives").into())
        }
        Method::Get => Err(invalid_path(method, "drives")),
    }
}
