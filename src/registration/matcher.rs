//! The selector index behind [`EntrySet::matching`](super::EntrySet::matching):
//! the entries that may match a caller, found without looking at the others.
//!
//! Each entry is filed under one of the selectors it requires: the one the
//! fewest entries require, so an entry for `unix:uid:1000` and
//! `unix:path:/opt/agent` is filed under its path when many entries name
//! that uid. An entry matches only a caller that has every selector it
//! requires, so in particular the one it is filed under: the entries filed
//! under the caller's selectors are all that can match, and the subset check
//! then decides. The cost follows the caller's selectors and the few entries
//! filed under each, not the size of the registry.
//!
//! The index also knows which uids any entry can match at all
//! ([`UidScope`]), for the connection budget of uids that match none.
//!
//! Invariant: an index is built whole from the entry list it describes and
//! never patched, so it cannot fall out of step with it. Entry sets are
//! immutable; a change builds a new set, and with it a new index.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use super::entry::{EntryId, RegistrationEntry};
use super::selector::{Selector, SelectorSet, SelectorType};

/// Where each entry of one entry list is found: by the selector it is
/// filed under, and by its id. Positions index that list.
#[derive(Default)]
pub(super) struct EntryIndex {
    /// Positions, ascending, of the entries filed under each selector.
    filed: HashMap<Selector, Vec<usize>>,
    /// Entries that require no selector, which every caller has. Validation
    /// refuses them (`EntryError::NoSelectors`); kept so that the index
    /// agrees with the subset rule whatever list it is given.
    unconditional: Vec<usize>,
    /// The position of the first entry with each id.
    by_id: HashMap<EntryId, usize>,
    /// The uids whose callers some entry may match.
    uids: UidScope,
}

/// The uids whose callers some entry of a list may match, judged from the
/// entries alone (no caller is attested for it).
///
/// A caller has exactly one `unix:uid` selector, its effective uid as the
/// kernel recorded it at connect (attestation refuses a process whose
/// uid changed since). So an entry that requires `unix:uid:N` can match
/// only callers of uid N. An entry that requires no `unix:uid` selector
/// (only a path, a hash, a gid, a user name, pod facts) may match a caller
/// of any uid, as far as anything known before attestation can tell.
#[derive(Debug, PartialEq, Eq)]
enum UidScope {
    /// Only callers of these uids: every entry requires a `unix:uid`.
    Only(HashSet<u32>),
    /// Callers of any uid: some entry requires none.
    Any,
}

// === impl EntryIndex ===

impl EntryIndex {
    /// Indexes `entries`. Linear in the number of selectors they require.
    pub(super) fn new(entries: &[Arc<RegistrationEntry>]) -> Self {
        let selectors = entries.iter().map(|e| e.selectors.len()).sum();
        let mut required_by: HashMap<&Selector, usize> = HashMap::with_capacity(selectors);
        for entry in entries {
            for selector in &entry.selectors {
                *required_by.entry(selector).or_default() += 1;
            }
        }
        let mut index = Self {
            filed: HashMap::with_capacity(entries.len().min(required_by.len())),
            unconditional: Vec::new(),
            by_id: HashMap::with_capacity(entries.len()),
            uids: UidScope::of(entries),
        };
        for (position, entry) in entries.iter().enumerate() {
            // The first of the rarest, so the same list always gives the
            // same index.
            let rarest = entry
                .selectors
                .iter()
                .min_by_key(|s| required_by.get(s).copied().unwrap_or_default());
            match rarest {
                Some(selector) => index
                    .filed
                    .entry(selector.clone())
                    .or_default()
                    .push(position),
                None => index.unconditional.push(position),
            }
            index.by_id.entry(entry.id.clone()).or_insert(position);
        }
        index
    }

    /// The positions, ascending, of every entry that may match `caller`:
    /// a superset of those whose selectors are all among the caller's.
    pub(super) fn candidates(&self, caller: &SelectorSet) -> Vec<usize> {
        let mut positions = self.unconditional.clone();
        for selector in caller {
            if let Some(filed) = self.filed.get(selector) {
                positions.extend_from_slice(filed);
            }
        }
        // Each entry is filed once and a caller's selectors are distinct, so
        // there are no repeats; sorting restores registration order.
        positions.sort_unstable();
        positions
    }

    /// The position of the first entry with this id.
    pub(super) fn position_of(&self, id: &EntryId) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Whether some entry may match a caller of `uid` (see [`UidScope`]).
    pub(super) fn may_match_uid(&self, uid: u32) -> bool {
        match &self.uids {
            UidScope::Only(uids) => uids.contains(&uid),
            UidScope::Any => true,
        }
    }
}

// === impl UidScope ===

impl Default for UidScope {
    /// No entries: no uid.
    fn default() -> Self {
        Self::Only(HashSet::new())
    }
}

