//! `tether task run`: run a command as one task. Begin the task (scoped to
//! this process's descendants), hand the command its token, keep the token
//! fresh, end the task when the command exits, and leave no descendant
//! behind.
//!
//! The order matters and is the point of this module: become a child
//! subreaper before anything else (so no descendant can escape the
//! clean-up), begin and watch the task before the command exists (a
//! command never runs without a live task), install the signal handlers
//! just before spawning (until then, Ctrl-C simply ends this process and
//! the agent ends the task as "owner exited"), and end the task before
//! cleaning up (its tokens die with the command, not with the stragglers).
//! Process handling lives in [`super::subreaper`], the Task API client in
//! [`crate::client::task`].

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Args;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use thiserror::Error;
use tokio::time::Instant;
use tonic::Code;
use tonic::codec::Streaming;

use super::api::write_atomically;
use super::fail;
use super::flags::SocketArgs;
use super::subreaper::{self, CommandExit, Event, Signals};
use crate::client::task::{SvidChoice, TaskClient, TaskClientError, own_leaf_certificate};
use crate::client::workload::{SPIFFE_ENDPOINT_SOCKET, WorkloadClientError};
use crate::config::ProcessEnv;
use crate::error::Chain;
use crate::proto::task as pb;

/// The command's environment: its first token.
pub(crate) const TETHER_TASK_TOKEN: &str = "TETHER_TASK_TOKEN";
/// The command's environment: the task's id.
pub(crate) const TETHER_TASK_ID: &str = "TETHER_TASK_ID";
/// The command's environment: the `--token-file` path, when given.
pub(crate) const TETHER_TASK_TOKEN_FILE: &str = "TETHER_TASK_TOKEN_FILE";

/// Exit status when the command could not be found (as a shell).
const EXIT_NOT_FOUND: u8 = 127;
/// Exit status when the command could not be run (as a shell).
const EXIT_CANNOT_RUN: u8 = 126;
/// First and longest pause between attempts to reach the agent again.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(5));

/// Arguments of `tether task run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    socket: SocketArgs,

    /// The one audience of the task's tokens: the MCP server or API it
    /// talks to (a SPIFFE ID or a URI).
    #[arg(long, value_name = "AUDIENCE")]
    audience: String,

    /// What the task is for, in words (recorded in its tokens and the
    /// audit).
    #[arg(long, value_name = "TEXT")]
    intent: String,

    /// A tool the task may use (repeat for several).
    #[arg(long = "tool", value_name = "TOOL", required = true)]
    tools: Vec<String>,

    /// How long the task may live (humantime: 90s, 10m, 1h); the agent's
    /// default without it. A value above the agent's maximum is refused.
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    ttl: Option<Duration>,

    /// Which of this process's SPIFFE IDs owns the task (default: its
    /// default identity).
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,

    /// Keep the current token in this file (replaced atomically, mode
    /// 0600) for the command to re-read; removed when the task ends.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,

    /// Bind the task's tokens to this process's X.509-SVID (cnf x5t#S256):
    /// a presenter must hold that certificate.
    #[arg(long)]
    bind: bool,

    /// How long the command has to exit after SIGTERM before SIGKILL when
    /// the task ends first; and, once the command has exited, how long
    /// what it left running has before SIGTERM, and again before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::flags::parse_timeout)]
    grace: Duration,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Why `task run` failed before or around the command (the command's own
/// failures are its exit status).
#[derive(Debug, Error)]
pub(crate) enum RunError {
    /// prctl(PR_SET_CHILD_SUBREAPER) failed.
    #[error("cannot become a child subreaper")]
    Subreaper {
        /// The errno.
        #[source]
        source: Errno,
    },
    /// Reaching the agent failed, or it refused the task.
    #[error(transparent)]
    Client(#[from] TaskClientError),
    /// The agent answered BeginTask without a token.
    #[error("the agent began task {task_id} without sending its token")]
    NoToken {
        /// The task.
        task_id: String,
    },
    /// Writing `--token-file` failed.
    #[error("writing the token file {}", .path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The command could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The runtime, the signal handlers or a path could not be set up.
    #[error("setting up")]
    Setup {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Why the task ended before the command did.
#[derive(Debug)]
enum Stop {
    /// The agent ended it (revoked, deadline, owner's entry removed): its
    /// words.
    Ended(String),
    /// The token file could not be replaced: the command would go on with
    /// a dying token.
    TokenFile(RunError),
}

/// The task's setup, everything the command is spawned with.
struct Begun {
    client: TaskClient,
    task_id: String,
    token: String,
    watch: Streaming<pb::TaskToken>,
}

// === impl RunError ===

impl RunError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Client(error) => error.exit_code(),
            Self::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                EXIT_NOT_FOUND
            }
            Self::Spawn { .. } => EXIT_CANNOT_RUN,
            _ => 1,
        }
    }
}

