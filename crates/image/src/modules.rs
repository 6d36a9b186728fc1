//! Kernel modules from an unpacked kernel package: find a module by name,
//! read its `.modinfo` (`depends=`, `softdep=pre:`), and order a set of
//! modules so that each comes after everything it needs, which is the
//! order `modules.dep` implies and `insmod` must follow.
//!
//! Debian's kernel package ships no `modules.dep` (its postinst runs
//! `depmod`), so the dependencies are read from the modules themselves,
//! as `depmod` does.

use crate::ImageError;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules of one kernel release: `lib/modules/<release>/` of an
/// unpacked kernel package.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    dir: PathBuf,
    /// Module name (`-` folded to `_`) to its path relative to `dir`.
    files: BTreeMap<String, PathBuf>,
    /// Names in `modules.builtin`: part of the kernel image, nothing to load.
    builtin: BTreeSet<String>,
}

/// One module to load, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The name the kernel knows it by (`virtio_blk`).
    pub name: String,
    /// Its path under `lib/modules/<release>/`, without a compression
    /// suffix (`kernel/drivers/block/virtio_blk.ko`).
    pub path: PathBuf,
    /// The module names from its `depends=` (for `modules.dep`).
    pub depends: Vec<String>,
    /// The uncompressed ELF object.
    pub object: Vec<u8>,
}

/// `-` and `_` are the same in module names; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name: `virtio-rng.ko.xz` is `virtio_rng`.
fn module_name(file_name: &str) -> Option<String> {
    let stem = file_name
        .strip_suffix(".ko")
        .or_else(|| file_name.strip_suffix(".ko.xz"))
        .or_else(|| file_name.strip_suffix(".ko.zst"))
        .or_else(|| file_name.strip_suffix(".ko.gz"))?;
    Some(normalize(stem))
}

impl ModuleTree {
    /// Indexes `dir` (`.../lib/modules/<release>`): every `*.ko[.xz|.zst|.gz]`
    /// under it and the names in its `modules.builtin`.
    pub fn open(dir: &Path) -> Result<ModuleTree, ImageError> {
        let builtin_path = dir.join("modules.builtin");
        let builtin = std::fs::read_to_string(&builtin_path)
            .map_err(|source| ImageError::io(&builtin_path, source))?
            .lines()
            .filter_map(|line| module_name(line.rsplit('/').next()?))
            .collect();
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.join("kernel")];
        while let Some(d) = pending.pop() {
            let entries = std::fs::read_dir(&d).map_err(|source| ImageError::io(&d, source))?;
            for entry in entries {
                let entry = entry.map_err(|source| ImageError::io(&d, source))?;
                let path = entry.path();
                let kind = entry
                    .file_type()
                    .map_err(|source| ImageError::io(&path, source))?;
                if kind.is_dir() {
                    pending.push(path);
                } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                    let relative = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                    files.insert(name, relative);
                }
            }
        }
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            files,
            builtin,
        })
    }

    /// Whether `name` is built into the kernel image.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Whether `name` is a loadable module of this kernel.
    pub fn has_module(&self, name: &str) -> bool {
        self.files.contains_key(&normalize(name))
    }

    /// The modules needed for `wanted` (built-in ones need nothing), with
    /// everything they depend on (`depends=` and `softdep=pre:`), ordered
    /// so that each module comes after its dependencies. A name that is
    /// neither built in nor a module is an error.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>, ImageError> {
        let mut order = Vec::new();
        let mut state = BTreeMap::new();
        for name in wanted {
            self.visit(&normalize(name), &mut state, &mut order, true)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        state: &mut BTreeMap<String, Visit>,
        order: &mut Vec<Module>,
        required: bool,
    ) -> Result<(), ImageError> {
        match state.get(name) {
            Some(Visit::Done) => return Ok(()),
            Some(Visit::InProgress) => return Err(ImageError::ModuleCycle(name.to_string())),
            None => {}
        }
        if self.builtin.contains(name) {
            state.insert(name.to_string(), Visit::Done);
            return Ok(());
        }
        let Some(relative) = self.files.get(name) else {
            if required {
                return Err(ImageError::MissingModule {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                });
            }
            // A soft dependency that this kernel does not have.
            return Ok(());
        };
        state.insert(name.to_string(), Visit::InProgress);
        let path = self.dir.join(relative);
        let object = decompress(&path)?;
        let info = modinfo(&object).map_err(|why| ImageError::BadModule {
            path: path.clone(),
            why,
        })?;
        let depends: Vec<String> = info
            .iter()
            .filter(|(key, _)| key == "depends")
            .flat_map(|(_, value)| value.split(',').map(str::to_string).collect::<Vec<_>>())
            .filter(|d| !d.is_empty())
            .map(|d| normalize(&d))
            .collect();
        for dep in &depends {
            self.visit(dep, state, order, true)?;
        }
        for soft in soft_pre_dependencies(&info) {
            self.visit(&soft, state, order, false)?;
        }
        state.insert(name.to_string(), Visit::Done);
        order.push(Module {
            name: name.to_string(),
            path: strip_compression(relative),
            depends,
            object,
        });
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Visit {
    InProgress,
    Done,
}

/// `kernel/x/y.ko.xz` → `kernel/x/y.ko`: the initramfs holds them uncompressed.
fn strip_compression(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    for suffix in [".xz", ".zst", ".gz"] {
        if let Some(stem) = text.strip_suffix(suffix) {
            return PathBuf::from(stem);
        }
    }
    path.to_path_buf()
}

/// The module object at `path`, uncompressed. busybox's `insmod` takes
/// plain ELF only (its in-kernel decompression needs a kernel built with
/// `CONFIG_MODULE_DECOMPRESS` and `finit_module` flags it does not pass),
/// so `.ko.xz`/`.ko.zst`/`.ko.gz` go through the host's `xz`/`zstd`/`gzip`.
fn decompress(path: &Path) -> Result<Vec<u8>, ImageError> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return std::fs::read(path).map_err(|source| ImageError::io(path, source)),
    };
    let output = std::process::Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|source| ImageError::Spawn {
            program: tool.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("{tool} -dc {}", path.display()),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

/// `softdep=pre: a b post: c` → `[a, b]`.
fn soft_pre_dependencies(info: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (_, value) in info.iter().filter(|(key, _)| key == "softdep") {
        let mut pre = false;
        for word in value.split_whitespace() {
            match word {
                "pre:" => pre = true,
                "post:" => pre = false,
                name if pre => out.push(normalize(name)),
                _ => {}
            }
        }
    }
    out
}

/// The `key=value` strings of an ELF64 module's `.modinfo` section.
pub fn modinfo(object: &[u8]) -> Result<Vec<(String, String)>, String> {
    let section = elf_section(object, ".modinfo")?.ok_or("no .modinfo section")?;
    Ok(section
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let text = std::str::from_utf8(entry).ok()?;
            let (key, value) = text.split_once('=')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect())
}

fn le16(b: &[u8], at: usize) -> Result<usize, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

fn le32(b: &[u8], at: usize) -> Result<usize, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| format!("truncated at {at:#x}"))
}

