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
//! [`Tasks`] is the handle. This file holds the types, begin, renew's
//! owner check, ends and lookups; each other concern has its own file:
//!
//! | file | owns |
//! | --- | --- |
//! | `config.rs` | [`TaskConfig`] and its validation |
//! | `request.rs` | the checks on what BeginTask and ExchangeToken ask for |
//! | `token.rs` | signing: the one place a token's claims are assembled |
//! | `exchange.rs` | token exchange (prepare, then complete after policy) |
//! | `validate.rs` | the task rules on top of JWT-SVID validation |
//! | `restore.rs` | the stored row of a task, and loading them after a restart |
//! | `foreign.rs` | fleet mode: other nodes' ended tasks, and whether this agent is fresh |
//! | `ends.rs` | fleet mode: this agent's ends, reported to the fleet link |
//! | `active.rs` | the active tasks by owner process |
//! | `journal.rs` | group commit of begins and ends |
//! | [`claims`], [`lifecycle`] | the claim set; the loop that ends tasks nobody ended |
//!
//! Invariants:
//! - a task's end is in the store before anyone is told it ended, so a
//!   restart never resurrects a token;
//! - a token signed by this agent for a task this agent does not know is
//!   rejected (fail closed); in fleet mode, where the server signs for
//!   every node, a token of another node's task is accepted only while
//!   this agent is caught up with the server's task ends and has heard
//!   from it within the staleness bound ([`ForeignTasks`]), and its own
//!   tasks keep validating from local state either way;
//! - exchange never widens: same `sub` and `txn`, tools only narrow, expiry
//!   never later than the subject token's, and only the token's audience may
//!   exchange it; every exchange shows the signer its subject token.

mod active;
pub mod claims;
mod config;
mod ends;
mod exchange;
mod foreign;
mod journal;
pub mod lifecycle;
mod request;
mod restore;
mod token;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::{mpsc, watch};

use crate::attestation::{Caller, ProcessKey};
use crate::audit::{AuditEvent, AuditLog, AuditUnavailable, EventKind, Outcome};
use crate::authority::{Authority, AuthorityError};
use crate::registration::{EntryId, Match};
use crate::store::{Store, StoreError, TaskEnd};
use crate::svid::jwt::JwtValidationError;
use crate::telemetry::metrics::{Kind, Reason, metrics};
use active::ActiveIndex;
use journal::Journal;
use request::dedup;

