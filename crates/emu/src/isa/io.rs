//! Port I/O: in/out with the IOPL / TSS I/O-bitmap check. Ports the
//! platform owns (PIC, PIT, ELCR, 0x61) are answered inline; others exit
//! to the machine.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::IOPL;
use crate::cpu::width::{W8, W16, W32};
use crate::cpu::{Cpu, Mode};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::mem::io::{Pending, Posted};

impl Cpu {
    /// #GP(0) unless CPL <= IOPL or the TSS bitmap allows `port..port+n`.
    pub fn io_allowed(&mut self, port: u16, n: usize) -> Res {
        if self.mode == Mode::Real {
            return Ok(());
        }
        let iopl = ((self.rflags & IOPL) >> 12) as u8;
        if self.mode != Mode::Virtual8086 && self.cpl <= iopl {
            return Ok(());
        }
        let tr = self.tr;
        if tr.typ() & 8 == 0 || tr.limit < 0x67 {
            return Err(Fault::gp(0));
        }
        let base = self.read_sys::<W16>(tr.base + 0x66)?;
        let at = base + u64::from(port / 8);
        if at + 1 > u64::from(tr.limit) {
            return Err(Fault::gp(0));
        }
        let bits = self.read_sys::<W16>(tr.base + at)?;
        let mask = ((1u64 << n) - 1) << (port % 8);
        if bits & mask != 0 {
            return Err(Fault::gp(0));
        }
        Ok(())
    }

    /// Reads `n` bytes from `port`.
    pub fn port_in(&mut self, port: u16, n: usize) -> Res<u64> {
        self.io_allowed(port, n)?;
        if self.dbg.armed {
            crate::mode::dbreg::io_access(self, port, n);
        }
        self.device_accesses += 1;
        if let Some(v) = self.vm.platform.pio_read(port, n) {
            return Ok(v);
        }
        let v = self.io.read(Pending::PortIn { port, len: n })?;
        // The answer was used: end the block so the log is retired.
        self.stop = true;
        Ok(v)
    }

    /// Writes `n` bytes to `port`.
    pub fn port_out(&mut self, port: u16, n: usize, v: u64) -> Res {
        self.io_allowed(port, n)?;
        if self.dbg.armed {
            crate::mode::dbreg::io_access(self, port, n);
        }
        self.device_accesses += 1;
        if self.vm.platform.pio_write(port, n, v) {
            return Ok(());
        }
        self.io.write(Posted::PortOut {
            port,
            data: v.to_le_bytes(),
            len: n,
        });
        self.stop = true;
        Ok(())
    }
}

fn in_<const N: usize, const DX: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let port = if DX { cpu.gpr[2] as u16 } else { i.imm as u16 };
    let v = cpu.port_in(port, N)?;
    match N {
        1 => W8::set_reg(cpu, v),
        2 => W16::set_reg(cpu, v),
        _ => W32::set_reg(cpu, v),
    }
    Ok(())
}

fn out<const N: usize, const DX: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let port = if DX { cpu.gpr[2] as u16 } else { i.imm as u16 };
    let v = cpu.gpr[0] & ((1u64 << (8 * N)) - 1);
    cpu.port_out(port, N, v)
}

trait SetAcc {
    fn set_reg(cpu: &mut Cpu, v: u64);
}
impl<W: crate::cpu::width::Width> SetAcc for W {
    fn set_reg(cpu: &mut Cpu, v: u64) {
        W::set(&mut cpu.gpr, 0, v);
    }
}

pub fn register(t: &mut Table) {
    t.add(c("In_AL_imm8"), in_::<1, false>);
    t.add(c("In_AX_imm8"), in_::<2, false>);
    t.add(c("In_EAX_imm8"), in_::<4, false>);
    t.add(c("In_AL_DX"), in_::<1, true>);
    t.add(c("In_AX_DX"), in_::<2, true>);
    t.add(c("In_EAX_DX"), in_::<4, true>);
    t.add(c("Out_imm8_AL"), out::<1, false>);
    t.add(c("Out_imm8_AX"), out::<2, false>);
    t.add(c("Out_imm8_EAX"), out::<4, false>);
    t.add(c("Out_DX_AL"), out::<1, true>);
    t.add(c("Out_DX_AX"), out::<2, true>);
    t.add(c("Out_DX_EAX"), out::<4, true>);
}
