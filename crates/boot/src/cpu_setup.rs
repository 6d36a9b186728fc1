//! The CPU state a kernel is entered with, and the tables it points at:
//! a flat GDT, a TSS for TR and, for 64-bit entries, identity page tables.
//!
//! The backends load the returned [`CpuState`] as is (hidden segment state
//! included), so each segment register here must match the GDT descriptor
//! its selector names: a kernel that reloads a selector gets the same
//! segment back.

use vmplay_hypervisor::{CpuState, DescriptorTable, Segment};

use crate::e820::{self, write};
use crate::error::BootError;
use crate::layout;
use vmplay_hypervisor::GuestMemory;

/// `__BOOT_CS`: the Linux boot protocol wants the code segment here.
pub const CODE_SELECTOR: u16 = 0x10;
/// `__BOOT_DS`.
pub const DATA_SELECTOR: u16 = 0x18;
/// The TSS descriptor (16 bytes in long mode, so it comes last).
pub const TSS_SELECTOR: u16 = 0x20;
/// GDT slots: null, unused, code, data, TSS (two slots).
const GDT_SLOTS: usize = layout::BOOT_GDT_SIZE as usize / 8;
/// A TSS without an I/O permission bitmap is 0x68 bytes.
const TSS_LIMIT: u32 = 0x67;
/// Offset of the I/O map base field in both the 32- and 64-bit TSS.
const TSS_IOMAP_BASE: usize = 0x66;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 always reads as one; everything else (IF included) clear.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
/// Each page directory entry maps 2 MiB.
const HUGE_PAGE: u64 = 2 << 20;

/// The CPU mode a kernel is entered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit mode with paging on (Linux 64-bit boot protocol).
    Long,
    /// 32-bit protected mode, paging off (PVH, multiboot).
    Protected32,
}

/// The flat code segment for `mode`.
pub fn code_segment(mode: EntryMode) -> Segment {
    match mode {
        // Execute/read, accessed; L=1 and D=0 as long mode requires.
        EntryMode::Long => Segment::flat(CODE_SELECTOR, 0xb, true, false),
        EntryMode::Protected32 => Segment::flat(CODE_SELECTOR, 0xb, false, true),
    }
}

/// The flat read/write data segment (accessed, so no CPU write-back).
pub fn data_segment() -> Segment {
    Segment::flat(DATA_SELECTOR, 0x3, false, true)
}

/// The busy TSS that TR holds (type 0xb is "busy" for both the 32-bit
/// and the 64-bit TSS, which is what a loaded TR must be).
pub fn tss_segment() -> Segment {
    Segment::tss(TSS_SELECTOR, layout::BOOT_TSS, TSS_LIMIT)
}

