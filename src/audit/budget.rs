//! Each uid's budget of audit bytes: what one user's requests can make the
//! agent write, per second, is bounded, so no caller can fill the disk
//! (and so stop issuance for everyone) through the trail (issue 15,
//! finding 5: four processes wrote 83 MB in 5 s).
//!
//! A token bucket per uid, in bytes of record line: it holds up to `burst`
//! and refills at `rate` per second. A record a request caused (a
//! decision, allow or deny, with the caller's pid) is charged to the
//! caller's uid before it is queued; when the bucket cannot pay, the
//! record is not written and the request is refused (the caller fails
//! closed: nothing is issued unaudited). Records the agent makes on its own
//! (`info`: ends, expiries, reloads, recoveries, entry changes) are never
//! charged.
//!
//! Refusals are themselves recorded, at most once per [`NOTE_INTERVAL`]
//! per uid: one `deny` record naming the budget, with `repeated` counting
//! the refusals since the last one.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::event::{AuditEvent, Decision, EventKind};

/// How often, at most, a uid's refusals are recorded.
pub(super) const NOTE_INTERVAL: Duration = Duration::from_secs(10);
/// Most uids tracked at once. Past it, full buckets (uids idle long enough
/// to owe nothing) are forgotten; if none is, a new uid's requests are
/// refused until one is: the map never grows past this.
const MAX_UIDS: usize = 65536;

/// The buckets.
#[derive(Debug)]
pub(super) struct Budget {
    /// Bytes per second each uid's bucket refills.
    rate: u64,
    /// Bytes a bucket holds at most.
    burst: u64,
    buckets: HashMap<u32, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes available at `at`.
    level: f64,
    at: Instant,
    /// Refusals not yet in a record.
    refused: u64,
    /// When the last refusal record was made.
    noted: Option<Instant>,
}

/// What to do with a record.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Charge {
    /// Paid (or not chargeable): queue it.
    Paid,
    /// Over budget: refuse the request; queue `note` (uncharged) if set.
    Refused {
        /// The record of the refusals, when one is due.
        note: Option<Box<AuditEvent>>,
    },
}

// === impl Budget ===

impl Budget {
    pub(super) fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Charges `bytes` for `event` to its caller's uid, if a request
    /// caused it.
    pub(super) fn charge(&mut self, event: &AuditEvent, bytes: usize, now: Instant) -> Charge {
        let (Some(uid), Some(_)) = (event.uid, event.pid) else {
            return Charge::Paid;
        };
        if event.decision == Decision::Info {
            return Charge::Paid;
        }
        let (rate, burst) = (self.rate as f64, self.burst as f64);
        if !self.buckets.contains_key(&uid) && self.buckets.len() >= MAX_UIDS {
            self.buckets
                .retain(|_, bucket| bucket.refilled(now, rate, burst) < burst);
            if self.buckets.len() >= MAX_UIDS {
                return Charge::Refused { note: None };
            }
        }
        let bucket = self.buckets.entry(uid).or_insert(Bucket {
            level: burst,
            at: now,
            refused: 0,
            noted: None,
        });
        bucket.level = bucket.refilled(now, rate, burst);
        bucket.at = now;
        let cost = bytes as f64;
        if bucket.level >= cost {
            bucket.level -= cost;
            return Charge::Paid;
        }
        bucket.refused += 1;
        if bucket
            .noted
            .is_some_and(|noted| now < noted + NOTE_INTERVAL)
        {
            return Charge::Refused { note: None };
        }
        bucket.noted = Some(now);
        let refused = std::mem::take(&mut bucket.refused);
        Charge::Refused {
            note: Some(Box::new(AuditEvent {
                pid: event.pid,
                uid: event.uid,
                executable: event.executable.clone(),
                spiffe_id: event.spiffe_id.clone(),
                reason: Some(format!(
                    "audit budget of uid {uid} exhausted ({} bytes/s, burst {}): its requests are refused until it refills",
                    self.rate, self.burst
                )),
                repeated: Some(refused),
                ..AuditEvent::new(EventKind::Deny, Decision::Deny)
            })),
        }
    }
}

// === impl Bucket ===

impl Bucket {
    fn refilled(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.level + elapsed * rate).min(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uid: u32) -> AuditEvent {
        AuditEvent {
            pid: Some(42),
            uid: Some(uid),
            ..AuditEvent::new(EventKind::IssueJwt, Decision::Allow)
        }
    }

    #[test]
    fn a_uid_pays_up_to_its_burst_then_its_rate_and_is_told_once_per_interval() {
        let mut budget = Budget::new(100, 1000);
        let start = Instant::now();
        for _ in 0..10 {
            assert_eq!(budget.charge(&request(7), 100, start), Charge::Paid);
        }
        let Charge::Refused { note: Some(note) } = budget.charge(&request(7), 100, start) else {
            panic!("the eleventh is over the burst, and noted");
        };
        assert_eq!(note.repeated, Some(1));
        assert!(note.reason.unwrap().contains("uid 7"));
        assert_eq!(
            budget.charge(&request(7), 100, start),
            Charge::Refused { note: None }
        );
        // Another uid has its own bucket.
        assert_eq!(budget.charge(&request(8), 100, start), Charge::Paid);
        // One second refills 100 bytes: one record.
        let later = start + Duration::from_secs(1);
        assert_eq!(budget.charge(&request(7), 100, later), Charge::Paid);
        assert_eq!(
            budget.charge(&request(7), 100, later),
            Charge::Refused { note: None }
        );
        // Past the interval (9 s more: 900 bytes), the refusals since the
        // note are counted.
        let much_later = start + NOTE_INTERVAL;
        for _ in 0..9 {
            assert_eq!(budget.charge(&request(7), 100, much_later), Charge::Paid);
        }
        let Charge::Refused { note: Some(note) } = budget.charge(&request(7), 100, much_later)
        else {
            panic!("noted again after the interval");
        };
        assert_eq!(note.repeated, Some(3));
    }

    #[test]
    fn what_the_agent_records_on_its_own_is_never_charged() {
        let mut budget = Budget::new(1, 1);
        let now = Instant::now();
        let end = AuditEvent {
            decision: Decision::Info,
            ..request(7)
        };
        let renewal = AuditEvent {
            pid: None,
            ..request(7)
        };
        for event in [
            end,
            renewal,
            AuditEvent::new(EventKind::EntryChange, Decision::Allow),
        ] {
            assert_eq!(budget.charge(&event, 60_000, now), Charge::Paid);
        }
    }

    #[test]
    fn the_uids_tracked_are_bounded() {
        let mut budget = Budget::new(1, 100);
        let now = Instant::now();
        for uid in 0..MAX_UIDS as u32 {
            assert_eq!(budget.charge(&request(uid), 100, now), Charge::Paid);
        }
        // Every tracked bucket owes: a new uid waits for room.
        assert_eq!(
            budget.charge(&request(u32::MAX), 100, now),
            Charge::Refused { note: None }
        );
        assert_eq!(budget.buckets.len(), MAX_UIDS);
        // Once the others have refilled, they are forgotten and a new uid
        // gets its burst.
        let later = now + Duration::from_secs(100);
        assert_eq!(
            budget.charge(&request(u32::MAX - 1), 100, later),
            Charge::Paid
        );
    }
}
