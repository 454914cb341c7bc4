//! Each [`ServerStore`](super::super::ServerStore) method as the
//! statements it runs on one connection: the shared statements
//! (`store::sql`), the shared row codec (`store::rows`), and the
//! transactions that keep the trait's invariants across replicas.
//!
//! - A join token is consumed by one `UPDATE … WHERE used_at_ms IS NULL
//!   RETURNING`: of two replicas racing, the second waits for the first's
//!   row lock, re-checks the condition and matches nothing.
//! - An entry change and the revision bump commit in one transaction; the
//!   bump's row lock on `meta` orders concurrent changes, so revisions
//!   never repeat.
//! - The entries and their revision are read in one repeatable-read
//!   snapshot.

use std::time::SystemTime;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, Row};

use super::Fail;
use crate::server::join_token::{Admission, TokenHash};
use crate::server::scope::NodeName;
use crate::server::store::rows::{
    self, Columns, EncodedAdmission, EncodedBundle, EncodedEntry, EncodedNode,
};
use crate::server::store::sql;
use crate::server::store::{EntriesSnapshot, EntryRecord, NodeRow, ServerStoreError};
use crate::store::codec::Problem;

/// PostgreSQL's values as the shared codec reads them: BIGINT and INTEGER
/// as integers, BOOLEAN as 0 or 1, TEXT as text, BYTEA as a blob.
impl Columns for Row {
    fn value(&self, i: usize) -> Result<rusqlite::types::ValueRef<'_>, Problem> {
        use rusqlite::types::ValueRef;
        use tokio_postgres::types::Type;

        let column = self
            .columns()
            .get(i)
            .ok_or_else(|| Problem::new("a column", format_args!("column {i} is missing")))?;
        let unreadable =
            |e: tokio_postgres::Error| Problem::new(column.name(), format_args!("unreadable: {e}"));
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            self.try_get::<_, Option<i64>>(i)
                .map_err(unreadable)?
                .map(ValueRef::Integer)
        } else if *ty == Type::INT4 {
            self.try_get::<_, Option<i32>>(i)
                .map_err(unreadable)?
                .map(|v| ValueRef::Integer(v.into()))
        } else if *ty == Type::BOOL {
            self.try_get::<_, Option<bool>>(i)
                .map_err(unreadable)?
                .map(|v| ValueRef::Integer(v.into()))
        } else if *ty == Type::TEXT || *ty == Type::VARCHAR {
            self.try_get::<_, Option<&str>>(i)
                .map_err(unreadable)?
                .map(|v| ValueRef::Text(v.as_bytes()))
        } else if *ty == Type::BYTEA {
            self.try_get::<_, Option<&[u8]>>(i)
                .map_err(unreadable)?
                .map(ValueRef::Blob)
        } else {
            return Err(Problem::new(
                column.name(),
                format_args!("of type {ty}, which the store never writes"),
            ));
        };
        Ok(value.unwrap_or(ValueRef::Null))
    }
}

pub(super) async fn add_join_token(
    client: &mut Client,
    hash: TokenHash,
    admission: Admission,
) -> Result<(), Fail> {
    let a = EncodedAdmission::new(&admission)?;
    let hash = &hash.as_bytes()[..];
    client
        .execute(sql::INSERT_JOIN_TOKEN, &[&hash, &a.node, &a.expires_at_ms])
        .await?;
    Ok(())
}

pub(super) async fn consume_join_token(
    client: &mut Client,
    hash: TokenHash,
    now: SystemTime,
) -> Result<Option<Admission>, Fail> {
    let now_ms = crate::store::query_millis(now);
    let hash = &hash.as_bytes()[..];
    let tx = client.transaction().await?;
    let found = match tx
        .query_opt(sql::CONSUME_JOIN_TOKEN, &[&now_ms, &hash])
        .await?
    {
        Some(row) => Some(rows::decode_consumed(&row)?),
        None => match tx.query_opt(sql::SELECT_JOIN_TOKEN, &[&hash]).await? {
            Some(row) => Some(rows::decode_admission(&row)?),
            None => None,
        },
    };
    tx.commit().await?;
    Ok(found)
}

pub(super) async fn prune_join_tokens(
    client: &mut Client,
    before: SystemTime,
) -> Result<u64, Fail> {
    let before_ms = crate::store::query_millis(before);
    Ok(client
        .execute(sql::PRUNE_JOIN_TOKENS, &[&before_ms])
        .await?)
}

pub(super) async fn put_node(client: &mut Client, node: NodeRow) -> Result<(), Fail> {
    let n = EncodedNode::new(&node)?;
    let evicted = n.evicted != 0;
    let params: [&(dyn ToSql + Sync); 6] = [
        &n.name,
        &n.attestation,
        &n.attested_at_ms,
        &n.svid_serial,
        &n.svid_expires_at_ms,
        &evicted,
    ];
    client.execute(sql::UPSERT_NODE, &params).await?;
    Ok(())
}

