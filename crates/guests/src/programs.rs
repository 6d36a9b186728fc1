//! The guest programs. Each returns a complete Multiboot ELF image; the
//! doc comment says exactly what it prints on COM1 and how it leaves.

use crate::GuestError;
use crate::image::{self, MULTIBOOT_BOOTLOADER_MAGIC, MultibootImage, sel};
use crate::runtime::{
    RUNTIME32_SCRATCH, Runtime16, Runtime32, Runtime64, acpi_power_off,
    debug_exit as emit_debug_exit, halt_forever,
};
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction};

/// Builds an image, or panics: the programs are fixed, so a failure is a
/// bug in this crate (the unit tests build every one of them).
pub(crate) fn build_image(
    build: impl FnOnce(&mut MultibootImage) -> Result<(), GuestError>,
) -> Vec<u8> {
    let mut img = MultibootImage::new();
    build(&mut img)
        .and_then(|()| img.build())
        .unwrap_or_else(|e| panic!("vmplay-guests: a built-in guest failed to assemble: {e}"))
}

/// Places `build` as the 32-bit entry code.
pub(crate) fn entry32(
    img: &mut MultibootImage,
    build: impl FnOnce(&mut CodeAssembler, &mut Runtime32) -> Result<(), GuestError>,
) -> Result<(), GuestError> {
    let scratch = img.zeroed(RUNTIME32_SCRATCH, 16);
    let main = img.code32(|a| {
        let mut rt = Runtime32::new(a, scratch);
        build(a, &mut rt)?;
        rt.finish(a)
    })?;
    img.set_entry32(main);
    Ok(())
}

/// Writes `code` to the debug-exit port: vmplay exits with `(code << 1) | 1`.
/// Prints nothing.
pub fn debug_exit(code: u8) -> Vec<u8> {
    build_image(|img| entry32(img, |a, _| emit_debug_exit(a, code)))
}

/// Drops from protected mode to real mode, checks CR0.PE really is clear,
/// and prints `Hello from real mode\n` with real-mode segment addressing,
/// polling the UART like a driver; then debug-exit 0 (status 1).
/// If PE is still set it prints `still in protected mode\n` and exits 2.
pub fn hello_real_mode() -> Vec<u8> {
    build_image(|img| {
        let real = img.real_mode(|a| {
            let mut rt = Runtime16::new(a);
            let mut real = a.create_label();
            a.mov(eax, cr0)?;
            a.test(al, 1)?;
            a.jz(real)?;
            rt.print(a, "still in protected mode\n")?;
            emit_debug_exit(a, 2)?;
            a.set_label(&mut real)?;
            rt.print(a, "Hello from real mode\n")?;
            emit_debug_exit(a, 0)?;
            rt.finish(a)
        })?;
        entry32(img, |a, _| {
            a.jmp_far(sel::CODE16, real.pm16_entry)?;
            Ok(())
        })
    })
}

/// The value [`long_mode`] computes with 64-bit registers: fib(90), which
/// needs 62 bits.
pub const LONG_MODE_FIB_N: u32 = 90;

