//! `tether server ...`: `run` starts the fleet's server ([`run`]); the
//! operator commands reach it over
//! its admin socket: `token create`, `entry create|list|show|delete`,
//! `node list|evict`, `task list|show|revoke`, `bundle show`.
//!
//! The server validates every field and its refusal names the field; the
//! CLI only builds the request, with the agent's own flag structs (`entry
//! create`'s spec flags, `bundle show`'s format) and renderings, so an
//! entry reads the same from the agent and the server. A join token goes
//! to stdout alone (for `$(...)`), its expiry to stderr.

mod client;
mod run;

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use thiserror::Error;

use super::entry::{EntryError, IdArg, SpecArgs, entry_view};
use super::fail;
use super::operator::{
    BundleFormat, OperatorError, ShowBundleArgs, check_bundle_format, print_bundle,
};
use super::output::{
    self, DeletedReport, FleetTaskView, FleetTasksReport, NodeView, NodesReport,
    ServerEntriesReport, ServerEntryView, Timestamp,
};
use crate::config::ProcessEnv;
use crate::proto::server as pb;
use client::{ServerAdminArgs, ServerClientError};

/// Arguments of `tether server`.
#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    #[command(subcommand)]
    command: ServerCommand,
}

/// What `tether server` does. Each operator command carries the shared
/// admin-socket flags; a command that runs the server is one more
/// variant.
#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Run the server: the fleet's keys, entries and node registry,
    /// serving agents over mutual TLS on `listen`.
    Run(run::ServerRunArgs),
    /// Create join tokens admitting nodes (admin socket).
    Token(Operator<TokenCommand>),
    /// Manage the fleet's registration entries (admin socket).
    Entry(Operator<EntryCommand>),
    /// List and evict attested nodes (admin socket).
    Node(Operator<NodeCommand>),
    /// The fleet's tasks: list, show, and revoke on every node (admin
    /// socket).
    Task(Operator<TaskCommand>),
    /// Show the fleet's trust bundle (admin socket).
    Bundle(Operator<BundleCommand>),
}

/// An operator command and the admin-socket flags.
#[derive(Debug, Args)]
struct Operator<C: Subcommand> {
    #[command(flatten)]
    common: ServerAdminArgs,
    #[command(subcommand)]
    command: C,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use join token admitting one node. Prints the token
    /// alone on stdout (shown once: the server keeps only its hash), its
    /// expiry on stderr.
    Create(TokenCreateArgs),
}

/// Arguments of `tether server token create`.
#[derive(Debug, Args)]
struct TokenCreateArgs {
    /// The node the token admits (a DNS subdomain: the last segment of the
    /// node's SPIFFE ID).
    #[arg(long, value_name = "NAME")]
    node: String,
    /// How long the token may be used (humantime; at most 7 days).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_token_ttl)]
    ttl: Duration,
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// Create an entry: callers with all these selectors get this SPIFFE
    /// ID, on the nodes named and wherever its k8s selectors place it.
    ///
    /// --json prints the entry as `tether entry create --json` does, plus
    /// "nodes": [..].
    Create(ServerSpecArgs),
    /// List entries, the configuration file's and the API's, as a table.
    ///
    /// --json prints {"entries": [entry, ..]}, each as `entry create
    /// --json` prints it.
    List,
    /// Show one entry.
    ///
    /// --json prints the entry as `entry create --json` does.
    Show(IdArg),
    /// Delete an entry created through the admin API (the configuration
    /// file's are the file's).
    ///
    /// --json prints {"deleted": id}.
    Delete(IdArg),
}

/// `tether server entry create`: the agent's entry flags and `--node`.
#[derive(Debug, Args)]
struct ServerSpecArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// A node the entry is served on whatever runs there (repeat for
    /// several).
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List attested nodes.
    ///
    /// --json prints {"nodes": [{"name", "attestation", "attested_at",
    /// "svid_serial", "svid_expires_at", "evicted"}]}.
    List,
    /// Evict a node: its SVID is no longer accepted; it must attest again.
    ///
    /// --json prints the node as `node list --json` prints each.
    Evict(NodeNameArg),
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// List the fleet's tasks, newest first (active ones; --all for ended
    /// ones too).
    ///
    /// --json prints {"tasks": [{"id", "owner_node", "spiffe_id",
    /// "began_at", "deadline", "state", "end_reason", "ended_at"}]}.
    List(TaskListArgs),
    /// Show one task of the fleet's index.
    ///
    /// --json prints the task as `task list --json` prints each.
    Show(TaskIdArg),
    /// Revoke a task on every node: its tokens, exchanged ones included,
    /// are refused everywhere within server.revocation_staleness. A task
    /// that had ended keeps its first end (shown).
    ///
    /// --json prints the task as `task list --json` prints each.
    Revoke(TaskIdArg),
}

