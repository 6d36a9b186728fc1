//! The loaders against Debian's stock cloud kernel (a bzImage with an LZ4
//! payload) and the vmlinux inside it. The kernel comes from
//! $VMPLAY_DEBIAN_KERNEL or <workspace>/guest-assets/debian/vmlinuz
//! (scripts/fetch-debian-kernel). Without it the tests skip, unless
//! VMPLAY_REQUIRE_ASSETS=1 (CI), where they fail.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};
use vmplay_boot::bzimage::BzImage;
use vmplay_boot::elf::ElfImage;
use vmplay_boot::unpack::{self, Compression};
use vmplay_boot::{Boot, BootConfig, KernelEntry, Protocol, layout};
use vmplay_hypervisor::{CpuState, GuestMemory};

const MEMORY: u64 = 256 << 20;
const INITRD_LEN: usize = (3 << 20) + 123;
const CMDLINE: &str = "console=ttyS0 panic=-1 cryptomgr.notests";

fn debian_kernel() -> Option<PathBuf> {
    let path = std::env::var_os("VMPLAY_DEBIAN_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest-assets/debian/vmlinuz")
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("VMPLAY_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!(
            "Debian kernel not found at {} and VMPLAY_REQUIRE_ASSETS=1",
            path.display()
        );
    }
    println!("skipping: Debian kernel not found (run scripts/fetch-debian-kernel)");
    None
}

/// A scratch file removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmplay-debian-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn initrd() -> TempFile {
    let bytes: Vec<u8> = (0..INITRD_LEN).map(|i| (i % 251) as u8).collect();
    TempFile::new("initrd", &bytes)
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap()
}

fn boot(kernel: &Path, initrd: &Path, entry: KernelEntry, mem: &GuestMemory) -> Boot {
    let config = BootConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: CMDLINE,
        entry,
        vcpus: 2,
        virtio_mmio: &[],
    };
    vmplay_boot::load(mem, &config).unwrap_or_else(|e| panic!("{e}"))
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

/// The vmlinux inside the bzImage, unpacked the way the loader does.
fn unpacked_vmlinux(bzimage: &[u8]) -> (Compression, Vec<u8>) {
    let bz = BzImage::parse(bzimage).unwrap();
    let payload = bz.payload().expect("Debian's bzImage has a payload");
    let compression = Compression::detect(payload);
    assert!(compression.supported(), "payload is {compression:?}");
    (compression, unpack::unpack(payload, MEMORY).unwrap())
}

/// Highest page-aligned start for the initrd below `limit`, clear of
/// `kernel` (which here always sits lower).
fn expected_initrd_start(limit: u64, kernel_end: u64) -> u64 {
    let start = (limit - INITRD_LEN as u64) & !0xfff;
    assert!(start >= kernel_end);
    start
}

