//! The server's admin API over a real Unix socket, with the real SQLite
//! store, a local authority and an audit trail, driven by the generated
//! client.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use super::*;
use crate::audit::{AuditConfig, AuditLog, EventKind, ReadFilter, SigningKey};
use crate::authority::{AuthorityConfig, LocalAuthority};
use crate::proto::admin as admin_pb;
use crate::proto::server as pb;
use crate::proto::server::server_admin_client::ServerAdminClient;
use crate::registration::{EntrySpec, RegistrationEntry};
use crate::server::join_token::TokenHash;
use crate::server::registry::ServerRegistry;
use crate::server::scope::{NodeName, ServerEntry};
use crate::server::store::ServerStore;
use crate::server::store::sqlite::SqliteStore;

struct Served {
    client: ServerAdminClient<Channel>,
    store: Arc<dyn ServerStore>,
    trail: std::path::PathBuf,
    config_entry: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").expect("a trust domain")
}

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

async fn serve_in_tempdir() -> Served {
    let dir = tempfile::tempdir().expect("a tempdir");
    let store: Arc<dyn ServerStore> =
        Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("the store opens"));
    let trail = dir.path().join("audit");
    let log = audit(&trail);
    let file_entry = ServerEntry {
        entry: Arc::new(
            RegistrationEntry::from_config(
                &EntrySpec {
                    spiffe_id: "spiffe://example.org/file".into(),
                    selectors: vec!["k8s:ns:a".into()],
                    ..EntrySpec::default()
                },
                &td(),
                &BTreeSet::new(),
            )
            .expect("a valid entry"),
        ),
        nodes: BTreeSet::new(),
    };
    let config_entry = file_entry.entry.id.to_string();
    let registry = ServerRegistry::open(Arc::clone(&store), td(), vec![file_entry], log.clone())
        .await
        .expect("the registry opens");
    let authority = LocalAuthority::load_or_create(td(), AuthorityConfig::default(), dir.path())
        .expect("the authority starts");
    let tasks = crate::server::tasks::TaskIndex::open(Arc::clone(&store), td(), log.clone())
        .await
        .expect("the task index opens");
    let service = ServerAdminService::new(
        registry,
        Arc::clone(&store),
        Arc::new(authority),
        tasks,
        log,
    );
    let path = dir.path().join("admin/server.sock");
    let mut socket = bind(&path).expect("the socket binds");
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let closing = CancellationToken::new();
            let served = serve(
                service,
                authz(),
                &mut socket,
                stop.cancelled_owned(),
                closing,
            )
            .await;
            served.expect("the admin server serves");
        });
    }
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            tokio::net::UnixStream::connect(path)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(connector)
        .await
        .expect("the socket answers");
    Served {
        client: ServerAdminClient::new(channel),
        store,
        trail,
        config_entry,
        stop,
        _dir: dir,
    }
}

