//! Data movement: full-register moves (aligned, unaligned, non-temporal),
//! scalar and half-register moves, duplicates, movd/movq between GPRs,
//! memory, MMX and XMM, masked stores, and the sign-mask extractions.

use super::{Mm, Space, Xmm, load128, rm, sse_mm_ok, sse_ok, store128};
use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::width::{W8, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::mem::access::via_seg;

const LO: u128 = u64::MAX as u128;

/// `movaps`/`movdqa`/`movups`/`lddqu… xmm, xmm/m128`.
fn load<const ALIGN: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = if MEM {
        load128::<ALIGN>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    Xmm::set(cpu, i.r0, v);
    Ok(())
}

/// `movaps`/`movntdq`/`movups… xmm/m128, xmm`.
fn store<const ALIGN: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = Xmm::get(cpu, i.r1);
    if MEM {
        store128::<ALIGN>(cpu, i, v)
    } else {
        Xmm::set(cpu, i.r0, v);
        Ok(())
    }
}

/// `movss`/`movsd xmm, xmm/m` (`W` = the scalar): a register source
/// merges into the low lane, a memory source zeroes the rest.
fn scalar_load<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let mask = u128::from(W::MASK);
    let r = if MEM {
        u128::from(cpu.read_mem::<W>(i)?)
    } else {
        (Xmm::get(cpu, i.r0) & !mask) | (Xmm::get(cpu, i.r1) & mask)
    };
    Xmm::set(cpu, i.r0, r);
    Ok(())
}

/// `movss`/`movsd xmm/m, xmm`.
fn scalar_store<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let mask = u128::from(W::MASK);
    let v = Xmm::get(cpu, i.r1);
    if MEM {
        cpu.write_mem::<W>(i, v as u64)
    } else {
        let r = (Xmm::get(cpu, i.r0) & !mask) | (v & mask);
        Xmm::set(cpu, i.r0, r);
        Ok(())
    }
}

/// `movlps`/`movlpd` (`HIGH` = false) and `movhps`/`movhpd xmm, m64`.
fn half_load<const HIGH: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let m = u128::from(cpu.read_mem::<W64>(i)?);
    let a = Xmm::get(cpu, i.r0);
    Xmm::set(
        cpu,
        i.r0,
        if HIGH {
            (a & LO) | m << 64
        } else {
            (a & !LO) | m
        },
    );
    Ok(())
}

/// `movlps`/`movhps… m64, xmm`.
fn half_store<const HIGH: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = Xmm::get(cpu, i.r1);
    cpu.write_mem::<W64>(i, if HIGH { (v >> 64) as u64 } else { v as u64 })
}

/// `movhlps xmm1, xmm2`: low half of xmm1 = high half of xmm2.
fn movhlps(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let (a, b) = (Xmm::get(cpu, i.r0), Xmm::get(cpu, i.r1));
    Xmm::set(cpu, i.r0, (a & !LO) | b >> 64);
    Ok(())
}

/// `movlhps xmm1, xmm2`: high half of xmm1 = low half of xmm2.
fn movlhps(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let (a, b) = (Xmm::get(cpu, i.r0), Xmm::get(cpu, i.r1));
    Xmm::set(cpu, i.r0, (a & LO) | b << 64);
    Ok(())
}

/// `movddup xmm, xmm/m64`.
fn movddup<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = if MEM {
        u128::from(cpu.read_mem::<W64>(i)?)
    } else {
        Xmm::get(cpu, i.r1) & LO
    };
    Xmm::set(cpu, i.r0, v | v << 64);
    Ok(())
}

/// `movshdup` (`ODD`) / `movsldup xmm, xmm/m128`: duplicate the odd or
/// even dwords.
fn movsdup<const ODD: bool, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = if MEM {
        load128::<true>(cpu, i)?
    } else {
        Xmm::get(cpu, i.r1)
    };
    let pick = |k: u32| (v >> (64 * k + if ODD { 32 } else { 0 })) & 0xffff_ffff;
    let (l, h) = (pick(0), pick(1));
    Xmm::set(cpu, i.r0, l | l << 32 | h << 64 | h << 96);
    Ok(())
}

/// `movd`/`movq xmm, r/m32|64`: zero-extended into the register.
fn gpr_to_xmm<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = if MEM {
        cpu.read_mem::<W>(i)?
    } else {
        W::get(&cpu.gpr, i.r1)
    };
    Xmm::set(cpu, i.r0, u128::from(v));
    Ok(())
}

/// `movd`/`movq r/m32|64, xmm`.
fn xmm_to_gpr<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = Xmm::get(cpu, i.r1) as u64 & W::MASK;
    if MEM {
        cpu.write_mem::<W>(i, v)
    } else {
        W::set(&mut cpu.gpr, i.r0, v);
        Ok(())
    }
}

