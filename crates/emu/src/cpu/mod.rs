//! The architectural state of one vCPU and the caches derived from it.

pub mod fault;
pub mod flags;
pub mod fpu;
pub mod state;
pub mod width;

use std::sync::Arc;

use crate::mem::io::IoCtl;
use crate::mem::tlb::Tlb;
use crate::vm::VmShared;
use flags::Flags;
use fpu::Fpu;

/// Segment register numbers (encoding order, as in `Insn::seg`).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// GPR slots beyond the 16 architectural ones: always-zero (absent
/// base/index) and the instruction pointer (RIP-relative base).
pub const ZERO: usize = 16;
pub const RIP: usize = 17;
pub const RSP: usize = 4;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;

pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;

pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Segment attribute bits (the VMX "access rights" layout).
pub const ATTR_TYPE: u16 = 0xf;
pub const ATTR_S: u16 = 1 << 4;
pub const ATTR_DPL_SHIFT: u16 = 5;
pub const ATTR_P: u16 = 1 << 7;
pub const ATTR_AVL: u16 = 1 << 12;
pub const ATTR_L: u16 = 1 << 13;
pub const ATTR_DB: u16 = 1 << 14;
pub const ATTR_G: u16 = 1 << 15;

/// A segment register with its descriptor cache and the offset windows
/// accesses are checked against (derived, see [`Cpu::refresh_segments`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seg {
    pub sel: u16,
    pub base: u64,
    pub limit: u32,
    pub attr: u16,
    pub unusable: bool,
    /// Valid offsets for reads: `rlo..=rhi` (empty when `rlo > rhi`).
    pub rlo: u64,
    pub rhi: u64,
    /// Valid offsets for writes.
    pub wlo: u64,
    pub whi: u64,
}

impl Seg {
    #[inline]
    pub fn dpl(&self) -> u8 {
        ((self.attr >> ATTR_DPL_SHIFT) & 3) as u8
    }
    #[inline]
    pub fn db(&self) -> bool {
        self.attr & ATTR_DB != 0
    }
    #[inline]
    pub fn l(&self) -> bool {
        self.attr & ATTR_L != 0
    }
    #[inline]
    pub fn typ(&self) -> u8 {
        (self.attr & ATTR_TYPE) as u8
    }
    /// A real-mode style segment: base = selector * 16, other fields kept.
    pub fn set_real(&mut self, sel: u16) {
        self.sel = sel;
        self.base = u64::from(sel) << 4;
        self.unusable = false;
    }
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescTable {
    pub base: u64,
    pub limit: u16,
}

/// The operating mode, derived from CR0.PE, EFER.LMA, CS.L and EFLAGS.VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Real,
    Protected,
    Virtual8086,
    /// Long mode, 32/16-bit code segment.
    Compat,
    /// Long mode, 64-bit code segment.
    Long,
}

/// Whether the vCPU executes, sleeps in `hlt`, or waits for SIPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Halted,
    WaitForSipi,
}

/// MSR values that are not elsewhere in the state.
#[derive(Debug, Clone, Default)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_aux: u64,
    pub misc_enable: u64,
    pub ucode_rev: u64,
    pub tsc_adjust: i64,
    pub mtrr_def_type: u64,
    /// XCR0 above bit 0 (x87, always set), as XSETBV left it: 0 after
    /// reset, so XCR0 = 1 (`isa/xsave.rs`).
    pub xcr0_ext: u64,
}

/// One vCPU's registers plus the derived caches the hot paths use.
pub struct Cpu {
    /// rax..r15, then [`ZERO`] and [`RIP`].
    pub gpr: [u64; 18],
    pub flags: Flags,
    /// RFLAGS bits other than OSZAPC (bit 1 always set).
    pub rflags: u64,
    pub seg: [Seg; 6],
    pub ldtr: Seg,
    pub tr: Seg,
    pub gdtr: DescTable,
    pub idtr: DescTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub msr: Msrs,
    pub fpu: Fpu,

    // Derived caches.
    pub mode: Mode,
    pub cpl: u8,
    /// Code size for decoding: 16, 32 or 64.
    pub bits: u8,
    pub ip_mask: u64,
    pub sp_mask: u64,
    /// Linear addresses wrap at 4 GiB outside long mode.
    pub lin_mask: u64,

