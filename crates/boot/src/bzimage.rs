//! bzImage kernels and the Linux zero page (`boot_params`), for the
//! 64-bit boot protocol (Documentation/arch/x86/boot.rst): the setup
//! header is checked and copied, the protected-mode part is loaded at its
//! preferred address and the CPU enters at load address + 0x200.

use std::ops::Range;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::ByteValued;

use crate::e820::{self, RamMap};
use crate::error::KernelProblem;
use crate::layout;

/// `HdrS` at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// Where the setup header starts in the file and in the zero page.
const SETUP_HEADER: usize = 0x1f1;
/// loadflags: the protected-mode code loads at 0x100000 (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// xloadflags: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Boot protocol 2.06 introduced `cmdline_size`; earlier kernels take 255.
const OLD_CMDLINE_MAX: usize = 255;

/// Whether `data` looks like a bzImage: boot flag and `HdrS` magic.
pub fn is_bzimage(data: &[u8]) -> bool {
    data.len() >= 0x206
        && u16::from_le_bytes([data[0x1fe], data[0x1ff]]) == BOOT_FLAG
        && u32::from_le_bytes(data[0x202..0x206].try_into().unwrap()) == HDRS_MAGIC
}

/// A checked bzImage.
#[derive(Debug, Clone)]
pub struct BzImage<'a> {
    /// The setup header as the file has it (bytes beyond what this kernel's
    /// header covers are zero).
    pub header: setup_header,
    /// Number of header bytes the file defines, from 0x1f1.
    pub header_len: usize,
    /// The protected-mode kernel: everything after the setup sectors.
    pub kernel: &'a [u8],
}

impl<'a> BzImage<'a> {
    /// Checks the header and splits off the protected-mode part.
    pub fn parse(data: &'a [u8]) -> Result<Self, KernelProblem> {
        let sectors = match data[SETUP_HEADER] {
            0 => 4,
            n => u32::from(n),
        };
        let setup_size = (sectors as usize + 1) * 512;
        if data.len() <= setup_size {
            return Err(KernelProblem::TruncatedSetup {
                sectors,
                len: data.len() as u64,
            });
        }
        // The header ends at 0x202 + the jump offset at 0x201.
        let end = (0x202 + usize::from(data[0x201]))
            .min(SETUP_HEADER + std::mem::size_of::<setup_header>());
        let mut header = setup_header::default();
        header.as_mut_slice()[..end - SETUP_HEADER].copy_from_slice(&data[SETUP_HEADER..end]);
        let version = header.version;
        if version < 0x206 {
            return Err(KernelProblem::OldProtocol { version });
        }
        if header.loadflags & LOADED_HIGH == 0 {
            return Err(KernelProblem::NotLoadedHigh {
                loadflags: header.loadflags,
            });
        }
        // xloadflags exists from 2.12; older kernels always had the entry.
        if version >= 0x20c && header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(KernelProblem::No64BitEntry {
                xloadflags: header.xloadflags,
            });
        }
        let kernel = &data[setup_size..];
        let expected = u64::from(header.syssize) * 16;
        if (kernel.len() as u64) < expected {
            return Err(KernelProblem::TruncatedKernel {
                expected,
                actual: kernel.len() as u64,
            });
        }
        // payload_offset/length exist from 2.08.
        if version >= 0x208 {
            let (offset, length) = (
                u64::from(header.payload_offset),
                u64::from(header.payload_length),
            );
            if offset + length > kernel.len() as u64 {
                return Err(KernelProblem::TruncatedPayload {
                    offset,
                    length,
                    actual: kernel.len() as u64,
                });
            }
        }
        Ok(BzImage {
            header,
            header_len: end - SETUP_HEADER,
            kernel,
        })
    }

    /// The compressed vmlinux, when the header says where it is.
    pub fn payload(&self) -> Option<&'a [u8]> {
        let h = &self.header;
        if h.version < 0x208 || h.payload_length == 0 {
            return None;
        }
        let start = h.payload_offset as usize;
        Some(&self.kernel[start..start + h.payload_length as usize])
    }

    /// Where the protected-mode part goes: `pref_address` (2.10+), else
    /// the classic 1 MiB.
    pub fn load_address(&self) -> u64 {
        if self.header.version >= 0x20a {
            self.header.pref_address
        } else {
            layout::HIGH_RAM_START
        }
    }

    /// The memory the kernel needs from its load address while it
    /// decompresses and runs (`init_size`, 2.10+).
    pub fn footprint(&self) -> Range<u64> {
        let start = self.load_address();
        let init = if self.header.version >= 0x20a {
            u64::from(self.header.init_size)
        } else {
            0
        };
        start..start + init.max(self.kernel.len() as u64)
    }

    /// The longest command line (without the NUL) this kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        self.header.cmdline_size as usize
    }

    /// The highest address the initrd may end at (exclusive).
    pub fn initrd_limit(&self) -> u64 {
        u64::from(self.header.initrd_addr_max) + 1
    }
}

