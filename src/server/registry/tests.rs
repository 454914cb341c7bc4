//! The server's registry against the real SQLite store and a real audit
//! trail: create, list, delete, duplicates, the file's entries, other
//! replicas' writes, the audit records.

use std::path::Path;

use super::*;
use crate::audit::{AuditConfig, ReadFilter, SigningKey};
use crate::server::store::sqlite::SqliteStore;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").expect("a valid trust domain")
}

fn spec(id: &str, selectors: &[&str]) -> EntrySpec {
    EntrySpec {
        spiffe_id: id.into(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        ..EntrySpec::default()
    }
}

fn nodes(names: &[&str]) -> BTreeSet<NodeName> {
    names
        .iter()
        .map(|n| NodeName::new(n).expect("a valid node name"))
        .collect()
}

fn config_entry(id: &str, selectors: &[&str], on: &[&str]) -> ServerEntry {
    ServerEntry {
        entry: Arc::new(
            RegistrationEntry::from_config(&spec(id, selectors), &td(), &BTreeSet::new())
                .expect("a valid config entry"),
        ),
        nodes: nodes(on),
    }
}

/// A real audit trail in `dir`, its writer on the test's runtime.
fn audit(dir: &Path) -> AuditLog {
    let (log, writer) = AuditLog::open(
        dir,
        &AuditConfig::default(),
        Arc::new(SigningKey::generate().expect("a signing key").0),
    )
    .expect("the audit trail opens");
    tokio::spawn(writer.run(CancellationToken::new()));
    log
}

fn store(dir: &Path) -> Arc<dyn ServerStore> {
    Arc::new(SqliteStore::open(&dir.join("server.db")).expect("the store opens"))
}

async fn registry(dir: &Path, config: Vec<ServerEntry>, trail: &str) -> ServerRegistry {
    ServerRegistry::open(store(dir), td(), config, audit(&dir.join(trail)))
        .await
        .expect("the registry opens")
}

fn ids(entries: &ServerEntries) -> Vec<String> {
    entries
        .entries
        .iter()
        .map(|e| e.entry.id.to_string())
        .collect()
}

#[tokio::test]
async fn entries_are_created_listed_and_deleted_after_the_files() {
    let dir = tempfile::tempdir().expect("a tempdir");
    let file = config_entry("spiffe://example.org/file", &["k8s:ns:a"], &["node-1"]);
    let reg = registry(dir.path(), vec![file.clone()], "audit").await;
    let opened = reg.snapshot();
    assert_eq!(ids(&opened), [file.entry.id.to_string()]);

    let mut changes = reg.subscribe();
    let created = reg
        .create(
            &spec("spiffe://example.org/api", &["unix:uid:1000"]),
            nodes(&["node-2", "node-1"]),
        )
        .await
        .expect("the entry is created");
    assert!(created.entry.id.as_str().starts_with("ent-"));
    assert_eq!(created.nodes, nodes(&["node-1", "node-2"]));
    assert!(changes.has_changed().expect("the registry is alive"));
    let after = changes.borrow_and_update().clone();
    assert!(after.revision > opened.revision);
    assert_eq!(
        ids(&after),
        [file.entry.id.to_string(), created.entry.id.to_string()]
    );
    let got = after
        .get(created.entry.id.as_str())
        .expect("the new entry is listed");
    assert_eq!(got.entry.spiffe_id.as_str(), "spiffe://example.org/api");
    assert_eq!(got.nodes, created.nodes);

    reg.delete(created.entry.id.as_str())
        .await
        .expect("the entry is deleted");
    let deleted = reg.snapshot();
    assert!(deleted.revision > after.revision);
    assert_eq!(ids(&deleted), [file.entry.id.to_string()]);
    let again = reg.delete(created.entry.id.as_str()).await;
    assert!(
        matches!(again, Err(ServerRegistryError::NotFound(_))),
        "{again:?}"
    );
}

#[tokio::test]
async fn duplicates_invalid_entries_and_file_entries_are_refused() {
    let dir = tempfile::tempdir().expect("a tempdir");
    let file = config_entry("spiffe://example.org/file", &["k8s:ns:a"], &[]);
    let reg = registry(dir.path(), vec![file.clone()], "audit").await;

    // The file's rule, through the API: the existing id is named.
    let dup = reg
        .create(
            &spec("spiffe://example.org/file", &["k8s:ns:a"]),
            nodes(&[]),
        )
        .await;
    match dup {
        Err(ServerRegistryError::Duplicate { existing }) => assert_eq!(existing, file.entry.id),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    let first = reg
        .create(&spec("spiffe://example.org/b", &["unix:uid:1"]), nodes(&[]))
        .await
        .expect("created");
    // Another node list does not make another rule.
    let dup = reg
        .create(
            &spec("spiffe://example.org/b", &["unix:uid:1"]),
            nodes(&["n1"]),
        )
        .await;
    match dup {
        Err(ServerRegistryError::Duplicate { existing }) => assert_eq!(existing, first.entry.id),
        other => panic!("expected a duplicate, got {other:?}"),
    }

    let bad = reg
        .create(&spec("spiffe://other.org/x", &["unix:uid:1"]), nodes(&[]))
        .await;
    assert!(
        matches!(bad, Err(ServerRegistryError::Invalid(_))),
        "{bad:?}"
    );

    let refused = reg.delete(file.entry.id.as_str()).await;
    match &refused {
        Err(error @ ServerRegistryError::FromConfig(id)) => {
            assert_eq!(*id, file.entry.id);
            assert!(error.to_string().contains("configuration file"), "{error}");
        }
        other => panic!("expected FromConfig, got {other:?}"),
    }
    assert!(matches!(
        reg.delete("not-an-id").await,
        Err(ServerRegistryError::Invalid(_))
    ));
    assert_eq!(reg.snapshot().entries.len(), 2);
}

#[tokio::test]
async fn a_second_replica_sees_the_firsts_writes_on_refresh() {
    let dir = tempfile::tempdir().expect("a tempdir");
    let one = registry(dir.path(), Vec::new(), "audit-1").await;
    let two = registry(dir.path(), Vec::new(), "audit-2").await;

    // Nothing changed: no publication.
    let before = two.snapshot();
    two.refresh().await.expect("refresh");
    assert_eq!(two.snapshot().revision, before.revision);

    let created = one
        .create(
            &spec("spiffe://example.org/a", &["unix:uid:1"]),
            nodes(&["n1"]),
        )
        .await
        .expect("created");
    two.refresh().await.expect("refresh");
    let seen = two.snapshot();
    assert!(seen.revision > before.revision);
    assert_eq!(ids(&seen), [created.entry.id.to_string()]);
    assert_eq!(seen.entries[0].nodes, nodes(&["n1"]));

    // The second replica refuses the first's rule, and may delete it.
    let dup = two
        .create(&spec("spiffe://example.org/a", &["unix:uid:1"]), nodes(&[]))
        .await;
    assert!(matches!(dup, Err(ServerRegistryError::Duplicate { .. })));
    two.delete(created.entry.id.as_str())
        .await
        .expect("deleted");
    one.refresh().await.expect("refresh");
    assert!(one.snapshot().entries.is_empty());

    // A reopened registry loads what is stored, validated.
    let kept = one
        .create(&spec("spiffe://example.org/k", &["unix:uid:2"]), nodes(&[]))
        .await
        .expect("created");
    let three = registry(dir.path(), Vec::new(), "audit-3").await;
    assert_eq!(ids(&three.snapshot()), [kept.entry.id.to_string()]);
}

#[tokio::test]
async fn the_poll_loop_picks_up_other_replicas_changes() {
    let dir = tempfile::tempdir().expect("a tempdir");
    let one = registry(dir.path(), Vec::new(), "audit-1").await;
    let two = registry(dir.path(), Vec::new(), "audit-2").await;
    let cancel = CancellationToken::new();
    let polling = tokio::spawn(two.clone().run(cancel.clone()));
    let mut changes = two.subscribe();
    one.create(&spec("spiffe://example.org/a", &["unix:uid:1"]), nodes(&[]))
        .await
        .expect("created");
    tokio::time::timeout(crate::testing::PATIENCE, changes.changed())
        .await
        .expect("the poll loop publishes within the patience")
        .expect("the registry is alive");
    assert_eq!(two.snapshot().entries.len(), 1);
    cancel.cancel();
    polling.await.expect("the poll loop ends when cancelled");
}

#[tokio::test]
async fn a_stored_entry_that_no_longer_validates_stops_the_open() {
    let dir = tempfile::tempdir().expect("a tempdir");
    let one = registry(dir.path(), Vec::new(), "audit-1").await;
    let created = one
        .create(&spec("spiffe://example.org/a", &["unix:uid:1"]), nodes(&[]))
        .await
        .expect("created");
    // The same store under another trust domain: the entry's ID is not in it.
    let error = ServerRegistry::open(
        store(dir.path()),
        TrustDomain::new("other.org").expect("a trust domain"),
        Vec::new(),
        audit(&dir.path().join("audit-2")),
    )
    .await
    .expect_err("the stored entry does not validate");
    match &error {
        ServerRegistryError::Stored { id, .. } => assert_eq!(id, created.entry.id.as_str()),
        other => panic!("expected Stored, got {other:?}"),
    }
    assert!(error.to_string().contains(created.entry.id.as_str()));
}

#[tokio::test]
async fn changes_are_audited_with_their_nodes() {
    let dir = tempfile::tempdir().expect("a tempdir");
    let trail = dir.path().join("audit");
    let log = audit(&trail);
    let reg = ServerRegistry::open(store(dir.path()), td(), Vec::new(), log.clone())
        .await
        .expect("opens");
    let created = reg
        .create(
            &spec("spiffe://example.org/a", &["unix:uid:1"]),
            nodes(&["node-7"]),
        )
        .await
        .expect("created");
    reg.delete(created.entry.id.as_str())
        .await
        .expect("deleted");
    log.written().await.expect("the records are written");
    let records = crate::audit::read(&trail, &ReadFilter::default()).expect("the trail reads");
    let changes: Vec<_> = records
        .iter()
        .filter(|r| r.event.event == EventKind::EntryChange)
        .collect();
    assert_eq!(changes.len(), 2, "{records:?}");
    for (record, what) in changes.iter().zip(["created", "deleted"]) {
        assert_eq!(
            record.event.entry_id.as_deref(),
            Some(created.entry.id.as_str())
        );
        assert_eq!(
            record.event.spiffe_id.as_deref(),
            Some("spiffe://example.org/a")
        );
        let reason = record.event.reason.as_deref().unwrap_or_default();
        assert!(reason.contains(what), "{reason}");
        assert!(reason.contains("nodes node-7"), "{reason}");
        assert!(reason.contains("unix:uid:1"), "{reason}");
    }
}