pub(super) async fn renew_node(client: &mut Client, node: NodeRow) -> Result<bool, Fail> {
    let n = EncodedNode::new(&node)?;
    let params: [&(dyn ToSql + Sync); 4] = [
        &n.svid_serial,
        &n.svid_expires_at_ms,
        &n.name,
        &n.attested_at_ms,
    ];
    Ok(client.execute(sql::RENEW_NODE, &params).await? == 1)
}

pub(super) async fn node(client: &mut Client, name: NodeName) -> Result<Option<NodeRow>, Fail> {
    match client
        .query_opt(sql::SELECT_NODE, &[&name.as_str()])
        .await?
    {
        Some(row) => Ok(Some(rows::decode_node(&row)?)),
        None => Ok(None),
    }
}

pub(super) async fn nodes(client: &mut Client) -> Result<Vec<NodeRow>, Fail> {
    let found = client.query(sql::SELECT_NODES, &[]).await?;
    Ok(found
        .iter()
        .map(rows::decode_node)
        .collect::<Result<_, _>>()?)
}

pub(super) async fn evict_node(
    client: &mut Client,
    name: NodeName,
) -> Result<Option<NodeRow>, Fail> {
    match client.query_opt(sql::EVICT_NODE, &[&name.as_str()]).await? {
        Some(row) => Ok(Some(rows::decode_node(&row)?)),
        None => Ok(None),
    }
}

pub(super) async fn create_entry(client: &mut Client, entry: EntryRecord) -> Result<u64, Fail> {
    let e = EncodedEntry::new(&entry)?;
    let params: [&(dyn ToSql + Sync); 6] = [
        &e.id,
        &e.spec_json,
        &e.nodes_json,
        &e.revision,
        &e.created_at_ms,
        &e.updated_at_ms,
    ];
    let tx = client.transaction().await?;
    if tx.execute(sql::INSERT_ENTRY, &params).await? == 0 {
        // Dropping `tx` rolls back: nothing was written.
        return Err(ServerStoreError::Duplicate(entry.id).into());
    }
    let revision = bump_revision(&tx).await?;
    tx.commit().await?;
    Ok(revision)
}

pub(super) async fn delete_entry(client: &mut Client, id: String) -> Result<bool, Fail> {
    let tx = client.transaction().await?;
    if tx.execute(sql::DELETE_ENTRY, &[&id]).await? == 0 {
        return Ok(false);
    }
    bump_revision(&tx).await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn entries(client: &mut Client) -> Result<EntriesSnapshot, Fail> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let revision = read_revision(tx.query_opt(sql::SELECT_REVISION, &[]).await?)?;
    let entries = tx
        .query(sql::SELECT_ENTRIES, &[])
        .await?
        .iter()
        .map(rows::decode_entry)
        .collect::<Result<_, _>>()?;
    tx.commit().await?;
    Ok(EntriesSnapshot { revision, entries })
}

pub(super) async fn revision(client: &mut Client) -> Result<u64, Fail> {
    Ok(read_revision(
        client.query_opt(sql::SELECT_REVISION, &[]).await?,
    )?)
}

pub(super) async fn publish_bundle(
    client: &mut Client,
    replica_id: String,
    spiffe_json: String,
    now: SystemTime,
) -> Result<(), Fail> {
    let b = EncodedBundle::new(&replica_id, &spiffe_json, now)?;
    client
        .execute(
            sql::UPSERT_BUNDLE,
            &[&b.replica, &b.bundle_json, &b.updated_at_ms],
        )
        .await?;
    Ok(())
}

pub(super) async fn bundles(client: &mut Client) -> Result<Vec<(String, String)>, Fail> {
    let found = client.query(sql::SELECT_BUNDLES, &[]).await?;
    Ok(found
        .iter()
        .map(rows::decode_bundle)
        .collect::<Result<_, _>>()?)
}

pub(super) async fn forget_bundle(client: &mut Client, replica_id: String) -> Result<bool, Fail> {
    Ok(client.execute(sql::DELETE_BUNDLE, &[&replica_id]).await? > 0)
}

/// Bumps the entries' revision inside `tx`; returns the new one.
async fn bump_revision(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, Fail> {
    Ok(read_revision(tx.query_opt(sql::BUMP_REVISION, &[]).await?)?)
}

/// The revision row, checked: a missing one is damage.
fn read_revision(row: Option<Row>) -> Result<u64, ServerStoreError> {
    match row {
        Some(row) => rows::decode_revision_row(&row),
        None => Err(ServerStoreError::Corrupt {
            table: rows::META,
            detail: "entries_revision is missing".into(),
        }),
    }
}
