//! The server's shared state: join tokens, nodes, entries, each
//! replica's published bundle and the fleet's task index, behind one
//! trait ([`ServerStore`]) with two backends: SQLite in the data dir for
//! one replica ([`sqlite::SqliteStore`]), and PostgreSQL for several
//! ([`postgres::PostgresStore`], `store = "postgres://…"`).
//!
//! Rows are plain data the callers validate; the store knows how to keep
//! them, not what they mean. Every method is async: the SQLite backend runs
//! its statements on the blocking pool, the PostgreSQL one on its
//! connection. Both run the same statements (`sql`) and read rows through
//! the same bounded codec (`rows`): a row one backend refuses to keep, the
//! other refuses too, and a damaged row reads as
//! [`ServerStoreError::Corrupt`] from either.
//!
//! Invariants (every backend):
//! - An acknowledged write is durable (committed before the method
//!   returns).
//! - A join token is consumed once: of any number of concurrent
//!   [`ServerStore::consume_join_token`] calls for one hash, across
//!   replicas, at most one gets it unused
//!   (`UPDATE … WHERE used_at IS NULL RETURNING`).
//! - The entries' revision grows with every entry change and never goes
//!   back, so a replica or a sync stream that saw revision N knows whether
//!   anything changed since.
//! - Only a token's hash is stored, never the token.
//! - A replica's bundle document is one row, replaced whole: a reader sees
//!   a replica's old document or its new one, never a mix.
//! - A fleet task is recorded once (the first begin's owner stands) and
//!   ended at most once (the first end stands; nothing makes it live
//!   again). Each end takes the next task-end revision in its
//!   transaction, under the counter's row lock, so ends commit in revision
//!   order across replicas; the revision never goes back, pruning
//!   included. Readers rely on the revisions' order, not on their being
//!   contiguous.

use std::collections::BTreeSet;
use std::fmt;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use super::join_token::{Admission, TokenHash};
use super::scope::NodeName;
use crate::registration::EntrySpec;

pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;

