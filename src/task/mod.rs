//! Tasks: units of delegated agent work, and their task-bound tokens.
//!
//! A task is begun by an attested process (its owner) for one audience, an
//! intent and a few tools, until a deadline. Its tokens are JWT-SVIDs with
//! task claims ([`claims`]): minutes of life, never past the deadline. A
//! task ends on request, at its deadline, when its owner exits, when the
//! owner's entry is removed, or when an operator revokes it
//! ([`lifecycle`]); from then on every token of it, exchanged ones
//! included, is rejected, until it would have expired anyway.
//!
//! Invariants:
//! - a task's end is in the store before anyone is told it ended, so a
//!   restart never resurrects a token;
//! - a token signed by this agent for a task this agent does not know is
//!   rejected (fail closed);
//! - exchange never widens: same `sub` and `txn`, tools only narrow, expiry
//!   never later than the subject token's, and only the token's audience may
//!   exchange it.

mod active;
pub mod claims;
mod journal;
pub mod lifecycle;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::{mpsc, watch};

use crate::attestation::Caller;
use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, Decision as AuditDecision, EventKind};
use crate::authority::{Authority, AuthorityError};
use crate::bundle::TrustBundle;
use crate::registration::{EntryId, Match};
use crate::store::{Store, StoreError, TaskEnd, TaskRow};
use crate::svid::jwt::{self as jwt_svid, JwtValidationError};
use crate::telemetry::metrics::{Kind, Reason, metrics};
use active::ActiveIndex;
use claims::{Actor, Confirmation, RequesterContext, TCTX_VERSION, TaskClaims, TaskContext};
use journal::Journal;

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
}

