//! Debian's stock cloud kernel and static busybox, fetched with apt (the
//! ordinary package client) into a cache directory:
//!
//! ```text
//! <cache>/debs/*.deb            what apt-get download fetched (reused)
//! <cache>/unpacked/<deb name>/  each package unpacked with dpkg-deb -x
//! <cache>/vmlinuz               symlink to the kernel's boot/vmlinuz-<release>
//! <cache>/busybox               symlink to busybox-static's bin/busybox
//! ```
//!
//! Every step writes under a temporary name and renames at the end, so an
//! interrupted or failed run leaves nothing half-made that a later run
//! would take for finished. A lock file serialises concurrent fetches
//! (tests run side by side).

use crate::ImageError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage whose one versioned dependency is the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// A statically linked busybox: the guest's shell and tools.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// What the guest needs for vmplay's devices: the virtio-mmio transport,
/// block, net, vsock, rng, console, and ext4 for a root disk. Those built
/// into the kernel are skipped; the rest come with their dependencies.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "virtio_console",
    "ext4",
];

/// A fetched and unpacked kernel and busybox.
#[derive(Debug, Clone)]
pub struct DebianAssets {
    cache: PathBuf,
    kernel: PathBuf,
    busybox: PathBuf,
    modules_dir: PathBuf,
    release: String,
    kernel_package: String,
    kernel_version: String,
}

impl DebianAssets {
    /// Fetches what is not in `cache` yet (`apt-get download`; `apt-get
    /// update` first if apt does not know the packages), unpacks it and
    /// returns the assets. A second call reuses what the first fetched.
    /// `progress` gets one line per step that takes time.
    pub fn fetch(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<DebianAssets, ImageError> {
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs).map_err(|e| ImageError::io(&debs, e))?;
        let _lock = lock(cache)?;
        let kernel_package = match kernel_package(progress) {
            Ok(name) => name,
            Err(e) => match newest_cached(&debs, "linux-image-", "-cloud-amd64")? {
                Some(name) => {
                    progress(&format!("{e}; using the cached {name}"));
                    name
                }
                None => return Err(e),
            },
        };
        let kernel_deb = download(&debs, &kernel_package, progress)?;
        let busybox_deb = download(&debs, BUSYBOX_PACKAGE, progress)?;
        unpack(cache, &kernel_deb, progress)?;
        unpack(cache, &busybox_deb, progress)?;
        let assets = Self::from_debs(cache, &kernel_deb, &busybox_deb)?;
        assets.link()?;
        Ok(assets)
    }

    /// The assets already in `cache` (the newest kernel there), without
    /// asking apt anything: for tests and offline runs.
    pub fn open(cache: &Path) -> Result<DebianAssets, ImageError> {
        let debs = cache.join("debs");
        let kernel = newest_cached(&debs, "linux-image-", "-cloud-amd64")?.ok_or_else(|| {
            ImageError::NotInPackage {
                dir: debs.clone(),
                what: format!(
                    "no {KERNEL_METAPACKAGE} kernel fetched yet (run `vmplay image debian`);"
                ),
            }
        })?;
        let kernel_deb = cached_deb(&debs, &kernel)?.ok_or_else(|| ImageError::NotInPackage {
            dir: debs.clone(),
            what: kernel.clone(),
        })?;
        let busybox_deb =
            cached_deb(&debs, BUSYBOX_PACKAGE)?.ok_or_else(|| ImageError::NotInPackage {
                dir: debs.clone(),
                what: format!("{BUSYBOX_PACKAGE} (run `vmplay image debian`)"),
            })?;
        Self::from_debs(cache, &kernel_deb, &busybox_deb)
    }

    fn from_debs(cache: &Path, kernel_deb: &Path, busybox_deb: &Path) -> Result<Self, ImageError> {
        let kernel_root = unpacked_dir(cache, kernel_deb);
        let modules_root = kernel_root.join("lib/modules");
        let release = only_entry(&modules_root, |_| true)?;
        let boot = kernel_root.join("boot");
        let vmlinuz = only_entry(&boot, |name| name.starts_with("vmlinuz-"))?;
        let busybox = unpacked_dir(cache, busybox_deb).join("bin/busybox");
        if !busybox.is_file() {
            return Err(ImageError::NotInPackage {
                dir: unpacked_dir(cache, busybox_deb),
                what: "bin/busybox".into(),
            });
        }
        let (kernel_package, kernel_version) = deb_name_version(kernel_deb);
        Ok(DebianAssets {
            cache: cache.to_path_buf(),
            kernel: boot.join(vmlinuz),
            busybox,
            modules_dir: modules_root.join(&release),
            release,
            kernel_package,
            kernel_version,
        })
    }

