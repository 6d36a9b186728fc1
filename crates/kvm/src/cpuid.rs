//! Per-vCPU CPUID: KVM's supported list, made to describe this vCPU in a
//! machine of `count` vCPUs, one thread per core, all cores in one socket.
//!
//! KVM passes much of the host topology through (or zeroes it); a guest
//! that reads APIC IDs and core counts from CPUID must see its own machine.

use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX: the TSC-deadline LAPIC timer mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX (AMD): core count comes from 0x8000_0008.
const ECX_CMP_LEGACY: u32 = 1 << 1;

/// Topology level types in leaves 0xB and 0x1F, ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0", the signature Linux looks for to use KVM's
/// paravirtual features.
const KVM_SIGNATURE: [u32; 3] = [
    u32::from_le_bytes(*b"KVMK"),
    u32::from_le_bytes(*b"VMKV"),
    u32::from_le_bytes(*b"M\0\0\0"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    /// AMD and Hygon: topology in the 0x8000_00xx leaves.
    Amd,
    Other,
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = find(entries, LEAF_VENDOR, 0) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// Bits an ID needs to number `count` things (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// The CPUID vCPU `id` of `count` shows its guest, from KVM's supported
/// list. `tsc_deadline` is whether KVM emulates the TSC-deadline timer
/// (KVM reports it as a capability, not in the supported CPUID).
pub(crate) fn normalise(
    supported: &[kvm_cpuid_entry2],
    id: u32,
    count: u32,
    tsc_deadline: bool,
) -> Vec<kvm_cpuid_entry2> {
    let vendor = vendor(supported);
    let max_basic = find(supported, LEAF_VENDOR, 0).map_or(0, |e| e.eax);
    let has_v2_topology = supported.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);
    let pkg_bits = id_bits(count);

    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| {
            !matches!(
                e.function,
                LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 | LEAF_HYPERVISOR | LEAF_KVM_FEATURES
            )
        })
        .copied()
        .collect();

    for e in &mut out {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC ID, logical processors per package,
                // CLFLUSH line size in 8-byte units (64 bytes).
                e.ebx = (id << 24) | (count.min(0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel && e.eax & 0x1f != 0 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: logical
                // processors sharing this cache - 1. One thread per core,
                // so only the last level (L3) is shared, by every core.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax &= !((0x3f << 26) | (0xfff << 14));
                e.eax |= ((count - 1).min(0x3f) << 26) | (sharing.min(0xfff) << 14);
            }
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDRESS_SIZES if vendor == Vendor::Amd => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID bits for the core.
                e.ecx &= !(0xff | (0xf << 12));
                e.ecx |= (count - 1).min(0xff) | (pkg_bits << 12);
            }
            LEAF_EXT_APIC_ID if vendor == Vendor::Amd => {
                // Extended APIC ID; core ID with one thread per core; one node.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }

    if max_basic >= LEAF_TOPOLOGY {
        out.extend(topology_leaf(LEAF_TOPOLOGY, id, count));
    }
    if max_basic >= LEAF_TOPOLOGY_V2 && has_v2_topology {
        out.extend(topology_leaf(LEAF_TOPOLOGY_V2, id, count));
    }

    let kvm_features = supported
        .iter()
        .find(|e| e.function == LEAF_KVM_FEATURES)
        .copied()
        .unwrap_or(kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            ..Default::default()
        });
    out.push(kvm_cpuid_entry2 {
        function: LEAF_HYPERVISOR,
        eax: LEAF_KVM_FEATURES,
        ebx: KVM_SIGNATURE[0],
        ecx: KVM_SIGNATURE[1],
        edx: KVM_SIGNATURE[2],
        ..Default::default()
    });
    out.push(kvm_features);
    out
}

/// Leaf 0xB or 0x1F: an SMT level of one thread, a core level of `count`
/// cores, then the invalid level that ends the list. EDX is the x2APIC ID
/// on every subleaf.
fn topology_leaf(function: u32, id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: id,
        ..Default::default()
    };
    [
        // EAX: bits to shift the x2APIC ID right to reach the next level.
        entry(0, 0, 1, LEVEL_SMT),
        entry(1, id_bits(count), count, LEVEL_CORE),
        entry(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_leaf(name: &[u8; 12], max: u32) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        leaf(0, 0, [max, word(0), word(8), word(4)])
    }

    fn get(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(entries, function, index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    fn intel_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(b"GenuineIntel", 0x1f),
            // Host-looking leaf 1: APIC ID 0x17, 64 logical CPUs.
            leaf(1, 0, [0x906ea, 0x1740_0800, 0x7ffa_3203, 0x0f8b_fbff]),
            // L1d (level 1, type 1) and L3 (level 3, type 3) of a big host.
            leaf(4, 0, [0xfc00_4121, 0x01c0_003f, 0x3f, 0]),
            leaf(4, 3, [0xfc07_c163, 0x04c0_003f, 0x3fff, 6]),
            leaf(0xb, 0, [1, 2, 0x100, 0x17]),
            leaf(0xb, 1, [7, 64, 0x201, 0x17]),
            leaf(0x1f, 0, [1, 2, 0x100, 0x17]),
            leaf(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            leaf(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
        ]
    }

    #[test]
    fn leaf_1_names_this_vcpu_and_the_hypervisor() {
        let out = normalise(&intel_host(), 3, 4, true);
        let l1 = get(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors per package");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = get(&normalise(&intel_host(), 0, 1, false), 1, 0);
        assert_eq!(single.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_socket_of_single_thread_cores() {
        let out = normalise(&intel_host(), 2, 3, true);
        for function in [0xb, 0x1f] {
            let smt = get(&out, function, 0);
            let core = get(&out, function, 1);
            let end = get(&out, function, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8 & 0xff), (0, 1, LEVEL_SMT));
            assert_eq!(
                (core.eax, core.ebx, core.ecx >> 8 & 0xff),
                (2, 3, LEVEL_CORE)
            );
            assert_eq!((end.ebx, end.ecx >> 8 & 0xff, end.ecx & 0xff), (0, 0, 2));
            for e in [smt, core, end] {
                assert_eq!(e.edx, 2, "x2APIC ID");
                assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            }
            assert_eq!(
                out.iter().filter(|e| e.function == function).count(),
                3,
                "host subleaves of {function:#x} replaced, not kept"
            );
        }
    }

    #[test]
    fn intel_cache_leaf_counts_cores_and_sharing() {
        let out = normalise(&intel_host(), 0, 2, true);
        let l1d = get(&out, 4, 0);
        let l3 = get(&out, 4, 3);
        assert_eq!(l1d.eax >> 26, 1, "cores per package - 1");
        assert_eq!((l1d.eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((l3.eax >> 14) & 0xfff, 1, "L3 shared by both cores");
        assert_eq!(l3.eax & 0x3fff, 0x0163, "cache type/level bits kept");
    }

    #[test]
    fn hypervisor_leaf_is_kvm_with_its_features() {
        let out = normalise(&intel_host(), 0, 1, true);
        let sig = get(&out, 0x4000_0000, 0);
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, 0x4000_0001);
        assert_eq!(get(&out, 0x4000_0001, 0).eax, 0x0100_7afb);
        assert_eq!(out.iter().filter(|e| e.function == 0x4000_0000).count(), 1);
    }

    #[test]
    fn amd_leaves_carry_core_count_and_apic_id() {
        let host = vec![
            vendor_leaf(b"AuthenticAMD", 0xa),
            leaf(1, 0, [0xa00f11, 0x2040_0800, 0x7ed8_320b, 0x178b_fbff]),
            leaf(0x8000_0001, 0, [0, 0, 0x75c2_37ff, 0x2fd3_fbff]),
            leaf(0x8000_0008, 0, [0x3030, 0x7, 0x0000_703f, 0]),
            leaf(0x8000_001e, 0, [0, 0, 0, 0]),
            leaf(4, 0, [0x1234_5678, 0, 0, 0]),
        ];
        let out = normalise(&host, 5, 6, false);
        let sizes = get(&out, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 5, "cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 3, "APIC ID bits for 6 cores");
        let ext = get(&out, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx & 0xff, ext.ebx >> 8 & 0xff), (5, 5, 0));
        assert_ne!(get(&out, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(get(&out, 4, 0).eax, 0x1234_5678, "leaf 4 is Intel-only");
        assert!(
            find(&out, 0xb, 0).is_none(),
            "no leaf 0xB past the max basic leaf"
        );
        assert_eq!(get(&out, 1, 0).ebx >> 24, 5);
    }

    #[test]
    fn id_bits_rounds_up() {
        let cases = [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (255, 8), (256, 8)];
        for (count, bits) in cases {
            assert_eq!(id_bits(count), bits, "count {count}");
        }
    }
}