/// Builds identity page tables for the first GiB (2 MiB pages), enables
/// PAE, EFER.LME and paging, far-jumps to 64-bit code, and prints
/// `Hello from long mode\n` then `fib(90) = 0x<16 hex digits>\n` computed
/// with 64-bit adds; then debug-exit 0 (status 1).
pub fn long_mode() -> Vec<u8> {
    build_image(|img| {
        // PML4, PDPT, PD: three zeroed, page-aligned pages.
        let pml4 = img.zeroed(3 * 0x1000, 0x1000);
        let (pdpt, pd) = (pml4 + 0x1000, pml4 + 0x2000);

        let code64 = img.code64(|a| {
            let mut rt = Runtime64::new(a);
            a.mov(ax, u32::from(sel::DATA32))?;
            for s in [ds, es, ss] {
                a.mov(s, ax)?;
            }
            rt.print(a, "Hello from long mode\n")?;
            // (rax, rdx) = (fib(i), fib(i+1)), stepped 90 times.
            let mut step = a.create_label();
            a.xor(eax, eax)?;
            a.mov(edx, 1u32)?;
            a.mov(ecx, LONG_MODE_FIB_N)?;
            a.set_label(&mut step)?;
            a.lea(r8, ptr(rax + rdx))?;
            a.mov(rax, rdx)?;
            a.mov(rdx, r8)?;
            a.dec(ecx)?;
            a.jnz(step)?;
            rt.print(a, &format!("fib({LONG_MODE_FIB_N}) = 0x"))?;
            rt.print_hex64(a, rax)?;
            rt.print(a, "\n")?;
            emit_debug_exit(a, 0)?;
            rt.finish(a)
        })?;

        entry32(img, |a, _| {
            const PRESENT_WRITABLE: u32 = 0b11;
            const PAGE_SIZE_2M: u32 = 1 << 7;
            a.mov(dword_ptr(pml4), pdpt | PRESENT_WRITABLE)?;
            a.mov(dword_ptr(pdpt), pd | PRESENT_WRITABLE)?;
            // 512 PD entries, each mapping 2 MiB onto itself.
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
            a.or(eax, 1 << 5)?; // CR4.PAE
            a.mov(cr4, eax)?;
            a.mov(ecx, 0xc000_0080u32)?; // IA32_EFER
            a.rdmsr()?;
            a.or(eax, 1 << 8)?; // EFER.LME
            a.wrmsr()?;
            a.mov(eax, cr0)?;
            a.or(eax, 1u32 << 31)?; // CR0.PG: long mode becomes active
            a.mov(cr0, eax)?;
            a.jmp_far(sel::CODE64, code64)?;
            Ok(())
        })
    })
}

/// The local APIC's MMIO registers (xAPIC mode).
mod lapic {
    pub const BASE: u32 = 0xfee0_0000;
    pub const ID: u32 = BASE + 0x20;
    pub const SVR: u32 = BASE + 0xf0;
    pub const ICR_LOW: u32 = BASE + 0x300;
    pub const ICR_HIGH: u32 = BASE + 0x310;
    /// ICR: destination shorthand "all excluding self", level assert.
    pub const ALL_BUT_SELF: u32 = (0b11 << 18) | (1 << 14);
    pub const INIT: u32 = 0b101 << 8;
    pub const STARTUP: u32 = 0b110 << 8;
    pub const DELIVERY_PENDING: u32 = 1 << 12;
}

/// Most APs [`smp_apic_ids`] gives a stack to.
pub const SMP_MAX_APS: u32 = 64;
/// Seconds (RTC ticks) the BSP waits for the APs before giving up.
pub const SMP_TIMEOUT_SECONDS: u32 = 10;

