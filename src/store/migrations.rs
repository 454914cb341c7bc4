//! Schema migrations: an append-only list of SQL steps. Step N takes the
//! database from `PRAGMA user_version` N-1 to N, in one transaction with the
//! version bump, so a crash leaves the database at N-1 or N, never between.
//!
//! A shipped step is never edited (a test pins each one's SHA-256): a
//! database at version N must mean the same schema on every build.
//!
//! - v1: `entries`, `issued_x509`.
//! - v2: `entries.audiences`, `entries.process_bound`, `tasks`, `revoked_x509`.

use rusqlite::{Connection, TransactionBehavior};

/// `PRAGMA application_id` of a tether database ("teth"), set by step 1.
pub(super) const APPLICATION_ID: i64 = 0x7465_7468;

/// Every step, oldest first; index + 1 is the version it produces.
pub(super) const STEPS: &[&str] = &[
    include_str!("migrations/v1.sql"),
    include_str!("migrations/v2.sql"),
];

/// The schema version this build writes and understands.
#[cfg(test)]
pub(super) const LATEST: u32 = version_of(STEPS);

/// The schema version `steps` produce, and the newest a build that knows
/// only them understands.
// Step lists are STEPS or a prefix of it, a short literal list: the length
// fits u32.
pub(super) const fn version_of(steps: &[&str]) -> u32 {
    steps.len() as u32
}

/// The database's `user_version`: 0 for a fresh file. Signed, because SQLite
/// stores it signed and a foreign file may hold anything.
pub(super) fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Applies the steps beyond the database's version; returns the version
/// reached. The caller has already refused a version newer than `steps`.
pub(super) fn apply(conn: &mut Connection, steps: &[&str]) -> rusqlite::Result<i64> {
    let mut current = user_version(conn)?;
    for (version, sql) in (1i64..).zip(steps) {
        if version <= current {
            continue;
        }
        // Immediate: take the write lock before re-reading the version, so
        // another process opening the same file cannot apply a step twice.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        current = user_version(&tx)?;
        if version <= current {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        current = version;
    }
    Ok(current)
}
