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
//!
//! A live task's token is active only while this replica's view of the
//! task index is current ([`TaskIndex::is_current`]: it read the store's
//! ends within [`CURRENT_FOR`](super::tasks::CURRENT_FOR)). A replica that
//! cannot poll the store cannot vouch that the row it just read is the
//! last word on the task, and its own nodes already refuse other nodes'
//! tasks then (no heartbeats): introspection fails closed the same way.
//! An ended task is inactive whatever the view.

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
            check_task(&self.tasks, txn, &verified.spiffe_id).await?;
        }
        Ok(ValidClaims {
            kind,
            subject: verified.spiffe_id,
            claims: verified.claims,
        })
    }
}

/// Whether the task `txn` of a token with subject `sub` is live in the
/// index `tasks`, as this replica can vouch for.
async fn check_task(tasks: &TaskIndex, txn: &str, sub: &SpiffeId) -> Result<(), Inactive> {
    if txn.is_empty() || txn.len() > MAX_TXN_LEN {
        return Err(Inactive::because("txn is empty or too long"));
    }
    let inactive = |reason: String| Inactive::because(reason).of_task(txn);
    match tasks.get(txn).await {
        Ok(Some(row)) => match row.ended {
            Some(end) => Err(inactive(format!("task {txn} has ended: {}", end.reason))),
            None if row.spiffe_id != sub.to_string() => Err(inactive(format!(
                "task {txn} is not {sub}'s in the fleet's task index"
            ))),
            // Read after the row: a view that went stale while it was
            // read vouches for nothing either.
            None if !tasks.is_current() => Err(inactive(format!(
                "task {txn} may have ended unseen: this replica has not read the fleet's task ends lately"
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use spiffe::{SpiffeId, TrustDomain};
    use tokio_util::sync::CancellationToken;

    use super::check_task;
    use crate::audit::{AuditConfig, AuditLog, SigningKey};
    use crate::server::scope::NodeName;
    use crate::server::store::sqlite::SqliteStore;
    use crate::server::store::{FleetTaskEndRequest, NewFleetTask, ServerStore};
    use crate::server::tasks::{CURRENT_FOR, TaskIndex};

    const OWNER: &str = "spiffe://example.org/agent";

    fn task(txn: &str) -> NewFleetTask {
        NewFleetTask {
            txn: txn.into(),
            owner_node: NodeName::new("node-a").expect("a node name"),
            spiffe_id: OWNER.into(),
            began_at: SystemTime::now(),
            deadline: SystemTime::now() + Duration::from_secs(600),
        }
    }

    /// A live task's token is active only while the replica's view of the
    /// ends is current; an ended, unknown or someone else's task never.
    #[tokio::test]
    async fn a_live_task_is_inactive_on_a_replica_that_is_not_current() {
        let dir = tempfile::tempdir().expect("a tempdir");
        let store: Arc<dyn ServerStore> =
            Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("the store"));
        for txn in ["live", "done"] {
            store.begin_fleet_task(task(txn)).await.expect("begin");
        }
        store
            .end_fleet_tasks(
                vec![FleetTaskEndRequest {
                    txn: "done".into(),
                    reason: "completed".into(),
                    at: SystemTime::now(),
                }],
                None,
            )
            .await
            .expect("end");
        let (audit, writer) = AuditLog::open(
            &dir.path().join("audit"),
            &AuditConfig::default(),
            Arc::new(SigningKey::generate().expect("a signing key").0),
        )
        .expect("the audit trail opens");
        tokio::spawn(writer.run(CancellationToken::new()));
        let td = TrustDomain::new("example.org").expect("td");
        let tasks = TaskIndex::open(store, td, audit).await.expect("the index");
        let owner = SpiffeId::new(OWNER).expect("id");
        let other = SpiffeId::new("spiffe://example.org/other").expect("id");

        // Just opened, the view is current.
        assert!(tasks.is_current());
        assert_eq!(check_task(&tasks, "live", &owner).await, Ok(()));
        let refused = |r: Result<(), crate::introspect::Inactive>| r.expect_err("inactive");
        assert!(
            refused(check_task(&tasks, "done", &owner).await)
                .reason
                .contains("ended")
        );
        assert!(
            refused(check_task(&tasks, "live", &other).await)
                .reason
                .contains("not")
        );
        assert!(
            refused(check_task(&tasks, "never", &owner).await)
                .reason
                .contains("unknown")
        );
        assert!(
            refused(check_task(&tasks, "", &owner).await)
                .reason
                .contains("empty")
        );

        // No poll for longer than the view counts as current (the index's
        // poll loop is not running here, as on a replica that cannot read
        // the store): the live task is inactive, and says why.
        // (A real wait: past it the view is stale whatever the machine's
        // speed, so nothing here depends on timing.)
        tokio::time::sleep(CURRENT_FOR + Duration::from_millis(200)).await;
        assert!(!tasks.is_current());
        let stale = refused(check_task(&tasks, "live", &owner).await);
        assert!(
            stale.reason.contains("not read the fleet's task ends"),
            "{stale:?}"
        );
        assert_eq!(stale.task_id.as_deref(), Some("live"));
        assert!(
            refused(check_task(&tasks, "done", &owner).await)
                .reason
                .contains("ended")
        );
    }
}
