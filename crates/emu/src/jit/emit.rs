//! The code generator: one guest block (64-bit code) → host x86-64.
//!
//! Guest registers live in `Cpu::gpr`; each translated instruction loads
//! the ones it names into host scratch registers, runs **the guest's own
//! instruction** re-encoded on them (same opcode, width and immediate, a
//! memory operand rewritten to the host address), and stores the results
//! back. So ALU results and flags come from the host CPU itself.
//!
//! Host registers: r15 = the `Cpu`; r10/r11 = address and TLB scratch;
//! rax, rcx, rdx, rsi, rdi, r8, r9 = operands. Guest flags are either in
//! the host RFLAGS (`Host`, after a translated flag writer) or in the
//! interpreter's lazy `Cpu::flags` (`Lazy`); every exit and every call
//! into the interpreter leaves them lazy.
//!
//! Memory operands: the effective address is built with `mov`/`lea` only,
//! then QEMU's inline TLB check (index, compare the page of the access's
//! last byte with the entry's read or write tag, add the host addend);
//! a miss calls `helpers::fill` and retries, and anything the fast path
//! cannot do (fault, MMIO, a code page, a page crossing) runs that one
//! instruction through the interpreter (`helpers::interp`), which gives
//! precise exceptions with no side table: nothing of an instruction is
//! committed before its memory check passes.

use std::mem::offset_of;

use arrayvec::ArrayVec;

use super::asm::*;
use iced_x86::{
    Code, ConditionCode, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register, RflagsBits,
};

use super::helpers;
use super::regs::{HOST, Regs, gpr};
use crate::cpu::flags::Flags;
use crate::cpu::{Cpu, RIP, RSP};
use crate::decode::Insn;
use crate::mem::tlb::{TLB_SIZE, TlbEntry};

const OSZAPC: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::PF
    | RflagsBits::CF;

const fn off(o: usize) -> i32 {
    o as i32
}
const RES: i32 = off(offset_of!(Cpu, flags) + offset_of!(Flags, res));
const AUX: i32 = off(offset_of!(Cpu, flags) + offset_of!(Flags, aux));
const RFLAGS: i32 = off(offset_of!(Cpu, rflags));
const CR0: i32 = off(offset_of!(Cpu, cr0));
const CPL: i32 = off(offset_of!(Cpu, cpl));
const CR4: i32 = off(offset_of!(Cpu, cr4));
const ICOUNT: i32 = off(offset_of!(Cpu, icount));
const SPILL: i32 = off(offset_of!(Cpu, jit_flags_spill));
const MEMO_RES: i32 = off(offset_of!(Cpu, jit_flags_memo));
const MEMO_AUX: i32 = MEMO_RES + 8;
const MEMO_SPILL: i32 = MEMO_RES + 16;
const LINK: i32 = off(offset_of!(Cpu, jit_link));
const LINK_SPILL: i32 = off(offset_of!(Cpu, jit_link_spill));
const LINK_EPOCH: i32 = off(offset_of!(Cpu, jit_link_epoch));
const NMI_BLOCKED: i32 = off(offset_of!(Cpu, nmi_blocked));
const INT_SHADOW: i32 = off(offset_of!(Cpu, int_shadow));
const TARGETS_ADDR: i32 = off(offset_of!(Cpu, jit_targets));
const HOST_SP: i32 = off(offset_of!(Cpu, jit_host_sp));
const RAS_FLOOR: i32 = off(offset_of!(Cpu, jit_ras_floor));
const TLB_EPOCHS: i32 = off(offset_of!(Cpu, tlb) + offset_of!(crate::mem::tlb::Tlb, epochs));
const _: () = assert!(std::mem::size_of::<super::Target>() == 32);
const TLB_BASE: i32 = off(offset_of!(Cpu, tlb) + offset_of!(crate::mem::tlb::Tlb, cur_base));
const TAG_R: i32 = off(offset_of!(TlbEntry, tag_r));
const TAG_W: i32 = off(offset_of!(TlbEntry, tag_w));
const ADDEND: i32 = off(offset_of!(TlbEntry, addend));
const _: () = assert!(std::mem::size_of::<TlbEntry>() == 64);

fn seg_base(seg: usize) -> i32 {
    off(offset_of!(Cpu, seg)
        + seg * std::mem::size_of::<crate::cpu::Seg>()
        + offset_of!(crate::cpu::Seg, base))
}

/// What `compile` produced: code assembled for `base`.
pub struct Emitted {
    pub bytes: Vec<u8>,
    /// RFLAGS bits left undefined by the block's last writers (the
    /// co-simulation does not compare them).
    pub undefined: u64,
    /// Offset of the code the dispatcher (through `Thunks::enter`) and
    /// chained jumps enter, with the flags lazy in `Cpu::flags`.
    pub head: u64,
    /// The same with the flags parked in EDX.
    pub head_spill: u64,
    pub native: usize,
    pub fallback: usize,
}

/// Where the guest's OSZAPC flags are at a point of the generated code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fl {
    Lazy,
    Host,
    /// Parked in EDX by `lahf; seto al` (AH = SF ZF AF PF CF as in
    /// RFLAGS, AL = OF); the host flags are garbage. Out-of-line code
    /// that calls keeps EDX in `Cpu::jit_flags_spill` across the call.
    Spill,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Binds `l` here (several labels may mark the same place).
fn bind(a: &mut CodeAssembler, l: &mut CodeLabel) -> Result<(), String> {
    a.set_label(l).map_err(err)
}

/// The register of `size` bytes within host 64-bit register `r`.
fn sized(r: Register, size: usize) -> Register {
    let n = r.number();
    let v = match size {
        1 => {
            if n < 4 {
                Register::AL as usize + n
            } else {
                Register::SPL as usize + (n - 4)
            }
        }
        2 => Register::AX as usize + n,
        4 => Register::EAX as usize + n,
        _ => Register::RAX as usize + n,
    };
    Register::try_from(v).unwrap_or(Register::None)
}

fn r64(r: Register) -> Result<AsmRegister64, String> {
    get_gpr64(r).ok_or_else(|| format!("not a 64-bit register: {r:?}"))
}

fn is_high8(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// How one guest instruction is translated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    /// Re-encode on host registers (and `[r11]` for memory).
    Rewrite,
    /// One-operand `mul`/`imul`: rAX and rDX through the host's.
    Mul,
    Lea,
    Push,
    Pop,
    Nop,
    /// An integer SSE instruction or move, on host XMM registers loaded
    /// from and stored to `Fpu::xmm` around it.
    Sse,
    /// The block's final branch.
    Jmp,
    Jcc,
    Call,
    Ret,
    /// `call reg`: the return address pushed, then on through the target
    /// cache.
    CallInd,
    /// `jmp reg`: through the target cache.
    JmpInd,
    /// `call [mem]` / `jmp [mem]`: the target loaded through the TLB
    /// (a miss runs the instruction in the interpreter), then as above.
    CallMem,
    JmpMem,
    /// An ALU instruction on AH/BH/CH/DH and an immediate: the guest
    /// register copied to the host's RAX, the instruction on AH.
    High8,
    /// `cdqe` on the host register holding the guest's RAX.
    Cdqe,
    /// `cli` at CPL 0 (elsewhere the interpreter checks IOPL and VME).
    Cli,
    /// Through the interpreter handler.
    Interp,
}

/// Whether a translation goes on past `ins` when it ends a block: a
/// conditional branch the code generator handles (its taken side leaves
/// out of line) or `sti` (its interrupt shadow is honoured by running on:
/// interrupts are only looked at in block heads).
pub fn continues_trace(ins: &Instruction) -> bool {
    ins.mnemonic() == Mnemonic::Sti
        || (ins.flow_control() == FlowControl::ConditionalBranch
            && plan_branch(ins) == Some(Plan::Jcc))
}

/// The plan of a near branch the code generator chains.
fn plan_branch(ins: &Instruction) -> Option<Plan> {
    use Mnemonic as M;
    let m = ins.mnemonic();
    match ins.flow_control() {
        FlowControl::UnconditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
            Some(Plan::Jmp)
        }
        FlowControl::ConditionalBranch
            if ins.op0_kind() == OpKind::NearBranch64
                && m != M::Jrcxz
                && m != M::Jecxz
                && m != M::Loop
                && m != M::Loope
                && m != M::Loopne =>
        {
            Some(Plan::Jcc)
        }
        _ => None,
    }
}