/// Multiprocessor start-up. The BSP reads the expected CPU count from
/// `cpus=N` on the command line (1 without it) and its APIC ID, prints
/// `bsp apic id B, expecting N cpus\n`, enables its local APIC and sends
/// INIT, SIPI, SIPI to all other CPUs. Each AP starts in real mode at a
/// trampoline below 1 MiB, enters protected mode, takes a stack and prints
/// `cpu A up\n` with its own APIC ID under a spinlock, then counts itself.
/// When N CPUs are up the BSP prints `all N cpus up\n` and debug-exits 0
/// (status 1); after [`SMP_TIMEOUT_SECONDS`] of RTC time without them it
/// prints `timeout: K of N cpus up\n` and debug-exits 2 (status 5).
pub fn smp_apic_ids() -> Vec<u8> {
    build_image(|img| {
        // Shared variables, each in its own cache line.
        let vars = img.zeroed(0x1000, 0x1000);
        let (print_lock, cpus_up, next_stack) = (vars, vars + 0x40, vars + 0x80);
        const AP_STACK_SIZE: u32 = 0x400;
        let stacks = img.zeroed((SMP_MAX_APS * AP_STACK_SIZE) as usize, 16);

        let ap_scratch = img.zeroed(RUNTIME32_SCRATCH, 16);
        let ap32 = img.code32(|a| {
            let mut rt = Runtime32::new(a, ap_scratch);
            a.mov(ax, u32::from(sel::DATA32))?;
            for s in [ds, es, fs, gs, ss] {
                a.mov(s, ax)?;
            }
            // Claim a stack slot: the old value of the counter is ours.
            let mut park = a.create_label();
            a.mov(eax, 1u32)?;
            a.lock().xadd(dword_ptr(next_stack), eax)?;
            a.cmp(eax, SMP_MAX_APS)?;
            a.jae(park)?;
            a.inc(eax)?;
            a.imul_3(eax, eax, AP_STACK_SIZE as i32)?;
            a.add(eax, stacks)?;
            a.mov(esp, eax)?;

            a.mov(ebx, dword_ptr(lapic::ID))?;
            a.shr(ebx, 24u32)?;
            spin_lock(a, print_lock)?;
            rt.print(a, "cpu ")?;
            rt.print_dec(a, ebx, 0)?;
            rt.print(a, " up\n")?;
            spin_unlock(a, print_lock)?;
            a.lock().inc(dword_ptr(cpus_up))?;
            a.set_label(&mut park)?;
            halt_forever(a)?;
            rt.finish(a)
        })?;

        // The SIPI vector names a 4 KiB page below 1 MiB; the AP starts
        // there in real mode with CS = page >> 4, IP = 0.
        let trampoline = img.code16_low(|a| {
            a.cli()?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.lgdt(ptr(image::LOW_GDT_PTR))?;
            a.mov(eax, cr0)?;
            a.or(eax, 1)?; // CR0.PE
            a.mov(cr0, eax)?;
            // A 32-bit offset from 16-bit code: `jmp dword far` (o32 EA).
            a.add_instruction(Instruction::with_far_branch(
                Code::Jmp_ptr1632,
                sel::CODE32,
                ap32,
            )?)?;
            Ok(())
        })?;
        let sipi_vector = trampoline >> 12;

        entry32(img, |a, rt| {
            a.mov(ebp, ebx)?;
            expected_cpus_into_edi(a)?;
            a.mov(ebx, dword_ptr(lapic::ID))?;
            a.shr(ebx, 24u32)?;
            rt.print(a, "bsp apic id ")?;
            rt.print_dec(a, ebx, 0)?;
            rt.print(a, ", expecting ")?;
            rt.print_dec(a, edi, 0)?;
            rt.print(a, " cpus\n")?;
            a.mov(dword_ptr(cpus_up), 1u32)?;

            // Software-enable the local APIC (SVR bit 8), spurious vector 0xff.
            a.mov(dword_ptr(lapic::SVR), 0x1ffu32)?;
            a.mov(dword_ptr(lapic::ICR_HIGH), 0u32)?;
            for command in [
                lapic::INIT,
                lapic::STARTUP | sipi_vector,
                lapic::STARTUP | sipi_vector,
            ] {
                a.mov(dword_ptr(lapic::ICR_LOW), lapic::ALL_BUT_SELF | command)?;
                let mut sent = a.create_label();
                a.set_label(&mut sent)?;
                a.test(dword_ptr(lapic::ICR_LOW), lapic::DELIVERY_PENDING)?;
                a.jnz(sent)?;
            }

            // Wait for the count, timing out on RTC second changes rather
            // than on a loop count, which would mean nothing across backends.
            let (mut wait, mut all_up) = (a.create_label(), a.create_label());
            a.xor(esi, esi)?;
            a.mov(al, 0u32)?;
            rt.cmos_read_al(a)?;
            a.mov(dl, al)?;
            a.set_label(&mut wait)?;
            a.cmp(dword_ptr(cpus_up), edi)?;
            a.jae(all_up)?;
            a.pause()?;
            a.mov(al, 0u32)?;
            rt.cmos_read_al(a)?;
            a.cmp(al, dl)?;
            a.je(wait)?;
            a.mov(dl, al)?;
            a.inc(esi)?;
            a.cmp(esi, SMP_TIMEOUT_SECONDS)?;
            a.jb(wait)?;

            spin_lock(a, print_lock)?;
            rt.print(a, "timeout: ")?;
            rt.print_dec(a, dword_ptr(cpus_up), 0)?;
            rt.print(a, " of ")?;
            rt.print_dec(a, edi, 0)?;
            rt.print(a, " cpus up\n")?;
            emit_debug_exit(a, 2)?;

            a.set_label(&mut all_up)?;
            spin_lock(a, print_lock)?;
            rt.print(a, "all ")?;
            rt.print_dec(a, edi, 0)?;
            rt.print(a, " cpus up\n")?;
            emit_debug_exit(a, 0)
        })
    })
}

