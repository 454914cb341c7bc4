//! Telemetry: logging setup. Logs go to stderr (stdout belongs to CLI
//! output), plain or JSON, filtered by `log.level` (an `EnvFilter`
//! directive such as `info` or `tether=debug,h2=warn`).

pub mod http;
pub mod metrics;

pub use metrics::metrics;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// `[log]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter directive (`info`, `debug`, `tether=debug,info`).
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

impl LogConfig {
    /// Checks that `level` is a valid filter directive.
    pub fn validate(&self) -> Result<(), String> {
        EnvFilter::try_new(&self.level)
            .map(drop)
            .map_err(|e| format!("not a log filter: {e}"))
    }
}

/// Installs the global subscriber. A second call (tests start many agents
/// in one process) keeps the first subscriber.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _already_set = match config.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
