//! virtio-net (virtio 1.x §5.1): a receive and a transmit queue, the MAC
//! and link status in configuration space, mergeable receive buffers and
//! the 12-byte `virtio_net_hdr_v1` in front of every frame.
//!
//! Two backends: a host TAP ([`tap`]), whose vnet header carries checksum
//! and segmentation offloads straight to the host kernel, so the device
//! offers them; and a Unix stream of length-prefixed frames ([`passt`]),
//! Debian's `passt` for `--net user`, which takes plain frames, so the
//! device offers no offloads there.
//!
//! Receive runs when the backend is readable and the guest has buffers. A
//! frame that finds no buffer waits in the device (one frame), the backend
//! fd is no longer watched for input, and the next receive-queue notify
//! starts again. Every frame is bounded by [`MAX_FRAME`]; a chain the
//! guest got wrong drops its frame and counts, never more.

pub mod mmds;
pub mod passt;
pub mod tap;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::config::{NetBackendConfig, NetConfig};
use crate::device::{
    ActivateError, Activation, BACKEND_TOKEN_BASE, GuestRam, Interrupt, VirtioDevice, device_type,
    feature,
};
use crate::queue;
use crate::rate_limiter::RateLimiter;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// The largest Ethernet frame either way: a 64 KiB TSO segment and its
/// headers (Firecracker's bound).
pub const MAX_FRAME: usize = 65550;
const MAX_BUFFER: usize = VNET_HDR_LEN + MAX_FRAME;
const ETH_HLEN: usize = 14;
const NUM_BUFFERS_OFFSET: usize = 10;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

const BACKEND_TOKEN: u32 = BACKEND_TOKEN_BASE;
const RX_LIMITER_TOKEN: u32 = BACKEND_TOKEN_BASE + 1;
const TX_LIMITER_TOKEN: u32 = BACKEND_TOKEN_BASE + 2;
const MMDS_TIMER_TOKEN: u32 = BACKEND_TOKEN_BASE + 3;

/// Frames received per event before the loop looks at its other fds.
const RX_BATCH: usize = 256;

/// virtio-net feature bits (virtio 1.x §5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const HDR_F_NEEDS_CSUM: u8 = 1;

/// The offloads the TAP backend offers: each works end to end because the
/// vnet header goes to and from the host kernel unchanged.
const TAP_OFFLOADS: u64 = features::CSUM
    | features::GUEST_CSUM
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::HOST_TSO4
    | features::HOST_TSO6;

