//! The CPUID model: a qemu64/kvm64-class GenuineIntel family 15 CPU plus
//! x2APIC, TSC-deadline, invariant TSC and a known TSC frequency (leaf
//! 0x15). Feature bits for instruction families are set only when the
//! handler table implements them, so CPUID never promises more than emu
//! does.

use iced_x86::Code;

use crate::cpu::Cpu;
use crate::decode::table::table;
use crate::mem::paging::PHYS_BITS;
use crate::platform::clock::{CRYSTAL_HZ, TSC_HZ};

const VENDOR: &[u8; 12] = b"GenuineIntel";
const BRAND: &[u8; 48] =
    b"vmplay emu x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
const HV_SIGNATURE: &[u8; 12] = b"vmplayemu\0\0\0";

fn reg(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Feature bits that depend on which families exist.
fn has(code: Code) -> bool {
    table().has(code)
}

fn bit(on: bool, n: u32) -> u32 {
    u32::from(on) << n
}

/// CPUID.(leaf, subleaf) for vCPU `cpu`: (eax, ebx, ecx, edx).
pub fn cpuid(cpu: &Cpu, leaf: u32, sub: u32) -> [u32; 4] {
    let id = cpu.id;
    let ncpu = cpu.vm.platform.vcpus() as u32;
    match leaf {
        0 => [0x16, reg(VENDOR, 0), reg(VENDOR, 8), reg(VENDOR, 4)],
        1 => {
            let ecx = bit(has(Code::Addsubpd_xmm_xmmm128), 0)
                | bit(has(Code::Cmpxchg16b_m128), 13)
                | bit(true, 21) // x2APIC
                | bit(true, 24) // TSC-deadline
                | bit(has(Code::Popcnt_r32_rm32), 23)
                | bit(true, 31); // hypervisor
            let edx = bit(has(Code::Fninit), 0)
                | bit(true, 2) // DE
                | bit(true, 3) // PSE
                | bit(true, 4) // TSC
                | bit(true, 5) // MSR
                | bit(true, 6) // PAE
                | bit(has(Code::Cmpxchg8b_m64), 8)
                | bit(true, 9) // APIC
                | bit(true, 11) // SEP
                | bit(true, 13) // PGE
                | bit(has(Code::Cmovb_r32_rm32), 15)
                | bit(true, 16) // PAT
                | bit(true, 17) // PSE-36
                | bit(has(Code::Clflush_m8), 19)
                | bit(has(Code::Paddb_mm_mmm64), 23)
                | bit(has(Code::Fxsave_m512byte), 24)
                | bit(has(Code::Addps_xmm_xmmm128), 25)
                | bit(has(Code::Addpd_xmm_xmmm128), 26);
            [
                0x0000_0f61,
                (id << 24) | ((ncpu & 0xff) << 16) | (8 << 8),
                ecx,
                edx,
            ]
        }
        2 => [1, 0, 0, 0],
        // Leaf 4: no more cache levels described.
        4 => [0, 0, 0, 0],
        // Leaf 7: TSC_ADJUST (EBX bit 1), which with the invariant,
        // known-frequency TSC lets Linux trust the TSC without a watchdog;
        // IA32_ARCH_CAPABILITIES (EDX bit 29), which says this CPU, which
        // does not speculate, has none of the speculation bugs that would
        // make Linux isolate its page tables or clear buffers on exits.
        7 if sub == 0 => [0, 1 << 1, 0, 1 << 29],
        0xb => {
            let shift = 32 - (ncpu.max(1) - 1).leading_zeros();
            match sub {
                0 => [0, 1, 0x100, id],
                1 => [shift, ncpu, 0x201, id],
                _ => [0, 0, sub & 0xff, id],
            }
        }
        0x15 => [1, (TSC_HZ / CRYSTAL_HZ) as u32, CRYSTAL_HZ as u32, 0],
        0x16 => [
            (TSC_HZ / 1_000_000) as u32,
            (TSC_HZ / 1_000_000) as u32,
            (CRYSTAL_HZ / 1_000_000) as u32,
            0,
        ],
        0x4000_0000 => [
            0x4000_0010,
            reg(HV_SIGNATURE, 0),
            reg(HV_SIGNATURE, 4),
            reg(HV_SIGNATURE, 8),
        ],
        // VMware-style timing leaf: TSC and LAPIC bus frequency in kHz.
        0x4000_0010 => [(TSC_HZ / 1000) as u32, (CRYSTAL_HZ / 1000) as u32, 0, 0],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0001 => {
            let ecx = bit(true, 0); // LAHF/SAHF in 64-bit mode
            let edx = bit(true, 11) // SYSCALL
                | bit(true, 20) // NX
                | bit(true, 26) // 1 GiB pages
                | bit(true, 27) // RDTSCP
                | bit(true, 29); // long mode
            [0, 0, ecx, edx]
        }
        0x8000_0002..=0x8000_0004 => {
            let o = ((leaf - 0x8000_0002) * 16) as usize;
            [
                reg(BRAND, o),
                reg(BRAND, o + 4),
                reg(BRAND, o + 8),
                reg(BRAND, o + 12),
            ]
        }
        0x8000_0006 => [0, 0, (512 << 16) | (6 << 12) | 64, 0],
        // Invariant TSC.
        0x8000_0007 => [0, 0, 0, 1 << 8],
        0x8000_0008 => [PHYS_BITS | (48 << 8), 0, 0, 0],
        _ => [0, 0, 0, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_brand_are_readable_text() {
        assert_eq!(&VENDOR[..], b"GenuineIntel");
        assert_eq!(BRAND.len(), 48);
    }
}