/// The fleet's state, shared by every replica.
pub trait ServerStore: fmt::Debug + Send + Sync + 'static {
    /// Keeps a new join token (its hash) admitting `admission.node` until
    /// `admission.expires_at`.
    fn add_join_token(
        &self,
        hash: TokenHash,
        admission: Admission,
    ) -> BoxFuture<'_, Result<(), ServerStoreError>>;

    /// Marks the token with `hash` used at `now` and returns it as it was
    /// before: unused (the caller admits the node) only for the first of
    /// any number of callers. `None`: no such token. An expired token is
    /// returned (unused) without being marked, so the caller can say it
    /// expired.
    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Option<Admission>, ServerStoreError>>;

    /// Forgets tokens that expired before `before` (used or not).
    fn prune_join_tokens(&self, before: SystemTime)
    -> BoxFuture<'_, Result<u64, ServerStoreError>>;

    /// Records an attested node, or a renewal of its SVID: the row
    /// replaces any row of that name (an evicted node that attests again is
    /// no longer evicted).
    fn put_node(&self, node: NodeRow) -> BoxFuture<'_, Result<(), ServerStoreError>>;

    /// Records the renewed SVID of `node` (its `svid_serial` and
    /// `svid_expires_at`), only while the stored node is the one the
    /// renewal was granted to: not evicted, and last attested at
    /// `node.attested_at`. False, and nothing written, when it was evicted
    /// or attested again since (a renewal racing an eviction must not undo
    /// it).
    fn renew_node(&self, node: NodeRow) -> BoxFuture<'_, Result<bool, ServerStoreError>>;

    /// The node named `name`.
    fn node(&self, name: NodeName) -> BoxFuture<'_, Result<Option<NodeRow>, ServerStoreError>>;

    /// Every node, by name.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRow>, ServerStoreError>>;

    /// Marks the node evicted: its SVID is no longer accepted. `None`: no
    /// such node.
    fn evict_node(
        &self,
        name: NodeName,
    ) -> BoxFuture<'_, Result<Option<NodeRow>, ServerStoreError>>;

    /// Adds an entry; bumps the revision. Refused with
    /// [`ServerStoreError::Duplicate`] when an entry with its id exists.
    fn create_entry(&self, entry: EntryRecord) -> BoxFuture<'_, Result<u64, ServerStoreError>>;

    /// Deletes the entry `id`; bumps the revision. False: no such entry.
    fn delete_entry(&self, id: String) -> BoxFuture<'_, Result<bool, ServerStoreError>>;

    /// Every entry and the revision they are at, read in one transaction.
    fn entries(&self) -> BoxFuture<'_, Result<EntriesSnapshot, ServerStoreError>>;

    /// The entries' revision (cheap: for polling).
    fn revision(&self) -> BoxFuture<'_, Result<u64, ServerStoreError>>;

    /// Publishes replica `replica_id`'s trust bundle (its SPIFFE bundle
    /// JSON: its CA certificates and JWT keys), replacing the one it
    /// published before. The store keeps the text as given; the caller
    /// made it and checks what it reads back. Refused with
    /// [`ServerStoreError::Unstorable`] when the id is empty, not
    /// printable ASCII, or either value is over its bound.
    fn publish_bundle(
        &self,
        replica_id: String,
        spiffe_json: String,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<(), ServerStoreError>>;

    /// Every replica's published bundle, `(replica id, SPIFFE bundle
    /// JSON)`, by replica id.
    fn bundles(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, ServerStoreError>>;

    /// Forgets replica `replica_id`'s bundle (a replica retired for good).
    /// False: it had none.
    fn forget_bundle(&self, replica_id: String) -> BoxFuture<'_, Result<bool, ServerStoreError>>;

    // === the fleet's task index ===

    /// Records a task as it gets its first token, live and owned by
    /// `task.owner_node`, unless a task with its id is stored already.
    /// Returns the stored row either way (the new one, or the one that was
    /// there, with its owner and state): the caller decides what the
    /// existing row allows. Refused with [`ServerStoreError::Unstorable`]
    /// when a value is over its bound (the id empty, not printable ASCII or
    /// over [`MAX_TXN_LEN`], the SPIFFE ID over 2048 bytes, a time outside
    /// 1970..=9999), before anything is written.
    fn begin_fleet_task(
        &self,
        task: NewFleetTask,
    ) -> BoxFuture<'_, Result<FleetTaskRow, ServerStoreError>>;

    /// The task `txn`. An id no task could have (empty, not printable
    /// ASCII, over [`MAX_TXN_LEN`]) is `None` without a query.
    fn fleet_task(
        &self,
        txn: String,
    ) -> BoxFuture<'_, Result<Option<FleetTaskRow>, ServerStoreError>>;

    /// At most `limit` tasks, newest first (by `began_at`, then id); ended
    /// ones only when `include_ended`. `limit` is clamped to
    /// [`MAX_TASKS_PER_READ`].
    fn fleet_tasks(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FleetTaskRow>, ServerStoreError>>;

    /// Ends each task of `ends` that is live and, when `owner` is given,
    /// owned by that node, in one transaction. Each end takes the next
    /// task-end revision, and ends commit in revision order across
    /// replicas (the counter's row is locked until commit), so a reader of
    /// [`ServerStore::fleet_task_ends`] never sees revision N+1 before N.
    /// Returns, in the order of `ends`, the row as this call ended it, or
    /// `None`: no such task, another node's, or ended already (the first
    /// end stands; a txn twice in `ends` is ended by its first). Only ends
    /// made take a revision. Refused whole with
    /// [`ServerStoreError::Unstorable`], before anything is written, when
    /// `ends` holds more than [`MAX_ENDS_PER_CALL`] or an end is over its
    /// bounds (its id as [`ServerStore::begin_fleet_task`] checks it, the
    /// reason over [`MAX_END_REASON_LEN`], a time outside 1970..=9999).
    fn end_fleet_tasks(
        &self,
        ends: Vec<FleetTaskEndRequest>,
        owner: Option<NodeName>,
    ) -> BoxFuture<'_, Result<Vec<Option<FleetTaskRow>>, ServerStoreError>>;

    /// At most `limit` ended tasks whose end revision is after `after`, in
    /// revision order. `limit` is clamped to [`MAX_TASKS_PER_READ`]; ends
    /// of pruned tasks are gone (a reader behind a prune misses them, and
    /// their tokens are expired anyway).
    fn fleet_task_ends(
        &self,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FleetTaskRow>, ServerStoreError>>;

    /// The revision of the latest task end (0: none yet). Never goes back,
    /// pruning included.
    fn fleet_task_ends_revision(&self) -> BoxFuture<'_, Result<u64, ServerStoreError>>;

    /// The ids of at most `limit` live tasks of `owner`, in id order (an
    /// evicted node's tasks are ended through them).
    fn live_fleet_tasks_of(
        &self,
        owner: NodeName,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<String>, ServerStoreError>>;

    /// How many tasks `owner` has in the index, live or ended (until they
    /// are pruned): what the server's `max_tasks_per_node` bounds.
    fn fleet_tasks_of(&self, owner: NodeName) -> BoxFuture<'_, Result<u64, ServerStoreError>>;

    /// Forgets tasks (live or ended) whose deadline is before `before`: no
    /// token of them can be valid any more. Returns how many.
    fn prune_fleet_tasks(&self, before: SystemTime)
    -> BoxFuture<'_, Result<u64, ServerStoreError>>;
}

/// Longest task id (`txn`) the index keeps, in bytes. Agents make UUIDs.
pub const MAX_TXN_LEN: usize = 128;
/// Longest end reason the index keeps, in bytes.
pub const MAX_END_REASON_LEN: usize = 64;
/// Most ends one [`ServerStore::end_fleet_tasks`] call takes: a bigger
/// batch is refused whole (send it in pieces).
pub const MAX_ENDS_PER_CALL: usize = 1024;
/// Most rows one read of the task index returns
/// ([`ServerStore::fleet_tasks`], [`ServerStore::fleet_task_ends`]): a
/// bigger `limit` is clamped to it.
pub const MAX_TASKS_PER_READ: u32 = 10_000;

/// A task as it gets its first token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFleetTask {
    /// The task id (`txn`): printable ASCII, at most [`MAX_TXN_LEN`].
    pub txn: String,
    /// The node that signed its first token: its owner.
    pub owner_node: NodeName,
    /// The owner's SPIFFE ID (`sub`), at most 2048 bytes.
    pub spiffe_id: String,
    /// When it was recorded.
    pub began_at: SystemTime,
    /// Its deadline (`tctx.deadline`): no token of it lives past this.
    pub deadline: SystemTime,
}

/// A task of the fleet, as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTaskRow {
    /// The task id (`txn`).
    pub txn: String,
    /// The node it was begun on.
    pub owner_node: NodeName,
    /// The owner's SPIFFE ID.
    pub spiffe_id: String,
    /// When it was recorded.
    pub began_at: SystemTime,
    /// Its deadline.
    pub deadline: SystemTime,
    /// Its end, once it ended.
    pub ended: Option<FleetTaskEnd>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTaskEnd {
    /// Why (`completed`, `deadline`, `owner exited`, `entry removed`,
    /// `revoked`), at most [`MAX_END_REASON_LEN`].
    pub reason: String,
    /// When, as its owner's agent (or the operator) said.
    pub at: SystemTime,
    /// Its place among the fleet's ends (1, 2, ...).
    pub revision: u64,
}

/// An end to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTaskEndRequest {
    /// The task.
    pub txn: String,
    /// Why, at most [`MAX_END_REASON_LEN`].
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Its name (the last segment of its SPIFFE ID).
    pub name: NodeName,
    /// How it attested: `join_token` (or `k8s_psat`).
    pub attestation: String,
    /// When it first attested (kept across renewals).
    pub attested_at: SystemTime,
    /// Its current SVID's serial, lowercase hex: the only SVID of the node
    /// the server accepts.
    pub svid_serial: String,
    /// When that SVID expires.
    pub svid_expires_at: SystemTime,
    /// Evicted by an operator: no SVID of it is accepted until it attests
    /// again.
    pub evicted: bool,
}

/// An entry as stored: the operator's spec, the nodes it names, and its
/// bookkeeping. The spec is validated when it is read back, as the
/// agent's stored entries are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    /// The entry's id (unique).
    pub id: String,
    /// What the operator asked for.
    pub spec: EntrySpec,
    /// Nodes it is served on whatever runs there.
    pub nodes: BTreeSet<NodeName>,
    /// Its own revision (1 at creation).
    pub revision: u64,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

/// Every entry, at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntriesSnapshot {
    /// The revision of the whole set.
    pub revision: u64,
    /// The entries, by id.
    pub entries: Vec<EntryRecord>,
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerStoreError {
    /// An entry with this id exists.
    #[error("an entry with id {0} already exists")]
    Duplicate(String),
    /// The store cannot be reached or refused the statement (a dropped
    /// connection, a full disk): retrying later may work.
    #[error("the server store is unavailable: {what}")]
    Unavailable {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A row the store refuses to keep: a value it could not read back
    /// (a time before 1970 or after 9999, text or JSON over its column's
    /// bound). The caller's bug or its input, not the store's state.
    #[error("the server store cannot keep this {table} row: {detail}")]
    Unstorable {
        /// The table.
        table: &'static str,
        /// What is out of bounds.
        detail: String,
    },
    /// A stored row does not read back (damaged, or written by a newer
    /// tether).
    #[error("the server store holds a damaged row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The store could not be opened: its files are not safe to use
    /// (owner, mode), the database is damaged or not the server's, its
    /// schema is newer than this build's, or (PostgreSQL) its URL is
    /// refused or the database cannot be reached at start.
    #[error("the server store cannot be opened")]
    Open(#[source] Box<dyn std::error::Error + Send + Sync>),
}
