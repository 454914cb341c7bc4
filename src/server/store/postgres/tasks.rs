//! The fleet's task index in PostgreSQL: each task method of
//! [`ServerStore`](super::super::ServerStore) as the shared statements
//! (`store::sql`) it runs on one connection, and the transactions that
//! keep the trait's invariants across replicas.
//!
//! - A begin inserts with `ON CONFLICT (txn) DO NOTHING` (a racing begin
//!   on another replica waits for the first insert to commit, then does
//!   nothing) and reads the row back in the same transaction: the first
//!   begin's row is what every begin returns.
//! - An end transaction first locks the counter's row
//!   (`fleet_task_end_revision`, a no-op update) and holds it until it
//!   commits: ends on every replica take revisions one transaction after
//!   the other and commit in revision order, so a reader never sees
//!   revision N+1 committed before N. Each task is ended by
//!   `UPDATE … WHERE ended_at_ms IS NULL` (a second end matches nothing),
//!   and only an end made takes a revision; the counter is moved once, to
//!   the last one taken.
//! - Lock order is the counter, then task rows; begins and prunes never
//!   take the counter, so no two of these transactions wait on each other
//!   in a cycle.

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::Fail;
use crate::server::scope::NodeName;
use crate::server::store::rows::{self, EncodedNewFleetTask};
use crate::server::store::{
    FleetTaskEndRequest, FleetTaskRow, MAX_TASKS_PER_READ, NewFleetTask, ServerStoreError, sql,
};

/// How often a begin inserts and reads back before giving up: a second
/// attempt is needed only when another replica pruned the row in between.
const BEGIN_ATTEMPTS: usize = 3;

/// Records `task` unless its id is taken; the stored row either way.
pub(super) async fn begin(client: &mut Client, task: NewFleetTask) -> Result<FleetTaskRow, Fail> {
    let t = EncodedNewFleetTask::new(&task)?;
    let params: [&(dyn ToSql + Sync); 5] = [
        &t.txn,
        &t.owner_node,
        &t.spiffe_id,
        &t.began_at_ms,
        &t.deadline_ms,
    ];
    let tx = client.transaction().await?;
    for _ in 0..BEGIN_ATTEMPTS {
        tx.execute(sql::INSERT_FLEET_TASK, &params).await?;
        // Read committed: this statement sees the row this transaction
        // inserted, or the one whose commit the insert waited for.
        if let Some(row) = tx.query_opt(sql::SELECT_FLEET_TASK, &[&t.txn]).await? {
            let stored = rows::decode_fleet_task(&row)?;
            tx.commit().await?;
            return Ok(stored);
        }
    }
    Err(ServerStoreError::Unavailable {
        what: "recording a fleet task",
        source: format!(
            "task {:?} was pruned by another replica each time it was recorded",
            t.txn
        )
        .into(),
    }
    .into())
}

/// The task `txn`, if any.
pub(super) async fn task(client: &mut Client, txn: String) -> Result<Option<FleetTaskRow>, Fail> {
    let Ok(txn) = rows::fleet_txn(&txn) else {
        return Ok(None);
    };
    match client.query_opt(sql::SELECT_FLEET_TASK, &[&txn]).await? {
        Some(row) => Ok(Some(rows::decode_fleet_task(&row)?)),
        None => Ok(None),
    }
}

/// At most `limit` tasks, newest first; ended ones when `include_ended`.
pub(super) async fn tasks(
    client: &mut Client,
    include_ended: bool,
    limit: u32,
) -> Result<Vec<FleetTaskRow>, Fail> {
    let statement = if include_ended {
        sql::SELECT_FLEET_TASKS
    } else {
        sql::SELECT_LIVE_FLEET_TASKS
    };
    let found = client.query(statement, &[&rows::read_limit(limit)]).await?;
    Ok(found
        .iter()
        .map(rows::decode_fleet_task)
        .collect::<Result<_, _>>()?)
}

