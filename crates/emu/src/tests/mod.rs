//! Guests built with iced's `code_asm`, run through the seam traits only
//! (the same path the machine and the differential harness use).

mod apic_modes;
mod bench;
mod corners;
mod debug_arch;
pub(crate) mod guest;
mod modes;
mod platform;
mod robustness;
mod system;
mod system_more;
