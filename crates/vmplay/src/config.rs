//! Firecracker's `--config-file` JSON, so existing Firecracker configs
//! boot under vmplay. Only what vmplay implements is accepted: a section
//! vmplay cannot honour is an error, never silently dropped.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config")]
    pub machine_config: Option<MachineConfigSection>,
    #[serde(default)]
    pub drives: Vec<serde_json::Value>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<serde_json::Value>,
    // Accepted and ignored: they configure Firecracker's own logging.
    pub logger: Option<serde_json::Value>,
    pub metrics: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    pub boot_args: Option<String>,
    pub initrd_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigSection {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

impl FirecrackerConfig {
    /// Reads and checks a config file; relative paths in it are taken
    /// relative to the current directory, as Firecracker does.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config {}: cannot read", path.display()))?;
        let config: FirecrackerConfig = serde_json::from_str(&text).with_context(|| {
            format!("config {}: not a valid Firecracker config", path.display())
        })?;
        let unsupported = |what: &str| {
            anyhow::anyhow!(
                "config {}: {what} are not supported by vmplay yet",
                path.display()
            )
        };
        if !config.drives.is_empty() {
            return Err(unsupported("drives"));
        }
        if !config.network_interfaces.is_empty() {
            return Err(unsupported("network interfaces"));
        }
        if let Some(m) = &config.machine_config {
            if m.smt {
                bail!("config {}: smt is not supported", path.display());
            }
            if let Some(t) = m.cpu_template.as_deref().filter(|t| *t != "None") {
                bail!(
                    "config {}: cpu_template {t:?} is not supported",
                    path.display()
                );
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<FirecrackerConfig> {
        let dir = std::env::temp_dir().join(format!("vmplay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.json", text.len() ^ text.as_ptr() as usize));
        std::fs::write(&path, text).unwrap();
        let r = FirecrackerConfig::load(&path);
        std::fs::remove_file(&path).ok();
        r
    }

    #[test]
    fn reads_a_firecracker_getting_started_config() {
        let c = load_str(
            r#"{
              "boot-source": {
                "kernel_image_path": "vmlinux.bin",
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
                "initrd_path": null
              },
              "drives": [],
              "machine-config": { "vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false },
              "network-interfaces": []
            }"#,
        )
        .unwrap();
        let b = c.boot_source.unwrap();
        assert_eq!(b.kernel_image_path, PathBuf::from("vmlinux.bin"));
        assert_eq!(
            b.boot_args.as_deref(),
            Some("console=ttyS0 reboot=k panic=1 pci=off")
        );
        let m = c.machine_config.unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 1024));
    }

    #[test]
    fn rejects_what_vmplay_cannot_honour() {
        let e = load_str(r#"{"drives":[{"drive_id":"rootfs"}]}"#).unwrap_err();
        assert!(e.to_string().contains("drives are not supported"), "{e}");
        let e = load_str(r#"{"boot-source":{"kernel_image_path":"k","bogus":1}}"#).unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
        let e = load_str("{not json").unwrap_err();
        assert!(
            e.to_string().contains("not a valid Firecracker config"),
            "{e}"
        );
    }
}
