//! Kernel files vmplay must refuse, built byte by byte so bad-input tests
//! need no downloaded assets.

/// Real-mode setup sectors [`synthetic_bzimage`] declares (after the boot
/// sector): 16 × 512 bytes, so the first 4 KiB of the file cut the setup
/// code short, as they do for a real distribution kernel.
pub const BZIMAGE_SETUP_SECTS: u8 = 15;
/// Size of [`synthetic_bzimage`]'s protected-mode payload.
pub const BZIMAGE_PAYLOAD_LEN: usize = 64 * 1024;

/// A structurally valid bzImage (boot protocol 2.15, 64-bit capable,
/// relocatable) whose setup and payload are `hlt` instructions. Truncate
/// it to make a kernel whose header promises more than the file holds.
pub fn synthetic_bzimage() -> Vec<u8> {
    let setup_len = (usize::from(BZIMAGE_SETUP_SECTS) + 1) * 512;
    let mut f = vec![0xf4u8; setup_len + BZIMAGE_PAYLOAD_LEN];
    let put = |f: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        f[off..off + bytes.len()].copy_from_slice(bytes)
    };
    f[..0x1f1].fill(0);
    put(&mut f, 0x1f1, &[BZIMAGE_SETUP_SECTS]);
    put(&mut f, 0x1f2, &1u16.to_le_bytes()); // root_flags: read-only
    put(
        &mut f,
        0x1f4,
        &((BZIMAGE_PAYLOAD_LEN / 16) as u32).to_le_bytes(),
    ); // syssize
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut f, 0x200, &[0xeb, 0x66]); // jmp over the header
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
    put(&mut f, 0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(&mut f, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut f, 0x234, &[1]); // relocatable_kernel
    put(&mut f, 0x236, &0x0003u16.to_le_bytes()); // xloadflags: KERNEL_64, CAN_BE_LOADED_ABOVE_4G
    put(&mut f, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut f, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(
        &mut f,
        0x260,
        &(4 * BZIMAGE_PAYLOAD_LEN as u32).to_le_bytes(),
    ); // init_size
    f
}

/// An AArch64 ELF64 executable (one PT_LOAD of `wfi; b .`): a well-formed
/// kernel for another architecture.
pub fn aarch64_elf() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code: [u8; 8] = [0x7f, 0x20, 0x03, 0xd5, 0x00, 0x00, 0x00, 0x14]; // wfi; b .
    let load: u64 = 0x4008_0000;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little-endian, version 1, System V
    f.resize(16, 0);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&load.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR as u16, PHDR as u16, 1, 64, 0, 0] {
        f.extend_from_slice(&half.to_le_bytes());
    }
    let offset = (EHDR + PHDR) as u64;
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    for v in [
        offset,
        load,
        load,
        code.len() as u64,
        code.len() as u64,
        0x1_0000,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_bzimage_has_the_boot_protocol_signatures() {
        let f = synthetic_bzimage();
        assert_eq!(&f[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(&f[0x202..0x206], b"HdrS");
        assert_eq!(
            f.len(),
            (usize::from(f[0x1f1]) + 1) * 512 + BZIMAGE_PAYLOAD_LEN
        );
        assert!(f.len() > 4096 && (usize::from(f[0x1f1]) + 1) * 512 > 4096);
    }

    #[test]
    fn aarch64_elf_declares_its_machine() {
        let f = aarch64_elf();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([f[18], f[19]]), 183);
        assert_eq!(f.len(), 64 + 56 + 8);
    }
}
