//! The benchmark guests: tiny Multiboot v1 kernels assembled with code_asm
//! and packaged by `vmplay_guests::MultibootImage`, so they boot on vmplay
//! (`--accel kvm|emu`) and on QEMU alike. They report through QEMU's
//! `isa-debug-exit` port (0xf4): writing `v` ends the VM with exit status
//! `(v << 1) | 1`.
//!
//! The image builder runs a short entry stub (copy the GDT low, load it,
//! reload segments, set a stack) before the code here; its cost is the
//! same in every run, so it cancels out like the rest of boot.

use crate::BenchError;
use crate::kernels::{self, DATA_SIZE, LoopKind};
use iced_x86::code_asm::*;
use vmplay_devices::ports;
use vmplay_guests::image::sel;
use vmplay_guests::runtime::halt_forever;
use vmplay_guests::{GuestError, MultibootImage};

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
/// magic a loader leaves in EAX (the builder's stub keeps EAX intact).
pub const START_EXIT_VALUE: u32 = vmplay_guests::image::MULTIBOOT_BOOTLOADER_MAGIC & 0xff;
/// The byte the idle guest writes to COM1 once it runs.
pub const IDLE_READY_BYTE: u8 = b'R';

fn debug_exit_port() -> u32 {
    u32::from(crate::DEBUG_EXIT_PORT)
}

/// `n` × `out dx, al` to `port` in a `dec`/`jnz` loop, then debug-exit
/// with [`EXIT_OK`]. The `pio-exit` guest.
pub fn pio_loop(n: u32, port: u16) -> Result<Vec<u8>, BenchError> {
    if n == 0 {
        return Err(BenchError::Guest("the out loop needs n ≥ 1".into()));
    }
    let mut img = MultibootImage::new();
    let main = img.code32(|a| {
        a.mov(ecx, n)?;
        a.mov(edx, u32::from(port))?;
        a.xor(eax, eax)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(eax, EXIT_OK)?;
        a.mov(edx, debug_exit_port())?;
        a.out(dx, eax)?;
        halt_forever(a)
    })?;
    img.set_entry32(main);
    Ok(img.build()?)
}

/// The `start` guest: its first instruction is `out 0xf4, al`, so the VM
/// exits as soon as guest code runs (after the builder's entry stub).
pub fn exit_at_once() -> Result<Vec<u8>, BenchError> {
    let mut img = MultibootImage::new();
    let main = img.code32(|a| {
        a.out(debug_exit_port(), al)?;
        halt_forever(a)
    })?;
    img.set_entry32(main);
    Ok(img.build()?)
}

/// A guest that writes [`IDLE_READY_BYTE`] and a newline to COM1 and then sleeps in
/// `hlt` with interrupts enabled forever (every vector just `iret`s), so
/// the VMM sits idle while its memory is measured.
pub fn idle_forever() -> Result<Vec<u8>, BenchError> {
    let mut img = MultibootImage::new();
    let handler = img.code32(|a| {
        a.iretd()?;
        Ok(())
    })?;
    // 256 interrupt gates (type 0xe, present, DPL 0) to the iret handler.
    let gate = (u64::from(handler & 0xffff_0000) << 32)
        | (0x8e00u64 << 32)
        | (u64::from(sel::CODE32) << 16)
        | u64::from(handler & 0xffff);
    let idt: Vec<u8> = std::iter::repeat_n(gate.to_le_bytes(), 256)
        .flatten()
        .collect();
    let idt = img.data(&idt);
    let mut idtr = (256u16 * 8 - 1).to_le_bytes().to_vec();
    idtr.extend_from_slice(&idt.to_le_bytes());
    let idtr = img.data(&idtr);
    let main = img.code32(|a| {
        a.lidt(ptr(idtr))?;
        a.mov(edx, u32::from(ports::COM1_PORT))?;
        a.mov(al, u32::from(IDLE_READY_BYTE))?;
        a.out(dx, al)?;
        // A whole line: a VMM may hold a partial line back.
        a.mov(al, u32::from(b'\n'))?;
        a.out(dx, al)?;
        let mut idle = a.create_label();
        a.set_label(&mut idle)?;
        a.sti()?;
        a.hlt()?;
        a.jmp(idle)?;
        Ok(())
    })?;
    img.set_entry32(main);
    Ok(img.build()?)
}

