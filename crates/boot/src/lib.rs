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
    let data = std::fs::read(path).map_err(|source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    })?;
    if data.is_empty() {
        return Err(kernel_error(path, KernelProblem::Empty));
    }
    let initrd = match config.initrd {
        Some(p) => Some((p, read_initrd(p)?)),
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

fn read_initrd(path: &Path) -> Result<Vec<u8>, BootError> {
    let bytes = std::fs::read(path).map_err(|source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
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
