//! Domain errors to `tonic::Status`: the one mapping, shared by the
//! Workload API, the Task API and the admin API, so a given error gets the
//! same code whichever API it surfaces through.
//!
//! The rule, by what a client should do:
//! - what the caller sent is wrong: InvalidArgument, with the reason (final,
//!   never retried);
//! - a denial (policy, no matching entry, not the caller's task, a refused
//!   exchange, a caller that cannot be attested): PermissionDenied (or
//!   Unauthenticated when the caller's identity cannot be verified);
//! - over a budget (streams, tasks, audit bytes): ResourceExhausted;
//! - trouble on the agent's side that may pass (the audit trail, the store,
//!   the disk, the signer, a blocking job): Unavailable, which clients
//!   retry with backoff. The caller reads what failed; the whole chain goes
//!   to the log.
//!
//! The fleet's server (`server::admin`, the node API) maps its errors
//! here too, under the same rule.
//!
//! Every status text that carries an error prints it with its source chain
//! ([`crate::error::Chain`]). Only this file constructs a `Status`.

use std::error::Error;

use tonic::Status;

use crate::attestation::AttestationError;
use crate::audit::AuditUnavailable;
use crate::authority::AuthorityError;
use crate::error::Chain;
use crate::registration::RegistrationError;
use crate::server::join_token::TokenRefusal;
use crate::server::registry::ServerRegistryError;
use crate::server::scope::BadNodeName;
use crate::server::store::ServerStoreError;
use crate::svid::{JwtValidationError, SvidError};
use crate::task::{EndReason, TaskError, TokenRejection};
use crate::transport::Exhausted;

/// What the caller sent is not acceptable: InvalidArgument with `reason`.
pub fn invalid_argument(reason: impl Into<String>) -> Status {
    Status::invalid_argument(reason)
}

/// A request field that is not valid: InvalidArgument naming the field.
pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// Refuses a request field longer than `limit` bytes: InvalidArgument
/// naming the field, its length, the limit and the setting (or rule) that
/// sets it.
pub fn bounded(field: &str, value: &str, limit: usize, setting: &str) -> Result<(), Status> {
    if value.len() > limit {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; the limit is {limit} ({setting})",
            value.len()
        )));
    }
    Ok(())
}

/// Refuses a binary request field longer than `limit` bytes:
/// InvalidArgument naming the field, its length and the limit.
pub fn bounded_bytes(field: &str, len: usize, limit: usize) -> Result<(), Status> {
    if len > limit {
        return Err(Status::invalid_argument(format!(
            "{field} is {len} bytes long; the limit is {limit}"
        )));
    }
    Ok(())
}

/// The caller may not do this: PermissionDenied with `reason`.
pub fn denied(reason: impl Into<String>) -> Status {
    Status::permission_denied(reason)
}

/// The caller's identity cannot be verified (a fleet node without a valid
/// node SVID, a join token that does not admit it): Unauthenticated.
pub fn unauthenticated(reason: impl Into<String>) -> Status {
    Status::unauthenticated(reason)
}

/// A signing request the authority refused or could not sign: the
/// request's fault (a CSR that does not verify, claims it may not set)
/// InvalidArgument; the signer's Unavailable.
pub fn authority(error: &AuthorityError) -> Status {
    match error {
        AuthorityError::BadRequest(_) => Status::invalid_argument(Chain(error).to_string()),
        _ => agent_fault("signing failed", error),
    }
}

/// Nothing by that name (operators' lookups).
pub fn not_found(reason: impl Into<String>) -> Status {
    Status::not_found(reason)
}

/// The request cannot be served now (the agent is stopping, say); retry.
pub fn unavailable(reason: impl Into<String>) -> Status {
    Status::unavailable(reason)
}

/// The request cannot be served in the agent's present state (a reload
/// that was refused).
pub fn failed_precondition(reason: impl Into<String>) -> Status {
    Status::failed_precondition(reason)
}

