use std::path::{Path, PathBuf};

/// Why an image could not be fetched or built. Each names the package,
/// file or module at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the disk is full; nothing half-written was left behind", path.display())]
    DiskFull { path: PathBuf },
    #[error("cannot run {program} (is it installed?): {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {detail}")]
    CommandFailed { command: String, detail: String },
    #[error("apt knows no package {package} ({detail})")]
    MissingPackage { package: String, detail: String },
    #[error("cannot download {package}: no network or no reachable package mirror ({detail})")]
    NoNetwork { package: String, detail: String },
    #[error("{}: {what} not found in the unpacked package", dir.display())]
    NotInPackage { dir: PathBuf, what: String },
    #[error("module {name} is neither built into the kernel nor in {}", dir.display())]
    MissingModule { name: String, dir: PathBuf },
    #[error("module dependency cycle through {0}")]
    ModuleCycle(String),
    #[error("{}: not a kernel module: {why}", path.display())]
    BadModule { path: PathBuf, why: String },
    #[error("initramfs path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("initramfs entry {path:?} is {size} bytes; newc holds at most 4 GiB - 1")]
    TooLarge { path: String, size: usize },
}

impl ImageError {
    /// An I/O error on `path`; "no space left" becomes [`ImageError::DiskFull`].
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ImageError {
        if source.kind() == std::io::ErrorKind::StorageFull {
            ImageError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            ImageError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
