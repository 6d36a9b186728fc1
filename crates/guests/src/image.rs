//! [`MultibootImage`]: lays out assembled code and data in one Multiboot v1
//! ELF32 file, the way `qemu -kernel` and `vmplay run --kernel` load it.
//!
//! The file has one `PT_LOAD` segment at [`LOAD_ADDR`] (1 MiB) whose first
//! bytes are the Multiboot header. Pieces are placed one after another, so a
//! piece can refer to any piece placed before it by the address the builder
//! returned: place callees (64-bit code, real-mode code, data) first and the
//! 32-bit entry code that jumps to them last.
//!
//! The builder adds a small entry stub that does what every Multiboot kernel
//! must (the spec leaves GDTR undefined and gives no stack): it copies the
//! GDT and any low-memory pieces below 1 MiB, loads the GDT, reloads every
//! segment register, sets `esp` to [`STACK_TOP`], then jumps to the 32-bit
//! entry with `eax` (the Multiboot magic) and `ebx` (the info pointer) intact.

use crate::GuestError;
use iced_x86::code_asm::*;

/// Where the segment loads: the conventional 1 MiB of 32-bit kernels.
pub const LOAD_ADDR: u32 = 0x10_0000;
/// File offset of the segment; with the header at its start the header
/// sits well inside the first 8 KiB, where loaders search for it.
const SEGMENT_FILE_OFFSET: u32 = 0x1000;
/// The Multiboot v1 header magic and the magic a loader leaves in `eax`.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flags: page-align modules (bit 0), give memory info (bit 1).
const MULTIBOOT_HEADER_FLAGS: u32 = 0b11;

/// The GDT every program runs with, copied below 64 KiB so real-mode code
/// (an AP fresh out of SIPI) can load it with a 16-bit `lgdt`.
pub const LOW_GDT: u32 = 0x1000;
/// A `lgdt` operand for [`LOW_GDT`].
pub const LOW_GDT_PTR: u32 = LOW_GDT + 0x30;
/// A `lidt` operand for the real-mode interrupt vector table (base 0,
/// limit 0x3ff), loaded before dropping to real mode as the SDM asks.
pub const REAL_MODE_IVT_PTR: u32 = LOW_GDT + 0x38;
/// Real-mode code runs with SS:SP = 0:REAL_MODE_STACK_TOP (below the GDT).
pub const REAL_MODE_STACK_TOP: u16 = LOW_GDT as u16;
/// Low pieces (real-mode code, SIPI trampolines) go in whole pages here:
/// free in vmplay's layout (the loader's GDT/IDT/TSS sit at 0x500-0x5ff,
/// the PVH info at 0x6000) and below 64 KiB, so offsets equal addresses.
pub const LOW_CODE_START: u32 = 0x2000;
pub const LOW_CODE_END: u32 = 0x6000;
/// Top of the 32-bit stack the entry stub sets up.
pub const STACK_TOP: u32 = 0x8_0000;

/// GDT selectors.
pub mod sel {
    /// Flat 4 GiB 32-bit code.
    pub const CODE32: u16 = 0x08;
    /// Flat 4 GiB data.
    pub const DATA32: u16 = 0x10;
    /// 16-bit code, base 0, limit 64 KiB: the step between protected and real mode.
    pub const CODE16: u16 = 0x18;
    /// 16-bit data, base 0, limit 64 KiB: real-mode-compatible segment limits.
    pub const DATA16: u16 = 0x20;
    /// 64-bit code (L=1).
    pub const CODE64: u16 = 0x28;
}

/// The descriptors, in selector order (index = selector / 8).
const GDT: [u64; 6] = [
    0,
    0x00cf_9a00_0000_ffff, // CODE32: base 0, limit 4 GiB, G=1, D=1, execute/read
    0x00cf_9200_0000_ffff, // DATA32: base 0, limit 4 GiB, G=1, B=1, read/write
    0x0000_9a00_0000_ffff, // CODE16: base 0, limit 0xffff, G=0, D=0
    0x0000_9200_0000_ffff, // DATA16: base 0, limit 0xffff, G=0, B=0
    0x00af_9a00_0000_ffff, // CODE64: L=1, D=0
];

