//! Firecracker's `--config-file` JSON: the API's request bodies under
//! kebab-case keys. It is read into [`VmmConfig`] and applied by
//! [`crate::VmResources::from_config`], the same checks the API runs.

use crate::schema::VmmConfig;
use std::path::Path;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("Unable to open or read from the configuration file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("Configuration for VMM from one single json failed: Invalid JSON: {1} (in {0})")]
    Json(String, serde_json::Error),
    #[error("Configuration for VMM from one single json failed: {0}")]
    Config(#[from] crate::ConfigError),
}

/// Reads and parses a config file (relative paths inside are taken from
/// the current directory, as Firecracker does).
pub fn load(path: &Path) -> Result<VmmConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigFileError::Read(path.display().to_string(), e))?;
    parse(&text).map_err(|e| ConfigFileError::Json(path.display().to_string(), e))
}

pub fn parse(text: &str) -> Result<VmmConfig, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_firecracker_getting_started_config() {
        let c = parse(
            r#"{
              "boot-source": {
                "kernel_image_path": "vmlinux.bin",
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
                "initrd_path": null
              },
              "drives": [],
              "machine-config": { "vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false },
              "network-interfaces": [],
              "some-future-key": 1
            }"#,
        )
        .unwrap();
        assert_eq!(c.boot_source.kernel_image_path, "vmlinux.bin");
        assert_eq!(
            c.boot_source.boot_args.as_deref(),
            Some("console=ttyS0 reboot=k panic=1 pci=off")
        );
        let m = c.machine_config.unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 1024));
    }

    #[test]
    fn boot_source_and_drives_are_required_and_sections_are_strict() {
        let e = parse("{}").unwrap_err();
        assert!(e.to_string().contains("missing field `boot-source`"), "{e}");
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k"}}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `drives`"), "{e}");
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k","bogus":1},"drives":[]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn what_vmplay_lacks_is_refused_by_name() {
        let k = std::env::temp_dir().join(format!("vmplay-cfg-k-{}", std::process::id()));
        std::fs::write(&k, b"x").unwrap();
        let text = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],"machine-config":{{"vcpu_count":1,"mem_size_mib":64,"track_dirty_pages":true}}}}"#,
            k.display()
        );
        let e = crate::VmResources::from_config(&parse(&text).unwrap()).unwrap_err();
        assert!(e.to_string().contains("dirty page tracking"), "{e}");
        let text = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],"balloon":{{"amount_mib":1,"deflate_on_oom":true}}}}"#,
            k.display()
        );
        let e = crate::VmResources::from_config(&parse(&text).unwrap()).unwrap_err();
        assert!(e.to_string().contains("balloon"), "{e}");
        std::fs::remove_file(&k).ok();
    }
}
