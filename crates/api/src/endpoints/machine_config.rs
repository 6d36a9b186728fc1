//! `GET|PUT|PATCH /machine-config`.

use crate::request::{Method, Parsed, ParsedRequest, RequestError, VmmAction, invalid_path, json};
use crate::schema::{MachineConfiguration, MachineConfigurationUpdate};

const CPU_TEMPLATE_DEPRECATED: &str = "PUT /machine-config: cpu_template field is deprecated.";
const CPU_TEMPLATE_DEPRECATED_PATCH: &str =
    "PATCH /machine-config: cpu_template field is deprecated.";

pub fn parse(method: Method, body: &[u8]) -> Parsed {
    match method {
        Method::Get => Ok(VmmAction::GetMachineConfig.into()),
        Method::Put => {
            let m: MachineConfiguration = json(body)?;
            let deprecation = m.cpu_template.is_some().then_some(CPU_TEMPLATE_DEPRECATED);
            Ok(ParsedRequest {
                action: VmmAction::PutMachineConfig(m),
                deprecation,
            })
        }
        Method::Patch => {
            let u: MachineConfigurationUpdate = json(body)?;
            if u.is_empty() {
                return Err(RequestError("Empty PATCH request.".into()));
            }
            let deprecation = u
                .cpu_template
                .is_some()
                .then_some(CPU_TEMPLATE_DEPRECATED_PATCH);
            Ok(ParsedRequest {
                action: VmmAction::PatchMachineConfig(u),
                deprecation,
            })
        }
        Method::Delete => Err(invalid_path(method, "machine-config")),
    }
}
