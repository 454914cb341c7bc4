//! The Kubernetes attestor against a stand-in kubelet (HTTPS with a test
//! CA, a token check, pod lists in the kubelet's JSON shape), then through
//! the real daemon: a process whose cgroup names a pod gets its pod's
//! identity; one whose cgroup names none is attested without the kubelet.

use crate::common;

use std::time::Duration;

use common::kubelet::{CONTAINER, NODE, POD_UID, pod, pod_list, refused_port, stand_in};
use tether::attestation::k8s::{K8sAttestor, K8sAttestorConfig, K8sError, Kubelet, PodContainer};
use tether::registration::{Selector, SelectorSet};
use tokio::net::TcpListener;

fn in_pod() -> PodContainer {
    PodContainer {
        pod_uid: POD_UID.into(),
        container_id: Some(CONTAINER.into()),
    }
}

fn strings(selectors: &SelectorSet) -> Vec<String> {
    selectors.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn a_pods_process_gets_its_pods_selectors() {
    let kubelet = stand_in(Box::new(|_| {
        (200, pod_list(vec![pod(POD_UID, NODE, Some(CONTAINER))]))
    }))
    .await;
    let attestor = K8sAttestor::new(&K8sAttestorConfig {
        // The longest the config allows: the second call below comes within
        // it whatever the machine's speed.
        pod_cache_ttl: Duration::from_secs(300),
        ..kubelet.config()
    })
    .unwrap();
    let selectors = strings(&attestor.selectors(&in_pod()).await.unwrap());
    for want in [
        "k8s:ns:agents",
        "k8s:sa:planner",
        "k8s:pod-name:planner-7d9f8b6c5-x2x9q",
        &format!("k8s:pod-uid:{POD_UID}"),
        "k8s:node-name:node-a",
        "k8s:pod-label:app:planner",
        "k8s:pod-owner:ReplicaSet:planner-7d9f8b6c5",
        "k8s:pod-owner-uid:0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a",
        "k8s:pod-image:ghcr.io/example/planner:1.4",
        "k8s:pod-image-count:1",
        "k8s:pod-init-image:busybox:1.36",
        "k8s:container-name:planner",
        "k8s:container-image:ghcr.io/example/planner:1.4",
    ] {
        assert!(
            selectors.iter().any(|s| s == want),
            "no {want} in {selectors:#?}"
        );
    }
    // Every selector parses back (entries name them in this form).
    for s in &selectors {
        s.parse::<Selector>().unwrap();
    }

    // A second process of the pod within the cache TTL: no new request.
    attestor.selectors(&in_pod()).await.unwrap();
    assert_eq!(kubelet.requests(), 1);
}

#[tokio::test]
async fn a_pod_not_listed_yet_is_found_once_it_is() {
    let kubelet = stand_in(Box::new(|n| {
        let items = match n {
            1 => vec![],
            2 => vec![pod(POD_UID, NODE, None)],
            _ => vec![pod(POD_UID, NODE, Some(CONTAINER))],
        };
        (200, pod_list(items))
    }))
    .await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    let selectors = strings(&attestor.selectors(&in_pod()).await.unwrap());
    assert!(selectors.contains(&"k8s:container-name:planner".to_owned()));
    assert_eq!(kubelet.requests(), 3, "one refresh per miss");
}

#[tokio::test]
async fn a_pod_never_listed_fails_after_the_attempts() {
    let kubelet = stand_in(Box::new(|_| (200, pod_list(vec![])))).await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    let err = attestor.selectors(&in_pod()).await.unwrap_err();
    assert!(
        matches!(err, K8sError::PodNotListed { attempts: 5, .. }),
        "{err}"
    );
    assert_eq!(kubelet.requests(), 5);
}

#[tokio::test]
async fn pods_of_another_node_match_nothing() {
    let kubelet = stand_in(Box::new(|_| {
        (200, pod_list(vec![pod(POD_UID, "node-b", Some(CONTAINER))]))
    }))
    .await;
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    let err = attestor.selectors(&in_pod()).await.unwrap_err();
    assert!(matches!(err, K8sError::PodNotListed { .. }), "{err}");
}

#[tokio::test]
async fn a_refused_token_says_so() {
    let kubelet = stand_in(Box::new(|_| (200, pod_list(vec![])))).await;
    std::fs::write(kubelet.dir.path().join("token"), "expired-token").unwrap();
    let attestor = K8sAttestor::new(&kubelet.config()).unwrap();
    let err = attestor.selectors(&in_pod()).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("401") && message.contains("service account token was refused"),
        "{message}"
    );
}