/// A setup header for a kernel that has none (an ELF vmlinux entered at
/// `startup_64`): what a bzImage of the same generation would carry.
pub fn synthetic_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        version: 0x20f,
        loadflags: LOADED_HIGH,
        xloadflags: XLF_KERNEL_64,
        kernel_alignment: 0x20_0000,
        initrd_addr_max: 0x7fff_ffff,
        cmdline_size: (layout::CMDLINE_MAX - 1) as u32,
        ..Default::default()
    }
}

/// Fills in the zero page around `header`: the loader's fields in the
/// header, the E820 table and the RSDP address.
pub fn zero_page(
    mut header: setup_header,
    map: &RamMap,
    initrd: Option<Range<u64>>,
    rsdp: u64,
) -> boot_params {
    header.type_of_loader = LOADER_UNDEFINED;
    header.cmd_line_ptr = layout::CMDLINE as u32;
    let (image, size) = initrd.map_or((0, 0), |r| (r.start, r.end - r.start));
    header.ramdisk_image = image as u32;
    header.ramdisk_size = size as u32;
    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    // Initrds are placed below 4 GiB, so the ext_ fields stay zero.
    let mut table = params.e820_table;
    for (slot, e) in table.iter_mut().zip(&map.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_table = table;
    params.e820_entries = map.e820.len().min(table.len()) as u8;
    params
}

/// The cmdline limit for a header: `cmdline_size` from 2.06, 255 before.
pub fn cmdline_limit(header: &setup_header) -> usize {
    if header.version >= 0x206 {
        header.cmdline_size as usize
    } else {
        OLD_CMDLINE_MAX
    }
}

/// Writes the zero page at [`layout::ZERO_PAGE`].
pub fn write_zero_page(
    memory: &vmplay_hypervisor::GuestMemory,
    params: &boot_params,
) -> Result<(), crate::error::BootError> {
    e820::write(memory, "zero page", layout::ZERO_PAGE, params.as_slice())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bzImage-shaped file: `sectors` setup sectors, then `kernel`.
    /// Protocol 2.15, pref_address 16 MiB, payload = the whole kernel
    /// minus a 0x100-byte stub in front.
    pub(crate) fn fake_bzimage(sectors: u8, kernel: &[u8]) -> Vec<u8> {
        let setup = (usize::from(sectors).max(1) + 1) * 512;
        let mut data = vec![0u8; setup];
        data[0x1f1] = sectors;
        data[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        data[0x200] = 0xeb;
        data[0x201] = 0x6a; // header ends at 0x26c
        data[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        data[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        data[0x211] = LOADED_HIGH;
        let put32 = |d: &mut Vec<u8>, at: usize, v: u32| {
            d[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        put32(&mut data, 0x1f4, (kernel.len() / 16) as u32); // syssize
        put32(&mut data, 0x214, 0x10_0000); // code32_start
        put32(&mut data, 0x22c, 0x7fff_ffff); // initrd_addr_max
        put32(&mut data, 0x230, 0x20_0000); // kernel_alignment
        data[0x234] = 1; // relocatable
        data[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        put32(&mut data, 0x238, 2047); // cmdline_size
        let payload_offset = 0x100.min(kernel.len());
        put32(&mut data, 0x248, payload_offset as u32);
        put32(&mut data, 0x24c, (kernel.len() - payload_offset) as u32);
        data[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        put32(&mut data, 0x260, 0x40_0000); // init_size
        data.extend_from_slice(kernel);
        data
    }

    #[test]
    fn recognises_bzimage_by_boot_flag_and_magic() {
        let data = fake_bzimage(4, &[0u8; 0x1000]);
        assert!(is_bzimage(&data));
        let mut bad = data.clone();
        bad[0x1fe] = 0;
        assert!(!is_bzimage(&bad));
        assert!(!is_bzimage(&data[..0x205]));
    }

    #[test]
    fn rejects_truncated_bzimage() {
        let data = fake_bzimage(39, &[0u8; 0x1000]);
        let err = BzImage::parse(&data[..1024]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "truncated: setup header says 39 setup sectors but file has 1024 bytes"
        );
    }

    #[test]
    fn rejects_bzimage_shorter_than_syssize() {
        let data = fake_bzimage(4, &[0u8; 0x1000]);
        let err = BzImage::parse(&data[..data.len() - 0x10]).unwrap_err();
        assert_eq!(
            err,
            KernelProblem::TruncatedKernel {
                expected: 0x1000,
                actual: 0xff0
            }
        );
    }

    #[test]
    fn rejects_payload_past_end_of_file() {
        let mut data = fake_bzimage(4, &[0u8; 0x1000]);
        data[0x1f4..0x1f8].fill(0); // syssize 0: only the payload check is left
        data[0x24c..0x250].copy_from_slice(&0x2000u32.to_le_bytes());
        let err = BzImage::parse(&data).unwrap_err();
        assert!(
            matches!(err, KernelProblem::TruncatedPayload { length: 0x2000, .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_old_boot_protocol() {
        let mut data = fake_bzimage(4, &[0u8; 0x1000]);
        data[0x206..0x208].copy_from_slice(&0x204u16.to_le_bytes());
        let err = BzImage::parse(&data).unwrap_err();
        assert_eq!(
            err.to_string(),
            "boot protocol 2.04 is too old: the 64-bit entry needs 2.06 or later"
        );
    }

    #[test]
    fn rejects_kernel_without_64_bit_entry() {
        let mut data = fake_bzimage(4, &[0u8; 0x1000]);
        data[0x236] = 0;
        assert_eq!(
            BzImage::parse(&data).unwrap_err(),
            KernelProblem::No64BitEntry { xloadflags: 0 }
        );
    }

    #[test]
    fn rejects_zimage() {
        let mut data = fake_bzimage(4, &[0u8; 0x1000]);
        data[0x211] = 0;
        assert!(matches!(
            BzImage::parse(&data),
            Err(KernelProblem::NotLoadedHigh { .. })
        ));
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let mut data = fake_bzimage(4, &[7u8; 0x1000]);
        data[0x1f1] = 0;
        let bz = BzImage::parse(&data).unwrap();
        assert_eq!(bz.kernel.len(), 0x1000);
        assert!(bz.kernel.iter().all(|&b| b == 7));
    }

    #[test]
    fn copies_the_setup_header_the_file_declares() {
        let data = fake_bzimage(4, &[0u8; 0x1000]);
        let bz = BzImage::parse(&data).unwrap();
        assert_eq!(bz.header_len, 0x26c - 0x1f1);
        assert_eq!(
            bz.header.as_slice()[..bz.header_len],
            data[0x1f1..0x26c],
            "header copied byte for byte"
        );
        assert_eq!(bz.load_address(), 0x100_0000);
        assert_eq!(bz.footprint(), 0x100_0000..0x140_0000);
        assert_eq!(bz.payload().unwrap().len(), 0x1000 - 0x100);
        assert_eq!(bz.cmdline_max(), 2047);
    }

    #[test]
    fn zero_page_carries_loader_fields_and_e820() {
        let data = fake_bzimage(4, &[0u8; 0x1000]);
        let bz = BzImage::parse(&data).unwrap();
        let map = RamMap::with_total(256 << 20).unwrap();
        let zp = zero_page(bz.header, &map, Some(0xff0_0000..0xff0_1000), layout::RSDP);
        let hdr = zp.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE as u32);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0xff0_0000, 0x1000)
        );
        assert_eq!({ hdr.pref_address }, 0x100_0000, "rest of header kept");
        assert_eq!({ zp.acpi_rsdp_addr }, layout::RSDP);
        assert_eq!(usize::from(zp.e820_entries), map.e820.len());
        let table = zp.e820_table;
        for (z, e) in table.iter().zip(&map.e820) {
            assert_eq!(
                ({ z.addr }, { z.size }, { z.r#type }),
                (e.addr, e.size, e.kind as u32)
            );
        }
        // The raw bytes sit where the boot protocol says.
        let bytes = zp.as_slice();
        assert_eq!(bytes[0x210], 0xff);
        assert_eq!(
            &bytes[0x228..0x22c],
            &(layout::CMDLINE as u32).to_le_bytes()
        );
        assert_eq!(&bytes[0x70..0x78], &layout::RSDP.to_le_bytes());
        assert_eq!(bytes[0x1e8] as usize, map.e820.len());
        assert_eq!(&bytes[0x2d0..0x2d8], &0u64.to_le_bytes());
        assert_eq!(
            &bytes[0x2e0..0x2e4],
            &1u32.to_le_bytes(),
            "first entry is RAM"
        );
    }
}
