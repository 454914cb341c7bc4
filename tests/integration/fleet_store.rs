//! The server's shared store (`tether::server::store`), one contract run
//! against both backends: SQLite in a temporary dir, and a real PostgreSQL
//! (`common::postgres`: Debian's binaries, a cluster of its own; needs
//! root). Every method; a join token consumed by 8 racing consumers across
//! two stores (two replicas) exactly once; the revision; the replicas'
//! bundles. PostgreSQL alone: a restart (calls fail Unavailable while it
//! is down, the same store works again once it is back), replicas
//! migrating at once, and a newer schema refused.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether::registration::EntrySpec;
use tether::server::join_token::{Admission, TokenHash};
use tether::server::scope::NodeName;
use tether::server::store::postgres::{PostgresError, PostgresStore};
use tether::server::store::sqlite::SqliteStore;
use tether::server::store::{EntryRecord, NodeRow, ServerStore, ServerStoreError};

use crate::common::eventually;
use crate::common::postgres::TestPostgres;

/// A time `ms` after a fixed instant of 2023.
pub(crate) fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

pub(crate) fn node(name: &str) -> NodeName {
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
            selectors: vec!["unix:uid:1000".into()],
            hint: Some("primary".into()),
            dns_names: vec!["a.fleet.test".into()],
            x509_svid_ttl: Some(Duration::from_secs(600)),
            audiences: vec!["https://mcp.jira.internal".into()],
            process_bound: true,
            ..EntrySpec::default()
        },
        nodes: nodes.iter().map(|n| node(n)).collect(),
        revision: 1,
        created_at: at(20),
        updated_at: at(30),
    }
}

// === the contract, for any backend ===

/// Two replicas' stores over one database.
pub(crate) type Replicas = (Arc<dyn ServerStore>, Arc<dyn ServerStore>);

async fn contract(replicas: Replicas) {
    join_tokens(&*replicas.0).await;
    nodes(&*replicas.0).await;
    entries_and_revision(&replicas).await;
    bundles(&replicas).await;
    unstorable_rows(&*replicas.0).await;
    racing_consumers(replicas).await;
}

