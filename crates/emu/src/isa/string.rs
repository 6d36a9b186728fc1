//! String instructions: movs, stos, lods, cmps, scas, ins, outs, with
//! rep/repe/repne. `rep movs`/`rep stos` copy or fill page-sized chunks
//! through host pointers; long runs yield every few pages (RIP stays on
//! the instruction) so interrupts and kicks are seen.

use iced_x86::Instruction;

use crate::cpu::fault::Res;
use crate::cpu::flags::{DF, TF};
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::cpu::{Cpu, ES};
use crate::decode::{Handler, Insn, Table};
use crate::isa::c;
use crate::mem::PAGE_MASK;
use crate::mem::access::{Target, via_seg};
use crate::mem::paging::Access;

/// Elements one execution handles before yielding.
const BUDGET: u64 = 1 << 14;

#[inline(always)]
fn step<W: Width>(cpu: &Cpu) -> u64 {
    if cpu.rflags & DF != 0 {
        (W::BYTES as u64).wrapping_neg()
    } else {
        W::BYTES as u64
    }
}

#[inline(always)]
fn advance(cpu: &mut Cpu, reg: usize, mask: u64, by: u64) {
    let v = cpu.gpr[reg];
    cpu.gpr[reg] = (v & !mask) | (v.wrapping_add(by) & mask);
}

#[inline(always)]
fn rewind(cpu: &mut Cpu, i: &Insn) {
    let ip = cpu.rip().wrapping_sub(u64::from(i.len)) & cpu.ip_mask;
    cpu.set_rip(ip);
    // An event between iterations pushes RF set (SDM 18.3.1.1), so the
    // rest does not hit the instruction breakpoint again.
    cpu.rflags |= crate::cpu::flags::RF;
    cpu.stop = true;
}

/// A host pointer for `n` bytes at `seg:off` if all of it is plain RAM in
/// one page (and writable without touching cached code, for writes).
fn host_range(cpu: &mut Cpu, seg: usize, off: u64, n: u64, write: bool) -> Res<Option<*mut u8>> {
    let lin = if write {
        cpu.lin_w(seg, off, n as usize)?
    } else {
        cpu.lin_r(seg, off, n as usize)?
    };
    // Watched accesses go element by element, each checked (crate::debug),
    // and so does single step, which traps after each iteration.
    if (lin & 0xfff) + n > 0x1000 || cpu.debug.watching || cpu.rflags & TF != 0 {
        return Ok(None);
    }
    let e = cpu.tlb.entry(lin);
    let tag = if write { e.tag_w } else { e.tag_r };
    if tag == lin & PAGE_MASK {
        return Ok(Some(e.addend.wrapping_add(lin) as *mut u8));
    }
    let acc = if write { Access::Write } else { Access::Read };
    match via_seg(seg, cpu.translate(lin, acc))? {
        Target::Ram(loc) => {
            if write && cpu.vm.code.is_code(loc.frame) {
                return Ok(None);
            }
            Ok(Some(loc.host))
        }
        Target::Mmio(_) => Ok(None),
    }
}

/// Elements that fit before either page boundary (forward direction).
fn chunk<W: Width>(cnt: u64, offs: &[u64], amask: u64) -> u64 {
    let mut n = cnt.min(BUDGET);
    for &o in offs {
        let left = (0x1000 - (o & 0xfff)) / W::BYTES as u64;
        n = n.min(left);
        // No address-size wrap inside the chunk.
        n = n.min((amask - o) / W::BYTES as u64 + 1);
    }
    n
}

fn movs<W: Width, const REP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = i.amask;
    let seg = usize::from(i.seg);
    let mut done = 0u64;
    loop {
        if REP {
            let cnt = cpu.gpr[1] & a;
            if cnt == 0 {
                return Ok(());
            }
            if done >= BUDGET {
                rewind(cpu, i);
                return Ok(());
            }
            if cpu.rflags & DF == 0 && cnt > 1 {
                let (s, d) = (cpu.gpr[6] & a, cpu.gpr[7] & a);
                let n = chunk::<W>(cnt, &[s, d], a);
                let bytes = n * W::BYTES as u64;
                if n > 1
                    && let Some(src) = host_range(cpu, seg, s, bytes, false)?
                    && let Some(dst) = host_range(cpu, ES, d, bytes, true)?
                {
                    let overlap =
                        (dst as u64) > (src as u64) && (dst as u64) < (src as u64) + bytes;
                    // SAFETY: both ranges lie within single RAM pages
                    // (host_range checked); overlapping forward copies go
                    // element by element, as the hardware does.
                    unsafe {
                        if overlap {
                            for k in 0..n as usize {
                                let off = k * W::BYTES;
                                let v = crate::mem::access::host_load(src.add(off), W::BYTES);
                                crate::mem::access::host_store(dst.add(off), W::BYTES, v);
                            }
                        } else {
                            std::ptr::copy(src, dst, bytes as usize);
                        }
                    }
                    advance(cpu, 6, a, bytes);
                    advance(cpu, 7, a, bytes);
                    advance(cpu, 1, a, n.wrapping_neg());
                    done += n;
                    continue;
                }
            }
        }
        let v = cpu.read_virt::<W>(seg, cpu.gpr[6] & a)?;
        cpu.write_virt::<W>(ES, cpu.gpr[7] & a, v)?;
        let d = step::<W>(cpu);
        advance(cpu, 6, a, d);
        advance(cpu, 7, a, d);
        if !REP {
            return Ok(());
        }
        advance(cpu, 1, a, u64::MAX);
        done += 1;
        if cpu.stop {
            if cpu.gpr[1] & a != 0 {
                rewind(cpu, i);
            }
            return Ok(());
        }
    }
}

