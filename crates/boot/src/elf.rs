//! ELF kernels: parsing (32- and 64-bit x86), loading the PT_LOAD
//! segments at their physical addresses, the PVH entry note and the PVH
//! `hvm_start_info`.
//!
//! Parsed by hand rather than with linux-loader's `Elf` loader because its
//! errors do not say which header field is wrong, and because multiboot
//! and PVH kernels may be 32-bit ELF files.

use std::ops::Range;

use linux_loader::loader::elf::start_info::{
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::ByteValued;

use crate::e820::{self, RamMap};
use crate::error::{BootError, KernelProblem};
use crate::layout;
use vmplay_hypervisor::GuestMemory;

pub const EM_386: u16 = 3;
pub const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 0x12;

/// Whether `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// One PT_LOAD segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A parsed x86 ELF file.
#[derive(Debug, Clone)]
pub struct ElfImage<'a> {
    pub class64: bool,
    pub machine: u16,
    /// `e_entry` as written in the header.
    pub entry: u64,
    pub segments: Vec<LoadSegment>,
    /// The PVH entry point, from the `Xen` note of type 0x12.
    pub pvh_entry: Option<u64>,
    data: &'a [u8],
}

/// A little-endian reader that reports out-of-range reads as errors.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&self, at: u64, len: u64, what: &str) -> Result<&[u8], KernelProblem> {
        at.checked_add(len)
            .filter(|&end| end <= self.0.len() as u64)
            .map(|end| &self.0[at as usize..end as usize])
            .ok_or_else(|| {
                KernelProblem::BadElf(format!(
                    "{what} at offset {at:#x} ({len} bytes) runs past the end of the file ({} bytes)",
                    self.0.len()
                ))
            })
    }
    fn u16(&self, at: u64, what: &str) -> Result<u16, KernelProblem> {
        Ok(u16::from_le_bytes(
            self.bytes(at, 2, what)?.try_into().unwrap(),
        ))
    }
    fn u32(&self, at: u64, what: &str) -> Result<u32, KernelProblem> {
        Ok(u32::from_le_bytes(
            self.bytes(at, 4, what)?.try_into().unwrap(),
        ))
    }
    fn u64(&self, at: u64, what: &str) -> Result<u64, KernelProblem> {
        Ok(u64::from_le_bytes(
            self.bytes(at, 8, what)?.try_into().unwrap(),
        ))
    }
    /// A 32- or 64-bit word, by ELF class.
    fn word(&self, class64: bool, at: u64, what: &str) -> Result<u64, KernelProblem> {
        if class64 {
            self.u64(at, what)
        } else {
            self.u32(at, what).map(u64::from)
        }
    }
}

/// The name of an `e_machine` value, for messages about foreign ELF files.
pub fn machine_name(code: u16) -> String {
    match code {
        2 => "SPARC",
        3 => "i386",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "s390",
        40 => "ARM",
        43 => "SPARC64",
        50 => "IA-64",
        62 => "x86-64",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => return format!("machine {code}"),
    }
    .to_string()
}

