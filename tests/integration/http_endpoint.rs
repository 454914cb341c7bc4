//! The HTTP endpoint (`[http] listen`) of a real agent: probes and metrics
//! read over HTTP as a kubelet and a Prometheus server would.

use crate::common;

use std::net::SocketAddr;

use common::{TestAgent, entry_for_me};
use tether::proto::workload::JwtsvidRequest;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One HTTP/1.1 request; the status code and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of an unlabelled sample, `name value`.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

#[tokio::test]
async fn probes_and_metrics_answer_over_http() {
    let agent = TestAgent::start(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n{}",
        entry_for_me("svc", "svc")
    ))
    .await;
    let addr = agent.running().http_addr().expect("the endpoint is on");
    assert!(addr.ip().is_loopback());

    assert_eq!(http(addr, "GET", "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http(addr, "GET", "/readyz").await, (200, "ready\n".into()));

    let mut client = agent.raw_client(true).await;
    client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["api".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap();

    // A task, begun, validated for a tool and ended.
    let mut tasks = common::task_client(&agent.socket).await;
    let begun = tasks
        .begin_task(tether::proto::task::BeginTaskRequest {
            audience: "spiffe://example.org/mcp".into(),
            intent: "count things".into(),
            tools: vec!["count".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let validated = tasks
        .validate_task_token(tether::proto::task::ValidateTaskTokenRequest {
            token: begun.token.unwrap().token,
            audience: "spiffe://example.org/mcp".into(),
            tool: "count".into(),
            presenter_certificate: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(validated.valid, "{}", validated.reason);
    let (_, metrics) = http(addr, "GET", "/metrics").await;
    assert_eq!(sample(&metrics, "tether_tasks_active"), 1.0);
    tasks
        .end_task(tether::proto::task::EndTaskRequest {
            task_id: begun.task_id,
        })
        .await
        .unwrap();

    let (status, metrics) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(sample(&metrics, "tether_jwt_svids_issued_total") >= 1.0);
    assert!(sample(&metrics, "tether_attestation_seconds_count") >= 1.0);
    assert_eq!(sample(&metrics, "tether_tasks_active"), 0.0);
    assert!(sample(&metrics, r#"tether_task_tokens_issued_total{kind="begin"}"#) >= 1.0);
    assert!(sample(&metrics, r#"tether_tasks_ended_total{reason="completed"}"#) >= 1.0);
    assert!(
        sample(
            &metrics,
            r#"tether_validations_total{api="task_token",result="valid"}"#
        ) >= 1.0
    );
    assert!(metrics.contains("# TYPE tether_attestation_seconds histogram"));
    assert_eq!(sample(&metrics, "tether_kubelet_errors_total"), 0.0);
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");

    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);
    assert_eq!(http(addr, "GET", "/nope").await.0, 404);
    agent.stop().await;
}

#[tokio::test]
async fn without_http_listen_there_is_no_endpoint() {
    let agent = TestAgent::start(&entry_for_me("svc", "svc")).await;
    assert_eq!(agent.running().http_addr(), None);
    agent.stop().await;
}
