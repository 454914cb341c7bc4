//! Every statement the server's store runs, shared by both backends: the
//! same text runs on SQLite and on PostgreSQL (`RETURNING`, `ON CONFLICT`,
//! `TRUE`, `$n` parameters). Each backend keeps only its schema steps.
//!
//! SQLite reads `$1` as a named parameter and numbers parameters by first
//! appearance, so in every statement `$1`, `$2`, ... first appear in that
//! order (a test checks it): then positional binding means the same in
//! both databases.

// === join tokens ===

pub(super) const INSERT_JOIN_TOKEN: &str =
    "INSERT INTO join_tokens (hash, node, expires_at_ms, used_at_ms) VALUES ($1, $2, $3, NULL)";

/// Marks an unused, unexpired token used; returns it as it was.
pub(super) const CONSUME_JOIN_TOKEN: &str = "UPDATE join_tokens SET used_at_ms = $1 \
     WHERE hash = $2 AND used_at_ms IS NULL AND expires_at_ms > $1 \
     RETURNING node, expires_at_ms";

pub(super) const SELECT_JOIN_TOKEN: &str =
    "SELECT node, expires_at_ms, used_at_ms FROM join_tokens WHERE hash = $1";

pub(super) const PRUNE_JOIN_TOKENS: &str = "DELETE FROM join_tokens WHERE expires_at_ms < $1";

// === nodes ===

/// The columns a node is read from, in `rows::decode_node`'s order.
macro_rules! node_columns {
    () => {
        "name, attestation, attested_at_ms, svid_serial, svid_expires_at_ms, evicted"
    };
}

pub(super) const UPSERT_NODE: &str = concat!(
    "INSERT INTO nodes (",
    node_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET \
     attestation = excluded.attestation, attested_at_ms = excluded.attested_at_ms, \
     svid_serial = excluded.svid_serial, svid_expires_at_ms = excluded.svid_expires_at_ms, \
     evicted = excluded.evicted"
);

/// Records a renewed SVID of a node still admitted as the renewal read it:
/// not evicted, and not attested again since (its `attested_at_ms`).
pub(super) const RENEW_NODE: &str = "UPDATE nodes SET svid_serial = $1, svid_expires_at_ms = $2 \
     WHERE name = $3 AND attested_at_ms = $4 AND evicted = FALSE";

pub(super) const SELECT_NODE: &str =
    concat!("SELECT ", node_columns!(), " FROM nodes WHERE name = $1");

pub(super) const SELECT_NODES: &str =
    concat!("SELECT ", node_columns!(), " FROM nodes ORDER BY name");

pub(super) const EVICT_NODE: &str = concat!(
    "UPDATE nodes SET evicted = TRUE WHERE name = $1 RETURNING ",
    node_columns!()
);

// === entries ===

/// The columns an entry is read from, in `rows::decode_entry`'s order.
macro_rules! entry_columns {
    () => {
        "id, spec_json, nodes_json, revision, created_at_ms, updated_at_ms"
    };
}

/// Inserts an entry unless its id is taken (no row changed: a duplicate).
pub(super) const INSERT_ENTRY: &str = concat!(
    "INSERT INTO entries (",
    entry_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"
);

pub(super) const DELETE_ENTRY: &str = "DELETE FROM entries WHERE id = $1";

pub(super) const SELECT_ENTRIES: &str =
    concat!("SELECT ", entry_columns!(), " FROM entries ORDER BY id");

// === the revision ===

pub(super) const BUMP_REVISION: &str =
    "UPDATE meta SET value = value + 1 WHERE key = 'entries_revision' RETURNING value";

pub(super) const SELECT_REVISION: &str = "SELECT value FROM meta WHERE key = 'entries_revision'";

// === bundle keys ===

/// Publishes (or replaces) one replica's bundle document.
pub(super) const UPSERT_BUNDLE: &str = "INSERT INTO bundle_keys (replica, bundle_json, updated_at_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (replica) DO UPDATE SET \
     bundle_json = excluded.bundle_json, updated_at_ms = excluded.updated_at_ms";

/// Every replica's bundle document, by replica.
pub(super) const SELECT_BUNDLES: &str =
    "SELECT replica, bundle_json FROM bundle_keys ORDER BY replica";

pub(super) const DELETE_BUNDLE: &str = "DELETE FROM bundle_keys WHERE replica = $1";

// === the fleet's task index ===

/// The columns a task is read from, in `rows::decode_fleet_task`'s order.
macro_rules! fleet_task_columns {
    () => {
        "txn, owner_node, spiffe_id, began_at_ms, deadline_ms, \
         ended_reason, ended_at_ms, end_revision"
    };
}

/// Records a task, live, unless its id is taken (then nothing changes).
pub(super) const INSERT_FLEET_TASK: &str = "INSERT INTO fleet_tasks \
     (txn, owner_node, spiffe_id, began_at_ms, deadline_ms) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (txn) DO NOTHING";