impl<'a> ElfImage<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, KernelProblem> {
        let r = Reader(data);
        let ident = r.bytes(0, 16, "ELF identification")?;
        let class64 = match ident[4] {
            1 => false,
            2 => true,
            other => return Err(KernelProblem::BadElf(format!("unknown EI_CLASS {other}"))),
        };
        if ident[5] != 1 {
            return Err(KernelProblem::BadElf(format!(
                "EI_DATA {} is not little-endian",
                ident[5]
            )));
        }
        let machine = r.u16(18, "e_machine")?;
        match (machine, class64) {
            (EM_X86_64, true) | (EM_386, false) => {}
            (EM_X86_64, false) => {
                return Err(KernelProblem::BadElf(
                    "x86-64 machine in a 32-bit ELF (x32) is not a kernel format".into(),
                ));
            }
            (EM_386, true) => {
                return Err(KernelProblem::BadElf(
                    "i386 machine in a 64-bit ELF file".into(),
                ));
            }
            (code, _) => {
                return Err(KernelProblem::WrongArch {
                    machine: machine_name(code),
                    code,
                });
            }
        }
        // Field offsets differ between the classes from e_entry on.
        let (entry, phoff, phentsize_at, phnum_at, want_phentsize) = if class64 {
            (r.u64(24, "e_entry")?, r.u64(32, "e_phoff")?, 54, 56, 56)
        } else {
            (
                u64::from(r.u32(24, "e_entry")?),
                u64::from(r.u32(28, "e_phoff")?),
                42,
                44,
                32,
            )
        };
        let phentsize = r.u16(phentsize_at, "e_phentsize")?;
        let phnum = r.u16(phnum_at, "e_phnum")?;
        if phnum == 0 {
            return Err(KernelProblem::BadElf("no program headers".into()));
        }
        if phentsize != want_phentsize {
            return Err(KernelProblem::BadElf(format!(
                "e_phentsize {phentsize}, expected {want_phentsize}"
            )));
        }
        let mut segments = Vec::new();
        let mut notes = Vec::new();
        for i in 0..u64::from(phnum) {
            let ph = phoff + i * u64::from(phentsize);
            let what = format!("program header {i}");
            r.bytes(ph, u64::from(phentsize), &what)?;
            let p_type = r.u32(ph, &what)?;
            let (offset, vaddr, paddr, filesz, memsz) = if class64 {
                (
                    r.u64(ph + 8, &what)?,
                    r.u64(ph + 16, &what)?,
                    r.u64(ph + 24, &what)?,
                    r.u64(ph + 32, &what)?,
                    r.u64(ph + 40, &what)?,
                )
            } else {
                (
                    r.word(false, ph + 4, &what)?,
                    r.word(false, ph + 8, &what)?,
                    r.word(false, ph + 12, &what)?,
                    r.word(false, ph + 16, &what)?,
                    r.word(false, ph + 20, &what)?,
                )
            };
            match p_type {
                PT_LOAD => {
                    if filesz > memsz {
                        return Err(KernelProblem::BadElf(format!(
                            "{what}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}"
                        )));
                    }
                    r.bytes(offset, filesz, &format!("segment {i}"))?;
                    if paddr.checked_add(memsz).is_none() {
                        return Err(KernelProblem::BadElf(format!(
                            "{what}: p_paddr {paddr:#x} + p_memsz {memsz:#x} overflows"
                        )));
                    }
                    segments.push(LoadSegment {
                        offset,
                        vaddr,
                        paddr,
                        filesz,
                        memsz,
                    });
                }
                PT_NOTE => notes.push(r.bytes(offset, filesz, &format!("note segment {i}"))?),
                _ => {}
            }
        }
        if segments.iter().all(|s| s.memsz == 0) {
            return Err(KernelProblem::BadElf("no PT_LOAD segment to load".into()));
        }
        let mut pvh_entry = None;
        for note in notes {
            if let Some(addr) = find_pvh_note(note)? {
                pvh_entry = Some(addr);
            }
        }
        Ok(ElfImage {
            class64,
            machine,
            entry,
            segments,
            pvh_entry,
            data,
        })
    }

    /// The entry point as a physical address: `e_entry` translated
    /// through the segment that contains it when the kernel is linked at
    /// a virtual address other than its load address (as GRUB does).
    pub fn entry_paddr(&self) -> u64 {
        self.segments
            .iter()
            .find(|s| s.vaddr <= self.entry && self.entry < s.vaddr + s.memsz)
            .map_or(self.entry, |s| self.entry - s.vaddr + s.paddr)
    }

    /// The physical range the segments cover (lowest start, highest end).
    pub fn span(&self) -> Range<u64> {
        let loaded = self.segments.iter().filter(|s| s.memsz > 0);
        let start = loaded.clone().map(|s| s.paddr).min().unwrap_or(0);
        let end = loaded.map(|s| s.paddr + s.memsz).max().unwrap_or(0);
        start..end
    }

    /// Copies the segments to their physical addresses and zeroes their
    /// BSS, after checking each lies in RAM above 1 MiB.
    pub fn load(
        &self,
        memory: &GuestMemory,
        map: &RamMap,
        path: &std::path::Path,
    ) -> Result<Range<u64>, BootError> {
        for s in self.segments.iter().filter(|s| s.memsz > 0) {
            let end = s.paddr + s.memsz;
            map.check_kernel_range(s.paddr, end).map_err(|place| {
                crate::error::kernel_error(
                    path,
                    KernelProblem::BadPlacement {
                        start: s.paddr,
                        end,
                        place,
                    },
                )
            })?;
        }
        for s in self.segments.iter().filter(|s| s.memsz > 0) {
            let bytes = &self.data[s.offset as usize..(s.offset + s.filesz) as usize];
            e820::write(memory, "kernel segment", s.paddr, bytes)?;
            e820::zero(memory, "kernel BSS", s.paddr + s.filesz, s.memsz - s.filesz)?;
        }
        Ok(self.span())
    }
}

