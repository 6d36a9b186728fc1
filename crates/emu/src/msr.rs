//! Model-specific registers. Every MSR the CPUID model implies is here;
//! any other index raises #GP(0), which Linux's exception-table fixups
//! expect (silently returning garbage would not be survivable).

use crate::cpu::fault::{Fault, Res};
use crate::cpu::*;
use crate::platform::clock::Clock;
use crate::platform::lapic::Lapic;

pub const TSC: u32 = 0x10;
pub const TSC_ADJUST: u32 = 0x3b;
pub const APIC_BASE: u32 = 0x1b;
pub const UCODE_REV: u32 = 0x8b;
pub const ARCH_CAPABILITIES: u32 = 0x10a;

/// IA32_ARCH_CAPABILITIES: the "not affected" bits of every speculation
/// bug Linux checks (an interpreter does not speculate): RDCL_NO (0),
/// SKIP_L1DFL_VMENTRY (3), SSB_NO (4), MDS_NO (5), PSCHANGE_MC_NO (6),
/// TAA_NO (8), SBDR_SSDP_NO (13), FBSDP_NO (14), PSDP_NO (15), BHI_NO (20),
/// PBRSB_NO (24), GDS_NO (26), RFDS_NO (27), ITS_NO (62: else every
/// kernel `ret` goes through an aligned return thunk). RDCL_NO is what spares the
/// guest page-table isolation: two CR3 writes per kernel entry.
pub const ARCH_CAPABILITIES_VALUE: u64 = 1
    | 1 << 3
    | 1 << 4
    | 1 << 5
    | 1 << 6
    | 1 << 8
    | 1 << 13
    | 1 << 14
    | 1 << 15
    | 1 << 20
    | 1 << 24
    | 1 << 26
    | 1 << 27
    | 1 << 62;
pub const SYSENTER_CS: u32 = 0x174;
pub const SYSENTER_ESP: u32 = 0x175;
pub const SYSENTER_EIP: u32 = 0x176;
pub const MISC_ENABLE: u32 = 0x1a0;
/// IA32_PLATFORM_ID: read-only, 0 (platform 0, the microcode loader's
/// match for a CPU without a platform mask).
pub const PLATFORM_ID: u32 = 0x17;
/// IA32_FEATURE_CONTROL: locked with VMX and SMX off, as firmware leaves a
/// CPU that does not advertise them; writes #GP while locked.
pub const FEATURE_CONTROL: u32 = 0x3a;
const FEATURE_CONTROL_LOCKED: u64 = 1;

/// IA32_MISC_ENABLE bits (SDM vol. 4, table 2-2). Fast strings (0),
/// automatic thermal control (3), limit CPUID maxval (22) and XD disable
/// (34) are read/write; BTS (11) and PEBS (12) unavailable are read-only
/// ones; performance monitoring available (7) is clear (no PMU). The bits
/// tied to features this model lacks (EIST 16, MONITOR FSM 18, xTPR 23)
/// are reserved: writing them raises #GP.
pub const MISC_FAST_STRING: u64 = 1 << 0;
const MISC_TCC: u64 = 1 << 3;
const MISC_BTS_UNAVAILABLE: u64 = 1 << 11;
const MISC_PEBS_UNAVAILABLE: u64 = 1 << 12;
pub const MISC_LIMIT_CPUID: u64 = 1 << 22;
pub const MISC_XD_DISABLE: u64 = 1 << 34;
const MISC_WRITABLE: u64 = MISC_FAST_STRING | MISC_TCC | MISC_LIMIT_CPUID | MISC_XD_DISABLE;
const MISC_READ_ONLY: u64 = MISC_BTS_UNAVAILABLE | MISC_PEBS_UNAVAILABLE;
/// The power-on value.
pub const MISC_ENABLE_RESET: u64 = MISC_FAST_STRING | MISC_READ_ONLY;
pub const PAT: u32 = 0x277;
pub const TSC_DEADLINE: u32 = 0x6e0;
pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;

impl Cpu {
    /// The guest TSC now.
    pub fn tsc(&self) -> u64 {
        self.vm
            .platform
            .clock
            .tsc()
            .wrapping_add(self.msr.tsc_adjust as u64)
    }