async fn join_tokens(store: &dyn ServerStore) {
    store
        .add_join_token(hash(1), admission("node-a", 1000))
        .await
        .expect("added");
    let first = store.consume_join_token(hash(1), at(100)).await;
    assert_eq!(first.expect("consumed"), Some(admission("node-a", 1000)));
    let second = store.consume_join_token(hash(1), at(200)).await;
    assert_eq!(
        second.expect("read"),
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

    // Expired: returned unmarked, however often.
    store
        .add_join_token(hash(3), admission("node-b", 500))
        .await
        .expect("added");
    for now in [500, 900] {
        let found = store.consume_join_token(hash(3), at(now)).await;
        assert_eq!(found.expect("read"), Some(admission("node-b", 500)));
    }

    // Pruning forgets what expired before the bound, used or not.
    assert_eq!(store.prune_join_tokens(at(600)).await.expect("pruned"), 1);
    assert_eq!(store.prune_join_tokens(at(600)).await.expect("pruned"), 0);
    assert!(
        store
            .consume_join_token(hash(3), at(0))
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(store.prune_join_tokens(at(5000)).await.expect("pruned"), 1);
}

async fn nodes(store: &dyn ServerStore) {
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
    assert_eq!(names, ["node-a", "node-b"], "by name");

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
    assert_eq!(store.evict_node(node("node-c")).await.expect("read"), None);

    // Attesting again replaces the row: no longer evicted.
    let renewed = NodeRow {
        attestation: "k8s_psat".into(),
        ..node_row("node-a", "0c")
    };
    store.put_node(renewed.clone()).await.expect("put");
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(renewed.clone())
    );

    // A renewal is recorded only while the node is as the renewal read it:
    // never over an eviction, nor over a newer admission.
    let next = NodeRow {
        svid_serial: "0d".into(),
        ..renewed.clone()
    };
    assert!(store.renew_node(next.clone()).await.expect("renew"));
    assert_eq!(
        store.node(node("node-a")).await.expect("read"),
        Some(next.clone())
    );
    let stale = NodeRow {
        attested_at: at(5),
        svid_serial: "0e".into(),
        ..next.clone()
    };
    assert!(!store.renew_node(stale).await.expect("renew"));
    store.evict_node(node("node-a")).await.expect("evict");
    assert!(
        !store
            .renew_node(NodeRow {
                svid_serial: "0f".into(),
                ..next.clone()
            })
            .await
            .expect("renew")
    );
    let row = store.node(node("node-a")).await.expect("read");
    assert_eq!(
        row,
        Some(NodeRow {
            evicted: true,
            ..next
        }),
        "still evicted, with the last recorded SVID"
    );
    assert!(
        !store
            .renew_node(node_row("node-z", "01"))
            .await
            .expect("renew"),
        "no such node"
    );
}

async fn entries_and_revision((a, b): &Replicas) {
    assert_eq!(a.revision().await.expect("read"), 0);
    assert_eq!(
        a.create_entry(entry("web", &["node-a"]))
            .await
            .expect("created"),
        1
    );
    // The other replica's write: the revision goes on from there.
    assert_eq!(
        b.create_entry(entry("api", &["node-b", "node-a"]))
            .await
            .expect("created"),
        2
    );
    match b.create_entry(entry("web", &[])).await {
        Err(ServerStoreError::Duplicate(id)) => assert_eq!(id, "web"),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(
        a.revision().await.expect("read"),
        2,
        "a refused create bumps nothing"
    );

    let snapshot = a.entries().await.expect("read");
    assert_eq!(snapshot.revision, 2);
    let ids: Vec<&str> = snapshot.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["api", "web"], "by id");
    assert_eq!(snapshot.entries[1], entry("web", &["node-a"]));
    assert_eq!(
        snapshot.entries[0].nodes,
        BTreeSet::from([node("node-a"), node("node-b")])
    );

    assert!(!a.delete_entry("nope".into()).await.expect("deleted"));
    assert_eq!(b.revision().await.expect("read"), 2, "nothing deleted");
    assert!(a.delete_entry("web".into()).await.expect("deleted"));
    assert_eq!(b.revision().await.expect("read"), 3);
    assert_eq!(
        b.create_entry(entry("web", &[])).await.expect("created"),
        4,
        "recreating is a new change, never a step back"
    );
    assert_eq!(b.entries().await.expect("read").entries.len(), 2);
}

async fn bundles((a, b): &Replicas) {
    assert!(a.bundles().await.expect("listed").is_empty());
    let doc = |n: u32| format!(r#"{{"keys":[],"spiffe_sequence":{n}}}"#);
    a.publish_bundle("replica-b".into(), doc(1), at(1))
        .await
        .expect("published");
    b.publish_bundle("replica-a".into(), doc(1), at(1))
        .await
        .expect("published");
    a.publish_bundle("replica-b".into(), doc(2), at(2))
        .await
        .expect("replaced");
    assert_eq!(
        b.bundles().await.expect("listed"),
        [
            ("replica-a".to_owned(), doc(1)),
            ("replica-b".to_owned(), doc(2))
        ],
        "every replica's latest, by id"
    );
    assert!(
        b.forget_bundle("replica-b".into())
            .await
            .expect("forgotten")
    );
    assert!(
        !b.forget_bundle("replica-b".into())
            .await
            .expect("forgotten")
    );
    assert_eq!(
        a.bundles().await.expect("listed"),
        [("replica-a".to_owned(), doc(1))]
    );

    for (id, json) in [
        ("", doc(1)),
        ("has space", doc(1)),
        ("x", "j".repeat(256 * 1024 + 1)),
    ] {
        let refused = a.publish_bundle(id.into(), json, at(3)).await;
        assert!(
            matches!(
                refused,
                Err(ServerStoreError::Unstorable {
                    table: "bundle_keys",
                    ..
                })
            ),
            "{id:?}: {refused:?}"
        );
    }
    assert_eq!(a.bundles().await.expect("listed").len(), 1);
}

async fn unstorable_rows(store: &dyn ServerStore) {
    let before_1970 = Admission {
        expires_at: UNIX_EPOCH - Duration::from_secs(1),
        ..admission("node-a", 0)
    };
    assert!(matches!(
        store.add_join_token(hash(9), before_1970).await,
        Err(ServerStoreError::Unstorable {
            table: "join_tokens",
            ..
        })
    ));
    let long = NodeRow {
        attestation: "x".repeat(65),
        ..node_row("node-z", "0a")
    };
    assert!(matches!(
        store.put_node(long).await,
        Err(ServerStoreError::Unstorable { table: "nodes", .. })
    ));
    let mut big = entry("big", &[]);
    big.spec.dns_names = vec!["a".repeat(64 * 1024)];
    let revision = store.revision().await.expect("read");
    assert!(matches!(
        store.create_entry(big).await,
        Err(ServerStoreError::Unstorable {
            table: "entries",
            ..
        })
    ));
    assert_eq!(store.revision().await.expect("read"), revision);
}

/// 8 consumers, half on each replica, race for one token: exactly one
/// gets it unused.
async fn racing_consumers((a, b): Replicas) {
    a.add_join_token(hash(7), admission("node-a", 1000))
        .await
        .expect("added");
    let consumers: Vec<_> = (0..8u64)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
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
    assert_eq!(unused, 1, "exactly one consumer admitted");
}

// === SQLite ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.db");
    let open = || {
        let path = path.clone();
        async move {
            tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .expect("opened")
                .expect("the store opens")
        }
    };
    // Two connections to one file, as two handles of one replica.
    contract((Arc::new(open().await), Arc::new(open().await))).await;
}

// === PostgreSQL ===

pub(crate) async fn replica(pg: &TestPostgres) -> Arc<dyn ServerStore> {
    Arc::new(PostgresStore::connect(&pg.url()).await.expect("connected"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and PostgreSQL: scripts/test runs it"]
async fn the_postgres_store_keeps_the_contract_across_two_replicas() {
    let pg = TestPostgres::start();
    contract((replica(&pg).await, replica(&pg).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and PostgreSQL: scripts/test runs it"]
async fn replicas_starting_at_once_apply_the_schema_once() {
    let pg = TestPostgres::start();
    let url = pg.url();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::connect(&url).await })
        })
        .collect();
    for start in starts {
        start.await.expect("ran").expect("every replica connects");
    }
    let client = raw_client(&pg).await;
    let versions = client
        .query("SELECT version FROM tether_schema ORDER BY version", &[])
        .await
        .expect("read");
    let versions: Vec<i32> = versions.iter().map(|row| row.get(0)).collect();
    assert_eq!(versions, [1, 2], "each step recorded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and PostgreSQL: scripts/test runs it"]
async fn a_newer_schema_is_refused_untouched() {
    let pg = TestPostgres::start();
    drop(PostgresStore::connect(&pg.url()).await.expect("connected"));
    let client = raw_client(&pg).await;
    client
        .execute(
            "INSERT INTO tether_schema (version, applied_at_ms) VALUES (99, 0)",
            &[],
        )
        .await
        .expect("a newer version recorded");
    match PostgresStore::connect(&pg.url()).await {
        Err(ServerStoreError::Open(source)) => match source.downcast_ref::<PostgresError>() {
            Some(PostgresError::NewerSchema { found: 99, known }) => assert_eq!(*known, 2),
            other => panic!("expected NewerSchema, got {other:?}"),
        },
        other => panic!("expected Open, got {other:?}"),
    }
    let rows = client
        .query("SELECT count(*) FROM tether_schema", &[])
        .await
        .expect("read");
    assert_eq!(rows[0].get::<_, i64>(0), 3, "untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and PostgreSQL: scripts/test runs it"]
async fn a_store_outlives_a_postgres_restart() {
    let pg = TestPostgres::start();
    let store = PostgresStore::connect(&pg.url()).await.expect("connected");
    store
        .create_entry(entry("web", &[]))
        .await
        .expect("created");

    pg.stop();
    // Down: every call fails Unavailable, none hangs (each is bounded).
    for _ in 0..3 {
        match store.revision().await {
            Err(ServerStoreError::Unavailable { .. }) => {}
            other => panic!("expected Unavailable while PostgreSQL is down, got {other:?}"),
        }
    }
    assert!(matches!(
        store.create_entry(entry("api", &[])).await,
        Err(ServerStoreError::Unavailable { .. })
    ));

    pg.start_again();
    // Back: the same store reconnects (after its backoff) and sees what
    // was committed before.
    let revision = eventually("the store reconnects", async || {
        store.revision().await.map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(revision, 1);
    assert_eq!(
        store
            .create_entry(entry("api", &[]))
            .await
            .expect("created"),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and PostgreSQL: scripts/test runs it"]
async fn a_url_asking_for_tls_is_refused_before_connecting() {
    let pg = TestPostgres::start();
    let url = format!("{}?sslmode=require", pg.url());
    match PostgresStore::connect(&url).await {
        Err(ServerStoreError::Open(source)) => assert!(
            matches!(
                source.downcast_ref::<PostgresError>(),
                Some(PostgresError::TlsUnsupported { .. })
            ),
            "{source}"
        ),
        other => panic!("expected Open, got {other:?}"),
    }
}

async fn raw_client(pg: &TestPostgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("a raw connection");
    tokio::spawn(connection);
    client
}
