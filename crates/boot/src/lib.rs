//! Where things go in guest memory and how a kernel gets there: the memory
//! map, the kernel loaders (bzImage, ELF/PVH, multiboot) and ACPI tables.
//! This crate writes guest memory and produces the BSP's entry registers;
//! it never runs anything.
//!
//! [`load`] is the one entry point the machine calls. It recognises the
//! kernel format, picks the entry protocol ([`KernelEntry`]), writes the
//! kernel, initrd, command line, boot information and ACPI tables, and
//! returns the CPU state to start the BSP with.

pub mod acpi;
pub mod bzimage;
pub mod cpu_setup;
pub mod e820;
pub mod elf;
pub mod error;
pub mod input;
pub mod layout;
pub mod multiboot;
pub mod unpack;

use std::fmt;
use std::ops::Range;
use std::path::Path;

use vmplay_hypervisor::{CpuState, GuestMemory};

use crate::bzimage::BzImage;
use crate::cpu_setup::EntryMode;
use crate::e820::RamMap;
use crate::elf::ElfImage;
use crate::error::kernel_error;
pub use crate::error::{BootError, KernelProblem, Placement};
use crate::unpack::Compression;

/// How to enter the kernel (`--kernel-entry auto|bzimage|pvh`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelEntry {
    /// PVH when the kernel (or the vmlinux inside a bzImage) has a PVH
    /// note, multiboot for multiboot kernels, else the 64-bit protocol.
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (bzImage or ELF vmlinux).
    BzImage,
    /// PVH; an error if the kernel has no PVH note.
    Pvh,
}

impl KernelEntry {
    pub fn name(self) -> &'static str {
        match self {
            KernelEntry::Auto => "auto",
            KernelEntry::BzImage => "bzimage",
            KernelEntry::Pvh => "pvh",
        }
    }
}

impl fmt::Display for KernelEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KernelEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(KernelEntry::Auto),
            "bzimage" => Ok(KernelEntry::BzImage),
            "pvh" => Ok(KernelEntry::Pvh),
            other => Err(format!(
                "unknown kernel entry {other:?} (expected auto, bzimage or pvh)"
            )),
        }
    }
}

/// A virtio-mmio transport the DSDT declares as an `LNRO0005` device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub addr: u64,
    pub len: u64,
    pub gsi: u32,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub entry: KernelEntry,
    pub vcpus: u32,
    /// Declared in the DSDT in this order (the first is `/dev/vda`'s
    /// transport if it is a block device).
    pub virtio_mmio: &'a [VirtioMmioSlot],
}

/// The entry protocol a kernel was loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    LinuxBzImage,
    LinuxElf64,
    Pvh,
    Multiboot,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::LinuxBzImage => "Linux 64-bit boot protocol (bzImage)",
            Protocol::LinuxElf64 => "Linux 64-bit boot protocol (ELF vmlinux)",
            Protocol::Pvh => "PVH",
            Protocol::Multiboot => "multiboot",
        })
    }
}

/// The result of [`load`]: how to start the BSP, and what went where.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The BSP's registers at the kernel entry, hidden segment state
    /// included; the FPU is in its reset state.
    pub bsp_state: CpuState,
    pub protocol: Protocol,
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
    /// Guest-physical memory the kernel occupies (for a bzImage: its
    /// load address plus `init_size`).
    pub kernel: Range<u64>,
    pub initrd: Option<Range<u64>>,
    /// Set when vmplay unpacked a bzImage's payload on the host and
    /// booted the vmlinux inside.
    pub unpacked: Option<Compression>,
}

