//! The entries the server serves: [`ServerRegistry`].
//!
//! Two sources, in this order: the configuration file's `[[entries]]`
//! (validated when the file was loaded; never stored, never deleted through
//! the admin API) and the entries operators created through the admin API,
//! kept in the [`ServerStore`] that every replica shares. A stored entry is
//! validated on every load exactly as the agent validates an admin API
//! entry (`RegistrationEntry::from_api`), so a damaged or outdated row stops
//! [`ServerRegistry::open`] (or a later refresh, which keeps the last good
//! entries) with an error naming the entry, instead of serving a
//! half-understood entry.
//!
//! Invariants:
//! - Readers take a snapshot ([`ServerEntries`], an `Arc`) and never wait
//!   for a writer; writers and refreshes are serialised by one lock.
//! - A change is audited before it is stored: a change that cannot be
//!   audited is refused, and nothing is stored.
//! - Published revisions grow strictly: each publication bumps a local
//!   counter, whatever the store's own revision (which another replica's
//!   write may move, or a restore may move back); a publication happens
//!   only when the store's revision differs from the one last loaded.
//! - Other replicas' changes are seen by [`ServerRegistry::run`], which
//!   polls the store's revision every second.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::scope::{NodeName, ServerEntry};
use super::store::{EntriesSnapshot, EntryRecord, ServerStore, ServerStoreError};
use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, EventKind, Outcome};
use crate::error::Chain;
use crate::registration::{EntryError, EntryId, EntrySpec, RegistrationEntry};

/// How often [`ServerRegistry::run`] asks the store for its revision.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The entries the server serves, at one revision. Never changed once
/// published; the registry replaces it whole.
#[derive(Debug, Clone, Default)]
pub struct ServerEntries {
    /// Grows with every publication (see the module docs).
    pub revision: u64,
    /// The configuration file's entries in file order, then the stored
    /// ones as the store lists them.
    pub entries: Vec<ServerEntry>,
}

/// Why the registry refused a change or could not load.
#[derive(Debug, thiserror::Error)]
pub enum ServerRegistryError {
    /// The entry asked for is not valid (the cause names the field).
    #[error("the entry is not valid")]
    Invalid(#[source] EntryError),
    /// Another entry already grants this SPIFFE ID on these selectors.
    #[error("an entry with this SPIFFE ID and these selectors already exists: {existing}")]
    Duplicate {
        /// The existing entry's id.
        existing: EntryId,
    },
    /// No entry with this id.
    #[error("no entry with id {0}")]
    NotFound(String),
    /// The entry comes from the server's configuration file.
    #[error(
        "entry {0} comes from the server's configuration file; remove it there and restart the server"
    )]
    FromConfig(EntryId),
    /// A stored entry no longer validates (a damaged row, or a trust
    /// domain change): refused rather than dropped.
    #[error("stored entry {id} is not valid")]
    Stored {
        /// The stored entry's id.
        id: String,
        /// Why it does not validate.
        #[source]
        source: EntryError,
    },
    /// The store failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The store's error.
        #[source]
        source: ServerStoreError,
    },
    /// A new entry id could not be drawn (the system random number
    /// generator failed).
    #[error("could not draw a new entry id")]
    Random(#[source] EntryError),
    /// The change could not be recorded in the audit trail.
    #[error("not changing entries: the change could not be audited")]
    Audit(#[from] AuditUnavailable),
}

/// The server's entries: the configuration file's and the stored ones.
/// Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct ServerRegistry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ServerStore>,
    trust_domain: TrustDomain,
    config: Vec<ServerEntry>,
    audit: AuditLog,
    current: watch::Sender<Arc<ServerEntries>>,
    /// Serialises writes and refreshes; holds what was last loaded.
    loaded: tokio::sync::Mutex<Loaded>,
}

/// What the published snapshot was built from.
#[derive(Debug)]
struct Loaded {
    /// The store's revision the stored entries were read at.
    store_revision: u64,
}

// === impl ServerEntries ===

impl ServerEntries {
    /// The entry with this id.
    pub fn get(&self, id: &str) -> Option<&ServerEntry> {
        self.entries.iter().find(|e| e.entry.id.as_str() == id)
    }

    /// An entry other than `candidate` that grants the same SPIFFE ID on
    /// the same selectors.
    fn duplicate_of(&self, candidate: &RegistrationEntry) -> Option<&ServerEntry> {
        self.entries
            .iter()
            .find(|e| e.entry.id != candidate.id && e.entry.same_rule(candidate))
    }
}

