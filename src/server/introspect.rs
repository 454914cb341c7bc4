//! The tether server's introspection backend (`crate::introspect`): a
//! token is verified against the trust domain's bundle (every replica's
//! keys, [`super::bundle::FleetAuthority`]) for the caller as audience;
//! a JWT-SVID is then active by its signature and times alone, and a task
//! token (claims with `txn`) only while the fleet's task index holds its
//! task, owned by the token's `sub`, and not ended.
//!
//! A task the index has never seen is inactive: every task token the
//! fleet signs records its task in the index with its first token
//! (`node_api::tasks`), and a row is pruned only after its deadline, past
//! which no token of it lives. So an unknown task is not live anywhere in
//! the fleet (or its row was lost: failing closed is right then too). An
//! index that cannot be read also answers inactive, and logs why.

use std::sync::Arc;

use spiffe::{SpiffeId, TrustDomain};

use super::store::MAX_TXN_LEN;
use super::tasks::TaskIndex;
use crate::authority::Authority;
use crate::bundle::TrustBundle;
use crate::error::Chain;
use crate::introspect::{Inactive, Introspector, TokenKind, ValidClaims};
use crate::svid::jwt as jwt_svid;

/// Introspection against the fleet's bundle and task index.
#[derive(Clone)]
pub struct ServerIntrospector {
    authority: Arc<dyn Authority>,
    tasks: TaskIndex,
}

impl std::fmt::Debug for ServerIntrospector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIntrospector").finish_non_exhaustive()
    }
}

// === impl ServerIntrospector ===

impl ServerIntrospector {
    /// The backend over `authority`'s bundle and the task index `tasks`.
    pub fn new(authority: Arc<dyn Authority>, tasks: TaskIndex) -> Self {
        Self { authority, tasks }
    }

    /// Whether the task `txn` of a token with subject `sub` is live in
    /// the index.
    async fn check_task(&self, txn: &str, sub: &SpiffeId) -> Result<(), Inactive> {
        if txn.is_empty() || txn.len() > MAX_TXN_LEN {
            return Err(Inactive::because("txn is empty or too long"));
        }
        let inactive = |reason: String| Inactive::because(reason).of_task(txn);
        match self.tasks.get(txn).await {
            Ok(Some(row)) => match row.ended {
                Some(end) => Err(inactive(format!("task {txn} has ended: {}", end.reason))),
                None if row.spiffe_id != sub.to_string() => Err(inactive(format!(
                    "task {txn} is not {sub}'s in the fleet's task index"
                ))),
                None => Ok(()),
            },
            Ok(None) => Err(inactive(format!(
                "task {txn} is unknown to the fleet's task index"
            ))),
            Err(error) => {
                tracing::warn!(error = %Chain(&error), txn, "could not read the task index for an introspection; answering inactive");
                Err(inactive(format!(
                    "the task index could not be read: {}",
                    Chain(&error)
                )))
            }
        }
    }
}

impl Introspector for ServerIntrospector {
    async fn introspect(&self, token: &str, caller: &SpiffeId) -> Result<ValidClaims, Inactive> {
        let own = self.authority.bundle();
        let bundle_for = |td: &TrustDomain| -> Option<Arc<TrustBundle>> {
            (td == own.trust_domain()).then(|| Arc::clone(&own))
        };
        let verified = jwt_svid::validate(token, &caller.to_string(), bundle_for)
            .map_err(|e| Inactive::because(crate::error::chain(&e)))?;
        let kind = TokenKind::of(&verified.claims);
        if kind == TokenKind::Task {
            let Some(txn) = verified.claims.get("txn").and_then(|t| t.as_str()) else {
                return Err(Inactive::because("txn is not a string"));
            };
            self.check_task(txn, &verified.spiffe_id).await?;
        }
        Ok(ValidClaims {
            kind,
            subject: verified.spiffe_id,
            claims: verified.claims,
        })
    }
}
