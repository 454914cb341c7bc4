//! Registration: who gets which SPIFFE ID.
//!
//! Owns [`RegistrationEntry`] (selectors -> SPIFFE ID or ID template), the
//! [`Registry`] that holds the current [`EntrySet`], and the subset matching
//! that decides which entries a caller's selectors satisfy.
//!
//! Entries come from two places: the config file (source `Config`, replaced
//! as a whole on reload, never changed through the API) and the admin API
//! (source `Api`, persisted in the store before they take effect, so an
//! acknowledged entry survives any crash).
//!
//! Invariant: this module never reads the operating system. The selectors it
//! matches come from `attestation`; it only compares them.
//!
//! Readers take a snapshot (an `Arc<EntrySet>`) and never hold a lock while
//! they work; writers are serialised, persist first, then replace the whole
//! set and bump its revision, which wakes every subscriber (open Workload
//! API streams re-evaluate on it). Each set carries its own index
//! (`matcher`), built with it, so matching a caller costs about the same
//! with ten entries or ten thousand.

pub mod entry;
mod matcher;
mod persist;
pub mod selector;
pub mod template;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;

use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, Decision as AuditDecision, EventKind};
use crate::store::{Store, StoreError};
pub use entry::{EntryError, EntryId, EntrySource, EntrySpec, RegistrationEntry};
pub use selector::{Selector, SelectorSet, SelectorType};
pub use template::IdTemplate;

/// Why a registration change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The entry itself is invalid.
    #[error(transparent)]
    Invalid(#[from] EntryError),
    /// Another entry already grants this ID on these selectors.
    #[error("an entry with this SPIFFE ID and these selectors already exists: {existing}")]
    Duplicate {
        /// The id of the existing entry.
        existing: EntryId,
    },
    /// No entry with this id.
    #[error("no entry with id {0}")]
    NotFound(EntryId),
    /// The entry comes from the config file.
    #[error("entry {0} comes from the config file; change it there and reload")]
    FromConfig(EntryId),
    /// The entry changed since the caller read it.
    #[error("entry {id} is at revision {found}, not {expected}; read it again")]
    Conflict {
        /// The entry.
        id: EntryId,
        /// The revision the caller expected.
        expected: u64,
        /// The revision it is at.
        found: u64,
    },
    /// A stored entry no longer validates (damaged store, or a trust domain
    /// or federation change): refuse to start rather than drop it.
    #[error("stored entry {id} is not valid")]
    Stored {
        /// The stored entry's id.
        id: String,
        /// Why it does not validate.
        #[source]
        source: EntryError,
    },
    /// Two config-file entries are duplicates.
    #[error("entries {first} and {second} are duplicates ({spiffe_id} with the same selectors)")]
    DuplicateInConfig {
        /// Position (1-based) of the first occurrence.
        first: usize,
        /// Position (1-based) of the repeat.
        second: usize,
        /// The SPIFFE ID both grant.
        spiffe_id: String,
    },
    /// The store refused.
    #[error("the entry store failed")]
    Store(#[from] StoreError),
    /// The blocking store job did not complete.
    #[error("the entry store job did not complete")]
    Job(#[from] tokio::task::JoinError),
    /// The change could not be recorded in the audit trail.
    #[error("not changing entries: the change could not be audited")]
    Audit(#[from] AuditUnavailable),
}

/// What a write does to an entry.
#[derive(Debug, Clone, Copy)]
enum Change {
    Created,
    Updated,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
        }
    }
}

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
    entries: Vec<Arc<RegistrationEntry>>,
    /// Built from `entries` with the set, never changed after.
    index: matcher::EntryIndex,
    revision: u64,
}

/// The current registration entries, shared by every reader.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: watch::Sender<Arc<EntrySet>>,
    store: Store,
    audit: AuditLog,
    trust_domain: TrustDomain,
    federations: Mutex<BTreeSet<TrustDomain>>,
    /// Serialises writers: persist, then publish, in one order.
    writes: tokio::sync::Mutex<()>,
}

// === impl EntrySet ===

