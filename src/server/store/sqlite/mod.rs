//! The server's store in SQLite, for one replica: `data_dir/server.db`,
//! opened as the agent opens its own database (`crate::store::open_connection`:
//! owner-only files checked with `trusted_fs`, WAL with
//! `synchronous = FULL`, `quick_check` first, a damaged, foreign or newer
//! database refused untouched, append-only migrations under
//! `user_version`). Its `application_id` differs from the agent's, so one
//! role's database is never taken for the other's.
//!
//! [`SqliteStore`] is a cheap handle to one connection behind a mutex;
//! every [`ServerStore`] method runs its statements on the blocking pool
//! (`spawn_blocking`), and a write commits before its future resolves.
//! A join token is consumed by one `UPDATE … WHERE used_at_ms IS NULL
//! RETURNING`, and each entry change bumps `meta.entries_revision` in the
//! same transaction, so the trait's invariants hold here by the same
//! statements the PostgreSQL backend runs (`store::sql`).
//!
//! The files: this one opens the database and runs the statements;
//! `tasks` those of the fleet's task index; `schema` holds the schema
//! steps. The statements (`store::sql`) and the
//! row codec (`store::rows`) are the backends' shared ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use super::rows::{self, EncodedAdmission, EncodedBundle, EncodedEntry, EncodedNode};
use super::sql;
use super::{
    EntriesSnapshot, EntryRecord, FleetTaskEndRequest, FleetTaskRow, NewFleetTask, NodeRow,
    ServerStore, ServerStoreError,
};
use crate::server::join_token::{Admission, TokenHash};
use crate::server::scope::NodeName;
use crate::store;

mod schema;
mod tasks;

/// The server's store in one SQLite database. Cheap to clone: clones share
/// one connection.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    conn: Mutex<Connection>,
}

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens or creates the database at `path` (the server's
    /// `data_dir/server.db`), refusing files others could write or own, a
    /// damaged database, one that is not the server's, or one with a newer
    /// schema, then applies pending migrations. Blocking: run it on the
    /// blocking pool. The directory must exist and be trusted (the server
    /// creates its data dir 0700 through `trusted_fs`).
    pub fn open(path: &Path) -> Result<SqliteStore, ServerStoreError> {
        SqliteStore::open_with(path, schema::STEPS)
    }

    /// [`SqliteStore::open`] as a build that knows only `steps` would.
    fn open_with(path: &Path, steps: &[&str]) -> Result<SqliteStore, ServerStoreError> {
        let conn = store::open_connection(path, schema::APPLICATION_ID, steps)
            .map_err(|e| ServerStoreError::Open(Box::new(e)))?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `job` on the connection on the blocking pool. `what` names the
    /// operation in an [`ServerStoreError::Unavailable`].
    fn run<T, F>(
        &self,
        what: &'static str,
        job: F,
    ) -> BoxFuture<'static, Result<T, ServerStoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, Failed) -> Result<T, ServerStoreError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // A panic while the lock was held cannot leave the
                // connection half way: an open transaction rolls back when
                // its guard unwinds.
                let mut conn = shared.conn.lock().unwrap_or_else(PoisonError::into_inner);
                job(&mut conn, Failed { what })
            })
            .await
            .map_err(|e| ServerStoreError::Unavailable {
                what,
                source: Box::new(e),
            })?
        })
    }
}

/// Maps a SQLite error of one operation: damage to
/// [`ServerStoreError::Corrupt`], anything else (a full disk, a lock held
/// too long) to [`ServerStoreError::Unavailable`].
#[derive(Clone, Copy)]
struct Failed {
    what: &'static str,
}

impl Failed {
    fn on(self, table: &'static str) -> impl Fn(rusqlite::Error) -> ServerStoreError {
        move |e| {
            if store::is_damage(&e) {
                ServerStoreError::Corrupt {
                    table,
                    detail: format!("SQLite reports damage: {e}"),
                }
            } else {
                ServerStoreError::Unavailable {
                    what: self.what,
                    source: Box::new(e),
                }
            }
        }
    }
}