fn plan(ins: &Instruction, info: &iced_x86::InstructionInfo) -> Plan {
    use Mnemonic as M;
    let m = ins.mnemonic();
    if let Some(p) = plan_branch(ins) {
        return p;
    }
    match ins.flow_control() {
        FlowControl::Call if ins.op0_kind() == OpKind::NearBranch64 => return Plan::Call,
        FlowControl::Return if ins.code() == Code::Retnq => return Plan::Ret,
        FlowControl::IndirectCall if ins.code() == Code::Call_rm64 => {
            return match ins.op0_kind() {
                OpKind::Register => Plan::CallInd,
                _ if plain_memory(ins) => Plan::CallMem,
                _ => Plan::Interp,
            };
        }
        FlowControl::IndirectBranch if ins.code() == Code::Jmp_rm64 => {
            return match ins.op0_kind() {
                OpKind::Register => Plan::JmpInd,
                _ if plain_memory(ins) => Plan::JmpMem,
                _ => Plan::Interp,
            };
        }
        FlowControl::Next => {}
        _ => return Plan::Interp,
    }
    match ins.code() {
        Code::Push_r64 => return Plan::Push,
        Code::Pushq_imm8 | Code::Pushq_imm32 => return Plan::Push,
        Code::Pop_r64 => return Plan::Pop,
        Code::Lea_r64_m | Code::Lea_r32_m => {
            return if ins.memory_base() == Register::RIP && ins.code() == Code::Lea_r64_m {
                Plan::Lea
            } else if ins.memory_base() == Register::RIP || ins.memory_base() == Register::EIP {
                Plan::Interp
            } else {
                Plan::Lea
            };
        }
        // Prefetches never fault and change no state.
        Code::Nopw
        | Code::Nopd
        | Code::Nopq
        | Code::Nop_rm16
        | Code::Nop_rm32
        | Code::Nop_rm64
        | Code::Prefetcht0_m8
        | Code::Prefetcht1_m8
        | Code::Prefetcht2_m8
        | Code::Prefetchnta_m8 => {
            return Plan::Nop;
        }
        _ => {}
    }
    if sse_form(ins, info) {
        return Plan::Sse;
    }
    match ins.code() {
        Code::Cdqe => return Plan::Cdqe,
        Code::Cli => return Plan::Cli,
        _ => {}
    }
    if matches!(
        m,
        M::Test | M::And | M::Or | M::Xor | M::Cmp | M::Add | M::Sub | M::Mov
    ) && ins.op_count() == 2
        && ins.op0_kind() == OpKind::Register
        && is_high8(ins.op0_register())
        && ins.op1_kind() == OpKind::Immediate8
    {
        return Plan::High8;
    }
    // One-operand multiplies use rAX/rDX implicitly: their own plan.
    if matches!(m, M::Mul | M::Imul) && ins.op_count() == 1 {
        let plain = match ins.op0_kind() {
            OpKind::Register => ins.op0_register().is_gpr() && !is_high8(ins.op0_register()),
            OpKind::Memory => ins.memory_base() != Register::EIP,
            _ => false,
        };
        return if plain { Plan::Mul } else { Plan::Interp };
    }
    let ok = matches!(
        m,
        M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Shl
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Imul
            | M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
            | M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
            | M::Bswap
            | M::Xchg
            | M::Xadd
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
    );
    if !ok {
        return Plan::Interp;
    }
    // bt* with a register bit offset address memory outside the operand.
    if matches!(m, M::Bt | M::Bts | M::Btr | M::Btc)
        && ins.op0_kind() == OpKind::Memory
        && ins.op1_kind() == OpKind::Register
    {
        return Plan::Interp;
    }
    // Only explicit GPR operands (no AH..BH), one plain memory operand.
    let mut explicit: ArrayVec<Register, 10> = ArrayVec::new();
    for k in 0..ins.op_count() {
        match ins.op_kind(k) {
            OpKind::Register => {
                let r = ins.op_register(k);
                if !r.is_gpr() || is_high8(r) || explicit.try_push(r.full_register()).is_err() {
                    return Plan::Interp;
                }
            }
            OpKind::Memory => {
                if ins.memory_base() == Register::RIP || ins.memory_base() == Register::EIP {
                    // Fine: folded to a constant.
                } else {
                    for r in [ins.memory_base(), ins.memory_index()] {
                        if r != Register::None
                            && (!r.is_gpr() || explicit.try_push(r.full_register()).is_err())
                        {
                            return Plan::Interp;
                        }
                    }
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            _ => return Plan::Interp,
        }
    }
    for u in info.used_registers() {
        let r = u.register();
        if r.is_segment_register() {
            continue;
        }
        if !r.is_gpr() || !explicit.contains(&r.full_register()) {
            return Plan::Interp;
        }
    }
    Plan::Rewrite
}

/// A memory operand the code generator addresses: general registers
/// (64-bit addressing) or RIP-relative.
fn plain_memory(ins: &Instruction) -> bool {
    ins.op0_kind() == OpKind::Memory
        && [ins.memory_base(), ins.memory_index()]
            .iter()
            .all(|&r| r == Register::None || r == Register::RIP || r.is_gpr64())
}

/// Integer SSE instructions and moves whose host form gives the exact
/// architectural result: no MXCSR dependence, no SIMD float exceptions,
/// no implicit registers; legacy encodings on XMM registers (MMX forms
/// touch the x87 state) and general registers named as operands.
fn sse_form(ins: &Instruction, info: &iced_x86::InstructionInfo) -> bool {
    use Mnemonic as M;
    if ins.encoding() != iced_x86::EncodingKind::Legacy || ins.has_lock_prefix() {
        return false;
    }
    let ok = matches!(
        ins.mnemonic(),
        M::Movdqa
            | M::Movdqu
            | M::Movaps
            | M::Movups
            | M::Movapd
            | M::Movupd
            | M::Movd
            | M::Movq
            | M::Pxor
            | M::Por
            | M::Pand
            | M::Pandn
            | M::Xorps
            | M::Xorpd
            | M::Andps
            | M::Andpd
            | M::Andnps
            | M::Andnpd
            | M::Orps
            | M::Orpd
            | M::Pcmpeqb
            | M::Pcmpeqw
            | M::Pcmpeqd
            | M::Pcmpgtb
            | M::Pcmpgtw
            | M::Pcmpgtd
            | M::Paddb
            | M::Paddw
            | M::Paddd
            | M::Paddq
            | M::Psubb
            | M::Psubw
            | M::Psubd
            | M::Psubq
            | M::Paddusb
            | M::Paddusw
            | M::Psubusb
            | M::Psubusw
            | M::Pminub
            | M::Pmaxub
            | M::Pminsw
            | M::Pmaxsw
            | M::Pavgb
            | M::Pavgw
            | M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Pshufd
            | M::Pshuflw
            | M::Pshufhw
            | M::Pshufb
            | M::Palignr
            | M::Pslldq
            | M::Psrldq
            | M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad
            | M::Pmovmskb
            | M::Ptest
            | M::Pcmpistri
    );
    if !ok || !(0..ins.op_count()).any(|o| is_xmm_operand(ins, o)) {
        return false;
    }
    let mut explicit: ArrayVec<Register, 10> = ArrayVec::new();
    for k in 0..ins.op_count() {
        match ins.op_kind(k) {
            OpKind::Register => {
                let r = ins.op_register(k);
                if r.is_xmm() {
                    continue;
                }
                if !r.is_gpr() || r.size() < 4 || explicit.try_push(r.full_register()).is_err() {
                    return false;
                }
            }
            OpKind::Memory => {
                if ins.memory_base() == Register::EIP {
                    return false;
                }
                for r in [ins.memory_base(), ins.memory_index()] {
                    if r != Register::None
                        && r != Register::RIP
                        && (!r.is_gpr() || explicit.try_push(r.full_register()).is_err())
                    {
                        return false;
                    }
                }
            }
            OpKind::Immediate8 => {}
            _ => return false,
        }
    }
    // `pcmpistri` writes its index to ECX.
    if ins.mnemonic() == M::Pcmpistri && explicit.try_push(Register::RCX).is_err() {
        return false;
    }
    info.used_registers().iter().all(|u| {
        let r = u.register();
        r.is_segment_register()
            || r.is_xmm()
            || (r.is_gpr() && explicit.contains(&r.full_register()))
    })
}

fn is_xmm_operand(ins: &Instruction, o: u32) -> bool {
    ins.op_kind(o) == OpKind::Register && ins.op_register(o).is_xmm()
}

/// Flags an instruction reads and (unconditionally, fully) writes.
fn flag_use(ins: &Instruction) -> (u32, u32) {
    let read = ins.rflags_read() & OSZAPC;
    let written = ins.rflags_modified() & OSZAPC;
    // A shift or rotate by CL writes nothing when the count is zero.
    if matches!(
        ins.mnemonic(),
        Mnemonic::Shl
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    ) && (ins.op1_kind() == OpKind::Register || ins.op_count() == 3)
    {
        // A zero count keeps the old flags: treat them as read, so they
        // are in the host RFLAGS when it runs.
        return (OSZAPC, written);
    }
    (read, written)
}

struct Ctx<'a> {
    a: &'a mut CodeAssembler,
    epilogue: CodeLabel,
    /// Chained exits: (the `jmp rel32` the dispatcher patches, its
    /// unchained stub, flags parked, for an exit to another page the
    /// `mov eax, imm32` holding the epoch it was linked under).
    slots: Vec<Slot>,
    /// Out-of-line code emitted after the main path.
    cold: Vec<Cold>,
    insns: &'a [Insn],
    total: usize,
    page: u64,
    /// The guest RIP the block was decoded at (runtime RIP-relative
    /// values are offsets from it, added to r14).
    base: u64,
    /// Chaining and target-cache jumps on (off under co-simulation, so a
    /// checked block runs alone).
    chain: bool,
    /// Target-cache misses (flags parked): leave to the dispatcher.
    misses: Vec<(CodeLabel, bool)>,
    /// Guest registers in host registers at the current point.
    regs: Regs,
    thunks: &'a Thunks,
    /// The guest instructions (`insns` are their interpreter forms).
    ins: &'a [Instruction],
    /// SSE is known usable (CR0.EM/TS clear, CR4.OSFXSR set) at this
    /// point of the block: checked once, until an interpreted instruction
    /// (which could change CR0 or CR4).
    sse_checked: bool,
}

enum Cold {
    /// A TLB miss at instruction `k`: fill, retry or interpret.
    Slow {
        label: CodeLabel,
        retry: CodeLabel,
        /// Runs the instruction in the interpreter (after a failed fill).
        to_interp: CodeLabel,
        k: usize,
        next: u64,
        kind: u64,
        /// Guest flags were parked in the spill slot before the check.
        from_spill: bool,
        /// Where the fast path has the flags after the instruction.
        after_state: Fl,
        after: CodeLabel,
        /// The block's final branch: the interpreter sets RIP.
        branch: bool,
        /// The registers held at `retry` (and, with more changed, at
        /// `after`).
        regs: Regs,
    },
    /// Leave after `k` instructions (exit code already in eax).
    Leave { label: CodeLabel, k: usize },
    /// The flags memo missed: compute the host form with a call.
    FlagsMiss { label: CodeLabel, back: CodeLabel },
    /// The parked-flags entry of a block whose body starts with them
    /// lazy: convert, then the lazy head.
    ParkedEntry { label: CodeLabel, head: CodeLabel },
    /// The taken side of a conditional branch inside a trace: leave to
    /// `target` after `count` instructions, flags parked.
    Taken {
        label: CodeLabel,
        target: u64,
        count: usize,
    },
}

/// Instructions that stop the block only for the dispatcher's sake (see
/// `helpers::interp_soft`).
fn soft(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Sti | Mnemonic::Iretq | Mnemonic::Syscall | Mnemonic::Sysretq
    )
}

/// `addr - base` as a displacement.
fn rel(base: u64, addr: u64) -> Result<i32, String> {
    i32::try_from(addr.wrapping_sub(base) as i64)
        .map_err(|_| format!("{addr:#x} is too far from {base:#x}"))
}

/// Guest registers an instruction names (at most the 16 general ones),
/// each with whether its old value is needed.
type Operands = ArrayVec<(usize, bool), 16>;

/// Guest registers an instruction names, each with whether its old
/// value is needed (a whole 32/64-bit write is not).
fn operand_regs(info: &iced_x86::InstructionInfo) -> Result<Operands, String> {
    let mut v = Operands::new();
    for u in info.used_registers() {
        let r = u.register();
        if !r.is_gpr() {
            continue;
        }
        let g = r.full_register().number();
        let load = !(u.access() == OpAccess::Write && r.size() >= 4);
        match v.iter_mut().find(|(x, _)| *x == g) {
            Some(e) => e.1 |= load,
            None => v
                .try_push((g, load))
                .map_err(|_| "too many operand registers")?,
        }
    }
    Ok(v)
}

