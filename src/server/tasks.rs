//! The fleet's task index, as this replica serves it: which node owns each
//! task, whether it ended, and the stream of ends every agent follows.
//!
//! The index itself is in the store ([`ServerStore::begin_fleet_task`] and
//! its siblings), shared by every replica. This module keeps, per replica:
//! - the recent ends, in revision order (a bounded ring), so the sync
//!   streams of many nodes read one copy instead of each querying the
//!   store;
//! - a watch of the latest end revision this replica has seen, which wakes
//!   those streams;
//! - whether it is current: it polls the store for ends (other replicas'
//!   too) every [`POLL`], at once after an end of its own, and counts as
//!   current only while a poll succeeded within [`CURRENT_FOR`]. A replica
//!   that cannot read the store stops sending heartbeats, so its nodes
//!   fail closed on other nodes' tasks instead of trusting a stale view.
//!
//! Invariant: the ring holds every end with a revision in
//! `(covered_after, latest]`, in order. The store commits ends in revision
//! order, so a poll after revision N never later finds an end below N.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use spiffe::TrustDomain;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::node_api::node_spiffe_id;
use super::scope::NodeName;
use super::store::{
    FleetTaskEndRequest, FleetTaskRow, NewFleetTask, ServerStore, ServerStoreError,
};
use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::Chain;

/// How often the store is read for ends of other replicas.
pub const POLL: Duration = Duration::from_millis(200);
/// How long after its last successful poll the replica counts as current.
pub const CURRENT_FOR: Duration = Duration::from_secs(2);
/// Most ends kept in memory; older ones are read from the store.
const RING: usize = 65_536;
/// Most ends read from the store at once.
pub const PAGE: u32 = 1000;
/// How often tasks past their deadline are forgotten, and how long after
/// the deadline (clock skew between nodes).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_MARGIN: Duration = Duration::from_secs(60);

/// This replica's view of the fleet's task index (cheap Clone).
#[derive(Debug, Clone)]
pub struct TaskIndex {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ServerStore>,
    /// Names nodes in the trail by their SPIFFE IDs, as every record does.
    trust_domain: TrustDomain,
    audit: AuditLog,
    recent: Mutex<Recent>,
    latest: watch::Sender<u64>,
    poll_now: Notify,
    last_poll: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Recent {
    /// Every end after this revision is in `ends`.
    covered_after: u64,
    ends: VecDeque<FleetTaskRow>,
}

/// What [`TaskIndex::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// The task was new: recorded now, owned by the caller.
    New(FleetTaskRow),
    /// The task was known: as stored (its owner may be another node, and
    /// it may have ended).
    Known(FleetTaskRow),
    /// The task was new, and its node has this many tasks in the index,
    /// its quota: not recorded.
    OverQuota(u64),
}

// === impl TaskIndex ===

