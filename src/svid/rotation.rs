//! The X.509-SVID rotation loop: the single owner of renewals.
//!
//! It sleeps until the earliest renewal time in the cache, re-issues what is
//! due, and on every registry change drops the SVIDs of removed or changed
//! entries (their holders' streams re-issue on demand), and the cached
//! JWT-SVIDs of those entries. Issuance that fails
//! keeps the last good SVID, which stays valid until its own expiry, and is
//! retried with backoff.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::SvidIssuer;
use crate::registration::{Match, Registry};

/// Longest sleep between looks at the cache: it bounds how late a step of
/// the wall clock (forward: renewals due at once; back: SVIDs not valid
/// yet) is noticed, since the sleep itself runs on the monotonic clock.
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// Wait after a failed renewal before the next attempt.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

// === impl SvidIssuer ===

impl SvidIssuer {
    /// Runs until `cancel`: renews X.509-SVIDs at about half their life.
    pub async fn run_rotation(self, registry: Registry, cancel: CancellationToken) {
        let mut entries = registry.subscribe();
        let mut cache_changes = self.x509.subscribe_all();
        loop {
            // Seen before the cache is read, so every change after the read
            // wakes the wait below: our own renewals too, whose next due
            // time `next` cannot know (it was computed before them).
            cache_changes.mark_seen();
            let now = SystemTime::now();
            let (due, next) = self.x509.due(now);
            let mut failed = false;
            let current = registry.snapshot();
            for svid in due {
                let Some(entry) = current.get(&svid.entry_id) else {
                    continue;
                };
                if !svid.is_wanted() {
                    // Nobody took it, nor its predecessor: let it go; it is
                    // issued again on demand.
                    tracing::debug!(
                        entry_id = %entry.id,
                        spiffe_id = %svid.spiffe_id,
                        serial = %svid.serial,
                        "dropped an X.509-SVID nobody took"
                    );
                    self.x509.remove(&svid);
                    continue;
                }
                let matched = Match {
                    entry: Arc::clone(entry),
                    spiffe_id: svid.spiffe_id.clone(),
                };
                match self.renew_x509(&matched, &svid).await {
                    Ok(new) => {
                        new.succeed(&svid);
                        tracing::debug!(
                            entry_id = %entry.id,
                            spiffe_id = %svid.spiffe_id,
                            serial = %new.serial,
                            "renewed X.509-SVID"
                        );
                    }
                    Err(error) => {
                        failed = true;
                        tracing::warn!(
                            entry_id = %entry.id,
                            spiffe_id = %svid.spiffe_id,
                            error = %crate::error::Chain(&error),
                            "X.509-SVID renewal failed; the current SVID stays until it expires"
                        );
                    }
                }
            }
            let wait = if failed {
                RETRY_AFTER_FAILURE
            } else {
                sleep_until(next, SystemTime::now())
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                // A newly issued SVID may be due before the current wait ends.
                () = cache_changes.changed() => {}
                Ok(()) = entries.changed() => {
                    let set = entries.borrow_and_update().clone();
                    let dropped = self.x509.retain_current(&set);
                    if dropped > 0 {
                        tracing::debug!(dropped, "dropped X.509-SVIDs of removed or changed entries");
                    }
                    let dropped = self.jwt.retain_current(&set);
                    if dropped > 0 {
                        tracing::debug!(dropped, "dropped cached JWT-SVIDs of removed or changed entries");
                    }
                }
            }
        }
    }
}

/// How long to sleep before the next renewal, due at `next`: not at all
/// when it is already due (renewing the others can take long enough under
/// load), at most [`MAX_SLEEP`].
fn sleep_until(next: Option<SystemTime>, now: SystemTime) -> Duration {
    next.map_or(MAX_SLEEP, |next| {
        next.duration_since(now).unwrap_or(Duration::ZERO)
    })
    .min(MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_already_due_is_not_put_off() {
        // Regression: a renewal that fell due while the loop was renewing
        // others waited MAX_SLEEP, and loaded agents let SVIDs lapse.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let past = now - Duration::from_millis(1);
        assert_eq!(sleep_until(Some(past), now), Duration::ZERO);
        assert_eq!(sleep_until(Some(now), now), Duration::ZERO);
    }

    #[test]
    fn sleeps_until_the_next_renewal_or_the_longest_sleep() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let soon = Duration::from_secs(3);
        assert_eq!(sleep_until(Some(now + soon), now), soon);
        assert_eq!(sleep_until(Some(now + 10 * MAX_SLEEP), now), MAX_SLEEP);
        assert_eq!(sleep_until(None, now), MAX_SLEEP);
    }
}