fn spec(id: &str, selectors: &[&str]) -> admin_pb::EntrySpec {
    admin_pb::EntrySpec {
        spiffe_id: id.into(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn join_tokens_are_returned_once_and_kept_as_their_hash() {
    let mut s = serve_in_tempdir().await;
    let created = s
        .client
        .create_join_token(pb::CreateJoinTokenRequest {
            node_name: "node-1".into(),
            ttl_ms: 0,
        })
        .await
        .expect("a token is created")
        .into_inner();
    assert!(created.token.starts_with("tjt1."), "{}", created.token);
    let hash = TokenHash::of_presented(&created.token).expect("a well-formed token");
    let now = SystemTime::now();
    let admission = s
        .store
        .consume_join_token(hash, now)
        .await
        .expect("the store answers")
        .expect("the store holds the token's hash");
    assert_eq!(
        admission.admit(now),
        Ok(&NodeName::new("node-1").expect("a name"))
    );
    assert_eq!(
        admission
            .expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis()),
        Some(u128::try_from(created.expires_at_ms).expect("after 1970")),
    );
    let again = s
        .store
        .consume_join_token(hash, now)
        .await
        .expect("the store answers")
        .expect("still known");
    assert!(again.admit(now).is_err(), "a token admits once");

    // The audit trail names the node, never the token.
    let records = crate::audit::read(&s.trail, &ReadFilter::default()).expect("the trail reads");
    let record = records
        .iter()
        .find(|r| r.event.event == EventKind::JoinToken)
        .expect("the creation is recorded");
    assert!(record.line.contains("node-1"), "{}", record.line);
    assert!(!record.line.contains(&created.token), "{}", record.line);

    for (name, ttl_ms, field) in [
        ("Node_1", 0, "node_name"),
        ("", 0, "node_name"),
        ("node-1", 8 * 24 * 3_600_000, "ttl_ms"),
    ] {
        let refused = s
            .client
            .create_join_token(pb::CreateJoinTokenRequest {
                node_name: name.into(),
                ttl_ms,
            })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().starts_with(field), "{refused:?}");
    }
    let long = "a".repeat(10_000);
    let refused = s
        .client
        .create_join_token(pb::CreateJoinTokenRequest {
            node_name: long.clone(),
            ttl_ms: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(!refused.message().contains(&long), "the refusal is bounded");
    s.stop.cancel();
}

#[tokio::test]
async fn entries_are_created_shown_listed_and_deleted() {
    let mut s = serve_in_tempdir().await;
    let created = s
        .client
        .create_entry(pb::CreateServerEntryRequest {
            spec: Some(spec("spiffe://example.org/a", &["unix:uid:1000"])),
            nodes: vec!["node-2".into(), "node-1".into()],
        })
        .await
        .expect("created")
        .into_inner();
    let entry = created.entry.clone().expect("the entry");
    assert!(entry.id.starts_with("ent-"));
    assert_eq!(created.nodes, ["node-1", "node-2"]);

    let shown = s
        .client
        .get_entry(pb::GetServerEntryRequest {
            id: entry.id.clone(),
        })
        .await
        .expect("shown")
        .into_inner();
    assert_eq!(shown, created);
    let listed = s
        .client
        .list_entries(pb::ListServerEntriesRequest {})
        .await
        .expect("listed")
        .into_inner()
        .entries;
    let ids: Vec<_> = listed
        .iter()
        .filter_map(|e| e.entry.as_ref().map(|e| e.id.clone()))
        .collect();
    assert_eq!(ids, [s.config_entry.clone(), entry.id.clone()]);

    let dup = s
        .client
        .create_entry(pb::CreateServerEntryRequest {
            spec: Some(spec("spiffe://example.org/a", &["unix:uid:1000"])),
            nodes: Vec::new(),
        })
        .await
        .expect_err("a duplicate");
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains(&entry.id), "{dup:?}");

    let bad_node = s
        .client
        .create_entry(pb::CreateServerEntryRequest {
            spec: Some(spec("spiffe://example.org/b", &["unix:uid:1"])),
            nodes: vec!["Bad_Node".into()],
        })
        .await
        .expect_err("a bad node name");
    assert_eq!(bad_node.code(), Code::InvalidArgument);
    assert!(bad_node.message().starts_with("nodes"), "{bad_node:?}");
    assert!(bad_node.message().contains("Bad_Node"), "{bad_node:?}");

    let file = s
        .client
        .delete_entry(pb::DeleteServerEntryRequest {
            id: s.config_entry.clone(),
        })
        .await
        .expect_err("the file's entry is the file's");
    assert_eq!(file.code(), Code::FailedPrecondition);
    assert!(file.message().contains("configuration file"), "{file:?}");

    s.client
        .delete_entry(pb::DeleteServerEntryRequest {
            id: entry.id.clone(),
        })
        .await
        .expect("deleted");
    let gone = s
        .client
        .get_entry(pb::GetServerEntryRequest { id: entry.id })
        .await
        .expect_err("gone");
    assert_eq!(gone.code(), Code::NotFound);
    s.stop.cancel();
}

#[tokio::test]
async fn nodes_are_listed_and_evicted_and_the_bundle_is_served() {
    let mut s = serve_in_tempdir().await;
    let now = SystemTime::now();
    s.store
        .put_node(crate::server::store::NodeRow {
            name: NodeName::new("node-1").expect("a name"),
            attestation: "join_token".into(),
            attested_at: now,
            svid_serial: "0a".into(),
            svid_expires_at: now + Duration::from_secs(3600),
            evicted: false,
        })
        .await
        .expect("stored");
    let nodes = s
        .client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .expect("listed")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "node-1");
    assert!(!nodes[0].evicted);
    let evicted = s
        .client
        .evict_node(pb::EvictNodeRequest {
            name: "node-1".into(),
        })
        .await
        .expect("evicted")
        .into_inner();
    assert!(evicted.evicted);
    let unknown = s
        .client
        .evict_node(pb::EvictNodeRequest {
            name: "node-9".into(),
        })
        .await
        .expect_err("no such node");
    assert_eq!(unknown.code(), Code::NotFound);

    let bundle = s
        .client
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .expect("the bundle")
        .into_inner();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(bundle.x509_authorities.len(), 1);
    assert!(
        bundle.spiffe_json.contains("x509-svid"),
        "{}",
        bundle.spiffe_json
    );
    s.stop.cancel();
}