impl TaskIndex {
    /// The index over `store`, starting after the latest end stored: ends
    /// before it are read from the store when a node asks for them.
    pub async fn open(
        store: Arc<dyn ServerStore>,
        trust_domain: TrustDomain,
        audit: AuditLog,
    ) -> Result<Self, ServerStoreError> {
        let latest = store.fleet_task_ends_revision().await?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                trust_domain,
                audit,
                recent: Mutex::new(Recent {
                    covered_after: latest,
                    ends: VecDeque::new(),
                }),
                latest: watch::channel(latest).0,
                poll_now: Notify::new(),
                last_poll: Mutex::new(Some(Instant::now())),
            }),
        })
    }

    /// Records `task` as it gets its first token, unless it is known; a
    /// new task of a node that has `max_per_node` tasks in the index
    /// already is not recorded ([`Begun::OverQuota`]).
    pub async fn begin(
        &self,
        mut task: NewFleetTask,
        max_per_node: u64,
    ) -> Result<Begun, ServerStoreError> {
        let store = &self.inner.store;
        // Most calls are renewals of a known task: one lookup by id, and
        // the node's count only for a task that is new.
        if let Some(row) = store.fleet_task(task.txn.clone()).await? {
            return Ok(Begun::Known(row));
        }
        let count = store.fleet_tasks_of(task.owner_node.clone()).await?;
        if count >= max_per_node {
            return Ok(Begun::OverQuota(count));
        }
        // The store keeps milliseconds: what it reads back must compare
        // equal to what was asked for, or a new task looks known.
        task.began_at = whole_millis(task.began_at);
        let asked = task.clone();
        let row = self.inner.store.begin_fleet_task(task).await?;
        let new = row.owner_node == asked.owner_node
            && row.began_at == asked.began_at
            && row.ended.is_none()
            && row.spiffe_id == asked.spiffe_id;
        Ok(if new {
            Begun::New(row)
        } else {
            Begun::Known(row)
        })
    }

    /// The task `txn`.
    pub async fn get(&self, txn: &str) -> Result<Option<FleetTaskRow>, ServerStoreError> {
        self.inner.store.fleet_task(txn.to_owned()).await
    }

    /// At most `limit` tasks, newest first.
    pub async fn list(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> Result<Vec<FleetTaskRow>, ServerStoreError> {
        self.inner.store.fleet_tasks(include_ended, limit).await
    }

    /// Ends the tasks of `ends` that are live (and `owner`'s, when given);
    /// returns each as this call ended it (`None`: not ended by it), and
    /// has the poll pick them up at once.
    pub async fn end(
        &self,
        ends: Vec<FleetTaskEndRequest>,
        owner: Option<NodeName>,
    ) -> Result<Vec<Option<FleetTaskRow>>, ServerStoreError> {
        let ended = self.inner.store.end_fleet_tasks(ends, owner).await?;
        if ended.iter().any(Option::is_some) {
            self.inner.poll_now.notify_one();
        }
        Ok(ended)
    }

    /// Wakes when the latest end revision this replica has seen grows.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.latest.subscribe()
    }

    /// The latest end revision this replica has seen.
    pub fn latest(&self) -> u64 {
        *self.inner.latest.borrow()
    }

    /// True while a poll of the store succeeded within [`CURRENT_FOR`]:
    /// only then may a sync stream tell a node it is caught up.
    pub fn is_current(&self) -> bool {
        lock(&self.inner.last_poll).is_some_and(|at| at.elapsed() <= CURRENT_FOR)
    }

    /// Where a node's stream of ends starts, for a node that asks for the
    /// ends after revision `asked`: `asked`, unless it is beyond every end
    /// the store holds. Then the index was reset or restored from an older
    /// copy (a new SQLite file, a restored backup), its revisions start
    /// again below `asked`, and the ends numbered up to `asked` are new to
    /// that node: it gets every end from the start (0). A replica that
    /// has not yet polled an end another replica stored is no reason: the
    /// store, not this replica's view, decides.
    pub async fn resume_after(&self, asked: u64) -> Result<u64, ServerStoreError> {
        if asked <= self.latest() {
            return Ok(asked);
        }
        let stored = self.inner.store.fleet_task_ends_revision().await?;
        if asked <= stored {
            return Ok(asked);
        }
        tracing::warn!(
            asked,
            stored,
            "a node asks for task ends after a revision the fleet's task index never reached (was it reset or restored?); sending it every end"
        );
        Ok(0)
    }

    /// At most [`PAGE`] ends after revision `after`, in order: from memory
    /// when it holds them, else from the store.
    pub async fn ends_after(&self, after: u64) -> Result<Vec<FleetTaskRow>, ServerStoreError> {
        {
            let recent = lock(&self.inner.recent);
            if after >= recent.covered_after {
                let first = recent.ends.partition_point(|e| revision(e) <= after);
                return Ok(recent
                    .ends
                    .range(first..)
                    .take(PAGE as usize)
                    .cloned()
                    .collect());
            }
        }
        self.inner.store.fleet_task_ends(after, PAGE).await
    }

    /// Polls the store for new ends until `stop`, and forgets tasks past
    /// their deadline.
    pub async fn run(self, stop: CancellationToken) {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            match self.poll().await {
                Ok(()) => {
                    *lock(&self.inner.last_poll) = Some(Instant::now());
                    if failing {
                        tracing::info!("reading the fleet's task ends works again");
                        failing = false;
                    }
                }
                Err(error) => {
                    if !failing {
                        tracing::error!(error = %Chain(&error), "cannot read the fleet's task ends; nodes will refuse other nodes' tasks until this works");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.poll_now.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                _ = prune.tick() => self.prune().await,
            }
        }
    }

    /// Reads every end after the latest seen, into the ring, and records
    /// that this replica sends each to its nodes.
    async fn poll(&self) -> Result<(), ServerStoreError> {
        loop {
            let after = self.latest();
            let page = self.inner.store.fleet_task_ends(after, PAGE).await?;
            let Some(last) = page.last().map(revision) else {
                return Ok(());
            };
            let full = page.len() == PAGE as usize;
            for row in &page {
                self.record_fan_out(row);
            }
            {
                let mut recent = lock(&self.inner.recent);
                recent.ends.extend(page);
                while recent.ends.len() > RING {
                    if let Some(oldest) = recent.ends.pop_front() {
                        recent.covered_after = revision(&oldest);
                    }
                }
            }
            self.inner.latest.send_replace(last);
            if !full {
                return Ok(());
            }
        }
    }

    fn record_fan_out(&self, row: &FleetTaskRow) {
        let Some(end) = &row.ended else { return };
        if let Err(error) = self.inner.audit.record(AuditEvent {
            spiffe_id: Some(row.spiffe_id.clone()),
            task_id: Some(row.txn.clone()),
            node: node_spiffe_id(&self.inner.trust_domain, &row.owner_node)
                .ok()
                .map(|id| id.to_string()),
            reason: Some(format!(
                "{} (end {}): sent to every node's sync stream on this replica",
                end.reason, end.revision
            )),
            ..AuditEvent::new(EventKind::TaskFanOut, Outcome::Info)
        }) {
            // The end is stored and sent; only this replica's record of
            // sending it is lost.
            tracing::error!(task_id = %row.txn, error = %Chain(&error), "could not record a task end's fan-out");
        }
    }

    async fn prune(&self) {
        let before = SystemTime::now()
            .checked_sub(PRUNE_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match self.inner.store.prune_fleet_tasks(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(tasks = n, "forgot tasks past their deadline"),
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "could not forget tasks past their deadline")
            }
        }
    }
}

