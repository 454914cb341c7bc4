//! Policy and audit against the real agent: Cedar decisions at BeginTask,
//! ExchangeToken and FetchJWTSVID, reloads without a restart, the audit
//! records of each decision, `tether audit verify` on the agent's own
//! trail, and issuance stopping when the trail cannot keep up.

use crate::common;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{PATIENCE, TestAgent, admin_client, claims_of, entry_for_me, uid};
use tether::audit::{AuditRecord, EventKind, Outcome, ReadFilter};
use tether::proto::admin as admin_pb;
use tether::proto::task as pb;
use tether::proto::workload as wl;
use tonic::Code;

const JIRA: &str = "spiffe://example.org/mcp/jira";
const AGENT: &str = "spiffe://example.org/agent";
const DOWNSTREAM: &str = "https://downstream.example/api";

const ALLOW_ALL: &str = "@id(\"allow-all\")\npermit (principal, action, resource);\n";

const NO_SHELL: &str = r#"// Shell tools are never delegated.
@id("no-shell")
@reason("shell tools are never delegated")
forbid (principal, action == Action::"BeginTask", resource)
when { context.tools.contains("shell.exec") };
"#;

const NO_DELETE: &str = r#"@id("no-delete")
forbid (principal, action == Action::"BeginTask", resource)
when { context.tools.contains("jira.delete") };
"#;

/// A policy directory holding `files`.
fn policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Puts `text` in `dir/name` in one step, as the watcher must see it: a
/// plain write could be read half done (empty, or cut) by a poll.
fn write_policy(dir: &Path, name: &str, text: &str) {
    let hidden = dir.join(format!(".{name}.tmp"));
    std::fs::write(&hidden, text).unwrap();
    std::fs::rename(&hidden, dir.join(name)).unwrap();
}

/// The config lines for an agent whose process is both the agent workload
/// and the Jira MCP server, under the policies in `policies`.
fn config_for(policies: &Path, more: &str) -> String {
    format!(
        "policy_dir = \"{}\"\n{more}{}{}audiences = [\"https://mcp.example/jira\"]\n",
        policies.display(),
        entry_for_me("agent", "agent"),
        entry_for_me("mcp/jira", "mcp"),
    )
}

fn begin(audience: &str, tools: &[&str]) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        audience: audience.into(),
        intent: "summarise the Q3 tickets".into(),
        tools: tools.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    }
}

fn audit_dir(agent: &TestAgent) -> PathBuf {
    agent.dir.path().join("data/audit")
}

/// Every record the agent has written, once all it acknowledged is synced.
async fn records(agent: &TestAgent) -> Vec<AuditRecord> {
    tokio::time::timeout(PATIENCE, agent.running().audit().flush())
        .await
        .expect("the audit trail syncs");
    tether::audit::read(&audit_dir(agent), &ReadFilter::default()).unwrap()
}

