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

#[cfg(test)]
mod tests {
    use super::*;

    fn table_names(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .unwrap();
        stmt.query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn shipped_steps_are_never_edited() {
        // Appending a step adds a line here; changing a line means a
        // released database would no longer match its version number.
        let pinned = [
            "267135485dbf667e8ca6c2be43aa625b86776c581fccc30455b5a8e79623d9c9",
            "7ab823e6b18a0017d8fe4e1cddc909e464855a6c23b7680b8eab5293820de21d",
        ];
        assert_eq!(STEPS.len(), pinned.len(), "pin the new step's SHA-256");
        for (step, want) in STEPS.iter().zip(pinned) {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, step.as_bytes());
            let got: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, want, "a shipped migration step was edited");
        }
    }

    #[test]
    fn an_appended_step_upgrades_and_a_failing_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
        assert_eq!(apply(&mut conn, &STEPS[..1]).unwrap(), 1);
        assert_eq!(table_names(&conn), ["entries", "issued_x509"]);
        let app_id: i64 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(app_id, APPLICATION_ID);

        assert_eq!(apply(&mut conn, STEPS).unwrap(), i64::from(LATEST));
        // Re-applying is a no-op, not a "table exists" error.
        assert_eq!(apply(&mut conn, STEPS).unwrap(), i64::from(LATEST));
        assert_eq!(
            table_names(&conn),
            ["entries", "issued_x509", "revoked_x509", "tasks"]
        );

        let next = "CREATE TABLE revocations (jti TEXT NOT NULL PRIMARY KEY) STRICT;";
        let broken = "CREATE TABLE later (x TEXT) STRICT; NOT SQL AT ALL;";
        let with_next: Vec<&str> = STEPS.iter().copied().chain([next]).collect();
        let with_broken: Vec<&str> = with_next.iter().copied().chain([broken]).collect();
        assert_eq!(apply(&mut conn, &with_next).unwrap(), i64::from(LATEST) + 1);
        assert!(apply(&mut conn, &with_broken).is_err());
        assert_eq!(user_version(&conn).unwrap(), i64::from(LATEST) + 1);
        assert_eq!(
            table_names(&conn),
            [
                "entries",
                "issued_x509",
                "revocations",
                "revoked_x509",
                "tasks"
            ]
        );
    }
}
