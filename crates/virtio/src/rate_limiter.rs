//! Token buckets on bytes and operations, with Firecracker's semantics
//! (`RateLimiter` = bandwidth + ops buckets): a bucket starts full, refills
//! continuously at `size` per `refill_time`, spends its one-time burst
//! first, and a request larger than the bucket is let through once and
//! paid back as debt. While a device is throttled a 100 ms timer on the
//! event loop re-checks the buckets.

use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// How long a throttled device waits before trying again.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens available; negative after an oversize request (debt).
    budget: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// `None` for a bucket that limits nothing (size or refill time 0).
    pub fn new(c: &TokenBucketConfig) -> Option<Self> {
        if c.size == 0 || c.refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size: c.size,
            refill_ns: u128::from(c.refill_time_ms) * 1_000_000,
            budget: c.size.into(),
            burst: c.one_time_burst,
            last: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let add = elapsed * u128::from(self.size) / self.refill_ns;
        if add > 0 {
            let add = i128::try_from(add).unwrap_or(i128::MAX);
            self.budget = self.budget.saturating_add(add).min(self.size.into());
            self.last = now;
        }
    }

    /// Whether `tokens` could be taken now (after refilling).
    fn can_take(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        if self.burst > 0 {
            return true;
        }
        // A request bigger than the bucket goes through when it is full.
        self.budget >= i128::from(tokens.min(self.size))
    }

    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    pub fn budget(&self) -> i128 {
        self.budget
    }
}

/// A device's limiter; `RateLimiter::default()` limits nothing.
#[derive(Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Option<(TimerFd, u32)>,
    throttled: bool,
}

impl RateLimiter {
    /// A limiter from its config; `token` is the event-loop token its
    /// re-check timer fires with.
    pub fn new(config: Option<&RateLimiterConfig>, token: u32) -> std::io::Result<Self> {
        let Some(c) = config else {
            return Ok(Self::default());
        };
        let bandwidth = c.bandwidth.as_ref().and_then(TokenBucket::new);
        let ops = c.ops.as_ref().and_then(TokenBucket::new);
        let timer = if bandwidth.is_some() || ops.is_some() {
            Some((TimerFd::new()?, token))
        } else {
            None
        };
        Ok(RateLimiter {
            bandwidth,
            ops,
            timer,
            throttled: false,
        })
    }

    /// Watches the re-check timer on the event loop.
    pub fn register(&self, ops: &mut EventOps) {
        if let Some((t, token)) = &self.timer
            && let Err(e) = ops.add(Events::with_data(t, *token, EventSet::IN))
        {
            tracing::error!("rate limiter: cannot watch its timer: {e:?}");
        }
    }

    pub fn is_timer(&self, token: u32) -> bool {
        matches!(&self.timer, Some((_, t)) if *t == token)
    }

    /// The timer fired: the device may try again.
    pub fn timer_fired(&mut self) {
        if let Some((t, _)) = &mut self.timer {
            let _ = t.wait();
        }
        self.throttled = false;
    }

    /// Whether the device is waiting for the timer.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// Takes `bytes` and `ops` tokens if both buckets allow; otherwise
    /// takes nothing, arms the timer and returns false.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.throttled {
            return false;
        }
        let now = Instant::now();
        let ok_b = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.can_take(bytes, now));
        let ok_o = self.ops.as_mut().is_none_or(|b| b.can_take(ops, now));
        if ok_b && ok_o {
            if let Some(b) = &mut self.bandwidth {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(ops);
            }
            return true;
        }
        self.throttled = true;
        if let Some((t, _)) = &mut self.timer
            && let Err(e) = t.reset(RETRY, None)
        {
            tracing::warn!("rate limiter: cannot arm its timer: {e}");
            self.throttled = false;
        }
        false
    }

    /// Replaces the buckets (PATCH after boot): a given bucket is new and
    /// full, a bucket of size 0 turns that limit off, `None` keeps it.
    pub fn update(
        &mut self,
        bandwidth: Option<&TokenBucketConfig>,
        ops: Option<&TokenBucketConfig>,
    ) {
        if let Some(b) = bandwidth {
            self.bandwidth = TokenBucket::new(b);
        }
        if let Some(o) = ops {
            self.ops = TokenBucket::new(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_time_ms: u64) -> TokenBucket {
        TokenBucket::new(&TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms,
        })
        .unwrap()
    }

    #[test]
    fn a_bucket_starts_full_and_refills_at_its_rate() {
        let mut b = bucket(1000, 0, 1000);
        let t0 = b.last;
        assert!(b.can_take(1000, t0));
        b.take(1000);
        assert!(!b.can_take(1, t0));
        // Half the refill time gives half the bucket back.
        assert!(b.can_take(500, t0 + Duration::from_millis(500)));
        assert!(!b.can_take(501, t0 + Duration::from_millis(500)));
        // It never holds more than its size.
        assert!(!b.can_take(1001, t0 + Duration::from_secs(10)) || b.budget() <= 1000);
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_not_refilled() {
        let mut b = bucket(100, 50, 1000);
        let t0 = b.last;
        b.take(50);
        assert_eq!(b.budget(), 100, "burst paid for it");
        b.take(100);
        assert!(!b.can_take(1, t0));
    }

    #[test]
    fn an_oversize_request_passes_once_and_is_paid_back() {
        let mut b = bucket(100, 0, 100);
        let t0 = b.last;
        assert!(b.can_take(250, t0));
        b.take(250);
        assert_eq!(b.budget(), -150);
        assert!(!b.can_take(1, t0 + Duration::from_millis(100)));
        assert!(b.can_take(100, t0 + Duration::from_millis(250)));
    }

    #[test]
    fn zero_size_or_refill_means_unlimited() {
        assert!(
            TokenBucket::new(&TokenBucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time_ms: 10
            })
            .is_none()
        );
        assert!(
            TokenBucket::new(&TokenBucketConfig {
                size: 10,
                one_time_burst: 0,
                refill_time_ms: 0
            })
            .is_none()
        );
        let mut l = RateLimiter::default();
        assert!(l.consume(u64::MAX, u64::MAX));
    }

    #[test]
    fn a_throttled_limiter_takes_nothing_until_its_timer_fires() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: 0,
                refill_time_ms: 100_000,
            }),
            ops: Some(TokenBucketConfig {
                size: 100,
                one_time_burst: 0,
                refill_time_ms: 100_000,
            }),
        };
        let mut l = RateLimiter::new(Some(&cfg), 7).unwrap();
        assert!(l.consume(10, 1));
        assert!(!l.consume(1, 1));
        assert!(l.is_throttled());
        assert_eq!(
            l.ops.as_ref().unwrap().budget(),
            99,
            "a refused request takes no ops tokens"
        );
        assert!(l.is_timer(7));
    }
}
