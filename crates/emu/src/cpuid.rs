//! The CPUID model. Feature bits for instruction families are set only
//! when the handler table implements them, so CPUID never promises more
//! than emu does; x2APIC, TSC-deadline, invariant TSC and a known TSC
//! frequency (leaf 0x15) are the platform's. The extensions a modern
//! userland picks code paths by (SSSE3, SSE4.1/4.2, MOVBE, LZCNT, BMI1/2,
//! RDRAND/RDSEED, FSGSBASE, XSAVE/XSAVEOPT with leaf 0xD) are the
//! default model's only; qemu64 keeps its old bits, and the handlers of
//! those sets raise #UD on it.
//!
//! [`CpuModel::Vmplay`] (the default) tells Linux the truth that matters
//! for speed: this CPU does not speculate. Linux has no architectural bit
//! for "not affected by Spectre v1/v2"; it keeps a list of CPUs that do
//! not speculate, and the one 64-bit family-6 Intel entry on it is the
//! in-order Atom (Bonnell, family 6 model 0x1c). So the model reports that
//! family/model (stepping 10, past Bonnell's PSE erratum), plus
//! IA32_ARCH_CAPABILITIES with every NO bit for the checks done before
//! that list. Debian's kernel then runs without page-table isolation,
//! retpolines, RSB filling, return thunks or VERW, all pure cost here.
//! Family 6 also gives REP_GOOD, and ERMS/FSRM say `rep movsb`/`stosb` are
//! the fast copy, true here where one string instruction moves a whole
//! host range. The cache leaves (2, 4, 0x8000_0006) describe one
//! consistent hierarchy.

use iced_x86::Code;

use crate::cpu::Cpu;
use crate::decode::table::table;
use crate::isa::xsave::{XCR0_SUPPORTED, XSAVE_SIZE};
use crate::mem::paging::PHYS_BITS;
use crate::platform::clock::{CRYSTAL_HZ, TSC_HZ};

const VENDOR: &[u8; 12] = b"GenuineIntel";
const BRAND: &[u8; 48] =
    b"vmplay emu x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
const HV_SIGNATURE: &[u8; 12] = b"vmplayemu\0\0\0";

/// The CPU the guest is told it runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuModel {
    /// Family 6 model 0x1c stepping 10 (a CPU Linux knows does not
    /// speculate), IA32_ARCH_CAPABILITIES, ERMS/FSRM, leaf-4 caches.
    #[default]
    Vmplay,
    /// The earlier qemu64-class family 15 model, which says nothing about
    /// speculation, so Linux turns every mitigation on. Kept so the bench
    /// can measure what the model costs or saves (`VMPLAY_EMU_CPU=qemu64`).
    Qemu64,
    /// [`CpuModel::Vmplay`] without the newer instruction sets (SSSE3,
    /// SSE4.x, MOVBE, LZCNT, BMI1/2, RDRAND/RDSEED, FSGSBASE, XSAVE): what
    /// those sets alone change in a workload (`VMPLAY_EMU_CPU=vmplay-baseline`).
    VmplayBaseline,
}

impl CpuModel {
    /// Tells Linux it does not speculate (family 6 model 0x1c, ARCH_CAPABILITIES).
    pub fn no_speculation(self) -> bool {
        self != CpuModel::Qemu64
    }

    /// Advertises and implements the newer instruction sets.
    pub fn extensions(self) -> bool {
        self == CpuModel::Vmplay
    }
}

impl std::str::FromStr for CpuModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vmplay" => Ok(CpuModel::Vmplay),
            "qemu64" => Ok(CpuModel::Qemu64),
            "vmplay-baseline" => Ok(CpuModel::VmplayBaseline),
            _ => Err(format!(
                "unknown emu CPU model {s:?} (vmplay, vmplay-baseline or qemu64)"
            )),
        }
    }
}

/// One level of the cache hierarchy leaves 4 and 0x8000_0006 describe.
struct Cache {
    /// 1 data, 2 instruction, 3 unified.
    kind: u32,
    level: u32,
    kib: u32,
    ways: u32,
}

