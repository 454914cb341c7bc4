//! Registration: who gets which SPIFFE ID.
//!
//! Owns [`RegistrationEntry`] (selectors -> SPIFFE ID), the [`Registry`] that
//! holds the current [`EntrySet`], and the subset matching that decides which
//! entries a caller's selectors satisfy.
//!
//! Invariant: this module never reads the operating system. The selectors it
//! matches come from `attestation`; it only compares them.
//!
//! Readers take a snapshot (an `Arc<EntrySet>`) and never hold a lock while
//! they work; writers replace the whole set and bump its revision, which
//! wakes every subscriber (open Workload API streams re-evaluate on it).

pub mod entry;
pub mod selector;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;

pub use entry::{EntryConfig, EntryError, EntryId, EntrySource, RegistrationEntry};
pub use selector::{Selector, SelectorSet, SelectorType};

/// Why a set of entries was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The same SPIFFE ID with the same selectors appears twice.
    #[error("entries {first} and {second} are duplicates ({spiffe_id} with the same selectors)")]
    Duplicate {
        /// Position (1-based) of the first occurrence.
        first: usize,
        /// Position (1-based) of the repeat.
        second: usize,
        /// The SPIFFE ID both grant.
        spiffe_id: String,
    },
}

/// An immutable set of entries in their registration order. The first entry
/// a caller matches is its default identity.
#[derive(Debug, Default)]
pub struct EntrySet {
    entries: Vec<Arc<RegistrationEntry>>,
    revision: u64,
}

/// The current registration entries, shared by every reader.
#[derive(Debug, Clone)]
pub struct Registry {
    current: Arc<watch::Sender<Arc<EntrySet>>>,
}

// === impl EntrySet ===

impl EntrySet {
    /// Every entry, in registration order.
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
        self.entries.iter().find(|e| &e.id == id)
    }

    /// The entries whose selectors are all among `selectors`, in
    /// registration order (the first is the caller's default identity).
    ///
    /// Hints must be unique within one Workload API response: when two
    /// matching entries share a hint the first one wins and the other is
    /// left out (and logged), as SPIRE does.
    pub fn matching(&self, selectors: &SelectorSet) -> Vec<Arc<RegistrationEntry>> {
        let mut hints = HashSet::new();
        let mut out = Vec::new();
        for entry in self.entries.iter().filter(|e| e.matches(selectors)) {
            if let Some(hint) = &entry.hint
                && !hints.insert(hint.as_str())
            {
                // Warned about once when the entries were loaded.
                tracing::debug!(
                    entry_id = %entry.id,
                    spiffe_id = %entry.spiffe_id,
                    hint,
                    "entry left out of a response: another matching entry has the same hint"
                );
                continue;
            }
            out.push(Arc::clone(entry));
        }
        out
    }
}

// === impl Registry ===

impl Registry {
    /// A registry holding `entries` in this order.
    pub fn new(entries: Vec<RegistrationEntry>) -> Result<Self, RegistrationError> {
        check_duplicates(&entries)?;
        warn_shared_hints(&entries);
        let set = EntrySet {
            entries: entries.into_iter().map(Arc::new).collect(),
            revision: 1,
        };
        let (tx, _) = watch::channel(Arc::new(set));
        Ok(Self {
            current: Arc::new(tx),
        })
    }

    /// Replaces every entry at once; subscribers wake and re-evaluate.
    pub fn replace(&self, entries: Vec<RegistrationEntry>) -> Result<(), RegistrationError> {
        check_duplicates(&entries)?;
        warn_shared_hints(&entries);
        let entries = entries.into_iter().map(Arc::new).collect();
        self.current.send_modify(|set| {
            *set = Arc::new(EntrySet {
                entries,
                revision: set.revision + 1,
            });
        });
        Ok(())
    }

    /// The entries as they are now. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<EntrySet> {
        self.current.borrow().clone()
    }

    /// A receiver that wakes whenever the entries change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<EntrySet>> {
        self.current.subscribe()
    }
}

/// Two entries with one hint: a caller matching both gets only the first.
fn warn_shared_hints(entries: &[RegistrationEntry]) {
    let mut first_with: HashMap<&str, &RegistrationEntry> = HashMap::new();
    for entry in entries {
        if let Some(hint) = entry.hint.as_deref()
            && let Some(first) = first_with.insert(hint, entry)
        {
            tracing::warn!(
                hint,
                first = %first.spiffe_id,
                second = %entry.spiffe_id,
                "two entries share a hint: a process matching both gets only the first"
            );
        }
    }
}

fn check_duplicates(entries: &[RegistrationEntry]) -> Result<(), RegistrationError> {
    let mut first_at = HashMap::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        if let Some(first) = first_at.insert(&entry.id, i) {
            return Err(RegistrationError::Duplicate {
                first: first + 1,
                second: i + 1,
                spiffe_id: entry.spiffe_id.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiffe::TrustDomain;
    use std::collections::BTreeSet;

    fn entry(id: &str, selectors: &[&str], hint: Option<&str>) -> RegistrationEntry {
        let c = EntryConfig {
            spiffe_id: id.into(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            hint: hint.map(str::to_owned),
            ..EntryConfig::default()
        };
        RegistrationEntry::from_config(
            &c,
            &TrustDomain::new("example.org").unwrap(),
            &BTreeSet::new(),
        )
        .unwrap()
    }

    fn selectors(s: &[&str]) -> SelectorSet {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn matching_keeps_order_and_drops_duplicate_hints() {
        let reg = Registry::new(vec![
            entry("spiffe://example.org/a", &["unix:uid:1"], Some("one")),
            entry(
                "spiffe://example.org/b",
                &["unix:uid:1", "unix:gid:2"],
                Some("two"),
            ),
            entry("spiffe://example.org/c", &["unix:uid:1"], Some("one")),
            entry("spiffe://example.org/d", &["unix:uid:9"], None),
        ])
        .unwrap();
        let got: Vec<String> = reg
            .snapshot()
            .matching(&selectors(&["unix:uid:1", "unix:gid:2"]))
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(got, ["spiffe://example.org/a", "spiffe://example.org/b"]);
        assert!(
            reg.snapshot()
                .matching(&selectors(&["unix:uid:3"]))
                .is_empty()
        );
    }

    #[test]
    fn duplicate_entries_are_refused() {
        let err = Registry::new(vec![
            entry("spiffe://example.org/a", &["unix:uid:1"], None),
            entry("spiffe://example.org/b", &["unix:uid:1"], None),
            entry("spiffe://example.org/a", &["unix:uid:1"], None),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("entries 1 and 3 are duplicates"),
            "{err}"
        );
    }
}
