//! Domain errors to gRPC status: the single mapping for the Workload API.
//!
//! Codes follow the Workload API spec and what clients do with them:
//! InvalidArgument is final (never retried) and is used only for what the
//! caller sent; PermissionDenied means "no identity for you"; Unavailable
//! is retried with backoff. Agent-side details go to the log; the caller
//! gets a reason it can act on.

use tonic::Status;

use crate::svid::{JwtValidationError, SvidError};

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

/// Issuing an SVID failed: an agent-side fault.
pub fn issuance(error: &SvidError) -> Status {
    tracing::error!(%error, "SVID issuance failed");
    Status::unavailable("could not issue an SVID; see the agent log")
}

/// A token that did not validate: the caller's input, so InvalidArgument
/// with the reason, as SPIRE does.
pub fn invalid_token(error: &JwtValidationError) -> Status {
    Status::invalid_argument(error.to_string())
}