/// Why a task operation was refused. The messages are safe to return to
/// the caller.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A request field is not acceptable.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No such task, or not the caller's (the two are not told apart).
    #[error("no task {0} owned by this process")]
    NotOwner(String),
    /// The task has ended.
    #[error("task {id} has ended: {reason}")]
    Ended {
        /// The task.
        id: String,
        /// Why.
        reason: String,
    },
    /// The process owns too many active tasks.
    #[error("this process already owns {0} active tasks (the limit)")]
    TooMany(usize),
    /// The subject token cannot be exchanged.
    #[error("cannot exchange: {0}")]
    Exchange(String),
    /// A token was refused.
    #[error("{0}")]
    Token(#[from] TokenRejection),
    /// No such task (operators).
    #[error("no task {0}")]
    NotFound(String),
    /// Signing failed.
    #[error("signing a task token: {0}")]
    Sign(#[from] AuthorityError),
    /// The task store failed.
    #[error("task store: {0}")]
    Store(#[from] StoreError),
    /// A blocking store job did not complete.
    #[error("task store job failed: {0}")]
    Job(#[from] tokio::task::JoinError),
    /// The decision could not be recorded: nothing is issued unaudited.
    #[error("not issuing: {0}")]
    Audit(#[from] AuditUnavailable),
    /// A begin or an end could not be stored.
    #[error("task store: {0}")]
    Journal(#[from] journal::JournalError),
}

/// Why a token is not valid. Safe to return to the presenter.
#[derive(Debug, thiserror::Error)]
pub enum TokenRejection {
    /// It is not a valid JWT-SVID for the audience.
    #[error(transparent)]
    Jwt(#[from] JwtValidationError),
    /// A valid JWT-SVID, but not a task token.
    #[error("not a task token: {0}")]
    NotATaskToken(String),
    /// The task has ended.
    #[error("task {txn} has ended: {reason}")]
    Ended {
        /// The task.
        txn: String,
        /// Why.
        reason: String,
    },
    /// Signed here, for a task this agent does not know.
    #[error("task {0} is unknown to this agent")]
    UnknownTask(String),
    /// Lives longer than tokens may.
    #[error("token lifetime {0}s exceeds the maximum of {1}s")]
    TooLong(u64, u64),
    /// The tool is not in the token's scope.
    #[error("tool {0:?} is not allowed by this token")]
    ToolNotAllowed(String),
    /// Bound to a certificate that was not presented, or another one.
    #[error("{0}")]
    Binding(&'static str),
}

/// Why a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its owner ended it.
    Completed,
    /// Its deadline passed.
    Deadline,
    /// Its owner process exited.
    OwnerExited,
    /// The registration entry it was begun under was removed.
    EntryRemoved,
    /// An operator revoked it.
    Revoked,
}

/// The process that owns a task.
#[derive(Debug, Clone)]
pub struct Owner {
    /// Its pid.
    pub pid: i32,
    /// Its start time: with the pid, it names one process for good.
    pub start_time: u64,
    /// Its uid.
    pub uid: u32,
    /// Its executable.
    pub executable: Option<PathBuf>,
    /// SHA-256 of its executable.
    pub exe_sha256: Option<String>,
}

/// What a process asks for when it begins a task.
#[derive(Debug, Clone)]
pub struct BeginRequest {
    /// The one audience.
    pub audience: String,
    /// The intent, in words.
    pub intent: String,
    /// The tools.
    pub tools: Vec<String>,
    /// Lifetime; the default when `None`.
    pub ttl: Option<Duration>,
    /// `x5t#S256` of the owner's X.509-SVID, when its tokens are bound.
    pub bind_x5t: Option<String>,
    /// Scope the owner's descendants to the task (`tether task run`).
    pub scope_descendants: bool,
    /// The policies that allowed the begin (for the audit record).
    pub decided_by: Vec<String>,
}

/// A task, as the agent keeps it.
#[derive(Debug)]
pub struct Task {
    /// The task id (`txn`).
    pub id: String,
    /// The owning process.
    pub owner: Owner,
    /// The owner's SPIFFE ID (`sub`).
    pub spiffe_id: SpiffeId,
    /// The entry it was begun under.
    pub entry_id: EntryId,
    /// The one audience of its own tokens.
    pub audience: String,
    /// The stated intent.
    pub intent: String,
    /// The tools granted.
    pub tools: Vec<String>,
    /// Binding of its tokens, if any.
    pub bind_x5t: Option<String>,
    /// Whether the owner's descendants are scoped to it.
    pub scope_descendants: bool,
    /// When it began.
    pub created_at: SystemTime,
    /// When it ends at the latest.
    pub deadline: SystemTime,
    state: Mutex<TaskState>,
}

#[derive(Debug, Clone, Default)]
struct TaskState {
    ended: Option<(EndReason, SystemTime)>,
    tokens_issued: u64,
}

/// A signed task token.
#[derive(Clone)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: String,
    /// Its `jti` (what the audit trail names, never the token).
    pub jti: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

/// An exchange that passed every check but policy.
#[derive(Debug)]
pub struct Exchange {
    /// The task of the subject token.
    pub task: Arc<Task>,
    /// The exchanging identity (the new actor).
    pub actor: SpiffeId,
    /// The new actor chain, newest first.
    pub actors: Vec<String>,
    /// The new audience.
    pub audience: String,
    /// The tools of the new token.
    pub tools: Vec<String>,
    /// The subject token's claims.
    pub subject: TaskClaims,
}

/// A token that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedTaskToken {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// The typed claims.
    pub claims: TaskClaims,
    /// Every claim, as JSON.
    pub raw_claims: serde_json::Map<String, serde_json::Value>,
}

/// The tasks of this agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

/// A task, and its owner process to watch for exit.
type OwnerWatch = (Arc<Task>, Caller);

#[derive(Debug)]
struct Inner {
    config: TaskConfig,
    authority: Authority,
    store: Store,
    audit: AuditLog,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// Bumped whenever a task ends.
    changes: watch::Sender<u64>,
    /// New owners for the lifecycle loop to watch.
    owners: mpsc::UnboundedSender<OwnerWatch>,
    owners_rx: Mutex<Option<mpsc::UnboundedReceiver<OwnerWatch>>>,
    /// Group commit for begins and ends; started on first use, inside the runtime.
    journal: std::sync::OnceLock<Journal>,
    /// Active tasks by owner. Locked after `tasks` when both are held.
    active: Mutex<ActiveIndex>,
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
        ] {
            if n == 0 {
                return Err((key, "must be greater than zero".into()));
            }
        }
        Ok(())
    }
}

// === impl EndReason ===

impl EndReason {
    /// The words used in logs, the store and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Deadline => "deadline",
            Self::OwnerExited => "owner exited",
            Self::EntryRemoved => "entry removed",
            Self::Revoked => "revoked",
        }
    }

    fn parse(value: &str) -> Self {
        match value {
            "completed" => Self::Completed,
            "deadline" => Self::Deadline,
            "owner exited" => Self::OwnerExited,
            "entry removed" => Self::EntryRemoved,
            // Anything else stored is treated as the strongest end.
            _ => Self::Revoked,
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Task ===

impl Task {
    fn state(&self) -> MutexGuard<'_, TaskState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why and when it ended, if it has.
    pub fn ended(&self) -> Option<(EndReason, SystemTime)> {
        self.state().ended
    }

    /// How many tokens were issued for it (exchanges included).
    pub fn tokens_issued(&self) -> u64 {
        self.state().tokens_issued
    }

    /// True when `caller` is the owning process.
    pub fn is_owned_by(&self, caller: &Caller) -> bool {
        caller.pid() == self.owner.pid && caller.start_time() == self.owner.start_time
    }

    fn row(&self) -> TaskRow {
        TaskRow {
            id: self.id.clone(),
            owner_pid: self.owner.pid,
            owner_start_time: self.owner.start_time,
            owner_uid: self.owner.uid,
            owner_executable: self
                .owner
                .executable
                .as_ref()
                .map(|p| p.display().to_string()),
            owner_exe_sha256: self.owner.exe_sha256.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            entry_id: self.entry_id.to_string(),
            audience: self.audience.clone(),
            intent: self.intent.clone(),
            tools: self.tools.clone(),
            bind_x5t: self.bind_x5t.clone(),
            created_at: self.created_at,
            deadline: self.deadline,
            ended: None,
            tokens_issued: 0,
            scope_descendants: self.scope_descendants,
        }
    }

    fn from_row(row: TaskRow) -> Option<Self> {
        let spiffe_id = SpiffeId::new(&row.spiffe_id).ok()?;
        let entry_id = EntryId::parse(&row.entry_id).ok()?;
        let ended = row
            .ended
            .as_ref()
            .map(|end| (EndReason::parse(&end.reason), end.at));
        Some(Self {
            id: row.id,
            owner: Owner {
                pid: row.owner_pid,
                start_time: row.owner_start_time,
                uid: row.owner_uid,
                executable: row.owner_executable.map(PathBuf::from),
                exe_sha256: row.owner_exe_sha256,
            },
            spiffe_id,
            entry_id,
            audience: row.audience,
            intent: row.intent,
            tools: row.tools,
            bind_x5t: row.bind_x5t,
            scope_descendants: row.scope_descendants,
            created_at: row.created_at,
            deadline: row.deadline,
            state: Mutex::new(TaskState {
                ended,
                tokens_issued: row.tokens_issued,
            }),
        })
    }

    fn context(&self) -> TaskContext {
        TaskContext {
            ver: TCTX_VERSION,
            intent: self.intent.clone(),
            tools: self.tools.clone(),
            deadline: unix(self.deadline),
        }
    }

    fn requester(&self) -> RequesterContext {
        RequesterContext {
            authn: "unix-peercred".into(),
            pid: self.owner.pid,
            pid_start: self.owner.start_time,
            uid: self.owner.uid,
            exe_sha256: self.owner.exe_sha256.clone(),
        }
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .finish_non_exhaustive()
    }
}

// === impl Tasks ===

impl Tasks {
    /// The tasks of an agent signing with `authority`, kept in `store`,
    /// every decision recorded in `audit`.
    pub fn new(config: TaskConfig, authority: Authority, store: Store, audit: AuditLog) -> Self {
        let (owners, owners_rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Inner {
                config,
                authority,
                store,
                audit,
                tasks: Mutex::default(),
                changes: watch::channel(0).0,
                owners,
                owners_rx: Mutex::new(Some(owners_rx)),
                journal: std::sync::OnceLock::new(),
                active: Mutex::default(),
            }),
        }
    }

    /// The group-commit writers, started on first use (inside the runtime).
    fn journal(&self) -> &Journal {
        self.inner
            .journal
            .get_or_init(|| Journal::start(&self.inner.store))
    }

    fn active(&self) -> MutexGuard<'_, ActiveIndex> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The task settings.
    pub fn config(&self) -> &TaskConfig {
        &self.inner.config
    }

    /// The trust domain tokens are issued in.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.inner.authority.trust_domain()
    }

    /// Loads the tasks a previous run left (blocking). Ended ones stay
    /// ended; active ones whose owner is gone, or whose deadline passed, are
    /// ended now; the others are watched again.
    pub fn restore(&self) -> Result<usize, TaskError> {
        let now = SystemTime::now();
        let rows = self.inner.store.tasks_until(now)?;
        let mut ends = Vec::new();
        let mut watched = 0;
        for row in rows {
            let id = row.id.clone();
            let Some(task) = Task::from_row(row) else {
                tracing::warn!(task_id = %id, "stored task does not decode; treating it as revoked");
                continue;
            };
            let task = Arc::new(task);
            if task.ended().is_none() {
                let reason = if task.deadline <= now {
                    Some(EndReason::Deadline)
                } else {
                    match Caller::reattach(task.owner.pid, task.owner.uid, 0, task.owner.start_time)
                    {
                        Ok(caller) => {
                            watched += 1;
                            self.active().activate(&task, false);
                            metrics().tasks_active.inc();
                            let _ = self.inner.owners.send((Arc::clone(&task), caller));
                            None
                        }
                        Err(_) => Some(EndReason::OwnerExited),
                    }
                };
                if let Some(reason) = reason {
                    task.state().ended = Some((reason, now));
                    ends.push((
                        task.id.clone(),
                        TaskEnd {
                            at: now,
                            reason: reason.as_str().into(),
                        },
                        task.tokens_issued(),
                    ));
                    tracing::info!(task_id = %task.id, %reason, "task ended while the agent was down");
                }
            }
            self.tasks().insert(task.id.clone(), task);
        }
        if !ends.is_empty() {
            self.inner.store.end_tasks(&ends)?;
        }
        Ok(watched)
    }

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
        check_audience("audience", audience)?;
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

    /// Begins a task owned by `caller` under `matched`, and issues its first
    /// token.
    pub async fn begin(
        &self,
        caller: &Caller,
        owner: Owner,
        matched: &Match,
        request: BeginRequest,
    ) -> Result<(Arc<Task>, IssuedToken), TaskError> {
        let config = &self.inner.config;
        let ttl = self.check_begin(
            &request.audience,
            &request.intent,
            &request.tools,
            request.ttl,
        )?;
        let id = new_task_id()?;
        // Counted from here; given back if the task is not stored.
        let key = (owner.pid, owner.start_time);
        self.active()
            .reserve(key, config.max_tasks_per_process)
            .map_err(TaskError::TooMany)?;

        let decided_by = request.decided_by;
        let now = SystemTime::now();
        let task = Arc::new(Task {
            id,
            owner,
            spiffe_id: matched.spiffe_id.clone(),
            entry_id: matched.entry.id.clone(),
            audience: request.audience,
            intent: request.intent,
            tools: dedup(request.tools),
            bind_x5t: request.bind_x5t,
            scope_descendants: request.scope_descendants,
            created_at: now,
            deadline: now + ttl,
            state: Mutex::default(),
        });
        // Stored before the first token leaves, so a restart knows it.
        if let Err(error) = self.journal().begin(task.row()).await {
            self.active().release(key);
            return Err(error.into());
        }
        {
            let mut tasks = self.tasks();
            tasks.insert(task.id.clone(), Arc::clone(&task));
            self.active().activate(&task, true);
        }
        // Active from now: its end, whenever it comes, counts it down.
        metrics().tasks_active.inc();
        let _ = self.inner.owners.send((Arc::clone(&task), caller.clone()));
        let token = self.issue(
            &task,
            &task.audience,
            &task.tools,
            None,
            task.bind_x5t.clone(),
            None,
            task.requester(),
        )?;
        if let Err(unavailable) = self.inner.audit.record(AuditEvent {
            token_id: Some(token.jti.clone()),
            policy_ids: decided_by,
            ..task_event(&task, EventKind::TaskBegin, AuditDecision::Allow)
        }) {
            // Nothing leaves unaudited: the task dies before its token does.
            let _ = self.finish(&task, EndReason::Revoked).await;
            return Err(unavailable.into());
        }
        metrics()
            .task_tokens_issued
            .get_or_create(&Kind { kind: "begin" })
            .inc();
        tracing::info!(
            task_id = %task.id,
            spiffe_id = %task.spiffe_id,
            pid = task.owner.pid,
            audience = %task.audience,
            tools = ?task.tools,
            // Quoted and escaped: the caller wrote it, and a newline or an
            // escape sequence in a plain log line would forge another.
            intent = ?task.intent,
            deadline = %humantime::format_rfc3339_seconds(task.deadline),
            "task begun"
        );
        Ok((task, token))
    }

    /// The task `id` if `caller` owns it.
    pub fn owned(&self, caller: &Caller, id: &str) -> Result<Arc<Task>, TaskError> {
        self.get(id)
            .filter(|t| t.is_owned_by(caller))
            .ok_or_else(|| TaskError::NotOwner(id.chars().take(80).collect()))
    }

    /// A fresh token for `task` (its own audience and tools), if it lives,
    /// recording which policies allowed the renewal.
    pub fn token_for(
        &self,
        task: &Task,
        decided_by: Vec<String>,
    ) -> Result<IssuedToken, TaskError> {
        if let Some((reason, _)) = task.ended() {
            return Err(TaskError::Ended {
                id: task.id.clone(),
                reason: reason.to_string(),
            });
        }
        let token = self.issue(
            task,
            &task.audience,
            &task.tools,
            None,
            task.bind_x5t.clone(),
            None,
            task.requester(),
        )?;
        self.inner.audit.record(AuditEvent {
            token_id: Some(token.jti.clone()),
            policy_ids: decided_by,
            ..task_event(task, EventKind::TaskRenew, AuditDecision::Allow)
        })?;
        metrics()
            .task_tokens_issued
            .get_or_create(&Kind { kind: "renew" })
            .inc();
        Ok(token)
    }

    /// The audit log decisions are recorded in.
    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Ends the owner's task.
    pub async fn end(&self, caller: &Caller, id: &str) -> Result<(), TaskError> {
        let task = self.owned(caller, id)?;
        self.finish(&task, EndReason::Completed).await.map(drop)
    }

    /// Revokes a task (operators).
    pub async fn revoke(&self, id: &str) -> Result<Arc<Task>, TaskError> {
        let task = self
            .get(id)
            .ok_or_else(|| TaskError::NotFound(id.chars().take(80).collect()))?;
        self.finish(&task, EndReason::Revoked).await?;
        Ok(task)
    }

    /// Ends `task` for `reason`: stored first, then published. Returns false
    /// when it had already ended (the first end stands).
    pub async fn finish(&self, task: &Arc<Task>, reason: EndReason) -> Result<bool, TaskError> {
        if task.ended().is_some() {
            return Ok(false);
        }
        let now = SystemTime::now();
        let end = TaskEnd {
            at: now,
            reason: reason.as_str().into(),
        };
        self.journal()
            .end(task.id.clone(), end, task.tokens_issued())
            .await?;
        if !self.mark_ended(task, reason, now) {
            return Ok(false);
        }
        self.inner.changes.send_modify(|n| *n += 1);
        metrics().tasks_active.dec();
        metrics()
            .tasks_ended
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
        if reason == EndReason::Revoked {
            metrics()
                .revocations
                .get_or_create(&Kind { kind: "task" })
                .inc();
        }
        tracing::info!(task_id = %task.id, %reason, tokens = task.tokens_issued(), "task ended");
        let kind = match reason {
            EndReason::Deadline => EventKind::Expire,
            EndReason::Revoked => EventKind::Revoke,
            _ => EventKind::TaskEnd,
        };
        if let Err(error) = self.inner.audit.record(AuditEvent {
            reason: Some(reason.to_string()),
            ..task_event(task, kind, AuditDecision::Info)
        }) {
            // The end itself is stored and enforced; only its record is lost.
            tracing::error!(task_id = %task.id, %error, "could not record the end of a task in the audit trail");
        }
        Ok(true)
    }

    /// The active task scoping a process whose chain (itself, then its
    /// ancestors, as pid and start time) contains its owner, nearest first.
    pub fn scope_of(&self, chain: &[(i32, u64)]) -> Option<Arc<Task>> {
        self.active().scope_of(chain)
    }

    /// The active tasks of the process `owner` (pid, start time).
    pub fn active_of(&self, owner: (i32, u64)) -> Vec<Arc<Task>> {
        self.active().of_owner(owner)
    }

    /// True when some active task scopes its owner's descendants: only
    /// then is a caller's ancestry worth reading.
    pub fn has_scopes(&self) -> bool {
        self.active().has_scopes()
    }

    /// Moves `task` from active to ended for `reason` unless it has ended
    /// already; true when this call ended it. The one place a task leaves
    /// the active index.
    fn mark_ended(&self, task: &Task, reason: EndReason, at: SystemTime) -> bool {
        let mut state = task.state();
        if state.ended.is_some() {
            return false;
        }
        state.ended = Some((reason, at));
        drop(state);
        self.active().deactivate(task);
        true
    }

    /// The task with this id, active or ended.
    pub fn get(&self, id: &str) -> Option<Arc<Task>> {
        self.tasks().get(id).cloned()
    }

    /// Every task, ended ones only when asked, oldest first.
    pub fn list(&self, include_ended: bool) -> Vec<Arc<Task>> {
        let mut tasks: Vec<_> = self
            .tasks()
            .values()
            .filter(|t| include_ended || t.ended().is_none())
            .cloned()
            .collect();
        tasks.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        tasks
    }

    /// Wakes whenever a task ends.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Checks an exchange of `subject` (a task token addressed to the
    /// caller) for a token addressed to `audience`, with `tools` (a subset;
    /// empty keeps them). `identities` are the caller's matched identities:
    /// the subject token must be addressed to one of their SPIFFE IDs or
    /// declared audiences, and that identity becomes the new actor. A bound
    /// subject token (`cnf`) is accepted only with `subject_presenter`, the
    /// certificate the caller says it was presented with, and only if that
    /// is the one it is bound to (the caller's statement: it keeps an honest
    /// service from exchanging a copied token). Nothing is issued until [`Tasks::complete_exchange`], so
    /// policy can decide on the checked plan in between.
    pub fn prepare_exchange(
        &self,
        subject: &str,
        subject_presenter: Option<&[u8]>,
        identities: &[Match],
        audience: &str,
        tools: &[String],
        bundle_for: impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>>,
    ) -> Result<Exchange, TaskError> {
        check_audience("audience", audience)?;
        check_tools(tools, &self.inner.config)?;
        // The subject token must be addressed to the caller: find its
        // audience among the caller's names, then validate it for that.
        let unverified_aud = peek_audience(subject).ok_or_else(|| {
            TaskError::Exchange("the subject token has no single audience".into())
        })?;
        let actor = identities
            .iter()
            .find(|m| m.spiffe_id.to_string() == unverified_aud)
            .or_else(|| identities.iter().find(|m| m.entry.audiences.contains(&unverified_aud)))
            .map(|m| m.spiffe_id.clone())
            .ok_or_else(|| {
                TaskError::Exchange(format!(
                    "the subject token is addressed to {unverified_aud:?}, not to the caller; only a token's audience may exchange it"
                ))
            })?;
        let subject = self.validate(
            subject,
            &unverified_aud,
            None,
            subject_presenter,
            bundle_for,
        )?;
        let task = self.get(&subject.claims.txn).ok_or_else(|| {
            TaskError::Exchange(format!(
                "task {} is not known to this agent",
                subject.claims.txn
            ))
        })?;
        if let Some((reason, _)) = task.ended() {
            return Err(TaskError::Ended {
                id: task.id.clone(),
                reason: reason.to_string(),
            });
        }
        let granted: Vec<String> = subject.claims.tools().map(str::to_owned).collect();
        let tools = if tools.is_empty() {
            granted
        } else {
            if let Some(extra) = tools.iter().find(|t| !granted.contains(t)) {
                return Err(TaskError::Exchange(format!(
                    "tool {extra:?} is not in the subject token's scope; an exchange can only narrow"
                )));
            }
            dedup(tools.to_vec())
        };
        if subject.claims.actors().len() + 1 > claims::MAX_ACTOR_DEPTH {
            return Err(TaskError::Exchange(format!(
                "the actor chain would exceed {} actors",
                claims::MAX_ACTOR_DEPTH
            )));
        }
        let mut actors = vec![actor.to_string()];
        actors.extend(subject.claims.actors());
        Ok(Exchange {
            task,
            actor,
            actors,
            audience: audience.to_owned(),
            tools,
            subject: subject.claims,
        })
    }

    /// Issues the token of a checked exchange, bound to `bind_x5t` when
    /// given, recording which policies allowed it.
    pub fn complete_exchange(
        &self,
        exchange: Exchange,
        bind_x5t: Option<String>,
        decided_by: Vec<String>,
    ) -> Result<IssuedToken, TaskError> {
        let Exchange {
            task,
            actor,
            actors,
            audience,
            tools,
            subject,
        } = exchange;
        let act = Actor {
            sub: actor.to_string(),
            act: subject.act.clone().map(Box::new),
        };
        let token = self.issue(
            &task,
            &audience,
            &tools,
            Some(act),
            bind_x5t,
            Some(UNIX_EPOCH + Duration::from_secs(subject.exp)),
            subject.rctx.clone(),
        )?;
        tracing::info!(task_id = %task.id, actor = %actor, audience, tools = ?tools, "task token exchanged");
        self.inner.audit.record(AuditEvent {
            audience: Some(audience),
            tools,
            actors,
            token_id: Some(token.jti.clone()),
            policy_ids: decided_by,
            ..task_event(&task, EventKind::Exchange, AuditDecision::Allow)
        })?;
        metrics()
            .task_tokens_issued
            .get_or_create(&Kind { kind: "exchange" })
            .inc();
        Ok(token)
    }

    /// Validates a task token for `audience` (and `tool`, and the
    /// presenter's certificate when the token is bound).
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        tool: Option<&str>,
        presenter_cert: Option<&[u8]>,
        bundle_for: impl Fn(&TrustDomain) -> Option<Arc<TrustBundle>>,
    ) -> Result<ValidatedTaskToken, TokenRejection> {
        let validated = jwt_svid::validate(token, audience, bundle_for)?;
        if validated
            .claims
            .get("aud")
            .and_then(|a| a.as_array())
            .is_none_or(|a| a.len() != 1)
        {
            return Err(TokenRejection::NotATaskToken(
                "a task token has exactly one audience".into(),
            ));
        }
        // `validate` reports `aud` as an array; the typed claims hold one.
        let mut raw = validated.claims.clone();
        if let Some(serde_json::Value::Array(one)) = raw.get("aud").cloned() {
            raw.insert("aud".into(), one.into_iter().next().unwrap_or_default());
        }
        let claims: TaskClaims = serde_json::from_value(serde_json::Value::Object(raw))
            .map_err(|e| TokenRejection::NotATaskToken(e.to_string()))?;
        if claims.tctx.ver != TCTX_VERSION {
            return Err(TokenRejection::NotATaskToken(format!(
                "unknown tctx version {}",
                claims.tctx.ver
            )));
        }
        let lifetime = claims.exp.saturating_sub(claims.iat);
        let max = self.inner.config.max_token_ttl.as_secs();
        if lifetime > max {
            return Err(TokenRejection::TooLong(lifetime, max));
        }
        self.check_task(&claims.txn, token)?;
        if let Some(tool) = tool
            && !claims.allows(tool)
        {
            return Err(TokenRejection::ToolNotAllowed(tool.to_owned()));
        }
        if let Some(Confirmation { x5t_s256 }) = &claims.cnf {
            let Some(cert) = presenter_cert else {
                return Err(TokenRejection::Binding(
                    "the token is bound to a certificate (cnf); present the certificate it is bound to",
                ));
            };
            if claims::thumbprint(cert) != *x5t_s256 {
                return Err(TokenRejection::Binding(
                    "the presented certificate is not the one the token is bound to",
                ));
            }
        }
        Ok(ValidatedTaskToken {
            spiffe_id: validated.spiffe_id,
            claims,
            raw_claims: validated.claims,
        })
    }

    /// Rejects a token of an ended task, and a token signed here for a task
    /// this agent does not know (fail closed). Tokens signed elsewhere for
    /// tasks unknown here are judged by their signature alone.
    pub fn check_task(&self, txn: &str, token: &str) -> Result<(), TokenRejection> {
        match self.get(txn) {
            Some(task) => match task.ended() {
                Some((reason, _)) => Err(TokenRejection::Ended {
                    txn: txn.to_owned(),
                    reason: reason.to_string(),
                }),
                None => Ok(()),
            },
            None => {
                let kid = peek_kid(token).unwrap_or_default();
                if self.inner.authority.is_own_jwt_key(&kid) {
                    Err(TokenRejection::UnknownTask(txn.chars().take(80).collect()))
                } else {
                    Ok(())
                }
            }
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the claims that vary between begin, renew and exchange"
    )]
    fn issue(
        &self,
        task: &Task,
        audience: &str,
        tools: &[String],
        act: Option<Actor>,
        bind_x5t: Option<String>,
        not_after: Option<SystemTime>,
        rctx: RequesterContext,
    ) -> Result<IssuedToken, TaskError> {
        let key = self.inner.authority.jwt_signer()?;
        let now = SystemTime::now();
        let mut exp = (now + self.inner.config.token_ttl)
            .min(task.deadline)
            .min(key.latest_expiry());
        if let Some(cap) = not_after {
            exp = exp.min(cap);
        }
        let claims = TaskClaims {
            iss: self.trust_domain().id_string(),
            sub: task.spiffe_id.to_string(),
            aud: audience.to_owned(),
            exp: unix(exp),
            iat: unix(now),
            nbf: unix(now),
            jti: random_b64(16)?,
            txn: task.id.clone(),
            scope: tools.join(" "),
            tctx: task.context(),
            rctx,
            act,
            cnf: bind_x5t.map(|x5t_s256| Confirmation { x5t_s256 }),
        };
        let token = key.sign(&claims)?;
        task.state().tokens_issued += 1;
        Ok(IssuedToken {
            token,
            jti: claims.jti,
            expires_at: UNIX_EPOCH + Duration::from_secs(claims.exp),
        })
    }

    /// Forgets ended tasks whose tokens have all expired, here and in the
    /// store.
    pub async fn prune(&self) -> Result<usize, TaskError> {
        let now = SystemTime::now();
        self.tasks()
            .retain(|_, t| t.ended().is_none() || t.deadline > now);
        let store = self.inner.store.clone();
        Ok(tokio::task::spawn_blocking(move || store.prune_tasks(now)).await??)
    }
}

/// The audit record of an event about `task`, with its owner and context.
fn task_event(task: &Task, event: EventKind, decision: AuditDecision) -> AuditEvent {
    AuditEvent {
        spiffe_id: Some(task.spiffe_id.to_string()),
        pid: Some(task.owner.pid),
        uid: Some(task.owner.uid),
        executable: task
            .owner
            .executable
            .as_ref()
            .map(|p| p.display().to_string()),
        task_id: Some(task.id.clone()),
        intent: Some(task.intent.clone()),
        audience: Some(task.audience.clone()),
        tools: task.tools.clone(),
        entry_id: Some(task.entry_id.to_string()),
        ..AuditEvent::new(event, decision)
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> TaskError {
    TaskError::Invalid {
        field,
        problem: problem.into(),
    }
}

fn check_audience(field: &'static str, audience: &str) -> Result<(), TaskError> {
    if audience.is_empty() {
        return Err(invalid(field, "is required (exactly one audience)"));
    }
    if audience.len() > 1024
        || audience
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            field,
            "must be one audience: at most 1024 bytes, no spaces",
        ));
    }
    Ok(())
}

