//! An initramfs: an uncompressed newc (SVR4 "new ASCII") cpio archive,
//! the format the kernel unpacks into its root tmpfs. Uncompressed, so the
//! guest spends no boot time inflating it.

use crate::{DebianAssets, ImageError, ModuleTree};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The script `/init` runs (then powers the VM off) when there is no
/// `root=`: a test puts its guest-side steps here.
pub const RUN_HOOK: &str = "/etc/vmplay/run";
/// Module paths (relative to `/lib/modules/$(uname -r)`), one a line, in
/// the order `/init` loads them.
pub const MODULE_LIST: &str = "/etc/vmplay/modules";
/// Where the init script lives in the image.
pub const DEBIAN_INIT: &str = "/init";
/// vmplay's `/init` for Debian's kernel and busybox (busybox `sh`).
pub const INIT_SCRIPT: &str = include_str!("init.sh");
const UDHCPC_SCRIPT: &str = include_str!("udhcpc.sh");

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// One file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// An initramfs being put together. Paths are absolute (`/etc/x`); parent
/// directories are made as needed; adding a path again replaces it. The
/// archive is deterministic: entries in path order, mtime 0, owner root.
///
/// ```no_run
/// # fn main() -> Result<(), vmplay_image::ImageError> {
/// let assets = vmplay_image::DebianAssets::open("guest-assets/debian".as_ref())?;
/// vmplay_image::Initramfs::debian(&assets)?
///     .file(vmplay_image::RUN_HOOK, "#!/bin/sh\nmount /dev/vda /mnt && ls /mnt\n", 0o755)
///     .write("initramfs.cpio".as_ref())?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
    /// The first bad path given to a builder method, reported by `write`.
    error: Option<(String, &'static str)>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Initramfs {
        Initramfs::default()
    }

    /// Debian's busybox, the kernel's virtio/vsock/ext4 modules (those not
    /// built in, with their dependencies) and vmplay's `/init`
    /// ([`INIT_SCRIPT`]): it mounts proc/sys/dev, loads the modules,
    /// configures a network interface from `ip=`, switches to `root=` when
    /// given, else runs [`RUN_HOOK`] if present and powers off, else starts
    /// a shell on the console and powers off when it exits.
    pub fn debian(assets: &DebianAssets) -> Result<Initramfs, ImageError> {
        let busybox = std::fs::read(assets.busybox())
            .map_err(|source| ImageError::io(assets.busybox(), source))?;
        let tree = ModuleTree::open(assets.modules_dir())?;
        let modules = tree.resolve(crate::GUEST_MODULES)?;
        let release = assets.kernel_release();
        let base = format!("/lib/modules/{release}");
        let builtin_path = assets.modules_dir().join("modules.builtin");
        let builtin =
            std::fs::read(&builtin_path).map_err(|source| ImageError::io(&builtin_path, source))?;
        let mut list = String::new();
        let mut image = Initramfs::new()
            .file("/bin/busybox", busybox, 0o755)
            .file(DEBIAN_INIT, INIT_SCRIPT, 0o755)
            .file("/usr/share/udhcpc/default.script", UDHCPC_SCRIPT, 0o755)
            .file("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)
            .file("/etc/group", "root:x:0:\n", 0o644)
            .file("/etc/hostname", "vmplay\n", 0o644)
            .file(
                "/etc/profile",
                "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\u@\\h:\\w\\$ '\n",
                0o644,
            )
            .char_device("/dev/console", 0o600, 5, 1)
            .char_device("/dev/null", 0o666, 1, 3);
        for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/mnt", "/root"] {
            image = image.dir(dir, 0o755);
        }
        image = image.dir("/tmp", 0o1777);
        for module in &modules {
            let path = module.path.to_string_lossy();
            list.push_str(&path);
            list.push('\n');
            image = image.file(&format!("{base}/{path}"), module.object.clone(), 0o644);
        }
        Ok(image
            .file(MODULE_LIST, list, 0o644)
            .file(
                &format!("{base}/modules.dep"),
                crate::modules::modules_dep(&modules),
                0o644,
            )
            .file(&format!("{base}/modules.builtin"), builtin, 0o644))
    }

    /// Adds a regular file with permission bits `mode` (`0o755`).
    pub fn file(self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Initramfs {
        self.insert(
            path,
            Entry::File {
                data: data.into(),
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a copy of the host file `source`, keeping its permission bits.
    pub fn host_file(self, path: &str, source: &Path) -> Result<Initramfs, ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(source).map_err(|e| ImageError::io(source, e))?;
        let mode = std::fs::metadata(source)
            .map_err(|e| ImageError::io(source, e))?
            .permissions()
            .mode();
        Ok(self.file(path, data, mode))
    }

    /// Adds a directory.
    pub fn dir(self, path: &str, mode: u32) -> Initramfs {
        self.insert(
            path,
            Entry::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(self, path: &str, target: &str) -> Initramfs {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Adds a character device node.
    pub fn char_device(self, path: &str, mode: u32, major: u32, minor: u32) -> Initramfs {
        self.insert(
            path,
            Entry::CharDevice {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_start_matches('/'))
    }

    fn insert(mut self, path: &str, entry: Entry) -> Initramfs {
        match normalize(path) {
            Ok(name) => {
                self.entries.insert(name, entry);
            }
            Err(why) => {
                self.error.get_or_insert((path.to_string(), why));
            }
        }
        self
    }

    /// The whole archive: every entry (parents made as directories 0755)
    /// in path order, then the trailer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        let mut out = Vec::new();
        self.write_to(&mut out).map_err(|e| match e {
            WriteError::Image(e) => e,
            WriteError::Io(source) => ImageError::Io {
                path: "<memory>".into(),
                source,
            },
        })?;
        Ok(out)
    }

    /// Writes the archive to `path` through a temporary file in the same
    /// directory, renamed into place at the end: a failure (a full disk)
    /// leaves no partial archive behind.
    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        if let Some((path, why)) = &self.error {
            return Err(ImageError::BadPath {
                path: path.clone(),
                why,
            });
        }
        let mut inner = None;
        write_atomically(path, |file| {
            self.write_to(file).map_err(|e| match e {
                WriteError::Io(e) => e,
                WriteError::Image(e) => {
                    inner = Some(e);
                    std::io::Error::other("bad entry")
                }
            })
        })
        .map_err(|e| inner.take().unwrap_or(e))
    }

    fn write_to(&self, out: &mut dyn Write) -> Result<(), WriteError> {
        if let Some((path, why)) = &self.error {
            return Err(WriteError::Image(ImageError::BadPath {
                path: path.clone(),
                why,
            }));
        }
        let mut out = std::io::BufWriter::new(out);
        let mut ino = 0u32;
        let mut written = std::collections::BTreeSet::new();
        for (name, entry) in &self.entries {
            // Parents first, made as plain directories unless listed.
            let mut parent = String::new();
            for part in name
                .split('/')
                .collect::<Vec<_>>()
                .split_last()
                .map_or(&[][..], |p| p.1)
            {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(part);
                if !written.contains(&parent) && !self.entries.contains_key(&parent) {
                    ino += 1;
                    header(&parent, ino, S_IFDIR | 0o755, 0, 0, &[]).write_to(&mut out)?;
                    written.insert(parent.clone());
                }
            }
            ino += 1;
            let (mode, major, minor, data): (u32, u32, u32, &[u8]) = match entry {
                Entry::Dir { mode } => (S_IFDIR | mode, 0, 0, &[]),
                Entry::File { data, mode } => (S_IFREG | mode, 0, 0, data),
                Entry::Symlink { target } => (S_IFLNK | 0o777, 0, 0, target.as_bytes()),
                Entry::CharDevice { mode, major, minor } => (S_IFCHR | mode, *major, *minor, &[]),
            };
            if u32::try_from(data.len()).is_err() {
                return Err(WriteError::Image(ImageError::TooLarge {
                    path: format!("/{name}"),
                    size: data.len(),
                }));
            }
            header(name, ino, mode, major, minor, data).write_to(&mut out)?;
            written.insert(name.clone());
        }
        cpio::newc::trailer(&mut out)?;
        out.flush()?;
        Ok(())
    }
}

enum WriteError {
    Io(std::io::Error),
    Image(ImageError),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Io(e)
    }
}

struct Header<'a> {
    builder: cpio::newc::Builder,
    data: &'a [u8],
}

impl Header<'_> {
    fn write_to(self, out: &mut dyn Write) -> std::io::Result<()> {
        // The length was checked by the caller.
        let mut writer = self.builder.write(out, self.data.len() as u32);
        writer.write_all(self.data)?;
        writer.finish()?;
        Ok(())
    }
}

fn header<'a>(
    name: &str,
    ino: u32,
    mode: u32,
    major: u32,
    minor: u32,
    data: &'a [u8],
) -> Header<'a> {
    let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
    Header {
        builder: cpio::newc::Builder::new(name)
            .ino(ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(major)
            .rdev_minor(minor),
        data,
    }
}

