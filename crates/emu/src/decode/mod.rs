//! Decoding: iced-x86 instructions become compact [`Insn`]s with a handler
//! and pre-decoded operands, cached in blocks keyed by physical address.

pub mod cache;
pub mod fuse;
pub mod table;

use iced_x86::{Instruction, OpKind, Register};

use crate::cpu::fault::Res;
use crate::cpu::{Cpu, RIP, ZERO};

pub use table::{Handler, Table};

/// One decoded instruction, ready to execute.
#[derive(Clone)]
pub struct Insn {
    pub exec: Handler,
    /// Encoded length in bytes.
    pub len: u8,
    /// Register operands 0..2 (GPR index, 8-bit byte slot, or the plain
    /// number of an XMM/MM/ST/CR/DR/segment register).
    pub r0: u8,
    pub r1: u8,
    pub r2: u8,
    /// Memory operand: segment, base, index (GPR slots; [`ZERO`] when
    /// absent, [`RIP`] for RIP-relative), scale as a shift.
    pub seg: u8,
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    /// Address-size mask (0xffff, 0xffff_ffff or all ones).
    pub amask: u64,
    /// Displacement; relative to the next instruction when RIP-relative.
    pub disp: u64,
    /// Immediate, or branch displacement (target − next IP).
    pub imm: u64,
    /// Second immediate (`enter` level) or far-pointer selector.
    pub imm2: u64,
    /// The iced `Code` (as its number), for the few handlers that look.
    pub code: u16,
    /// The mod and r/m bits of the memory operand's ModRM (x87 FOP).
    pub modrm: u8,
}

impl Insn {
    /// The iced `Code` this instruction was decoded as.
    pub fn code(&self) -> iced_x86::Code {
        iced_x86::Code::try_from(usize::from(self.code)).unwrap_or(iced_x86::Code::INVALID)
    }
}

// Blocks are arrays of these, and the hot ones should stay in cache.
const _: () = assert!(std::mem::size_of::<Insn>() <= 56);

/// The byte slot of an 8-bit register (AH..BH are `0x10 | n`).
pub fn gpr8_slot(r: Register) -> u8 {
    let n = r.number() as u8;
    match n {
        4..=7 => (n - 4) | 0x10,
        8.. => n - 4,
        _ => n,
    }
}

/// The index an operand register gets in `Insn::r*`.
pub fn reg_index(r: Register) -> u8 {
    if r.is_gpr8() {
        gpr8_slot(r)
    } else {
        r.number() as u8
    }
}