/// How 32-bit code reaches a real-mode piece: `jmp far CODE16:pm16_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealModeEntry {
    /// The 16-bit protected-mode prologue that drops to real mode.
    pub pm16_entry: u32,
    /// The page the piece occupies; real-mode CS = page >> 4.
    pub page: u32,
}

/// A piece copied below 1 MiB by the entry stub.
struct LowPiece {
    addr: u32,
    bytes: Vec<u8>,
}

/// Builds a Multiboot v1 ELF32 kernel from assembled pieces.
pub struct MultibootImage {
    /// Segment contents, starting at [`LOAD_ADDR`].
    segment: Vec<u8>,
    low: Vec<LowPiece>,
    next_low: u32,
    entry32: Option<u32>,
}

impl Default for MultibootImage {
    fn default() -> Self {
        Self::new()
    }
}

type AsmFn<'a> = dyn FnOnce(&mut CodeAssembler) -> Result<(), GuestError> + 'a;

impl MultibootImage {
    pub fn new() -> Self {
        let mut segment = Vec::new();
        for word in [
            MULTIBOOT_HEADER_MAGIC,
            MULTIBOOT_HEADER_FLAGS,
            0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(MULTIBOOT_HEADER_FLAGS)),
        ] {
            segment.extend_from_slice(&word.to_le_bytes());
        }
        let mut gdt = Vec::new();
        for d in GDT {
            gdt.extend_from_slice(&d.to_le_bytes());
        }
        gdt.extend_from_slice(&((GDT.len() * 8 - 1) as u16).to_le_bytes());
        gdt.extend_from_slice(&LOW_GDT.to_le_bytes());
        gdt.resize((REAL_MODE_IVT_PTR - LOW_GDT) as usize, 0);
        gdt.extend_from_slice(&0x3ffu16.to_le_bytes());
        gdt.extend_from_slice(&0u32.to_le_bytes());
        Self {
            segment,
            low: vec![LowPiece {
                addr: LOW_GDT,
                bytes: gdt,
            }],
            next_low: LOW_CODE_START,
            entry32: None,
        }
    }

    /// The address the next piece aligned to `align` would get.
    fn cursor(&self, align: u32) -> u32 {
        let end = LOAD_ADDR + self.segment.len() as u32;
        end.next_multiple_of(align)
    }

    fn append(&mut self, align: u32, bytes: &[u8]) -> u32 {
        let addr = self.cursor(align);
        self.segment.resize((addr - LOAD_ADDR) as usize, 0);
        self.segment.extend_from_slice(bytes);
        addr
    }

    /// Places read/write data (16-byte aligned) and returns its address.
    pub fn data(&mut self, bytes: &[u8]) -> u32 {
        self.append(16, bytes)
    }

    /// Places `len` zero bytes aligned to `align` (a power of two): page
    /// tables, stacks, variables. They are in the file, so they are zero
    /// whether or not the loader clears memory.
    pub fn zeroed(&mut self, len: usize, align: u32) -> u32 {
        self.append(align, &vec![0; len])
    }

    fn code(&mut self, bitness: u32, build: Box<AsmFn<'_>>) -> Result<u32, GuestError> {
        let mut a = CodeAssembler::new(bitness)?;
        build(&mut a)?;
        let addr = self.cursor(16);
        let bytes = a.assemble(u64::from(addr))?;
        Ok(self.append(16, &bytes))
    }

    /// Assembles 32-bit protected-mode code (paging off, flat segments).
    pub fn code32(
        &mut self,
        build: impl FnOnce(&mut CodeAssembler) -> Result<(), GuestError>,
    ) -> Result<u32, GuestError> {
        self.code(32, Box::new(build))
    }

    /// Assembles 64-bit code; reach it with `jmp far CODE64:addr` once
    /// long mode is enabled.
    pub fn code64(
        &mut self,
        build: impl FnOnce(&mut CodeAssembler) -> Result<(), GuestError>,
    ) -> Result<u32, GuestError> {
        self.code(64, Box::new(build))
    }

    /// Sets the 32-bit code the entry stub jumps to, with `eax` = Multiboot
    /// magic, `ebx` = info pointer, `esp` = [`STACK_TOP`], flat segments,
    /// interrupts off.
    pub fn set_entry32(&mut self, addr: u32) {
        self.entry32 = Some(addr);
    }

    fn low_page(&mut self, len: usize) -> Result<u32, GuestError> {
        let addr = self.next_low;
        let end = addr as usize + len;
        if end > LOW_CODE_END as usize {
            return Err(GuestError::LowMemoryFull {
                end: end as u64,
                limit: LOW_CODE_END,
            });
        }
        self.next_low = (end as u32).next_multiple_of(0x1000);
        Ok(addr)
    }

    /// Assembles raw 16-bit code into a page of its own below 64 KiB,
    /// at IP 0 relative to that page: run it with CS = page >> 4. This is
    /// the shape a SIPI trampoline needs (vector = page >> 12). Returns the
    /// page address.
    pub fn code16_low(
        &mut self,
        build: impl FnOnce(&mut CodeAssembler) -> Result<(), GuestError>,
    ) -> Result<u32, GuestError> {
        let mut a = CodeAssembler::new(16)?;
        build(&mut a)?;
        let bytes = a.assemble(0)?;
        let addr = self.low_page(bytes.len())?;
        self.low.push(LowPiece { addr, bytes });
        Ok(addr)
    }

    /// Assembles real-mode code and the prologue that gets there from
    /// 32-bit protected mode the way the SDM (9.9.2) says: far jump to a
    /// 16-bit code segment, load 64 KiB data segments, load the real-mode
    /// IVT, clear CR0.PE, far jump to a real-mode CS, reload the segments.
    ///
    /// `build` runs with CS = DS = ES = page >> 4 (so labels work as data
    /// addresses), SS:SP = 0:[`REAL_MODE_STACK_TOP`], interrupts off.
    pub fn real_mode(
        &mut self,
        build: impl FnOnce(&mut CodeAssembler) -> Result<(), GuestError>,
    ) -> Result<RealModeEntry, GuestError> {
        // The piece's page is known before assembling: nothing else is
        // placed in low memory meanwhile.
        let page = self.next_low;
        let segment = (page >> 4) as u16;
        let pm16 = |a: &mut CodeAssembler| -> Result<(), GuestError> {
            a.mov(ax, u32::from(sel::DATA16))?;
            for s in [ds, es, fs, gs, ss] {
                a.mov(s, ax)?;
            }
            a.lidt(ptr(REAL_MODE_IVT_PTR))?;
            a.mov(eax, cr0)?;
            a.and(eax, !1u32 as i32)?;
            a.mov(cr0, eax)?;
            Ok(())
        };
        // The prologue runs at IP = page (CODE16 has base 0) and ends with
        // a far jump to the real-mode part right after it, at CS = page >> 4.
        let prologue = assemble_with_far_jump_to_end(16, page, segment, pm16, |_, len| len)?;

        let mut a = CodeAssembler::new(16)?;
        a.mov(ax, u32::from(segment))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.xor(ax, ax)?;
        a.mov(fs, ax)?;
        a.mov(gs, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, u32::from(REAL_MODE_STACK_TOP))?;
        build(&mut a)?;
        let mut bytes = prologue;
        let real = a.assemble(bytes.len() as u64)?;
        bytes.extend_from_slice(&real);
        let addr = self.low_page(bytes.len())?;
        debug_assert_eq!(addr, page);
        self.low.push(LowPiece { addr, bytes });
        Ok(RealModeEntry {
            pm16_entry: page,
            page,
        })
    }

    /// Adds the entry stub and writes the ELF file.
    pub fn build(mut self) -> Result<Vec<u8>, GuestError> {
        let main = self.entry32.ok_or(GuestError::NoEntry)?;
        // Low pieces go in the segment too; the stub copies them down.
        let copies: Vec<(u32, u32, u32)> = std::mem::take(&mut self.low)
            .into_iter()
            .map(|p| {
                let src = self.data(&p.bytes);
                (src, p.addr, p.bytes.len() as u32)
            })
            .collect();

        // Second half first: its address is the far-jump target.
        let reload = self.code32(|a| {
            a.mov(cx, u32::from(sel::DATA32))?;
            for s in [ds, es, fs, gs, ss] {
                a.mov(s, cx)?;
            }
            a.mov(esp, STACK_TOP)?;
            a.jmp(u64::from(main))?;
            Ok(())
        })?;
        let entry = self.code32(|a| {
            a.cli()?;
            a.cld()?;
            // eax and ebx carry the Multiboot handoff: use other registers.
            for &(src, dst, len) in &copies {
                a.mov(esi, src)?;
                a.mov(edi, dst)?;
                a.mov(ecx, len)?;
                a.rep().movsb()?;
            }
            a.lgdt(ptr(LOW_GDT_PTR))?;
            a.jmp_far(sel::CODE32, reload)?;
            Ok(())
        })?;
        Ok(elf32(entry, &self.segment))
    }
}