pub(super) const SELECT_FLEET_TASK: &str = concat!(
    "SELECT ",
    fleet_task_columns!(),
    " FROM fleet_tasks WHERE txn = $1"
);

/// At most `$1` tasks, live or ended, newest first.
pub(super) const SELECT_FLEET_TASKS: &str = concat!(
    "SELECT ",
    fleet_task_columns!(),
    " FROM fleet_tasks ORDER BY began_at_ms DESC, txn DESC LIMIT $1"
);

/// At most `$1` live tasks, newest first.
pub(super) const SELECT_LIVE_FLEET_TASKS: &str = concat!(
    "SELECT ",
    fleet_task_columns!(),
    " FROM fleet_tasks WHERE ended_at_ms IS NULL \
     ORDER BY began_at_ms DESC, txn DESC LIMIT $1"
);

/// Ends a live task at revision `$3`; returns it as ended.
pub(super) const END_FLEET_TASK: &str = concat!(
    "UPDATE fleet_tasks SET ended_reason = $1, ended_at_ms = $2, end_revision = $3 \
     WHERE txn = $4 AND ended_at_ms IS NULL RETURNING ",
    fleet_task_columns!()
);

/// Ends a live task of node `$5` at revision `$3`; returns it as ended.
pub(super) const END_OWNED_FLEET_TASK: &str = concat!(
    "UPDATE fleet_tasks SET ended_reason = $1, ended_at_ms = $2, end_revision = $3 \
     WHERE txn = $4 AND ended_at_ms IS NULL AND owner_node = $5 RETURNING ",
    fleet_task_columns!()
);

/// At most `$2` ended tasks after revision `$1`, in revision order.
pub(super) const SELECT_FLEET_TASK_ENDS: &str = concat!(
    "SELECT ",
    fleet_task_columns!(),
    " FROM fleet_tasks WHERE end_revision > $1 ORDER BY end_revision LIMIT $2"
);

pub(super) const PRUNE_FLEET_TASKS: &str = "DELETE FROM fleet_tasks WHERE deadline_ms < $1";

/// The ids of a node's live tasks (an evicted node's, to end them).
pub(super) const SELECT_LIVE_FLEET_TASKS_OF: &str = "SELECT txn FROM fleet_tasks \
     WHERE owner_node = $1 AND ended_at_ms IS NULL ORDER BY txn LIMIT $2";

/// How many tasks (live or ended, not pruned) a node owns: its quota.
pub(super) const COUNT_FLEET_TASKS_OF: &str =
    "SELECT COUNT(*) FROM fleet_tasks WHERE owner_node = $1";

// === the task ends' revision ===

/// Locks the counter's row until the transaction ends (PostgreSQL: a
/// no-op update takes the row lock; SQLite: the write lock is the
/// database's) and reads it, as committed by whoever held it before.
pub(super) const LOCK_FLEET_TASK_END_REVISION: &str = "UPDATE fleet_task_end_revision \
     SET revision = revision WHERE id = 1 RETURNING revision";

/// Moves the counter to `$1`, under the lock taken by
/// `LOCK_FLEET_TASK_END_REVISION` in the same transaction.
pub(super) const SET_FLEET_TASK_END_REVISION: &str =
    "UPDATE fleet_task_end_revision SET revision = $1 WHERE id = 1";

pub(super) const SELECT_FLEET_TASK_END_REVISION: &str =
    "SELECT revision FROM fleet_task_end_revision WHERE id = 1";

/// Every statement, for the parameter-order test.
#[cfg(test)]
pub(super) const ALL: &[&str] = &[
    INSERT_JOIN_TOKEN,
    CONSUME_JOIN_TOKEN,
    SELECT_JOIN_TOKEN,
    PRUNE_JOIN_TOKENS,
    UPSERT_NODE,
    RENEW_NODE,
    SELECT_NODE,
    SELECT_NODES,
    EVICT_NODE,
    INSERT_ENTRY,
    DELETE_ENTRY,
    SELECT_ENTRIES,
    BUMP_REVISION,
    SELECT_REVISION,
    UPSERT_BUNDLE,
    SELECT_BUNDLES,
    DELETE_BUNDLE,
    INSERT_FLEET_TASK,
    SELECT_FLEET_TASK,
    SELECT_FLEET_TASKS,
    SELECT_LIVE_FLEET_TASKS,
    END_FLEET_TASK,
    END_OWNED_FLEET_TASK,
    SELECT_FLEET_TASK_ENDS,
    PRUNE_FLEET_TASKS,
    COUNT_FLEET_TASKS_OF,
    SELECT_LIVE_FLEET_TASKS_OF,
    LOCK_FLEET_TASK_END_REVISION,
    SET_FLEET_TASK_END_REVISION,
    SELECT_FLEET_TASK_END_REVISION,
];
