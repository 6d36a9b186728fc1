//! The guest-physical memory map and the fixed addresses every part of the
//! machine agrees on. One place, so loaders, ACPI tables and devices can
//! never disagree about where something lives.

/// Real-mode IVT and BIOS data area; left zeroed.
pub const LOW_RAM_START: u64 = 0;
/// Loader-owned structures live in low memory below the EBDA.
pub const BOOT_GDT: u64 = 0x500;
/// The loaders' GDT: null, unused, code (0x10), data (0x18) and a 16-byte
/// TSS descriptor (0x20). It covers `BOOT_IDT`, which the loaders leave
/// unused: they enter kernels with no IDT (IDTR limit 0, interrupts off).
pub const BOOT_GDT_SIZE: u64 = 0x30;
pub const BOOT_IDT: u64 = 0x520;
/// The TSS the loaders point TR at (PVH requires a valid one).
pub const BOOT_TSS: u64 = 0x580;
/// PVH `hvm_start_info`, its module list and memory map.
pub const PVH_INFO: u64 = 0x6000;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Multiboot information structure and what it points to.
pub const MULTIBOOT_INFO: u64 = 0x8000;
/// Identity page tables for a long-mode entry: PML4, PDPT, then PDs.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Number of page directories after `PD`: 4 cover the low 4 GiB with 2 MiB pages.
pub const PD_COUNT: u64 = 4;
/// The kernel command line (at most `CMDLINE_MAX` bytes with its NUL).
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Initial stack for entries that need one (multiboot, test guests).
pub const BOOT_STACK_TOP: u64 = 0x8_0000;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// The BIOS area where Linux looks for the RSDP; ACPI tables follow it.
pub const ACPI_START: u64 = 0xe_0000;
pub const RSDP: u64 = ACPI_START;
pub const ACPI_END: u64 = 0x10_0000;
/// Extended memory: where 32-bit kernels and initrds go.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// The default load address of a bzImage's protected-mode kernel.
pub const KERNEL_START: u64 = 0x100_0000;

/// The 32-bit MMIO hole: [MMIO_HOLE_START, 4 GiB) is never RAM. It starts
/// at 3 GiB, as Firecracker's (1 GiB below 4 GiB), so its boot-timer page
/// at [`BOOT_TIMER_START`] is MMIO whatever the RAM size.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Firecracker's boot-timer device (`--boot-timer`): one page at the start
/// of the hole.
pub const BOOT_TIMER_START: u64 = MMIO_HOLE_START;
/// virtio-mmio transports, one 4 KiB window each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (ISA IRQs stay below).
pub const VIRTIO_GSI_START: u32 = 5;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM on Intel needs three pages for the real-mode TSS and one for the
/// identity map, inside guest-physical space but outside RAM.
pub const KVM_TSS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (GSIs).
pub const IOAPIC_PINS: u32 = 24;

/// One range of the guest-physical map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// E820 range types (the numbers are the BIOS ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

/// Guest RAM split around the MMIO hole: `(start, size)` ranges, in order.
/// `memory` bytes in total; below the hole first, the rest above 4 GiB.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    let low = memory.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if memory > low {
        ranges.push((MMIO_HOLE_END, memory - low));
    }
    ranges
}

/// The E820 map the guest sees for `memory` bytes of RAM.
pub fn e820_map(memory: u64) -> Vec<E820Entry> {
    let ranges = ram_ranges(memory);
    let (_, low) = ranges[0];
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_RAM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    if low > HIGH_RAM_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: low - HIGH_RAM_START,
            kind: E820Kind::Ram,
        });
    }
    if let Some(&(addr, size)) = ranges.get(1) {
        map.push(E820Entry {
            addr,
            size,
            kind: E820Kind::Ram,
        });
    }
    map
}

/// Smallest RAM vmplay accepts: room for the loader structures, ACPI
/// tables and a kernel at 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let mem = 8u64 << 30;
        let r = ram_ranges(mem);
        assert_eq!(
            r,
            vec![(0, MMIO_HOLE_START), (1 << 32, mem - MMIO_HOLE_START)]
        );
        let ram: u64 = e820_map(mem)
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (HIGH_RAM_START - EBDA_START));
    }

    #[test]
    fn fixed_structures_sit_in_usable_low_ram() {
        for addr in [
            BOOT_GDT,
            PVH_INFO,
            ZERO_PAGE,
            MULTIBOOT_INFO,
            PML4,
            PD,
            CMDLINE,
        ] {
            assert!(addr < EBDA_START);
        }
        const { assert!(PD + PD_COUNT * 0x1000 <= CMDLINE) };
        const { assert!(BOOT_GDT + BOOT_GDT_SIZE <= BOOT_TSS) };
    }
}
