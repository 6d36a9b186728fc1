//! The ACPI tables disassemble cleanly with ACPICA's `iasl`, the same
//! parser family Linux uses, and the DSDT recompiles from its disassembly.
//! Skips (with the reason) when iasl is missing, unless
//! VMPLAY_REQUIRE_ASSETS=1, as in CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmplay_boot::{VirtioMmioSlot, acpi, layout};

fn iasl_or_skip() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("iasl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("VMPLAY_REQUIRE_ASSETS").as_deref() == Ok("1") {
            panic!("iasl not found and VMPLAY_REQUIRE_ASSETS=1 (install acpica-tools)");
        }
        println!(
            "skipping: iasl not found (install acpica-tools or run scripts/fetch-debian-kernel)"
        );
    }
    found
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmplay-iasl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What iasl says about a table it dislikes. It exits 0 even for bad
/// checksums and malformed AML, so its text is what tells.
const COMPLAINTS: [&str; 5] = ["Error", "Warning", "Incorrect", "Invalid", "Unknown"];

/// Runs iasl in `dir`; fails the test on a non-zero exit or a complaint
/// in its output. Returns the output.
fn iasl(iasl: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(iasl)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    assert_no_complaints(&text, &format!("iasl {args:?}"));
    text
}

fn assert_no_complaints(text: &str, what: &str) {
    for line in text.lines() {
        // The compiler's summary line counts them: "0 Errors, 0 Warnings".
        if line.contains("Errors,") && line.contains(" 0 Errors") && line.contains(" 0 Warnings") {
            continue;
        }
        if let Some(word) = COMPLAINTS.iter().find(|w| line.contains(*w)) {
            panic!("{what}: iasl says {word:?}:\n{line}\n---\n{text}");
        }
    }
}

fn slots() -> Vec<VirtioMmioSlot> {
    (0..3)
        .map(|i| VirtioMmioSlot {
            addr: layout::VIRTIO_MMIO_START + i * layout::VIRTIO_MMIO_SIZE,
            len: layout::VIRTIO_MMIO_SIZE,
            gsi: layout::VIRTIO_GSI_START + i as u32,
        })
        .collect()
}

/// Disassembles each table; returns the .dsl texts by table name.
fn disassemble(iasl_path: &Path, dir: &Path, tables: &acpi::AcpiTables) -> Vec<(String, String)> {
    // The RSDP is not a table with a standard header; iasl only takes it
    // inside an acpidump, so its checksums are checked in the unit tests.
    tables
        .tables
        .iter()
        .filter(|t| t.name != "RSDP")
        .map(|t| {
            let name = t.name.to_lowercase();
            std::fs::write(dir.join(format!("{name}.dat")), &t.bytes).unwrap();
            let out = iasl(iasl_path, dir, &["-d", &format!("{name}.dat")]);
            let dsl = dir.join(format!("{name}.dsl"));
            let text = std::fs::read_to_string(&dsl)
                .unwrap_or_else(|e| panic!("no {} from iasl ({e}):\n{out}", dsl.display()));
            assert_no_complaints(&text, &format!("{name}.dsl"));
            (t.name.to_string(), text)
        })
        .collect()
}

#[test]
fn acpi_tables_disassemble_with_iasl_without_errors() {
    let Some(iasl_path) = iasl_or_skip() else {
        return;
    };
    let tables = acpi::build(2, &slots()).unwrap();
    let dir = scratch("tables");
    let dsl = disassemble(&iasl_path, &dir, &tables);
    let text = |name: &str| &dsl.iter().find(|(n, _)| n == name).unwrap().1;
    assert!(text("FACP").contains("Hardware Reduced (V5) : 1"));
    assert!(text("FACP").contains("Reset Register Supported (V2) : 1"));
    assert!(text("FACP").contains("CMOS RTC Not Present (V5) : 0"));
    assert_eq!(text("APIC").matches("[Processor Local APIC]").count(), 2);
    assert!(text("APIC").contains("[Interrupt Source Override]"));
    assert!(text("APIC").contains("[Local APIC NMI]"));
    let dsdt = text("DSDT");
    for needle in ["Name (_S5, Package", "PNP0501", "PNP0B00", "Device (V002)"] {
        assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
    }
    assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dsdt_recompiles_from_its_disassembly_to_the_same_aml() {
    let Some(iasl_path) = iasl_or_skip() else {
        return;
    };
    let tables = acpi::build(1, &slots()).unwrap();
    let dir = scratch("recompile");
    disassemble(&iasl_path, &dir, &tables);
    iasl(&iasl_path, &dir, &["-p", "recompiled", "dsdt.dsl"]);
    let ours = &tables
        .tables
        .iter()
        .find(|t| t.name == "DSDT")
        .unwrap()
        .bytes;
    let theirs = std::fs::read(dir.join("recompiled.aml")).unwrap();
    // The headers differ in compiler ID and checksum; the AML must not.
    assert_eq!(theirs.len(), ours.len());
    assert_eq!(&theirs[36..], &ours[36..], "AML body differs from iasl's");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn iasl_check_catches_a_bad_checksum() {
    let Some(iasl_path) = iasl_or_skip() else {
        return;
    };
    let mut tables = acpi::build(1, &[]).unwrap();
    for t in &mut tables.tables {
        if t.name == "APIC" {
            t.bytes[9] = t.bytes[9].wrapping_add(1);
        }
    }
    let dir = scratch("corrupt");
    let result = std::panic::catch_unwind(|| disassemble(&iasl_path, &dir, &tables));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        result.is_err(),
        "a wrong MADT checksum must fail the iasl check"
    );
}
