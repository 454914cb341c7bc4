//! What a request may ask for: the checks BeginTask and ExchangeToken run
//! before anything else (policy included) looks at a request. A value out
//! of bounds is refused with the field and the limit, never shortened.

use std::time::Duration;

use super::{TaskConfig, TaskError, Tasks};

// === impl Tasks ===

impl Tasks {
    /// Checks what a BeginTask request asks for (audience, intent, tools,
    /// lifetime) before anything else looks at it, policy included; the
    /// lifetime the task gets.
    pub fn check_begin(
        &self,
        audience: &str,
        intent: &str,
        tools: &[String],
        ttl: Option<Duration>,
    ) -> Result<Duration, TaskError> {
        let config = &self.inner.config;
        check_audience("audience", audience, config)?;
        if intent.trim().is_empty() {
            return Err(invalid("intent", "must say what the task is for"));
        }
        if intent.len() > config.max_intent_len {
            return Err(invalid(
                "intent",
                format!(
                    "is {} bytes; the limit is {}",
                    intent.len(),
                    config.max_intent_len
                ),
            ));
        }
        check_tools(tools, config)?;
        let ttl = ttl.unwrap_or(config.default_ttl);
        if ttl.is_zero() {
            return Err(invalid("ttl", "must be greater than zero"));
        }
        if ttl > config.max_ttl {
            return Err(invalid(
                "ttl",
                format!(
                    "{} is above the maximum task lifetime of {}; ask for less (it is never shortened silently)",
                    humantime::format_duration(ttl),
                    humantime::format_duration(config.max_ttl)
                ),
            ));
        }
        Ok(ttl)
    }
}

pub(super) fn invalid(field: &'static str, problem: impl Into<String>) -> TaskError {
    TaskError::Invalid {
        field,
        problem: problem.into(),
    }
}

pub(super) fn check_audience(
    field: &'static str,
    audience: &str,
    config: &TaskConfig,
) -> Result<(), TaskError> {
    if audience.is_empty() {
        return Err(invalid(field, "is required (exactly one audience)"));
    }
    if audience.len() > config.max_audience_len {
        return Err(invalid(
            field,
            format!(
                "is {} bytes; the limit is {} (limits.max_audience_len)",
                audience.len(),
                config.max_audience_len
            ),
        ));
    }
    if audience
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(field, "must be one audience: no spaces"));
    }
    Ok(())
}

pub(super) fn check_tools(tools: &[String], config: &TaskConfig) -> Result<(), TaskError> {
    if tools.len() > config.max_tools {
        return Err(invalid(
            "tools",
            format!("{} tools; the limit is {}", tools.len(), config.max_tools),
        ));
    }
    for tool in tools {
        let ok = !tool.is_empty()
            && tool.len() <= config.max_tool_len
            && tool.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/')
            });
        if !ok {
            return Err(invalid(
                "tools",
                format!(
                    "{:?} is not a tool name (1-{} characters of A-Z a-z 0-9 . _ - : /)",
                    tool.chars().take(80).collect::<String>(),
                    config.max_tool_len
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn dedup(mut tools: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    tools.retain(|t| seen.insert(t.clone()));
    tools
}