impl From<WorkloadClientError> for RunError {
    fn from(error: WorkloadClientError) -> Self {
        Self::Client(TaskClientError::Client(error))
    }
}

/// Runs `tether task run`: the command's exit status, 128 + its signal, 1
/// when the task ended first, or this command's own failure.
pub(crate) fn run(args: &RunArgs) -> ExitCode {
    match execute(args) {
        Ok(code) => ExitCode::from(code),
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn execute(args: &RunArgs) -> Result<u8, RunError> {
    // First: from here on no descendant is re-parented past this process.
    subreaper::become_subreaper().map_err(|source| RunError::Subreaper { source })?;
    let socket = args
        .socket
        .socket(&ProcessEnv)
        .map_err(TaskClientError::from)?;
    // The command gets absolute paths: it may change directory.
    let socket = std::path::absolute(&socket).map_err(|source| RunError::Setup { source })?;
    let token_file = args
        .token_file
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|source| RunError::Setup { source })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| RunError::Setup { source })?;
    runtime.block_on(supervise(args, &socket, token_file.as_deref()))
}

async fn supervise(
    args: &RunArgs,
    socket: &Path,
    token_file: Option<&Path>,
) -> Result<u8, RunError> {
    let timeout = args.socket.timeout();
    let Begun {
        mut client,
        task_id,
        token,
        watch,
    } = begin(args, socket, token_file).await?;

    let started = async {
        let signals = Signals::install().map_err(|source| RunError::Setup { source })?;
        let command = command(args, socket, &task_id, &token, token_file);
        let pid = subreaper::spawn(command).map_err(|source| RunError::Spawn {
            program: args.command[0].to_string_lossy().into_owned(),
            source,
        })?;
        Ok::<_, RunError>((signals, pid))
    };
    let (mut signals, pid) = match started.await {
        Ok(started) => started,
        Err(error) => {
            end(&mut client, &task_id).await;
            remove(token_file);
            return Err(error);
        }
    };

    let keeper = keep_fresh(client.clone(), task_id.clone(), token_file, watch, timeout);
    // The keeper is dropped when this returns: no token is written after
    // the end.
    let (exit, stop) = watch_over(pid, &mut signals, keeper, args.grace).await;
    if !matches!(stop, Some(Stop::Ended(_))) {
        end(&mut client, &task_id).await;
    }
    remove(token_file);
    subreaper::reap_descendants(&mut signals, args.grace).await;
    Ok(match stop {
        Some(_) => 1,
        None => exit.exit_code(),
    })
}

/// Waits for the command to exit, forwarding signals to it and stopping it
/// if the task ends first (SIGTERM, SIGKILL after `grace`). Returns how it
/// exited and, if the task ended first, why.
async fn watch_over(
    pid: Pid,
    signals: &mut Signals,
    keeper: impl Future<Output = Stop>,
    grace: Duration,
) -> (CommandExit, Option<Stop>) {
    tokio::pin!(keeper);
    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        tokio::select! {
            event = signals.next() => match event {
                Event::ChildChanged => {
                    if let Some(exit) = subreaper::reap(pid) {
                        return (exit, stop);
                    }
                }
                Event::Forward(signal) => subreaper::send(pid, signal),
            },
            stopped = &mut keeper, if stop.is_none() => {
                match &stopped {
                    Stop::Ended(reason) => eprintln!("tether: error: {reason}; stopping the command"),
                    Stop::TokenFile(error) => eprintln!("tether: error: {}; stopping the command", Chain(error)),
                }
                subreaper::send(pid, Signal::SIGTERM);
                kill_at = Some(Instant::now() + grace);
                stop = Some(stopped);
            }
            () = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                subreaper::send(pid, Signal::SIGKILL);
                kill_at = None;
            }
        }
    }
}