#[tokio::test]
async fn garbage_huge_and_unverifiable_answers_are_errors() {
    let kubelet = stand_in(Box::new(|_| {
        (200, "{\"items\": [{\"metadata\": 7}]}".into())
    }))
    .await;
    let err = K8sAttestor::new(&kubelet.config())
        .unwrap()
        .selectors(&in_pod())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a pod list"), "{err}");

    let huge = stand_in(Box::new(|_| (200, " ".repeat(4096)))).await;
    let err = K8sAttestor::new(&K8sAttestorConfig {
        max_response_bytes: 1024,
        ..huge.config()
    })
    .unwrap()
    .selectors(&in_pod())
    .await
    .unwrap_err();
    assert!(err.to_string().contains("more than 1024 bytes"), "{err}");

    // A name the certificate does not carry: the TLS handshake fails...
    let err = K8sAttestor::new(&K8sAttestorConfig {
        kubelet_tls_server_name: Some("other.test".into()),
        ..kubelet.config()
    })
    .unwrap()
    .selectors(&in_pod())
    .await
    .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // ...unless verification is off (a self-signed kubelet certificate).
    let lenient = stand_in(Box::new(|_| {
        (200, pod_list(vec![pod(POD_UID, NODE, Some(CONTAINER))]))
    }))
    .await;
    K8sAttestor::new(&K8sAttestorConfig {
        kubelet_tls_server_name: Some("other.test".into()),
        skip_kubelet_verification: true,
        kubelet_ca_path: "/nonexistent/ca.crt".into(),
        ..lenient.config()
    })
    .unwrap()
    .selectors(&in_pod())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_kubelet_that_is_down_or_silent_fails_in_bounded_time() {
    // Nothing listens on this port.
    let down = refused_port();
    let kubelet = stand_in(Box::new(|_| (200, pod_list(vec![])))).await;
    let err = K8sAttestor::new(&K8sAttestorConfig {
        kubelet_secure_port: down.port,
        ..kubelet.config()
    })
    .unwrap()
    .selectors(&in_pod())
    .await
    .unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");

    // Accepts the connection and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let err = K8sAttestor::new(&K8sAttestorConfig {
        kubelet_secure_port: silent_port,
        request_timeout: Duration::from_millis(200),
        ..kubelet.config()
    })
    .unwrap()
    .selectors(&in_pod())
    .await
    .unwrap_err();
    assert!(err.to_string().contains("did not answer within"), "{err}");
}

