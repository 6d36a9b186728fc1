//! The guests' "libc": serial output, number printing, CMOS RTC reads and
//! the ways out of the VM, as subroutines emitted into a program's own
//! assembler (16-, 32- and 64-bit flavours).
//!
//! Usage: create the runtime with the assembler, write the program calling
//! its helpers, then `finish` it, which emits the subroutines and string
//! literals after the program's code. Subroutines preserve every register
//! they do not return a value in (flags excepted).

use crate::GuestError;
use iced_x86::code_asm::*;

/// COM1's data and line-status registers; LSR bit 5 = transmit holding
/// register empty, which a real driver waits for before each byte.
const COM1_DATA: u32 = 0x3f8;
const COM1_LSR: u32 = 0x3fd;
const LSR_THR_EMPTY: u32 = 0x20;
/// QEMU's isa-debug-exit port: writing v makes vmplay exit with (v << 1) | 1.
pub const DEBUG_EXIT_PORT: u32 = 0xf4;
/// The ACPI sleep control register and the value that means "enter S5".
pub const ACPI_SLEEP_CONTROL_PORT: u32 = 0x600;
pub const ACPI_S5_POWER_OFF: u32 = (5 << 2) | (1 << 5);
/// CMOS index and data ports.
const CMOS_INDEX: u32 = 0x70;
const CMOS_DATA: u32 = 0x71;

fn label(a: &mut CodeAssembler) -> CodeLabel {
    a.create_label()
}

/// Emits `cli; hlt` forever: the last resort if an exit port is ignored.
/// With interrupts masked the VMM sees every vCPU halted.
pub fn halt_forever(a: &mut CodeAssembler) -> Result<(), GuestError> {
    let mut again = label(a);
    a.cli()?;
    a.set_label(&mut again)?;
    a.hlt()?;
    a.jmp(again)?;
    Ok(())
}

/// Emits `out 0xf4, code` (any mode), then halts.
pub fn debug_exit(a: &mut CodeAssembler, code: u8) -> Result<(), GuestError> {
    a.mov(al, u32::from(code))?;
    a.out(DEBUG_EXIT_PORT, al)?;
    halt_forever(a)
}

/// Emits an ACPI S5 power-off through the sleep control port, then halts.
pub fn acpi_power_off(a: &mut CodeAssembler) -> Result<(), GuestError> {
    a.mov(dx, ACPI_SLEEP_CONTROL_PORT)?;
    a.mov(al, ACPI_S5_POWER_OFF)?;
    a.out(dx, al)?;
    halt_forever(a)
}

/// Real-mode serial output (`DS:SI` strings).
pub struct Runtime16 {
    putc: CodeLabel,
    puts: CodeLabel,
}

impl Runtime16 {
    pub fn new(a: &mut CodeAssembler) -> Self {
        Self {
            putc: label(a),
            puts: label(a),
        }
    }

    /// Prints `text` (a literal emitted after the code; DS must equal CS).
    pub fn print(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), GuestError> {
        // Only 64-bit code has IP-relative addressing: the string sits
        // inline and `call` pushes its address (DS = CS makes it usable).
        let mut after = label(a);
        a.push(si)?;
        a.call(after)?;
        a.db(&nul_terminated(text))?;
        a.set_label(&mut after)?;
        a.pop(si)?;
        a.call(self.puts)?;
        a.pop(si)?;
        Ok(())
    }

    pub fn finish(mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        // putc: AL = byte.
        let mut wait = label(a);
        a.set_label(&mut self.putc)?;
        a.push(dx)?;
        a.push(ax)?;
        a.set_label(&mut wait)?;
        a.mov(dx, COM1_LSR)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THR_EMPTY)?;
        a.jz(wait)?;
        a.pop(ax)?;
        a.mov(dx, COM1_DATA)?;
        a.out(dx, al)?;
        a.pop(dx)?;
        a.ret()?;

        // puts: DS:SI = NUL-terminated string.
        let (mut next, mut done) = (label(a), label(a));
        a.set_label(&mut self.puts)?;
        a.push(si)?;
        a.push(ax)?;
        a.set_label(&mut next)?;
        a.mov(al, byte_ptr(si))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.inc(si)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(ax)?;
        a.pop(si)?;
        a.ret()?;
        Ok(())
    }
}

/// 32-bit protected-mode runtime.
pub struct Runtime32 {
    putc: CodeLabel,
    puts: CodeLabel,
    hex32: CodeLabel,
    dec: CodeLabel,
    escaped: CodeLabel,
    cmos_read: CodeLabel,
    bcd_to_binary: CodeLabel,
    rtc_now: CodeLabel,
    /// [`RUNTIME32_SCRATCH`] bytes: where `rtc_now` leaves the time.
    scratch: u32,
}

