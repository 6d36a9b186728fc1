//! Guest registers held in host registers within one translated block.
//!
//! A guest register is loaded from `Cpu::gpr` on its first use and then
//! stays in its host register, so a dependent chain of instructions runs
//! register to register instead of through a store and a reload each
//! (store forwarding costs ~5 cycles a hop). Changed registers are written
//! back before anything that reads the guest state in `Cpu::gpr` (a call
//! into the interpreter, an exit) and when evicted; an out-of-line path
//! to the interpreter hands `slots` to a helper that stores and reloads
//! them.
//!
//! RBX, RBP, R12 and R13 are callee-saved in the SysV ABI and survive
//! helper calls; RSI, RDI, R8 and R9 do not, so helpers called on the
//! fast path save them (`push_clobbered`). Every load and store here is
//! a `mov`: host flags (which may hold the guest's) survive.

use std::mem::offset_of;

use super::asm::*;
use iced_x86::Register;

use crate::cpu::Cpu;

/// The host registers that hold guest registers; the first
/// [`CALLEE_SAVED`] survive calls.
pub const HOST: [Register; 8] = [
    Register::RBX,
    Register::RBP,
    Register::R12,
    Register::R13,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
];
const CALLEE_SAVED: usize = 4;

/// A slot of [`Regs::slots`] whose guest register must be stored.
pub const SLOT_CHANGED: u8 = 0x80;
/// A slot of [`Regs::slots`] holding nothing.
pub const SLOT_FREE: u8 = 0xff;

/// Offset of guest register `n` in `Cpu`.
pub fn gpr(n: usize) -> i32 {
    (offset_of!(Cpu, gpr) + 8 * n) as i32
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn r64(r: Register) -> AsmRegister64 {
    // HOST holds only 64-bit general registers.
    get_gpr64(r).unwrap_or(rax)
}

/// Which guest register each host register of [`HOST`] holds at one
/// point of the generated code.
#[derive(Clone, Default, Debug)]
pub struct Regs {
    held: [Option<u8>; 8],
    dirty: [bool; 8],
    last_use: [u32; 8],
    clock: u32,
}

impl Regs {
    fn slot_of(&self, g: usize) -> Option<usize> {
        self.held.iter().position(|h| *h == Some(g as u8))
    }

    /// The host register holding guest register `g`, if any.
    pub fn host_of(&self, g: usize) -> Option<Register> {
        self.slot_of(g).map(|s| HOST[s])
    }

    /// The host register for guest register `g`, loaded from `Cpu::gpr`
    /// when `load` and not yet held. Evicts the least recently used
    /// register not in `pinned` (writing it back if changed).
    pub fn get(
        &mut self,
        a: &mut CodeAssembler,
        g: usize,
        load: bool,
        pinned: &[usize],
    ) -> Result<Register, String> {
        self.clock += 1;
        if let Some(s) = self.slot_of(g) {
            self.last_use[s] = self.clock;
            return Ok(HOST[s]);
        }
        let s = match self.held.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                let s = (0..HOST.len())
                    .filter(|&s| !pinned.contains(&usize::from(self.held[s].unwrap_or(0))))
                    .min_by_key(|&s| self.last_use[s])
                    .ok_or("out of host registers")?;
                self.evict(a, s)?;
                s
            }
        };
        if load {
            a.mov(r64(HOST[s]), qword_ptr(r15 + gpr(g))).map_err(err)?;
        }
        self.held[s] = Some(g as u8);
        self.dirty[s] = false;
        self.last_use[s] = self.clock;
        Ok(HOST[s])
    }

    fn evict(&mut self, a: &mut CodeAssembler, s: usize) -> Result<(), String> {
        if let (Some(g), true) = (self.held[s], self.dirty[s]) {
            a.mov(qword_ptr(r15 + gpr(usize::from(g))), r64(HOST[s]))
                .map_err(err)?;
        }
        self.held[s] = None;
        self.dirty[s] = false;
        Ok(())
    }

    /// Guest register `g` (held) was written.
    pub fn changed(&mut self, g: usize) {
        if let Some(s) = self.slot_of(g) {
            self.dirty[s] = true;
        }
    }

    /// Stores the changed registers; they stay held, now clean.
    pub fn write_back(&mut self, a: &mut CodeAssembler) -> Result<(), String> {
        for ((h, held), dirty) in HOST.iter().zip(self.held).zip(self.dirty) {
            if let (Some(g), true) = (held, dirty) {
                a.mov(qword_ptr(r15 + gpr(usize::from(g))), r64(*h))
                    .map_err(err)?;
            }
        }
        self.dirty = [false; 8];
        Ok(())
    }

    /// What each host register of [`HOST`] holds, for a slow-path site
    /// record (`helpers::interp_site`): the guest register's number,
    /// [`SLOT_CHANGED`] added when it differs from `Cpu::gpr`;
    /// [`SLOT_FREE`] for none.
    pub fn slots(&self) -> [u8; 8] {
        std::array::from_fn(|s| match self.held[s] {
            Some(g) => g | if self.dirty[s] { SLOT_CHANGED } else { 0 },
            None => SLOT_FREE,
        })
    }

    /// Forgets every register (after the interpreter may have changed
    /// them in `Cpu::gpr`; changed ones must have been written back).
    pub fn forget(&mut self) {
        self.held = [None; 8];
        self.dirty = [false; 8];
    }

    /// Saves the call-clobbered host registers around a helper call on
    /// the fast path (an even count keeps the stack 16-byte aligned).
    pub fn push_clobbered(a: &mut CodeAssembler) -> Result<(), String> {
        for r in &HOST[CALLEE_SAVED..] {
            a.push(r64(*r)).map_err(err)?;
        }
        Ok(())
    }

    pub fn pop_clobbered(a: &mut CodeAssembler) -> Result<(), String> {
        for r in HOST[CALLEE_SAVED..].iter().rev() {
            a.pop(r64(*r)).map_err(err)?;
        }
        Ok(())
    }
}

const _: () = assert!((HOST.len() - CALLEE_SAVED).is_multiple_of(2));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_unpinned_register() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut r = Regs::default();
        for g in 0..8 {
            r.get(&mut a, g, true, &[]).unwrap();
        }
        r.changed(0);
        // Touch 0 again so 1 is the oldest; 1 is pinned, so 2 goes.
        r.get(&mut a, 0, true, &[]).unwrap();
        let before = a.decoded().len();
        let h = r.get(&mut a, 9, true, &[1, 9]).unwrap();
        assert_eq!(r.host_of(2), None);
        assert_eq!(r.host_of(9), Some(h));
        // Clean eviction: only the load of 9 was emitted.
        assert_eq!(a.decoded().len(), before + 1);
        // Evicting the changed register 0 stores it first.
        for g in 10..=16 {
            r.get(&mut a, g, true, &[9]).unwrap();
        }
        assert_eq!(r.host_of(0), None);
        assert!(a.decoded().iter().any(|i| {
            i.op0_kind() == iced_x86::OpKind::Memory && i.memory_displacement64() == gpr(0) as u64
        }));
    }
}
