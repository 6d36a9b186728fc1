//! The connection table: host streams coming in on `uds_path`, guest
//! connections going out to `<uds_path>_<port>`, and the packets each
//! owes the guest, served round-robin. It never touches a queue: the
//! device hands it guest packets and asks it for the next packet to put
//! in a receive buffer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::EventSet;

use super::connection::{Connection, Verdict};
use super::packet::{HOST_CID, Header, MAX_PKT_PAYLOAD, TYPE_STREAM, op};
use super::{CONN_REQUEST_TIMEOUT, MAX_CONNECTIONS, VsockCounters};

/// The first port of host-initiated connections (Firecracker's choice):
/// ports are handed out upward from 2^30 and wrap within [2^30, 2^31).
pub const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;
/// The `CONNECT <port>\n` line is at most this long.
const CONNECT_LINE_MAX: usize = 32;
/// Standalone packets (RSTs answering stray guest packets) waiting for a
/// receive buffer; past this they are dropped and counted.
const CTRL_QUEUE_MAX: usize = 1024;

/// What epoll is asked to do; the device maps it onto its event loop.
pub trait Poller {
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet);
    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet);
    fn remove(&mut self, fd: RawFd);
}

/// (host port, guest port).
type Key = (u32, u32);

/// A host stream that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: [u8; CONNECT_LINE_MAX],
    len: usize,
}

enum Owner {
    Handshake,
    Conn(Key),
}

/// Parses the host's `CONNECT <port>` line (without its `\n`): ASCII,
/// the keyword in any case, whitespace-separated, a decimal u32 port.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_registered: bool,
    /// Accept failed (no fds): the listener waits for a connection to end.
    listener_paused: bool,
    /// Whether the driver is running (host connections are taken only then).
    active: bool,
    conns: HashMap<Key, Connection>,
    handshakes: HashMap<u32, Handshake>,
    owners: HashMap<u32, Owner>,
    /// Host ports handed out to host-initiated connections.
    local_ports: HashSet<u32>,
    next_local_port: u32,
    token_base: u32,
    next_token: u32,
    ctrl: VecDeque<Header>,
    rx_ready: VecDeque<Key>,
    /// Streams to close once epoll has forgotten them (next `sync`).
    doomed: Vec<(UnixStream, bool)>,
    /// Handshake streams accepted but not yet watched.
    new_handshakes: Vec<u32>,
    listener_token: u32,
    bounce: Vec<u8>,
    pub counters: VsockCounters,
}

