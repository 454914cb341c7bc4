//! `tether audit verify|tail`, the built binary, on a real trail written
//! through the audit API.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tether::audit::{AuditConfig, AuditEvent, AuditLog, EventKind, Outcome};
use tokio_util::sync::CancellationToken;

/// Guards against a hang; no assertion depends on timing.
const GUARD: Duration = Duration::from_secs(60);

fn tether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env_remove("TETHER_CONFIG")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Six decisions over two tasks, written and synced through the API.
async fn write_trail(dir: &Path) {
    let config = AuditConfig {
        flush_interval: Duration::from_millis(5),
        ..AuditConfig::default()
    };
    let (log, writer) = AuditLog::open(dir, &config, audit_key()).unwrap();
    let cancel = CancellationToken::new();
    let job = tokio::spawn(writer.run(cancel.clone()));
    for i in 0..6 {
        let task = if i % 2 == 0 { "alpha" } else { "beta" };
        log.record(AuditEvent {
            spiffe_id: Some("spiffe://example.org/agent".into()),
            pid: Some(4242),
            task_id: Some(task.into()),
            audience: Some("mcp://jira".into()),
            tools: vec!["jira.search".into()],
            reason: Some(format!("reason {i}")),
            policy_ids: vec!["p0".into()],
            ..AuditEvent::new(EventKind::IssueJwt, Outcome::Allow)
        })
        .unwrap();
    }
    tokio::time::timeout(GUARD, log.flush()).await.unwrap();
    cancel.cancel();
    tokio::time::timeout(GUARD, job).await.unwrap().unwrap();
}

#[tokio::test]
async fn verify_and_tail_a_trail_written_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    write_trail(&dir).await;
    let dir_arg = dir.to_str().unwrap();
    let file = dir.join("audit-000001.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 6);

    // Intact.
    let out = tether(&["audit", "verify", "--dir", dir_arg]);
    assert!(out.status.success(), "{out:?}");
    let said = stdout(&out);
    assert!(
        said.starts_with(
            "audit trail intact: 6 records in 1 file, head seq 6; HEAD sealed by audit key "
        ) && said.ends_with(" (not checked: pass --public-key)\n"),
        "{said}"
    );
    let out = tether(&["audit", "verify", "--dir", dir_arg, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["intact"], true);
    assert_eq!(report["records"], 6);
    assert_eq!(report["head_seq"], 6);

    // The same trail through the agent's config file.
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[audit]\ndir = \"{dir_arg}\"\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let out = tether(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("audit trail intact: 6 records"));
    let out = tether(&[
        "audit",
        "verify",
        "--config",
        config.to_str().unwrap(),
        "--dir",
        dir_arg,
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--config and --dir exclude each other"
    );

    // tail --json --task: the stored lines of that task, byte for byte.
    let out = tether(&[
        "audit", "tail", "--dir", dir_arg, "--json", "--task", "beta",
    ]);
    assert!(out.status.success(), "{out:?}");
    let beta: Vec<&str> = lines
        .iter()
        .skip(1)
        .step_by(2)
        .map(String::as_str)
        .collect();
    assert_eq!(stdout(&out), beta.join("\n") + "\n");
    for line in stdout(&out).lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(json["task_id"], "beta");
    }

    // Readable: one line per record, with its fields.
    let out = tether(&[
        "audit", "tail", "--dir", dir_arg, "--task", "alpha", "-n", "2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let shown: Vec<&str> = text.lines().collect();
    assert_eq!(shown.len(), 2, "{text}");
    assert!(
        shown[0].contains("issue-jwt") && shown[0].contains("allow"),
        "{text}"
    );
    assert!(shown[0].contains("spiffe://example.org/agent"), "{text}");
    assert!(
        shown[0].contains("pid=4242") && shown[0].contains("task=alpha"),
        "{text}"
    );
    assert!(shown[1].contains("reason=\"reason 4\""), "{text}");

    // One character of one record's reason changed: broken, at that line.
    let edited = lines[2].replace("\"reason 2\"", "\"reason 3\"");
    assert_ne!(edited, lines[2]);
    let mut damaged = lines.clone();
    damaged[2] = edited;
    std::fs::write(&file, damaged.join("\n") + "\n").unwrap();
    let out = tether(&["audit", "verify", "--dir", dir_arg]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let verdict = stdout(&out);
    assert!(
        verdict.starts_with(&format!("audit trail broken at {}:3: ", file.display())),
        "{verdict}"
    );
    assert!(verdict.contains("record seq 3 was changed"), "{verdict}");
    assert_eq!(verdict.lines().count(), 1);
}

#[test]
fn a_missing_trail_is_an_error_not_a_verdict() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let out = tether(&["audit", "verify", "--dir", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

/// A fresh audit signing key.
fn audit_key() -> std::sync::Arc<tether::audit::SigningKey> {
    std::sync::Arc::new(tether::audit::SigningKey::generate().unwrap().0)
}