fn check_tools(tools: &[String], config: &TaskConfig) -> Result<(), TaskError> {
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

fn dedup(mut tools: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    tools.retain(|t| seen.insert(t.clone()));
    tools
}

/// The token's single `aud`, unverified: only used to pick what to verify it for.
fn peek_audience(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    #[derive(Deserialize)]
    struct Peek {
        aud: Aud,
    }
    let peek: Peek = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    match peek.aud {
        Aud::One(a) => Some(a),
        Aud::Many(mut v) if v.len() == 1 => v.pop(),
        Aud::Many(_) => None,
    }
}

/// The token's `kid`, unverified.
fn peek_kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_b64(len: usize) -> Result<String, TaskError> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TaskError::Sign(AuthorityError::Random))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// A random UUID (version 4) as text.
fn new_task_id() -> Result<String, TaskError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| TaskError::Sign(AuthorityError::Random))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// A stored task row for unit tests: owned by `owner` (pid, start time),
/// ten minutes to live.
#[cfg(test)]
pub(crate) fn test_row(id: &str, owner: (i32, u64), scope_descendants: bool) -> TaskRow {
    let now = SystemTime::now();
    TaskRow {
        id: id.into(),
        owner_pid: owner.0,
        owner_start_time: owner.1,
        owner_uid: 1000,
        owner_executable: None,
        owner_exe_sha256: None,
        spiffe_id: "spiffe://example.org/agent".into(),
        entry_id: "ent-1".into(),
        audience: "spiffe://example.org/mcp".into(),
        intent: "test".into(),
        tools: vec!["search".into()],
        bind_x5t: None,
        created_at: now,
        deadline: now + Duration::from_secs(600),
        ended: None,
        tokens_issued: 0,
        scope_descendants,
    }
}
