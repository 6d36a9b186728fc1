//! Moving state across the seam: [`CpuState`] in and out of a [`Cpu`].

use super::*;
use vmplay_hypervisor::{CpuState, DescriptorTable, Segment};

pub fn seg_from(s: &Segment) -> Seg {
    let attr = u16::from(s.type_ & 0xf)
        | if s.s { ATTR_S } else { 0 }
        | (u16::from(s.dpl & 3) << ATTR_DPL_SHIFT)
        | if s.present { ATTR_P } else { 0 }
        | if s.avl { ATTR_AVL } else { 0 }
        | if s.l { ATTR_L } else { 0 }
        | if s.db { ATTR_DB } else { 0 }
        | if s.g { ATTR_G } else { 0 };
    Seg {
        sel: s.selector,
        base: s.base,
        limit: s.limit,
        attr,
        unusable: s.unusable,
        ..Seg::default()
    }
}

pub fn seg_to(s: &Seg) -> Segment {
    Segment {
        selector: s.sel,
        base: s.base,
        limit: s.limit,
        type_: s.typ(),
        s: s.attr & ATTR_S != 0,
        dpl: s.dpl(),
        present: s.attr & ATTR_P != 0,
        avl: s.attr & ATTR_AVL != 0,
        l: s.l(),
        db: s.db(),
        g: s.attr & ATTR_G != 0,
        unusable: s.unusable,
    }
}

impl Cpu {
    /// Loads the architectural state (the machine's or a test's entry state).
    pub fn load_state(&mut self, s: &CpuState) {
        self.gpr[..16].copy_from_slice(&s.gpr);
        self.gpr[ZERO] = 0;
        self.gpr[RIP] = s.rip;
        self.rflags = 2;
        self.set_rflags(s.rflags);
        for (n, src) in [
            (ES, &s.es),
            (CS, &s.cs),
            (SS, &s.ss),
            (DS, &s.ds),
            (FS, &s.fs),
            (GS, &s.gs),
        ] {
            self.seg[n] = seg_from(src);
        }
        self.ldtr = seg_from(&s.ldt);
        self.tr = seg_from(&s.tr);
        self.gdtr = DescTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        };
        self.idtr = DescTable {
            base: s.idt.base,
            limit: s.idt.limit,
        };
        self.cr0 = s.cr0 | CR0_ET;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.efer = s.efer;
        // LMA follows LME and PG as the CPU would have set it.
        if s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0 {
            self.efer |= EFER_LMA;
        }
        self.fpu = fpu::Fpu::from_state(&s.fpu);
        self.cpl = if s.cr0 & CR0_PE == 0 { 0 } else { s.ss.dpl & 3 };
        self.update_mode();
        if self.mode == Mode::Protected || self.mode == Mode::Compat || self.mode == Mode::Long {
            self.cpl = s.ss.dpl & 3;
        }
        self.tlb.select(self.cpl == 3);
        self.tlb.flush_all();
        self.run_state = RunState::Running;
        self.stop = true;
    }

    /// The architectural state for dumps and tests.
    pub fn save_state(&self) -> CpuState {
        let mut gpr = [0u64; 16];
        gpr.copy_from_slice(&self.gpr[..16]);
        CpuState {
            gpr,
            rip: self.rip(),
            rflags: self.get_rflags(),
            es: seg_to(&self.seg[ES]),
            cs: seg_to(&self.seg[CS]),
            ss: seg_to(&self.seg[SS]),
            ds: seg_to(&self.seg[DS]),
            fs: seg_to(&self.seg[FS]),
            gs: seg_to(&self.seg[GS]),
            tr: seg_to(&self.tr),
            ldt: seg_to(&self.ldtr),
            gdt: DescriptorTable {
                base: self.gdtr.base,
                limit: self.gdtr.limit,
            },
            idt: DescriptorTable {
                base: self.idtr.base,
                limit: self.idtr.limit,
            },
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: u64::from(self.vm.platform.tpr(self.id) >> 4),
            efer: self.efer,
            fpu: self.fpu.to_state(),
        }
    }
}
