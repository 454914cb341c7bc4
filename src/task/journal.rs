//! Group commit for task rows: begins and ends that arrive together share
//! one transaction, and so one sync of the write-ahead log.
//!
//! A begin must be stored before its first token leaves, and an end before
//! it is published; each of those is a synchronous SQLite commit, which on
//! a busy node costs more than the token. So writes queue here, and one
//! writer per kind takes everything waiting, stores it in one transaction
//! ([`Store::insert_tasks`], [`Store::end_tasks`]) and only then answers
//! each caller. The guarantee is unchanged: a caller hears "stored" only
//! after the commit that holds its row. A batch the store refuses is
//! written again row by row, so one bad row fails only its own caller.
//!
//! Begins and ends have separate writers: an end never shares a batch with
//! its own begin, since the begin is acknowledged before its task id is
//! known to anyone who could end it.

use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, StoreError, TaskEnd, TaskRow};

/// Most rows in one transaction: bounds the time a batch holds the store.
const MAX_BATCH: usize = 256;

/// Requests waiting for a writer; a full queue makes callers wait.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// Why a row was not stored.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer is gone (the runtime is shutting down).
    #[error("the task store writer has stopped")]
    Closed,
}

/// Handles to the two writers; cheap to clone.
#[derive(Debug, Clone)]
pub struct Journal {
    begins: mpsc::Sender<(TaskRow, Reply)>,
    ends: mpsc::Sender<((String, TaskEnd, u64), Reply)>,
}

// === impl Journal ===

impl Journal {
    /// Starts the writers on the current tokio runtime.
    pub fn start(store: &Store) -> Self {
        let (begins, begin_rx) = mpsc::channel(QUEUE);
        let (ends, end_rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store.clone(), begin_rx, |store, rows| {
            store.insert_tasks(rows)
        }));
        tokio::spawn(write_batches(store.clone(), end_rx, |store, ends| {
            store.end_tasks(ends).map(drop)
        }));
        Self { begins, ends }
    }

    /// Stores a task as it begins; returns once it is committed.
    pub async fn begin(&self, row: TaskRow) -> Result<(), JournalError> {
        submit(&self.begins, row).await
    }

    /// Records a task's end (the first end wins, as in [`Store::end_task`]);
    /// returns once it is committed.
    pub async fn end(
        &self,
        id: String,
        end: TaskEnd,
        tokens_issued: u64,
    ) -> Result<(), JournalError> {
        submit(&self.ends, (id, end, tokens_issued)).await
    }
}

async fn submit<T>(queue: &mpsc::Sender<(T, Reply)>, item: T) -> Result<(), JournalError> {
    let (reply, answer) = oneshot::channel();
    queue
        .send((item, reply))
        .await
        .map_err(|_| JournalError::Closed)?;
    answer
        .await
        .map_err(|_| JournalError::Closed)?
        .map_err(JournalError::Store)
}

/// One writer: takes what is waiting (up to [`MAX_BATCH`]), writes it in
/// one transaction on the blocking pool, answers each caller. Ends when
/// every handle is dropped.
async fn write_batches<T: Send + 'static>(
    store: Store,
    mut queue: mpsc::Receiver<(T, Reply)>,
    write: fn(&Store, &[T]) -> Result<(), StoreError>,
) {
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut waiting, MAX_BATCH).await > 0 {
        let (items, replies): (Vec<T>, Vec<Reply>) = waiting.drain(..).unzip();
        let store = store.clone();
        let results = tokio::task::spawn_blocking(move || match write(&store, &items) {
            Ok(()) => items.iter().map(|_| Ok(())).collect(),
            // One row may have spoiled the batch: each on its own, so
            // only that row's caller hears about it.
            Err(error) if items.len() == 1 => vec![Err(error)],
            Err(_) => items
                .iter()
                .map(|item| write(&store, std::slice::from_ref(item)))
                .collect::<Vec<_>>(),
        })
        .await;
        match results {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // A caller that gave up (cancelled) no longer listens.
                    let _ = reply.send(result);
                }
            }
            // The blocking job panicked or the runtime is stopping: the
            // callers' replies drop, and each hears Closed.
            Err(error) => {
                tracing::error!(error = %crate::error::Chain(&error), "task store batch did not complete")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn row(id: &str) -> TaskRow {
        super::super::tests::test_row(id, crate::attestation::ProcessKey::new(4242, 1), false)
    }

    #[tokio::test]
    async fn concurrent_begins_are_all_stored_and_a_bad_row_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let journal = Journal::start(&store);
        let mut writes = Vec::new();
        for i in 0..200 {
            let journal = journal.clone();
            writes.push(tokio::spawn(async move {
                journal.begin(row(&format!("task-{i}"))).await
            }));
        }
        // A duplicate id is refused, in whatever batch it lands.
        let duplicate = {
            let journal = journal.clone();
            tokio::spawn(async move { journal.begin(row("task-7")).await })
        };
        let mut stored = 0;
        for write in writes {
            if write.await.unwrap().is_ok() {
                stored += 1;
            }
        }
        let duplicate = duplicate.await.unwrap();
        // Exactly one of the two writers of task-7 won.
        assert_eq!(stored + usize::from(duplicate.is_ok()), 200);
        for i in 0..200 {
            assert!(store.task(&format!("task-{i}")).unwrap().is_some());
        }

        let end = TaskEnd {
            at: SystemTime::now(),
            reason: "completed".into(),
        };
        journal.end("task-3".into(), end.clone(), 2).await.unwrap();
        let ended = store.task("task-3").unwrap().unwrap();
        assert_eq!(
            ended.ended.as_ref().map(|e| e.reason.as_str()),
            Some("completed")
        );
        // The first end stands.
        let later = TaskEnd {
            reason: "revoked".into(),
            ..end
        };
        journal.end("task-3".into(), later, 5).await.unwrap();
        let ended = store.task("task-3").unwrap().unwrap();
        assert_eq!(
            ended.ended.as_ref().map(|e| e.reason.as_str()),
            Some("completed")
        );
    }
}
