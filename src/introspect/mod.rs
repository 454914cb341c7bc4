//! Token introspection (RFC 7662) for relying parties without tether: a
//! service holding an X.509-SVID of the trust domain POSTs a token to
//! `/introspect` over mutual TLS and learns whether it is active now.
//!
//! This module owns the HTTP side ([`IntrospectionRoutes`]: the route,
//! the form, each client's rate, the answer, the audit record and the
//! metric), the `[introspection]` settings, and the standalone agent's
//! backend ([`AgentIntrospector`]). The tether server's backend (the
//! fleet's task index) is `server::introspect`; both implement
//! [`Introspector`].
//!
//! Invariants:
//! - The caller is the SPIFFE ID of its client certificate, verified
//!   against the trust bundle at the handshake; there is no other way in.
//! - A token is described only to its audience: for anyone else it is
//!   `{"active": false}`, as for an invalid, expired, not yet valid,
//!   unknown-key or ended token (RFC 7662 section 2.2). An inactive answer
//!   carries nothing but `active`; why is in the audit trail only.
//! - Every introspection that reaches a backend is audited (`validate`)
//!   and counted (`tether_validations_total{api="introspection"}`).

mod agent;
mod answer;
mod config;
pub mod form;
pub mod rate;
mod routes;

use std::future::Future;

use serde_json::{Map, Value};
use spiffe::SpiffeId;

pub use agent::AgentIntrospector;
pub use answer::{TOKEN_TYPE, answer_json};
pub use config::{DEFAULT_BURST, DEFAULT_REQUESTS_PER_SECOND, IntrospectionConfig};
pub use routes::{INTROSPECT_PATH, IntrospectionRoutes};

/// Which kind of token was introspected (`token_kind` in the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A JWT-SVID.
    JwtSvid,
    /// A task token (a JWT-SVID with `txn`).
    Task,
}

/// An active token: its kind and its verified claims (`aud` as an array).
#[derive(Debug, Clone)]
pub struct ValidClaims {
    /// JWT-SVID or task token.
    pub kind: TokenKind,
    /// `sub`.
    pub subject: SpiffeId,
    /// Every claim, verified.
    pub claims: Map<String, Value>,
}

/// An inactive token, and why (for the audit trail and the log, never for
/// the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Inactive {
    /// Why, in words.
    pub reason: String,
    /// The task (`txn`), when the token was a verified task token.
    pub task_id: Option<String>,
}

/// A backend that decides whether a token is active for a caller.
pub trait Introspector: Send + Sync + 'static {
    /// Whether `token` is active now for `caller`, which must be in its
    /// audience.
    fn introspect(
        &self,
        token: &str,
        caller: &SpiffeId,
    ) -> impl Future<Output = Result<ValidClaims, Inactive>> + Send;
}

// === impl TokenKind ===

impl TokenKind {
    /// The name in the answer (`token_kind`): `jwt-svid` or `task`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JwtSvid => "jwt-svid",
            Self::Task => "task",
        }
    }

    /// A task token when the verified `claims` carry `txn`.
    pub fn of(claims: &Map<String, Value>) -> Self {
        if claims.contains_key("txn") {
            Self::Task
        } else {
            Self::JwtSvid
        }
    }
}

// === impl Inactive ===

impl Inactive {
    /// Inactive because `reason`.
    pub fn because(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            task_id: None,
        }
    }

    /// The same, naming the task.
    #[must_use]
    pub fn of_task(mut self, txn: impl Into<String>) -> Self {
        self.task_id = Some(txn.into());
        self
    }
}

// === impl ValidClaims ===

impl ValidClaims {
    /// `jti`, when it is a string.
    pub fn jti(&self) -> Option<&str> {
        self.claims.get("jti").and_then(Value::as_str)
    }

    /// `txn`, when it is a string.
    pub fn txn(&self) -> Option<&str> {
        self.claims.get("txn").and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests;
