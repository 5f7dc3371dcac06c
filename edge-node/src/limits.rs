//! Per-merchant rate limits and daily quotas, enforced by each edge on its own traffic.
//!
//! A token bucket per merchant: `events_per_second` refill, `burst` capacity. A batch may
//! overdraw the bucket (one batch larger than the burst must not be refused forever); the
//! debt then delays the next batch. Over the limit the client gets "retry after N ms"
//! (HTTP 429 with `Retry-After`, RSocket REJECTED); over the daily quota, "retry tomorrow".
//!
//! Limits are per edge: with N edges a merchant can reach N times its rate. That keeps the
//! check local (no bus round trip per batch); a fleet operator divides the figure by the
//! number of edges a merchant's traffic spreads over.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use beacon_proto::bus::MerchantLimits;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    #[error("over this merchant's rate limit of {rate} events/s at this edge: retry in {retry_after_ms} ms")]
    Rate { rate: u32, retry_after_ms: u64 },
    #[error("this merchant's daily quota of {quota} events is used up (UTC day); retry after midnight UTC")]
    Quota { quota: u64, retry_after_ms: u64 },
}

impl Limited {
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            Limited::Rate { retry_after_ms, .. } | Limited::Quota { retry_after_ms, .. } => {
                *retry_after_ms
            }
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
    day: i64,
    used_today: u64,
    /// Recent batch size (moving average): what the next batch will probably need.
    typical: f64,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

const DAY_MS: i64 = 86_400_000;

impl RateLimiter {
    /// Refuses at once while `merchant`'s bucket is empty or its quota used up, before a
    /// batch is even decoded: a flood over the limit then costs the edge almost nothing.
    pub fn precheck(
        &self,
        merchant: &str,
        limits: &MerchantLimits,
        now_ms: i64,
        now: Instant,
    ) -> Result<(), Limited> {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = buckets.get(merchant) else {
            return Ok(());
        };
        let rate = f64::from(limits.events_per_second.max(1));
        let tokens = b.tokens + now.duration_since(b.last).as_secs_f64() * rate;
        // Enough for a batch of the usual size (at most the burst), else it would only be
        // received to be refused.
        let need = b.typical.clamp(1.0, f64::from(limits.burst.max(1)));
        if tokens < need {
            return Err(Limited::Rate {
                rate: limits.events_per_second,
                retry_after_ms: (((need - tokens) / rate * 1000.0).ceil() as u64).max(1),
            });
        }
        let day = now_ms.div_euclid(DAY_MS);
        match limits.daily_events {
            Some(quota) if b.day == day && b.used_today >= quota => Err(Limited::Quota {
                quota,
                retry_after_ms: ((day + 1) * DAY_MS - now_ms).max(1000) as u64,
            }),
            _ => Ok(()),
        }
    }

    /// Holds a typical batch's worth of `merchant`'s allowance for a frame just read, before
    /// it is decoded (the QUIC loop does not read the connection's next frame until it
    /// has): a merchant at its limit then has one frame per connection waiting, instead of
    /// frames read, decoded and refused while the allowance refills. The batch's
    /// [`take`](Self::take) is credited with what was held; [`release`](Self::release)
    /// gives back a hold whose batch never got there.
    pub fn hold(
        &self,
        merchant: &str,
        limits: &MerchantLimits,
        now_ms: i64,
        now: Instant,
    ) -> Result<usize, Limited> {
        self.precheck(merchant, limits, now_ms, now)?;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = buckets.get_mut(merchant) else {
            // First batch: a full bucket, which `take` creates.
            return Ok(0);
        };
        let rate = f64::from(limits.events_per_second.max(1));
        let burst = f64::from(limits.burst.max(1));
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        // Whole events, so what is held is exactly what is credited back.
        let need = b.typical.clamp(1.0, burst).ceil();
        if b.tokens < need {
            // Another connection held it since the precheck.
            return Err(Limited::Rate {
                rate: limits.events_per_second,
                retry_after_ms: (((need - b.tokens) / rate * 1000.0).ceil() as u64).max(1),
            });
        }
        b.tokens -= need;
        Ok(need as usize)
    }

    /// Gives back a [`hold`](Self::hold) whose batch was never admitted (undecodable, over
    /// the batch limit, the connection closing).
    pub fn release(&self, merchant: &str, held: usize, limits: &MerchantLimits) {
        if held == 0 {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get_mut(merchant) {
            b.tokens = (b.tokens + held as f64).min(f64::from(limits.burst.max(1)));
        }
    }

    /// Gives back `n` events taken for a batch that was then not stored (bus unavailable,
    /// refused downstream): a retry must not be charged twice.
    pub fn refund(&self, merchant: &str, n: usize, limits: &MerchantLimits) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get_mut(merchant) {
            b.tokens = (b.tokens + n as f64).min(f64::from(limits.burst.max(1)));
            b.used_today = b.used_today.saturating_sub(n as u64);
        }
    }