/// Counters for metrics (Firecracker's `net` group names).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct NetCounters {
    pub activate_fails: u64,
    pub cfg_fails: u64,
    pub event_fails: u64,
    pub rx_queue_event_count: u64,
    pub rx_tap_event_count: u64,
    pub rx_bytes_count: u64,
    pub rx_packets_count: u64,
    /// Frames dropped on the way in: a bad chain, a frame too big for the
    /// guest's buffer, a malformed frame from the backend.
    pub rx_fails: u64,
    pub rx_count: u64,
    /// Times a frame waited because the guest had no receive buffer.
    pub no_rx_avail_buffer: u64,
    pub rx_rate_limiter_throttled: u64,
    pub tap_read_fails: u64,
    pub tx_queue_event_count: u64,
    pub tx_bytes_count: u64,
    pub tx_packets_count: u64,
    /// Frames the backend refused (host errors).
    pub tx_fails: u64,
    pub tx_count: u64,
    /// Chains that are no frame: unreadable, shorter than the header,
    /// longer than [`MAX_FRAME`], or asking for an offload not offered.
    pub tx_malformed_frames: u64,
    pub tx_rate_limiter_throttled: u64,
    pub tap_write_fails: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network interface {id}: {what}: {source}")]
    Backend {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

enum Backend {
    Tap(tap::Tap),
    Stream(passt::Stream),
}

enum Recv {
    Frame(usize),
    Nothing,
    Dropped,
}

impl Backend {
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Backend::Tap(t) => t.as_raw_fd(),
            Backend::Stream(s) => s.as_raw_fd(),
        }
    }

    /// The next frame; with `may_read` false only one the backend already
    /// holds (a stream's buffer), so a batch ends without losing frames
    /// epoll would not announce again.
    fn recv(&mut self, buf: &mut [u8], may_read: bool) -> std::io::Result<Recv> {
        match self {
            Backend::Tap(_) if !may_read => Ok(Recv::Nothing),
            Backend::Tap(t) => Ok(match t.recv(buf)? {
                Some(n) => Recv::Frame(n),
                None => Recv::Nothing,
            }),
            Backend::Stream(s) => Ok(match s.recv(buf, may_read)? {
                passt::Recv::Frame(n) => Recv::Frame(n),
                passt::Recv::Nothing => Recv::Nothing,
                passt::Recv::Dropped => Recv::Dropped,
            }),
        }
    }

    /// `Ok(false)`: the backend cannot take the frame now; retry when it
    /// is writable.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        match self {
            // A TAP that cannot take a frame drops it, as a NIC would.
            Backend::Tap(t) => t.send(frame).map(|_| true),
            Backend::Stream(s) => s.send(frame),
        }
    }

    fn flush(&mut self) {
        if let Backend::Stream(s) = self {
            let _ = s.flush();
        }
    }

    fn wants_out(&self) -> bool {
        matches!(self, Backend::Stream(s) if s.wants_out())
    }

    /// Whether the peer of a stream hung up.
    fn closed(&self) -> bool {
        matches!(self, Backend::Stream(s) if s.is_closed())
    }

    fn offloads(&self) -> u64 {
        match self {
            Backend::Tap(_) => TAP_OFFLOADS,
            Backend::Stream(_) => 0,
        }
    }
}

struct Active {
    ram: GuestRam,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    features: u64,
}

/// What one attempt to hand a frame to the guest did.
enum Delivery {
    Done,
    /// The guest has too few buffers; the frame waits.
    NoBuffers,
    /// The guest's buffers were unusable; the frame is dropped and they
    /// are returned empty.
    Dropped,
}

pub struct Net {
    id: String,
    mac: [u8; 6],
    backend: Backend,
    /// The backend fd's watched events; `None` when it is not watched.
    interest: Option<EventSet>,
    /// The fd failed for good (peer gone, TAP deleted).
    dead: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    active: Option<Active>,
    /// The frame being received (vnet header first), `rx_len` bytes of it;
    /// 0 when none waits.
    rx_buf: Box<[u8]>,
    rx_len: usize,
    /// Whether the waiting frame already paid the rx rate limiter.
    rx_paid: bool,
    /// Heads of the chains one merged frame used, and their lengths.
    rx_heads: Vec<(u16, u32)>,
    tx_buf: Box<[u8]>,
    /// The metadata service, on interfaces `/mmds/config` names.
    mmds: Option<mmds::MmdsStack>,
    pub counters: NetCounters,
}

