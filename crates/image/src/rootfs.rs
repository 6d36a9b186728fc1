//! A real Debian root file system on an ext4 image: `mmdebstrap`
//! (Debian's package) builds a minbase tree with busybox-static and the
//! packages asked for, vmplay's init goes in, and `mkfs.ext4 -d` turns the
//! tree into an image, written under a temporary name and renamed at the
//! end.
//!
//! The init is a short shell script, not systemd: on vmplay's software CPU
//! systemd and udev cost many seconds of boot for services a one-user
//! microVM does not run, while the script has a root shell on the console
//! in milliseconds. A package list that brings `systemd-sysv` keeps its
//! `/sbin/init`; boot it with `init=/lib/systemd/systemd` or without
//! `init=` and the image's own init, `/sbin/vmplay-init`, is not used.

use crate::ImageError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// vmplay's init for the root file system (`/sbin/vmplay-init`).
pub const ROOTFS_INIT: &str = include_str!("rootfs-init.sh");

/// What to build.
#[derive(Debug, Clone)]
pub struct RootfsOptions {
    /// Bytes of the ext4 image.
    pub size: u64,
    /// Packages beyond minbase and busybox-static.
    pub packages: Vec<String>,
    /// The Debian suite; `None` takes the host's (`VERSION_CODENAME`).
    pub suite: Option<String>,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        RootfsOptions {
            size: 2 << 30,
            packages: Vec::new(),
            suite: None,
        }
    }
}