/// Takes the spinlock at `lock` with `lock xchg`, spinning on plain reads
/// (with `pause`) while it is held. Clobbers eax.
fn spin_lock(a: &mut CodeAssembler, lock: u32) -> Result<(), GuestError> {
    let (mut held, mut try_take) = (a.create_label(), a.create_label());
    a.jmp(try_take)?;
    a.set_label(&mut held)?;
    a.pause()?;
    a.cmp(dword_ptr(lock), 0)?;
    a.jne(held)?;
    a.set_label(&mut try_take)?;
    a.mov(eax, 1u32)?;
    a.xchg(dword_ptr(lock), eax)?; // xchg with memory is always locked
    a.test(eax, eax)?;
    a.jnz(held)?;
    Ok(())
}

fn spin_unlock(a: &mut CodeAssembler, lock: u32) -> Result<(), GuestError> {
    a.mov(dword_ptr(lock), 0u32)?;
    Ok(())
}

/// Multiboot information offsets (Multiboot v1 spec, section 3.3).
mod mbi {
    pub const FLAGS: i32 = 0;
    pub const MEM_LOWER: i32 = 4;
    pub const MEM_UPPER: i32 = 8;
    pub const CMDLINE: i32 = 16;
    pub const MODS_COUNT: i32 = 20;
    pub const MODS_ADDR: i32 = 24;
    pub const MMAP_LENGTH: i32 = 44;
    pub const MMAP_ADDR: i32 = 48;
    pub const HAS_MEM: u32 = 1 << 0;
    pub const HAS_CMDLINE: u32 = 1 << 2;
    pub const HAS_MODS: u32 = 1 << 3;
    pub const HAS_MMAP: u32 = 1 << 6;
}

/// Sets edi to N from `cpus=N` in the command line (ebp = Multiboot info),
/// or 1 when there is none. Clobbers eax and esi.
fn expected_cpus_into_edi(a: &mut CodeAssembler) -> Result<(), GuestError> {
    let (mut scan, mut next, mut digit, mut done) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.xor(edi, edi)?;
    a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_CMDLINE)?;
    a.jz(done)?;
    a.mov(esi, dword_ptr(ebp + mbi::CMDLINE))?;
    a.set_label(&mut scan)?;
    a.cmp(byte_ptr(esi), 0)?;
    a.je(done)?;
    a.cmp(dword_ptr(esi), u32::from_le_bytes(*b"cpus"))?;
    a.jne(next)?;
    a.cmp(byte_ptr(esi + 4), i32::from(b'='))?;
    a.jne(next)?;
    a.add(esi, 5)?;
    a.set_label(&mut digit)?;
    a.movzx(eax, byte_ptr(esi))?;
    a.sub(eax, i32::from(b'0'))?;
    a.cmp(eax, 9)?;
    a.ja(done)?;
    a.imul_3(edi, edi, 10)?;
    a.add(edi, eax)?;
    a.inc(esi)?;
    a.jmp(digit)?;
    a.set_label(&mut next)?;
    a.inc(esi)?;
    a.jmp(scan)?;
    a.set_label(&mut done)?;
    let mut some = a.create_label();
    a.test(edi, edi)?;
    a.jnz(some)?;
    a.mov(edi, 1u32)?;
    a.set_label(&mut some)?;
    a.nop()?;
    Ok(())
}

/// If eax is not the Multiboot magic, prints `bad multiboot magic 0x...\n`
/// and debug-exits 2 (status 5). Otherwise moves the info pointer to ebp.
fn check_multiboot(a: &mut CodeAssembler, rt: &mut Runtime32) -> Result<(), GuestError> {
    let mut ok = a.create_label();
    a.cmp(eax, MULTIBOOT_BOOTLOADER_MAGIC)?;
    a.je(ok)?;
    rt.print(a, "bad multiboot magic 0x")?;
    rt.print_hex32(a, eax)?;
    rt.print(a, "\n")?;
    emit_debug_exit(a, 2)?;
    a.set_label(&mut ok)?;
    a.mov(ebp, ebx)?;
    Ok(())
}

/// Calls `each` for every memory map entry (esi = the entry: base at +4,
/// length at +12, type at +20), or prints `none` when the loader gave no
/// map. Needs ebp = Multiboot info; clobbers esi, edi, eax.
fn for_each_mmap_entry(
    a: &mut CodeAssembler,
    rt: &mut Runtime32,
    mut each: impl FnMut(&mut CodeAssembler, &mut Runtime32) -> Result<(), GuestError>,
) -> Result<(), GuestError> {
    let (mut none, mut entry, mut done) = (a.create_label(), a.create_label(), a.create_label());
    a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_MMAP)?;
    a.jz(none)?;
    a.mov(esi, dword_ptr(ebp + mbi::MMAP_ADDR))?;
    a.mov(edi, esi)?;
    a.add(edi, dword_ptr(ebp + mbi::MMAP_LENGTH))?;
    a.set_label(&mut entry)?;
    a.cmp(esi, edi)?;
    a.jae(done)?;
    each(a, rt)?;
    // The size field does not count itself.
    a.mov(eax, dword_ptr(esi))?;
    a.lea(esi, ptr(esi + eax + 4))?;
    a.jmp(entry)?;
    a.set_label(&mut none)?;
    rt.print(a, "none\n")?;
    a.set_label(&mut done)?;
    a.nop()?;
    Ok(())
}

