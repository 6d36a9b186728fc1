//! Test support shared by every device's tests: guest memory, an
//! interrupt line that counts, a transport driven like a Linux driver
//! would, a seeded random source, and a random-garbage fuzz loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmplay_devices::BusDeviceSync;
use vmplay_hypervisor::{GuestMemory, IrqLine};

use crate::device::{GuestRam, Interrupt, VirtioDevice, feature};
use crate::event_loop::EventLoop;
use crate::mmio::{MmioTransport, status};

pub const MEM_SIZE: usize = 1 << 20;

#[derive(Default)]
pub struct CountingIrq(pub AtomicUsize);

impl IrqLine for CountingIrq {
    fn pulse(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
    fn set_level(&self, _: bool) {}
}

/// xorshift64*: reproducible from its seed, no dependency.
pub struct Rand(u64);

impl Rand {
    pub fn new(seed: u64) -> Self {
        Rand(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A device on a transport over 1 MiB of guest memory, with its event loop
/// run on the test's thread.
pub struct Rig {
    pub mem: GuestMemory,
    pub transport: MmioTransport,
    pub irq: Arc<CountingIrq>,
    pub event_loop: EventLoop,
}

impl Rig {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let queues = device.lock().unwrap().queue_max_sizes().len();
        let events: Vec<EventFd> = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add_device(device.clone(), &events).unwrap();
        let ram = GuestRam::new(mem.clone(), None);
        let transport =
            MmioTransport::new(device, ram, Arc::new(Interrupt::new(irq.clone())), events);
        Rig {
            mem,
            transport,
            irq,
            event_loop,
        }
    }

    pub fn read32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    /// Negotiates `features` (VERSION_1 added) and sets up queue `i` at
    /// `QUEUE_BASE + i * 0x4000` with `size` entries, then DRIVER_OK.
    pub fn handshake(&self, features: u64, sizes: &[u16]) {
        self.write32(0x70, 0);
        self.write32(0x70, status::ACKNOWLEDGE | status::DRIVER);
        let f = features | feature::VERSION_1;
        self.write32(0x24, 0);
        self.write32(0x20, f as u32);
        self.write32(0x24, 1);
        self.write32(0x20, (f >> 32) as u32);
        self.write32(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for (i, &size) in sizes.iter().enumerate() {
            let (desc, avail, used) = queue_addrs(i);
            self.write32(0x30, i as u32);
            self.write32(0x38, size.into());
            self.write32(0x80, desc as u32);
            self.write32(0x84, 0);
            self.write32(0x90, avail as u32);
            self.write32(0x94, 0);
            self.write32(0xa0, used as u32);
            self.write32(0xa4, 0);
            self.write32(0x44, 1);
        }
        self.write32(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Notifies queue `i` and lets the device run.
    pub fn notify(&mut self, i: u32) {
        self.write32(0x50, i);
        self.event_loop.run_once(0).unwrap();
    }

    /// Puts a chain of `(addr, len, write)` buffers at the head of queue
    /// `q`'s next avail slot, and publishes it.
    pub fn push_chain(&self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let (desc, avail, _) = queue_addrs(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        // Descriptors allocated in rounds of 16 per submitted chain.
        let first = (idx as usize * bufs.len()) % 256;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let slot = (first + k) as u64;
            let mut flags = 0u16;
            if k + 1 < bufs.len() {
                flags |= 1;
            }
            if write {
                flags |= 2;
            }
            let d = desc + slot * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem
                .write_obj((slot + 1) as u16, GuestAddress(d + 14))
                .unwrap();
        }
        let size = 256u64;
        self.mem
            .write_obj(
                first as u16,
                GuestAddress(avail + 4 + (u64::from(idx) % size) * 2),
            )
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        first as u16
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let (_, _, used) = queue_addrs(q);
        self.mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    /// The used element `n` of queue `q`: (id, len).
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let (_, _, used) = queue_addrs(q);
        let at = used + 4 + u64::from(n % 256) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// Where [`Rig::handshake`] puts queue `i`'s rings.
pub fn queue_addrs(i: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 + i as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

/// Data buffers for tests live from here up.
pub const DATA_BASE: u64 = 0x4_0000;

/// Throws garbage at a device through its transport for `rounds` rounds:
/// random register and config writes, random ring and descriptor contents
/// (addresses in and out of memory, loops, indirect flags, huge lengths),
/// random notifies. The device must neither panic nor stop answering its
/// registers.
pub fn fuzz_device(make: impl Fn() -> Arc<Mutex<dyn VirtioDevice>>, seed: u64, rounds: usize) {
    let mut r = Rand::new(seed);
    for _ in 0..rounds {
        let mut rig = Rig::new(make());
        let queues = rig.read_queue_count();
        let sizes: Vec<u16> = (0..queues)
            .map(|_| match r.below(4) {
                0 => 1 << r.below(9),
                1 => r.below(300) as u16,
                _ => 256,
            })
            .collect();
        let features =
            r.next() & (feature::RING_EVENT_IDX | feature::RING_INDIRECT_DESC | 0xffff_ffff);
        rig.handshake(features, &sizes);
        for _ in 0..40 {
            match r.below(10) {
                0 => {
                    let off = r.below(0x200) & !3;
                    rig.write32(off, r.next() as u32);
                }
                1 => {
                    let len = [1usize, 2, 4, 8][r.below(4) as usize];
                    let data: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
                    rig.transport.write(0x100 + r.below(0x100), &data);
                }
                2 | 3 => {
                    // Garbage somewhere in the queues' area.
                    let at = 0x1_0000 + r.below(0x3_0000);
                    let n = r.below(64) as usize;
                    let bytes: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
                    let _ = rig.mem.write_slice(&bytes, GuestAddress(at));
                }
                4..=6 => {
                    let q = r.below(queues as u64) as usize;
                    let n = 1 + r.below(4) as usize;
                    let bufs: Vec<(u64, u32, bool)> = (0..n)
                        .map(|_| {
                            let addr = match r.below(4) {
                                0 => r.next(),
                                _ => DATA_BASE + r.below(0x8_0000),
                            };
                            let len = match r.below(4) {
                                0 => r.next() as u32,
                                _ => r.below(0x2000) as u32,
                            };
                            (addr, len, r.chance(50))
                        })
                        .collect();
                    rig.push_chain(q, &bufs);
                    if r.chance(20) {
                        // Point a descriptor at itself or make it indirect.
                        let (desc, _, _) = queue_addrs(q);
                        let d = desc + r.below(256) * 16;
                        let _ = rig.mem.write_obj(r.next() as u16 | 1, GuestAddress(d + 12));
                        let _ = rig.mem.write_obj(r.below(256) as u16, GuestAddress(d + 14));
                    }
                }
                _ => {
                    let q = r.below(queues as u64 + 1) as u32;
                    rig.notify(q);
                }
            }
            // Whatever happened, the register file still answers.
            assert_eq!(rig.read32(0), 0x7472_6976);
        }
        let _ = rig.event_loop.run_once(0);
    }
}

impl Rig {
    fn read_queue_count(&self) -> usize {
        let mut n = 0;
        loop {
            self.write32(0x30, n);
            if self.read32(0x34) == 0 {
                return n as usize;
            }
            n += 1;
        }
    }
}
