//! The MCP example (`examples/mcp/`) end to end, as a user runs it: real
//! processes (the `tether` binary, the three example binaries, `bash`),
//! real MCP over streamable HTTP, real attestation of each process by its
//! executable.
//!
//! The README's "MCP in five minutes" is read from README.md and run
//! command by command, as written: `/tmp/tether-mcp` becomes a temporary
//! directory and `target/release` this build's target directory. Each
//! command is paired, in order, with what it must show (`WALKTHROUGH`): a
//! command added to or removed from the README without a matching change
//! here fails the test.

use nix::sys::signal::Signal;

use crate::common::walkthrough::{Expect, Ready, Shell};

/// The README's section, and its directory.
const SECTION: &str = "## MCP in five minutes";
const README_DIR: &str = "/tmp/tether-mcp";

/// The README walkthrough, command by command: the start of the command,
/// and what it must do.
const WALKTHROUGH: &[(&str, Expect)] = &[
    ("cargo build", Expect::Built),
    ("export PATH=", Expect::Path),
    (
        "examples/mcp/setup.sh /tmp/tether-mcp",
        Expect::Succeeds(&["wrote /"]),
    ),
    (
        "tether run --config",
        Expect::Background(Ready::Socket("/tmp/tether-mcp/agent.sock")),
    ),
    ("export TETHER_SOCKET_PATH=", Expect::Export),
    (
        "notes-publish-api &",
        Expect::Background(Ready::Line(
            "notes-publish-api: spiffe://tether.local/api/publish on http://",
        )),
    ),
    (
        "mcp-notes-server &",
        Expect::Background(Ready::Line(
            "mcp-notes-server: spiffe://tether.local/mcp/notes on http://",
        )),
    ),
    (
        "mcp-agent run --intent \"publish the Q3 summary\"",
        Expect::Succeeds(&[
            "tools offered: notes.publish, notes.read, notes.search",
            "notes.search -> ok: q3-summary",
            "notes.read -> ok: Q3 ticket summary",
            "notes.publish -> ok: published q3-summary",
            "\"subject\":\"spiffe://tether.local/mcp/agent\"",
            "\"actors\":[\"spiffe://tether.local/mcp/notes\"]",
            " ended",
        ]),
    ),
    (
        "tether task list --all",
        Expect::Succeeds(&[
            "spiffe://tether.local/mcp/agent",
            "notes.search,notes.read,notes.publish",
            "ended: completed",
        ]),
    ),
    (
        "tether audit tail",
        Expect::SoonSucceeds(&[
            "task-begin",
            "intent=\"publish the Q3 summary\"",
            "exe=",
            "validate",
            "exchange",
            "policies=notes-server-exchanges-to-publish",
            "task-end",
        ]),
    ),
    (
        "mcp-agent run --intent \"summarise Q3\" --tool notes.search --tool notes.read",
        Expect::Fails(&[
            "notes.search -> ok",
            "notes.read -> ok",
            "notes.publish -> refused (403): Bearer realm=\"mcp-notes-server\", error=\"insufficient_scope\"",
            "is not allowed by this token",
        ]),
    ),
    (
        "mcp-agent run --intent",
        Expect::Background(Ready::Line("holding task")),
    ),
    (
        "tether task list",
        Expect::Succeeds(&["active", "notes.search,notes.read,notes.publish"]),
    ),
    (
        "mcp-agent present --token-file /tmp/tether-mcp/token --tool notes.read",
        Expect::Succeeds(&["notes.read -> ok: Q3 ticket summary"]),
    ),
    (
        "mcp-agent present --token-file /tmp/tether-mcp/token --publish-url",
        Expect::Fails(&[
            "POST /publish -> refused (401): Bearer realm=\"notes-publish-api\", error=\"invalid_token\"",
            "it is not addressed to audience 'spiffe://tether.local/api/publish'",
        ]),
    ),
    ("kill -INT $!", Expect::Signal(Signal::SIGINT)),
    (
        "mcp-agent present --token-file /tmp/tether-mcp/token --tool notes.read",
        Expect::Fails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "has ended: completed",
        ]),
    ),
    (
        "mcp-agent run --intent",
        Expect::Background(Ready::Line("holding task")),
    ),
    ("kill -9 $!", Expect::Signal(Signal::SIGKILL)),
    (
        "mcp-agent present --token-file /tmp/tether-mcp/token --tool notes.read",
        Expect::SoonFails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "has ended: owner exited",
        ]),
    ),
    (
        "mcp-notes-server --tls --listen 127.0.0.1:7703 &",
        Expect::Background(Ready::Line(
            "mcp-notes-server: spiffe://tether.local/mcp/notes on https://",
        )),
    ),
    (
        "mcp-agent --tls --server https://127.0.0.1:7703/mcp run",
        Expect::Background(Ready::Line("holding task")),
    ),
    (
        "mcp-agent --tls --server https://127.0.0.1:7703/mcp present --token-file /tmp/tether-mcp/bound-token",
        Expect::Fails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "the presented certificate is not the one the token is bound to",
        ]),
    ),
    ("kill -INT $!", Expect::Signal(Signal::SIGINT)),
];

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let mut shell = Shell::new(README_DIR, "mcp");
    shell.run_walkthrough(SECTION, WALKTHROUGH);
    shell.stop_all();
}