impl Muxer {
    /// `listener` is already bound to `uds_path` and watched with
    /// `listener_token`; tokens for streams are handed out from
    /// `token_base` up.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
        listener_token: u32,
        token_base: u32,
    ) -> Self {
        Muxer {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            listener_registered: false,
            listener_paused: false,
            active: false,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            owners: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_FIRST,
            token_base,
            next_token: token_base,
            ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            doomed: Vec::new(),
            new_handshakes: Vec::new(),
            listener_token,
            bounce: vec![0; MAX_PKT_PAYLOAD],
            counters: VsockCounters::default(),
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    /// Drops every connection (device reset); their fds leave epoll at
    /// the next [`Muxer::sync`].
    pub fn reset(&mut self) {
        self.active = false;
        self.listener_paused = false;
        for (_, c) in self.conns.drain() {
            self.doomed.push((c.stream, c.registered.is_some()));
            self.counters.conns_removed += 1;
        }
        for (_, h) in self.handshakes.drain() {
            self.doomed.push((h.stream, true));
        }
        self.owners.clear();
        self.new_handshakes.clear();
        self.local_ports.clear();
        self.ctrl.clear();
        self.rx_ready.clear();
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(self.token_base);
            if !self.owners.contains_key(&t) {
                return t;
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p + 1 >= LOCAL_PORT_END {
                LOCAL_PORT_FIRST
            } else {
                p + 1
            };
            if !self.local_ports.contains(&p) && !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn queue_ctrl(&mut self, h: Header) {
        if self.ctrl.len() >= CTRL_QUEUE_MAX {
            self.counters.ctrl_dropped += 1;
            return;
        }
        self.ctrl.push_back(h);
    }

    fn mark_rx(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key)
            && !c.in_rx_queue
            && c.has_rx_work()
        {
            c.in_rx_queue = true;
            self.rx_ready.push_back(key);
        }
    }

    /// Ends a connection as `verdict` says.
    fn apply(&mut self, key: Key, verdict: Verdict) {
        if verdict == Verdict::Keep {
            self.mark_rx(key);
            return;
        }
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.owners.remove(&c.token);
        self.local_ports.remove(&c.local_port);
        if verdict != Verdict::Remove {
            self.queue_ctrl(Header::to_guest(
                self.guest_cid,
                c.local_port,
                c.peer_port,
                op::RST,
            ));
        }
        if verdict == Verdict::Kill {
            self.counters.conns_killed += 1;
        }
        self.counters.conns_removed += 1;
        self.doomed.push((c.stream, c.registered.is_some()));
        self.listener_paused = false;
    }

    /// A packet from the guest's transmit queue; `payload` is its data
    /// (already bounded by the device).
    pub fn on_guest_packet(&mut self, h: &Header, payload: &[u8], now: Instant) {
        self.counters.tx_packets_count += 1;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: dropping a guest packet from CID {} to CID {}",
                h.src_cid,
                h.dst_cid
            );
            self.counters.bad_cid += 1;
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.counters.bad_packets += 1;
            self.queue_ctrl(h.rst_reply());
            return;
        }
        let key = (h.dst_port, h.src_port);
        match self.conns.get_mut(&key) {
            Some(c) => {
                let v = c.on_guest(h, payload, &mut self.counters, now);
                self.apply(key, v);
            }
            None if h.op == op::REQUEST => self.peer_request(h),
            None if h.op == op::RST => {}
            None => {
                self.counters.unknown_conn += 1;
                self.queue_ctrl(h.rst_reply());
            }
        }
    }

    /// A guest packet whose length does not fit its buffer: the stream it
    /// belongs to has lost data, so that connection is reset.
    pub fn on_malformed(&mut self, h: &Header) {
        self.counters.tx_packets_count += 1;
        self.counters.bad_packets += 1;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            return;
        }
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) {
            self.apply(key, Verdict::Kill);
        } else {
            self.queue_ctrl(h.rst_reply());
        }
    }

    /// The guest connects to host port P: connect to `<uds_path>_P`.
    fn peer_request(&mut self, h: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            tracing::info!(
                "vsock: connection table full; refusing guest port {}",
                h.src_port
            );
            self.queue_ctrl(h.rst_reply());
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        // Non-blocking: a host listener that does not accept (its backlog
        // full) refuses the guest instead of stalling every device.
        let stream = match crate::sys::connect_unix_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.queue_ctrl(h.rst_reply());
                return;
            }
        };
        let token = self.alloc_token();
        let key = (h.dst_port, h.src_port);
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, Connection::peer(token, stream, h));
        self.counters.conns_added += 1;
        self.mark_rx(key);
    }

    /// The listener is readable: take every waiting host stream.
    pub fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds, typically: the connection stays in the
                    // backlog and the listener readable, so stop watching
                    // it (no busy loop) until a connection goes away.
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    self.counters.muxer_event_fails += 1;
                    self.listener_paused = true;
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                tracing::info!("vsock: connection table full; dropping a host connection");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            self.owners.insert(token, Owner::Handshake);
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: [0; CONNECT_LINE_MAX],
                    len: 0,
                },
            );
            self.new_handshakes.push(token);
        }
    }

    /// A stream the muxer owns is ready.
    pub fn on_stream_event(&mut self, token: u32, events: EventSet, now: Instant) {
        match self.owners.get(&token) {
            Some(Owner::Handshake) => self.read_handshake(token, now),
            Some(Owner::Conn(key)) => {
                let key = *key;
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                let mut verdict = Verdict::Keep;
                if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                    verdict = c.flush_tx(&mut self.counters);
                }
                if events.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    c.readable = true;
                }
                self.apply(key, verdict);
            }
            None => {}
        }
    }

    /// Reads the `CONNECT` line byte by byte, so data the host sends right
    /// behind it stays in the stream for the guest. A bad or unfinished
    /// line closes the stream without a word, as Firecracker does.
    fn read_handshake(&mut self, token: u32, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = loop {
            if hs.len == CONNECT_LINE_MAX {
                break None;
            }
            let mut byte = [0u8];
            match hs.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect(&hs.line[..hs.len])),
                Ok(_) => {
                    hs.line[hs.len] = byte[0];
                    hs.len += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(Some(port)) = port else {
            tracing::info!("vsock: bad CONNECT line from the host; closing it");
            self.counters.bad_connect += 1;
            self.owners.remove(&token);
            self.doomed.push((hs.stream, true));
            self.listener_paused = false;
            return;
        };
        let local_port = self.alloc_local_port(port);
        let key = (local_port, port);
        let mut c = Connection::local(
            token,
            hs.stream,
            local_port,
            port,
            now + CONN_REQUEST_TIMEOUT,
        );
        // Still registered for IN from the handshake.
        c.registered = Some(EventSet::IN);
        self.local_ports.insert(local_port);
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, c);
        self.counters.conns_added += 1;
        self.mark_rx(key);
    }

    /// The next packet for a receive buffer with `room` payload bytes: a
    /// standalone RST first, then one packet of the next connection in
    /// turn. Returns the header and its payload (`header.len` bytes).
    pub fn next_rx(&mut self, room: usize, now: Instant) -> Option<(Header, &[u8])> {
        // Connections whose data does not fit this buffer keep their turn.
        let mut skipped = Vec::new();
        let next = loop {
            if let Some(h) = self.ctrl.pop_front() {
                break Some(h);
            }
            let Some(key) = self.rx_ready.pop_front() else {
                break None;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rx_queue = false;
            match c.next_packet(
                self.guest_cid,
                room,
                &mut self.bounce,
                &mut self.counters,
                now,
            ) {
                Ok(Some(h)) => {
                    self.mark_rx(key);
                    self.counters.rx_bytes_count += u64::from(h.len);
                    break Some(h);
                }
                Ok(None) if c.has_rx_work() => skipped.push(key),
                Ok(None) => {}
                Err(v) => self.apply(key, v),
            }
        };
        for key in skipped.into_iter().rev() {
            if let Some(c) = self.conns.get_mut(&key)
                && !c.in_rx_queue
            {
                c.in_rx_queue = true;
                self.rx_ready.push_front(key);
            }
        }
        let h = next?;
        self.counters.rx_packets_count += 1;
        Some((h, &self.bounce[..h.len as usize]))
    }

    /// Whether anything waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.rx_ready.is_empty()
    }

    /// Kills connections whose handshake or shutdown took too long.
    /// Returns whether any connection still has a deadline.
    pub fn expire(&mut self, now: Instant) -> bool {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!("vsock: connection {key:?} timed out");
            self.apply(key, Verdict::Kill);
        }
        self.conns.values().any(|c| c.deadline.is_some())
    }

    /// Brings epoll in line with the table: closes doomed streams,
    /// watches new ones, and sets each connection's interest. Returns
    /// whether any connection has a deadline (the device's timer runs).
    pub fn sync(&mut self, poll: &mut impl Poller) -> bool {
        for (stream, registered) in self.doomed.drain(..) {
            if registered {
                poll.remove(stream.as_raw_fd());
            }
        }
        for token in self.new_handshakes.drain(..) {
            if let Some(h) = self.handshakes.get(&token) {
                poll.add(h.stream.as_raw_fd(), token, EventSet::IN);
            }
        }
        let want_listener = self.active && !self.listener_paused;
        if want_listener != self.listener_registered {
            if want_listener {
                poll.add(self.listener.as_raw_fd(), self.listener_token, EventSet::IN);
            } else {
                poll.remove(self.listener.as_raw_fd());
            }
            self.listener_registered = want_listener;
        }
        let mut deadlines = false;
        for c in self.conns.values_mut() {
            deadlines |= c.deadline.is_some();
            let want = c.interest();
            let fd = c.stream.as_raw_fd();
            match (c.registered, want.is_empty()) {
                (None, true) => {}
                (None, false) => {
                    poll.add(fd, c.token, want);
                    c.registered = Some(want);
                }
                (Some(_), true) => {
                    poll.remove(fd);
                    c.registered = None;
                }
                (Some(have), false) if have != want => {
                    poll.modify(fd, c.token, want);
                    c.registered = Some(want);
                }
                (Some(_), false) => {}
            }
        }
        deadlines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_takes_a_decimal_port_in_any_case() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"connect 1234"), Some(1234));
        assert_eq!(parse_connect(b"CoNnEcT  4294967295 "), Some(u32::MAX));
        assert_eq!(parse_connect(b"\tCONNECT\t7"), Some(7));
    }

    #[test]
    fn connect_line_rejects_garbage() {
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT x",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"CONNECT 0x10",
            b"LISTEN 52",
            b"CONNECTS 52",
            b"\xffCONNECT 52",
            b"CONNECT 5\xff",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
