//! virtio-vsock (virtio 1.x §5.10) with Firecracker's hybrid backend: the
//! guest's AF_VSOCK stream sockets meet host AF_UNIX streams.
//!
//! - Host-initiated: a host program connects to `uds_path`, writes
//!   `CONNECT <port>\n`, and once the guest accepts reads `OK <host
//!   port>\n`; from then on the stream is the connection. The host port
//!   is allocated from 2^30 upward.
//! - Guest-initiated: a guest connect to CID 2 port P reaches a listener
//!   at `<uds_path>_P`; if nothing listens there the guest gets RST.
//!
//! Stream sockets only. Credit-based flow control both ways: the guest is
//! never sent more than it has room for, and each connection buffers at
//! most 64 KiB of guest data for a slow host reader (the `buf_alloc` it
//! advertises). Anything malformed from the guest is dropped or answered
//! with RST and counted; no allocation is sized by the guest.
//!
//! `packet.rs` is the header codec, `connection.rs` one connection's
//! state and credit, `muxer.rs` the table of connections and the Unix
//! side; this file is the device: queues, event-loop fds and the timer.

mod connection;
mod muxer;
mod packet;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::VsockConfig;
use crate::device::{
    ActivateError, Activation, BACKEND_TOKEN_BASE, GuestRam, Interrupt, VirtioDevice, device_type,
    feature,
};
use crate::queue;
pub use muxer::{LOCAL_PORT_FIRST, parse_connect};
use muxer::{Muxer, Poller};
use packet::{HDR_LEN, Header, MAX_PKT_PAYLOAD};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// Connections open at once (Firecracker's `MAX_CONNECTIONS`); a host
/// connection past this is accepted and dropped, a guest one gets RST.
pub const MAX_CONNECTIONS: usize = 1023;
/// The guest must answer a host-initiated REQUEST within this.
pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
/// A connection in shutdown is killed after this.
pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(2000);
/// How often deadlines are checked while any is pending.
const TIMER_TICK: Duration = Duration::from_millis(100);

const LISTENER_TOKEN: u32 = BACKEND_TOKEN_BASE;
const KICK_TOKEN: u32 = BACKEND_TOKEN_BASE + 1;
const TIMER_TOKEN: u32 = BACKEND_TOKEN_BASE + 2;
const STREAM_TOKEN_BASE: u32 = BACKEND_TOKEN_BASE + 16;

/// Counters for metrics (Firecracker's `vsock` group, plus the reasons
/// guest packets were refused). "rx" is towards the guest, "tx" from it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VsockCounters {
    pub activate_fails: u64,
    pub rx_queue_event_count: u64,
    pub tx_queue_event_count: u64,
    pub ev_queue_event_count: u64,
    pub muxer_event_fails: u64,
    pub conn_event_fails: u64,
    pub rx_bytes_count: u64,
    pub tx_bytes_count: u64,
    pub rx_packets_count: u64,
    pub tx_packets_count: u64,
    pub conns_added: u64,
    pub conns_killed: u64,
    pub conns_removed: u64,
    pub tx_flush_fails: u64,
    pub tx_write_fails: u64,
    pub rx_read_fails: u64,
    /// Guest data past its credit (the connection is killed).
    pub tx_buf_overflows: u64,
    /// Descriptor chains too short or unreadable.
    pub bad_descriptors: u64,
    /// Guest packets with a bad length, type, op or state.
    pub bad_packets: u64,
    /// Guest packets from another CID than the guest's, or not to the host.
    pub bad_cid: u64,
    /// Guest packets for no connection (answered with RST).
    pub unknown_conn: u64,
    /// RSTs dropped because the guest gave no receive buffers for long.
    pub ctrl_dropped: u64,
    /// Host streams closed for a bad `CONNECT` line.
    pub bad_connect: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Firecracker's words, so scripts that match them keep working.
    #[error(
        "vsock {}: Cannot create backend for vsock device: Error binding to the host-side Unix socket: {}",
        path.display(),
        musl_text(source)
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock: {0}")]
    Setup(std::io::Error),
}

/// An I/O error as Firecracker (built with musl) prints it, where glibc's
/// words differ: `Address in use (os error 98)` for a stale socket file.
pub fn musl_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!("Address in use (os error {})", libc::EADDRINUSE),
        _ => e.to_string(),
    }
}

