//! The task commands (`tether task run|list|show|revoke`, `tether token
//! exchange|validate`): the built binary against a real agent started in
//! this process. This process is both the agent workload and the MCP
//! server (two entries on its uid), as in task_tokens.rs. Exit codes
//! and output are the contract checked here; timeouts are failure guards
//! only.

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::cli::{
    assert_exit, assert_fails, finish, json, output, path_str, run, stderr, stdout, tether,
};
use common::{PATIENCE, TestAgent, entry_for_me, eventually};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;
use tether::proto::task as pb;

const JIRA: &str = "spiffe://example.org/mcp/jira";
const DOWNSTREAM: &str = "https://downstream.example/api";

/// An agent where this process (and so the CLI it runs) is both the agent
/// workload (its default identity) and the MCP server.
async fn agent() -> TestAgent {
    let extra = format!(
        "{}{}audiences = [\"https://mcp.example/jira\"]\n",
        entry_for_me("agent", "agent"),
        entry_for_me("mcp/jira", "mcp"),
    );
    TestAgent::start(&extra).await
}

fn socket(agent: &TestAgent) -> String {
    path_str(&agent.socket)
}

fn admin_socket(agent: &TestAgent) -> String {
    path_str(agent.running().admin_socket_path())
}

/// `tether task run` on this agent for JIRA, with `flags`, then `-- sh -c
/// script`.
fn task_run(agent: &TestAgent, flags: &[&str], script: &str) -> Command {
    let socket = socket(agent);
    let mut command = tether(&[
        "task",
        "run",
        "--socket",
        &socket,
        "--audience",
        JIRA,
        "--intent",
        "summarise the Q3 tickets",
        "--tool",
        "jira.read",
        "--tool",
        "jira.search",
    ]);
    command.args(flags).args(["--", "sh", "-c", script]);
    command
}

