//! Bit operations: bt/bts/btr/btc, bsf/bsr and popcnt.
//!
//! tzcnt and lzcnt are encoded as `F3 0F BC/BD`; a CPU without BMI1/LZCNT
//! ignores the `F3` and runs bsf/bsr. The default CPU model advertises
//! BMI1 and LZCNT and runs them as counts (CF = source was zero, ZF =
//! count is zero); the qemu64 model advertises neither and runs bsf/bsr,
//! as such a CPU does (a test pins both). popcnt is registered, which
//! makes `cpuid.rs` advertise it.
//!
//! Flags the manuals leave undefined follow the AMD EPYC this was measured
//! on: bt* change only CF; bsf/bsr set the logic flags of the index (ZF
//! from the source, so a zero source gives ZF=PF=1 and keeps the
//! destination, all 64 bits of it even for 32-bit operands).

use crate::cpu::Cpu;
use crate::cpu::fault::Res;
use crate::cpu::flags::{CF, PF, ZF};
use crate::cpu::width::{W16, W32, W64, Width};
use crate::decode::{Insn, Table};
use crate::isa::c;
use crate::isa::ops::{ImmSrc, MemSrc, RegSrc, Src};
use crate::mem::access::via_seg;

/// What a bit-test instruction does to the selected bit.
trait BitOp {
    /// False for bt: the operand is only read.
    const WRITES: bool;
    fn apply(v: u64, mask: u64) -> u64;
}

struct Bt;
struct Bts;
struct Btr;
struct Btc;

impl BitOp for Bt {
    const WRITES: bool = false;
    #[inline(always)]
    fn apply(v: u64, _: u64) -> u64 {
        v
    }
}
impl BitOp for Bts {
    const WRITES: bool = true;
    #[inline(always)]
    fn apply(v: u64, mask: u64) -> u64 {
        v | mask
    }
}
impl BitOp for Btr {
    const WRITES: bool = true;
    #[inline(always)]
    fn apply(v: u64, mask: u64) -> u64 {
        v & !mask
    }
}
impl BitOp for Btc {
    const WRITES: bool = true;
    #[inline(always)]
    fn apply(v: u64, mask: u64) -> u64 {
        v ^ mask
    }
}

/// Register bit base: the offset (register or immediate) is taken modulo
/// the operand size.
fn bt_reg<O: BitOp, W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let bit = S::get::<W>(cpu, i)? & u64::from(W::BITS - 1);
    let v = W::get(&cpu.gpr, i.r0);
    if O::WRITES {
        W::set(&mut cpu.gpr, i.r0, O::apply(v, 1 << bit));
    }
    cpu.flags.set_cf((v >> bit) & 1 != 0);
    Ok(())
}

/// Where a memory bit string's bit lives: the offset of the `W`-sized unit
/// holding it and the bit's index in that unit.
///
/// An immediate offset is taken modulo the operand size. A register
/// offset is a signed index into the bit string that starts at bit 0 of
/// the operand, so it can reach `±2^(size-1)` bits away: the unit is
/// `ea + size/8 * (offset >> log2(size))`, wrapped to the address size.
#[inline(always)]
fn bit_string_addr<W: Width, const IMM: bool>(cpu: &Cpu, i: &Insn) -> (u64, u32) {
    let ea = cpu.ea(i);
    if IMM {
        return (ea, (i.imm as u32) & (W::BITS - 1));
    }
    let off = W::sext(W::get(&cpu.gpr, i.r1)) as i64;
    let units = off >> W::BITS.trailing_zeros();
    let unit = ea.wrapping_add((units as u64).wrapping_mul(W::BYTES as u64)) & i.amask;
    (unit, (off as u32) & (W::BITS - 1))
}

/// Memory bit base; `LOCK` makes the read-modify-write atomic with respect
/// to other vCPUs.
fn bt_mem<O: BitOp, W: Width, const IMM: bool, const LOCK: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    let (off, bit) = bit_string_addr::<W, IMM>(cpu, i);
    let seg = usize::from(i.seg);
    let mask = 1u64 << bit;
    let old = if !O::WRITES {
        let lin = cpu.lin_r(seg, off, W::BYTES)?;
        cpu.read_lin_seg::<W>(seg, lin)?
    } else if LOCK {
        let lin = cpu.lin_w(seg, off, W::BYTES)?;
        via_seg(seg, cpu.locked_rmw::<W>(lin, |v| O::apply(v, mask)))?
    } else {
        let lin = cpu.lin_w(seg, off, W::BYTES)?;
        let v = cpu.read_lin_seg::<W>(seg, lin)?;
        cpu.write_lin_seg::<W>(seg, lin, O::apply(v, mask) & W::MASK)?;
        v
    };
    cpu.flags.set_cf(old & mask != 0);
    Ok(())
}

