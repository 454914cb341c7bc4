//! The `tether` command line: `run` starts the agent; `api`, `token` and
//! `task run` talk to a running agent's workload socket the way a workload
//! would; the operator commands (`entry`, `svid`, `bundle`, `healthcheck`,
//! `reload`, `task list|show|revoke`) talk to its admin socket; `audit`
//! reads the audit trail's files directly; `server ...` talks to the
//! fleet server's admin socket.
//!
//! Exit codes (stable, for scripts): 0 success; 1 any other failure (the
//! agent refused a request as invalid, say); 2 bad flags (clap); 64 bad
//! configuration or usage; 69 the agent could not be reached; 77 the agent
//! refused (no identity, permission denied).

mod admin_client;
mod api;
mod audit;
mod entry;
mod flags;
mod operator;
mod output;
mod policy;
mod run;
mod server;
mod subreaper;
mod task;
mod task_run;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The exit statuses the clients' errors map to are the CLI's too.
use crate::client::{EXIT_NOPERM, EXIT_UNAVAILABLE, EXIT_USAGE};
use crate::error::Chain;

/// tether: the identity agent for AI and MCP agent processes.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: serve the SPIFFE Workload API on a Unix socket.
    Run(run::RunArgs),
    /// Talk to a running agent's Workload API as this process: fetch and
    /// watch SVIDs and bundles, validate JWT-SVIDs.
    Api(api::ApiArgs),
    /// Manage registration entries (admin socket).
    Entry(entry::EntryArgs),
    /// Inspect issued SVIDs and who holds them (admin socket).
    Svid(operator::SvidArgs),
    /// Show the trust bundle (admin socket).
    Bundle(operator::BundleArgs),
    /// Check that the agent answers and serves (admin socket).
    ///
    /// Exit 0 and one line ("serving: trust domain ..., N entries, M open
    /// streams") only then; otherwise the reason on stderr and exit 69
    /// (unreachable) or 1 (not serving).
    ///
    /// --json prints {"serving", "trust_domain", "entries", "open_streams",
    /// "version"} whenever the agent answers.
    Healthcheck(operator::PlainArgs),
    /// Ask the agent to re-read its config file, as SIGHUP does (admin
    /// socket).
    ///
    /// A refused reload keeps the running config: the agent's reason goes
    /// to stderr and the exit status is 1.
    ///
    /// --json prints {"config_entries", "federations"}.
    Reload(operator::PlainArgs),
    /// Run a command as one task with task-bound tokens (workload socket);
    /// list, show and revoke tasks (admin socket).
    Task(task::TaskArgs),
    /// Exchange or validate task tokens (workload socket).
    Token(token::TokenArgs),
    /// Validate a policy directory, or decide one request against it, as
    /// the agent would (offline: no agent needed).
    Policy(policy::PolicyArgs),
    /// Verify or read the tamper-evident audit trail (its files; no agent
    /// needed).
    Audit(audit::AuditArgs),
    /// The fleet's server: join tokens, entries, nodes and the bundle
    /// (the server's admin socket).
    Server(server::ServerArgs),
}

/// Runs the parsed command line and maps the outcome to an exit status.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Api(args) => api::run(&args),
        Command::Entry(args) => entry::run(&args),
        Command::Svid(args) => operator::run_svid(&args),
        Command::Bundle(args) => operator::run_bundle(&args),
        Command::Healthcheck(args) => operator::run_healthcheck(&args),
        Command::Reload(args) => operator::run_reload(&args),
        Command::Task(args) => task::run(&args),
        Command::Token(args) => token::run(&args),
        Command::Policy(args) => policy::run(&args),
        Command::Audit(args) => audit::run(&args),
        Command::Server(args) => server::run(&args),
    }
}

/// Prints `error` and its whole `source()` chain as one line to stderr
/// and returns `code`: the message says what failed, the chain why (down
/// to the OS error), each level once.
fn fail(code: u8, error: &(dyn std::error::Error + '_)) -> ExitCode {
    eprintln!("tether: error: {}", Chain(error));
    ExitCode::from(code)
}
