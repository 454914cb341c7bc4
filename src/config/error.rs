//! Configuration errors: each names the key, the value and what was
//! expected; a cause below that (the OS error, a domain's refusal) is the
//! `source()`, printed with [`crate::error::Chain`].

use std::io;
use std::path::PathBuf;

/// Why the configuration was refused. A config error exits the agent with
/// status 64 and this one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a value of the
    /// wrong type.
    #[error("config file {path}:{line}:{column}: {message} (in `{context}`)", message = report.message())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line at fault, trimmed and shortened, so the key is visible.
        context: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// The parser's report (boxed: it is large, and errors are rare).
        /// Its message is in ours and not the `source()` as well: its own
        /// `Display` is a multi-line excerpt, and the error is one line.
        report: Box<toml::de::Error>,
    },
    /// A key has a value tether cannot use.
    #[error("{key} = {value:?}")]
    Invalid {
        /// The key (`trust_domain`, `entries[2]`, `authority.ca_ttl`).
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A setting (one key, or keys that must agree) that a domain's own
    /// check refused; the problem says which value is wrong.
    #[error("{key}: {problem}")]
    Setting {
        /// The key (`tasks.token_ttl`, `attestor.k8s.node_name`).
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl ConfigError {
    /// A [`ConfigError::Parse`] located in `text`.
    pub fn parse(path: PathBuf, text: &str, source: toml::de::Error) -> Self {
        let offset = source.span().map_or(0, |span| span.start).min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let context: String = text
            .lines()
            .nth(line - 1)
            .unwrap_or_default()
            .trim()
            .chars()
            .take(80)
            .collect();
        Self::Parse {
            path,
            context,
            line,
            column,
            report: Box::new(source),
        }
    }

    /// A [`ConfigError::Setting`]: a domain's check of its section failed.
    pub fn setting(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Setting {
            key: key.into(),
            problem: problem.into(),
        }
    }

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
