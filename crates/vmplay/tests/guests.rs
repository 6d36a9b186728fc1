//! Guest-level tests: boot the tiny kernels from `vmplay-guests` with
//! `vmplay run` on each backend and assert on exactly what the guest printed
//! on COM1 and how vmplay exited. Nothing here waits on timing: each guest
//! ends itself (debug-exit, ACPI power-off, reset, triple fault).

mod support;

use support::{Run, TempDir, skip_without_kvm, vmplay_run};

/// Boots `image` with `--serial stdio` on `accel`, plus `extra` flags.
fn boot(accel: &str, image: &[u8], extra: &[&str]) -> Run {
    let dir = TempDir::new();
    let kernel = dir.file("guest.elf", image);
    boot_file(accel, &kernel, extra)
}

fn boot_file(accel: &str, kernel: &std::path::Path, extra: &[&str]) -> Run {
    let kernel = kernel.to_str().expect("utf-8 temp path");
    let mut args = vec![
        "--kernel", kernel, "--accel", accel, "--serial", "stdio", "--memory", "64M",
    ];
    args.extend_from_slice(extra);
    vmplay_run(&args)
}

// ---- real mode -----------------------------------------------------------

fn real_mode_guest_writes_to_com1(accel: &str) {
    boot(accel, &vmplay_guests::hello_real_mode(), &[])
        .assert_code(1) // debug-exit 0
        .assert_stdout("Hello from real mode\n");
}

#[test]
fn real_mode_guest_writes_to_com1_on_kvm() {
    if !skip_without_kvm() {
        real_mode_guest_writes_to_com1("kvm");
    }
}

#[test]
fn real_mode_guest_writes_to_com1_on_emu() {
    real_mode_guest_writes_to_com1("emu");
}

// ---- long mode -----------------------------------------------------------

fn long_mode_guest(accel: &str) {
    let (mut fib, mut next) = (0u64, 1u64);
    for _ in 0..vmplay_guests::LONG_MODE_FIB_N {
        (fib, next) = (next, fib + next);
    }
    boot(accel, &vmplay_guests::long_mode(), &[])
        .assert_code(1)
        .assert_stdout(&format!(
            "Hello from long mode\nfib({}) = {fib:#018x}\n",
            vmplay_guests::LONG_MODE_FIB_N
        ));
}

#[test]
fn long_mode_guest_on_kvm() {
    if !skip_without_kvm() {
        long_mode_guest("kvm");
    }
}

#[test]
fn long_mode_guest_on_emu() {
    long_mode_guest("emu");
}

// ---- MSRs ----------------------------------------------------------------

/// Both backends power on with IA32_MISC_ENABLE as KVM resets it (BTS and
/// PEBS unavailable) plus fast strings.
fn misc_enable_matches_across_backends(accel: &str) {
    boot(accel, &vmplay_guests::misc_enable(), &[])
        .assert_code(1)
        .assert_stdout("misc_enable=0000000000001801\n");
}

#[test]
fn misc_enable_matches_across_backends_on_kvm() {
    if !skip_without_kvm() {
        misc_enable_matches_across_backends("kvm");
    }
}

#[test]
fn misc_enable_matches_across_backends_on_emu() {
    misc_enable_matches_across_backends("emu");
}

// ---- SMP -----------------------------------------------------------------

fn two_vcpus_report_their_apic_ids(accel: &str) {
    boot(
        accel,
        &vmplay_guests::smp_apic_ids(),
        &["--cpus", "2", "--cmdline", "cpus=2"],
    )
    .assert_code(1)
    .assert_stdout("bsp apic id 0, expecting 2 cpus\ncpu 1 up\nall 2 cpus up\n");
}

#[test]
fn two_vcpus_report_their_apic_ids_on_kvm() {
    if !skip_without_kvm() {
        two_vcpus_report_their_apic_ids("kvm");
    }
}

#[test]
fn two_vcpus_report_their_apic_ids_on_emu() {
    two_vcpus_report_their_apic_ids("emu");
}

// ---- Multiboot handoff ---------------------------------------------------

