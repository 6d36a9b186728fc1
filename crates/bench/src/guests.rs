//! The benchmark guests: tiny Multiboot v1 kernels assembled with
//! code_asm. They boot on vmplay (`--accel kvm|emu`) and on QEMU alike, and
//! report through QEMU's `isa-debug-exit` port (0xf4): writing `v` ends the
//! VM with exit status `(v << 1) | 1`.

use crate::BenchError;
use crate::elf::GuestImage;
use crate::kernels::{self, DATA_SIZE, LoopKind};
use iced_x86::code_asm::*;

/// Where every guest is loaded (1 MiB, above the BIOS area on any loader).
pub const LOAD: u32 = 0x10_0000;
const ENTRY: u32 = LOAD + 0x10;
/// 32-bit code after the far jump that reloads CS.
const CODE32_FLAT: u32 = LOAD + 0x400;
/// A lone `iretd`: every interrupt vector of the idle guest.
const IRET_HANDLER: u32 = LOAD + 0x600;
const GDT: u32 = LOAD + 0x800;
const GDTR: u32 = GDT + 0x20;
const IDTR: u32 = GDT + 0x28;
const CODE64: u32 = LOAD + 0x1000;
const KERNEL: u32 = LOAD + 0x2000;
const KERNEL_MAX: u32 = 0xe000;
// Zero-filled memory past the file: page tables, stack, IDT, data.
const PML4: u32 = LOAD + 0x1_0000;
const PDPT: u32 = PML4 + 0x1000;
const PD: u32 = PDPT + 0x1000;
const STACK_TOP: u32 = PD + 0x6000;
const IDT: u32 = STACK_TOP;
/// The loops' data area (2 MiB-aligned).
pub const DATA: u32 = 0x20_0000;

// The fixed areas do not overlap, and the data is identity-mapped.
const _: () = {
    assert!(ENTRY < CODE32_FLAT && CODE32_FLAT < IRET_HANDLER && IRET_HANDLER < GDT);
    assert!(IDTR + 6 <= CODE64 && CODE64 + 0x1000 <= KERNEL);
    assert!(KERNEL + KERNEL_MAX <= PML4);
    assert!(IDT + 256 * 8 <= DATA);
    assert!(DATA as u64 + DATA_SIZE <= 1 << 30);
};

const SEL_CODE32: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_CODE64: u16 = 0x18;

/// The value a guest writes to the debug-exit port when all went well:
/// the VM then exits with status 0x21.
pub const EXIT_OK: u32 = 0x10;
/// ... and when a loop's checksum differs from the host's: status 0x23.
pub const EXIT_WRONG_RESULT: u32 = 0x11;
/// The exit status for a debug-exit write of `v`.
pub const fn exit_status(v: u32) -> i32 {
    ((v << 1) | 1) as i32
}
/// What the `start` guest's first instruction writes: AL of the multiboot
/// magic a loader leaves in EAX.
pub const START_EXIT_VALUE: u32 = crate::elf::MULTIBOOT_BOOTLOADER_MAGIC & 0xff;
/// The byte the idle guest writes to COM1 once it runs.
pub const IDLE_READY_BYTE: u8 = b'R';

/// A flat GDT: 32-bit code, data, 64-bit code; then GDTR and IDTR.
fn gdt_block() -> Vec<u8> {
    let mut b = Vec::new();
    for d in [
        0u64,
        0x00cf_9a00_0000_ffff, // 0x08: 32-bit code, base 0, 4 GiB
        0x00cf_9200_0000_ffff, // 0x10: data, base 0, 4 GiB
        0x00af_9a00_0000_ffff, // 0x18: 64-bit code
    ] {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&(4 * 8 - 1u16).to_le_bytes());
    b.extend_from_slice(&GDT.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(256 * 8 - 1u16).to_le_bytes());
    b.extend_from_slice(&IDT.to_le_bytes());
    b
}

