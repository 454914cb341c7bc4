//! The arithmetic of the fleet benchmark, pure so the integration suite
//! can check it (`tests/integration/fleet_bench_stats.rs` includes this
//! file): latency quantiles, and a process's CPU and memory second by
//! second split into steady seconds and seconds around a key rotation.

use std::time::Duration;

/// The latency at quantile `q` (0..=1) of `sorted` (ascending); zero when
/// there is none.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let last = sorted.len() - 1;
    let at = ((sorted.len() as f64 * q) as usize).min(last);
    sorted[at]
}

/// One operation's run: how many succeeded, how fast, how long each took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Successful operations per second of the run.
    pub per_second: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Successful operations.
    pub done: usize,
    /// Failed operations.
    pub errors: usize,
}

impl Summary {
    /// Summarises `latencies` (any order) of a run that lasted `duration`.
    pub fn of(mut latencies: Vec<Duration>, errors: usize, duration: Duration) -> Self {
        latencies.sort_unstable();
        Self {
            per_second: latencies.len() as f64 / duration.as_secs_f64().max(f64::EPSILON),
            p50: quantile(&latencies, 0.5),
            p99: quantile(&latencies, 0.99),
            done: latencies.len(),
            errors,
        }
    }
}

/// `value / base`, or `None` when the base is zero or either is not finite.
pub fn ratio(value: f64, base: f64) -> Option<f64> {
    let r = value / base;
    (base != 0.0 && r.is_finite()).then_some(r)
}

/// What a process did in one second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Second {
    /// CPU time used in the second, in seconds (1.0 = one core busy).
    pub cpu: f64,
    /// Resident memory at the end of the second, KiB.
    pub rss_kib: u64,
    /// Key rotation events (a key prepared or retired) logged in the second.
    pub events: usize,
    /// Node SVIDs renewed in the second (the server's audit trail).
    pub renewals: usize,
}

/// A set of seconds, summed up.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    /// How many seconds.
    pub seconds: usize,
    /// CPU used in them, seconds.
    pub cpu: f64,
    /// The busiest second's CPU.
    pub max_cpu: f64,
    /// The most resident memory at the end of any of them, KiB.
    pub max_rss_kib: u64,
}

impl Window {
    fn add(&mut self, second: &Second) {
        self.seconds += 1;
        self.cpu += second.cpu;
        self.max_cpu = self.max_cpu.max(second.cpu);
        self.max_rss_kib = self.max_rss_kib.max(second.rss_kib);
    }

    /// Mean CPU per second (1.0 = one core), zero for no seconds.
    pub fn mean_cpu(&self) -> f64 {
        if self.seconds == 0 {
            0.0
        } else {
            self.cpu / self.seconds as f64
        }
    }
}

/// `seconds` split into the rotation window (every second with a key
/// prepared or retired or a node SVID renewed, and the `after` seconds that
/// follow it) and the steady window (every other second). Node SVIDs are
/// capped at the signing CA's end, so a short CA life makes the nodes
/// renew with the rotation.
pub fn split(seconds: &[Second], after: usize) -> (Window, Window) {
    let mut steady = Window::default();
    let mut rotation = Window::default();
    let mut left = 0usize;
    for second in seconds {
        if second.events > 0 || second.renewals > 0 {
            left = after + 1;
        }
        if left > 0 {
            rotation.add(second);
            left -= 1;
        } else {
            steady.add(second);
        }
    }
    (steady, rotation)
}