/// `t` to the millisecond below.
fn whole_millis(t: SystemTime) -> SystemTime {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(SystemTime::UNIX_EPOCH, |d| {
            SystemTime::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
}

/// An ended task's end revision (0 for a live one, which the ring never
/// holds).
fn revision(row: &FleetTaskRow) -> u64 {
    row.ended.as_ref().map_or(0, |e| e.revision)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::{AuditConfig, SigningKey};
    use crate::server::store::sqlite::SqliteStore;

    const QUOTA: u64 = 1000;

    fn audit(dir: &Path) -> AuditLog {
        let (log, writer) = AuditLog::open(
            dir,
            &AuditConfig::default(),
            Arc::new(SigningKey::generate().expect("a signing key").0),
        )
        .expect("the audit trail opens");
        tokio::spawn(writer.run(CancellationToken::new()));
        log
    }

    fn task(txn: &str, node: &str) -> NewFleetTask {
        NewFleetTask {
            txn: txn.into(),
            owner_node: NodeName::new(node).expect("a node name"),
            spiffe_id: "spiffe://example.org/w".into(),
            began_at: SystemTime::now(),
            deadline: SystemTime::now() + Duration::from_secs(600),
        }
    }

    fn end(txn: &str) -> FleetTaskEndRequest {
        FleetTaskEndRequest {
            txn: txn.into(),
            reason: "completed".into(),
            at: SystemTime::now(),
        }
    }

    fn txns(rows: &[FleetTaskRow]) -> Vec<&str> {
        rows.iter().map(|r| r.txn.as_str()).collect()
    }

    #[tokio::test]
    async fn ends_come_in_revision_order_from_memory_or_the_store() {
        let dir = tempfile::tempdir().expect("a tempdir");
        let store: Arc<dyn ServerStore> =
            Arc::new(SqliteStore::open(&dir.path().join("server.db")).expect("the store"));
        let td = TrustDomain::new("example.org").expect("td");
        // Two ends before this replica starts: only in the store.
        for txn in ["t1", "t2", "t3", "t4"] {
            store
                .begin_fleet_task(task(txn, "node-a"))
                .await
                .expect("begin");
        }
        store
            .end_fleet_tasks(vec![end("t1"), end("t2")], None)
            .await
            .expect("end");
        let index = TaskIndex::open(store.clone(), td, audit(&dir.path().join("audit")))
            .await
            .expect("the index opens");
        assert_eq!(index.latest(), 2);

        // The first begin of a task is new (its time read back to the
        // millisecond); a second one, from any node, finds it known.
        assert!(matches!(
            index
                .begin(task("t5", "node-a"), QUOTA)
                .await
                .expect("begin"),
            Begun::New(_)
        ));
        let Begun::Known(row) = index
            .begin(task("t5", "node-b"), QUOTA)
            .await
            .expect("again")
        else {
            panic!("a second begin is not new");
        };
        assert_eq!(row.owner_node.as_str(), "node-a");
        // node-a has 5 tasks: at a quota of 5 a new one is refused, its
        // known ones are not, and node-b is not held to node-a's count.
        assert_eq!(
            index.begin(task("t6", "node-a"), 5).await.expect("over"),
            Begun::OverQuota(5)
        );
        assert!(matches!(
            index.begin(task("t5", "node-a"), 5).await.expect("renew"),
            Begun::Known(_)
        ));
        assert!(matches!(
            index
                .begin(task("t7", "node-b"), 5)
                .await
                .expect("other node"),
            Begun::New(_)
        ));

        // Ends after this replica started come from the ring once polled.
        let ended = index
            .end(
                vec![end("t3"), end("t4"), end("t3")],
                Some(row.owner_node.clone()),
            )
            .await
            .expect("end");
        assert_eq!(ended.iter().filter(|e| e.is_some()).count(), 2, "t3 once");
        index.poll().await.expect("poll");
        assert_eq!(index.latest(), 4);
        assert!(index.is_current());
        assert_eq!(
            txns(&index.ends_after(2).await.expect("ring")),
            ["t3", "t4"]
        );
        assert_eq!(txns(&index.ends_after(3).await.expect("ring")), ["t4"]);
        assert!(index.ends_after(4).await.expect("none").is_empty());
        // Before the ring: from the store, in order.
        assert_eq!(
            txns(&index.ends_after(0).await.expect("store")),
            ["t1", "t2", "t3", "t4"]
        );
        // A node that asks past every stored end (a reset index) starts
        // again from the first.
        assert_eq!(index.resume_after(99).await.expect("resume"), 0);
        assert_eq!(index.resume_after(3).await.expect("resume"), 3);
    }
}