impl Ctx<'_> {
    /// A guest address of this block as an offset from its runtime start.
    fn rel(&self, addr: u64) -> Result<i32, String> {
        rel(self.base, addr)
    }

    /// Brings the guest registers `regs` (number, old value needed) into
    /// host registers.
    fn hold(&mut self, regs: &[(usize, bool)]) -> Result<(), String> {
        let pinned: ArrayVec<usize, 16> = regs.iter().map(|(g, _)| *g).collect();
        for (g, load) in regs {
            self.regs.get(self.a, *g, *load, &pinned)?;
        }
        Ok(())
    }

    /// The host register holding guest register `r` (held by `hold`).
    fn host(&self, r: Register) -> Result<AsmRegister64, String> {
        let g = r.full_register().number();
        r64(self.regs.host_of(g).ok_or("guest register not held")?)
    }

    /// Host RFLAGS → lazy flags (from the live flags or the spilled
    /// ones in EDX), remembered in the memo so the next conversion back
    /// is cheap. Clobbers rax, rcx, rdx and the host flags.
    fn materialize(&mut self, from_spill: bool) -> Result<(), String> {
        if !from_spill {
            self.spill()?;
        }
        self.a.call(self.thunks.materialize).map_err(err)
    }

    /// Jumps to `miss` unless the lazy flags are the memo's.
    fn memo_check(&mut self, miss: CodeLabel) -> Result<(), String> {
        let a = &mut self.a;
        a.mov(rax, qword_ptr(r15 + RES)).map_err(err)?;
        a.cmp(rax, qword_ptr(r15 + MEMO_RES)).map_err(err)?;
        a.jne(miss).map_err(err)?;
        a.mov(rax, qword_ptr(r15 + AUX)).map_err(err)?;
        a.cmp(rax, qword_ptr(r15 + MEMO_AUX)).map_err(err)?;
        a.jne(miss).map_err(err)
    }

    /// Lazy flags → host RFLAGS: from the memo when the lazy flags are
    /// the ones it was made from (the usual case after a translated
    /// block's exit), else through a call. Clobbers rax.
    fn load_host_flags(&mut self) -> Result<(), String> {
        let miss = self.a.create_label();
        let mut back = self.a.create_label();
        self.memo_check(miss)?;
        let a = &mut self.a;
        bind(a, &mut back)?;
        a.mov(eax, dword_ptr(r15 + MEMO_SPILL)).map_err(err)?;
        a.add(al, 0x7f).map_err(err)?;
        a.sahf().map_err(err)?;
        self.cold.push(Cold::FlagsMiss { label: miss, back });
        Ok(())
    }

    /// Lazy flags → parked in EDX, as `load_host_flags`. Clobbers rax.
    fn lazy_to_spill(&mut self) -> Result<(), String> {
        let miss = self.a.create_label();
        let mut back = self.a.create_label();
        self.memo_check(miss)?;
        bind(self.a, &mut back)?;
        self.a.mov(edx, dword_ptr(r15 + MEMO_SPILL)).map_err(err)?;
        self.cold.push(Cold::FlagsMiss { label: miss, back });
        Ok(())
    }

    /// Before an exit: host flags are parked (chained exits keep them in
    /// EDX); without chaining they are made lazy. Returns whether they
    /// leave parked.
    fn park(&mut self, fl: Fl) -> Result<bool, String> {
        if !self.chain {
            let mut f = fl;
            self.ensure_lazy(&mut f)?;
            return Ok(false);
        }
        match fl {
            Fl::Lazy => Ok(false),
            Fl::Host => {
                self.spill()?;
                Ok(true)
            }
            Fl::Spill => Ok(true),
        }
    }

    /// Makes the flags lazy (before the interpreter or an exit).
    fn ensure_lazy(&mut self, fl: &mut Fl) -> Result<(), String> {
        match *fl {
            Fl::Lazy => {}
            Fl::Host => self.materialize(false)?,
            Fl::Spill => self.materialize(true)?,
        }
        *fl = Fl::Lazy;
        Ok(())
    }

    /// Puts the guest flags in the host RFLAGS.
    fn ensure_host(&mut self, fl: &mut Fl) -> Result<(), String> {
        match *fl {
            Fl::Lazy => self.load_host_flags()?,
            Fl::Host => {}
            Fl::Spill => self.unspill()?,
        }
        *fl = Fl::Host;
        Ok(())
    }

    /// Parks the host flags in EDX (QEMU's and box64's `lahf`/`seto`
    /// pair: far cheaper than `pushfq`/`popfq`).
    fn spill(&mut self) -> Result<(), String> {
        self.a.lahf().map_err(err)?;
        self.a.seto(al).map_err(err)?;
        self.a.mov(edx, eax).map_err(err)
    }

    /// EDX → host flags: `add al, 0x7f` overflows exactly when AL (OF)
    /// is 1, then `sahf` sets the other five.
    fn unspill(&mut self) -> Result<(), String> {
        self.a.mov(eax, edx).map_err(err)?;
        self.a.add(al, 0x7f).map_err(err)?;
        self.a.sahf().map_err(err)
    }

    /// Calls the interpreter for instruction `k`; leaves on a non-zero
    /// answer. Flags must be lazy and changed registers written back.
    fn interp(&mut self, k: usize, next: u64) -> Result<(), String> {
        let insn: *const Insn = &self.insns[k];
        self.a.mov(rsi, insn as u64).map_err(err)?;
        let d = self.rel(next)?;
        self.a.lea(rdx, r14 + d).map_err(err)?;
        let thunk = if soft(self.ins[k].mnemonic()) {
            self.thunks.interp_soft
        } else {
            self.thunks.interp
        };
        self.a.call(thunk).map_err(err)?;
        self.a.test(eax, eax).map_err(err)?;
        let leave = self.a.create_label();
        self.a.jnz(leave).map_err(err)?;
        self.cold.push(Cold::Leave { label: leave, k });
        Ok(())
    }

    /// Ends the block at a constant guest RIP (registers written back;
    /// flags as `fl` says) with a direct `jmp` the dispatcher patches to
    /// the target's head (a direct branch costs the host's predictor far
    /// less than a `jmp [slot]` when it misses). Within the page the link
    /// holds as long as the block runs (its mapping is the one this block
    /// was entered under); to another page, only under the TLB epoch the
    /// target's mapping was seen under, the immediate of a `mov eax` (0
    /// until linked: epochs are never 0), else back to the dispatcher,
    /// which links it again.
    fn exit_to(&mut self, target: u64, fl: Fl) -> Result<(), String> {
        let parked = self.park(fl)?;
        let d = self.rel(target)?;
        let a = &mut self.a;
        if !self.chain {
            a.lea(rax, r14 + d).map_err(err)?;
            a.mov(qword_ptr(r15 + gpr(RIP)), rax).map_err(err)?;
        } else {
            // Chained: the next block's start travels in r14 (a block
            // entered through a slot finds it there, not in `Cpu::gpr`;
            // what leaves to the dispatcher stores it).
            a.lea(r14, r14 + d).map_err(err)?;
        }
        if self.total != 0 {
            a.add(qword_ptr(r15 + ICOUNT), self.total as i32)
                .map_err(err)?;
        }
        if self.chain {
            let mut site = a.create_label();
            let stub = a.create_label();
            let mut epoch_word = None;
            if target & !0xfff != self.page {
                // EDX may hold the flags.
                let mut epoch = a.create_label();
                bind(a, &mut epoch)?;
                a.mov(eax, 0u32).map_err(err)?;
                a.mov(r10d, eax).map_err(err)?;
                a.shr(r10d, 31).map_err(err)?;
                a.cmp(eax, dword_ptr(r15 + r10 * 4 + TLB_EPOCHS))
                    .map_err(err)?;
                a.jne(stub).map_err(err)?;
                epoch_word = Some(epoch);
            }
            bind(a, &mut site)?;
            a.jmp(stub).map_err(err)?;
            self.slots.push((site, stub, parked, epoch_word));
        } else {
            a.xor(eax, eax).map_err(err)?;
            a.jmp(self.epilogue).map_err(err)?;
        }
        Ok(())
    }

    /// A translated call's return frame (registers written back, flags
    /// as `fl` says; returns where they are now): pushes the guest return
    /// address `next` and makes a host `call` to the exit that follows,
    /// so the matching guest `ret` ([`exit_return`](Self::exit_return))
    /// comes back with a host `ret`, which the host's return predictor
    /// gets right, instead of through the target cache. The code after
    /// the host `call` goes on at `next` (in r14), in this block's page,
    /// whose mapping cannot have changed: anything that changes mappings
    /// leaves translated code, and leaving drops every frame.
    fn return_frame(&mut self, next: u64, fl: Fl) -> Result<Fl, String> {
        if !self.chain || !self.park(fl)? {
            return Ok(fl);
        }
        let mut callee = self.a.create_label();
        let d = self.rel(next)?;
        let a = &mut self.a;
        // Too deep: no frame (the return then takes the target cache).
        a.cmp(rsp, qword_ptr(r15 + RAS_FLOOR)).map_err(err)?;
        a.jbe(callee).map_err(err)?;
        a.lea(rax, r14 + d).map_err(err)?;
        a.push(rax).map_err(err)?;
        a.call(callee).map_err(err)?;
        // Returned to: r14 = `next`, the flags parked.
        a.lea(rsp, rsp + 8).map_err(err)?;
        let (base, total) = (self.base, self.total);
        (self.base, self.total) = (next, 0);
        self.exit_to(next, Fl::Spill)?;
        (self.base, self.total) = (base, total);
        bind(self.a, &mut callee)?;
        Ok(Fl::Spill)
    }

    /// Ends the block after a `ret` (the target in `Cpu::gpr`): straight
    /// back with a host `ret` when the top return frame holds the same
    /// guest address (at the bottom of the stack a non-canonical word
    /// never does), else as [`exit_dynamic`](Self::exit_dynamic).
    fn exit_return(&mut self, fl: Fl) -> Result<(), String> {
        self.exit_dynamic_from(fl, true)
    }

    /// Ends the block at the RIP already in `Cpu::gpr` (registers
    /// written back; flags as `fl` says): a hit in the target cache (same
    /// RIP, same TLB epoch) jumps straight to that translation's head for
    /// lazy or parked flags, which checks its page and attention.
    fn exit_dynamic(&mut self, fl: Fl) -> Result<(), String> {
        self.exit_dynamic_from(fl, false)
    }

    fn exit_dynamic_from(&mut self, fl: Fl, ret: bool) -> Result<(), String> {
        let parked = self.park(fl)?;
        let a = &mut self.a;
        if self.total != 0 {
            a.add(qword_ptr(r15 + ICOUNT), self.total as i32)
                .map_err(err)?;
        }
        if self.chain {
            // EDX may hold the flags: the probe uses rax, rcx, r10, r11.
            let miss = a.create_label();
            a.mov(rcx, qword_ptr(r15 + gpr(RIP))).map_err(err)?;
            if ret && parked {
                let mut probe = a.create_label();
                a.cmp(rcx, qword_ptr(rsp + 8)).map_err(err)?;
                a.jne(probe).map_err(err)?;
                a.mov(r14, rcx).map_err(err)?;
                a.ret().map_err(err)?;
                bind(a, &mut probe)?;
            }
            a.mov(r11, rcx).map_err(err)?;
            a.shr(r11, 12).map_err(err)?;
            a.xor(r11, rcx).map_err(err)?;
            a.and(r11d, (super::TARGETS - 1) as u32).map_err(err)?;
            a.shl(r11, 5).map_err(err)?;
            a.add(r11, qword_ptr(r15 + TARGETS_ADDR)).map_err(err)?;
            a.cmp(rcx, qword_ptr(r11)).map_err(err)?;
            a.jne(miss).map_err(err)?;
            // The entry's code epoch, current if it equals the TLB's
            // epoch of its kind (bit 31: global).
            a.mov(eax, dword_ptr(r11 + 8)).map_err(err)?;
            a.mov(r10d, eax).map_err(err)?;
            a.shr(r10d, 31).map_err(err)?;
            a.cmp(eax, dword_ptr(r15 + r10 * 4 + TLB_EPOCHS))
                .map_err(err)?;
            a.jne(miss).map_err(err)?;
            let head = if parked { 24 } else { 16 };
            a.mov(r14, rcx).map_err(err)?;
            a.jmp(qword_ptr(r11 + head)).map_err(err)?;
            self.misses.push((miss, parked));
            return Ok(());
        }
        a.xor(eax, eax).map_err(err)?;
        a.jmp(self.epilogue).map_err(err)
    }

    /// `dst` = the offset of `ins`'s memory operand (no segment base),
    /// from the held guest registers with `mov`/`lea` only, so host flags
    /// survive; truncated to 32 bits for a 32-bit address size or when
    /// `narrow`.
    fn address_offset(
        &mut self,
        ins: &Instruction,
        dst: AsmRegister64,
        dst32: AsmRegister32,
        narrow: bool,
    ) -> Result<(), String> {
        let base = ins.memory_base();
        let index = ins.memory_index();
        let disp = ins.memory_displacement64();
        let narrow = narrow || base.is_gpr32() || index.is_gpr32() || base == Register::EIP;
        if base == Register::RIP || base == Register::EIP {
            let d = self.rel(disp)?;
            self.a.lea(dst, r14 + d).map_err(err)?;
        } else if base == Register::None && index == Register::None {
            self.a.mov(dst, disp).map_err(err)?;
        } else {
            // With a 32-bit result only the low 32 bits of the sum count.
            let d = if narrow {
                disp as u32 as i32
            } else {
                i32::try_from(disp as i64).map_err(|_| "displacement".to_string())?
            };
            let b = (base != Register::None)
                .then(|| self.host(base))
                .transpose()?;
            let x = (index != Register::None)
                .then(|| self.host(index))
                .transpose()?;
            let scale = ins.memory_index_scale();
            let m = match (b, x) {
                (Some(b), Some(x)) => b + x * scale + d,
                (Some(b), None) => b + d,
                (None, Some(x)) => x * scale + d,
                (None, None) => unreachable!(),
            };
            if narrow {
                return self.a.lea(dst32, m).map_err(err);
            }
            return self.a.lea(dst, m).map_err(err);
        }
        if narrow {
            self.a.mov(dst32, dst32).map_err(err)?;
        }
        Ok(())
    }

    /// r11 = the guest effective address of `ins`'s memory operand
    /// (mov/lea only: host flags survive).
    fn effective_address(&mut self, ins: &Instruction) -> Result<(), String> {
        self.address_offset(ins, r11, r11d, false)?;
        let a = &mut self.a;
        match ins.memory_segment() {
            Register::FS | Register::GS => {
                let s = if ins.memory_segment() == Register::FS {
                    4
                } else {
                    5
                };
                a.mov(r10, qword_ptr(r15 + seg_base(s))).map_err(err)?;
                a.lea(r11, r11 + r10).map_err(err)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The inline TLB check for `n` bytes at r11; r11 becomes the host
    /// address. Clobbers rax, r10 and the host flags.
    fn tlb_check(&mut self, n: u64, write: bool, slow: CodeLabel) -> Result<(), String> {
        let a = &mut self.a;
        // The entry's offset: the page number's low bits times 64.
        a.mov(r10, r11).map_err(err)?;
        a.shr(r10, 12 - 6).map_err(err)?;
        a.and(r10d, ((TLB_SIZE - 1) << 6) as u32).map_err(err)?;
        a.add(r10, qword_ptr(r15 + TLB_BASE)).map_err(err)?;
        a.lea(rax, r11 + (n as i32 - 1)).map_err(err)?;
        a.and(rax, -4096).map_err(err)?;
        let tag = if write { TAG_W } else { TAG_R };
        a.cmp(rax, qword_ptr(r10 + tag)).map_err(err)?;
        a.jne(slow).map_err(err)?;
        a.add(r11, qword_ptr(r10 + ADDEND)).map_err(err)
    }
}

/// The frame translated code runs in (`Thunks::enter`): six saved
/// registers, then three words holding [`NO_RETURN`] that keep the stack
/// 16-byte aligned for helper calls and mark the bottom of the
/// return-address stack. Return frames (guest return address, host
/// return address) are 16 bytes each, so alignment holds above them too.
const SAVED: [AsmRegister64; 6] = [r15, r14, r13, r12, rbp, rbx];

/// Never a guest return address (not canonical): a `ret` at the bottom of
/// the return-address stack compares its target with this and misses.
const NO_RETURN: u64 = 0x8000_0000_0000_0000;

/// How deep translated calls stack return frames (16 bytes each) before
/// deeper calls go without one.
const RAS_BYTES: i32 = 256 * 16;

/// What a translation builds and throws away, kept from one translation
/// to the next on each thread that translates: growing the assembler
/// afresh was ~6% of a translation, and the out-of-line list's growth
/// showed in profiles too.
struct Scratch {
    a: CodeAssembler,
    cold: Vec<Cold>,
    factory: InstructionInfoFactory,
    slots: Vec<Slot>,
    misses: Vec<(CodeLabel, bool)>,
    leaves: Vec<(CodeLabel, usize)>,
    parked: Vec<CodeLabel>,
}

/// A chained exit (see [`Ctx::slots`]).
type Slot = (CodeLabel, CodeLabel, bool, Option<CodeLabel>);

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Returns a translation's code buffer to this thread's assembler once
/// the code is in the arena (no allocation per translation).
pub fn recycle(bytes: Vec<u8>) {
    SCRATCH.with(|slot| {
        if let Some(s) = slot.borrow_mut().as_mut() {
            s.a.give_back(bytes);
        }
    });
}

/// This thread's `Scratch`, emptied, given back when dropped.
struct Reused(Option<Scratch>);

impl Reused {
    fn take() -> Result<Reused, String> {
        let s = match SCRATCH.with(|slot| slot.borrow_mut().take()) {
            Some(mut s) => {
                s.a.reset();
                s.cold.clear();
                s.slots.clear();
                s.misses.clear();
                s.leaves.clear();
                s.parked.clear();
                s
            }
            None => Scratch {
                a: CodeAssembler::new(64).map_err(err)?,
                cold: Vec::with_capacity(64),
                factory: InstructionInfoFactory::new(),
                slots: Vec::with_capacity(8),
                misses: Vec::with_capacity(8),
                leaves: Vec::with_capacity(16),
                parked: Vec::with_capacity(8),
            },
        };
        Ok(Reused(Some(s)))
    }
}

impl Drop for Reused {
    fn drop(&mut self) {
        let s = self.0.take();
        SCRATCH.with(|slot| *slot.borrow_mut() = s);
    }
}

/// Translates the 64-bit block `ins` (guest instructions from `rip`, with
/// `insns[k]` the interpreter's form of `ins[k]`) for address `base`.
pub fn compile(
    ins: &[Instruction],
    insns: &[Insn],
    generation: (u64, u32),
    attention: u64,
    base: u64,
    chain: bool,
    thunks: &Thunks,
) -> Result<Emitted, String> {
    let mut reused = Reused::take()?;
    let Scratch {
        a,
        cold,
        factory,
        slots,
        misses,
        leaves,
        parked,
    } = reused.0.as_mut().ok_or("no scratch")?;
    let (mut leaves, mut parked_misses) = (std::mem::take(leaves), std::mem::take(parked));
    let epilogue = a.create_label();
    let stale = a.create_label();
    let mut head = a.create_label();
    let first = ins.first().ok_or("empty block")?;
    let mut c = Ctx {
        a,
        epilogue,
        slots: std::mem::take(slots),
        cold: std::mem::take(cold),
        insns,
        total: ins.len(),
        page: first.ip() & !0xfff,
        chain,
        misses: std::mem::take(misses),
        base: first.ip(),
        regs: Regs::default(),
        thunks,
        ins,
        sse_checked: false,
    };
    // Two ways in, one copy of the checks: the flags are first brought
    // to the form the body starts with (lazy if its first use of them is
    // the interpreter's, else parked in EDX). Planned up to the first
    // instruction that decides it; the rest as the body is emitted (an
    // instruction's info made twice was ~7% of a translation).
    let mut plans: ArrayVec<Plan, { super::MAX_TRACE }> = ArrayVec::new();
    let mut entry_lazy = false;
    for i in ins {
        let p = plan(i, factory.info(i));
        plans.try_push(p).map_err(|_| "trace too long")?;
        if let Some(lazy) = entry_flags(i, p) {
            entry_lazy = lazy;
            break;
        }
    }
    let mut head_spill = c.a.create_label();
    let stale_spill = c.a.create_label();
    // Every way in finds the block's start in r14 (`Thunks::enter` loads
    // it from `Cpu::gpr`; a chained exit passes it). Guest addresses in
    // the code are offsets from it: the same physical page may be mapped
    // at another address by another process (shared libraries), and the
    // translation is the page's.
    bind(c.a, &mut head)?;
    let stale_head = c.a.create_label();
    if entry_lazy {
        head_checks(c.a, generation, attention, c.thunks, stale_head)?;
        c.cold.push(Cold::ParkedEntry {
            label: head_spill,
            head,
        });
    } else {
        c.lazy_to_spill()?;
        bind(c.a, &mut head_spill)?;
        head_checks(c.a, generation, attention, c.thunks, stale_spill)?;
    }

    let mut fl = if entry_lazy { Fl::Lazy } else { Fl::Spill };
    let (mut native, mut fallback) = (0, 0);
    let mut ended = false;
    for (k, i) in ins.iter().enumerate() {
        let info = factory.info(i);
        let p = match plans.get(k) {
            Some(&p) => p,
            None => plan(i, info),
        };
        let next = i.next_ip();
        let (read, written) = flag_use(i);
        let last = k + 1 == ins.len();
        if k > 0 && ins[k - 1].mnemonic() == Mnemonic::Sti {
            // The instruction after `sti` in a trace: its interrupt
            // shadow ends as this one starts (as the interpreter clears
            // it before the one instruction it then runs); a `hlt` here
            // must wake for the next interrupt.
            c.a.mov(byte_ptr(r15 + INT_SHADOW), 0).map_err(err)?;
        }
        match p {
            Plan::Interp => {
                fallback += 1;
                c.sse_checked = false;
                c.ensure_lazy(&mut fl)?;
                c.regs.write_back(c.a)?;
                c.interp(k, next)?;
                // The interpreter may have changed any register.
                c.regs.forget();
                if i.flow_control() != FlowControl::Next {
                    c.exit_dynamic(Fl::Lazy)?;
                    ended = true;
                }
            }
            Plan::Nop => native += 1,
            Plan::Lea => {
                native += 1;
                c.hold(&operand_regs(info)?)?;
                emit_lea(&mut c, i)?;
            }
            Plan::Cdqe => {
                native += 1;
                c.hold(&[(0, true)])?;
                let h = c.host(Register::RAX)?;
                let h32 = get_gpr32(sized(h.into(), 4)).ok_or("no 32-bit form")?;
                c.a.movsxd(h, h32).map_err(err)?;
                c.regs.changed(0);
            }
            Plan::Rewrite
            | Plan::Mul
            | Plan::Sse
            | Plan::High8
            | Plan::Cli
            | Plan::Push
            | Plan::Pop
            | Plan::Call
            | Plan::CallInd
            | Plan::CallMem
            | Plan::JmpMem
            | Plan::Ret => {
                native += 1;
                // The instruction merges into or reads the guest flags:
                // they must be in the host RFLAGS when it runs.
                let needs_flags = read != 0 || (written != 0 && written != OSZAPC);
                if needs_flags {
                    c.ensure_host(&mut fl)?;
                }
                let mut operands = operand_regs(info)?;
                let stack = matches!(
                    p,
                    Plan::Push | Plan::Pop | Plan::Call | Plan::CallInd | Plan::CallMem | Plan::Ret
                );
                if stack && !operands.iter().any(|(g, _)| *g == RSP) {
                    operands
                        .try_push((RSP, true))
                        .map_err(|_| "too many operand registers")?;
                }
                c.hold(&operands)?;
                let has_mem = stack || (0..i.op_count()).any(|o| i.op_kind(o) == OpKind::Memory);
                // The TLB check (and SSE's CR0/CR4 check) clobbers host
                // flags: park them first.
                let clobbers = has_mem || (p == Plan::Sse && !c.sse_checked) || p == Plan::Cli;
                if clobbers && fl == Fl::Host {
                    c.spill()?;
                    fl = Fl::Spill;
                }
                let before = fl;
                let mut retry = c.a.create_label();
                bind(c.a, &mut retry)?;
                let held = c.regs.clone();
                let slow = c.a.create_label();
                let to_interp = c.a.create_label();
                let mut after = c.a.create_label();
                let unspill = before == Fl::Spill && needs_flags;
                match p {
                    Plan::Rewrite => emit_rewrite(&mut c, i, info, slow, unspill)?,
                    Plan::Sse => emit_sse(&mut c, i, info, slow, to_interp)?,
                    Plan::High8 => emit_high8(&mut c, i, unspill)?,
                    Plan::Cli => {
                        c.a.cmp(byte_ptr(r15 + CPL), 0).map_err(err)?;
                        c.a.jne(to_interp).map_err(err)?;
                        c.a.and(
                            dword_ptr(r15 + RFLAGS),
                            !(crate::cpu::flags::IF as u32) as i32,
                        )
                        .map_err(err)?;
                    }
                    Plan::Mul => emit_mul(&mut c, i, slow)?,
                    Plan::Push | Plan::Call => emit_push(&mut c, i, next, slow)?,
                    Plan::CallInd => {
                        // The target as it is before the push (`call rsp`).
                        let t = c.host(i.op0_register())?;
                        c.a.mov(qword_ptr(r15 + gpr(RIP)), t).map_err(err)?;
                        emit_push(&mut c, i, next, slow)?
                    }
                    Plan::CallMem | Plan::JmpMem => {
                        c.effective_address(i)?;
                        c.tlb_check(8, false, to_interp)?;
                        c.a.mov(rcx, qword_ptr(r11)).map_err(err)?;
                        c.a.mov(qword_ptr(r15 + gpr(RIP)), rcx).map_err(err)?;
                        if p == Plan::CallMem {
                            emit_push(&mut c, i, next, slow)?
                        }
                    }
                    Plan::Pop | Plan::Ret => {
                        emit_pop(&mut c, i, slow, to_interp, matches!(p, Plan::Ret))?
                    }
                    _ => unreachable!(),
                }
                if unspill || written != 0 {
                    fl = Fl::Host;
                }
                let kind = match p {
                    Plan::Push | Plan::Call | Plan::CallInd | Plan::CallMem => 8 | 0x100,
                    Plan::Pop | Plan::Ret => 8,
                    _ => mem_kind(i, info),
                };
                let branch = matches!(
                    p,
                    Plan::Call | Plan::CallInd | Plan::CallMem | Plan::JmpMem | Plan::Ret
                );
                // SSE and cli checks leave through `to_interp` even
                // without memory.
                if has_mem || p == Plan::Sse || p == Plan::Cli {
                    c.cold.push(Cold::Slow {
                        label: slow,
                        retry,
                        to_interp,
                        k,
                        next,
                        kind,
                        from_spill: before == Fl::Spill,
                        after_state: fl,
                        after,
                        branch,
                        regs: held,
                    });
                }
                bind(c.a, &mut after)?;
                match p {
                    Plan::Call => {
                        c.regs.write_back(c.a)?;
                        let fl = c.return_frame(next, fl)?;
                        c.exit_to(i.near_branch_target(), fl)?;
                        ended = true;
                    }
                    Plan::CallInd | Plan::CallMem => {
                        c.regs.write_back(c.a)?;
                        let fl = c.return_frame(next, fl)?;
                        c.exit_dynamic(fl)?;
                        ended = true;
                    }
                    Plan::Ret => {
                        c.regs.write_back(c.a)?;
                        c.exit_return(fl)?;
                        ended = true;
                    }
                    Plan::JmpMem => {
                        c.regs.write_back(c.a)?;
                        c.exit_dynamic(fl)?;
                        ended = true;
                    }
                    _ => {}
                }
            }
            Plan::JmpInd => {
                native += 1;
                c.hold(&operand_regs(info)?)?;
                let t = c.host(i.op0_register())?;
                c.a.mov(qword_ptr(r15 + gpr(RIP)), t).map_err(err)?;
                c.regs.write_back(c.a)?;
                c.exit_dynamic(fl)?;
                ended = true;
            }
            Plan::Jmp => {
                native += 1;
                c.regs.write_back(c.a)?;
                c.exit_to(i.near_branch_target(), fl)?;
                ended = true;
            }
            Plan::Jcc => {
                native += 1;
                // The flags both in the host RFLAGS (for the branch) and
                // parked in EDX (for the next block: no conversion).
                match fl {
                    Fl::Lazy => {
                        c.lazy_to_spill()?;
                        c.unspill()?;
                    }
                    Fl::Host => c.spill()?,
                    Fl::Spill => c.unspill()?,
                }
                fl = Fl::Spill;
                c.regs.write_back(c.a)?;
                let taken = c.a.create_label();
                emit_jcc(c.a, i.condition_code(), taken)?;
                if last {
                    c.exit_to(next, fl)?;
                    let mut t = taken;
                    bind(c.a, &mut t)?;
                    c.exit_to(i.near_branch_target(), fl)?;
                    ended = true;
                } else {
                    // Inside a trace: the fall-through goes on here.
                    c.cold.push(Cold::Taken {
                        label: taken,
                        target: i.near_branch_target(),
                        count: k + 1,
                    });
                }
            }
        }
        if last && !ended {
            c.regs.write_back(c.a)?;
            c.exit_to(next, fl)?;
        }
    }

    // Out-of-line paths.
    let mut cold = std::mem::take(&mut c.cold);
    // One dynamic exit (flags lazy) shared by the slow paths of the
    // block's final indirect branch.
    let mut dynamic_exit: Option<CodeLabel> = None;
    for item in cold.drain(..) {
        match item {
            Cold::Slow {
                mut label,
                retry,
                mut to_interp,
                k,
                next,
                kind,
                from_spill,
                after_state,
                after,
                branch,
                regs,
            } => {
                bind(c.a, &mut label)?;
                // r11 is still the guest address: the check jumps here
                // before adding the addend. The fill keeps every held
                // register.
                c.a.mov(eax, kind as u32).map_err(err)?;
                c.a.call(c.thunks.fill).map_err(err)?;
                c.a.jnz(to_interp).map_err(err)?;
                c.a.jmp(retry).map_err(err)?;
                // The interpreter's way, described by a record the shared
                // thunk reads (`helpers::Site`).
                let resume = if branch {
                    // The interpreter set RIP: leave through the lookup.
                    match dynamic_exit {
                        Some(l) => l,
                        None => {
                            let mut l = c.a.create_label();
                            bind(c.a, &mut l)?;
                            c.exit_dynamic(Fl::Lazy)?;
                            dynamic_exit = Some(l);
                            l
                        }
                    }
                } else {
                    after
                };
                let resume =
                    c.a.label_offset(resume)
                        .ok_or("a slow path's resume point is not bound")?;
                bind(c.a, &mut to_interp)?;
                let mut record = c.a.create_label();
                c.a.lea(rax, qword_ptr(record)).map_err(err)?;
                c.a.jmp(c.thunks.interp_site).map_err(err)?;
                bind(c.a, &mut record)?;
                let site = helpers::Site {
                    insn: &c.insns[k],
                    resume: base + u64::from(resume),
                    next: next.wrapping_sub(c.base) as i64,
                    count: k as u32,
                    from_spill,
                    soft: soft(c.ins[k].mnemonic()),
                    after: match after_state {
                        _ if branch => helpers::SiteFlags::Lazy,
                        Fl::Lazy => helpers::SiteFlags::Lazy,
                        Fl::Host => helpers::SiteFlags::Host,
                        Fl::Spill => helpers::SiteFlags::Spill,
                    },
                    slots: regs.slots(),
                };
                c.a.data(&site.encode());
            }
            Cold::Leave { label, k } => leaves.push((label, k)),
            Cold::ParkedEntry { mut label, head } => {
                bind(c.a, &mut label)?;
                c.materialize(true)?;
                c.a.jmp(head).map_err(err)?;
            }
            Cold::FlagsMiss { mut label, back } => {
                bind(c.a, &mut label)?;
                c.a.call(c.thunks.flags_memo).map_err(err)?;
                c.a.jmp(back).map_err(err)?;
            }
            Cold::Taken {
                mut label,
                target,
                count,
            } => {
                bind(c.a, &mut label)?;
                let total = c.total;
                c.total = count;
                c.exit_to(target, Fl::Spill)?;
                c.total = total;
            }
        }
    }
    // The interp() calls above may have added more leaves.
    for item in std::mem::take(&mut c.cold) {
        if let Cold::Leave { label, k } = item {
            leaves.push((label, k));
        }
    }
    for (mut label, k) in leaves.drain(..) {
        bind(c.a, &mut label)?;
        if k > 0 {
            c.a.add(qword_ptr(r15 + ICOUNT), k as i32).map_err(err)?;
        }
        c.a.jmp(epilogue).map_err(err)?;
    }
    // Target-cache misses and stale code: back to the dispatcher with the
    // flags lazy.
    let mut misses = std::mem::take(&mut c.misses);
    for (mut m, parked) in misses.drain(..) {
        if parked {
            parked_misses.push(m);
        } else {
            bind(c.a, &mut m)?;
        }
    }
    let mut stale_l = stale;
    bind(c.a, &mut stale_l)?;
    c.a.xor(eax, eax).map_err(err)?;
    let mut ep = epilogue;
    bind(c.a, &mut ep)?;
    c.a.jmp(c.thunks.leave).map_err(err)?;
    let mut stale_lazy = stale_head;
    bind(c.a, &mut stale_lazy)?;
    c.a.mov(qword_ptr(r15 + gpr(RIP)), r14).map_err(err)?;
    c.a.jmp(stale).map_err(err)?;
    let mut stale_parked = stale_spill;
    bind(c.a, &mut stale_parked)?;
    c.a.mov(qword_ptr(r15 + gpr(RIP)), r14).map_err(err)?;
    for mut m in parked_misses.drain(..) {
        bind(c.a, &mut m)?;
    }
    c.materialize(true)?;
    c.a.jmp(stale).map_err(err)?;
    // Unchained stubs: record the exit's `jmp` (and the epoch's `mov`)
    // for the dispatcher, whether the flags are parked in `LINK_SPILL`,
    // leave.
    let mut slots = std::mem::take(&mut c.slots);
    for (site, stub, parked, epoch) in slots.iter_mut() {
        bind(c.a, stub)?;
        c.a.lea(rax, qword_ptr(*site)).map_err(err)?;
        if let Some(e) = epoch {
            c.a.lea(rcx, qword_ptr(*e)).map_err(err)?;
        }
        let kind = usize::from(*parked) | usize::from(epoch.is_some()) << 1;
        c.a.jmp(c.thunks.unchained[kind]).map_err(err)?;
    }
    let r = super::asm::assemble(c.a, base)?;
    // The dispatcher patches these at fixed offsets.
    for (site, _, _, epoch) in &slots {
        if r.bytes.get(r.offset(*site)? as usize) != Some(&0xe9) {
            return Err("an exit's jmp is not rel32".into());
        }
        if let Some(e) = epoch
            && r.bytes.get(r.offset(*e)? as usize) != Some(&0xb8)
        {
            return Err("an epoch's mov is not `mov eax, imm32`".into());
        }
    }
    let head = r.offset(head)?;
    let head_spill = r.offset(head_spill)?;
    let bytes = r.bytes;
    if let Some(s) = reused.0.as_mut() {
        slots.clear();
        (s.cold, s.slots, s.misses) = (cold, slots, misses);
        (s.leaves, s.parked) = (leaves, parked_misses);
    }
    // Flags left undefined where the code can leave: a trace's taken
    // branches as well as its end (the end alone let a flag that a later
    // instruction defines, but that was undefined at an earlier exit,
    // count as a difference).
    let (mut undefined, mut at_exits) = (0u32, 0u32);
    for i in ins {
        undefined = (undefined & !(i.rflags_modified() & OSZAPC)) | (i.rflags_undefined() & OSZAPC);
        if i.flow_control() == FlowControl::ConditionalBranch {
            at_exits |= undefined;
        }
    }
    let undefined = undefined | at_exits;
    Ok(Emitted {
        bytes,
        undefined: rflags_bits(undefined),
        head,
        head_spill,
        native,
        fallback,
    })
}

/// Out-of-line routines every translation calls (`call rel32`), emitted
/// once at the start of the arena: what would otherwise be repeated in
/// each block's cold paths.
#[derive(Clone, Copy)]
pub struct Thunks {
    /// Parked flags (EDX) → lazy flags and the memo. Clobbers rax, rcx,
    /// rdx and the host flags.
    pub materialize: u64,
    /// `helpers::flags_bits`: the memo made from the lazy flags. Keeps
    /// every register but rax, rcx, rdx, r10, r11 and the host flags.
    pub flags_memo: u64,
    /// `helpers::fill` for the address in r11 and the kind in eax; ZF
    /// clear if the instruction must go to the interpreter. Keeps rdx and
    /// the registers that hold guest registers; clobbers rax, rcx, r10,
    /// r11 and the host flags.
    pub fill: u64,
    /// `helpers::interp` with the vCPU context as first argument.
    pub interp: u64,
    /// The same for `helpers::interp_soft`.
    pub interp_soft: u64,
    /// Jumped to with a site record in rax (`helpers::Site`), the stack
    /// as in a block's body: the instruction through the interpreter,
    /// then on at the record's resume point with the registers and flags
    /// the code there expects, or out through `leave`.
    pub interp_site: u64,
    /// A block head's attention word (in eax, non-zero) judged: ZF clear
    /// if the dispatcher can act on it now, set if it must wait (an
    /// interrupt while IF=0, an NMI while NMIs are blocked; else the
    /// dispatcher would come straight back). Clobbers eax and the flags.
    pub attention: u64,
    /// Called from Rust (`CodeArena::enter`) with the `Cpu` and a
    /// block's head: builds the frame translated code runs in and jumps
    /// there.
    pub enter: u64,
    /// Jumped to with the exit code in eax: drops the frame (and any
    /// return frames above it) and returns to Rust.
    pub leave: u64,
    /// An unchained exit's way out, jumped to with the exit's `jmp` in
    /// rax (and its epoch's `mov` in rcx): records them for the
    /// dispatcher and leaves. Indexed by kind: bit 0 the flags are
    /// parked, bit 1 there is an epoch. Shared rather than repeated in
    /// each translation (a quarter of a short one's code).
    pub unchained: [u64; 4],
}

impl Thunks {
    /// Assembles the thunks for address `base`: their bytes and entries.
    pub fn assemble(base: u64) -> Result<(Vec<u8>, Thunks), String> {
        let mut a = CodeAssembler::new(64).map_err(err)?;
        let mut materialize = a.create_label();
        let mut flags_memo = a.create_label();
        let mut fill = a.create_label();
        let mut interp = a.create_label();
        let mut interp_soft = a.create_label();
        let mut interp_site = a.create_label();
        let mut enter = a.create_label();
        let mut leave = a.create_label();
        let mut attention = a.create_label();
        // Called from a block's body, where the stack is 16-byte aligned:
        // the return address leaves it 8 off.
        bind(&mut a, &mut materialize)?;
        a.mov(qword_ptr(r15 + MEMO_SPILL), rdx).map_err(err)?;
        // FLAGS_TABLE's index: RFLAGS' CF PF AF ZF SF (from DH), OF in
        // bit 1 (from DL).
        a.movzx(ecx, dh).map_err(err)?;
        a.movzx(eax, dl).map_err(err)?;
        a.and(ecx, 0xd5).map_err(err)?;
        a.lea(eax, rcx + rax * 2).map_err(err)?;
        a.shl(eax, 4).map_err(err)?;
        a.mov(rcx, helpers::FLAGS_TABLE.as_ptr() as u64)
            .map_err(err)?;
        a.mov(rdx, qword_ptr(rcx + rax)).map_err(err)?;
        a.mov(rax, qword_ptr(rcx + rax + 8)).map_err(err)?;
        a.mov(qword_ptr(r15 + RES), rdx).map_err(err)?;
        a.mov(qword_ptr(r15 + AUX), rax).map_err(err)?;
        a.mov(qword_ptr(r15 + MEMO_RES), rdx).map_err(err)?;
        a.mov(qword_ptr(r15 + MEMO_AUX), rax).map_err(err)?;
        a.ret().map_err(err)?;

        bind(&mut a, &mut flags_memo)?;
        Regs::push_clobbered(&mut a)?;
        a.lea(rsp, rsp - 8).map_err(err)?;
        a.mov(rdi, r15).map_err(err)?;
        a.mov(rax, helpers::flags_bits as *const () as u64)
            .map_err(err)?;
        a.call(rax).map_err(err)?;
        a.lea(rsp, rsp + 8).map_err(err)?;
        Regs::pop_clobbered(&mut a)?;
        a.ret().map_err(err)?;

        // Keeps the guest registers held in call-clobbered host registers
        // too: a block's slow path need not store and reload them.
        bind(&mut a, &mut fill)?;
        Regs::push_clobbered(&mut a)?;
        a.mov(qword_ptr(r15 + SPILL), rdx).map_err(err)?;
        a.mov(edx, eax).map_err(err)?;
        a.mov(rdi, r15).map_err(err)?;
        a.mov(rsi, r11).map_err(err)?;
        a.lea(rsp, rsp - 8).map_err(err)?;
        a.mov(rax, helpers::fill as *const () as u64).map_err(err)?;
        a.call(rax).map_err(err)?;
        a.lea(rsp, rsp + 8).map_err(err)?;
        a.mov(rdx, qword_ptr(r15 + SPILL)).map_err(err)?;
        Regs::pop_clobbered(&mut a)?;
        a.test(eax, eax).map_err(err)?;
        a.ret().map_err(err)?;

        // A tail call: `helpers::interp` returns straight to the block.
        bind(&mut a, &mut interp)?;
        a.mov(rdi, r15).map_err(err)?;
        a.mov(rax, helpers::interp as *const () as u64)
            .map_err(err)?;
        a.jmp(rax).map_err(err)?;
        bind(&mut a, &mut interp_soft)?;
        a.mov(rdi, r15).map_err(err)?;
        a.mov(rax, helpers::interp_soft as *const () as u64)
            .map_err(err)?;
        a.jmp(rax).map_err(err)?;

        // The frame `helpers::interp_site` reads and rewrites
        // (`helpers::SITE_FRAME`): RDX, the guest-holding registers, the
        // record; ten words keep the stack 16-byte aligned for the call.
        bind(&mut a, &mut interp_site)?;
        a.push(rdx).map_err(err)?;
        for r in HOST {
            a.push(get_gpr64(r).ok_or("no 64-bit register")?)
                .map_err(err)?;
        }
        a.push(rax).map_err(err)?;
        a.mov(rdi, r15).map_err(err)?;
        a.mov(rsi, rax).map_err(err)?;
        a.mov(rdx, rsp).map_err(err)?;
        a.mov(rcx, r14).map_err(err)?;
        a.mov(rax, helpers::interp_site as *const () as u64)
            .map_err(err)?;
        a.call(rax).map_err(err)?;
        // rax: where to go on (0: leave with the code in rdx).
        let mut site_leave = a.create_label();
        a.test(rax, rax).map_err(err)?;
        a.jz(site_leave).map_err(err)?;
        a.mov(r11, rax).map_err(err)?;
        a.pop(rax).map_err(err)?;
        for r in HOST.iter().rev() {
            a.pop(get_gpr64(*r).ok_or("no 64-bit register")?)
                .map_err(err)?;
        }
        a.pop(rdx).map_err(err)?;
        // The flags in the host RFLAGS, from the memo the helper made
        // (harmless where the code there keeps them elsewhere).
        a.mov(eax, dword_ptr(r15 + MEMO_SPILL)).map_err(err)?;
        a.add(al, 0x7f).map_err(err)?;
        a.sahf().map_err(err)?;
        a.jmp(r11).map_err(err)?;
        bind(&mut a, &mut site_leave)?;
        a.mov(eax, edx).map_err(err)?;
        a.jmp(leave).map_err(err)?;

        bind(&mut a, &mut enter)?;
        for r in SAVED {
            a.push(r).map_err(err)?;
        }
        a.mov(rax, NO_RETURN).map_err(err)?;
        for _ in 0..3 {
            a.push(rax).map_err(err)?;
        }
        a.mov(r15, rdi).map_err(err)?;
        a.mov(qword_ptr(r15 + HOST_SP), rsp).map_err(err)?;
        a.lea(rax, rsp - RAS_BYTES).map_err(err)?;
        a.mov(qword_ptr(r15 + RAS_FLOOR), rax).map_err(err)?;
        a.mov(r14, qword_ptr(r15 + gpr(RIP))).map_err(err)?;
        a.jmp(rsi).map_err(err)?;
        bind(&mut a, &mut leave)?;
        a.mov(rsp, qword_ptr(r15 + HOST_SP)).map_err(err)?;
        a.lea(rsp, rsp + 24).map_err(err)?;
        for r in SAVED.iter().rev() {
            a.pop(*r).map_err(err)?;
        }
        a.ret().map_err(err)?;

        bind(&mut a, &mut attention)?;
        {
            use crate::platform::signal::{IRQ, NMI};
            let mut act = a.create_label();
            let mut no_irq = a.create_label();
            let mut wait = a.create_label();
            a.test(eax, !(IRQ | NMI)).map_err(err)?;
            a.jnz(act).map_err(err)?;
            a.test(eax, IRQ).map_err(err)?;
            a.jz(no_irq).map_err(err)?;
            a.test(dword_ptr(r15 + RFLAGS), crate::cpu::flags::IF as u32)
                .map_err(err)?;
            a.jnz(act).map_err(err)?;
            bind(&mut a, &mut no_irq)?;
            a.test(eax, NMI).map_err(err)?;
            a.jz(wait).map_err(err)?;
            a.cmp(byte_ptr(r15 + NMI_BLOCKED), 0).map_err(err)?;
            a.jne(wait).map_err(err)?;
            bind(&mut a, &mut act)?;
            // eax is non-zero here: ZF clear.
            a.test(eax, eax).map_err(err)?;
            a.ret().map_err(err)?;
            bind(&mut a, &mut wait)?;
            a.xor(eax, eax).map_err(err)?;
            a.ret().map_err(err)?;
        }

        // Unchained exits (see `unchained`); the stack is the block
        // body's, as `materialize` expects.
        let mut unchained: [CodeLabel; 4] = std::array::from_fn(|_| a.create_label());
        for (kind, label) in unchained.iter_mut().enumerate() {
            bind(&mut a, label)?;
            a.mov(qword_ptr(r15 + gpr(RIP)), r14).map_err(err)?;
            a.mov(qword_ptr(r15 + LINK), rax).map_err(err)?;
            if kind & 2 != 0 {
                a.mov(qword_ptr(r15 + LINK_EPOCH), rcx).map_err(err)?;
            } else {
                a.mov(qword_ptr(r15 + LINK_EPOCH), 0).map_err(err)?;
            }
            a.mov(qword_ptr(r15 + LINK_SPILL), (kind & 1) as i32)
                .map_err(err)?;
            if kind & 1 == 1 {
                a.call(materialize).map_err(err)?;
            }
            a.xor(eax, eax).map_err(err)?;
            a.jmp(leave).map_err(err)?;
        }

        let r = super::asm::assemble(&mut a, base)?;
        let mut unchained_at = [0u64; 4];
        for (at, label) in unchained_at.iter_mut().zip(unchained) {
            *at = base + r.offset(label)?;
        }
        let t = Thunks {
            enter: base + r.offset(enter)?,
            leave: base + r.offset(leave)?,
            materialize: base + r.offset(materialize)?,
            flags_memo: base + r.offset(flags_memo)?,
            fill: base + r.offset(fill)?,
            interp: base + r.offset(interp)?,
            interp_soft: base + r.offset(interp_soft)?,
            interp_site: base + r.offset(interp_site)?,
            attention: base + r.offset(attention)?,
            unchained: unchained_at,
        };
        Ok((r.bytes, t))
    }
}

/// A translation's entry checks. Stale code (its page was written) or something for the dispatcher (a
/// kick, an interrupt it can take) jumps to `stale` before the first
/// instruction. Clobbers rax and the host flags (EDX survives).
fn head_checks(
    a: &mut CodeAssembler,
    (gen_word, gen_expected): (u64, u32),
    attention: u64,
    thunks: &Thunks,
    stale: CodeLabel,
) -> Result<(), String> {
    a.mov(rax, gen_word).map_err(err)?;
    a.cmp(dword_ptr(rax), gen_expected).map_err(err)?;
    a.jne(stale).map_err(err)?;
    a.mov(rax, attention).map_err(err)?;
    a.mov(eax, dword_ptr(rax)).map_err(err)?;
    a.test(eax, eax).map_err(err)?;
    let mut ok = a.create_label();
    a.jz(ok).map_err(err)?;
    a.call(thunks.attention).map_err(err)?;
    a.jnz(stale).map_err(err)?;
    bind(a, &mut ok)
}

/// Whether the block's body wants the guest flags lazy at entry (its
/// first use of them is the interpreter's) or parked in EDX, if `i`
/// (planned `p`) decides it: `None` when it leaves them alone.
fn entry_flags(i: &Instruction, p: Plan) -> Option<bool> {
    let (read, written) = flag_use(i);
    match p {
        Plan::Interp => Some(true),
        Plan::Nop | Plan::Lea => None,
        Plan::Rewrite | Plan::Mul | Plan::Sse if read == 0 && written == 0 => None,
        _ => Some(false),
    }
}

/// `lea`: the address arithmetic straight into the destination's host
/// register (no flags).
fn emit_lea(c: &mut Ctx, i: &Instruction) -> Result<(), String> {
    let dst = i.op0_register();
    let h = c.host(dst)?;
    let h32 = get_gpr32(sized(h.into(), 4)).ok_or("lea destination")?;
    c.address_offset(i, h, h32, dst.is_gpr32())?;
    c.regs.changed(dst.full_register().number());
    Ok(())
}

/// `push r64`, `push imm`, or the return address of `call rel32`.
fn emit_push(c: &mut Ctx, i: &Instruction, next: u64, slow: CodeLabel) -> Result<(), String> {
    let stack = c.host(Register::RSP)?;
    c.a.lea(r11, stack - 8).map_err(err)?;
    c.tlb_check(8, true, slow)?;
    match i.code() {
        Code::Push_r64 => {
            // `push rsp` stores the old value: RSP changes below.
            let v = c.host(i.op0_register())?;
            c.a.mov(qword_ptr(r11), v).map_err(err)?;
        }
        Code::Call_rel32_64 | Code::Call_rm64 => {
            // (rcx: the return address; a `call [mem]` target is stored.)
            let d = c.rel(next)?;
            c.a.lea(rcx, r14 + d).map_err(err)?;
            c.a.mov(qword_ptr(r11), rcx).map_err(err)?;
        }
        _ => {
            c.a.mov(qword_ptr(r11), i.immediate(0) as i64 as i32)
                .map_err(err)?;
        }
    }
    c.a.lea(stack, stack - 8).map_err(err)?;
    c.regs.changed(RSP);
    Ok(())
}

/// `pop r64`, or `ret` (RIP from the stack, non-canonical → interpreter).
fn emit_pop(
    c: &mut Ctx,
    i: &Instruction,
    slow: CodeLabel,
    to_interp: CodeLabel,
    ret: bool,
) -> Result<(), String> {
    let stack = c.host(Register::RSP)?;
    c.a.mov(r11, stack).map_err(err)?;
    c.tlb_check(8, false, slow)?;
    c.a.mov(rcx, qword_ptr(r11)).map_err(err)?;
    if ret {
        c.a.mov(rax, rcx).map_err(err)?;
        c.a.shl(rax, 16).map_err(err)?;
        c.a.sar(rax, 16).map_err(err)?;
        c.a.cmp(rax, rcx).map_err(err)?;
        c.a.jne(to_interp).map_err(err)?;
    }
    c.a.lea(stack, stack + 8).map_err(err)?;
    c.regs.changed(RSP);
    if ret {
        c.a.mov(qword_ptr(r15 + gpr(RIP)), rcx).map_err(err)?;
    } else {
        // `pop rsp` ends with the popped value.
        let d = c.host(i.op0_register())?;
        c.a.mov(d, rcx).map_err(err)?;
        c.regs.changed(i.op0_register().number());
    }
    Ok(())
}

/// The ModRM form of an accumulator-only encoding (`add al, imm8` →
/// `add r/m8, imm8`), if `i` uses one.
fn accumulator_form(i: &Instruction) -> Option<Code> {
    use Code as C;
    use Mnemonic as M;
    let size = i.op0_register().size();
    let acc = i.op_code().op0_kind();
    let imm = matches!(
        acc,
        iced_x86::OpCodeOperandKind::al
            | iced_x86::OpCodeOperandKind::ax
            | iced_x86::OpCodeOperandKind::eax
            | iced_x86::OpCodeOperandKind::rax
    );
    if imm {
        let forms: [C; 4] = match i.mnemonic() {
            M::Add => [
                C::Add_rm8_imm8,
                C::Add_rm16_imm16,
                C::Add_rm32_imm32,
                C::Add_rm64_imm32,
            ],
            M::Or => [
                C::Or_rm8_imm8,
                C::Or_rm16_imm16,
                C::Or_rm32_imm32,
                C::Or_rm64_imm32,
            ],
            M::Adc => [
                C::Adc_rm8_imm8,
                C::Adc_rm16_imm16,
                C::Adc_rm32_imm32,
                C::Adc_rm64_imm32,
            ],
            M::Sbb => [
                C::Sbb_rm8_imm8,
                C::Sbb_rm16_imm16,
                C::Sbb_rm32_imm32,
                C::Sbb_rm64_imm32,
            ],
            M::And => [
                C::And_rm8_imm8,
                C::And_rm16_imm16,
                C::And_rm32_imm32,
                C::And_rm64_imm32,
            ],
            M::Sub => [
                C::Sub_rm8_imm8,
                C::Sub_rm16_imm16,
                C::Sub_rm32_imm32,
                C::Sub_rm64_imm32,
            ],
            M::Xor => [
                C::Xor_rm8_imm8,
                C::Xor_rm16_imm16,
                C::Xor_rm32_imm32,
                C::Xor_rm64_imm32,
            ],
            M::Cmp => [
                C::Cmp_rm8_imm8,
                C::Cmp_rm16_imm16,
                C::Cmp_rm32_imm32,
                C::Cmp_rm64_imm32,
            ],
            M::Test => [
                C::Test_rm8_imm8,
                C::Test_rm16_imm16,
                C::Test_rm32_imm32,
                C::Test_rm64_imm32,
            ],
            _ => return None,
        };
        return match size {
            1 => Some(forms[0]),
            2 => Some(forms[1]),
            4 => Some(forms[2]),
            8 => Some(forms[3]),
            _ => None,
        };
    }
    match i.code() {
        C::Xchg_r16_AX => Some(C::Xchg_rm16_r16),
        C::Xchg_r32_EAX => Some(C::Xchg_rm32_r32),
        C::Xchg_r64_RAX => Some(C::Xchg_rm64_r64),
        _ => None,
    }
}

/// Points `n`'s memory operand at `[r11]`, where the TLB check left the
/// host address (segment and displacement already applied).
fn host_memory_operand(n: &mut Instruction) {
    n.set_memory_base(Register::R11);
    n.set_memory_index(Register::None);
    n.set_memory_index_scale(1);
    n.set_memory_displacement64(0);
    n.set_memory_displ_size(0);
    n.set_segment_prefix(Register::None);
}

/// One-operand `mul`/`imul`: guest rAX (and rDX) through the host's,
/// the operand from its host register or `[r11]`.
fn emit_mul(c: &mut Ctx, i: &Instruction, slow: CodeLabel) -> Result<(), String> {
    let size = i.memory_size().size().max(i.op0_register().size());
    if i.op0_kind() == OpKind::Memory {
        c.effective_address(i)?;
        c.tlb_check(size as u64, false, slow)?;
    }
    let acc = c.host(Register::RAX)?;
    c.a.mov(rax, acc).map_err(err)?;
    let operand = i.op0_register().full_register();
    // DX:AX merges into rDX; `mul rdx` reads it.
    if size == 2 || (i.op0_kind() == OpKind::Register && operand == Register::RDX) {
        let d = c.host(Register::RDX)?;
        c.a.mov(rdx, d).map_err(err)?;
    }
    let mut n = *i;
    if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        let h = match operand {
            Register::RAX | Register::RDX => operand,
            _ => c.host(r)?.into(),
        };
        n.set_op0_register(sized(h, r.size()));
    } else {
        host_memory_operand(&mut n);
    }
    add_guest_instruction(c, n)?;
    c.a.mov(acc, rax).map_err(err)?;
    c.regs.changed(Register::RAX.number());
    if size > 1 {
        let d = c.host(Register::RDX)?;
        c.a.mov(d, rdx).map_err(err)?;
        c.regs.changed(Register::RDX.number());
    }
    Ok(())
}

/// iced's `RflagsBits` as RFLAGS bit positions.
fn rflags_bits(f: u32) -> u64 {
    use crate::cpu::flags as x;
    [
        (RflagsBits::CF, x::CF),
        (RflagsBits::PF, x::PF),
        (RflagsBits::AF, x::AF),
        (RflagsBits::ZF, x::ZF),
        (RflagsBits::SF, x::SF),
        (RflagsBits::OF, x::OF),
    ]
    .iter()
    .filter(|(i, _)| f & i != 0)
    .fold(0, |acc, (_, b)| acc | b)
}

/// The access may write its operand.
fn writes(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
    )
}

