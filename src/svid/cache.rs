//! The current X.509-SVID of every entry in use, shared by all callers that
//! match the entry (SVIDs are per entry, not per process).
//!
//! Reads take a short lock and clone an `Arc`; a miss issues under a
//! separate lock so concurrent first requests for one entry issue once.
//!
//! Open streams learn of changes through [`SvidWatch`], and only of the
//! changes that can concern them: keys hash into [`SHARDS`] shards, each
//! with its own generation counter, and a stream follows the shards of the
//! SVIDs it holds. One process's renewal wakes that process's streams (and
//! the few that share its shard), not every stream on the node. Changes
//! that concern every holder (new CRLs) bump a separate counter.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::watch;

use spiffe::SpiffeId;

use super::x509::X509Svid;
use crate::registration::{EntryId, EntrySet};

use crate::attestation::ProcessKey;

/// An entry, the ID it resolved to, and for process-bound entries the
/// process: one SVID each.
pub type SvidKey = (EntryId, SpiffeId, Option<ProcessKey>);

/// How many shards the keys hash into: the bits of an [`Interest`].
pub const SHARDS: usize = 63;

/// Current X.509-SVIDs by entry.
#[derive(Debug)]
pub struct X509SvidCache {
    svids: Mutex<HashMap<SvidKey, Arc<X509Svid>>>,
    /// Bumped when a key in the shard is replaced or dropped.
    shards: Box<[watch::Sender<u64>]>,
    /// Bumped for what concerns every holder (new CRLs).
    everyone: watch::Sender<u64>,
}

/// What a stream's state depends on in the cache: the shards of the keys
/// it holds, and whether it carries the CRLs. A bit set, built with
/// [`Interest::key`] and [`Interest::crls`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest(u64);

/// Waits for the cache changes an [`Interest`] names.
#[derive(Debug)]
pub struct SvidWatch {
    interest: Interest,
    receivers: Vec<watch::Receiver<u64>>,
}

// === impl X509SvidCache ===

