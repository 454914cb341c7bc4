//! The flags several commands share: where the workload socket is and how
//! long to wait (`task run`, `token ...`), and the one parser of
//! `--timeout`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::client::workload::{SocketError, resolve_socket};
use crate::config::EnvSource;

/// Where the workload socket is and how long to wait: the flags of `task
/// run` and `token ...`, as `tether api` spells them.
#[derive(Debug, Args)]
pub(crate) struct SocketArgs {
    /// The Workload API socket: a path, or a URI (unix:///abs/path or
    /// unix:/abs/path). Without it: $SPIFFE_ENDPOINT_SOCKET (a unix: URI),
    /// then $TETHER_SOCKET_PATH, then the agent's default for this user
    /// (/run/tether/agent.sock for root).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<String>,

    /// How long to wait for the connection and for each answer (humantime:
    /// 500ms, 5s, 1m).
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_timeout
    )]
    timeout: Duration,
}

// === impl SocketArgs ===

impl SocketArgs {
    /// The socket to dial (flag, environment, default).
    pub(crate) fn socket(&self, env: &dyn EnvSource) -> Result<PathBuf, SocketError> {
        resolve_socket(self.socket.as_deref(), env)
    }

    /// `--timeout`.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Parses `--timeout`: a humantime duration greater than zero.
pub(crate) fn parse_timeout(value: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if timeout.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_must_be_positive_durations() {
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").is_err());
    }
}
