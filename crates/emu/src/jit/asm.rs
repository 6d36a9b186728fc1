//! Assembling the code generator's instruction list into bytes.
//!
//! iced's `BlockEncoder` allocates per instruction and iterates to shorten
//! branches; it was most of a block's translation time. Translations are
//! small and their branches mostly leave the hot path, so here every
//! branch keeps its rel32 form and two passes of one `Encoder` suffice:
//! the first sizes each instruction (rel32 and RIP-relative disp32 forms
//! have the same length whatever the target), the second encodes the ones
//! that name a label at their final address.
//!
//! `CodeAssembler` marks a labelled instruction with its label's id as
//! `ip`, and a reference to a label (a branch target, a RIP-relative
//! memory operand) with that id as the target.

use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use iced_x86::{Code, Encoder, Instruction};

/// The bytes and where each label ended up.
pub struct Assembled {
    pub bytes: Vec<u8>,
    /// Offset of each label id's instruction (`u32::MAX`: unbound).
    labels: Vec<u32>,
}

impl Assembled {
    /// Offset of `label` from the start of the code.
    pub fn offset(&self, label: CodeLabel) -> Result<u64, String> {
        let id = label_id(label)?;
        match self.labels.get(id as usize) {
            Some(&o) if o != u32::MAX => Ok(u64::from(o)),
            _ => Err(format!("label {id} is not bound")),
        }
    }
}

/// The id `CodeAssembler` gave `label` (it keeps the accessor private; a
/// branch to the label carries it).
fn label_id(label: CodeLabel) -> Result<u64, String> {
    let mut a = CodeAssembler::new(64).map_err(|e| e.to_string())?;
    a.jmp(label).map_err(|e| e.to_string())?;
    Ok(a.instructions()[0].near_branch64())
}

/// Whether `i` refers to a label, and how to point it at `target`.
enum Reference {
    None,
    Branch,
    Memory,
}

fn reference(i: &Instruction) -> Reference {
    if i.is_ip_rel_memory_operand() {
        Reference::Memory
    } else if matches!(
        i.op0_kind(),
        iced_x86::OpKind::NearBranch64 | iced_x86::OpKind::NearBranch32
    ) {
        Reference::Branch
    } else {
        Reference::None
    }
}

/// Encodes `a`'s instructions for address `base`.
pub fn assemble(a: &CodeAssembler, base: u64) -> Result<Assembled, String> {
    let ins = a.instructions();
    let mut enc = Encoder::try_with_capacity(64, ins.len() * 6).map_err(|e| e.to_string())?;
    let mut offsets = Vec::with_capacity(ins.len());
    let mut labels: Vec<u32> = Vec::new();
    let mut pos = 0u64;
    // Pass 1: sizes, with label references aimed at the block's start.
    for i in ins {
        let mut i = *i;
        if i.ip() != 0 {
            // Ids count the labels created, a few per instruction.
            let id = i.ip() as usize;
            if id > 4 * ins.len() + 64 {
                return Err(format!(
                    "instruction {} has IP {:#x}, not a label id",
                    offsets.len(),
                    i.ip()
                ));
            }
            if labels.len() <= id {
                labels.resize(id + 1, u32::MAX);
            }
            labels[id] = pos as u32;
        }
        offsets.push(pos);
        if i.code() == Code::DeclareQword {
            pos += 8 * i.declare_data_len() as u64;
            continue;
        }
        match reference(&i) {
            Reference::Branch => {
                i.as_near_branch();
                i.set_near_branch64(base);
            }
            Reference::Memory => i.set_memory_displacement64(base),
            Reference::None => {}
        }
        pos += enc.encode(&i, base + pos).map_err(|e| e.to_string())? as u64;
    }
    let _ = enc.take_buffer();
    // Pass 2: the final bytes, label references resolved.
    let target = |id: u64| -> Result<u64, String> {
        match labels.get(id as usize) {
            Some(&o) if o != u32::MAX => Ok(base + u64::from(o)),
            _ => Err(format!("reference to unbound label {id}")),
        }
    };
    let mut bytes = Vec::with_capacity(pos as usize);
    for (k, i) in ins.iter().enumerate() {
        let mut i = *i;
        if i.code() == Code::DeclareQword {
            for n in 0..i.declare_data_len() {
                bytes.extend_from_slice(&i.get_declare_qword_value(n).to_le_bytes());
            }
            continue;
        }
        match reference(&i) {
            Reference::Branch => {
                i.as_near_branch();
                let t = target(i.near_branch64())?;
                i.set_near_branch64(t);
            }
            Reference::Memory => {
                let t = target(i.memory_displacement64())?;
                i.set_memory_displacement64(t);
            }
            Reference::None => {}
        }
        let at = base + offsets[k];
        let n = enc.encode(&i, at).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(&enc.take_buffer());
        if bytes.len() as u64 != offsets.get(k + 1).copied().unwrap_or(pos) {
            return Err(format!(
                "instruction {k} changed size between passes ({n} bytes)"
            ));
        }
    }
    Ok(Assembled { bytes, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn forward_and_backward_branches_and_rip_relative_slots_resolve() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut top = a.create_label();
        let mut end = a.create_label();
        let mut slot = a.create_label();
        a.set_label(&mut top).unwrap();
        a.dec(rcx).unwrap();
        a.jne(top).unwrap();
        a.jmp(end).unwrap();
        a.jmp(qword_ptr(slot)).unwrap();
        a.set_label(&mut end).unwrap();
        a.lea(rax, qword_ptr(slot)).unwrap();
        a.set_label(&mut slot).unwrap();
        a.dq(&[0x1122_3344_5566_7788]).unwrap();
        let base = 0x7000_0000_1000;
        let r = assemble(&a, base).unwrap();
        let ins: Vec<_> = Decoder::with_ip(64, &r.bytes, base, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let slot_at = base + r.offset(slot).unwrap();
        assert_eq!(r.offset(top).unwrap(), 0);
        assert_eq!(ins[1].mnemonic(), Mnemonic::Jne);
        assert_eq!(ins[1].near_branch_target(), base);
        assert_eq!(ins[2].near_branch_target(), base + r.offset(end).unwrap());
        assert_eq!(ins[3].ip_rel_memory_address(), slot_at);
        assert_eq!(ins[4].ip_rel_memory_address(), slot_at);
        let o = r.offset(slot).unwrap() as usize;
        assert_eq!(&r.bytes[o..o + 8], &0x1122_3344_5566_7788u64.to_le_bytes());
    }
}