impl Net {
    /// A device for `config`: opens the TAP, starts passt or connects to
    /// its socket.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let err = |what: String| {
            let id = config.id.clone();
            move |source| NetError::Backend { id, what, source }
        };
        let backend = match &config.backend {
            NetBackendConfig::Tap { name } => {
                Backend::Tap(tap::Tap::open(name).map_err(err(format!("TAP {name}")))?)
            }
            NetBackendConfig::User => {
                Backend::Stream(passt::Stream::spawn_passt().map_err(err("user network".into()))?)
            }
            NetBackendConfig::UserSocket { path } => Backend::Stream(
                passt::Stream::connect(path).map_err(err("user network socket".into()))?,
            ),
        };
        let mac = match config.mac {
            Some(m) => m,
            None => random_mac().map_err(err("MAC address".into()))?,
        };
        let rx_limiter = RateLimiter::new(config.rx_rate_limiter.as_ref(), RX_LIMITER_TOKEN)
            .map_err(err("rx rate limiter timer".into()))?;
        let tx_limiter = RateLimiter::new(config.tx_rate_limiter.as_ref(), TX_LIMITER_TOKEN)
            .map_err(err("tx rate limiter timer".into()))?;
        let mut net = Self::with_backend(&config.id, mac, backend, rx_limiter, tx_limiter);
        if let Some(m) = &config.mmds {
            net.mmds =
                Some(mmds::MmdsStack::new(m.clone()).map_err(err("metadata service".into()))?);
        }
        Ok(net)
    }

    fn with_backend(
        id: &str,
        mac: [u8; 6],
        backend: Backend,
        rx_limiter: RateLimiter,
        tx_limiter: RateLimiter,
    ) -> Self {
        Net {
            id: id.into(),
            mac,
            backend,
            interest: None,
            dead: false,
            rx_limiter,
            tx_limiter,
            active: None,
            rx_buf: vec![0; MAX_BUFFER].into_boxed_slice(),
            rx_len: 0,
            rx_paid: false,
            rx_heads: Vec::with_capacity(QUEUE_SIZE.into()),
            tx_buf: vec![0; MAX_BUFFER].into_boxed_slice(),
            mmds: None,
            counters: NetCounters::default(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The metadata service's counters, if it answers here.
    pub fn mmds_counters(&self) -> Option<mmds::MmdsCounters> {
        self.mmds.as_ref().map(|m| m.counters)
    }

    /// The rate limiters, for PATCH after boot.
    pub fn limiters_mut(&mut self) -> (&mut RateLimiter, &mut RateLimiter) {
        (&mut self.rx_limiter, &mut self.tx_limiter)
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c
    }

    /// Moves frames from the backend into the guest's receive buffers
    /// until either runs out (or a batch is done).
    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mrg = a.features & features::MRG_RXBUF != 0;
        let mut used_any = false;
        let mut frames = 0usize;
        loop {
            if self.rx_len == 0
                && let Some(n) = self
                    .mmds
                    .as_mut()
                    .and_then(|m| m.pop(&mut self.rx_buf[VNET_HDR_LEN..]))
            {
                self.rx_buf[..VNET_HDR_LEN].fill(0);
                self.rx_len = VNET_HDR_LEN + n;
                self.rx_paid = false;
            }
            if self.rx_len == 0 {
                if self.dead {
                    break;
                }
                frames += 1;
                match self.backend.recv(&mut self.rx_buf, frames <= RX_BATCH) {
                    Ok(Recv::Frame(n)) if n >= VNET_HDR_LEN + ETH_HLEN => {
                        self.rx_len = n;
                        self.rx_paid = false;
                    }
                    Ok(Recv::Frame(_)) | Ok(Recv::Dropped) => {
                        self.counters.rx_fails += 1;
                        continue;
                    }
                    Ok(Recv::Nothing) => break,
                    Err(e) => {
                        tracing::warn!("network interface {}: receive: {e}", self.id);
                        self.counters.tap_read_fails += 1;
                        self.dead = true;
                        break;
                    }
                }
            }
            if !self.rx_paid {
                if !self.rx_limiter.consume(self.rx_len as u64, 1) {
                    self.counters.rx_rate_limiter_throttled += 1;
                    break;
                }
                self.rx_paid = true;
            }
            let frame = &mut self.rx_buf[..self.rx_len];
            match deliver(a, frame, mrg, &mut self.rx_heads, &mut used_any) {
                Delivery::Done => {
                    self.counters.rx_bytes_count += (self.rx_len - VNET_HDR_LEN) as u64;
                    self.counters.rx_packets_count += 1;
                    self.counters.rx_count += 1;
                    self.rx_len = 0;
                }
                Delivery::NoBuffers => {
                    self.counters.no_rx_avail_buffer += 1;
                    break;
                }
                Delivery::Dropped => {
                    self.counters.rx_fails += 1;
                    self.rx_len = 0;
                }
            }
        }
        if used_any {
            queue::signal_used(&mut a.rx, &a.ram, &a.interrupt);
        }
    }

    /// Sends every frame the guest queued, as far as the backend and the
    /// rate limiter allow.
    fn process_tx(&mut self) {
        let Net {
            active,
            backend,
            tx_buf,
            counters,
            tx_limiter,
            dead,
            id,
            mmds,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        backend.flush();
        if backend.wants_out() {
            return;
        }
        let offloads = a.features & (features::CSUM | features::HOST_TSO4 | features::HOST_TSO6);
        let mut for_mmds = false;
        queue::drain(&mut a.tx, &a.ram, &a.interrupt, |chain| {
            let mut reader = match chain.reader(&a.ram.mem) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("network interface {id}: bad transmit chain: {e:?}");
                    counters.tx_malformed_frames += 1;
                    return Some(0);
                }
            };
            let len = reader.available_bytes();
            if !(VNET_HDR_LEN + ETH_HLEN..=MAX_BUFFER).contains(&len) {
                tracing::debug!("network interface {id}: transmit chain of {len} bytes");
                counters.tx_malformed_frames += 1;
                return Some(0);
            }
            let frame = &mut tx_buf[..len];
            if reader.read_exact(frame).is_err() {
                counters.tx_malformed_frames += 1;
                return Some(0);
            }
            // A checksum or segmentation request the driver was not offered.
            let (flags, gso_type) = (frame[0], frame[1]);
            if (flags & HDR_F_NEEDS_CSUM != 0 && offloads & features::CSUM == 0)
                || (gso_type != 0 && offloads & (features::HOST_TSO4 | features::HOST_TSO6) == 0)
            {
                counters.tx_malformed_frames += 1;
                return Some(0);
            }
            if let Some(m) = mmds.as_mut() {
                match m.classify(&frame[VNET_HDR_LEN..]) {
                    mmds::Verdict::Pass => {}
                    // A TSO segment would exceed the stack's MTU; requests
                    // are small, so it never is one in practice.
                    mmds::Verdict::Mmds if gso_type == 0 => {
                        m.push(&frame[VNET_HDR_LEN..]);
                        for_mmds = true;
                        return Some(0);
                    }
                    mmds::Verdict::Mmds | mmds::Verdict::Drop => {
                        m.dropped();
                        return Some(0);
                    }
                }
            }
            if *dead {
                counters.tx_fails += 1;
                return Some(0);
            }
            if !tx_limiter.consume(len as u64, 1) {
                counters.tx_rate_limiter_throttled += 1;
                return None;
            }
            match backend.send(frame) {
                Ok(true) => {
                    counters.tx_bytes_count += (len - VNET_HDR_LEN) as u64;
                    counters.tx_packets_count += 1;
                    counters.tx_count += 1;
                    Some(0)
                }
                Ok(false) => None,
                Err(e) => {
                    tracing::debug!("network interface {id}: transmit: {e}");
                    counters.tx_fails += 1;
                    counters.tap_write_fails += 1;
                    Some(0)
                }
            }
        });
        if for_mmds && let Some(m) = mmds.as_mut() {
            m.poll();
        }
    }

    /// Watches the backend fd for what the device can use now: input while
    /// the guest can take a frame, output while bytes wait to be written.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let fd = self.backend.fd();
        if self.dead || self.backend.closed() {
            if self.interest.take().is_some()
                && let Err(e) =
                    ops.remove(Events::with_data_raw(fd, BACKEND_TOKEN, EventSet::empty()))
            {
                tracing::warn!("network interface {}: unwatch: {e:?}", self.id);
            }
            return;
        }
        let mut want = EventSet::empty();
        if self.active.is_some() && self.rx_len == 0 && !self.rx_limiter.is_throttled() {
            want |= EventSet::IN;
        }
        if self.backend.wants_out() {
            want |= EventSet::OUT;
        }
        if self.interest == Some(want) {
            return;
        }
        let events = Events::with_data_raw(fd, BACKEND_TOKEN, want);
        let r = if self.interest.is_some() {
            ops.modify(events)
        } else {
            ops.add(events)
        };
        match r {
            Ok(()) => self.interest = Some(want),
            Err(e) => {
                self.counters.event_fails += 1;
                tracing::warn!("network interface {}: watch: {e:?}", self.id);
            }
        }
    }
}