/// Adds a guest instruction rewritten onto host operands.
fn add_guest_instruction(c: &mut Ctx, mut n: Instruction) -> Result<(), String> {
    // A guest instruction's IP would read as a label id.
    n.set_ip(0);
    c.a.add_instruction(n).map_err(err)
}

/// Notes the guest registers an instruction may write (stored back
/// later).
fn note_written_gprs(c: &mut Ctx, info: &iced_x86::InstructionInfo) {
    for u in info.used_registers() {
        let r = u.register();
        if r.is_gpr() && writes(u.access()) {
            c.regs.changed(r.full_register().number());
        }
    }
}

fn mem_kind(ins: &Instruction, info: &iced_x86::InstructionInfo) -> u64 {
    let n = ins.memory_size().size() as u64;
    let write = info.used_memory().iter().any(|m| writes(m.access()));
    n | if write { 0x100 } else { 0 }
}

fn emit_jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> Result<(), String> {
    use ConditionCode as C;
    match cc {
        C::o => a.jo(l),
        C::no => a.jno(l),
        C::b => a.jb(l),
        C::ae => a.jae(l),
        C::e => a.je(l),
        C::ne => a.jne(l),
        C::be => a.jbe(l),
        C::a => a.ja(l),
        C::s => a.js(l),
        C::ns => a.jns(l),
        C::p => a.jp(l),
        C::np => a.jnp(l),
        C::l => a.jl(l),
        C::ge => a.jge(l),
        C::le => a.jle(l),
        C::g => a.jg(l),
        C::None => return Err("jcc without condition".into()),
    }
    .map_err(err)
}

