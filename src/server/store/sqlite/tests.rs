//! The SQLite backend, method by method: join tokens (consumed once, also
//! under contention; expired ones returned unmarked; pruning), nodes,
//! entries and their revision; then opening: reopening keeps everything,
//! owner-only files, untrusted, damaged, foreign or newer databases
//! refused, damaged rows read as `Corrupt`, and the statements' parameter
//! numbering that lets PostgreSQL share them.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::params;

use super::*;
use crate::registration::EntrySpec;
use crate::store::StoreError;
use crate::trusted_fs::TrustedFsError;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn node(name: &str) -> NodeName {
    NodeName::new(name).expect("a valid node name")
}

fn hash(n: u8) -> TokenHash {
    TokenHash::from_bytes([n; 32])
}

fn admission(name: &str, expires_at: u64) -> Admission {
    Admission {
        node: node(name),
        expires_at: at(expires_at),
        used_at: None,
    }
}

fn node_row(name: &str, serial: &str) -> NodeRow {
    NodeRow {
        name: node(name),
        attestation: "join_token".into(),
        attested_at: at(10),
        svid_serial: serial.into(),
        svid_expires_at: at(3_600_000),
        evicted: false,
    }
}

fn entry(id: &str, nodes: &[&str]) -> EntryRecord {
    EntryRecord {
        id: id.into(),
        spec: EntrySpec {
            spiffe_id: format!("spiffe://fleet.test/{id}"),
            selectors: vec!["unix:uid:1000".into(), "k8s:ns:default".into()],
            hint: Some("primary".into()),
            dns_names: vec!["a.fleet.test".into()],
            x509_svid_ttl: Some(Duration::from_secs(600)),
            jwt_svid_ttl: None,
            federates_with: vec![],
            audiences: vec!["https://mcp.jira.internal".into()],
            process_bound: true,
        },
        nodes: nodes.iter().map(|n| node(n)).collect(),
        revision: 1,
        created_at: at(20),
        updated_at: at(30),
    }
}

struct Db {
    dir: tempfile::TempDir,
}

impl Db {
    fn new() -> Db {
        Db {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("server.db")
    }

    fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.path()).expect("the store opens")
    }

    /// The reason `open` refused, as the agent's store reported it.
    fn refusal(&self) -> StoreError {
        match SqliteStore::open(&self.path()) {
            Err(ServerStoreError::Open(source)) => *source
                .downcast::<StoreError>()
                .expect("an Open error carries the StoreError"),
            other => panic!("expected Open, got {other:?}"),
        }
    }

    /// A plain connection, as another program (or damage) would write.
    fn raw(&self) -> Connection {
        Connection::open(self.path()).expect("a raw connection")
    }
}

fn ids(snapshot: &EntriesSnapshot) -> Vec<&str> {
    snapshot.entries.iter().map(|e| e.id.as_str()).collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").mode() & 0o7777
}

// === join tokens ===

#[tokio::test]
async fn a_join_token_is_consumed_once() {
    let db = Db::new();
    let store = db.open();
    store
        .add_join_token(hash(1), admission("node-a", 1000))
        .await
        .expect("added");

    let first = store
        .consume_join_token(hash(1), at(100))
        .await
        .expect("consumed");
    assert_eq!(first, Some(admission("node-a", 1000)), "unused, as it was");
    let second = store
        .consume_join_token(hash(1), at(200))
        .await
        .expect("read");
    assert_eq!(
        second,
        Some(Admission {
            used_at: Some(at(100)),
            ..admission("node-a", 1000)
        }),
        "used, at the first consume's time"
    );
    assert_eq!(
        store
            .consume_join_token(hash(2), at(100))
            .await
            .expect("read"),
        None,
        "no such token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_consumers_exactly_one_gets_the_token_unused() {
    let db = Db::new();
    let store = db.open();
    store
        .add_join_token(hash(7), admission("node-a", 1000))
        .await
        .expect("added");

    let consumers: Vec<_> = (0..8u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.consume_join_token(hash(7), at(100 + i)).await })
        })
        .collect();
    let mut unused = 0;
    for consumer in consumers {
        let found = consumer
            .await
            .expect("the consumer ran")
            .expect("consumed")
            .expect("the token exists");
        if found.used_at.is_none() {
            unused += 1;
        }
    }
    assert_eq!(unused, 1);
}