pub use config::TaskConfig;
pub use ends::LocalEnd;
pub use exchange::Exchange;
pub use foreign::{ForeignEnd, ForeignTasks, SKEW_MARGIN};
pub use journal::JournalError;
pub use token::IssuedToken;
pub use validate::ValidatedTaskToken;

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
    #[error(transparent)]
    Token(#[from] TokenRejection),
    /// No such task (operators).
    #[error("no task {0}")]
    NotFound(String),
    /// Signing failed.
    #[error("signing a task token failed")]
    Sign(#[from] AuthorityError),
    /// The task store failed.
    #[error("the task store failed")]
    Store(#[from] StoreError),
    /// A blocking store job did not complete.
    #[error("the task store job did not complete")]
    Job(#[from] tokio::task::JoinError),
    /// The decision could not be recorded: nothing is issued unaudited.
    #[error("not issuing: the decision could not be audited")]
    Audit(#[from] AuditUnavailable),
    /// A begin or an end could not be stored.
    #[error("the task store could not store a begin or an end")]
    Journal(#[from] JournalError),
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
    /// Another node's task (fleet mode), and this agent cannot vouch that
    /// it has not ended: it is not caught up with the tether server, has
    /// not heard from it within `server.revocation_staleness`, or could
    /// not keep every end it was sent.
    #[error("task {txn} is another node's, and {detail}")]
    Stale {
        /// The task.
        txn: String,
        /// Why this agent cannot vouch for it.
        detail: String,
    },
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

/// The process that owns a task: the one model of a task's owner. The
/// store keeps it as flat `owner_*` columns of a `store::TaskRow` (the
/// store is a leaf and holds no domain types; `restore` converts both
/// ways), the Admin API shows its pid and uid, and the active-task index
/// keys it by its [`ProcessKey`] alone.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The process, for good (pid and start time).
    pub process: ProcessKey,
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
    authority: Arc<dyn Authority>,
    store: Store,
    audit: AuditLog,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    /// Bumped whenever a task ends.
    changes: watch::Sender<u64>,
    /// New owners for the lifecycle loop to watch.
    owners: mpsc::UnboundedSender<OwnerWatch>,
    /// Group commit for begins and ends; started on first use, inside the runtime.
    journal: std::sync::OnceLock<Journal>,
    /// Active tasks by owner. Locked after `tasks` when both are held.
    active: Mutex<ActiveIndex>,
    /// Fleet mode: what this agent knows of other nodes' tasks (set once,
    /// by [`Tasks::with_foreign`]).
    foreign: std::sync::OnceLock<ForeignTasks>,
    /// Fleet mode: where ends of this agent's tasks are reported (the
    /// fleet link), once [`Tasks::report_ends`] installed it.
    reports: Mutex<Option<mpsc::UnboundedSender<LocalEnd>>>,
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
        caller.key() == self.owner.process
    }
}

/// Owner processes to watch, waiting for the lifecycle loop.
#[derive(Debug)]
pub struct OwnerInbox(mpsc::UnboundedReceiver<OwnerWatch>);

// === impl Tasks ===

impl Tasks {
    /// The tasks of an agent signing with `authority`, kept in `store`,
    /// every decision recorded in `audit`; and the inbox of the lifecycle
    /// loop ([`Self::run_lifecycle`] takes it, so it runs once).
    pub fn new(
        config: TaskConfig,
        authority: Arc<dyn Authority>,
        store: Store,
        audit: AuditLog,
    ) -> (Self, OwnerInbox) {
        let (owners, owners_rx) = mpsc::unbounded_channel();
        let tasks = Self {
            inner: Arc::new(Inner {
                config,
                authority,
                store,
                audit,
                tasks: Mutex::default(),
                changes: watch::channel(0).0,
                owners,
                journal: std::sync::OnceLock::new(),
                active: Mutex::default(),
                foreign: std::sync::OnceLock::new(),
                reports: Mutex::default(),
            }),
        };
        (tasks, OwnerInbox(owners_rx))
    }

    /// Fleet mode: tokens of tasks that are not this agent's are judged by
    /// `foreign` (known ended, or this agent not fresh: refused) instead
    /// of by the key that signed them, and other nodes' tasks may be
    /// exchanged here. Set once, before serving; a second call is ignored
    /// (and logged).
    #[must_use]
    pub fn with_foreign(self, foreign: ForeignTasks) -> Self {
        if self.inner.foreign.set(foreign).is_err() {
            tracing::warn!("other nodes' tasks were already set up; keeping the first");
        }
        self
    }

    /// What this agent knows of other nodes' tasks (fleet mode only).
    pub fn foreign(&self) -> Option<&ForeignTasks> {
        self.inner.foreign.get()
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
        let key = owner.process;
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
        let token = self.issue_own(&task).await?;
        if let Err(unavailable) = self.inner.audit.record(AuditEvent {
            token_id: Some(token.jti.clone()),
            policy_ids: decided_by,
            ..task_event(&task, EventKind::TaskBegin, Outcome::Allow)
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
            pid = task.owner.process.pid(),
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
        self.report(task, reason, now);
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
            ..task_event(task, kind, Outcome::Info)
        }) {
            // The end itself is stored and enforced; only its record is lost.
            tracing::error!(task_id = %task.id, error = %crate::error::Chain(&error), "could not record the end of a task in the audit trail");
        }
        Ok(true)
    }

    /// The active task scoping a process whose chain (itself, then its
    /// ancestors) contains its owner, nearest first.
    pub fn scope_of(&self, chain: &[ProcessKey]) -> Option<Arc<Task>> {
        self.active().scope_of(chain)
    }

    /// The active tasks of the process `owner`.
    pub fn active_of(&self, owner: ProcessKey) -> Vec<Arc<Task>> {
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
fn task_event(task: &Task, event: EventKind, decision: Outcome) -> AuditEvent {
    AuditEvent {
        spiffe_id: Some(task.spiffe_id.to_string()),
        pid: Some(task.owner.process.pid()),
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

#[cfg(test)]
mod tests;