    fn with_lapic<T>(&self, f: impl FnOnce(&mut Lapic) -> T) -> T {
        let l = &self.vm.platform.lapics[self.id as usize];
        f(&mut l.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// IA32_APIC_BASE.EN: CPUID.1:EDX.APIC follows it.
    pub fn apic_enabled(&self) -> bool {
        self.with_lapic(|l| l.base) & crate::platform::lapic::BASE_EN != 0
    }

    pub fn rdmsr(&mut self, msr: u32) -> Res<u64> {
        Ok(match msr {
            TSC => self.tsc(),
            TSC_ADJUST => self.msr.tsc_adjust as u64,
            APIC_BASE => self.with_lapic(|l| l.base),
            UCODE_REV => self.msr.ucode_rev,
            PLATFORM_ID => 0,
            FEATURE_CONTROL => FEATURE_CONTROL_LOCKED,
            ARCH_CAPABILITIES if self.vm.cpu_model.no_speculation() => ARCH_CAPABILITIES_VALUE,
            SYSENTER_CS => self.msr.sysenter_cs,
            SYSENTER_ESP => self.msr.sysenter_esp,
            SYSENTER_EIP => self.msr.sysenter_eip,
            MISC_ENABLE => self.msr.misc_enable,
            PAT => self.msr.pat,
            TSC_DEADLINE => self.with_lapic(|l| l.tsc_deadline),
            EFER => self.efer,
            STAR => self.msr.star,
            LSTAR => self.msr.lstar,
            CSTAR => self.msr.cstar,
            SFMASK => self.msr.sfmask,
            FS_BASE => self.seg[FS].base,
            GS_BASE => self.seg[GS].base,
            KERNEL_GS_BASE => self.msr.kernel_gs_base,
            TSC_AUX => self.msr.tsc_aux,
            0x800..=0x8ff => self
                .vm
                .platform
                .x2apic_rdmsr(self.id, msr)
                .map_err(|_| Fault::gp(0))?,
            _ => return Err(Fault::gp(0)),
        })
    }

    pub fn wrmsr(&mut self, msr: u32, v: u64) -> Res {
        match msr {
            // Writing the TSC moves TSC_ADJUST by the same amount and vice
            // versa: the guest TSC is host time plus the adjustment.
            TSC => self.msr.tsc_adjust = v.wrapping_sub(self.vm.platform.clock.tsc()) as i64,
            TSC_ADJUST => self.msr.tsc_adjust = v as i64,
            APIC_BASE => {
                let p = &self.vm.platform;
                p.set_apic_base(self.id, v).map_err(|_| Fault::gp(0))?;
                self.stop = true;
            }
            UCODE_REV => self.msr.ucode_rev = 0,
            SYSENTER_CS => self.msr.sysenter_cs = v & 0xffff,
            // Every MSR holding a linear address takes only canonical ones.
            SYSENTER_ESP | SYSENTER_EIP | LSTAR | CSTAR | FS_BASE | GS_BASE | KERNEL_GS_BASE
                if !canonical(v) =>
            {
                return Err(Fault::gp(0));
            }
            SYSENTER_ESP => self.msr.sysenter_esp = v,
            SYSENTER_EIP => self.msr.sysenter_eip = v,
            MISC_ENABLE => {
                if v & !(MISC_WRITABLE | MISC_READ_ONLY) != 0 {
                    return Err(Fault::gp(0));
                }
                // No NX once XD is disabled: EFER.NXE must not stay on.
                if v & MISC_XD_DISABLE != 0 && self.efer & EFER_NXE != 0 {
                    return Err(Fault::gp(0));
                }
                self.msr.misc_enable = (v & MISC_WRITABLE) | MISC_READ_ONLY;
            }
            PAT => {
                if (0..8).any(|k| matches!((v >> (8 * k)) & 0xff, 2 | 3 | 8..)) {
                    return Err(Fault::gp(0));
                }
                self.msr.pat = v;
            }
            TSC_DEADLINE => {
                let off = self.msr.tsc_adjust;
                self.with_lapic(|l| l.set_tsc_deadline(v, off));
                self.vm.platform.timer.notify();
            }
            EFER => {
                let nx = self.msr.misc_enable & MISC_XD_DISABLE == 0;
                if v & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0
                    || (v & EFER_NXE != 0 && !nx)
                {
                    return Err(Fault::gp(0));
                }
                let paging = self.cr0 & CR0_PG != 0;
                if paging && (v ^ self.efer) & EFER_LME != 0 {
                    return Err(Fault::gp(0));
                }
                // LMA is read-only.
                self.efer = (v & !EFER_LMA) | (self.efer & EFER_LMA);
                self.tlb.flush_all();
                self.stop = true;
            }
            STAR => self.msr.star = v,
            LSTAR => self.msr.lstar = v,
            CSTAR => self.msr.cstar = v,
            SFMASK => self.msr.sfmask = v & 0xffff_ffff,
            FS_BASE => self.seg[FS].base = v,
            GS_BASE => self.seg[GS].base = v,
            KERNEL_GS_BASE => self.msr.kernel_gs_base = v,
            TSC_AUX => self.msr.tsc_aux = v & 0xffff_ffff,
            0x800..=0x8ff => {
                let p = &self.vm.platform;
                p.x2apic_wrmsr(self.id, msr, v).map_err(|_| Fault::gp(0))?;
                self.stop = true;
            }
            _ => return Err(Fault::gp(0)),
        }
        Ok(())
    }

    /// TSC for rdtsc: also used by tests to convert times.
    pub fn tsc_to_ns(t: u64) -> u64 {
        Clock::tsc_to_ns(t)
    }
}
