//! Runtime policy: every issuance, renewal and exchange is decided here, per
//! request, by the operator's Cedar policies (`policy_dir`, `*.cedar`),
//! validated in strict mode against the schema compiled into the agent
//! (`schema.cedarschema`, the contract operators write against).
//!
//! Key types: [`Policy`], a cheap handle whose evaluation reads an `Arc`
//! snapshot (no lock is held across I/O, and a reload swaps the snapshot
//! whole); [`PolicyRequest`] in, [`Decision`] out, naming the policies
//! that decided (their `@id`, else `FILE:policyN`). The edges record a
//! decision in the audit trail as an `audit::Outcome` with those ids and
//! the reason: a different, coarser type, since the trail is a leaf.
//!
//! Invariants: with a policy directory the decision fails closed. Only a
//! matching `permit`, no matching `forbid` and no policy erroring on the
//! request allow; an oversized request is denied before Cedar sees it. A
//! set of files that does not load never replaces the one in force. No
//! Cedar source is ever formatted from request data: entities and context
//! are built with Cedar's own value constructors. This module imports
//! nothing from the crate but `registration` types.

mod cedar;
mod watch;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use spiffe::SpiffeId;

use self::cedar::{Engine, Snapshot};

/// Most tools in one request's context.
pub const MAX_TOOLS: usize = 256;
/// Longest intent, in bytes.
pub const MAX_INTENT_BYTES: usize = 8 * 1024;
/// Most SPIFFE IDs in the actor chain.
pub const MAX_ACTORS: usize = 64;
/// Most selectors of the principal.
pub const MAX_SELECTORS: usize = 256;
/// Longest single value (a tool, an actor, a selector, the audience, the
/// executable, the resource name), in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Shortest accepted `policy_poll_interval`: polling reads every file
/// (tests use tens of milliseconds).
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest accepted `policy_poll_interval`: a change must not wait longer.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// Where the policies live and how often to look for changes. The config
/// file's top-level `policy_dir` key is [`dir`](Self::dir).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The directory of `*.cedar` files (`policy_dir`). None: no policy,
    /// registration entries alone decide.
    pub dir: Option<PathBuf>,
    /// How often the directory is checked for changes (default 2s).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

/// The loaded policies: a cheap handle, shared by every caller and the
/// watcher. Clones share the policy set; a reload through any of them is
/// seen by all.
#[derive(Clone)]
pub struct Policy {
    shared: Arc<Shared>,
    /// The hour of the day in the agent's local time (replaced in tests).
    clock: Arc<dyn Fn() -> u8 + Send + Sync>,
}

struct Shared {
    dir: Option<PathBuf>,
    poll_interval: Duration,
    /// None without a policy directory.
    engine: Option<Engine>,
    /// Replaced whole by a reload; readers clone the `Arc` and let go.
    current: RwLock<Arc<Snapshot>>,
    /// One reload at a time (the watcher and an operator's reload).
    reloading: Mutex<()>,
}

/// What a load or reload put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySummary {
    /// `*.cedar` files read.
    pub files: usize,
    /// Policies in force.
    pub policies: usize,
    /// Their ids, in file order.
    pub ids: Vec<String>,
    /// What the validator found suspicious but not wrong (a policy that
    /// can never apply, say). They do not stop a load.
    pub warnings: Vec<PolicyProblem>,
}

/// One problem in a policy file, located: `FILE:LINE:COLUMN: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The file, as found in the directory given.
    pub file: PathBuf,
    /// From 1.
    pub line: usize,
    /// From 1, in characters.
    pub column: usize,
    /// What is wrong, with Cedar's hint when it has one.
    pub reason: String,
}

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The directory or a file in it could not be read.
    #[error("reading {}", .path.display())]
    Read {
        /// What was being read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A policy file is larger than any policy set should be.
    #[error("{}: {size} bytes; a policy file may have at most {max} bytes", .path.display(), max = cedar::MAX_FILE_BYTES)]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The directory holds more policy files than tether reads.
    #[error("{}: more than {max} *.cedar files", .dir.display(), max = cedar::MAX_FILES)]
    TooManyFiles {
        /// The directory.
        dir: PathBuf,
    },
    /// Policies that do not parse or do not validate against the schema.
    #[error("{}", problems_line(.problems))]
    Invalid {
        /// Every problem found, by file and position.
        problems: Vec<PolicyProblem>,
    },
    /// The schema compiled into this build does not parse (a bug).
    #[error("the built-in policy schema is invalid")]
    Schema {
        /// Cedar's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `Type::"name"` resource that does not parse.
    #[error("resource {input:?} is not an entity such as Audience::\"spiffe://example.org/mcp\"")]
    ResourceSyntax {
        /// What was given.
        input: String,
        /// Cedar's parse error.
        #[source]
        source: Box<::cedar_policy::ParseErrors>,
    },
    /// A resource of a type the schema does not use as a resource.
    #[error("resource {input:?} has type {found}: expected Audience or Tool")]
    ResourceType {
        /// What was given.
        input: String,
        /// Its entity type.
        found: String,
    },
}

/// The operations policy decides. The Cedar names are
/// `Action::"BeginTask"` and so on ([`Action::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Begin a task (its first token), on the task's audience.
    BeginTask,
    /// Renew a task's token, on the task's audience.
    RenewTask,
    /// Exchange a task token for the next audience, on that audience.
    ExchangeToken,
    /// Fetch a JWT-SVID, on each audience asked for.
    FetchJwtSvid,
    /// Use a tool under a task token, on the tool.
    UseTool,
}