/// Prints `cmdline: <text>\n` (or `cmdline: none\n`). Needs ebp = info.
fn print_cmdline(
    a: &mut CodeAssembler,
    rt: &mut Runtime32,
    prefix: &str,
) -> Result<(), GuestError> {
    let (mut none, mut done) = (a.create_label(), a.create_label());
    rt.print(a, prefix)?;
    a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_CMDLINE)?;
    a.jz(none)?;
    a.mov(eax, dword_ptr(ebp + mbi::CMDLINE))?;
    rt.print_str(a, eax)?;
    a.jmp(done)?;
    a.set_label(&mut none)?;
    rt.print(a, "none")?;
    a.set_label(&mut done)?;
    rt.print(a, "\n")
}

/// How many bytes of module 0 [`multiboot_info`] prints.
pub const MULTIBOOT_INFO_MODULE_BYTES: u32 = 64;

/// Prints what the loader handed over, then powers off through ACPI
/// (vmplay exits 0):
///
/// ```text
/// cmdline: <kernel path> <cmdline>
/// mem_lower: <n> KiB
/// mem_upper: <n> KiB
/// mmap: base=0x<16 hex> length=0x<16 hex> type=<n>     (one line per entry)
/// modules: <count>
/// module 0: <size> bytes: <up to 64 bytes, unprintable as '.'>
/// powering off
/// ```
///
/// A missing part prints `none` (`mem: none`, `mmap: none`, `modules: none`);
/// a wrong magic prints `bad multiboot magic 0x...` and debug-exits 2.
pub fn multiboot_info() -> Vec<u8> {
    build_image(|img| {
        entry32(img, |a, rt| {
            check_multiboot(a, rt)?;
            print_cmdline(a, rt, "cmdline: ")?;

            let (mut no_mem, mut mem_done) = (a.create_label(), a.create_label());
            a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_MEM)?;
            a.jz(no_mem)?;
            rt.print(a, "mem_lower: ")?;
            rt.print_dec(a, dword_ptr(ebp + mbi::MEM_LOWER), 0)?;
            rt.print(a, " KiB\nmem_upper: ")?;
            rt.print_dec(a, dword_ptr(ebp + mbi::MEM_UPPER), 0)?;
            rt.print(a, " KiB\n")?;
            a.jmp(mem_done)?;
            a.set_label(&mut no_mem)?;
            rt.print(a, "mem: none\n")?;
            a.set_label(&mut mem_done)?;

            let mut has_mmap = a.create_label();
            a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_MMAP)?;
            a.jnz(has_mmap)?;
            rt.print(a, "mmap: ")?; // for_each_mmap_entry prints "none"
            a.set_label(&mut has_mmap)?;
            for_each_mmap_entry(a, rt, |a, rt| {
                rt.print(a, "mmap: base=0x")?;
                rt.print_hex64(a, dword_ptr(esi + 8), dword_ptr(esi + 4))?;
                rt.print(a, " length=0x")?;
                rt.print_hex64(a, dword_ptr(esi + 16), dword_ptr(esi + 12))?;
                rt.print(a, " type=")?;
                rt.print_dec(a, dword_ptr(esi + 20), 0)?;
                rt.print(a, "\n")
            })?;

            let (mut no_mods, mut mods_done, mut short) =
                (a.create_label(), a.create_label(), a.create_label());
            a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_MODS)?;
            a.jz(no_mods)?;
            rt.print(a, "modules: ")?;
            rt.print_dec(a, dword_ptr(ebp + mbi::MODS_COUNT), 0)?;
            rt.print(a, "\n")?;
            a.cmp(dword_ptr(ebp + mbi::MODS_COUNT), 0)?;
            a.je(mods_done)?;
            // Module entries: mod_start, mod_end (exclusive), string, reserved.
            a.mov(ebx, dword_ptr(ebp + mbi::MODS_ADDR))?;
            a.mov(esi, dword_ptr(ebx))?;
            a.mov(ecx, dword_ptr(ebx + 4))?;
            a.sub(ecx, esi)?;
            rt.print(a, "module 0: ")?;
            rt.print_dec(a, ecx, 0)?;
            rt.print(a, " bytes: ")?;
            a.cmp(ecx, MULTIBOOT_INFO_MODULE_BYTES)?;
            a.jbe(short)?;
            a.mov(ecx, MULTIBOOT_INFO_MODULE_BYTES)?;
            a.set_label(&mut short)?;
            rt.print_escaped_esi_ecx(a)?;
            rt.print(a, "\n")?;
            a.jmp(mods_done)?;
            a.set_label(&mut no_mods)?;
            rt.print(a, "modules: none\n")?;
            a.set_label(&mut mods_done)?;

            rt.print(a, "powering off\n")?;
            acpi_power_off(a)
        })
    })
}

