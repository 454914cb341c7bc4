//! Configuration errors: each names the key, the value and what was expected.

use std::io;
use std::path::PathBuf;

/// Why the configuration was refused. A config error exits the agent with
/// status 64 and this one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a value of the
    /// wrong type (the message gives the line and the key).
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's report.
        #[source]
        source: toml::de::Error,
    },
    /// A key has a value tether cannot use.
    #[error("{key} = {value:?}: {source}")]
    Invalid {
        /// The key (`trust_domain`, `entries[2]`, `authority.ca_ttl`).
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] with a plain reason.
    pub fn invalid(
        key: impl Into<String>,
        value: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            key: key.into(),
            value: value.into(),
            source: problem.into().into(),
        }
    }
}
