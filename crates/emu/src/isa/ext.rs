//! General-purpose extensions outside BMI: MOVBE, CRC32 (SSE4.2),
//! RDRAND/RDSEED and FSGSBASE. Each form raises #UD on a CPU model
//! that does not advertise its set (qemu64), as such a CPU does.

use crate::cpu::fault::{Fault, Res};
use crate::cpu::flags::CF;
use crate::cpu::width::{W8, W16, W32, W64, Width};
use crate::cpu::{Cpu, FS, GS, Mode};
use crate::decode::{Insn, Table};
use crate::isa::bmi::modern;
use crate::isa::c;

/// The low `W::BYTES` bytes of `v` in reverse order.
#[inline(always)]
fn swap<W: Width>(v: u64) -> u64 {
    v.swap_bytes() >> (64 - W::BITS)
}

/// movbe r, m: load with the bytes reversed (16-bit: the low word only).
fn movbe_load<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    let v = cpu.read_mem::<W>(i)?;
    W::set(&mut cpu.gpr, i.r0, swap::<W>(v));
    Ok(())
}

/// movbe m, r: store with the bytes reversed.
fn movbe_store<W: Width>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    let v = W::get(&cpu.gpr, i.r1);
    cpu.write_mem::<W>(i, swap::<W>(v))
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one byte at a
/// time.
const CRC32C: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut k = 0;
    while k < 256 {
        let mut c = k as u32;
        let mut b = 0;
        while b < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            b += 1;
        }
        t[k] = c;
        k += 1;
    }
    t
};

/// The CRC-32C of the `bytes` low bytes of `v` (little-endian), from `crc`.
pub(crate) fn crc32c(mut crc: u32, v: u64, bytes: usize) -> u32 {
    for k in 0..bytes {
        let b = (v >> (8 * k)) as u8;
        crc = (crc >> 8) ^ CRC32C[usize::from(crc as u8 ^ b)];
    }
    crc
}

/// crc32 r32/r64, r/m8..64 (SSE4.2): accumulates the source's bytes into
/// the low 32 bits of the destination (the 64-bit form zero-extends).
fn crc32<D: Width, S: Width, const MEM: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    let v = if MEM {
        cpu.read_mem::<S>(i)?
    } else {
        S::get(&cpu.gpr, i.r1)
    };
    let crc = crc32c(W32::get(&cpu.gpr, i.r0) as u32, v, S::BYTES);
    D::set(&mut cpu.gpr, i.r0, u64::from(crc));
    Ok(())
}

/// 64 random bits from the host's generator: its RDRAND/RDSEED when it
/// has one (`seed`: RDSEED), else getrandom(2). `None` when the source
/// has nothing now (the guest sees CF = 0, as hardware can report).
fn host_random(seed: bool) -> Option<u64> {
    #[target_feature(enable = "rdrand")]
    fn rdrand() -> Option<u64> {
        let mut v = 0u64;
        for _ in 0..10 {
            if core::arch::x86_64::_rdrand64_step(&mut v) == 1 {
                return Some(v);
            }
        }
        None
    }
    #[target_feature(enable = "rdseed")]
    fn rdseed() -> Option<u64> {
        let mut v = 0u64;
        (core::arch::x86_64::_rdseed64_step(&mut v) == 1).then_some(v)
    }
    if seed && std::arch::is_x86_feature_detected!("rdseed") {
        // SAFETY: feature checked just above.
        return unsafe { rdseed() };
    }
    if !seed && std::arch::is_x86_feature_detected!("rdrand") {
        // SAFETY: feature checked just above.
        return unsafe { rdrand() };
    }
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    (n == 8).then(|| u64::from_le_bytes(b))
}

/// rdrand/rdseed r16/r32/r64: a random value and CF = 1 (or 0 and CF =
/// 0 when none is available); OF, SF, ZF, AF and PF cleared.
fn rdrand<W: Width, const SEED: bool>(cpu: &mut Cpu, i: &Insn) -> Res {
    if !modern(cpu) {
        return Err(Fault::ud());
    }
    let (v, cf) = match host_random(SEED) {
        Some(v) => (v, CF),
        None => (0, 0),
    };
    W::set(&mut cpu.gpr, i.r0, v & W::MASK);
    cpu.flags.set_bits(cf);
    Ok(())
}

/// CR4.FSGSBASE: rdfsbase and friends usable.
pub(crate) const CR4_FSGSBASE: u64 = 1 << 16;

#[inline(always)]
fn fsgsbase_ok(cpu: &Cpu) -> Res {
    if cpu.cr4 & CR4_FSGSBASE == 0 || cpu.mode != Mode::Long {
        return Err(Fault::ud());
    }
    Ok(())
}