/// `movq xmm, xmm/m64` (F3 0F 7E): zero-extends.
fn movq_load<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = if MEM {
        u128::from(cpu.read_mem::<W64>(i)?)
    } else {
        Xmm::get(cpu, i.r1) & LO
    };
    Xmm::set(cpu, i.r0, v);
    Ok(())
}

/// `movq xmm/m64, xmm` (66 0F D6): a register destination is zero-extended.
fn movq_store<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = Xmm::get(cpu, i.r1) & LO;
    if MEM {
        cpu.write_mem::<W64>(i, v as u64)
    } else {
        Xmm::set(cpu, i.r0, v);
        Ok(())
    }
}

/// `movd`/`movq mm, r/m32|64`.
fn gpr_to_mm<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    Mm::check(cpu)?;
    let v = if MEM {
        cpu.read_mem::<W>(i)?
    } else {
        W::get(&cpu.gpr, i.r1)
    };
    Mm::enter(cpu);
    Mm::set(cpu, i.r0, u128::from(v));
    Ok(())
}

/// `movd`/`movq r/m32|64, mm`.
fn mm_to_gpr<W: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    Mm::check(cpu)?;
    let v = Mm::get(cpu, i.r1) as u64 & W::MASK;
    if MEM {
        cpu.write_mem::<W>(i, v)?;
    } else {
        W::set(&mut cpu.gpr, i.r0, v);
    }
    Mm::enter(cpu);
    Ok(())
}

/// `movq mm, mm/m64`.
fn movq_mm_load<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    Mm::check(cpu)?;
    let v = if MEM {
        u128::from(cpu.read_mem::<W64>(i)?)
    } else {
        Mm::get(cpu, i.r1)
    };
    Mm::enter(cpu);
    Mm::set(cpu, i.r0, v);
    Ok(())
}

/// `movq mm/m64, mm` and `movntq m64, mm`.
fn movq_mm_store<const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    Mm::check(cpu)?;
    let v = Mm::get(cpu, i.r1);
    if MEM {
        cpu.write_mem::<W64>(i, v as u64)?;
    }
    Mm::enter(cpu);
    if !MEM {
        Mm::set(cpu, i.r0, v);
    }
    Ok(())
}

/// `movq2dq xmm, mm`.
fn movq2dq(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_mm_ok(cpu)?;
    let v = Mm::get(cpu, i.r1);
    Mm::enter(cpu);
    Xmm::set(cpu, i.r0, v);
    Ok(())
}

/// `movdq2q mm, xmm`.
fn movdq2q(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_mm_ok(cpu)?;
    let v = Xmm::get(cpu, i.r1) & LO;
    Mm::enter(cpu);
    Mm::set(cpu, i.r0, v);
    Ok(())
}

/// `movnti m32/m64, r`: an ordinary store (no SSE state involved).
fn movnti<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = W::get(&cpu.gpr, i.r1);
    cpu.write_mem::<W>(i, v)
}

/// `maskmovq`/`maskmovdqu`: stores the bytes of `r1` whose mask byte in
/// `r2` has its top bit set, at seg:rDI. Every page the selected bytes
/// touch is checked before the first byte is written.
fn maskmov<S: Space>(cpu: &mut Cpu, i: &Insn) -> Res {
    S::check(cpu)?;
    let data = S::get(cpu, i.r1).to_le_bytes();
    let mask = S::get(cpu, i.r2).to_le_bytes();
    let selected = |k: &usize| mask[*k] & 0x80 != 0;
    let seg = usize::from(i.seg);
    let base = cpu.gpr[7] & i.amask;
    let first = (0..S::BYTES).find(selected);
    let last = (0..S::BYTES).rev().find(selected);
    if let (Some(first), Some(last)) = (first, last) {
        let lin = cpu.lin_w(
            seg,
            base.wrapping_add(first as u64) & i.amask,
            last - first + 1,
        )?;
        via_seg(seg, cpu.probe_write(lin, last - first + 1))?;
        for k in (first..=last).filter(selected) {
            let off = base.wrapping_add(k as u64) & i.amask;
            cpu.write_virt::<W8>(seg, off, u64::from(data[k]))?;
        }
    }
    S::enter(cpu);
    Ok(())
}

/// `movmskps`/`movmskpd r, xmm`: the sign bits of the `E`-bit lanes.
fn movmsk<W: Width, const E: u32>(cpu: &mut Cpu, i: &Insn) -> Res {
    sse_ok(cpu)?;
    let v = Xmm::get(cpu, i.r1);
    let m = (0..128 / E).fold(0u64, |m, k| m | (((v >> (E * k + E - 1)) & 1) as u64) << k);
    W::set(&mut cpu.gpr, i.r0, m);
    Ok(())
}