/// How a kernel file will be booted, once recognised.
enum Plan<'a> {
    BzImage(BzImage<'a>),
    Elf64(ElfImage<'a>),
    Pvh(ElfImage<'a>, Option<Compression>),
    Multiboot(multiboot::Header, Option<ElfImage<'a>>),
}

/// Loads the kernel, initrd, command line, boot information and ACPI
/// tables into `memory` and returns the BSP's entry state.
pub fn load(memory: &GuestMemory, config: &BootConfig) -> Result<Boot, BootError> {
    let map = RamMap::of(memory)?;
    let path = config.kernel;
    let data = input::read(path, map.total).map_err(|e| match e {
        input::CheckError::Io(source) => BootError::KernelRead {
            path: path.to_path_buf(),
            source,
        },
        input::CheckError::Problem(problem) => BootError::InputFile {
            what: "kernel",
            path: path.to_path_buf(),
            problem,
        },
    })?;
    if data.is_empty() {
        return Err(kernel_error(path, KernelProblem::Empty));
    }
    let initrd = match config.initrd {
        Some(p) => Some((p, read_initrd(p, map.total)?)),
        None => None,
    };
    if let Some(offset) = config.cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineNul { offset });
    }

    let tables = acpi::build(config.vcpus, config.virtio_mmio)?;
    tables.write(memory)?;
    let rsdp = tables.rsdp;

    let mut unpacked = None;
    let plan = choose(path, &data, config.entry, &map, &mut unpacked)?;
    let initrd = initrd.as_ref().map(|(p, bytes)| (*p, bytes.as_slice()));

    match plan {
        Plan::BzImage(bz) => {
            let limit = bz.cmdline_max().min(layout::CMDLINE_MAX - 1);
            let limit_from = if limit < layout::CMDLINE_MAX - 1 {
                "the kernel (setup header cmdline_size)"
            } else {
                "vmplay"
            };
            write_cmdline(memory, config.cmdline, limit, limit_from)?;
            let footprint = bz.footprint();
            check_placement(&map, path, &footprint)?;
            e820::write(memory, "kernel", footprint.start, bz.kernel)?;
            let initrd = place_initrd(memory, &map, initrd, bz.initrd_limit(), &footprint)?;
            let mut header = bz.header;
            header.code32_start = footprint.start as u32;
            let params = bzimage::zero_page(header, &map, initrd.clone(), rsdp);
            bzimage::write_zero_page(memory, &params)?;
            let entry = footprint.start + bzimage::ENTRY_64_OFFSET;
            let mut state = cpu_setup::setup(memory, EntryMode::Long, entry)?;
            state.gpr[CpuState::RSI] = layout::ZERO_PAGE;
            Ok(Boot {
                bsp_state: state,
                protocol: Protocol::LinuxBzImage,
                rsdp,
                kernel: footprint,
                initrd,
                unpacked: None,
            })
        }
        Plan::Elf64(elf) => {
            let header = bzimage::synthetic_header();
            write_cmdline(
                memory,
                config.cmdline,
                bzimage::cmdline_limit(&header),
                "vmplay",
            )?;
            let kernel = elf.load(memory, &map, path)?;
            let limit = u64::from(header.initrd_addr_max) + 1;
            let initrd = place_initrd(memory, &map, initrd, limit, &kernel)?;
            let params = bzimage::zero_page(header, &map, initrd.clone(), rsdp);
            bzimage::write_zero_page(memory, &params)?;
            let mut state = cpu_setup::setup(memory, EntryMode::Long, elf.entry_paddr())?;
            state.gpr[CpuState::RSI] = layout::ZERO_PAGE;
            Ok(Boot {
                bsp_state: state,
                protocol: Protocol::LinuxElf64,
                rsdp,
                kernel,
                initrd,
                unpacked: None,
            })
        }
        Plan::Pvh(elf, compression) => {
            write_cmdline(memory, config.cmdline, layout::CMDLINE_MAX - 1, "vmplay")?;
            let kernel = elf.load(memory, &map, path)?;
            let initrd = place_initrd(memory, &map, initrd, u64::MAX, &kernel)?;
            elf::write_pvh_start_info(memory, &map, initrd.clone(), rsdp)?;
            let entry = elf.pvh_entry.expect("PVH plan without PVH note");
            let mut state = cpu_setup::setup(memory, EntryMode::Protected32, entry)?;
            state.gpr[CpuState::RBX] = layout::PVH_INFO;
            Ok(Boot {
                bsp_state: state,
                protocol: Protocol::Pvh,
                rsdp,
                kernel,
                initrd,
                unpacked: compression,
            })
        }
        Plan::Multiboot(header, elf) => {
            let cmdline = multiboot::cmdline(path, config.cmdline);
            write_cmdline(memory, &cmdline, layout::CMDLINE_MAX - 1, "vmplay")?;
            let (kernel, entry) = match (header.kludge, elf) {
                (Some(k), _) => {
                    let plan = k
                        .plan(header.offset, data.len())
                        .map_err(|p| kernel_error(path, p))?;
                    let range = plan.load_addr..plan.bss_end;
                    check_placement(&map, path, &range)?;
                    let bytes = &data[plan.file_range.clone()];
                    e820::write(memory, "kernel", plan.load_addr, bytes)?;
                    let loaded_end = plan.load_addr + bytes.len() as u64;
                    e820::zero(memory, "kernel BSS", loaded_end, plan.bss_end - loaded_end)?;
                    (range, plan.entry)
                }
                (None, Some(elf)) => (elf.load(memory, &map, path)?, elf.entry_paddr()),
                (None, None) => unreachable!("choose() requires ELF or the a.out kludge"),
            };
            let module = match initrd {
                Some((p, bytes)) => {
                    let start = multiboot::module_address(kernel.end);
                    let end = start + bytes.len() as u64;
                    if map.check_kernel_range(start, end).is_err() {
                        return Err(initrd_too_big(p, bytes, &map));
                    }
                    e820::write(memory, "initrd", start, bytes)?;
                    Some((start..end, p.display().to_string()))
                }
                None => None,
            };
            let info = multiboot::Info::build(
                &map,
                layout::CMDLINE,
                module.as_ref().map(|(r, s)| (r.clone(), s.as_str())),
            )?;
            info.write(memory)?;
            let mut state = cpu_setup::setup(memory, EntryMode::Protected32, entry)?;
            state.gpr[CpuState::RAX] = u64::from(multiboot::BOOTLOADER_MAGIC);
            state.gpr[CpuState::RBX] = layout::MULTIBOOT_INFO;
            Ok(Boot {
                bsp_state: state,
                protocol: Protocol::Multiboot,
                rsdp,
                kernel,
                initrd: module.map(|(r, _)| r),
                unpacked: None,
            })
        }
    }
}

/// Recognises the kernel format and picks the protocol for `entry`.
fn choose<'a>(
    path: &Path,
    data: &'a [u8],
    entry: KernelEntry,
    map: &RamMap,
    unpacked: &'a mut Option<Vec<u8>>,
) -> Result<Plan<'a>, BootError> {
    let problem = |p: KernelProblem| kernel_error(path, p);
    if bzimage::is_bzimage(data) {
        let bz = BzImage::parse(data).map_err(problem)?;
        if entry == KernelEntry::BzImage {
            return Ok(Plan::BzImage(bz));
        }
        let payload = bz.payload().unwrap_or_default();
        let compression = Compression::detect(payload);
        if !compression.supported() {
            if entry == KernelEntry::Pvh {
                let why = unpack::UnpackError::Unsupported(compression);
                return Err(problem(KernelProblem::Payload(why.to_string())));
            }
            tracing::info!(
                "{}: payload compressed with {}, booting the bzImage itself",
                path.display(),
                compression.name()
            );
            return Ok(Plan::BzImage(bz));
        }
        let vmlinux = unpack::unpack(payload, map.total)
            .map_err(|e| problem(KernelProblem::Payload(e.to_string())))?;
        let vmlinux = unpacked.insert(vmlinux);
        let inner = match ElfImage::parse(vmlinux) {
            Ok(elf) => elf,
            Err(p) if entry == KernelEntry::Pvh => {
                return Err(problem(KernelProblem::Payload(format!(
                    "unpacked {} payload is not a usable ELF: {p}",
                    compression.name()
                ))));
            }
            Err(p) => {
                tracing::warn!(
                    "{}: unpacked payload is not a usable ELF ({p}), booting the bzImage itself",
                    path.display()
                );
                return Ok(Plan::BzImage(bz));
            }
        };
        return match (inner.pvh_entry, entry) {
            (Some(_), _) => Ok(Plan::Pvh(inner, Some(compression))),
            (None, KernelEntry::Pvh) => Err(problem(KernelProblem::NoPvhNote(
                "the vmlinux unpacked from the bzImage",
            ))),
            (None, _) => Ok(Plan::BzImage(bz)),
        };
    }

    let multiboot = || multiboot::Header::find(data).map_err(problem);
    if elf::is_elf(data) {
        let elf = ElfImage::parse(data).map_err(problem)?;
        let plan = match entry {
            KernelEntry::BzImage if elf.class64 => Plan::Elf64(elf),
            KernelEntry::BzImage => {
                return Err(problem(KernelProblem::EntryMismatch {
                    entry: "bzimage",
                    format: "32-bit ELF",
                }));
            }
            KernelEntry::Pvh if elf.pvh_entry.is_some() => Plan::Pvh(elf, None),
            KernelEntry::Pvh => return Err(problem(KernelProblem::NoPvhNote("the ELF file"))),
            KernelEntry::Auto if elf.class64 && elf.pvh_entry.is_some() => Plan::Pvh(elf, None),
            KernelEntry::Auto => match multiboot()? {
                Some(h) if h.kludge.is_none() && elf.class64 => {
                    return Err(problem(KernelProblem::Multiboot {
                        offset: h.offset,
                        reason: "a 64-bit ELF needs the a.out kludge (flag bit 16) to be \
                                 loaded as multiboot, as in QEMU"
                            .into(),
                    }));
                }
                Some(h) => Plan::Multiboot(h, Some(elf)),
                None if elf.pvh_entry.is_some() => Plan::Pvh(elf, None),
                None if elf.class64 => Plan::Elf64(elf),
                None => return Err(problem(KernelProblem::Elf32WithoutEntry)),
            },
        };
        check_entry(path, &plan)?;
        return Ok(plan);
    }

    match (multiboot()?, entry) {
        (Some(h), KernelEntry::Auto) if h.kludge.is_some() => Ok(Plan::Multiboot(h, None)),
        (Some(h), KernelEntry::Auto) => Err(problem(KernelProblem::Multiboot {
            offset: h.offset,
            reason: "not an ELF file and flag bit 16 (a.out kludge) is clear: no load addresses"
                .into(),
        })),
        (Some(_), entry) => Err(problem(KernelProblem::EntryMismatch {
            entry: entry.name(),
            format: "multiboot",
        })),
        (None, _) => Err(problem(KernelProblem::UnknownFormat)),
    }
}