/// The pid a script wrote to `path`, once it has.
async fn pid_in(path: &Path) -> Pid {
    eventually("the command writes its pid", async || {
        std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    Pid::from_raw(
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    )
}

fn is_gone(pid: Pid) -> bool {
    kill(pid, None) == Err(Errno::ESRCH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_the_task_on_and_ends_it_with_the_commands_status() {
    let agent = agent().await;
    let out = output(
        task_run(
            &agent,
            &[],
            r#"echo "$TETHER_TASK_ID"; echo "$TETHER_TASK_TOKEN"; echo "$SPIFFE_ENDPOINT_SOCKET"; test -n "$TETHER_TASK_TOKEN" || exit 99; exit 7"#,
        ),
        None,
    )
    .await;
    assert_exit(&out, 7);
    let printed = stdout(&out);
    let lines: Vec<&str> = printed.lines().collect();
    let [task_id, token, endpoint] = lines[..] else {
        panic!("three lines expected:\n{printed}");
    };
    assert!(!task_id.is_empty() && !token.is_empty(), "{printed}");
    assert_eq!(endpoint, format!("unix://{}", socket(&agent)));
    assert_eq!(common::claims_of(token)["txn"], task_id);

    // The operator's view: ended, completed.
    let admin = admin_socket(&agent);
    let shown = run(&["task", "show", task_id, "--json", "--admin-socket", &admin]).await;
    assert_exit(&shown, 0);
    let task = json(&shown);
    assert_eq!(task["id"], task_id);
    assert_eq!(task["state"], "ended");
    assert_eq!(task["end_reason"], "completed");
    assert_eq!(task["audience"], JIRA);
    assert_eq!(
        task["tools"],
        serde_json::json!(["jira.read", "jira.search"])
    );
    assert_eq!(task["spiffe_id"], "spiffe://example.org/agent");
    assert!(task["ended_at"].is_string() && task["deadline"].is_string());
    let readable = run(&["task", "show", task_id, "--admin-socket", &admin]).await;
    assert_exit(&readable, 0);
    assert!(
        stdout(&readable).contains("State:        ended: completed"),
        "{}",
        stdout(&readable)
    );

    // Its token is dead.
    let socket = socket(&agent);
    let checked = run(&[
        "token",
        "validate",
        "--socket",
        &socket,
        "--token",
        token,
        "--audience",
        JIRA,
    ])
    .await;
    assert_fails(&checked, 1, "invalid: ");
    assert!(stderr(&checked).contains("ended"), "{}", stderr(&checked));
    assert!(stdout(&checked).is_empty(), "{}", stdout(&checked));
    let as_json = run(&[
        "token",
        "validate",
        "--socket",
        &socket,
        "--token",
        token,
        "--audience",
        JIRA,
        "--json",
    ])
    .await;
    assert_exit(&as_json, 1);
    assert_eq!(json(&as_json)["valid"], false);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_running_task_stops_the_command_and_the_runner_exits_1() {
    let agent = agent().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let pid_file = dir.path().join("pid");
    let runner = task_run(
        &agent,
        &["--token-file", token_file.to_str().unwrap()],
        &format!(
            r#"test "$TETHER_TASK_TOKEN_FILE" = "{}" || exit 99; echo $$ > {}; exec sleep 30"#,
            token_file.display(),
            pid_file.display()
        ),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let runner_pid = runner.id();
    let sleeper = pid_in(&pid_file).await;

    // The token file: there, 0600, holding a valid token of the task.
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let socket = socket(&agent);
    let checked = run(&[
        "token",
        "validate",
        "--socket",
        &socket,
        "--token",
        &token,
        "--audience",
        JIRA,
        "--json",
    ])
    .await;
    assert_exit(&checked, 0);
    let checked = json(&checked);
    assert_eq!(checked["valid"], true);
    let task_id = checked["task_id"].as_str().unwrap().to_owned();

    // The operator sees it, owned by the runner.
    let admin = admin_socket(&agent);
    let listed = run(&["task", "list", "--json", "--admin-socket", &admin]).await;
    assert_exit(&listed, 0);
    let listed = json(&listed);
    let task = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task_id.as_str())
        .unwrap_or_else(|| panic!("task {task_id} not listed: {listed}"));
    assert_eq!(task["owner_pid"], runner_pid);
    assert_eq!(task["state"], "active");
    assert_eq!(task["end_reason"], Value::Null);
    let table = run(&["task", "list", "--admin-socket", &admin]).await;
    assert_exit(&table, 0);
    let table = stdout(&table);
    assert!(table.starts_with("ID "), "{table}");
    for column in [
        "SPIFFE ID",
        "OWNER PID",
        "AUDIENCE",
        "TOOLS",
        "DEADLINE",
        "TOKENS",
        "STATE",
    ] {
        assert!(table.lines().next().unwrap().contains(column), "{table}");
    }
    let row = table.lines().find(|l| l.contains(&task_id)).unwrap();
    assert!(row.contains(&format!(" {runner_pid} ")), "{row}");
    assert!(row.contains("jira.read,jira.search"), "{row}");
    assert!(row.ends_with("active"), "{row}");
    assert!(
        row.contains("(in "),
        "the deadline is shown relative too: {row}"
    );

    // Revoked: the command is stopped, the runner says why and exits 1.
    let revoked = run(&["task", "revoke", &task_id, "--admin-socket", &admin]).await;
    assert_exit(&revoked, 0);
    assert!(
        stdout(&revoked).contains("ended: revoked"),
        "{}",
        stdout(&revoked)
    );
    let out = finish(runner).await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    assert!(is_gone(sleeper), "the command was stopped and reaped");
    assert!(!token_file.exists(), "the dead token's file is removed");
    let all = run(&["task", "list", "--all", "--json", "--admin-socket", &admin]).await;
    assert_exit(&all, 0);
    assert!(
        json(&all)["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == task_id.as_str() && t["end_reason"] == "revoked"),
        "{}",
        stdout(&all)
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_follows_its_task_across_an_agent_restart() {
    let extra = format!(
        "{}{}",
        entry_for_me("agent", "agent"),
        entry_for_me("mcp/jira", "mcp")
    );
    let mut agent = TestAgent::start(&extra).await;
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!(
        r#"echo "$TETHER_TASK_ID" > {}.tmp; mv {}.tmp {}; exec sleep 30"#,
        ready.display(),
        ready.display(),
        ready.display()
    );
    let runner = task_run(&agent, &[], &script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the command starts", async || ready.exists()).await;
    let task_id = std::fs::read_to_string(&ready).unwrap().trim().to_owned();

    // The task outlives the restart, and the runner keeps following it: a
    // revocation after the restart still reaches the command.
    agent.restart(&extra).await;
    let admin = admin_socket(&agent);
    let revoked = run(&["task", "revoke", &task_id, "--admin-socket", &admin]).await;
    assert_exit(&revoked, 0);
    let out = finish(runner).await;
    assert_exit(&out, 1);
    let message = stderr(&out);
    assert!(message.contains("revoked"), "{message}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_exits_128_plus_the_signal() {
    let agent = agent().await;
    let out = output(task_run(&agent, &[], "kill -TERM $$"), None).await;
    assert_exit(&out, 143);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_for_the_runner_are_forwarded_to_the_command() {
    let agent = agent().await;
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!(
        "trap 'exit 42' TERM; echo $$ > {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let runner = task_run(&agent, &[], &script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let runner_pid = Pid::from_raw(i32::try_from(runner.id()).unwrap());
    pid_in(&ready).await;
    kill(runner_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = finish(runner).await;
    assert_exit(&out, 42);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descendants_get_the_tasks_token_from_the_workload_api() {
    let agent = agent().await;
    // A grandchild asks the standard FetchJWTSVID, knowing nothing of tasks.
    let script = format!(
        r#"echo "$TETHER_TASK_ID"; sh -c '"$TETHER" api fetch jwt --audience {JIRA} --token-only --timeout {}s'"#,
        PATIENCE.as_secs()
    );
    let mut command = task_run(&agent, &[], &script);
    command.env("TETHER", env!("CARGO_BIN_EXE_tether"));
    let out = output(command, None).await;
    assert_exit(&out, 0);
    let printed = stdout(&out);
    let mut lines = printed.lines();
    let (task_id, token) = (lines.next().unwrap(), lines.next().unwrap());
    assert_eq!(common::claims_of(token)["txn"], task_id, "{printed}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_command_leaves_running_is_stopped_and_reaped() {
    let agent = agent().await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("orphan");
    let script = format!(
        "sleep 30 >/dev/null 2>&1 & echo $! > {}; exit 0",
        pid_file.display()
    );
    // The grace is how long the runner waits before SIGTERM, then again
    // before SIGKILL, then for the reaping: generous, so that the orphan
    // is reaped by the runner however slowly it gets to run and die.
    let out = output(task_run(&agent, &["--grace", "2s"], &script), None).await;
    assert_exit(&out, 0);
    let orphan = pid_in(&pid_file).await;
    assert!(is_gone(orphan), "the orphan was stopped and reaped");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_tasks_need_the_runners_certificate() {
    let agent = agent().await;
    let dir = tempfile::tempdir().unwrap();
    // Inside the task: the command fetches the same X.509-SVID the runner
    // bound to (SVIDs are per entry) and presents it.
    let script = format!(
        r#"echo "$TETHER_TASK_TOKEN"
"$TETHER" api fetch x509 --write {dir} --timeout {patience}s >/dev/null || exit 90
"$TETHER" token validate --token "$TETHER_TASK_TOKEN" --audience {JIRA} --presenter-cert {dir}/svid.0.pem --timeout {patience}s >/dev/null || exit 91
"$TETHER" token validate --token "$TETHER_TASK_TOKEN" --audience {JIRA} --timeout {patience}s 2>&1 | grep -q bound || exit 92"#,
        dir = dir.path().display(),
        patience = PATIENCE.as_secs()
    );
    let mut command = task_run(&agent, &["--bind"], &script);
    command.env("TETHER", env!("CARGO_BIN_EXE_tether"));
    let out = output(command, None).await;
    assert_exit(&out, 0);
    let token = stdout(&out).trim().to_owned();
    assert!(
        common::claims_of(&token)["cnf"]["x5t#S256"].is_string(),
        "{token}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_by_the_audience_and_validate_show_the_actor_chain() {
    let agent = agent().await;
    let socket = socket(&agent);
    // A task of this process, addressed to JIRA (which this process is
    // too); the CLI processes below exchange and validate its token.
    let mut tasks = agent.tasks().await;
    let begun = tasks
        .begin_task(pb::BeginTaskRequest {
            audience: JIRA.into(),
            intent: "summarise the Q3 tickets".into(),
            tools: vec!["jira.search".into(), "jira.read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let subject = begun.token.unwrap().token;

    let mut exchange = tether(&[
        "token",
        "exchange",
        "--socket",
        &socket,
        "--token",
        "-",
        "--audience",
        DOWNSTREAM,
        "--tool",
        "jira.read",
        "--json",
    ]);
    exchange.env_remove("TETHER_TASK_TOKEN");
    let exchanged = output(exchange, Some(format!("{subject}\n"))).await;
    assert_exit(&exchanged, 0);
    let exchanged = json(&exchanged);
    assert!(exchanged["expires_at"].is_string(), "{exchanged}");
    let token = exchanged["token"].as_str().unwrap().to_owned();
    assert_eq!(common::claims_of(&token)["act"]["sub"], JIRA);

    let valid = run(&[
        "token",
        "validate",
        "--socket",
        &socket,
        "--token",
        &token,
        "--audience",
        DOWNSTREAM,
        "--tool",
        "jira.read",
        "--json",
    ])
    .await;
    assert_exit(&valid, 0);
    let valid = json(&valid);
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["reason"], Value::Null);
    assert_eq!(valid["spiffe_id"], "spiffe://example.org/agent");
    assert_eq!(valid["task_id"], begun.task_id.as_str());
    assert_eq!(valid["actors"], serde_json::json!([JIRA]));
    assert_eq!(valid["claims"]["scope"], "jira.read");

    let readable = run(&[
        "token",
        "validate",
        "--socket",
        &socket,
        "--token",
        &token,
        "--audience",
        DOWNSTREAM,
    ])
    .await;
    assert_exit(&readable, 0);
    let text = stdout(&readable);
    assert!(text.starts_with("valid\n"), "{text}");
    assert!(
        text.contains("SPIFFE ID:    spiffe://example.org/agent"),
        "{text}"
    );
    assert!(
        text.contains(&format!("Task:         {}", begun.task_id)),
        "{text}"
    );
    assert!(text.contains(&format!("Actor chain:  {JIRA}")), "{text}");

    // Readable exchange: the bare token, for $(...).
    let bare = run(&[
        "token",
        "exchange",
        "--socket",
        &socket,
        "--token",
        &subject,
        "--audience",
        DOWNSTREAM,
    ])
    .await;
    assert_exit(&bare, 0);
    assert_eq!(stdout(&bare).lines().count(), 1);
    assert_eq!(common::claims_of(stdout(&bare).trim())["aud"], DOWNSTREAM);

    // Not for a tool the token does not allow; and never wider.
    let wrong_tool = run(&[
        "token",
        "validate",
        "--socket",
        &socket,
        "--token",
        &token,
        "--audience",
        DOWNSTREAM,
        "--tool",
        "jira.search",
    ])
    .await;
    assert_fails(&wrong_tool, 1, "invalid: ");
    let wider = run(&[
        "token",
        "exchange",
        "--socket",
        &socket,
        "--token",
        &subject,
        "--audience",
        DOWNSTREAM,
        "--tool",
        "jira.delete",
    ])
    .await;
    let code = wider.status.code().unwrap();
    assert!(code == 77 || code == 1, "exit {code}: {}", stderr(&wider));
    assert_fails(&wider, code, "only narrow");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_dead_socket_exit_with_their_codes() {
    let agent = agent().await;
    // The agent refuses the task: its message, exit 1; nothing runs.
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let script = format!("touch {}", ran.display());
    let socket = socket(&agent);
    let mut refused = tether(&[
        "task",
        "run",
        "--socket",
        &socket,
        "--audience",
        JIRA,
        "--intent",
        "x",
        "--tool",
        "bad tool",
        "--",
    ]);
    refused.args(["sh", "-c", &script]);
    let out = output(refused, None).await;
    assert_fails(&out, 1, "tool");
    assert!(!ran.exists(), "no command runs without a task");

    // Not an identity this process holds: 77.
    let out = output(
        task_run(
            &agent,
            &["--spiffe-id", "spiffe://example.org/not-mine"],
            &script,
        ),
        None,
    )
    .await;
    assert_fails(&out, 77, "no identity");
    assert!(!ran.exists());

    // A command that does not exist: 127, like a shell.
    let mut missing = tether(&[
        "task",
        "run",
        "--socket",
        &socket,
        "--audience",
        JIRA,
        "--intent",
        "x",
        "--tool",
        "t",
        "--",
    ]);
    missing.arg(dir.path().join("no-such-command"));
    let out = output(missing, None).await;
    assert_fails(&out, 127, "no-such-command");

    // Nothing listening: 69, for every command on either socket.
    let dead: PathBuf = dir.path().join("dead.sock");
    let dead = dead.to_str().unwrap();
    let out = output(task_run_on(dead, &script), None).await;
    assert_fails(&out, 69, dead);
    assert!(!ran.exists());
    for args in [
        &[
            "token",
            "validate",
            "--socket",
            dead,
            "--token",
            "x.y.z",
            "--audience",
            JIRA,
        ][..],
        &[
            "token",
            "exchange",
            "--socket",
            dead,
            "--token",
            "x.y.z",
            "--audience",
            JIRA,
        ],
        &["task", "list", "--admin-socket", dead],
        &["task", "show", "tsk-1", "--admin-socket", dead],
        &["task", "revoke", "tsk-1", "--admin-socket", dead],
    ] {
        let out = run(args).await;
        assert_fails(&out, 69, dead);
    }

    // An unknown task: the agent's answer, exit 1.
    let admin = admin_socket(&agent);
    let out = run(&["task", "show", "tsk-unknown", "--admin-socket", &admin]).await;
    assert_fails(&out, 1, "tsk-unknown");
    agent.stop().await;
}

fn task_run_on(socket: &str, script: &str) -> Command {
    let mut command = tether(&[
        "task",
        "run",
        "--socket",
        socket,
        "--audience",
        JIRA,
        "--intent",
        "x",
        "--tool",
        "t",
        "--",
    ]);
    command.args(["sh", "-c", script]);
    command
}
