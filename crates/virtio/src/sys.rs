//! The crate's only unsafe code: thin wrappers over host calls the std
//! library lacks (getrandom, the TAP ioctls, fallocate).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// Fills `buf` from the host's CSPRNG.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: &impl AsRawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on an fd the caller owns; no memory is passed.
    let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The size of `struct ifreq`: a 16-byte name and a 24-byte union whose
/// first field is the `short` flags TUNSETIFF reads.
const IFREQ_SIZE: usize = 40;

/// Attaches `file` (an open `/dev/net/tun`) to the TAP device `name` with
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and sets the vnet header size.
pub fn tap_attach(file: &impl AsRawFd, name: &str, vnet_hdr_len: i32) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1 to 15 bytes, no NUL)"),
        ));
    }
    let mut ifreq = [0u8; IFREQ_SIZE];
    ifreq[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifreq` is a
    // 40-byte buffer, the size of that struct, alive for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len: libc::c_int = vnet_hdr_len;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
    // points at `len` for the whole call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the TAP may hand us in
/// frames it delivers (partial checksums, TSO segments).
pub fn tap_set_offload(file: &impl AsRawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value, no memory is passed.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
