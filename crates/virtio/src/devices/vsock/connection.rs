//! One vsock stream between a guest port and a host Unix stream: its
//! state, its credit accounting both ways, and its bounded buffer of guest
//! data the host stream has not taken yet.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND, op};
use super::{CONN_SHUTDOWN_TIMEOUT, VsockCounters};

/// Guest data one connection buffers for a slow host reader, and the
/// `buf_alloc` we advertise: a guest that respects its credit never has
/// more than this in flight.
pub const TX_BUF_SIZE: u32 = 64 * 1024;
/// Slack for the `OK <port>\n` line, which is not guest data.
const TX_BUF_SLACK: usize = 32;
/// Forwarded bytes the guest has not been told about that make us send a
/// CREDIT_UPDATE: half the buffer, so a guest waiting for credit always
/// gets one (what it waits for is either still buffered here, and will be
/// forwarded, or already past this threshold).
pub const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 2;

/// Both directions' credit (virtio 1.x §5.10.6.3).
#[derive(Debug, Clone, Copy, Default)]
pub struct Credit {
    /// Guest bytes we forwarded to the host stream.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as we last told the guest.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Host bytes we sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// The guest's receive buffer and how much of it it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
}

impl Credit {
    /// How many more bytes the guest can take now. A guest that claims to
    /// have consumed more than we sent gets nothing until it makes sense.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn update_from_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    pub fn needs_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Puts our side's credit in an outgoing header.
    pub fn stamp(&mut self, h: &mut Header) {
        h.buf_alloc = TX_BUF_SIZE;
        h.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent or queued, waiting for the RESPONSE.
    LocalInit,
    Established,
    /// The host stream reached EOF: SHUTDOWN sent, waiting for the RST.
    LocalClosed,
}

/// Control packets a connection owes the guest.
mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
}

/// What the muxer must do with a connection after a packet or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// A clean end: RST to the guest, close the host stream.
    Close,
    /// Forced: RST to the guest, close the host stream, count a kill.
    Kill,
    /// The guest reset it: close the host stream, send nothing.
    Remove,
}

pub struct Connection {
    pub token: u32,
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    pub credit: Credit,
    pending: u8,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are not guest data (the OK line).
    tx_uncounted: usize,
    /// We shut the host stream's write side (guest SHUTDOWN SEND).
    host_write_shut: bool,
    /// The host stream may have data (epoll said so and no read has
    /// seen EWOULDBLOCK since).
    pub readable: bool,
    /// Killed if still alive then (handshake or shutdown timeout).
    pub deadline: Option<Instant>,
    /// Whether it is in the muxer's round-robin of connections with
    /// something for the guest.
    pub in_rx_queue: bool,
    /// What epoll watches for it, if it is registered.
    pub registered: Option<event_manager::EventSet>,
}

impl Connection {
    /// A host-initiated connection: REQUEST to the guest's `peer_port`.
    pub fn local(
        token: u32,
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(token, stream, local_port, peer_port, State::LocalInit);
        c.pending = pending::REQUEST;
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection whose host side is connected.
    pub fn peer(token: u32, stream: UnixStream, req: &Header) -> Self {
        let mut c = Self::new(
            token,
            stream,
            req.dst_port,
            req.src_port,
            State::Established,
        );
        c.credit.update_from_peer(req.buf_alloc, req.fwd_cnt);
        c.pending = pending::RESPONSE;
        c
    }

    fn new(token: u32, stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            token,
            stream,
            local_port,
            peer_port,
            state,
            credit: Credit::default(),
            pending: 0,
            peer_shutdown: 0,
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            host_write_shut: false,
            readable: false,
            deadline: None,
            in_rx_queue: false,
            registered: None,
        }
    }