/// The guest instruction itself on host registers.
/// An ALU instruction on a high-byte register and an immediate: the
/// guest register (held in a host register without a high-byte form) is
/// copied to RAX, the instruction runs on AH, a result goes back.
fn emit_high8(c: &mut Ctx, i: &Instruction, unspill: bool) -> Result<(), String> {
    let r = i.op0_register();
    let full = r.full_register();
    let h = c.host(full)?;
    // RAX is free here: parked flags are in EDX, and `mov` keeps host
    // flags. The plan takes only instructions that write all six flags
    // or none, so they never need restoring first.
    if unspill {
        return Err("high-byte form that reads the flags".into());
    }
    c.a.mov(rax, h).map_err(err)?;
    // The guest register's bits 8-15 are now AH's.
    let byte = Register::AH;
    let mut n = *i;
    n.set_op0_register(byte);
    add_guest_instruction(c, n)?;
    if !matches!(i.mnemonic(), Mnemonic::Test | Mnemonic::Cmp) {
        c.a.mov(h, rax).map_err(err)?;
        c.regs.changed(full.number());
    }
    Ok(())
}

/// Offset of guest XMM register `n` in `Cpu`.
fn xmm(n: usize) -> i32 {
    off(offset_of!(Cpu, fpu) + offset_of!(crate::cpu::fpu::Fpu, xmm) + 16 * n)
}

