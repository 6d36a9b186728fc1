//! ACPI tables for a hardware-reduced PC: RSDP (v2) -> XSDT -> FADT ->
//! DSDT, and the MADT. Built with the `acpi_tables` crate; the MADT is
//! assembled by hand because that crate has no x86 interrupt source
//! override or local APIC NMI structures.
//!
//! The FADT points the sleep and reset registers at port I/O
//! ([`ports::ACPI_SLEEP_CONTROL_PORT`] and friends) so every backend sees
//! them the same way. The DSDT declares `\_S5`, the legacy serial port and
//! RTC, and one `LNRO0005` device per virtio-mmio transport, the only way
//! Debian's kernel finds virtio-mmio devices.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vmplay_devices::ports;

use crate::VirtioMmioSlot;
use crate::e820;
use crate::error::BootError;
use crate::layout;
use vmplay_hypervisor::GuestMemory;

pub const OEM_ID: [u8; 6] = *b"VMPLAY";
pub const OEM_TABLE_ID: [u8; 8] = *b"VMPLAYPC";
const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
pub const HYPERVISOR_VENDOR: [u8; 8] = *b"VMPLAY\0\0";

/// IAPC_BOOT_ARCH bits. "8042" stays clear (no keyboard controller to
/// probe) and so does "CMOS RTC not present": the RTC is there.
pub const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
pub const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
pub const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT flags: PCAT_COMPAT, dual 8259s present (the backends have them).
const MADT_PCAT_COMPAT: u32 = 1;
/// Most vCPUs the MADT can list with 8-bit xAPIC IDs (0xff is broadcast).
pub const MAX_VCPUS: u32 = 255;
/// Tables are placed at this alignment.
const TABLE_ALIGN: u64 = 16;

/// One table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// "RSDP", "XSDT", "FACP", "APIC" or "DSDT".
    pub name: &'static str,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The full set of tables, RSDP first, at their guest addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// The table called `name`.
    pub fn get(&self, name: &str) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Writes every table to guest memory.
    pub fn write(&self, memory: &GuestMemory) -> Result<(), BootError> {
        e820::zero(
            memory,
            "ACPI area",
            layout::ACPI_START,
            layout::ACPI_END - layout::ACPI_START,
        )?;
        for t in &self.tables {
            e820::write(memory, "ACPI table", t.addr, &t.bytes)?;
        }
        Ok(())
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    aml.to_aml_bytes(&mut out);
    out
}

fn align(addr: u64) -> u64 {
    addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Builds the tables for `vcpus` CPUs and the given virtio-mmio slots,
/// placed from [`layout::RSDP`] up.
pub fn build(vcpus: u32, virtio_mmio: &[VirtioMmioSlot]) -> Result<AcpiTables, BootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::Acpi(format!(
            "{vcpus} vCPUs; the MADT can describe 1 to {MAX_VCPUS}"
        )));
    }
    let dsdt = dsdt(virtio_mmio)?;
    let madt = madt(vcpus);

    let xsdt_addr = align(layout::RSDP + Rsdp::len() as u64);
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(BootError::Acpi(format!(
            "need {} bytes but only {} fit in [{:#x}, {:#x})",
            end - layout::RSDP,
            layout::ACPI_END - layout::RSDP,
            layout::RSDP,
            layout::ACPI_END
        )));
    }

    let fadt = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    Ok(AcpiTables {
        rsdp: layout::RSDP,
        tables: vec![
            AcpiTable {
                name: "RSDP",
                addr: layout::RSDP,
                bytes: rsdp,
            },
            AcpiTable {
                name: "XSDT",
                addr: xsdt_addr,
                bytes: xsdt,
            },
            AcpiTable {
                name: "FACP",
                addr: fadt_addr,
                bytes: fadt,
            },
            AcpiTable {
                name: "APIC",
                addr: madt_addr,
                bytes: madt.as_slice().to_vec(),
            },
            AcpiTable {
                name: "DSDT",
                addr: dsdt_addr,
                bytes: dsdt.as_slice().to_vec(),
            },
        ],
    })
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// FADT revision 6, hardware-reduced, reset and sleep registers in port I/O.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons: a hardware-reduced machine has none.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sci_int = (ports::ACPI_SCI_IRQ as u16).into();
    f.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED).into();
    f.reset_reg = io_register(ports::ACPI_RESET_PORT);
    f.reset_value = ports::ACPI_RESET_VALUE;
    f.sleep_control_reg = io_register(ports::ACPI_SLEEP_CONTROL_PORT);
    f.sleep_status_reg = io_register(ports::ACPI_SLEEP_STATUS_PORT);
    f.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    aml_bytes(&f.finalize())
}