    /// Takes `n` events from `merchant`'s allowance, or says when to retry; `held` events
    /// were already held for the batch ([`hold`](Self::hold)) and are given back first,
    /// whatever the answer. `now_ms` is the wall clock (for the quota's UTC day), `now` the
    /// monotonic one (for the bucket).
    pub fn take(
        &self,
        merchant: &str,
        n: usize,
        held: usize,
        limits: &MerchantLimits,
        now_ms: i64,
        now: Instant,
    ) -> Result<(), Limited> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            // Forget merchants whose bucket has been full for a while.
            buckets.retain(|_, b| now.duration_since(b.last).as_secs() < 600);
        }
        let day = now_ms.div_euclid(DAY_MS);
        let rate = f64::from(limits.events_per_second.max(1));
        let burst = f64::from(limits.burst.max(1));
        let b = buckets.entry(merchant.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
            day,
            used_today: 0,
            typical: 1.0,
        });
        b.typical = 0.8 * b.typical + 0.2 * n as f64;
        b.tokens =
            (b.tokens + held as f64 + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.day != day {
            b.day = day;
            b.used_today = 0;
        }
        let n64 = n as u64;
        if let Some(quota) = limits.daily_events {
            if b.used_today + n64 > quota {
                return Err(Limited::Quota {
                    quota,
                    retry_after_ms: ((day + 1) * DAY_MS - now_ms).max(1000) as u64,
                });
            }
        }
        // Enough for the batch, or (for a batch above the burst) a full bucket.
        let need = (n as f64).min(burst);
        if b.tokens < need {
            let wait = ((need - b.tokens) / rate * 1000.0).ceil() as u64;
            return Err(Limited::Rate {
                rate: limits.events_per_second,
                retry_after_ms: wait.max(1),
            });
        }
        b.tokens -= n as f64;
        b.used_today += n64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: MerchantLimits = MerchantLimits {
        events_per_second: 100,
        burst: 200,
        daily_events: Some(1_000),
    };

    #[test]
    fn burst_then_rate() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        let ms = 1_790_000_000_000;
        assert!(l.take("m", 150, 0, &LIMITS, ms, t0).is_ok());
        assert!(l.take("m", 50, 0, &LIMITS, ms, t0).is_ok());
        let err = l.take("m", 50, 0, &LIMITS, ms, t0).unwrap_err();
        assert_eq!(
            err,
            Limited::Rate {
                rate: 100,
                retry_after_ms: 500
            }
        );
        // Half a second refills 50.
        assert!(l
            .take("m", 50, 0, &LIMITS, ms, t0 + Duration::from_millis(500))
            .is_ok());
        // Another merchant has its own bucket.
        assert!(l.take("other", 200, 0, &LIMITS, ms, t0).is_ok());
    }

    #[test]
    fn a_batch_above_the_burst_passes_on_a_full_bucket_and_leaves_debt() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        let ms = 1_790_000_000_000;
        assert!(l.take("m", 500, 0, &LIMITS, ms, t0).is_ok());
        // 300 events of debt: 5 s until the bucket is full again.
        let err = l
            .take("m", 500, 0, &LIMITS, ms, t0 + Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(err.retry_after_ms(), 4000);
    }

    #[test]
    fn precheck_refuses_only_an_empty_bucket() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        let ms = 1_790_000_000_000;
        assert!(l.precheck("m", &LIMITS, ms, t0).is_ok(), "unknown merchant");
        assert!(l.take("m", 10, 0, &LIMITS, ms, t0).is_ok());
        // Typical batch now ~2.8 events; 190 left.
        assert!(l.precheck("m", &LIMITS, ms, t0).is_ok());
        assert!(l.take("m", 190, 0, &LIMITS, ms, t0).is_ok());
        assert!(l.precheck("m", &LIMITS, ms, t0).is_err(), "empty");
        // Typical is now ~40 events: 0.4 s of refill before a batch is read again.
        let err = l.precheck("m", &LIMITS, ms, t0).unwrap_err();
        assert!((390..=410).contains(&err.retry_after_ms()), "{err:?}");
        assert!(l
            .precheck("m", &LIMITS, ms, t0 + std::time::Duration::from_millis(410))
            .is_ok());
    }

    #[test]
    fn daily_quota_resets_at_utc_midnight() {
        let l = RateLimiter::default();
        let mut t = Instant::now();
        let day_start = 1_790_035_200_000; // a UTC midnight
        let ms = day_start + 3_600_000;
        for _ in 0..5 {
            assert!(l.take("m", 200, 0, &LIMITS, ms, t).is_ok());
            t += Duration::from_secs(2);
        }
        let err = l.take("m", 1, 0, &LIMITS, ms, t).unwrap_err();
        assert!(matches!(err, Limited::Quota { quota: 1000, .. }));
        assert_eq!(err.retry_after_ms(), 23 * 3_600_000);
        assert!(l.take("m", 1, 0, &LIMITS, day_start + DAY_MS, t).is_ok());
    }

    #[test]
    fn a_hold_stops_other_readers_and_is_settled_by_the_batch() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        let ms = 1_790_000_000_000;
        assert_eq!(
            l.hold("m", &LIMITS, ms, t0),
            Ok(0),
            "unknown merchant: nothing to hold"
        );
        // Batches of 100 make 100 the typical batch (a moving average).
        for _ in 0..20 {
            l.release("m", 0, &LIMITS);
            let _ = l.take("m", 100, 0, &LIMITS, ms, t0 + Duration::from_secs(10));
        }
        let t = t0 + Duration::from_secs(20);
        let held = l.hold("m", &LIMITS, ms, t).expect("room for one batch");
        assert_eq!(held, 99, "the typical batch, rounded up");
        // A second reader finds only what is left of the 200-event burst.
        let second = l.hold("m", &LIMITS, ms, t).expect("room for a second");
        assert!(l.hold("m", &LIMITS, ms, t).is_err(), "a third must wait");
        // The batches settle with their holds: no event charged twice.
        assert!(l.take("m", 100, held, &LIMITS, ms, t).is_ok());
        l.release("m", second, &LIMITS);
        assert!(
            l.take("m", 100, 0, &LIMITS, ms, t).is_ok(),
            "the release returned it"
        );
        assert!(l.take("m", 1, 0, &LIMITS, ms, t).is_err());
    }
}
