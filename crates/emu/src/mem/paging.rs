//! Page walks: 32-bit (with PSE), PAE, and 4-level long-mode paging, with
//! NX, large pages, global pages, accessed/dirty bits and CR0.WP.

use crate::cpu::fault::Fault;
use crate::cpu::fault::{PF, Res, Stop};
use crate::cpu::{CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, Cpu, EFER_LMA, EFER_NXE};

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const XD: u64 = 1 << 63;
/// Physical address bits the CPU advertises (CPUID 0x8000_0008).
pub const PHYS_BITS: u32 = 40;
const ADDR_MASK: u64 = ((1 << PHYS_BITS) - 1) & !0xfff;
const HIGH_RSVD: u64 = ((1u64 << 52) - 1) & !((1 << PHYS_BITS) - 1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

/// What a successful walk found: the 4 KiB physical page and the
/// permissions accumulated over all levels.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    pub pa: u64,
    pub user: bool,
    pub write: bool,
    pub nx: bool,
    pub dirty: bool,
    pub global: bool,
    /// log2 of the page size (12, 21, 22 or 30).
    pub shift: u8,
}

impl Cpu {
    /// Translates `lin` for `acc`, as a user access if `user`. Raises #PF
    /// (setting CR2) when the walk fails.
    pub fn walk(&mut self, lin: u64, acc: Access, user: bool) -> Res<Walk> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(Walk {
                pa: lin & 0xffff_ffff & !0xfff,
                user: true,
                write: true,
                nx: false,
                dirty: true,
                global: false,
                shift: 12,
            });
        }
        let nxe = self.efer & EFER_NXE != 0;
        let mut rsvd = HIGH_RSVD;
        if !nxe {
            rsvd |= XD;
        }
        // (entry address, entry, 4-byte entry) for each level walked.
        let mut path: [(u64, u64, bool); 4] = [(0, 0, false); 4];
        let mut depth = 0;
        let mut rw = true;
        let mut us = true;
        let mut nx = false;
        let mut pa = 0;
        let mut global = false;
        let mut shift = 12u8;
        let mut leaf = 0;
        let mut fault_rsvd = false;
        let mut present = true;

        macro_rules! read_entry {
            ($addr:expr, $four:expr) => {{
                let addr: u64 = $addr;
                let e = if $four {
                    self.vm
                        .phys
                        .read_u64(addr & !7)
                        .map(|v| {
                            if addr & 4 != 0 {
                                v >> 32
                            } else {
                                v & 0xffff_ffff
                            }
                        })
                        .unwrap_or(0)
                } else {
                    self.vm.phys.read_u64(addr).unwrap_or(0)
                };
                path[depth] = (addr, e, $four);
                depth += 1;
                e
            }};
        }

        'walk: {
            if self.efer & EFER_LMA != 0 {
                let mut table = self.cr3 & ADDR_MASK;
                for level in (1..=4).rev() {
                    let level_shift = 12 + 9 * (level - 1);
                    let e = read_entry!(table + ((lin >> level_shift) & 0x1ff) * 8, false);
                    if e & P == 0 {
                        present = false;
                        break 'walk;
                    }
                    let big = e & PS != 0 && (level == 2 || level == 3);
                    if e & rsvd != 0 || (level == 4 && e & PS != 0) {
                        fault_rsvd = true;
                        break 'walk;
                    }
                    rw &= e & RW != 0;
                    us &= e & US != 0;
                    nx |= e & XD != 0 && nxe;
                    if big || level == 1 {
                        let page_mask = (1u64 << level_shift) - 1;
                        if big && e & (page_mask & !0x1fff) & ADDR_MASK != 0 {
                            fault_rsvd = true;
                            break 'walk;
                        }
                        pa = (e & ADDR_MASK & !page_mask) | (lin & page_mask & !0xfff);
                        global = e & G != 0;
                        shift = level_shift as u8;
                        leaf = e;
                        break 'walk;
                    }
                    table = e & ADDR_MASK;
                }
            } else if self.cr4 & CR4_PAE != 0 {
                let pdpte = read_entry!((self.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8, false);
                if pdpte & P == 0 {
                    present = false;
                    break 'walk;
                }
                if pdpte & (HIGH_RSVD | XD | 0x1e6) != 0 {
                    fault_rsvd = true;
                    break 'walk;
                }
                let pde = read_entry!((pdpte & ADDR_MASK) + ((lin >> 21) & 0x1ff) * 8, false);
                if pde & P == 0 {
                    present = false;
                    break 'walk;
                }
                if pde & rsvd != 0 {
                    fault_rsvd = true;
                    break 'walk;
                }
                rw &= pde & RW != 0;
                us &= pde & US != 0;
                nx |= pde & XD != 0 && nxe;
                if pde & PS != 0 {
                    pa = (pde & ADDR_MASK & !0x1f_ffff) | (lin & 0x1f_f000);
                    global = pde & G != 0;
                    shift = 21;
                    leaf = pde;
                    break 'walk;
                }
                let pte = read_entry!((pde & ADDR_MASK) + ((lin >> 12) & 0x1ff) * 8, false);
                if pte & P == 0 {
                    present = false;
                    break 'walk;
                }
                if pte & rsvd != 0 {
                    fault_rsvd = true;
                    break 'walk;
                }
                rw &= pte & RW != 0;
                us &= pte & US != 0;
                nx |= pte & XD != 0 && nxe;
                pa = pte & ADDR_MASK;
                global = pte & G != 0;
                leaf = pte;
            } else {
                let lin = lin & 0xffff_ffff;
                let pde = read_entry!((self.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4, true);
                if pde & P == 0 {
                    present = false;
                    break 'walk;
                }
                rw &= pde & RW != 0;
                us &= pde & US != 0;
                if pde & PS != 0 && self.cr4 & CR4_PSE != 0 {
                    // PSE-36: bits 13..20 give physical address bits 32..39.
                    pa = (pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32) | (lin & 0x3f_f000);
                    global = pde & G != 0;
                    shift = 22;
                    leaf = pde;
                    break 'walk;
                }
                let pte = read_entry!((pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4, true);
                if pte & P == 0 {
                    present = false;
                    break 'walk;
                }
                rw &= pte & RW != 0;
                us &= pte & US != 0;
                pa = pte & 0xffff_f000;
                global = pte & G != 0;
                leaf = pte;
            }
        }

        let write = acc == Access::Write;
        let fetch = acc == Access::Exec;
        let mut code = u32::from(write) << 1 | u32::from(user) << 2;
        if fetch && nxe {
            code |= 1 << 4;
        }
        if !present || fault_rsvd {
            if fault_rsvd {
                code |= 1 | 1 << 3;
            }
            return Err(self.page_fault(lin, code));
        }
        let wp = self.cr0 & CR0_WP != 0;
        let denied = (user && !us) || (write && !rw && (user || wp)) || (fetch && nx);
        if denied {
            return Err(self.page_fault(lin, code | 1));
        }
        // Accessed on every level, dirty on the leaf for writes.
        let leaf_idx = depth - 1;
        for (i, &(addr, e, four)) in path[..depth].iter().enumerate() {
            let pae_pdpte = i == 0 && depth == 3 && self.efer & EFER_LMA == 0;
            if pae_pdpte {
                continue; // PAE PDPTEs have no A bit.
            }
            let mut bits = 0;
            if e & A == 0 {
                bits |= A;
            }
            if i == leaf_idx && write && e & D == 0 {
                bits |= D;
            }
            if bits != 0 {
                if four {
                    self.vm.phys.or_u32(addr, bits as u32);
                } else {
                    self.vm.phys.or_u64(addr, bits);
                }
            }
        }
        Ok(Walk {
            pa,
            user: us,
            write: rw,
            nx,
            dirty: leaf & D != 0 || write,
            global: global && self.cr4 & CR4_PGE != 0,
            shift,
        })
    }

    #[cold]
    fn page_fault(&mut self, lin: u64, code: u32) -> Stop {
        self.cr2 = lin;
        Fault::raise(PF, Some(code))
    }
}