/// Bytes of writable memory a [`Runtime32`] needs (see [`Runtime32::new`]).
pub const RUNTIME32_SCRATCH: usize = rtc::SIZE;

/// Offsets of the fields `rtc_now` fills, from [`Runtime32::rtc_field`].
pub mod rtc {
    pub const SECOND: i32 = 0;
    pub const MINUTE: i32 = 4;
    pub const HOUR: i32 = 8;
    pub const DAY: i32 = 12;
    pub const MONTH: i32 = 16;
    pub const YEAR: i32 = 20;
    /// Two raw reads of the seven CMOS registers, compared for a stable time.
    pub(super) const RAW1: i32 = 24;
    pub(super) const RAW2: i32 = 32;
    pub(super) const SIZE: usize = 40;
}

/// The CMOS registers `rtc_now` reads, in [`rtc`] field order: seconds,
/// minutes, hours, day of month, month, year, century (0x32, as ACPI's
/// FADT and QEMU have it).
const RTC_REGISTERS: [u32; 7] = [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32];

impl Runtime32 {
    /// `scratch` is [`RUNTIME32_SCRATCH`] bytes of memory for the
    /// runtime's variables (kept out of the code so nothing writes there).
    pub fn new(a: &mut CodeAssembler, scratch: u32) -> Self {
        Self {
            putc: label(a),
            puts: label(a),
            hex32: label(a),
            dec: label(a),
            escaped: label(a),
            cmos_read: label(a),
            bcd_to_binary: label(a),
            rtc_now: label(a),
            scratch,
        }
    }

    /// Prints a literal.
    pub fn print(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), GuestError> {
        // No EIP-relative addressing in 32-bit code: the string sits inline
        // and `call` pushes its address.
        let mut after = label(a);
        a.push(esi)?;
        a.call(after)?;
        a.db(&nul_terminated(text))?;
        a.set_label(&mut after)?;
        a.pop(esi)?;
        a.call(self.puts)?;
        a.pop(esi)?;
        Ok(())
    }

    /// Prints the NUL-terminated string `reg` points to.
    pub fn print_str(&self, a: &mut CodeAssembler, reg: AsmRegister32) -> Result<(), GuestError> {
        a.push(esi)?;
        a.mov(esi, reg)?;
        a.call(self.puts)?;
        a.pop(esi)?;
        Ok(())
    }

    /// Prints AL as a character.
    pub fn putc_al(&self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        a.call(self.putc)?;
        Ok(())
    }

    /// Prints `ecx` bytes at `esi`, with anything outside ASCII 0x20..=0x7e as '.'.
    pub fn print_escaped_esi_ecx(&self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        a.call(self.escaped)?;
        Ok(())
    }

    /// Prints the 32-bit value of `value` as 8 lowercase hex digits.
    pub fn print_hex32(
        &self,
        a: &mut CodeAssembler,
        value: impl Into<Value32>,
    ) -> Result<(), GuestError> {
        a.push(eax)?;
        value.into().load(a, eax)?;
        a.call(self.hex32)?;
        a.pop(eax)?;
        Ok(())
    }

    /// Prints the 64-bit value `high:low` as 16 lowercase hex digits.
    pub fn print_hex64(
        &self,
        a: &mut CodeAssembler,
        high: impl Into<Value32>,
        low: impl Into<Value32>,
    ) -> Result<(), GuestError> {
        self.print_hex32(a, high)?;
        self.print_hex32(a, low)
    }

    /// Prints `value` in decimal, zero-padded to at least `width` digits.
    pub fn print_dec(
        &self,
        a: &mut CodeAssembler,
        value: impl Into<Value32>,
        width: u32,
    ) -> Result<(), GuestError> {
        a.push(eax)?;
        a.push(ecx)?;
        value.into().load(a, eax)?;
        a.mov(ecx, width)?;
        a.call(self.dec)?;
        a.pop(ecx)?;
        a.pop(eax)?;
        Ok(())
    }

    /// Reads CMOS register AL into AL.
    pub fn cmos_read_al(&self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        a.call(self.cmos_read)?;
        Ok(())
    }

    /// Reads the RTC into the fields at [`Self::rtc_field`], binary and in
    /// 24-hour form whatever format register B says the clock keeps.
    pub fn rtc_now(&self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        a.call(self.rtc_now)?;
        Ok(())
    }

