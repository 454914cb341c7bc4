//! Node scope, table by table: named nodes, pods the API places on the
//! node, templates resolved from the API's facts, lifetimes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use spiffe::{SpiffeId, TrustDomain};

use super::*;
use crate::registration::{EntrySpec, RegistrationEntry};

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn entry(spiffe_id: &str, selectors: &[&str], nodes: &[&str]) -> ServerEntry {
    let spec = EntrySpec {
        spiffe_id: spiffe_id.into(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        x509_svid_ttl: Some(Duration::from_secs(600)),
        ..EntrySpec::default()
    };
    let td = TrustDomain::new("fleet.test").unwrap();
    ServerEntry {
        entry: Arc::new(RegistrationEntry::from_config(&spec, &td, &BTreeSet::new()).unwrap()),
        nodes: nodes.iter().map(|n| node(n)).collect(),
    }
}

/// A pod as the API server lists it.
fn pod(uid: &str, node: &str, ns: &str, sa: &str, app: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{app}-1"), "namespace": ns, "uid": uid,
                     "labels": {"app": app}},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "main", "image": "registry.test/app:1"}]},
        "status": {"containerStatuses": [{
            "name": "main", "image": "registry.test/app:1", "imageID": "sha256:aa",
            "containerID": "containerd://c0ffee", "ready": true, "restartCount": 0}]}
    }))
    .unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn x509(spiffe_id: &SpiffeId) -> SignRequest<'_> {
    SignRequest {
        spiffe_id,
        credential: Credential::X509,
        ttl: Duration::from_secs(300),
        dns_names: &[],
    }
}

