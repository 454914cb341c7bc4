//! The `tether` command line: `run` starts the agent; `api` talks to a
//! running agent's Workload API the way a workload would.
//!
//! Exit codes (stable, for scripts): 0 success; 1 any other failure;
//! 64 bad configuration or usage; 69 the agent could not be reached;
//! 77 the agent refused (no identity, permission denied).

pub mod api;
pub mod output;
pub mod run;
pub mod workload_client;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for bad configuration or usage (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit status when the agent cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status when the agent refused the request (EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

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
}

/// Runs the parsed command line and maps the outcome to an exit status.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Api(args) => api::run(&args),
    }
}

/// Prints a one-line error to stderr and returns `code`.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tether: error: {message}");
    ExitCode::from(code)
}
