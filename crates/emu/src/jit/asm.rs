//! The code generator's x86-64 assembler: each instruction is written
//! as bytes the moment it is emitted.
//!
//! Translation went through iced's `CodeAssembler` (an `Instruction` of
//! 40 bytes built and checked per host instruction) and then an encoder
//! walking that list: together more than half of a translation's time,
//! which is what keeps code that runs a few dozen times (a disk request's
//! path) in the interpreter. The generator uses ~30 instruction forms;
//! here each is a few table-free byte writes. The names and operand
//! syntax follow iced's `code_asm` (`a.mov(rax, qword_ptr(r15 + 8))`), so
//! the generator reads the same.
//!
//! Every branch to a label is the rel32 form and every label reference
//! in memory (`qword_ptr(label)`) RIP-relative disp32, so an
//! instruction's length never depends on where its target lands: one
//! pass, with label fields patched at the end. Calls and jumps to fixed
//! addresses (thunks) are patched likewise once the code's address is
//! known. Guest instructions rewritten onto host registers
//! (`add_instruction`) go through the direct encoder of `encode`, or
//! iced's.
//!
//! The tests decode what is written here with iced's decoder and compare
//! it with the instruction asked for.

use super::encode::{self, Bytes};
use iced_x86::{Encoder, Instruction, Register};

/// An instruction the assembler cannot write (an operand combination or
/// an immediate out of range), or an unbound label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsmError(pub String);

impl std::fmt::Display for AsmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(what: impl Into<String>) -> Result<T, AsmError> {
    Err(AsmError(what.into()))
}

/// A 64-bit general register (its encoding number).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AsmRegister64(u8);
/// A 32-bit general register.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AsmRegister32(u8);
/// A 16-bit general register.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AsmRegister16(u8);
/// An 8-bit general register: `high` for AH..BH (no REX prefix
/// possible), else numbers 4..7 are SPL..DIL (a REX prefix needed).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AsmRegister8 {
    n: u8,
    high: bool,
}
/// An XMM register.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AsmRegisterXmm(u8);

macro_rules! regs {
    ($t:ident: $($name:ident = $n:expr),* $(,)?) => {
        $(#[allow(non_upper_case_globals, dead_code)] pub const $name: $t = $t($n);)*
    };
}
regs!(AsmRegister64: rax = 0, rcx = 1, rdx = 2, rbx = 3, rsp = 4, rbp = 5, rsi = 6, rdi = 7,
    r8 = 8, r9 = 9, r10 = 10, r11 = 11, r12 = 12, r13 = 13, r14 = 14, r15 = 15);
regs!(AsmRegister32: eax = 0, ecx = 1, edx = 2, ebx = 3, esp = 4, ebp = 5, esi = 6, edi = 7,
    r8d = 8, r9d = 9, r10d = 10, r11d = 11, r12d = 12, r13d = 13, r14d = 14, r15d = 15);
regs!(AsmRegister16: ax = 0, cx = 1, dx = 2, bx = 3);
regs!(AsmRegisterXmm: xmm0 = 0, xmm1 = 1, xmm2 = 2, xmm3 = 3);
macro_rules! regs8 {
    ($($name:ident = $n:expr, $high:expr),* $(,)?) => {
        $(#[allow(non_upper_case_globals, dead_code)]
        pub const $name: AsmRegister8 = AsmRegister8 { n: $n, high: $high };)*
    };
}
regs8!(
    al = 0,
    false,
    cl = 1,
    false,
    dl = 2,
    false,
    bl = 3,
    false,
    ah = 4,
    true,
    ch = 5,
    true,
    dh = 6,
    true,
    bh = 7,
    true,
    spl = 4,
    false,
    bpl = 5,
    false,
    sil = 6,
    false,
    dil = 7,
    false,
    r8b = 8,
    false,
    r9b = 9,
    false,
    r10b = 10,
    false,
    r11b = 11,
    false
);

/// The assembler's 64-bit form of iced's `r` (a 64-bit general register).
pub fn get_gpr64(r: Register) -> Option<AsmRegister64> {
    r.is_gpr64()
        .then(|| AsmRegister64((r as u32 - Register::RAX as u32) as u8))
}

/// The assembler's 32-bit form of iced's `r` (a 32-bit general register).
pub fn get_gpr32(r: Register) -> Option<AsmRegister32> {
    r.is_gpr32()
        .then(|| AsmRegister32((r as u32 - Register::EAX as u32) as u8))
}

impl From<AsmRegister64> for Register {
    fn from(r: AsmRegister64) -> Register {
        Register::try_from(Register::RAX as usize + usize::from(r.0)).unwrap_or(Register::None)
    }
}

impl From<AsmRegisterXmm> for Register {
    fn from(r: AsmRegisterXmm) -> Register {
        Register::try_from(Register::XMM0 as usize + usize::from(r.0)).unwrap_or(Register::None)
    }
}

/// A place in the code, bound with `set_label`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CodeLabel(u32);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Base {
    None,
    Reg(u8),
    /// RIP-relative to a label.
    Label(u32),
}

/// A memory operand: `[base + index*scale + disp]` (64-bit addressing),
/// or a label's address; `size` set by `qword_ptr` and kin.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AsmMemoryOperand {
    base: Base,
    index: Option<u8>,
    scale: u8,
    disp: i64,
    size: u8,
}