/// rdfsbase/rdgsbase r32/r64 (`SEG` FS or GS): the segment base (32-bit
/// forms: its low half, zero-extended).
fn rdbase<W: Width, const SEG: usize>(cpu: &mut Cpu, i: &Insn) -> Res {
    fsgsbase_ok(cpu)?;
    let v = cpu.seg[SEG].base;
    W::set(&mut cpu.gpr, i.r0, v & W::MASK);
    Ok(())
}

/// wrfsbase/wrgsbase r32/r64: a new base (32-bit forms zero-extend);
/// #GP(0) when not canonical.
fn wrbase<W: Width, const SEG: usize>(cpu: &mut Cpu, i: &Insn) -> Res {
    fsgsbase_ok(cpu)?;
    let v = W::get(&cpu.gpr, i.r0);
    if !crate::cpu::canonical(v) {
        return Err(Fault::gp(0));
    }
    cpu.seg[SEG].base = v;
    cpu.stop = true;
    Ok(())
}

pub(crate) fn register(t: &mut Table) {
    t.add(c("Rdrand_r16"), rdrand::<W16, false>);
    t.add(c("Rdrand_r32"), rdrand::<W32, false>);
    t.add(c("Rdrand_r64"), rdrand::<W64, false>);
    t.add(c("Rdseed_r16"), rdrand::<W16, true>);
    t.add(c("Rdseed_r32"), rdrand::<W32, true>);
    t.add(c("Rdseed_r64"), rdrand::<W64, true>);
    t.add(c("Rdfsbase_r32"), rdbase::<W32, FS>);
    t.add(c("Rdfsbase_r64"), rdbase::<W64, FS>);
    t.add(c("Rdgsbase_r32"), rdbase::<W32, GS>);
    t.add(c("Rdgsbase_r64"), rdbase::<W64, GS>);
    t.add_stop(c("Wrfsbase_r32"), wrbase::<W32, FS>);
    t.add_stop(c("Wrfsbase_r64"), wrbase::<W64, FS>);
    t.add_stop(c("Wrgsbase_r32"), wrbase::<W32, GS>);
    t.add_stop(c("Wrgsbase_r64"), wrbase::<W64, GS>);
    t.rm(
        c("Crc32_r32_rm8"),
        crc32::<W32, W8, false>,
        crc32::<W32, W8, true>,
    );
    t.rm(
        c("Crc32_r64_rm8"),
        crc32::<W64, W8, false>,
        crc32::<W64, W8, true>,
    );
    t.rm(
        c("Crc32_r32_rm16"),
        crc32::<W32, W16, false>,
        crc32::<W32, W16, true>,
    );
    t.rm(
        c("Crc32_r32_rm32"),
        crc32::<W32, W32, false>,
        crc32::<W32, W32, true>,
    );
    t.rm(
        c("Crc32_r64_rm64"),
        crc32::<W64, W64, false>,
        crc32::<W64, W64, true>,
    );
    t.add(c("Movbe_r16_m16"), movbe_load::<W16>);
    t.add(c("Movbe_r32_m32"), movbe_load::<W32>);
    t.add(c("Movbe_r64_m64"), movbe_load::<W64>);
    t.add(c("Movbe_m16_r16"), movbe_store::<W16>);
    t.add(c("Movbe_m32_r32"), movbe_store::<W32>);
    t.add(c("Movbe_m64_r64"), movbe_store::<W64>);
}

#[cfg(test)]
mod tests {
    use crate::cpu::flags::{CF, OSZAPC};
    use crate::tests::guest::{CODE, Guest};
    use iced_x86::code_asm::*;

    /// The host's RFLAGS (arithmetic bits) after rdrand/rdseed with all of
    /// them set before.
    fn host_flags(seed: bool) -> u64 {
        let mut f: u64 = OSZAPC | 2;
        // SAFETY: register-only instructions between a flags load and a
        // flags store on the stack; the caller checked the features.
        unsafe {
            if seed {
                core::arch::asm!("push {f}", "popfq", "rdseed {v}", "pushfq", "pop {f}",
                    f = inout(reg) f, v = out(reg) _);
            } else {
                core::arch::asm!("push {f}", "popfq", "rdrand {v}", "pushfq", "pop {f}",
                    f = inout(reg) f, v = out(reg) _);
            }
        }
        f & OSZAPC
    }