/// The RPC is not served by this agent.
pub fn unimplemented(reason: impl Into<String>) -> Status {
    Status::unimplemented(reason)
}

/// The caller matches no registration entry.
pub fn no_identity() -> Status {
    Status::permission_denied("no identity issued: no registration entry matches this process")
}

/// The caller lost its last identity while a stream was open.
pub fn identity_lost() -> Status {
    Status::permission_denied(
        "no identity issued: the registration entries for this process were removed",
    )
}

/// A certificate-bound token presented where the certificate cannot be.
pub fn bound_token() -> Status {
    Status::invalid_argument(
        "the token is bound to a certificate (cnf): validate it with ValidateTaskToken \
         and the presenter's certificate",
    )
}

/// The agent is stopping; clients reconnect.
pub fn shutting_down() -> Status {
    Status::unavailable("tether is shutting down")
}

/// How a WatchTask stream ends, by why the task ended.
pub fn task_ended(id: &str, reason: EndReason) -> Status {
    let message = format!("task {id} ended: {reason}");
    match reason {
        EndReason::Completed => Status::ok(message),
        EndReason::Deadline => Status::deadline_exceeded(message),
        EndReason::OwnerExited | EndReason::EntryRemoved | EndReason::Revoked => {
            Status::permission_denied(message)
        }
    }
}

/// A connection the listener did not identify: a wiring fault, never the
/// caller's.
pub fn no_peer() -> Status {
    Status::internal("connection carries no peer credentials")
}

