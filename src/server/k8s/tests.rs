//! `[kubernetes]`'s checks, the TokenReview and pod decisions, and the pod
//! grouping, on the API's real JSON shapes.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::Pod;

use super::config::{ApiServer, RawKubernetesConfig};
use super::pods::percent_encode;
use super::review::{claim_of, node_of};
use super::*;
use crate::config::{ConfigError, MapEnv};
use crate::error::Chain;
use crate::server::scope::NodeName;

fn env(vars: &[(&str, &str)]) -> MapEnv {
    MapEnv {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        euid: 0,
    }
}

fn config(text: &str, env: &MapEnv) -> Result<KubernetesConfig, ConfigError> {
    let raw: RawKubernetesConfig = toml::from_str(text).expect("toml");
    raw.validate(env)
}

fn refused(text: &str) -> String {
    Chain(&config(text, &env(&[])).expect_err("refused")).to_string()
}

const ALLOWED: &str = "allowed_service_accounts = [\"tether-system:tether-agent\"]\n";

#[test]
fn in_a_pod_the_defaults_are_the_cluster_s() {
    let env = env(&[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ]);
    let c = config(ALLOWED, &env).expect("valid");
    assert_eq!(
        c.api_server,
        ApiServer {
            host: "10.96.0.1".into(),
            port: 443
        }
    );
    assert_eq!(c.ca_path, Path::new(config::DEFAULT_CA_PATH));
    assert_eq!(c.token_path, Path::new(config::DEFAULT_TOKEN_PATH));
    assert_eq!(c.audience, "tether-server");
    assert_eq!(
        c.allowed_service_accounts,
        BTreeSet::from([ServiceAccount::parse("tether-system:tether-agent").expect("sa")])
    );
    let v6 = config(
        ALLOWED,
        &self::env(&[("KUBERNETES_SERVICE_HOST", "fd00::1")]),
    )
    .expect("v6");
    assert_eq!(v6.api_server.address(), "[fd00::1]:443");
}

#[test]
fn an_explicit_api_server_is_an_https_origin() {
    let c = config(
        &format!("api_server = \"https://kube.example:6443/\"\n{ALLOWED}"),
        &env(&[]),
    )
    .expect("valid");
    assert_eq!(c.api_server.address(), "kube.example:6443");
    for bad in [
        "http://kube.example",
        "https://kube.example/api",
        "https://user@kube.example",
        "https://",
        "https://kube.example:notaport",
    ] {
        let message = refused(&format!("api_server = \"{bad}\"\n{ALLOWED}"));
        assert!(
            message.contains("kubernetes.api_server"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn the_allowed_service_accounts_are_required_and_checked() {
    let missing = refused("api_server = \"https://k\"\n");
    assert!(missing.contains("allowed_service_accounts"), "{missing}");
    for bad in ["tether-agent", "Tether:agent", "ns:", ":name", "a/b:c"] {
        let message = refused(&format!(
            "api_server = \"https://k\"\nallowed_service_accounts = [\"{bad}\"]\n"
        ));
        assert!(message.contains("namespace:name"), "{bad}: {message}");
    }
    let twice =
        refused("api_server = \"https://k\"\nallowed_service_accounts = [\"a:b\", \"a:b\"]\n");
    assert!(twice.contains("twice"), "{twice}");
    let outside = refused(ALLOWED);
    assert!(outside.contains("KUBERNETES_SERVICE_HOST"), "{outside}");
    let unknown = toml::from_str::<RawKubernetesConfig>("api_servers = \"https://k\"\n");
    assert!(unknown.is_err(), "unknown keys are refused");
}

fn allowed() -> BTreeSet<ServiceAccount> {
    BTreeSet::from([ServiceAccount::parse("tether-system:tether-agent").expect("sa")])
}

/// A TokenReview answer as the API server sends it.
fn review(status: serde_json::Value) -> TokenReview {
    serde_json::from_value(serde_json::json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": "x", "audiences": ["tether-server"]},
        "status": status,
    }))
    .expect("a TokenReview")
}

fn authenticated(username: &str) -> serde_json::Value {
    serde_json::json!({
        "authenticated": true,
        "user": {
            "username": username,
            "uid": "4c1e3c35-55d4-4c58-a1f0-4d6a0c6a8d2b",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:tether-system", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/credential-id": ["JTI=6d0a2f4c"],
                "authentication.kubernetes.io/node-name": ["node-x"],
                "authentication.kubernetes.io/node-uid": ["9a2c7c1e-1f3b-4c5d-8e9f-0a1b2c3d4e5f"],
                "authentication.kubernetes.io/pod-name": ["tether-agent-7xk2p"],
                "authentication.kubernetes.io/pod-uid": ["0f9e8d7c-6b5a-4c3d-2e1f-0a9b8c7d6e5f"]
            }
        },
        "audiences": ["tether-server"]
    })
}

#[test]
fn a_bound_token_of_an_allowed_service_account_names_its_pod() {
    let claim = claim_of(
        &review(authenticated(
            "system:serviceaccount:tether-system:tether-agent",
        )),
        "tether-server",
        &allowed(),
    )
    .expect("admitted");
    assert_eq!(
        claim.service_account.to_string(),
        "tether-system:tether-agent"
    );
    assert_eq!(claim.pod_name, "tether-agent-7xk2p");
    assert_eq!(claim.pod_uid, "0f9e8d7c-6b5a-4c3d-2e1f-0a9b8c7d6e5f");
}

#[test]
fn the_review_refuses_what_is_not_an_allowed_bound_token() {
    let not = review(
        serde_json::json!({"authenticated": false, "error": "token has expired", "user": {}}),
    );
    let e = claim_of(&not, "tether-server", &allowed()).expect_err("refused");
    assert!(
        matches!(e, PsatError::NotAuthenticated { .. }) && e.to_string().contains("expired"),
        "{e}"
    );

    let other = review(authenticated("system:serviceaccount:default:default"));
    let e = claim_of(&other, "tether-server", &allowed()).expect_err("refused");
    assert!(matches!(e, PsatError::NotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("default:default"), "{e}");

    let user = review(authenticated("alice@example.com"));
    let e = claim_of(&user, "tether-server", &allowed()).expect_err("refused");
    assert!(matches!(e, PsatError::NotServiceAccount { .. }), "{e}");

    let mut status = authenticated("system:serviceaccount:tether-system:tether-agent");
    status["audiences"] = serde_json::json!(["https://kubernetes.default.svc"]);
    let e = claim_of(&review(status), "tether-server", &allowed()).expect_err("refused");
    assert!(matches!(e, PsatError::WrongAudience { .. }), "{e}");

    let mut status = authenticated("system:serviceaccount:tether-system:tether-agent");
    status["user"]["extra"] = serde_json::json!({});
    let e = claim_of(&review(status), "tether-server", &allowed()).expect_err("refused");
    assert!(matches!(e, PsatError::NotBound { .. }), "{e}");

    let mut status = authenticated("system:serviceaccount:tether-system:tether-agent");
    status["user"]["extra"]["authentication.kubernetes.io/pod-name"] =
        serde_json::json!(["../../nodes/x"]);
    let e = claim_of(&review(status), "tether-server", &allowed()).expect_err("refused");
    assert!(matches!(e, PsatError::NotBound { .. }), "{e}");
    assert!(e.is_refusal());
}

fn agent_pod(uid: &str, node: Option<&str>, phase: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tether-agent-7xk2p", "namespace": "tether-system", "uid": uid},
        "spec": {
            "containers": [{"name": "tether", "image": "tether:1"}],
            "serviceAccountName": "tether-agent",
            "nodeName": node
        },
        "status": {"phase": phase}
    }))
    .expect("a pod")
}