    /// `<cache>/vmlinuz` and `<cache>/busybox`, the stable names scripts use.
    fn link(&self) -> Result<(), ImageError> {
        for (name, target) in [("vmlinuz", &self.kernel), ("busybox", &self.busybox)] {
            let relative = target.strip_prefix(&self.cache).unwrap_or(target);
            let link = self.cache.join(name);
            let temp = self
                .cache
                .join(format!(".{name}.tmp-{}", std::process::id()));
            let _ = std::fs::remove_file(&temp);
            std::os::unix::fs::symlink(relative, &temp).map_err(|e| ImageError::io(&temp, e))?;
            std::fs::rename(&temp, &link).map_err(|e| ImageError::io(&link, e))?;
        }
        Ok(())
    }

    /// The bzImage (`.../boot/vmlinuz-<release>`).
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The static busybox binary.
    pub fn busybox(&self) -> &Path {
        &self.busybox
    }

    /// `.../lib/modules/<release>`.
    pub fn modules_dir(&self) -> &Path {
        &self.modules_dir
    }

    /// What `uname -r` prints in the guest (`6.1.0-48-cloud-amd64`).
    pub fn kernel_release(&self) -> &str {
        &self.release
    }

    /// The kernel package (`linux-image-6.1.0-48-cloud-amd64`).
    pub fn kernel_package(&self) -> &str {
        &self.kernel_package
    }

    /// The kernel package's version (`6.1.172-1`), which the guest's
    /// `uname -v` carries.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// The cache directory.
    pub fn cache(&self) -> &Path {
        &self.cache
    }
}

/// An exclusive lock on `<cache>/.lock`, released when dropped.
fn lock(cache: &Path) -> Result<std::fs::File, ImageError> {
    let path = cache.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ImageError::io(&path, e))?;
    file.lock().map_err(|e| ImageError::io(&path, e))?;
    Ok(file)
}

fn run(command: &mut Command) -> Result<std::process::Output, ImageError> {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ImageError::Spawn { program, source })
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last meaningful line apt printed on stderr.
fn apt_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .find(|l| l.starts_with("E:"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no message")
        .trim()
        .to_string()
}

/// `linux-image-<abi>-cloud-amd64`, the metapackage's versioned dependency,
/// after an `apt-get update` if apt does not know the metapackage.
fn kernel_package(progress: &mut dyn FnMut(&str)) -> Result<String, ImageError> {
    let resolve = || -> Result<Option<String>, ImageError> {
        let output = run(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| {
                p.starts_with("linux-image-") && p[12..].starts_with(|c: char| c.is_ascii_digit())
            })
            .map(str::to_string))
    };
    if let Some(name) = resolve()? {
        return Ok(name);
    }
    apt_update(progress)?;
    resolve()?.ok_or_else(|| ImageError::MissingPackage {
        package: KERNEL_METAPACKAGE.into(),
        detail: "apt-cache depends names no linux-image-<version>-cloud-amd64".into(),
    })
}

fn apt_update(progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    progress("apt-get update (apt does not know the packages yet)");
    let mut command = Command::new("apt-get");
    command.args(["update", "-qq"]);
    let output = run(&mut command)?;
    if !output.status.success() {
        return Err(ImageError::CommandFailed {
            command: describe(&command),
            detail: apt_message(&output.stderr),
        });
    }
    Ok(())
}

/// The cached `<package>_*.deb`, if any.
fn cached_deb(debs: &Path, package: &str) -> Result<Option<PathBuf>, ImageError> {
    let prefix = format!("{package}_");
    let mut found: Vec<PathBuf> = list(debs)?
        .into_iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        .map(|n| debs.join(n))
        .collect();
    found.sort();
    Ok(found.pop())
}

