//! Multiboot (version 1) kernels, loaded the way QEMU's `-kernel` loads
//! them: the header is found in the first 8 KiB, the kernel is loaded from
//! its ELF segments or, with flag bit 16, from the header's a.out-kludge
//! addresses, and the multiboot information lists memory, the command
//! line (`"<kernel path> <cmdline>"`, as QEMU passes it) and the initrd as
//! module 0, placed on the first page after the kernel.

use std::ops::Range;

use crate::e820::{self, PAGE_SIZE, RamMap};
use crate::error::KernelProblem;
use crate::layout::{self, E820Kind};

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the kernel finds in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie within this many bytes from the start of the file.
const SEARCH_LIMIT: usize = 8192;

/// Header flags.
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// The low 16 flag bits are requirements a loader must meet or refuse.
const REQUIRED_MASK: u32 = 0xffff;
/// What vmplay provides. Video mode requests are ignored, as QEMU does.
const SUPPORTED_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// Multiboot information flags.
pub const INFO_MEMORY: u32 = 1 << 0;
pub const INFO_CMDLINE: u32 = 1 << 2;
pub const INFO_MODS: u32 = 1 << 3;
pub const INFO_MEM_MAP: u32 = 1 << 6;
pub const INFO_LOADER_NAME: u32 = 1 << 9;

/// Where the parts of the multiboot information go, inside its page.
/// The structure itself (116 bytes with the framebuffer fields, which stay
/// zero) comes first.
const MMAP_AT: u64 = layout::MULTIBOOT_INFO + 0x100;
const MODS_AT: u64 = layout::MULTIBOOT_INFO + 0x300;
const LOADER_NAME_AT: u64 = layout::MULTIBOOT_INFO + 0x380;
const MOD_STRING_AT: u64 = layout::MULTIBOOT_INFO + 0x400;
const INFO_END: u64 = layout::MULTIBOOT_INFO + 0x1000;
pub const LOADER_NAME: &str = "vmplay";

/// The a.out-kludge load addresses (header flag bit 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kludge {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A multiboot header found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Offset of the magic in the file.
    pub offset: usize,
    pub flags: u32,
    pub kludge: Option<Kludge>,
}

impl Header {
    /// Finds and checks the header; `None` if there is no magic with a
    /// valid checksum in the first 8 KiB.
    pub fn find(data: &[u8]) -> Result<Option<Header>, KernelProblem> {
        let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
        let end = data.len().min(SEARCH_LIMIT);
        let Some(offset) = (0..end.saturating_sub(11)).step_by(4).find(|&at| {
            word(at) == HEADER_MAGIC
                && HEADER_MAGIC
                    .wrapping_add(word(at + 4))
                    .wrapping_add(word(at + 8))
                    == 0
        }) else {
            return Ok(None);
        };
        let err = |reason: String| KernelProblem::Multiboot { offset, reason };
        let flags = word(offset + 4);
        let unsupported = flags & REQUIRED_MASK & !SUPPORTED_REQUIRED;
        if unsupported != 0 {
            return Err(err(format!(
                "flags {flags:#x} require features vmplay does not provide ({unsupported:#x})"
            )));
        }
        let kludge = if flags & FLAG_AOUT_KLUDGE != 0 {
            if offset + 32 > data.len() {
                return Err(err(
                    "a.out-kludge fields run past the end of the file".into()
                ));
            }
            Some(Kludge {
                header_addr: word(offset + 12),
                load_addr: word(offset + 16),
                load_end_addr: word(offset + 20),
                bss_end_addr: word(offset + 24),
                entry_addr: word(offset + 28),
            })
        } else {
            None
        };
        Ok(Some(Header {
            offset,
            flags,
            kludge,
        }))
    }
}

/// Where the a.out-kludge addresses put the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KludgeLoad {
    /// File bytes `file_range` go to `load_addr`.
    pub file_range: Range<usize>,
    pub load_addr: u64,
    /// Zeroed after the loaded bytes, up to `bss_end_addr`.
    pub bss_end: u64,
    pub entry: u64,
}

