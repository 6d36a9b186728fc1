//! A direct encoder for the few instruction forms translations are made
//! of (moves, ALU operations, `lea`, shifts, `setcc`, rel32 branches and
//! calls: 97% of what the code generator emits).
//!
//! iced's `Encoder` handles every x86 form and checks each operand, which
//! made it half of a translation's cost (~50 ns per instruction). Here one
//! table look-up (iced's own `OpCodeInfo` for the instruction's `Code`)
//! gives the opcode, `/digit` and operand layout, and the bytes are
//! written directly. Anything outside those forms (VEX, mandatory
//! prefixes, segment overrides, 32-bit addressing, `ah`..`bh` beside a
//! REX prefix) returns `None` and goes to iced. The result is byte for
//! byte what iced writes: debug builds compare every instruction, and
//! the tests compare every supported `Code` over many operands.

use iced_x86::{
    EncodingKind, Instruction, MandatoryPrefix, OpCodeOperandKind as K, OpCodeTableKind, OpKind,
    Register,
};

/// A general-purpose register's encoding number, and whether it needs a
/// REX prefix (`spl`..`dil`) or forbids one (`ah`..`bh`).
fn gpr(r: Register) -> Option<(u8, Rex8)> {
    let n = r as u32;
    let byte = |base: Register| n.wrapping_sub(base as u32);
    if r.is_gpr64() {
        Some((byte(Register::RAX) as u8, Rex8::Any))
    } else if r.is_gpr32() {
        Some((byte(Register::EAX) as u8, Rex8::Any))
    } else if r.is_gpr16() {
        Some((byte(Register::AX) as u8, Rex8::Any))
    } else if r.is_gpr8() {
        match byte(Register::AL) {
            k @ 0..=3 => Some((k as u8, Rex8::Any)),
            k @ 4..=7 => Some((k as u8, Rex8::Forbidden)),
            k @ 8..=11 => Some((k as u8 - 4, Rex8::Needed)),
            k => Some((k as u8 - 4, Rex8::Any)),
        }
    } else {
        None
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Rex8 {
    Any,
    Needed,
    Forbidden,
}

/// One instruction's bytes (at most 15), gathered in a register and
/// written out with one 16-byte store (bytes stored one by one into a
/// buffer and read back as 16 would wait on store forwarding).
pub(super) struct Bytes {
    bits: u128,
    len: usize,
}

impl Bytes {
    pub(super) fn new() -> Bytes {
        Bytes { bits: 0, len: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    pub(super) fn u8(&mut self, b: u8) {
        self.bits |= u128::from(b) << (8 * (self.len & 15));
        self.len += 1;
    }

    /// The low `n` bytes of `v`, little-endian.
    #[inline(always)]
    pub(super) fn le(&mut self, v: u64, n: usize) {
        let v = if n >= 8 {
            v
        } else {
            v & ((1u64 << (8 * n)) - 1)
        };
        self.bits |= u128::from(v) << (8 * (self.len & 15));
        self.len += n;
    }

    /// Appends the bytes to `out` with a fixed 16-byte store, then the
    /// length: no variable-length `memcpy`, no out-of-line `extend` (a
    /// fifth of the encoder's time).
    #[inline(always)]
    pub(super) fn append(self, out: &mut Vec<u8>) {
        // At most 15 by x86's rule; the forms written here stay under it.
        debug_assert!(self.len <= 15);
        let len = self.len.min(16);
        out.reserve(16);
        let at = out.len();
        // SAFETY: `reserve(16)` left room for 16 bytes from `at` (the old
        // length), all written here; the first `len` (at most 16) are the
        // instruction's, and only they become part of the vector.
        unsafe {
            out.as_mut_ptr()
                .add(at)
                .cast::<[u8; 16]>()
                .write_unaligned(self.bits.to_le_bytes());
            out.set_len(at + len);
        }
    }
}

/// The ModRM r/m side: a register or a 64-bit-addressed memory operand.
enum Rm {
    None,
    Reg(u8),
    Mem,
}

/// An operand slot of a handled form, as the encoder needs it.
#[derive(Clone, Copy, PartialEq)]
enum Slot {
    /// ModRM reg.
    Reg,
    /// ModRM r/m: a register or memory.
    RegOrMem,
    /// A register added to the opcode byte.
    InOpcode,
    /// An immediate of this many bytes.
    Imm(u8),
    Rel32,
    /// Implied by the opcode (`al`, `cl`, `eax`, `rax`, the `1` of a shift).
    Implied,
}

/// What `encode` needs of a `Code`, packed small: iced's `OpCodeInfo` is
/// ~150 bytes with its fields spread over cache lines, and looking it up
/// for every instruction of a translation was most of the encoder's time.
#[derive(Clone, Copy)]
struct Form {
    opcode: u8,
    /// The 0F escape.
    t0f: bool,
    /// The ModRM reg field's `/digit`, if any.
    digit: u8,
    size16: bool,
    rex_w: bool,
    count: u8,
    slots: [Slot; 4],
}

/// `None` for a `Code` outside the handled forms.
fn form(code: iced_x86::Code) -> Option<Form> {
    let oc = code.op_code();
    if oc.encoding() != EncodingKind::Legacy
        || !oc.is_instruction()
        || !matches!(
            oc.mandatory_prefix(),
            MandatoryPrefix::None | MandatoryPrefix::PNP
        )
        || oc.op_code_len() != 1
        || oc.rm_group_index() >= 0
        || oc.fwait()
        || !oc.mode64()
        || oc.op_count() > 4
    {
        return None;
    }
    let t0f = match oc.table() {
        OpCodeTableKind::Normal => false,
        OpCodeTableKind::T0F => true,
        _ => return None,
    };
    let mut slots = [Slot::Implied; 4];
    let mut imms = 0;
    for n in 0..oc.op_count() {
        slots[n as usize] = match oc.op_kind(n) {
            K::r8_reg | K::r16_reg | K::r32_reg | K::r64_reg => Slot::Reg,
            K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem | K::mem => Slot::RegOrMem,
            K::r8_opcode | K::r16_opcode | K::r32_opcode | K::r64_opcode => Slot::InOpcode,
            // One immediate at most (`enter` has two).
            K::imm8 | K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
                imms += 1;
                Slot::Imm(1)
            }
            K::imm16 => {
                imms += 1;
                Slot::Imm(2)
            }
            K::imm32 | K::imm32sex64 => {
                imms += 1;
                Slot::Imm(4)
            }
            K::imm64 => {
                imms += 1;
                Slot::Imm(8)
            }
            K::br64_4 => Slot::Rel32,
            K::al | K::cl | K::eax | K::rax | K::imm8_const_1 => Slot::Implied,
            _ => return None,
        };
    }
    if imms > 1 {
        return None;
    }
    Some(Form {
        opcode: oc.op_code() as u8,
        t0f,
        digit: oc.group_index().max(0) as u8,
        size16: oc.operand_size() == 16,
        rex_w: oc.operand_size() == 64 && !oc.default_op_size64() && !oc.force_op_size64(),
        count: oc.op_count() as u8,
        slots,
    })
}

/// Every `Code`'s form, built once.
fn forms() -> &'static [Option<Form>] {
    static FORMS: std::sync::OnceLock<Box<[Option<Form>]>> = std::sync::OnceLock::new();
    FORMS.get_or_init(|| iced_x86::Code::values().map(form).collect())
}

/// Appends `i`, at address `ip`, to `out` and gives its length; `None`
/// (and `out` untouched)
/// if `i` is not one of the forms handled here.
pub fn encode(i: &Instruction, ip: u64, out: &mut Vec<u8>) -> Option<usize> {
    let f = (*forms().get(i.code() as usize)?)?;
    if i.has_lock_prefix()
        || i.has_rep_prefix()
        || i.has_repne_prefix()
        || i.segment_prefix() != Register::None
    {
        return None;
    }
    let mut opcode = f.opcode;
    let mut rex = 0u8;
    let mut rex8 = Rex8::Any;
    let mut reg_field: u8 = f.digit;
    let mut rm = Rm::None;
    // (size, value) of the immediate; a rel32's target.
    let mut imm: (usize, u64) = (0, 0);
    let mut rel_target: Option<u64> = None;
    let note = |k: Rex8, rex8: &mut Rex8| -> Option<()> {
        match (k, *rex8) {
            (Rex8::Any, _) => {}
            (a, Rex8::Any) => *rex8 = a,
            (a, b) if a == b => {}
            _ => return None,
        }
        Some(())
    };
    for n in 0..u32::from(f.count) {
        match f.slots[n as usize] {
            Slot::Reg => {
                let (num, k) = gpr(i.op_register(n))?;
                note(k, &mut rex8)?;
                reg_field = num & 7;
                rex |= (num >> 3) << 2;
            }
            Slot::RegOrMem => match i.op_kind(n) {
                OpKind::Register => {
                    let (num, k) = gpr(i.op_register(n))?;
                    note(k, &mut rex8)?;
                    rm = Rm::Reg(num & 7);
                    rex |= num >> 3;
                }
                OpKind::Memory => rm = Rm::Mem,
                _ => return None,
            },
            Slot::InOpcode => {
                let (num, k) = gpr(i.op_register(n))?;
                note(k, &mut rex8)?;
                opcode += num & 7;
                rex |= num >> 3;
            }
            Slot::Imm(size) => imm = (usize::from(size), i.immediate(n)),
            Slot::Rel32 => rel_target = Some(i.near_branch64()),
            Slot::Implied => {}
        }
    }
    let size16 = f.size16;
    if f.rex_w {
        rex |= 8;
    }
    // The memory operand: ModRM mod/rm, SIB, displacement.
    let mut modrm = reg_field << 3;
    let mut sib: Option<u8> = None;
    // (size, value) of the displacement; RIP-relative: its target.
    let mut disp: (usize, i64) = (0, 0);
    let mut rip_target: Option<u64> = None;
    match rm {
        Rm::None => {}
        Rm::Reg(r) => modrm |= 0xc0 | r,
        Rm::Mem => {
            let base = i.memory_base();
            let index = i.memory_index();
            if base == Register::RIP {
                if index != Register::None {
                    return None;
                }
                modrm |= 5;
                rip_target = Some(i.memory_displacement64());
                disp.0 = 4;
            } else {
                if (base != Register::None && !base.is_gpr64())
                    || (index != Register::None && (!index.is_gpr64() || index == Register::RSP))
                {
                    return None;
                }
                let d = i.memory_displacement64() as i64;
                if !matches!(i.memory_displ_size(), 0 | 1 | 4 | 8) {
                    return None;
                }
                if i32::try_from(d).is_err() {
                    return None;
                }
                let scale = match i.memory_index_scale() {
                    1 => 0u8,
                    2 => 1,
                    4 => 2,
                    8 => 3,
                    _ => return None,
                };
                // The SIB index field (100: none).
                let x = if index == Register::None {
                    4
                } else {
                    let n = index.number() as u8;
                    rex |= (n >> 3) << 1;
                    n & 7
                };
                if base == Register::None {
                    // [index*scale+disp32] or [disp32] (always with a SIB in
                    // 64-bit code; no SIB would mean RIP-relative).
                    modrm |= 4;
                    sib = Some(scale << 6 | x << 3 | 5);
                    disp = (4, d);
                } else {
                    let b = base.number() as u8;
                    rex |= b >> 3;
                    // iced's sizes: 8 is a disp32 under 64-bit addressing.
                    let mut size = match i.memory_displ_size() {
                        0 => 0,
                        1 => 1,
                        8 => 4,
                        _ => return None,
                    };
                    if size == 0 && (b & 7) == 5 {
                        // [rbp]/[r13] have no disp-less form.
                        if d != 0 {
                            return None;
                        }
                        size = 1;
                    }
                    if size == 0 && d != 0 {
                        return None;
                    }
                    if size == 1 && i8::try_from(d).is_err() {
                        size = 4;
                    }
                    modrm |= match size {
                        0 => 0,
                        1 => 0x40,
                        _ => 0x80,
                    };
                    if index == Register::None && (b & 7) != 4 && scale == 0 {
                        modrm |= b & 7;
                    } else {
                        modrm |= 4;
                        sib = Some(scale << 6 | x << 3 | (b & 7));
                    }
                    disp = (size, d);
                }
            }
        }
    }
    if rex8 == Rex8::Needed {
        rex |= 0x40;
    }
    if rex != 0 {
        if rex8 == Rex8::Forbidden {
            return None;
        }
        rex |= 0x40;
    }
    let mut b = Bytes::new();
    if size16 {
        b.u8(0x66);
    }
    if rex != 0 {
        b.u8(rex);
    }
    if f.t0f {
        b.u8(0x0f);
    }
    b.u8(opcode);
    if !matches!(rm, Rm::None) {
        b.u8(modrm);
    }
    if let Some(s) = sib {
        b.u8(s);
    }
    let end = b.len + disp.0 + imm.0 + if rel_target.is_some() { 4 } else { 0 };
    if let Some(t) = rip_target {
        disp.1 = i64::from(i32::try_from(t.wrapping_sub(ip.wrapping_add(end as u64)) as i64).ok()?);
    }
    b.le(disp.1 as u64, disp.0);
    b.le(imm.1, imm.0);
    if let Some(t) = rel_target {
        let rel = i32::try_from(t.wrapping_sub(ip.wrapping_add(end as u64)) as i64).ok()?;
        b.le(u64::from(rel as u32), 4);
    }
    debug_assert_eq!(b.len, end);
    let len = b.len;
    b.append(out);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Encoder, MemoryOperand};

    const IP: u64 = 0x7f00_1234_0000;

    fn iced(i: &Instruction) -> Option<Vec<u8>> {
        let mut e = Encoder::new(64);
        e.encode(i, IP).ok()?;
        Some(e.take_buffer())
    }

    /// Registers of `kind`'s size, including the ones with encoding quirks
    /// (rsp/r12 need a SIB as a base, rbp/r13 a displacement).
    fn regs(size: usize) -> Vec<Register> {
        let (first, count) = match size {
            1 => (Register::AL, 20),
            2 => (Register::AX, 16),
            4 => (Register::EAX, 16),
            _ => (Register::RAX, 16),
        };
        (0..count)
            .map(|k| {
                iced_x86::Register::values()
                    .nth(first as usize + k)
                    .unwrap()
            })
            .collect()
    }

    fn memories() -> Vec<MemoryOperand> {
        let mut m = Vec::new();
        for base in [
            Register::RAX,
            Register::RSP,
            Register::RBP,
            Register::R12,
            Register::R13,
            Register::R15,
            Register::None,
        ] {
            for index in [Register::None, Register::RCX, Register::R9, Register::RBP] {
                if base == Register::None && index == Register::None {
                    continue;
                }
                for scale in [1, 8] {
                    for (displ, size) in
                        [(0i64, 0u32), (0x10, 1), (-0x80, 1), (0x1234, 8), (0x300, 1)]
                    {
                        m.push(MemoryOperand::new(
                            base,
                            index,
                            scale,
                            displ,
                            size,
                            false,
                            Register::None,
                        ));
                    }
                }
            }
        }
        m.push(MemoryOperand::with_base_displ(
            Register::RIP,
            (IP + 0x4000) as i64,
        ));
        m.push(MemoryOperand::with_base_displ(
            Register::RIP,
            (IP - 0x10) as i64,
        ));
        m.push(MemoryOperand::with_displ(0x1000, 8));
        m
    }

    fn op_size(k: K) -> usize {
        match k {
            K::r8_reg | K::r8_or_mem | K::r8_opcode => 1,
            K::r16_reg | K::r16_or_mem | K::r16_opcode => 2,
            K::r32_reg | K::r32_or_mem | K::r32_opcode => 4,
            _ => 8,
        }
    }

    /// Instances of `code` over many operands (for the forms handled here).
    fn instances(code: Code) -> Vec<Instruction> {
        let oc = code.op_code();
        let mut out = vec![Instruction::default()];
        for n in 0..oc.op_count() {
            let k = oc.op_kind(n);
            let mut next = Vec::new();
            for base in &out {
                let mut push = |f: &dyn Fn(&mut Instruction)| {
                    let mut i = *base;
                    f(&mut i);
                    next.push(i);
                };
                match k {
                    K::r8_reg
                    | K::r16_reg
                    | K::r32_reg
                    | K::r64_reg
                    | K::r8_opcode
                    | K::r16_opcode
                    | K::r32_opcode
                    | K::r64_opcode => {
                        for r in regs(op_size(k)) {
                            push(&|i| {
                                i.set_op_kind(n, OpKind::Register);
                                i.set_op_register(n, r);
                            });
                        }
                    }
                    K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem | K::mem => {
                        if k != K::mem {
                            for r in regs(op_size(k)) {
                                push(&|i| {
                                    i.set_op_kind(n, OpKind::Register);
                                    i.set_op_register(n, r);
                                });
                            }
                        }
                        for m in memories() {
                            push(&|i| {
                                i.set_op_kind(n, OpKind::Memory);
                                i.set_memory_base(m.base);
                                i.set_memory_index(m.index);
                                i.set_memory_index_scale(m.scale);
                                i.set_memory_displacement64(m.displacement as u64);
                                i.set_memory_displ_size(m.displ_size);
                            });
                        }
                    }
                    _ => push(&|_| {}),
                }
            }
            out = next;
        }
        let mut fixed = Vec::new();
        for mut i in out {
            i.set_code(code);
            for n in 0..oc.op_count() {
                let imm = |i: &mut Instruction, kind: OpKind, v: u64| {
                    i.set_op_kind(n, kind);
                    i.try_set_immediate_u64(n, v).unwrap();
                };
                match oc.op_kind(n) {
                    K::imm8 => imm(&mut i, OpKind::Immediate8, 0x9c),
                    K::imm8sex16 => imm(&mut i, OpKind::Immediate8to16, 0xfff0),
                    K::imm8sex32 => imm(&mut i, OpKind::Immediate8to32, 0xffff_fff0),
                    K::imm8sex64 => imm(&mut i, OpKind::Immediate8to64, 0x7f),
                    K::imm16 => imm(&mut i, OpKind::Immediate16, 0xbeef),
                    K::imm32 => imm(&mut i, OpKind::Immediate32, 0xdead_beef),
                    K::imm32sex64 => imm(&mut i, OpKind::Immediate32to64, 0xffff_ffff_8000_0001),
                    K::imm64 => imm(&mut i, OpKind::Immediate64, 0x1122_3344_5566_7788),
                    K::imm8_const_1 => imm(&mut i, OpKind::Immediate8, 1),
                    K::br64_4 => {
                        i.set_op_kind(n, OpKind::NearBranch64);
                        i.set_near_branch64(IP + 0x1_0000);
                    }
                    K::al | K::cl | K::eax | K::rax => {
                        let r = match oc.op_kind(n) {
                            K::al => Register::AL,
                            K::cl => Register::CL,
                            K::eax => Register::EAX,
                            _ => Register::RAX,
                        };
                        i.set_op_kind(n, OpKind::Register);
                        i.set_op_register(n, r);
                    }
                    _ => {}
                }
            }
            fixed.push(i);
        }
        fixed
    }

    /// Every legacy `Code` this encoder takes gives iced's bytes, over
    /// registers, memory forms and immediates; what it refuses, it refuses
    /// whole (nothing written).
    #[test]
    fn every_handled_form_matches_iced_byte_for_byte() {
        let mut handled = 0;
        for code in Code::values() {
            let oc = code.op_code();
            if !oc.is_instruction() {
                // Pseudo-instructions (`Zero_bytes`, data) are iced's.
                let mut i = Instruction::default();
                i.set_code(code);
                assert!(encode(&i, IP, &mut Vec::new()).is_none(), "{code:?}");
                continue;
            }
            if oc.encoding() != EncodingKind::Legacy || !oc.mode64() {
                continue;
            }
            for i in instances(code) {
                let mut out = vec![0xaa];
                match encode(&i, IP, &mut out) {
                    Some(e) => {
                        let want =
                            iced(&i).unwrap_or_else(|| panic!("{code:?}: iced refuses {i:?}"));
                        assert_eq!(&out[1..], &want[..], "{code:?} {i}");
                        assert_eq!(e, want.len());
                        handled += 1;
                    }
                    None => assert_eq!(out, [0xaa], "{code:?}: refused after writing"),
                }
            }
        }
        // The forms the code generator uses most are among them.
        assert!(handled > 50_000, "only {handled} instructions handled");
    }

    #[test]
    fn the_code_generators_commonest_forms_are_handled() {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(qword_ptr(rbx + 0x40), rax).unwrap();
        a.mov(r12, qword_ptr(r13 + 8)).unwrap();
        a.lea(rsi, qword_ptr(rsp + rcx * 8 + 0x100)).unwrap();
        a.add(rax, qword_ptr(rbp)).unwrap();
        a.cmp(r8, qword_ptr(rbx + 0x10)).unwrap();
        a.add(qword_ptr(rbx + 0x28), 1).unwrap();
        a.mov(eax, dword_ptr(rdi)).unwrap();
        a.mov(rax, 0x1234_5678_9abc_u64).unwrap();
        a.mov(qword_ptr(rbx), 0).unwrap();
        a.test(eax, eax).unwrap();
        a.and(ecx, 0xff).unwrap();
        a.shr(rax, 12).unwrap();
        a.xor(r9d, r9d).unwrap();
        a.lahf().unwrap();
        a.seto(al).unwrap();
        a.sahf().unwrap();
        a.push(r15).unwrap();
        a.ret().unwrap();
        a.movzx(eax, byte_ptr(rsi)).unwrap();
        a.jmp(qword_ptr(rax + 8)).unwrap();
        for i in a.instructions() {
            let mut out = Vec::new();
            let e = encode(i, IP, &mut out).unwrap_or_else(|| panic!("not handled: {i}"));
            assert_eq!(out, iced(i).unwrap(), "{i}");
            assert_eq!(e, out.len());
        }
    }
}
