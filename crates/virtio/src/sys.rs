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

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Which way [`file_io_vectored`] moves bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// File → guest memory (`preadv`).
    FileToGuest,
    /// Guest memory → file (`pwritev`).
    GuestToFile,
}

/// Moves every byte of `bufs` between `file` at `offset` and guest memory
/// in as few `preadv`/`pwritev` calls as the host allows: the copy a
/// block device needs, with no bounce buffer between (QEMU's and
/// Firecracker's block devices do the same). Partial transfers and EINTR
/// are retried; a read that meets the end of the file is `UnexpectedEof`.
pub fn file_io_vectored(
    file: &std::fs::File,
    bufs: &[vm_memory::VolatileSlice<'_, ()>],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    // (buffer index, bytes of it already done)
    let (mut at, mut done) = (0usize, 0usize);
    let mut iov = Vec::with_capacity(bufs.len().min(IOV_MAX));
    while at < bufs.len() {
        iov.clear();
        for (k, b) in bufs[at..].iter().take(IOV_MAX).enumerate() {
            let skip = if k == 0 { done } else { 0 };
            let ptr = match dir {
                Direction::FileToGuest => b.ptr_guard_mut().as_ptr(),
                Direction::GuestToFile => b.ptr_guard().as_ptr().cast_mut(),
            };
            iov.push(libc::iovec {
                iov_base: ptr.wrapping_add(skip).cast(),
                iov_len: b.len() - skip,
            });
        }
        let Ok(off) = i64::try_from(offset) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: each iovec spans `len - skip` bytes inside a VolatileSlice
        // of mapped guest memory that outlives the call (`bufs` borrows
        // it); the kernel reads or writes only those bytes. Guest memory
        // may change under a concurrent vCPU, which is a data race on
        // guest data only, as for any DMA, and never on Rust-owned memory.
        let n = unsafe {
            match dir {
                Direction::FileToGuest => {
                    libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
                }
                Direction::GuestToFile => {
                    libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
                }
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(match dir {
                Direction::FileToGuest => io::ErrorKind::UnexpectedEof.into(),
                Direction::GuestToFile => io::ErrorKind::WriteZero.into(),
            });
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && at < bufs.len() {
            let left = bufs[at].len() - done;
            if n >= left {
                n -= left;
                at += 1;
                done = 0;
            } else {
                done += n;
                n = 0;
            }
        }
        // Skip empty buffers so the loop ends.
        while at < bufs.len() && bufs[at].len() == done {
            at += 1;
            done = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn file_with(bytes: &[u8]) -> (std::fs::File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "vmplay-sys-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (f, path)
    }

    #[test]
    fn vectored_io_fills_and_drains_scattered_guest_buffers() {
        // Two regions, so one buffer is split where the first ends.
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x2000),
        ])
        .unwrap();
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let (file, path) = file_with(&bytes);
        let mut bufs = Vec::new();
        for (addr, len) in [
            (0x100u64, 300usize),
            (0x1f00, 0x200),
            (0x3000, 0),
            (0x3100, 77),
        ] {
            bufs.extend(mem.get_slices(GuestAddress(addr), len).map(Result::unwrap));
        }
        file_io_vectored(&file, &bufs, 1000, Direction::FileToGuest).unwrap();
        let mut got = vec![0u8; 300];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(got, bytes[1000..1300]);
        let mut got = vec![0u8; 0x200];
        mem.read_slice(&mut got, GuestAddress(0x1f00)).unwrap();
        assert_eq!(got, bytes[1300..1812]);
        let mut got = vec![0u8; 77];
        mem.read_slice(&mut got, GuestAddress(0x3100)).unwrap();
        assert_eq!(got, bytes[1812..1889]);

        // And back out at another offset.
        file_io_vectored(&file, &bufs, 5000, Direction::GuestToFile).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk[5000..5889], bytes[1000..1889]);
        assert_eq!(on_disk[..5000], bytes[..5000]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_read_past_the_end_of_the_file_is_unexpected_eof() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let (file, path) = file_with(&[7u8; 100]);
        let bufs: Vec<_> = mem
            .get_slices(GuestAddress(0), 200)
            .map(Result::unwrap)
            .collect();
        let err = file_io_vectored(&file, &bufs, 0, Direction::FileToGuest).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_file(&path);
    }
}
