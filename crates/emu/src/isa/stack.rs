//! The stack: push/pop of registers, memory, immediates and segment
//! registers; pusha/popa; pushf/popf; enter/leave.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::{IOPL, RF, VM};
use crate::cpu::width::{W16, W32, W64, Width};
use crate::cpu::{Cpu, Mode, RSP, SS};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::*;
use crate::mode::interrupt::write_flags_checked;

fn push_reg<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = W::get(&cpu.gpr, i.r0);
    cpu.push::<W>(v)
}

fn pop_reg<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = cpu.pop::<W>()?;
    W::set(&mut cpu.gpr, i.r0, v);
    Ok(())
}

fn push_mem<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = cpu.read_mem::<W>(i)?;
    cpu.push::<W>(v)
}

/// pop r/m: the address uses RSP after the pop (manual: "POP [rsp]").
fn pop_mem<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let sp = cpu.gpr[RSP];
    let v = cpu.pop::<W>()?;
    if let Err(e) = cpu.write_mem::<W>(i, v) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    Ok(())
}

fn push_imm<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    cpu.push::<W>(i.imm & W::MASK)
}

fn push_sreg<W: Width, const SEG: usize>(cpu: &mut Cpu, _: &Insn) -> Res {
    let v = u64::from(cpu.seg[SEG].sel);
    if W::BYTES == 2 {
        return cpu.push::<W16>(v);
    }
    // Wider pushes of a selector write only 16 bits (as recent CPUs do).
    let sp = cpu.gpr[RSP];
    let new = sp.wrapping_sub(W::BYTES as u64) & cpu.sp_mask;
    cpu.write_virt::<W16>(SS, new, v)?;
    cpu.gpr[RSP] = (sp & !cpu.sp_mask) | new;
    Ok(())
}

fn pop_sreg<W: Width, const SEG: usize>(cpu: &mut Cpu, _: &Insn) -> Res {
    let sp = cpu.gpr[RSP];
    let v = cpu.pop::<W>()? as u16;
    if let Err(e) = cpu.load_seg(SEG, v) {
        cpu.gpr[RSP] = sp;
        return Err(e);
    }
    if SEG == SS {
        crate::mode::dbreg::ss_loaded(cpu);
    }
    cpu.stop = true;
    Ok(())
}

fn pusha<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    let sp = cpu.gpr[RSP];
    let vals: [u64; 8] = std::array::from_fn(|k| if k == RSP { sp } else { cpu.gpr[k] } & W::MASK);
    for v in vals {
        if let Err(e) = cpu.push::<W>(v) {
            cpu.gpr[RSP] = sp;
            return Err(e);
        }
    }
    Ok(())
}

fn popa<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    let sp = cpu.gpr[RSP];
    let mut vals = [0u64; 8];
    for k in (0..8).rev() {
        match cpu.pop::<W>() {
            Ok(v) => vals[k] = v,
            Err(e) => {
                cpu.gpr[RSP] = sp;
                return Err(e);
            }
        }
    }
    for (k, &v) in vals.iter().enumerate() {
        if k != RSP {
            W::set(&mut cpu.gpr, k as u8, v);
        }
    }
    Ok(())
}

fn pushf<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    if cpu.mode == Mode::Virtual8086 && (cpu.rflags & IOPL) >> 12 < 3 {
        return Err(Fault::gp(0));
    }
    // VM and RF read as 0 in the pushed image.
    let v = cpu.get_rflags() & !(VM | RF);
    cpu.push::<W>(v & W::MASK)
}

fn popf<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    if cpu.mode == Mode::Virtual8086 && (cpu.rflags & IOPL) >> 12 < 3 {
        return Err(Fault::gp(0));
    }
    let v = cpu.pop::<W>()?;
    write_flags_checked(cpu, v, W::MASK & !RF);
    cpu.stop = true;
    Ok(())
}

fn enter<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    let size = i.imm & 0xffff;
    let level = i.imm2 & 31;
    let sp0 = cpu.gpr[RSP];
    let bp = W::get(&cpu.gpr, 5);
    let run = |cpu: &mut Cpu| -> Res<u64> {
        cpu.push::<W>(bp)?;
        let frame = cpu.gpr[RSP] & cpu.sp_mask;
        if level > 0 {
            let mut tbp = bp;
            for _ in 1..level {
                tbp = tbp.wrapping_sub(W::BYTES as u64)
                    & if cpu.sp_mask == 0xffff {
                        0xffff
                    } else {
                        W::MASK
                    };
                let v = cpu.read_virt::<W>(SS, tbp & cpu.sp_mask)?;
                cpu.push::<W>(v)?;
            }
            cpu.push::<W>(frame & W::MASK)?;
        }
        let nsp = (cpu.gpr[RSP] & cpu.sp_mask).wrapping_sub(size) & cpu.sp_mask;
        // The new stack top must be writable.
        cpu.lin_w(SS, nsp, 1)?;
        cpu.gpr[RSP] = (cpu.gpr[RSP] & !cpu.sp_mask) | nsp;
        Ok(frame)
    };
    match run(cpu) {
        Ok(frame) => {
            W::set(&mut cpu.gpr, 5, frame);
            Ok(())
        }
        Err(e) => {
            cpu.gpr[RSP] = sp0;
            Err(e)
        }
    }
}