/// An integer SSE instruction: its XMM operands loaded into host
/// XMM0-2 (all XMM registers are call-clobbered: nothing else keeps
/// guest values there), the instruction itself on them, the written
/// ones stored back. What would fault (#UD/#NM when SSE is off, #GP for
/// a misaligned 16-byte operand) goes to the interpreter, which raises it.
fn emit_sse(
    c: &mut Ctx,
    i: &Instruction,
    info: &iced_x86::InstructionInfo,
    slow: CodeLabel,
    to_interp: CodeLabel,
) -> Result<(), String> {
    use crate::cpu::{CR0_EM, CR0_TS, CR4_OSFXSR};
    if !c.sse_checked {
        let a = &mut c.a;
        a.test(dword_ptr(r15 + CR0), (CR0_EM | CR0_TS) as u32)
            .map_err(err)?;
        a.jnz(to_interp).map_err(err)?;
        a.test(dword_ptr(r15 + CR4), CR4_OSFXSR as u32)
            .map_err(err)?;
        a.jz(to_interp).map_err(err)?;
        c.sse_checked = true;
    }
    let has_mem = (0..i.op_count()).any(|o| i.op_kind(o) == OpKind::Memory);
    if has_mem {
        c.effective_address(i)?;
        let kind = mem_kind(i, info);
        let unaligned_ok = matches!(
            i.mnemonic(),
            Mnemonic::Movdqu | Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Pcmpistri
        );
        if kind & 0xff == 16 && !unaligned_ok {
            c.a.test(r11b, 15).map_err(err)?;
            c.a.jnz(to_interp).map_err(err)?;
        }
        c.tlb_check(kind & 0xff, kind & 0x100 != 0, slow)?;
    }
    const HOST_XMM: [AsmRegisterXmm; 3] = [xmm0, xmm1, xmm2];
    let mut n = *i;
    let mut stores = Vec::new();
    for o in 0..i.op_count() {
        match i.op_kind(o) {
            OpKind::Register if i.op_register(o).is_xmm() => {
                let g = i.op_register(o).number();
                let h = HOST_XMM[o as usize];
                c.a.movdqu(h, xmmword_ptr(r15 + xmm(g))).map_err(err)?;
                n.set_op_register(o, h.into());
                if writes(info.op_access(o)) {
                    stores.push((g, h));
                }
            }
            OpKind::Register => {
                let r = i.op_register(o);
                let h = c.host(r)?;
                n.set_op_register(o, sized(h.into(), r.size()));
            }
            OpKind::Memory => host_memory_operand(&mut n),
            _ => {}
        }
    }
    add_guest_instruction(c, n)?;
    for (g, h) in stores {
        c.a.movdqu(xmmword_ptr(r15 + xmm(g)), h).map_err(err)?;
    }
    if i.mnemonic() == Mnemonic::Pcmpistri {
        // The host's ECX (scratch) has the index; writing the 32-bit
        // register clears the upper half, as the instruction does.
        let h = c.host(Register::RCX)?;
        let h32 = get_gpr32(sized(h.into(), 4)).ok_or("no 32-bit form")?;
        c.a.mov(h32, ecx).map_err(err)?;
    }
    note_written_gprs(c, info);
    Ok(())
}

