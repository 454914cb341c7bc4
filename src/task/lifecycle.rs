//! The task lifecycle loop: the single owner of task ends that nobody asked
//! for. It ends a task the moment its owner process exits (a pidfd per
//! owner, event-driven: no polling), when its deadline passes, or when the
//! registration entry it was begun under is removed; and it prunes tasks
//! whose tokens have all expired.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use super::{EndReason, Task, Tasks};
use crate::attestation::ProcessKey;
use crate::registration::Registry;

/// How often ended tasks past their deadline are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Longest sleep without looking at the clock (a clock jump is noticed).
const MAX_SLEEP: Duration = Duration::from_secs(30);

impl Tasks {
    /// Runs until `cancel`.
    pub async fn run_lifecycle(
        self,
        registry: Registry,
        inbox: super::OwnerInbox,
        cancel: CancellationToken,
    ) {
        let super::OwnerInbox(mut owners) = inbox;
        // One exit watch per owner process (not per task): a process that
        // begins and ends many tasks costs one future.
        let mut exits = FuturesUnordered::new();
        let mut watched: HashSet<ProcessKey> = HashSet::new();
        let mut deadlines: BinaryHeap<Reverse<(SystemTime, String)>> = BinaryHeap::new();
        let mut entries = registry.subscribe();
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            let now = SystemTime::now();
            // End every task whose deadline has passed.
            while let Some(Reverse((deadline, _))) = deadlines.peek()
                && *deadline <= now
            {
                if let Some(Reverse((_, id))) = deadlines.pop()
                    && let Some(task) = self.get(&id)
                {
                    self.end_quietly(&task, EndReason::Deadline).await;
                }
            }
            let wait = deadlines
                .peek()
                .and_then(|Reverse((d, _))| d.duration_since(now).ok())
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                Some((task, caller)) = owners.recv() => {
                    deadlines.push(Reverse((task.deadline, task.id.clone())));
                    let owner = task.owner.process;
                    if watched.insert(owner) {
                        exits.push(async move {
                            caller.exited().await;
                            owner
                        });
                    }
                }
                Some(owner) = exits.next() => {
                    watched.remove(&owner);
                    // Ended together, so their ends share one commit.
                    let tasks = self.active_of(owner);
                    futures_util::future::join_all(
                        tasks.iter().map(|task| self.end_quietly(task, EndReason::OwnerExited)),
                    )
                    .await;
                }
                Ok(()) = entries.changed() => {
                    let snapshot = entries.borrow_and_update().clone();
                    for task in self.list(false) {
                        if snapshot.get(&task.entry_id).is_none() {
                            self.end_quietly(&task, EndReason::EntryRemoved).await;
                        }
                    }
                }
                _ = prune.tick() => {
                    if let Err(error) = self.prune().await {
                        tracing::warn!(error = %crate::error::Chain(&error), "could not prune ended tasks");
                    }
                }
            }
        }
    }

    async fn end_quietly(&self, task: &Arc<Task>, reason: EndReason) {
        if let Err(error) = self.finish(task, reason).await {
            // The end is not stored: keep the task refused in memory anyway
            // (fail closed), and say so.
            tracing::error!(task_id = %task.id, %reason, error = %crate::error::Chain(&error), "could not store the end of a task; refusing its tokens until restart");
            let now = SystemTime::now();
            if self.mark_ended(task, reason, now) {
                // Refused across the fleet too: fail closed everywhere.
                self.report(task, reason, now);
            }
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }
}
