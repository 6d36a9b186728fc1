//! A guest for debugger tests: known addresses to break at, step through
//! and watch.

use crate::GuestError;
use crate::image::sel;
use crate::programs::{build_image, entry32};
use crate::runtime::{Runtime64, debug_exit as emit_debug_exit};
use iced_x86::code_asm::*;

/// How many times [`gdb_target`] calls its `bump` function.
pub const GDB_TARGET_ROUNDS: u32 = 3;

/// [`gdb_target`]'s image and the addresses a debugger test uses.
#[derive(Debug, Clone)]
pub struct GdbTarget {
    pub image: Vec<u8>,
    /// `bump`: `mov rax, [counter]` ; `add rax, 1` ; `mov [counter], rax` ; `ret`.
    pub bump: u64,
    /// The address after `bump`'s first instruction (what `stepi` reaches).
    pub bump_step: u64,
    /// The address after `bump`'s store (where a write watchpoint stops).
    pub bump_after_store: u64,
    /// The immediate byte of `bump`'s `add rax, 1` (a debugger patches it).
    pub bump_add_imm: u64,
    /// The 8-byte counter `bump` increments.
    pub counter: u64,
}

/// Enters long mode with identity-mapped 2 MiB pages (as
/// [`crate::long_mode`]), prints `gdb target\n`, calls `bump`
/// [`GDB_TARGET_ROUNDS`] times, prints `counter = 0x<16 hex digits>\n`
/// and debug-exits 0 (status 1). Undisturbed, the counter ends at 3.
pub fn gdb_target() -> GdbTarget {
    let mut addrs = (0, 0, 0, 0, 0);
    let image = build_image(|img| {
        let counter = img.zeroed(8, 8);
        let pml4 = img.zeroed(3 * 0x1000, 0x1000);
        let (pdpt, pd) = (pml4 + 0x1000, pml4 + 0x2000);
        let counter64 = u64::from(counter);
        // Each instruction of bump assembled alone first, to know its size.
        let sizes = {
            let mut a = CodeAssembler::new(64)?;
            a.mov(rax, qword_ptr(counter64))?;
            let first = a.assemble(0)?.len() as u64;
            let mut a = CodeAssembler::new(64)?;
            a.mov(rax, qword_ptr(counter64))?;
            a.add(rax, 1)?;
            a.mov(qword_ptr(counter64), rax)?;
            let all = a.assemble(0)?.len() as u64;
            let mut a = CodeAssembler::new(64)?;
            a.add(rax, 1)?;
            let add = a.assemble(0)?;
            let mut decoder = iced_x86::Decoder::new(64, &add, iced_x86::DecoderOptions::NONE);
            let insn = decoder.decode();
            let imm = decoder.get_constant_offsets(&insn).immediate_offset() as u64;
            (first, all, imm)
        };
        let bump = img.code64(|a| {
            a.mov(rax, qword_ptr(counter64))?;
            a.add(rax, 1)?;
            a.mov(qword_ptr(counter64), rax)?;
            a.ret()?;
            Ok(())
        })?;
        addrs = (
            u64::from(bump),
            u64::from(bump) + sizes.0,
            u64::from(bump) + sizes.1,
            counter64,
            // The low byte of the add's immediate.
            u64::from(bump) + sizes.0 + sizes.2,
        );
        let code64 = img.code64(|a| {
            let mut rt = Runtime64::new(a);
            a.mov(ax, u32::from(sel::DATA32))?;
            for s in [ds, es, ss] {
                a.mov(s, ax)?;
            }
            rt.print(a, "gdb target\n")?;
            let mut again = a.create_label();
            a.mov(ecx, GDB_TARGET_ROUNDS)?;
            a.set_label(&mut again)?;
            a.mov(rbx, u64::from(bump))?;
            a.push(rcx)?;
            a.call(rbx)?;
            a.pop(rcx)?;
            a.dec(ecx)?;
            a.jnz(again)?;
            rt.print(a, "counter = 0x")?;
            a.mov(rax, qword_ptr(counter64))?;
            rt.print_hex64(a, rax)?;
            rt.print(a, "\n")?;
            emit_debug_exit(a, 0)?;
            rt.finish(a)
        })?;
        entry32(img, |a, _| enter_long_mode(a, pml4, pdpt, pd, code64))
    });
    GdbTarget {
        image,
        bump: addrs.0,
        bump_step: addrs.1,
        bump_after_store: addrs.2,
        counter: addrs.3,
        bump_add_imm: addrs.4,
    }
}

/// Identity-maps the first GiB with 2 MiB pages at `pml4`/`pdpt`/`pd`,
/// enables PAE, EFER.LME and paging, and far-jumps to 64-bit `code64`.
fn enter_long_mode(
    a: &mut CodeAssembler,
    pml4: u32,
    pdpt: u32,
    pd: u32,
    code64: u32,
) -> Result<(), GuestError> {
    const PRESENT_WRITABLE: u32 = 0b11;
    const PAGE_SIZE_2M: u32 = 1 << 7;
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
    a.or(eax, 1 << 5)?;
    a.mov(cr4, eax)?;
    a.mov(ecx, 0xc000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 1 << 8)?;
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 1u32 << 31)?;
    a.mov(cr0, eax)?;
    a.jmp_far(sel::CODE64, code64)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdb_target_addresses_are_inside_the_image() {
        let t = gdb_target();
        assert!(t.bump < t.bump_step && t.bump_step < t.bump_after_store);
        assert!(t.bump_step < t.bump_add_imm && t.bump_add_imm < t.bump_after_store);
        assert_eq!(t.counter % 8, 0);
        assert!(!t.image.is_empty());
    }
}