/// `tether server task list`'s flags.
#[derive(Debug, Args)]
struct TaskListArgs {
    /// Ended tasks too.
    #[arg(long)]
    all: bool,
    /// Most tasks listed (the server's default: 1000; at most 10000).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    limit: u32,
}

/// A task's id.
#[derive(Debug, Args)]
struct TaskIdArg {
    /// The task's id (its tokens' `txn`).
    id: String,
}

/// A node's name.
#[derive(Debug, Args)]
struct NodeNameArg {
    /// The node's name, as `node list` shows it.
    name: String,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Print the fleet's trust bundle, as `tether bundle show` prints the
    /// agent's.
    Show(ShowBundleArgs),
}

/// Why a `tether server` command failed.
#[derive(Debug, Error)]
pub(crate) enum ServerCliError {
    /// Reaching the server failed, or the server refused.
    #[error(transparent)]
    Client(#[from] ServerClientError),
    /// The server sent an entry that does not read.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The server sent an entry without its fields.
    #[error("the server sent an entry without its fields")]
    IncompleteEntry,
    /// The bundle could not be printed.
    #[error(transparent)]
    Bundle(#[from] OperatorError),
    /// Printing the result failed.
    #[error("writing to stdout")]
    Stdout {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

// === impl ServerCliError ===

impl ServerCliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Client(error) => error.exit_code(),
            Self::Entry(error) => error.exit_code(),
            Self::Bundle(error) => error.exit_code(),
            Self::IncompleteEntry | Self::Stdout { .. } => 1,
        }
    }

    fn is_broken_pipe(&self) -> bool {
        match self {
            Self::Stdout { source } => source.kind() == io::ErrorKind::BrokenPipe,
            Self::Entry(error) => error.is_broken_pipe(),
            Self::Bundle(error) => error.is_broken_pipe(),
            Self::Client(_) | Self::IncompleteEntry => false,
        }
    }
}

/// Runs `tether server ...`.
pub(crate) fn run(args: &ServerArgs) -> ExitCode {
    let result = match &args.command {
        ServerCommand::Run(args) => return run::run(args),
        ServerCommand::Token(op) => token(op),
        ServerCommand::Entry(op) => entry(op),
        ServerCommand::Node(op) => node(op),
        ServerCommand::Task(op) => task(op),
        ServerCommand::Bundle(op) => bundle(op),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => fail(error.exit_code(), &error),
    }
}

fn token(op: &Operator<TokenCommand>) -> Result<(), ServerCliError> {
    let TokenCommand::Create(args) = &op.command;
    let ttl_ms = u64::try_from(args.ttl.as_millis()).unwrap_or(u64::MAX);
    let created = op.common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, ServerCliError>(client.create_join_token(args.node.clone(), ttl_ms).await?)
    })?;
    output::print_token(&created.token).map_err(stdout)?;
    match Timestamp::from_unix_ms(created.expires_at_ms) {
        Some(at) => eprintln!("join token for node {} expires at {at}", args.node),
        None => eprintln!("join token for node {} created", args.node),
    }
    Ok(())
}

fn entry(op: &Operator<EntryCommand>) -> Result<(), ServerCliError> {
    let common = &op.common;
    let format = common.format();
    match &op.command {
        EntryCommand::Create(args) => {
            let entry = common.block_on(&ProcessEnv, |mut client| async move {
                let spec = args.spec.to_spec();
                Ok::<_, ServerCliError>(client.create_entry(spec, args.nodes.clone()).await?)
            })?;
            format.print(&server_entry_view(entry)?).map_err(stdout)
        }
        EntryCommand::List => {
            let entries = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.list_entries().await?)
            })?;
            let report = ServerEntriesReport {
                entries: entries
                    .into_iter()
                    .map(server_entry_view)
                    .collect::<Result<_, _>>()?,
            };
            format.print(&report).map_err(stdout)
        }
        EntryCommand::Show(IdArg { id }) => {
            let entry = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.get_entry(id.clone()).await?)
            })?;
            format.print(&server_entry_view(entry)?).map_err(stdout)
        }
        EntryCommand::Delete(IdArg { id }) => {
            common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.delete_entry(id.clone()).await?)
            })?;
            format
                .print(&DeletedReport {
                    deleted: id.clone(),
                })
                .map_err(stdout)
        }
    }
}

