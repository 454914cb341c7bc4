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

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::PATIENCE;

/// The example's processes, one executable (and so one identity) each.
const EXAMPLES: &[&str] = &["mcp-agent", "mcp-notes-server", "notes-publish-api"];

/// What one walkthrough command must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `cargo build`: the test suite built the binaries already.
    Built,
    /// `export PATH=...`: this build's target directory first.
    Path,
    /// `export K=V ...`.
    Export,
    /// `... &`, ready once its stdout has a line containing this (`None`:
    /// the agent, ready once its socket answers).
    Background(Option<&'static str>),
    /// Exits 0; stdout contains each string.
    Succeeds(&'static [&'static str]),
    /// Exits 0 with these strings once the agent has caught up (its audit
    /// trail is written by a job of its own, after the answer): retried.
    SoonSucceeds(&'static [&'static str]),
    /// Exits non-zero; stdout contains each string.
    Fails(&'static [&'static str]),
    /// Exits non-zero with these strings once the agent has caught up
    /// (an owner's exit is noticed by tether, not by the caller): retried.
    SoonFails(&'static [&'static str]),
    /// `kill -SIG $!`: the last background process gets the signal and
    /// exits, successfully unless it was killed.
    Signal(Signal),
}

/// The README walkthrough, command by command: the start of the command,
/// and what it must do.
const WALKTHROUGH: &[(&str, Expect)] = &[
    ("cargo build", Expect::Built),
    ("export PATH=", Expect::Path),
    (
        "examples/mcp/setup.sh /tmp/tether-mcp",
        Expect::Succeeds(&["wrote /"]),
    ),
    ("tether run --config", Expect::Background(None)),
    ("export TETHER_SOCKET_PATH=", Expect::Export),
    (
        "notes-publish-api &",
        Expect::Background(Some(
            "notes-publish-api: spiffe://tether.local/api/publish on http://",
        )),
    ),
    (
        "mcp-notes-server &",
        Expect::Background(Some(
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
        Expect::Background(Some("holding task")),
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
        Expect::Background(Some("holding task")),
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
        Expect::Background(Some(
            "mcp-notes-server: spiffe://tether.local/mcp/notes on https://",
        )),
    ),
    (
        "mcp-agent --tls --server https://127.0.0.1:7703/mcp run",
        Expect::Background(Some("holding task")),
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
    let commands = walkthrough_commands();
    assert_eq!(
        commands.len(),
        WALKTHROUGH.len(),
        "README's \"MCP in five minutes\" has {} commands, the test knows {}: {commands:#?}",
        commands.len(),
        WALKTHROUGH.len()
    );
    let mut shell = Shell::new();
    for (command, (start, expect)) in commands.iter().zip(WALKTHROUGH) {
        assert!(
            command.starts_with(start),
            "README command {command:?} is not the expected {start:?}..."
        );
        eprintln!("$ {command}");
        shell.step(command, *expect);
    }
    shell.stop_all();
}

/// What the MCP server must refuse besides the walkthrough's cases: a token
/// for another audience, an expired one, a revoked one; and what it may not
/// exchange: a token that is not addressed to it.
#[test]
fn the_mcp_server_refuses_what_is_not_its_to_accept_or_exchange() {
    let mut shell = Shell::new();
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
        Expect::Background(None),
    );
    shell.step(
        "export TETHER_SOCKET_PATH=/tmp/tether-mcp/agent.sock TETHER_ADMIN_SOCKET=/tmp/tether-mcp/admin/admin.sock",
        Expect::Export,
    );
    shell.step(
        "notes-publish-api --listen 127.0.0.1:0 &",
        Expect::Background(Some(" on http://")),
    );
    let api = shell.announced_url();
    shell.step(
        &format!("mcp-notes-server --listen 127.0.0.1:0 --publish-url {api}/publish &"),
        Expect::Background(Some(" on http://")),
    );
    let server = shell.announced_url();
    shell.step(
        &format!(
            "mcp-agent --server {server} run --intent \"publish the Q3 summary\" --tool notes.search --tool notes.read --tool notes.publish --token-file /tmp/tether-mcp/token --hold &"
        ),
        Expect::Background(Some("holding task")),
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
    let mut agent = shell.background.pop().unwrap();
    let status = agent.child.wait().unwrap();
    agent.drain();
    assert_eq!(status.code(), Some(1), "{}", agent.seen.join("\n"));
    shell.stop_all();
}

/// The `sh` blocks of README's "MCP in five minutes", one command per line
/// (a trailing `\` joins lines).
fn walkthrough_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("\n## MCP in five minutes")
        .expect("README has the walkthrough");
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh || line.trim().is_empty() {
            continue;
        }
        pending.push_str(line.trim());
        if pending.ends_with('\\') {
            pending.pop();
            continue;
        }
        commands.push(std::mem::take(&mut pending));
    }
    commands
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// This build's target profile directory (`target/debug`): the test
/// binary lives in its `deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    for name in EXAMPLES {
        assert!(
            dir.join("examples").join(name).exists(),
            "{} is not built: `cargo build --examples` (cargo test and nextest build examples)",
            dir.join("examples").join(name).display()
        );
    }
    dir
}

/// A shell session of the walkthrough: its environment, its working
/// directory (the repository), its background processes.
struct Shell {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
    background: Vec<Background>,
}