impl EntrySet {
    /// The set of `entries`, in this order, at `revision`; indexes them.
    fn new(entries: Vec<Arc<RegistrationEntry>>, revision: u64) -> Self {
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

    fn duplicate_of(&self, candidate: &RegistrationEntry) -> Option<&Arc<RegistrationEntry>> {
        self.entries
            .iter()
            .find(|e| e.id != candidate.id && e.same_rule(candidate))
    }
}

// === impl Registry ===

impl Registry {
    /// The registry for `config_entries` (in file order) and every entry
    /// stored through the admin API. A stored entry that no longer
    /// validates stops the start.
    pub fn open(
        config_entries: Vec<RegistrationEntry>,
        store: Store,
        audit: AuditLog,
        trust_domain: TrustDomain,
        federations: BTreeSet<TrustDomain>,
    ) -> Result<Self, RegistrationError> {
        check_config_duplicates(&config_entries)?;
        let stored = persist::load(&store, &trust_domain, &federations)?;
        let mut entries: Vec<Arc<RegistrationEntry>> =
            config_entries.into_iter().map(Arc::new).collect();
        for entry in stored {
            if let Some(existing) = entries.iter().find(|e| e.same_rule(&entry)) {
                tracing::warn!(
                    entry_id = %entry.id,
                    config_entry = %existing.id,
                    spiffe_id = %entry.spiffe_id,
                    "a stored entry duplicates a config-file entry; both are kept, the config entry first"
                );
            }
            entries.push(Arc::new(entry));
        }
        warn_shared_hints(&entries);
        let set = EntrySet::new(entries, 1);
        Ok(Self {
            inner: Arc::new(Inner {
                current: watch::channel(Arc::new(set)).0,
                store,
                audit,
                trust_domain,
                federations: Mutex::new(federations),
                writes: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The entries as they are now. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<EntrySet> {
        self.inner.current.borrow().clone()
    }

    /// A receiver that wakes whenever the entries change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<EntrySet>> {
        self.inner.current.subscribe()
    }

    /// The agent's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    fn federations(&self) -> BTreeSet<TrustDomain> {
        self.inner
            .federations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Creates an entry through the admin API. It is stored before it takes
    /// effect; when this returns, it survives a crash.
    pub async fn create(
        &self,
        spec: &EntrySpec,
    ) -> Result<Arc<RegistrationEntry>, RegistrationError> {
        let now = SystemTime::now();
        let entry = RegistrationEntry::from_api(
            spec,
            &self.inner.trust_domain,
            &self.federations(),
            EntryId::random()?,
            1,
            now,
            now,
        )?;
        let _write = self.inner.writes.lock().await;
        self.store_and_publish(entry, Change::Created).await
    }

    /// Replaces an API entry's spec. With `expected_revision`, only if the
    /// entry is still at that revision.
    pub async fn update(
        &self,
        id: &EntryId,
        spec: &EntrySpec,
        expected_revision: Option<u64>,
    ) -> Result<Arc<RegistrationEntry>, RegistrationError> {
        let _write = self.inner.writes.lock().await;
        let current = self.api_entry(id)?;
        if let Some(expected) = expected_revision
            && expected != current.revision
        {
            return Err(RegistrationError::Conflict {
                id: id.clone(),
                expected,
                found: current.revision,
            });
        }
        let entry = RegistrationEntry::from_api(
            spec,
            &self.inner.trust_domain,
            &self.federations(),
            id.clone(),
            current.revision + 1,
            current.created_at,
            SystemTime::now(),
        )?;
        self.store_and_publish(entry, Change::Updated).await
    }

    /// Checks, audits, stores, then publishes a created or updated entry.
    /// The caller holds the write lock.
    async fn store_and_publish(
        &self,
        entry: RegistrationEntry,
        change: Change,
    ) -> Result<Arc<RegistrationEntry>, RegistrationError> {
        if let Some(existing) = self.snapshot().duplicate_of(&entry) {
            return Err(RegistrationError::Duplicate {
                existing: existing.id.clone(),
            });
        }
        self.audit_change(&entry, change.as_str())?;
        let row = persist::row(&entry);
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || match change {
            Change::Created => store.insert_entry(&row),
            Change::Updated => store.update_entry(&row),
        })
        .await?
        .map_err(|e| persist::duplicate_or(e, &entry))?;
        let entry = Arc::new(entry);
        self.publish(
            |entries| match entries.iter_mut().find(|e| e.id == entry.id) {
                Some(slot) => *slot = Arc::clone(&entry),
                None => entries.push(Arc::clone(&entry)),
            },
        );
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, revision = entry.revision, "entry {}", change.as_str());
        Ok(entry)
    }

    /// Deletes an API entry.
    pub async fn delete(&self, id: &EntryId) -> Result<(), RegistrationError> {
        let _write = self.inner.writes.lock().await;
        let current = self.api_entry(id)?;
        self.audit_change(&current, "deleted")?;
        let store = self.inner.store.clone();
        let key = id.as_str().to_owned();
        tokio::task::spawn_blocking(move || store.delete_entry(&key)).await??;
        self.publish(|entries| entries.retain(|e| e.id != *id));
        tracing::info!(entry_id = %id, spiffe_id = %current.spiffe_id, "entry deleted");
        Ok(())
    }

    /// Records an entry change; refused when it cannot be recorded (an
    /// unaudited change could grant identities nobody can trace).
    fn audit_change(&self, entry: &RegistrationEntry, what: &str) -> Result<(), RegistrationError> {
        self.inner.audit.record(AuditEvent {
            spiffe_id: Some(entry.spiffe_id.to_string()),
            entry_id: Some(entry.id.to_string()),
            reason: Some(format!(
                "entry {what}: selectors {}",
                entry
                    .selectors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            ..AuditEvent::new(EventKind::EntryChange, AuditDecision::Info)
        })?;
        Ok(())
    }

    /// Replaces the config-file entries (a reload) and the federations
    /// entries may name. API entries are kept.
    pub async fn replace_config(
        &self,
        config_entries: Vec<RegistrationEntry>,
        federations: BTreeSet<TrustDomain>,
    ) -> Result<(), RegistrationError> {
        check_config_duplicates(&config_entries)?;
        let _write = self.inner.writes.lock().await;
        self.audit_config_changes(&config_entries)?;
        *self
            .inner
            .federations
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = federations;
        self.publish(|entries| {
            let api: Vec<_> = entries
                .drain(..)
                .filter(|e| e.source == EntrySource::Api)
                .collect();
            entries.extend(config_entries.into_iter().map(Arc::new));
            entries.extend(api);
        });
        warn_shared_hints(&self.snapshot().entries);
        Ok(())
    }

    /// Records what a reload changes among the config entries; refused
    /// (nothing applied) when it cannot be recorded.
    fn audit_config_changes(&self, next: &[RegistrationEntry]) -> Result<(), RegistrationError> {
        let snapshot = self.snapshot();
        let running: HashMap<&EntryId, &RegistrationEntry> = snapshot
            .entries
            .iter()
            .filter(|e| e.source == EntrySource::Config)
            .map(|e| (&e.id, e.as_ref()))
            .collect();
        for entry in next {
            match running.get(&entry.id) {
                None => self.audit_change(entry, "created by a reload")?,
                Some(current) if !current.grants_as(entry) => {
                    self.audit_change(entry, "updated by a reload")?;
                }
                Some(_) => {}
            }
        }
        for (id, current) in &running {
            if !next.iter().any(|e| e.id == **id) {
                self.audit_change(current, "deleted by a reload")?;
            }
        }
        Ok(())
    }

    fn api_entry(&self, id: &EntryId) -> Result<Arc<RegistrationEntry>, RegistrationError> {
        let snapshot = self.snapshot();
        let entry = snapshot
            .get(id)
            .ok_or_else(|| RegistrationError::NotFound(id.clone()))?;
        if entry.source == EntrySource::Config {
            return Err(RegistrationError::FromConfig(id.clone()));
        }
        Ok(Arc::clone(entry))
    }

    /// Publishes the set `change` makes of the current one. The caller holds
    /// the write lock, so the set cannot change in between; the new set and
    /// its index are built before the swap, so readers taking a snapshot
    /// never wait for the build (milliseconds with thousands of entries).
    fn publish(&self, change: impl FnOnce(&mut Vec<Arc<RegistrationEntry>>)) {
        let current = self.snapshot();
        let mut entries = current.entries.clone();
        change(&mut entries);
        let next = EntrySet::new(entries, current.revision + 1);
        self.inner.current.send_replace(Arc::new(next));
    }
}

/// Two entries with one hint: a caller matching both gets only the first.
fn warn_shared_hints(entries: &[Arc<RegistrationEntry>]) {
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

/// Refuses two config-file entries with the same id (the same SPIFFE ID
/// and selectors).
pub fn check_config_duplicates(entries: &[RegistrationEntry]) -> Result<(), RegistrationError> {
    let mut first_at = HashMap::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        if let Some(first) = first_at.insert(&entry.id, i) {
            return Err(RegistrationError::DuplicateInConfig {
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

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn spec(id: &str, selectors: &[&str], hint: Option<&str>) -> EntrySpec {
        EntrySpec {
            spiffe_id: id.into(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            hint: hint.map(str::to_owned),
            ..EntrySpec::default()
        }
    }

    fn entry(id: &str, selectors: &[&str], hint: Option<&str>) -> RegistrationEntry {
        RegistrationEntry::from_config(&spec(id, selectors, hint), &td(), &BTreeSet::new()).unwrap()
    }

    fn selectors(s: &[&str]) -> SelectorSet {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// A real audit trail under `dir`; its writer runs on the test's
    /// runtime when there is one (sync tests record nothing).
    fn audit(dir: &tempfile::TempDir) -> AuditLog {
        // A registry reopened in the same test gets its own trail: the
        // first writer still holds its directory's lock.
        static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (log, writer) = AuditLog::open(
            &dir.path().join(format!("audit-{n}")),
            &crate::audit::AuditConfig::default(),
            Arc::new(crate::audit::SigningKey::generate().unwrap().0),
        )
        .unwrap();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(writer.run(tokio_util::sync::CancellationToken::new()));
        }
        log
    }

    fn registry(dir: &tempfile::TempDir, config: Vec<RegistrationEntry>) -> Registry {
        let store = Store::open(dir.path()).unwrap();
        Registry::open(config, store, audit(dir), td(), BTreeSet::new()).unwrap()
    }

    #[test]
    fn matching_keeps_order_and_drops_duplicate_hints() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(
            &dir,
            vec![
                entry("spiffe://example.org/a", &["unix:uid:1"], Some("one")),
                entry(
                    "spiffe://example.org/b",
                    &["unix:uid:1", "unix:gid:2"],
                    Some("two"),
                ),
                entry("spiffe://example.org/c", &["unix:uid:1"], Some("one")),
                entry("spiffe://example.org/d", &["unix:uid:9"], None),
            ],
        );
        let got: Vec<String> = reg
            .snapshot()
            .matching(&selectors(&["unix:uid:1", "unix:gid:2"]))
            .iter()
            .map(|m| m.spiffe_id.to_string())
            .collect();
        assert_eq!(got, ["spiffe://example.org/a", "spiffe://example.org/b"]);
        assert!(
            reg.snapshot()
                .matching(&selectors(&["unix:uid:3"]))
                .is_empty()
        );
    }

    /// The contract, stated as the plain scan over every entry that
    /// `matching` replaces: (entry id, resolved ID) in registration order.
    fn linear_matching(set: &EntrySet, caller: &SelectorSet) -> Vec<(EntryId, String)> {
        let mut hints = HashSet::new();
        let mut ids = HashSet::new();
        let mut out = Vec::new();
        for entry in set.iter() {
            if !entry.selectors.is_subset(caller) {
                continue;
            }
            let Some(spiffe_id) = entry.spiffe_id.resolve(caller) else {
                continue;
            };
            if entry
                .hint
                .as_ref()
                .is_some_and(|h| !hints.insert(h.clone()))
            {
                continue;
            }
            if ids.insert(spiffe_id.to_string()) {
                out.push((entry.id.clone(), spiffe_id.to_string()));
            }
        }
        out
    }

    fn indexed_matching(set: &EntrySet, caller: &SelectorSet) -> Vec<(EntryId, String)> {
        set.matching(caller)
            .into_iter()
            .map(|m| (m.entry.id.clone(), m.spiffe_id.to_string()))
            .collect()
    }

    /// splitmix64: a fixed, dependency-free sequence per seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Few values, so entries overlap and callers match often. Two users
    /// leave `{unix:user}` unresolved; `x y` is no path segment.
    const VOCABULARY: &[&str] = &[
        "unix:uid:0",
        "unix:uid:1000",
        "unix:gid:1000",
        "unix:gid:50",
        "unix:user:alice",
        "unix:user:bob",
        "unix:user:x y",
        "unix:group:staff",
        "unix:supplementary_gid:4",
        "unix:supplementary_gid:27",
        "unix:path:/usr/bin/python3",
        "unix:path:/bin/sh",
        "unix:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "k8s:ns:agents",
        "k8s:ns:default",
        "k8s:sa:planner",
    ];

    const IDS: &[&str] = &[
        "spiffe://example.org/a",
        "spiffe://example.org/b",
        "spiffe://example.org/c",
        "spiffe://example.org/user/{unix:user}",
        "spiffe://example.org/uid/{unix:uid}/{unix:gid}",
        "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}",
    ];

    const HINTS: &[Option<&str>] = &[None, None, Some("internal"), Some("external")];

    fn random_selectors(rng: &mut Rng, max: usize) -> Vec<String> {
        (0..rng.below(max + 1))
            .map(|_| (*rng.pick(VOCABULARY)).to_owned())
            .collect()
    }

    /// Up to 40 entries: config-file ones (the same rule twice is the same
    /// id), API ones (fresh ids), now and then one requiring nothing (which
    /// validation refuses, built by hand).
    fn random_entries(rng: &mut Rng) -> Vec<Arc<RegistrationEntry>> {
        let now = SystemTime::now();
        (0..rng.below(41))
            .map(|_| {
                let mut selectors = random_selectors(rng, 4);
                if selectors.is_empty() {
                    selectors.push((*rng.pick(VOCABULARY)).to_owned());
                }
                let spec = EntrySpec {
                    spiffe_id: (*rng.pick(IDS)).to_owned(),
                    selectors,
                    hint: rng.pick(HINTS).map(str::to_owned),
                    ..EntrySpec::default()
                };
                let mut entry = if rng.below(2) == 0 {
                    RegistrationEntry::from_config(&spec, &td(), &BTreeSet::new()).unwrap()
                } else {
                    let id = EntryId::random().unwrap();
                    RegistrationEntry::from_api(&spec, &td(), &BTreeSet::new(), id, 1, now, now)
                        .unwrap()
                };
                if rng.below(25) == 0 {
                    entry.selectors.clear();
                }
                Arc::new(entry)
            })
            .collect()
    }

    #[test]
    fn indexed_matching_equals_a_linear_scan() {
        let mut nonempty = 0;
        for seed in 0..400 {
            let mut rng = Rng(seed);
            let set = EntrySet::new(random_entries(&mut rng), 1);
            let mut callers: Vec<SelectorSet> = (0..30)
                .map(|_| {
                    random_selectors(&mut rng, 10)
                        .iter()
                        .map(|s| s.parse().unwrap())
                        .collect()
                })
                .collect();
            callers.push(VOCABULARY.iter().map(|s| s.parse().unwrap()).collect());
            for caller in &callers {
                let want = linear_matching(&set, caller);
                assert_eq!(
                    indexed_matching(&set, caller),
                    want,
                    "seed {seed}, caller {caller:?}"
                );
                nonempty += usize::from(!want.is_empty());
            }
            for entry in set.iter() {
                let first = set.entries.iter().find(|e| e.id == entry.id).unwrap();
                assert!(Arc::ptr_eq(set.get(&entry.id).unwrap(), first));
            }
        }
        assert!(nonempty > 5000, "the callers must match often: {nonempty}");
    }

    #[tokio::test]
    async fn the_index_follows_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(
            &dir,
            vec![
                entry("spiffe://example.org/cfg", &["unix:uid:1000"], None),
                entry(
                    "spiffe://example.org/user/{unix:user}",
                    &["unix:uid:1000", "unix:gid:50"],
                    None,
                ),
            ],
        );
        let callers = [
            selectors(&["unix:uid:1000"]),
            selectors(&["unix:uid:1000", "unix:gid:50", "unix:user:alice"]),
            selectors(&["unix:uid:1000", "unix:path:/bin/sh"]),
            selectors(&["unix:uid:7", "unix:path:/bin/sh"]),
        ];
        let check = |step: &str| {
            let set = reg.snapshot();
            for caller in &callers {
                assert_eq!(
                    indexed_matching(&set, caller),
                    linear_matching(&set, caller),
                    "after {step}, caller {caller:?}"
                );
            }
            for entry in set.iter() {
                assert!(Arc::ptr_eq(set.get(&entry.id).unwrap(), entry), "{step}");
            }
        };
        check("open");
        let created = reg
            .create(&spec(
                "spiffe://example.org/sh",
                &["unix:uid:1000", "unix:path:/bin/sh"],
                None,
            ))
            .await
            .unwrap();
        check("create");
        assert_eq!(
            indexed_matching(&reg.snapshot(), &callers[2]).len(),
            2,
            "the new entry matches"
        );
        reg.update(
            &created.id,
            &spec("spiffe://example.org/sh", &["unix:path:/bin/sh"], None),
            None,
        )
        .await
        .unwrap();
        check("update");
        assert_eq!(
            indexed_matching(&reg.snapshot(), &callers[3]).len(),
            1,
            "the updated entry matches on its new selectors"
        );
        reg.replace_config(
            vec![entry(
                "spiffe://example.org/cfg2",
                &["unix:path:/bin/sh"],
                None,
            )],
            BTreeSet::new(),
        )
        .await
        .unwrap();
        check("reload");
        reg.delete(&created.id).await.unwrap();
        check("delete");
        assert!(reg.snapshot().get(&created.id).is_none());
        let left: Vec<String> = reg
            .snapshot()
            .matching(&callers[2])
            .iter()
            .map(|m| m.spiffe_id.to_string())
            .collect();
        assert_eq!(left, ["spiffe://example.org/cfg2"]);
    }

    #[test]
    fn templates_resolve_per_caller() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(
            &dir,
            vec![entry(
                "spiffe://example.org/user/{unix:user}",
                &["unix:gid:100"],
                None,
            )],
        );
        let alice = reg
            .snapshot()
            .matching(&selectors(&["unix:gid:100", "unix:user:alice"]));
        assert_eq!(
            alice[0].spiffe_id.to_string(),
            "spiffe://example.org/user/alice"
        );
        let nameless = reg.snapshot().matching(&selectors(&["unix:gid:100"]));
        assert!(
            nameless.is_empty(),
            "a template without its value does not match"
        );
    }

    #[test]
    fn duplicate_config_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = Registry::open(
            vec![
                entry("spiffe://example.org/a", &["unix:uid:1"], None),
                entry("spiffe://example.org/b", &["unix:uid:1"], None),
                entry("spiffe://example.org/a", &["unix:uid:1"], None),
            ],
            store,
            audit(&dir),
            td(),
            BTreeSet::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("entries 1 and 3 are duplicates"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn api_entries_persist_and_config_entries_are_protected() {
        let dir = tempfile::tempdir().unwrap();
        let config = vec![entry("spiffe://example.org/cfg", &["unix:uid:1"], None)];
        let reg = registry(&dir, config.clone());
        let mut rx = reg.subscribe();
        rx.mark_unchanged();

        let created = reg
            .create(&spec(
                "spiffe://example.org/api",
                &["unix:uid:2"],
                Some("h"),
            ))
            .await
            .unwrap();
        assert!(rx.has_changed().unwrap(), "subscribers wake");
        assert_eq!(created.source, EntrySource::Api);
        assert!(created.id.as_str().starts_with("ent-"));

        let dup = reg
            .create(&spec("spiffe://example.org/api", &["unix:uid:2"], None))
            .await
            .unwrap_err();
        assert!(matches!(dup, RegistrationError::Duplicate { .. }), "{dup}");
        let dup_of_config = reg
            .create(&spec("spiffe://example.org/cfg", &["unix:uid:1"], None))
            .await
            .unwrap_err();
        assert!(matches!(dup_of_config, RegistrationError::Duplicate { .. }));

        let cfg_id = reg.snapshot().iter().next().unwrap().id.clone();
        let err = reg.delete(&cfg_id).await.unwrap_err();
        assert!(matches!(err, RegistrationError::FromConfig(_)), "{err}");

        let updated = reg
            .update(
                &created.id,
                &spec("spiffe://example.org/api2", &["unix:uid:2"], None),
                Some(1),
            )
            .await
            .unwrap();
        assert_eq!(updated.revision, 2);
        let stale = reg
            .update(
                &created.id,
                &spec("spiffe://example.org/api3", &["unix:uid:2"], None),
                Some(1),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(stale, RegistrationError::Conflict { found: 2, .. }),
            "{stale}"
        );

        // A restart: the stored entry is back, after the config entries.
        drop(reg);
        let reopened = registry(&dir, config);
        let ids: Vec<String> = reopened
            .snapshot()
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/cfg", "spiffe://example.org/api2"]
        );
        let stored = reopened.snapshot().get(&created.id).unwrap().clone();
        assert_eq!(stored.revision, 2);
        assert_eq!(stored.hint, None);

        reopened.delete(&created.id).await.unwrap();
        assert!(matches!(
            reopened.delete(&created.id).await.unwrap_err(),
            RegistrationError::NotFound(_)
        ));
    }

    #[tokio::test]
    async fn reload_replaces_config_entries_and_keeps_api_entries() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(
            &dir,
            vec![entry("spiffe://example.org/old", &["unix:uid:1"], None)],
        );
        reg.create(&spec("spiffe://example.org/api", &["unix:uid:2"], None))
            .await
            .unwrap();
        reg.replace_config(
            vec![entry("spiffe://example.org/new", &["unix:uid:1"], None)],
            BTreeSet::new(),
        )
        .await
        .unwrap();
        let ids: Vec<String> = reg
            .snapshot()
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/new", "spiffe://example.org/api"]
        );
    }
}
