//! The fleet's tasks on the node API: what `SignJwt` checks of a task
//! token (claims with `txn`) beyond the node's scope, and `EndTasks`.
//!
//! - **Begin and renewal** (no `act`): the first token of a task records
//!   it in the index, owned by the calling node; later tokens are signed
//!   only for that node, for that `sub`, while the task lives, and never
//!   past the deadline recorded with the first one.
//! - **Exchange** (`act` present): the request carries the subject token,
//!   verified here against the trust bundle. The newest actor must be an
//!   identity the node may serve and the subject token's audience (its
//!   SPIFFE ID or an audience its entry declares); `sub`, `txn`,
//!   `tctx` and the older actors must be the subject's (`iss` need only
//!   be the trust domain's, as for every token); tools only narrow;
//!   the task must be live in the index; the token never outlives the
//!   subject. So a node exchanges a token of another node's task only
//!   when a workload it serves was handed that token, and a rooted node
//!   can neither mint a token for a task it does not own nor widen one.
//! - **End**: a node ends only its own tasks; the first end stands.
//!
//! The server's trail records each: `task-begin`, `task-renew` and
//! `exchange` (signed, with the node), `task-end` (received), and
//! `task-fan-out` (`server::tasks`, sent to the nodes).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use spiffe::SpiffeId;
use tonic::Status;

use super::{CallingNode, NodeApi, unix_ms};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::edge::status;
use crate::proto::server as pb;
use crate::server::scope;
use crate::server::store::{FleetTaskEndRequest, MAX_END_REASON_LEN, MAX_TXN_LEN, NewFleetTask};
use crate::server::tasks::Begun;
use crate::svid::jwt as jwt_svid;

/// Most ends in one `EndTasks` request.
pub const MAX_ENDS: usize = 1024;
/// The farthest a task's deadline may be from its begin, by default
/// (`max_task_ttl`). An agent's own bound (`tasks.max_ttl`, 1 h by default)
/// is the agent's to keep; this is the server's, against a rooted node
/// whose task rows would otherwise never be pruned.
pub const DEFAULT_MAX_TASK_TTL: Duration = Duration::from_secs(24 * 3600);
/// The most tasks a node may have in the index, by default
/// (`max_tasks_per_node`): far more than a node begins within a task's
/// life, and a twentieth of what an agent keeps of other nodes' ends.
pub const DEFAULT_MAX_TASKS_PER_NODE: u64 = 50_000;
/// The reasons a task ends with (`task::EndReason`, which `server` may
/// not name).
const END_REASONS: [&str; 5] = [
    "completed",
    "deadline",
    "owner exited",
    "entry removed",
    "revoked",
];

/// A task token's place in its task, as the task rules decided it.
#[derive(Debug)]
pub(super) struct TaskGrant {
    /// The latest `exp` the rules allow.
    pub(super) not_after: SystemTime,
    /// What the trail calls the signature.
    pub(super) event: EventKind,
    /// The task.
    pub(super) txn: String,
}

/// The `txn` of `claims`, when they are a task token's.
pub(super) fn txn_of(claims: &Map<String, Value>) -> Result<Option<String>, Status> {
    match claims.get("txn") {
        None => Ok(None),
        Some(Value::String(txn)) => {
            check_txn("claims_json", txn)?;
            Ok(Some(txn.clone()))
        }
        Some(_) => Err(status::invalid("claims_json", "txn must be a string")),
    }
}

/// The first token of a task records it, owned by `node`; a later one is
/// signed only for its owner, for its `sub`, while it lives.
pub(super) async fn begin_or_renew(
    api: &NodeApi,
    node: &CallingNode,
    claims: &Map<String, Value>,
    txn: &str,
    sub: &SpiffeId,
) -> Result<TaskGrant, Status> {
    let deadline = claims
        .get("tctx")
        .and_then(|t| t.get("deadline"))
        .and_then(Value::as_u64)
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .ok_or_else(|| {
            status::invalid(
                "claims_json",
                "a task token (with txn) needs tctx.deadline (seconds)",
            )
        })?;
    check_deadline(deadline, SystemTime::now(), api.inner.max_task_ttl)?;
    let begun = api
        .inner
        .tasks
        .begin(
            NewFleetTask {
                txn: txn.to_owned(),
                owner_node: node.name.clone(),
                spiffe_id: sub.to_string(),
                began_at: SystemTime::now(),
                deadline,
            },
            api.inner.max_tasks_per_node,
        )
        .await
        .map_err(|e| status::server_store("recording the task", &e))?;
    let (row, event) = match begun {
        Begun::New(row) => (row, EventKind::TaskBegin),
        Begun::Known(row) => (row, EventKind::TaskRenew),
        Begun::OverQuota(count) => {
            let reason = format!(
                "node {} has {count} tasks in the fleet's task index, the most it may \
                 (max_tasks_per_node); a task is forgotten a minute after its deadline",
                node.name
            );
            let denied = deny(
                api,
                node,
                EventKind::TaskBegin,
                &sub.to_string(),
                txn,
                reason,
            );
            return Err(status::exhausted_rate(denied.message()));
        }
    };
    let refusal = if row.owner_node != node.name {
        Some(format!(
            "task {txn} was begun on node {}; only its owner's node signs its tokens (another node exchanges them)",
            row.owner_node
        ))
    } else if row.spiffe_id != sub.to_string() {
        Some(format!("task {txn} is {}'s, not {sub}'s", row.spiffe_id))
    } else {
        row.ended
            .as_ref()
            .map(|end| format!("task {txn} has ended: {}", end.reason))
    };
    if let Some(refusal) = refusal {
        return Err(deny(api, node, event, &sub.to_string(), txn, refusal));
    }
    Ok(TaskGrant {
        not_after: row.deadline,
        event,
        txn: txn.to_owned(),
    })
}