/// Begins the task, writes its first token and opens its watch: all of it
/// or, on any failure, no task left behind.
async fn begin(
    args: &RunArgs,
    socket: &Path,
    token_file: Option<&Path>,
) -> Result<Begun, RunError> {
    let timeout = args.socket.timeout();
    let bind_certificate = if args.bind {
        let which = args
            .spiffe_id
            .as_deref()
            .map_or(SvidChoice::Default, SvidChoice::Exactly);
        own_leaf_certificate(socket, timeout, which).await?
    } else {
        Vec::new()
    };
    let mut client = TaskClient::connect(socket, timeout).await?;
    let begun = client
        .begin(pb::BeginTaskRequest {
            audience: args.audience.clone(),
            intent: args.intent.clone(),
            tools: args.tools.clone(),
            ttl_ms: args.ttl.map_or(0, whole_ms),
            spiffe_id: args.spiffe_id.clone().unwrap_or_default(),
            bind_certificate,
            scope_descendants: true,
        })
        .await?;
    let task_id = begun.task_id;
    let ready = async {
        let token = begun.token.ok_or_else(|| RunError::NoToken {
            task_id: task_id.clone(),
        })?;
        if let Some(path) = token_file {
            write_token(path, &token.token)?;
        }
        let watch = client.watch(task_id.clone()).await?;
        Ok::<_, RunError>((token.token, watch))
    };
    match ready.await {
        Ok((token, watch)) => Ok(Begun {
            client,
            task_id,
            token,
            watch,
        }),
        Err(error) => {
            end(&mut client, &task_id).await;
            remove(token_file);
            Err(error)
        }
    }
}

/// The command, with the task in its environment and this process's
/// stdin, stdout and stderr.
fn command(
    args: &RunArgs,
    socket: &Path,
    task_id: &str,
    token: &str,
    token_file: Option<&Path>,
) -> Command {
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env(TETHER_TASK_TOKEN, token)
        .env(TETHER_TASK_ID, task_id)
        .env(SPIFFE_ENDPOINT_SOCKET, endpoint_uri(socket));
    match token_file {
        Some(path) => command.env(TETHER_TASK_TOKEN_FILE, path),
        None => command.env_remove(TETHER_TASK_TOKEN_FILE),
    };
    command
}

/// `unix://` + the absolute socket path, as SPIFFE clients read it.
fn endpoint_uri(socket: &Path) -> OsString {
    let mut uri = OsString::from("unix://");
    uri.push(socket);
    uri
}

/// Follows the task's WatchTask stream, writing each fresh token to the
/// token file, until the task ends. Losing the agent is not an end: the
/// task outlives an agent restart, so the stream is opened again (with
/// backoff) for as long as the command runs.
async fn keep_fresh(
    mut client: TaskClient,
    task_id: String,
    token_file: Option<&Path>,
    mut watch: Streaming<pb::TaskToken>,
    timeout: Duration,
) -> Stop {
    let mut backoff = RECONNECT_BACKOFF.0;
    let mut lost = false;
    loop {
        let error = match client.next(&mut watch).await {
            Ok(Some(token)) => {
                if lost {
                    eprintln!("tether: reached the agent again; task {task_id} goes on");
                    lost = false;
                }
                backoff = RECONNECT_BACKOFF.0;
                if let Some(path) = token_file
                    && let Err(error) = write_token(path, &token.token)
                {
                    return Stop::TokenFile(error);
                }
                continue;
            }
            Ok(None) => return Stop::Ended(format!("the agent ended task {task_id}")),
            Err(error) => error,
        };
        if let Some(reason) = ended(&error) {
            return Stop::Ended(reason);
        }
        if !lost {
            eprintln!(
                "tether: warning: lost the task's token stream ({}); trying again, the command keeps running",
                Chain(&error)
            );
            lost = true;
        }
        // Again until the stream opens or the agent says the task is over.
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
            let reopened = async {
                let mut fresh = TaskClient::connect(client.socket(), timeout).await?;
                let stream = fresh.watch(task_id.clone()).await?;
                Ok::<_, WorkloadClientError>((fresh, stream))
            };
            match reopened.await {
                Ok((fresh, stream)) => {
                    client = fresh;
                    watch = stream;
                    break;
                }
                Err(error) => {
                    if let Some(reason) = ended(&error) {
                        return Stop::Ended(reason);
                    }
                }
            }
        }
    }
}

