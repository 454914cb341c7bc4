//! A task in the store: the row it is written as at begin, and loading the
//! rows back after a restart. Ended tasks stay ended; an active one whose
//! owner process is gone is ended, and stored so, during the restore; one
//! whose deadline has passed is not loaded at all (its tokens have expired,
//! and a token signed here for a task unknown here is refused). A restart
//! never resurrects a token.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use spiffe::SpiffeId;

use super::{EndReason, Owner, Task, TaskError, TaskState, Tasks};
use crate::attestation::{Caller, ProcessKey};
use crate::registration::EntryId;
use crate::store::{TaskEnd, TaskRow};
use crate::telemetry::metrics::metrics;

// === impl Task ===

impl Task {
    pub(super) fn row(&self) -> TaskRow {
        TaskRow {
            id: self.id.clone(),
            owner_pid: self.owner.process.pid(),
            owner_start_time: self.owner.process.start_time(),
            owner_uid: self.owner.uid,
            owner_executable: self
                .owner
                .executable
                .as_ref()
                .map(|p| p.display().to_string()),
            owner_exe_sha256: self.owner.exe_sha256.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            entry_id: self.entry_id.to_string(),
            audience: self.audience.clone(),
            intent: self.intent.clone(),
            tools: self.tools.clone(),
            bind_x5t: self.bind_x5t.clone(),
            created_at: self.created_at,
            deadline: self.deadline,
            ended: None,
            tokens_issued: 0,
            scope_descendants: self.scope_descendants,
        }
    }

    pub(super) fn from_row(row: TaskRow) -> Option<Self> {
        let spiffe_id = SpiffeId::new(&row.spiffe_id).ok()?;
        let entry_id = EntryId::parse(&row.entry_id).ok()?;
        let ended = row
            .ended
            .as_ref()
            .map(|end| (EndReason::parse(&end.reason), end.at));
        Some(Self {
            id: row.id,
            owner: Owner {
                process: ProcessKey::new(row.owner_pid, row.owner_start_time),
                uid: row.owner_uid,
                executable: row.owner_executable.map(PathBuf::from),
                exe_sha256: row.owner_exe_sha256,
            },
            spiffe_id,
            entry_id,
            audience: row.audience,
            intent: row.intent,
            tools: row.tools,
            bind_x5t: row.bind_x5t,
            scope_descendants: row.scope_descendants,
            created_at: row.created_at,
            deadline: row.deadline,
            state: Mutex::new(TaskState {
                ended,
                tokens_issued: row.tokens_issued,
            }),
        })
    }
}

// === impl Tasks ===

impl Tasks {
    /// Loads the tasks a previous run left whose deadline is still ahead
    /// (blocking). Ended ones stay ended; active ones whose owner is gone
    /// are ended now; the others are watched again (a task whose deadline
    /// passed while the agent was down is not loaded: its tokens have all
    /// expired). Returns how many are watched.
    pub fn restore(&self) -> Result<usize, TaskError> {
        let now = SystemTime::now();
        let rows = self.inner.store.tasks_until(now)?;
        let mut ends = Vec::new();
        let mut watched = 0;
        for row in rows {
            let id = row.id.clone();
            let Some(task) = Task::from_row(row) else {
                tracing::warn!(task_id = %id, "stored task does not decode; treating it as revoked");
                continue;
            };
            let task = Arc::new(task);
            if task.ended().is_none() {
                // The store returned only tasks whose deadline is ahead.
                let reason = match Caller::reattach(
                    task.owner.process.pid(),
                    task.owner.uid,
                    0,
                    task.owner.process.start_time(),
                ) {
                    Ok(caller) => {
                        watched += 1;
                        self.active().activate(&task, false);
                        metrics().tasks_active.inc();
                        let _ = self.inner.owners.send((Arc::clone(&task), caller));
                        None
                    }
                    Err(_) => Some(EndReason::OwnerExited),
                };
                if let Some(reason) = reason {
                    task.state().ended = Some((reason, now));
                    ends.push((
                        task.id.clone(),
                        TaskEnd {
                            at: now,
                            reason: reason.as_str().into(),
                        },
                        task.tokens_issued(),
                    ));
                    tracing::info!(task_id = %task.id, %reason, "task ended while the agent was down");
                }
            }
            self.tasks().insert(task.id.clone(), task);
        }
        if !ends.is_empty() {
            self.inner.store.end_tasks(&ends)?;
            // Stored: now the fleet may hear of them (if the link already
            // listens; otherwise `ended_tasks` lists them).
            for (id, _, _) in &ends {
                if let Some(task) = self.get(id)
                    && let Some((reason, at)) = task.ended()
                {
                    self.report(&task, reason, at);
                }
            }
        }
        Ok(watched)
    }
}
