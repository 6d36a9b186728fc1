//! The crate's only unsafe code: thin wrappers over host calls the std
//! library lacks (getrandom, the TAP ioctls, fallocate, a non-blocking
//! Unix connect).
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

/// Connects a Unix stream socket to `path` without blocking: a listener
/// whose backlog is full refuses at once (EAGAIN) instead of stalling the
/// event loop, as std's blocking `UnixStream::connect` would.
pub fn connect_unix_nonblocking(
    path: &std::path::Path,
) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; no memory is passed.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un; `len` does not exceed its size
    // (the path is shorter than `sun_path`, checked above).
    let r = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::os::unix::net::UnixStream::from(socket))
}
