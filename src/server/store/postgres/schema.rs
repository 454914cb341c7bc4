//! The server's PostgreSQL schema: append-only steps recorded in
//! `tether_schema(version)`, one row per applied step.
//!
//! Migrating runs in one transaction that first takes a transaction-level
//! advisory lock ([`LOCK_KEY`]), so replicas starting at once apply each
//! step once, one after the other: the second waits, then sees the steps
//! the first committed. A database whose recorded version is newer than
//! this build's steps is refused untouched (the transaction rolls back).

use std::time::SystemTime;

use tokio_postgres::Client;

use super::PostgresError;
use crate::store;

/// Every schema step, oldest first; index + 1 is the version it produces.
/// A shipped step is never edited (a test pins each one's SHA-256).
///
/// - v1: `join_tokens`, `nodes`, `entries`, `meta` (`entries_revision`),
///   `bundle_keys`.
/// - v2: `fleet_tasks` (the fleet's task index) and
///   `fleet_task_end_revision` (the revision of its ends).
pub(super) const STEPS: &[&str] = &[
    include_str!("migrations/v1.sql"),
    include_str!("migrations/v2.sql"),
];

/// The advisory lock migrations hold ("tsrv", as the SQLite file's
/// `application_id`).
pub(super) const LOCK_KEY: i64 = 0x7473_7276;

const CREATE_VERSIONS: &str = "CREATE TABLE IF NOT EXISTS tether_schema (\
     version INTEGER NOT NULL PRIMARY KEY, applied_at_ms BIGINT NOT NULL)";

const SELECT_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM tether_schema";

const INSERT_VERSION: &str = "INSERT INTO tether_schema (version, applied_at_ms) VALUES ($1, $2)";

/// Applies the steps of `steps` the database has not applied yet, under
/// the advisory lock; refuses a newer schema.
pub(super) async fn migrate(client: &mut Client, steps: &[&str]) -> Result<(), PostgresError> {
    let known = i32::try_from(steps.len()).unwrap_or(i32::MAX);
    let tx = client.transaction().await.map_err(PostgresError::Migrate)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(PostgresError::Migrate)?;
    tx.batch_execute(CREATE_VERSIONS)
        .await
        .map_err(PostgresError::Migrate)?;
    let found: i32 = tx
        .query_one(SELECT_VERSION, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(PostgresError::Migrate)?;
    if found > known {
        // Dropping `tx` rolls back: nothing was changed.
        return Err(PostgresError::NewerSchema { found, known });
    }
    let now = store::query_millis(SystemTime::now());
    for (version, step) in (1..).zip(steps).skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(step)
            .await
            .map_err(|e| PostgresError::Step { version, source: e })?;
        tx.execute(INSERT_VERSION, &[&version, &now])
            .await
            .map_err(PostgresError::Migrate)?;
        tracing::info!(version, "server store schema step applied");
    }
    tx.commit().await.map_err(PostgresError::Migrate)
}
