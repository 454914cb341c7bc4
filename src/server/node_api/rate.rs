//! Each node's request budget: a token bucket per node name, so one node
//! (a misbehaving or rooted one) cannot take the server's signing time
//! from the others. Every node API call but AttestNode is charged once,
//! after the node is identified; a node over its budget is refused
//! ResourceExhausted, and its calls are admitted again as the bucket
//! refills. Only attested nodes have buckets, and the map is bounded.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

use crate::server::scope::NodeName;

/// Requests per second a node's bucket refills, by default
/// (`node_requests_per_second`).
pub const RATE: u32 = 200;
/// Requests a node's bucket holds at most, by default (`node_request_burst`):
/// a node starting with many workloads signs their SVIDs in a burst.
pub const BURST: u32 = 2000;
/// Most nodes tracked at once; full buckets are forgotten first.
const MAX_NODES: usize = 100_000;

/// The buckets of every node.
#[derive(Debug)]
pub(crate) struct NodeRates {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<NodeName, (f64, Instant)>>,
}

impl Default for NodeRates {
    fn default() -> Self {
        Self::new(RATE, BURST)
    }
}

impl NodeRates {
    /// Buckets refilling at `rate` a second, holding `burst` at most.
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            buckets: Mutex::default(),
        }
    }

    /// The rate and the burst, for a refusal's text.
    pub(crate) fn limits(&self) -> (f64, f64) {
        (self.rate, self.burst)
    }

    /// Takes one request from `node`'s bucket at `now`; false when empty.
    pub(crate) fn admit(&self, node: &NodeName, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_NODES && !buckets.contains_key(node) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (level, at)| refilled(*level, *at, now, rate, burst) < burst);
            if buckets.len() >= MAX_NODES {
                return false;
            }
        }
        let (level, at) = buckets.entry(node.clone()).or_insert((self.burst, now));
        let available = refilled(*level, *at, now, self.rate, self.burst);
        *at = now;
        if available < 1.0 {
            *level = available;
            return false;
        }
        *level = available - 1.0;
        true
    }
}

fn refilled(level: f64, at: Instant, now: Instant, rate: f64, burst: f64) -> f64 {
    (level + now.saturating_duration_since(at).as_secs_f64() * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_node_gets_its_burst_then_its_rate_and_others_are_untouched() {
        let rates = NodeRates::new(50, 500);
        let (a, b) = (NodeName::new("a").unwrap(), NodeName::new("b").unwrap());
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| rates.admit(&a, t0)).count();
        assert_eq!(admitted, 500);
        assert!(!rates.admit(&a, t0), "empty");
        assert!(rates.admit(&b, t0), "another node is served");
        // A second later, `RATE` more.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..1000).filter(|_| rates.admit(&a, t1)).count();
        assert_eq!(admitted, 50);
    }
}