    // Execution control.
    /// Leave the current block after this instruction.
    pub stop: bool,
    /// Interrupts are blocked for one instruction (after sti, mov ss).
    pub int_shadow: bool,
    /// NMIs are blocked until the next iret.
    pub nmi_blocked: bool,
    pub run_state: RunState,
    /// The guest triple-faulted.
    pub shutdown: bool,
    pub tlb: Tlb,
    pub io: IoCtl,
    pub vm: Arc<VmShared>,
    pub id: u32,
    /// Instructions retired (approximate: counted per block).
    pub icount: u64,
    /// Translation tier: guest flags parked by translated code around
    /// its own flag-clobbering sequences.
    pub jit_flags_spill: u64,
    /// Translation tier: the last lazy flags (`res`, `aux`) converted to
    /// or from the host form, with that form as `lahf; seto al` leave it
    /// in AX (AH = RFLAGS' low byte, AL = OF), so a block needing host
    /// flags right after another's exit skips the helper. Always
    /// consistent: the host form is the one `res`/`aux` stand for.
    pub jit_flags_memo: [u64; 3],
    /// Translation tier: the `jmp rel32` of the exit just taken, for the
    /// dispatcher to point at the next block's code (0: none).
    pub jit_link: u64,
    /// Non-zero if that exit leaves with the flags parked (it then leads
    /// to the next block's parked-flags head, `Block::jit_head_spill`).
    pub jit_link_spill: u64,
    /// For an exit to another page, the `mov eax, imm32` whose immediate
    /// holds the code epoch the link holds under (0: same page).
    pub jit_link_epoch: u64,
    /// The guest RIP that exit leads to.
    pub jit_link_rip: u64,
    /// Address of the translation tier's indirect-branch target cache
    /// (`jit::Targets`), 0 without the tier.
    pub jit_targets: usize,
    /// Translation tier: the host stack pointer of the frame translated
    /// code runs in (`Thunks::enter`), restored by `Thunks::leave`.
    pub jit_host_sp: u64,
    /// Translation tier: below this host stack pointer translated calls
    /// push no more return frames (bounds the return-address stack).
    pub jit_ras_floor: u64,
    /// Co-simulation (`VMPLAY_EMU_VERIFY`): guest RAM writes of the
    /// interpreter's run, (host address, old value, size), to undo.
    pub undo: Option<Vec<(usize, u64, u8)>>,
    /// Port and MMIO accesses so far (co-simulation skips blocks that
    /// reach devices: their effects cannot be run twice).
    pub device_accesses: u64,
    /// Breakpoints, single step, watchpoints (`crate::debug`).
    pub debug: crate::debug::Debug,
    /// The guest's own debug architecture (`mode/dbreg.rs`).
    pub dbg: crate::mode::dbreg::DebugArch,
}

impl Cpu {
    pub fn new(vm: Arc<VmShared>, id: u32) -> Self {
        let mut cpu = Cpu {
            gpr: [0; 18],
            flags: Flags::default(),
            rflags: 2,
            seg: [Seg::default(); 6],
            ldtr: Seg::default(),
            tr: Seg::default(),
            gdtr: DescTable::default(),
            idtr: DescTable::default(),
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            dr: [0; 8],
            msr: Msrs::default(),
            fpu: Fpu::default(),
            mode: Mode::Real,
            cpl: 0,
            bits: 16,
            ip_mask: 0xffff,
            sp_mask: 0xffff,
            lin_mask: 0xffff_ffff,
            stop: false,
            int_shadow: false,
            nmi_blocked: false,
            run_state: RunState::Running,
            shutdown: false,
            tlb: Tlb::new(),
            io: IoCtl::default(),
            vm,
            id,
            icount: 0,
            jit_flags_spill: 0,
            jit_flags_memo: crate::jit::helpers::FLAGS_MEMO_INIT,
            jit_link: 0,
            jit_link_spill: 0,
            jit_link_epoch: 0,
            jit_link_rip: 0,
            jit_targets: 0,
            jit_host_sp: 0,
            jit_ras_floor: 0,
            undo: None,
            device_accesses: 0,
            debug: Default::default(),
            dbg: Default::default(),
        };
        cpu.reset();
        cpu
    }

    /// Power-on / INIT state (real mode at F000:FFF0).
    pub fn reset(&mut self) {
        let s = vmplay_hypervisor::CpuState::reset();
        self.load_state(&s);
        self.msr = Msrs {
            pat: 0x0007_0406_0007_0406,
            misc_enable: crate::msr::MISC_ENABLE_RESET,
            ..Msrs::default()
        };
        self.dr = [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400];
        self.dbg = Default::default();
        crate::debug::refresh_watching(self);
        self.int_shadow = false;
        self.nmi_blocked = false;
        self.run_state = RunState::Running;
    }

    #[inline(always)]
    pub fn rip(&self) -> u64 {
        self.gpr[RIP]
    }
    #[inline(always)]
    pub fn set_rip(&mut self, v: u64) {
        self.gpr[RIP] = v;
    }

    /// The full RFLAGS value.
    pub fn get_rflags(&self) -> u64 {
        self.rflags | self.flags.bits() | 2
    }

