//! The fleet's task index in SQLite: each task method of
//! [`ServerStore`](super::super::ServerStore) as the shared statements
//! (`store::sql`) it runs on the connection, blocking (the caller is on
//! the blocking pool).
//!
//! Every write runs in an `IMMEDIATE` transaction, so it holds the
//! database's write lock from its first statement: a begin's insert and
//! its read back see one state, and an end's revision (read under the lock,
//! moved once at the end of the transaction) cannot be taken twice, also
//! by another connection to the same file. Values are checked by the row
//! codec (`store::rows`) before the transaction opens.

use rusqlite::{Connection, Params, TransactionBehavior, params};

use super::Failed;
use crate::server::scope::NodeName;
use crate::server::store::rows::{self, EncodedNewFleetTask};
use crate::server::store::{
    FleetTaskEndRequest, FleetTaskRow, MAX_TASKS_PER_READ, NewFleetTask, ServerStoreError, sql,
};

/// Records `task` unless its id is taken; the stored row either way.
pub(super) fn begin(
    conn: &mut Connection,
    failed: Failed,
    task: &NewFleetTask,
) -> Result<FleetTaskRow, ServerStoreError> {
    let t = EncodedNewFleetTask::new(task)?;
    let on = failed.on(rows::FLEET_TASKS);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&on)?;
    tx.execute(
        sql::INSERT_FLEET_TASK,
        params![
            t.txn,
            t.owner_node,
            t.spiffe_id,
            t.began_at_ms,
            t.deadline_ms
        ],
    )
    .map_err(&on)?;
    let stored = select(&tx, failed, sql::SELECT_FLEET_TASK, params![t.txn])?;
    tx.commit().map_err(&on)?;
    // Inserted or found under the write lock: it is there.
    stored
        .into_iter()
        .next()
        .ok_or_else(|| ServerStoreError::Corrupt {
            table: rows::FLEET_TASKS,
            detail: format!("task {:?} cannot be read back once recorded", t.txn),
        })
}

/// The task `txn`, if any.
pub(super) fn task(
    conn: &Connection,
    failed: Failed,
    txn: &str,
) -> Result<Option<FleetTaskRow>, ServerStoreError> {
    let Ok(txn) = rows::fleet_txn(txn) else {
        return Ok(None);
    };
    Ok(select(conn, failed, sql::SELECT_FLEET_TASK, params![txn])?
        .into_iter()
        .next())
}

/// At most `limit` tasks, newest first; ended ones when `include_ended`.
pub(super) fn tasks(
    conn: &Connection,
    failed: Failed,
    include_ended: bool,
    limit: u32,
) -> Result<Vec<FleetTaskRow>, ServerStoreError> {
    let statement = if include_ended {
        sql::SELECT_FLEET_TASKS
    } else {
        sql::SELECT_LIVE_FLEET_TASKS
    };
    select(conn, failed, statement, params![rows::read_limit(limit)])
}

/// Ends each live task of `ends` (of `owner`, when given) in one
/// transaction, each at the next revision.
pub(super) fn end(
    conn: &mut Connection,
    failed: Failed,
    ends: &[FleetTaskEndRequest],
    owner: Option<&NodeName>,
) -> Result<Vec<Option<FleetTaskRow>>, ServerStoreError> {
    let encoded = rows::encode_fleet_task_ends(ends)?;
    let on = failed.on(rows::FLEET_TASKS);
    let on_revision = failed.on(rows::FLEET_TASK_END_REVISION);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&on)?;
    let mut latest = read_end_revision(&tx, failed, sql::LOCK_FLEET_TASK_END_REVISION)?;
    // The counter's new value, once an end took a revision.
    let mut moved_to = None;
    let mut ended = Vec::with_capacity(encoded.len());
    {
        let statement = match owner {
            Some(_) => sql::END_OWNED_FLEET_TASK,
            None => sql::END_FLEET_TASK,
        };
        let mut stmt = tx.prepare(statement).map_err(&on)?;
        for end in &encoded {
            let (next, next_column) = rows::next_end_revision(latest)?;
            let mut found = match owner {
                Some(owner) => stmt.query(params![
                    end.reason,
                    end.at_ms,
                    next_column,
                    end.txn,
                    owner.as_str()
                ]),
                None => stmt.query(params![end.reason, end.at_ms, next_column, end.txn]),
            }
            .map_err(&on)?;
            let row = match found.next().map_err(&on)? {
                Some(row) => Some(rows::decode_fleet_task(row)?),
                None => None,
            };
            while found.next().map_err(&on)?.is_some() {}
            if row.is_some() {
                latest = next;
                moved_to = Some(next_column);
            }
            ended.push(row);
        }
    }
    if let Some(latest) = moved_to {
        let moved = tx
            .execute(sql::SET_FLEET_TASK_END_REVISION, params![latest])
            .map_err(&on_revision)?;
        if moved != 1 {
            return Err(rows::missing_end_revision());
        }
    }
    tx.commit().map_err(&on)?;
    Ok(ended)
}

