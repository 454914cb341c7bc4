//! Repeated identical denials, counted instead of written one by one: a
//! process that asks for the same refused thing in a loop must not turn
//! each refusal into a line of the trail (issue 15, finding 5).
//!
//! The first denial of a kind (same process, event, audience, tools,
//! reason, subject) in each [`INTERVAL`] is recorded as it comes; the
//! identical ones after it are counted, and once the interval is over the
//! count goes into one record of its own (`repeated: N`), written with the
//! next record the agent makes. Allowed decisions are never held back.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

use super::event::{AuditEvent, Outcome};

/// How long identical denials are counted into one record.
pub(super) const INTERVAL: Duration = Duration::from_secs(10);
/// Most kinds of denial counted at once; past it, denials are recorded
/// one by one (never dropped).
const MAX_KINDS: usize = 4096;

/// The kinds of denial being counted, each with its interval.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    counting: HashMap<u64, Counting>,
    /// The first moment an interval ends: before it, `due` has nothing to
    /// look at (it runs with every record).
    next_due: Option<Instant>,
    /// Keys the hash that tells denials apart, so no caller can aim for a
    /// collision with another's.
    keys: RandomState,
}

#[derive(Debug)]
struct Counting {
    /// When the interval of the first denial ends.
    until: Instant,
    /// Identical denials since the first.
    repeats: u64,
    /// The first, for the record of the count.
    first: AuditEvent,
}

/// What to do with a denial.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Record it.
    Record,
    /// Counted; nothing to write now.
    Counted,
}

// === impl Repeats ===

impl Repeats {
    /// Whether to record `event` now. Only denials are ever counted.
    pub(super) fn observe(&mut self, event: &AuditEvent, now: Instant) -> Verdict {
        if event.decision != Outcome::Deny {
            return Verdict::Record;
        }
        // What makes two denials the same: everything but the time.
        let kind = self.keys.hash_one(event);
        if let Some(counting) = self.counting.get_mut(&kind)
            && now < counting.until
        {
            counting.repeats += 1;
            return Verdict::Counted;
        }
        if self.counting.len() < MAX_KINDS || self.counting.contains_key(&kind) {
            // An ended interval of this kind was taken by `due` first.
            let until = now + INTERVAL;
            self.counting.insert(
                kind,
                Counting {
                    until,
                    repeats: 0,
                    first: event.clone(),
                },
            );
            self.next_due = Some(self.next_due.map_or(until, |due| due.min(until)));
        }
        Verdict::Record
    }

    /// The records of every count, over or not (the agent is stopping);
    /// every interval ends.
    pub(super) fn drain(&mut self) -> Vec<AuditEvent> {
        self.next_due = None;
        self.counting
            .drain()
            .filter(|(_, counting)| counting.repeats > 0)
            .map(|(_, counting)| AuditEvent {
                repeated: Some(counting.repeats),
                ..counting.first
            })
            .collect()
    }

    /// The records of the intervals over by `now` that counted repeats;
    /// those intervals end.
    pub(super) fn due(&mut self, now: Instant) -> Vec<AuditEvent> {
        let mut records = Vec::new();
        if self.next_due.is_none_or(|due| now < due) {
            return records;
        }
        self.counting.retain(|_, counting| {
            if now < counting.until {
                return true;
            }
            if counting.repeats > 0 {
                records.push(AuditEvent {
                    repeated: Some(counting.repeats),
                    ..counting.first.clone()
                });
            }
            false
        });
        self.next_due = self.counting.values().map(|c| c.until).min();
        records
    }
}

#[cfg(test)]
mod tests {
    use super::super::event::EventKind;
    use super::*;

    fn denial(pid: i32, audience: &str) -> AuditEvent {
        AuditEvent {
            pid: Some(pid),
            audience: Some(audience.into()),
            reason: Some("token expired".into()),
            ..AuditEvent::new(EventKind::Validate, Outcome::Deny)
        }
    }

    #[test]
    fn identical_denials_are_counted_into_one_record_per_interval() {
        let start = Instant::now();
        let mut repeats = Repeats::default();
        assert_eq!(repeats.observe(&denial(7, "a"), start), Verdict::Record);
        for _ in 0..99 {
            assert_eq!(repeats.observe(&denial(7, "a"), start), Verdict::Counted);
        }
        // Another process, another audience, an allowed decision: recorded.
        assert_eq!(repeats.observe(&denial(8, "a"), start), Verdict::Record);
        assert_eq!(repeats.observe(&denial(7, "b"), start), Verdict::Record);
        let allowed = AuditEvent::new(EventKind::Validate, Outcome::Allow);
        assert_eq!(repeats.observe(&allowed, start), Verdict::Record);
        assert_eq!(repeats.observe(&allowed, start), Verdict::Record);
        assert!(repeats.due(start + INTERVAL / 2).is_empty());
        let due = repeats.due(start + INTERVAL);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].repeated, Some(99));
        assert_eq!(due[0].pid, Some(7));
        // A new interval starts with a record again.
        assert_eq!(
            repeats.observe(&denial(7, "a"), start + INTERVAL),
            Verdict::Record
        );
    }
}