/// Puts `frame` (vnet header first) into the guest's receive buffers: one
/// chain, or with mergeable buffers as many as it needs, `num_buffers`
/// saying how many.
fn deliver(
    a: &mut Active,
    frame: &mut [u8],
    mrg: bool,
    heads: &mut Vec<(u16, u32)>,
    used_any: &mut bool,
) -> Delivery {
    let mem = &a.ram.mem;
    heads.clear();
    frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    let mut first = None;
    let mut written = 0usize;
    let mut bad = false;
    while written < frame.len() {
        if heads.len() >= usize::from(a.rx.size()) {
            bad = true;
            break;
        }
        let Some(chain) = queue::pop(&mut a.rx, &a.ram, &a.interrupt) else {
            for _ in 0..heads.len() {
                a.rx.go_to_previous_position();
            }
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let mut writer = match chain.clone().writer(mem) {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!("virtio-net: bad receive chain: {e:?}");
                heads.push((head, 0));
                bad = true;
                break;
            }
        };
        let room = writer.available_bytes();
        let too_small = if first.is_none() {
            room < VNET_HDR_LEN || (!mrg && room < frame.len())
        } else {
            room == 0
        };
        if too_small {
            tracing::debug!(
                "virtio-net: a receive buffer of {room} bytes for a {}-byte frame",
                frame.len()
            );
            heads.push((head, 0));
            bad = true;
            break;
        }
        let n = match writer.write(&frame[written..]) {
            Ok(n) => n,
            Err(_) => {
                heads.push((head, 0));
                bad = true;
                break;
            }
        };
        note_written(&a.ram, &chain, n);
        heads.push((head, n as u32));
        written += n;
        if first.is_none() {
            first = Some(chain);
        }
    }
    if !bad && heads.len() > 1 {
        // The header went out saying one buffer; now we know how many.
        let count = (heads.len() as u16).to_le_bytes();
        let fixed = first.and_then(|c| {
            let mut w = c.writer(mem).ok()?;
            let mut tail = w.split_at(NUM_BUFFERS_OFFSET).ok()?;
            tail.write_all(&count).ok()
        });
        bad = fixed.is_none();
    }
    for &(head, len) in heads.iter() {
        let len = if bad { 0 } else { len };
        if let Err(e) = a.rx.add_used(mem, head, len) {
            tracing::warn!("virtio-net: receive queue: {e:?}");
            a.interrupt.set_needs_reset();
            return Delivery::Dropped;
        }
        *used_any = true;
    }
    if bad {
        Delivery::Dropped
    } else {
        Delivery::Done
    }
}

