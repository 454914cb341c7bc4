//! The key rotation schedule, shared by X.509 CAs and JWT keys.
//!
//! Every key has a lifetime `[not_before, not_after]` and an activation time.
//! The successor of the active key is *prepared* (generated and published in
//! the bundle, but not used) at half the active key's life, and *activated*
//! (used for signing) at five sixths of it. A key stays in the bundle until
//! its own `not_after`, and everything it signs is capped at that instant, so
//! a verifier always holds the key for every unexpired credential, and every
//! key is in the bundle well before anything is signed with it.
//!
//! The schedule is pure: [`plan`] takes the clock reading as an argument, so
//! tests can walk through a key's whole life without sleeping.

use std::time::{Duration, SystemTime};

/// When a key may be used and when it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity; the key leaves the bundle then.
    pub not_after: SystemTime,
    /// From when the key signs (never before it is published).
    pub activates_at: SystemTime,
}

/// What the rotation loop must do for one kind of key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Indexes (into the slice given to [`plan`]) of keys past `not_after`.
    pub expired: Vec<usize>,
    /// Generate a successor with this activation time.
    pub prepare: Option<SystemTime>,
    /// When to look again.
    pub next_check: SystemTime,
}

// === impl Lifetime ===

impl Lifetime {
    /// A key created at `now` for `ttl`, active from `activates_at`.
    pub fn starting(now: SystemTime, ttl: Duration, activates_at: SystemTime) -> Self {
        Self {
            not_before: now,
            not_after: now + ttl,
            activates_at,
        }
    }

    fn fraction(&self, num: u32, den: u32) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life * num / den
    }

    /// When this key's successor is generated and published.
    pub fn prepare_successor_at(&self) -> SystemTime {
        self.fraction(1, 2)
    }

    /// When this key's successor starts signing.
    pub fn successor_activates_at(&self) -> SystemTime {
        self.fraction(5, 6)
    }

    /// True when the key may sign at `now`.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        self.activates_at <= now && now < self.not_after
    }
}

/// The index of the key that signs at `now`: the usable key activated last.
pub fn active(keys: &[Lifetime], now: SystemTime) -> Option<usize> {
    keys.iter()
        .enumerate()
        .filter(|(_, k)| k.is_usable(now))
        .max_by_key(|(_, k)| k.activates_at)
        .map(|(i, _)| i)
}

/// Decides what to do at `now`.
///
/// With no usable key at all (first start, or an agent that was down past
/// its keys' expiry) the successor is prepared *active now*: there is no way
/// to publish ahead of use when nothing can sign, and refusing to sign
/// forever would be worse.
pub fn plan(keys: &[Lifetime], now: SystemTime) -> Plan {
    let expired: Vec<usize> = (0..keys.len())
        .filter(|&i| keys[i].not_after <= now)
        .collect();
    let Some(current) = active(keys, now) else {
        return Plan {
            expired,
            prepare: Some(now),
            next_check: now,
        };
    };
    let current = keys[current];
    let has_successor = keys
        .iter()
        .any(|k| k.activates_at > current.activates_at && k.not_after > now);
    let prepare_at = current.prepare_successor_at();
    let prepare = (!has_successor && prepare_at <= now).then(|| current.successor_activates_at());

    // The next instant anything changes: a key expires, a successor
    // activates, or the current key reaches its preparation point.
    let mut next_check = current.not_after;
    for k in keys.iter().filter(|k| k.not_after > now) {
        next_check = next_check.min(k.not_after);
        if k.activates_at > now {
            next_check = next_check.min(k.activates_at);
        }
    }
    if !has_successor && prepare.is_none() {
        next_check = next_check.min(prepare_at);
    }
    Plan {
        expired,
        prepare,
        next_check,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(hours_tenths: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + HOUR * hours_tenths as u32 / 10
    }

    #[test]
    fn first_start_prepares_an_active_key() {
        let p = plan(&[], t(0));
        assert_eq!(p.prepare, Some(t(0)));
        assert!(p.expired.is_empty());
    }

    #[test]
    fn walks_a_key_through_its_life() {
        // A 6h key created at t=0.
        let first = Lifetime::starting(t(0), 6 * HOUR, t(0));
        let p = plan(&[first], t(10));
        assert_eq!(p.prepare, None);
        assert_eq!(p.next_check, t(30), "look again at half life");

        let p = plan(&[first], t(30));
        assert_eq!(
            p.prepare,
            Some(t(50)),
            "successor activates at 5/6 of the life"
        );

        let second = Lifetime::starting(t(30), 6 * HOUR, t(50));
        let keys = [first, second];
        assert_eq!(
            active(&keys, t(40)),
            Some(0),
            "successor published, not yet signing"
        );
        let p = plan(&keys, t(40));
        assert_eq!(p.prepare, None);
        assert_eq!(p.next_check, t(50));

        assert_eq!(active(&keys, t(50)), Some(1));
        let p = plan(&keys, t(50));
        assert_eq!(
            p.next_check,
            t(60),
            "old key leaves the bundle at its not_after"
        );

        let p = plan(&keys, t(60));
        assert_eq!(p.expired, vec![0]);
        assert_eq!(p.prepare, Some(t(80)), "second key is at half life at t=6h");
    }

    #[test]
    fn all_expired_prepares_an_active_key_now() {
        let old = Lifetime::starting(t(0), HOUR, t(0));
        let p = plan(&[old], t(20));
        assert_eq!(p.expired, vec![0]);
        assert_eq!(p.prepare, Some(t(20)));
    }
}