#[test]
fn node_names_are_dns_subdomains() {
    for good in ["node-a", "n1", "ip-10-0-0-1.ec2.internal", &"a".repeat(253)] {
        assert!(NodeName::new(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "Node-A",
        "-a",
        "a-",
        "a..b",
        "a/b",
        "../x",
        "a b",
        "node_a",
        &"a".repeat(254),
    ] {
        assert_eq!(
            NodeName::new(bad),
            Err(BadNodeName(bad.to_owned())),
            "{bad}"
        );
    }
}

#[test]
fn an_entry_that_names_the_node_is_served_there_and_nowhere_else() {
    let e = entry("spiffe://fleet.test/batch", &["unix:uid:1000"], &["node-a"]);
    let wanted = id("spiffe://fleet.test/batch");
    assert_eq!(
        authorize(&e, &node("node-a"), &[], &x509(&wanted)),
        Ok(Grant::Named)
    );
    let refused = authorize(&e, &node("node-b"), &[], &x509(&wanted));
    assert!(
        matches!(refused, Err(Refusal::NotInScope { .. })),
        "{refused:?}"
    );
}

#[test]
fn a_pod_entry_is_served_only_on_the_node_the_api_places_the_pod() {
    let e = entry(
        "spiffe://fleet.test/ns/agents/sa/planner",
        &["k8s:ns:agents", "k8s:sa:planner", "unix:uid:1000"],
        &[],
    );
    let wanted = id("spiffe://fleet.test/ns/agents/sa/planner");
    let pods = [pod("uid-1", "node-a", "agents", "planner", "planner")];
    assert_eq!(
        authorize(&e, &node("node-a"), &pods, &x509(&wanted)),
        Ok(Grant::Pod("uid-1".into())),
        "the unix: selector is the agent's to check, not the server's"
    );
    // A rooted node B asks for the identity of A's pod.
    let refused = authorize(&e, &node("node-b"), &pods, &x509(&wanted));
    assert!(
        matches!(refused, Err(Refusal::NotInScope { .. })),
        "{refused:?}"
    );
    // A pod of another service account on A does not count.
    let others = [pod("uid-2", "node-a", "agents", "writer", "writer")];
    let refused = authorize(&e, &node("node-a"), &others, &x509(&wanted));
    assert!(
        matches!(refused, Err(Refusal::NotInScope { .. })),
        "{refused:?}"
    );
}

#[test]
fn container_selectors_are_met_by_a_container_of_the_pod() {
    let e = entry(
        "spiffe://fleet.test/app",
        &["k8s:ns:agents", "k8s:container-name:main"],
        &[],
    );
    let wanted = id("spiffe://fleet.test/app");
    let pods = [pod("uid-1", "node-a", "agents", "planner", "planner")];
    assert!(authorize(&e, &node("node-a"), &pods, &x509(&wanted)).is_ok());
    let sidecar = entry(
        "spiffe://fleet.test/app",
        &["k8s:ns:agents", "k8s:container-name:sidecar"],
        &[],
    );
    assert!(authorize(&sidecar, &node("node-a"), &pods, &x509(&wanted)).is_err());

    // An ephemeral container (`kubectl debug`) is a container the agent's
    // attestor sees too.
    let mut debugged = pod("uid-1", "node-a", "agents", "planner", "planner");
    debugged
        .status
        .as_mut()
        .unwrap()
        .ephemeral_container_statuses = Some(vec![
        serde_json::from_value(serde_json::json!({
            "name": "sidecar", "image": "registry.test/debug:1", "imageID": "sha256:bb",
            "containerID": "containerd://d3b06", "ready": false, "restartCount": 0}))
        .unwrap(),
    ]);
    assert!(authorize(&sidecar, &node("node-a"), &[debugged], &x509(&wanted)).is_ok());
}

#[test]
fn a_template_yields_only_the_ids_of_pods_on_the_node() {
    let e = entry(
        "spiffe://fleet.test/ns/{k8s:ns}/sa/{k8s:sa}",
        &["k8s:pod-label:app:planner"],
        &[],
    );
    let pods = [
        pod("uid-1", "node-a", "agents", "planner", "planner"),
        pod("uid-2", "node-b", "other", "planner", "planner"),
    ];
    let ours = id("spiffe://fleet.test/ns/agents/sa/planner");
    let theirs = id("spiffe://fleet.test/ns/other/sa/planner");
    assert_eq!(
        authorize(&e, &node("node-a"), &pods, &x509(&ours)),
        Ok(Grant::Pod("uid-1".into()))
    );
    let refused = authorize(&e, &node("node-a"), &pods, &x509(&theirs));
    assert!(
        matches!(&refused, Err(Refusal::OtherIdentity { requested, .. }) if requested == &theirs.to_string()),
        "{refused:?}"
    );
}

#[test]
fn a_templated_entry_named_on_a_node_yields_nothing_the_server_cannot_resolve() {
    // The server cannot see the caller's uid: a unix-templated ID is not
    // something it can vouch for by node name alone.
    let e = entry(
        "spiffe://fleet.test/user/{unix:uid}",
        &["unix:gid:100"],
        &["node-a"],
    );
    let wanted = id("spiffe://fleet.test/user/0");
    let refused = authorize(&e, &node("node-a"), &[], &x509(&wanted));
    assert!(
        matches!(refused, Err(Refusal::NotInScope { .. })),
        "{refused:?}"
    );
}

#[test]
fn a_lifetime_above_the_entrys_is_refused() {
    let e = entry("spiffe://fleet.test/batch", &["unix:uid:1000"], &["node-a"]);
    let wanted = id("spiffe://fleet.test/batch");
    let long = SignRequest {
        ttl: Duration::from_secs(601),
        ..x509(&wanted)
    };
    assert!(matches!(
        authorize(&e, &node("node-a"), &[], &long),
        Err(Refusal::TooLong { allowed, .. }) if allowed == Duration::from_secs(600)
    ));
    // JWT lifetimes are the entry's jwt_svid_ttl (unset here: the
    // authority's cap applies).
    let jwt = SignRequest {
        credential: Credential::Jwt,
        ttl: Duration::from_secs(3600),
        ..x509(&wanted)
    };
    assert_eq!(authorize(&e, &node("node-a"), &[], &jwt), Ok(Grant::Named));
}

#[test]
fn dns_names_are_only_the_entrys() {
    let spec = EntrySpec {
        spiffe_id: "spiffe://fleet.test/web".into(),
        selectors: vec!["unix:uid:1000".into()],
        dns_names: vec!["web.fleet.test".into()],
        ..EntrySpec::default()
    };
    let td = TrustDomain::new("fleet.test").unwrap();
    let e = ServerEntry {
        entry: Arc::new(RegistrationEntry::from_config(&spec, &td, &BTreeSet::new()).unwrap()),
        nodes: [node("node-a")].into(),
    };
    let wanted = id("spiffe://fleet.test/web");
    let own = ["web.fleet.test".to_owned()];
    let ok = SignRequest {
        dns_names: &own,
        ..x509(&wanted)
    };
    assert_eq!(authorize(&e, &node("node-a"), &[], &ok), Ok(Grant::Named));
    let extra = ["web.fleet.test".to_owned(), "bank.example".to_owned()];
    let bad = SignRequest {
        dns_names: &extra,
        ..x509(&wanted)
    };
    assert_eq!(
        authorize(&e, &node("node-a"), &[], &bad),
        Err(Refusal::OtherName {
            entry: e.entry.id.to_string(),
            name: "bank.example".into()
        })
    );
}

#[test]
fn any_entry_may_allow_a_request_and_the_closest_refusal_is_told() {
    let a = entry("spiffe://fleet.test/a", &["unix:uid:1"], &["node-a"]);
    let b = entry("spiffe://fleet.test/b", &["unix:uid:2"], &["node-b"]);
    let entries = [a, b];
    let wanted = id("spiffe://fleet.test/b");
    let (found, grant) = authorize_any(&entries, &node("node-b"), &[], &x509(&wanted)).unwrap();
    assert_eq!(
        (found.entry.spiffe_id.to_string(), grant),
        ("spiffe://fleet.test/b".into(), Grant::Named)
    );
    // node-a asking for node-b's identity: no entry yields it there.
    assert_eq!(
        authorize_any(&entries, &node("node-a"), &[], &x509(&wanted)).unwrap_err(),
        Refusal::NoEntry {
            requested: "spiffe://fleet.test/b".into(),
            node: "node-a".into()
        }
    );
    // The entry yields it, the lifetime is too long: that is the reason.
    let long = SignRequest {
        ttl: Duration::from_secs(601),
        ..x509(&wanted)
    };
    assert!(matches!(
        authorize_any(&entries, &node("node-b"), &[], &long),
        Err(Refusal::TooLong { .. })
    ));
}

#[test]
fn no_entry_yields_the_fleets_own_identities() {
    // Review finding: a template filled from the API's facts (a namespace
    // `tether`, a service account `server` or `node`) or an entry written
    // with a fleet path would have let a node obtain the server's SVID
    // (and serve agents as the server) or another node's (and be that
    // node to the server).
    let by_sa = entry(
        "spiffe://fleet.test/{k8s:ns}/{k8s:sa}",
        &["k8s:ns:tether"],
        &[],
    );
    let by_pod = entry(
        "spiffe://fleet.test/{k8s:ns}/{k8s:sa}/{k8s:pod-name}",
        &["k8s:ns:tether"],
        &[],
    );
    let named = entry(
        "spiffe://fleet.test/tether/node/node-b",
        &["unix:uid:0"],
        &["node-a"],
    );
    let server_named = entry(
        "spiffe://fleet.test/tether/server",
        &["unix:uid:0"],
        &["node-a"],
    );
    let pods = [
        pod("uid-1", "node-a", "tether", "server", "x"),
        pod("uid-2", "node-a", "tether", "node", "node-b"),
    ];
    let a = node("node-a");
    // What is left names no node and is not the server's: a workload's.
    let yielded: Vec<String> = [&by_sa, &by_pod, &named, &server_named]
        .iter()
        .flat_map(|e| e.identities(&a, &pods))
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(
        yielded,
        [
            "spiffe://fleet.test/tether/node",
            "spiffe://fleet.test/tether/server/x-1"
        ]
    );
    let entries = [by_sa, by_pod, named, server_named];
    for wanted in [
        "spiffe://fleet.test/tether/server",
        "spiffe://fleet.test/tether/node/node-b",
        "spiffe://fleet.test/tether/node/node-b-1",
    ] {
        let wanted = id(wanted);
        let refused = authorize_any(&entries, &a, &pods, &x509(&wanted));
        assert!(
            matches!(&refused, Err(Refusal::FleetIdentity { requested }) if requested == &wanted.to_string()),
            "{refused:?}"
        );
    }
    // A workload path that merely starts alike is a workload's.
    let fine = entry(
        "spiffe://fleet.test/tether/nodes",
        &["unix:uid:0"],
        &["node-a"],
    );
    assert!(!fine.identities(&a, &[]).is_empty());
    assert!(!is_fleet_identity(&id(
        "spiffe://fleet.test/tether/server2"
    )));
}