    /// A memory operand for one field `rtc_now` filled ([`rtc`] offsets).
    pub fn rtc_field(&self, field: i32) -> AsmMemoryOperand {
        dword_ptr(self.scratch as i32 + field)
    }

    /// Prints the date `rtc_now` read as YYYY-MM-DD.
    pub fn print_rtc_date(&mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        self.print_dec(a, self.rtc_field(rtc::YEAR), 4)?;
        self.print(a, "-")?;
        self.print_dec(a, self.rtc_field(rtc::MONTH), 2)?;
        self.print(a, "-")?;
        self.print_dec(a, self.rtc_field(rtc::DAY), 2)
    }

    /// Prints the time `rtc_now` read as HH:MM:SS.
    pub fn print_rtc_time(&mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        self.print_dec(a, self.rtc_field(rtc::HOUR), 2)?;
        self.print(a, ":")?;
        self.print_dec(a, self.rtc_field(rtc::MINUTE), 2)?;
        self.print(a, ":")?;
        self.print_dec(a, self.rtc_field(rtc::SECOND), 2)
    }

    /// Emits the subroutines and literals. Call after the program's code.
    pub fn finish(mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        self.emit_serial(a)?;
        self.emit_numbers(a)?;
        self.emit_rtc(a)
    }

    fn emit_serial(&mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        // putc: AL = byte. Poll LSR until the transmitter can take it.
        let mut wait = label(a);
        a.set_label(&mut self.putc)?;
        a.push(edx)?;
        a.push(eax)?;
        a.set_label(&mut wait)?;
        a.mov(dx, COM1_LSR)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THR_EMPTY)?;
        a.jz(wait)?;
        a.pop(eax)?;
        a.mov(dx, COM1_DATA)?;
        a.out(dx, al)?;
        a.pop(edx)?;
        a.ret()?;

