//! Decode-time fusion of a compare with the conditional branch after it
//! (`cmp/test r, r|imm` + `jcc`): one dispatch instead of two for the
//! loop tails every compiler emits. The flags are still written, so the
//! pair is architecturally the same; under single-step only the compare
//! runs and the branch is decoded again on its own.

use iced_x86::{Code, ConditionCode, FlowControl, Instruction, OpKind};

use super::Insn;
use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W32, W64, Width};

/// cmp (`TEST` false) or test of r0 with r1 (`IMM` false) or the
/// immediate, then the branch `CC` by `imm2` relative to the pair's end.
fn cmp_jcc<W: Width, const TEST: bool, const IMM: bool, const CC: u8>(
    cpu: &mut Cpu,
    i: &Insn,
) -> Res {
    let a = W::get(&cpu.gpr, i.r0);
    let b = if IMM {
        i.imm & W::MASK
    } else {
        W::get(&cpu.gpr, i.r1)
    };
    if TEST {
        cpu.flags.logic::<W>(a & b);
    } else {
        cpu.flags.sub::<W>(a, b, a.wrapping_sub(b) & W::MASK);
    }
    let end = cpu.rip();
    if cpu.stop {
        // Set before the block only on the precise path (single step,
        // guest or debugger breakpoints): stop after the compare; the
        // branch runs alone.
        // `r2` is the compare's length: the branch starts r2 bytes in.
        let first = end.wrapping_sub(u64::from(i.len - i.r2)) & cpu.ip_mask;
        cpu.set_rip(first);
        return Ok(());
    }
    if cpu.flags.cond(CC) {
        let t = end.wrapping_add(i.imm2)
            & if W::BITS == 64 || cpu.bits == 64 {
                u64::MAX
            } else {
                cpu.ip_mask
            };
        if cpu.mode == crate::cpu::Mode::Long {
            if ((t as i64) << 16 >> 16) as u64 != t {
                return Err(Fault::gp(0));
            }
        } else if t > u64::from(cpu.seg[crate::cpu::CS].limit) {
            return Err(Fault::gp(0));
        }
        cpu.set_rip(t);
    }
    Ok(())
}

type Fused = fn(&mut Cpu, &Insn) -> Res;

macro_rules! by_cc {
    ($w:ty, $test:literal, $imm:literal, $cc:expr) => {
        match $cc {
            0 => cmp_jcc::<$w, $test, $imm, 0> as Fused,
            1 => cmp_jcc::<$w, $test, $imm, 1>,
            2 => cmp_jcc::<$w, $test, $imm, 2>,
            3 => cmp_jcc::<$w, $test, $imm, 3>,
            4 => cmp_jcc::<$w, $test, $imm, 4>,
            5 => cmp_jcc::<$w, $test, $imm, 5>,
            6 => cmp_jcc::<$w, $test, $imm, 6>,
            7 => cmp_jcc::<$w, $test, $imm, 7>,
            8 => cmp_jcc::<$w, $test, $imm, 8>,
            9 => cmp_jcc::<$w, $test, $imm, 9>,
            10 => cmp_jcc::<$w, $test, $imm, 10>,
            11 => cmp_jcc::<$w, $test, $imm, 11>,
            12 => cmp_jcc::<$w, $test, $imm, 12>,
            13 => cmp_jcc::<$w, $test, $imm, 13>,
            14 => cmp_jcc::<$w, $test, $imm, 14>,
            _ => cmp_jcc::<$w, $test, $imm, 15>,
        }
    };
}

fn cc_index(c: ConditionCode) -> Option<u8> {
    Some(match c {
        ConditionCode::o => 0,
        ConditionCode::no => 1,
        ConditionCode::b => 2,
        ConditionCode::ae => 3,
        ConditionCode::e => 4,
        ConditionCode::ne => 5,
        ConditionCode::be => 6,
        ConditionCode::a => 7,
        ConditionCode::s => 8,
        ConditionCode::ns => 9,
        ConditionCode::p => 10,
        ConditionCode::np => 11,
        ConditionCode::l => 12,
        ConditionCode::ge => 13,
        ConditionCode::le => 14,
        ConditionCode::g => 15,
        ConditionCode::None => return None,
    })
}

/// The fused form of `first` + `jcc`, if the pair qualifies.
pub fn fuse(first: &Insn, first_ins: &Instruction, jcc: &Instruction) -> Option<Insn> {
    if jcc.flow_control() != FlowControl::ConditionalBranch
        || !matches!(jcc.op0_kind(), OpKind::NearBranch32 | OpKind::NearBranch64)
    {
        return None;
    }
    let cc = cc_index(jcc.condition_code())?;
    let (w64, test, imm) = match first_ins.code() {
        Code::Cmp_rm32_imm8 | Code::Cmp_rm32_imm32 | Code::Cmp_EAX_imm32 => (false, false, true),
        Code::Cmp_rm64_imm8 | Code::Cmp_rm64_imm32 | Code::Cmp_RAX_imm32 => (true, false, true),
        Code::Cmp_rm32_r32 | Code::Cmp_r32_rm32 => (false, false, false),
        Code::Cmp_rm64_r64 | Code::Cmp_r64_rm64 => (true, false, false),
        Code::Test_rm32_r32 => (false, true, false),
        Code::Test_rm64_r64 => (true, true, false),
        _ => return None,
    };
    // Register operands only (memory forms keep their own handlers).
    if (0..first_ins.op_count()).any(|k| first_ins.op_kind(k) == OpKind::Memory) {
        return None;
    }
    let exec = match (w64, test, imm) {
        (false, false, true) => by_cc!(W32, false, true, cc),
        (true, false, true) => by_cc!(W64, false, true, cc),
        (false, false, false) => by_cc!(W32, false, false, cc),
        (true, false, false) => by_cc!(W64, false, false, cc),
        (false, true, _) => by_cc!(W32, true, false, cc),
        (true, true, _) => by_cc!(W64, true, false, cc),
    };
    let mut f = first.clone();
    f.exec = exec;
    f.len = first.len + jcc.len() as u8;
    // r2: the compare's length (single-step splits the pair again).
    f.r2 = first.len;
    f.imm2 = jcc.near_branch_target().wrapping_sub(jcc.next_ip());
    Some(f)
}