/// `jmp far sel:target` in 32-bit code (code_asm has no direct far jump).
fn far_jump(a: &mut CodeAssembler, sel: u16, target: u32) -> Result<(), IcedError> {
    let mut bytes = vec![0xea];
    bytes.extend_from_slice(&target.to_le_bytes());
    bytes.extend_from_slice(&sel.to_le_bytes());
    a.db(&bytes)
}

/// Stops the vCPU for good: `cli; hlt` in a loop.
fn halt_forever(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut h = a.create_label();
    a.set_label(&mut h)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(h)
}

/// `n` × `out dx, al` to `port` in a `dec`/`jnz` loop, then debug-exit
/// with [`EXIT_OK`]. The `pio-exit` guest.
#[allow(dead_code)] // wired up with the pio-exit benchmark
pub fn pio_loop(n: u32, port: u16) -> Result<GuestImage, BenchError> {
    if n == 0 {
        return Err(BenchError::Guest("the out loop needs n ≥ 1".into()));
    }
    let mut a = CodeAssembler::new(32)?;
    a.mov(ecx, n)?;
    a.mov(edx, u32::from(port))?;
    a.xor(eax, eax)?;
    let mut top = a.create_label();
    a.set_label(&mut top)?;
    a.out(dx, al)?;
    a.dec(ecx)?;
    a.jnz(top)?;
    a.mov(eax, EXIT_OK)?;
    a.mov(edx, u32::from(crate::DEBUG_EXIT_PORT))?;
    a.out(dx, eax)?;
    halt_forever(&mut a)?;
    let mut img = GuestImage::new(LOAD, ENTRY);
    img.place(ENTRY, a.assemble(u64::from(ENTRY))?)?;
    Ok(img)
}

/// The `start` guest: its very first instruction is `out 0xf4, al`, so the
/// VM exits as soon as the first guest instruction runs.
pub fn exit_at_once() -> Result<GuestImage, BenchError> {
    let mut a = CodeAssembler::new(32)?;
    a.out(u32::from(crate::DEBUG_EXIT_PORT), al)?;
    halt_forever(&mut a)?;
    let mut img = GuestImage::new(LOAD, ENTRY);
    img.place(ENTRY, a.assemble(u64::from(ENTRY))?)?;
    Ok(img)
}

/// A guest that writes [`IDLE_READY_BYTE`] to COM1 and then sleeps in
/// `hlt` with interrupts enabled forever (every vector just `iret`s), so
/// the VMM sits idle while its memory is measured.
pub fn idle_forever() -> Result<GuestImage, BenchError> {
    let mut img = GuestImage::new(LOAD, ENTRY);

    let mut a = CodeAssembler::new(32)?;
    a.cli()?;
    a.lgdt(dword_ptr(GDTR))?;
    far_jump(&mut a, SEL_CODE32, CODE32_FLAT)?;
    img.place(ENTRY, a.assemble(u64::from(ENTRY))?)?;

    let mut a = CodeAssembler::new(32)?;
    a.mov(eax, u32::from(SEL_DATA))?;
    for seg in [ds, es, fs, gs, ss] {
        a.mov(seg, ax)?;
    }
    a.mov(esp, STACK_TOP)?;
    // 256 interrupt gates (type 0xe, present, DPL 0) to the iret handler.
    a.mov(ebx, (u32::from(SEL_CODE32) << 16) | (IRET_HANDLER & 0xffff))?;
    a.mov(edx, (IRET_HANDLER & 0xffff_0000) | 0x8e00)?;
    a.xor(ecx, ecx)?;
    let mut fill = a.create_label();
    a.set_label(&mut fill)?;
    a.mov(dword_ptr(ecx * 8 + IDT), ebx)?;
    a.mov(dword_ptr(ecx * 8 + IDT + 4), edx)?;
    a.inc(ecx)?;
    a.cmp(ecx, 256)?;
    a.jne(fill)?;
    a.lidt(dword_ptr(IDTR))?;
    a.mov(edx, u32::from(vmplay_boot::layout::COM1_PORT))?;
    a.mov(al, u32::from(IDLE_READY_BYTE))?;
    a.out(dx, al)?;
    let mut idle = a.create_label();
    a.set_label(&mut idle)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(idle)?;
    img.place(CODE32_FLAT, a.assemble(u64::from(CODE32_FLAT))?)?;

    img.place(IRET_HANDLER, vec![0xcf])?; // iretd
    img.place(GDT, gdt_block())?;
    img.reserve_to(IDT + 256 * 8);
    Ok(img)
}