    /// Writes all of RFLAGS (no privilege filtering: callers mask).
    pub fn set_rflags(&mut self, v: u64) {
        self.flags.set_bits(v);
        let old = self.rflags;
        self.rflags = (v & !flags::OSZAPC & 0x3f_7fd5) | 2;
        if (old ^ self.rflags) & flags::VM != 0 {
            self.update_mode();
        }
        // TF and RF (set by iret) put the next instruction on the
        // precise path (`exec.rs`).
        if (old ^ self.rflags) & (flags::IF | flags::TF | flags::RF) != 0 {
            self.stop = true;
        }
    }

    #[inline(always)]
    pub fn iff(&self) -> bool {
        self.rflags & flags::IF != 0
    }

    #[inline(always)]
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    /// Recomputes the mode cache after CR0, EFER, CS or EFLAGS.VM changed.
    pub fn update_mode(&mut self) {
        let cs = self.seg[CS];
        self.mode = if self.cr0 & CR0_PE == 0 {
            Mode::Real
        } else if self.efer & EFER_LMA != 0 {
            if cs.l() { Mode::Long } else { Mode::Compat }
        } else if self.rflags & flags::VM != 0 {
            Mode::Virtual8086
        } else {
            Mode::Protected
        };
        self.bits = match self.mode {
            Mode::Long => 64,
            Mode::Virtual8086 => 16,
            _ if cs.db() => 32,
            _ => 16,
        };
        self.ip_mask = match self.bits {
            16 => 0xffff,
            32 => 0xffff_ffff,
            _ => u64::MAX,
        };
        self.lin_mask = if self.mode == Mode::Long {
            u64::MAX
        } else {
            0xffff_ffff
        };
        match self.mode {
            Mode::Real => self.cpl = 0,
            Mode::Virtual8086 => self.cpl = 3,
            _ => {}
        }
        self.refresh_segments();
        self.tlb.select(self.cpl == 3);
        self.stop = true;
    }

    /// Sets CPL (after a privilege-changing transfer).
    pub fn set_cpl(&mut self, cpl: u8) {
        self.cpl = cpl;
        self.tlb.select(cpl == 3);
        self.stop = true;
    }

    /// Recomputes every segment's access windows and the stack mask.
    pub fn refresh_segments(&mut self) {
        let long = self.mode == Mode::Long;
        let real = matches!(self.mode, Mode::Real | Mode::Virtual8086);
        for s in self.seg.iter_mut() {
            seg_windows(s, long, real);
        }
        self.sp_mask = if long {
            u64::MAX
        } else if self.seg[SS].db() {
            0xffff_ffff
        } else {
            0xffff
        };
    }

    /// Recomputes one segment's windows after it was loaded.
    pub fn refresh_segment(&mut self, n: usize) {
        let long = self.mode == Mode::Long;
        let real = matches!(self.mode, Mode::Real | Mode::Virtual8086);
        seg_windows(&mut self.seg[n], long, real);
        if n == SS {
            self.sp_mask = if long {
                u64::MAX
            } else if self.seg[SS].db() {
                0xffff_ffff
            } else {
                0xffff
            };
        }
        if n == CS {
            self.update_mode();
        }
    }
}

/// The offset windows for `s` in the given mode.
fn seg_windows(s: &mut Seg, long: bool, real: bool) {
    let limit = u64::from(s.limit);
    if long {
        (s.rlo, s.rhi, s.wlo, s.whi) = (0, u64::MAX, 0, u64::MAX);
    } else if real {
        (s.rlo, s.rhi, s.wlo, s.whi) = (0, limit, 0, limit);
    } else if s.unusable || s.attr & ATTR_P == 0 {
        (s.rlo, s.rhi, s.wlo, s.whi) = (1, 0, 1, 0);
    } else {
        let t = s.typ();
        let (lo, hi) = if t & 8 == 0 && t & 4 != 0 {
            // Expand-down data: offsets above the limit are valid.
            let top = if s.db() { 0xffff_ffff } else { 0xffff };
            (limit + 1, top)
        } else {
            (0, limit)
        };
        let readable = t & 8 == 0 || t & 2 != 0;
        let writable = t & 8 == 0 && t & 2 != 0;
        (s.rlo, s.rhi) = if readable { (lo, hi) } else { (1, 0) };
        (s.wlo, s.whi) = if writable { (lo, hi) } else { (1, 0) };
    }
}

/// A canonical linear address: bits 63..47 equal. 48-bit only: emu has
/// no 5-level paging (CR4.LA57 is reserved, CPUID.7.ECX.LA57 clear).
#[inline(always)]
pub fn canonical(lin: u64) -> bool {
    ((lin as i64) << 16 >> 16) as u64 == lin
}
