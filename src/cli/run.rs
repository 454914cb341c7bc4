//! `tether run`: load the configuration, start the agent, wait for a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{EXIT_USAGE, fail};
use crate::config::{Config, ProcessEnv};
use crate::{daemon, telemetry};

/// Arguments of `tether run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The TOML config file. Without it the agent runs on the embedded
    /// default: trust domain tether.local, and an identity for the user
    /// who started it.
    #[arg(long, short, env = "TETHER_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub(crate) fn run(args: &RunArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), &ProcessEnv) {
        Ok(config) => config,
        Err(error) => return fail(EXIT_USAGE, &error),
    };
    telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = anyhow::Error::new(error).context("starting the runtime");
            return fail(1, error.as_ref());
        }
    };
    let result = runtime.block_on(async {
        let running = daemon::start(config).await?;
        running.run_until_signal().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The contexts and the errors below them, each once.
        Err(error) => fail(1, error.as_ref()),
    }
}