fn address_mask(ins: &Instruction) -> u64 {
    let size = |r: Register| {
        if r.is_gpr16() {
            16
        } else if r.is_gpr32() || r == Register::EIP {
            32
        } else {
            64
        }
    };
    let bits = if ins.memory_base() != Register::None {
        size(ins.memory_base())
    } else if ins.memory_index() != Register::None {
        size(ins.memory_index())
    } else {
        match ins.memory_displ_size() {
            2 => 16,
            4 => 32,
            _ => 64,
        }
    };
    match bits {
        16 => 0xffff,
        32 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn string_mask(kind: OpKind) -> Option<u64> {
    Some(match kind {
        OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => 0xffff,
        OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => 0xffff_ffff,
        OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => u64::MAX,
        _ => return None,
    })
}

impl Insn {
    /// Pre-decodes `ins`'s operands for `exec`.
    pub fn build(ins: &Instruction, exec: Handler) -> Insn {
        let mut d = Insn {
            exec,
            len: ins.len() as u8,
            r0: 0,
            r1: 0,
            r2: 0,
            seg: crate::cpu::DS as u8,
            base: ZERO as u8,
            index: ZERO as u8,
            scale: 0,
            amask: u64::MAX,
            disp: 0,
            imm: 0,
            imm2: 0,
            code: ins.code() as u16,
            modrm: 0,
        };
        let mut regs = [0u8; 3];
        for op in 0..ins.op_count().min(5) {
            let kind = ins.op_kind(op);
            match kind {
                OpKind::Register => {
                    if let Some(slot) = regs.get_mut(op as usize) {
                        *slot = reg_index(ins.op_register(op));
                    }
                }
                OpKind::Memory => {
                    d.modrm = crate::isa::x87::modrm_mem(ins);
                    d.seg = ins.memory_segment().number() as u8;
                    d.amask = address_mask(ins);
                    let base = ins.memory_base();
                    if base == Register::RIP || base == Register::EIP {
                        d.base = RIP as u8;
                        d.disp = ins.memory_displacement64().wrapping_sub(ins.next_ip());
                    } else {
                        if base != Register::None {
                            d.base = base.full_register().number() as u8;
                        }
                        d.disp = ins.memory_displacement64();
                    }
                    let index = ins.memory_index();
                    if index != Register::None && index.is_gpr() {
                        d.index = index.full_register().number() as u8;
                        d.scale = ins.memory_index_scale().trailing_zeros() as u8;
                    }
                }
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64 => d.imm = ins.immediate(op),
                OpKind::Immediate8_2nd => d.imm2 = ins.immediate(op),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    d.imm = ins.near_branch_target().wrapping_sub(ins.next_ip());
                }
                OpKind::FarBranch16 => {
                    d.imm = u64::from(ins.far_branch16());
                    d.imm2 = u64::from(ins.far_branch_selector());
                }
                OpKind::FarBranch32 => {
                    d.imm = u64::from(ins.far_branch32());
                    d.imm2 = u64::from(ins.far_branch_selector());
                }
                k => {
                    if let Some(mask) = string_mask(k) {
                        d.amask = mask;
                        if matches!(
                            k,
                            OpKind::MemorySegSI
                                | OpKind::MemorySegESI
                                | OpKind::MemorySegRSI
                                | OpKind::MemorySegDI
                                | OpKind::MemorySegEDI
                                | OpKind::MemorySegRDI
                        ) {
                            d.seg = ins.memory_segment().number() as u8;
                        }
                    }
                }
            }
        }
        [d.r0, d.r1, d.r2] = regs;
        d
    }
}

/// The #UD handler for encodings that are invalid.
pub fn invalid(_: &mut Cpu, _: &Insn) -> Res {
    Err(crate::cpu::fault::Fault::ud())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bits: u32, bytes: &[u8], ip: u64) -> Insn {
        let ins = Decoder::with_ip(bits, bytes, ip, DecoderOptions::NONE).decode();
        Insn::build(&ins, invalid)
    }

    #[test]
    fn rip_relative_operands_are_position_independent() {
        // mov eax, [rip+0x10]
        let d = decode(64, &[0x8b, 0x05, 0x10, 0, 0, 0], 0x1000);
        assert_eq!(usize::from(d.base), RIP);
        assert_eq!(d.disp, 0x10);
        assert_eq!(d.r0, 0);
    }

    #[test]
    fn address_size_follows_the_encoding() {
        // mov ax, [bx+si+4] (16-bit)
        let d = decode(16, &[0x8b, 0x40, 0x04], 0);
        assert_eq!(d.amask, 0xffff);
        assert_eq!((d.base, d.index, d.disp), (3, 6, 4));
        // mov eax, [0x1234] in 32-bit code, and with 67h in 64-bit code
        assert_eq!(decode(32, &[0xa1, 0x34, 0x12, 0, 0], 0).amask, 0xffff_ffff);
        assert_eq!(
            decode(64, &[0x67, 0x8b, 0x04, 0x25, 0x34, 0x12, 0, 0], 0).amask,
            0xffff_ffff
        );
        assert_eq!(
            decode(64, &[0x8b, 0x04, 0x25, 0x34, 0x12, 0, 0], 0).amask,
            u64::MAX
        );
    }

    #[test]
    fn high_byte_registers_use_byte_slots() {
        // mov ah, bh
        let d = decode(32, &[0x88, 0xfc], 0);
        assert_eq!((d.r0, d.r1), (0x10, 0x13));
        // mov spl, r9b
        let d = decode(64, &[0x44, 0x88, 0xcc], 0);
        assert_eq!((d.r0, d.r1), (4, 9));
    }

    #[test]
    fn branches_store_relative_targets() {
        // jmp short -2 (to itself) at 0x100
        let d = decode(64, &[0xeb, 0xfe], 0x100);
        assert_eq!(d.imm, (-2i64) as u64);
    }
}