pub(super) fn register(t: &mut Table) {
    for name in [
        "Movaps_xmm_xmmm128",
        "Movapd_xmm_xmmm128",
        "Movdqa_xmm_xmmm128",
    ] {
        rm!(t, name, load, [true]);
    }
    for name in [
        "Movups_xmm_xmmm128",
        "Movupd_xmm_xmmm128",
        "Movdqu_xmm_xmmm128",
    ] {
        rm!(t, name, load, [false]);
    }
    t.add(c("Lddqu_xmm_m128"), load::<false, true>);
    for name in [
        "Movaps_xmmm128_xmm",
        "Movapd_xmmm128_xmm",
        "Movdqa_xmmm128_xmm",
    ] {
        rm!(t, name, store, [true]);
    }
    for name in [
        "Movups_xmmm128_xmm",
        "Movupd_xmmm128_xmm",
        "Movdqu_xmmm128_xmm",
    ] {
        rm!(t, name, store, [false]);
    }
    for name in ["Movntps_m128_xmm", "Movntpd_m128_xmm", "Movntdq_m128_xmm"] {
        t.add(c(name), store::<true, true>);
    }
    rm!(t, "Movss_xmm_xmmm32", scalar_load, [W32]);
    rm!(t, "Movsd_xmm_xmmm64", scalar_load, [W64]);
    rm!(t, "Movss_xmmm32_xmm", scalar_store, [W32]);
    rm!(t, "Movsd_xmmm64_xmm", scalar_store, [W64]);
    t.add(c("Movlps_xmm_m64"), half_load::<false>);
    t.add(c("Movlpd_xmm_m64"), half_load::<false>);
    t.add(c("Movhps_xmm_m64"), half_load::<true>);
    t.add(c("Movhpd_xmm_m64"), half_load::<true>);
    t.add(c("Movlps_m64_xmm"), half_store::<false>);
    t.add(c("Movlpd_m64_xmm"), half_store::<false>);
    t.add(c("Movhps_m64_xmm"), half_store::<true>);
    t.add(c("Movhpd_m64_xmm"), half_store::<true>);
    t.add(c("Movhlps_xmm_xmm"), movhlps);
    t.add(c("Movlhps_xmm_xmm"), movlhps);
    rm!(t, "Movddup_xmm_xmmm64", movddup);
    rm!(t, "Movshdup_xmm_xmmm128", movsdup, [true]);
    rm!(t, "Movsldup_xmm_xmmm128", movsdup, [false]);

    rm!(t, "Movd_xmm_rm32", gpr_to_xmm, [W32]);
    rm!(t, "Movq_xmm_rm64", gpr_to_xmm, [W64]);
    rm!(t, "Movd_rm32_xmm", xmm_to_gpr, [W32]);
    rm!(t, "Movq_rm64_xmm", xmm_to_gpr, [W64]);
    rm!(t, "Movq_xmm_xmmm64", movq_load);
    rm!(t, "Movq_xmmm64_xmm", movq_store);
    rm!(t, "Movd_mm_rm32", gpr_to_mm, [W32]);
    rm!(t, "Movq_mm_rm64", gpr_to_mm, [W64]);
    rm!(t, "Movd_rm32_mm", mm_to_gpr, [W32]);
    rm!(t, "Movq_rm64_mm", mm_to_gpr, [W64]);
    rm!(t, "Movq_mm_mmm64", movq_mm_load);
    rm!(t, "Movq_mmm64_mm", movq_mm_store);
    t.add(c("Movntq_m64_mm"), movq_mm_store::<true>);
    t.add(c("Movq2dq_xmm_mm"), movq2dq);
    t.add(c("Movdq2q_mm_xmm"), movdq2q);
    t.add(c("Movnti_m32_r32"), movnti::<W32>);
    t.add(c("Movnti_m64_r64"), movnti::<W64>);
    t.add(c("Maskmovq_rDI_mm_mm"), maskmov::<Mm>);
    t.add(c("Maskmovdqu_rDI_xmm_xmm"), maskmov::<Xmm>);
    t.add(c("Movmskps_r32_xmm"), movmsk::<W32, 32>);
    t.add(c("Movmskps_r64_xmm"), movmsk::<W64, 32>);
    t.add(c("Movmskpd_r32_xmm"), movmsk::<W32, 64>);
    t.add(c("Movmskpd_r64_xmm"), movmsk::<W64, 64>);
}