fn leave<W: Width>(cpu: &mut Cpu, _: &Insn) -> Res {
    let sp0 = cpu.gpr[RSP];
    let bp = cpu.gpr[5] & cpu.sp_mask;
    cpu.gpr[RSP] = (sp0 & !cpu.sp_mask) | bp;
    match cpu.pop::<W>() {
        Ok(v) => {
            W::set(&mut cpu.gpr, 5, v);
            Ok(())
        }
        Err(e) => {
            cpu.gpr[RSP] = sp0;
            Err(e)
        }
    }
}

pub fn register(t: &mut Table) {
    use crate::cpu::{CS, DS, ES, FS, GS};
    t.add(c("Push_r16"), push_reg::<W16>);
    t.add(c("Push_r32"), push_reg::<W32>);
    t.add(c("Push_r64"), push_reg::<W64>);
    t.add(c("Pop_r16"), pop_reg::<W16>);
    t.add(c("Pop_r32"), pop_reg::<W32>);
    t.add(c("Pop_r64"), pop_reg::<W64>);
    t.rm(c("Push_rm16"), push_reg::<W16>, push_mem::<W16>);
    t.rm(c("Push_rm32"), push_reg::<W32>, push_mem::<W32>);
    t.rm(c("Push_rm64"), push_reg::<W64>, push_mem::<W64>);
    t.rm(c("Pop_rm16"), pop_reg::<W16>, pop_mem::<W16>);
    t.rm(c("Pop_rm32"), pop_reg::<W32>, pop_mem::<W32>);
    t.rm(c("Pop_rm64"), pop_reg::<W64>, pop_mem::<W64>);
    t.add(c("Push_imm16"), push_imm::<W16>);
    t.add(c("Pushw_imm8"), push_imm::<W16>);
    t.add(c("Pushd_imm32"), push_imm::<W32>);
    t.add(c("Pushd_imm8"), push_imm::<W32>);
    t.add(c("Pushq_imm32"), push_imm::<W64>);
    t.add(c("Pushq_imm8"), push_imm::<W64>);

    t.add(c("Pushw_ES"), push_sreg::<W16, ES>);
    t.add(c("Pushd_ES"), push_sreg::<W32, ES>);
    t.add(c("Pushw_CS"), push_sreg::<W16, CS>);
    t.add(c("Pushd_CS"), push_sreg::<W32, CS>);
    t.add(c("Pushw_SS"), push_sreg::<W16, SS>);
    t.add(c("Pushd_SS"), push_sreg::<W32, SS>);
    t.add(c("Pushw_DS"), push_sreg::<W16, DS>);
    t.add(c("Pushd_DS"), push_sreg::<W32, DS>);
    t.add(c("Pushw_FS"), push_sreg::<W16, FS>);
    t.add(c("Pushd_FS"), push_sreg::<W32, FS>);
    t.add(c("Pushq_FS"), push_sreg::<W64, FS>);
    t.add(c("Pushw_GS"), push_sreg::<W16, GS>);
    t.add(c("Pushd_GS"), push_sreg::<W32, GS>);
    t.add(c("Pushq_GS"), push_sreg::<W64, GS>);
    t.add_stop(c("Popw_ES"), pop_sreg::<W16, ES>);
    t.add_stop(c("Popd_ES"), pop_sreg::<W32, ES>);
    t.add_stop(c("Popw_SS"), pop_sreg::<W16, SS>);
    t.add_stop(c("Popd_SS"), pop_sreg::<W32, SS>);
    t.add_stop(c("Popw_DS"), pop_sreg::<W16, DS>);
    t.add_stop(c("Popd_DS"), pop_sreg::<W32, DS>);
    t.add_stop(c("Popw_FS"), pop_sreg::<W16, FS>);
    t.add_stop(c("Popd_FS"), pop_sreg::<W32, FS>);
    t.add_stop(c("Popq_FS"), pop_sreg::<W64, FS>);
    t.add_stop(c("Popw_GS"), pop_sreg::<W16, GS>);
    t.add_stop(c("Popd_GS"), pop_sreg::<W32, GS>);
    t.add_stop(c("Popq_GS"), pop_sreg::<W64, GS>);

    t.add(c("Pushaw"), pusha::<W16>);
    t.add(c("Pushad"), pusha::<W32>);
    t.add(c("Popaw"), popa::<W16>);
    t.add(c("Popad"), popa::<W32>);
    t.add(c("Pushfw"), pushf::<W16>);
    t.add(c("Pushfd"), pushf::<W32>);
    t.add(c("Pushfq"), pushf::<W64>);
    t.add_stop(c("Popfw"), popf::<W16>);
    t.add_stop(c("Popfd"), popf::<W32>);
    t.add_stop(c("Popfq"), popf::<W64>);
    t.add(c("Enterw_imm16_imm8"), enter::<W16>);
    t.add(c("Enterd_imm16_imm8"), enter::<W32>);
    t.add(c("Enterq_imm16_imm8"), enter::<W64>);
    t.add(c("Leavew"), leave::<W16>);
    t.add(c("Leaved"), leave::<W32>);
    t.add(c("Leaveq"), leave::<W64>);
    let _ = (MemDst, RegDst);
}
