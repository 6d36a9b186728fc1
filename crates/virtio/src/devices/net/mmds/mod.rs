//! MMDS inside virtio-net, as Firecracker has it: on an interface named in
//! `/mmds/config`, the device takes the guest's frames for the metadata
//! address (ARP for it, TCP to its port 80) before the backend sees them,
//! runs them through a smoltcp TCP/IP stack that answers from MAC
//! `06:01:23:45:67:01`, and hands the stack's frames to the guest's
//! receive queue ahead of the backend's. Other IPv4 to the address is
//! dropped; everything else goes to the backend.
//!
//! Every queue here is bounded: frames from the guest, frames to it, each
//! connection's request bytes ([`http::MAX_HEAD`] + [`http::MAX_BODY`])
//! and at most [`MAX_CONNECTIONS`] connections.

pub mod http;

use std::collections::VecDeque;
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr,
    IpListenEndpoint, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::MmdsNetConfig;
pub use http::MmdsCounters;

/// Firecracker's MMDS MAC address.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Firecracker's bound on MMDS TCP connections.
pub const MAX_CONNECTIONS: usize = 30;
const PORT: u16 = 80;
/// Frames waiting either way.
const MAX_QUEUED: usize = 128;
/// An Ethernet frame the stack builds: a 1500-byte IP MTU.
const MTU: usize = 1514;
const SOCKET_RX: usize = 8 * 1024;
const SOCKET_TX: usize = 64 * 1024;

/// What the device does with a frame the guest sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// For MMDS: the stack takes it.
    Mmds,
    /// To the metadata address but not TCP: nobody gets it.
    Drop,
    /// Not for MMDS: the backend gets it.
    Pass,
}

