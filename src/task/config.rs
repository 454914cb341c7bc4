//! `[tasks]` settings: [`TaskConfig`], its defaults, and the checks that
//! make a loaded configuration hang together (the `config` module calls
//! [`TaskConfig::validate`] once, at load).

use std::time::Duration;

use serde::Deserialize;

/// `[tasks]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// Task lifetime when the request names none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longest task lifetime a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Lifetime of each token (never past the task deadline).
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Longest token lifetime validation accepts (`exp - iat`).
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
    /// Longest intent, in bytes.
    pub max_intent_len: usize,
    /// Most tools per task.
    pub max_tools: usize,
    /// Longest tool name, in bytes.
    pub max_tool_len: usize,
    /// Most active tasks one process may own.
    pub max_tasks_per_process: usize,
    /// Longest audience, in bytes: not a `[tasks]` key but `[limits]
    /// max_audience_len`, the Workload API's, so a task audience and a
    /// JWT-SVID audience have one bound (set when the config is composed).
    #[serde(skip)]
    pub max_audience_len: usize,
}

// === impl TaskConfig ===

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(5 * 60),
            max_ttl: Duration::from_secs(60 * 60),
            token_ttl: Duration::from_secs(2 * 60),
            max_token_ttl: Duration::from_secs(5 * 60),
            max_intent_len: 1024,
            max_tools: 32,
            max_tool_len: 128,
            max_tasks_per_process: 64,
            max_audience_len: 1024,
        }
    }
}

impl TaskConfig {
    /// Checks the settings hang together; on failure names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |key, d: Duration| {
            if d.is_zero() {
                Err((key, "must be greater than zero".to_owned()))
            } else {
                Ok(())
            }
        };
        positive("tasks.default_ttl", self.default_ttl)?;
        positive("tasks.max_ttl", self.max_ttl)?;
        positive("tasks.token_ttl", self.token_ttl)?;
        positive("tasks.max_token_ttl", self.max_token_ttl)?;
        if self.default_ttl > self.max_ttl {
            return Err(("tasks.default_ttl", "is longer than tasks.max_ttl".into()));
        }
        if self.token_ttl > self.max_token_ttl {
            return Err((
                "tasks.token_ttl",
                "is longer than tasks.max_token_ttl".into(),
            ));
        }
        if self.max_intent_len > crate::store::MAX_INTENT_LEN {
            return Err((
                "tasks.max_intent_len",
                format!(
                    "is at most {} (what the task store keeps)",
                    crate::store::MAX_INTENT_LEN
                ),
            ));
        }
        for (key, n) in [
            ("tasks.max_intent_len", self.max_intent_len),
            ("tasks.max_tools", self.max_tools),
            ("tasks.max_tool_len", self.max_tool_len),
            ("tasks.max_tasks_per_process", self.max_tasks_per_process),
            ("limits.max_audience_len", self.max_audience_len),
        ] {
            if n == 0 {
                return Err((key, "must be greater than zero".into()));
            }
        }
        Ok(())
    }
}