        // puts: ESI = NUL-terminated string.
        let (mut next, mut done) = (label(a), label(a));
        a.set_label(&mut self.puts)?;
        a.push(esi)?;
        a.push(eax)?;
        a.set_label(&mut next)?;
        a.mov(al, byte_ptr(esi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.inc(esi)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(eax)?;
        a.pop(esi)?;
        a.ret()?;

        // escaped: ESI = bytes, ECX = count; unprintable bytes as '.'.
        let (mut next, mut dot, mut put, mut done) = (label(a), label(a), label(a), label(a));
        a.set_label(&mut self.escaped)?;
        a.push(esi)?;
        a.push(ecx)?;
        a.push(eax)?;
        a.test(ecx, ecx)?;
        a.jz(done)?;
        a.set_label(&mut next)?;
        a.mov(al, byte_ptr(esi))?;
        a.cmp(al, 0x20)?;
        a.jb(dot)?;
        a.cmp(al, 0x7e)?;
        a.jbe(put)?;
        a.set_label(&mut dot)?;
        a.mov(al, u32::from(b'.'))?;
        a.set_label(&mut put)?;
        a.call(self.putc)?;
        a.inc(esi)?;
        a.dec(ecx)?;
        a.jnz(next)?;
        a.set_label(&mut done)?;
        a.pop(eax)?;
        a.pop(ecx)?;
        a.pop(esi)?;
        a.ret()?;
        Ok(())
    }

    fn emit_numbers(&mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        // hex32: EAX, most significant nibble first.
        let (mut next, mut digit) = (label(a), label(a));
        a.set_label(&mut self.hex32)?;
        a.push(ecx)?;
        a.push(edx)?;
        a.push(eax)?;
        a.mov(edx, eax)?;
        a.mov(ecx, 8u32)?;
        a.set_label(&mut next)?;
        a.rol(edx, 4u32)?;
        a.mov(al, dl)?;
        a.and(al, 0x0f)?;
        a.cmp(al, 10)?;
        a.jb(digit)?;
        a.add(al, i32::from(b'a' - b'0' - 10))?;
        a.set_label(&mut digit)?;
        a.add(al, i32::from(b'0'))?;
        a.call(self.putc)?;
        a.dec(ecx)?;
        a.jnz(next)?;
        a.pop(eax)?;
        a.pop(edx)?;
        a.pop(ecx)?;
        a.ret()?;

        // dec: EAX = value, ECX = minimum digits. Digits go on the stack
        // least significant first, then come off in print order.
        let (mut divide, mut pad, mut out) = (label(a), label(a), label(a));
        a.set_label(&mut self.dec)?;
        a.pushad()?;
        a.mov(ebx, 10u32)?;
        a.xor(edi, edi)?;
        a.set_label(&mut divide)?;
        a.xor(edx, edx)?;
        a.div(ebx)?;
        a.push(edx)?;
        a.inc(edi)?;
        a.test(eax, eax)?;
        a.jnz(divide)?;
        a.set_label(&mut pad)?;
        a.cmp(edi, ecx)?;
        a.jae(out)?;
        a.push(0)?;
        a.inc(edi)?;
        a.jmp(pad)?;
        a.set_label(&mut out)?;
        a.pop(eax)?;
        a.add(al, i32::from(b'0'))?;
        a.call(self.putc)?;
        a.dec(edi)?;
        a.jnz(out)?;
        a.popad()?;
        a.ret()?;
        Ok(())
    }

    fn emit_rtc(&mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        // cmos_read: AL = register index (bit 7 clear: NMIs stay enabled).
        a.set_label(&mut self.cmos_read)?;
        a.out(CMOS_INDEX, al)?;
        a.in_(al, CMOS_DATA)?;
        a.ret()?;

        // bcd_to_binary: AL = two BCD digits.
        a.set_label(&mut self.bcd_to_binary)?;
        a.push(ecx)?;
        a.movzx(ecx, al)?;
        a.shr(ecx, 4u32)?;
        a.imul_3(ecx, ecx, 10)?;
        a.and(al, 0x0f)?;
        a.add(al, cl)?;
        a.pop(ecx)?;
        a.ret()?;

        // wait_for_update: spin while register A's update-in-progress bit
        // is set; the registers are stable for 244 µs after it clears.
        let mut wait_for_update = label(a);
        a.set_label(&mut wait_for_update)?;
        a.mov(al, 0x0au32)?;
        a.call(self.cmos_read)?;
        a.test(al, 0x80)?;
        a.jnz(wait_for_update)?;
        a.ret()?;

        // rtc_now: read all seven registers twice (each after UIP clears)
        // until both reads agree, as Linux's mc146818_get_time does: an
        // update can still land mid-read on a slow (emulated) guest.
        let mut retry = label(a);
        a.set_label(&mut self.rtc_now)?;
        a.pushad()?;
        a.mov(edi, self.scratch)?;
        a.set_label(&mut retry)?;
        for raw in [rtc::RAW1, rtc::RAW2] {
            a.call(wait_for_update)?;
            for (i, reg) in RTC_REGISTERS.iter().enumerate() {
                a.mov(al, *reg)?;
                a.call(self.cmos_read)?;
                a.mov(byte_ptr(edi + raw + i as i32), al)?;
            }
        }
        for off in [0, 4] {
            a.mov(eax, dword_ptr(edi + rtc::RAW1 + off))?;
            a.cmp(eax, dword_ptr(edi + rtc::RAW2 + off))?;
            a.jne(retry)?;
        }
        // Register B: bit 2 = binary (else BCD), bit 1 = 24-hour (else 12-hour,
        // with bit 7 of the hour meaning PM).
        a.mov(al, 0x0bu32)?;
        a.call(self.cmos_read)?;
        a.mov(bl, al)?;
        for i in 0..RTC_REGISTERS.len() as i32 {
            let mut binary = label(a);
            a.movzx(eax, byte_ptr(edi + rtc::RAW1 + i))?;
            if i == 2 {
                a.mov(bh, al)?;
                a.and(bh, 0x80)?;
                a.and(al, 0x7f)?;
            }
            a.test(bl, 0x04)?;
            a.jnz(binary)?;
            a.call(self.bcd_to_binary)?;
            a.set_label(&mut binary)?;
            match i {
                0..=4 => a.mov(dword_ptr(edi + 4 * i), eax)?,
                5 => a.mov(ecx, eax)?,
                _ => a.mov(edx, eax)?,
            }
        }
        let (mut h24, mut not_twelve, mut am) = (label(a), label(a), label(a));
        a.test(bl, 0x02)?;
        a.jnz(h24)?;
        a.mov(eax, dword_ptr(edi + rtc::HOUR))?;
        a.cmp(eax, 12)?;
        a.jne(not_twelve)?;
        a.xor(eax, eax)?;
        a.set_label(&mut not_twelve)?;
        a.test(bh, bh)?;
        a.jz(am)?;
        a.add(eax, 12)?;
        a.set_label(&mut am)?;
        a.mov(dword_ptr(edi + rtc::HOUR), eax)?;
        a.set_label(&mut h24)?;
        // A clock without a century register reads 0 there: assume 20xx.
        let mut century_ok = label(a);
        a.test(edx, edx)?;
        a.jnz(century_ok)?;
        a.mov(edx, 20u32)?;
        a.set_label(&mut century_ok)?;
        a.imul_3(edx, edx, 100)?;
        a.add(edx, ecx)?;
        a.mov(dword_ptr(edi + rtc::YEAR), edx)?;
        a.popad()?;
        a.ret()?;
        Ok(())
    }
}

/// A 32-bit operand a print helper can load: a register, memory or a constant.
pub enum Value32 {
    Reg(AsmRegister32),
    Mem(AsmMemoryOperand),
    Imm(u32),
}

impl Value32 {
    fn load(self, a: &mut CodeAssembler, into: AsmRegister32) -> Result<(), GuestError> {
        match self {
            Value32::Reg(r) if r == into => {}
            Value32::Reg(r) => a.mov(into, r)?,
            Value32::Mem(m) => a.mov(into, m)?,
            Value32::Imm(v) => a.mov(into, v)?,
        }
        Ok(())
    }
}

impl From<AsmRegister32> for Value32 {
    fn from(r: AsmRegister32) -> Self {
        Value32::Reg(r)
    }
}
impl From<AsmMemoryOperand> for Value32 {
    fn from(m: AsmMemoryOperand) -> Self {
        Value32::Mem(m)
    }
}
impl From<u32> for Value32 {
    fn from(v: u32) -> Self {
        Value32::Imm(v)
    }
}

/// 64-bit long-mode runtime.
pub struct Runtime64 {
    putc: CodeLabel,
    puts: CodeLabel,
    hex64: CodeLabel,
    strings: Vec<(CodeLabel, Vec<u8>)>,
}

impl Runtime64 {
    pub fn new(a: &mut CodeAssembler) -> Self {
        Self {
            putc: label(a),
            puts: label(a),
            hex64: label(a),
            strings: Vec::new(),
        }
    }