/// Assembles `prefix` at `ip` followed by a far jump to `selector` and the
/// offset `target(ip, len)` computes from the prologue's total length `len`:
/// the jump's size does not depend on its target, so measure, then emit.
pub(crate) fn assemble_with_far_jump_to_end(
    bitness: u32,
    ip: u32,
    selector: u16,
    prefix: impl Fn(&mut CodeAssembler) -> Result<(), GuestError>,
    target: impl Fn(u32, u32) -> u32,
) -> Result<Vec<u8>, GuestError> {
    let emit = |offset: u32| -> Result<Vec<u8>, GuestError> {
        let mut a = CodeAssembler::new(bitness)?;
        prefix(&mut a)?;
        a.jmp_far(selector, offset)?;
        Ok(a.assemble(u64::from(ip))?)
    };
    let len = emit(0)?.len() as u32;
    emit(target(ip, len))
}

/// An ELF32 i386 executable with one RWX `PT_LOAD` holding `segment` at
/// [`LOAD_ADDR`].
fn elf32(entry: u32, segment: &[u8]) -> Vec<u8> {
    const EHDR_SIZE: u16 = 52;
    const PHDR_SIZE: u16 = 32;
    let mut f = Vec::with_capacity(SEGMENT_FILE_OFFSET as usize + segment.len());
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[1, 1, 1, 0]); // ELFCLASS32, little-endian, version 1, System V
    f.resize(16, 0);
    let half = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let word = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    half(&mut f, 2); // ET_EXEC
    half(&mut f, 3); // EM_386
    word(&mut f, 1); // EV_CURRENT
    word(&mut f, entry);
    word(&mut f, u32::from(EHDR_SIZE)); // e_phoff: right after this header
    word(&mut f, 0); // no section headers
    word(&mut f, 0); // e_flags
    half(&mut f, EHDR_SIZE);
    half(&mut f, PHDR_SIZE);
    half(&mut f, 1); // e_phnum
    half(&mut f, 40); // e_shentsize
    half(&mut f, 0); // e_shnum
    half(&mut f, 0); // e_shstrndx
    debug_assert_eq!(f.len(), usize::from(EHDR_SIZE));
    word(&mut f, 1); // PT_LOAD
    word(&mut f, SEGMENT_FILE_OFFSET);
    word(&mut f, LOAD_ADDR); // p_vaddr
    word(&mut f, LOAD_ADDR); // p_paddr
    word(&mut f, segment.len() as u32); // p_filesz
    word(&mut f, segment.len() as u32); // p_memsz
    word(&mut f, 7); // PF_R | PF_W | PF_X
    word(&mut f, 0x1000); // p_align
    f.resize(SEGMENT_FILE_OFFSET as usize, 0);
    f.extend_from_slice(segment);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn tiny() -> Vec<u8> {
        let mut img = MultibootImage::new();
        let main = img
            .code32(|a| {
                a.hlt()?;
                Ok(())
            })
            .unwrap();
        img.set_entry32(main);
        img.build().unwrap()
    }

    #[test]
    fn writes_an_i386_elf_with_one_load_segment_at_1mib() {
        let f = tiny();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(f[4], 1, "ELFCLASS32");
        assert_eq!(u16_at(&f, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&f, 18), 3, "EM_386");
        assert_eq!(u16_at(&f, 44), 1, "one program header");
        let ph = u32_at(&f, 28) as usize;
        assert_eq!(u32_at(&f, ph), 1, "PT_LOAD");
        let (off, vaddr, filesz) = (
            u32_at(&f, ph + 4) as usize,
            u32_at(&f, ph + 8),
            u32_at(&f, ph + 16) as usize,
        );
        assert_eq!(vaddr, LOAD_ADDR);
        assert_eq!(off + filesz, f.len());
        let entry = u32_at(&f, 24);
        assert!((LOAD_ADDR..LOAD_ADDR + filesz as u32).contains(&entry));
    }

    #[test]
    fn multiboot_header_is_in_the_first_8k_with_a_valid_checksum() {
        let f = tiny();
        let at = (0..8192 - 12)
            .step_by(4)
            .find(|&o| u32_at(&f, o) == MULTIBOOT_HEADER_MAGIC)
            .expect("multiboot header in the first 8 KiB");
        let sum = u32_at(&f, at)
            .wrapping_add(u32_at(&f, at + 4))
            .wrapping_add(u32_at(&f, at + 8));
        assert_eq!(sum, 0);
        // Bit 16 clear: the loader takes addresses from the ELF headers.
        assert_eq!(u32_at(&f, at + 4) & (1 << 16), 0);
    }

    #[test]
    fn entry_stub_loads_the_gdt_and_reaches_the_program() {
        let f = tiny();
        let entry = u32_at(&f, 24);
        let seg = &f[SEGMENT_FILE_OFFSET as usize..];
        let code = &seg[(entry - LOAD_ADDR) as usize..];
        let mut d = Decoder::with_ip(32, code, u64::from(entry), DecoderOptions::NONE);
        let mnemonics: Vec<Mnemonic> = d
            .iter()
            .take_while(|i| !i.is_invalid())
            .map(|i| i.mnemonic())
            .take(12)
            .collect();
        assert!(mnemonics.contains(&Mnemonic::Lgdt), "{mnemonics:?}");
        assert!(
            mnemonics.contains(&Mnemonic::Movsb),
            "copies the GDT low: {mnemonics:?}"
        );
        // The first copy is the GDT itself, with the pointer after it.
        let gdt_src = (0..seg.len() - 8)
            .step_by(16)
            .find(|&o| u64::from_le_bytes(seg[o + 8..o + 16].try_into().unwrap()) == GDT[1])
            .expect("GDT in the segment");
        assert_eq!(u16_at(seg, gdt_src + 0x30), 47);
        assert_eq!(u32_at(seg, gdt_src + 0x32), LOW_GDT);
        assert_eq!(u16_at(seg, gdt_src + 0x38), 0x3ff);
    }

    #[test]
    fn real_mode_pieces_get_pages_of_their_own_below_64k() {
        let mut img = MultibootImage::new();
        let first = img
            .real_mode(|a| {
                a.hlt()?;
                Ok(())
            })
            .unwrap();
        let second = img
            .code16_low(|a| {
                a.hlt()?;
                Ok(())
            })
            .unwrap();
        assert_eq!(first.page, LOW_CODE_START);
        assert_eq!(second, LOW_CODE_START + 0x1000);
        for _ in 0..2 {
            img.code16_low(|a| {
                a.hlt()?;
                Ok(())
            })
            .unwrap();
        }
        let err = img
            .code16_low(|a| {
                a.hlt()?;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, GuestError::LowMemoryFull { .. }), "{err}");
    }

    #[test]
    fn real_mode_prologue_far_jumps_to_the_code_right_after_it() {
        let mut img = MultibootImage::new();
        let entry = img
            .real_mode(|a| {
                a.hlt()?;
                Ok(())
            })
            .unwrap();
        let piece = &img.low[1];
        let mut d = Decoder::with_ip(
            16,
            &piece.bytes,
            u64::from(entry.pm16_entry),
            DecoderOptions::NONE,
        );
        let jmp = d.iter().find(|i| i.mnemonic() == Mnemonic::Jmp).unwrap();
        assert_eq!(jmp.far_branch_selector(), (entry.page >> 4) as u16);
        let real_ip = jmp.far_branch16() as usize;
        // The real-mode part starts by loading CS's value into the data segments.
        let mut d = Decoder::with_ip(
            16,
            &piece.bytes[real_ip..],
            real_ip as u64,
            DecoderOptions::NONE,
        );
        let first = d.decode();
        assert_eq!(first.mnemonic(), Mnemonic::Mov);
        assert_eq!(first.immediate16(), (entry.page >> 4) as u16);
    }

    #[test]
    fn building_without_an_entry_is_an_error() {
        assert!(matches!(
            MultibootImage::new().build(),
            Err(GuestError::NoEntry)
        ));
    }
}