impl UidScope {
    fn of(entries: &[Arc<RegistrationEntry>]) -> Self {
        let mut named = HashSet::new();
        for entry in entries {
            let mut uids = entry
                .selectors
                .iter()
                .filter(|s| s.kind() == SelectorType::Unix && s.key() == "uid")
                .map(|s| s.value().strip_prefix("uid:").and_then(|v| v.parse().ok()))
                .peekable();
            if uids.peek().is_none() {
                return Self::Any;
            }
            for uid in uids {
                // Parsed selectors always hold a number; anything else
                // must not narrow the scope.
                let Some(uid) = uid else {
                    return Self::Any;
                };
                named.insert(uid);
            }
        }
        Self::Only(named)
    }
}

impl fmt::Debug for EntryIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryIndex")
            .field("selectors", &self.filed.len())
            .field("unconditional", &self.unconditional.len())
            .field("ids", &self.by_id.len())
            .field("uids", &self.uids)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use spiffe::TrustDomain;

    use super::*;
    use crate::registration::EntrySpec;

    fn entries(rules: &[&[&str]]) -> Vec<Arc<RegistrationEntry>> {
        let td = TrustDomain::new("example.org").unwrap();
        rules
            .iter()
            .enumerate()
            .map(|(i, selectors)| {
                let spec = EntrySpec {
                    spiffe_id: format!("spiffe://example.org/{i}"),
                    selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
                    ..EntrySpec::default()
                };
                Arc::new(RegistrationEntry::from_config(&spec, &td, &BTreeSet::new()).unwrap())
            })
            .collect()
    }

    fn caller(selectors: &[&str]) -> SelectorSet {
        selectors.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn entries_are_filed_under_their_rarest_selector() {
        let index = EntryIndex::new(&entries(&[
            &["unix:uid:1000", "unix:path:/opt/a"],
            &["unix:uid:1000", "unix:path:/opt/b"],
            &["unix:uid:1000"],
            &["unix:gid:50", "unix:uid:1000"],
        ]));
        // The uid is required by all four: only the entry with nothing
        // rarer is filed under it.
        assert_eq!(index.candidates(&caller(&["unix:uid:1000"])), [2]);
        assert_eq!(
            index.candidates(&caller(&["unix:uid:1000", "unix:path:/opt/b"])),
            [1, 2]
        );
        assert_eq!(
            index.candidates(&caller(&[
                "unix:gid:50",
                "unix:path:/opt/a",
                "unix:uid:1000"
            ])),
            [0, 2, 3],
            "registration order, whatever the order of the caller's selectors"
        );
        assert!(index.candidates(&caller(&["unix:uid:1"])).is_empty());
        assert!(index.candidates(&SelectorSet::new()).is_empty());
    }

    #[test]
    fn an_entry_without_selectors_is_a_candidate_for_everyone() {
        let mut list = entries(&[&["unix:uid:1"], &["unix:uid:2"]]);
        let mut open = (*list[0]).clone();
        open.selectors.clear();
        list.insert(1, Arc::new(open));
        let index = EntryIndex::new(&list);
        assert_eq!(index.candidates(&SelectorSet::new()), [1]);
        assert_eq!(index.candidates(&caller(&["unix:uid:2"])), [1, 2]);
    }

    #[test]
    fn only_the_uids_entries_name_may_match_unless_an_entry_names_none() {
        let named = EntryIndex::new(&entries(&[
            &["unix:uid:1000", "unix:path:/opt/a"],
            &["unix:uid:1001"],
            // Matches nobody (a caller has one uid); names both anyway.
            &["unix:uid:7", "unix:uid:8"],
        ]));
        for uid in [1000, 1001, 7, 8] {
            assert!(named.may_match_uid(uid), "{uid}");
        }
        for uid in [0, 65534, u32::MAX] {
            assert!(!named.may_match_uid(uid), "{uid}");
        }
        assert!(!EntryIndex::new(&[]).may_match_uid(1000), "no entries");
        // One entry that requires no uid may match a caller of any uid:
        // a path, a gid, a user name (resolved only at attestation),
        // pod facts.
        for open in [
            "unix:path:/opt/a",
            "unix:gid:50",
            "unix:user:alice",
            "k8s:ns:default",
        ] {
            let index = EntryIndex::new(&entries(&[&["unix:uid:1000"], &[open]]));
            assert!(index.may_match_uid(65534), "{open}");
        }
    }

    #[test]
    fn ids_find_the_first_entry_with_them() {
        let mut list = entries(&[&["unix:uid:1"], &["unix:uid:2"]]);
        // The same rule twice: the same config id.
        list.push(Arc::new((*list[0]).clone()));
        let index = EntryIndex::new(&list);
        assert_eq!(index.position_of(&list[2].id), Some(0));
        assert_eq!(index.position_of(&list[1].id), Some(1));
        assert_eq!(index.position_of(&EntryId::random().unwrap()), None);
    }
}
