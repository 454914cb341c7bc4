//! Each uid's budget of audit bytes: what one user's requests can make the
//! agent write, per second, is bounded, so no caller can fill the disk
//! (and so stop issuance for everyone) through the trail (issue 15,
//! finding 5: four processes wrote 83 MB in 5 s).
//!
//! A token bucket per uid, in bytes of record line: it holds up to `burst`
//! and refills at `rate` per second. Every record about a caller's process
//! (one with a uid: its decisions, and the ends and renewals of its tasks)
//! is charged to that uid when it is queued, and may take the bucket below
//! zero; a record is never refused for the budget, so nothing the agent
//! must write (a task's end) is ever lost to it. What is refused is the
//! next *request*: [`Budget::admit`] runs before a request does any work,
//! and a uid whose bucket is empty or in debt is refused
//! (ResourceExhausted) before anything is created, decided or recorded.
//!
//! So a uid's records over any period add up to at most `burst` plus
//! `rate` per second, plus what requests admitted just before the bucket
//! ran dry and the tasks it already holds write afterwards (their ends
//! and renewals, which keep its bucket in debt and its requests refused).
//!
//! Refusals are themselves recorded, at most once per [`NOTE_INTERVAL`]
//! per uid: one `deny` record naming the budget, with `repeated` counting
//! the refusals since the last one.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::event::{AuditEvent, EventKind, Outcome};

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

/// Whether a request may go on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// The uid's bucket holds something: go on.
    Admitted,
    /// Empty or in debt: refuse the request; queue `note` (uncharged) if
    /// set.
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

    /// Whether `uid`'s next request may go on. `pid` and `executable` go
    /// into the refusal record.
    pub(super) fn admit(
        &mut self,
        uid: u32,
        pid: i32,
        executable: Option<&std::path::Path>,
        now: Instant,
    ) -> Admission {
        let Some(bucket) = self.bucket(uid, now) else {
            return Admission::Refused { note: None };
        };
        if bucket.level > 0.0 {
            return Admission::Admitted;
        }
        bucket.refused += 1;
        if bucket
            .noted
            .is_some_and(|noted| now < noted + NOTE_INTERVAL)
        {
            return Admission::Refused { note: None };
        }
        bucket.noted = Some(now);
        let refused = std::mem::take(&mut bucket.refused);
        Admission::Refused {
            note: Some(Box::new(AuditEvent {
                pid: Some(pid),
                uid: Some(uid),
                executable: executable.map(|path| path.display().to_string()),
                reason: Some(format!(
                    "audit budget of uid {uid} exhausted ({} bytes/s, burst {}): its requests are refused until it refills",
                    self.rate, self.burst
                )),
                repeated: Some(refused),
                ..AuditEvent::new(EventKind::Deny, Outcome::Deny)
            })),
        }
    }

    /// Charges `bytes` for `event` to the uid it is about, if any. Never
    /// refuses: the bucket may go into debt.
    pub(super) fn charge(&mut self, event: &AuditEvent, bytes: usize, now: Instant) {
        if let Some(uid) = event.uid
            && let Some(bucket) = self.bucket(uid, now)
        {
            bucket.level -= bytes as f64;
        }
    }

    /// `uid`'s bucket, refilled to `now`; `None` when no room is left to
    /// track a new uid.
    fn bucket(&mut self, uid: u32, now: Instant) -> Option<&mut Bucket> {
        let (rate, burst) = (self.rate as f64, self.burst as f64);
        if !self.buckets.contains_key(&uid) && self.buckets.len() >= MAX_UIDS {
            self.buckets
                .retain(|_, bucket| bucket.refilled(now, rate, burst) < burst);
            if self.buckets.len() >= MAX_UIDS {
                return None;
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
        Some(bucket)
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

    fn about(uid: u32) -> AuditEvent {
        AuditEvent {
            pid: Some(42),
            uid: Some(uid),
            ..AuditEvent::new(EventKind::IssueJwt, Outcome::Allow)
        }
    }

    fn admit(budget: &mut Budget, uid: u32, now: Instant) -> Admission {
        budget.admit(uid, 42, None, now)
    }

    #[test]
    fn a_uid_is_admitted_until_its_records_spend_the_burst_then_at_its_rate() {
        let mut budget = Budget::new(100, 1000);
        let start = Instant::now();
        for _ in 0..10 {
            assert_eq!(admit(&mut budget, 7, start), Admission::Admitted);
            budget.charge(&about(7), 100, start);
        }
        let Admission::Refused { note: Some(note) } = admit(&mut budget, 7, start) else {
            panic!("the burst is spent: refused, and noted");
        };
        assert_eq!(note.repeated, Some(1));
        assert!(note.reason.unwrap().contains("uid 7"));
        assert_eq!(
            admit(&mut budget, 7, start),
            Admission::Refused { note: None }
        );
        // Another uid has its own bucket.
        assert_eq!(admit(&mut budget, 8, start), Admission::Admitted);
        // Records never refuse: a task's end of uid 7 takes it into debt,
        // which one second (100 bytes) does not repay.
        budget.charge(&about(7), 150, start);
        let later = start + Duration::from_secs(1);
        assert_eq!(
            admit(&mut budget, 7, later),
            Admission::Refused { note: None }
        );
        // Two seconds more do.
        let later = start + Duration::from_secs(3);
        assert_eq!(admit(&mut budget, 7, later), Admission::Admitted);
        // Past the interval, the refusals since the note are counted.
        budget.charge(&about(7), 10_000, later);
        let Admission::Refused { note: Some(note) } = admit(&mut budget, 7, start + NOTE_INTERVAL)
        else {
            panic!("noted again after the interval");
        };
        assert_eq!(note.repeated, Some(3));
    }

    #[test]
    fn records_about_no_caller_are_not_charged() {
        let mut budget = Budget::new(1, 1);
        let now = Instant::now();
        budget.charge(
            &AuditEvent::new(EventKind::EntryChange, Outcome::Allow),
            60_000,
            now,
        );
        budget.charge(
            &AuditEvent::new(EventKind::PolicyReload, Outcome::Info),
            60_000,
            now,
        );
        assert!(budget.buckets.is_empty());
        assert_eq!(admit(&mut budget, 7, now), Admission::Admitted);
    }

    #[test]
    fn the_uids_tracked_are_bounded() {
        let mut budget = Budget::new(1, 100);
        let now = Instant::now();
        for uid in 0..MAX_UIDS as u32 {
            budget.charge(&about(uid), 100, now);
        }
        // Every tracked bucket owes: a new uid waits for room.
        assert_eq!(
            admit(&mut budget, u32::MAX, now),
            Admission::Refused { note: None }
        );
        assert_eq!(budget.buckets.len(), MAX_UIDS);
        // Once the others have refilled, they are forgotten and a new uid
        // gets its burst.
        let later = now + Duration::from_secs(100);
        assert_eq!(admit(&mut budget, u32::MAX - 1, later), Admission::Admitted);
    }
}