    /// Whether host data should flow to the guest.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Epoll interest: IN while we want data and do not know of any yet,
    /// OUT while guest data waits for the host.
    pub fn interest(&self) -> event_manager::EventSet {
        use event_manager::EventSet;
        let mut e = EventSet::empty();
        if self.wants_host_data() && !self.readable {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Whether the guest is owed a packet now.
    pub fn has_rx_work(&self) -> bool {
        self.pending != 0
            || self.credit.needs_update()
            || self.readable && self.wants_host_data() && self.credit.peer_credit() > 0
    }

    #[cfg(test)]
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// One packet for the guest into a buffer with `room` payload bytes
    /// (`bounce` is at least that big); the header says how much of
    /// `bounce` is payload. `None` when there is nothing to send now.
    pub fn next_packet(
        &mut self,
        guest_cid: u64,
        room: usize,
        bounce: &mut [u8],
        counters: &mut VsockCounters,
        now: Instant,
    ) -> Result<Option<Header>, Verdict> {
        let mut h = Header::to_guest(guest_cid, self.local_port, self.peer_port, 0);
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            h.op = op::REQUEST;
        } else if self.pending & pending::RESPONSE != 0 {
            self.pending &= !pending::RESPONSE;
            h.op = op::RESPONSE;
        } else if let Some(n) = self.read_host(room, bounce, counters, now)? {
            h.op = op::RW;
            h.len = n as u32;
            self.credit.rx_cnt += n as u32;
        } else if self.pending & pending::SHUTDOWN != 0 {
            self.pending &= !pending::SHUTDOWN;
            h.op = op::SHUTDOWN;
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        } else if self.pending & pending::CREDIT_UPDATE != 0 || self.credit.needs_update() {
            h.op = op::CREDIT_UPDATE;
        } else {
            return Ok(None);
        }
        self.pending &= !pending::CREDIT_UPDATE;
        self.credit.stamp(&mut h);
        Ok(Some(h))
    }

    /// Reads what the guest can take from the host stream. EOF starts the
    /// shutdown (SHUTDOWN to the guest, killed after the timeout).
    fn read_host(
        &mut self,
        room: usize,
        bounce: &mut [u8],
        counters: &mut VsockCounters,
        now: Instant,
    ) -> Result<Option<usize>, Verdict> {
        if !self.readable || !self.wants_host_data() {
            return Ok(None);
        }
        let max = room
            .min(bounce.len())
            .min(self.credit.peer_credit() as usize);
        if max == 0 {
            return Ok(None);
        }
        match self.stream.read(&mut bounce[..max]) {
            Ok(0) => {
                self.readable = false;
                self.state = State::LocalClosed;
                self.pending |= pending::SHUTDOWN;
                self.deadline = Some(now + CONN_SHUTDOWN_TIMEOUT);
                Ok(None)
            }
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(None)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            Err(e) => {
                tracing::debug!("vsock: host stream read: {e}");
                counters.rx_read_fails += 1;
                Err(Verdict::Kill)
            }
        }
    }

    /// A guest packet for this connection (addresses already matched).
    pub fn on_guest(
        &mut self,
        h: &Header,
        payload: &[u8],
        counters: &mut VsockCounters,
        now: Instant,
    ) -> Verdict {
        self.credit.update_from_peer(h.buf_alloc, h.fwd_cnt);
        match (self.state, h.op) {
            (_, op::RST) => Verdict::Remove,
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.write_host(line.as_bytes(), false, counters)
            }
            (State::LocalInit, _) => {
                counters.bad_packets += 1;
                Verdict::Kill
            }
            (_, op::RW) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    counters.bad_packets += 1;
                    return Verdict::Kill;
                }
                counters.tx_bytes_count += payload.len() as u64;
                self.write_host(payload, true, counters)
            }
            (_, op::SHUTDOWN) => {
                self.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && !self.tx_buf.is_empty() {
                    self.deadline = Some(now + CONN_SHUTDOWN_TIMEOUT);
                }
                self.after_flush()
            }
            (_, op::CREDIT_UPDATE) => Verdict::Keep,
            (_, op::CREDIT_REQUEST) => {
                self.pending |= pending::CREDIT_UPDATE;
                Verdict::Keep
            }
            (_, op::REQUEST | op::RESPONSE) => {
                counters.bad_packets += 1;
                Verdict::Kill
            }
            (_, other) => {
                tracing::debug!("vsock: unknown op {other} dropped");
                counters.bad_packets += 1;
                Verdict::Keep
            }
        }
    }

    /// Sends bytes to the host stream, buffering what it does not take.
    /// `guest_data` bytes count towards the credit we give back.
    fn write_host(
        &mut self,
        data: &[u8],
        guest_data: bool,
        counters: &mut VsockCounters,
    ) -> Verdict {
        if data.is_empty() {
            return Verdict::Keep;
        }
        if self.host_write_shut {
            counters.bad_packets += 1;
            return Verdict::Kill;
        }
        let mut rest = data;
        if self.tx_buf.is_empty() {
            match self.stream.write(data) {
                Ok(n) => {
                    if guest_data {
                        self.credit.fwd_cnt += n as u32;
                    }
                    rest = &data[n..];
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => {
                    tracing::debug!("vsock: host stream write: {e}");
                    counters.tx_write_fails += 1;
                    return Verdict::Kill;
                }
            }
        }
        if rest.is_empty() {
            return Verdict::Keep;
        }
        if self.tx_buf.len() + rest.len() > TX_BUF_SIZE as usize + TX_BUF_SLACK {
            // The guest sent past its credit.
            tracing::debug!("vsock: guest overran the connection's buffer");
            counters.tx_buf_overflows += 1;
            return Verdict::Kill;
        }
        if !guest_data {
            self.tx_uncounted += rest.len();
        }
        self.tx_buf.extend(rest);
        Verdict::Keep
    }

    /// The host stream is writable: moves buffered guest data on.
    pub fn flush_tx(&mut self, counters: &mut VsockCounters) -> Verdict {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let uncounted = n.min(self.tx_uncounted);
                    self.tx_uncounted -= uncounted;
                    self.credit.fwd_cnt += (n - uncounted) as u32;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host stream flush: {e}");
                    counters.tx_flush_fails += 1;
                    return Verdict::Kill;
                }
            }
        }
        self.after_flush()
    }

    /// Applies the guest's SHUTDOWN once its data has reached the host.
    fn after_flush(&mut self) -> Verdict {
        if !self.tx_buf.is_empty() {
            return Verdict::Keep;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            return Verdict::Close;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_credit_is_what_the_guest_has_room_for() {
        let mut c = Credit::default();
        c.update_from_peer(1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt += 600;
        assert_eq!(c.peer_credit(), 400);
        c.update_from_peer(1000, 500);
        assert_eq!(c.peer_credit(), 900);
        c.rx_cnt += 900;
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn peer_credit_survives_counter_wrap_and_lies() {
        let mut c = Credit {
            rx_cnt: Wrapping(u32::MAX - 10),
            ..Default::default()
        };
        c.update_from_peer(4096, u32::MAX - 10);
        c.rx_cnt += 100; // wraps
        assert_eq!(c.peer_credit(), 4096 - 100);
        // A guest claiming to have consumed more than it was sent gets nothing.
        c.update_from_peer(4096, c.rx_cnt.0.wrapping_add(5));
        assert_eq!(c.peer_credit(), 0);
        // A guest advertising a huge buffer is bounded elsewhere (by the
        // rx buffer and the bounce buffer), never by an allocation.
        c.update_from_peer(u32::MAX, c.rx_cnt.0);
        assert_eq!(c.peer_credit(), u32::MAX);
    }

    #[test]
    fn credit_update_is_due_after_half_the_buffer_is_forwarded() {
        let mut c = Credit::default();
        c.fwd_cnt += CREDIT_UPDATE_THRESHOLD - 1;
        assert!(!c.needs_update());
        c.fwd_cnt += 1;
        assert!(c.needs_update());
        let mut h = Header::default();
        c.stamp(&mut h);
        assert_eq!(
            (h.buf_alloc, h.fwd_cnt),
            (TX_BUF_SIZE, CREDIT_UPDATE_THRESHOLD)
        );
        assert!(!c.needs_update());
    }

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let req = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5000,
            dst_port: 52,
            op: op::REQUEST,
            type_: 1,
            buf_alloc: 8192,
            ..Default::default()
        };
        (Connection::peer(1, a, &req), b)
    }

    fn rw(len: usize) -> Header {
        Header {
            op: op::RW,
            len: len as u32,
            buf_alloc: 8192,
            ..Default::default()
        }
    }

    #[test]
    fn guest_data_counts_as_forwarded_only_once_the_host_took_it() {
        let (mut c, mut host) = pair();
        let mut k = VsockCounters::default();
        let now = Instant::now();
        // Fill the host socket until it pushes back, then some more.
        let chunk = vec![7u8; 4096];
        let mut sent = 0u32;
        while c.tx_buffered() == 0 {
            assert_eq!(c.on_guest(&rw(4096), &chunk, &mut k, now), Verdict::Keep);
            sent += 4096;
        }
        let buffered = c.tx_buffered() as u32;
        assert_eq!(c.credit.fwd_cnt.0, sent - buffered);
        assert!(c.interest().contains(event_manager::EventSet::OUT));
        // The host drains; a flush forwards the rest.
        let mut sink = vec![0u8; 1 << 20];
        let mut got = 0;
        loop {
            match host.read(&mut sink) {
                Ok(n) => got += n,
                Err(_) => {
                    c.flush_tx(&mut k);
                    if c.tx_buffered() == 0 {
                        break;
                    }
                }
            }
        }
        while let Ok(n) = host.read(&mut sink) {
            got += n;
        }
        assert_eq!(got as u32, sent);
        assert_eq!(c.credit.fwd_cnt.0, sent);
        assert_eq!(k.tx_bytes_count, sent as u64);
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_killed() {
        let (mut c, _host) = pair();
        let mut k = VsockCounters::default();
        let chunk = vec![0u8; 64 * 1024];
        let now = Instant::now();
        let mut verdict = Verdict::Keep;
        for _ in 0..64 {
            verdict = c.on_guest(&rw(chunk.len()), &chunk, &mut k, now);
            if verdict != Verdict::Keep {
                break;
            }
        }
        assert_eq!(verdict, Verdict::Kill);
        assert_eq!(k.tx_buf_overflows, 1);
        assert!(c.tx_buffered() <= TX_BUF_SIZE as usize + TX_BUF_SLACK);
    }

    #[test]
    fn host_data_never_exceeds_the_guest_credit() {
        let (mut c, mut host) = pair();
        let mut k = VsockCounters::default();
        let now = Instant::now();
        let mut bounce = vec![0u8; 64 * 1024];
        // The RESPONSE goes first.
        let h = c
            .next_packet(3, 4096, &mut bounce, &mut k, now)
            .unwrap()
            .unwrap();
        assert_eq!(h.op, op::RESPONSE);
        host.write_all(&[1u8; 20000]).unwrap();
        c.readable = true;
        let mut total = 0;
        while let Some(h) = c.next_packet(3, 4096, &mut bounce, &mut k, now).unwrap() {
            assert_eq!(h.op, op::RW);
            assert!(h.len <= 4096);
            total += h.len;
        }
        assert_eq!(total, 8192, "the guest advertised 8192 bytes");
        // The guest consumed it all: the rest flows.
        let upd = Header {
            op: op::CREDIT_UPDATE,
            buf_alloc: 8192,
            fwd_cnt: 8192,
            ..Default::default()
        };
        assert_eq!(c.on_guest(&upd, &[], &mut k, now), Verdict::Keep);
        assert!(c.has_rx_work());
        while let Some(h) = c.next_packet(3, 4096, &mut bounce, &mut k, now).unwrap() {
            total += h.len;
        }
        assert_eq!(total, 16384);
    }

    #[test]
    fn host_eof_sends_shutdown_and_arms_the_kill_timer() {
        let (mut c, host) = pair();
        let mut k = VsockCounters::default();
        let now = Instant::now();
        let mut bounce = vec![0u8; 4096];
        c.next_packet(3, 4096, &mut bounce, &mut k, now).unwrap();
        drop(host);
        c.readable = true;
        let h = c
            .next_packet(3, 4096, &mut bounce, &mut k, now)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.op, h.flags),
            (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        assert_eq!(c.state, State::LocalClosed);
        assert_eq!(c.deadline, Some(now + CONN_SHUTDOWN_TIMEOUT));
    }

    #[test]
    fn guest_shutdown_closes_after_its_data_is_flushed() {
        let (mut c, mut host) = pair();
        let mut k = VsockCounters::default();
        let now = Instant::now();
        assert_eq!(c.on_guest(&rw(5), b"hello", &mut k, now), Verdict::Keep);
        let send = Header {
            op: op::SHUTDOWN,
            flags: SHUTDOWN_SEND,
            ..Default::default()
        };
        assert_eq!(c.on_guest(&send, &[], &mut k, now), Verdict::Keep);
        let mut got = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello", "SHUTDOWN(SEND) is EOF for the host reader");
        let both = Header {
            op: op::SHUTDOWN,
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..Default::default()
        };
        assert_eq!(c.on_guest(&both, &[], &mut k, now), Verdict::Close);
    }
}
