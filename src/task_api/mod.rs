//! The Task API: task-bound tokens, on the workload socket next to the
//! SPIFFE Workload API, with the same attestation and security header.
//!
//! Thin like the Workload API: identify and attest the caller, match its
//! identities, call `task`, convert. The owner of a task is the process
//! (pid and start time) that began it; only it may renew, watch or end it.

pub mod service;

use tonic::service::interceptor::InterceptedService;

use crate::edge::header::require_security_header;
use crate::proto::task::tasks_server::TasksServer;
pub use service::TaskApi;

/// The header-checking interceptor's type.
pub type HeaderCheck = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// The Task API as a tonic service, behind the security header check.
pub fn service(
    api: TaskApi,
    max_request_bytes: usize,
) -> InterceptedService<TasksServer<TaskApi>, HeaderCheck> {
    InterceptedService::new(
        TasksServer::new(api).max_decoding_message_size(max_request_bytes),
        require_security_header as HeaderCheck,
    )
}
