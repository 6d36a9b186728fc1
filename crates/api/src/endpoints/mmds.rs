//! `GET|PUT|PATCH /mmds` (the data store) and `PUT /mmds/config`.

use crate::request::{Method, Parsed, ParsedRequest, RequestError, VmmAction, invalid_path, json};
use crate::schema::{MmdsConfig, MmdsVersion};

pub fn parse(method: Method, rest: &[&str], body: &[u8]) -> Parsed {
    match (method, rest) {
        (Method::Get, []) => Ok(VmmAction::GetMmds.into()),
        (Method::Put, []) => Ok(VmmAction::PutMmds(json(body)?).into()),
        (Method::Patch, []) => Ok(VmmAction::PatchMmds(json(body)?).into()),
        (Method::Put, ["config"]) => {
            let c: MmdsConfig = json(body)?;
            let deprecation = (c.version.unwrap_or_default() == MmdsVersion::V1)
                .then_some("PUT /mmds/config: V1 is deprecated. Use V2 instead.");
            Ok(ParsedRequest {
                action: VmmAction::PutMmdsConfig(c),
                deprecation,
            })
        }
        (Method::Put, [other, ..]) => Err(RequestError(format!(
            "Unrecognized PUT request path `{other}`."
        ))),
        _ => Err(invalid_path(method, "mmds")),
    }
}