/// `/a/b` → `a/b`; rejects empty, `.` and `..` components and NULs.
fn normalize(path: &str) -> Result<String, &'static str> {
    let Some(relative) = path.strip_prefix('/') else {
        return Err("must be absolute");
    };
    if path.contains('\0') {
        return Err("contains a NUL");
    }
    let parts: Vec<&str> = relative.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("names the root itself");
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err("has a . or .. component");
    }
    Ok(parts.join("/"))
}

/// Writes `path` through `<path>.tmp-<pid>` in the same directory, renamed
/// over `path` only when `fill` and the sync succeeded; the temporary file
/// is removed on any failure.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), ImageError> {
    let file_name = path.file_name().ok_or_else(|| ImageError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let mut temp_name = file_name.to_os_string();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        fill(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        ImageError::io(path, source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Reads an archive back with the cpio crate's reader.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let mut out = Vec::new();
        loop {
            let mut reader = cpio::newc::Reader::new(cursor).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry().clone();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            out.push((
                e.name().to_string(),
                e.ino(),
                e.mode(),
                e.rdev_major() << 8 | e.rdev_minor(),
                data,
            ));
            cursor = reader.finish().unwrap();
        }
        out
    }

    #[test]
    fn writes_newc_entries_with_parents_first_and_a_trailer() {
        let bytes = Initramfs::new()
            .file("/etc/vmplay/run", "#!/bin/sh\n", 0o755)
            .symlink("/bin/sh", "busybox")
            .char_device("/dev/console", 0o600, 5, 1)
            .to_bytes()
            .unwrap();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(11).any(|w| w == b"TRAILER!!!\0"));
        let got = entries(&bytes);
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/vmplay",
                "etc/vmplay/run"
            ]
        );
        let run = &got[6];
        assert_eq!(run.2, 0o100755);
        assert_eq!(run.4, b"#!/bin/sh\n");
        assert_eq!(got[1].2, 0o120777);
        assert_eq!(got[1].4, b"busybox");
        assert_eq!((got[3].2, got[3].3), (0o020600, 5 << 8 | 1));
        assert_eq!(got[0].2, 0o040755);
        let inodes: std::collections::BTreeSet<u32> = got.iter().map(|e| e.1).collect();
        assert_eq!(inodes.len(), got.len(), "inode numbers are unique");
    }

    #[test]
    fn pads_names_and_data_to_four_bytes() {
        // Header 110 + "a\0" = 112 (aligned), then 3 data bytes + 1 pad.
        let bytes = Initramfs::new()
            .file("/a", "xyz", 0o644)
            .to_bytes()
            .unwrap();
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..115], b"xyz");
        assert_eq!(bytes[115], 0);
        assert_eq!(&bytes[116..122], b"070701");
    }

    #[test]
    fn adding_a_path_again_replaces_it_and_an_explicit_dir_keeps_its_mode() {
        let bytes = Initramfs::new()
            .file("/x", "old", 0o644)
            .file("//x", "new", 0o600)
            .dir("/tmp", 0o1777)
            .file("/tmp/f", "", 0o644)
            .to_bytes()
            .unwrap();
        let got = entries(&bytes);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, "tmp");
        assert_eq!(got[0].2, 0o041777);
        assert_eq!(got[2].4, b"new");
        assert_eq!(got[2].2, 0o100600);
    }

    #[test]
    fn rejects_relative_and_dotdot_paths() {
        for bad in ["etc/x", "/../x", "/a/./b", "/"] {
            let err = Initramfs::new()
                .file(bad, "", 0o644)
                .to_bytes()
                .unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn a_failed_write_leaves_no_file_behind() {
        let dir = std::env::temp_dir().join(format!("vmplay-image-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.cpio");
        let err = write_atomically(&target, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        })
        .unwrap_err();
        assert!(matches!(err, ImageError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("out.cpio"), "{err}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no temp file left"
        );
        Initramfs::new()
            .file("/a", "b", 0o644)
            .write(&target)
            .unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let err = Initramfs::new()
            .file("rel", "", 0o644)
            .write(&dir.join("bad.cpio"))
            .unwrap_err();
        assert!(matches!(err, ImageError::BadPath { .. }));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
