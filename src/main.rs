//! The `tether` binary: parse the command line, run it, exit with its status.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    tether::cli::run(tether::cli::Cli::parse())
}