/// Flags after a bit scan that found bit `index` (AMD's choice for the
/// undefined ones: the logic flags of the index, ZF clear).
#[inline(always)]
fn scan_found(cpu: &mut Cpu, index: u64) {
    if index == 0 {
        cpu.flags.set_bits(PF);
    } else {
        cpu.flags.logic::<W64>(index);
    }
}

/// bsf (and tzcnt without BMI1): index of the lowest set bit; a zero
/// source sets ZF and leaves the destination alone.
fn bsf<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    if v == 0 {
        cpu.flags.set_bits(ZF | PF);
        return Ok(());
    }
    let index = u64::from(v.trailing_zeros());
    W::set(&mut cpu.gpr, i.r0, index);
    scan_found(cpu, index);
    Ok(())
}

/// bsr (and lzcnt without LZCNT): index of the highest set bit.
fn bsr<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    if v == 0 {
        cpu.flags.set_bits(ZF | PF);
        return Ok(());
    }
    let index = u64::from(63 - v.leading_zeros());
    W::set(&mut cpu.gpr, i.r0, index);
    scan_found(cpu, index);
    Ok(())
}

/// tzcnt (`LEAD` false) / lzcnt: the count of trailing (leading) zero
/// bits, the operand size for a zero source; CF says the source was zero,
/// ZF that the count is. OF, SF, PF and AF are undefined (AMD sets OF
/// in some cases); here they are clear. Without BMI1/LZCNT in the CPU model: bsf/bsr.
fn zcnt<W: Width, S: Src, const LEAD: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !crate::isa::bmi::modern(cpu) {
        return if LEAD {
            bsr::<W, S>(cpu, i)
        } else {
            bsf::<W, S>(cpu, i)
        };
    }
    let v = S::get::<W>(cpu, i)?;
    let n = if LEAD {
        (v << (64 - W::BITS)).leading_zeros().min(W::BITS)
    } else {
        v.trailing_zeros().min(W::BITS)
    };
    W::set(&mut cpu.gpr, i.r0, u64::from(n));
    cpu.flags
        .set_bits(if v == 0 { CF } else { 0 } | if n == 0 { ZF } else { 0 });
    Ok(())
}

fn tzcnt<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    zcnt::<W, S, false>(cpu, i)
}

fn lzcnt<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    zcnt::<W, S, true>(cpu, i)
}

/// popcnt: all flags clear but ZF, which says the source was zero.
fn popcnt<W: Width, S: Src>(cpu: &mut Cpu, i: &Insn) -> Res {
    let v = S::get::<W>(cpu, i)?;
    W::set(&mut cpu.gpr, i.r0, u64::from(v.count_ones()));
    cpu.flags.set_bits(if v == 0 { ZF } else { 0 });
    Ok(())
}

/// The six forms (three sizes × register/immediate offset) of one bit-test
/// instruction.
macro_rules! bt_forms {
    ($t:expr, $name:literal, $op:ty) => {{
        macro_rules! one {
            ($suffix:literal, $w:ty, $src:ty, $imm:literal) => {
                if <$op as BitOp>::WRITES {
                    $t.rmw(
                        c(concat!($name, $suffix)),
                        bt_reg::<$op, $w, $src>,
                        bt_mem::<$op, $w, $imm, false>,
                        bt_mem::<$op, $w, $imm, true>,
                    );
                } else {
                    $t.rm(
                        c(concat!($name, $suffix)),
                        bt_reg::<$op, $w, $src>,
                        bt_mem::<$op, $w, $imm, false>,
                    );
                }
            };
        }
        one!("_rm16_r16", W16, RegSrc, false);
        one!("_rm32_r32", W32, RegSrc, false);
        one!("_rm64_r64", W64, RegSrc, false);
        one!("_rm16_imm8", W16, ImmSrc, true);
        one!("_rm32_imm8", W32, ImmSrc, true);
        one!("_rm64_imm8", W64, ImmSrc, true);
    }};
}

