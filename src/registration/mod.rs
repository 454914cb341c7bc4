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
mod entry_set;
mod matcher;
mod persist;
pub mod selector;
pub mod template;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use spiffe::TrustDomain;
use tokio::sync::watch;

use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, EventKind, Outcome};
use crate::store::{Store, StoreError};
pub use entry::{EntryError, EntryId, EntrySource, EntrySpec, RegistrationEntry};
pub use entry_set::{EntrySet, Match};
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
    /// The entry comes from the fleet's server.
    #[error("entry {0} comes from the tether server; change it there (tether server entry)")]
    FromServer(EntryId),
    /// The change would be made on a fleet agent, whose entries are the
    /// server's.
    #[error(
        "this agent takes its entries from the tether server; create them there (tether server entry create)"
    )]
    Fleet,
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
    /// Fleet mode: the entries are the server's; none is created here.
    fleet: std::sync::atomic::AtomicBool,
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
                fleet: std::sync::atomic::AtomicBool::new(false),
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
        if self.inner.fleet.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RegistrationError::Fleet);
        }
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
            ..AuditEvent::new(EventKind::EntryChange, Outcome::Info)
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

    /// Fleet mode: from now on the entries are the server's alone, and
    /// the admin API creates none ([`RegistrationError::Fleet`]).
    pub fn take_entries_from_server(&self) {
        self.inner
            .fleet
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the entries synced from the fleet's server (an agent in
    /// fleet mode) with `synced`, the whole set the server serves this
    /// node. Each change is recorded first; nothing is applied when it
    /// cannot be.
    pub async fn replace_synced(
        &self,
        synced: Vec<RegistrationEntry>,
    ) -> Result<(), RegistrationError> {
        let _write = self.inner.writes.lock().await;
        self.audit_replaced(&synced, EntrySource::Server, "synced from the server")?;
        self.publish(|entries| {
            entries.retain(|e| e.source != EntrySource::Server);
            entries.extend(synced.into_iter().map(Arc::new));
        });
        Ok(())
    }

    /// Records what a reload changes among the config entries; refused
    /// (nothing applied) when it cannot be recorded.
    fn audit_config_changes(&self, next: &[RegistrationEntry]) -> Result<(), RegistrationError> {
        self.audit_replaced(next, EntrySource::Config, "by a reload")
    }

    /// Records what replacing the entries of `source` with `next` changes.
    fn audit_replaced(
        &self,
        next: &[RegistrationEntry],
        source: EntrySource,
        how: &str,
    ) -> Result<(), RegistrationError> {
        let snapshot = self.snapshot();
        let running: HashMap<&EntryId, &RegistrationEntry> = snapshot
            .entries
            .iter()
            .filter(|e| e.source == source)
            .map(|e| (&e.id, e.as_ref()))
            .collect();
        for entry in next {
            match running.get(&entry.id) {
                None => self.audit_change(entry, &format!("created {how}"))?,
                Some(current) if !current.grants_as(entry) => {
                    self.audit_change(entry, &format!("updated {how}"))?;
                }
                Some(_) => {}
            }
        }
        for (id, current) in &running {
            if !next.iter().any(|e| e.id == **id) {
                self.audit_change(current, &format!("deleted {how}"))?;
            }
        }
        Ok(())
    }

    fn api_entry(&self, id: &EntryId) -> Result<Arc<RegistrationEntry>, RegistrationError> {
        let snapshot = self.snapshot();
        let entry = snapshot
            .get(id)
            .ok_or_else(|| RegistrationError::NotFound(id.clone()))?;
        match entry.source {
            EntrySource::Config => return Err(RegistrationError::FromConfig(id.clone())),
            EntrySource::Server => return Err(RegistrationError::FromServer(id.clone())),
            EntrySource::Api => {}
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
mod tests;
