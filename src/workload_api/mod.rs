//! The SPIFFE Workload API over a Unix socket.
//!
//! Thin by design: `transport` binds the socket, identifies each
//! connection's peer from the kernel and refuses calls without the security
//! header; [`mod@service`] attests, matches, issues and converts;
//! [`status`] is the one place domain errors become gRPC codes. Proto types
//! stop here: domain modules never see them, nor `tonic::Status`.

pub mod convert;
pub mod service;

use std::time::Duration;

use serde::Deserialize;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;

use crate::edge::status;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::transport;
pub use service::WorkloadApi;

/// How the Workload API behaves towards callers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadApiConfig {
    /// Serve the own trust bundle to callers with no identity (as SPIRE's
    /// `allow_unauthenticated_verifiers`); off by default.
    pub allow_unauthenticated_verifiers: bool,
    /// Bounds on what a caller may ask for.
    pub limits: WorkloadApiLimits,
}

/// `[limits]`: bounds on untrusted input and resources per caller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadApiLimits {
    /// Most audiences in one FetchJWTSVID request.
    pub max_audiences: usize,
    /// Longest audience string, in bytes.
    pub max_audience_len: usize,
    /// Largest gRPC request message, in bytes. Larger requests are refused
    /// by the transport (OutOfRange) before they are decoded.
    pub max_request_bytes: usize,
    /// Most concurrent connections to the workload socket; further ones
    /// are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Most concurrent streams (RPCs) on one connection.
    pub max_streams_per_connection: u32,
    /// Most open long-lived streams (Workload API streams and `WatchTask`)
    /// one process may hold, over all its connections.
    pub max_streams_per_process: usize,
    /// Most connections one process may hold open; more are closed as
    /// soon as they are accepted.
    pub max_connections_per_process: usize,
    /// Most connections the processes of one uid may hold open together;
    /// more are closed as soon as they are accepted.
    pub max_connections_per_uid: usize,
    /// The same for a uid that no registration entry can match (every
    /// entry requires a `unix:uid` selector, none this uid's); at most
    /// `max_connections_per_uid`.
    pub max_connections_per_unmatched_uid: usize,
    /// How long a new connection has to send the HTTP/2 preface before it
    /// is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a connection may stay open with no request in flight
    /// (counted from accept, then from the end of its last request; an
    /// open stream is in flight) before the agent closes it.
    #[serde(with = "humantime_serde")]
    pub idle_connection_timeout: Duration,
    /// How long a request may take until its handler answers (for a
    /// stream: until the stream is set up); bounds half-open requests whose
    /// body never comes.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

// === impl WorkloadApiLimits ===

impl Default for WorkloadApiLimits {
    fn default() -> Self {
        Self {
            max_audiences: 16,
            max_audience_len: 1024,
            max_request_bytes: 4 * 1024 * 1024,
            max_connections: 8192,
            max_streams_per_connection: 128,
            max_streams_per_process: 256,
            max_connections_per_process: 1024,
            max_connections_per_uid: 4096,
            max_connections_per_unmatched_uid: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_connection_timeout: Duration::from_secs(5 * 60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl WorkloadApiLimits {
    /// The shortest `idle_connection_timeout`: a client needs time to send
    /// its first request after connecting.
    pub const MIN_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest `idle_connection_timeout`: longer is no bound at all.
    pub const MAX_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

    /// Checks every limit is usable; on failure names the key.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let positive = "must be greater than zero";
        if self.max_audiences == 0 {
            return Err(("max_audiences", positive));
        }
        if self.max_audience_len == 0 {
            return Err(("max_audience_len", positive));
        }
        if self.max_request_bytes < 1024 {
            return Err(("max_request_bytes", "must be at least 1024"));
        }
        if self.max_connections == 0 {
            return Err(("max_connections", positive));
        }
        if self.max_streams_per_connection == 0 {
            return Err(("max_streams_per_connection", positive));
        }
        if self.max_streams_per_process == 0 {
            return Err(("max_streams_per_process", positive));
        }
        if self.max_connections_per_process == 0 {
            return Err(("max_connections_per_process", positive));
        }
        if self.max_connections_per_uid == 0 {
            return Err(("max_connections_per_uid", positive));
        }
        if self.max_connections_per_unmatched_uid == 0
            || self.max_connections_per_unmatched_uid > self.max_connections_per_uid
        {
            return Err((
                "max_connections_per_unmatched_uid",
                "must be greater than zero and at most max_connections_per_uid",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(("handshake_timeout", positive));
        }
        if !(Self::MIN_IDLE_CONNECTION_TIMEOUT..=Self::MAX_IDLE_CONNECTION_TIMEOUT)
            .contains(&self.idle_connection_timeout)
        {
            return Err(("idle_connection_timeout", "must be between 1s and 24h"));
        }
        if self.request_timeout.is_zero() {
            return Err(("request_timeout", positive));
        }
        Ok(())
    }

    /// What the workload socket's listener enforces.
    pub fn connections(&self) -> transport::ConnectionLimits {
        transport::ConnectionLimits {
            max_connections: self.max_connections,
            max_per_process: self.max_connections_per_process,
            max_per_uid: self.max_connections_per_uid,
            max_per_unmatched_uid: self.max_connections_per_unmatched_uid,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_connection_timeout,
        }
    }

    /// Refuses an audience list that is empty, too long, or has empty or
    /// overlong members.
    pub fn check_audiences(&self, audiences: &[String]) -> Result<(), Status> {
        if audiences.is_empty() {
            return Err(status::invalid_argument("audience must be specified"));
        }
        if audiences.len() > self.max_audiences {
            return Err(status::invalid_argument(format!(
                "{} audiences requested; the limit is {}",
                audiences.len(),
                self.max_audiences
            )));
        }
        for audience in audiences {
            if audience.is_empty() {
                return Err(status::invalid_argument(
                    "audience must not contain empty strings",
                ));
            }
            status::bounded(
                "audience",
                audience,
                self.max_audience_len,
                "limits.max_audience_len",
            )?;
            if audience.chars().any(char::is_control) {
                return Err(status::invalid_argument(
                    "audience must not contain control characters",
                ));
            }
        }
        Ok(())
    }
}

/// The header-checking interceptor's type.
pub type HeaderCheck = fn(tonic::Request<()>) -> Result<tonic::Request<()>, Status>;

/// The Workload API as a tonic service, behind the security header check.
pub fn service(
    api: WorkloadApi,
    limits: &WorkloadApiLimits,
) -> InterceptedService<SpiffeWorkloadApiServer<WorkloadApi>, HeaderCheck> {
    InterceptedService::new(
        SpiffeWorkloadApiServer::new(api).max_decoding_message_size(limits.max_request_bytes),
        crate::edge::header::require_security_header as HeaderCheck,
    )
}
