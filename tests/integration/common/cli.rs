//! Running the built `tether` binary from a test: the command with the
//! socket environment cleared, running it off the runtime (the agent under
//! test is served on it), and reading what it printed and how it exited.
//! Exit codes and output are the CLI's contract; every wait here is a
//! failure guard ([`PATIENCE`]), never what is tested.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use super::{PATIENCE, with_cli_timeout};

/// The binary, with the socket environment cleared so that only what a
/// test passes counts, and waiting for the agent as long as the test does.
pub fn tether(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args(with_cli_timeout(args, PATIENCE))
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("TETHER_SOCKET_PATH")
        .env_remove("TETHER_ADMIN_SOCKET")
        .stdin(Stdio::null());
    command
}

/// Runs `command` off the runtime, feeding `stdin` if given.
pub async fn output(mut command: Command, stdin: Option<String>) -> Output {
    let run = tokio::task::spawn_blocking(move || {
        if stdin.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    });
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the CLI finishes")
        .unwrap()
}

/// `tether <args>`, run to completion.
pub async fn run(args: &[&str]) -> Output {
    output(tether(args), None).await
}

/// Waits for a spawned `tether` off the runtime.
pub async fn finish(child: Child) -> Output {
    let wait = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the CLI finishes")
        .unwrap()
}

/// What it printed on stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// What it printed on stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Exit `code`, or a failure that shows both streams.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

/// Exit `code` with a one-line error on stderr containing `want`, and
/// nothing on stdout (a failure prints no partial result).
#[track_caller]
pub fn assert_fails(out: &Output, code: i32, want: &str) {
    assert_exit(out, code);
    let message = stderr(out);
    assert!(message.starts_with("tether: error: "), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains(want), "wanted {want:?} in: {message}");
    assert!(stdout(out).is_empty(), "{}", stdout(out));
}

/// Stdout parsed as one JSON document.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", stdout(out)))
}

/// A path as the `&str` a command line takes.
pub fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}
