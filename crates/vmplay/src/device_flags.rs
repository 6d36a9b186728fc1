//! The device flags of `vmplay run`, QEMU-style `key=value` lists:
//! `--drive path=P[,readonly=on][,id=ID][,root=on][,cache=unsafe|writeback]`,
//! `--net tap=NAME[,mac=M]`, `--net user[,mac=M]`, `--vsock cid=N,uds=PATH`,
//! `--rng`, `--console virtio[,file=PATH]`. Every key is checked; an unknown
//! one is an error naming it.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use vmplay_machine::{
    CacheType, ConsoleConfig, DriveConfig, NetBackendConfig, NetConfig, VsockConfig,
};

/// Splits `a=b,c=d,flag` into keys and values; a bare word maps to "".
fn parse_list<'a>(flag: &str, text: &'a str) -> Result<BTreeMap<&'a str, &'a str>> {
    let mut out = BTreeMap::new();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        if out.insert(k, v).is_some() {
            bail!("{flag} {text:?}: {k} given twice");
        }
    }
    Ok(out)
}

fn on_off(flag: &str, key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" | "1" | "" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => bail!("{flag}: {key}={v:?}: expected on or off"),
    }
}

fn reject_unknown(
    flag: &str,
    text: &str,
    keys: &BTreeMap<&str, &str>,
    known: &[&str],
) -> Result<()> {
    if let Some(k) = keys.keys().find(|k| !known.contains(k)) {
        bail!(
            "{flag} {text:?}: unknown key {k:?} (known: {})",
            known.join(", ")
        );
    }
    Ok(())
}

/// `--drive`; `index` numbers drives without an `id`.
pub fn drive(text: &str, index: usize) -> Result<DriveConfig> {
    let flag = "--drive";
    let kv = parse_list(flag, text)?;
    reject_unknown(
        flag,
        text,
        &kv,
        &["path", "readonly", "id", "root", "cache", "partuuid"],
    )?;
    let path = kv
        .get("path")
        .filter(|p| !p.is_empty())
        .with_context(|| format!("{flag} {text:?}: path=FILE is required"))?;
    Ok(DriveConfig {
        id: kv
            .get("id")
            .map_or_else(|| format!("drive{index}"), |s| s.to_string()),
        path: path.into(),
        read_only: kv
            .get("readonly")
            .map(|v| on_off(flag, "readonly", v))
            .transpose()?
            .unwrap_or(false),
        root: kv
            .get("root")
            .map(|v| on_off(flag, "root", v))
            .transpose()?
            .unwrap_or(false),
        partuuid: kv.get("partuuid").map(|s| s.to_string()),
        cache: match kv.get("cache").copied() {
            // Unlike Firecracker's config default, a flag's drive honours
            // the guest's flushes unless told otherwise (QEMU's default).
            None | Some("writeback") => CacheType::Writeback,
            Some("unsafe") => CacheType::Unsafe,
            Some(other) => bail!("{flag}: cache={other:?}: expected unsafe or writeback"),
        },
        rate_limiter: None,
    })
}

/// A MAC written `aa:bb:cc:dd:ee:ff`.
pub fn mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        bail!("MAC {text:?}: expected six hex bytes like 06:00:ac:10:00:02");
    }
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .with_context(|| format!("MAC {text:?}: {p:?} is not a hex byte"))?;
    }
    if m[0] & 1 != 0 {
        bail!("MAC {text:?}: a multicast address cannot be a NIC's");
    }
    Ok(m)
}

/// `--net`; `index` numbers interfaces without an `id`.
pub fn net(text: &str, index: usize) -> Result<NetConfig> {
    let flag = "--net";
    let kv = parse_list(flag, text)?;
    reject_unknown(flag, text, &kv, &["tap", "user", "socket", "mac", "id"])?;
    let backend = match (kv.get("tap"), kv.get("user"), kv.get("socket")) {
        (Some(name), None, None) if !name.is_empty() => NetBackendConfig::Tap {
            name: name.to_string(),
        },
        (None, Some(&""), None) => NetBackendConfig::User,
        (None, None, Some(path)) if !path.is_empty() => {
            NetBackendConfig::UserSocket { path: path.into() }
        }
        _ => bail!(
            "{flag} {text:?}: give exactly one of tap=NAME, user, or socket=PATH (a passt socket)"
        ),
    };
    Ok(NetConfig {
        id: kv
            .get("id")
            .map_or_else(|| format!("net{index}"), |s| s.to_string()),
        backend,
        mac: kv.get("mac").map(|m| mac(m)).transpose()?,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        mmds: None,
    })
}

