//! The fixed port numbers and interrupt lines of the legacy devices and
//! the ACPI registers: the devices answer there, and the boot code's ACPI
//! tables and the machine's wiring read the same constants.

/// Legacy port-I/O devices.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The keyboard interrupt (ISA IRQ 1).
pub const I8042_IRQ: u32 = 1;
pub const RTC_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;
/// QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The POST code port Linux uses for I/O delays.
pub const POST_PORT: u16 = 0x80;
/// Hardware-reduced ACPI registers (FADT X_SLEEP_CONTROL/STATUS, RESET_REG),
/// in port space so they work the same on every backend.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The value the guest writes to `ACPI_RESET_PORT` to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The SLP_TYP value `\_S5` declares; written with SLP_EN it powers off.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// SCI interrupt (unused by a hardware-reduced FADT but must be valid).
pub const ACPI_SCI_IRQ: u32 = 9;
