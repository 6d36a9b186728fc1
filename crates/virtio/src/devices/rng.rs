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

pub struct Rng {
    active: Option<Active>,
    limiter: RateLimiter,
    buf: Vec<u8>,
}

impl Rng {
    pub fn new(limiter: RateLimiter) -> Self {
        Rng {
            active: None,
            limiter,
            buf: vec![0; MAX_REQUEST],
        }
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let buf = &mut self.buf;
        let limiter = &mut self.limiter;
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
                return None;
            }
            let out = &mut buf[..want];
            if let Err(e) = crate::sys::getrandom(out) {
                tracing::warn!("virtio-rng: getrandom: {e}");
                return Some(0);
            }
            let n = writer.write(out).unwrap_or(0);
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
        self.process();
    }
    fn backend_event(&mut self, token: u32, _events: event_manager::EventSet, _ops: &mut EventOps) {
        if self.limiter.is_timer(token) {
            self.limiter.timer_fired();
            self.process();
        }
    }
}
