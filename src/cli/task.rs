//! `tether task run|list|show|revoke`: `run` begins a task on the workload
//! socket and runs a command inside it ([`super::task_run`]); `list`,
//! `show` and `revoke` are the operator's view of every task, over the
//! admin socket.
//!
//! Rendering lives in [`super::output`]; dialling and exit codes in
//! [`super::admin_client`].

use std::io;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use thiserror::Error;

use super::admin_client::{AdminArgs, AdminClientError};
use super::fail;
use super::output::{TaskView, TasksReport, Timestamp};
use super::task_run::{self, RunArgs};
use crate::config::ProcessEnv;
use crate::proto::admin as pb;

/// Arguments of `tether task`.
#[derive(Debug, Args)]
pub(crate) struct TaskArgs {
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Run a command as one task (workload socket): begin the task, run
    /// COMMAND with its token, keep the token fresh, end the task when
    /// COMMAND exits.
    ///
    /// COMMAND gets TETHER_TASK_TOKEN (the first token), TETHER_TASK_ID,
    /// SPIFFE_ENDPOINT_SOCKET (unix:// + the socket in use) and, with
    /// --token-file, TETHER_TASK_TOKEN_FILE. Its descendants asking the
    /// Workload API for a JWT-SVID get this task's token. SIGINT, SIGTERM
    /// and SIGHUP are forwarded to it; descendants it leaves running are
    /// stopped after --grace (SIGTERM, then SIGKILL).
    ///
    /// Exit status: COMMAND's, or 128 + the signal that killed it; 1 when
    /// the task ended first (revoked, deadline, entry removed: the reason
    /// goes to stderr and COMMAND gets SIGTERM); 1, 77 or 69 when the agent
    /// refused the task or could not be reached; 127 or 126 when COMMAND
    /// could not be found or run.
    Run(RunArgs),
    /// List the active tasks (with --all, also ended ones whose tokens
    /// could still be presented) as a table (admin socket).
    ///
    /// --json prints {"tasks": [task, ..]}, each as `task show --json`
    /// prints it.
    List(ListArgs),
    /// Show one task (admin socket).
    ///
    /// --json prints {"id", "spiffe_id", "entry_id", "owner_pid",
    /// "owner_uid", "owner_executable", "audience", "intent", "tools": [..],
    /// "bound", "created_at", "deadline" (RFC 3339 or null),
    /// "tokens_issued", "state" ("active" | "ended"), "end_reason" (null
    /// while active), "ended_at" (RFC 3339 or null)}.
    Show(IdArgs),
    /// End a task as revoked: every token of it, exchanged ones included,
    /// is refused from now on, and `task run` stops its command (admin
    /// socket). Prints the task as it is afterwards.
    ///
    /// --json prints the task as `task show --json` does.
    Revoke(IdArgs),
}

/// Arguments of `tether task list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    common: AdminArgs,

    /// Also list ended tasks the agent still remembers.
    #[arg(long)]
    all: bool,
}

/// A task id, and the admin socket flags.
#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    #[command(flatten)]
    common: AdminArgs,

    /// The task's id, as `task list` shows it.
    id: String,
}

/// Why `task list|show|revoke` failed.
#[derive(Debug, Error)]
pub(crate) enum TaskCommandError {
    /// Reaching the agent failed, or the agent refused.
    #[error(transparent)]
    Client(#[from] AdminClientError),
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

// === impl TaskCommandError ===

impl TaskCommandError {
    /// The exit status for this failure (see `cli` for the table).
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Client(error) => error.exit_code(),
            Self::Stdout { .. } => 1,
        }
    }

    /// The reader of our output went away (`| head -1`): not worth a
    /// complaint.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Stdout { source } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Runs `tether task ...`.
pub(crate) fn run(args: &TaskArgs) -> ExitCode {
    let result = match &args.command {
        TaskCommand::Run(run) => return task_run::run(run),
        TaskCommand::List(list) => list_tasks(list),
        TaskCommand::Show(show) => show_task(show),
        TaskCommand::Revoke(revoke) => revoke_task(revoke),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn list_tasks(args: &ListArgs) -> Result<(), TaskCommandError> {
    let all = args.all;
    let tasks = args.common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, TaskCommandError>(client.list_tasks(all).await?)
    })?;
    let report = TasksReport {
        tasks: tasks.into_iter().map(task_view).collect(),
    };
    args.common.format().print(&report).map_err(stdout)
}

fn show_task(args: &IdArgs) -> Result<(), TaskCommandError> {
    let id = args.id.clone();
    let task = args.common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, TaskCommandError>(client.get_task(id).await?)
    })?;
    args.common.format().print(&task_view(task)).map_err(stdout)
}

fn revoke_task(args: &IdArgs) -> Result<(), TaskCommandError> {
    let id = args.id.clone();
    let task = args.common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, TaskCommandError>(client.revoke_task(id).await?)
    })?;
    args.common.format().print(&task_view(task)).map_err(stdout)
}

/// The agent's task, for printing.
fn task_view(task: pb::TaskInfo) -> TaskView {
    let ended = !task.end_reason.is_empty();
    TaskView {
        id: task.id,
        spiffe_id: task.spiffe_id,
        entry_id: task.entry_id,
        owner_pid: task.owner_pid,
        owner_uid: task.owner_uid,
        owner_executable: task.owner_executable,
        audience: task.audience,
        intent: task.intent,
        tools: task.tools,
        bound: task.bound,
        created_at: Timestamp::from_unix_ms(task.created_at_ms),
        deadline: Timestamp::from_unix_ms(task.deadline_ms),
        tokens_issued: task.tokens_issued,
        state: task.state,
        end_reason: ended.then_some(task.end_reason),
        ended_at: Timestamp::from_unix_ms(task.ended_at_ms),
    }
}

fn stdout(source: io::Error) -> TaskCommandError {
    TaskCommandError::Stdout { source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_from_the_agent_become_views() {
        let info = pb::TaskInfo {
            id: "tsk-1".into(),
            spiffe_id: "spiffe://example.org/agent".into(),
            entry_id: "cfg-1".into(),
            owner_pid: 42,
            owner_uid: 1000,
            owner_executable: "/usr/bin/tether".into(),
            audience: "spiffe://example.org/mcp".into(),
            intent: "triage".into(),
            tools: vec!["jira.read".into()],
            created_at_ms: 1_700_000_000_000,
            deadline_ms: 1_700_000_600_000,
            state: "ended".into(),
            end_reason: "revoked".into(),
            ended_at_ms: 1_700_000_060_000,
            tokens_issued: 3,
            bound: true,
        };
        assert_eq!(
            serde_json::to_value(task_view(info.clone())).unwrap(),
            serde_json::json!({
                "id": "tsk-1",
                "spiffe_id": "spiffe://example.org/agent",
                "entry_id": "cfg-1",
                "owner_pid": 42,
                "owner_uid": 1000,
                "owner_executable": "/usr/bin/tether",
                "audience": "spiffe://example.org/mcp",
                "intent": "triage",
                "tools": ["jira.read"],
                "bound": true,
                "created_at": "2023-11-14T22:13:20Z",
                "deadline": "2023-11-14T22:23:20Z",
                "tokens_issued": 3,
                "state": "ended",
                "end_reason": "revoked",
                "ended_at": "2023-11-14T22:14:20Z",
            })
        );
        let active = task_view(pb::TaskInfo {
            state: "active".into(),
            end_reason: String::new(),
            ended_at_ms: 0,
            ..info
        });
        assert_eq!(active.end_reason, None);
        assert_eq!(active.ended_at, None);
    }
}
