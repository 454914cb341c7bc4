//! This agent's task ends, for the fleet: in fleet mode the link reports
//! every end of a task of this node to the tether server, which fans it out
//! to the other nodes. [`Tasks::report_ends`] installs the channel the ends
//! go to as they happen; [`Tasks::ended_tasks`] lists the ones whose tokens
//! may still be alive (what the link sends again after a restart or a
//! reconnect: the server keeps the first end of a task, so repeats are
//! harmless).
//!
//! An end is reported after it is stored here (a restart never makes it
//! live again locally), for every reason, ends found at restore included.
//! An end the store could not take is still enforced in memory, and
//! reported too: the fleet refuses the task as this agent does (fail
//! closed). Before [`Tasks::report_ends`] is called, nothing is queued.

use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::foreign::SKEW_MARGIN;
use super::{EndReason, Task, Tasks};

/// An end of one of this agent's tasks, for the tether server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEnd {
    /// The task (`txn`).
    pub txn: String,
    /// Why it ended.
    pub reason: EndReason,
    /// When it ended.
    pub at: SystemTime,
    /// Its deadline: every token of it has expired by then.
    pub deadline: SystemTime,
}

// === impl Tasks ===

impl Tasks {
    /// The ends of this agent's tasks from now on, as they are stored. A
    /// second call replaces the first channel (the first receiver then
    /// sees the channel close).
    pub fn report_ends(&self) -> mpsc::UnboundedReceiver<LocalEnd> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self
            .inner
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Every ended task whose deadline is still ahead (with the clock-skew
    /// margin, [`SKEW_MARGIN`]): those whose tokens may still be alive
    /// somewhere, and those ended at their deadline, which the fleet's
    /// index should still hear of.
    pub fn ended_tasks(&self) -> Vec<LocalEnd> {
        let now = SystemTime::now();
        let mut ends: Vec<LocalEnd> = self
            .tasks()
            .values()
            .filter(|task| task.deadline + SKEW_MARGIN > now)
            .filter_map(|task| {
                let (reason, at) = task.ended()?;
                Some(LocalEnd {
                    txn: task.id.clone(),
                    reason,
                    at,
                    deadline: task.deadline,
                })
            })
            .collect();
        ends.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.txn.cmp(&b.txn)));
        ends
    }

    /// Tells the fleet link (if one listens) that `task` ended.
    pub(super) fn report(&self, task: &Arc<Task>, reason: EndReason, at: SystemTime) {
        self.report_end(LocalEnd {
            txn: task.id.clone(),
            reason,
            at,
            deadline: task.deadline,
        });
    }

    pub(super) fn report_end(&self, end: LocalEnd) {
        let mut reports = self
            .inner
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = reports.as_ref()
            && tx.send(end).is_err()
        {
            // The link is gone; what it missed, `ended_tasks` lists.
            *reports = None;
        }
    }
}