#[test]
fn debian_bzimage_gets_its_zero_page_and_64_bit_entry() {
    let Some(kernel) = debian_kernel() else {
        return;
    };
    let file = std::fs::read(&kernel).unwrap();
    let initrd = initrd();
    let mem = memory();
    let b = boot(&kernel, &initrd.0, KernelEntry::BzImage, &mem);
    assert_eq!(b.protocol, Protocol::LinuxBzImage);

    let setup_size = (usize::from(file[0x1f1]).max(1) + 1) * 512;
    let header_end = 0x202 + usize::from(file[0x201]);
    let zp = read(&mem, layout::ZERO_PAGE, 4096);
    // The setup header is the file's, except the fields a loader writes.
    let written = [0x210..0x211, 0x214..0x220, 0x228..0x22c];
    for i in 0x1f1..header_end {
        if !written.iter().any(|r| r.contains(&i)) {
            assert_eq!(
                zp[i], file[i],
                "zero page byte {i:#x} differs from the file"
            );
        }
    }
    let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
    let hdr = params.hdr;
    assert!({ hdr.version } >= 0x20c);
    assert_eq!({ hdr.xloadflags } & 1, 1, "XLF_KERNEL_64");
    assert_eq!(hdr.type_of_loader, 0xff);
    let load = { hdr.pref_address };
    assert_eq!(u64::from(hdr.code32_start), load);
    assert_eq!(u64::from(hdr.cmd_line_ptr), layout::CMDLINE);
    assert_eq!(cstr(&mem, layout::CMDLINE), CMDLINE);

    // The protected-mode kernel at pref_address, byte for byte.
    assert_eq!(b.kernel, load..load + u64::from(hdr.init_size));
    let pm = &file[setup_size..];
    assert!(read(&mem, load, pm.len()) == pm, "kernel bytes differ");

    // Initrd: highest page-aligned place below initrd_addr_max and RAM.
    let limit = (u64::from(hdr.initrd_addr_max) + 1).min(MEMORY);
    let start = expected_initrd_start(limit, b.kernel.end);
    assert_eq!(b.initrd, Some(start..start + INITRD_LEN as u64));
    assert_eq!(u64::from(hdr.ramdisk_image), start);
    assert_eq!({ hdr.ramdisk_size } as usize, INITRD_LEN);
    assert_eq!(read(&mem, start, 4096), read_file_head(&initrd.0));

    let e820 = layout::e820_map(MEMORY);
    assert_eq!(usize::from(params.e820_entries), e820.len());
    let table = params.e820_table;
    for (z, e) in table.iter().zip(&e820) {
        assert_eq!(
            ({ z.addr }, { z.size }, { z.r#type }),
            (e.addr, e.size, e.kind as u32)
        );
    }
    assert_eq!({ params.acpi_rsdp_addr }, layout::RSDP);

    let st = &b.bsp_state;
    assert_eq!(st.rip, load + 0x200);
    assert_eq!(st.gpr[CpuState::RSI], layout::ZERO_PAGE);
    assert_eq!(
        (st.cs.selector, st.ds.selector, st.ss.selector),
        (0x10, 0x18, 0x18)
    );
    assert!(st.cs.l && st.efer & (1 << 10) != 0, "64-bit mode");
    assert_eq!(st.rflags & (1 << 9), 0, "IF clear");
}

fn read_file_head(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..4096].to_vec()
}

#[test]
fn debian_payload_unpacks_to_a_vmlinux_with_a_pvh_note() {
    let Some(kernel) = debian_kernel() else {
        return;
    };
    let file = std::fs::read(&kernel).unwrap();
    let (compression, vmlinux) = unpacked_vmlinux(&file);
    if compression == Compression::Lz4Legacy {
        // The kernel build appends the unpacked size; it must agree.
        let bz = BzImage::parse(&file).unwrap();
        let payload = bz.payload().unwrap();
        let trailer = u32::from_le_bytes(payload[payload.len() - 4..].try_into().unwrap());
        assert_eq!(trailer as usize, vmlinux.len());
    }
    let elf = ElfImage::parse(&vmlinux).unwrap();
    assert!(elf.class64);
    assert_eq!(elf.machine, vmplay_boot::elf::EM_X86_64);
    let pvh = elf.pvh_entry.expect("XEN_ELFNOTE_PHYS32_ENTRY (0x12) note");
    println!("PVH entry {pvh:#x}, e_entry {:#x}", elf.entry);
    let inside = |a: u64| {
        elf.segments
            .iter()
            .any(|s| s.paddr <= a && a < s.paddr + s.memsz)
    };
    assert!(inside(pvh), "PVH entry {pvh:#x} outside the segments");
    assert!(inside(elf.entry_paddr()), "e_entry outside the segments");
    assert!(pvh < 1 << 32);
}

#[test]
fn debian_kernel_boots_the_unpacked_vmlinux_via_pvh_by_default() {
    let Some(kernel) = debian_kernel() else {
        return;
    };
    let file = std::fs::read(&kernel).unwrap();
    let (compression, vmlinux) = unpacked_vmlinux(&file);
    let elf = ElfImage::parse(&vmlinux).unwrap();
    let initrd = initrd();
    let mem = memory();
    let b = boot(&kernel, &initrd.0, KernelEntry::Auto, &mem);
    assert_eq!(b.protocol, Protocol::Pvh);
    assert_eq!(b.unpacked, Some(compression));
    assert_eq!(b.kernel, elf.span());
    for s in &elf.segments {
        let n = s.filesz.min(0x1_0000) as usize;
        let want = &vmlinux[s.offset as usize..s.offset as usize + n];
        assert!(read(&mem, s.paddr, n) == want, "segment at {:#x}", s.paddr);
    }

    let st = &b.bsp_state;
    assert_eq!(st.rip, elf.pvh_entry.unwrap());
    assert_eq!(st.gpr[CpuState::RBX], layout::PVH_INFO);
    assert_eq!(st.cr0 & 0x8000_0001, 1, "protected mode, paging off");
    assert!(!st.cs.l && st.cs.db, "32-bit code segment");

    let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO)).unwrap();
    assert_eq!((info.magic, info.version), (0x336e_c578, 1));
    assert_eq!(info.rsdp_paddr, layout::RSDP);
    assert_eq!(cstr(&mem, info.cmdline_paddr), CMDLINE);
    assert_eq!(info.nr_modules, 1);
    let module: [u64; 2] = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    let start = expected_initrd_start(MEMORY, b.kernel.end);
    assert_eq!(module, [start, INITRD_LEN as u64]);
    assert_eq!(read(&mem, start, 4096), read_file_head(&initrd.0));
    let e820 = layout::e820_map(MEMORY);
    assert_eq!(info.memmap_entries as usize, e820.len());
    for (i, e) in e820.iter().enumerate() {
        let m: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
            .unwrap();
        assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind as u32));
    }
    assert_acpi_checksums(&mem, b.rsdp);
}