/// Tells the DMA observer about the first `len` bytes of `chain`'s
/// writable buffers, the ones a frame filled (a guest's 64 KiB buffer
/// holding a 60-byte frame is one page written, not sixteen).
fn note_written(ram: &GuestRam, chain: &queue::Chain<'_>, mut len: usize) {
    for d in chain.clone().writable() {
        if len == 0 {
            break;
        }
        let n = len.min(d.len() as usize);
        ram.written(d.addr().0, n as u64);
        len -= n;
    }
}

/// A random, locally administered, unicast MAC address.
fn random_mac() -> std::io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    crate::sys::getrandom(&mut mac)?;
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok(mac)
}

/// The TAP offload flags for what the driver accepted for its receive side.
fn tun_offloads(accepted: u64) -> libc::c_uint {
    let mut f = 0;
    if accepted & features::GUEST_CSUM != 0 {
        f |= libc::TUN_F_CSUM;
        if accepted & features::GUEST_TSO4 != 0 {
            f |= libc::TUN_F_TSO4;
        }
        if accepted & features::GUEST_TSO6 != 0 {
            f |= libc::TUN_F_TSO6;
        }
    }
    f
}

impl VirtioDevice for Net {
    fn metrics(&self) -> Vec<(&'static str, Vec<(String, u64)>)> {
        let mut groups = vec![("net", crate::device::counter_fields(&self.counters))];
        if let Some(m) = &self.mmds {
            groups.push(("mmds", crate::device::counter_fields(&m.counters)));
        }
        groups
    }
    fn metrics_id(&self) -> Option<&str> {
        Some(&self.id)
    }
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        feature::RING_INDIRECT_DESC
            | feature::RING_EVENT_IDX
            | features::MAC
            | features::STATUS
            | features::MRG_RXBUF
            | self.backend.offloads()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.x: the MAC is read-only for the driver.
        tracing::debug!(
            "network interface {}: driver wrote {} config bytes at {offset}; ignored",
            self.id,
            data.len()
        );
        self.counters.cfg_fails += 1;
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let mut queues = act.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            self.counters.activate_fails += 1;
            return Err(ActivateError::QueueNotReady(RX));
        };
        for (i, q) in [&rx, &tx].into_iter().enumerate() {
            if !q.ready() {
                self.counters.activate_fails += 1;
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        if let Backend::Tap(t) = &self.backend
            && let Err(e) = t.set_offload(tun_offloads(act.features))
        {
            self.counters.activate_fails += 1;
            return Err(ActivateError::Backend(format!(
                "network interface {}: TAP {} offloads: {e}",
                self.id,
                t.name()
            )));
        }
        self.active = Some(Active {
            ram: act.ram,
            rx,
            tx,
            interrupt: act.interrupt,
            features: act.features,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
    }
    fn init_backend(&mut self, ops: &mut EventOps) {
        self.rx_limiter.register(ops);
        self.tx_limiter.register(ops);
        if let Some(m) = &self.mmds
            && let Err(e) = ops.add(Events::with_data(m.timer(), MMDS_TIMER_TOKEN, EventSet::IN))
        {
            tracing::error!(
                "network interface {}: cannot watch the MMDS timer: {e:?}",
                self.id
            );
        }
        self.sync_interest(ops);
    }
    fn queue_notified(&mut self, index: usize, ops: &mut EventOps) {
        match index {
            RX => {
                self.counters.rx_queue_event_count += 1;
                self.process_rx();
            }
            TX => {
                self.counters.tx_queue_event_count += 1;
                self.process_tx();
                // A reply may already wait; frames the guest just sent
                // often make one.
                self.process_rx();
            }
            _ => {}
        }
        self.sync_interest(ops);
    }
    fn backend_event(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        if token == BACKEND_TOKEN {
            if events.intersects(EventSet::IN) {
                self.counters.rx_tap_event_count += 1;
                self.process_rx();
            }
            if events.intersects(EventSet::OUT) {
                self.process_tx();
                if self.mmds.as_ref().is_some_and(|m| m.has_output()) {
                    self.process_rx();
                }
            }
            if events.intersects(EventSet::ERROR | EventSet::HANG_UP)
                && !events.intersects(EventSet::IN)
            {
                if let Backend::Stream(s) = &mut self.backend {
                    s.close("hung up");
                } else {
                    tracing::warn!("network interface {}: TAP failed", self.id);
                }
                self.dead = true;
            }
        } else if self.rx_limiter.is_timer(token) {
            self.rx_limiter.timer_fired();
            self.process_rx();
        } else if self.tx_limiter.is_timer(token) {
            self.tx_limiter.timer_fired();
            self.process_tx();
        } else if token == MMDS_TIMER_TOKEN
            && let Some(m) = self.mmds.as_mut()
        {
            m.timer_fired();
            self.process_rx();
        }
        self.sync_interest(ops);
    }
}

#[cfg(test)]
mod tests;