fn multiboot_kernel_prints_cmdline_and_memory_map(accel: &str) {
    let dir = TempDir::new();
    let kernel = dir.file("mbinfo.elf", &vmplay_guests::multiboot_info());
    // A module with bytes the guest must show as '.'.
    let module = b"initrd for vmplay\x00\x01\xff tail";
    let initrd = dir.file("module.bin", module);
    let run = boot_file(
        accel,
        &kernel,
        &[
            "--cmdline",
            "one two=three",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
    );
    // 64 MiB: [0, EBDA) usable, EBDA..1 MiB reserved, 1 MiB..64 MiB usable.
    let expected = format!(
        "cmdline: {} one two=three\n\
         mem_lower: 639 KiB\n\
         mem_upper: {} KiB\n\
         mmap: base=0x0000000000000000 length=0x000000000009fc00 type=1\n\
         mmap: base=0x000000000009fc00 length=0x0000000000060400 type=2\n\
         mmap: base=0x0000000000100000 length=0x0000000003f00000 type=1\n\
         modules: 1\n\
         module 0: {} bytes: initrd for vmplay... tail\n\
         powering off\n",
        kernel.display(),
        (64 << 10) - 1024,
        module.len()
    );
    run.assert_code(0)
        .assert_stdout(&expected)
        .assert_stderr_contains("guest powered off");
}

#[test]
fn multiboot_kernel_prints_cmdline_and_memory_map_on_kvm() {
    if !skip_without_kvm() {
        multiboot_kernel_prints_cmdline_and_memory_map("kvm");
    }
}

#[test]
fn multiboot_kernel_prints_cmdline_and_memory_map_on_emu() {
    multiboot_kernel_prints_cmdline_and_memory_map("emu");
}

// ---- exits ---------------------------------------------------------------

fn debug_exit_status_propagates(accel: &str) {
    for (code, status) in [(0u8, 1), (0x2a, 0x55), (0x7f, 0xff)] {
        boot(accel, &vmplay_guests::debug_exit(code), &[])
            .assert_code(status)
            .assert_stdout("");
    }
}

#[test]
fn debug_exit_status_propagates_on_kvm() {
    if !skip_without_kvm() {
        debug_exit_status_propagates("kvm");
    }
}

#[test]
fn debug_exit_status_propagates_on_emu() {
    debug_exit_status_propagates("emu");
}

fn i8042_reset_stops_the_vm(accel: &str) {
    boot(accel, &vmplay_guests::i8042_reset(), &[])
        .assert_code(0)
        .assert_stdout("resetting\n")
        .assert_stderr_contains("guest reset the machine");
}

#[test]
fn i8042_reset_stops_the_vm_on_kvm() {
    if !skip_without_kvm() {
        i8042_reset_stops_the_vm("kvm");
    }
}

#[test]
fn i8042_reset_stops_the_vm_on_emu() {
    i8042_reset_stops_the_vm("emu");
}

fn triple_fault_is_reported_with_registers(accel: &str) {
    let marker = format!("rax={:016x}", vmplay_guests::TRIPLE_FAULT_MARKER);
    boot(accel, &vmplay_guests::triple_fault(), &[])
        .assert_code(4)
        .assert_stdout("triple faulting\n")
        .assert_stderr_contains("guest crashed on vCPU 0: triple fault")
        .assert_stderr_contains(&marker);
}

#[test]
fn triple_fault_is_reported_with_registers_on_kvm() {
    if !skip_without_kvm() {
        triple_fault_is_reported_with_registers("kvm");
    }
}

#[test]
fn triple_fault_is_reported_with_registers_on_emu() {
    triple_fault_is_reported_with_registers("emu");
}

// ---- RTC -----------------------------------------------------------------

/// Today's UTC date as YYYY-MM-DD (Howard Hinnant's civil_from_days).
fn utc_date_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn rtc_returns_todays_date(accel: &str) {
    // Dates before and after the run: a midnight in between allows either.
    let before = utc_date_now();
    let run = boot(accel, &vmplay_guests::rtc_date(), &[]);
    let after = utc_date_now();
    run.assert_code(1);
    let printed = run.stdout.strip_suffix('\n').unwrap_or(&run.stdout);
    assert!(
        printed == before || printed == after,
        "guest says {printed:?}, host says {before} .. {after}\n{run}"
    );
}

#[test]
fn rtc_returns_todays_date_on_kvm() {
    if !skip_without_kvm() {
        rtc_returns_todays_date("kvm");
    }
}

#[test]
fn rtc_returns_todays_date_on_emu() {
    rtc_returns_todays_date("emu");
}

#[test]
fn utc_date_helper_formats_a_date() {
    let d = utc_date_now();
    assert_eq!(d.len(), 10, "{d}");
    assert!(d.starts_with("20"), "{d}");
}

// ---- the demo guest ------------------------------------------------------

fn demo_guest_describes_the_machine(accel: &str) {
    let before = utc_date_now();
    let run = boot(
        accel,
        &vmplay_guests::demo(),
        &["--cmdline", "hello from the host"],
    );
    let after = utc_date_now();
    run.assert_code(0)
        .assert_stderr_contains("guest powered off");
    let out = &run.stdout;
    assert!(out.contains("vmplay demo guest"), "{run}");
    assert!(out.contains("hello from the host\n"), "{run}");
    assert!(
        out.contains("memory:       639 KiB below 1 MiB, 64512 KiB above\n"),
        "{run}"
    );
    assert!(
        out.contains("  0x0000000000100000 +0x0000000003f00000 usable\n"),
        "{run}"
    );
    let rtc = out
        .lines()
        .find(|l| l.starts_with("RTC:"))
        .unwrap_or_else(|| panic!("no RTC line\n{run}"));
    assert!(
        rtc.contains(&before) || rtc.contains(&after),
        "RTC line {rtc:?} vs host {before} .. {after}\n{run}"
    );
    let vendor = out
        .lines()
        .find_map(|l| l.strip_prefix("CPU vendor:   "))
        .unwrap_or_else(|| panic!("no vendor line\n{run}"));
    assert_eq!(vendor.len(), 12, "{run}");
    assert!(vendor.bytes().all(|b| b.is_ascii_graphic()), "{run}");
    assert!(out.ends_with("powering off\n"), "{run}");
}

#[test]
fn demo_guest_describes_the_machine_on_kvm() {
    if !skip_without_kvm() {
        demo_guest_describes_the_machine("kvm");
    }
}

#[test]
fn demo_guest_describes_the_machine_on_emu() {
    demo_guest_describes_the_machine("emu");
}

// ---- virtio-blk driven by hand -------------------------------------------

/// The guest writes sector 1 and reads sector 0 of a virtio-blk drive,
/// each completion arriving as an interrupt (on kvm: ioeventfd for the
/// notify, irqfd for the interrupt; on emu: the same eventfds).
fn virtio_blk_guest_reads_and_writes_the_disk(accel: &str) {
    let dir = TempDir::new();
    let mut disk = vec![0u8; 64 * 1024];
    let text = b"sector zero, written by the host\n\0";
    disk[..text.len()].copy_from_slice(text);
    let code = vmplay_guests::virtio::CODE_SECTOR as usize * 512;
    disk[code..code + 6].copy_from_slice(&vmplay_guests::virtio::CODE_FROM_DISK);
    let path = dir.file("disk.img", &disk);
    let drive = format!("path={}", path.display());
    boot(accel, &vmplay_guests::virtio_blk(), &["--drive", &drive])
        .assert_code(0)
        .assert_stdout("write ok\nread: sector zero, written by the host\ncode 1 then 2\nirqs 3\n");
    let sector = vmplay_guests::virtio::WRITTEN_SECTOR as usize * 512;
    disk[sector..sector + 512].fill(vmplay_guests::virtio::WRITTEN_BYTE);
    assert!(
        std::fs::read(&path).unwrap() == disk,
        "the image is the original with sector 1 as the guest wrote it"
    );
}

#[test]
fn virtio_blk_guest_reads_and_writes_the_disk_on_kvm() {
    if !skip_without_kvm() {
        virtio_blk_guest_reads_and_writes_the_disk("kvm");
    }
}

#[test]
fn virtio_blk_guest_reads_and_writes_the_disk_on_emu() {
    virtio_blk_guest_reads_and_writes_the_disk("emu");
}