struct Active {
    ram: GuestRam,
    rx: Queue,
    tx: Queue,
    _evt: Queue,
    interrupt: Arc<Interrupt>,
}

pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    /// Wakes the event loop from a vCPU thread (activate, reset), which
    /// has no `EventOps` to change what epoll watches.
    kick: EventFd,
    timer: TimerFd,
    timer_running: bool,
    active: Option<Active>,
    tx_bounce: Vec<u8>,
}

impl Vsock {
    /// Takes the listener the configuration bound, or binds one at
    /// `uds_path` now: an existing file there (even a stale socket) is an
    /// error, not something to delete.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        let listener = match &config.listener {
            Some(bound) => bound.0.try_clone().map_err(VsockError::Setup)?,
            None => UnixListener::bind(&config.uds_path).map_err(|source| VsockError::Bind {
                path: config.uds_path.clone(),
                source,
            })?,
        };
        listener.set_nonblocking(true).map_err(VsockError::Setup)?;
        let guest_cid = u64::from(config.guest_cid);
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(
                guest_cid,
                &config.uds_path,
                listener,
                LISTENER_TOKEN,
                STREAM_TOKEN_BASE,
            ),
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Setup)?,
            timer: TimerFd::new().map_err(|e| VsockError::Setup(e.into()))?,
            timer_running: false,
            active: None,
            tx_bounce: vec![0; MAX_PKT_PAYLOAD],
        })
    }

    pub fn counters(&self) -> &VsockCounters {
        &self.muxer.counters
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.muxer.connections()
    }

    fn process_tx(&mut self, now: Instant) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let muxer = &mut self.muxer;
        let bounce = &mut self.tx_bounce;
        let mem = &a.ram.mem;
        queue::drain(&mut a.tx, &a.ram, &a.interrupt, |chain| {
            let Ok(mut r) = chain.reader(mem) else {
                muxer.counters.bad_descriptors += 1;
                return Some(0);
            };
            let mut raw = [0u8; HDR_LEN];
            if r.read_exact(&mut raw).is_err() {
                muxer.counters.bad_descriptors += 1;
                return Some(0);
            }
            let h = Header::parse(&raw);
            let mut len = 0;
            if h.op == packet::op::RW {
                len = h.len as usize;
                if len > MAX_PKT_PAYLOAD
                    || len > r.available_bytes()
                    || r.read_exact(&mut bounce[..len]).is_err()
                {
                    muxer.on_malformed(&h);
                    return Some(0);
                }
            }
            muxer.on_guest_packet(&h, &bounce[..len], now);
            Some(0)
        });
    }

    fn process_rx(&mut self, now: Instant) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = queue::pop(&mut a.rx, &a.ram, &a.interrupt) else {
                break;
            };
            let head = chain.head_index();
            let len = match chain.clone().writer(&a.ram.mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let Ok(mut payload) = w.split_at(HDR_LEN) else {
                        self.muxer.counters.bad_descriptors += 1;
                        continue;
                    };
                    let room = payload.available_bytes().min(MAX_PKT_PAYLOAD);
                    let Some((h, data)) = self.muxer.next_rx(room, now) else {
                        if room == 0 && self.muxer.has_rx() {
                            // Data waits and this buffer holds none: give
                            // it back empty rather than let it block the ring.
                            self.muxer.counters.bad_descriptors += 1;
                            if let Err(e) = a.rx.add_used(&a.ram.mem, head, 0) {
                                tracing::warn!("virtio-vsock: rx queue: {e:?}");
                                a.interrupt.set_needs_reset();
                                break;
                            }
                            used = true;
                            continue;
                        }
                        a.rx.go_to_previous_position();
                        break;
                    };
                    // Both fit: `room` and HDR_LEN were checked above.
                    let _ = payload.write_all(data);
                    let _ = w.write_all(&h.to_bytes());
                    queue::note_writes(&a.ram, &chain);
                    HDR_LEN + h.len as usize
                }
                _ => {
                    self.muxer.counters.bad_descriptors += 1;
                    0
                }
            };
            if let Err(e) = a.rx.add_used(&a.ram.mem, head, len as u32) {
                tracing::warn!("virtio-vsock: rx queue: {e:?}");
                a.interrupt.set_needs_reset();
                break;
            }
            used = true;
        }
        if used {
            queue::signal_used(&mut a.rx, &a.ram, &a.interrupt);
        }
    }

    /// Watches the device's own fds (the listener waits for activation).
    fn register(&mut self, poll: &mut impl Poller) {
        poll.add(self.kick.as_raw_fd(), KICK_TOKEN, EventSet::IN);
        poll.add(self.timer.as_raw_fd(), TIMER_TOKEN, EventSet::IN);
    }

    /// Brings epoll and the timer in line after any work.
    fn finish(&mut self, poll: &mut impl Poller) {
        let deadlines = self.muxer.sync(poll);
        if deadlines != self.timer_running {
            let r = if deadlines {
                self.timer.reset(TIMER_TICK, Some(TIMER_TICK))
            } else {
                self.timer.clear()
            };
            if let Err(e) = r {
                tracing::warn!("vsock: timer: {e}");
            }
            self.timer_running = deadlines;
        }
    }

    fn on_queue(&mut self, index: usize, poll: &mut impl Poller) {
        let now = Instant::now();
        match index {
            RX => self.muxer.counters.rx_queue_event_count += 1,
            TX => {
                self.muxer.counters.tx_queue_event_count += 1;
                self.process_tx(now);
            }
            EVT => self.muxer.counters.ev_queue_event_count += 1,
            _ => {}
        }
        self.process_rx(now);
        self.finish(poll);
    }

    fn on_backend(&mut self, token: u32, events: EventSet, poll: &mut impl Poller) {
        let now = Instant::now();
        match token {
            LISTENER_TOKEN => self.muxer.accept(),
            KICK_TOKEN => {
                let _ = self.kick.read();
            }
            TIMER_TOKEN => {
                let _ = self.timer.wait();
                self.muxer.expire(now);
            }
            _ => self.muxer.on_stream_event(token, events, now),
        }
        self.process_rx(now);
        self.finish(poll);
    }
}

