//! Each client's request budget: a token bucket per caller SPIFFE ID, so
//! one client cannot take the endpoint (or the audit trail) from the
//! others. The map is bounded: when it is full, buckets that have refilled
//! (callers idle for at least `burst / rate` seconds) are forgotten; a new
//! caller is refused only while every tracked caller is busy.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Most callers tracked at once.
pub const MAX_CALLERS: usize = 10_000;

/// The buckets of every caller.
#[derive(Debug)]
pub struct CallerRates {
    rate: f64,
    burst: f64,
    max_callers: usize,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

// === impl CallerRates ===

impl CallerRates {
    /// Buckets refilling at `rate` a second, holding `burst` at most, for
    /// at most [`MAX_CALLERS`] callers.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_max_callers(rate, burst, MAX_CALLERS)
    }

    /// As [`CallerRates::new`], for at most `max_callers` callers.
    pub fn with_max_callers(rate: u32, burst: u32, max_callers: usize) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            max_callers,
            buckets: Mutex::default(),
        }
    }

    /// Takes one request from `caller`'s bucket at `now`. `Err` holds how
    /// long until the bucket has one again (for `Retry-After`).
    pub fn admit(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= self.max_callers && !buckets.contains_key(caller) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (level, at)| refilled(*level, *at, now, rate, burst) < burst);
            if buckets.len() >= self.max_callers {
                return Err(Duration::from_secs(1));
            }
        }
        let (level, at) = buckets
            .entry(caller.to_owned())
            .or_insert((self.burst, now));
        let available = refilled(*level, *at, now, self.rate, self.burst);
        *at = now;
        *level = available;
        if available < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - available) / self.rate));
        }
        *level = available - 1.0;
        Ok(())
    }

    /// How many callers are tracked.
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn refilled(level: f64, at: Instant, now: Instant, rate: f64, burst: f64) -> f64 {
    (level + now.saturating_duration_since(at).as_secs_f64() * rate).min(burst)
}

/// Whole seconds for `Retry-After` (at least 1: `0` would invite a retry
/// loop).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}