    #[test]
    fn rdrand_and_rdseed_give_fresh_values_with_the_hosts_flags() {
        let mut vm = Guest::with_exception_stubs(1);
        vm.asm(64, CODE, |a| {
            a.rdrand(rax).unwrap();
            a.rdrand(ecx).unwrap();
            a.rdseed(rdx).unwrap();
            a.rdrand(si).unwrap();
            a.hlt().unwrap();
        });
        let mut st = vm.long_mode(CODE);
        st.rflags = OSZAPC | 2;
        st.gpr[6] = 0x1111_2222_3333_4444;
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        let g = &o.state.gpr;
        assert_eq!(o.state.rflags & OSZAPC, CF, "CF only");
        assert_ne!(g[0], g[2], "two 64-bit draws differ");
        assert_eq!(g[1] >> 32, 0, "32-bit form zero-extends");
        assert_eq!(g[6] >> 16, 0x1111_2222_3333, "16-bit form merges");
        if std::arch::is_x86_feature_detected!("rdrand") {
            assert_eq!(host_flags(false), CF);
        }
        if std::arch::is_x86_feature_detected!("rdseed") {
            // RDSEED may run dry on the host (CF = 0): only check the rest.
            assert_eq!(host_flags(true) & !CF, 0);
        }
    }

    #[test]
    fn fsgsbase_needs_cr4_and_writes_canonical_bases() {
        let mut vm = Guest::with_exception_stubs(1);
        let end = vm.asm(64, CODE, |a| {
            a.wrfsbase(rax).unwrap();
            a.rdfsbase(rcx).unwrap();
            a.wrgsbase(edx).unwrap();
            a.rdgsbase(rsi).unwrap();
            a.rdfsbase(edi).unwrap();
            a.hlt().unwrap();
        });
        let mut st = vm.long_mode(CODE);
        (st.gpr[0], st.gpr[2]) = (0xffff_8000_1234_5678, 0xffff_ffff_8765_4321);
        // CR4.FSGSBASE clear: #UD.
        let o = vm.start(&st);
        assert_eq!(o.vector, Some(6), "{o:?}");
        st.cr4 |= super::CR4_FSGSBASE;
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        assert_eq!(o.state.fs.base, 0xffff_8000_1234_5678);
        assert_eq!(o.state.gs.base, 0x8765_4321, "32-bit write zero-extends");
        assert_eq!(o.state.gpr[1], 0xffff_8000_1234_5678);
        assert_eq!(o.state.gpr[6], 0x8765_4321);
        assert_eq!(o.state.gpr[7], 0x1234_5678, "32-bit read: low half");
        // A non-canonical base: #GP, the base unchanged.
        st.gpr[0] = 0x0000_8000_0000_0000;
        let o = vm.start(&st);
        assert_eq!(o.vector, Some(13), "{o:?}");
        assert_eq!(o.state.fs.base, 0);
        // The guest sets CR4.FSGSBASE itself (mov cr4), as Linux does.
        let set = end + 0x10;
        vm.asm(64, set, |a| {
            a.mov(rax, cr4).unwrap();
            a.or(eax, 1 << 16).unwrap();
            a.mov(cr4, rax).unwrap();
            a.mov(rax, 0x5000u64).unwrap();
            a.wrfsbase(rax).unwrap();
            a.hlt().unwrap();
        });
        let mut st = vm.long_mode(set);
        let o = vm.start(&st);
        assert!(o.halted() && o.vector.is_none(), "{o:?}");
        assert_eq!(o.state.fs.base, 0x5000);
        // qemu64 advertises no FSGSBASE: the CR4 bit is reserved there.
        let mut vm = Guest::with_options(
            1,
            crate::EmuOptions {
                cpu_model: crate::cpuid::CpuModel::Qemu64,
                ..Default::default()
            },
        );
        vm.exception_stubs();
        vm.asm(64, set, |a| {
            a.mov(rax, cr4).unwrap();
            a.or(eax, 1 << 16).unwrap();
            a.mov(cr4, rax).unwrap();
            a.hlt().unwrap();
        });
        st = vm.long_mode(set);
        let o = vm.start(&st);
        assert_eq!(o.vector, Some(13), "{o:?}");
    }

    #[test]
    fn software_crc32c_matches_the_host() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            return;
        }
        for (crc, v) in [
            (0u32, 0u64),
            (!0, 0x1234_5678_9abc_def0),
            (0xdead_beef, u64::MAX),
        ] {
            // SAFETY: the CPU has SSE4.2 (checked above).
            let (b, w, d, q) = unsafe {
                use core::arch::x86_64::*;
                (
                    _mm_crc32_u8(crc, v as u8),
                    _mm_crc32_u16(crc, v as u16),
                    _mm_crc32_u32(crc, v as u32),
                    _mm_crc32_u64(u64::from(crc), v) as u32,
                )
            };
            assert_eq!(super::crc32c(crc, v, 1), b);
            assert_eq!(super::crc32c(crc, v, 2), w);
            assert_eq!(super::crc32c(crc, v, 4), d);
            assert_eq!(super::crc32c(crc, v, 8), q);
        }
    }
}