/// A guest that enters 64-bit mode (identity-mapped 1 GiB in 2 MiB pages),
/// calls loop `kind` with `n` iterations on a zeroed data area, and exits
/// with [`EXIT_OK`] when the checksum equals `expected` (computed natively
/// on the host), else [`EXIT_WRONG_RESULT`].
pub fn long_mode_loop(kind: LoopKind, n: u64, expected: u64) -> Result<Vec<u8>, BenchError> {
    const PRESENT_WRITABLE: u32 = 0b11;
    const PAGE_SIZE_2M: u32 = 1 << 7;
    let mut img = MultibootImage::new();
    let pml4 = img.zeroed(3 * 0x1000, 0x1000);
    let (pdpt, pd) = (pml4 + 0x1000, pml4 + 0x2000);
    // In the file, so it is zero whatever the loader does with memory.
    let data = img.zeroed(DATA_SIZE as usize, 0x1000);
    let kernel = img.code64(|a| {
        kernels::emit(kind, a)?;
        Ok(())
    })?;
    let main64 = img.code64(|a| {
        a.mov(eax, u32::from(sel::DATA32))?;
        for seg in [ds, es, ss] {
            a.mov(seg, ax)?;
        }
        a.mov(edi, data)?;
        a.mov(rsi, n)?;
        a.mov(eax, kernel)?;
        a.call(rax)?;
        a.mov(rdx, expected)?;
        a.cmp(rax, rdx)?;
        a.mov(eax, EXIT_OK)?;
        a.mov(ecx, EXIT_WRONG_RESULT)?;
        a.cmovne(eax, ecx)?;
        a.mov(edx, debug_exit_port())?;
        a.out(dx, eax)?;
        halt_forever(a)
    })?;
    let main = img.code32(|a| {
        a.mov(dword_ptr(pml4), pdpt | PRESENT_WRITABLE)?;
        a.mov(dword_ptr(pdpt), pd | PRESENT_WRITABLE)?;
        let mut fill = a.create_label();
        a.mov(edi, pd)?;
        a.mov(eax, PAGE_SIZE_2M | PRESENT_WRITABLE)?;
        a.mov(ecx, 512u32)?;
        a.set_label(&mut fill)?;
        a.mov(dword_ptr(edi), eax)?;
        a.add(eax, 0x20_0000)?;
        a.add(edi, 8)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
        a.mov(eax, pml4)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, 1 << 5)?; // PAE
        a.mov(cr4, eax)?;
        a.mov(ecx, 0xc000_0080u32)?; // EFER
        a.rdmsr()?;
        a.or(eax, 1 << 8)?; // LME
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 1u32 << 31)?; // PG: long mode becomes active
        a.mov(cr0, eax)?;
        a.jmp_far(sel::CODE64, main64)?;
        Ok(())
    })?;
    if u64::from(data) + DATA_SIZE > 1 << 30 {
        return Err(BenchError::Guest(format!(
            "data at {data:#x} is outside the identity-mapped first GiB"
        )));
    }
    img.set_entry32(main);
    Ok(img.build()?)
}

impl From<GuestError> for BenchError {
    fn from(e: GuestError) -> Self {
        BenchError::Guest(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

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
    fn start_guest_code_begins_with_out_to_the_debug_exit_port() {
        let elf = exit_at_once().unwrap();
        // `out 0xf4, al` followed by the halt loop (`cli`).
        assert!(contains(&elf, &[0xe6, 0xf4, 0xfa, 0xf4]));
    }

    #[test]
    fn loop_guest_carries_the_expected_checksum() {
        let sum = 0x1122_3344_5566_7788u64;
        let elf = long_mode_loop(LoopKind::Int, 7, sum).unwrap();
        // `mov rdx, imm64`.
        let mut insn = vec![0x48, 0xba];
        insn.extend_from_slice(&sum.to_le_bytes());
        assert!(contains(&elf, &insn));
    }
}
