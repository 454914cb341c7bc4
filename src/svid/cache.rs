//! The current X.509-SVID of every entry in use, shared by all callers that
//! match the entry (SVIDs are per entry, not per process).
//!
//! Reads take a short lock and clone an `Arc`; a miss issues under a
//! separate lock so concurrent first requests for one entry issue once.
//! Every replacement bumps a generation counter on a `watch`, which is how
//! open streams learn that something they might hold has changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::watch;

use spiffe::SpiffeId;

use super::x509::X509Svid;
use crate::registration::{EntryId, EntrySet};

/// A process, by pid and start time.
pub type ProcessKey = (i32, u64);

/// An entry, the ID it resolved to, and for process-bound entries the
/// process: one SVID each.
pub type SvidKey = (EntryId, SpiffeId, Option<ProcessKey>);

/// Current X.509-SVIDs by entry.
#[derive(Debug)]
pub struct X509SvidCache {
    svids: Mutex<HashMap<SvidKey, Arc<X509Svid>>>,
    issuing: Mutex<()>,
    generation: watch::Sender<u64>,
}

// === impl X509SvidCache ===

impl Default for X509SvidCache {
    fn default() -> Self {
        Self {
            svids: Mutex::default(),
            issuing: Mutex::default(),
            generation: watch::channel(0).0,
        }
    }
}

impl X509SvidCache {
    fn svids(&self) -> MutexGuard<'_, HashMap<SvidKey, Arc<X509Svid>>> {
        // The map is valid after any panic elsewhere: every write is one
        // insert or remove.
        self.svids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached SVID for `key`, if any.
    pub fn get(&self, key: &SvidKey) -> Option<Arc<X509Svid>> {
        self.svids().get(key).cloned()
    }

    /// Serialises issuance on a miss; hold the guard while issuing.
    pub fn issuing(&self) -> MutexGuard<'_, ()> {
        self.issuing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `svid` as the entry's current SVID and wakes subscribers.
    pub fn put(&self, svid: Arc<X509Svid>) {
        self.svids().insert(svid.key(), svid);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Drops SVIDs of entries that no longer exist, and those whose entry
    /// changed what the certificate says. Returns how many were dropped.
    pub fn retain_current(&self, entries: &EntrySet) -> usize {
        let dropped = {
            let mut svids = self.svids();
            let before = svids.len();
            svids.retain(|(id, _, _), svid| entries.get(id).is_some_and(|e| !svid.is_stale_for(e)));
            before - svids.len()
        };
        if dropped > 0 {
            self.generation.send_modify(|g| *g += 1);
        }
        dropped
    }

    /// The SVIDs due for renewal at `now`, and the earliest renewal time
    /// of the others.
    pub fn due(&self, now: SystemTime) -> (Vec<Arc<X509Svid>>, Option<SystemTime>) {
        let svids = self.svids();
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for svid in svids.values() {
            if svid.renew_at <= now {
                due.push(Arc::clone(svid));
            } else {
                next = Some(next.map_or(svid.renew_at, |n| n.min(svid.renew_at)));
            }
        }
        (due, next)
    }

    /// Drops `svid` if it is still the current one for its key.
    pub fn remove(&self, svid: &Arc<X509Svid>) {
        let key = svid.key();
        let removed = {
            let mut svids = self.svids();
            match svids.get(&key) {
                Some(current) if Arc::ptr_eq(current, svid) => svids.remove(&key).is_some(),
                _ => false,
            }
        };
        if removed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Takes out every SVID bound to `process` (it exited).
    pub fn take_process(&self, process: ProcessKey) -> Vec<Arc<X509Svid>> {
        let taken: Vec<Arc<X509Svid>> = {
            let mut svids = self.svids();
            let keys: Vec<SvidKey> = svids
                .keys()
                .filter(|(_, _, p)| *p == Some(process))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| svids.remove(k)).collect()
        };
        if !taken.is_empty() {
            self.generation.send_modify(|g| *g += 1);
        }
        taken
    }

    /// Wakes subscribers without a cache change (new CRLs).
    pub fn touch(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Every cached SVID (for `svid list`).
    pub fn all(&self) -> Vec<Arc<X509Svid>> {
        self.svids().values().cloned().collect()
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