/// The host's Debian suite, from `/etc/os-release`.
fn host_suite() -> Result<String, ImageError> {
    let path = Path::new("/etc/os-release");
    let text = std::fs::read_to_string(path).map_err(|e| ImageError::io(path, e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ImageError::NotInPackage {
            dir: path.into(),
            what: "VERSION_CODENAME (give the suite explicitly)".into(),
        })
}

/// A directory removed when dropped.
struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds `out` (an ext4 image) as described by `options`.
pub fn build_rootfs(
    out: &Path,
    options: &RootfsOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let suite = match &options.suite {
        Some(s) => s.clone(),
        None => host_suite()?,
    };
    for p in &options.packages {
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
        {
            return Err(ImageError::MissingPackage {
                package: p.clone(),
                detail: "not a Debian package name".into(),
            });
        }
    }
    if options.suite.is_none() {
        check_packages_known(&options.packages)?;
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let tree = TempTree(out.with_file_name(format!(".{name}.tree-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tree.0);
    let mut include = vec!["busybox-static".to_string()];
    include.extend(options.packages.iter().cloned());
    progress(&format!(
        "mmdebstrap {suite} minbase with {} (a few minutes the first time)",
        include.join(",")
    ));
    let mut command = Command::new("mmdebstrap");
    command
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", include.join(",")))
        .arg(&suite)
        .arg(&tree.0);
    let output = command.output().map_err(|source| ImageError::Spawn {
        program: "mmdebstrap".into(),
        source,
    })?;
    if !output.status.success() {
        // apt's own errors reach mmdebstrap's stdout, its summary stderr.
        let text =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        let detail = text
            .lines()
            .find(|l| l.starts_with("E:") && !l.contains("mmdebstrap failed"))
            .or_else(|| text.lines().rev().find(|l| l.starts_with("E:")))
            .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("no message")
            .trim()
            .to_string();
        return Err(if text.contains("No space left") {
            ImageError::DiskFull { path: out.into() }
        } else if text.contains("Unable to locate package") {
            ImageError::MissingPackage {
                package: include.join(","),
                detail,
            }
        } else if text.contains("Temporary failure resolving") || text.contains("Failed to fetch") {
            ImageError::NoNetwork {
                package: include.join(","),
                detail,
            }
        } else {
            ImageError::CommandFailed {
                command: "mmdebstrap".into(),
                detail,
            }
        });
    }
    install_init(&tree.0)?;

    progress(&format!("mkfs.ext4 -d ({} MiB)", options.size >> 20));
    crate::write_atomically(out, |file| {
        file.set_len(options.size)?;
        let temp = temp_path_of(out);
        let output = Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "vmplay-root", "-d"])
            .arg(&tree.0)
            .arg(&temp)
            .output()?;
        if output.status.success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&output.stderr).trim().to_string();
            let kind = if text.contains("No space left") || text.contains("Could not allocate") {
                std::io::ErrorKind::StorageFull
            } else {
                std::io::ErrorKind::Other
            };
            Err(std::io::Error::new(kind, format!("mkfs.ext4: {text}")))
        }
    })
}

/// Fails at once, naming it, on a package the host's apt does not know
/// (the guest gets the host's suite), instead of minutes into mmdebstrap.
/// Says nothing when the host has no package lists to ask.
fn check_packages_known(packages: &[String]) -> Result<(), ImageError> {
    let known = |p: &str| {
        Command::new("apt-cache")
            .args(["show", "--no-all-versions", p])
            .env("LC_ALL", "C")
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
    };
    if !known("busybox-static") {
        return Ok(());
    }
    match packages.iter().find(|p| !known(p)) {
        Some(p) => Err(ImageError::MissingPackage {
            package: p.clone(),
            detail: "the host's apt does not know it".into(),
        }),
        None => Ok(()),
    }
}

/// The temporary name [`crate::write_atomically`] writes `out` under.
fn temp_path_of(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    out.with_file_name(name)
}

/// `/sbin/vmplay-init`, `/sbin/init` pointing at it when the packages
/// brought no init, busybox's `poweroff`/`reboot`/`halt` where Debian has
/// none, and a hostname.
fn install_init(tree: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let write = |relative: &str, text: &str, mode: u32| -> Result<(), ImageError> {
        let path = tree.join(relative);
        std::fs::write(&path, text).map_err(|e| ImageError::io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| ImageError::io(&path, e))
    };
    let link = |relative: &str, target: &str| -> Result<(), ImageError> {
        let path = tree.join(relative);
        if std::fs::symlink_metadata(&path).is_ok() {
            return Ok(());
        }
        std::os::unix::fs::symlink(target, &path).map_err(|e| ImageError::io(&path, e))
    };
    write("sbin/vmplay-init", ROOTFS_INIT, 0o755)?;
    write("etc/hostname", "vmplay\n", 0o644)?;
    link("sbin/init", "vmplay-init")?;
    for tool in ["poweroff", "reboot", "halt"] {
        link(&format!("sbin/{tool}"), "/bin/busybox")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_its_init_without_replacing_one_the_packages_brought() {
        let tree = std::env::temp_dir().join(format!("vmplay-rootfs-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(tree.join("sbin")).unwrap();
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::os::unix::fs::symlink("/lib/systemd/systemd", tree.join("sbin/reboot")).unwrap();
        install_init(&tree).unwrap();
        assert_eq!(
            std::fs::read_link(tree.join("sbin/init")).unwrap(),
            PathBuf::from("vmplay-init")
        );
        assert_eq!(
            std::fs::read_link(tree.join("sbin/reboot")).unwrap(),
            PathBuf::from("/lib/systemd/systemd"),
            "an existing tool is kept"
        );
        assert_eq!(
            std::fs::read_link(tree.join("sbin/poweroff")).unwrap(),
            PathBuf::from("/bin/busybox")
        );
        let init = std::fs::read_to_string(tree.join("sbin/vmplay-init")).unwrap();
        assert!(init.starts_with("#!/bin/sh"));
        std::fs::remove_dir_all(&tree).unwrap();
    }

    #[test]
    fn refuses_a_package_name_that_is_not_one() {
        let options = RootfsOptions {
            packages: vec!["bash; rm -rf /".into()],
            suite: Some("bookworm".into()),
            ..Default::default()
        };
        let err =
            build_rootfs(Path::new("/nonexistent/x.ext4"), &options, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::MissingPackage { .. }), "{err}");
    }
}