fn stos<W: Width, const REP: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = i.amask;
    let v = W::get(&cpu.gpr, 0);
    let mut done = 0u64;
    loop {
        if REP {
            let cnt = cpu.gpr[1] & a;
            if cnt == 0 {
                return Ok(());
            }
            if done >= BUDGET {
                rewind(cpu, i);
                return Ok(());
            }
            if cpu.rflags & DF == 0 && cnt > 1 {
                let d = cpu.gpr[7] & a;
                let n = chunk::<W>(cnt, &[d], a);
                let bytes = n * W::BYTES as u64;
                if n > 1
                    && let Some(dst) = host_range(cpu, ES, d, bytes, true)?
                {
                    // SAFETY: the range is inside one RAM page (host_range).
                    unsafe {
                        if W::BYTES == 1 {
                            std::ptr::write_bytes(dst, v as u8, bytes as usize);
                        } else {
                            for k in 0..n as usize {
                                crate::mem::access::host_store(dst.add(k * W::BYTES), W::BYTES, v);
                            }
                        }
                    }
                    advance(cpu, 7, a, bytes);
                    advance(cpu, 1, a, n.wrapping_neg());
                    done += n;
                    continue;
                }
            }
        }
        cpu.write_virt::<W>(ES, cpu.gpr[7] & a, v)?;
        let d = step::<W>(cpu);
        advance(cpu, 7, a, d);
        if !REP {
            return Ok(());
        }
        advance(cpu, 1, a, u64::MAX);
        done += 1;
        if cpu.stop {
            if cpu.gpr[1] & a != 0 {
                rewind(cpu, i);
            }
            return Ok(());
        }
    }
}

/// Runs `one` once, or under rep until rCX is 0 (or the `until` condition
/// on ZF for repe/repne: 1 = stop when ZF=0, 2 = stop when ZF=1).
#[inline(always)]
fn rep_loop<const REP: u8>(cpu: &mut Cpu, i: &Insn, mut one: impl FnMut(&mut Cpu) -> Res) -> Res {
    let a = i.amask;
    if REP == 0 {
        return one(cpu);
    }
    let mut done = 0u64;
    loop {
        if cpu.gpr[1] & a == 0 {
            return Ok(());
        }
        if done >= BUDGET {
            rewind(cpu, i);
            return Ok(());
        }
        one(cpu)?;
        advance(cpu, 1, a, u64::MAX);
        done += 1;
        let end = match REP {
            1 => !cpu.flags.zf(),
            2 => cpu.flags.zf(),
            _ => false,
        };
        if end {
            return Ok(());
        }
        if cpu.stop {
            if cpu.gpr[1] & a != 0 {
                rewind(cpu, i);
            }
            return Ok(());
        }
    }
}

fn lods<W: Width, const REP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (a, seg) = (i.amask, usize::from(i.seg));
    rep_loop::<REP>(cpu, i, |cpu| {
        let v = cpu.read_virt::<W>(seg, cpu.gpr[6] & a)?;
        W::set(&mut cpu.gpr, 0, v);
        let d = step::<W>(cpu);
        advance(cpu, 6, a, d);
        Ok(())
    })
}

fn cmps<W: Width, const REP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (a, seg) = (i.amask, usize::from(i.seg));
    rep_loop::<REP>(cpu, i, |cpu| {
        let x = cpu.read_virt::<W>(seg, cpu.gpr[6] & a)?;
        let y = cpu.read_virt::<W>(ES, cpu.gpr[7] & a)?;
        cpu.flags.sub::<W>(x, y, x.wrapping_sub(y) & W::MASK);
        let d = step::<W>(cpu);
        advance(cpu, 6, a, d);
        advance(cpu, 7, a, d);
        Ok(())
    })
}

fn scas<W: Width, const REP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = i.amask;
    rep_loop::<REP>(cpu, i, |cpu| {
        let x = W::get(&cpu.gpr, 0);
        let y = cpu.read_virt::<W>(ES, cpu.gpr[7] & a)?;
        cpu.flags.sub::<W>(x, y, x.wrapping_sub(y) & W::MASK);
        let d = step::<W>(cpu);
        advance(cpu, 7, a, d);
        Ok(())
    })
}

