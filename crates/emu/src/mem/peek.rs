//! The debugger's page walk: linear → physical through the current page
//! tables with no side effects at all (no accessed/dirty bits, no CR2, no
//! TLB fill), and no permission checks: a debugger reads what the tables
//! map, whoever may access it.

use crate::cpu::{CR0_PG, CR4_PAE, CR4_PSE, Cpu, EFER_LMA};

const P: u64 = 1;
const PS: u64 = 1 << 7;
const ADDR_MASK: u64 = ((1 << super::paging::PHYS_BITS) - 1) & !0xfff;

impl Cpu {
    /// The physical address `lin` maps to, or `None` if a level is not
    /// present or a table is outside RAM.
    pub fn peek_translate(&self, lin: u64) -> Option<u64> {
        let entry = |pa: u64| self.vm.phys.read_u64(pa);
        if self.cr0 & CR0_PG == 0 {
            return Some(lin & 0xffff_ffff);
        }
        if self.efer & EFER_LMA != 0 {
            let mut table = self.cr3 & ADDR_MASK;
            for level in (1..=4u32).rev() {
                let shift = 12 + 9 * (level - 1);
                let e = entry(table + ((lin >> shift) & 0x1ff) * 8)?;
                if e & P == 0 {
                    return None;
                }
                if level == 1 || (e & PS != 0 && level <= 3) {
                    let mask = (1u64 << shift) - 1;
                    return Some((e & ADDR_MASK & !mask) | (lin & mask));
                }
                table = e & ADDR_MASK;
            }
            return None;
        }
        if self.cr4 & CR4_PAE != 0 {
            let pdpte = entry((self.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8)?;
            if pdpte & P == 0 {
                return None;
            }
            let pde = entry((pdpte & ADDR_MASK) + ((lin >> 21) & 0x1ff) * 8)?;
            if pde & P == 0 {
                return None;
            }
            if pde & PS != 0 {
                return Some((pde & ADDR_MASK & !0x1f_ffff) | (lin & 0x1f_ffff));
            }
            let pte = entry((pde & ADDR_MASK) + ((lin >> 12) & 0x1ff) * 8)?;
            return (pte & P != 0).then_some((pte & ADDR_MASK) | (lin & 0xfff));
        }
        let lin = lin & 0xffff_ffff;
        let entry32 = |pa: u64| {
            self.vm.phys.read_u64(pa & !7).map(|v| {
                if pa & 4 != 0 {
                    v >> 32
                } else {
                    v & 0xffff_ffff
                }
            })
        };
        let pde = entry32((self.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4)?;
        if pde & P == 0 {
            return None;
        }
        if pde & PS != 0 && self.cr4 & CR4_PSE != 0 {
            return Some((pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32) | (lin & 0x3f_ffff));
        }
        let pte = entry32((pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4)?;
        (pte & P != 0).then_some((pte & 0xffff_f000) | (lin & 0xfff))
    }
}
