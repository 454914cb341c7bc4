//! Test support for unit tests (compiled only under `cfg(test)`):
//! [`eventually`], which polls a condition until it holds.
//!
//! The deadline is a hang guard, never a timing check: a test that needs
//! it fails, naming what it awaited.

use std::fmt::Display;
use std::time::Duration;

/// How long [`eventually`] waits before it fails the test.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// How long to wait between two checks.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Polls `condition` until it holds; fails, naming `what`, once
/// [`PATIENCE`] has passed.
pub(crate) async fn eventually(what: impl Display, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