#[tokio::test]
async fn an_expired_token_is_returned_unmarked() {
    let db = Db::new();
    let store = db.open();
    store
        .add_join_token(hash(1), admission("node-a", 1000))
        .await
        .expect("added");
    // At its expiry it is expired, as `Admission::admit` says.
    for now in [1000, 5000, 1000] {
        let found = store
            .consume_join_token(hash(1), at(now))
            .await
            .expect("read")
            .expect("the token exists");
        assert_eq!(found, admission("node-a", 1000), "not marked used");
        assert!(matches!(
            found.admit(at(now)),
            Err(crate::server::join_token::TokenRefusal::Expired)
        ));
    }
}

#[tokio::test]
async fn pruning_forgets_tokens_that_expired_before_the_bound() {
    let db = Db::new();
    let store = db.open();
    for (n, expires) in [(1, 100), (2, 200), (3, 300)] {
        store
            .add_join_token(hash(n), admission("node-a", expires))
            .await
            .expect("added");
    }
    store
        .consume_join_token(hash(1), at(50))
        .await
        .expect("consumed");

    assert_eq!(store.prune_join_tokens(at(200)).await.expect("pruned"), 1);
    assert_eq!(store.prune_join_tokens(at(200)).await.expect("pruned"), 0);
    for (n, kept) in [(1, false), (2, true), (3, true)] {
        let found = store
            .consume_join_token(hash(n), at(1000))
            .await
            .expect("read");
        assert_eq!(found.is_some(), kept, "token {n}");
    }
    assert_eq!(
        store.prune_join_tokens(at(10_000)).await.expect("pruned"),
        2
    );
}

#[tokio::test]
async fn a_token_the_store_could_not_read_back_is_refused() {
    let db = Db::new();
    let store = db.open();
    let before_1970 = Admission {
        expires_at: UNIX_EPOCH - Duration::from_secs(1),
        ..admission("node-a", 0)
    };
    let err = store
        .add_join_token(hash(1), before_1970)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ServerStoreError::Unstorable {
                table: "join_tokens",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store
            .consume_join_token(hash(1), at(0))
            .await
            .expect("read"),
        None
    );
}

// === nodes ===

#[tokio::test]
async fn nodes_are_put_replaced_listed_and_evicted() {
    let db = Db::new();
    let store = db.open();
    assert_eq!(store.node(node("node-a")).await.expect("read"), None);
    store.put_node(node_row("node-b", "0b")).await.expect("put");
    store.put_node(node_row("node-a", "0a")).await.expect("put");
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(node_row("node-a", "0a"))
    );
    let names: Vec<String> = store
        .nodes()
        .await
        .expect("listed")
        .iter()
        .map(|n| n.name.to_string())
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);

    let evicted = store
        .evict_node(node("node-a"))
        .await
        .expect("evicted")
        .expect("the node exists");
    assert!(evicted.evicted);
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(evicted)
    );
    assert_eq!(
        store.evict_node(node("node-c")).await.expect("read"),
        None,
        "no such node"
    );

    // Attesting again replaces the row as given: no longer evicted.
    let renewed = NodeRow {
        attestation: "k8s_psat".into(),
        svid_expires_at: at(7_200_000),
        ..node_row("node-a", "0c")
    };
    store.put_node(renewed.clone()).await.expect("put");
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(renewed)
    );
    assert_eq!(store.nodes().await.expect("listed").len(), 2);
}

#[tokio::test]
async fn a_renewal_is_recorded_only_while_the_node_is_as_it_was_read() {
    // Review finding: RenewNode wrote back the whole row it had read, so an
    // eviction (or a new admission) landing during a renewal was undone.
    let db = Db::new();
    let store = db.open();
    assert!(
        !store
            .renew_node(node_row("node-a", "0b"))
            .await
            .expect("renew"),
        "no such node"
    );
    store.put_node(node_row("node-a", "0a")).await.expect("put");
    let renewed = NodeRow {
        svid_expires_at: at(7_200_000),
        ..node_row("node-a", "0b")
    };
    assert!(store.renew_node(renewed.clone()).await.expect("renew"));
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(renewed.clone())
    );

    // Attested again since: the renewal of the earlier admission is refused.
    let again = NodeRow {
        attested_at: at(20),
        ..node_row("node-a", "0c")
    };
    store.put_node(again.clone()).await.expect("put");
    assert!(!store.renew_node(renewed.clone()).await.expect("renew"));
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(again.clone())
    );

    // Evicted: refused, and the node stays evicted.
    store.evict_node(node("node-a")).await.expect("evict");
    assert!(
        !store
            .renew_node(NodeRow {
                svid_serial: "0d".into(),
                ..again.clone()
            })
            .await
            .expect("renew")
    );
    let row = store
        .node(node("node-a"))
        .await
        .expect("read")
        .expect("the node exists");
    assert!(row.evicted);
    assert_eq!(row.svid_serial, "0c");
}