fn claim() -> PodClaim {
    PodClaim {
        service_account: ServiceAccount::parse("tether-system:tether-agent").expect("sa"),
        pod_name: "tether-agent-7xk2p".into(),
        pod_uid: "0f9e8d7c-6b5a-4c3d-2e1f-0a9b8c7d6e5f".into(),
    }
}

#[test]
fn the_node_is_the_pod_s_as_the_api_has_it() {
    let uid = "0f9e8d7c-6b5a-4c3d-2e1f-0a9b8c7d6e5f";
    let node = node_of(&agent_pod(uid, Some("node-x"), "Running"), &claim()).expect("node");
    assert_eq!(node.as_str(), "node-x");
    let replaced =
        node_of(&agent_pod("1111", Some("node-x"), "Running"), &claim()).expect_err("uid");
    assert!(
        matches!(replaced, PsatError::PodReplaced { .. }),
        "{replaced}"
    );
    let pending = node_of(&agent_pod(uid, None, "Pending"), &claim()).expect_err("unscheduled");
    assert!(
        matches!(pending, PsatError::NotScheduled { .. }),
        "{pending}"
    );
    let ended = node_of(&agent_pod(uid, Some("node-x"), "Failed"), &claim()).expect_err("ended");
    assert!(matches!(ended, PsatError::PodEnded { .. }), "{ended}");
    let bad = node_of(&agent_pod(uid, Some("Node_X"), "Running"), &claim()).expect_err("name");
    assert!(matches!(bad, PsatError::NodeName { .. }), "{bad}");
    let mut other_sa = agent_pod(uid, Some("node-x"), "Running");
    if let Some(spec) = other_sa.spec.as_mut() {
        spec.service_account_name = Some("default".into());
    }
    let e = node_of(&other_sa, &claim()).expect_err("sa");
    assert!(matches!(e, PsatError::OtherServiceAccount { .. }), "{e}");
}

#[test]
fn pods_are_grouped_by_node_without_ended_or_unscheduled_ones() {
    let pods = ClusterPods::from_pods([
        agent_pod("a", Some("node-x"), "Running"),
        agent_pod("b", Some("node-x"), "Pending"),
        agent_pod("c", Some("node-y"), "Succeeded"),
        agent_pod("d", None, "Pending"),
    ]);
    let x = NodeName::new("node-x").expect("name");
    let y = NodeName::new("node-y").expect("name");
    assert_eq!(pods.on(&x).len(), 2);
    assert!(pods.on(&y).is_empty());
    assert_eq!(pods.len(), 2);
    assert!(pods.listed());
    assert!(!ClusterPods::default().listed());
}

#[test]
fn a_continue_token_is_percent_encoded() {
    assert_eq!(percent_encode("eyJ2Ijo+/=x-_.~"), "eyJ2Ijo%2B%2F%3Dx-_.~");
}
