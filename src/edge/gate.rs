//! The policy gate every decision on the workload socket passes through:
//! evaluate, record a denial in the audit trail, and turn it into the one
//! status callers see (PermissionDenied naming the deciding policies). And
//! the last step before an edge hands anything out: [`recorded`].

use tonic::Status;

use super::status;
use crate::attestation::Attested;
use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::Chain;
use crate::policy::{Decision, Policy, PolicyRequest};

/// Whether a caller may ask the agent to validate a token (ValidateJWTSVID,
/// ValidateTaskToken): only one that matches a registration entry, unless
/// the operator set `allow_unauthenticated_verifiers`. Refused without an
/// audit record: a caller with no identity must not be able to make the
/// agent write (issue 15, finding 5).
pub fn verifier(has_identity: bool, allow_unauthenticated: bool) -> Result<(), Status> {
    if has_identity || allow_unauthenticated {
        return Ok(());
    }
    Err(status::denied(
        "validation refused: no registration entry matches this process \
         (allow_unauthenticated_verifiers is off)",
    ))
}

/// What the audit record of a denial says about the request, besides what
/// the policy request holds.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// The task, if the request is about one.
    pub task_id: Option<String>,
    /// The actor chain, newest first.
    pub actors: Vec<String>,
}

/// Decides `request` for the caller `attested`. Allowed: the ids of the
/// policies that allowed it (for the allow record). Denied: a Deny audit
/// record, then PermissionDenied naming the policies and the reason. A
/// denial that cannot be recorded is still a denial.
pub fn decide(
    policy: &Policy,
    audit: &AuditLog,
    attested: &Attested,
    request: &PolicyRequest<'_>,
    subject: Subject,
) -> Result<Vec<String>, Status> {
    match policy.evaluate(request) {
        Decision::Allow { policies } => Ok(policies),
        Decision::Deny { policies, reason } => {
            crate::telemetry::metrics()
                .policy_denials
                .get_or_create(&crate::telemetry::metrics::Kind {
                    kind: request.action.as_str(),
                })
                .inc();
            let (audience, tool) = match request.resource {
                crate::policy::Resource::Audience(a) => (a.to_owned(), None),
                crate::policy::Resource::Tool(t) => {
                    (request.context.audience.to_owned(), Some(t.to_owned()))
                }
            };
            let mut tools = request.context.tools.to_vec();
            if let Some(tool) = &tool {
                tools = vec![tool.clone()];
            }
            let record = AuditEvent {
                spiffe_id: Some(request.principal.to_string()),
                task_id: subject.task_id,
                intent: (!request.context.intent.is_empty())
                    .then(|| request.context.intent.to_owned()),
                audience: Some(audience),
                tools,
                reason: Some(format!("{}: {reason}", request.action.as_str())),
                policy_ids: policies.clone(),
                actors: subject.actors,
                ..caller_event(attested, EventKind::Deny, Outcome::Deny)
            };
            if let Err(error) = audit.record(record) {
                tracing::error!(error = %Chain(&error), "could not record a policy denial");
            }
            tracing::info!(
                action = request.action.as_str(),
                principal = %request.principal,
                ?policies,
                %reason,
                "denied by policy"
            );
            let named = if policies.is_empty() {
                String::new()
            } else {
                format!(" (policies: {})", policies.join(", "))
            };
            Err(status::denied(format!("denied by policy{named}: {reason}")))
        }
    }
}

/// An audit event about a request from `attested`: its pid, uid and
/// executable filled in from the kernel's facts.
pub fn caller_event(attested: &Attested, event: EventKind, decision: Outcome) -> AuditEvent {
    AuditEvent {
        pid: Some(attested.pid),
        uid: Some(attested.uid),
        executable: attested
            .executable
            .as_ref()
            .map(|p| p.display().to_string()),
        ..AuditEvent::new(event, decision)
    }
}

/// Seconds as the policy context's `ttl_seconds` (a Cedar Long), saturating.
pub fn ttl_seconds(seconds: u64) -> i64 {
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

/// Seconds from now until the Unix time `exp` (0 once it has passed): the
/// life a token has left.
pub fn seconds_until(exp: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    exp.saturating_sub(now)
}

/// The selectors of `attested` as the policy sees them.
pub fn selectors(attested: &Attested) -> Vec<String> {
    attested.selectors.iter().map(ToString::to_string).collect()
}

/// The executable of `attested` as the policy sees it (`""` when unknown).
pub fn executable(attested: &Attested) -> String {
    attested
        .executable
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Whether the caller's uid may make a request now: refused with
/// ResourceExhausted while the audit records about its processes have spent
/// its audit budget (see `audit::budget`). Every edge asks right after
/// identifying the caller, before any work.
pub fn admit(audit: &AuditLog, attested: &Attested) -> Result<(), Status> {
    // The path is formatted only for a refusal's record, not per request.
    audit
        .admit(attested.uid, attested.pid, attested.executable.as_deref())
        .map_err(|error| status::audit(&error))
}

/// Records a validation, best effort: a trail that cannot take it does not
/// stop verifiers (a warning).
pub fn record_validation(audit: &AuditLog, event: AuditEvent) -> Result<(), Status> {
    if let Err(error) = audit.record(event) {
        tracing::warn!(error = %Chain(&error), "could not record a validation");
    }
    Ok(())
}

/// Waits until everything this request recorded is written to the audit
/// trail, so no credential, revocation or entry change is acknowledged
/// that a crash of the agent could leave unrecorded. Unavailable (nothing
/// handed out) when the trail cannot be written. A change already made
/// (an entry, an end) stays made: only its acknowledgement is withheld.
pub async fn recorded(audit: &AuditLog) -> Result<(), Status> {
    audit.written().await.map_err(|error| status::audit(&error))
}
