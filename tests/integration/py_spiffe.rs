//! A second client in another language: py-spiffe (`spiffe` on PyPI) in a
//! venv, unmodified, against the real agent.
//!
//! Needs `TETHER_TEST_PYTHON` pointing at a Python with py-spiffe
//! installed; `scripts/test` creates that venv and runs these tests.

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use common::{TestAgent, entry_for_me};

fn python() -> String {
    std::env::var("TETHER_TEST_PYTHON").expect(
        "TETHER_TEST_PYTHON must name a python with py-spiffe installed (scripts/test sets it up)",
    )
}

fn script() -> String {
    format!("{}/tests/py/workload_client.py", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
#[ignore = "needs a venv with py-spiffe: run scripts/test"]
async fn py_spiffe_fetches_and_validates() {
    let agent = TestAgent::start(&entry_for_me("py", "py")).await;
    let out = tokio::task::spawn_blocking({
        let endpoint = agent.endpoint();
        move || {
            Command::new(python())
                .arg(script())
                .args(["identity", "spiffe://example.org/py"])
                .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
                .output()
                .expect("python runs")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ok\": true"), "{stdout}");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs a venv with py-spiffe, and root: scripts/test runs it"]
async fn py_spiffe_under_an_unregistered_uid_is_denied() {
    common::require_root("spawning a client under another uid");
    let agent = TestAgent::start(&entry_for_me("root-only", "root")).await;
    // The nobody user must be able to reach the socket: attestation, not
    // file permissions, is what refuses it.
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = tokio::task::spawn_blocking({
        let endpoint = agent.endpoint();
        move || {
            Command::new(python())
                .arg(script())
                .args(["denied", "-"])
                .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
                .env("HOME", "/tmp")
                .uid(65534)
                .gid(65534)
                .output()
                .expect("python runs")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "expected a denial: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("denied"), "{stdout}");
    agent.stop().await;
}
