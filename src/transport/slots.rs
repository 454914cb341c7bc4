//! Budgets per process and per uid: one process (or all the processes of
//! one uid) may hold at most so many connections, and a process so many
//! long-lived streams, whatever it does with them. Keyed by the kernel's
//! process identity (pid and start time, so a reused pid starts afresh) or
//! uid, never by anything the caller says.
//!
//! The listener draws a connection slot per process and one per uid at
//! accept time (`limits.max_connections_per_process`,
//! `limits.max_connections_per_uid`, or the smaller
//! `limits.max_connections_per_unmatched_uid` for a uid no entry can
//! match); the Workload API's streams and the task API's `WatchTask` draw
//! from one stream budget (`limits.max_streams_per_process`).

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use crate::attestation::{Caller, ProcessKey};

/// Counts what each holder (a process, by default; a uid) holds against
/// one limit. Cheap to clone; clones share counts.
#[derive(Debug, Clone)]
pub struct ProcessSlots<K = ProcessKey> {
    limit: usize,
    setting: &'static str,
    open: Arc<Mutex<HashMap<K, usize>>>,
}

/// One held slot; given back when this drops.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash = ProcessKey> {
    key: K,
    open: Arc<Mutex<HashMap<K, usize>>>,
}

/// A holder already holds its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// What it holds (and may not exceed).
    pub limit: usize,
    /// The setting that sets the limit, for the message.
    pub setting: &'static str,
}

/// The per-process stream budget, shared by every streaming RPC.
#[derive(Debug, Clone)]
pub struct StreamSlots(ProcessSlots);

// === impl ProcessSlots ===

impl<K: Copy + Eq + Hash> ProcessSlots<K> {
    /// At most `limit` slots per holder; `setting` names the limit in
    /// refusals.
    pub fn new(limit: usize, setting: &'static str) -> Self {
        Self {
            limit,
            setting,
            open: Arc::default(),
        }
    }

    /// A slot for one more of what `key` holds, unless it holds its limit.
    pub fn take(&self, key: K) -> Result<Slot<K>, Exhausted> {
        self.take_within(key, self.limit, self.setting)
    }

    /// A slot for one more of what `key` holds, unless it holds `limit`
    /// (set by `setting`) already: a holder whose budget is not the
    /// common one, counted with the others.
    pub fn take_within(
        &self,
        key: K,
        limit: usize,
        setting: &'static str,
    ) -> Result<Slot<K>, Exhausted> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let held = open.entry(key).or_insert(0);
        if *held >= limit {
            if *held == 0 {
                open.remove(&key);
            }
            return Err(Exhausted { limit, setting });
        }
        *held += 1;
        Ok(Slot {
            key,
            open: Arc::clone(&self.open),
        })
    }

    /// How many holders hold at least one slot.
    pub fn processes(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

// === impl Slot ===

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = open.get_mut(&self.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                open.remove(&self.key);
            }
        }
    }
}

// === impl Exhausted ===

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "already holds {} (limits.{})", self.limit, self.setting)
    }
}

// === impl StreamSlots ===

impl StreamSlots {
    /// At most `limit` open streams per process.
    pub fn new(limit: usize) -> Self {
        Self(ProcessSlots::new(limit, "max_streams_per_process"))
    }

    /// A slot for one more stream of `caller`, unless the process already
    /// holds its limit (the edges answer ResourceExhausted).
    pub fn take(&self, caller: &Caller) -> Result<Slot, Exhausted> {
        self.0.take(caller.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_gets_its_limit_and_no_more() {
        let slots = ProcessSlots::<ProcessKey>::new(2, "max_streams_per_process");
        let a = slots.take(ProcessKey::new(10, 1)).unwrap();
        let _b = slots.take(ProcessKey::new(10, 1)).unwrap();
        let refused = slots.take(ProcessKey::new(10, 1)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "already holds 2 (limits.max_streams_per_process)"
        );
        // Another process, or the same pid reused by a new process, has
        // its own budget.
        let _other = slots.take(ProcessKey::new(11, 1)).unwrap();
        let _reused = slots.take(ProcessKey::new(10, 2)).unwrap();
        drop(a);
        let _c = slots.take(ProcessKey::new(10, 1)).unwrap();
    }

    #[test]
    fn a_holder_with_its_own_limit_shares_the_count() {
        let slots = ProcessSlots::<u32>::new(3, "max_connections_per_uid");
        let small = "max_connections_per_unmatched_uid";
        let a = slots.take_within(7, 1, small).unwrap();
        let refused = slots.take_within(7, 1, small).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "already holds 1 (limits.max_connections_per_unmatched_uid)"
        );
        // The common limit counts what it took under the small one.
        let _b = slots.take(7).unwrap();
        let _c = slots.take(7).unwrap();
        assert!(slots.take(7).is_err());
        drop(a);
        let _d = slots.take(7).unwrap();
        // A limit of zero refuses without keeping the holder.
        assert!(slots.take_within(8, 0, small).is_err());
        assert_eq!(slots.processes(), 1);
    }

    #[test]
    fn a_process_with_nothing_held_is_forgotten() {
        let slots = ProcessSlots::<ProcessKey>::new(4, "max_connections_per_process");
        let a = slots.take(ProcessKey::new(10, 1)).unwrap();
        let b = slots.take(ProcessKey::new(10, 1)).unwrap();
        assert_eq!(slots.processes(), 1);
        drop(a);
        drop(b);
        assert_eq!(slots.processes(), 0);
    }
}