/// The entry point of an ELF plan must be inside what gets loaded.
fn check_entry(path: &Path, plan: &Plan) -> Result<(), BootError> {
    let (elf, entry, what) = match plan {
        Plan::Elf64(elf) => (elf, elf.entry_paddr(), "e_entry"),
        Plan::Pvh(elf, _) => (elf, elf.pvh_entry.unwrap_or_default(), "PVH entry"),
        Plan::Multiboot(_, Some(elf)) => (elf, elf.entry_paddr(), "e_entry"),
        _ => return Ok(()),
    };
    let inside = elf
        .segments
        .iter()
        .any(|s| s.paddr <= entry && entry < s.paddr + s.memsz);
    if inside {
        Ok(())
    } else {
        Err(kernel_error(
            path,
            KernelProblem::BadElf(format!("{what} {entry:#x} is outside every loaded segment")),
        ))
    }
}

fn check_placement(map: &RamMap, path: &Path, range: &Range<u64>) -> Result<(), BootError> {
    map.check_kernel_range(range.start, range.end)
        .map_err(|place| {
            kernel_error(
                path,
                KernelProblem::BadPlacement {
                    start: range.start,
                    end: range.end,
                    place,
                },
            )
        })
}

fn read_initrd(path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    let bytes = input::read(path, limit).map_err(|e| match e {
        input::CheckError::Io(source) => BootError::InitrdRead {
            path: path.to_path_buf(),
            source,
        },
        input::CheckError::Problem(input::InputFileProblem::TooLarge { size, limit }) => {
            BootError::InitrdTooBig {
                path: path.to_path_buf(),
                size,
                memory: limit,
            }
        }
        input::CheckError::Problem(problem) => BootError::InputFile {
            what: "initrd",
            path: path.to_path_buf(),
            problem,
        },
    })?;
    if bytes.is_empty() {
        return Err(BootError::EmptyInitrd {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

fn initrd_too_big(path: &Path, bytes: &[u8], map: &RamMap) -> BootError {
    BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size: bytes.len() as u64,
        memory: map.total,
    }
}

/// Puts the initrd as high as it goes below `limit_end`, clear of `kernel`.
fn place_initrd(
    memory: &GuestMemory,
    map: &RamMap,
    initrd: Option<(&Path, &[u8])>,
    limit_end: u64,
    kernel: &Range<u64>,
) -> Result<Option<Range<u64>>, BootError> {
    let Some((path, bytes)) = initrd else {
        return Ok(None);
    };
    let size = bytes.len() as u64;
    let start = map
        .place_high(size, limit_end, std::slice::from_ref(kernel))
        .ok_or_else(|| initrd_too_big(path, bytes, map))?;
    e820::write(memory, "initrd", start, bytes)?;
    Ok(Some(start..start + size))
}

/// Writes the NUL-terminated command line at [`layout::CMDLINE`].
fn write_cmdline(
    memory: &GuestMemory,
    cmdline: &str,
    max: usize,
    limit_from: &str,
) -> Result<(), BootError> {
    let max = max.min(layout::CMDLINE_MAX - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
            limit_from: limit_from.to_string(),
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    e820::write(memory, "command line", layout::CMDLINE, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bzimage::tests::fake_bzimage;
    use crate::cpu_setup::tests::{assert_segments_match_gdt, memory};
    use crate::elf::tests::ElfBuilder;
    use crate::unpack::tests::{gzip, lz4_legacy_frame};
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    /// A scratch directory removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "vmplay-boot-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config<'a>(kernel: &'a Path, initrd: Option<&'a Path>) -> BootConfig<'a> {
        BootConfig {
            kernel,
            initrd,
            cmdline: "console=ttyS0 panic=-1",
            entry: KernelEntry::Auto,
            vcpus: 2,
            virtio_mmio: &[],
        }
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn cstr(mem: &GuestMemory, addr: u64) -> String {
        let bytes = read(mem, addr, 4096);
        let end = bytes.iter().position(|&b| b == 0).unwrap();
        String::from_utf8(bytes[..end].to_vec()).unwrap()
    }

    /// An ELF vmlinux with a PVH note at 0x1000050 and a BSS.
    fn pvh_vmlinux() -> Vec<u8> {
        ElfBuilder::new(true).pvh_note(0x100_0050, 4).build()
    }

    /// A bzImage whose payload is `payload` behind a 0x100-byte stub.
    fn bzimage_with_payload(payload: &[u8]) -> Vec<u8> {
        let mut kernel = vec![0x90u8; 0x100];
        kernel.extend_from_slice(payload);
        kernel.resize(kernel.len().div_ceil(16) * 16, 0);
        let mut image = fake_bzimage(4, &kernel);
        // The exact length, without the padding to whole paragraphs.
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image
    }

    #[test]
    fn rejects_missing_kernel_naming_the_file() {
        let mem = memory(64 << 20);
        let err = load(&mem, &config("/nonexistent/bzImage".as_ref(), None)).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("kernel /nonexistent/bzImage: "), "{text}");
        assert!(matches!(err, BootError::KernelRead { .. }));
    }

    #[test]
    fn rejects_empty_kernel() {
        let s = Scratch::new();
        let k = s.file("empty", &[]);
        let err = load(&memory(64 << 20), &config(&k, None)).unwrap_err();
        assert!(matches!(
            err,
            BootError::Kernel {
                problem: KernelProblem::Empty,
                ..
            }
        ));
        assert!(err.to_string().ends_with("empty: empty file"), "{err}");
    }

    #[test]
    fn rejects_unknown_kernel_format() {
        let s = Scratch::new();
        let k = s.file("notes.txt", &[b'x'; 10_000]);
        let err = load(&memory(64 << 20), &config(&k, None)).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::Kernel {
                    problem: KernelProblem::UnknownFormat,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn rejects_truncated_bzimage_naming_the_file() {
        let s = Scratch::new();
        let image = fake_bzimage(39, &[0u8; 0x1000]);
        let k = s.file("bzImage", &image[..1024]);
        let err = load(&memory(64 << 20), &config(&k, None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel {}: truncated: setup header says 39 setup sectors but file has 1024 bytes",
                k.display()
            )
        );
    }

    #[test]
    fn rejects_elf_of_another_architecture_by_name() {
        let s = Scratch::new();
        let mut b = ElfBuilder::new(true);
        b.machine = 243;
        let k = s.file("riscv", &b.build());
        let err = load(&memory(64 << 20), &config(&k, None)).unwrap_err();
        assert!(
            err.to_string().contains("ELF for RISC-V (e_machine 243)"),
            "{err}"
        );
    }

    #[test]
    fn rejects_missing_and_empty_initrd() {
        let s = Scratch::new();
        let k = s.file("vmlinux", &pvh_vmlinux());
        let missing = s.0.join("nope.cpio");
        let err = load(&memory(64 << 20), &config(&k, Some(&missing))).unwrap_err();
        assert!(matches!(err, BootError::InitrdRead { .. }), "{err}");
        assert!(err.to_string().starts_with("initrd "), "{err}");
        let empty = s.file("empty.cpio", &[]);
        let err = load(&memory(64 << 20), &config(&k, Some(&empty))).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("initrd {}: empty file", empty.display())
        );
    }

    #[test]
    fn rejects_initrd_larger_than_memory() {
        let s = Scratch::new();
        let k = s.file("bzImage", &fake_bzimage(4, &[0u8; 0x1000]));
        let big = s.file("big.cpio", &vec![1u8; (40 * MIB) as usize]);
        let err = load(&memory(32 << 20), &config(&k, Some(&big))).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "initrd {} (41943040 bytes) does not fit in guest memory (33554432 bytes)",
                big.display()
            )
        );
    }

    #[test]
    fn rejects_cmdline_longer_than_the_kernel_accepts() {
        let s = Scratch::new();
        let k = s.file("bzImage", &fake_bzimage(4, &[0u8; 0x1000]));
        let long = "x".repeat(2048);
        let cfg = BootConfig {
            cmdline: &long,
            ..config(&k, None)
        };
        let err = load(&memory(64 << 20), &cfg).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command line is 2048 bytes but the kernel (setup header cmdline_size) accepts at \
             most 2047"
        );
        let nul = BootConfig {
            cmdline: "a\0b",
            ..config(&k, None)
        };
        assert!(matches!(
            load(&memory(64 << 20), &nul),
            Err(BootError::CmdlineNul { offset: 1 })
        ));
    }

    #[test]
    fn rejects_bzimage_whose_footprint_exceeds_ram() {
        let s = Scratch::new();
        let k = s.file("bzImage", &fake_bzimage(4, &[0u8; 0x1000]));
        // Loads at 16 MiB with init_size 4 MiB: 18 MiB of RAM is too little.
        let err = load(&memory(18 << 20), &config(&k, None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel {}: loads at [0x1000000, 0x1400000), beyond guest RAM (18874368 bytes)",
                k.display()
            )
        );
    }

    #[test]
    fn rejects_kernel_overlapping_the_mmio_hole() {
        let s = Scratch::new();
        let mut b = ElfBuilder::new(true);
        let start = layout::MMIO_HOLE_START - MIB;
        b.entry = start;
        b.segments = vec![(start, start, vec![0; 16], 2 * MIB)];
        let k = s.file("vmlinux", &b.build());
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(4 << 30)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemory::from_ranges(&ranges).unwrap();
        let err = load(&mem, &config(&k, None)).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("loads at [0xbff00000, 0xc0100000), which overlaps the MMIO hole [0xc0000000, 0x100000000)"),
            "{err}"
        );
    }

    #[test]
    fn boots_bzimage_with_the_64_bit_protocol() {
        let s = Scratch::new();
        let kernel: Vec<u8> = (0..0x2000u32).map(|i| i as u8).collect();
        let image = fake_bzimage(4, &kernel);
        let k = s.file("bzImage", &image);
        let initrd_bytes = vec![0x5au8; 0x1801];
        let i = s.file("initrd", &initrd_bytes);
        let mem = memory(64 << 20);
        let boot = load(&mem, &config(&k, Some(&i))).unwrap();
        assert_eq!(boot.protocol, Protocol::LinuxBzImage);
        assert_eq!(boot.kernel, 0x100_0000..0x140_0000);
        assert_eq!(read(&mem, 0x100_0000, kernel.len()), kernel);

        // Highest page-aligned place below the top of RAM.
        let initrd = boot.initrd.clone().unwrap();
        assert_eq!(initrd, 64 * MIB - 0x2000..64 * MIB - 0x2000 + 0x1801);
        assert_eq!(read(&mem, initrd.start, initrd_bytes.len()), initrd_bytes);

        let zp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        let raw = read(&mem, layout::ZERO_PAGE, 4096);
        // Header copied from the file, loader fields filled in.
        assert_eq!(&raw[0x1f1..0x210], &image[0x1f1..0x210]);
        assert_eq!(&raw[0x248..0x26c], &image[0x248..0x26c]);
        let hdr = zp.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!({ hdr.ramdisk_image } as u64, initrd.start);
        assert_eq!({ hdr.ramdisk_size }, 0x1801);
        assert_eq!({ zp.acpi_rsdp_addr }, layout::RSDP);
        assert_eq!(
            usize::from(zp.e820_entries),
            layout::e820_map(64 * MIB).len()
        );
        assert_eq!(cstr(&mem, layout::CMDLINE), "console=ttyS0 panic=-1");

        let st = &boot.bsp_state;
        assert_eq!(st.rip, 0x100_0200);
        assert_eq!(st.gpr[CpuState::RSI], layout::ZERO_PAGE);
        assert_eq!(st.efer & cpu_setup::EFER_LMA, cpu_setup::EFER_LMA);
        assert_eq!((st.cs.selector, st.ds.selector), (0x10, 0x18));
        assert_segments_match_gdt(&mem, st);
        assert_eq!(boot.rsdp, layout::RSDP);
        assert_eq!(&read(&mem, layout::RSDP, 8), b"RSD PTR ");
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let s = Scratch::new();
        let mut image = fake_bzimage(4, &[0u8; 0x1000]);
        image[0x22c..0x230].copy_from_slice(&0x01ff_ffffu32.to_le_bytes());
        let k = s.file("bzImage", &image);
        let i = s.file("initrd", &[1u8; 0x3000]);
        let boot = load(&memory(64 << 20), &config(&k, Some(&i))).unwrap();
        // 32 MiB limit, but the kernel owns [16, 20) MiB: just below 32 MiB.
        assert_eq!(boot.initrd, Some(32 * MIB - 0x3000..32 * MIB));
    }

    #[test]
    fn unpacks_gzip_and_lz4_payloads_and_boots_pvh() {
        for (compression, payload) in [
            (Compression::Gzip, gzip(&pvh_vmlinux())),
            (
                Compression::Lz4Legacy,
                lz4_legacy_frame(&pvh_vmlinux(), true),
            ),
        ] {
            let s = Scratch::new();
            let k = s.file("bzImage", &bzimage_with_payload(&payload));
            let i = s.file("initrd", &[7u8; 0x800]);
            let mem = memory(64 << 20);
            let boot = load(&mem, &config(&k, Some(&i))).unwrap();
            assert_eq!(boot.protocol, Protocol::Pvh, "{compression:?}");
            assert_eq!(boot.unpacked, Some(compression));
            assert_eq!(boot.kernel, 0x100_0000..0x100_2000);
            assert_eq!(read(&mem, 0x100_0000, 0x100), vec![0x90; 0x100]);
            let st = &boot.bsp_state;
            assert_eq!(st.rip, 0x100_0050);
            assert_eq!(st.gpr[CpuState::RBX], layout::PVH_INFO);
            assert_eq!(st.cr0 & cpu_setup::CR0_PG, 0);
            assert_segments_match_gdt(&mem, st);

            let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO)).unwrap();
            assert_eq!((info.magic, info.version), (0x336e_c578, 1));
            assert_eq!(info.rsdp_paddr, layout::RSDP);
            assert_eq!(cstr(&mem, info.cmdline_paddr), "console=ttyS0 panic=-1");
            assert_eq!(info.nr_modules, 1);
            let module: [u64; 2] = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
            assert_eq!(module, [64 * MIB - 0x1000, 0x800]);
            let map = layout::e820_map(64 * MIB);
            assert_eq!(info.memmap_entries as usize, map.len());
            for (n, e) in map.iter().enumerate() {
                let m: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(info.memmap_paddr + 24 * n as u64))
                    .unwrap();
                assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind as u32));
            }
        }
    }

    #[test]
    fn bzimage_entry_keeps_the_in_guest_decompressor() {
        let s = Scratch::new();
        let k = s.file("bzImage", &bzimage_with_payload(&gzip(&pvh_vmlinux())));
        let cfg = BootConfig {
            entry: KernelEntry::BzImage,
            ..config(&k, None)
        };
        let boot = load(&memory(64 << 20), &cfg).unwrap();
        assert_eq!(boot.protocol, Protocol::LinuxBzImage);
        assert_eq!(boot.unpacked, None);
    }

    #[test]
    fn auto_falls_back_to_bzimage_without_pvh_note() {
        let s = Scratch::new();
        let plain = ElfBuilder::new(true).build();
        let k = s.file("bzImage", &bzimage_with_payload(&gzip(&plain)));
        let boot = load(&memory(64 << 20), &config(&k, None)).unwrap();
        assert_eq!(boot.protocol, Protocol::LinuxBzImage);
        let pvh = BootConfig {
            entry: KernelEntry::Pvh,
            ..config(&k, None)
        };
        let err = load(&memory(64 << 20), &pvh).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) in the vmlinux unpacked from the bzImage; try --kernel-entry auto"),
            "{err}"
        );
    }

    #[test]
    fn auto_falls_back_to_bzimage_for_payloads_it_cannot_unpack() {
        let s = Scratch::new();
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4];
        let k = s.file("bzImage", &bzimage_with_payload(&zstd));
        let boot = load(&memory(64 << 20), &config(&k, None)).unwrap();
        assert_eq!(boot.protocol, Protocol::LinuxBzImage);
        let pvh = BootConfig {
            entry: KernelEntry::Pvh,
            ..config(&k, None)
        };
        let err = load(&memory(64 << 20), &pvh).unwrap_err().to_string();
        assert!(err.contains("compressed with zstd"), "{err}");
    }

    #[test]
    fn rejects_corrupt_payload() {
        let s = Scratch::new();
        let mut payload = gzip(&pvh_vmlinux());
        let n = payload.len();
        payload[10..n - 8].fill(0xee);
        let k = s.file("bzImage", &bzimage_with_payload(&payload));
        let err = load(&memory(64 << 20), &config(&k, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bzImage payload: corrupt gzip data"), "{err}");
    }

    #[test]
    fn elf64_without_note_uses_the_64_bit_entry() {
        let s = Scratch::new();
        let k = s.file("vmlinux", &ElfBuilder::new(true).build());
        let i = s.file("initrd", &[3u8; 100]);
        let mem = memory(64 << 20);
        let boot = load(&mem, &config(&k, Some(&i))).unwrap();
        assert_eq!(boot.protocol, Protocol::LinuxElf64);
        assert_eq!(boot.bsp_state.rip, 0x100_0000);
        assert_eq!(boot.bsp_state.gpr[CpuState::RSI], layout::ZERO_PAGE);
        let zp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        let hdr = zp.hdr;
        assert_eq!(({ hdr.boot_flag }, { hdr.header }), (0xaa55, 0x5372_6448));
        assert_eq!({ hdr.ramdisk_image } as u64, boot.initrd.unwrap().start);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!({ zp.acpi_rsdp_addr }, layout::RSDP);
        assert_segments_match_gdt(&mem, &boot.bsp_state);
        let pvh = BootConfig {
            entry: KernelEntry::Pvh,
            ..config(&k, None)
        };
        assert!(matches!(
            load(&memory(64 << 20), &pvh),
            Err(BootError::Kernel {
                problem: KernelProblem::NoPvhNote(_),
                ..
            })
        ));
    }

    #[test]
    fn elf64_with_note_boots_pvh_unless_told_otherwise() {
        let s = Scratch::new();
        let k = s.file("vmlinux", &pvh_vmlinux());
        let boot = load(&memory(64 << 20), &config(&k, None)).unwrap();
        assert_eq!(
            (boot.protocol, boot.bsp_state.rip),
            (Protocol::Pvh, 0x100_0050)
        );
        let bz = BootConfig {
            entry: KernelEntry::BzImage,
            ..config(&k, None)
        };
        let boot = load(&memory(64 << 20), &bz).unwrap();
        assert_eq!(
            (boot.protocol, boot.bsp_state.rip),
            (Protocol::LinuxElf64, 0x100_0000)
        );
    }

    #[test]
    fn rejects_pvh_entry_outside_the_kernel() {
        let s = Scratch::new();
        let k = s.file(
            "vmlinux",
            &ElfBuilder::new(true).pvh_note(0x200_0000, 4).build(),
        );
        let err = load(&memory(64 << 20), &config(&k, None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PVH entry 0x2000000 is outside every loaded segment"),
            "{err}"
        );
    }

    #[test]
    fn rejects_32_bit_elf_without_an_entry_protocol() {
        let s = Scratch::new();
        let mut b = ElfBuilder::new(false);
        b.segments = vec![(0x10_0000, 0x10_0000, vec![0; 16], 0x1000)];
        b.entry = 0x10_0000;
        let k = s.file("kernel32", &b.build());
        let err = load(&memory(64 << 20), &config(&k, None)).unwrap_err();
        assert!(matches!(
            err,
            BootError::Kernel {
                problem: KernelProblem::Elf32WithoutEntry,
                ..
            }
        ));
        let bz = BootConfig {
            entry: KernelEntry::BzImage,
            ..config(&k, None)
        };
        let err = load(&memory(64 << 20), &bz).unwrap_err().to_string();
        assert!(err.ends_with("--kernel-entry bzimage does not apply to a 32-bit ELF kernel"));
    }

    fn multiboot_elf32(flags: u32) -> Vec<u8> {
        let mut b = ElfBuilder::new(false);
        b.entry = 0x10_0010;
        b.segments = vec![(0x10_0000, 0x10_0000, vec![0xf4; 0x40], 0x1800)];
        b.prefix = crate::multiboot::tests::header(flags, [0; 5])[..12].to_vec();
        b.build()
    }

    #[test]
    fn boots_multiboot_elf_like_qemu() {
        let s = Scratch::new();
        let k = s.file("mb.elf", &multiboot_elf32(0x3));
        let i = s.file("mod.bin", &[9u8; 0x1234]);
        let mem = memory(32 << 20);
        let boot = load(&mem, &config(&k, Some(&i))).unwrap();
        assert_eq!(boot.protocol, Protocol::Multiboot);
        assert_eq!(boot.kernel, 0x10_0000..0x10_1800);
        // The module goes on the first page after the kernel.
        assert_eq!(boot.initrd, Some(0x10_2000..0x10_3234));
        assert_eq!(read(&mem, 0x10_2000, 0x1234), vec![9u8; 0x1234]);
        let st = &boot.bsp_state;
        assert_eq!(st.rip, 0x10_0010);
        assert_eq!(st.gpr[CpuState::RAX], 0x2bad_b002);
        assert_eq!(st.gpr[CpuState::RBX], layout::MULTIBOOT_INFO);
        assert_eq!(st.cr0 & cpu_setup::CR0_PG, 0);
        assert_segments_match_gdt(&mem, st);

        let word = |off: u64| -> u32 {
            mem.read_obj(GuestAddress(layout::MULTIBOOT_INFO + off))
                .unwrap()
        };
        assert_eq!(
            cstr(&mem, u64::from(word(16))),
            format!("{} console=ttyS0 panic=-1", k.display())
        );
        assert_eq!((word(4), word(8)), (639, (31 << 20) / 1024));
        assert_eq!(word(20), 1);
        let mods = u64::from(word(24));
        let m: [u32; 3] = mem.read_obj(GuestAddress(mods)).unwrap();
        assert_eq!((m[0], m[1]), (0x10_2000, 0x10_3234));
        assert_eq!(cstr(&mem, u64::from(m[2])), i.display().to_string());
        assert_eq!(cstr(&mem, u64::from(word(64))), "vmplay");
    }

    #[test]
    fn boots_multiboot_aout_kludge_binary() {
        // A flat binary: 0x40 bytes of code, the header at 0x40, more code.
        let mut image = vec![0xf4u8; 0x40];
        image.extend(crate::multiboot::tests::header(
            (1 << 16) | 0x2,
            [0x20_0040, 0x20_0000, 0, 0x20_4000, 0x20_0000],
        ));
        image.extend(vec![0x90u8; 0x200]);
        let s = Scratch::new();
        let k = s.file("kernel.bin", &image);
        let mem = memory(32 << 20);
        mem.write_slice(&[0xcc; 0x100], GuestAddress(0x20_1000))
            .unwrap();
        let boot = load(&mem, &config(&k, None)).unwrap();
        assert_eq!(boot.protocol, Protocol::Multiboot);
        assert_eq!(boot.kernel, 0x20_0000..0x20_4000);
        assert_eq!(read(&mem, 0x20_0000, image.len()), image);
        assert_eq!(read(&mem, 0x20_1000, 0x100), vec![0; 0x100], "BSS zeroed");
        assert_eq!(boot.bsp_state.rip, 0x20_0000);
        assert_eq!(boot.initrd, None);
    }

    #[test]
    fn rejects_multiboot_forms_qemu_rejects() {
        let s = Scratch::new();
        // Not ELF and no a.out kludge: nothing says where to load it.
        let mut flat = vec![0u8; 0x40];
        flat.extend(crate::multiboot::tests::header(0x2, [0; 5]));
        let k = s.file("flat.bin", &flat);
        let err = load(&memory(32 << 20), &config(&k, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("flag bit 16 (a.out kludge) is clear"), "{err}");
        // A 64-bit ELF multiboot kernel without the kludge.
        let mut b = ElfBuilder::new(true);
        b.prefix = crate::multiboot::tests::header(0x2, [0; 5])[..12].to_vec();
        let k = s.file("mb64.elf", &b.build());
        let err = load(&memory(32 << 20), &config(&k, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a 64-bit ELF needs the a.out kludge"), "{err}");
        // Forcing a Linux entry onto a multiboot kernel.
        let k = s.file("mb.elf", &multiboot_elf32(0x3));
        let pvh = BootConfig {
            entry: KernelEntry::Pvh,
            ..config(&k, None)
        };
        assert!(load(&memory(32 << 20), &pvh).is_err());
    }

    #[test]
    fn acpi_tables_are_written_with_the_virtio_slots() {
        let s = Scratch::new();
        let k = s.file("vmlinux", &pvh_vmlinux());
        let slots = crate::acpi::tests::slots(2);
        let cfg = BootConfig {
            virtio_mmio: &slots,
            ..config(&k, None)
        };
        let mem = memory(64 << 20);
        load(&mem, &cfg).unwrap();
        let tables = acpi::build(2, &slots).unwrap();
        for t in &tables.tables {
            assert_eq!(read(&mem, t.addr, t.bytes.len()), t.bytes, "{}", t.name);
        }
    }

    #[test]
    fn kernel_entry_parses_its_cli_names() {
        for e in [KernelEntry::Auto, KernelEntry::BzImage, KernelEntry::Pvh] {
            assert_eq!(e.name().parse::<KernelEntry>(), Ok(e));
        }
        assert!("bios".parse::<KernelEntry>().is_err());
    }
}
