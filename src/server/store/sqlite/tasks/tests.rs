//! The task index's rows as SQLite keeps them: a damaged row (a partly
//! recorded end, a value outside its bounds, a missing counter) reads as
//! `Corrupt` from every method that reads it, never a panic or a wrong
//! task; and the schema refuses a partly recorded end outright. The
//! contract itself, against both backends, is
//! `tests/integration/fleet_store_tasks.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::server::scope::NodeName;
use crate::server::store::sqlite::SqliteStore;
use crate::server::store::{FleetTaskEndRequest, NewFleetTask, ServerStore as _, ServerStoreError};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

/// A store with two tasks, `t-live` and `t-ended` (ended at revision 1),
/// and a raw connection to its file.
async fn store_with_tasks(dir: &tempfile::TempDir) -> (SqliteStore, Connection) {
    let path = dir.path().join("server.db");
    let store = SqliteStore::open(&path).expect("the store opens");
    for txn in ["t-live", "t-ended"] {
        store
            .begin_fleet_task(NewFleetTask {
                txn: txn.into(),
                owner_node: NodeName::new("node-a").expect("a valid name"),
                spiffe_id: "spiffe://fleet.test/agent".into(),
                began_at: at(1),
                deadline: at(1000),
            })
            .await
            .expect("recorded");
    }
    let ended = store
        .end_fleet_tasks(
            vec![FleetTaskEndRequest {
                txn: "t-ended".into(),
                reason: "completed".into(),
                at: at(2),
            }],
            None,
        )
        .await
        .expect("ended");
    assert!(ended[0].is_some());
    let raw = Connection::open(&path).expect("a raw connection");
    (store, raw)
}

fn is_corrupt<T: std::fmt::Debug>(outcome: Result<T, ServerStoreError>, table: &str) -> bool {
    matches!(outcome, Err(ServerStoreError::Corrupt { table: found, .. }) if found == table)
}

#[tokio::test]
async fn a_damaged_task_row_reads_as_corrupt() {
    // Each damage, and whether the row still has an end revision after 0
    // (so the ends' read meets it too).
    let cases = [
        (
            "UPDATE fleet_tasks SET end_revision = NULL WHERE txn = 't-ended'",
            false,
        ),
        (
            "UPDATE fleet_tasks SET ended_at_ms = 5, ended_reason = NULL, end_revision = 9 \
             WHERE txn = 't-ended'",
            true,
        ),
        (
            "UPDATE fleet_tasks SET end_revision = 0 WHERE txn = 't-ended'",
            false,
        ),
        (
            "UPDATE fleet_tasks SET deadline_ms = -1 WHERE txn = 't-ended'",
            true,
        ),
        (
            "UPDATE fleet_tasks SET owner_node = 'Not A Name' WHERE txn = 't-ended'",
            true,
        ),
        (
            "UPDATE fleet_tasks SET ended_reason = printf('%.65c', 'r') WHERE txn = 't-ended'",
            true,
        ),
        (
            "UPDATE fleet_tasks SET txn = 'tab\tbed' WHERE txn = 't-ended'",
            true,
        ),
    ];
    for (damage, in_ends) in cases {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, raw) = store_with_tasks(&dir).await;
        // Damage, as a disk or another program would make it: past the
        // schema's own checks.
        raw.execute_batch("PRAGMA ignore_check_constraints = ON")
            .expect("checks off");
        assert_eq!(raw.execute(damage, []).expect(damage), 1, "{damage}");
        assert!(
            is_corrupt(store.fleet_tasks(true, 10).await, "fleet_tasks"),
            "{damage}"
        );
        let ends = store.fleet_task_ends(0, 10).await;
        if in_ends {
            assert!(is_corrupt(ends, "fleet_tasks"), "{damage}");
        } else {
            assert_eq!(ends.expect("read").len(), 0, "{damage}");
        }
        // The live task still reads.
        assert!(
            store
                .fleet_task("t-live".into())
                .await
                .expect("read")
                .is_some()
        );
    }
}

#[tokio::test]
async fn a_missing_counter_reads_as_corrupt_and_ends_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (store, raw) = store_with_tasks(&dir).await;
    raw.execute("DELETE FROM fleet_task_end_revision", [])
        .expect("damaged");
    assert!(is_corrupt(
        store.fleet_task_ends_revision().await,
        "fleet_task_end_revision"
    ));
    let end = FleetTaskEndRequest {
        txn: "t-live".into(),
        reason: "completed".into(),
        at: at(3),
    };
    assert!(is_corrupt(
        store.end_fleet_tasks(vec![end], None).await,
        "fleet_task_end_revision"
    ));
    let live = store.fleet_task("t-live".into()).await.expect("read");
    assert_eq!(live.and_then(|t| t.ended), None, "still live");
}

#[tokio::test]
async fn the_schema_refuses_a_partly_recorded_end() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (_store, raw) = store_with_tasks(&dir).await;
    for partial in [
        "UPDATE fleet_tasks SET ended_at_ms = 5 WHERE txn = 't-live'",
        "UPDATE fleet_tasks SET end_revision = NULL WHERE txn = 't-ended'",
        "UPDATE fleet_tasks SET ended_reason = NULL WHERE txn = 't-ended'",
    ] {
        assert!(raw.execute(partial, []).is_err(), "{partial}");
    }
    assert!(
        raw.execute("UPDATE fleet_task_end_revision SET id = 2", [])
            .is_err(),
        "one counter row"
    );
}
