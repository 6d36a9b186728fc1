//! The devices a guest talks to, and the bus that routes accesses to them.
//! Devices know nothing of vCPUs or backends: they see reads and writes at
//! offsets, raise interrupts through `hypervisor::IrqLine`, and ask the
//! machine to stop through [`VmControl`].
//!
//! The legacy PC set lives here: the COM1 UART ([`Serial`]) and the host
//! console plumbing ([`console`]), the i8042 ([`I8042`], for its reset
//! line), the CMOS RTC ([`Rtc`]), QEMU's debug-exit port ([`DebugExit`]),
//! the hardware-reduced ACPI power registers ([`AcpiPm`]) and the POST
//! port ([`PostPort`]). Interrupt controllers and timers are not here:
//! KVM provides them in the kernel, and the `emu` backend models its own.
//! Every device takes any access width and offset a guest throws at it.

mod access;
pub mod acpi_pm;
pub mod bus;
pub mod console;
pub mod control;
pub mod debug_exit;
pub mod i8042;
pub mod mmds;
pub mod ports;
pub mod post;
pub mod rtc;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use bus::{Bus, BusDevice, BusDeviceSync, BusError, SharedDevice};
pub use console::{ConsoleError, RawTerminal};
pub use control::{StopReason, VmControl};
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use post::PostPort;
pub use rtc::{Clock, Rtc, SystemClock};
pub use serial::{Serial, SerialError, SerialOutput};