impl Kludge {
    /// Works out the load from the header fields, as the spec and QEMU do.
    pub fn plan(&self, header_offset: usize, file_len: usize) -> Result<KludgeLoad, KernelProblem> {
        let err = |reason: String| KernelProblem::Multiboot {
            offset: header_offset,
            reason,
        };
        let Some(before_header) = self.header_addr.checked_sub(self.load_addr) else {
            return Err(err(format!(
                "header_addr {:#x} is below load_addr {:#x}",
                self.header_addr, self.load_addr
            )));
        };
        let Some(start) = header_offset.checked_sub(before_header as usize) else {
            return Err(err(format!(
                "load_addr {:#x} would start {} bytes before the file",
                self.load_addr,
                before_header as usize - header_offset
            )));
        };
        let len = if self.load_end_addr == 0 {
            file_len - start
        } else {
            let Some(len) = self.load_end_addr.checked_sub(self.load_addr) else {
                return Err(err(format!(
                    "load_end_addr {:#x} is below load_addr {:#x}",
                    self.load_end_addr, self.load_addr
                )));
            };
            len as usize
        };
        if start + len > file_len {
            return Err(err(format!(
                "load_end_addr {:#x} asks for {len} bytes from offset {start:#x}, past the end of \
                 the file ({file_len} bytes)",
                self.load_end_addr
            )));
        }
        let loaded_end = u64::from(self.load_addr) + len as u64;
        let bss_end = if self.bss_end_addr == 0 {
            loaded_end
        } else if u64::from(self.bss_end_addr) < loaded_end {
            return Err(err(format!(
                "bss_end_addr {:#x} is below the end of the loaded image {loaded_end:#x}",
                self.bss_end_addr
            )));
        } else {
            u64::from(self.bss_end_addr)
        };
        let entry = u64::from(self.entry_addr);
        if !(u64::from(self.load_addr)..bss_end).contains(&entry) {
            return Err(err(format!(
                "entry_addr {entry:#x} is outside the loaded image [{:#x}, {bss_end:#x})",
                self.load_addr
            )));
        }
        Ok(KludgeLoad {
            file_range: start..start + len,
            load_addr: u64::from(self.load_addr),
            bss_end,
            entry,
        })
    }
}

