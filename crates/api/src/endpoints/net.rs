//! `PUT|PATCH /network-interfaces/{iface_id}`.

use crate::request::{Method, Parsed, RequestError, VmmAction, checked_id, invalid_path, json};
use crate::schema::{NetworkInterface, PartialNetworkInterface};

fn mismatch(path: &str, body: &str) -> RequestError {
    RequestError(format!(
        "The id from the path [{path}] does not match the id from the body [{body}]!"
    ))
}

pub fn parse(method: Method, rest: &[&str], body: &[u8]) -> Parsed {
    if rest.len() > 1 {
        return Err(invalid_path(method, "network-interfaces"));
    }
    match method {
        Method::Put => {
            let id = checked_id(rest.first().copied())?;
            let n: NetworkInterface = json(body)?;
            if n.iface_id != id {
                return Err(mismatch(id, &n.iface_id));
            }
            Ok(VmmAction::PutNetworkInterface(n).into())
        }
        Method::Patch => {
            let id = checked_id(rest.first().copied())?;
            let n: PartialNetworkInterface = json(body)?;
            if n.iface_id != id {
                return Err(mismatch(id, &n.iface_id));
            }
            Ok(VmmAction::PatchNetworkInterface(n).into())
        }
        Method::Delete => {
            checked_id(rest.first().copied())?;
            Ok(crate::endpoints::unsupported::hotplug("hot-unplugging network interfaces").into())
        }
        Method::Get => Err(invalid_path(method, "network-interfaces")),
    }
}