/// What a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// `Audience::"<audience>"`: every action but UseTool.
    Audience(&'a str),
    /// `Tool::"<tool name>"`: UseTool.
    Tool(&'a str),
}

/// An owned [`Resource`], parsed from Cedar's `Type::"name"` form (the
/// CLI's `--resource`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedResource {
    /// `Audience::"<audience>"`.
    Audience(String),
    /// `Tool::"<tool name>"`.
    Tool(String),
}

/// The request's context record: the same fields for every action, empty
/// where they do not apply. `hour` is not here: [`Policy::evaluate`] reads
/// it from the clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyContext<'a> {
    /// The task's intent.
    pub intent: &'a str,
    /// The tools of the task, or of the token being exchanged.
    pub tools: &'a [String],
    /// The lifetime asked for, in seconds.
    pub ttl_seconds: i64,
    /// The SPIFFE IDs in the actor chain.
    pub actors: &'a [String],
    /// The caller's uid.
    pub uid: u32,
    /// The caller's executable ("" when unknown).
    pub executable: &'a str,
    /// The audience (for UseTool, the token's).
    pub audience: &'a str,
}

/// One question for the policy: may `principal` do `action` on `resource`?
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    /// The attested caller's SPIFFE ID.
    pub principal: &'a SpiffeId,
    /// The caller's selectors (`unix:uid:1000`).
    pub selectors: &'a [String],
    /// What it wants to do.
    pub action: Action,
    /// What on.
    pub resource: Resource<'a>,
    /// The rest of what the policy may look at.
    pub context: PolicyContext<'a>,
}

/// The answer, with the policies that gave it (for errors and the audit
/// trail). The edges record it as an `audit::Outcome` (allow or deny,
/// with these policy ids and reason in the record's fields): the audit
/// trail is a leaf and knows nothing of policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Permitted by these policies (none without a policy directory).
    Allow {
        /// The ids of the `permit` policies that matched.
        policies: Vec<String>,
    },
    /// Refused.
    Deny {
        /// The ids of the `forbid` policies that matched, or of the
        /// policies that failed on this request; empty when nothing
        /// permitted it or the request was refused before evaluation.
        policies: Vec<String>,
        /// Why, for logs and the audit trail.
        reason: String,
    },
}

// === impl PolicyConfig ===

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: None,
            poll_interval: Duration::from_secs(2),
        }
    }
}

impl PolicyConfig {
    /// Checks each setting; on failure names the key (`policy_dir`,
    /// `policy_poll_interval`) and the problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(dir) = &self.dir
            && !dir.is_absolute()
        {
            return Err(("policy_dir", "must be an absolute path".into()));
        }
        if self.poll_interval < MIN_POLL_INTERVAL || self.poll_interval > MAX_POLL_INTERVAL {
            return Err((
                "policy_poll_interval",
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(MIN_POLL_INTERVAL),
                    humantime::format_duration(MAX_POLL_INTERVAL)
                ),
            ));
        }
        Ok(())
    }
}

/// A policy set read and validated, not yet in force
/// ([`Policy::prepare`]).
pub struct PreparedPolicies(Snapshot);

impl fmt::Debug for PreparedPolicies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PreparedPolicies")
            .field(&self.0.summary)
            .finish()
    }
}

// === impl Policy ===

