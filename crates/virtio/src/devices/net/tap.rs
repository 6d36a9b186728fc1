//! The TAP backend: `/dev/net/tun` attached to a host TAP device with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking. Each read is one
//! frame behind a 12-byte `virtio_net_hdr_v1`, each write one frame behind
//! the header the guest wrote, so checksum and segmentation offloads pass
//! straight between the guest and the host kernel.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the TAP device `name` (it must exist, or the caller must be
    /// allowed to create it).
    pub fn open(name: &str) -> io::Result<Tap> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        crate::sys::tap_attach(&file, name, VNET_HDR_LEN as i32)?;
        let tap = Tap {
            file,
            name: name.into(),
        };
        // No offloads until the driver accepts some: the host kernel then
        // checksums and segments every frame before it reaches us.
        tap.set_offload(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads (`TUN_F_*`) frames read from the TAP may carry.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        crate::sys::tap_set_offload(&self.file, flags)
    }

    /// One frame with its vnet header into `buf`; `Ok(None)` when none waits.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one frame with its vnet header. `Ok(false)`: the TAP cannot
    /// take it now.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match self.file.write(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
