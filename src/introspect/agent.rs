//! A standalone agent's backend: the token is verified against the
//! agent's own trust bundle for the caller as audience
//! ([`crate::svid::jwt::validate`]); a task token (verified claims with
//! `txn`) is then judged by the task rules the Task API's
//! ValidateTaskToken applies ([`Tasks::validate_unbound`]: a known task,
//! not ended, a bounded lifetime), without the presenter binding, which
//! the relying party checks against `cnf` itself.

use std::sync::Arc;

use spiffe::{SpiffeId, TrustDomain};

use super::{Inactive, Introspector, TokenKind, ValidClaims};
use crate::authority::Authority;
use crate::bundle::TrustBundle;
use crate::svid::jwt as jwt_svid;
use crate::task::{Tasks, TokenRejection};

/// Introspection against this agent's bundle and tasks.
#[derive(Clone)]
pub struct AgentIntrospector {
    authority: Arc<dyn Authority>,
    tasks: Tasks,
}

impl std::fmt::Debug for AgentIntrospector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIntrospector").finish_non_exhaustive()
    }
}

// === impl AgentIntrospector ===

impl AgentIntrospector {
    /// The backend over `authority`'s bundle and `tasks`.
    pub fn new(authority: Arc<dyn Authority>, tasks: Tasks) -> Self {
        Self { authority, tasks }
    }

    fn decide(&self, token: &str, caller: &SpiffeId) -> Result<ValidClaims, Inactive> {
        let own = self.authority.bundle();
        let bundle_for = |td: &TrustDomain| -> Option<Arc<TrustBundle>> {
            (td == own.trust_domain()).then(|| Arc::clone(&own))
        };
        let audience = caller.to_string();
        let verified = jwt_svid::validate(token, &audience, bundle_for)
            .map_err(|e| Inactive::because(crate::error::chain(&e)))?;
        match TokenKind::of(&verified.claims) {
            TokenKind::JwtSvid => Ok(ValidClaims {
                kind: TokenKind::JwtSvid,
                subject: verified.spiffe_id,
                claims: verified.claims,
            }),
            TokenKind::Task => {
                let task = self
                    .tasks
                    .validate_unbound(token, &audience, bundle_for)
                    .map_err(|rejection| rejected(&rejection, &verified.claims))?;
                Ok(ValidClaims {
                    kind: TokenKind::Task,
                    subject: task.spiffe_id,
                    claims: task.raw_claims,
                })
            }
        }
    }
}

impl Introspector for AgentIntrospector {
    async fn introspect(&self, token: &str, caller: &SpiffeId) -> Result<ValidClaims, Inactive> {
        self.decide(token, caller)
    }
}

/// Why a verified task token is inactive, naming its task.
fn rejected(
    rejection: &TokenRejection,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Inactive {
    let inactive = Inactive::because(crate::error::chain(rejection));
    match claims.get("txn").and_then(serde_json::Value::as_str) {
        Some(txn) => inactive.of_task(txn),
        None => inactive,
    }
}