/// Looks through one PT_NOTE segment for the `Xen` PHYS32_ENTRY note.
fn find_pvh_note(mut notes: &[u8]) -> Result<Option<u64>, KernelProblem> {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let word = |i: usize| u32::from_le_bytes(notes[i..i + 4].try_into().unwrap()) as usize;
        let (namesz, descsz, kind) = (word(0), word(4), word(8) as u32);
        let desc_at = 12 + align4(namesz);
        let next = desc_at.checked_add(align4(descsz));
        let Some(next) = next.filter(|&n| n <= notes.len()) else {
            return Err(KernelProblem::BadElf(format!(
                "note of type {kind:#x} runs past the end of its segment"
            )));
        };
        let name = &notes[12..12 + namesz];
        if name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            let desc = &notes[desc_at..desc_at + descsz];
            let addr = match descsz {
                4 => u64::from(u32::from_le_bytes(desc.try_into().unwrap())),
                8 => u64::from_le_bytes(desc.try_into().unwrap()),
                n => {
                    return Err(KernelProblem::BadElf(format!(
                        "PVH entry note has a {n}-byte value, expected 4 or 8"
                    )));
                }
            };
            if addr > u64::from(u32::MAX) {
                return Err(KernelProblem::BadElf(format!(
                    "PVH entry {addr:#x} is not a 32-bit physical address"
                )));
            }
            return Ok(Some(addr));
        }
        notes = &notes[next..];
    }
    Ok(None)
}

/// Where the PVH structures go inside the PVH page.
const PVH_MODLIST: u64 = layout::PVH_INFO + 0x40;
const PVH_MEMMAP: u64 = layout::PVH_INFO + 0x80;
const PVH_PAGE_END: u64 = layout::PVH_INFO + 0x1000;

/// Builds the `hvm_start_info` (version 1, with the memory map), its
/// module list (the initrd as module 0) and memory map.
pub fn pvh_start_info(
    map: &RamMap,
    initrd: Option<Range<u64>>,
    rsdp: u64,
) -> (
    hvm_start_info,
    Vec<hvm_modlist_entry>,
    Vec<hvm_memmap_table_entry>,
) {
    let modules: Vec<hvm_modlist_entry> = initrd
        .into_iter()
        .map(|r| hvm_modlist_entry {
            paddr: r.start,
            size: r.end - r.start,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let memmap: Vec<hvm_memmap_table_entry> = map
        .e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST },
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, modules, memmap)
}