// === impl ServerRegistry ===

impl ServerRegistry {
    /// The registry for `config_entries` (the configuration file's, in
    /// file order) and every stored entry. A stored entry that no longer
    /// validates stops the start, naming it.
    pub async fn open(
        store: Arc<dyn ServerStore>,
        trust_domain: TrustDomain,
        config_entries: Vec<ServerEntry>,
        audit: AuditLog,
    ) -> Result<Self, ServerRegistryError> {
        let snapshot = store
            .entries()
            .await
            .map_err(|source| store_error("reading the stored entries", source))?;
        let stored = validate(&snapshot, &trust_domain)?;
        let entries = combine(&config_entries, stored);
        let current = watch::channel(Arc::new(ServerEntries {
            revision: 1,
            entries,
        }))
        .0;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                trust_domain,
                config: config_entries,
                audit,
                current,
                loaded: tokio::sync::Mutex::new(Loaded {
                    store_revision: snapshot.revision,
                }),
            }),
        })
    }

    /// The entries as they are now. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<ServerEntries> {
        self.inner.current.borrow().clone()
    }

    /// A receiver that wakes whenever the entries change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ServerEntries>> {
        self.inner.current.subscribe()
    }

    /// The fleet's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// Creates an entry served on `nodes` (besides wherever its `k8s:`
    /// selectors place it): validated, refused when another entry grants
    /// the same ID on the same selectors, audited, stored; when this
    /// returns, every replica will serve it.
    pub async fn create(
        &self,
        spec: &EntrySpec,
        nodes: BTreeSet<NodeName>,
    ) -> Result<ServerEntry, ServerRegistryError> {
        let now = SystemTime::now();
        let id = EntryId::random().map_err(ServerRegistryError::Random)?;
        let entry = RegistrationEntry::from_api(
            spec,
            &self.inner.trust_domain,
            &BTreeSet::new(),
            id,
            1,
            now,
            now,
        )
        .map_err(ServerRegistryError::Invalid)?;
        let mut loaded = self.inner.loaded.lock().await;
        // Another replica may have created the same rule since the last
        // poll: compare against the store as it is now.
        self.refresh_locked(&mut loaded).await?;
        if let Some(existing) = self.snapshot().duplicate_of(&entry) {
            return Err(ServerRegistryError::Duplicate {
                existing: existing.entry.id.clone(),
            });
        }
        self.audit_change(&entry, &nodes, "created")?;
        let record = EntryRecord {
            id: entry.id.as_str().to_owned(),
            spec: entry.to_spec(),
            nodes: nodes.clone(),
            revision: entry.revision,
            created_at: entry.created_at,
            updated_at: entry.updated_at,
        };
        self.inner
            .store
            .create_entry(record)
            .await
            .map_err(|source| store_error("storing the entry", source))?;
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "server entry created");
        let created = ServerEntry {
            entry: Arc::new(entry),
            nodes,
        };
        self.refresh_locked(&mut loaded).await?;
        Ok(self
            .snapshot()
            .get(created.entry.id.as_str())
            .cloned()
            .unwrap_or(created))
    }

    /// Deletes a stored entry. Entries from the configuration file are
    /// refused ([`ServerRegistryError::FromConfig`]).
    pub async fn delete(&self, id: &str) -> Result<(), ServerRegistryError> {
        let id = EntryId::parse(id).map_err(ServerRegistryError::Invalid)?;
        if self.inner.config.iter().any(|e| e.entry.id == id) {
            return Err(ServerRegistryError::FromConfig(id));
        }
        let mut loaded = self.inner.loaded.lock().await;
        self.refresh_locked(&mut loaded).await?;
        let current = self
            .snapshot()
            .get(id.as_str())
            .cloned()
            .ok_or_else(|| ServerRegistryError::NotFound(id.to_string()))?;
        self.audit_change(&current.entry, &current.nodes, "deleted")?;
        let deleted = self
            .inner
            .store
            .delete_entry(id.as_str().to_owned())
            .await
            .map_err(|source| store_error("deleting the entry", source))?;
        if !deleted {
            // Another replica deleted it in between.
            self.refresh_locked(&mut loaded).await?;
            return Err(ServerRegistryError::NotFound(id.to_string()));
        }
        tracing::info!(entry_id = %id, spiffe_id = %current.entry.spiffe_id, "server entry deleted");
        self.refresh_locked(&mut loaded).await
    }

    /// Reloads the stored entries when the store's revision differs from
    /// the one last loaded, and publishes them; does nothing otherwise.
    /// On an error the published entries stay as they were.
    pub async fn refresh(&self) -> Result<(), ServerRegistryError> {
        let mut loaded = self.inner.loaded.lock().await;
        self.refresh_locked(&mut loaded).await
    }

    /// Refreshes every second (other replicas' changes) until `cancel`. A
    /// failed refresh is logged and the last entries kept.
    pub async fn run(self, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(POLL_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.refresh().await {
                tracing::error!(
                    error = %Chain(&error),
                    "could not refresh the server's entries; serving the last ones loaded"
                );
            }
        }
    }

    async fn refresh_locked(&self, loaded: &mut Loaded) -> Result<(), ServerRegistryError> {
        let revision = self
            .inner
            .store
            .revision()
            .await
            .map_err(|source| store_error("reading the entries' revision", source))?;
        if revision == loaded.store_revision {
            return Ok(());
        }
        let snapshot = self
            .inner
            .store
            .entries()
            .await
            .map_err(|source| store_error("reading the stored entries", source))?;
        let stored = validate(&snapshot, &self.inner.trust_domain)?;
        let entries = combine(&self.inner.config, stored);
        let next = self.snapshot().revision.saturating_add(1);
        self.inner.current.send_replace(Arc::new(ServerEntries {
            revision: next,
            entries,
        }));
        loaded.store_revision = snapshot.revision;
        tracing::debug!(
            revision = next,
            store_revision = snapshot.revision,
            "server entries reloaded"
        );
        Ok(())
    }

    /// Records an entry change; refused when it cannot be recorded (an
    /// unaudited change could grant identities nobody can trace).
    fn audit_change(
        &self,
        entry: &RegistrationEntry,
        nodes: &BTreeSet<NodeName>,
        what: &str,
    ) -> Result<(), ServerRegistryError> {
        let selectors = entry
            .selectors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let nodes = if nodes.is_empty() {
            "none".to_owned()
        } else {
            nodes
                .iter()
                .map(NodeName::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        };
        self.inner.audit.record(AuditEvent {
            spiffe_id: Some(entry.spiffe_id.to_string()),
            entry_id: Some(entry.id.to_string()),
            reason: Some(format!(
                "server entry {what}: selectors {selectors}; nodes {nodes}"
            )),
            ..AuditEvent::new(EventKind::EntryChange, Outcome::Info)
        })?;
        Ok(())
    }
}