impl Policy {
    /// Loads every `*.cedar` file in the directory (sorted by name; hidden
    /// files skipped, symlinks followed, as Kubernetes mounts ConfigMaps),
    /// parses them and validates them against the schema in strict mode.
    /// Errors name `FILE:LINE:COLUMN` and the reason, every one found.
    ///
    /// Without a directory: a policy that permits everything.
    pub fn load(config: &PolicyConfig) -> Result<Policy, PolicyError> {
        let Some(dir) = &config.dir else {
            tracing::info!("no policy_dir: entries alone decide");
            return Ok(Self::from_parts(config, None, Snapshot::permit_all()));
        };
        let engine = Engine::new()?;
        let snapshot = engine.load_dir(dir)?;
        log_warnings(&snapshot.summary);
        tracing::info!(
            dir = %dir.display(),
            files = snapshot.summary.files,
            policies = snapshot.summary.policies,
            "policies loaded"
        );
        Ok(Self::from_parts(config, Some(engine), snapshot))
    }

    fn from_parts(config: &PolicyConfig, engine: Option<Engine>, snapshot: Snapshot) -> Self {
        Self {
            shared: Arc::new(Shared {
                dir: config.dir.clone(),
                poll_interval: config.poll_interval,
                engine,
                current: RwLock::new(Arc::new(snapshot)),
                reloading: Mutex::new(()),
            }),
            clock: Arc::new(local_hour),
        }
    }

    /// The same policies, with `clock` as the source of the context's
    /// `hour` (0-23) instead of the agent's local time: for tests, and for
    /// `tether policy check` asked about another hour.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Fn() -> u8 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Re-reads the directory and puts the new set in force. On error the
    /// previous set stays in force and the error is returned. Without a
    /// policy directory there is nothing to read: the summary is empty.
    /// Blocking (it reads the files): call it off the async runtime.
    pub fn reload(&self) -> Result<PolicySummary, PolicyError> {
        let (Some(dir), Some(engine)) = (&self.shared.dir, &self.shared.engine) else {
            return Ok(self.summary());
        };
        let _one_at_a_time = self
            .shared
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let snapshot = engine.load_dir(dir)?;
        Ok(self.install(snapshot))
    }

    /// Reads and validates the directory as [`Self::reload`] does, without
    /// putting the result in force: the first half of an all-or-nothing
    /// config reload ([`Self::install_prepared`] is the second). `None`
    /// without a policy directory. Blocking: call it off the runtime.
    pub fn prepare(&self) -> Result<Option<PreparedPolicies>, PolicyError> {
        let (Some(dir), Some(engine)) = (&self.shared.dir, &self.shared.engine) else {
            return Ok(None);
        };
        Ok(Some(PreparedPolicies(engine.load_dir(dir)?)))
    }

    /// Puts prepared policies in force: what is in force now.
    pub fn install_prepared(&self, prepared: Option<PreparedPolicies>) -> PolicySummary {
        let Some(PreparedPolicies(snapshot)) = prepared else {
            return self.summary();
        };
        let _one_at_a_time = self
            .shared
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.install(snapshot)
    }

