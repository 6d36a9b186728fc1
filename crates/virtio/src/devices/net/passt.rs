//! The user-mode backend: frames over a Unix stream socket, each behind a
//! 32-bit big-endian length (the protocol of passt and QEMU's
//! `-netdev stream`). `--net user` starts Debian's `passt` as a child on
//! one end of a socket pair (`passt --fd`), `socket=PATH` connects to one
//! already listening. No vnet header crosses this socket: frames carry
//! full checksums and are never bigger than the MTU, so the device offers
//! the guest no offloads on it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{MAX_FRAME, VNET_HDR_LEN};

/// Bytes of received stream kept at once: a few whole frames.
const IN_CAPACITY: usize = 4 * (4 + MAX_FRAME);
/// Frames queue for the socket until this many bytes wait; then the
/// transmit queue waits for the socket to drain.
const OUT_LIMIT: usize = 256 * 1024;
/// The smallest frame a peer may send (an Ethernet header).
const MIN_FRAME: usize = 14;

/// The addresses `--net user` gives the guest, as QEMU's user networking
/// does: the guest is 10.0.2.15/24, the gateway 10.0.2.2 is the host's
/// loopback (passt maps connections to the gateway address to the host).
pub const GUEST_ADDR: &str = "10.0.2.15";
pub const GATEWAY_ADDR: &str = "10.0.2.2";

/// What one receive found.
pub enum Recv {
    /// A frame of this many bytes (vnet header included) is in the buffer.
    Frame(usize),
    /// Nothing complete yet.
    Nothing,
    /// The peer sent a frame of an impossible length; it is skipped.
    Dropped,
}

pub struct Stream {
    sock: UnixStream,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Bytes of a dropped frame still to skip.
    skip: usize,
    out: Vec<u8>,
    out_start: usize,
    closed: bool,
    child: Option<Child>,
}

impl Stream {
    /// A stream over an already connected socket.
    #[cfg(test)]
    pub(crate) fn from_socket(sock: UnixStream) -> io::Result<Stream> {
        Stream::new(sock, None)
    }

    fn new(sock: UnixStream, child: Option<Child>) -> io::Result<Stream> {
        sock.set_nonblocking(true)?;
        Ok(Stream {
            sock,
            inbuf: vec![0; IN_CAPACITY].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            skip: 0,
            out: Vec::with_capacity(OUT_LIMIT + 4 + MAX_FRAME),
            out_start: 0,
            closed: false,
            child,
        })
    }

    /// Connects to a peer listening at `path`.
    pub fn connect(path: &Path) -> io::Result<Stream> {
        let sock = UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Stream::new(sock, None)
    }

    /// Starts `passt` serving one end of a fresh socket pair.
    pub fn spawn_passt() -> io::Result<Stream> {
        let (ours, theirs) = UnixStream::pair()?;
        let child = Command::new("passt")
            .args(["--foreground", "--quiet", "--fd", "0"])
            // No host ports forwarded into the guest.
            .args(["--tcp-ports", "none", "--udp-ports", "none"])
            .args(["--address", GUEST_ADDR, "--netmask", "24"])
            .args(["--gateway", GATEWAY_ADDR])
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start passt (install Debian's `passt` package): {e}"),
                )
            })?;
        Stream::new(ours, Some(child))
    }

    /// Whether the peer hung up (or the socket failed).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Marks the peer gone, saying why once.
    pub fn close(&mut self, why: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .map(|s| format!(" (passt exited: {s})"))
            .unwrap_or_default();
        tracing::warn!("virtio-net: user network socket {why}{status}");
    }

    /// One frame, behind a zeroed vnet header, into `buf` (at least
    /// `VNET_HDR_LEN + MAX_FRAME` bytes). With `may_read` false only
    /// frames already read from the socket come out.
    pub fn recv(&mut self, buf: &mut [u8], may_read: bool) -> io::Result<Recv> {
        loop {
            let avail = self.in_end - self.in_start;
            if self.skip > 0 && avail > 0 {
                let n = self.skip.min(avail);
                self.in_start += n;
                self.skip -= n;
                continue;
            }
            if self.skip == 0 && avail >= 4 {
                let at = self.in_start;
                let len = u32::from_be_bytes([
                    self.inbuf[at],
                    self.inbuf[at + 1],
                    self.inbuf[at + 2],
                    self.inbuf[at + 3],
                ]) as usize;
                if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                    self.in_start += 4;
                    self.skip = len;
                    return Ok(Recv::Dropped);
                }
                if avail >= 4 + len {
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len]
                        .copy_from_slice(&self.inbuf[at + 4..at + 4 + len]);
                    self.in_start += 4 + len;
                    return Ok(Recv::Frame(VNET_HDR_LEN + len));
                }
            }
            if self.closed || !may_read {
                return Ok(Recv::Nothing);
            }
            // Need more bytes: move what is left to the front, then read.
            if self.in_start > 0 {
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            match self.sock.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) => {
                    self.close("closed by its peer");
                    return Ok(Recv::Nothing);
                }
                Ok(n) => self.in_end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Recv::Nothing),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(&format!("read failed: {e}"));
                    return Err(e);
                }
            }
        }
    }

    /// Queues one frame (vnet header first, which is dropped). `Ok(false)`:
    /// too much is waiting for the socket; try again when it drains.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if self.closed {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        if self.out.len() - self.out_start >= OUT_LIMIT {
            self.flush()?;
            if self.out.len() - self.out_start >= OUT_LIMIT {
                return Ok(false);
            }
        }
        let eth = &frame[VNET_HDR_LEN.min(frame.len())..];
        self.out
            .extend_from_slice(&(eth.len() as u32).to_be_bytes());
        self.out.extend_from_slice(eth);
        self.flush()?;
        Ok(true)
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.out_start < self.out.len() {
            match self.sock.write(&self.out[self.out_start..]) {
                Ok(0) => {
                    self.close("stopped taking data");
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(&format!("write failed: {e}"));
                    self.out.clear();
                    self.out_start = 0;
                    return Err(e);
                }
            }
        }
        if self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
        } else if self.out_start > OUT_LIMIT {
            self.out.drain(..self.out_start);
            self.out_start = 0;
        }
        Ok(())
    }

    /// Whether bytes read from the socket wait to be taken: epoll will
    /// not say so, the socket may have nothing more.
    pub fn has_buffered(&self) -> bool {
        self.in_end > self.in_start
    }

    /// Whether bytes wait for the socket to become writable.
    pub fn wants_out(&self) -> bool {
        !self.closed && self.out_start < self.out.len()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
