//! virtio-rng (virtio 1.x §5.4): one queue of device-writable buffers,
//! filled from the host's `getrandom`.

use std::io::Write;

use event_manager::EventOps;
use virtio_queue::Queue;

use crate::device::{
    ActivateError, Activation, GuestRam, Interrupt, VirtioDevice, device_type, feature,
};
use crate::queue;
use crate::rate_limiter::RateLimiter;
use std::sync::Arc;

const QUEUE_SIZE: u16 = 256;
/// The most entropy one request gets: a guest asking for 4 GiB gets this
/// much and asks again, so no allocation is sized by the guest.
const MAX_REQUEST: usize = 64 * 1024;

struct Active {
    ram: GuestRam,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Counters for metrics (Firecracker's `entropy` group).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RngCounters {
    pub entropy_event_count: u64,
    pub entropy_bytes: u64,
    pub host_rng_fails: u64,
    pub entropy_rate_limiter_throttled: u64,
}

pub struct Rng {
    active: Option<Active>,
    limiter: RateLimiter,
    buf: Vec<u8>,
    pub counters: RngCounters,
}

impl Rng {
    pub fn new(limiter: RateLimiter) -> Self {
        Rng {
            active: None,
            limiter,
            buf: vec![0; MAX_REQUEST],
            counters: RngCounters::default(),
        }
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let buf = &mut self.buf;
        let limiter = &mut self.limiter;
        let counters = &mut self.counters;
        queue::drain(&mut a.queue, &a.ram, &a.interrupt, |chain| {
            let mut writer = match chain.clone().writer(&a.ram.mem) {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!("virtio-rng: bad chain: {e:?}");
                    return Some(0);
                }
            };
            let want = writer.available_bytes().min(MAX_REQUEST);
            if want == 0 {
                return Some(0);
            }
            if !limiter.consume(want as u64, 1) {
                counters.entropy_rate_limiter_throttled += 1;
                return None;
            }
            let out = &mut buf[..want];
            if let Err(e) = crate::sys::getrandom(out) {
                tracing::warn!("virtio-rng: getrandom: {e}");
                counters.host_rng_fails += 1;
                return Some(0);
            }
            let n = writer.write(out).unwrap_or(0);
            counters.entropy_bytes += n as u64;
            queue::note_writes(&a.ram, &chain);
            Some(n as u32)
        });
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, act: Activation) -> Result<(), ActivateError> {
        let Activation {
            ram,
            queues,
            interrupt,
            ..
        } = act;
        let queue = queues
            .into_iter()
            .next()
            .ok_or(ActivateError::QueueNotReady(0))?;
        self.active = Some(Active {
            ram,
            queue,
            interrupt,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn init_backend(&mut self, ops: &mut EventOps) {
        self.limiter.register(ops);
    }
    fn queue_notified(&mut self, _index: usize, _ops: &mut EventOps) {
        self.counters.entropy_event_count += 1;
        self.process();
    }
    fn metrics(&self) -> Vec<(&'static str, Vec<(String, u64)>)> {
        vec![("entropy", crate::device::counter_fields(&self.counters))]
    }
    fn backend_event(&mut self, token: u32, _events: event_manager::EventSet, _ops: &mut EventOps) {
        if self.limiter.is_timer(token) {
            self.limiter.timer_fired();
            self.process();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DATA_BASE, Rig, fuzz_device};
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    fn rig() -> Rig {
        Rig::new(Arc::new(Mutex::new(Rng::new(Default::default()))))
    }

    #[test]
    fn fills_a_buffer_with_random_bytes_and_interrupts() {
        let mut rig = rig();
        rig.handshake(0, &[256]);
        rig.push_chain(0, &[(DATA_BASE, 4096, true)]);
        rig.notify(0);
        assert_eq!(rig.used_idx(0), 1);
        assert_eq!(rig.used_elem(0, 0).1, 4096);
        let mut got = vec![0u8; 4096];
        rig.mem
            .read_slice(&mut got, GuestAddress(DATA_BASE))
            .unwrap();
        assert!(
            got.iter().filter(|&&b| b == 0).count() < 100,
            "looks random"
        );
        assert_eq!(rig.irq.0.load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_huge_request_gets_a_bounded_answer() {
        let mut rig = rig();
        rig.handshake(0, &[256]);
        // 512 KiB of buffer: the device fills at most MAX_REQUEST of it.
        rig.push_chain(0, &[(DATA_BASE, 512 * 1024, true)]);
        rig.notify(0);
        assert_eq!(rig.used_elem(0, 0).1 as usize, MAX_REQUEST);
    }

    #[test]
    fn a_buffer_outside_guest_memory_completes_empty() {
        let mut rig = rig();
        rig.handshake(0, &[256]);
        rig.push_chain(0, &[(1 << 40, 64, true)]);
        rig.notify(0);
        assert_eq!(rig.used_idx(0), 1);
        assert_eq!(rig.used_elem(0, 0).1, 0);
    }

    #[test]
    fn rate_limited_entropy_waits_for_its_tokens() {
        use crate::config::{RateLimiterConfig, TokenBucketConfig};
        let limiter = RateLimiter::new(
            Some(&RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 100,
                    one_time_burst: 0,
                    refill_time_ms: 100_000,
                }),
                ops: None,
            }),
            crate::device::BACKEND_TOKEN_BASE,
        )
        .unwrap();
        let mut rig = Rig::new(Arc::new(Mutex::new(Rng::new(limiter))));
        rig.handshake(0, &[256]);
        rig.push_chain(0, &[(DATA_BASE, 100, true)]);
        rig.push_chain(0, &[(DATA_BASE + 0x1000, 100, true)]);
        rig.notify(0);
        assert_eq!(rig.used_idx(0), 1, "the second request waits for tokens");
    }

    #[test]
    fn survives_random_garbage() {
        let seed = std::env::var("VMPLAY_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        fuzz_device(
            || Arc::new(Mutex::new(Rng::new(Default::default()))),
            seed,
            200,
        );
    }
}