/// The newest cached package named `<prefix>*<suffix>` (by version-aware
/// name order: `6.1.0-48` after `6.1.0-9`).
fn newest_cached(debs: &Path, prefix: &str, suffix: &str) -> Result<Option<String>, ImageError> {
    if !debs.exists() {
        return Ok(None);
    }
    let mut names: Vec<String> = list(debs)?
        .into_iter()
        .filter(|n| n.ends_with(".deb"))
        .filter_map(|n| n.split('_').next().map(str::to_string))
        .filter(|p| p.starts_with(prefix) && p.ends_with(suffix))
        .collect();
    names.sort_by_key(|n| version_key(n));
    Ok(names.pop())
}

/// Digit runs compare as numbers.
fn version_key(name: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut chars = name.chars().peekable();
    while chars.peek().is_some() {
        let mut text = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_digit()) {
            text.push(c);
        }
        let mut number = 0u64;
        while let Some(d) = chars.next_if(char::is_ascii_digit) {
            number = number
                .saturating_mul(10)
                .saturating_add(d as u64 - '0' as u64);
        }
        key.push((number, text));
    }
    key
}

fn list(dir: &Path) -> Result<Vec<String>, ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ImageError::io(dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// The one entry of `dir` that `keep` accepts.
fn only_entry(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<String, ImageError> {
    let mut names: Vec<String> = list(dir)?.into_iter().filter(|n| keep(n)).collect();
    names.sort();
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => Err(ImageError::NotInPackage {
            dir: dir.to_path_buf(),
            what: "the expected entry".into(),
        }),
        _ => Err(ImageError::NotInPackage {
            dir: dir.to_path_buf(),
            what: format!("exactly one entry (found {})", names.join(", ")),
        }),
    }
}

/// `debs/<package>_*.deb`, downloading it first if it is not cached.
fn download(
    debs: &Path,
    package: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    if let Some(deb) = cached_deb(debs, package)? {
        return Ok(deb);
    }
    progress(&format!("downloading {package} (apt-get download)"));
    let partial = debs.join(format!(".partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| ImageError::io(&partial, e))?;
    let result = (|| {
        let mut command = Command::new("apt-get");
        // As root apt drops to the _apt user to download; it cannot write
        // into a directory it does not own, so download as the caller.
        command
            .current_dir(&partial)
            .args(["-o", "APT::Sandbox::User=root", "download", package]);
        let mut output = run(&mut command)?;
        if !output.status.success() && apt_message(&output.stderr).contains("Unable to locate") {
            apt_update(progress)?;
            output = run(&mut command)?;
        }
        if !output.status.success() {
            return Err(classify(
                package,
                &describe(&command),
                &output.stderr,
                &partial,
            ));
        }
        let name = list(&partial)?
            .into_iter()
            .find(|n| n.ends_with(".deb"))
            .ok_or_else(|| ImageError::CommandFailed {
                command: describe(&command),
                detail: "it wrote no .deb".into(),
            })?;
        let target = debs.join(&name);
        std::fs::rename(partial.join(&name), &target).map_err(|e| ImageError::io(&target, e))?;
        Ok(target)
    })();
    let _ = std::fs::remove_dir_all(&partial);
    result
}

/// Turns apt's failure into what went wrong: an unknown package, no
/// network, a full disk, or else apt's own message.
fn classify(package: &str, command: &str, stderr: &[u8], dir: &Path) -> ImageError {
    let text = String::from_utf8_lossy(stderr);
    let detail = apt_message(stderr);
    if text.contains("Unable to locate package") || text.contains("has no installation candidate") {
        ImageError::MissingPackage {
            package: package.into(),
            detail,
        }
    } else if text.contains("No space left") {
        ImageError::DiskFull { path: dir.into() }
    } else if [
        "Temporary failure resolving",
        "Could not resolve",
        "Failed to fetch",
        "Unable to connect",
        "Network is unreachable",
        "Connection failed",
        "Could not connect",
    ]
    .iter()
    .any(|needle| text.contains(needle))
    {
        ImageError::NoNetwork {
            package: package.into(),
            detail,
        }
    } else {
        ImageError::CommandFailed {
            command: command.into(),
            detail,
        }
    }
}

/// `<cache>/unpacked/<deb file name without .deb>`.
fn unpacked_dir(cache: &Path, deb: &Path) -> PathBuf {
    let name = deb.file_stem().unwrap_or_default();
    cache.join("unpacked").join(name)
}

/// `dpkg-deb -x` into a temporary directory, renamed into place.
fn unpack(cache: &Path, deb: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let target = unpacked_dir(cache, deb);
    if target.is_dir() {
        return Ok(());
    }
    let parent = cache.join("unpacked");
    std::fs::create_dir_all(&parent).map_err(|e| ImageError::io(&parent, e))?;
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    progress(&format!("unpacking {name}"));
    let temp = parent.join(format!(".tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&temp);
    let mut command = Command::new("dpkg-deb");
    command.arg("-x").arg(deb).arg(&temp);
    let output = run(&mut command)?;
    let result = if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        if text.contains("No space left") {
            Err(ImageError::DiskFull {
                path: target.clone(),
            })
        } else {
            Err(ImageError::CommandFailed {
                command: describe(&command),
                detail: text
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("no message")
                    .to_string(),
            })
        }
    } else {
        std::fs::rename(&temp, &target).map_err(|e| ImageError::io(&target, e))
    };
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

/// `linux-image-6.1.0-48-cloud-amd64_6.1.172-1_amd64.deb` →
/// (`linux-image-6.1.0-48-cloud-amd64`, `6.1.172-1`); apt writes an epoch's
/// colon as `%3a`.
fn deb_name_version(deb: &Path) -> (String, String) {
    let stem = deb.file_stem().unwrap_or_default().to_string_lossy();
    let mut parts = stem.splitn(3, '_');
    let name = parts.next().unwrap_or_default().to_string();
    let version = parts.next().unwrap_or_default().replace("%3a", ":");
    (name, version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_package_and_version_from_a_deb_name() {
        let (name, version) = deb_name_version(Path::new(
            "x/linux-image-6.1.0-48-cloud-amd64_6.1.172-1_amd64.deb",
        ));
        assert_eq!(name, "linux-image-6.1.0-48-cloud-amd64");
        assert_eq!(version, "6.1.172-1");
        let (name, version) = deb_name_version(Path::new(
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb",
        ));
        assert_eq!(
            (name.as_str(), version.as_str()),
            ("busybox-static", "1:1.35.0-4+deb12u1+b1")
        );
    }

    #[test]
    fn the_newest_cached_kernel_compares_versions_as_numbers() {
        let dir = std::env::temp_dir().join(format!("vmplay-image-newest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "linux-image-6.1.0-9-cloud-amd64_6.1.27-1_amd64.deb",
            "linux-image-6.1.0-48-cloud-amd64_6.1.172-1_amd64.deb",
            "busybox-static_1%3a1.35.0-4_amd64.deb",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let newest = newest_cached(&dir, "linux-image-", "-cloud-amd64").unwrap();
        assert_eq!(newest.as_deref(), Some("linux-image-6.1.0-48-cloud-amd64"));
        assert!(cached_deb(&dir, "busybox-static").unwrap().is_some());
        assert!(cached_deb(&dir, "busybox").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_an_unknown_package_and_a_missing_network() {
        let e = classify(
            "nosuch",
            "apt-get download nosuch",
            b"E: Unable to locate package nosuch\n",
            Path::new("/x"),
        );
        assert!(matches!(e, ImageError::MissingPackage { .. }), "{e}");
        assert!(e.to_string().contains("nosuch"));
        let e = classify(
            "busybox-static",
            "apt-get download busybox-static",
            b"Err:1 http://mirror busybox-static\n  Temporary failure resolving 'mirror'\nE: Failed to fetch http://mirror/x.deb  Temporary failure resolving 'mirror'\n",
            Path::new("/x"),
        );
        assert!(matches!(e, ImageError::NoNetwork { .. }), "{e}");
        assert!(e.to_string().contains("no network"), "{e}");
        let e = classify(
            "p",
            "c",
            b"E: Write error - write (28: No space left on device)\n",
            Path::new("/x"),
        );
        assert!(matches!(e, ImageError::DiskFull { .. }), "{e}");
    }
}
