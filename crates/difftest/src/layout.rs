//! Fixed virtual addresses shared by the host child process and the guest.
//!
//! Native and backend runs place code, data and stack at the same linear
//! addresses so that every pointer a sequence computes (and every byte it
//! pushes) is identical on both sides. The guest identity-maps them; only
//! the guest has the system area (page tables, GDT, IDT, TSS, handlers).

/// Where the instruction sequence starts (one 4 KiB page, read + execute).
pub const CODE_ADDR: u64 = 0x4000_0000;
pub const CODE_SIZE: usize = 0x1000;
/// The data page memory operands point into (read + write, no execute).
pub const DATA_ADDR: u64 = 0x4010_0000;
pub const DATA_SIZE: usize = 0x1000;
/// The stack page; RSP starts in its middle.
pub const STACK_ADDR: u64 = 0x4020_0000;
pub const STACK_SIZE: usize = 0x1000;

/// Guest-only system structures (not mapped in the host child).
pub const SYS_ADDR: u64 = 0x4030_0000;
pub const PML4_ADDR: u64 = SYS_ADDR;
pub const PDPT_ADDR: u64 = SYS_ADDR + 0x1000;
pub const PD_ADDR: u64 = SYS_ADDR + 0x2000;
/// Page table for 0x4000_0000..0x4020_0000 (code, data).
pub const PT0_ADDR: u64 = SYS_ADDR + 0x3000;
/// Page table for 0x4020_0000..0x4040_0000 (stack, system area).
pub const PT1_ADDR: u64 = SYS_ADDR + 0x4000;
pub const GDT_ADDR: u64 = SYS_ADDR + 0x5000;
pub const TSS_ADDR: u64 = SYS_ADDR + 0x5100;
pub const IDT_ADDR: u64 = SYS_ADDR + 0x6000;
/// Where the end marker and the stubs save RDX before they use DX for the
/// port number.
pub const SCRATCH_ADDR: u64 = SYS_ADDR + 0x5200;
/// 256 exception/interrupt stubs of `STUB_SIZE` bytes. Stub `v` saves RDX,
/// writes AL to port `VECTOR_PORT_BASE + v`, then `hlt`s.
pub const STUBS_ADDR: u64 = SYS_ADDR + 0x7000;
pub const STUB_SIZE: u64 = 16;
/// Ports that end a guest case: `VECTOR_PORT_BASE + vector` after an
/// exception, `END_PORT` after the last instruction. Nothing in KVM or the
/// platform devices listens there.
pub const VECTOR_PORT_BASE: u16 = 0xe000;
pub const END_PORT: u16 = 0xe100;
/// The stack every exception is delivered on (IST1), so a sequence that
/// broke RSP still reports its fault instead of double faulting.
pub const IST_STACK_ADDR: u64 = SYS_ADDR + 0x8000;
pub const IST_STACK_TOP: u64 = SYS_ADDR + 0xa000;
pub const SYS_SIZE: usize = 0xa000;

/// The one guest RAM region: from the code page to the end of the system area.
pub const GUEST_RAM_START: u64 = CODE_ADDR;
pub const GUEST_RAM_SIZE: usize = (SYS_ADDR - CODE_ADDR) as usize + SYS_SIZE;

/// GDT selectors.
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Initial RSP: the middle of the stack page, so pushes and pops both fit.
pub const STACK_START: u64 = STACK_ADDR + (STACK_SIZE as u64) / 2;