fn store_error(what: &'static str, source: ServerStoreError) -> ServerRegistryError {
    ServerRegistryError::Store { what, source }
}

/// Every stored entry, validated as an admin API entry is.
fn validate(
    snapshot: &EntriesSnapshot,
    trust_domain: &TrustDomain,
) -> Result<Vec<ServerEntry>, ServerRegistryError> {
    snapshot
        .entries
        .iter()
        .map(|record| {
            let stored = |source| ServerRegistryError::Stored {
                id: record.id.chars().take(80).collect(),
                source,
            };
            let id = EntryId::parse(&record.id).map_err(stored)?;
            let entry = RegistrationEntry::from_api(
                &record.spec,
                trust_domain,
                &BTreeSet::new(),
                id,
                record.revision,
                record.created_at,
                record.updated_at,
            )
            .map_err(stored)?;
            Ok(ServerEntry {
                entry: Arc::new(entry),
                nodes: record.nodes.clone(),
            })
        })
        .collect()
}

/// The configuration file's entries, then the stored ones. A stored entry
/// that repeats a file entry's rule is kept (the file's first) and
/// warned about.
fn combine(config: &[ServerEntry], stored: Vec<ServerEntry>) -> Vec<ServerEntry> {
    let mut entries = config.to_vec();
    for entry in stored {
        if let Some(existing) = config.iter().find(|e| e.entry.same_rule(&entry.entry)) {
            tracing::warn!(
                entry_id = %entry.entry.id,
                config_entry = %existing.entry.id,
                spiffe_id = %entry.entry.spiffe_id,
                "a stored entry duplicates a configuration-file entry; both are kept, the file's first"
            );
        }
        entries.push(entry);
    }
    entries
}

#[cfg(test)]
mod tests;