/// The device the stack sees: two bounded frame queues.
#[derive(Default)]
struct Frames {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl phy::Device for Frames {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        if self.to_guest.len() >= MAX_QUEUED {
            return None;
        }
        let frame = self.from_guest.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        (self.to_guest.len() < MAX_QUEUED).then_some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        // Frames from the guest may carry partial checksums (the driver
        // was offered checksum offload) and never cross a wire: checksums
        // are made for the guest, not checked from it.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

/// One TCP connection's HTTP state.
struct Connection {
    handle: SocketHandle,
    request: Vec<u8>,
    /// Response bytes not yet in the socket's send buffer.
    response: VecDeque<u8>,
    /// Close once the response is sent.
    closing: bool,
    /// Counted in `connections_created` already.
    counted: bool,
}

/// The metadata service of one interface.
pub struct MmdsStack {
    config: MmdsNetConfig,
    ip: Ipv4Address,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<Connection>,
    frames: Frames,
    epoch: StdInstant,
    timer: TimerFd,
    pub counters: MmdsCounters,
}

impl MmdsStack {
    pub fn new(config: MmdsNetConfig) -> std::io::Result<Self> {
        let mut frames = Frames::default();
        let epoch = StdInstant::now();
        let mut seed = [0u8; 8];
        crate::sys::getrandom(&mut seed)?;
        let mut c = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        c.random_seed = u64::from_ne_bytes(seed);
        let mut iface = Interface::new(c, &mut frames, Instant::ZERO);
        let ip = config.ipv4;
        // Prefix 0: every guest address is on-link, so replies go to the
        // guest's MAC whatever its address and routes.
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(ip.into(), 0));
        });
        let mut stack = MmdsStack {
            config,
            ip,
            iface,
            sockets: SocketSet::new(Vec::new()),
            connections: Vec::new(),
            frames,
            epoch,
            timer: TimerFd::new()?,
            counters: MmdsCounters::default(),
        };
        stack.keep_listening();
        Ok(stack)
    }

    /// The timer that drives retransmissions and timeouts.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// What to do with `frame` (Ethernet header first).
    pub fn classify(&self, frame: &[u8]) -> Verdict {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return Verdict::Pass;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => match ArpPacket::new_checked(eth.payload()) {
                Ok(arp) if arp.target_protocol_addr() == self.ip.octets() => Verdict::Mmds,
                _ => Verdict::Pass,
            },
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return Verdict::Pass;
                };
                if ip.dst_addr() != self.ip {
                    return Verdict::Pass;
                }
                if ip.next_header() != IpProtocol::Tcp {
                    return Verdict::Drop;
                }
                match TcpPacket::new_checked(ip.payload()) {
                    Ok(tcp) if tcp.dst_port() == PORT => Verdict::Mmds,
                    Ok(_) => Verdict::Pass,
                    Err(_) => Verdict::Drop,
                }
            }
            _ => Verdict::Pass,
        }
    }

    /// Takes a frame [`classify`](Self::classify) gave to MMDS.
    pub fn push(&mut self, frame: &[u8]) {
        if self.frames.from_guest.len() >= MAX_QUEUED {
            self.counters.rx_dropped += 1;
            return;
        }
        self.counters.rx_accepted += 1;
        self.frames.from_guest.push_back(frame.to_vec());
    }

    /// Counts a frame for MMDS that the device dropped.
    pub fn dropped(&mut self) {
        self.counters.rx_dropped += 1;
    }

    /// Whether a frame for the guest waits.
    pub fn has_output(&self) -> bool {
        !self.frames.to_guest.is_empty()
    }

    /// Copies the next frame for the guest into `buf`; its length. A frame
    /// that does not fit is dropped (the stack never makes one).
    pub fn pop(&mut self, buf: &mut [u8]) -> Option<usize> {
        let frame = self.frames.to_guest.pop_front()?;
        let n = frame.len();
        buf.get_mut(..n)?.copy_from_slice(&frame);
        Some(n)
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs the stack: takes queued frames, answers requests, makes frames
    /// for the guest, and arms the timer for the stack's next deadline.
    pub fn poll(&mut self) {
        for _ in 0..8 {
            let now = self.now();
            self.iface.poll(now, &mut self.frames, &mut self.sockets);
            let progressed = self.serve();
            self.keep_listening();
            if !progressed && self.frames.from_guest.is_empty() {
                break;
            }
        }
        let now = self.now();
        let delay = self.iface.poll_delay(now, &self.sockets);
        let r = match delay {
            Some(d) => self.timer.reset(
                std::time::Duration::from_micros(d.total_micros().max(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            tracing::warn!("MMDS: cannot arm its timer: {e}");
        }
    }

    /// The timer fired.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.poll();
    }

    /// Keeps one socket listening while there is room for a connection.
    fn keep_listening(&mut self) {
        let listening = self
            .connections
            .iter()
            .any(|c| self.sockets.get::<tcp::Socket>(c.handle).is_listening());
        if listening || self.connections.len() >= MAX_CONNECTIONS {
            return;
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_RX]),
            tcp::SocketBuffer::new(vec![0; SOCKET_TX]),
        );
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
        if socket.listen(IpListenEndpoint::from(PORT)).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        self.connections.push(Connection {
            handle,
            request: Vec::new(),
            response: VecDeque::new(),
            closing: false,
            counted: false,
        });
    }

    /// Reads requests, writes answers, drops closed connections. Whether
    /// anything moved.
    fn serve(&mut self) -> bool {
        let mut progressed = false;
        let now = StdInstant::now();
        let MmdsStack {
            sockets,
            connections,
            config,
            counters,
            ..
        } = self;
        connections.retain_mut(|c| {
            let socket = sockets.get_mut::<tcp::Socket>(c.handle);
            if socket.state() == tcp::State::Closed {
                if c.counted {
                    sockets.remove(c.handle);
                    return false;
                }
                // Reset before it was ever used: listen again.
                let _ = socket.listen(IpListenEndpoint::from(PORT));
                return true;
            }
            if socket.is_listening() {
                return true;
            }
            if !c.counted {
                c.counted = true;
                counters.connections_created += 1;
            }
            // Request bytes in, while a request can still grow.
            while socket.can_recv() && c.response.is_empty() && !c.closing {
                let room = http::MAX_HEAD + http::MAX_BODY - c.request.len();
                let mut buf = [0u8; 2048];
                let want = buf.len().min(room.max(1));
                match socket.recv_slice(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        progressed = true;
                        c.request.extend_from_slice(&buf[..n]);
                    }
                }
                // Answer every whole request there is.
                loop {
                    match http::parse(&c.request) {
                        http::Parsed::Partial => {
                            if c.request.len() >= http::MAX_HEAD + http::MAX_BODY {
                                queue(c, &http::invalid_request(), true, false, counters);
                            }
                            break;
                        }
                        http::Parsed::Invalid => {
                            queue(c, &http::invalid_request(), true, false, counters);
                            break;
                        }
                        http::Parsed::Complete { request, len } => {
                            c.request.drain(..len);
                            let cx = http::Context {
                                store: &config.store,
                                tokens: &config.tokens,
                                version: config.version,
                                imds_compat: config.imds_compat,
                                now,
                            };
                            let r = http::respond(&request, &cx, counters);
                            let deprecated = config.version == crate::config::MmdsVersion::V1;
                            queue(c, &r, request.close, deprecated, counters);
                            if request.close {
                                break;
                            }
                        }
                    }
                }
            }
            // Response bytes out, as the send buffer takes them.
            while !c.response.is_empty() && socket.can_send() {
                let (a, _) = c.response.as_slices();
                match socket.send_slice(a) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        progressed = true;
                        c.response.drain(..n);
                    }
                }
            }
            // Our side ends once the answer is out, when the request said
            // so or the guest has finished sending.
            if c.response.is_empty() && (c.closing || socket.state() == tcp::State::CloseWait) {
                socket.close();
            }
            true
        });
        progressed
    }
}

/// Puts `r`'s bytes on `c`'s way out.
fn queue(
    c: &mut Connection,
    r: &http::Response,
    close: bool,
    deprecated: bool,
    counters: &mut MmdsCounters,
) {
    let bytes = r.to_bytes(close, deprecated);
    counters.tx_bytes += bytes.len() as u64;
    c.response.extend(bytes);
    if close {
        c.closing = true;
        c.request.clear();
    }
}

#[cfg(test)]
mod tests;