const LINE: u32 = 64;
const CACHES: [Cache; 3] = [
    Cache {
        kind: 1,
        level: 1,
        kib: 32,
        ways: 8,
    },
    Cache {
        kind: 2,
        level: 1,
        kib: 32,
        ways: 8,
    },
    Cache {
        kind: 3,
        level: 2,
        kib: 512,
        ways: 8,
    },
];

/// Leaf 4, subleaf `sub`: deterministic cache parameters, one core per
/// cache, `ncpu` cores in the package.
fn cache_leaf(sub: u32, ncpu: u32) -> [u32; 4] {
    let Some(c) = CACHES.get(sub as usize) else {
        return [0; 4];
    };
    let cores = (ncpu.clamp(1, 64) - 1) << 26;
    let eax = c.kind | c.level << 5 | 1 << 8 | cores;
    let ebx = (LINE - 1) | (c.ways - 1) << 22;
    let sets = c.kib * 1024 / (c.ways * LINE);
    [eax, ebx, sets - 1, 0]
}

/// The 0x8000_0006 associativity code for `ways`.
fn amd_assoc(ways: u32) -> u32 {
    match ways {
        1 => 1,
        2 => 2,
        4 => 4,
        8 => 6,
        16 => 8,
        _ => 0xf,
    }
}

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
    let mut r = model_leaf(
        cpu.vm.cpu_model,
        cpu.vm.platform.vcpus() as u32,
        cpu.id,
        leaf,
        sub,
    );
    let misc = cpu.msr.misc_enable;
    match leaf {
        // IA32_MISC_ENABLE.LIMIT_CPUID: leaf 0 reports at most leaf 2.
        0 if misc & crate::msr::MISC_LIMIT_CPUID != 0 => r[0] = r[0].min(2),
        1 => {
            // OSXSAVE (ECX 27) mirrors CR4.OSXSAVE.
            if cpu.cr4 & crate::isa::xsave::CR4_OSXSAVE != 0 {
                r[2] |= 1 << 27;
            }
            // APIC (EDX 9) follows IA32_APIC_BASE.EN, as on hardware.
            if !cpu.apic_enabled() {
                r[3] &= !(1 << 9);
            }
        }
        // IA32_MISC_ENABLE.XD_DISABLE hides NX.
        0x8000_0001 if misc & crate::msr::MISC_XD_DISABLE != 0 => r[3] &= !(1 << 20),
        _ => {}
    }
    r
}