/// A process started with `&`, its stdout read line by line.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Shell {
    fn new() -> Self {
        // The caller's own identity settings must not leak in.
        let env = std::env::vars()
            .filter(|(k, _)| !k.starts_with("TETHER_") && k != "SPIFFE_ENDPOINT_SOCKET")
            .collect();
        Self {
            dir: tempfile::tempdir().unwrap(),
            env,
            background: Vec::new(),
        }
    }

    /// The command with the walkthrough's directory replaced by this
    /// test's own.
    fn localize(&self, command: &str) -> String {
        command.replace(
            "/tmp/tether-mcp",
            &self.dir.path().join("mcp").display().to_string(),
        )
    }

    fn step(&mut self, command: &str, expect: Expect) {
        match expect {
            Expect::Built => {
                target_dir();
            }
            Expect::Path => {
                let target = target_dir();
                let path = format!(
                    "{}:{}:{}",
                    target.display(),
                    target.join("examples").display(),
                    self.env.get("PATH").map_or("/usr/bin:/bin", String::as_str)
                );
                self.env.insert("PATH".into(), path);
            }
            Expect::Export => {
                let assignments = self.localize(command.trim_start_matches("export "));
                for assignment in assignments.split_whitespace() {
                    let (key, value) = assignment.split_once('=').unwrap();
                    self.env.insert(key.into(), value.into());
                }
            }
            Expect::Background(ready) => self.spawn(command, ready),
            Expect::Succeeds(wanted) => {
                let output = self.run(command);
                assert_shows(command, &output, true, wanted);
            }
            Expect::Fails(wanted) => {
                let output = self.run(command);
                assert_shows(command, &output, false, wanted);
            }
            Expect::SoonSucceeds(wanted) => self.retry(command, true, wanted),
            Expect::SoonFails(wanted) => self.retry(command, false, wanted),
            Expect::Signal(signal) => {
                let mut last = self.background.pop().expect("a background process for $!");
                kill(
                    Pid::from_raw(i32::try_from(last.child.id()).unwrap()),
                    signal,
                )
                .unwrap();
                let status = last.child.wait().unwrap();
                if signal != Signal::SIGKILL {
                    last.drain();
                    assert!(
                        status.success(),
                        "{status:?}; it printed:\n{}",
                        last.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Runs `command` until it exits successfully or not, as `success`
    /// says, with each of `wanted` on stdout; fails after [`PATIENCE`].
    fn retry(&self, command: &str, success: bool, wanted: &[&str]) {
        let started = Instant::now();
        loop {
            let output = self.run(command);
            let stdout = String::from_utf8_lossy(&output.stdout);
            if output.status.success() == success && wanted.iter().all(|w| stdout.contains(w)) {
                eprintln!("as expected after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{command} never {} as expected; last output:\n{stdout}",
                if success { "succeeded" } else { "failed" }
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn command(&self, command: &str) -> Command {
        let mut shell = Command::new("bash");
        shell
            .arg("-c")
            .arg(self.localize(command))
            .current_dir(repo())
            .env_clear()
            .envs(&self.env);
        shell
    }

    fn run(&self, command: &str) -> Output {
        let output = self.command(command).output().unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn spawn(&mut self, command: &str, ready: Option<&str>) {
        let command = command.trim_end_matches('&').trim();
        let mut child = self
            .command(&format!("exec {command}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut background = Background {
            child,
            lines,
            seen: Vec::new(),
        };
        match ready {
            Some(wanted) => background.wait_for(command, wanted),
            None => self.wait_for_agent(),
        }
        self.background.push(background);
    }

    /// The agent is ready once its socket accepts connections.
    fn wait_for_agent(&self) {
        let socket = self.dir.path().join("mcp/agent.sock");
        let started = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(
                started.elapsed() < PATIENCE,
                "tether never listened on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL the last background process announced (`... on URL`).
    fn announced_url(&self) -> String {
        let last = self.background.last().expect("a background process");
        let line = last
            .seen
            .iter()
            .find(|line| line.contains(" on http"))
            .expect("an announced address");
        line.rsplit(' ').next().unwrap().to_owned()
    }

    /// What the last background process printed so far.
    fn background_output(&self) -> &[String] {
        &self.background.last().expect("a background process").seen
    }

    /// `kill $(jobs -p)`: every background process stops cleanly.
    fn stop_all(&mut self) {
        while let Some(mut background) = self.background.pop() {
            kill(
                Pid::from_raw(i32::try_from(background.child.id()).unwrap()),
                Signal::SIGTERM,
            )
            .unwrap();
            let status = background.child.wait().unwrap();
            background.drain();
            assert!(
                status.success(),
                "{status:?}; it printed:\n{}",
                background.seen.join("\n")
            );
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        for background in &mut self.background {
            let _ = background.child.kill();
            let _ = background.child.wait();
        }
    }
}

impl Background {
    fn wait_for(&mut self, command: &str, wanted: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("{line}");
                    let found = line.contains(wanted);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "{command} never printed {wanted:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn drain(&mut self) {
        self.seen.extend(self.lines.try_iter());
    }
}

fn assert_shows(command: &str, output: &Output, success: bool, wanted: &[&str]) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.success(),
        success,
        "{command}: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for want in wanted {
        assert!(
            stdout.contains(want),
            "{command}: no {want:?} in:\n{stdout}"
        );
    }
}
