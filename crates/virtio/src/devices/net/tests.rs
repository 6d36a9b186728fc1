//! The device against real split rings in guest memory, over a socket
//! pair standing in for passt: frames both ways, mergeable buffers, the
//! frame that waits for a buffer, and guest or peer garbage (counted,
//! never a panic).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmplay_hypervisor::IrqLine;

use super::*;

const MEM_SIZE: u64 = 1 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct NoIrq;
impl IrqLine for NoIrq {
    fn pulse(&self) {}
    fn set_level(&self, _: bool) {}
}

/// A split ring the test plays the driver of.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(base: u64, size: u16) -> Ring {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Ring {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes `bufs` (address, length, device-writable) one chain and
    /// offers it.
    fn offer(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            let at = GuestAddress(self.desc + 16 * u64::from(idx));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(self.next_desc, at.unchecked_add(14)).unwrap();
        }
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The `i`th used entry: (head, length).
    fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    net: Net,
    peer: UnixStream,
    rx: Ring,
    tx: Ring,
}

fn rig(features: u64) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let (ours, peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend = Backend::Stream(passt::Stream::from_socket(ours).unwrap());
    let mut net = Net::with_backend(
        "net0",
        [6, 0, 0, 0, 0, 1],
        backend,
        RateLimiter::default(),
        RateLimiter::default(),
    );
    let rx = Ring::new(0x1000, 16);
    let tx = Ring::new(0x3000, 16);
    net.activate(Activation {
        ram: GuestRam::new(mem.clone(), None),
        queues: vec![rx.queue(), tx.queue()],
        interrupt: Arc::new(Interrupt::new(Arc::new(NoIrq))),
        features,
    })
    .unwrap();
    Rig {
        mem,
        net,
        peer,
        rx,
        tx,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn peer_send(peer: &mut UnixStream, f: &[u8]) {
    peer.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
    peer.write_all(f).unwrap();
}

fn peer_recv(peer: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    peer.read_exact(&mut len).unwrap();
    let mut f = vec![0; u32::from_be_bytes(len) as usize];
    peer.read_exact(&mut f).unwrap();
    f
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn sends_a_guest_frame_to_the_socket_without_its_header() {
    let mut r = rig(0);
    let f = frame(60, 1);
    let mut hdr_and_head = vec![0u8; VNET_HDR_LEN];
    hdr_and_head.extend_from_slice(&f[..20]);
    r.mem
        .write_slice(&hdr_and_head, GuestAddress(0x10000))
        .unwrap();
    r.mem.write_slice(&f[20..], GuestAddress(0x20000)).unwrap();
    r.tx.offer(&r.mem, &[(0x10000, 32, false), (0x20000, 40, false)]);
    r.net.process_tx();
    assert_eq!(peer_recv(&mut r.peer), f);
    assert_eq!(r.tx.used_idx(&r.mem), 1);
    assert_eq!(r.tx.used(&r.mem, 0), (0, 0));
    assert_eq!(r.net.counters.tx_packets_count, 1);
    assert_eq!(r.net.counters.tx_bytes_count, 60);
}

#[test]
fn receives_a_frame_into_one_buffer_with_num_buffers_1() {
    let mut r = rig(0);
    let f = frame(100, 2);
    peer_send(&mut r.peer, &f);
    r.mem
        .write_slice(&[0xaa; 16], GuestAddress(0x10000))
        .unwrap();
    r.rx.offer(&r.mem, &[(0x10000, 2048, true)]);
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.rx.used(&r.mem, 0), (0, 112));
    let got = read(&r.mem, 0x10000, 112);
    assert_eq!(got[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(got[VNET_HDR_LEN..], f);
    assert_eq!(r.net.counters.rx_packets_count, 1);
}

#[test]
fn merges_a_big_frame_across_small_buffers() {
    let mut r = rig(features::MRG_RXBUF);
    let f = frame(3000, 3);
    peer_send(&mut r.peer, &f);
    for i in 0..4 {
        r.rx.offer(&r.mem, &[(0x10000 + i * 0x1000, 1024, true)]);
    }
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    assert_eq!(r.rx.used(&r.mem, 0), (0, 1024));
    assert_eq!(r.rx.used(&r.mem, 1), (1, 1024));
    assert_eq!(r.rx.used(&r.mem, 2), (2, 3012 - 2048));
    let mut got = read(&r.mem, 0x10000, 1024);
    got.extend(read(&r.mem, 0x11000, 1024));
    got.extend(read(&r.mem, 0x12000, 3012 - 2048));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(got[VNET_HDR_LEN..], f);
}

#[test]
fn a_frame_waits_for_a_buffer_and_a_merged_one_takes_none_until_it_fits() {
    let mut r = rig(features::MRG_RXBUF);
    let f = frame(3000, 4);
    peer_send(&mut r.peer, &f);
    r.net.process_rx();
    assert_eq!(r.net.counters.no_rx_avail_buffer, 1);
    // One buffer is not enough: it stays the guest's.
    r.rx.offer(&r.mem, &[(0x10000, 2048, true)]);
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    assert_eq!(r.net.counters.no_rx_avail_buffer, 2);
    r.rx.offer(&r.mem, &[(0x11000, 2048, true)]);
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(r.net.counters.rx_packets_count, 1);
    assert_eq!(r.net.counters.rx_fails, 0);
}

#[test]
fn a_frame_too_big_for_an_unmerged_buffer_is_dropped_and_the_buffer_returned() {
    let mut r = rig(0);
    peer_send(&mut r.peer, &frame(3000, 5));
    peer_send(&mut r.peer, &frame(100, 6));
    r.rx.offer(&r.mem, &[(0x10000, 1526, true)]);
    r.rx.offer(&r.mem, &[(0x11000, 1526, true)]);
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(r.rx.used(&r.mem, 0), (0, 0));
    assert_eq!(r.rx.used(&r.mem, 1), (1, 112));
    assert_eq!(r.net.counters.rx_fails, 1);
    assert_eq!(r.net.counters.rx_packets_count, 1);
}

#[test]
fn skips_frames_of_impossible_length_from_the_peer() {
    let mut r = rig(0);
    // 70000 bytes claimed (more than any frame), then a runt, then a frame.
    r.peer.write_all(&70000u32.to_be_bytes()).unwrap();
    let mut junk = vec![0x55u8; 70000];
    let writer = {
        let mut p = r.peer.try_clone().unwrap();
        std::thread::spawn(move || {
            p.write_all(&junk).unwrap();
            junk.clear();
            p.write_all(&5u32.to_be_bytes()).unwrap();
            p.write_all(&[1, 2, 3, 4, 5]).unwrap();
            peer_send(&mut p, &frame(64, 7));
        })
    };
    for i in 0..4 {
        r.rx.offer(&r.mem, &[(0x10000 + i * 0x1000, 2048, true)]);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.net.counters.rx_packets_count == 0 && std::time::Instant::now() < deadline {
        r.net.process_rx();
        std::thread::sleep(Duration::from_millis(1));
    }
    writer.join().unwrap();
    assert_eq!(r.net.counters.rx_fails, 2);
    assert_eq!(r.net.counters.rx_packets_count, 1);
    assert_eq!(
        read(&r.mem, 0x10000 + VNET_HDR_LEN as u64, 64),
        frame(64, 7)
    );
}

#[test]
fn malformed_transmit_chains_are_counted_and_never_sent() {
    let mut r = rig(0);
    // Shorter than header + Ethernet header.
    r.tx.offer(&r.mem, &[(0x10000, 20, false)]);
    // Longer than any frame.
    r.tx.offer(&r.mem, &[(0x20000, 40000, false), (0x40000, 40000, false)]);
    // A checksum offload request on a device that offered none.
    let mut hdr = [0u8; VNET_HDR_LEN + 60];
    hdr[0] = HDR_F_NEEDS_CSUM;
    r.mem.write_slice(&hdr, GuestAddress(0x60000)).unwrap();
    r.tx.offer(&r.mem, &[(0x60000, hdr.len() as u32, false)]);
    // Outside guest memory.
    r.tx.offer(&r.mem, &[(MEM_SIZE - 10, 100, false)]);
    // Only device-writable buffers: nothing to send.
    r.tx.offer(&r.mem, &[(0x70000, 100, true)]);
    r.net.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 5);
    assert_eq!(r.net.counters.tx_malformed_frames, 5);
    assert_eq!(r.net.counters.tx_packets_count, 0);
    r.peer.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert!(r.peer.read(&mut b).is_err(), "something reached the peer");
}

#[test]
fn the_config_space_holds_the_mac_and_link_up() {
    let r = rig(0);
    let mut c = [0xffu8; 12];
    r.net.read_config(0, &mut c);
    assert_eq!(c, [6, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
    let mut c = [0xffu8; 4];
    r.net.read_config(u64::MAX, &mut c);
    assert_eq!(c, [0; 4]);
}

#[test]
fn a_generated_mac_is_unicast_and_locally_administered() {
    for _ in 0..64 {
        let m = random_mac().unwrap();
        assert_eq!(m[0] & 3, 2);
    }
}

#[test]
fn tap_offloads_follow_what_the_driver_accepted() {
    assert_eq!(tun_offloads(0), 0);
    assert_eq!(tun_offloads(features::GUEST_TSO4), 0);
    assert_eq!(
        tun_offloads(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

/// xorshift64*: a fixed seed gives the same run every time.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random descriptor tables, rings and config writes, with the peer
/// sending frames of random sizes: the device may drop, count or ask for
/// a reset, but never panics and never touches memory outside the guest's.
#[test]
fn survives_random_rings_descriptors_and_config_writes() {
    let mut rnd = Rand(0x5eed_1234_abcd_0001);
    const SMALL_MEM: u64 = 64 * 1024;
    for round in 0..300 {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SMALL_MEM as usize)]).unwrap();
        // Random bytes everywhere, then descriptors that mostly point
        // into memory so chains get walked far.
        let mut noise = vec![0u8; SMALL_MEM as usize];
        for b in noise.chunks_mut(8) {
            b.copy_from_slice(&rnd.next().to_le_bytes()[..b.len()]);
        }
        mem.write_slice(&noise, GuestAddress(0)).unwrap();
        let size = [1u16, 2, 4, 8, 16, 32, 64, 256][rnd.below(8) as usize];
        let mut queues = Vec::new();
        for _ in 0..2 {
            let base = rnd.below(SMALL_MEM) & !0xf;
            let ring = Ring::new(base, size);
            for i in 0..u64::from(size) {
                let at = GuestAddress(ring.desc + 16 * i);
                let addr = if rnd.below(8) == 0 {
                    rnd.next()
                } else {
                    rnd.below(SMALL_MEM)
                };
                let len = match rnd.below(4) {
                    0 => rnd.next() as u32,
                    _ => rnd.below(4096) as u32,
                };
                let flags = (rnd.next() as u16) & (F_NEXT | F_WRITE | F_INDIRECT);
                let next = rnd.below(u64::from(size) + 2) as u16;
                let _ = mem.write_obj(addr, at);
                let _ = mem.write_obj(len, at.unchecked_add(8));
                let _ = mem.write_obj(flags, at.unchecked_add(12));
                let _ = mem.write_obj(next, at.unchecked_add(14));
            }
            let _ = mem.write_obj(
                rnd.below(u64::from(size) * 2) as u16,
                GuestAddress(ring.avail + 2),
            );
            let mut q = ring.queue();
            q.set_event_idx(rnd.below(2) == 0);
            if rnd.below(16) == 0 {
                q.set_ready(false);
            }
            queues.push(q);
        }
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let mut net = Net::with_backend(
            "fuzz",
            [6, 0, 0, 0, 0, 2],
            Backend::Stream(passt::Stream::from_socket(ours).unwrap()),
            RateLimiter::default(),
            RateLimiter::default(),
        );
        let features = rnd.next() & (features::MRG_RXBUF | features::CSUM);
        let _ = net.activate(Activation {
            ram: GuestRam::new(mem.clone(), None),
            queues,
            interrupt: Arc::new(Interrupt::new(Arc::new(NoIrq))),
            features,
        });
        for _ in 0..8 {
            match rnd.below(4) {
                0 => {
                    let len = match rnd.below(4) {
                        0 => rnd.next() as u32,
                        _ => rnd.below(9000) as u32,
                    };
                    let _ = peer.write_all(&len.to_be_bytes());
                    let body = vec![rnd.next() as u8; (len as usize).min(9000)];
                    let _ = peer.write_all(&body);
                    net.process_rx();
                }
                1 => net.process_tx(),
                2 => {
                    let off = rnd.below(64);
                    let data = rnd.next().to_le_bytes();
                    net.write_config(off, &data[..1 + rnd.below(8) as usize]);
                    let mut out = [0u8; 8];
                    net.read_config(rnd.next(), &mut out);
                }
                _ => {
                    // The guest adds more garbage to the avail rings.
                    let at = rnd.below(SMALL_MEM - 8);
                    let _ = mem.write_obj(rnd.next(), GuestAddress(at));
                    net.process_rx();
                    net.process_tx();
                }
            }
        }
        // Whatever the device sent is well framed.
        let mut out = Vec::new();
        let _ = peer.read_to_end(&mut out);
        let mut at = 0;
        while at + 4 <= out.len() {
            let len = u32::from_be_bytes(out[at..at + 4].try_into().unwrap()) as usize;
            assert!(len <= MAX_FRAME, "round {round}: sent a {len}-byte frame");
            at += 4 + len;
        }
        net.reset();
    }
}

/// The shared transport fuzz (register, config and ring garbage, random
/// notifies) with frames waiting on the peer's side.
#[test]
fn survives_the_transport_fuzz() {
    let peers = std::sync::Mutex::new(Vec::new());
    let make = || {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        for len in [60usize, 1500, 9000, 70000] {
            let _ = peer.write_all(&(len as u32).to_be_bytes());
            let _ = peer.write_all(&frame(len.min(9000), len as u8));
        }
        peers.lock().unwrap().push(peer);
        let net = Net::with_backend(
            "fuzz",
            [6, 0, 0, 0, 0, 3],
            Backend::Stream(passt::Stream::from_socket(ours).unwrap()),
            RateLimiter::default(),
            RateLimiter::default(),
        );
        Arc::new(std::sync::Mutex::new(net)) as Arc<std::sync::Mutex<dyn VirtioDevice>>
    };
    crate::testing::fuzz_device(make, 0x6e65_7400_0001, 200);
}

#[test]
fn the_tx_rate_limiter_holds_frames_back_until_its_bucket_refills() {
    let mut r = rig(0);
    let bucket = crate::config::TokenBucketConfig {
        size: 100,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    r.net.tx_limiter = RateLimiter::new(
        Some(&crate::config::RateLimiterConfig {
            bandwidth: Some(bucket),
            ops: None,
        }),
        TX_LIMITER_TOKEN,
    )
    .unwrap();
    for i in 0..2 {
        let at = 0x10000 + i * 0x1000;
        r.mem
            .write_slice(&[0u8; VNET_HDR_LEN + 72], GuestAddress(at))
            .unwrap();
        r.tx.offer(&r.mem, &[(at, (VNET_HDR_LEN + 72) as u32, false)]);
    }
    r.net.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 1, "the second frame must wait");
    assert_eq!(r.net.counters.tx_rate_limiter_throttled, 1);
    assert_eq!(peer_recv(&mut r.peer).len(), 72);
    std::thread::sleep(Duration::from_millis(150));
    r.net.tx_limiter.timer_fired();
    r.net.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 2);
    assert_eq!(peer_recv(&mut r.peer).len(), 72);
    assert_eq!(r.net.counters.tx_packets_count, 2);
}