/// At most `limit` ended tasks after revision `after`, in revision order.
pub(super) fn ends(
    conn: &Connection,
    failed: Failed,
    after: u64,
    limit: u32,
) -> Result<Vec<FleetTaskRow>, ServerStoreError> {
    select(
        conn,
        failed,
        sql::SELECT_FLEET_TASK_ENDS,
        params![rows::revision_bound(after), rows::read_limit(limit)],
    )
}

/// The latest end's revision.
pub(super) fn ends_revision(conn: &Connection, failed: Failed) -> Result<u64, ServerStoreError> {
    read_end_revision(conn, failed, sql::SELECT_FLEET_TASK_END_REVISION)
}

/// The ids of at most `limit` live tasks of `owner`.
pub(super) fn live_of(
    conn: &Connection,
    failed: Failed,
    owner: &NodeName,
    limit: u32,
) -> Result<Vec<String>, ServerStoreError> {
    let limit = i64::from(limit.min(MAX_TASKS_PER_READ));
    let mut statement = conn
        .prepare(sql::SELECT_LIVE_FLEET_TASKS_OF)
        .map_err(failed.on(rows::FLEET_TASKS))?;
    let txns = statement
        .query_map(params![owner.as_str(), limit], |row| {
            row.get::<_, String>(0)
        })
        .map_err(failed.on(rows::FLEET_TASKS))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed.on(rows::FLEET_TASKS))?;
    Ok(txns)
}

/// How many tasks `owner` has in the index.
pub(super) fn count_of(
    conn: &Connection,
    failed: Failed,
    owner: &NodeName,
) -> Result<u64, ServerStoreError> {
    let count: i64 = conn
        .query_row(sql::COUNT_FLEET_TASKS_OF, params![owner.as_str()], |row| {
            row.get(0)
        })
        .map_err(failed.on(rows::FLEET_TASKS))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Forgets tasks whose deadline is before `before_ms`.
pub(super) fn prune(
    conn: &Connection,
    failed: Failed,
    before_ms: i64,
) -> Result<u64, ServerStoreError> {
    let removed = conn
        .execute(sql::PRUNE_FLEET_TASKS, params![before_ms])
        .map_err(failed.on(rows::FLEET_TASKS))?;
    Ok(u64::try_from(removed).unwrap_or(u64::MAX))
}

/// The task rows `statement` selects, decoded.
fn select(
    conn: &Connection,
    failed: Failed,
    statement: &str,
    params: impl Params,
) -> Result<Vec<FleetTaskRow>, ServerStoreError> {
    let on = failed.on(rows::FLEET_TASKS);
    let mut stmt = conn.prepare(statement).map_err(&on)?;
    let mut found = stmt.query(params).map_err(&on)?;
    let mut tasks = Vec::new();
    while let Some(row) = found.next().map_err(&on)? {
        tasks.push(rows::decode_fleet_task(row)?);
    }
    Ok(tasks)
}

/// The counter's one row as `statement` (a read, or the locking update)
/// returns it.
fn read_end_revision(
    conn: &Connection,
    failed: Failed,
    statement: &str,
) -> Result<u64, ServerStoreError> {
    let on = failed.on(rows::FLEET_TASK_END_REVISION);
    let mut stmt = conn.prepare(statement).map_err(&on)?;
    let mut found = stmt.query([]).map_err(&on)?;
    let revision = match found.next().map_err(&on)? {
        Some(row) => rows::decode_end_revision_row(row)?,
        None => return Err(rows::missing_end_revision()),
    };
    while found.next().map_err(&on)?.is_some() {}
    Ok(revision)
}

#[cfg(test)]
mod tests;
