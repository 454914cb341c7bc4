//! `tether run` as a process: start, serve, stop on SIGTERM, recover from a
//! crash, refuse a second agent, refuse bad configuration.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{entry_for_me, eventually, until_handling};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

fn write_config(dir: &Path, name: &str, data: &str) -> std::path::PathBuf {
    let text = format!(
        "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\ndata_dir = \"{}\"\n{}",
        dir.join("agent.sock").display(),
        dir.join(format!("{data}-admin/admin.sock")).display(),
        dir.join(data).display(),
        entry_for_me("svc", "main")
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn start(config: &Path) -> Child {
    tether()
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tether starts")
}

/// Waits until the agent answers on its socket.
async fn wait_serving(socket: &Path) -> spiffe::WorkloadApiClient {
    eventually(
        format!("the agent to serve on {}", socket.display()),
        async || {
            let client =
                spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
                    .await?;
            client.fetch_x509_svid().await?;
            Ok::<_, spiffe::workload_api::error::WorkloadApiError>(client)
        },
    )
    .await
}

/// Waits for the agent to exit without blocking the runtime: the clients
/// in this test must keep answering the agent's HTTP/2 shutdown PING.
async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    eventually("the agent to exit", async || child.try_wait().unwrap()).await
}

/// `tether run` in `dir`, serving and ready for SIGTERM; its socket.
async fn serving(dir: &Path) -> (Child, std::path::PathBuf) {
    let config = write_config(dir, "agent.toml", "data");
    let socket = dir.join("agent.sock");
    let agent = start(&config);
    wait_serving(&socket).await;
    // Serving comes a moment before the handlers are installed.
    until_handling(agent.id(), Signal::SIGTERM).await;
    (agent, socket)
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_unlinks_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, socket) = serving(dir.path()).await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o777,
        "world-connectable: attestation decides"
    );

    kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut agent).await;
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "socket unlinked on SIGTERM");
}

#[tokio::test]
async fn restarts_after_a_crash_and_refuses_to_share_a_live_socket() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "agent.toml", "data");
    let socket = dir.path().join("agent.sock");
    let mut agent = start(&config);
    let client = wait_serving(&socket).await;
    let bundle_before = client.fetch_x509_bundles().await.unwrap();

    // A second agent on the same socket (own data dir) is refused.
    let other = write_config(dir.path(), "other.toml", "other-data");
    let out = tether()
        .args(["run", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use"), "{stderr}");

    // kill -9: the socket file stays behind, stale.
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(socket.exists(), "a crash leaves the socket file");
    let mut agent = start(&config);
    let client = wait_serving(&socket).await;
    until_handling(agent.id(), Signal::SIGINT).await;
    let bundle_after = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    assert_eq!(
        bundle_before.get(&td).unwrap().authorities(),
        bundle_after.get(&td).unwrap().authorities(),
        "same trust bundle after the crash"
    );
    kill(Pid::from_raw(agent.id() as i32), Signal::SIGINT).unwrap();
    assert!(wait_exit(&mut agent).await.success());
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("trust_domain = \"not a domain\"\n", "trust_domain"),
        ("x509_svid_ttl = \"0s\"\n", "x509_svid_ttl"),
        (
            "[[entries]]\nspiffe_id = \"spiffe://tether.local/x\"\nselectors = [\"1000\"]\n",
            "entries[0]",
        ),
        ("unknown_key = true\n", "unknown_key"),
        (
            "[[entries]]\nspiffe_id = \"spiffe://elsewhere.org/x\"\nselectors = [\"unix:uid:1\"]\n",
            "outside the agent's trust domain",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = tether()
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{text}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let out = tether()
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn the_embedded_default_gives_the_user_an_identity() {
    // `tether run` with no config: the user who started it gets
    // spiffe://tether.local/uid/<uid>. Paths come from the environment.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut agent = tether()
        .arg("run")
        .env_remove("TETHER_CONFIG")
        .env("TETHER_SOCKET_PATH", &socket)
        .env("TETHER_DATA_DIR", dir.path().join("data"))
        .env("TETHER_ADMIN_SOCKET", dir.path().join("admin/admin.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = wait_serving(&socket).await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://tether.local/uid/{}", common::uid())
    );
    until_handling(agent.id(), Signal::SIGTERM).await;
    kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut agent).await.success());
}

#[tokio::test]
async fn what_a_caller_writes_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, socket) = serving(dir.path()).await;
    let mut tasks = common::task_client(&socket).await;
    let forged = "read the tickets\n2026-01-01T00:00:00Z  INFO tether::task: task ended \
                  task_id=FAKE reason=revoked\u{1b}[2J\u{1b}[31m";
    tasks
        .begin_task(tether::proto::task::BeginTaskRequest {
            audience: "https://mcp.example/jira".into(),
            intent: forged.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut agent).await.success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("task begun"), "{log}");
    for line in log.lines().filter(|l| l.contains("task_id=FAKE")) {
        assert!(line.contains("task begun"), "a forged line: {line}");
    }
    assert!(!log.contains('\u{1b}'), "a raw escape sequence in the log");
}

/// Issue 16, item 1: a start that fails leaves nothing running. The HTTP
/// listener used to be bound after six loops and the audit writer were
/// spawned: its failure left them running, the audit writer holding its
/// directory's lock after the data dir's was released, so the next start
/// in the same process found the trail "in use by another tether agent".
#[tokio::test]
async fn a_start_that_fails_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let error = common::start_in(
        dir.path(),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("binding the HTTP endpoint"),
        "{error:#}"
    );
    // Nothing of the failed start holds the data dir, the audit trail or
    // the sockets: the same agent starts at once.
    let running = common::start_in(dir.path(), "").await.unwrap();
    running.stop().await.unwrap();
}

/// The `tether: error:` line of a failed run (the logs share stderr).
fn error_line(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("tether: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    lines[0].to_owned()
}

#[test]
fn a_failing_run_prints_what_failed_and_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();

    // No config file: the path and the OS error, once each, exit 64.
    let missing = dir.path().join("missing.toml");
    let out = tether()
        .args(["run", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let line = error_line(&out.stderr);
    assert_eq!(
        line,
        format!(
            "tether: error: config file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );

    // The agent's start fails below the config (policy_dir is a file):
    // the context, the path and the OS error, once each, exit 1.
    let config = write_config(dir.path(), "agent.toml", "data");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.insert_str(0, &format!("policy_dir = \"{}\"\n", config.display()));
    std::fs::write(&config, text).unwrap();
    let out = tether()
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = error_line(&out.stderr);
    assert_eq!(
        line,
        format!(
            "tether: error: loading policies: reading {}: Not a directory (os error 20)",
            config.display()
        )
    );
}
