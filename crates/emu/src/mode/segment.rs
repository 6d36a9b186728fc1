//! Segment descriptors: reading them from the GDT/LDT, checking them as
//! the manuals say for each kind of load, and filling the hidden cache.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W8, W32, W64};
use crate::cpu::*;

/// A raw 8-byte descriptor and where it lives.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub raw: u64,
    /// Linear address of the descriptor (for the accessed/busy bits).
    pub addr: u64,
}

impl Desc {
    pub fn base(&self) -> u64 {
        ((self.raw >> 16) & 0xff_ffff) | (((self.raw >> 56) & 0xff) << 24)
    }
    pub fn limit(&self) -> u32 {
        let raw = ((self.raw & 0xffff) | ((self.raw >> 32) & 0xf_0000)) as u32;
        if self.raw & (1 << 55) != 0 {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    }
    /// Attributes in the `Seg::attr` layout.
    pub fn attr(&self) -> u16 {
        let a = (self.raw >> 40) as u16;
        (a & 0xff) | (a & 0xf000)
    }
    pub fn typ(&self) -> u8 {
        ((self.raw >> 40) & 0xf) as u8
    }
    /// Code or data (S=1) rather than system.
    pub fn s(&self) -> bool {
        self.raw & (1 << 44) != 0
    }
    pub fn dpl(&self) -> u8 {
        ((self.raw >> 45) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.raw & (1 << 47) != 0
    }
    pub fn is_code(&self) -> bool {
        self.s() && self.typ() & 8 != 0
    }
    pub fn conforming(&self) -> bool {
        self.is_code() && self.typ() & 4 != 0
    }
    pub fn l(&self) -> bool {
        self.raw & (1 << 53) != 0
    }
    /// The segment cache this descriptor loads for selector `sel`.
    pub fn to_seg(self, sel: u16) -> Seg {
        Seg {
            sel,
            base: self.base(),
            limit: self.limit(),
            attr: self.attr(),
            unusable: false,
            ..Seg::default()
        }
    }
}

#[inline]
pub fn sel_code(sel: u16) -> u32 {
    u32::from(sel & 0xfffc)
}

impl Cpu {
    /// Reads the descriptor for `sel` from the GDT or LDT; #GP(sel) if it
    /// is outside the table.
    pub fn read_desc(&mut self, sel: u16) -> Res<Desc> {
        let (base, limit) = if sel & 4 != 0 {
            if self.ldtr.unusable {
                return Err(Fault::gp(sel_code(sel)));
            }
            (self.ldtr.base, u64::from(self.ldtr.limit))
        } else {
            (self.gdtr.base, u64::from(self.gdtr.limit))
        };
        let off = u64::from(sel & 0xfff8);
        if off + 7 > limit {
            return Err(Fault::gp(sel_code(sel)));
        }
        let addr = base.wrapping_add(off);
        let raw = self.read_sys::<W64>(addr)?;
        Ok(Desc { raw, addr })
    }

    /// The high 8 bytes of a 16-byte system descriptor (long mode).
    pub fn read_desc_high(&mut self, d: &Desc) -> Res<u64> {
        self.read_sys::<W64>(d.addr.wrapping_add(8))
    }

    /// Sets the accessed bit of a code/data descriptor in memory.
    pub fn set_accessed(&mut self, d: &Desc) -> Res {
        if d.raw & (1 << 40) == 0 {
            let b = self.read_sys::<W8>(d.addr + 5)?;
            self.write_sys::<W8>(d.addr + 5, b | 1)?;
        }
        Ok(())
    }

    /// `mov sreg`, `pop sreg`, `lds`…: loads segment `n` (not CS) with the
    /// checks of the current mode.
    pub fn load_seg(&mut self, n: usize, sel: u16) -> Res {
        match self.mode {
            Mode::Real | Mode::Virtual8086 => {
                self.seg[n].set_real(sel);
                if self.mode == Mode::Virtual8086 {
                    self.seg[n].attr = 0xf3 | ATTR_P;
                    self.seg[n].limit = 0xffff;
                }
                self.refresh_segment(n);
                Ok(())
            }
            _ => self.load_seg_protected(n, sel),
        }
    }

    fn load_seg_protected(&mut self, n: usize, sel: u16) -> Res {
        let rpl = (sel & 3) as u8;
        if sel & 0xfffc == 0 {
            if n == SS && !(self.mode == Mode::Long && self.cpl < 3 && rpl == self.cpl) {
                return Err(Fault::gp(0));
            }
            let s = &mut self.seg[n];
            *s = Seg {
                sel,
                unusable: true,
                attr: if n == SS {
                    u16::from(self.cpl) << ATTR_DPL_SHIFT
                } else {
                    0
                },
                ..Seg::default()
            };
            self.refresh_segment(n);
            return Ok(());
        }
        let d = self.read_desc(sel)?;
        let code = sel_code(sel);
        if n == SS {
            let writable_data = d.s() && d.typ() & 0xa == 0x2;
            if rpl != self.cpl || d.dpl() != self.cpl || !writable_data {
                return Err(Fault::gp(code));
            }
            if !d.present() {
                return Err(Fault::ss(code));
            }
        } else {
            let readable = d.s() && (d.typ() & 8 == 0 || d.typ() & 2 != 0);
            if !readable {
                return Err(Fault::gp(code));
            }
            if !d.conforming() && (rpl > d.dpl() || self.cpl > d.dpl()) {
                return Err(Fault::gp(code));
            }
            if !d.present() {
                return Err(Fault::np(code));
            }
        }
        self.set_accessed(&d)?;
        self.seg[n] = d.to_seg(sel);
        self.seg[n].attr |= 1; // accessed
        self.refresh_segment(n);
        Ok(())
    }

    /// Loads CS from a code descriptor for a far transfer to privilege
    /// `cpl` (checks done by the caller), and recomputes the mode.
    pub fn load_cs(&mut self, d: &Desc, sel: u16, cpl: u8) -> Res {
        self.set_accessed(d)?;
        let mut s = d.to_seg((sel & !3) | u16::from(cpl));
        s.attr |= 1;
        self.seg[CS] = s;
        self.cpl = cpl;
        self.update_mode();
        Ok(())
    }

    /// The checks for a far jmp/call/ret/iret target code segment that
    /// is a plain code descriptor. Returns the new CPL.
    pub fn check_code_target(&mut self, d: &Desc, sel: u16, ret: bool) -> Res<u8> {
        let code = sel_code(sel);
        if !d.is_code() {
            return Err(Fault::gp(code));
        }
        let rpl = (sel & 3) as u8;
        let new_cpl = if ret {
            // Returns go to RPL, never inward.
            if rpl < self.cpl
                || (d.conforming() && d.dpl() > rpl)
                || (!d.conforming() && d.dpl() != rpl)
            {
                return Err(Fault::gp(code));
            }
            rpl
        } else if d.conforming() {
            if d.dpl() > self.cpl {
                return Err(Fault::gp(code));
            }
            self.cpl
        } else {
            if rpl > self.cpl || d.dpl() != self.cpl {
                return Err(Fault::gp(code));
            }
            self.cpl
        };
        if self.long_mode() && d.l() && d.raw & (1 << 54) != 0 {
            return Err(Fault::gp(code));
        }
        if !d.present() {
            return Err(Fault::np(code));
        }
        Ok(new_cpl)
    }

    /// After a return to an outer privilege level: data segments the new
    /// CPL may not use become null (manual: RET/IRET "check segments").
    pub fn nullify_data_segments(&mut self) {
        for n in [ES, DS, FS, GS] {
            let s = self.seg[n];
            let conforming_code = s.typ() & 0xc == 0xc;
            if !s.unusable && !conforming_code && s.dpl() < self.cpl {
                self.seg[n] = Seg {
                    unusable: true,
                    ..Seg::default()
                };
            }
        }
        self.refresh_segments();
    }

    /// The full base of a 16-byte (long mode) LDT/TSS descriptor: #GP(sel)
    /// when the high half's type field is not 0 or the base is not
    /// canonical (SDM LLDT/LTR: "IF (IA32_EFER.LMA = 1) ...").
    fn system_base_high(&mut self, d: &Desc, sel: u16) -> Res<u64> {
        let hi = self.read_desc_high(d)?;
        let base = d.base() | (hi & 0xffff_ffff) << 32;
        if (hi >> 40) & 0x1f != 0 || !canonical(base) {
            return Err(Fault::gp(sel_code(sel)));
        }
        Ok(base)
    }

    /// `lldt`.
    pub fn load_ldt(&mut self, sel: u16) -> Res {
        if sel & 0xfffc == 0 {
            self.ldtr = Seg {
                sel,
                unusable: true,
                ..Seg::default()
            };
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(Fault::gp(sel_code(sel)));
        }
        let d = self.read_desc(sel)?;
        if d.s() || d.typ() != 2 {
            return Err(Fault::gp(sel_code(sel)));
        }
        if !d.present() {
            return Err(Fault::np(sel_code(sel)));
        }
        let mut s = d.to_seg(sel);
        if self.long_mode() {
            s.base = self.system_base_high(&d, sel)?;
        }
        self.ldtr = s;
        Ok(())
    }

    /// `ltr`: loads an available TSS and marks it busy.
    pub fn load_tr(&mut self, sel: u16) -> Res {
        if sel & 0xfffc == 0 || sel & 4 != 0 {
            return Err(Fault::gp(sel_code(sel)));
        }
        let d = self.read_desc(sel)?;
        let avail = if self.long_mode() {
            d.typ() == 9
        } else {
            d.typ() == 9 || d.typ() == 1
        };
        if d.s() || !avail {
            return Err(Fault::gp(sel_code(sel)));
        }
        if !d.present() {
            return Err(Fault::np(sel_code(sel)));
        }
        let mut s = d.to_seg(sel);
        if self.long_mode() {
            s.base = self.system_base_high(&d, sel)?;
        }
        let hi = self.read_sys::<W32>(d.addr + 4)?;
        self.write_sys::<W32>(d.addr + 4, hi | (2 << 8))?;
        s.attr |= 2; // busy
        self.tr = s;
        Ok(())
    }
}