impl AsmMemoryOperand {
    fn sized(mut self, size: u8) -> Self {
        self.size = size;
        self
    }
}

/// What the `*_ptr` functions take: a memory operand, a base register or
/// a label.
pub trait IntoMem {
    fn into_mem(self) -> AsmMemoryOperand;
}

impl IntoMem for AsmMemoryOperand {
    fn into_mem(self) -> AsmMemoryOperand {
        self
    }
}

impl IntoMem for AsmRegister64 {
    fn into_mem(self) -> AsmMemoryOperand {
        AsmMemoryOperand {
            base: Base::Reg(self.0),
            index: None,
            scale: 1,
            disp: 0,
            size: 0,
        }
    }
}

impl IntoMem for CodeLabel {
    fn into_mem(self) -> AsmMemoryOperand {
        AsmMemoryOperand {
            base: Base::Label(self.0),
            index: None,
            scale: 1,
            disp: 0,
            size: 0,
        }
    }
}

pub fn byte_ptr(m: impl IntoMem) -> AsmMemoryOperand {
    m.into_mem().sized(1)
}
pub fn dword_ptr(m: impl IntoMem) -> AsmMemoryOperand {
    m.into_mem().sized(4)
}
pub fn qword_ptr(m: impl IntoMem) -> AsmMemoryOperand {
    m.into_mem().sized(8)
}
pub fn xmmword_ptr(m: impl IntoMem) -> AsmMemoryOperand {
    m.into_mem().sized(16)
}

macro_rules! displacement {
    ($($t:ty),*) => {$(
        impl std::ops::Add<$t> for AsmRegister64 {
            type Output = AsmMemoryOperand;
            fn add(self, d: $t) -> AsmMemoryOperand {
                self.into_mem() + d
            }
        }
        impl std::ops::Sub<$t> for AsmRegister64 {
            type Output = AsmMemoryOperand;
            fn sub(self, d: $t) -> AsmMemoryOperand {
                self.into_mem() - d
            }
        }
        impl std::ops::Add<$t> for AsmMemoryOperand {
            type Output = AsmMemoryOperand;
            fn add(mut self, d: $t) -> AsmMemoryOperand {
                self.disp = self.disp.wrapping_add(d as i64);
                self
            }
        }
        impl std::ops::Sub<$t> for AsmMemoryOperand {
            type Output = AsmMemoryOperand;
            fn sub(mut self, d: $t) -> AsmMemoryOperand {
                self.disp = self.disp.wrapping_sub(d as i64);
                self
            }
        }
        impl std::ops::Mul<$t> for AsmRegister64 {
            type Output = AsmMemoryOperand;
            /// An index register and its scale (a bad scale fails when
            /// the operand is encoded).
            fn mul(self, scale: $t) -> AsmMemoryOperand {
                AsmMemoryOperand {
                    base: Base::None,
                    index: Some(self.0),
                    scale: u8::try_from(scale).unwrap_or(0),
                    disp: 0,
                    size: 0,
                }
            }
        }
    )*};
}
displacement!(i32, i64, u32, usize);

impl std::ops::Add<AsmRegister64> for AsmRegister64 {
    type Output = AsmMemoryOperand;
    fn add(self, index: AsmRegister64) -> AsmMemoryOperand {
        self + index * 1
    }
}

impl std::ops::Add<AsmMemoryOperand> for AsmRegister64 {
    type Output = AsmMemoryOperand;
    /// `base + index*scale`: the index side comes as a memory operand.
    fn add(self, mut m: AsmMemoryOperand) -> AsmMemoryOperand {
        if m.base == Base::None {
            m.base = Base::Reg(self.0);
        } else {
            // Two bases: made unencodable, reported when used.
            m.scale = 0;
        }
        m
    }
}

/// An operand as the instruction writers see it.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A general register: number, size in bytes, AH..BH.
    Gpr(u8, u8, bool),
    Xmm(u8),
    Mem(AsmMemoryOperand),
    Imm(i64),
    Label(u32),
}

pub trait IntoOp {
    fn op(self) -> Op;
}

impl IntoOp for AsmRegister64 {
    fn op(self) -> Op {
        Op::Gpr(self.0, 8, false)
    }
}
impl IntoOp for AsmRegister32 {
    fn op(self) -> Op {
        Op::Gpr(self.0, 4, false)
    }
}
impl IntoOp for AsmRegister16 {
    fn op(self) -> Op {
        Op::Gpr(self.0, 2, false)
    }
}
impl IntoOp for AsmRegister8 {
    fn op(self) -> Op {
        Op::Gpr(self.n, 1, self.high)
    }
}
impl IntoOp for AsmRegisterXmm {
    fn op(self) -> Op {
        Op::Xmm(self.0)
    }
}
impl IntoOp for AsmMemoryOperand {
    fn op(self) -> Op {
        Op::Mem(self)
    }
}
impl IntoOp for CodeLabel {
    fn op(self) -> Op {
        Op::Label(self.0)
    }
}
macro_rules! imm {
    ($($t:ty),*) => {$(
        impl IntoOp for $t {
            fn op(self) -> Op {
                Op::Imm(self as i64)
            }
        }
    )*};
}
imm!(i32, u32, i64, u64);

/// The ModRM r/m side of an instruction.
#[derive(Clone, Copy)]
enum Rm {
    Reg(u8),
    Mem(AsmMemoryOperand),
}