/// A fault of the agent's that retrying may get past: logged with its
/// whole chain, Unavailable naming what failed and the cause.
pub fn agent_fault(what: &str, error: &(dyn Error + '_)) -> Status {
    tracing::error!(error = %Chain(error), "{what}");
    Status::unavailable(format!("{what}: {}", Chain(error)))
}

/// A fault of the agent's that retrying will not get past (a bundle it
/// cannot encode): logged with its whole chain, Internal.
pub fn internal(what: &str, error: &(dyn Error + '_)) -> Status {
    tracing::error!(error = %Chain(error), "{what}");
    Status::internal(format!("{what}: {}", Chain(error)))
}

/// A caller over its request rate: ResourceExhausted with `reason`.
pub fn exhausted_rate(reason: &str) -> Status {
    Status::resource_exhausted(reason)
}

/// A holder already holds its budget (streams per process).
pub fn exhausted(what: &str, error: &Exhausted) -> Status {
    Status::resource_exhausted(format!("{what}: this process {error}"))
}

/// A request that could not be audited: nothing is answered unaudited.
/// Over its audit budget, the caller is ResourceExhausted (it slows down);
/// otherwise the trail is in trouble (Unavailable, retried).
pub fn audit(error: &AuditUnavailable) -> Status {
    match error {
        AuditUnavailable::OverBudget { .. } => Status::resource_exhausted(Chain(error).to_string()),
        AuditUnavailable::QueueFull { .. }
        | AuditUnavailable::Failed { .. }
        | AuditUnavailable::Stopped
        | AuditUnavailable::Stalled { .. } => {
            tracing::error!(error = %Chain(error), "not answering: the audit trail is unavailable");
            Status::unavailable(format!("not answering: {}", Chain(error)))
        }
    }
}

/// Attestation failed: the caller's own doing is Unauthenticated (with the
/// reason); cgroups that place the caller in two pods are a denial
/// (retrying would not help); the kubelet not knowing the caller's pod yet
/// is Unavailable with the reason (it holds nothing secret and the
/// workload needs it); any other agent-side fault is Unavailable with the
/// details in the log.
pub fn attestation(error: &AttestationError) -> Status {
    match error {
        AttestationError::Kubernetes { .. } => {
            tracing::warn!(error = %Chain(error), "pod attestation failed");
            Status::unavailable(format!(
                "could not attest the calling process: {}",
                Chain(error)
            ))
        }
        AttestationError::Cgroup { .. } => {
            tracing::warn!(error = %Chain(error), "pod attestation refused");
            Status::permission_denied(format!(
                "could not attest the calling process: {}",
                Chain(error)
            ))
        }
        AttestationError::CallerExited { .. }
        | AttestationError::CredentialsChanged { .. }
        | AttestationError::ExecutableChanged { .. } => {
            tracing::info!(error = %Chain(error), "caller refused during attestation");
            Status::unauthenticated(format!(
                "could not verify the calling process: {}",
                Chain(error)
            ))
        }
        AttestationError::PeerCredentials(_)
        | AttestationError::NoPeerPid
        | AttestationError::PeerPidfd(_)
        | AttestationError::PidfdOpen { .. }
        | AttestationError::PollPidfd { .. }
        | AttestationError::ReadProc { .. }
        | AttestationError::ParseProc { .. }
        | AttestationError::Blocking(_) => {
            tracing::warn!(error = %Chain(error), "workload attestation failed");
            Status::unavailable("workload attestation failed; see the agent log")
        }
    }
}

/// Issuing an SVID failed: the audit trail's trouble as [`audit`], a
/// signing fault Unavailable (the signer may have no current key, or the
/// blocking pool is stopping).
pub fn svid(error: &SvidError) -> Status {
    match error {
        SvidError::Audit(unavailable) => audit(unavailable),
        // Fleet mode: the server's answer (unreachable, or why it refused)
        // is the reason, and says nothing the node does not know.
        SvidError::Authority(AuthorityError::Remote(_)) => {
            tracing::error!(error = %Chain(error), "SVID issuance failed");
            Status::unavailable(format!("could not issue an SVID: {}", Chain(error)))
        }
        SvidError::Authority(_) | SvidError::KeyGeneration(_) | SvidError::SigningJob(_) => {
            tracing::error!(error = %Chain(error), "SVID issuance failed");
            Status::unavailable("could not issue an SVID; see the agent log")
        }
    }
}

/// A token that did not validate: the caller's input, so InvalidArgument
/// with the reason, as SPIRE does.
pub fn jwt_validation(error: &JwtValidationError) -> Status {
    Status::invalid_argument(Chain(error).to_string())
}

/// A task operation that was refused or failed.
pub fn task(error: &TaskError) -> Status {
    match error {
        TaskError::Token(rejection @ TokenRejection::Stale { .. }) => token(rejection),
        TaskError::Invalid { .. } | TaskError::Token(_) => {
            Status::invalid_argument(Chain(error).to_string())
        }
        TaskError::NotOwner(_) | TaskError::Exchange(_) => {
            Status::permission_denied(Chain(error).to_string())
        }
        TaskError::NotFound(_) => Status::not_found(Chain(error).to_string()),
        TaskError::Ended { .. } => Status::failed_precondition(Chain(error).to_string()),
        TaskError::TooMany(_) => Status::resource_exhausted(Chain(error).to_string()),
        TaskError::Audit(unavailable) => audit(unavailable),
        TaskError::Sign(_) | TaskError::Store(_) | TaskError::Job(_) | TaskError::Journal(_) => {
            agent_fault("the agent could not complete the task operation", error)
        }
    }
}

/// A token presented for validation that was refused: InvalidArgument with
/// the reason. Another node's task that this agent cannot vouch for (it
/// has not heard from the tether server lately) is the agent's trouble,
/// and may pass: Unavailable with the reason (the fleet link logs its own
/// trouble, so each refusal is not logged again).
pub fn token(error: &TokenRejection) -> Status {
    match error {
        TokenRejection::Stale { .. } => Status::unavailable(Chain(error).to_string()),
        TokenRejection::Jwt(_)
        | TokenRejection::NotATaskToken(_)
        | TokenRejection::Ended { .. }
        | TokenRejection::UnknownTask(_)
        | TokenRejection::TooLong(..)
        | TokenRejection::ToolNotAllowed(_)
        | TokenRejection::Binding(_) => Status::invalid_argument(Chain(error).to_string()),
    }
}

/// A registration change that was refused or failed.
pub fn registration(error: &RegistrationError) -> Status {
    match error {
        RegistrationError::Invalid(_) => Status::invalid_argument(Chain(error).to_string()),
        RegistrationError::Duplicate { .. } => Status::already_exists(Chain(error).to_string()),
        RegistrationError::NotFound(_) => Status::not_found(Chain(error).to_string()),
        RegistrationError::FromConfig(_)
        | RegistrationError::FromServer(_)
        | RegistrationError::Fleet => Status::failed_precondition(Chain(error).to_string()),
        RegistrationError::Conflict { .. } => Status::aborted(Chain(error).to_string()),
        RegistrationError::Audit(unavailable) => audit(unavailable),
        RegistrationError::Store(_) | RegistrationError::Job(_) => {
            agent_fault("the entry store failed", error)
        }
        // The entries the agent holds are not valid: retrying will not
        // help until an operator fixes them.
        RegistrationError::Stored { .. } | RegistrationError::DuplicateInConfig { .. } => {
            tracing::error!(error = %Chain(error), "entry store failure");
            Status::internal(format!("the entry store failed: {}", Chain(error)))
        }
    }
}

/// A node name that is not one (the fleet's server): InvalidArgument
/// naming the request's field.
pub fn node_name(field: &str, error: &BadNodeName) -> Status {
    invalid(field, Chain(error))
}

/// A join token refused or not made (the fleet's server). A presented
/// token that admits nothing (malformed, unknown, expired, used) is the
/// presenter's failed authentication; a lifetime out of bounds is the
/// operator's input; a failed random number generator may pass.
pub fn join_token(error: &TokenRefusal) -> Status {
    match error {
        TokenRefusal::Malformed
        | TokenRefusal::Unknown
        | TokenRefusal::Expired
        | TokenRefusal::Used => Status::unauthenticated(Chain(error).to_string()),
        TokenRefusal::BadTtl(_) => invalid("ttl_ms", Chain(error)),
        TokenRefusal::Random => agent_fault("could not create a join token", error),
    }
}

/// The fleet server's store failed while doing `what`: a duplicate is
/// AlreadyExists; a value it cannot keep (a time or text out of its
/// bounds) is the caller's input (InvalidArgument); an unreachable store
/// may pass (Unavailable); a damaged row or a store that cannot be opened
/// needs an operator (Internal).
pub fn server_store(what: &str, error: &ServerStoreError) -> Status {
    match error {
        ServerStoreError::Duplicate(_) => {
            Status::already_exists(format!("{what}: {}", Chain(error)))
        }
        ServerStoreError::Unstorable { .. } => {
            Status::invalid_argument(format!("{what}: {}", Chain(error)))
        }
        ServerStoreError::Unavailable { .. } => agent_fault(what, error),
        ServerStoreError::Corrupt { .. } | ServerStoreError::Open(_) => internal(what, error),
    }
}

/// A change to the fleet server's entries that was refused or failed.
pub fn server_registry(error: &ServerRegistryError) -> Status {
    match error {
        ServerRegistryError::Invalid(_) => Status::invalid_argument(Chain(error).to_string()),
        ServerRegistryError::Duplicate { .. } => Status::already_exists(Chain(error).to_string()),
        ServerRegistryError::NotFound(_) => Status::not_found(Chain(error).to_string()),
        ServerRegistryError::FromConfig(_) => Status::failed_precondition(Chain(error).to_string()),
        ServerRegistryError::Audit(unavailable) => audit(unavailable),
        ServerRegistryError::Store { what, source } => server_store(what, source),
        ServerRegistryError::Random(_) => agent_fault("could not create the entry", error),
        // The stored entries are not valid: retrying will not help until
        // an operator fixes them.
        ServerRegistryError::Stored { .. } => internal("the server's entry store failed", error),
    }
}

#[cfg(test)]
mod tests;