/// Encodes a code, data or system segment as an 8-byte descriptor (the
/// low half of a 16-byte long-mode system descriptor).
pub fn encode_descriptor(s: &Segment) -> u64 {
    let limit = if s.g { s.limit >> 12 } else { s.limit };
    let base = s.base;
    let access = u64::from(s.type_ & 0xf)
        | u64::from(s.s) << 4
        | u64::from(s.dpl & 3) << 5
        | u64::from(s.present) << 7;
    let flags = u64::from(s.avl) | u64::from(s.l) << 1 | u64::from(s.db) << 2 | u64::from(s.g) << 3;
    u64::from(limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | u64::from((limit >> 16) & 0xf) << 48
        | flags << 52
        | ((base >> 24) & 0xff) << 56
}

/// The GDT for `mode`, slot by slot.
pub fn gdt(mode: EntryMode) -> [u64; GDT_SLOTS] {
    let tss = tss_segment();
    let tss_high = match mode {
        // The upper half of a 16-byte system descriptor: base bits 63:32.
        EntryMode::Long => tss.base >> 32,
        // In 32-bit mode the slot is just an unused null descriptor.
        EntryMode::Protected32 => 0,
    };
    [
        0,
        0,
        encode_descriptor(&code_segment(mode)),
        encode_descriptor(&data_segment()),
        encode_descriptor(&tss),
        tss_high,
    ]
}

/// Writes the GDT and TSS (and page tables for long mode), and returns
/// the entry state for `mode` with `rip` = `entry`. General registers are
/// left to the caller, except RSP, which points at [`layout::BOOT_STACK_TOP`].
pub fn setup(memory: &GuestMemory, mode: EntryMode, entry: u64) -> Result<CpuState, BootError> {
    let table = gdt(mode);
    let bytes: Vec<u8> = table.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(memory, "GDT", layout::BOOT_GDT, &bytes)?;

    let mut tss = [0u8; TSS_LIMIT as usize + 1];
    // I/O map base past the limit: no I/O permission bitmap.
    tss[TSS_IOMAP_BASE..TSS_IOMAP_BASE + 2].copy_from_slice(&(TSS_LIMIT as u16 + 1).to_le_bytes());
    write(memory, "TSS", layout::BOOT_TSS, &tss)?;

    let data = data_segment();
    let mut state = CpuState {
        rip: entry,
        rflags: RFLAGS_RESERVED,
        cs: code_segment(mode),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss_segment(),
        ldt: Segment::no_ldt(),
        gdt: DescriptorTable {
            base: layout::BOOT_GDT,
            limit: (bytes.len() - 1) as u16,
        },
        // No IDT: interrupts are off and the kernel installs its own
        // before it enables them.
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: CR0_PE | CR0_ET,
        ..CpuState::default()
    };
    state.gpr[CpuState::RSP] = layout::BOOT_STACK_TOP;
    if mode == EntryMode::Long {
        write_identity_page_tables(memory)?;
        state.cr0 |= CR0_NE | CR0_PG;
        state.cr3 = layout::PML4;
        state.cr4 = CR4_PAE;
        state.efer = EFER_LME | EFER_LMA;
    }
    Ok(state)
}

/// Identity-maps the low 4 GiB with 2 MiB pages: `PML4[0]` -> PDPT,
/// `PDPT[0..4]` -> the four page directories at [`layout::PD`].
pub fn write_identity_page_tables(memory: &GuestMemory) -> Result<(), BootError> {
    let table = |entries: &mut dyn Iterator<Item = u64>| -> Vec<u8> {
        let mut page = vec![0u8; e820::PAGE_SIZE as usize];
        for (slot, entry) in page.chunks_exact_mut(8).zip(entries) {
            slot.copy_from_slice(&entry.to_le_bytes());
        }
        page
    };
    let link = PTE_PRESENT | PTE_WRITABLE;
    write(
        memory,
        "PML4",
        layout::PML4,
        &table(&mut std::iter::once(layout::PDPT | link)),
    )?;
    write(
        memory,
        "PDPT",
        layout::PDPT,
        &table(&mut (0..layout::PD_COUNT).map(|i| (layout::PD + i * 0x1000) | link)),
    )?;
    for pd in 0..layout::PD_COUNT {
        let first = pd * 512;
        let mut entries = (first..first + 512).map(|i| (i * HUGE_PAGE) | link | PTE_HUGE);
        write(
            memory,
            "page directory",
            layout::PD + pd * 0x1000,
            &table(&mut entries),
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    pub(crate) fn memory(size: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// Decodes an 8-byte descriptor the way the CPU loads it into a
    /// segment register (independently of `encode_descriptor`).
    pub(crate) fn decode(selector: u16, d: u64, high: u64) -> Segment {
        let raw_limit = (d & 0xffff) | ((d >> 48) & 0xf) << 16;
        let g = d >> 55 & 1 == 1;
        let s = d >> 44 & 1 == 1;
        let mut base = ((d >> 16) & 0xff_ffff) | ((d >> 56) & 0xff) << 24;
        if !s {
            base |= high << 32;
        }
        Segment {
            selector,
            base,
            limit: if g {
                ((raw_limit << 12) | 0xfff) as u32
            } else {
                raw_limit as u32
            },
            type_: (d >> 40 & 0xf) as u8,
            s,
            dpl: (d >> 45 & 3) as u8,
            present: d >> 47 & 1 == 1,
            avl: d >> 52 & 1 == 1,
            l: d >> 53 & 1 == 1,
            db: d >> 54 & 1 == 1,
            g,
            unusable: false,
        }
    }

    /// Checks every segment register of `state` against the GDT in memory.
    pub(crate) fn assert_segments_match_gdt(memory: &GuestMemory, state: &CpuState) {
        let mut gdt = vec![0u8; usize::from(state.gdt.limit) + 1];
        memory
            .read_slice(&mut gdt, GuestAddress(state.gdt.base))
            .unwrap();
        let slot = |sel: u16| {
            let i = usize::from(sel & !7);
            let at = |i: usize| u64::from_le_bytes(gdt[i..i + 8].try_into().unwrap());
            (at(i), if i + 16 <= gdt.len() { at(i + 8) } else { 0 })
        };
        for (name, seg) in [
            ("cs", state.cs),
            ("ds", state.ds),
            ("es", state.es),
            ("fs", state.fs),
            ("gs", state.gs),
            ("ss", state.ss),
            ("tr", state.tr),
        ] {
            let (lo, hi) = slot(seg.selector);
            assert_eq!(decode(seg.selector, lo, hi), seg, "{name} vs its GDT slot");
        }
    }

    #[test]
    fn long_mode_code_descriptor_is_the_canonical_one() {
        // The values every 64-bit loader (Linux's own GDT included) uses.
        assert_eq!(gdt(EntryMode::Long)[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt(EntryMode::Long)[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt(EntryMode::Protected32)[2], 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn gdt_descriptors_decode_to_the_entry_segments() {
        for mode in [EntryMode::Long, EntryMode::Protected32] {
            let mem = memory(2 << 20);
            let state = setup(&mem, mode, 0x100_0000).unwrap();
            assert_segments_match_gdt(&mem, &state);
            assert_eq!(state.cs.selector, CODE_SELECTOR);
            assert_eq!(state.ds.selector, DATA_SELECTOR);
            assert_eq!(state.tr.type_, 0xb, "TR must hold a busy TSS");
            assert!(state.gdt.base + u64::from(state.gdt.limit) < layout::BOOT_TSS);
        }
    }

    #[test]
    fn tss_has_no_io_bitmap() {
        let mem = memory(2 << 20);
        setup(&mem, EntryMode::Protected32, 0).unwrap();
        let iomap: u16 = mem
            .read_obj(GuestAddress(layout::BOOT_TSS + TSS_IOMAP_BASE as u64))
            .unwrap();
        assert_eq!(u32::from(iomap), TSS_LIMIT + 1);
    }

    #[test]
    fn long_mode_state_enables_paging_with_pae() {
        let mem = memory(2 << 20);
        let s = setup(&mem, EntryMode::Long, 0x1234).unwrap();
        assert_eq!(s.rip, 0x1234);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4);
        assert_eq!(s.rflags & (1 << 9), 0, "interrupts must be off");
        assert!(s.cs.l && !s.cs.db);
    }

    #[test]
    fn protected_mode_state_has_paging_off() {
        let mem = memory(2 << 20);
        let s = setup(&mem, EntryMode::Protected32, 0x10_0000).unwrap();
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert!(!s.cs.l && s.cs.db);
        assert_eq!(s.rflags, 2);
    }

    /// Walks the page tables in guest memory like the MMU does.
    fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
        let read = |addr: u64| -> u64 { mem.read_obj(GuestAddress(addr)).unwrap() };
        let pml4e = read(cr3 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 0x1ff) * 8);
        if pde & PTE_PRESENT == 0 || pde & PTE_HUGE == 0 {
            return None;
        }
        Some((pde & 0x000f_ffff_ffe0_0000) | (va & (HUGE_PAGE - 1)))
    }

    #[test]
    fn page_tables_identity_map_the_low_4_gib() {
        let mem = memory(2 << 20);
        let s = setup(&mem, EntryMode::Long, 0).unwrap();
        for va in [
            0,
            0x7000,
            0x1ff_fff8,
            0x100_0200,
            0xd000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, s.cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, s.cr3, 1 << 32), None);
        let pde: u64 = mem.read_obj(GuestAddress(layout::PD + 8)).unwrap();
        assert_eq!(pde & PTE_WRITABLE, PTE_WRITABLE);
    }
}