/// MADT: local APIC address, one enabled local APIC per vCPU (ACPI UID =
/// APIC ID = vCPU index), the IOAPIC with GSI base 0, IRQ0 -> GSI2 as on
/// every PC, and LINT1 as NMI on all CPUs.
fn madt(vcpus: u32) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, layout::LAPIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    let mut body = Vec::new();
    for id in 0..vcpus as u8 {
        // Type 0, length 8: UID, APIC ID, flags (enabled).
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // Type 1, length 12: IOAPIC ID, reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Type 2, length 10: bus 0 (ISA), IRQ 0, GSI 2, flags 0 (bus default).
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Type 4, length 6: all processors (UID 0xff), flags 0, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&body);
    t
}

/// A named 4-character path (ACPI names are exactly four characters).
fn path(name: &str) -> aml::Path {
    aml::Path::new(name)
}

/// DSDT: `\_S5`, and in `\_SB` COM1, the RTC, the i8042 keyboard and the
/// virtio-mmio devices.
fn dsdt(virtio_mmio: &[VirtioMmioSlot]) -> Result<Sdt, BootError> {
    let s5_typ = ports::ACPI_S5_SLP_TYP;
    // SLP_TYPa, then SLP_TYPb and two reserved values, as QEMU writes it.
    let s5 = aml::Name::new(
        path("_S5_"),
        &aml::Package::new(vec![&s5_typ, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let com1_io = aml::IO::new(ports::COM1_PORT, ports::COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, ports::COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new(path("_HID"), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new(path("_UID"), &aml::ZERO);
    let com1_crs = aml::Name::new(path("_CRS"), &com1_crs);
    let com1 = aml::Device::new(path("COM1"), vec![&com1_hid, &com1_uid, &com1_crs]);

    let rtc_io = aml::IO::new(ports::RTC_PORT, ports::RTC_PORT, 1, 2);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, ports::RTC_IRQ);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid = aml::Name::new(path("_HID"), &aml::EISAName::new("PNP0B00"));
    let rtc_crs = aml::Name::new(path("_CRS"), &rtc_crs);
    let rtc = aml::Device::new(path("RTC_"), vec![&rtc_hid, &rtc_crs]);

    // The i8042 with its keyboard (Firecracker's `PS2_`): without it a
    // hardware-reduced ACPI guest never probes the controller, so it would
    // not see SendCtrlAltDel.
    let kbd_data = aml::IO::new(ports::I8042_DATA_PORT, ports::I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(ports::I8042_COMMAND_PORT, ports::I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, ports::I8042_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::Name::new(path("_HID"), &aml::EISAName::new("PNP0303"));
    let kbd_crs = aml::Name::new(path("_CRS"), &kbd_crs);
    let ps2 = aml::Device::new(path("PS2_"), vec![&kbd_hid, &kbd_crs]);

    let mut sb = aml_bytes(&com1);
    sb.extend(aml_bytes(&rtc));
    sb.extend(aml_bytes(&ps2));
    for (i, slot) in virtio_mmio.iter().enumerate() {
        sb.extend(virtio_device(i, slot)?);
    }

    let mut body = aml_bytes(&s5);
    body.extend(aml::Scope::raw(path("_SB_"), sb));
    // Revision 2: 64-bit AML integers.
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    Ok(t)
}

/// `Device(Vnnn) { _HID "LNRO0005", _UID n, _CCA 1, _CRS { Memory32Fixed,
/// Interrupt (edge, active high, exclusive) } }`, as Firecracker declares
/// virtio-mmio transports.
fn virtio_device(index: usize, slot: &VirtioMmioSlot) -> Result<Vec<u8>, BootError> {
    let bad = |why: String| BootError::Acpi(format!("virtio-mmio slot {index}: {why}"));
    if index > 0xfff {
        return Err(bad("more than 4096 virtio-mmio devices".into()));
    }
    let end = slot.addr.checked_add(slot.len);
    if slot.len == 0 || end.is_none_or(|e| e > 1 << 32) {
        return Err(bad(format!(
            "window [{:#x}, +{:#x}) must be non-empty and below 4 GiB",
            slot.addr, slot.len
        )));
    }
    if slot.gsi >= layout::IOAPIC_PINS {
        return Err(bad(format!(
            "GSI {} is past the IOAPIC's {} pins",
            slot.gsi,
            layout::IOAPIC_PINS
        )));
    }
    let hid = aml::Name::new(path("_HID"), &"LNRO0005");
    let uid = aml::Name::new(path("_UID"), &(index as u32));
    let cca = aml::Name::new(path("_CCA"), &aml::ONE);
    let mem = aml::Memory32Fixed::new(true, slot.addr as u32, slot.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, slot.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let crs = aml::Name::new(path("_CRS"), &crs);
    let name = format!("V{index:03X}");
    Ok(aml_bytes(&aml::Device::new(
        path(&name),
        vec![&hid, &uid, &cca, &crs],
    )))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    pub(crate) fn slots(n: usize) -> Vec<VirtioMmioSlot> {
        (0..n)
            .map(|i| VirtioMmioSlot {
                addr: layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
                len: layout::VIRTIO_MMIO_SIZE,
                gsi: layout::VIRTIO_GSI_START + i as u32,
            })
            .collect()
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let t = build(2, &slots(3)).unwrap();
        let rsdp = &t.get("RSDP").unwrap().bytes;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        for name in ["XSDT", "FACP", "APIC", "DSDT"] {
            let table = t.get(name).unwrap();
            assert_eq!(&table.bytes[..4], name.as_bytes());
            assert_eq!(
                u32_at(&table.bytes, 4) as usize,
                table.bytes.len(),
                "{name}"
            );
            assert_eq!(sum(&table.bytes), 0, "{name} checksum");
            assert_eq!(table.addr % TABLE_ALIGN, 0);
            assert!(table.addr + table.bytes.len() as u64 <= layout::ACPI_END);
        }
    }

    #[test]
    fn pointers_chain_from_rsdp_to_dsdt() {
        let t = build(1, &[]).unwrap();
        let rsdp = &t.get("RSDP").unwrap().bytes;
        let xsdt = t.get("XSDT").unwrap();
        assert_eq!(u64_at(rsdp, 24), xsdt.addr);
        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|at| u64_at(&xsdt.bytes, at))
            .collect();
        assert_eq!(
            entries,
            vec![t.get("FACP").unwrap().addr, t.get("APIC").unwrap().addr]
        );
        let fadt = &t.get("FACP").unwrap().bytes;
        assert_eq!(u64_at(fadt, 140), t.get("DSDT").unwrap().addr, "X_DSDT");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_port_io_registers() {
        let t = build(1, &[]).unwrap();
        let f = &t.get("FACP").unwrap().bytes;
        assert_eq!(f[8], 6, "revision");
        assert_eq!(f.len(), 276);
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let boot_arch = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(boot_arch & IAPC_CMOS_RTC_NOT_PRESENT, 0, "RTC is present");
        assert_ne!(boot_arch & IAPC_VGA_NOT_PRESENT, 0);
        assert_ne!(boot_arch & IAPC_MSI_NOT_SUPPORTED, 0);
        assert_eq!(
            u16::from_le_bytes([f[46], f[47]]),
            ports::ACPI_SCI_IRQ as u16
        );
        // GAS: space 1 (SystemIO), 8 bits, offset 0, byte access, address.
        let gas = |at: usize| (f[at], f[at + 1], f[at + 3], u64_at(f, at + 4));
        assert_eq!(gas(116), (1, 8, 1, u64::from(ports::ACPI_RESET_PORT)));
        assert_eq!(f[128], ports::ACPI_RESET_VALUE);
        assert_eq!(
            gas(244),
            (1, 8, 1, u64::from(ports::ACPI_SLEEP_CONTROL_PORT))
        );
        assert_eq!(
            gas(256),
            (1, 8, 1, u64::from(ports::ACPI_SLEEP_STATUS_PORT))
        );
        assert_eq!(&f[268..276], &HYPERVISOR_VENDOR);
    }

    #[test]
    fn madt_lists_each_vcpu_the_ioapic_override_and_nmi() {
        let t = build(3, &[]).unwrap();
        let m = &t.get("APIC").unwrap().bytes;
        assert_eq!(u32_at(m, 36), layout::LAPIC_START as u32);
        let mut at = 44;
        let mut entries = Vec::new();
        while at < m.len() {
            let (kind, len) = (m[at], m[at + 1] as usize);
            entries.push((kind, m[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, m.len(), "entries tile the table");
        let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
        assert_eq!(lapics.len(), 3);
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!((e[2], e[3], u32_at(e, 4)), (i as u8, i as u8, 1));
        }
        let ioapic = &entries.iter().find(|e| e.0 == 1).unwrap().1;
        assert_eq!(u32_at(ioapic, 4), layout::IOAPIC_START as u32);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
        let iso = &entries.iter().find(|e| e.0 == 2).unwrap().1;
        assert_eq!((iso[2], iso[3], u32_at(iso, 4)), (0, 0, 2), "IRQ0 -> GSI2");
        let nmi = &entries.iter().find(|e| e.0 == 4).unwrap().1;
        assert_eq!((nmi[2], nmi[5]), (0xff, 1), "all CPUs, LINT1");
    }

    #[test]
    fn dsdt_declares_s5_serial_rtc_and_virtio_devices() {
        let t = build(1, &slots(2)).unwrap();
        let d = &t.get("DSDT").unwrap().bytes;
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        // Name(_S5_, Package(4) { 5, ... })
        assert!(has(&[0x08, b'_', b'S', b'5', b'_', 0x12]));
        assert!(has(&[0x0a, ports::ACPI_S5_SLP_TYP]));
        assert!(has(b"COM1") && has(b"RTC_"));
        assert!(has(b"V000") && has(b"V001") && !has(b"V002"));
        assert!(has(b"LNRO0005\0"));
        // Memory32Fixed(ReadWrite, base, len) of the second slot.
        let s = &slots(2)[1];
        let mut mem = vec![0x86, 9, 0, 1];
        mem.extend_from_slice(&(s.addr as u32).to_le_bytes());
        mem.extend_from_slice(&(s.len as u32).to_le_bytes());
        assert!(has(&mem));
        // Extended interrupt: consumer, edge, active high, exclusive, its GSI.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&s.gsi.to_le_bytes());
        assert!(has(&irq));
    }

    #[test]
    fn rejects_bad_vcpu_counts_and_slots() {
        assert!(build(0, &[]).is_err());
        assert!(build(MAX_VCPUS + 1, &[]).is_err());
        assert!(build(MAX_VCPUS, &[]).is_ok());
        let mut s = slots(1);
        s[0].gsi = layout::IOAPIC_PINS;
        let err = build(1, &s).unwrap_err().to_string();
        assert!(err.contains("GSI 24"), "{err}");
        let mut s = slots(1);
        s[0].addr = u64::MAX - 1;
        assert!(build(1, &s).is_err());
    }

    #[test]
    fn rejects_tables_that_overflow_the_acpi_area() {
        let mut many = slots(4000);
        for s in &mut many {
            s.gsi = layout::VIRTIO_GSI_START;
        }
        let err = build(1, &many).unwrap_err().to_string();
        assert!(err.starts_with("ACPI tables: need"), "{err}");
    }
}