#[test]
fn a_missing_ca_is_a_setup_error() {
    let err = K8sAttestor::new(&K8sAttestorConfig {
        enabled: true,
        node_name: Some(NODE.into()),
        kubelet_ca_path: "/nonexistent/ca.crt".into(),
        ..K8sAttestorConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}

#[test]
fn the_read_only_port_is_plain_http_and_sends_no_token() {
    let kubelet = Kubelet::new(&K8sAttestorConfig {
        enabled: true,
        node_name: Some(NODE.into()),
        kubelet_read_only_port: 10255,
        kubelet_ca_path: "/nonexistent/ca.crt".into(),
        ..K8sAttestorConfig::default()
    })
    .unwrap();
    let debug = format!("{kubelet:?}");
    assert!(
        debug.contains("127.0.0.1:10255") && debug.contains("tls: false"),
        "{debug}"
    );
    assert!(debug.contains("token_path: None"), "{debug}");
}

// === through the daemon ===

/// The agent's config for the stand-in kubelet, reading cgroups from
/// `proc_root`, with the template entry a cluster operator would write.
fn k8s_config(kubelet: &common::kubelet::StandIn, proc_root: &std::path::Path) -> String {
    let config = kubelet.config();
    format!(
        "[attestor.k8s]\nenabled = true\nnode_name = \"{NODE}\"\nkubelet_secure_port = {}\ntoken_path = \"{}\"\nkubelet_ca_path = \"{}\"\nkubelet_tls_server_name = \"kubelet.test\"\nproc_root = \"{}\"\npoll_retry_interval = \"10ms\"\nmax_poll_attempts = 3\n\n[[entries]]\nspiffe_id = \"spiffe://example.org/ns/{{k8s:ns}}/sa/{{k8s:sa}}\"\nselectors = [\"k8s:ns:agents\"]\n\n{}",
        config.kubelet_secure_port,
        config.token_path.display(),
        config.kubelet_ca_path.display(),
        proc_root.display(),
        common::entry_for_me("local", "local"),
    )
}

/// A /proc tree in which this test process's cgroup file says `cgroup`.
fn proc_tree(cgroup: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(std::process::id().to_string());
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    root
}

fn pod_cgroup() -> String {
    format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope\n",
        POD_UID.replace('-', "_")
    )
}

async fn jwt_subjects(agent: &common::TestAgent) -> Result<Vec<String>, tonic::Status> {
    let mut client = agent.raw_client(true).await;
    let mut subjects = Vec::new();
    for id in [
        "spiffe://example.org/ns/agents/sa/planner",
        "spiffe://example.org/local",
    ] {
        match client
            .fetch_jwtsvid(tether::proto::workload::JwtsvidRequest {
                audience: vec!["api".into()],
                spiffe_id: id.into(),
            })
            .await
        {
            Ok(response) => subjects.extend(
                response
                    .into_inner()
                    .svids
                    .into_iter()
                    .map(|svid| svid.spiffe_id),
            ),
            Err(status) if status.code() == tonic::Code::PermissionDenied => {}
            Err(status) => return Err(status),
        }
    }
    Ok(subjects)
}

#[tokio::test]
async fn a_process_in_a_pod_gets_the_identity_its_namespace_and_service_account_choose() {
    let kubelet = stand_in(Box::new(|_| {
        (200, pod_list(vec![pod(POD_UID, NODE, Some(CONTAINER))]))
    }))
    .await;
    let proc_root = proc_tree(&pod_cgroup());
    let agent = common::TestAgent::start(&k8s_config(&kubelet, proc_root.path())).await;
    let subjects = jwt_subjects(&agent).await.unwrap();
    assert_eq!(
        subjects,
        [
            "spiffe://example.org/ns/agents/sa/planner",
            "spiffe://example.org/local"
        ]
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_pod_the_kubelet_cannot_tell_about_is_refused_with_the_reason() {
    // The kubelet is down.
    let kubelet = stand_in(Box::new(|_| (200, pod_list(vec![])))).await;
    let proc_root = proc_tree(&pod_cgroup());
    let down = refused_port();
    let config = k8s_config(&kubelet, proc_root.path()).replace(
        &format!("kubelet_secure_port = {}", kubelet.addr.port()),
        &format!("kubelet_secure_port = {}", down.port),
    );
    let agent = common::TestAgent::start(&config).await;
    let err = jwt_subjects(&agent).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("unreachable"), "{}", err.message());
    agent.stop().await;
}

#[tokio::test]
async fn a_process_outside_pods_never_waits_for_the_kubelet() {
    // The kubelet is down, but this process is not in a pod: it is attested
    // by the unix attestor alone, and the kubelet is never asked.
    let kubelet = stand_in(Box::new(|_| (200, pod_list(vec![])))).await;
    let proc_root = proc_tree("0::/user.slice/user-1000.slice/session-2.scope\n");
    let agent = common::TestAgent::start(&k8s_config(&kubelet, proc_root.path())).await;
    let subjects = jwt_subjects(&agent).await.unwrap();
    assert_eq!(subjects, ["spiffe://example.org/local"]);
    assert_eq!(kubelet.requests(), 0);
    agent.stop().await;
}

#[tokio::test]
async fn a_failed_fetch_is_shared_by_the_callers_that_waited_for_it() {
    let kubelet = stand_in(Box::new(|_| (500, "kubelet trouble".into()))).await;
    let attestor = std::sync::Arc::new(
        K8sAttestor::new(&K8sAttestorConfig {
            // The failure stands for this long: longer than any run of this
            // test, so every caller that waited for the fetch shares it
            // whatever the machine's speed. (No retry sleeps it: a failed
            // fetch ends the attestation at once.)
            poll_retry_interval: Duration::from_secs(3600),
            ..kubelet.config()
        })
        .unwrap(),
    );
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let attestor = std::sync::Arc::clone(&attestor);
            tokio::spawn(async move { attestor.selectors(&in_pod()).await })
        })
        .collect();
    for caller in callers {
        let err = caller.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("500"), "{err}");
    }
    assert_eq!(kubelet.requests(), 1, "one request for all eight callers");
}
