//! Task errors to gRPC status: the single mapping for the Task API.

use tonic::Status;

use crate::task::{EndReason, TaskError};

/// A refused task operation.
pub fn task(error: TaskError) -> Status {
    match &error {
        TaskError::Invalid { .. } | TaskError::Token(_) => {
            Status::invalid_argument(error.to_string())
        }
        TaskError::NotOwner(_) | TaskError::Exchange(_) | TaskError::NotFound(_) => {
            Status::permission_denied(error.to_string())
        }
        TaskError::Ended { .. } => Status::failed_precondition(error.to_string()),
        TaskError::TooMany(_) => Status::resource_exhausted(error.to_string()),
        TaskError::Audit(_) => {
            tracing::error!(%error, "refusing to issue: the audit trail is unavailable");
            Status::unavailable(error.to_string())
        }
        TaskError::Sign(_) | TaskError::Store(_) | TaskError::Job(_) | TaskError::Journal(_) => {
            tracing::error!(%error, "task operation failed");
            Status::unavailable(format!(
                "the agent could not complete the task operation: {error}"
            ))
        }
    }
}

/// How a WatchTask stream ends, by why the task ended.
pub fn ended(id: &str, reason: EndReason) -> Status {
    let message = format!("task {id} ended: {reason}");
    match reason {
        EndReason::Completed => Status::ok(message),
        EndReason::Deadline => Status::deadline_exceeded(message),
        EndReason::OwnerExited | EndReason::EntryRemoved | EndReason::Revoked => {
            Status::permission_denied(message)
        }
    }
}