impl Default for X509SvidCache {
    fn default() -> Self {
        Self {
            svids: Mutex::default(),
            shards: (0..SHARDS).map(|_| watch::channel(0).0).collect(),
            everyone: watch::channel(0).0,
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

    /// Stores `svid` as the entry's current SVID and wakes its holders.
    pub fn put(&self, svid: Arc<X509Svid>) {
        let key = svid.key();
        let shard = shard_of(&key);
        self.svids().insert(key, svid);
        self.bump(shard);
    }

    fn bump(&self, shard: usize) {
        if let Some(sender) = self.shards.get(shard) {
            sender.send_modify(|g| *g += 1);
        }
    }

    /// Drops SVIDs of entries that no longer exist, and those whose entry
    /// changed what the certificate says. Returns how many were dropped.
    pub fn retain_current(&self, entries: &EntrySet) -> usize {
        let mut dropped = Vec::new();
        self.svids().retain(|key, svid| {
            let keep = entries.get(&key.0).is_some_and(|e| !svid.is_stale_for(e));
            if !keep {
                dropped.push(shard_of(key));
            }
            keep
        });
        for &shard in &dropped {
            self.bump(shard);
        }
        dropped.len()
    }

    /// The SVIDs due for renewal at `now`, and the earliest renewal time
    /// of the others.
    pub fn due(&self, now: SystemTime) -> (Vec<Arc<X509Svid>>, Option<SystemTime>) {
        let svids = self.svids();
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        for svid in svids.values() {
            // Valid only from what is now the future: the clock stepped
            // back past its issuance, and its holders would be refused
            // until the clock caught up. Renewed now, at the new time.
            if svid.renew_at <= now || svid.not_before > now {
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
            self.bump(shard_of(&key));
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
        for svid in &taken {
            self.bump(shard_of(&svid.key()));
        }
        taken
    }

    /// Wakes every holder that carries the CRLs (new CRLs).
    pub fn touch(&self) {
        self.everyone.send_modify(|g| *g += 1);
    }

    /// Every cached SVID (for `svid list`).
    pub fn all(&self) -> Vec<Arc<X509Svid>> {
        self.svids().values().cloned().collect()
    }

    /// Wakes on the changes `interest` names, from now on.
    pub fn subscribe(&self, interest: Interest) -> SvidWatch {
        let mut receivers: Vec<_> = interest
            .shards()
            .filter_map(|s| self.shards.get(s))
            .map(watch::Sender::subscribe)
            .collect();
        if interest.has_crls() {
            receivers.push(self.everyone.subscribe());
        }
        SvidWatch {
            interest,
            receivers,
        }
    }

    /// Wakes on every change to any key, not on new CRLs (the rotation
    /// loop).
    pub fn subscribe_all(&self) -> SvidWatch {
        self.subscribe(Interest(!Interest::CRLS))
    }
}

/// The shard `key` hashes into. The hash is fixed (no per-process seed
/// is needed: the keys are the agent's own).
fn shard_of(key: &SvidKey) -> usize {
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    usize::try_from(hash % SHARDS as u64).unwrap_or(0)
}

// === impl Interest ===

impl Interest {
    const CRLS: u64 = 1 << SHARDS;

    /// Nothing in the cache.
    pub const NONE: Self = Self(0);

    /// Adds the shard of `key`.
    #[must_use]
    pub fn key(self, key: &SvidKey) -> Self {
        Self(self.0 | 1 << shard_of(key))
    }

    /// Adds the CRLs.
    #[must_use]
    pub fn crls(self) -> Self {
        Self(self.0 | Self::CRLS)
    }

    fn has_crls(self) -> bool {
        self.0 & Self::CRLS != 0
    }

    fn shards(self) -> impl Iterator<Item = usize> {
        (0..SHARDS).filter(move |s| self.0 & (1 << s) != 0)
    }
}

// === impl SvidWatch ===

impl SvidWatch {
    /// What this watch follows.
    pub fn interest(&self) -> Interest {
        self.interest
    }

    /// Forgets the changes so far: [`Self::changed`] waits for the next.
    pub fn mark_seen(&mut self) {
        for receiver in &mut self.receivers {
            receiver.mark_unchanged();
        }
    }

    /// Resolves at the next change it follows (never, for
    /// [`Interest::NONE`]). Every change since the last call counts, so
    /// nothing between two waits is lost.
    pub async fn changed(&mut self) {
        if self.receivers.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.receivers.iter_mut().map(|r| Box::pin(r.changed()));
        // The senders live as long as the cache, which outlives its watchers.
        let _ = futures_util::future::select_all(waits).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use futures_util::FutureExt as _;
    use spiffe::TrustDomain;

    use super::*;
    use crate::authority::{AuthorityConfig, LocalAuthority};
    use crate::registration::{EntrySpec, RegistrationEntry};

    /// A process-bound SVID for each of `pids`, from a fresh authority.
    fn svids_for(pids: &[i32]) -> (tempfile::TempDir, Vec<Arc<X509Svid>>) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            LocalAuthority::load_or_create(td.clone(), AuthorityConfig::default(), dir.path())
                .unwrap();
        let entry = Arc::new(
            RegistrationEntry::from_config(
                &EntrySpec {
                    spiffe_id: "spiffe://example.org/agent".into(),
                    selectors: vec!["unix:uid:1".into()],
                    process_bound: true,
                    ..EntrySpec::default()
                },
                &td,
                &BTreeSet::new(),
            )
            .unwrap(),
        );
        let id = SpiffeId::new("spiffe://example.org/agent").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let svids = pids
            .iter()
            .map(|&pid| {
                Arc::new(
                    runtime
                        .block_on(crate::svid::x509::issue(
                            &authority,
                            &entry,
                            &id,
                            Some(ProcessKey::new(pid, 1)),
                            Duration::from_secs(60),
                        ))
                        .unwrap(),
                )
            })
            .collect();
        (dir, svids)
    }

    #[test]
    fn due_at_half_life_or_when_the_clock_stepped_back_past_issuance() {
        let (_dir, svids) = svids_for(&[100]);
        let cache = X509SvidCache::default();
        cache.put(Arc::clone(&svids[0]));
        let svid = &svids[0];
        let due = |now| cache.due(now).0.len();
        assert_eq!(due(svid.not_before + Duration::from_secs(1)), 0);
        assert_eq!(cache.due(svid.not_before).1, Some(svid.renew_at));
        assert_eq!(due(svid.renew_at), 1);
        // The clock stepped back to before the SVID's validity.
        assert_eq!(due(svid.not_before - Duration::from_secs(1)), 1);
    }

    #[test]
    fn a_renewal_wakes_the_streams_holding_it_and_no_others() {
        // Enough processes that two of them fall in different shards.
        let pids: Vec<i32> = (100..110).collect();
        let (_dir, svids) = svids_for(&pids);
        let cache = X509SvidCache::default();
        for svid in &svids {
            cache.put(Arc::clone(svid));
        }
        let mut holder = cache.subscribe(Interest::NONE.crls().key(&svids[0].key()));
        let mut other = svids[1..]
            .iter()
            .find(|s| shard_of(&s.key()) != shard_of(&svids[0].key()))
            .map(|s| cache.subscribe(Interest::NONE.crls().key(&s.key())))
            .expect("an SVID in another shard");
        let mut bundles_only = cache.subscribe(Interest::NONE);

        cache.put(Arc::clone(&svids[0]));
        assert!(
            holder.changed().now_or_never().is_some(),
            "the holder wakes"
        );
        assert!(
            other.changed().now_or_never().is_none(),
            "another holder sleeps"
        );

        cache.touch();
        assert!(
            holder.changed().now_or_never().is_some(),
            "new CRLs wake holders"
        );
        assert!(
            other.changed().now_or_never().is_some(),
            "new CRLs wake holders"
        );
        assert!(
            bundles_only.changed().now_or_never().is_none(),
            "nothing in the cache concerns a bundle stream"
        );
    }

    #[test]
    fn a_watch_sees_a_change_made_before_it_waits() {
        let (_dir, svids) = svids_for(&[7]);
        let cache = X509SvidCache::default();
        let mut watch = cache.subscribe(Interest::NONE.key(&svids[0].key()));
        cache.put(Arc::clone(&svids[0]));
        assert!(watch.changed().now_or_never().is_some());
        watch.mark_seen();
        assert!(watch.changed().now_or_never().is_none());
        cache.remove(&svids[0]);
        assert!(watch.changed().now_or_never().is_some(), "a drop wakes too");
    }
}
