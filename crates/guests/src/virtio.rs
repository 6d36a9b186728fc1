//! A guest that drives the first virtio-mmio device as a virtio-blk disk
//! by hand, the way a minimal driver would: probe the window, negotiate
//! VERSION_1, set up one split queue, write a sector, read one back, and
//! take each completion as an interrupt through the 8259.

use crate::GuestError;
use crate::image::{MultibootImage, sel};
use crate::programs::entry32;
use crate::runtime::{acpi_power_off, debug_exit};
use iced_x86::code_asm::*;

/// Where vmplay puts the first virtio-mmio window, and its GSI (an ISA IRQ,
/// so the 8259 sees it too).
pub const VIRTIO_MMIO_BASE: u32 = 0xd000_0000;
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The byte the guest fills sector [`WRITTEN_SECTOR`] with.
pub const WRITTEN_BYTE: u8 = b'W';
pub const WRITTEN_SECTOR: u32 = 1;
/// The sector the guest reads over code it has already run; the host puts
/// [`CODE_FROM_DISK`] there.
pub const CODE_SECTOR: u32 = 2;
/// `mov eax, 2; ret`: what the code page holds after the read.
pub const CODE_FROM_DISK: [u8; 6] = [0xb8, 2, 0, 0, 0, 0xc3];

const QUEUE_SIZE: u32 = 8;
const PIC_VECTOR_BASE: u32 = 0x20;

/// Probes the device at [`VIRTIO_MMIO_BASE`], writes sector 1 full of
/// [`WRITTEN_BYTE`] (prints `write ok\n`), reads sector 0 and prints the
/// NUL-terminated text found there; then runs `mov eax, 1; ret` from a code
/// page, reads sector [`CODE_SECTOR`] over that page by DMA and runs it
/// again, printing `code 1 then N\n` (N = 2 when the CPU saw the device's
/// write); then `irqs N\n` (interrupts taken) and powers off (vmplay exits 0). Any failure prints `virtio-blk: <what>\n`
/// and debug-exits 3 (status 7).
pub fn virtio_blk() -> Vec<u8> {
    crate::programs::build_image(build_virtio_blk)
}