/// One instruction in ModRM form, before its bytes.
struct Form<'a> {
    /// 0x66 (16-bit operand) or 0xf3 (mandatory), if any.
    prefix: Option<u8>,
    w: bool,
    opcode: &'a [u8],
    /// ModRM reg: a register number or an opcode extension.
    reg: u8,
    rm: Rm,
    /// The immediate and its size in bytes (0: none).
    imm: (i64, usize),
    /// An 8-bit register in SPL..DIL (REX needed) or AH..BH (REX
    /// forbidden) is among the operands.
    rex_needed: bool,
    rex_forbidden: bool,
}

/// Where a 32-bit field is to be patched once addresses are known.
#[derive(Clone, Copy)]
enum Target {
    Label(u32),
    /// An absolute address (a thunk).
    Absolute(u64),
}

struct Fixup {
    /// The rel32/disp32 field.
    at: usize,
    /// The end of its instruction (what the field is relative to).
    end: usize,
    target: Target,
}

/// The code generator's assembler (see the module comment).
pub struct CodeAssembler {
    bytes: Vec<u8>,
    /// Offset of each label (`u32::MAX`: unbound).
    labels: Vec<u32>,
    fixups: Vec<Fixup>,
}

/// The bytes and where each label ended up.
pub struct Assembled<'a> {
    pub bytes: Vec<u8>,
    labels: &'a [u32],
}

impl Assembled<'_> {
    /// Offset of `label` from the start of the code.
    pub fn offset(&self, label: CodeLabel) -> Result<u64, String> {
        match self.labels.get(label.0 as usize) {
            Some(&o) if o != u32::MAX => Ok(u64::from(o)),
            _ => Err(format!("label {} is not bound", label.0)),
        }
    }
}

/// Patches `a`'s references for the code's address `base` and takes its
/// bytes (`CodeAssembler::give_back` returns the buffer for reuse).
pub fn assemble(a: &mut CodeAssembler, base: u64) -> Result<Assembled<'_>, String> {
    for f in &a.fixups {
        let target = match f.target {
            Target::Label(id) => match a.labels.get(id as usize) {
                Some(&o) if o != u32::MAX => i64::from(o),
                _ => return Err(format!("reference to unbound label {id}")),
            },
            Target::Absolute(t) => (t as i64).wrapping_sub(base as i64),
        };
        let rel = i32::try_from(target.wrapping_sub(f.end as i64))
            .map_err(|_| "branch too far".to_string())?;
        a.bytes
            .get_mut(f.at..f.at + 4)
            .ok_or("a fixup outside the code")?
            .copy_from_slice(&rel.to_le_bytes());
    }
    Ok(Assembled {
        bytes: std::mem::take(&mut a.bytes),
        labels: &a.labels,
    })
}

fn fits_i8(v: i64) -> bool {
    i8::try_from(v).is_ok()
}

fn fits_i32(v: i64) -> bool {
    i32::try_from(v).is_ok()
}

impl CodeAssembler {
    /// `bitness` must be 64 (the signature is `code_asm`'s).
    pub fn new(bitness: u32) -> Result<CodeAssembler, AsmError> {
        if bitness != 64 {
            return fail("only 64-bit code");
        }
        Ok(CodeAssembler {
            bytes: Vec::with_capacity(4096),
            labels: Vec::with_capacity(256),
            fixups: Vec::with_capacity(256),
        })
    }

    /// Hands back a byte buffer `assemble` took, to be reused.
    pub fn give_back(&mut self, mut bytes: Vec<u8>) {
        if self.bytes.capacity() < bytes.capacity() {
            bytes.clear();
            self.bytes = bytes;
        }
    }

    /// Empties the assembler for the next translation (keeps its buffers).
    pub fn reset(&mut self) {
        self.bytes.clear();
        self.labels.clear();
        self.fixups.clear();
    }

    pub fn create_label(&mut self) -> CodeLabel {
        self.labels.push(u32::MAX);
        CodeLabel((self.labels.len() - 1) as u32)
    }

    /// Where bound label `l` is, from the start of the code (`None` while
    /// unbound).
    pub fn label_offset(&self, l: CodeLabel) -> Option<u32> {
        self.labels
            .get(l.0 as usize)
            .copied()
            .filter(|&o| o != u32::MAX)
    }