#[tokio::test]
async fn a_policy_forbidding_a_tool_denies_begin_task_naming_it_and_audits_both_decisions() {
    let policies = policy_dir(&[("allow.cedar", ALLOW_ALL), ("tools.cedar", NO_SHELL)]);
    let agent = TestAgent::start(&config_for(policies.path(), "")).await;
    let mut tasks = agent.tasks().await;

    let denied = tasks
        .begin_task(begin(JIRA, &["jira.read", "shell.exec"]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("no-shell")
            && denied.message().contains("shell tools are never delegated"),
        "{}",
        denied.message()
    );
    let begun = tasks
        .begin_task(begin(JIRA, &["jira.read"]))
        .await
        .unwrap()
        .into_inner();
    let jti = claims_of(&begun.token.unwrap().token)["jti"]
        .as_str()
        .unwrap()
        .to_owned();

    let records = records(&agent).await;
    let deny = records
        .iter()
        .find(|r| r.event.event == EventKind::Deny)
        .expect("a deny record");
    assert_eq!(deny.event.decision, Outcome::Deny);
    assert_eq!(deny.event.policy_ids, ["no-shell"]);
    assert_eq!(deny.event.spiffe_id.as_deref(), Some(AGENT));
    assert_eq!(
        deny.event.pid,
        Some(i32::try_from(std::process::id()).unwrap())
    );
    assert_eq!(deny.event.uid, Some(uid()));
    assert_eq!(
        deny.event.executable.as_deref(),
        Some(std::env::current_exe().unwrap().to_str().unwrap())
    );
    assert_eq!(deny.event.audience.as_deref(), Some(JIRA));
    assert_eq!(
        deny.event.intent.as_deref(),
        Some("summarise the Q3 tickets")
    );
    assert_eq!(deny.event.tools, ["jira.read", "shell.exec"]);
    assert!(
        deny.event.reason.as_deref().unwrap().contains("BeginTask"),
        "{:?}",
        deny.event.reason
    );

    let allowed = records
        .iter()
        .find(|r| r.event.event == EventKind::TaskBegin)
        .expect("a task-begin record");
    assert_eq!(allowed.event.decision, Outcome::Allow);
    assert_eq!(allowed.event.policy_ids, ["allow-all"]);
    assert_eq!(
        allowed.event.task_id.as_deref(),
        Some(begun.task_id.as_str())
    );
    assert_eq!(allowed.event.token_id.as_deref(), Some(jti.as_str()));
    assert_eq!(allowed.event.tools, ["jira.read"]);
    assert!(
        records.iter().all(|r| !r.line.contains("eyJ")),
        "no record holds a token"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_malformed_begin_task_is_invalid_before_any_policy_decides() {
    let forbid_all = "@id(\"nothing\")\nforbid (principal, action, resource);\n";
    let policies = policy_dir(&[("forbid.cedar", forbid_all)]);
    let agent = TestAgent::start(&config_for(policies.path(), "")).await;
    let mut tasks = agent.tasks().await;
    let huge_ttl = pb::BeginTaskRequest {
        ttl_ms: u64::MAX,
        ..begin(JIRA, &["jira.read"])
    };
    for (request, field) in [
        (begin(JIRA, &["not a tool!"]), "tools"),
        (huge_ttl, "ttl"),
        (begin("two audiences", &["jira.read"]), "audience"),
    ] {
        let refused = tasks.begin_task(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{}", refused.message());
    }
    // The policy still decides a well-formed request.
    let denied = tasks
        .begin_task(begin(JIRA, &["jira.read"]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denials: Vec<_> = records(&agent)
        .await
        .into_iter()
        .filter(|r| r.event.event == EventKind::Deny)
        .collect();
    assert_eq!(
        denials.len(),
        1,
        "only the well-formed request: {denials:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_policy_file_change_applies_without_a_restart_and_a_broken_one_changes_nothing() {
    let policies = policy_dir(&[("allow.cedar", ALLOW_ALL)]);
    let agent = TestAgent::start(&config_for(
        policies.path(),
        "policy_poll_interval = \"20ms\"\n",
    ))
    .await;
    let mut tasks = agent.tasks().await;
    tasks
        .begin_task(begin(JIRA, &["jira.delete"]))
        .await
        .expect("allowed before the change");

    // The watcher sees the new file; the next request is decided by it.
    write_policy(policies.path(), "delete.cedar", NO_DELETE);
    let last = common::eventually("the new policy denies jira.delete", async || {
        match tasks.begin_task(begin(JIRA, &["jira.delete"])).await {
            Err(status) if status.code() == Code::PermissionDenied => {
                Some(status.message().to_owned())
            }
            _ => None,
        }
    })
    .await;
    assert!(last.contains("no-delete"), "{last}");
    // The watcher records the reload once the new set is in force: a
    // request may be decided by it first.
    let reload = common::eventually("the reload is audited", async || {
        records(&agent)
            .await
            .into_iter()
            .find(|r| r.event.event == EventKind::PolicyReload)
    })
    .await;
    assert_eq!(reload.event.policy_ids, ["allow-all", "no-delete"]);

    // A file that does not parse: refused with its place, and audited;
    // the set in force stays.
    write_policy(
        policies.path(),
        "broken.cedar",
        "@id(\"broken\")\npermit (principal, action, resource)\nwhen { context.nope };\n",
    );
    let refused = common::eventually("the broken set is refused", async || {
        records(&agent)
            .await
            .into_iter()
            .find(|r| r.event.event == EventKind::PolicyReload && r.event.decision == Outcome::Deny)
    })
    .await;
    let reason = refused.event.reason.unwrap();
    assert!(reason.contains("broken.cedar:3"), "{reason}");
    let still = tasks
        .begin_task(begin(JIRA, &["jira.delete"]))
        .await
        .unwrap_err();
    assert!(still.message().contains("no-delete"), "{}", still.message());
    tasks
        .begin_task(begin(JIRA, &["jira.read"]))
        .await
        .expect("the rest of the set still allows");
    agent.stop().await;
}

#[tokio::test]
async fn tether_reload_applies_policies_at_once_and_refuses_a_broken_set() {
    let dir = tempfile::tempdir().unwrap();
    let policies = policy_dir(&[("allow.cedar", ALLOW_ALL)]);
    let path = dir.path().join("agent.toml");
    let text = common::config_text(
        dir.path(),
        // The watcher would not see the change for an hour.
        &config_for(policies.path(), "policy_poll_interval = \"1h\"\n"),
    );
    std::fs::write(&path, text).unwrap();
    let config =
        tether::config::Config::load(Some(&path), &tether::config::MapEnv::default()).unwrap();
    let running = tether::daemon::start(config).await.unwrap();
    let mut admin = admin_client(running.admin_socket_path()).await;
    let mut tasks = common::task_client(running.socket_path()).await;

    std::fs::write(policies.path().join("delete.cedar"), NO_DELETE).unwrap();
    admin.reload(admin_pb::ReloadRequest {}).await.unwrap();
    let denied = tasks
        .begin_task(begin(JIRA, &["jira.delete"]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("no-delete"),
        "{}",
        denied.message()
    );

    // A policy naming an attribute the schema does not have.
    std::fs::write(
        policies.path().join("unknown.cedar"),
        "permit (principal, action, resource)\nwhen { principal.team == \"red\" };\n",
    )
    .unwrap();
    let err = admin.reload(admin_pb::ReloadRequest {}).await.unwrap_err();
    assert!(
        err.message().contains("unknown.cedar:2"),
        "file and line: {}",
        err.message()
    );
    let still = tasks
        .begin_task(begin(JIRA, &["jira.delete"]))
        .await
        .unwrap_err();
    assert!(still.message().contains("no-delete"), "{}", still.message());

    // All or nothing: new policy files (no-delete gone) with a config file
    // whose federated bundle cannot be read. The reload is refused, and the
    // policies in force are still the old ones (they used to be swapped in
    // before the bundle was read, and stayed).
    std::fs::remove_file(policies.path().join("unknown.cedar")).unwrap();
    std::fs::remove_file(policies.path().join("delete.cedar")).unwrap();
    let base = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{base}[[federation]]\ntrust_domain = \"other.org\"\nbundle_path = \"{}\"\n",
            dir.path().join("missing-bundle.json").display()
        ),
    )
    .unwrap();
    let err = admin.reload(admin_pb::ReloadRequest {}).await.unwrap_err();
    assert!(
        err.message().contains("missing-bundle.json"),
        "{}",
        err.message()
    );
    let still = tasks
        .begin_task(begin(JIRA, &["jira.delete"]))
        .await
        .unwrap_err();
    assert!(still.message().contains("no-delete"), "{}", still.message());
    // The file fixed: the new policies are in force.
    std::fs::write(&path, base).unwrap();
    admin.reload(admin_pb::ReloadRequest {}).await.unwrap();
    tasks
        .begin_task(begin(JIRA, &["jira.delete"]))
        .await
        .unwrap();
    running.stop().await.unwrap();
}

#[tokio::test]
async fn exchange_to_an_audience_the_policy_does_not_name_is_refused() {
    let exchange = format!(
        r#"@id("tasks")
permit (
  principal,
  action in [Action::"BeginTask", Action::"RenewTask", Action::"FetchJWTSVID", Action::"UseTool"],
  resource
);

@id("jira-to-downstream")
permit (
  principal == Workload::"{JIRA}",
  action == Action::"ExchangeToken",
  resource == Audience::"{DOWNSTREAM}"
);
"#
    );
    let policies = policy_dir(&[("exchange.cedar", &exchange)]);
    let agent = TestAgent::start(&config_for(policies.path(), "")).await;
    let mut tasks = agent.tasks().await;
    let subject = tasks
        .begin_task(begin(JIRA, &["jira.read"]))
        .await
        .unwrap()
        .into_inner();
    let subject_token = subject.token.unwrap().token;
    let exchange_to = |audience: &str| pb::ExchangeTokenRequest {
        subject_token: subject_token.clone(),
        audience: audience.into(),
        tools: Vec::new(),
        bind_certificate: Vec::new(),
        subject_presenter_certificate: Vec::new(),
    };

    let refused = tasks
        .exchange_token(exchange_to("https://elsewhere.example/api"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("denied by policy"),
        "{}",
        refused.message()
    );
    let exchanged = tasks
        .exchange_token(exchange_to(DOWNSTREAM))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(claims_of(&exchanged.token)["aud"], DOWNSTREAM);

    let records = records(&agent).await;
    let deny = records
        .iter()
        .find(|r| r.event.event == EventKind::Deny)
        .expect("the refusal is audited");
    assert_eq!(deny.event.spiffe_id.as_deref(), Some(JIRA), "the exchanger");
    assert_eq!(
        deny.event.audience.as_deref(),
        Some("https://elsewhere.example/api")
    );
    assert_eq!(
        deny.event.task_id.as_deref(),
        Some(subject.task_id.as_str())
    );
    let allowed = records
        .iter()
        .find(|r| r.event.event == EventKind::Exchange)
        .expect("the exchange is audited");
    assert_eq!(allowed.event.policy_ids, ["jira-to-downstream"]);
    assert_eq!(allowed.event.audience.as_deref(), Some(DOWNSTREAM));
    assert_eq!(allowed.event.actors, [JIRA]);
    agent.stop().await;
}

#[tokio::test]
async fn audit_verify_passes_on_the_agents_trail_and_names_the_line_after_tampering() {
    let policies = policy_dir(&[("allow.cedar", ALLOW_ALL)]);
    let agent = TestAgent::start(&config_for(policies.path(), "")).await;
    let client = agent.spiffe_client().await;
    client.fetch_x509_svid().await.unwrap();
    client
        .fetch_jwt_svid(&["https://api.example"], None)
        .await
        .unwrap();
    let mut tasks = agent.tasks().await;
    let begun = tasks
        .begin_task(begin(JIRA, &["jira.read"]))
        .await
        .unwrap()
        .into_inner();
    tasks
        .end_task(pb::EndTaskRequest {
            task_id: begun.task_id,
        })
        .await
        .unwrap();
    let dir = audit_dir(&agent);
    // Stopped, with its directory kept: verify works on a trail at rest.
    let TestAgent {
        running,
        dir: _keep,
        ..
    } = agent;
    running.unwrap().stop().await.unwrap();

    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["audit", "verify", "--dir"])
            .arg(&dir)
            .env_remove("TETHER_CONFIG")
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.starts_with("audit trail intact: "), "{said}");

    let file = dir.join("audit-000001.jsonl");
    let original = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let events: Vec<String> = lines
        .iter()
        .map(|l| {
            let record: serde_json::Value = serde_json::from_str(l).unwrap();
            record["event"].as_str().unwrap().to_owned()
        })
        .collect();
    for wanted in ["issue-x509", "issue-jwt", "task-begin", "task-end"] {
        assert!(events.iter().any(|e| e == wanted), "{wanted} in {events:?}");
    }
    assert!(lines.len() >= 4);

    // An edited record: the verdict names the file and line.
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    edited[2] = edited[2].replacen("\"decision\":\"allow\"", "\"decision\":\"deny\"", 1);
    edited[2] = edited[2].replacen(&format!("\"pid\":{}", std::process::id()), "\"pid\":1", 1);
    assert_ne!(edited[2], lines[2], "the test changed something");
    std::fs::write(&file, edited.join("\n") + "\n").unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let verdict = String::from_utf8(out.stdout).unwrap();
    assert!(
        verdict.starts_with(&format!("audit trail broken at {}:3: ", file.display())),
        "{verdict}"
    );

    // A removed record: named too.
    let mut removed: Vec<&str> = lines.clone();
    removed.remove(1);
    std::fs::write(&file, removed.join("\n") + "\n").unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let verdict = String::from_utf8(out.stdout).unwrap();
    assert!(
        verdict.starts_with(&format!("audit trail broken at {}:2: ", file.display())),
        "{verdict}"
    );

    // Put back as written: intact again.
    std::fs::write(&file, &original).unwrap();
    assert!(verify().status.success());
}

/// A full audit queue: the agent is started as the real binary with its
/// records also printed on a stdout pipe nobody reads. Once the pipe is
/// full the writer waits, the queue fills, and issuance stops with a clear
/// status, and health says why; draining the pipe brings it back.
#[tokio::test]
async fn a_stalled_audit_writer_stops_issuance_with_a_clear_status_until_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        common::config_text(
            dir.path(),
            &format!(
                "{}[audit]\nstdout = true\nqueue = 4\nflush_interval = \"1ms\"\n",
                entry_for_me("svc", "svc")
            ),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stalled_stdout = child.stdout.take().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut client = common::eventually("the agent to serve", async || {
        common::try_uds_channel(&socket).await.ok()?;
        let mut client = common::raw_client(&socket, true).await;
        client
            .fetch_jwtsvid(wl::JwtsvidRequest {
                audience: vec!["warm-up".into()],
                spiffe_id: String::new(),
            })
            .await
            .ok()?;
        Some(client)
    })
    .await;

    // Ask until the agent refuses: each JWT-SVID is a record; the pipe
    // (64 KiB) fills after a few hundred, then the writer stalls. On a busy machine
    // the queue can also fill for a moment before the pipe does (the writer
    // was not scheduled yet): only a refusal while health reports the
    // stalled log counts, so keep asking until both say so.
    let mut admin = admin_client(&dir.path().join("admin/admin.sock")).await;
    let mut stalled = None;
    for _ in 0..100_000 {
        let Err(refusal) = client
            .fetch_jwtsvid(wl::JwtsvidRequest {
                audience: vec!["https://api.example".into()],
                spiffe_id: String::new(),
            })
            .await
        else {
            continue;
        };
        assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
        // Refused because this request's record is not written in time
        // (the writer is stuck on the pipe), or, for later requests, not
        // even queued (the queue is full).
        assert!(
            refusal.message().contains("audit")
                && (refusal.message().contains("queue is full")
                    || refusal.message().contains("stalled")),
            "{}",
            refusal.message()
        );
        let health = admin
            .health(admin_pb::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        if !health.serving {
            stalled = Some(health);
            break;
        }
    }
    let health = stalled.expect("issuance stops, and health says so, once the audit queue is full");
    assert!(
        health.problems.iter().any(|p| p.contains("audit")),
        "{:?}",
        health.problems
    );

    // Someone reads the records again: issuance resumes.
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stalled_stdout.read_to_end(&mut sink);
        sink
    });
    common::eventually("issuance resumes once the records drain", async || {
        client
            .fetch_jwtsvid(wl::JwtsvidRequest {
                audience: vec!["https://api.example".into()],
                spiffe_id: String::new(),
            })
            .await
            .ok()
    })
    .await;
    let health = admin
        .health(admin_pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.serving, "{:?}", health.problems);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let printed = String::from_utf8(drain.join().unwrap()).unwrap();
    let first: serde_json::Value = serde_json::from_str(printed.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1, "stdout carries the records themselves");
}
