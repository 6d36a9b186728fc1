//! General-purpose extensions outside BMI: MOVBE, CRC32 (SSE4.2) (and, as
//! they land, RDRAND/RDSEED, FSGSBASE). Each form raises #UD on a CPU model
//! that does not advertise its set (qemu64), as such a CPU does.

use crate::cpu::Cpu;
use crate::cpu::fault::{Fault, Res};
use crate::cpu::width::{W8, W16, W32, W64, Width};
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

pub(crate) fn register(t: &mut Table) {
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