fn ins<W: Width, const REP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let a = i.amask;
    rep_loop::<REP>(cpu, i, |cpu| {
        // Check the destination before the port is read.
        let off = cpu.gpr[7] & a;
        let lin = cpu.lin_w(ES, off, W::BYTES)?;
        cpu.probe_write(lin, W::BYTES)?;
        let v = cpu.port_in(cpu.gpr[2] as u16, W::BYTES)?;
        cpu.write_virt::<W>(ES, off, v)?;
        let d = step::<W>(cpu);
        advance(cpu, 7, a, d);
        Ok(())
    })
}

fn outs<W: Width, const REP: u8>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (a, seg) = (i.amask, usize::from(i.seg));
    rep_loop::<REP>(cpu, i, |cpu| {
        let v = cpu.read_virt::<W>(seg, cpu.gpr[6] & a)?;
        cpu.port_out(cpu.gpr[2] as u16, W::BYTES, v)?;
        let d = step::<W>(cpu);
        advance(cpu, 6, a, d);
        Ok(())
    })
}

/// Picks the plain or rep variant (any rep prefix counts for these).
macro_rules! rep_builder {
    ($f:ident, $w:ty) => {{
        fn b(ins: &Instruction) -> Option<Handler> {
            Some(if ins.has_rep_prefix() || ins.has_repne_prefix() {
                $f::<$w, true>
            } else {
                $f::<$w, false>
            })
        }
        b
    }};
}

/// Picks plain, repe (1) or repne (2) variants.
macro_rules! repcc_builder {
    ($f:ident, $w:ty) => {{
        fn b(ins: &Instruction) -> Option<Handler> {
            Some(if ins.has_repe_prefix() {
                $f::<$w, 1>
            } else if ins.has_repne_prefix() {
                $f::<$w, 2>
            } else {
                $f::<$w, 0>
            })
        }
        b
    }};
}

/// Plain or unconditional rep (3) variants for lods/ins/outs.
macro_rules! rep3_builder {
    ($f:ident, $w:ty) => {{
        fn b(ins: &Instruction) -> Option<Handler> {
            Some(if ins.has_rep_prefix() || ins.has_repne_prefix() {
                $f::<$w, 3>
            } else {
                $f::<$w, 0>
            })
        }
        b
    }};
}

pub fn register(t: &mut Table) {
    t.custom(c("Movsb_m8_m8"), rep_builder!(movs, W8));
    t.custom(c("Movsw_m16_m16"), rep_builder!(movs, W16));
    t.custom(c("Movsd_m32_m32"), rep_builder!(movs, W32));
    t.custom(c("Movsq_m64_m64"), rep_builder!(movs, W64));
    t.custom(c("Stosb_m8_AL"), rep_builder!(stos, W8));
    t.custom(c("Stosw_m16_AX"), rep_builder!(stos, W16));
    t.custom(c("Stosd_m32_EAX"), rep_builder!(stos, W32));
    t.custom(c("Stosq_m64_RAX"), rep_builder!(stos, W64));
    t.custom(c("Lodsb_AL_m8"), rep3_builder!(lods, W8));
    t.custom(c("Lodsw_AX_m16"), rep3_builder!(lods, W16));
    t.custom(c("Lodsd_EAX_m32"), rep3_builder!(lods, W32));
    t.custom(c("Lodsq_RAX_m64"), rep3_builder!(lods, W64));
    t.custom(c("Cmpsb_m8_m8"), repcc_builder!(cmps, W8));
    t.custom(c("Cmpsw_m16_m16"), repcc_builder!(cmps, W16));
    t.custom(c("Cmpsd_m32_m32"), repcc_builder!(cmps, W32));
    t.custom(c("Cmpsq_m64_m64"), repcc_builder!(cmps, W64));
    t.custom(c("Scasb_AL_m8"), repcc_builder!(scas, W8));
    t.custom(c("Scasw_AX_m16"), repcc_builder!(scas, W16));
    t.custom(c("Scasd_EAX_m32"), repcc_builder!(scas, W32));
    t.custom(c("Scasq_RAX_m64"), repcc_builder!(scas, W64));
    t.custom(c("Insb_m8_DX"), rep3_builder!(ins, W8));
    t.custom(c("Insw_m16_DX"), rep3_builder!(ins, W16));
    t.custom(c("Insd_m32_DX"), rep3_builder!(ins, W32));
    t.custom(c("Outsb_DX_m8"), rep3_builder!(outs, W8));
    t.custom(c("Outsw_DX_m16"), rep3_builder!(outs, W16));
    t.custom(c("Outsd_DX_m32"), rep3_builder!(outs, W32));
}