/// CPUID.(leaf, subleaf) of `model` for vCPU `id` of `ncpu`.
pub fn model_leaf(model: CpuModel, ncpu: u32, id: u32, leaf: u32, sub: u32) -> [u32; 4] {
    let vmplay = model.no_speculation();
    let ext = model.extensions();
    match leaf {
        0 => [0x16, reg(VENDOR, 0), reg(VENDOR, 8), reg(VENDOR, 4)],
        1 => {
            let ecx = bit(has(Code::Addsubpd_xmm_xmmm128), 0)
                | bit(ext && has(Code::Pshufb_xmm_xmmm128), 9)
                | bit(ext && has(Code::Dpps_xmm_xmmm128_imm8), 19)
                | bit(ext && has(Code::Pcmpistri_xmm_xmmm128_imm8), 20)
                | bit(has(Code::Cmpxchg16b_m128), 13)
                | bit(true, 21) // x2APIC
                | bit(true, 24) // TSC-deadline
                | bit(ext && has(Code::Xsave_mem), 26)
                | bit(ext && has(Code::Rdrand_r64), 30)
                | bit(ext && has(Code::Movbe_r32_m32), 22)
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
                if vmplay { 0x0001_06ca } else { 0x0000_0f61 },
                (id << 24) | ((ncpu & 0xff) << 16) | (8 << 8),
                ecx,
                edx,
            ]
        }
        // Leaf 2: one descriptor, 0xff: "see leaf 4".
        2 if vmplay => [0x0000_ff01, 0, 0, 0],
        2 => [1, 0, 0, 0],
        4 if vmplay => cache_leaf(sub, ncpu),
        4 => [0, 0, 0, 0],
        // Leaf 7: TSC_ADJUST (EBX bit 1), which with the invariant,
        // known-frequency TSC lets Linux trust the TSC without a watchdog;
        // then ERMS (EBX 9), FSRM (EDX 4) and IA32_ARCH_CAPABILITIES (EDX
        // 29), which says this CPU has none of the speculation bugs that
        // would make Linux isolate its page tables or clear buffers.
        // FSGSBASE (EBX 0), BMI1 (EBX 3), BMI2 (EBX 8) and RDSEED (EBX
        // 18) with their instructions.
        7 if sub == 0 && vmplay => {
            let ebx = bit(ext && has(Code::Wrfsbase_r64), 0)
                | 1 << 1
                | bit(
                    ext && has(Code::VEX_Andn_r64_r64_rm64) && has(Code::Tzcnt_r64_rm64),
                    3,
                )
                | bit(ext && has(Code::VEX_Pdep_r64_r64_rm64), 8)
                | 1 << 9
                | bit(ext && has(Code::Rdseed_r64), 18);
            [0, ebx, 0, 1 << 4 | 1 << 29]
        }
        7 if sub == 0 => [0, 1 << 1, 0, 0],
        // Leaf 0xD: the XSAVE components (x87, SSE), the standard image
        // (legacy region + header) and XSAVEOPT.
        0xd if ext && has(Code::Xsave_mem) => match sub {
            0 => [
                XCR0_SUPPORTED as u32,
                XSAVE_SIZE,
                XSAVE_SIZE,
                (XCR0_SUPPORTED >> 32) as u32,
            ],
            1 => [bit(has(Code::Xsaveopt_mem), 0), 0, 0, 0],
            _ => [0; 4],
        },
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
            let ecx = bit(true, 0) // LAHF/SAHF in 64-bit mode
                | bit(ext && has(Code::Lzcnt_r64_rm64), 5);
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
        0x8000_0006 => {
            let l2 = &CACHES[2];
            [0, 0, l2.kib << 16 | amd_assoc(l2.ways) << 12 | LINE, 0]
        }
        // Invariant TSC.
        0x8000_0007 => [0, 0, 0, 1 << 8],
        0x8000_0008 => [PHYS_BITS | (48 << 8), 0, 0, 0],
        _ => [0, 0, 0, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::CpuidFeature;

    #[test]
    fn leaf_4_describes_the_same_l2_as_leaf_0x8000_0006() {
        let l2 = cache_leaf(2, 2);
        assert_eq!(l2[0] & 0x1f, 3, "unified");
        assert_eq!((l2[0] >> 5) & 7, 2, "level 2");
        assert_eq!(l2[0] >> 26, 1, "two cores");
        let ways = (l2[1] >> 22) + 1;
        let line = (l2[1] & 0xfff) + 1;
        let size = ways * line * (l2[2] + 1);
        assert_eq!(size, 512 * 1024);
        assert_eq!(line, LINE);
        assert_eq!(amd_assoc(ways), 6);
        assert_eq!(cache_leaf(3, 1), [0; 4], "the list ends");
        for sub in 0..3 {
            let c = cache_leaf(sub, 1);
            let bytes = ((c[1] >> 22) + 1) * ((c[1] & 0xfff) + 1) * (c[2] + 1);
            assert_eq!(bytes, CACHES[sub as usize].kib * 1024);
        }
    }

    /// The instruction-set bits of CPUID and the iced feature each names.
    const ISA_BITS: &[(u32, usize, u32, CpuidFeature)] = &[
        // (leaf, register: 1 ebx 2 ecx 3 edx, bit, feature)
        (1, 2, 0, CpuidFeature::SSE3),
        (1, 2, 1, CpuidFeature::PCLMULQDQ),
        (1, 2, 3, CpuidFeature::MONITOR),
        (1, 2, 9, CpuidFeature::SSSE3),
        (1, 2, 12, CpuidFeature::FMA),
        (1, 2, 13, CpuidFeature::CMPXCHG16B),
        (1, 2, 19, CpuidFeature::SSE4_1),
        (1, 2, 20, CpuidFeature::SSE4_2),
        (1, 2, 22, CpuidFeature::MOVBE),
        (1, 2, 23, CpuidFeature::POPCNT),
        (1, 2, 25, CpuidFeature::AES),
        (1, 2, 26, CpuidFeature::XSAVE),
        (1, 2, 28, CpuidFeature::AVX),
        (1, 2, 29, CpuidFeature::F16C),
        (1, 2, 30, CpuidFeature::RDRAND),
        (1, 3, 0, CpuidFeature::FPU),
        (1, 3, 4, CpuidFeature::TSC),
        (1, 3, 5, CpuidFeature::MSR),
        (1, 3, 8, CpuidFeature::CX8),
        (1, 3, 11, CpuidFeature::SEP),
        (1, 3, 15, CpuidFeature::CMOV),
        (1, 3, 19, CpuidFeature::CLFSH),
        (1, 3, 23, CpuidFeature::MMX),
        (1, 3, 24, CpuidFeature::FXSR),
        (1, 3, 25, CpuidFeature::SSE),
        (1, 3, 26, CpuidFeature::SSE2),
        (7, 1, 0, CpuidFeature::FSGSBASE),
        (7, 1, 3, CpuidFeature::BMI1),
        (7, 1, 5, CpuidFeature::AVX2),
        (7, 1, 8, CpuidFeature::BMI2),
        (7, 1, 18, CpuidFeature::RDSEED),
        (7, 1, 19, CpuidFeature::ADX),
        (7, 1, 23, CpuidFeature::CLFLUSHOPT),
        (7, 1, 24, CpuidFeature::CLWB),
        (7, 1, 29, CpuidFeature::SHA),
        (0x8000_0001, 2, 5, CpuidFeature::LZCNT),
        (0x8000_0001, 3, 11, CpuidFeature::SYSCALL),
        (0x8000_0001, 3, 27, CpuidFeature::RDTSCP),
    ];

    /// What every x86-64 CPU has, with no CPUID bit of its own.
    const BASE: &[CpuidFeature] = &[
        CpuidFeature::INTEL8086,
        CpuidFeature::INTEL186,
        CpuidFeature::INTEL286,
        CpuidFeature::INTEL386,
        CpuidFeature::INTEL486,
        CpuidFeature::X64,
        CpuidFeature::CPUID,
        CpuidFeature::FPU287,
        CpuidFeature::FPU387,
        CpuidFeature::MULTIBYTENOP,
        CpuidFeature::PAUSE,
    ];

    /// Every instruction-set bit the model sets is backed by every
    /// legacy- or VEX-encoded 64-bit-mode instruction of that set (an
    /// instruction needing several sets counts once all of them are
    /// advertised).
    #[test]
    fn every_advertised_instruction_set_is_implemented_whole() {
        for model in [CpuModel::Vmplay, CpuModel::VmplayBaseline, CpuModel::Qemu64] {
            let advertised: Vec<CpuidFeature> = ISA_BITS
                .iter()
                .filter(|(leaf, r, bit, _)| model_leaf(model, 1, 0, *leaf, 0)[*r] & (1 << bit) != 0)
                .map(|x| x.3)
                .collect();
            assert!(advertised.contains(&CpuidFeature::SSE2), "{advertised:?}");
            let mut missing = Vec::new();
            for code in Code::values() {
                let op = code.op_code();
                if code == Code::INVALID
                    || !op.is_instruction()
                    || !matches!(
                        op.encoding(),
                        iced_x86::EncodingKind::Legacy | iced_x86::EncodingKind::VEX
                    )
                    || !op.mode64()
                {
                    continue;
                }
                let f = code.cpuid_features();
                let named = f.iter().any(|x| advertised.contains(x));
                let all_there = f.iter().all(|x| advertised.contains(x) || BASE.contains(x));
                if named && all_there && !has(code) {
                    missing.push(code);
                }
            }
            assert!(
                missing.is_empty(),
                "{model:?} advertises sets emu only partly implements: {missing:?}"
            );
        }
    }

    #[test]
    fn cpu_models_parse_by_name() {
        assert_eq!("vmplay".parse::<CpuModel>(), Ok(CpuModel::Vmplay));
        assert_eq!("qemu64".parse::<CpuModel>(), Ok(CpuModel::Qemu64));
        assert_eq!(
            "vmplay-baseline".parse::<CpuModel>(),
            Ok(CpuModel::VmplayBaseline)
        );
        assert!("pentium".parse::<CpuModel>().is_err());
    }

    #[test]
    fn vendor_and_brand_are_readable_text() {
        assert_eq!(&VENDOR[..], b"GenuineIntel");
        assert_eq!(BRAND.len(), 48);
    }
}