/// The first page boundary at or after `kernel_end`: where QEMU puts
/// the first module.
pub fn module_address(kernel_end: u64) -> u64 {
    kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// The multiboot information page, built in a buffer that maps to
/// [`layout::MULTIBOOT_INFO`].
#[derive(Debug, Clone)]
pub struct Info {
    pub bytes: Vec<u8>,
}

impl Info {
    /// `module` is the initrd's range and its command line string.
    pub fn build(
        map: &RamMap,
        cmdline_addr: u64,
        module: Option<(Range<u64>, &str)>,
    ) -> Result<Info, crate::error::BootError> {
        let mut bytes = vec![0u8; (INFO_END - layout::MULTIBOOT_INFO) as usize];
        let at = |addr: u64| (addr - layout::MULTIBOOT_INFO) as usize;
        let mut put = |addr: u64, v: &[u8]| {
            bytes[at(addr)..at(addr) + v.len()].copy_from_slice(v);
        };
        let info = layout::MULTIBOOT_INFO;
        let ram_at = |start: u64| {
            map.e820
                .iter()
                .find(|e| e.kind == E820Kind::Ram && e.addr == start)
                .map_or(0, |e| e.size)
        };
        let mem_lower = (ram_at(0) / 1024).min(640) as u32;
        let mem_upper = ((map.top_of_low_ram() - layout::HIGH_RAM_START) / 1024) as u32;
        let flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_LOADER_NAME;
        put(info + 4, &mem_lower.to_le_bytes());
        put(info + 8, &mem_upper.to_le_bytes());
        put(info + 16, &(cmdline_addr as u32).to_le_bytes());

        if let Some((range, string)) = module {
            let end = MOD_STRING_AT + string.len() as u64 + 1;
            if end > INFO_END {
                return Err(crate::error::BootError::Memory(format!(
                    "multiboot module string is {} bytes; at most {} fit",
                    string.len(),
                    INFO_END - MOD_STRING_AT - 1
                )));
            }
            put(MOD_STRING_AT, string.as_bytes());
            let mut entry = [0u8; 16];
            entry[0..4].copy_from_slice(&(range.start as u32).to_le_bytes());
            entry[4..8].copy_from_slice(&(range.end as u32).to_le_bytes());
            entry[8..12].copy_from_slice(&(MOD_STRING_AT as u32).to_le_bytes());
            put(MODS_AT, &entry);
            put(info + 20, &1u32.to_le_bytes());
        }
        // QEMU announces the module list even when it is empty.
        put(info + 24, &(MODS_AT as u32).to_le_bytes());

        // Each entry: size (20, not counting itself), base, length, type.
        let mut mmap = Vec::new();
        for e in &map.e820 {
            mmap.extend_from_slice(&20u32.to_le_bytes());
            mmap.extend_from_slice(&e.addr.to_le_bytes());
            mmap.extend_from_slice(&e.size.to_le_bytes());
            mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
        }
        if MMAP_AT + mmap.len() as u64 > MODS_AT {
            return Err(crate::error::BootError::Memory(format!(
                "{} memory map entries do not fit in the multiboot information",
                map.e820.len()
            )));
        }
        put(MMAP_AT, &mmap);
        put(info + 44, &(mmap.len() as u32).to_le_bytes());
        put(info + 48, &(MMAP_AT as u32).to_le_bytes());

        let mut name = LOADER_NAME.as_bytes().to_vec();
        name.push(0);
        put(LOADER_NAME_AT, &name);
        put(info + 64, &(LOADER_NAME_AT as u32).to_le_bytes());
        put(info, &flags.to_le_bytes());
        Ok(Info { bytes })
    }

    pub fn write(
        &self,
        memory: &vmplay_hypervisor::GuestMemory,
    ) -> Result<(), crate::error::BootError> {
        e820::write(
            memory,
            "multiboot information",
            layout::MULTIBOOT_INFO,
            &self.bytes,
        )
    }

    /// A little-endian u32 at `offset` in the information structure.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }
}

/// The string the kernel gets as its command line: QEMU passes the
/// kernel file name, a space and the `-append` text.
pub fn cmdline(kernel: &std::path::Path, cmdline: &str) -> String {
    format!("{} {}", kernel.display(), cmdline)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 32-byte multiboot header with the given flags and kludge fields.
    pub(crate) fn header(flags: u32, kludge: [u32; 5]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
        for v in kludge {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn finds_header_with_valid_checksum_only() {
        let mut file = vec![0u8; 64];
        let mut bad = header(3, [0; 5]);
        bad[8] ^= 1;
        file.extend_from_slice(&bad);
        assert_eq!(Header::find(&file).unwrap(), None);
        file.extend_from_slice(&header(3, [0; 5]));
        let h = Header::find(&file).unwrap().unwrap();
        assert_eq!((h.offset, h.flags, h.kludge), (96, 3, None));
    }

    #[test]
    fn ignores_header_past_8_kib_or_misaligned() {
        let mut file = vec![0u8; 8192];
        file.extend_from_slice(&header(0, [0; 5]));
        assert_eq!(Header::find(&file).unwrap(), None);
        let mut file = vec![0u8; 2];
        file.extend_from_slice(&header(0, [0; 5]));
        assert_eq!(Header::find(&file).unwrap(), None);
    }

    #[test]
    fn rejects_required_flags_it_cannot_meet() {
        let file = header(1 << 3, [0; 5]);
        let err = Header::find(&file).unwrap_err();
        assert!(err.to_string().contains("require features"), "{err}");
    }

    #[test]
    fn plans_aout_kludge_load() {
        // Header at file offset 0x40 describes itself at 0x100040.
        let k = Kludge {
            header_addr: 0x10_0040,
            load_addr: 0x10_0000,
            load_end_addr: 0x10_0800,
            bss_end_addr: 0x10_2000,
            entry_addr: 0x10_0080,
        };
        let plan = k.plan(0x40, 0x1000).unwrap();
        assert_eq!(plan.file_range, 0..0x800);
        assert_eq!(
            (plan.load_addr, plan.bss_end, plan.entry),
            (0x10_0000, 0x10_2000, 0x10_0080)
        );
        // load_end_addr 0: to the end of the file; bss_end 0: no BSS.
        let k0 = Kludge {
            load_end_addr: 0,
            bss_end_addr: 0,
            ..k
        };
        let plan = k0.plan(0x40, 0x1000).unwrap();
        assert_eq!((plan.file_range, plan.bss_end), (0..0x1000, 0x10_1000));
    }

    #[test]
    fn rejects_inconsistent_kludge_addresses() {
        let k = Kludge {
            header_addr: 0x10_0040,
            load_addr: 0x10_0000,
            load_end_addr: 0x10_0800,
            bss_end_addr: 0,
            entry_addr: 0x10_0080,
        };
        assert!(
            k.plan(0x40, 0x400)
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
        let before = Kludge {
            header_addr: 0x10_0000,
            load_addr: 0x10_0040,
            ..k
        };
        assert!(
            before
                .plan(0x40, 0x1000)
                .unwrap_err()
                .to_string()
                .contains("below load_addr")
        );
        let bss = Kludge {
            bss_end_addr: 0x10_0400,
            ..k
        };
        assert!(
            bss.plan(0x40, 0x1000)
                .unwrap_err()
                .to_string()
                .contains("bss_end_addr")
        );
        assert!(
            k.plan(0x20, 0x1000)
                .unwrap_err()
                .to_string()
                .contains("before the file")
        );
        let wild = Kludge {
            entry_addr: 0x50_0000,
            ..k
        };
        let err = wild.plan(0x40, 0x1000).unwrap_err().to_string();
        assert!(err.contains("entry_addr 0x500000 is outside"), "{err}");
    }

    #[test]
    fn info_describes_memory_cmdline_module_and_loader() {
        let map = RamMap::with_total(128 << 20).unwrap();
        let info = Info::build(
            &map,
            layout::CMDLINE,
            Some((0x20_0000..0x20_1234, "initrd.img")),
        )
        .unwrap();
        let flags = info.u32_at(0);
        for bit in [
            INFO_MEMORY,
            INFO_CMDLINE,
            INFO_MODS,
            INFO_MEM_MAP,
            INFO_LOADER_NAME,
        ] {
            assert_ne!(flags & bit, 0, "flag {bit:#x}");
        }
        assert_eq!(info.u32_at(4), 639, "mem_lower: KiB below the EBDA");
        assert_eq!(
            info.u32_at(8),
            (127 << 20) / 1024,
            "mem_upper: KiB above 1 MiB"
        );
        assert_eq!(info.u32_at(16), layout::CMDLINE as u32);
        assert_eq!(info.u32_at(20), 1);
        let mods = (info.u32_at(24) as u64 - layout::MULTIBOOT_INFO) as usize;
        assert_eq!(info.u32_at(mods), 0x20_0000);
        assert_eq!(info.u32_at(mods + 4), 0x20_1234);
        let s = (info.u32_at(mods + 8) as u64 - layout::MULTIBOOT_INFO) as usize;
        assert_eq!(&info.bytes[s..s + 11], b"initrd.img\0");
        let name = (info.u32_at(64) as u64 - layout::MULTIBOOT_INFO) as usize;
        assert_eq!(&info.bytes[name..name + 7], b"vmplay\0");
        // The memory map walks with size+4 strides and matches the E820 map.
        let (len, addr) = (info.u32_at(44) as usize, info.u32_at(48) as u64);
        let mut at = (addr - layout::MULTIBOOT_INFO) as usize;
        let end = at + len;
        let mut seen = Vec::new();
        while at < end {
            let size = info.u32_at(at) as usize;
            let base = u64::from_le_bytes(info.bytes[at + 4..at + 12].try_into().unwrap());
            let length = u64::from_le_bytes(info.bytes[at + 12..at + 20].try_into().unwrap());
            seen.push((base, length, info.u32_at(at + 20)));
            at += size + 4;
        }
        let want: Vec<_> = map
            .e820
            .iter()
            .map(|e| (e.addr, e.size, e.kind as u32))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn info_without_module_has_zero_count() {
        let map = RamMap::with_total(16 << 20).unwrap();
        let info = Info::build(&map, layout::CMDLINE, None).unwrap();
        assert_eq!(info.u32_at(20), 0);
        assert_ne!(info.u32_at(0) & INFO_MODS, 0);
    }

    #[test]
    fn cmdline_starts_with_the_kernel_path_like_qemu() {
        assert_eq!(
            cmdline("/boot/kernel.elf".as_ref(), "console=ttyS0"),
            "/boot/kernel.elf console=ttyS0"
        );
    }

    #[test]
    fn modules_start_on_the_page_after_the_kernel() {
        assert_eq!(module_address(0x10_2001), 0x10_3000);
        assert_eq!(module_address(0x10_3000), 0x10_3000);
    }
}
