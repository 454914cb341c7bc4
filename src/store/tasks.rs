//! Tasks: stored as they begin, ended once (the first end wins), listed
//! until their deadline and pruned after it. Batches are one transaction.

use std::time::SystemTime;

use rusqlite::TransactionBehavior;

use super::rows::{self, EncodedEnd, EncodedTask, TASKS, TaskEnd, TaskRow};
use super::{Store, StoreError, query_millis, quote, unstorable};

// === impl Store ===

impl Store {
    /// Stores a task as it begins. [`StoreError::Duplicate`] when its id is
    /// taken (by an active or an ended task); [`StoreError::Unstorable`] when
    /// `row.ended` is set: an end is recorded by [`Store::end_task`] only.
    pub fn insert_task(&self, row: &TaskRow) -> Result<(), StoreError> {
        self.insert_tasks(std::slice::from_ref(row))
    }

    /// [`Store::insert_task`] for several tasks, in one transaction (one
    /// sync): either all are stored or, on any refusal (including two rows
    /// with the same id), none is.
    pub fn insert_tasks(&self, rows: &[TaskRow]) -> Result<(), StoreError> {
        let encoded = rows
            .iter()
            .map(|row| EncodedTask::new(row).map_err(|p| unstorable(TASKS, &row.id, p)))
            .collect::<Result<Vec<_>, _>>()?;
        if encoded.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO tasks (id, owner_pid, owner_start_time, owner_uid, \
                     owner_executable, owner_exe_sha256, spiffe_id, entry_id, audience, intent, \
                     tools, bind_x5t, created_at_ms, deadline_ms, ended_at_ms, end_reason, \
                     tokens_issued, scope_descendants) VALUES (:id, :owner_pid, \
                     :owner_start_time, :owner_uid, :owner_executable, :owner_exe_sha256, \
                     :spiffe_id, :entry_id, :audience, :intent, :tools, :bind_x5t, \
                     :created_at_ms, :deadline_ms, NULL, NULL, :tokens_issued, \
                     :scope_descendants)",
                )
                .map_err(self.sql())?;
            for task in &encoded {
                stmt.execute(task_params(task).as_slice())
                    .map_err(self.write_error(|| format!("task {}", quote(task.id))))?;
            }
        }
        // Dropping `tx` on an error above rolls the whole batch back.
        tx.commit().map_err(self.sql())
    }

    /// Records the end of task `id` with the number of tokens it issued.
    /// The first end wins: `Ok(false)`, changing nothing, when the task has
    /// already ended (it keeps its first time, reason and count) or is not
    /// stored; `Ok(true)` when this call ended it.
    pub fn end_task(
        &self,
        id: &str,
        end: &TaskEnd,
        tokens_issued: u64,
    ) -> Result<bool, StoreError> {
        let encoded =
            EncodedEnd::new(id, end, tokens_issued).map_err(|p| unstorable(TASKS, id, p))?;
        let changed = self.execute(END_TASK_SQL, end_params(&encoded).as_slice())?;
        Ok(changed > 0)
    }

    /// [`Store::end_task`] for several tasks, in one transaction (one sync):
    /// all the ends are recorded or, on an error, none. Returns how many
    /// tasks this call ended; an id ended already, absent, or repeated in
    /// `ends` (the first of the batch wins) does not count.
    pub fn end_tasks(&self, ends: &[(String, TaskEnd, u64)]) -> Result<usize, StoreError> {
        let encoded = ends
            .iter()
            .map(|(id, end, tokens)| {
                EncodedEnd::new(id, end, *tokens).map_err(|p| unstorable(TASKS, id, p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if encoded.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        let mut changed = 0;
        {
            let mut stmt = tx.prepare(END_TASK_SQL).map_err(self.sql())?;
            for end in &encoded {
                changed += stmt
                    .execute(end_params(end).as_slice())
                    .map_err(self.sql())?;
            }
        }
        tx.commit().map_err(self.sql())?;
        Ok(changed)
    }

    /// The stored task with this id, active or ended.
    pub fn task(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        // At most one: `id` is the primary key.
        Ok(self.select(&rows::TASK, "WHERE id = ?1", [id])?.pop())
    }

    /// Every task whose deadline is after `now`, active or ended: what a
    /// restart must know, since tokens of such a task may still be presented
    /// and an ended one's must stay refused. Oldest `created_at` first (ties
    /// by id).
    pub fn tasks_until(&self, now: SystemTime) -> Result<Vec<TaskRow>, StoreError> {
        self.select(
            &rows::TASK,
            "WHERE deadline_ms > ?1 ORDER BY created_at_ms, id",
            [query_millis(now)],
        )
    }

    /// Deletes tasks, active or ended, whose deadline is before `before`;
    /// returns how many. Past its deadline a task's tokens have all expired,
    /// so its end no longer needs remembering.
    pub fn prune_tasks(&self, before: SystemTime) -> Result<usize, StoreError> {
        self.execute(
            "DELETE FROM tasks WHERE deadline_ms < ?1",
            [query_millis(before)],
        )
    }
}

/// Ends an active task; an ended one keeps its first end (the `IS NULL`
/// condition is what makes the first end win).
const END_TASK_SQL: &str = "UPDATE tasks SET ended_at_ms = :ended_at_ms, \
     end_reason = :end_reason, tokens_issued = :tokens_issued \
     WHERE id = :id AND ended_at_ms IS NULL";

fn task_params<'a>(t: &'a EncodedTask<'a>) -> [(&'static str, &'a dyn rusqlite::ToSql); 16] {
    [
        (":id", &t.id),
        (":owner_pid", &t.owner_pid),
        (":owner_start_time", &t.owner_start_time),
        (":owner_uid", &t.owner_uid),
        (":owner_executable", &t.owner_executable),
        (":owner_exe_sha256", &t.owner_exe_sha256),
        (":spiffe_id", &t.spiffe_id),
        (":entry_id", &t.entry_id),
        (":audience", &t.audience),
        (":intent", &t.intent),
        (":tools", &t.tools),
        (":bind_x5t", &t.bind_x5t),
        (":created_at_ms", &t.created_at_ms),
        (":deadline_ms", &t.deadline_ms),
        (":tokens_issued", &t.tokens_issued),
        (":scope_descendants", &t.scope_descendants),
    ]
}

fn end_params<'a>(e: &'a EncodedEnd<'a>) -> [(&'static str, &'a dyn rusqlite::ToSql); 4] {
    [
        (":id", &e.id),
        (":ended_at_ms", &e.ended_at_ms),
        (":end_reason", &e.end_reason),
        (":tokens_issued", &e.tokens_issued),
    ]
}
