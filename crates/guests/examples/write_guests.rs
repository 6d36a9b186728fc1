//! Writes every guest program to a directory, to boot by hand:
//! `cargo run -p vmplay-guests --example write_guests -- DIR`, then
//! `vmplay run --kernel DIR/long_mode.elf` (or `qemu-system-x86_64 -kernel`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "guests".into()));
    std::fs::create_dir_all(&dir)?;
    let guests: [(&str, Vec<u8>); 10] = [
        ("hello_real_mode", vmplay_guests::hello_real_mode()),
        ("long_mode", vmplay_guests::long_mode()),
        ("smp_apic_ids", vmplay_guests::smp_apic_ids()),
        ("multiboot_info", vmplay_guests::multiboot_info()),
        ("debug_exit_42", vmplay_guests::debug_exit(42)),
        ("i8042_reset", vmplay_guests::i8042_reset()),
        ("triple_fault", vmplay_guests::triple_fault()),
        ("rtc_date", vmplay_guests::rtc_date()),
        ("demo", vmplay_guests::demo()),
        ("virtio_blk", vmplay_guests::virtio_blk()),
    ];
    for (name, image) in guests {
        let path = dir.join(format!("{name}.elf"));
        std::fs::write(&path, image)?;
        println!("{}", path.display());
    }
    Ok(())
}
