//! `tether server run --config FILE`: load the server's configuration,
//! start it, wait for a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::super::{EXIT_USAGE, fail};
use crate::config::ProcessEnv;
use crate::server::{ServerConfig, run as server_run};
use crate::telemetry::{self, LogConfig};

/// Arguments of `tether server run`.
#[derive(Debug, Args)]
pub(crate) struct ServerRunArgs {
    /// The server's TOML config file.
    #[arg(long, short, env = "TETHER_SERVER_CONFIG", value_name = "FILE")]
    config: PathBuf,
}

/// Runs the server until SIGINT or SIGTERM. The log level is
/// `TETHER_LOG_LEVEL` (default info).
pub(crate) fn run(args: &ServerRunArgs) -> ExitCode {
    let config = match ServerConfig::load(&args.config, &ProcessEnv) {
        Ok(config) => config,
        Err(error) => return fail(EXIT_USAGE, &error),
    };
    let mut log = LogConfig::default();
    if let Ok(level) = std::env::var("TETHER_LOG_LEVEL") {
        log.level = level;
    }
    telemetry::init(&log);
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
        let running = server_run::start(config).await?;
        running.run_until_signal().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(1, error.as_ref()),
    }
}