fn node(op: &Operator<NodeCommand>) -> Result<(), ServerCliError> {
    let common = &op.common;
    match &op.command {
        NodeCommand::List => {
            let nodes = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.list_nodes().await?)
            })?;
            let report = NodesReport {
                nodes: nodes.iter().map(node_view).collect(),
            };
            common.format().print(&report).map_err(stdout)
        }
        NodeCommand::Evict(NodeNameArg { name }) => {
            let node = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.evict_node(name.clone()).await?)
            })?;
            common.format().print(&node_view(&node)).map_err(stdout)
        }
    }
}

fn task(op: &Operator<TaskCommand>) -> Result<(), ServerCliError> {
    let common = &op.common;
    let task = match &op.command {
        TaskCommand::List(TaskListArgs { all, limit }) => {
            let tasks = common.block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.list_tasks(*all, *limit).await?)
            })?;
            let report = FleetTasksReport {
                tasks: tasks.iter().map(fleet_task_view).collect(),
            };
            return common.format().print(&report).map_err(stdout);
        }
        TaskCommand::Show(TaskIdArg { id }) => common
            .block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.get_task(id.clone()).await?)
            })?,
        TaskCommand::Revoke(TaskIdArg { id }) => common
            .block_on(&ProcessEnv, |mut client| async move {
                Ok::<_, ServerCliError>(client.revoke_task(id.clone()).await?)
            })?,
    };
    common
        .format()
        .print(&fleet_task_view(&task))
        .map_err(stdout)
}

fn bundle(op: &Operator<BundleCommand>) -> Result<(), ServerCliError> {
    let BundleCommand::Show(show) = &op.command;
    let format: BundleFormat = show.format;
    check_bundle_format(format, op.common.format())?;
    let bundle = op.common.block_on(&ProcessEnv, |mut client| async move {
        Ok::<_, ServerCliError>(client.get_bundle().await?)
    })?;
    Ok(print_bundle(&bundle, format, op.common.format())?)
}

/// The server's entry, for printing.
fn server_entry_view(entry: pb::ServerEntry) -> Result<ServerEntryView, ServerCliError> {
    let Some(inner) = entry.entry else {
        return Err(ServerCliError::IncompleteEntry);
    };
    Ok(ServerEntryView {
        entry: entry_view(inner)?,
        nodes: entry.nodes,
    })
}

/// A node, for printing.
fn node_view(node: &pb::NodeInfo) -> NodeView {
    NodeView {
        name: node.name.clone(),
        attestation: node.attestation.clone(),
        attested_at: Timestamp::from_unix_ms(node.attested_at_ms),
        svid_serial: node.svid_serial.clone(),
        svid_expires_at: Timestamp::from_unix_ms(node.svid_expires_at_ms),
        evicted: node.evicted,
    }
}

/// A task of the fleet's index, for printing.
fn fleet_task_view(task: &pb::FleetTask) -> FleetTaskView {
    let ended = !task.ended_reason.is_empty();
    FleetTaskView {
        id: task.id.clone(),
        owner_node: task.owner_node.clone(),
        spiffe_id: task.spiffe_id.clone(),
        began_at: Timestamp::from_unix_ms(task.began_at_ms),
        deadline: Timestamp::from_unix_ms(task.deadline_ms),
        state: if ended { "ended" } else { "active" }.to_owned(),
        end_reason: task.ended_reason.clone(),
        ended_at: if ended {
            Timestamp::from_unix_ms(task.ended_at_ms)
        } else {
            None
        },
    }
}

/// `--ttl` of a join token: a humantime duration of whole milliseconds,
/// more than zero (the server checks the upper bound).
fn parse_token_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if ttl < Duration::from_millis(1) {
        return Err("must be at least 1ms".to_owned());
    }
    Ok(ttl)
}

fn stdout(source: io::Error) -> ServerCliError {
    ServerCliError::Stdout { source }
}

#[cfg(test)]
mod tests;