fn emit_rewrite(
    c: &mut Ctx,
    i: &Instruction,
    info: &iced_x86::InstructionInfo,
    slow: CodeLabel,
    unspill: bool,
) -> Result<(), String> {
    let has_mem = (0..i.op_count()).any(|o| i.op_kind(o) == OpKind::Memory);
    if has_mem {
        c.effective_address(i)?;
        let kind = mem_kind(i, info);
        c.tlb_check(kind & 0xff, kind & 0x100 != 0, slow)?;
    }
    // A shift count in CL must be in the host's CL.
    let cl_count = matches!(
        i.mnemonic(),
        Mnemonic::Shl | Mnemonic::Shr | Mnemonic::Sar | Mnemonic::Rol | Mnemonic::Ror
    ) && i.op_count() == 2
        && i.op1_kind() == OpKind::Register
        && i.op1_register() == Register::CL;
    if cl_count {
        let h = c.host(Register::RCX)?;
        c.a.mov(rcx, h).map_err(err)?;
    }
    if unspill {
        c.unspill()?;
    }
    let mut n = *i;
    // moffs forms take only an absolute address: use the ModRM form.
    let modrm = match i.code() {
        Code::Mov_AL_moffs8 => Some(Code::Mov_r8_rm8),
        Code::Mov_AX_moffs16 => Some(Code::Mov_r16_rm16),
        Code::Mov_EAX_moffs32 => Some(Code::Mov_r32_rm32),
        Code::Mov_RAX_moffs64 => Some(Code::Mov_r64_rm64),
        Code::Mov_moffs8_AL => Some(Code::Mov_rm8_r8),
        Code::Mov_moffs16_AX => Some(Code::Mov_rm16_r16),
        Code::Mov_moffs32_EAX => Some(Code::Mov_rm32_r32),
        Code::Mov_moffs64_RAX => Some(Code::Mov_rm64_r64),
        _ => None,
    };
    // Accumulator short forms (`test eax, imm32`, `xchg r32, eax`) name
    // rAX implicitly; the guest's rAX is in another host register, so use
    // the general ModRM form.
    let modrm = modrm.or_else(|| accumulator_form(i));
    if let Some(code) = modrm {
        n.set_code(code);
    }
    for o in 0..i.op_count() {
        match i.op_kind(o) {
            OpKind::Register if cl_count && o == 1 => {}
            OpKind::Register => {
                let r = i.op_register(o);
                let h = c.host(r)?;
                n.set_op_register(o, sized(h.into(), r.size()));
            }
            OpKind::Memory => {
                host_memory_operand(&mut n);
            }
            _ => {}
        }
    }
    add_guest_instruction(c, n)?;
    note_written_gprs(c, info);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    /// Compiles `code` (64-bit, at 0x40_0000) as one block.
    fn compile_bytes(code: &[u8]) -> Emitted {
        let t = crate::decode::table::table();
        let ins: Vec<Instruction> = Decoder::with_ip(64, code, 0x40_0000, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let insns: Vec<Insn> = ins.iter().map(|i| Insn::build(i, t.resolve(i).0)).collect();
        let word = 0u32;
        let addr = &word as *const u32 as u64;
        let (_, thunks) = Thunks::assemble(0x6fff_0000).expect("thunks");
        compile(&ins, &insns, (addr, 0), addr, 0x7000_0000, true, &thunks).expect("compiles")
    }

    /// A flag undefined at a trace's taken branch stays out of the
    /// co-simulation's comparison even if the trace defines it later.
    #[test]
    fn flags_undefined_at_a_taken_exit_are_undefined_for_the_trace() {
        // and r9d,7 (AF undefined); jne +0; add eax,ebx (AF defined)
        let e = compile_bytes(&[0x41, 0x83, 0xe1, 0x07, 0x75, 0x00, 0x01, 0xd8]);
        assert_ne!(e.undefined & 0x10, 0, "AF: {:#x}", e.undefined);
        // Without the branch, the add's AF is the trace's.
        let e = compile_bytes(&[0x41, 0x83, 0xe1, 0x07, 0x01, 0xd8]);
        assert_eq!(e.undefined & 0x10, 0, "AF: {:#x}", e.undefined);
    }

    #[test]
    fn accumulator_short_forms_are_translated_on_any_host_register() {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        // The short forms iced picks for rAX with an immediate, and xchg
        // with rAX: each must become the ModRM form on the host register
        // that holds the guest's rAX.
        a.test(eax, 0x8_0000).unwrap();
        a.add(al, 1).unwrap();
        a.and(rax, -1024).unwrap();
        a.cmp(ax, 0x1234).unwrap();
        a.xchg(ecx, eax).unwrap();
        a.sub(rax, 7).unwrap();
        a.ret().unwrap();
        let bytes = a.assemble(0x40_0000).unwrap();
        let mut d = Decoder::with_ip(64, &bytes, 0x40_0000, DecoderOptions::NONE);
        assert_eq!(
            d.decode().code(),
            Code::Test_EAX_imm32,
            "the test needs the short form"
        );
        let e = compile_bytes(&bytes);
        assert_eq!((e.native, e.fallback), (7, 0));
    }
}