/// The event loop's `EventOps` as the muxer's [`Poller`].
struct OpsPoller<'a, 'b>(&'a mut EventOps<'b>);

impl Poller for OpsPoller<'_, '_> {
    fn add(&mut self, fd: RawFd, token: u32, events: EventSet) {
        if let Err(e) = self.0.add(Events::with_data_raw(fd, token, events)) {
            tracing::warn!("vsock: cannot watch fd {fd}: {e:?}");
        }
    }
    fn modify(&mut self, fd: RawFd, token: u32, events: EventSet) {
        if let Err(e) = self.0.modify(Events::with_data_raw(fd, token, events)) {
            tracing::warn!("vsock: cannot change fd {fd}: {e:?}");
        }
    }
    fn remove(&mut self, fd: RawFd) {
        let _ = self.0.remove(Events::empty_raw(fd));
    }
}

impl VirtioDevice for Vsock {
    fn metrics(&self) -> Vec<(&'static str, Vec<(String, u64)>)> {
        vec![("vsock", crate::device::counter_fields(self.counters()))]
    }
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let mut queues = act.queues.into_iter();
        let mut next = |i| {
            queues
                .next()
                .filter(|q| i == EVT || q.ready())
                .ok_or(ActivateError::QueueNotReady(i))
        };
        let (rx, tx, evt) = match (next(RX), next(TX), next(EVT)) {
            (Ok(rx), Ok(tx), Ok(evt)) => (rx, tx, evt),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                self.muxer.counters.activate_fails += 1;
                return Err(e);
            }
        };
        self.active = Some(Active {
            ram: act.ram,
            rx,
            tx,
            _evt: evt,
            interrupt: act.interrupt,
        });
        self.muxer.set_active(true);
        let _ = self.kick.write(1);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
        let _ = self.kick.write(1);
    }
    fn init_backend(&mut self, ops: &mut EventOps) {
        self.register(&mut OpsPoller(ops));
    }
    fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        self.on_queue(index, &mut OpsPoller(ops));
    }
    fn backend_event(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        self.on_backend(token, events, &mut OpsPoller(ops));
    }
}

#[cfg(test)]
mod tests;