/// Prints `resetting\n`, waits for the i8042 input buffer to drain (status
/// bit 1) and writes 0xfe (pulse the reset line) to port 0x64. vmplay exits
/// 0 saying the guest reset the machine.
pub fn i8042_reset() -> Vec<u8> {
    build_image(|img| {
        entry32(img, |a, rt| {
            rt.print(a, "resetting\n")?;
            let mut busy = a.create_label();
            a.set_label(&mut busy)?;
            a.in_(al, 0x64)?;
            a.test(al, 0x02)?;
            a.jnz(busy)?;
            a.mov(al, 0xfeu32)?;
            a.out(0x64, al)?;
            halt_forever(a)
        })
    })
}

/// The value [`triple_fault`] leaves in eax, to find in the register dump.
pub const TRIPLE_FAULT_MARKER: u32 = 0x7f1a_d00d;

/// Prints `triple faulting\n`, loads an IDT with limit 0, puts
/// [`TRIPLE_FAULT_MARKER`] in eax and executes `ud2`: #UD cannot be
/// delivered, nor the #GP that raises, nor the #DF: the CPU shuts down.
pub fn triple_fault() -> Vec<u8> {
    build_image(|img| {
        let empty_idt = img.data(&[0; 8]);
        entry32(img, |a, rt| {
            rt.print(a, "triple faulting\n")?;
            a.lidt(ptr(empty_idt))?;
            a.mov(eax, TRIPLE_FAULT_MARKER)?;
            a.ud2()?;
            halt_forever(a)
        })
    })
}

/// Reads the CMOS RTC (waiting out updates, honouring register B's BCD and
/// 12-hour modes) and prints `YYYY-MM-DD\n`; then debug-exit 0 (status 1).
pub fn rtc_date() -> Vec<u8> {
    build_image(|img| {
        entry32(img, |a, rt| {
            rt.rtc_now(a)?;
            rt.print_rtc_date(a)?;
            rt.print(a, "\n")?;
            emit_debug_exit(a, 0)
        })
    })
}

/// Reads IA32_MISC_ENABLE, whose power-on value each backend sets itself,
/// and prints `misc_enable=VALUE\n` (16 hex digits); then debug-exit 0
/// (status 1).
pub fn misc_enable() -> Vec<u8> {
    build_image(|img| {
        entry32(img, |a, rt| {
            rt.print(a, "misc_enable=")?;
            a.mov(ecx, 0x1a0u32)?;
            a.rdmsr()?;
            rt.print_hex64(a, edx, eax)?;
            rt.print(a, "\n")?;
            emit_debug_exit(a, 0)
        })
    })
}