/// `name_r16_rm16`…`name_r64_rm64` with register and memory sources.
macro_rules! r_rm_forms {
    ($t:expr, $name:literal, $f:ident) => {{
        $t.rm(
            c(concat!($name, "_r16_rm16")),
            $f::<W16, RegSrc>,
            $f::<W16, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_r32_rm32")),
            $f::<W32, RegSrc>,
            $f::<W32, MemSrc>,
        );
        $t.rm(
            c(concat!($name, "_r64_rm64")),
            $f::<W64, RegSrc>,
            $f::<W64, MemSrc>,
        );
    }};
}

pub fn register(t: &mut Table) {
    bt_forms!(t, "Bt", Bt);
    bt_forms!(t, "Bts", Bts);
    bt_forms!(t, "Btr", Btr);
    bt_forms!(t, "Btc", Btc);
    r_rm_forms!(t, "Bsf", bsf);
    r_rm_forms!(t, "Bsr", bsr);
    // bsf/bsr on a CPU model without BMI1/LZCNT.
    r_rm_forms!(t, "Tzcnt", tzcnt);
    r_rm_forms!(t, "Lzcnt", lzcnt);
    r_rm_forms!(t, "Popcnt", popcnt);
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use crate::cpu::flags::{AF, CF, OF, OSZAPC, PF, SF, ZF};
    use crate::tests::guest::*;

    /// Runs `insn` on the host with `d` in rax, `s` in rcx and the
    /// arithmetic flags `f`; returns (rax, OSZAPC flags).
    macro_rules! host {
        ($insn:literal, $d:expr, $s:expr, $f:expr) => {{
            let mut d: u64 = $d;
            let mut f: u64 = ($f & OSZAPC) | 2;
            // SAFETY: register-only instruction between a flags load and a
            // flags store on the stack; no memory is touched.
            unsafe {
                core::arch::asm!(
                    "push {f}", "popfq", $insn, "pushfq", "pop {f}",
                    f = inout(reg) f, inout("rax") d, in("rcx") $s,
                );
            }
            (d, f & OSZAPC)
        }};
    }

    type HostFn = fn(u64, u64, u64) -> (u64, u64);
    type Emit = fn(&mut CodeAssembler) -> Result<(), IcedError>;

    /// One register form: its name, the host's version, the same
    /// instruction for the guest (rax destination, rcx source), and the
    /// flags the manuals define for it.
    macro_rules! form {
        ($insn:literal, $emit:expr, $defined:expr) => {
            (
                $insn,
                (|d, s, f| host!($insn, d, s, f)) as HostFn,
                $emit as Emit,
                $defined,
            )
        };
    }

    fn forms() -> Vec<(&'static str, HostFn, Emit, u64)> {
        vec![
            form!("bt ax, cx", |a| a.bt(ax, cx), CF),
            form!("bt eax, ecx", |a| a.bt(eax, ecx), CF),
            form!("bt rax, rcx", |a| a.bt(rax, rcx), CF),
            form!("bts ax, cx", |a| a.bts(ax, cx), CF),
            form!("bts eax, ecx", |a| a.bts(eax, ecx), CF),
            form!("bts rax, rcx", |a| a.bts(rax, rcx), CF),
            form!("btr ax, cx", |a| a.btr(ax, cx), CF),
            form!("btr eax, ecx", |a| a.btr(eax, ecx), CF),
            form!("btr rax, rcx", |a| a.btr(rax, rcx), CF),
            form!("btc ax, cx", |a| a.btc(ax, cx), CF),
            form!("btc eax, ecx", |a| a.btc(eax, ecx), CF),
            form!("btc rax, rcx", |a| a.btc(rax, rcx), CF),
            form!("bt ax, 21", |a| a.bt(ax, 21), CF),
            form!("bts eax, 45", |a| a.bts(eax, 45), CF),
            form!("btr rax, 99", |a| a.btr(rax, 99), CF),
            form!("btc eax, 255", |a| a.btc(eax, 255), CF),
            form!("bsf ax, cx", |a| a.bsf(ax, cx), ZF),
            form!("bsf eax, ecx", |a| a.bsf(eax, ecx), ZF),
            form!("bsf rax, rcx", |a| a.bsf(rax, rcx), ZF),
            form!("bsr ax, cx", |a| a.bsr(ax, cx), ZF),
            form!("bsr eax, ecx", |a| a.bsr(eax, ecx), ZF),
            form!("bsr rax, rcx", |a| a.bsr(rax, rcx), ZF),
            form!("popcnt ax, cx", |a| a.popcnt(ax, cx), OSZAPC),
            form!("popcnt eax, ecx", |a| a.popcnt(eax, ecx), OSZAPC),
            form!("popcnt rax, rcx", |a| a.popcnt(rax, rcx), OSZAPC),
            form!("tzcnt ax, cx", |a| a.tzcnt(ax, cx), CF | ZF),
            form!("tzcnt eax, ecx", |a| a.tzcnt(eax, ecx), CF | ZF),
            form!("tzcnt rax, rcx", |a| a.tzcnt(rax, rcx), CF | ZF),
            form!("lzcnt ax, cx", |a| a.lzcnt(ax, cx), CF | ZF),
            form!("lzcnt eax, ecx", |a| a.lzcnt(eax, ecx), CF | ZF),
            form!("lzcnt rax, rcx", |a| a.lzcnt(rax, rcx), CF | ZF),
        ]
    }

    const VALUES: [u64; 10] = [
        0,
        1,
        0x8000,
        0x1_0000,
        0x8000_0000,
        0x1_0000_0000,
        0x8000_0000_0000_0000,
        0x1234_5678_9abc_def0,
        0xffff_ffff_ffff_ffff,
        0xfedc_ba98_0000_0000,
    ];

    /// A guest that runs the code at `rip` on (rax, rcx, flags).
    fn guest_run(vm: &mut Guest, rip: u64, d: u64, s: u64, f: u64) -> (u64, u64) {
        let mut st = vm.long_mode(rip);
        (st.gpr[0], st.gpr[1], st.rflags) = (d, s, (f & OSZAPC) | 2);
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        (o.state.gpr[0], o.state.rflags & OSZAPC)
    }

    /// Assembles `emit; hlt` for form number `k` (each form has its own
    /// code, so no cached block is ever rewritten behind the CPU's back).
    fn place(vm: &Guest, k: usize, emit: Emit) -> u64 {
        let rip = CODE + 0x40 * k as u64;
        vm.asm(64, rip, |a| {
            emit(a).unwrap();
            a.hlt().unwrap();
        });
        rip
    }

    #[test]
    fn register_forms_match_the_host_cpu() {
        let mut vm = Guest::with_exception_stubs(1);
        for (k, (name, host, emit, defined)) in forms().into_iter().enumerate() {
            let rip = place(&vm, k, emit);
            for d in VALUES {
                for s in VALUES
                    .iter()
                    .chain(&[5, 17, 31, 33, 63, 64, 0xffff_ffef, u64::MAX - 31])
                {
                    for f in [0, OSZAPC] {
                        let (hd, hf) = host(d, *s, f);
                        let (gd, gf) = guest_run(&mut vm, rip, d, *s, f);
                        assert_eq!(gd, hd, "{name} rax={d:#x} rcx={s:#x}: destination");
                        assert_eq!(
                            gf & defined,
                            hf & defined,
                            "{name} rax={d:#x} rcx={s:#x}: flags"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bit_scans_of_zero_set_zf_and_keep_all_64_destination_bits() {
        let mut vm = Guest::with_exception_stubs(1);
        let d = 0x1234_5678_9abc_def0;
        for (k, (name, host, emit, _)) in forms()
            .into_iter()
            .enumerate()
            .filter(|f| f.1.0.starts_with("bs"))
        {
            let rip = place(&vm, k, emit);
            let (hd, hf) = host(d, 0, 0);
            assert_eq!((hd, hf & ZF), (d, ZF), "host {name}");
            assert_eq!(guest_run(&mut vm, rip, d, 0, 0), (d, ZF | PF), "{name}");
            // Only the operand's bits count: 0xffff_0000 is zero as a word.
            let word = name.contains(" ax,");
            let (gd, gf) = guest_run(&mut vm, rip, d, 0xffff_0000, 0);
            assert_eq!(
                (gd == d, gf & ZF),
                (word, if word { ZF } else { 0 }),
                "{name}"
            );
            assert_eq!(
                (gd, gf & ZF),
                {
                    let (h, f) = host(d, 0xffff_0000, 0);
                    (h, f & ZF)
                },
                "{name} vs host"
            );
        }
    }

    /// Flags the manuals leave undefined, as the AMD host leaves them.
    #[test]
    fn undefined_flags_follow_the_measured_hardware() {
        let mut vm = Guest::with_exception_stubs(1);
        let bts = place(&vm, 0, |a| a.bts(rax, rcx));
        // bt* change CF only.
        assert_eq!(guest_run(&mut vm, bts, 1, 0, OSZAPC & !CF), (1, OSZAPC));
        assert_eq!(guest_run(&mut vm, bts, 0, 0, OSZAPC), (1, OSZAPC & !CF));
        let bsr = place(&vm, 1, |a| a.bsr(rax, rcx));
        // bsf/bsr: logic flags of the index, ZF clear.
        assert_eq!(guest_run(&mut vm, bsr, 9, 1, OSZAPC), (0, PF));
        assert_eq!(guest_run(&mut vm, bsr, 9, 0x80, OSZAPC), (7, 0));
        assert_eq!(guest_run(&mut vm, bsr, 9, 0x8000, OSZAPC), (15, PF));
        assert_eq!(
            guest_run(&mut vm, bsr, 9, 0, OF | SF | AF | CF),
            (9, ZF | PF)
        );
    }

    /// The absolute bit numbers set in `len` bytes at `base`.
    fn set_bits(vm: &Guest, base: u64, len: u64) -> Vec<i64> {
        let mut bits = Vec::new();
        for q in (0..len).step_by(8) {
            let v = vm.read_u64(base + q);
            for b in 0..64 {
                if v >> b & 1 != 0 {
                    bits.push((q * 8 + b) as i64);
                }
            }
        }
        bits
    }

    /// Bit-string forms on memory at [rbx] with the offset in rcx, and
    /// their operand size.
    fn mem_forms() -> Vec<(&'static str, Emit, u32)> {
        vec![
            ("bts word", |a| a.bts(word_ptr(rbx), cx), 16),
            ("bts dword", |a| a.bts(dword_ptr(rbx), ecx), 32),
            ("bts qword", |a| a.bts(qword_ptr(rbx), rcx), 64),
            ("btc word", |a| a.btc(word_ptr(rbx), cx), 16),
            ("btc dword", |a| a.btc(dword_ptr(rbx), ecx), 32),
            ("btc qword", |a| a.btc(qword_ptr(rbx), rcx), 64),
            ("lock bts word", |a| a.lock().bts(word_ptr(rbx), cx), 16),
            ("lock bts dword", |a| a.lock().bts(dword_ptr(rbx), ecx), 32),
            ("lock btc qword", |a| a.lock().btc(qword_ptr(rbx), rcx), 64),
        ]
    }

    #[test]
    fn register_offsets_index_memory_bit_strings_beyond_the_operand() {
        let mut vm = Guest::with_exception_stubs(1);
        const AREA: u64 = DATA;
        const LEN: u64 = 0x2000;
        let base = AREA + LEN / 2;
        let offsets: [i64; 22] = [
            0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 100, -1, -2, -15, -16, -17, -32, -33, -64, -65,
            12345, -12345,
        ];
        for (k, (name, emit, bits)) in mem_forms().into_iter().enumerate() {
            let rip = place(&vm, k, emit);
            for off in offsets {
                // Bits above the operand size are ignored: put junk there.
                let junk = if bits == 64 {
                    0
                } else {
                    0x5a5a_0000_0000_0000u64 << (bits - 16)
                };
                let off_reg = ((off as u64) & (u64::MAX >> (64 - bits))) | junk;
                vm.write(AREA, &[0; LEN as usize]);
                let mut st = vm.long_mode(rip);
                (st.gpr[1], st.gpr[3], st.rflags) = (off_reg, base, 2 | CF);
                let o = vm.start(&st);
                assert!(o.halted() && o.vector.is_none(), "{name} {off}: {o:?}");
                assert_eq!(
                    set_bits(&vm, AREA, LEN),
                    [(base - AREA) as i64 * 8 + off],
                    "{name} offset {off}"
                );
                assert_eq!(o.state.rflags & CF, 0, "{name} {off}: CF is the old bit");
                assert_eq!(
                    o.state.gpr[1], off_reg,
                    "{name} {off}: offset register kept"
                );
                // A second run finds the bit set (and btc clears it again).
                let o = vm.start(&st);
                assert_eq!(
                    o.state.rflags & CF,
                    CF,
                    "{name} {off}: CF on the second run"
                );
                let left = if name.contains("btc") {
                    vec![]
                } else {
                    vec![(base - AREA) as i64 * 8 + off]
                };
                assert_eq!(set_bits(&vm, AREA, LEN), left, "{name} {off}: second run");
            }
        }
    }

    #[test]
    fn bt_and_btr_read_and_clear_the_addressed_memory_bit() {
        let mut vm = Guest::with_exception_stubs(1);
        let bt = place(&vm, 0, |a| a.bt(dword_ptr(rbx + 4), ecx));
        let btr = place(&vm, 1, |a| a.lock().btr(qword_ptr(rbx), rcx));
        let bt_imm = place(&vm, 2, |a| a.bt(word_ptr(rbx), 0x2f));
        let btr_imm = place(&vm, 3, |a| a.btr(qword_ptr(rbx), 0xc1));
        let run = |vm: &mut Guest, rip: u64, off_reg: u64| {
            let mut st = vm.long_mode(rip);
            (st.gpr[1], st.gpr[3]) = (off_reg, DATA + 0x100);
            let o = vm.start(&st);
            assert!(o.halted() && o.vector.is_none(), "{o:?}");
            o.state.rflags & CF
        };
        vm.write(DATA, &[0; 0x200]);
        vm.write(DATA + 0x100 - 3, &[0x10]); // bit -20 from [rbx], -52 from [rbx+4]
        assert_eq!(run(&mut vm, bt, (-52i64) as u64), CF);
        assert_eq!(run(&mut vm, bt, (-51i64) as u64), 0);
        assert_eq!(
            run(&mut vm, bt, 0xffff_ffcc),
            CF,
            "a 32-bit offset is sign-extended"
        );
        assert_eq!(run(&mut vm, btr, (-21i64) as u64), 0);
        assert_eq!(run(&mut vm, btr, (-20i64) as u64), CF);
        assert_eq!(set_bits(&vm, DATA, 0x200), [], "btr cleared it");
        // Immediate offsets stay inside the operand (modulo its size).
        vm.write(DATA + 0x101, &[0x80]);
        assert_eq!(run(&mut vm, bt_imm, 0), CF, "bit 15 of the word");
        vm.write(DATA + 0x100, &[0x02]);
        assert_eq!(run(&mut vm, btr_imm, 0), CF, "bit 1 of the qword");
        assert_eq!(set_bits(&vm, DATA, 0x200), [0x101 * 8 + 7]);
    }

    #[test]
    fn bit_string_addresses_wrap_at_the_address_size() {
        // Real mode: bts word [bx], cx with BX=2, CX=-33 reaches word
        // 2 + 2*(-33 >> 4) = -4 = 0xfffc, bit 15.
        let mut vm = Guest::with_exception_stubs(1);
        let rip = 0x8000;
        vm.asm(16, rip, |a| {
            a.bts(word_ptr(bx), cx).unwrap();
            a.hlt().unwrap();
        });
        vm.write(0xfff0, &[0; 16]);
        let mut st = vm.real_mode(rip);
        (st.gpr[1], st.gpr[3]) = (0xffdf, 2);
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        assert_eq!(
            vm.read_u64(0xfff8),
            0x0000_8000_0000_0000,
            "bit 7 of byte 0xfffd"
        );
        assert_eq!(
            set_bits(&vm, 0xfff0, 16),
            [0xd * 8 + 7],
            "one bit, at the wrapped address"
        );
    }

    #[test]
    fn harness_reports_exceptions() {
        let mut vm = Guest::with_exception_stubs(1);
        let rip = place(&vm, 0, |a| a.ud2());
        let o = vm.start(&vm.long_mode(rip));
        assert_eq!(o.vector, Some(6), "{o:?}");
    }

    #[test]
    fn far_bit_offsets_fault_precisely_at_the_addressed_unit() {
        let mut vm = Guest::with_exception_stubs(1);
        let q = place(&vm, 0, |a| a.bts(qword_ptr(rbx), rcx));
        let d = place(&vm, 1, |a| a.lock().btc(dword_ptr(rbx), ecx));
        // (code, rbx, offset, the unit's address): all outside the 1 GiB mapped.
        let cases = [
            (q, DATA, 1u64 << 33, DATA + (1 << 30)),
            (q, DATA, (-(1i64 << 40)) as u64, DATA.wrapping_sub(1 << 37)),
            (d, DATA, 0x8000_0000, DATA.wrapping_sub(1 << 28)),
            (d, 0x3ff0_0000, 0x7fff_ffff, 0x3ff0_0000 + (1 << 28) - 4),
        ];
        for (rip, base, off_reg, fault_addr) in cases {
            vm.write(DATA, &[0; 8]);
            let mut st = vm.long_mode(rip);
            (st.gpr[1], st.gpr[3]) = (off_reg, base);
            let o = vm.start(&st);
            assert_eq!(o.vector, Some(14), "#PF for offset {off_reg:#x}");
            assert_eq!(o.state.cr2, fault_addr, "CR2 for offset {off_reg:#x}");
            assert_eq!(
                (o.state.gpr[1], vm.read_u64(DATA)),
                (off_reg, 0),
                "nothing changed"
            );
        }
    }

    #[test]
    fn bit_string_operations_reach_mmio_through_exits() {
        let mut vm = Guest::with_exception_stubs(1);
        let plain = place(&vm, 0, |a| a.btr(dword_ptr(rbx), ecx));
        let locked = place(&vm, 1, |a| a.lock().btr(dword_ptr(rbx), ecx));
        let read = place(&vm, 2, |a| a.bt(qword_ptr(rbx), rcx));
        for rip in [plain, locked, read] {
            let mut st = vm.long_mode(rip);
            // Unit 0x1000_0008 (not RAM), bit 3.
            (st.gpr[1], st.gpr[3]) = (67, 0x1000_0000);
            let o = vm.start(&st);
            assert!(o.halted() && o.vector.is_none(), "{o:?}");
            assert_eq!(o.state.rflags & CF, CF, "the bit read back from MMIO");
            let writes = if rip == read {
                vec![]
            } else {
                vec![(0x1000_0008, 0xffff_fff7)]
            };
            assert_eq!(o.mmio_writes, writes);
        }
    }

    /// CPUID (leaf, subleaf 0) as the guest sees it: [eax, ebx, ecx, edx].
    fn guest_cpuid(vm: &mut Guest, at: u64, l: u64) -> [u64; 4] {
        let mut st = vm.long_mode(at);
        (st.gpr[0], st.gpr[1]) = (l, 0);
        let o = vm.start(&st);
        assert!(o.halted(), "{o:?}");
        [
            o.state.gpr[0],
            o.state.gpr[3],
            o.state.gpr[1],
            o.state.gpr[2],
        ]
    }

    #[test]
    fn tzcnt_and_lzcnt_count_where_cpuid_says_so_and_are_bsf_bsr_on_qemu64() {
        let mut vm = Guest::with_exception_stubs(1);
        let tz = place(&vm, 0, |a| a.tzcnt(eax, ecx));
        let lz = place(&vm, 1, |a| a.lzcnt(rax, rcx));
        let lz16 = place(&vm, 2, |a| a.lzcnt(ax, cx));
        let cpuid = place(&vm, 3, |a| a.cpuid());
        assert_eq!(guest_run(&mut vm, tz, 77, 0, 0), (32, CF), "tzcnt of 0");
        assert_eq!(guest_run(&mut vm, tz, 77, 0x30, OSZAPC), (4, 0));
        assert_eq!(guest_run(&mut vm, tz, 77, 1, 0), (0, ZF));
        assert_eq!(guest_run(&mut vm, lz, 77, 0x30, 0), (58, 0));
        assert_eq!(guest_run(&mut vm, lz, 77, 0, 0), (64, CF));
        assert_eq!(guest_run(&mut vm, lz, 77, u64::MAX, 0), (0, ZF));
        assert_eq!(
            guest_run(&mut vm, lz16, !0xffff, 0x30, 0),
            (!0xffff | 10, 0)
        );
        assert_eq!(guest_cpuid(&mut vm, cpuid, 7)[1] >> 3 & 1, 1, "BMI1");
        assert_eq!(
            guest_cpuid(&mut vm, cpuid, 0x8000_0001)[2] >> 5 & 1,
            1,
            "LZCNT"
        );
        assert_eq!(guest_cpuid(&mut vm, cpuid, 1)[2] >> 23 & 1, 1, "POPCNT");

        let mut vm = Guest::with_options(
            1,
            crate::EmuOptions {
                cpu_model: crate::cpuid::CpuModel::Qemu64,
                ..Default::default()
            },
        );
        vm.exception_stubs();
        let tz = place(&vm, 0, |a| a.tzcnt(eax, ecx));
        let lz = place(&vm, 1, |a| a.lzcnt(rax, rcx));
        let cpuid = place(&vm, 3, |a| a.cpuid());
        assert_eq!(
            guest_run(&mut vm, tz, 77, 0, 0),
            (77, ZF | PF),
            "bsf keeps the destination"
        );
        assert_eq!(guest_run(&mut vm, tz, 77, 0x30, 0).0, 4);
        assert_eq!(
            guest_run(&mut vm, lz, 77, 0x30, 0).0,
            5,
            "bsr index, not 58 leading zeros"
        );
        assert_eq!(guest_cpuid(&mut vm, cpuid, 7)[1] >> 3 & 1, 0, "no BMI1");
        assert_eq!(
            guest_cpuid(&mut vm, cpuid, 0x8000_0001)[2] >> 5 & 1,
            0,
            "no LZCNT"
        );
        assert_eq!(guest_cpuid(&mut vm, cpuid, 1)[2] >> 23 & 1, 1, "POPCNT");
    }

    #[test]
    fn lock_bts_is_a_spinlock_across_vcpu_threads() {
        const LOCK: u64 = 0x6000;
        const COUNT: u64 = 0x6008;
        const READY: u64 = 0x6010;
        const N: u32 = 1_000_000;
        let mut vm = Guest::with_exception_stubs(2);
        let mut ap = vm.vm.create_vcpu(1).expect("vcpu 1");
        vm.write(LOCK, &[0; 24]);
        // 2 MiB page at the LAPIC (0xfee00000) for the BSP's INIT/SIPI.
        vm.write_u64(0x11000 + 3 * 8, 0xc000_0000 | 0x83);
        // The AP in real mode: lock bts word (immediate form), inc, lock btr.
        vm.asm(16, 0x9000, |a| {
            let mut wait = a.create_label();
            let mut spin = a.create_label();
            a.lock().inc(dword_ptr(READY)).unwrap();
            a.set_label(&mut wait).unwrap();
            a.cmp(dword_ptr(READY), 2).unwrap();
            a.jne(wait).unwrap();
            a.mov(ecx, N).unwrap();
            a.set_label(&mut spin).unwrap();
            a.lock().bts(word_ptr(LOCK), 0).unwrap();
            a.jc(spin).unwrap();
            a.inc(dword_ptr(COUNT)).unwrap();
            a.lock().btr(word_ptr(LOCK), 0).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(spin).unwrap();
            a.hlt().unwrap();
        });
        // The BSP in long mode: start the AP, then the same with register offsets.
        vm.asm(64, CODE, |a| {
            let mut wait = a.create_label();
            let mut spin = a.create_label();
            a.mov(rbx, 0xfee0_0000u64).unwrap();
            a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap();
            a.mov(dword_ptr(rbx + 0x310), 1 << 24).unwrap();
            a.mov(dword_ptr(rbx + 0x300), 0x4500).unwrap(); // INIT
            a.mov(dword_ptr(rbx + 0x300), 0x4609).unwrap(); // SIPI, vector 9
            a.mov(rbx, LOCK).unwrap();
            // Both vCPUs start the loop together.
            a.lock().inc(dword_ptr(READY)).unwrap();
            a.set_label(&mut wait).unwrap();
            a.cmp(dword_ptr(READY), 2).unwrap();
            a.jne(wait).unwrap();
            a.xor(eax, eax).unwrap();
            a.mov(ecx, N).unwrap();
            a.set_label(&mut spin).unwrap();
            a.lock().bts(qword_ptr(rbx), rax).unwrap();
            a.jc(spin).unwrap();
            a.inc(dword_ptr(COUNT)).unwrap();
            a.lock().btr(dword_ptr(rbx), eax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(spin).unwrap();
            a.hlt().unwrap();
        });
        // A lock that is not atomic loses updates: a wrong count, or a
        // lock left set that spins forever, which the watchdog ends.
        let kickers = [vm.vcpu.kicker(), ap.kicker()];
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let waited = done_rx.recv_timeout(std::time::Duration::from_secs(30));
            if waited == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                kickers.iter().for_each(|k| k.kick());
            }
        });
        let ap_thread =
            std::thread::spawn(move || run_vcpu(ap.as_mut(), 10_000, |_| u64::MAX, |_| u64::MAX));
        let st = vm.long_mode(CODE);
        let bsp = vm.start(&st);
        let ap = ap_thread.join().expect("AP thread");
        drop(done_tx);
        watchdog.join().expect("watchdog");
        let left = (bsp.state.gpr[1], ap.state.gpr[1]);
        assert!(
            bsp.halted() && ap.halted(),
            "both finish; iterations left (BSP, AP): {left:?}"
        );
        assert_eq!(
            vm.read_u64(COUNT) as u32,
            2 * N,
            "every increment under the lock"
        );
        assert_eq!(vm.read_u64(LOCK), 0, "lock released");
    }
}
