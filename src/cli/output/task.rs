//! What the task commands print: tasks (`task list|show|revoke`) and task
//! tokens (`token exchange|validate`).

use std::fmt::{self, Write as _};

use serde::Serialize;
use time::OffsetDateTime;

use super::text::{cells, list, or_none, printable, table, when};
use super::{Render, Timestamp};

/// One task: `task show`, `task revoke`, and each element of `task list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TaskView {
    /// `id`: the task's id (its tokens' `txn`).
    pub(crate) id: String,
    /// `spiffe_id`: the owner's SPIFFE ID (its tokens' `sub`).
    pub(crate) spiffe_id: String,
    /// `entry_id`: the registration entry that granted that identity.
    pub(crate) entry_id: String,
    /// `owner_pid`: the process that began the task (for `task run`, the
    /// runner).
    pub(crate) owner_pid: i32,
    /// `owner_uid`.
    pub(crate) owner_uid: u32,
    /// `owner_executable`: its path (`""` if unknown).
    pub(crate) owner_executable: String,
    /// `audience`: the one audience of its tokens.
    pub(crate) audience: String,
    /// `intent`: what it is for, in words.
    pub(crate) intent: String,
    /// `tools`: the tools it may use.
    pub(crate) tools: Vec<String>,
    /// `bound`: its tokens are bound to the owner's X.509-SVID.
    pub(crate) bound: bool,
    /// `created_at`: RFC 3339 (or `null`).
    pub(crate) created_at: Option<Timestamp>,
    /// `deadline`: when it ends at the latest, RFC 3339 (or `null`).
    pub(crate) deadline: Option<Timestamp>,
    /// `tokens_issued`: tokens issued for it so far, exchanges included.
    pub(crate) tokens_issued: u64,
    /// `state`: `"active"` or `"ended"`.
    pub(crate) state: String,
    /// `end_reason`: why it ended (`"completed"`, `"deadline"`, `"owner
    /// exited"`, `"entry removed"`, `"revoked"`), `null` while active.
    pub(crate) end_reason: Option<String>,
    /// `ended_at`: RFC 3339, `null` while active.
    pub(crate) ended_at: Option<Timestamp>,
}

/// `tether task list`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TasksReport {
    /// `tasks`: in the agent's order.
    pub(crate) tasks: Vec<TaskView>,
}

/// `tether token exchange`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ExchangedToken {
    /// `token`: the new task token (compact JWS).
    pub(crate) token: String,
    /// `expires_at`: RFC 3339 (or `null` if the agent did not say).
    pub(crate) expires_at: Option<Timestamp>,
}

/// `tether token validate`. Every field is always present; all but `valid`
/// and `reason` are empty when the token is not valid.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TaskTokenValidation {
    /// `valid`.
    pub(crate) valid: bool,
    /// `reason`: why not, when not valid; `null` when valid.
    pub(crate) reason: Option<String>,
    /// `spiffe_id`: the subject (the task owner's SPIFFE ID).
    pub(crate) spiffe_id: String,
    /// `task_id`: the task (`txn`).
    pub(crate) task_id: String,
    /// `actors`: the actor chain (`act`), newest actor first; empty when
    /// the token was never exchanged.
    pub(crate) actors: Vec<String>,
    /// `claims`: every claim of the token, as the agent returned them.
    pub(crate) claims: serde_json::Value,
}

// === impl TaskView ===

impl Render for TaskView {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "ID:           {}", printable(&self.id))?;
        writeln!(w, "SPIFFE ID:    {}", printable(&self.spiffe_id))?;
        writeln!(w, "Entry:        {}", or_none(&self.entry_id))?;
        writeln!(
            w,
            "Owner:        pid {}, uid {}, {}",
            self.owner_pid,
            self.owner_uid,
            or_none(&self.owner_executable)
        )?;
        writeln!(w, "Audience:     {}", printable(&self.audience))?;
        writeln!(w, "Intent:       {}", or_none(&self.intent))?;
        writeln!(w, "Tools:        {}", list(&self.tools))?;
        writeln!(
            w,
            "Bound:        {}",
            if self.bound {
                "yes (to the owner's X.509-SVID)"
            } else {
                "no"
            }
        )?;
        writeln!(w, "Created:      {}", when(self.created_at, now))?;
        writeln!(w, "Deadline:     {}", when(self.deadline, now))?;
        writeln!(w, "Tokens:       {}", self.tokens_issued)?;
        match &self.end_reason {
            Some(_) => writeln!(
                w,
                "State:        {}, {}",
                self.state_line(),
                when(self.ended_at, now)
            ),
            None => writeln!(w, "State:        {}", self.state_line()),
        }
    }
}

impl TaskView {
    /// "active", or "ended: revoked".
    fn state_line(&self) -> String {
        match &self.end_reason {
            Some(reason) => format!("{}: {}", printable(&self.state), printable(reason)),
            None => printable(&self.state).into_owned(),
        }
    }
}

// === impl TasksReport ===

impl Render for TasksReport {
    fn readable(&self, w: &mut String, now: OffsetDateTime) -> fmt::Result {
        if self.tasks.is_empty() {
            return writeln!(w, "No tasks");
        }
        let rows = self.tasks.iter().map(|t| {
            vec![
                printable(&t.id).into_owned(),
                printable(&t.spiffe_id).into_owned(),
                t.owner_pid.to_string(),
                printable(&t.audience).into_owned(),
                cells(&t.tools),
                when(t.deadline, now),
                t.tokens_issued.to_string(),
                t.state_line(),
            ]
        });
        table(
            w,
            &[
                "ID",
                "SPIFFE ID",
                "OWNER PID",
                "AUDIENCE",
                "TOOLS",
                "DEADLINE",
                "TOKENS",
                "STATE",
            ],
            rows,
        )
    }
}

// === impl ExchangedToken ===

impl Render for ExchangedToken {
    /// The bare token, for `$(...)`.
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        writeln!(w, "{}", printable(&self.token))
    }
}

// === impl TaskTokenValidation ===

impl Render for TaskTokenValidation {
    /// Readable output is for a valid token only (an invalid one is an
    /// error on stderr).
    fn readable(&self, w: &mut String, _now: OffsetDateTime) -> fmt::Result {
        if !self.valid {
            let reason = self.reason.as_deref().unwrap_or("");
            return writeln!(w, "invalid: {}", printable(reason));
        }
        writeln!(w, "valid")?;
        writeln!(w, "SPIFFE ID:    {}", printable(&self.spiffe_id))?;
        writeln!(w, "Task:         {}", printable(&self.task_id))?;
        if self.actors.is_empty() {
            writeln!(w, "Actor chain:  (none: not exchanged)")?;
        } else {
            writeln!(w, "Actor chain:  {} (newest first)", list(&self.actors))?;
        }
        writeln!(w, "Claims:")?;
        // Pretty JSON escapes control characters itself.
        let claims = serde_json::to_string_pretty(&self.claims).map_err(|_| fmt::Error)?;
        writeln!(w, "{claims}")
    }
}