/// `--vsock cid=N,uds=PATH`.
pub fn vsock(text: &str) -> Result<VsockConfig> {
    let flag = "--vsock";
    let kv = parse_list(flag, text)?;
    reject_unknown(flag, text, &kv, &["cid", "uds"])?;
    let cid: u32 = kv
        .get("cid")
        .with_context(|| format!("{flag} {text:?}: cid=N is required"))?
        .parse()
        .with_context(|| format!("{flag} {text:?}: cid is not a number"))?;
    if cid < 3 {
        bail!(
            "{flag}: cid {cid} is reserved (0-2 are the hypervisor, local and host); use 3 or more"
        );
    }
    let uds = kv
        .get("uds")
        .filter(|p| !p.is_empty())
        .with_context(|| format!("{flag} {text:?}: uds=PATH is required"))?;
    Ok(VsockConfig {
        guest_cid: cid,
        uds_path: uds.into(),
        listener: None,
    })
}

/// `--console virtio[,file=PATH]`: `None` keeps COM1 as the only console.
pub fn console(text: &str) -> Result<Option<ConsoleConfig>> {
    let flag = "--console";
    let kv = parse_list(flag, text)?;
    reject_unknown(flag, text, &kv, &["virtio", "serial", "file"])?;
    match (kv.contains_key("virtio"), kv.contains_key("serial")) {
        (true, false) => Ok(Some(match kv.get("file") {
            Some(p) if !p.is_empty() => ConsoleConfig::File(p.into()),
            Some(_) => bail!("{flag}: file= needs a path"),
            None => ConsoleConfig::Stdio,
        })),
        (false, true) if !kv.contains_key("file") => Ok(None),
        _ => bail!("{flag} {text:?}: expected serial, virtio or virtio,file=PATH"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_drive_flags() {
        let d = drive("path=/x.img,readonly=on,id=root,root=on", 0).unwrap();
        assert_eq!(d.path, std::path::PathBuf::from("/x.img"));
        assert!(d.read_only && d.root);
        assert_eq!(d.id, "root");
        assert_eq!(drive("path=a", 3).unwrap().id, "drive3");
        assert!(
            drive("readonly=on", 0)
                .unwrap_err()
                .to_string()
                .contains("path=FILE is required")
        );
        assert!(
            drive("path=a,bogus=1", 0)
                .unwrap_err()
                .to_string()
                .contains("\"bogus\"")
        );
        assert!(drive("path=a,readonly=maybe", 0).is_err());
    }

    #[test]
    fn parses_net_flags_and_macs() {
        let n = net("tap=tap0,mac=06:00:ac:10:00:02", 0).unwrap();
        assert_eq!(
            n.backend,
            NetBackendConfig::Tap {
                name: "tap0".into()
            }
        );
        assert_eq!(n.mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(net("user", 1).unwrap().backend, NetBackendConfig::User);
        assert!(net("tap=a,user", 0).is_err());
        assert!(net("", 0).is_err());
        assert!(mac("01:00:00:00:00:00").is_err(), "multicast");
        assert!(mac("6:0:0:0:0:1").is_err());
        assert!(mac("zz:00:00:00:00:01").is_err());
    }

    #[test]
    fn parses_vsock_and_console_flags() {
        let v = vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path.to_str().unwrap()),
            (3, "/tmp/v.sock")
        );
        assert!(vsock("cid=2,uds=/x").is_err());
        assert!(vsock("cid=3").is_err());
        assert_eq!(console("virtio").unwrap(), Some(ConsoleConfig::Stdio));
        assert_eq!(console("serial").unwrap(), None);
        assert_eq!(
            console("virtio,file=/tmp/c").unwrap(),
            Some(ConsoleConfig::File("/tmp/c".into()))
        );
        assert!(console("hvc").is_err());
    }
}