/// Ends each live task of `ends` (of `owner`, when given) in one
/// transaction, each at the next revision, under the counter's row lock.
pub(super) async fn end(
    client: &mut Client,
    ends: Vec<FleetTaskEndRequest>,
    owner: Option<NodeName>,
) -> Result<Vec<Option<FleetTaskRow>>, Fail> {
    let encoded = rows::encode_fleet_task_ends(&ends)?;
    let tx = client.transaction().await?;
    // Waits for another replica's ending transaction to commit, then reads
    // the revision it left.
    let mut latest =
        read_end_revision(tx.query_opt(sql::LOCK_FLEET_TASK_END_REVISION, &[]).await?)?;
    let statement = match owner {
        Some(_) => sql::END_OWNED_FLEET_TASK,
        None => sql::END_FLEET_TASK,
    };
    let stmt = tx.prepare(statement).await?;
    let owner = owner.as_ref().map(NodeName::as_str);
    // The counter's new value, once an end took a revision.
    let mut moved_to = None;
    let mut ended = Vec::with_capacity(encoded.len());
    for end in &encoded {
        let (next, next_column) = rows::next_end_revision(latest)?;
        let row = match &owner {
            Some(owner) => {
                let params: [&(dyn ToSql + Sync); 5] =
                    [&end.reason, &end.at_ms, &next_column, &end.txn, owner];
                tx.query_opt(&stmt, &params).await?
            }
            None => {
                let params: [&(dyn ToSql + Sync); 4] =
                    [&end.reason, &end.at_ms, &next_column, &end.txn];
                tx.query_opt(&stmt, &params).await?
            }
        };
        let row = match row {
            Some(row) => {
                latest = next;
                moved_to = Some(next_column);
                Some(rows::decode_fleet_task(&row)?)
            }
            None => None,
        };
        ended.push(row);
    }
    if let Some(latest) = moved_to
        && tx
            .execute(sql::SET_FLEET_TASK_END_REVISION, &[&latest])
            .await?
            != 1
    {
        return Err(rows::missing_end_revision().into());
    }
    tx.commit().await?;
    Ok(ended)
}

/// At most `limit` ended tasks after revision `after`, in revision order.
pub(super) async fn ends(
    client: &mut Client,
    after: u64,
    limit: u32,
) -> Result<Vec<FleetTaskRow>, Fail> {
    let params: [&(dyn ToSql + Sync); 2] = [&rows::revision_bound(after), &rows::read_limit(limit)];
    let found = client.query(sql::SELECT_FLEET_TASK_ENDS, &params).await?;
    Ok(found
        .iter()
        .map(rows::decode_fleet_task)
        .collect::<Result<_, _>>()?)
}

/// The latest end's revision.
pub(super) async fn ends_revision(client: &mut Client) -> Result<u64, Fail> {
    Ok(read_end_revision(
        client
            .query_opt(sql::SELECT_FLEET_TASK_END_REVISION, &[])
            .await?,
    )?)
}

/// The ids of at most `limit` live tasks of `owner`.
pub(super) async fn live_of(
    client: &mut Client,
    owner: &NodeName,
    limit: u32,
) -> Result<Vec<String>, Fail> {
    let limit = i64::from(limit.min(MAX_TASKS_PER_READ));
    Ok(client
        .query(sql::SELECT_LIVE_FLEET_TASKS_OF, &[&owner.as_str(), &limit])
        .await?
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect())
}

/// How many tasks `owner` has in the index.
pub(super) async fn count_of(client: &mut Client, owner: &NodeName) -> Result<u64, Fail> {
    let count: i64 = client
        .query_one(sql::COUNT_FLEET_TASKS_OF, &[&owner.as_str()])
        .await?
        .get(0);
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Forgets tasks whose deadline is before `before`.
pub(super) async fn prune(client: &mut Client, before: std::time::SystemTime) -> Result<u64, Fail> {
    let before_ms = crate::store::query_millis(before);
    Ok(client
        .execute(sql::PRUNE_FLEET_TASKS, &[&before_ms])
        .await?)
}

/// The counter's one row, checked: a missing one is damage.
fn read_end_revision(row: Option<tokio_postgres::Row>) -> Result<u64, ServerStoreError> {
    match row {
        Some(row) => rows::decode_end_revision_row(&row),
        None => Err(rows::missing_end_revision()),
    }
}