#[tokio::test]
async fn a_node_the_store_could_not_read_back_is_refused() {
    let db = Db::new();
    let store = db.open();
    let long = NodeRow {
        attestation: "x".repeat(rows::MAX_ATTESTATION_LEN + 1),
        ..node_row("node-a", "0a")
    };
    let err = store.put_node(long).await.expect_err("refused");
    assert!(
        matches!(err, ServerStoreError::Unstorable { table: "nodes", .. }),
        "{err}"
    );
    let far = NodeRow {
        svid_expires_at: UNIX_EPOCH + Duration::from_secs(300_000_000_000),
        ..node_row("node-a", "0a")
    };
    assert!(matches!(
        store.put_node(far).await,
        Err(ServerStoreError::Unstorable { .. })
    ));
    assert!(store.nodes().await.expect("listed").is_empty());
}

// === entries ===

#[tokio::test]
async fn the_revision_grows_with_each_entry_change_and_only_then() {
    let db = Db::new();
    let store = db.open();
    assert_eq!(store.revision().await.expect("read"), 0);
    assert_eq!(
        store.entries().await.expect("read"),
        EntriesSnapshot::default()
    );

    assert_eq!(
        store
            .create_entry(entry("web", &["node-a"]))
            .await
            .expect("created"),
        1
    );
    assert_eq!(
        store
            .create_entry(entry("api", &["node-b", "node-a"]))
            .await
            .expect("created"),
        2
    );
    // A failed create changes nothing, the revision included.
    let mut other = entry("web", &[]);
    other.spec.spiffe_id = "spiffe://fleet.test/other".into();
    match store.create_entry(other).await {
        Err(ServerStoreError::Duplicate(id)) => assert_eq!(id, "web"),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(store.revision().await.expect("read"), 2);

    let snapshot = store.entries().await.expect("read");
    assert_eq!(snapshot.revision, 2);
    assert_eq!(ids(&snapshot), ["api", "web"], "by id");
    assert_eq!(snapshot.entries[1], entry("web", &["node-a"]));
    assert_eq!(
        snapshot.entries[0].nodes,
        BTreeSet::from([node("node-a"), node("node-b")])
    );

    assert!(!store.delete_entry("nope".into()).await.expect("deleted"));
    assert_eq!(store.revision().await.expect("read"), 2, "nothing deleted");
    assert!(store.delete_entry("web".into()).await.expect("deleted"));
    assert_eq!(store.revision().await.expect("read"), 3);
    assert!(!store.delete_entry("web".into()).await.expect("deleted"));

    let snapshot = store.entries().await.expect("read");
    assert_eq!((snapshot.revision, ids(&snapshot)), (3, vec!["api"]));
    // Recreating a deleted id is a new change, never a step back.
    assert_eq!(
        store
            .create_entry(entry("web", &[]))
            .await
            .expect("created"),
        4
    );
}

#[tokio::test]
async fn an_entry_the_store_could_not_read_back_is_refused() {
    let db = Db::new();
    let store = db.open();
    let mut big = entry("big", &[]);
    big.spec.dns_names = vec!["a".repeat(rows::MAX_SPEC_JSON_LEN)];
    let err = store.create_entry(big).await.expect_err("refused");
    assert!(
        matches!(
            err,
            ServerStoreError::Unstorable {
                table: "entries",
                ..
            }
        ),
        "{err}"
    );
    let mut long_id = entry("x", &[]);
    long_id.id = "x".repeat(rows::MAX_ENTRY_ID_LEN + 1);
    assert!(matches!(
        store.create_entry(long_id).await,
        Err(ServerStoreError::Unstorable { .. })
    ));
    assert_eq!(store.revision().await.expect("read"), 0);
}

// === opening ===

#[tokio::test]
async fn everything_survives_a_reopen() {
    let db = Db::new();
    {
        let store = db.open();
        store
            .add_join_token(hash(1), admission("node-a", 1000))
            .await
            .expect("added");
        store
            .add_join_token(hash(2), admission("node-b", 1000))
            .await
            .expect("added");
        store
            .consume_join_token(hash(1), at(10))
            .await
            .expect("consumed");
        store.put_node(node_row("node-a", "0a")).await.expect("put");
        store.evict_node(node("node-a")).await.expect("evicted");
        store
            .create_entry(entry("web", &["node-a"]))
            .await
            .expect("created");
        store
            .create_entry(entry("api", &[]))
            .await
            .expect("created");
        store.delete_entry("api".into()).await.expect("deleted");
    }
    for _ in 0..2 {
        let store = db.open();
        assert_eq!(store.path(), db.path());
        assert_eq!(
            store
                .consume_join_token(hash(1), at(20))
                .await
                .expect("read")
                .and_then(|a| a.used_at),
            Some(at(10))
        );
        let mut evicted = node_row("node-a", "0a");
        evicted.evicted = true;
        assert_eq!(store.nodes().await.expect("listed"), [evicted]);
        let snapshot = store.entries().await.expect("read");
        assert_eq!(snapshot.revision, 3);
        assert_eq!(snapshot.entries, [entry("web", &["node-a"])]);
    }
    // Token 2 was only ever read: still unused after the reopens.
    let store = db.open();
    assert_eq!(
        store
            .consume_join_token(hash(2), at(30))
            .await
            .expect("consumed")
            .map(|a| a.used_at),
        Some(None)
    );
}

#[tokio::test]
async fn the_files_are_owner_only() {
    let db = Db::new();
    let store = db.open();
    store.put_node(node_row("node-a", "0a")).await.expect("put");
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", db.path().display()));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[test]
fn a_database_others_may_read_or_write_is_refused() {
    let db = Db::new();
    drop(db.open());
    fs::set_permissions(db.path(), fs::Permissions::from_mode(0o666)).expect("chmod");
    assert!(
        matches!(
            db.refusal(),
            StoreError::Untrusted(TrustedFsError::Mode { mode: 0o666, .. })
        ),
        "world-writable"
    );
    fs::set_permissions(db.path(), fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(
        matches!(db.refusal(), StoreError::Permissive { mode: 0o644, .. }),
        "world-readable"
    );
    assert_eq!(mode(&db.path()), 0o644, "refused, not repaired");
}

#[test]
#[ignore = "needs root (gives the database to another uid): scripts/test runs it"]
fn a_database_another_user_owns_is_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "prerequisite missing: giving a file to another uid needs root"
    );
    let db = Db::new();
    drop(db.open());
    nix::unistd::chown(
        &db.path(),
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .expect("chown");
    assert!(matches!(
        db.refusal(),
        StoreError::Untrusted(TrustedFsError::Owner { owner: 65534, .. })
    ));
}

#[test]
fn a_newer_schema_is_refused_untouched() {
    let db = Db::new();
    drop(db.open());
    let newer = i64::try_from(schema::STEPS.len()).expect("few steps") + 1;
    db.raw()
        .pragma_update(None, "user_version", newer)
        .expect("set the version");
    let before = fs::read(db.path()).expect("read");
    match db.refusal() {
        StoreError::NewerSchema { found, known, .. } => {
            assert_eq!(i64::from(found), newer);
            assert_eq!(known as usize, schema::STEPS.len());
        }
        other => panic!("expected NewerSchema, got {other}"),
    }
    assert_eq!(fs::read(db.path()).expect("read"), before);
}

#[test]
fn the_agents_database_is_not_the_servers() {
    let db = Db::new();
    let agent = store::Store::open(db.dir.path()).expect("the agent's store");
    drop(agent);
    let agents = db.dir.path().join(store::DB_FILE);
    let err = match SqliteStore::open(&agents) {
        Err(ServerStoreError::Open(source)) => source.to_string(),
        other => panic!("expected Open, got {other:?}"),
    };
    assert!(err.contains("application_id"), "{err}");
}

#[test]
fn a_damaged_file_is_refused() {
    let db = Db::new();
    fs::write(db.path(), vec![0x5a; 8192]).expect("write");
    fs::set_permissions(db.path(), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(matches!(db.refusal(), StoreError::Corrupt { .. }));
}

/// Each damage, written past the store, and the table its read names.
#[tokio::test]
async fn a_damaged_row_reads_as_corrupt() {
    let oversized = format!("\"{}\"", "x".repeat(rows::MAX_SPEC_JSON_LEN));
    let cases: [(&str, &str, Vec<rusqlite::types::Value>); 9] = [
        ("UPDATE nodes SET name = 'Not A Name'", "nodes", vec![]),
        ("UPDATE nodes SET attested_at_ms = -5", "nodes", vec![]),
        ("UPDATE nodes SET evicted = 2", "nodes", vec![]),
        (
            "UPDATE nodes SET svid_serial = ?1",
            "nodes",
            vec!["a".repeat(rows::MAX_SERIAL_LEN + 1).into()],
        ),
        (
            "UPDATE entries SET spec_json = '{\"spiffe_id\": 3}'",
            "entries",
            vec![],
        ),
        (
            "UPDATE entries SET spec_json = ?1",
            "entries",
            vec![oversized.into()],
        ),
        (
            "UPDATE entries SET nodes_json = '[\"UPPER\"]'",
            "entries",
            vec![],
        ),
        ("UPDATE entries SET revision = 0", "entries", vec![]),
        ("DELETE FROM meta", "meta", vec![]),
    ];
    for (damage, table, params) in cases {
        let db = Db::new();
        {
            let store = db.open();
            store.put_node(node_row("node-a", "0a")).await.expect("put");
            store
                .create_entry(entry("web", &["node-a"]))
                .await
                .expect("created");
        }
        db.raw()
            .execute(damage, rusqlite::params_from_iter(params))
            .expect("damaged");
        let store = db.open();
        let err = match table {
            "nodes" => store.nodes().await.map(drop),
            "entries" => store.entries().await.map(drop),
            _ => store.revision().await.map(drop),
        }
        .expect_err(damage);
        match err {
            ServerStoreError::Corrupt { table: found, .. } => assert_eq!(found, table, "{damage}"),
            other => panic!("{damage}: expected Corrupt, got {other}"),
        }
    }
}

#[tokio::test]
async fn a_damaged_token_reads_as_corrupt() {
    let db = Db::new();
    let store = db.open();
    store
        .add_join_token(hash(1), admission("node-a", 1000))
        .await
        .expect("added");
    store
        .add_join_token(hash(2), admission("node-a", 1000))
        .await
        .expect("added");
    db.raw()
        .execute_batch(
            "UPDATE join_tokens SET node = '-bad-'; \
             UPDATE join_tokens SET used_at_ms = -1 WHERE hash = x'0202020202020202020202020202020202020202020202020202020202020202';",
        )
        .expect("damaged");
    for (n, now) in [(1, 10), (2, 5000)] {
        let found = store.consume_join_token(hash(n), at(now)).await;
        assert!(
            matches!(
                found,
                Err(ServerStoreError::Corrupt {
                    table: "join_tokens",
                    ..
                })
            ),
            "token {n}: {found:?}"
        );
    }
}

// === schema and statements ===

#[test]
fn shipped_steps_are_never_edited() {
    // Appending a step adds a line here; changing a line means a released
    // database would no longer match its version number.
    let pinned = [
        "6690fc4b89021c2f85418a46c49cd95d46f3cd371b6fea1765b26103ba9da292",
        "4caf18ae2a8d29474e2070182bc88f7986c4b56d91416d04813caa3bafebb723",
        "78ec2a948057a58bc44af37b097ad542130e6c699cba36daae8cd537946fcfc1",
    ];
    assert_eq!(
        schema::STEPS.len(),
        pinned.len(),
        "pin the new step's SHA-256"
    );
    for (step, want) in schema::STEPS.iter().zip(pinned) {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, step.as_bytes());
        let got: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want, "a shipped migration step was edited");
    }
}

/// SQLite numbers `$n` parameters by first appearance: each statement's
/// n-th parameter must be `$n`, or positional binding would differ from
/// PostgreSQL's.
#[test]
fn statement_parameters_are_numbered_as_postgresql_numbers_them() {
    let db = Db::new();
    let store = db.open();
    let conn = store.shared.conn.lock().expect("the connection");
    for statement in sql::ALL {
        let stmt = conn.prepare(statement).expect(statement);
        for i in 1..=stmt.parameter_count() {
            assert_eq!(
                stmt.parameter_name(i),
                Some(format!("${i}").as_str()),
                "{statement}"
            );
        }
    }
}

#[test]
fn a_parameter_used_twice_is_bound_once() {
    // The consuming update compares with the `now` it writes ($1 twice).
    let db = Db::new();
    let store = db.open();
    let conn = store.shared.conn.lock().expect("the connection");
    conn.execute(
        sql::INSERT_JOIN_TOKEN,
        params![&[9u8; 32][..], "node-a", 1000i64],
    )
    .expect("inserted");
    let consume = |now: i64| {
        conn.query_row(
            sql::CONSUME_JOIN_TOKEN,
            params![now, &[9u8; 32][..]],
            |row| row.get::<_, String>(0),
        )
        .optional()
        .expect("ran")
    };
    assert_eq!(consume(1000), None, "expired at 1000");
    assert_eq!(consume(999).as_deref(), Some("node-a"));
    assert_eq!(consume(999), None, "used");
}