/// Bumps the entries' revision inside `tx`; returns the new one.
fn bump_revision(tx: &rusqlite::Transaction<'_>, failed: Failed) -> Result<u64, ServerStoreError> {
    let value = tx
        .query_row(sql::BUMP_REVISION, [], |row| {
            row.get::<_, rusqlite::types::Value>(0)
        })
        .optional()
        .map_err(failed.on(rows::META))?;
    read_revision(value)
}

/// The revision row's value, checked.
fn read_revision(value: Option<rusqlite::types::Value>) -> Result<u64, ServerStoreError> {
    match value {
        Some(value) => rows::decode_revision((&value).into()),
        None => Err(ServerStoreError::Corrupt {
            table: rows::META,
            detail: "entries_revision is missing".into(),
        }),
    }
}

fn revision_in(conn: &Connection, failed: Failed) -> Result<u64, ServerStoreError> {
    let value = conn
        .query_row(sql::SELECT_REVISION, [], |row| {
            row.get::<_, rusqlite::types::Value>(0)
        })
        .optional()
        .map_err(failed.on(rows::META))?;
    read_revision(value)
}

impl ServerStore for SqliteStore {
    fn add_join_token(
        &self,
        hash: TokenHash,
        admission: Admission,
    ) -> BoxFuture<'_, Result<(), ServerStoreError>> {
        self.run("adding a join token", move |conn, failed| {
            let encoded = EncodedAdmission::new(&admission)?;
            conn.execute(
                sql::INSERT_JOIN_TOKEN,
                params![&hash.as_bytes()[..], encoded.node, encoded.expires_at_ms],
            )
            .map_err(failed.on(rows::JOIN_TOKENS))?;
            Ok(())
        })
    }

    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Option<Admission>, ServerStoreError>> {
        self.run("consuming a join token", move |conn, failed| {
            let on = failed.on(rows::JOIN_TOKENS);
            let now_ms = store::query_millis(now);
            // Immediate: the update and the fallback read see one state.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&on)?;
            let hash = &hash.as_bytes()[..];
            // The row as it was: unused (the update matched only such).
            let consumed = {
                let mut stmt = tx.prepare(sql::CONSUME_JOIN_TOKEN).map_err(&on)?;
                let mut rows = stmt.query(params![now_ms, hash]).map_err(&on)?;
                match rows.next().map_err(&on)? {
                    Some(row) => Some(rows::decode_consumed(row)?),
                    None => None,
                }
            };
            let found = match consumed {
                Some(admission) => Some(admission),
                None => {
                    let mut stmt = tx.prepare(sql::SELECT_JOIN_TOKEN).map_err(&on)?;
                    let mut rows = stmt.query(params![hash]).map_err(&on)?;
                    match rows.next().map_err(&on)? {
                        Some(row) => Some(rows::decode_admission(row)?),
                        None => None,
                    }
                }
            };
            tx.commit().map_err(&on)?;
            Ok(found)
        })
    }

    fn prune_join_tokens(
        &self,
        before: SystemTime,
    ) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        self.run("pruning join tokens", move |conn, failed| {
            let removed = conn
                .execute(sql::PRUNE_JOIN_TOKENS, params![store::query_millis(before)])
                .map_err(failed.on(rows::JOIN_TOKENS))?;
            Ok(u64::try_from(removed).unwrap_or(u64::MAX))
        })
    }

    fn put_node(&self, node: NodeRow) -> BoxFuture<'_, Result<(), ServerStoreError>> {
        self.run("recording a node", move |conn, failed| {
            let n = EncodedNode::new(&node)?;
            conn.execute(
                sql::UPSERT_NODE,
                params![
                    n.name,
                    n.attestation,
                    n.attested_at_ms,
                    n.svid_serial,
                    n.svid_expires_at_ms,
                    n.evicted
                ],
            )
            .map_err(failed.on(rows::NODES))?;
            Ok(())
        })
    }

    fn renew_node(&self, node: NodeRow) -> BoxFuture<'_, Result<bool, ServerStoreError>> {
        self.run("renewing a node", move |conn, failed| {
            let n = EncodedNode::new(&node)?;
            let changed = conn
                .execute(
                    sql::RENEW_NODE,
                    params![
                        n.svid_serial,
                        n.svid_expires_at_ms,
                        n.name,
                        n.attested_at_ms
                    ],
                )
                .map_err(failed.on(rows::NODES))?;
            Ok(changed == 1)
        })
    }

    fn node(&self, name: NodeName) -> BoxFuture<'_, Result<Option<NodeRow>, ServerStoreError>> {
        self.run("reading a node", move |conn, failed| {
            let on = failed.on(rows::NODES);
            let mut stmt = conn.prepare(sql::SELECT_NODE).map_err(&on)?;
            let mut rows = stmt.query(params![name.as_str()]).map_err(&on)?;
            match rows.next().map_err(&on)? {
                Some(row) => rows::decode_node(row).map(Some),
                None => Ok(None),
            }
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRow>, ServerStoreError>> {
        self.run("listing nodes", move |conn, failed| {
            let on = failed.on(rows::NODES);
            let mut stmt = conn.prepare(sql::SELECT_NODES).map_err(&on)?;
            let mut rows = stmt.query([]).map_err(&on)?;
            let mut nodes = Vec::new();
            while let Some(row) = rows.next().map_err(&on)? {
                nodes.push(rows::decode_node(row)?);
            }
            Ok(nodes)
        })
    }

    fn evict_node(
        &self,
        name: NodeName,
    ) -> BoxFuture<'_, Result<Option<NodeRow>, ServerStoreError>> {
        self.run("evicting a node", move |conn, failed| {
            let on = failed.on(rows::NODES);
            let mut stmt = conn.prepare(sql::EVICT_NODE).map_err(&on)?;
            let mut rows = stmt.query(params![name.as_str()]).map_err(&on)?;
            let evicted = match rows.next().map_err(&on)? {
                Some(row) => Some(rows::decode_node(row)?),
                None => None,
            };
            // Stepping to the end completes the UPDATE (autocommit).
            while rows.next().map_err(&on)?.is_some() {}
            Ok(evicted)
        })
    }

    fn create_entry(&self, entry: EntryRecord) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        self.run("creating an entry", move |conn, failed| {
            let on = failed.on(rows::ENTRIES);
            let e = EncodedEntry::new(&entry)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&on)?;
            let inserted = tx
                .execute(
                    sql::INSERT_ENTRY,
                    params![
                        e.id,
                        e.spec_json,
                        e.nodes_json,
                        e.revision,
                        e.created_at_ms,
                        e.updated_at_ms
                    ],
                )
                .map_err(&on)?;
            if inserted == 0 {
                // Dropping `tx` rolls back: nothing was written.
                return Err(ServerStoreError::Duplicate(entry.id));
            }
            let revision = bump_revision(&tx, failed)?;
            tx.commit().map_err(&on)?;
            Ok(revision)
        })
    }

    fn delete_entry(&self, id: String) -> BoxFuture<'_, Result<bool, ServerStoreError>> {
        self.run("deleting an entry", move |conn, failed| {
            let on = failed.on(rows::ENTRIES);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&on)?;
            let deleted = tx.execute(sql::DELETE_ENTRY, params![id]).map_err(&on)?;
            if deleted == 0 {
                return Ok(false);
            }
            bump_revision(&tx, failed)?;
            tx.commit().map_err(&on)?;
            Ok(true)
        })
    }

    fn entries(&self) -> BoxFuture<'_, Result<EntriesSnapshot, ServerStoreError>> {
        self.run("reading the entries", move |conn, failed| {
            let on = failed.on(rows::ENTRIES);
            // Deferred: a read transaction, one snapshot for both reads.
            let tx = conn.transaction().map_err(&on)?;
            let revision = revision_in(&tx, failed)?;
            let mut entries = Vec::new();
            {
                let mut stmt = tx.prepare(sql::SELECT_ENTRIES).map_err(&on)?;
                let mut rows = stmt.query([]).map_err(&on)?;
                while let Some(row) = rows.next().map_err(&on)? {
                    entries.push(rows::decode_entry(row)?);
                }
            }
            tx.commit().map_err(&on)?;
            Ok(EntriesSnapshot { revision, entries })
        })
    }

    fn revision(&self) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        self.run("reading the entries' revision", move |conn, failed| {
            revision_in(conn, failed)
        })
    }

    fn publish_bundle(
        &self,
        replica_id: String,
        spiffe_json: String,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<(), ServerStoreError>> {
        self.run("publishing a bundle", move |conn, failed| {
            let b = EncodedBundle::new(&replica_id, &spiffe_json, now)?;
            conn.execute(
                sql::UPSERT_BUNDLE,
                params![b.replica, b.bundle_json, b.updated_at_ms],
            )
            .map_err(failed.on(rows::BUNDLE_KEYS))?;
            Ok(())
        })
    }

    fn bundles(&self) -> BoxFuture<'_, Result<Vec<(String, String)>, ServerStoreError>> {
        self.run("reading the published bundles", move |conn, failed| {
            let on = failed.on(rows::BUNDLE_KEYS);
            let mut stmt = conn.prepare(sql::SELECT_BUNDLES).map_err(&on)?;
            let mut rows = stmt.query([]).map_err(&on)?;
            let mut bundles = Vec::new();
            while let Some(row) = rows.next().map_err(&on)? {
                bundles.push(rows::decode_bundle(row)?);
            }
            Ok(bundles)
        })
    }

    fn forget_bundle(&self, replica_id: String) -> BoxFuture<'_, Result<bool, ServerStoreError>> {
        self.run("forgetting a bundle", move |conn, failed| {
            let deleted = conn
                .execute(sql::DELETE_BUNDLE, params![replica_id])
                .map_err(failed.on(rows::BUNDLE_KEYS))?;
            Ok(deleted > 0)
        })
    }

    fn begin_fleet_task(
        &self,
        task: NewFleetTask,
    ) -> BoxFuture<'_, Result<FleetTaskRow, ServerStoreError>> {
        self.run("recording a fleet task", move |conn, failed| {
            tasks::begin(conn, failed, &task)
        })
    }

    fn fleet_task(
        &self,
        txn: String,
    ) -> BoxFuture<'_, Result<Option<FleetTaskRow>, ServerStoreError>> {
        self.run("reading a fleet task", move |conn, failed| {
            tasks::task(conn, failed, &txn)
        })
    }

    fn fleet_tasks(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FleetTaskRow>, ServerStoreError>> {
        self.run("listing fleet tasks", move |conn, failed| {
            tasks::tasks(conn, failed, include_ended, limit)
        })
    }

    fn end_fleet_tasks(
        &self,
        ends: Vec<FleetTaskEndRequest>,
        owner: Option<NodeName>,
    ) -> BoxFuture<'_, Result<Vec<Option<FleetTaskRow>>, ServerStoreError>> {
        self.run("ending fleet tasks", move |conn, failed| {
            tasks::end(conn, failed, &ends, owner.as_ref())
        })
    }

    fn fleet_task_ends(
        &self,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FleetTaskRow>, ServerStoreError>> {
        self.run("reading fleet task ends", move |conn, failed| {
            tasks::ends(conn, failed, after, limit)
        })
    }

    fn fleet_task_ends_revision(&self) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        self.run("reading the task ends' revision", move |conn, failed| {
            tasks::ends_revision(conn, failed)
        })
    }

    fn live_fleet_tasks_of(
        &self,
        owner: NodeName,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<String>, ServerStoreError>> {
        self.run("listing a node's live fleet tasks", move |conn, failed| {
            tasks::live_of(conn, failed, &owner, limit)
        })
    }

    fn fleet_tasks_of(&self, owner: NodeName) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        self.run("counting a node's fleet tasks", move |conn, failed| {
            tasks::count_of(conn, failed, &owner)
        })
    }

    fn prune_fleet_tasks(
        &self,
        before: SystemTime,
    ) -> BoxFuture<'_, Result<u64, ServerStoreError>> {
        self.run("pruning fleet tasks", move |conn, failed| {
            tasks::prune(conn, failed, store::query_millis(before))
        })
    }
}

#[cfg(test)]
mod tests;
