//! The fleet benchmark's arithmetic (`benches/fleet/stats.rs`, included
//! here: a bench target has no test harness): quantiles, throughput, the
//! ratio the report prints, and the split of the server's seconds into
//! steady ones and ones around a key rotation.

#[path = "../../benches/fleet/stats.rs"]
#[allow(dead_code, reason = "the bench uses what these tests do not")]
mod stats;

use std::time::Duration;

use stats::{Second, Summary, Window, quantile, ratio, split};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn quantiles_of_a_sorted_run() {
    let sorted: Vec<Duration> = (1..=100).map(ms).collect();
    assert_eq!(quantile(&sorted, 0.0), ms(1));
    assert_eq!(quantile(&sorted, 0.5), ms(51));
    assert_eq!(quantile(&sorted, 0.99), ms(100));
    assert_eq!(quantile(&sorted, 1.0), ms(100), "clamped to the last");
    assert_eq!(quantile(&[], 0.5), Duration::ZERO, "no sample: zero");
}

#[test]
fn a_summary_sorts_and_counts() {
    let latencies = vec![ms(30), ms(10), ms(20), ms(40)];
    let summary = Summary::of(latencies, 3, Duration::from_secs(2));
    assert_eq!(summary.done, 4);
    assert_eq!(summary.errors, 3);
    assert!((summary.per_second - 2.0).abs() < 1e-9, "4 in 2 s");
    assert_eq!(summary.p50, ms(30));
    assert_eq!(summary.p99, ms(40));
}

#[test]
fn a_ratio_needs_a_base() {
    assert_eq!(ratio(3.0, 2.0), Some(1.5));
    assert_eq!(ratio(3.0, 0.0), None);
    assert_eq!(ratio(f64::NAN, 1.0), None);
}

fn second(cpu: f64, rss_kib: u64, events: usize) -> Second {
    Second {
        cpu,
        rss_kib,
        events,
        renewals: 0,
    }
}

#[test]
fn rotation_seconds_are_the_event_and_those_after_it() {
    let seconds = [
        second(0.01, 100, 0),
        second(0.02, 100, 0),
        second(0.50, 120, 2), // a key prepared
        second(0.30, 130, 0),
        second(0.10, 125, 0),
        second(0.01, 110, 0),
    ];
    let (steady, rotation) = split(&seconds, 2);
    assert_eq!(steady.seconds, 3);
    assert_eq!(rotation.seconds, 3);
    assert!((rotation.cpu - 0.9).abs() < 1e-9);
    assert!((rotation.max_cpu - 0.5).abs() < 1e-9);
    assert_eq!(rotation.max_rss_kib, 130);
    assert!((steady.cpu - 0.04).abs() < 1e-9);
    assert_eq!(steady.max_rss_kib, 110);
    assert!((steady.mean_cpu() - 0.04 / 3.0).abs() < 1e-9);
}

#[test]
fn a_second_event_inside_the_window_extends_it() {
    let seconds = [
        second(0.1, 1, 1),
        second(0.1, 1, 0),
        second(0.1, 1, 1),
        second(0.1, 1, 0),
        second(0.1, 1, 0),
        second(0.1, 1, 0),
    ];
    let (steady, rotation) = split(&seconds, 2);
    assert_eq!(rotation.seconds, 5, "seconds 0 to 4");
    assert_eq!(steady.seconds, 1);
}

#[test]
fn node_renewals_open_the_window_too() {
    let mut renewing = second(0.2, 1, 0);
    renewing.renewals = 100;
    let seconds = [
        second(0.0, 1, 0),
        renewing,
        second(0.0, 1, 0),
        second(0.0, 1, 0),
    ];
    let (steady, rotation) = split(&seconds, 1);
    assert_eq!(rotation.seconds, 2, "the renewal's second and the next");
    assert!((rotation.cpu - 0.2).abs() < 1e-9);
    assert_eq!(steady.seconds, 2);
}

#[test]
fn no_seconds_no_mean() {
    assert_eq!(Window::default().mean_cpu(), 0.0);
    let (steady, rotation) = split(&[], 2);
    assert_eq!(steady, Window::default());
    assert_eq!(rotation, Window::default());
}