fn le64(b: &[u8], at: usize) -> Result<usize, String> {
    let s = b
        .get(at..at + 8)
        .ok_or_else(|| format!("truncated at {at:#x}"))?;
    usize::try_from(u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .map_err(|_| format!("offset at {at:#x} out of range"))
}

/// The bytes of the section called `name` in a little-endian ELF64 file.
fn elf_section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    if b.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    let shoff = le64(b, 0x28)?;
    let shentsize = le16(b, 0x3a)?;
    let shnum = le16(b, 0x3c)?;
    let shstrndx = le16(b, 0x3e)?;
    if shentsize < 0x40 {
        return Err(format!("section header size {shentsize} is too small"));
    }
    let header = |i: usize| -> Result<(usize, usize, usize), String> {
        let at = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or("section table out of range")?;
        Ok((le32(b, at)?, le64(b, at + 0x18)?, le64(b, at + 0x20)?))
    };
    let bytes = |offset: usize, size: usize| -> Result<&'a [u8], String> {
        offset
            .checked_add(size)
            .and_then(|end| b.get(offset..end))
            .ok_or_else(|| format!("section at {offset:#x}+{size:#x} is outside the file"))
    };
    let (_, strtab_offset, strtab_size) = header(shstrndx)?;
    let strtab = bytes(strtab_offset, strtab_size)?;
    for i in 0..shnum {
        let (name_offset, offset, size) = header(i)?;
        let section_name = strtab
            .get(name_offset..)
            .and_then(|s| s.split(|&c| c == 0).next())
            .unwrap_or_default();
        if section_name == name.as_bytes() {
            return bytes(offset, size).map(Some);
        }
    }
    Ok(None)
}