/// The shipped demo guest: a banner, the command line, the memory the
/// loader reported, the RTC date and time, the CPU vendor from `cpuid`,
/// then an ACPI power-off (vmplay exits 0).
pub fn demo() -> Vec<u8> {
    build_image(|img| {
        entry32(img, |a, rt| {
            check_multiboot(a, rt)?;
            rt.print(
                a,
                "\n  vmplay demo guest\n  a 4 KiB Multiboot kernel in 32-bit protected mode, \
                 talking to the VMM's devices by port I/O\n\n",
            )?;
            print_cmdline(a, rt, "command line: ")?;

            let mut no_mem = a.create_label();
            a.test(dword_ptr(ebp + mbi::FLAGS), mbi::HAS_MEM)?;
            a.jz(no_mem)?;
            rt.print(a, "memory:       ")?;
            rt.print_dec(a, dword_ptr(ebp + mbi::MEM_LOWER), 0)?;
            rt.print(a, " KiB below 1 MiB, ")?;
            rt.print_dec(a, dword_ptr(ebp + mbi::MEM_UPPER), 0)?;
            rt.print(a, " KiB above\n")?;
            a.set_label(&mut no_mem)?;

            rt.print(a, "memory map:\n")?;
            for_each_mmap_entry(a, rt, |a, rt| {
                rt.print(a, "  0x")?;
                rt.print_hex64(a, dword_ptr(esi + 8), dword_ptr(esi + 4))?;
                rt.print(a, " +0x")?;
                rt.print_hex64(a, dword_ptr(esi + 16), dword_ptr(esi + 12))?;
                let mut printed = a.create_label();
                for (kind, name) in [
                    (1, " usable\n"),
                    (2, " reserved\n"),
                    (3, " ACPI\n"),
                    (4, " ACPI NVS\n"),
                ] {
                    let mut other = a.create_label();
                    a.cmp(dword_ptr(esi + 20), kind)?;
                    a.jne(other)?;
                    rt.print(a, name)?;
                    a.jmp(printed)?;
                    a.set_label(&mut other)?;
                }
                rt.print(a, " type ")?;
                rt.print_dec(a, dword_ptr(esi + 20), 0)?;
                rt.print(a, "\n")?;
                a.set_label(&mut printed)?;
                a.nop()?;
                Ok(())
            })?;

            rt.rtc_now(a)?;
            rt.print(a, "RTC:          ")?;
            rt.print_rtc_date(a)?;
            rt.print(a, " ")?;
            rt.print_rtc_time(a)?;
            rt.print(a, " UTC\n")?;

            // Vendor string: ebx, edx, ecx of leaf 0, in that order.
            rt.print(a, "CPU vendor:   ")?;
            a.xor(eax, eax)?;
            a.cpuid()?;
            for reg in [ebx, edx, ecx] {
                a.mov(eax, reg)?;
                for _ in 0..4 {
                    rt.putc_al(a)?;
                    a.shr(eax, 8u32)?;
                }
            }
            rt.print(a, "\n\npowering off\n")?;
            acpi_power_off(a)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programs() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("debug_exit", debug_exit(7)),
            ("hello_real_mode", hello_real_mode()),
            ("long_mode", long_mode()),
            ("smp_apic_ids", smp_apic_ids()),
            ("multiboot_info", multiboot_info()),
            ("i8042_reset", i8042_reset()),
            ("triple_fault", triple_fault()),
            ("rtc_date", rtc_date()),
            ("misc_enable", misc_enable()),
            ("demo", demo()),
        ]
    }

    #[test]
    fn every_program_builds_a_small_multiboot_elf() {
        for (name, elf) in programs() {
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert!(elf.len() < 256 * 1024, "{name}: {} bytes", elf.len());
            assert!(
                elf[..elf.len().min(8192)]
                    .windows(4)
                    .any(|w| w == image::MULTIBOOT_HEADER_MAGIC.to_le_bytes()),
                "{name}"
            );
        }
    }

    #[test]
    fn programs_embed_the_text_they_print() {
        let has = |elf: &[u8], text: &str| elf.windows(text.len()).any(|w| w == text.as_bytes());
        assert!(has(&hello_real_mode(), "Hello from real mode\n"));
        assert!(has(&long_mode(), "Hello from long mode\n"));
        assert!(has(&i8042_reset(), "resetting\n"));
        assert!(has(&smp_apic_ids(), " up\n"));
    }

    #[test]
    fn debug_exit_code_is_the_byte_written_to_port_0xf4() {
        // mov al, imm8 (b0 ib) then out 0xf4, al (e6 f4).
        let elf = debug_exit(0x5a);
        assert!(elf.windows(4).any(|w| w == [0xb0, 0x5a, 0xe6, 0xf4]));
    }

    #[test]
    fn long_mode_constant_needs_64_bits() {
        let (mut x, mut y) = (0u64, 1u64);
        for _ in 0..LONG_MODE_FIB_N {
            (x, y) = (y, x + y);
        }
        assert!(x > u64::from(u32::MAX));
    }
}