    /// Prints a literal (addressed RIP-relative).
    pub fn print(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), GuestError> {
        let l = label(a);
        self.strings.push((l, nul_terminated(text)));
        a.push(rsi)?;
        a.lea(rsi, ptr(l))?;
        a.call(self.puts)?;
        a.pop(rsi)?;
        Ok(())
    }

    /// Prints `reg` as 16 lowercase hex digits.
    pub fn print_hex64(&self, a: &mut CodeAssembler, reg: AsmRegister64) -> Result<(), GuestError> {
        a.push(rax)?;
        if reg != rax {
            a.mov(rax, reg)?;
        }
        a.call(self.hex64)?;
        a.pop(rax)?;
        Ok(())
    }

    pub fn finish(mut self, a: &mut CodeAssembler) -> Result<(), GuestError> {
        let mut wait = label(a);
        a.set_label(&mut self.putc)?;
        a.push(rdx)?;
        a.push(rax)?;
        a.set_label(&mut wait)?;
        a.mov(dx, COM1_LSR)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THR_EMPTY)?;
        a.jz(wait)?;
        a.pop(rax)?;
        a.mov(dx, COM1_DATA)?;
        a.out(dx, al)?;
        a.pop(rdx)?;
        a.ret()?;

        let (mut next, mut done) = (label(a), label(a));
        a.set_label(&mut self.puts)?;
        a.push(rsi)?;
        a.push(rax)?;
        a.set_label(&mut next)?;
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.inc(rsi)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(rax)?;
        a.pop(rsi)?;
        a.ret()?;

        // hex64: RAX, 16 digits.
        let (mut next, mut digit) = (label(a), label(a));
        a.set_label(&mut self.hex64)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.push(rax)?;
        a.mov(rdx, rax)?;
        a.mov(ecx, 16u32)?;
        a.set_label(&mut next)?;
        a.rol(rdx, 4u32)?;
        a.mov(al, dl)?;
        a.and(al, 0x0f)?;
        a.cmp(al, 10)?;
        a.jb(digit)?;
        a.add(al, i32::from(b'a' - b'0' - 10))?;
        a.set_label(&mut digit)?;
        a.add(al, i32::from(b'0'))?;
        a.call(self.putc)?;
        a.dec(ecx)?;
        a.jnz(next)?;
        a.pop(rax)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.ret()?;
        emit_strings(a, self.strings)
    }
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    v.push(0);
    v
}

fn emit_strings(
    a: &mut CodeAssembler,
    strings: Vec<(CodeLabel, Vec<u8>)>,
) -> Result<(), GuestError> {
    for (mut l, bytes) in strings {
        a.set_label(&mut l)?;
        a.db(&bytes)?;
    }
    Ok(())
}