/// The agent's reason when `error` says the task is over; `None` when it
/// only says the agent could not be reached (or is restarting).
fn ended(error: &WorkloadClientError) -> Option<String> {
    let WorkloadClientError::Status { status, .. } = error else {
        return None;
    };
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted => None,
        _ if status.message().is_empty() => Some(status.code().description().to_owned()),
        _ => Some(status.message().to_owned()),
    }
}

/// Ends the task; a failure is a warning (the task also ends when this
/// process exits, as its owner), never a change of exit status.
async fn end(client: &mut TaskClient, task_id: &str) {
    match client.end(task_id.to_owned()).await {
        Ok(()) => {}
        // Already over (its deadline, say): nothing left to end.
        Err(WorkloadClientError::Status { status, .. })
            if status.code() == Code::FailedPrecondition => {}
        Err(error) => eprintln!(
            "tether: warning: could not end task {task_id}: {}; it ends when this process exits",
            Chain(&error)
        ),
    }
}

fn write_token(path: &Path, token: &str) -> Result<(), RunError> {
    write_atomically(path, token.as_bytes(), 0o600).map_err(|source| RunError::TokenFile {
        path: path.to_owned(),
        source,
    })
}

/// Removes the token file: its token is dead.
fn remove(token_file: Option<&Path>) {
    if let Some(path) = token_file
        && let Err(error) = std::fs::remove_file(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        eprintln!(
            "tether: warning: could not remove the token file {}: {error}",
            path.display()
        );
    }
}

/// `--ttl`: a humantime duration of whole milliseconds (the Task API's
/// unit), at least 1ms.
fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if ttl < Duration::from_millis(1) {
        return Err("must be at least 1ms; leave the flag out for the agent's default".to_owned());
    }
    if ttl.subsec_nanos() % 1_000_000 != 0 {
        return Err("must be whole milliseconds".to_owned());
    }
    if u64::try_from(ttl.as_millis()).is_err() {
        return Err("is too long".to_owned());
    }
    Ok(ttl)
}

/// `ttl` in milliseconds; `parse_ttl` has checked that it fits.
fn whole_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use tonic::Status;

    use super::*;
    use crate::cli::Cli;

    fn status(status: Status) -> WorkloadClientError {
        WorkloadClientError::Status {
            socket: "/a.sock".into(),
            status,
        }
    }

    #[test]
    fn the_agent_ending_the_task_is_told_from_losing_the_agent() {
        let over = [
            Status::permission_denied("task tsk-1 ended: revoked"),
            Status::deadline_exceeded("task tsk-1 ended: deadline"),
            Status::failed_precondition("task tsk-1 has ended"),
            Status::not_found("no task tsk-1"),
        ];
        for s in over {
            let message = s.message().to_owned();
            assert_eq!(ended(&status(s)), Some(message));
        }
        for s in [
            Status::unavailable("tether is shutting down"),
            Status::unknown("h2 protocol error"),
            Status::internal("connection reset"),
        ] {
            assert_eq!(ended(&status(s)), None);
        }
        let slow = WorkloadClientError::Timeout {
            socket: "/a.sock".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(ended(&slow), None);
    }

    #[test]
    fn the_command_comes_after_the_double_dash() {
        let cli = Cli::try_parse_from([
            "tether",
            "task",
            "run",
            "--audience",
            "spiffe://example.org/mcp",
            "--intent",
            "triage",
            "--tool",
            "a",
            "--tool",
            "b",
            "--ttl",
            "10m",
            "--",
            "sh",
            "-c",
            "echo --tool",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        for args in [
            // No command.
            &[
                "tether",
                "task",
                "run",
                "--audience",
                "a",
                "--intent",
                "i",
                "--tool",
                "t",
            ][..],
            // No tool.
            &[
                "tether",
                "task",
                "run",
                "--audience",
                "a",
                "--intent",
                "i",
                "--",
                "true",
            ],
            // A zero TTL.
            &[
                "tether",
                "task",
                "run",
                "--audience",
                "a",
                "--intent",
                "i",
                "--tool",
                "t",
                "--ttl",
                "0s",
                "--",
                "true",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn the_endpoint_is_a_unix_uri() {
        assert_eq!(
            endpoint_uri(Path::new("/run/tether/agent.sock")),
            OsString::from("unix:///run/tether/agent.sock")
        );
    }

    #[test]
    fn ttls_are_whole_milliseconds() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(whole_ms(Duration::from_secs(90)), 90_000);
        for bad in ["0s", "1500us", "soon"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