    /// Raw bytes in the code: data the generated code hands to a helper
    /// (a slow path's site record), never executed.
    pub fn data(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// Binds `l` to the current position (a label is bound once).
    pub fn set_label(&mut self, l: &mut CodeLabel) -> Result<(), AsmError> {
        let pos = self.bytes.len() as u32;
        match self.labels.get_mut(l.0 as usize) {
            Some(o) if *o == u32::MAX => {
                *o = pos;
                Ok(())
            }
            Some(_) => fail(format!("label {} bound twice", l.0)),
            None => fail(format!("label {} is not this assembler's", l.0)),
        }
    }

    /// Writes a ModRM-form instruction (inlined: at each call site most
    /// of the operand matching folds away).
    #[inline(always)]
    fn modrm(&mut self, f: Form) -> Result<(), AsmError> {
        let mut rex = u8::from(f.w) << 3 | (f.reg >> 3) << 2;
        let mut modrm = (f.reg & 7) << 3;
        let mut sib = None;
        // (value, size) of the displacement; a label it refers to.
        let mut disp = (0i64, 0usize);
        let mut label = None;
        match f.rm {
            Rm::Reg(r) => {
                rex |= r >> 3;
                modrm |= 0xc0 | (r & 7);
            }
            Rm::Mem(m) => {
                if !fits_i32(m.disp) {
                    return fail(format!("displacement {:#x} out of range", m.disp));
                }
                let scale = match m.scale {
                    1 => 0u8,
                    2 => 1,
                    4 => 2,
                    8 => 3,
                    s => return fail(format!("bad scale {s}")),
                };
                let index = match m.index {
                    Some(4) => return fail("rsp cannot be an index"),
                    Some(x) => {
                        rex |= (x >> 3) << 1;
                        x & 7
                    }
                    None => 4,
                };
                match m.base {
                    Base::Label(id) => {
                        if m.index.is_some() {
                            return fail("a label operand takes no index");
                        }
                        modrm |= 5;
                        disp = (m.disp, 4);
                        label = Some(id);
                    }
                    Base::None => {
                        modrm |= 4;
                        sib = Some(scale << 6 | index << 3 | 5);
                        disp = (m.disp, 4);
                    }
                    Base::Reg(r) => {
                        rex |= r >> 3;
                        let size = if m.disp == 0 && r & 7 != 5 {
                            0
                        } else if fits_i8(m.disp) {
                            1
                        } else {
                            4
                        };
                        modrm |= match size {
                            0 => 0,
                            1 => 0x40,
                            _ => 0x80,
                        };
                        if m.index.is_none() && r & 7 != 4 {
                            modrm |= r & 7;
                        } else {
                            modrm |= 4;
                            sib = Some(scale << 6 | index << 3 | (r & 7));
                        }
                        disp = (m.disp, size);
                    }
                }
            }
        }
        let mut b = Bytes::new();
        if let Some(p) = f.prefix {
            b.u8(p);
        }
        if rex != 0 || f.rex_needed {
            if f.rex_forbidden {
                return fail("ah..bh cannot be used with a REX prefix");
            }
            b.u8(0x40 | rex);
        }
        for &o in f.opcode {
            b.u8(o);
        }
        b.u8(modrm);
        if let Some(s) = sib {
            b.u8(s);
        }
        let disp_at = self.bytes.len() + b.len();
        b.le(disp.0 as u64, disp.1);
        b.le(f.imm.0 as u64, f.imm.1);
        let end = self.bytes.len() + b.len();
        b.append(&mut self.bytes);
        if let Some(id) = label {
            self.fixups.push(Fixup {
                at: disp_at,
                end,
                target: Target::Label(id),
            });
        }
        Ok(())
    }

    /// Operand facts of a general register for `Form`.
    fn gpr8_rex(n: u8, size: u8, high: bool) -> (bool, bool) {
        (size == 1 && !high && (4..8).contains(&n), high)
    }

    /// A binary operation in its three ModRM forms: `r/m, r` (`store`),
    /// `r, r/m` (`load`), `r/m, imm` (`imm_op` with `/digit`; `imm8_op`
    /// its sign-extended 8-bit form). The 8-bit opcodes are the others
    /// minus one.
    #[inline(always)]
    fn binary(
        &mut self,
        a: Op,
        b: Op,
        store: u8,
        load: Option<u8>,
        imm: Option<(u8, Option<u8>, u8)>,
    ) -> Result<(), AsmError> {
        let size_form = |size: u8, op: u8| -> (Option<u8>, bool, u8) {
            match size {
                1 => (None, false, op - 1),
                2 => (Some(0x66), false, op),
                4 => (None, false, op),
                _ => (None, true, op),
            }
        };
        match (a, b) {
            (Op::Gpr(d, ds, d_high), Op::Gpr(s, ss, s_high)) if ds == ss => {
                let (prefix, w, op) = size_form(ds, store);
                let (n1, f1) = Self::gpr8_rex(d, ds, d_high);
                let (n2, f2) = Self::gpr8_rex(s, ss, s_high);
                self.modrm(Form {
                    prefix,
                    w,
                    opcode: &[op],
                    reg: s,
                    rm: Rm::Reg(d),
                    imm: (0, 0),
                    rex_needed: n1 || n2,
                    rex_forbidden: f1 || f2,
                })
            }
            (Op::Mem(m), Op::Gpr(s, ss, s_high)) => {
                let (prefix, w, op) = size_form(ss, store);
                let (n1, f1) = Self::gpr8_rex(s, ss, s_high);
                self.modrm(Form {
                    prefix,
                    w,
                    opcode: &[op],
                    reg: s,
                    rm: Rm::Mem(m),
                    imm: (0, 0),
                    rex_needed: n1,
                    rex_forbidden: f1,
                })
            }
            (Op::Gpr(d, ds, d_high), Op::Mem(m)) if load.is_some() => {
                let (prefix, w, op) = size_form(ds, load.unwrap_or(0));
                let (n1, f1) = Self::gpr8_rex(d, ds, d_high);
                self.modrm(Form {
                    prefix,
                    w,
                    opcode: &[op],
                    reg: d,
                    rm: Rm::Mem(m),
                    imm: (0, 0),
                    rex_needed: n1,
                    rex_forbidden: f1,
                })
            }
            (Op::Gpr(_, _, _) | Op::Mem(_), Op::Imm(v)) if imm.is_some() => {
                let Some((op, op8, digit)) = imm else {
                    return fail("no immediate form");
                };
                let (size, rm, n1, f1) = match a {
                    Op::Gpr(d, ds, d_high) => {
                        let (n1, f1) = Self::gpr8_rex(d, ds, d_high);
                        (ds, Rm::Reg(d), n1, f1)
                    }
                    Op::Mem(m) if m.size != 0 => (m.size, Rm::Mem(m), false, false),
                    _ => return fail("memory operand without a size"),
                };
                let (prefix, w, op_full) = size_form(size, op);
                let (opcode, isize) = match size {
                    1 => (op_full, 1),
                    _ if op8.is_some() && fits_i8(v) => (op8.unwrap_or(0), 1),
                    2 => (op_full, 2),
                    _ => (op_full, 4),
                };
                let ok = match (size, isize) {
                    (1, _) => (-0x80..=0xff).contains(&v),
                    (_, 1) => true,
                    (2, _) => (-0x8000..=0xffff).contains(&v),
                    (4, _) => (-0x8000_0000..=0xffff_ffff).contains(&v),
                    _ => fits_i32(v),
                };
                if !ok {
                    return fail(format!("immediate {v:#x} out of range"));
                }
                self.modrm(Form {
                    prefix,
                    w,
                    opcode: &[opcode],
                    reg: digit,
                    rm,
                    imm: (v, isize),
                    rex_needed: n1,
                    rex_forbidden: f1,
                })
            }
            (a, b) => fail(format!("no form for {a:?}, {b:?}")),
        }
    }

    fn alu(&mut self, k: u8, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        self.binary(
            a.op(),
            b.op(),
            0x01 + 8 * k,
            Some(0x03 + 8 * k),
            Some((0x81, Some(0x83), k)),
        )
    }

    pub fn test(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        self.binary(a.op(), b.op(), 0x85, None, Some((0xf7, None, 0)))
    }

    pub fn mov(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        match (a.op(), b.op()) {
            (Op::Gpr(d, size @ (4 | 8), _), Op::Imm(v)) => {
                // The shortest form with the same result: `mov r32, imm32`
                // zero-extends; `mov r/m64, imm32` sign-extends.
                if size == 4 || (0..=0xffff_ffff).contains(&v) {
                    if size == 4 && !(-0x8000_0000..=0xffff_ffff).contains(&v) {
                        return fail(format!("immediate {v:#x} out of range"));
                    }
                    self.opcode_reg(0xb8, d, false)?;
                    self.bytes.extend_from_slice(&(v as u32).to_le_bytes());
                    Ok(())
                } else if fits_i32(v) {
                    self.binary(
                        Op::Gpr(d, 8, false),
                        Op::Imm(v),
                        0x89,
                        None,
                        Some((0xc7, None, 0)),
                    )
                } else {
                    self.opcode_reg(0xb8, d, true)?;
                    self.bytes.extend_from_slice(&v.to_le_bytes());
                    Ok(())
                }
            }
            (a, b) => self.binary(a, b, 0x89, Some(0x8b), Some((0xc7, None, 0))),
        }
    }

    /// `opcode + r` forms (`push`, `pop`, `mov r, imm`).
    fn opcode_reg(&mut self, opcode: u8, r: u8, w: bool) -> Result<(), AsmError> {
        let rex = u8::from(w) << 3 | r >> 3;
        if rex != 0 {
            self.bytes.push(0x40 | rex);
        }
        self.bytes.push(opcode + (r & 7));
        Ok(())
    }

    pub fn lea(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        match (a.op(), b.op()) {
            (Op::Gpr(d, size @ (4 | 8), _), Op::Mem(m)) => self.modrm(Form {
                prefix: None,
                w: size == 8,
                opcode: &[0x8d],
                reg: d,
                rm: Rm::Mem(m),
                imm: (0, 0),
                rex_needed: false,
                rex_forbidden: false,
            }),
            (a, b) => fail(format!("no lea {a:?}, {b:?}")),
        }
    }

    fn shift(&mut self, digit: u8, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        match b.op() {
            Op::Imm(v) if (0..=63).contains(&v) => {
                self.binary(a.op(), Op::Imm(v), 0, None, Some((0xc1, Some(0xc1), digit)))
            }
            b => fail(format!("no shift by {b:?}")),
        }
    }

    pub fn push(&mut self, a: impl IntoOp) -> Result<(), AsmError> {
        match a.op() {
            Op::Gpr(r, 8, _) => self.opcode_reg(0x50, r, false),
            a => fail(format!("no push {a:?}")),
        }
    }

    pub fn pop(&mut self, a: impl IntoOp) -> Result<(), AsmError> {
        match a.op() {
            Op::Gpr(r, 8, _) => self.opcode_reg(0x58, r, false),
            a => fail(format!("no pop {a:?}")),
        }
    }

    /// A two-operand ModRM instruction `reg, r/m` with a fixed opcode.
    fn reg_rm(
        &mut self,
        prefix: Option<u8>,
        w: bool,
        opcode: &[u8],
        reg: u8,
        rm: Op,
    ) -> Result<(), AsmError> {
        let (rm, rex_needed, rex_forbidden) = match rm {
            Op::Gpr(r, size, high) => {
                let (n, f) = Self::gpr8_rex(r, size, high);
                (Rm::Reg(r), n, f)
            }
            Op::Xmm(r) => (Rm::Reg(r), false, false),
            Op::Mem(m) => (Rm::Mem(m), false, false),
            rm => return fail(format!("no r/m operand {rm:?}")),
        };
        self.modrm(Form {
            prefix,
            w,
            opcode,
            reg,
            rm,
            imm: (0, 0),
            rex_needed,
            rex_forbidden,
        })
    }

    pub fn movzx(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        match (a.op(), b.op()) {
            (Op::Gpr(d, ds @ (4 | 8), _), b @ Op::Gpr(_, 1, _)) => {
                self.reg_rm(None, ds == 8, &[0x0f, 0xb6], d, b)
            }
            (Op::Gpr(d, ds @ (4 | 8), _), Op::Mem(m)) if m.size == 1 || m.size == 2 => {
                let op = if m.size == 1 { 0xb6 } else { 0xb7 };
                self.reg_rm(None, ds == 8, &[0x0f, op], d, Op::Mem(m))
            }
            (a, b) => fail(format!("no movzx {a:?}, {b:?}")),
        }
    }

    pub fn movsxd(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        match (a.op(), b.op()) {
            (Op::Gpr(d, 8, _), b @ (Op::Gpr(_, 4, _) | Op::Mem(_))) => {
                self.reg_rm(None, true, &[0x63], d, b)
            }
            (a, b) => fail(format!("no movsxd {a:?}, {b:?}")),
        }
    }

    pub fn movdqu(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
        match (a.op(), b.op()) {
            (Op::Xmm(x), m @ Op::Mem(_)) => self.reg_rm(Some(0xf3), false, &[0x0f, 0x6f], x, m),
            (m @ Op::Mem(_), Op::Xmm(x)) => self.reg_rm(Some(0xf3), false, &[0x0f, 0x7f], x, m),
            (a, b) => fail(format!("no movdqu {a:?}, {b:?}")),
        }
    }

    pub fn seto(&mut self, a: impl IntoOp) -> Result<(), AsmError> {
        match a.op() {
            r @ Op::Gpr(_, 1, _) => self.reg_rm(None, false, &[0x0f, 0x90], 0, r),
            a => fail(format!("no seto {a:?}")),
        }
    }

    pub fn lahf(&mut self) -> Result<(), AsmError> {
        self.bytes.push(0x9f);
        Ok(())
    }
    pub fn sahf(&mut self) -> Result<(), AsmError> {
        self.bytes.push(0x9e);
        Ok(())
    }
    pub fn ret(&mut self) -> Result<(), AsmError> {
        self.bytes.push(0xc3);
        Ok(())
    }

    /// `opcode rel32` to a label or an absolute address.
    fn rel32(&mut self, opcode: &[u8], t: Op) -> Result<(), AsmError> {
        let target = match t {
            Op::Label(id) => Target::Label(id),
            Op::Imm(a) => Target::Absolute(a as u64),
            t => return fail(format!("not a branch target: {t:?}")),
        };
        let mut b = Bytes::new();
        for &o in opcode {
            b.u8(o);
        }
        let at = self.bytes.len() + b.len();
        b.le(0, 4);
        b.append(&mut self.bytes);
        self.fixups.push(Fixup {
            at,
            end: at + 4,
            target,
        });
        Ok(())
    }

    pub fn jmp(&mut self, t: impl IntoOp) -> Result<(), AsmError> {
        match t.op() {
            r @ (Op::Gpr(_, 8, _) | Op::Mem(_)) => self.reg_rm(None, false, &[0xff], 4, r),
            t => self.rel32(&[0xe9], t),
        }
    }

    pub fn call(&mut self, t: impl IntoOp) -> Result<(), AsmError> {
        match t.op() {
            r @ (Op::Gpr(_, 8, _) | Op::Mem(_)) => self.reg_rm(None, false, &[0xff], 2, r),
            t => self.rel32(&[0xe8], t),
        }
    }

    /// The instructions written so far, decoded (label fields unpatched).
    #[cfg(test)]
    pub fn decoded(&self) -> Vec<Instruction> {
        iced_x86::Decoder::new(64, &self.bytes, iced_x86::DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    /// Adds a whole instruction (a guest instruction rewritten onto host
    /// operands). It may not refer to labels or to RIP.
    pub fn add_instruction(&mut self, i: Instruction) -> Result<(), AsmError> {
        if i.is_ip_rel_memory_operand()
            || (0..i.op_count()).any(|k| {
                matches!(
                    i.op_kind(k),
                    iced_x86::OpKind::NearBranch16
                        | iced_x86::OpKind::NearBranch32
                        | iced_x86::OpKind::NearBranch64
                )
            })
        {
            return fail(format!("{i}: position-dependent"));
        }
        if encode::encode(&i, 0, &mut self.bytes).is_none() {
            let mut e = Encoder::new(64);
            e.encode(&i, 0).map_err(|e| AsmError(e.to_string()))?;
            self.bytes.extend_from_slice(&e.take_buffer());
        }
        Ok(())
    }
}

/// The two-operand instructions that differ only in their `/digit`.
macro_rules! by_digit {
    ($via:ident: $($name:ident = $digit:expr),* $(,)?) => {
        impl CodeAssembler {
            $(pub fn $name(&mut self, a: impl IntoOp, b: impl IntoOp) -> Result<(), AsmError> {
                self.$via($digit, a, b)
            })*
        }
    };
}
by_digit!(alu: add = 0, and = 4, xor = 6, cmp = 7);
by_digit!(shift: shl = 4, shr = 5, sar = 7);

macro_rules! jcc {
    ($($name:ident = $cc:expr),* $(,)?) => {
        impl CodeAssembler {
            $(pub fn $name(&mut self, t: impl IntoOp) -> Result<(), AsmError> {
                self.rel32(&[0x0f, 0x80 + $cc], t.op())
            })*
        }
    };
}
jcc!(
    jo = 0,
    jno = 1,
    jb = 2,
    jae = 3,
    je = 4,
    jz = 4,
    jne = 5,
    jnz = 5,
    jbe = 6,
    ja = 7,
    js = 8,
    jns = 9,
    jp = 10,
    jnp = 11,
    jl = 12,
    jge = 13,
    jle = 14,
    jg = 15
);

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    /// Decodes `a`'s code at `base` into Intel syntax, one per line.
    fn listing(a: &mut CodeAssembler, base: u64) -> Vec<String> {
        let r = assemble(a, base).unwrap();
        let mut f = IntelFormatter::new();
        f.options_mut().set_uppercase_hex(false);
        f.options_mut().set_hex_prefix("0x");
        f.options_mut().set_hex_suffix("");
        f.options_mut().set_space_after_operand_separator(true);
        f.options_mut().set_branch_leading_zeros(false);
        f.options_mut().set_leading_zeros(false);
        let mut out = Vec::new();
        for i in Decoder::with_ip(64, &r.bytes, base, DecoderOptions::NONE) {
            assert!(!i.is_invalid(), "invalid bytes in {:02x?}", r.bytes);
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn every_form_the_generator_uses_decodes_to_itself() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(r15 + 0x860)).unwrap();
        a.mov(qword_ptr(r15 + 0xac8i32), r14).unwrap();
        a.mov(r10d, eax).unwrap();
        a.mov(rdx, qword_ptr(rcx + rax)).unwrap();
        a.mov(rax, qword_ptr(rcx + rax + 8)).unwrap();
        a.mov(eax, dword_ptr(r11 + 8)).unwrap();
        a.mov(rax, 0x7f00_1234_5678u64).unwrap();
        a.mov(rax, 0x1234u64).unwrap();
        a.mov(r11, -8i64).unwrap();
        a.mov(eax, 0x108u32).unwrap();
        a.mov(qword_ptr(r15 + 0x10), 0).unwrap();
        a.mov(qword_ptr(r11), -1i32).unwrap();
        a.mov(byte_ptr(r15 + 0x20), 0).unwrap();
        a.mov(rcx, qword_ptr(rsp + 8)).unwrap();
        a.mov(r13, qword_ptr(r13)).unwrap();
        a.mov(rbp, qword_ptr(rbp + 0x200)).unwrap();
        a.mov(r12, qword_ptr(r12 - 0x10)).unwrap();
        a.lea(rsp, rsp + 8).unwrap();
        a.lea(rsp, rsp - 8).unwrap();
        a.lea(r11, r11 + r10).unwrap();
        a.lea(eax, rcx + rax * 2).unwrap();
        a.lea(rax, r11 + 7).unwrap();
        a.lea(rdx, r14 + 0x1c).unwrap();
        a.cmp(eax, dword_ptr(r15 + r10 * 4 + 0x868)).unwrap();
        a.cmp(rax, qword_ptr(r10 + 8)).unwrap();
        a.cmp(rax, rcx).unwrap();
        a.cmp(dword_ptr(rax), 5).unwrap();
        a.cmp(byte_ptr(r15 + 0xef2), 0).unwrap();
        a.add(qword_ptr(r15 + 0xd10), 10).unwrap();
        a.add(qword_ptr(r15 + 0xd10), 1000).unwrap();
        a.add(r11, qword_ptr(r10 + 0x18)).unwrap();
        a.add(al, 0x7f).unwrap();
        a.and(r10d, 0x7fc0).unwrap();
        a.and(rax, -4096i32).unwrap();
        a.xor(r11, rcx).unwrap();
        a.xor(eax, eax).unwrap();
        a.test(eax, eax).unwrap();
        a.test(eax, 0xffff_fff9u32).unwrap();
        a.test(r11b, 15).unwrap();
        a.test(dword_ptr(r15 + 0xc50), 0x200).unwrap();
        a.shr(r10, 6).unwrap();
        a.shr(r10d, 31).unwrap();
        a.shl(r11, 5).unwrap();
        a.sar(rax, 16).unwrap();
        a.push(rax).unwrap();
        a.push(r15).unwrap();
        a.pop(r12).unwrap();
        a.movzx(ecx, dh).unwrap();
        a.movzx(eax, dl).unwrap();
        a.movzx(eax, byte_ptr(rsi)).unwrap();
        a.movsxd(r13, r13d).unwrap();
        a.movdqu(xmm1, xmmword_ptr(r15 + 0x100)).unwrap();
        a.movdqu(xmmword_ptr(r15 + 0x110), xmm2).unwrap();
        a.seto(al).unwrap();
        a.lahf().unwrap();
        a.sahf().unwrap();
        a.jmp(rax).unwrap();
        a.jmp(qword_ptr(r11 + 0x18)).unwrap();
        a.call(rax).unwrap();
        a.call(0x7000_0000_0000u64).unwrap();
        a.jne(top).unwrap();
        a.ja(0x7000_0000_0010u64).unwrap();
        a.ret().unwrap();
        let want = [
            "mov rax, [r15+0x860]",
            "mov [r15+0xac8], r14",
            "mov r10d, eax",
            "mov rdx, [rcx+rax]",
            "mov rax, [rcx+rax+8]",
            "mov eax, [r11+8]",
            "mov rax, 0x7f0012345678",
            "mov eax, 0x1234",
            "mov r11, 0xfffffffffffffff8",
            "mov eax, 0x108",
            "mov qword ptr [r15+0x10], 0",
            "mov qword ptr [r11], 0xffffffffffffffff",
            "mov byte ptr [r15+0x20], 0",
            "mov rcx, [rsp+8]",
            "mov r13, [r13]",
            "mov rbp, [rbp+0x200]",
            "mov r12, [r12-0x10]",
            "lea rsp, [rsp+8]",
            "lea rsp, [rsp-8]",
            "lea r11, [r11+r10]",
            "lea eax, [rcx+rax*2]",
            "lea rax, [r11+7]",
            "lea rdx, [r14+0x1c]",
            "cmp eax, [r15+r10*4+0x868]",
            "cmp rax, [r10+8]",
            "cmp rax, rcx",
            "cmp dword ptr [rax], 5",
            "cmp byte ptr [r15+0xef2], 0",
            "add qword ptr [r15+0xd10], 0xa",
            "add qword ptr [r15+0xd10], 0x3e8",
            "add r11, [r10+0x18]",
            "add al, 0x7f",
            "and r10d, 0x7fc0",
            "and rax, 0xfffffffffffff000",
            "xor r11, rcx",
            "xor eax, eax",
            "test eax, eax",
            "test eax, 0xfffffff9",
            "test r11b, 0xf",
            "test dword ptr [r15+0xc50], 0x200",
            "shr r10, 6",
            "shr r10d, 0x1f",
            "shl r11, 5",
            "sar rax, 0x10",
            "push rax",
            "push r15",
            "pop r12",
            "movzx ecx, dh",
            "movzx eax, dl",
            "movzx eax, byte ptr [rsi]",
            "movsxd r13, r13d",
            "movdqu xmm1, [r15+0x100]",
            "movdqu [r15+0x110], xmm2",
            "seto al",
            "lahf",
            "sahf",
            "jmp rax",
            "jmp qword ptr [r11+0x18]",
            "call rax",
            "call 0x700000000000",
            "jne 0x6fffffff0000",
            "ja 0x700000000010",
            "ret",
        ];
        let got = listing(&mut a, 0x6fff_ffff_0000);
        assert_eq!(got, want);
    }

    #[test]
    fn labels_resolve_forward_backward_and_rip_relative() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut top = a.create_label();
        let mut end = a.create_label();
        let mut slot = a.create_label();
        a.set_label(&mut top).unwrap();
        a.jmp(end).unwrap();
        a.lea(rax, qword_ptr(slot)).unwrap();
        a.mov(qword_ptr(slot), 7).unwrap();
        a.set_label(&mut end).unwrap();
        a.jne(top).unwrap();
        a.set_label(&mut slot).unwrap();
        a.ret().unwrap();
        let base = 0x7000_0000_1000;
        let r = assemble(&mut a, base).unwrap();
        let ins: Vec<_> = Decoder::with_ip(64, &r.bytes, base, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let at = |l| base + r.offset(l).unwrap();
        assert_eq!(ins[0].near_branch_target(), at(end));
        assert_eq!(ins[1].ip_rel_memory_address(), at(slot));
        assert_eq!(ins[2].ip_rel_memory_address(), at(slot));
        assert_eq!(ins[2].immediate32(), 7);
        assert_eq!(ins[3].near_branch_target(), at(top));
        // Every branch is rel32 (the dispatcher patches exits in place).
        assert_eq!(r.bytes[0], 0xe9);
    }

    #[test]
    fn impossible_operands_are_errors_not_bytes() {
        let mut a = CodeAssembler::new(64).unwrap();
        assert!(a.mov(rax, qword_ptr(r15 + 0x1_0000_0000i64)).is_err());
        assert!(a.add(rax, 0x8000_0000u32).is_err());
        assert!(a.lea(rax, rcx * 3).is_err());
        assert!(a.lea(rax, rax + rsp * 1).is_err());
        assert!(a.mov(sil, dh).is_err());
        assert!(a.decoded().is_empty(), "a refused instruction left bytes");
        assert!(a.movzx(ecx, dh).is_ok());
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        assert!(a.set_label(&mut l).is_err());
        let unbound = a.create_label();
        a.jmp(unbound).unwrap();
        assert!(assemble(&mut a, 0).is_err());
    }

    #[test]
    fn data_sits_in_the_code_and_labels_know_their_offsets() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut record = a.create_label();
        assert_eq!(a.label_offset(record), None);
        a.lea(rax, qword_ptr(record)).unwrap();
        a.set_label(&mut record).unwrap();
        assert_eq!(a.label_offset(record), Some(7));
        a.data(&[0xde, 0xad, 0xbe, 0xef]);
        let r = assemble(&mut a, 0x1000).unwrap();
        assert_eq!(&r.bytes[7..], &[0xde, 0xad, 0xbe, 0xef]);
        let lea = Decoder::with_ip(64, &r.bytes, 0x1000, DecoderOptions::NONE).decode();
        assert_eq!(lea.ip_rel_memory_address(), 0x1007);
    }
}
