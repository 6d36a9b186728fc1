//! A Multiboot v1 ELF32 image writer: just enough ELF for QEMU's
//! `-kernel` and vmplay's multiboot loader to load the benchmark guests.
//!
//! The image is one PT_LOAD segment at a fixed physical address whose
//! first bytes are the multiboot header; memory past the file contents
//! (page tables, stacks, data arrays) is zero-filled by the loader.

use crate::BenchError;

/// `MULTIBOOT_HEADER_MAGIC` from the Multiboot 0.6.96 spec.
pub const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// What a multiboot loader leaves in EAX at entry.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

const EHDR_SIZE: usize = 52;
const PHDR_SIZE: usize = 32;
/// File offset of the segment: page-aligned, like a linker would place it.
const SEGMENT_OFFSET: usize = 0x1000;

/// Code and data blocks at fixed guest-physical addresses, plus how far
/// the zero-filled memory reaches and where execution starts.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Physical load address; the multiboot header is written here.
    pub load: u32,
    /// The 32-bit protected-mode entry point.
    pub entry: u32,
    /// End (exclusive) of the memory the image owns, zero-filled past the
    /// last block.
    pub mem_end: u32,
    blocks: Vec<(u32, Vec<u8>)>,
}

impl GuestImage {
    /// An image loaded at `load` with its multiboot header already placed.
    pub fn new(load: u32, entry: u32) -> Self {
        let flags = 0u32;
        let checksum = 0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(flags));
        let mut header = Vec::with_capacity(12);
        for word in [MULTIBOOT_MAGIC, flags, checksum] {
            header.extend_from_slice(&word.to_le_bytes());
        }
        GuestImage {
            load,
            entry,
            mem_end: load + 12,
            blocks: vec![(load, header)],
        }
    }

    /// Places `bytes` at guest-physical `addr`. Blocks may not overlap.
    pub fn place(&mut self, addr: u32, bytes: Vec<u8>) -> Result<(), BenchError> {
        let end = addr
            .checked_add(bytes.len() as u32)
            .ok_or_else(|| BenchError::Guest(format!("block at {addr:#x} wraps")))?;
        if addr < self.load {
            return Err(BenchError::Guest(format!(
                "block at {addr:#x} is below the load address {:#x}",
                self.load
            )));
        }
        for (other, b) in &self.blocks {
            let other_end = other + b.len() as u32;
            if addr < other_end && *other < end {
                return Err(BenchError::Guest(format!(
                    "block {addr:#x}..{end:#x} overlaps block {other:#x}..{other_end:#x}"
                )));
            }
        }
        self.mem_end = self.mem_end.max(end);
        self.blocks.push((addr, bytes));
        Ok(())
    }

    /// Makes the image own memory up to `end` (zero-filled).
    pub fn reserve_to(&mut self, end: u32) {
        self.mem_end = self.mem_end.max(end);
    }

    /// The bytes from `load` to the end of the last block.
    fn contents(&self) -> Vec<u8> {
        let file_end = self
            .blocks
            .iter()
            .map(|(a, b)| a + b.len() as u32)
            .max()
            .unwrap_or(self.load);
        let mut out = vec![0u8; (file_end - self.load) as usize];
        for (addr, bytes) in &self.blocks {
            let off = (addr - self.load) as usize;
            out[off..off + bytes.len()].copy_from_slice(bytes);
        }
        out
    }

    /// The ELF32 file: header, one program header, the segment.
    pub fn to_elf(&self) -> Vec<u8> {
        let contents = self.contents();
        let mut f = Vec::with_capacity(SEGMENT_OFFSET + contents.len());
        // e_ident: ELF, 32-bit, little-endian, version 1, System V ABI.
        f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0]);
        f.extend_from_slice(&[0; 8]);
        push16(&mut f, 2); // e_type: ET_EXEC
        push16(&mut f, 3); // e_machine: EM_386
        push32(&mut f, 1); // e_version
        push32(&mut f, self.entry);
        push32(&mut f, EHDR_SIZE as u32); // e_phoff
        push32(&mut f, 0); // e_shoff: no sections
        push32(&mut f, 0); // e_flags
        push16(&mut f, EHDR_SIZE as u16);
        push16(&mut f, PHDR_SIZE as u16);
        push16(&mut f, 1); // e_phnum
        push16(&mut f, 40); // e_shentsize
        push16(&mut f, 0); // e_shnum
        push16(&mut f, 0); // e_shstrndx
        debug_assert_eq!(f.len(), EHDR_SIZE);
        push32(&mut f, 1); // p_type: PT_LOAD
        push32(&mut f, SEGMENT_OFFSET as u32);
        push32(&mut f, self.load); // p_vaddr
        push32(&mut f, self.load); // p_paddr
        push32(&mut f, contents.len() as u32); // p_filesz
        push32(&mut f, self.mem_end - self.load); // p_memsz
        push32(&mut f, 7); // p_flags: RWX
        push32(&mut f, 0x1000); // p_align
        f.resize(SEGMENT_OFFSET, 0);
        f.extend_from_slice(&contents);
        f
    }
}

fn push16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn push32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn elf_has_one_load_segment_with_multiboot_header_first() {
        let mut img = GuestImage::new(0x10_0000, 0x10_0010);
        img.place(0x10_0010, vec![0xf4]).unwrap();
        img.reserve_to(0x20_0000);
        let elf = img.to_elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 1, "ELFCLASS32");
        assert_eq!(u32_at(&elf, 24), 0x10_0010, "entry");
        let ph = EHDR_SIZE;
        assert_eq!(u32_at(&elf, ph), 1, "PT_LOAD");
        assert_eq!(u32_at(&elf, ph + 12), 0x10_0000, "paddr");
        assert_eq!(u32_at(&elf, ph + 16), 0x11, "filesz");
        assert_eq!(u32_at(&elf, ph + 20), 0x10_0000, "memsz");
        // The multiboot header must sit in the first 8 KiB, 4-aligned, and sum to 0.
        let mb = SEGMENT_OFFSET;
        assert!(mb + 12 <= 8192 && mb.is_multiple_of(4));
        assert_eq!(u32_at(&elf, mb), MULTIBOOT_MAGIC);
        let sum = (0..3).fold(0u32, |s, i| s.wrapping_add(u32_at(&elf, mb + 4 * i)));
        assert_eq!(sum, 0);
        assert_eq!(elf[mb + 0x10], 0xf4);
    }

    #[test]
    fn rejects_overlapping_blocks() {
        let mut img = GuestImage::new(0x10_0000, 0x10_0010);
        img.place(0x10_0010, vec![0; 16]).unwrap();
        assert!(img.place(0x10_001f, vec![0; 4]).is_err());
        assert!(img.place(0x10_0008, vec![0; 4]).is_err(), "hits the header");
        assert!(img.place(0xf_0000, vec![0; 4]).is_err(), "below load");
        img.place(0x10_0020, vec![0; 4]).unwrap();
    }
}