/// A task token's `tctx.deadline`, asked for at `now`: in the future, and
/// at most `max` (`max_task_ttl`) away. A renewal's deadline is its
/// begin's, so within `max` of any later `now` too.
pub(super) fn check_deadline(
    deadline: SystemTime,
    now: SystemTime,
    max: Duration,
) -> Result<(), Status> {
    if deadline <= now {
        return Err(status::invalid(
            "claims_json",
            "tctx.deadline is in the past",
        ));
    }
    if deadline.duration_since(now).unwrap_or_default() > max {
        return Err(status::invalid(
            "claims_json",
            format!(
                "tctx.deadline is more than {} away (the server's max_task_ttl)",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// The exchange rule: `claims` (with `act`, newest actor first in
/// `actors`) against the subject token they were exchanged from.
pub(super) async fn exchange(
    api: &NodeApi,
    node: &CallingNode,
    claims: &Map<String, Value>,
    txn: &str,
    actors: &[SpiffeId],
    subject_token: &str,
) -> Result<TaskGrant, Status> {
    let Some(actor) = actors.first() else {
        return Err(status::invalid(
            "claims_json",
            "an exchange names its actor in act",
        ));
    };
    if subject_token.is_empty() {
        return Err(status::invalid(
            "subject_token",
            "an exchanged task token (claims with act and txn) needs the token it was exchanged from",
        ));
    }
    status::bounded_bytes(
        "subject_token",
        subject_token.len(),
        jwt_svid::MAX_TOKEN_LEN,
    )?;
    // Which audience to verify it for: read unverified, then verified.
    let aud = peek_single_audience(subject_token).ok_or_else(|| {
        status::invalid("subject_token", "the subject token has no single audience")
    })?;
    let trust_domain = api.inner.trust_domain.clone();
    let bundle = api.inner.authority.bundle();
    let subject = jwt_svid::validate(subject_token, &aud, |td| {
        (*td == trust_domain).then(|| bundle.clone())
    })
    .map_err(|e| status::invalid("subject_token", e))?
    .claims;
    let deny_with = |reason: String| {
        deny(
            api,
            node,
            EventKind::Exchange,
            &actor.to_string(),
            txn,
            reason,
        )
    };

    // The exchanger: an identity of this node, addressed by the subject.
    super::sign::authorize(api, node, &super::sign::actor_request(actor))?;
    if aud != actor.to_string() && !declares_audience(api, node, actor, &aud) {
        return Err(deny_with(format!(
            "the subject token is addressed to {aud:?}, not to {actor}; only a token's audience may exchange it"
        )));
    }
    // Everything but the audience, the tools, the times, the token id,
    // the binding and the issuer is the subject's. `iss` is this trust
    // domain's either way (`sign::check_issuer`), and a token begun before
    // the fleet's issuer changed is exchanged under the new one.
    for claim in ["sub", "txn", "tctx", "rctx"] {
        if claims.get(claim) != subject.get(claim) {
            return Err(deny_with(format!(
                "{claim} differs from the subject token's; an exchange keeps it"
            )));
        }
    }
    let older = claims.get("act").and_then(|a| a.get("act"));
    if older != subject.get("act") {
        return Err(deny_with(
            "the actors before the exchanger are not the subject token's act chain".into(),
        ));
    }
    let granted = scope_of(&subject);
    if let Some(extra) = scope_of(claims).difference(&granted).next() {
        return Err(deny_with(format!(
            "tool {extra:?} is not in the subject token's scope; an exchange can only narrow"
        )));
    }
    let subject_exp = subject
        .get("exp")
        .and_then(Value::as_u64)
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .ok_or_else(|| status::invalid("subject_token", "the subject token has no exp"))?;
    let row = api
        .inner
        .tasks
        .get(txn)
        .await
        .map_err(|e| status::server_store("reading the task index", &e))?;
    let Some(row) = row else {
        return Err(deny_with(format!(
            "task {txn} is unknown to the fleet's task index"
        )));
    };
    if let Some(end) = &row.ended {
        return Err(deny_with(format!("task {txn} has ended: {}", end.reason)));
    }
    Ok(TaskGrant {
        not_after: subject_exp.min(row.deadline),
        event: EventKind::Exchange,
        txn: txn.to_owned(),
    })
}

/// Ends the calling node's tasks of `request`.
pub(super) async fn end(
    api: &NodeApi,
    node: &CallingNode,
    request: pb::EndTasksRequest,
) -> Result<pb::EndTasksResponse, Status> {
    if request.ends.len() > MAX_ENDS {
        return Err(status::invalid(
            "ends",
            format!(
                "{} ends; at most {MAX_ENDS} per request",
                request.ends.len()
            ),
        ));
    }
    let now = SystemTime::now();
    let mut ends = Vec::with_capacity(request.ends.len());
    for end in request.ends {
        check_txn("txn", &end.txn)?;
        status::bounded("reason", &end.reason, MAX_END_REASON_LEN, "the task index")?;
        if !END_REASONS.contains(&end.reason.as_str()) {
            return Err(status::invalid(
                "reason",
                format!("{:?} is not one of {END_REASONS:?}", end.reason),
            ));
        }
        let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(end.ended_at_ms).unwrap_or(0));
        ends.push(FleetTaskEndRequest {
            txn: end.txn,
            reason: end.reason,
            // A node's clock ahead of the server's does not date an end
            // in the future.
            at: at.min(now),
        });
    }
    let ended = api
        .inner
        .tasks
        .end(ends, Some(node.name.clone()))
        .await
        .map_err(|e| status::server_store("recording task ends", &e))?;
    let mut recorded = 0u32;
    for row in ended.into_iter().flatten() {
        recorded += 1;
        let reason = row.ended.as_ref().map(|e| e.reason.clone());
        api.record(AuditEvent {
            spiffe_id: Some(row.spiffe_id.clone()),
            node: Some(node.spiffe_id.to_string()),
            task_id: Some(row.txn.clone()),
            reason,
            ..AuditEvent::new(EventKind::TaskEnd, Outcome::Info)
        })?;
        tracing::info!(task_id = %row.txn, node = %node.name, "task ended on its node");
    }
    Ok(pb::EndTasksResponse { recorded })
}

/// The fleet's task as the admin API shows it.
pub(crate) fn task_message(row: &crate::server::store::FleetTaskRow) -> pb::FleetTask {
    pb::FleetTask {
        id: row.txn.clone(),
        owner_node: row.owner_node.to_string(),
        spiffe_id: row.spiffe_id.clone(),
        began_at_ms: unix_ms(row.began_at),
        deadline_ms: unix_ms(row.deadline),
        ended_reason: row
            .ended
            .as_ref()
            .map(|e| e.reason.clone())
            .unwrap_or_default(),
        ended_at_ms: row.ended.as_ref().map_or(0, |e| unix_ms(e.at)),
    }
}

/// A task id: non-empty printable ASCII, at most [`MAX_TXN_LEN`] bytes.
pub(crate) fn check_txn(field: &str, txn: &str) -> Result<(), Status> {
    status::bounded(field, txn, MAX_TXN_LEN, "the task index")?;
    if txn.is_empty() || !txn.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(status::invalid(
            field,
            "a task id is non-empty printable ASCII",
        ));
    }
    Ok(())
}

/// True when an entry yielding `actor` on the node declares `aud`.
fn declares_audience(api: &NodeApi, node: &CallingNode, actor: &SpiffeId, aud: &str) -> bool {
    let entries = api.inner.registry.snapshot();
    let pods = api.pods();
    let request = super::sign::actor_request(actor);
    entries.entries.iter().any(|entry| {
        entry.entry.audiences.iter().any(|a| a == aud)
            && scope::authorize(entry, &node.name, pods.on(&node.name), &request).is_ok()
    })
}

/// The tools of a task token's `scope` claim.
fn scope_of(claims: &Map<String, Value>) -> BTreeSet<&str> {
    claims
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default()
}

/// The token's single `aud`, unverified: only used to pick what to verify
/// it for.
fn peek_single_audience(token: &str) -> Option<String> {
    let claims: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    match claims.get("aud")? {
        Value::String(aud) => Some(aud.clone()),
        Value::Array(auds) if auds.len() == 1 => auds[0].as_str().map(str::to_owned),
        _ => None,
    }
}

/// Records a refusal of a task rule and returns it as PermissionDenied.
fn deny(
    api: &NodeApi,
    node: &CallingNode,
    event: EventKind,
    spiffe_id: &str,
    txn: &str,
    reason: String,
) -> Status {
    if let Err(e) = api.record(AuditEvent {
        spiffe_id: Some(spiffe_id.to_owned()),
        node: Some(node.spiffe_id.to_string()),
        task_id: Some(txn.to_owned()),
        reason: Some(reason.clone()),
        ..AuditEvent::new(event, Outcome::Deny)
    }) {
        return e;
    }
    tracing::warn!(node = %node.name, task_id = txn, "task token refused: {reason}");
    status::denied(reason)
}
