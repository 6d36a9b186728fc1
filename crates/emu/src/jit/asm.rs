//! Assembling the code generator's instruction list into bytes.
//!
//! iced's `BlockEncoder` allocates per instruction and iterates to shorten
//! branches; it was most of a block's translation time. Translations are
//! small and their branches mostly leave the hot path, so here every
//! branch keeps its rel32 form and one pass of one `Encoder` suffices:
//! rel32 and RIP-relative disp32 forms have the same length whatever the
//! target, so each instruction is encoded once at its final address and
//! its label reference patched when all labels are known. The common
//! forms are written by `encode` (a direct encoder), the rest by iced.
//!
//! `CodeAssembler` marks a labelled instruction with its label's id as
//! `ip`, and a reference to a label (a branch target, a RIP-relative
//! memory operand) with that id as the target.

use super::encode;
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
    // The forms `encode` knows are written straight into `bytes`; iced's
    // encoder writes the rest.
    let mut bytes: Vec<u8> = Vec::with_capacity(ins.len() * 6);
    let mut enc = Encoder::new(64);
    // Sized for the usual label count up front (grown label by label it
    // was a string of reallocations in every translation).
    let mut labels: Vec<u32> = vec![u32::MAX; ins.len() + 64];
    // (where the rel32/disp32 field is, the end of its instruction, the
    // label id it names).
    let mut fixups: Vec<(usize, u64, u64)> = Vec::with_capacity(ins.len() / 2 + 8);
    let mut pos = 0u64;
    for (k, i) in ins.iter().enumerate() {
        let mut i = *i;
        if i.ip() != 0 {
            // Ids count the labels created, a few per instruction.
            let id = i.ip() as usize;
            if id as u64 > 4 * ins.len() as u64 + 64 {
                return Err(format!(
                    "instruction {k} has IP {:#x}, not a label id",
                    i.ip()
                ));
            }
            if labels.len() <= id {
                labels.resize(id + 1, u32::MAX);
            }
            labels[id] = pos as u32;
        }
        if i.code() == Code::DeclareQword {
            for n in 0..i.declare_data_len() {
                bytes.extend_from_slice(&i.get_declare_qword_value(n).to_le_bytes());
            }
            pos += 8 * i.declare_data_len() as u64;
            continue;
        }
        // Beyond the label ids: an absolute target (a thunk), encoded as is.
        let bound = 4 * ins.len() as u64 + 64;
        let id = match reference(&i) {
            Reference::Branch if i.near_branch64() > bound => {
                i.as_near_branch();
                None
            }
            Reference::Branch => {
                i.as_near_branch();
                let id = i.near_branch64();
                i.set_near_branch64(base + pos);
                Some(id)
            }
            Reference::Memory => {
                let id = i.memory_displacement64();
                i.set_memory_displacement64(base + pos);
                Some(id)
            }
            Reference::None => None,
        };
        let ip = base + pos;
        let (n, disp_at) = match encode::encode(&i, ip, &mut bytes) {
            Some(e) => {
                #[cfg(debug_assertions)]
                check_against_iced(&i, ip, &bytes[bytes.len() - e.len..]);
                (e.len as u64, e.disp_at)
            }
            None => {
                enc.set_buffer(std::mem::take(&mut bytes));
                let n = enc.encode(&i, ip);
                bytes = enc.take_buffer();
                let n = n.map_err(|e| e.to_string())?;
                let c = enc.get_constant_offsets();
                (
                    n as u64,
                    (c.displacement_size() == 4).then(|| c.displacement_offset()),
                )
            }
        };
        if let Some(id) = id {
            // A near branch's rel32 ends it; a memory operand's disp32 is
            // where the encoder says.
            let field = if matches!(reference(&i), Reference::Branch) {
                n as usize - 4
            } else {
                disp_at.ok_or_else(|| format!("instruction {k}: no 32-bit displacement"))?
            };
            fixups.push((pos as usize + field, pos + n, id));
        }
        pos += n;
    }
    for (at, end, id) in fixups {
        let target = match labels.get(id as usize) {
            Some(&o) if o != u32::MAX => u64::from(o),
            _ => return Err(format!("reference to unbound label {id}")),
        };
        let rel = i32::try_from(target as i64 - end as i64).map_err(|_| "branch too far")?;
        bytes[at..at + 4].copy_from_slice(&rel.to_le_bytes());
    }
    Ok(Assembled { bytes, labels })
}

/// Debug builds: the direct encoder wrote what iced would have.
#[cfg(debug_assertions)]
fn check_against_iced(i: &Instruction, ip: u64, ours: &[u8]) {
    let mut e = Encoder::new(64);
    let iced = e.encode(i, ip).map(|_| e.take_buffer());
    assert_eq!(
        iced.as_deref(),
        Ok(ours),
        "jit encoder and iced differ on {i}"
    );
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
        a.call(0x7000_0000_0000u64).unwrap();
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
        // An absolute target (a thunk) is kept.
        assert_eq!(ins[5].near_branch_target(), 0x7000_0000_0000);
        let o = r.offset(slot).unwrap() as usize;
        assert_eq!(&r.bytes[o..o + 8], &0x1122_3344_5566_7788u64.to_le_bytes());
    }
}