/// Walks the ACPI tables from the RSDP in guest memory, as the guest
/// would, and checks every checksum.
fn assert_acpi_checksums(mem: &GuestMemory, rsdp: u64) {
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    let r = read(mem, rsdp, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    let table = |addr: u64, sig: &[u8; 4]| -> Vec<u8> {
        let head = read(mem, addr, 8);
        assert_eq!(&head[..4], sig);
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    };
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let xsdt = table(u64_at(&r, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|at| u64_at(&xsdt, at))
        .collect();
    let mut seen = Vec::new();
    for addr in entries {
        let sig: [u8; 4] = read(mem, addr, 4).try_into().unwrap();
        let t = table(addr, &sig);
        if &sig == b"FACP" {
            table(u64_at(&t, 140), b"DSDT");
            seen.push(*b"DSDT");
        }
        seen.push(sig);
    }
    seen.sort();
    assert_eq!(seen, [*b"APIC", *b"DSDT", *b"FACP"]);
}

#[test]
fn debian_vmlinux_boots_with_the_64_bit_entry_when_asked() {
    let Some(kernel) = debian_kernel() else {
        return;
    };
    let (_, vmlinux) = unpacked_vmlinux(&std::fs::read(&kernel).unwrap());
    let elf = ElfImage::parse(&vmlinux).unwrap();
    let file = TempFile::new("vmlinux", &vmlinux);
    let initrd = initrd();
    let mem = memory();
    let b = boot(&file.0, &initrd.0, KernelEntry::BzImage, &mem);
    assert_eq!(b.protocol, Protocol::LinuxElf64);
    assert_eq!(b.bsp_state.rip, elf.entry_paddr());
    assert_eq!(b.bsp_state.gpr[CpuState::RSI], layout::ZERO_PAGE);
    let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
    let hdr = params.hdr;
    assert_eq!(({ hdr.boot_flag }, { hdr.header }), (0xaa55, 0x5372_6448));
    assert_eq!(u64::from(hdr.cmd_line_ptr), layout::CMDLINE);
    let initrd_range = b.initrd.unwrap();
    assert_eq!(u64::from(hdr.ramdisk_image), initrd_range.start);
    assert_eq!({ hdr.ramdisk_size } as usize, INITRD_LEN);
    assert_eq!({ params.acpi_rsdp_addr }, layout::RSDP);
    // And the same file with the default entry goes through PVH.
    let mem = memory();
    let b = boot(&file.0, &initrd.0, KernelEntry::Auto, &mem);
    assert_eq!((b.protocol, b.unpacked), (Protocol::Pvh, None));
}
