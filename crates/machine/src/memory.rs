//! Guest RAM: sizes, limits, and the mmap-backed regions around the MMIO hole.

use crate::MachineError;
use vm_memory::GuestAddress;
use vmplay_boot::layout;
use vmplay_hypervisor::GuestMemory;

/// Highest guest-physical address vmplay maps RAM at (46-bit, well within
/// any x86-64 host's physical address width).
const MAX_GUEST_PHYS: u64 = 1 << 46;

/// Total RAM of the host, from sysinfo(2).
pub fn host_memory_bytes() -> Option<u64> {
    // SAFETY: sysinfo only writes the struct we hand it.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some(info.totalram.saturating_mul(u64::from(info.mem_unit)))
}

/// Parses a memory size as QEMU's `-m` does: a number with an optional
/// K/M/G/T suffix (binary units); a bare number means MiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 20),
        Some((i, _)) => {
            let shift = match t[i..].to_ascii_uppercase().trim_end_matches(['B', 'I']) {
                "" => 0,
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                other => return Err(format!("unknown size suffix {other:?} in {text:?}")),
            };
            (&t[..i], shift)
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (like 512M or 2G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Maps `bytes` of guest RAM split around the 32-bit MMIO hole.
pub(crate) fn create(bytes: u64, huge_pages: HugePages) -> Result<GuestMemory, MachineError> {
    let err = |why: String| MachineError::Memory(human(bytes), why);
    if bytes < layout::MIN_MEMORY {
        return Err(err(format!(
            "too small: vmplay needs at least {}",
            human(layout::MIN_MEMORY)
        )));
    }
    if !bytes.is_multiple_of(4096) {
        return Err(err(format!(
            "{bytes} bytes is not a whole number of 4 KiB pages"
        )));
    }
    if let Some(host) = host_memory_bytes()
        && bytes > host
    {
        return Err(err(format!("more than the host has ({})", human(host))));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(bytes)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    if let Some(&(GuestAddress(start), size)) = ranges.last()
        && start + size as u64 > MAX_GUEST_PHYS
    {
        return Err(err("beyond the guest-physical address space".into()));
    }
    let memory =
        GuestMemory::from_ranges(&ranges).map_err(|e| err(format!("cannot map guest RAM: {e}")))?;
    if huge_pages == HugePages::Transparent {
        advise_huge_pages(&memory);
    }
    Ok(memory)
}

/// How guest RAM is backed, as Firecracker's `huge_pages`.
///
/// The default is ordinary pages: a huge page's first touch zeroes 2 MiB
/// at once, and where the host is itself a VM whose memory is backed
/// lazily (a Firecracker microVM, as this project's CI machines) that one
/// fault costs 5-30 ms of the vCPU's time; an emu boot of Debian's kernel
/// took 1.8-2.4 s with them against 1.4 s without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    #[default]
    None,
    /// Transparent huge pages (`MADV_HUGEPAGE`, as QEMU does by default):
    /// fewer host TLB misses once RAM is touched.
    Transparent,
}

/// Asks for transparent huge pages on guest RAM: fewer host TLB misses
/// for the guest's accesses (KVM's nested paging, emu's software TLB
/// alike). Advice only: without it RAM works the same.
fn advise_huge_pages(memory: &GuestMemory) {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    for region in memory.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: advice on a range inside a mapping this process owns
        // (the region's own mmap); MADV_HUGEPAGE changes no contents.
        unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend as _;

    #[test]
    fn parses_sizes_like_qemu() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn rejects_impossible_sizes() {
        assert!(
            create(0, HugePages::None)
                .unwrap_err()
                .to_string()
                .contains("too small")
        );
        assert!(
            create(!0xfff, HugePages::None)
                .unwrap_err()
                .to_string()
                .contains("host")
        );
    }

    #[test]
    fn large_memory_goes_above_4g() {
        // Mapping is lazy (MAP_NORESERVE), so this costs nothing.
        let mem = create(5 << 30, HugePages::Transparent).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(1 << 32)));
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_HOLE_START)));
    }
}
