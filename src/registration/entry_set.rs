//! One published set of entries ([`EntrySet`]) and what a caller gets
//! from it ([`Match`]): lookups, the operator's filters and subset
//! matching through the set's own index. A set never changes after it is
//! built; the [`Registry`](super::Registry) replaces it whole.

use std::collections::HashSet;
use std::sync::Arc;

use spiffe::SpiffeId;

use super::matcher;
use super::{EntryId, RegistrationEntry, SelectorSet};

/// One identity a caller gets: the entry and the SPIFFE ID it resolves to
/// for this caller.
#[derive(Debug, Clone)]
pub struct Match {
    /// The entry.
    pub entry: Arc<RegistrationEntry>,
    /// Its ID for this caller (a template filled in, or the fixed ID).
    pub spiffe_id: SpiffeId,
}

/// An immutable set of entries: config-file entries in file order, then
/// API entries by creation. The first entry a caller matches is its
/// default identity.
#[derive(Debug, Default)]
pub struct EntrySet {
    pub(super) entries: Vec<Arc<RegistrationEntry>>,
    /// Built from `entries` with the set, never changed after.
    index: matcher::EntryIndex,
    pub(super) revision: u64,
}

// === impl EntrySet ===

impl EntrySet {
    /// The set of `entries`, in this order, at `revision`; indexes them.
    pub(super) fn new(entries: Vec<Arc<RegistrationEntry>>, revision: u64) -> Self {
        Self {
            index: matcher::EntryIndex::new(&entries),
            entries,
            revision,
        }
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<RegistrationEntry>> {
        self.entries.iter()
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bumped on every change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The entry with this id, if it still exists.
    pub fn get(&self, id: &EntryId) -> Option<&Arc<RegistrationEntry>> {
        self.entries.get(self.index.position_of(id)?)
    }

    /// The identities a caller with `selectors` gets, in order (the first is
    /// its default identity): entries whose selectors are all among the
    /// caller's and whose ID resolves for it.
    ///
    /// Hints must be unique within one Workload API response: when two
    /// matching entries share a hint the first one wins and the other is
    /// left out, as SPIRE does. So does a second entry resolving to an ID
    /// already granted.
    pub fn matching(&self, selectors: &SelectorSet) -> Vec<Match> {
        let mut hints = HashSet::new();
        let mut ids = HashSet::new();
        let mut out = Vec::new();
        // The index narrows the entries to those that may match, in
        // registration order; the subset check decides.
        let candidates = self.index.candidates(selectors);
        let entries = candidates
            .into_iter()
            .filter_map(|position| self.entries.get(position));
        for entry in entries.filter(|e| e.matches(selectors)) {
            let Some(spiffe_id) = entry.spiffe_id.resolve(selectors) else {
                continue;
            };
            if let Some(hint) = &entry.hint
                && !hints.insert(hint.as_str())
            {
                // Warned about once when the entries were loaded.
                tracing::debug!(entry_id = %entry.id, hint, "entry left out: another matching entry has the same hint");
                continue;
            }
            if !ids.insert(spiffe_id.clone()) {
                continue;
            }
            out.push(Match {
                entry: Arc::clone(entry),
                spiffe_id,
            });
        }
        out
    }

    /// Whether some entry may match a caller whose uid is `uid`, judged
    /// before attestation: false only when every entry requires a
    /// `unix:uid` selector and none names `uid`. Any entry without one (a
    /// `unix:path`, `unix:sha256`, `unix:gid` or `unix:user` entry, pod
    /// selectors) may match every uid. The connection budget of uids that
    /// match nothing is the smaller one
    /// (`limits.max_connections_per_unmatched_uid`).
    pub fn may_match_uid(&self, uid: u32) -> bool {
        self.index.may_match_uid(uid)
    }

    /// Entries matching an operator's filters: an exact SPIFFE ID (or
    /// template) and/or selectors the entry must all require.
    pub fn filtered(
        &self,
        spiffe_id: Option<&str>,
        selectors: &SelectorSet,
    ) -> Vec<Arc<RegistrationEntry>> {
        self.entries
            .iter()
            .filter(|e| spiffe_id.is_none_or(|id| e.spiffe_id.as_str() == id))
            .filter(|e| selectors.is_subset(&e.selectors))
            .cloned()
            .collect()
    }

    pub(super) fn duplicate_of(
        &self,
        candidate: &RegistrationEntry,
    ) -> Option<&Arc<RegistrationEntry>> {
        self.entries
            .iter()
            .find(|e| e.id != candidate.id && e.same_rule(candidate))
    }
}