fn build_virtio_blk(img: &mut MultibootImage) -> Result<(), GuestError> {
    let desc = img.zeroed(16 * QUEUE_SIZE as usize, 16);
    let avail = img.zeroed(6 + 2 * QUEUE_SIZE as usize, 16);
    let used = img.zeroed(6 + 8 * QUEUE_SIZE as usize, 16);
    let header = img.zeroed(16, 16);
    let data = img.zeroed(513, 16);
    let status = img.zeroed(16, 16);
    let irqs = img.zeroed(16, 16);
    let resume = img.zeroed(16, 16);
    let code_page = img.zeroed(4096, 4096);
    let idt = img.zeroed(8 * 0x30, 8);
    let mut idt_ptr = Vec::new();
    idt_ptr.extend_from_slice(&(8u16 * 0x30 - 1).to_le_bytes());
    idt_ptr.extend_from_slice(&idt.to_le_bytes());
    let idt_ptr = img.data(&idt_ptr);
    let base = VIRTIO_MMIO_BASE;
    let reg = move |off: u32| dword_ptr(base + off);

    // The handler first, so the gate can name its address.
    let handler = img.code32(|a| {
        a.push(eax)?;
        a.mov(eax, reg(0x060))?;
        a.mov(reg(0x064), eax)?; // acknowledge what we saw
        a.inc(dword_ptr(irqs))?;
        a.mov(al, 0x20)?;
        a.out(0x20, al)?; // EOI
        a.pop(eax)?;
        // Drop the frame and go back to the wait loop instead of `iretd`:
        // a kvm_pvm host cannot emulate a ring-0 iret, and the loop
        // re-enables interrupts itself.
        a.add(esp, 12)?;
        a.jmp(dword_ptr(resume))?;
        Ok(())
    })?;

    entry32(img, |a, rt| {
        // A check: unless `jcc` is taken, say what failed and exit 3.
        macro_rules! check {
            ($jcc:ident, $what:expr) => {{
                let mut ok = a.create_label();
                a.$jcc(ok)?;
                rt.print(a, concat!("virtio-blk: ", $what, "\n"))?;
                debug_exit(a, 3)?;
                a.set_label(&mut ok)?;
            }};
        }

        // ---- IDT gate for the device's IRQ, and the 8259 -----------------
        a.mov(eax, handler)?;
        let gate = idt + 8 * (PIC_VECTOR_BASE + VIRTIO_FIRST_GSI);
        a.mov(word_ptr(gate), ax)?;
        a.mov(word_ptr(gate + 2), u32::from(sel::CODE32))?;
        a.mov(byte_ptr(gate + 4), 0)?;
        a.mov(byte_ptr(gate + 5), 0x8e)?;
        a.shr(eax, 16)?;
        a.mov(word_ptr(gate + 6), ax)?;
        a.lidt(ptr(idt_ptr))?;
        for (port, value) in [
            (0x20, 0x11),
            (0x21, PIC_VECTOR_BASE),
            (0x21, 4),
            (0x21, 1),
            (0xa0, 0x11),
            (0xa1, PIC_VECTOR_BASE + 8),
            (0xa1, 2),
            (0xa1, 1),
            (0x21, 0xff & !(1 << VIRTIO_FIRST_GSI)),
            (0xa1, 0xff),
        ] {
            a.mov(al, value)?;
            a.out(port, al)?;
        }

        // ---- probe and negotiate (virtio 1.x §3.1.1) ---------------------
        a.cmp(reg(0x000), 0x7472_6976)?;
        check!(je, "no virtio-mmio magic");
        a.cmp(reg(0x004), 2)?;
        check!(je, "not a version 2 (modern) transport");
        a.cmp(reg(0x008), 2)?;
        check!(je, "not a block device");
        a.mov(reg(0x070), 0)?;
        a.mov(reg(0x070), 3)?; // ACKNOWLEDGE | DRIVER
        a.mov(reg(0x024), 1)?;
        a.mov(reg(0x020), 1)?; // VERSION_1 (bit 32)
        a.mov(reg(0x024), 0)?;
        a.mov(reg(0x020), 0)?;
        a.mov(reg(0x070), 11)?; // | FEATURES_OK
        a.test(reg(0x070), 8)?;
        check!(jnz, "features refused");
        a.mov(reg(0x030), 0)?;
        a.cmp(reg(0x034), QUEUE_SIZE)?;
        check!(jae, "queue 0 too small");
        a.mov(reg(0x038), QUEUE_SIZE)?;
        for (off, addr) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
            a.mov(reg(off), addr)?;
            a.mov(reg(off + 4), 0)?;
        }
        a.mov(reg(0x044), 1)?;
        a.mov(reg(0x070), 15)?; // | DRIVER_OK
        a.test(reg(0x070), 0x40)?;
        check!(jz, "device needs reset after DRIVER_OK");

        // Three descriptors: header (read), data, status (write).
        for (i, addr, len) in [(0u32, header, 16u32), (1, data, 512), (2, status, 1)] {
            let d = desc + 16 * i;
            a.mov(dword_ptr(d), addr)?;
            a.mov(dword_ptr(d + 4), 0)?;
            a.mov(dword_ptr(d + 8), len)?;
            a.mov(word_ptr(d + 12), if i < 2 { 1 } else { 2 })?; // NEXT / WRITE
            a.mov(word_ptr(d + 14), i + 1)?;
        }

        // One request: header type/sector set by the caller; submit, wait.
        let submit = |a: &mut CodeAssembler, n: u32| -> Result<(), GuestError> {
            a.mov(byte_ptr(status), 0xff)?;
            a.mov(word_ptr(avail + 4 + 2 * (n - 1)), 0)?;
            a.mov(word_ptr(avail + 2), n)?;
            a.mov(reg(0x050), 0)?; // notify queue 0
            let mut wait = a.create_label();
            let mut done = a.create_label();
            let mut mark = a.create_label();
            // The handler comes back to the instruction after this call
            // (no EIP-relative lea in 32-bit code: the call pushes it).
            a.call(mark)?;
            a.jmp(wait)?;
            a.set_label(&mut mark)?;
            a.pop(eax)?;
            a.mov(dword_ptr(resume), eax)?;
            a.set_label(&mut wait)?;
            a.cli()?;
            a.cmp(dword_ptr(irqs), n)?;
            a.jae(done)?;
            a.sti()?;
            a.hlt()?;
            a.jmp(wait)?;
            a.set_label(&mut done)?;
            Ok(())
        };

        // ---- write sector 1 ------------------------------------------------
        // A plain loop, not `rep stosb`: kvm_pvm hosts cannot emulate
        // string instructions in ring 0.
        a.mov(edi, data)?;
        a.mov(ecx, 512)?;
        let mut fill = a.create_label();
        a.set_label(&mut fill)?;
        a.mov(byte_ptr(edi), u32::from(WRITTEN_BYTE))?;
        a.inc(edi)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
        a.mov(dword_ptr(header), 1)?; // VIRTIO_BLK_T_OUT
        a.mov(dword_ptr(header + 8), WRITTEN_SECTOR)?;
        a.mov(dword_ptr(header + 12), 0)?;
        submit(a, 1)?;
        a.cmp(word_ptr(used + 2), 1)?;
        check!(je, "write: used index did not move");
        a.cmp(byte_ptr(status), 0)?;
        check!(je, "write: status not OK");
        rt.print(a, "write ok\n")?;

        // ---- read sector 0 -------------------------------------------------
        a.mov(word_ptr(desc + 16 + 12), 3)?; // NEXT | WRITE
        a.mov(dword_ptr(header), 0)?; // VIRTIO_BLK_T_IN
        a.mov(dword_ptr(header + 8), 0)?;
        a.mov(byte_ptr(data + 512), 0)?;
        submit(a, 2)?;
        a.cmp(word_ptr(used + 2), 2)?;
        check!(je, "read: used index did not move");
        a.cmp(byte_ptr(status), 0)?;
        check!(je, "read: status not OK");
        a.cmp(dword_ptr(used + 4 + 8 + 4), 513)?;
        check!(je, "read: used length is not 513");
        rt.print(a, "read: ")?;
        a.mov(eax, data)?;
        rt.print_str(a, eax)?;

        // ---- DMA over code the CPU has run -----------------------------------
        for (i, b) in [0xb8u32, 1, 0, 0, 0, 0xc3].into_iter().enumerate() {
            a.mov(byte_ptr(code_page + i as u32), b)?;
        }
        a.mov(eax, code_page)?;
        a.call(eax)?;
        a.mov(ebx, eax)?;
        a.mov(dword_ptr(desc + 16), code_page)?; // data descriptor → the code page
        a.mov(dword_ptr(header), 0)?; // VIRTIO_BLK_T_IN
        a.mov(dword_ptr(header + 8), CODE_SECTOR)?;
        submit(a, 3)?;
        a.cmp(byte_ptr(status), 0)?;
        check!(je, "code read: status not OK");
        a.mov(eax, code_page)?;
        a.call(eax)?;
        rt.print(a, "code ")?;
        rt.print_dec(a, ebx, 1)?;
        rt.print(a, " then ")?;
        rt.print_dec(a, eax, 1)?;
        rt.print(a, "\n")?;
        rt.print(a, "irqs ")?;
        rt.print_dec(a, dword_ptr(irqs), 1)?;
        rt.print(a, "\n")?;
        acpi_power_off(a)?;

        Ok(())
    })
}