/// What the MCP server must refuse besides the walkthrough's cases: a token
/// for another audience, an expired one, a revoked one; and what it may not
/// exchange: a token that is not addressed to it.
#[test]
fn the_mcp_server_refuses_what_is_not_its_to_accept_or_exchange() {
    let mut shell = Shell::new(README_DIR, "mcp");
    shell.step("export PATH=", Expect::Path);
    shell.step(
        "examples/mcp/setup.sh /tmp/tether-mcp",
        Expect::Succeeds(&["wrote /"]),
    );
    // Short task tokens, so that one expires while its task lives (waited
    // for below); long enough that every other step, each a few processes
    // started, uses its token well within its life whatever the machine's
    // speed (the agent renews at two thirds of it).
    shell.run("printf '[tasks]\\ntoken_ttl = \"10s\"\\n' >> /tmp/tether-mcp/tether.toml");
    shell.step(
        "tether run --config /tmp/tether-mcp/tether.toml &",
        Expect::Background(Ready::Socket("/tmp/tether-mcp/agent.sock")),
    );
    shell.step(
        "export TETHER_SOCKET_PATH=/tmp/tether-mcp/agent.sock TETHER_ADMIN_SOCKET=/tmp/tether-mcp/admin/admin.sock",
        Expect::Export,
    );
    shell.step(
        "notes-publish-api --listen 127.0.0.1:0 &",
        Expect::Background(Ready::Line(" on http://")),
    );
    let api = shell.announced_url();
    shell.step(
        &format!("mcp-notes-server --listen 127.0.0.1:0 --publish-url {api}/publish &"),
        Expect::Background(Ready::Line(" on http://")),
    );
    let server = shell.announced_url();
    shell.step(
        &format!(
            "mcp-agent --server {server} run --intent \"publish the Q3 summary\" --tool notes.search --tool notes.read --tool notes.publish --token-file /tmp/tether-mcp/token --hold &"
        ),
        Expect::Background(Ready::Line("holding task")),
    );
    let task_id = shell.background_output().iter().find_map(|line| {
        line.strip_prefix("task ")
            .and_then(|rest| rest.split(' ').next())
            .map(str::to_owned)
    });
    let task_id = task_id.expect("the agent names its task");
    let present = |file: &str| {
        format!(
            "mcp-agent --server {server} present --token-file {file} --tool notes.read --arg id=q3-summary"
        )
    };

    // Addressed to the notes server: it may exchange it, for the API.
    shell.step(
        "cp /tmp/tether-mcp/token /tmp/tether-mcp/old-token",
        Expect::Succeeds(&[]),
    );
    shell.step(
        "mcp-notes-server exchange --token-file /tmp/tether-mcp/token --audience spiffe://tether.local/api/publish --tool notes.publish > /tmp/tether-mcp/api-token",
        Expect::Succeeds(&[]),
    );
    // That token is addressed to the API: the notes server cannot exchange
    // it, and does not accept it either.
    let refused = shell.run(
        "mcp-notes-server exchange --token-file /tmp/tether-mcp/api-token --audience spiffe://tether.local/mcp/notes",
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("exchange refused")
            && stderr
                .contains("addressed to \"spiffe://tether.local/api/publish\", not to the caller"),
        "{stderr}"
    );
    shell.step(
        &present("/tmp/tether-mcp/api-token"),
        Expect::Fails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "it is not addressed to audience 'spiffe://tether.local/mcp/notes'",
        ]),
    );

    // A token of the living task, but past its `exp`: refused, while the
    // fresh one the agent keeps in its token file still works.
    shell.step(
        &present("/tmp/tether-mcp/old-token"),
        Expect::SoonFails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "expired",
        ]),
    );
    shell.step(
        &present("/tmp/tether-mcp/token"),
        Expect::Succeeds(&["notes.read -> ok"]),
    );

    // Revoked by an operator: every token of the task dies at once.
    shell.step(
        &format!("tether task revoke {task_id}"),
        Expect::Succeeds(&[]),
    );
    shell.step(
        &present("/tmp/tether-mcp/token"),
        Expect::Fails(&[
            "the server refused (401)",
            "error=\"invalid_token\"",
            "revoked",
        ]),
    );
    // The held agent sees its task end and exits (1: not by its choice).
    let mut agent = shell.pop_background();
    let status = agent.child.wait().unwrap();
    agent.drain();
    assert_eq!(status.code(), Some(1), "{}", agent.seen.join("\n"));
    shell.stop_all();
}