/// A guest that enters 64-bit mode (identity-mapped 1 GiB in 2 MiB pages),
/// calls loop `kind` with `n` iterations on the zeroed data area at
/// [`DATA`], and exits with [`EXIT_OK`] when the checksum equals
/// `expected` (computed natively on the host), else [`EXIT_WRONG_RESULT`].
pub fn long_mode_loop(kind: LoopKind, n: u64, expected: u64) -> Result<GuestImage, BenchError> {
    let mut img = GuestImage::new(LOAD, ENTRY);

    let mut a = CodeAssembler::new(32)?;
    a.cli()?;
    a.lgdt(dword_ptr(GDTR))?;
    a.mov(eax, cr4)?;
    a.or(eax, 1 << 5)?; // PAE
    a.mov(cr4, eax)?;
    a.mov(dword_ptr(PML4), PDPT | 3)?;
    a.mov(dword_ptr(PDPT), PD | 3)?;
    a.xor(ecx, ecx)?;
    a.mov(eax, 0x83u32)?; // present, writable, 2 MiB page
    let mut pd = a.create_label();
    a.set_label(&mut pd)?;
    a.mov(dword_ptr(ecx * 8 + PD), eax)?;
    a.add(eax, 0x20_0000)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jne(pd)?;
    a.mov(eax, PML4)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32)?; // EFER
    a.rdmsr()?;
    a.or(eax, 1 << 8)?; // LME
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0001u32 as i32)?; // PG | PE
    a.mov(cr0, eax)?;
    far_jump(&mut a, SEL_CODE64, CODE64)?;
    img.place(ENTRY, a.assemble(u64::from(ENTRY))?)?;

    let mut a = CodeAssembler::new(64)?;
    a.mov(eax, u32::from(SEL_DATA))?;
    for seg in [ds, es, ss] {
        a.mov(seg, ax)?;
    }
    a.mov(esp, STACK_TOP)?;
    a.mov(edi, DATA)?;
    a.mov(rsi, n)?;
    a.mov(eax, KERNEL)?;
    a.call(rax)?;
    a.mov(rdx, expected)?;
    a.cmp(rax, rdx)?;
    a.mov(eax, EXIT_OK)?;
    a.mov(ecx, EXIT_WRONG_RESULT)?;
    a.cmovne(eax, ecx)?;
    a.mov(edx, u32::from(crate::DEBUG_EXIT_PORT))?;
    a.out(dx, eax)?;
    halt_forever(&mut a)?;
    img.place(CODE64, a.assemble(u64::from(CODE64))?)?;

    let kernel = kernels::assemble(kind, u64::from(KERNEL))?;
    if kernel.code.len() > KERNEL_MAX as usize {
        return Err(BenchError::Guest(format!(
            "{} loop is {} bytes, more than {KERNEL_MAX}",
            kind.name(),
            kernel.code.len()
        )));
    }
    img.place(KERNEL, kernel.code)?;
    img.place(GDT, gdt_block())?;
    img.reserve_to(DATA + DATA_SIZE as u32);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_builds() {
        pio_loop(10, 0x80).unwrap();
        exit_at_once().unwrap();
        idle_forever().unwrap();
        for kind in LoopKind::ALL {
            long_mode_loop(kind, 5, 0).unwrap();
        }
        assert!(pio_loop(0, 0x80).is_err());
    }

    #[test]
    fn start_guest_begins_with_out_to_the_debug_exit_port() {
        let elf = exit_at_once().unwrap().to_elf();
        // Entry is 0x10 into the segment at file offset 0x1000: `out imm8, al`.
        assert_eq!(&elf[0x1010..0x1012], &[0xe6, 0xf4]);
    }
}
