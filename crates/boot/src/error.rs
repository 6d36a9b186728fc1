//! What can go wrong while putting a kernel into guest memory. Every
//! message is one line that names the file or value at fault.

use std::fmt;
use std::path::PathBuf;

/// A loader failure.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("kernel {}: {source}", path.display())]
    KernelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel file was read but cannot be booted.
    #[error("kernel {}: {problem}", path.display())]
    Kernel {
        path: PathBuf,
        problem: KernelProblem,
    },
    /// The initrd file could not be read.
    #[error("initrd {}: {source}", path.display())]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A kernel or initrd that is not a regular file, or is larger than
    /// guest memory: refused before it is read.
    #[error("{what} {}: {problem}", path.display())]
    InputFile {
        what: &'static str,
        path: PathBuf,
        problem: crate::input::InputFileProblem,
    },
    /// An empty initrd is almost certainly a mistake (a truncated build).
    #[error("initrd {}: empty file", path.display())]
    EmptyInitrd { path: PathBuf },
    /// No page-aligned place for the initrd between the kernel and the
    /// highest address the kernel accepts.
    #[error(
        "initrd {} ({size} bytes) does not fit in guest memory ({memory} bytes)",
        path.display()
    )]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        memory: u64,
    },
    /// The command line is longer than the kernel (or vmplay) accepts.
    #[error("command line is {len} bytes but {limit_from} accepts at most {max}")]
    CmdlineTooLong {
        len: usize,
        max: usize,
        limit_from: String,
    },
    /// The command line must be a C string.
    #[error("command line contains a NUL byte at offset {offset}")]
    CmdlineNul { offset: usize },
    /// Guest memory too small or shaped in a way the loaders cannot use.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The ACPI tables cannot be built as configured.
    #[error("ACPI tables: {0}")]
    Acpi(String),
    /// A write to guest memory failed (an address outside every region).
    #[error("writing {what} at {addr:#x}: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Why a kernel file cannot be booted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelProblem {
    #[error("empty file")]
    Empty,
    #[error(
        "not a kernel format vmplay knows (expected a bzImage, an x86 ELF with a PVH note, \
         an x86-64 ELF vmlinux or a multiboot kernel)"
    )]
    UnknownFormat,
    #[error("truncated: setup header says {sectors} setup sectors but file has {len} bytes")]
    TruncatedSetup { sectors: u32, len: u64 },
    #[error(
        "truncated: setup header says {expected} bytes of protected-mode code (syssize) \
         but file has {actual} after the setup sectors"
    )]
    TruncatedKernel { expected: u64, actual: u64 },
    #[error(
        "truncated: payload at offset {offset:#x} of {length} bytes runs past the {actual} \
         bytes after the setup sectors"
    )]
    TruncatedPayload {
        offset: u64,
        length: u64,
        actual: u64,
    },
    #[error(
        "boot protocol {}.{:02} is too old: the 64-bit entry needs 2.06 or later",
        version >> 8,
        version & 0xff
    )]
    OldProtocol { version: u16 },
    #[error("xloadflags {xloadflags:#x} lack XLF_KERNEL_64: no 64-bit entry point")]
    No64BitEntry { xloadflags: u16 },
    #[error("loadflags {loadflags:#x} lack LOADED_HIGH: zImage kernels are not supported")]
    NotLoadedHigh { loadflags: u8 },
    #[error("ELF for {machine} (e_machine {code}), but vmplay runs x86 guests")]
    WrongArch { machine: String, code: u16 },
    #[error("malformed ELF: {0}")]
    BadElf(String),
    #[error("32-bit ELF without a multiboot header or PVH note: vmplay cannot enter it")]
    Elf32WithoutEntry,
    #[error("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) in {0}; try --kernel-entry auto")]
    NoPvhNote(&'static str),
    #[error("bzImage payload: {0}")]
    Payload(String),
    #[error("--kernel-entry {entry} does not apply to a {format} kernel")]
    EntryMismatch {
        entry: &'static str,
        format: &'static str,
    },
    #[error("multiboot header at offset {offset:#x}: {reason}")]
    Multiboot { offset: usize, reason: String },
    #[error("loads at [{start:#x}, {end:#x}), {place}")]
    BadPlacement {
        start: u64,
        end: u64,
        place: Placement,
    },
}

/// Where a kernel range landed when it does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Below 1 MiB, where the loaders keep their own structures.
    LowMemory,
    /// Overlapping [MMIO_HOLE_START, 4 GiB).
    MmioHole,
    /// Past the end of guest RAM (`memory` bytes).
    BeyondRam { memory: u64 },
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::LowMemory => {
                f.write_str("below 1 MiB, where vmplay keeps its boot structures")
            }
            Placement::MmioHole => write!(
                f,
                "which overlaps the MMIO hole [{:#x}, {:#x})",
                crate::layout::MMIO_HOLE_START,
                crate::layout::MMIO_HOLE_END
            ),
            Placement::BeyondRam { memory } => {
                write!(f, "beyond guest RAM ({memory} bytes)")
            }
        }
    }
}

/// Shorthand used by the loaders: a [`BootError::Kernel`] for `path`.
pub(crate) fn kernel_error(path: &std::path::Path, problem: KernelProblem) -> BootError {
    BootError::Kernel {
        path: path.to_path_buf(),
        problem,
    }
}
