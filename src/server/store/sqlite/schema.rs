//! The server's SQLite schema: append-only steps, as the agent's, under
//! `user_version`, and the `application_id` that marks the file as the
//! server's. The statements that read and write it are shared with
//! PostgreSQL (`store::sql`).

/// `PRAGMA application_id` of the server's database ("tsrv"), set by step
/// 1; the agent's database has another.
pub(super) const APPLICATION_ID: i64 = 0x7473_7276;

/// Every schema step, oldest first; index + 1 is the version it produces.
/// A shipped step is never edited (a test pins each one's SHA-256).
///
/// - v1: `join_tokens`, `nodes`, `entries`, `meta` (`entries_revision`).
/// - v2: `bundle_keys` (each replica's published bundle).
/// - v3: `fleet_tasks` (the fleet's task index) and
///   `fleet_task_end_revision` (the revision of its ends).
pub(super) const STEPS: &[&str] = &[
    include_str!("migrations/v1.sql"),
    include_str!("migrations/v2.sql"),
    include_str!("migrations/v3.sql"),
];
