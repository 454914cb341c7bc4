//! Domain errors to gRPC status for the admin API: the single mapping.
//! Operators get the reason; the codes say what kind of problem it is.

use tonic::Status;

use crate::registration::RegistrationError;

/// A registration change that was refused.
pub fn registration(error: RegistrationError) -> Status {
    match &error {
        RegistrationError::Invalid(_) => Status::invalid_argument(error.to_string()),
        RegistrationError::Duplicate { .. } => Status::already_exists(error.to_string()),
        RegistrationError::NotFound(_) => Status::not_found(error.to_string()),
        RegistrationError::FromConfig(_) => Status::failed_precondition(error.to_string()),
        RegistrationError::Conflict { .. } => Status::aborted(error.to_string()),
        RegistrationError::Audit(_) => Status::unavailable(error.to_string()),
        RegistrationError::Stored { .. }
        | RegistrationError::DuplicateInConfig { .. }
        | RegistrationError::Store(_)
        | RegistrationError::Job(_) => {
            tracing::error!(%error, "entry store failure");
            Status::internal(format!("the entry store failed: {error}"))
        }
    }
}

/// A request field that is not valid.
pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}