/// Writes the PVH start info page at [`layout::PVH_INFO`].
pub fn write_pvh_start_info(
    memory: &GuestMemory,
    map: &RamMap,
    initrd: Option<Range<u64>>,
    rsdp: u64,
) -> Result<(), BootError> {
    let (info, modules, memmap) = pvh_start_info(map, initrd, rsdp);
    let memmap_bytes: Vec<u8> = memmap.iter().flat_map(|e| e.as_slice().to_vec()).collect();
    if PVH_MEMMAP + memmap_bytes.len() as u64 > PVH_PAGE_END {
        return Err(BootError::Memory(format!(
            "{} memory map entries do not fit in the PVH start info page",
            memmap.len()
        )));
    }
    e820::zero(memory, "PVH start info", layout::PVH_INFO, 0x1000)?;
    e820::write(memory, "PVH start info", layout::PVH_INFO, info.as_slice())?;
    for (i, m) in modules.iter().enumerate() {
        let at = PVH_MODLIST + (i * std::mem::size_of::<hvm_modlist_entry>()) as u64;
        e820::write(memory, "PVH module list", at, m.as_slice())?;
    }
    e820::write(memory, "PVH memory map", PVH_MEMMAP, &memmap_bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF file: header, program headers, then each segment's
    /// bytes. `notes` become one PT_NOTE segment.
    pub(crate) struct ElfBuilder {
        pub class64: bool,
        pub machine: u16,
        pub entry: u64,
        /// (vaddr, paddr, bytes, memsz)
        pub segments: Vec<(u64, u64, Vec<u8>, u64)>,
        pub notes: Vec<u8>,
        /// Bytes placed right after the program headers (a multiboot header).
        pub prefix: Vec<u8>,
    }

    impl ElfBuilder {
        pub fn new(class64: bool) -> Self {
            ElfBuilder {
                class64,
                machine: if class64 { EM_X86_64 } else { EM_386 },
                entry: 0x100_0000,
                segments: vec![(0x100_0000, 0x100_0000, vec![0x90; 0x100], 0x2000)],
                notes: Vec::new(),
                prefix: Vec::new(),
            }
        }

        pub fn pvh_note(mut self, entry: u64, desc_len: usize) -> Self {
            // Another vendor's note first, as in real vmlinux files.
            self.notes
                .extend_from_slice(&note(b"GNU\0", 3, &[1, 2, 3, 4]));
            let desc = &entry.to_le_bytes()[..desc_len];
            self.notes
                .extend_from_slice(&note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, desc));
            self
        }

        pub fn build(&self) -> Vec<u8> {
            let (ehsize, phentsize) = if self.class64 { (64, 56) } else { (52, 32) };
            let phnum = self.segments.len() + usize::from(!self.notes.is_empty());
            let mut offset = ehsize + phentsize * phnum + self.prefix.len();
            let mut out = vec![0u8; ehsize];
            out[..4].copy_from_slice(b"\x7fELF");
            out[4] = if self.class64 { 2 } else { 1 };
            out[5] = 1;
            out[6] = 1;
            out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
            out[18..20].copy_from_slice(&self.machine.to_le_bytes());
            out[20..24].copy_from_slice(&1u32.to_le_bytes());
            if self.class64 {
                out[24..32].copy_from_slice(&self.entry.to_le_bytes());
                out[32..40].copy_from_slice(&(ehsize as u64).to_le_bytes());
                out[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
                out[54..56].copy_from_slice(&(phentsize as u16).to_le_bytes());
                out[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
            } else {
                out[24..28].copy_from_slice(&(self.entry as u32).to_le_bytes());
                out[28..32].copy_from_slice(&(ehsize as u32).to_le_bytes());
                out[40..42].copy_from_slice(&(ehsize as u16).to_le_bytes());
                out[42..44].copy_from_slice(&(phentsize as u16).to_le_bytes());
                out[44..46].copy_from_slice(&(phnum as u16).to_le_bytes());
            }
            let mut bodies = Vec::new();
            let mut phdr = |p_type: u32, vaddr: u64, paddr: u64, len: usize, memsz: u64| {
                let mut ph = vec![0u8; phentsize];
                ph[..4].copy_from_slice(&p_type.to_le_bytes());
                let fields = [offset as u64, vaddr, paddr, len as u64, memsz];
                if self.class64 {
                    for (i, v) in fields.iter().enumerate() {
                        ph[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
                    }
                } else {
                    for (i, v) in fields.iter().enumerate() {
                        ph[4 + i * 4..8 + i * 4].copy_from_slice(&(*v as u32).to_le_bytes());
                    }
                }
                offset += len;
                ph
            };
            for (vaddr, paddr, bytes, memsz) in &self.segments {
                out.extend(phdr(PT_LOAD, *vaddr, *paddr, bytes.len(), *memsz));
                bodies.extend_from_slice(bytes);
            }
            if !self.notes.is_empty() {
                out.extend(phdr(PT_NOTE, 0, 0, self.notes.len(), 0));
                bodies.extend_from_slice(&self.notes);
            }
            out.extend_from_slice(&self.prefix);
            out.extend(bodies);
            out
        }
    }

    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out.extend_from_slice(desc);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    #[test]
    fn finds_pvh_note_of_either_width() {
        for width in [4, 8] {
            let data = ElfBuilder::new(true).pvh_note(0x100_0850, width).build();
            let elf = ElfImage::parse(&data).unwrap();
            assert_eq!(elf.pvh_entry, Some(0x100_0850), "{width}-byte note");
        }
        let plain = ElfBuilder::new(true).build();
        assert_eq!(ElfImage::parse(&plain).unwrap().pvh_entry, None);
    }

    #[test]
    fn parses_32_bit_elf_segments() {
        let mut b = ElfBuilder::new(false);
        b.entry = 0xc010_0010;
        b.segments = vec![(0xc010_0000, 0x10_0000, vec![1, 2, 3], 0x1000)];
        let data = b.build();
        let elf = ElfImage::parse(&data).unwrap();
        assert!(!elf.class64);
        assert_eq!(elf.segments[0].paddr, 0x10_0000);
        assert_eq!(elf.segments[0].filesz, 3);
        assert_eq!(elf.entry_paddr(), 0x10_0010, "entry translated to physical");
        assert_eq!(elf.span(), 0x10_0000..0x10_1000);
    }

    #[test]
    fn rejects_elf_of_another_architecture() {
        let mut b = ElfBuilder::new(true);
        b.machine = 183;
        let err = ElfImage::parse(&b.build()).unwrap_err();
        assert_eq!(
            err,
            KernelProblem::WrongArch {
                machine: "AArch64".into(),
                code: 183
            }
        );
        assert!(err.to_string().contains("AArch64"), "{err}");
    }

    #[test]
    fn rejects_segment_past_end_of_file() {
        let mut data = ElfBuilder::new(true).build();
        data.truncate(data.len() - 1);
        let err = ElfImage::parse(&data).unwrap_err();
        assert!(err.to_string().contains("segment 0"), "{err}");
    }

    #[test]
    fn rejects_filesz_larger_than_memsz() {
        let mut b = ElfBuilder::new(true);
        b.segments[0].3 = 1;
        let err = ElfImage::parse(&b.build()).unwrap_err();
        assert!(err.to_string().contains("p_filesz"), "{err}");
    }

    #[test]
    fn rejects_truncated_note() {
        let mut b = ElfBuilder::new(true);
        let mut n = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]);
        n[4] = 64; // descsz past the segment
        b.notes = n;
        let err = ElfImage::parse(&b.build()).unwrap_err();
        assert!(err.to_string().contains("note of type 0x12"), "{err}");
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::cpu_setup::tests::memory(32 << 20);
        mem.write_slice(&[0xaa; 0x100], GuestAddress(0x100_0100))
            .unwrap();
        let data = ElfBuilder::new(true).build();
        let elf = ElfImage::parse(&data).unwrap();
        let map = RamMap::with_total(32 << 20).unwrap();
        let range = elf.load(&mem, &map, "vmlinux".as_ref()).unwrap();
        assert_eq!(range, 0x100_0000..0x100_2000);
        let mut buf = [0u8; 0x200];
        mem.read_slice(&mut buf, GuestAddress(0x100_0000)).unwrap();
        assert!(buf[..0x100].iter().all(|&b| b == 0x90));
        assert!(buf[0x100..].iter().all(|&b| b == 0), "BSS must be zeroed");
    }

    #[test]
    fn rejects_segment_beyond_ram() {
        let data = ElfBuilder::new(true).build();
        let elf = ElfImage::parse(&data).unwrap();
        let mem = crate::cpu_setup::tests::memory(8 << 20);
        let map = RamMap::with_total(8 << 20).unwrap();
        let err = elf.load(&mem, &map, "/k/vmlinux".as_ref()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel /k/vmlinux: loads at [0x1000000, 0x1002000), beyond guest RAM (8388608 bytes)"
        );
    }

    #[test]
    fn pvh_start_info_describes_memory_initrd_and_rsdp() {
        let map = RamMap::with_total(256 << 20).unwrap();
        let (info, mods, memmap) = pvh_start_info(&map, Some(0x800_0000..0x800_1234), layout::RSDP);
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE);
        assert_eq!(info.rsdp_paddr, layout::RSDP);
        assert_eq!(info.memmap_entries as usize, map.e820.len());
        assert_eq!((mods[0].paddr, mods[0].size), (0x800_0000, 0x1234));
        for (m, e) in memmap.iter().zip(&map.e820) {
            assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind as u32));
        }
        let (info, mods, _) = pvh_start_info(&map, None, layout::RSDP);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(mods.is_empty());
    }
}