/// `modules.dep` text for `modules` (already in load order), as `depmod`
/// writes it: `path: dep-path dep-path`, dependencies nearest first.
pub fn modules_dep(modules: &[Module]) -> String {
    let paths: BTreeMap<&str, &Path> = modules
        .iter()
        .map(|m| (m.name.as_str(), m.path.as_path()))
        .collect();
    let mut text = String::new();
    for m in modules {
        text.push_str(&m.path.to_string_lossy());
        text.push(':');
        for dep in &m.depends {
            if let Some(path) = paths.get(dep.as_str()) {
                text.push(' ');
                text.push_str(&path.to_string_lossy());
            }
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 relocatable object with a `.modinfo` section
    /// holding `info` (NUL-separated `key=value` strings).
    pub(crate) fn fake_module(info: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for entry in info {
            modinfo.extend_from_slice(entry.as_bytes());
            modinfo.push(0);
        }
        let strtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let data_offset = 0x40;
        let strtab_offset = data_offset + modinfo.len();
        let shoff = (strtab_offset + strtab.len()).next_multiple_of(8);
        let mut elf = vec![0u8; 0x40];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf.extend_from_slice(&modinfo);
        elf.extend_from_slice(&strtab);
        elf.resize(shoff, 0);
        let section = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 0x40];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        elf.extend(section(0, 0, 0));
        elf.extend(section(1, data_offset, modinfo.len()));
        elf.extend(section(10, strtab_offset, strtab.len()));
        elf
    }

    /// A `lib/modules/<release>` tree in a temporary directory.
    pub(crate) struct FakeTree(pub PathBuf);

    impl FakeTree {
        pub(crate) fn new(tag: &str, builtin: &[&str], modules: &[(&str, &[&str])]) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("vmplay-image-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("kernel/drivers")).unwrap();
            let builtin: String = builtin.iter().map(|b| format!("kernel/{b}.ko\n")).collect();
            std::fs::write(dir.join("modules.builtin"), builtin).unwrap();
            for (file, info) in modules {
                std::fs::write(dir.join("kernel/drivers").join(file), fake_module(info)).unwrap();
            }
            FakeTree(dir)
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(modules: &[Module]) -> Vec<&str> {
        modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn reads_modinfo_of_an_elf_module() {
        let object = fake_module(&["license=GPL", "depends=virtio,virtio_ring", "name=x"]);
        let info = modinfo(&object).unwrap();
        assert!(info.contains(&("depends".into(), "virtio,virtio_ring".into())));
        assert!(info.contains(&("name".into(), "x".into())));
    }

    #[test]
    fn rejects_a_file_that_is_not_elf_or_is_truncated() {
        assert!(modinfo(b"hello").is_err());
        let object = fake_module(&["depends="]);
        assert!(modinfo(&object[..0x48]).is_err());
    }

    #[test]
    fn orders_modules_after_their_dependencies_and_skips_builtins() {
        let tree = FakeTree::new(
            "order",
            &["virtio"],
            &[
                (
                    "virtio_net.ko",
                    &["depends=virtio_ring,virtio,net_failover"],
                ),
                ("net_failover.ko", &["depends=failover"]),
                ("failover.ko", &["depends="]),
                ("virtio_ring.ko", &["depends="]),
                ("virtio_blk.ko", &["depends=virtio,virtio_ring"]),
                ("virtio-rng.ko", &["depends=virtio_ring"]),
            ],
        );
        let tree = ModuleTree::open(&tree.0).unwrap();
        let order = tree
            .resolve(&["virtio_blk", "virtio_net", "virtio-rng", "virtio"])
            .unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng"
            ]
        );
        assert_eq!(order[5].path, PathBuf::from("kernel/drivers/virtio-rng.ko"));
        let dep = modules_dep(&order);
        assert!(
            dep.contains(
                "kernel/drivers/virtio_net.ko: kernel/drivers/virtio_ring.ko kernel/drivers/net_failover.ko\n"
            ),
            "{dep}"
        );
    }

    #[test]
    fn loads_soft_pre_dependencies_first_when_the_kernel_has_them() {
        let tree = FakeTree::new(
            "softdep",
            &[],
            &[
                (
                    "ext4.ko",
                    &["depends=jbd2", "softdep=pre: crc32c nosuch post: x"],
                ),
                ("jbd2.ko", &["depends="]),
                ("crc32c.ko", &["depends="]),
            ],
        );
        let tree = ModuleTree::open(&tree.0).unwrap();
        let order = tree.resolve(&["ext4"]).unwrap();
        assert_eq!(names(&order), ["jbd2", "crc32c", "ext4"]);
    }

    #[test]
    fn a_missing_module_or_a_cycle_is_an_error() {
        let tree = FakeTree::new(
            "cycle",
            &[],
            &[("a.ko", &["depends=b"]), ("b.ko", &["depends=a"])],
        );
        let tree = ModuleTree::open(&tree.0).unwrap();
        assert!(matches!(
            tree.resolve(&["a"]),
            Err(ImageError::ModuleCycle(_))
        ));
        let err = tree.resolve(&["nosuch"]).unwrap_err();
        assert!(err.to_string().contains("nosuch"), "{err}");
    }
}