    /// Swaps in a new snapshot; the caller holds `reloading`.
    fn install(&self, snapshot: Snapshot) -> PolicySummary {
        let summary = snapshot.summary.clone();
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
        summary
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .shared
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// What is in force now.
    pub fn summary(&self) -> PolicySummary {
        self.snapshot().summary.clone()
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.shared.dir.as_deref()
    }

    /// Whether policies decide: false without a policy directory (every
    /// request is then allowed).
    pub fn is_enforcing(&self) -> bool {
        self.shared.engine.is_some()
    }

    /// Decides one request. Fails closed: an oversized request, a request
    /// that does not fit the schema, no matching `permit`, a matching
    /// `forbid` and a policy erroring on the request are all a Deny.
    pub fn evaluate(&self, request: &PolicyRequest<'_>) -> Decision {
        let Some(engine) = &self.shared.engine else {
            return Decision::Allow {
                policies: Vec::new(),
            };
        };
        if let Err(reason) = check_bounds(request) {
            return Decision::Deny {
                policies: Vec::new(),
                reason,
            };
        }
        let hour = (self.clock)();
        let snapshot = self.snapshot();
        engine.evaluate(&snapshot, request, hour)
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = self.summary();
        f.debug_struct("Policy")
            .field("dir", &self.shared.dir)
            .field("poll_interval", &self.shared.poll_interval)
            .field("files", &summary.files)
            .field("ids", &summary.ids)
            .finish_non_exhaustive()
    }
}

/// The hour of the day (0-23) in the agent's local time zone (`TZ`, else
/// `/etc/localtime`).
fn local_hour() -> u8 {
    use chrono::Timelike as _;
    // `hour()` is 0-23, so the conversion cannot fail.
    u8::try_from(chrono::Local::now().hour()).unwrap_or(0)
}

fn log_warnings(summary: &PolicySummary) {
    for warning in &summary.warnings {
        tracing::warn!(%warning, "policy warning");
    }
}

/// Refuses requests too large to be worth evaluating, with the reason.
fn check_bounds(request: &PolicyRequest<'_>) -> Result<(), String> {
    let context = &request.context;
    let count = |what: &str, n: usize, max: usize| {
        if n > max {
            Err(format!("context too large: {n} {what} (at most {max})"))
        } else {
            Ok(())
        }
    };
    let bytes = |what: &str, s: &str, max: usize| {
        if s.len() > max {
            Err(format!(
                "context too large: {what} is {} bytes (at most {max})",
                s.len()
            ))
        } else {
            Ok(())
        }
    };
    count("tools", context.tools.len(), MAX_TOOLS)?;
    count("actors", context.actors.len(), MAX_ACTORS)?;
    count("selectors", request.selectors.len(), MAX_SELECTORS)?;
    bytes("the intent", context.intent, MAX_INTENT_BYTES)?;
    bytes("the executable", context.executable, MAX_VALUE_BYTES)?;
    bytes("the audience", context.audience, MAX_VALUE_BYTES)?;
    bytes("the resource", request.resource.name(), MAX_VALUE_BYTES)?;
    for (what, values) in [
        ("a tool", context.tools),
        ("an actor", context.actors),
        ("a selector", request.selectors),
    ] {
        for value in values {
            bytes(what, value, MAX_VALUE_BYTES)?;
        }
    }
    Ok(())
}

// === impl PolicySummary ===

impl PolicySummary {
    /// No files, no policies.
    fn empty() -> Self {
        Self {
            files: 0,
            policies: 0,
            ids: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

// === impl PolicyProblem ===

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.reason
        )
    }
}

fn problems_line(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// === impl PolicyError ===

impl PolicyError {
    /// The located problems, when the policies themselves are wrong.
    pub fn problems(&self) -> &[PolicyProblem] {
        match self {
            Self::Invalid { problems } => problems,
            _ => &[],
        }
    }
}

// === impl Action ===

impl Action {
    /// Every action, in the schema's order.
    pub const ALL: [Action; 5] = [
        Self::BeginTask,
        Self::RenewTask,
        Self::ExchangeToken,
        Self::FetchJwtSvid,
        Self::UseTool,
    ];

    /// The Cedar action id: `BeginTask` for `Action::"BeginTask"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BeginTask => "BeginTask",
            Self::RenewTask => "RenewTask",
            Self::ExchangeToken => "ExchangeToken",
            Self::FetchJwtSvid => "FetchJWTSVID",
            Self::UseTool => "UseTool",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An action name that is not one of [`Action::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown action {0:?}: expected BeginTask, RenewTask, ExchangeToken, FetchJWTSVID or UseTool"
)]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    /// The Cedar action id (`BeginTask`), or the whole entity
    /// (`Action::"BeginTask"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s
            .strip_prefix("Action::\"")
            .and_then(|rest| rest.strip_suffix('"'))
            .unwrap_or(s);
        Self::ALL
            .into_iter()
            .find(|action| action.as_str() == name)
            .ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

// === impl Resource ===

impl Resource<'_> {
    /// The entity id: the audience or the tool name.
    pub fn name(&self) -> &str {
        match self {
            Self::Audience(name) | Self::Tool(name) => name,
        }
    }
}

// === impl OwnedResource ===

impl OwnedResource {
    /// Borrowed, for a [`PolicyRequest`].
    pub fn as_resource(&self) -> Resource<'_> {
        match self {
            Self::Audience(name) => Resource::Audience(name),
            Self::Tool(name) => Resource::Tool(name),
        }
    }
}

impl FromStr for OwnedResource {
    type Err = PolicyError;

    /// Cedar's entity syntax: `Audience::"spiffe://example.org/mcp"`,
    /// `Tool::"jira.read"` (escapes as in policies).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        cedar::parse_resource(s)
    }
}

// === impl Decision ===

impl Decision {
    /// Whether the request may go ahead.
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }

    /// The policies that decided.
    pub fn policies(&self) -> &[String] {
        match self {
            Self::Allow { policies } | Self::Deny { policies, .. } => policies,
        }
    }
}

#[cfg(test)]
mod tests;
