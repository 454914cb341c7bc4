//! The agent's embedded database: `data_dir/tether.db`, SQLite in WAL mode.
//!
//! Owns the state that must outlive restarts and crashes: registration
//! entries created at runtime (config-file entries are never stored), a
//! record of issued X.509-SVIDs, revoked X.509-SVIDs for the CRLs, and tasks
//! with their ends. [`Store`] is a cheap-to-clone handle; its methods block
//! (async callers use `spawn_blocking`) and are serialised by one connection
//! behind a mutex. Rows are plain data ([`EntryRow`], [`IssuedX509`],
//! [`RevokedX509`], [`TaskRow`]) that callers validate; the store knows no
//! domain type and only bounds what it keeps.
//!
//! Invariants:
//! - An acknowledged write is durable: every write commits before its method
//!   returns, and `synchronous = FULL` syncs the WAL on each commit, so it
//!   survives `kill -9` and power loss. A batch method is one transaction:
//!   all of it, or none of it, after a crash.
//! - A task's end is written once: the first recorded end wins, and no
//!   write turns an ended task active again. A task row is kept until its
//!   deadline has passed, so a restart knows every end whose tokens could
//!   still be presented.
//! - A revocation is written once, the same way: the first record of a serial
//!   wins, and it is kept until the certificate has expired, so a restart
//!   publishes every revocation a relying party could still need.
//! - A damaged database is refused, never recreated or repaired: [`Store::open`]
//!   runs `quick_check` before writing anything, and closes a database it
//!   refuses without checkpointing, so the file is left as it was found.
//! - The file and its `-wal`/`-shm` are owner-only (0600): whoever can write
//!   the store can grant themselves identities.
//!
//! Lists (selectors, DNS names, federated trust domains) are JSON text
//! columns rather than child tables: rows are always read whole and matched
//! in memory by the registry, never queried by member, so a child table
//! would add joins and ordering columns for no query. The one question asked
//! of selectors, "does another entry have this SPIFFE ID and selector set?",
//! is a UNIQUE index over a canonical column (sorted, deduplicated JSON).
//!
//! Entry audiences and task tools are lists for the same reason: the task
//! layer keeps live tasks in memory and asks the store only by id or by
//! deadline.
//!
//! `rows` holds the row types and the column codec with its bounds;
//! `migrations` the append-only schema steps.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::trusted_fs::{self, TrustedFsError};

mod migrations;
mod rows;

pub use rows::{EntryRow, IssuedX509, MAX_INTENT_LEN, RevokedX509, TaskEnd, TaskRow};

use rows::{
    ENTRY_COLUMNS, ENTRY_COLUMNS_SQL, EncodedEnd, EncodedEntry, EncodedRevoked, EncodedTask,
    EncodedX509, MAX_ID_LEN, Problem, REVOKED_COLUMNS, REVOKED_COLUMNS_SQL, TASK_COLUMNS,
    TASK_COLUMNS_SQL, X509_COLUMNS, X509_COLUMNS_SQL,
};

/// The database file inside `data_dir`.
pub const DB_FILE: &str = "tether.db";

/// How long a statement waits for another process's lock (a CLI reading the
/// same file) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most `quick_check` findings quoted in a [`StoreError::Corrupt`].
const QUICK_CHECK_MAX_FINDINGS: u32 = 10;
/// Longest piece of caller or stored text quoted in an error, in chars.
const MAX_QUOTED: usize = 80;
/// Longest `quick_check` finding quoted, in chars.
const MAX_FINDING_LEN: usize = 200;

const ENTRIES: &str = "entries";
const ISSUED_X509: &str = "issued_x509";
const REVOKED_X509: &str = "revoked_x509";
const TASKS: &str = "tasks";

/// Handle to the database in `data_dir/tether.db`. Cheap to clone; all
/// methods block, serialised by one connection.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// Why the store could not be opened, or refused a read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system refused while creating or inspecting the database
    /// files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The database, or its `-wal` or `-shm` file, is someone else's, a
    /// symlink, or writable by others: whoever wrote it could grant
    /// themselves identities.
    #[error(transparent)]
    Untrusted(#[from] TrustedFsError),
    /// The database, or its `-wal` or `-shm` file, is open to others: anyone
    /// who can write it can grant themselves identities.
    #[error(
        "{path} has mode {mode:04o}; the store must be readable and writable by its owner only (chmod 600)"
    )]
    Permissive {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// SQLite could not open or set up the database.
    #[error("opening {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database is damaged, or is not tether's. Never repaired or
    /// recreated: that would silently drop the operator's entries.
    #[error(
        "{path} is damaged or not a tether database: {detail}. tether will not start over it: \
         restore it from a backup, or move it (with any -wal and -shm files beside it) away \
         to start with an empty store"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite or the store found.
        detail: String,
    },
    /// Written by a newer tether whose schema this build does not know.
    #[error(
        "{path} has schema version {found}, but this tether knows versions up to {known}: \
         it was written by a newer tether, which must be used (downgrades are not supported)"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The newest version this build knows.
        known: u32,
    },
    /// SQLite would not switch to write-ahead logging, which the durability
    /// promise relies on (it needs shared memory: a local file system).
    #[error(
        "{path}: SQLite could not enable write-ahead logging (journal mode is {mode:?}); \
         keep data_dir on a local file system"
    )]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// A row with this identity is already stored.
    #[error("{what} already exists")]
    Duplicate {
        /// Which row, and why it is the same.
        what: String,
    },
    /// No entry with this id is stored.
    #[error("no stored entry {id:?}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The entry changed since the caller read it (optimistic concurrency).
    #[error(
        "entry {id:?} was changed meanwhile: the update expects stored revision {expected}, \
         found {found}; read it again"
    )]
    Conflict {
        /// The entry.
        id: String,
        /// The revision the update was based on (its revision - 1).
        expected: u64,
        /// The revision stored.
        found: u64,
    },
    /// A row the store refuses to keep: a value outside what it can read
    /// back (see the bounds in `rows`).
    #[error("{table} row {id} cannot be stored: {problem}")]
    Unstorable {
        /// The table.
        table: &'static str,
        /// The row's id, quoted and shortened.
        id: String,
        /// What is out of bounds.
        problem: String,
    },
    /// A stored value that cannot be decoded. The store only writes values
    /// it can read back, so this is damage: treat it as corruption.
    #[error(
        "{table} row {id} cannot be read ({problem}): the database is damaged; restore it \
         from a backup or move it away"
    )]
    BadRow {
        /// The table.
        table: &'static str,
        /// The row's id, quoted and shortened, or its rowid.
        id: String,
        /// What is wrong.
        problem: String,
        /// The JSON error, for a list column.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// Any other SQLite failure.
    #[error("store: {0}")]
    Sql(#[source] rusqlite::Error),
}

// === impl Store ===

impl Store {
    /// Opens or creates `data_dir/tether.db`, refusing a damaged database, one
    /// that is not tether's, or one with a newer schema, then applies any
    /// pending migrations. `data_dir` must exist (the daemon creates it 0700
    /// and holds its lock).
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, migrations::STEPS)
    }

    /// [`Store::open`] as a build that knows only `steps` would: tests use
    /// it to write a database of an older schema.
    fn open_with(data_dir: &Path, steps: &[&str]) -> Result<Store, StoreError> {
        let path = data_dir.join(DB_FILE);
        prepare_files(data_dir, &path)?;

        // No CREATE: the file exists by now, and one that vanished meanwhile
        // must not be replaced by an empty database. NO_MUTEX: `Shared`
        // serialises access. NOFOLLOW: a path swapped for a symlink is refused.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(open_error(&path))?;

        // Until every check has passed, closing must not checkpoint: that
        // would copy frames from a leftover -wal into a database we refuse.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(open_error(&path))?;
        configure(&conn).map_err(open_error(&path))?;
        check_integrity(&conn, &path)?;
        check_identity(&conn, &path, steps)?;

        // Persistent in the file header; the first write since `quick_check`.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_error(&path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        migrations::apply(&mut conn, steps).map_err(open_error(&path))?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
            .map_err(open_error(&path))?;

        Ok(Store {
            shared: Arc::new(Shared {
                path,
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the database can take a write now (for readiness): takes and
    /// releases the write lock (`BEGIN IMMEDIATE`, `ROLLBACK`), which fails
    /// when the connection is read-only or the lock is wedged. Writes
    /// nothing, so it cannot see a file system that fails only on the
    /// write itself (full, gone read-only under an open file); those fail
    /// the write, and the request, when it comes. Blocking: call it off
    /// the async workers.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .map_err(self.sql())
    }

    /// The schema version of the open database (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let conn = self.conn();
        let version = migrations::user_version(&conn).map_err(self.sql())?;
        u32::try_from(version).map_err(|_| self.corrupt(format!("schema version {version}")))
    }

    /// Stores a new entry. [`StoreError::Duplicate`] when its id is taken, or
    /// when another entry has the same SPIFFE ID and the same selector set
    /// (in any order, repeats ignored; audiences, `process_bound` and the
    /// other fields do not count).
    pub fn insert_entry(&self, row: &EntryRow) -> Result<(), StoreError> {
        let encoded = EncodedEntry::new(row).map_err(|p| unstorable(ENTRIES, &row.id, p))?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        if stored_revision(&tx, &row.id).map_err(self.sql())?.is_some() {
            return Err(StoreError::Duplicate {
                what: format!("entry {}", quote(&row.id)),
            });
        }
        self.refuse_same_identity(&tx, &encoded, None)?;
        tx.prepare(
            "INSERT INTO entries (id, spiffe_id, selectors, selector_key, x509_svid_ttl_ms, \
             jwt_svid_ttl_ms, dns_names, hint, federates_with, audiences, process_bound, \
             created_at_ms, updated_at_ms, revision) VALUES (:id, :spiffe_id, :selectors, \
             :selector_key, :x509_svid_ttl_ms, :jwt_svid_ttl_ms, :dns_names, :hint, \
             :federates_with, :audiences, :process_bound, :created_at_ms, :updated_at_ms, \
             :revision)",
        )
        .and_then(|mut stmt| stmt.execute(entry_params(&encoded).as_slice()))
        .map_err(self.write_error(|| format!("entry {}", quote(&row.id))))?;
        tx.commit().map_err(self.sql())
    }

    /// Replaces every field of a stored entry with `row`'s. The caller bumps
    /// `revision` (and sets `updated_at`); the update is refused with
    /// [`StoreError::Conflict`] unless the stored revision is
    /// `row.revision - 1`, so two writers that read the same revision cannot
    /// both win. [`StoreError::NotFound`] when absent; [`StoreError::Duplicate`]
    /// when another entry has the same SPIFFE ID and selector set.
    pub fn update_entry(&self, row: &EntryRow) -> Result<(), StoreError> {
        let encoded = EncodedEntry::new(row).map_err(|p| unstorable(ENTRIES, &row.id, p))?;
        let Some(expected) = row.revision.checked_sub(1) else {
            return Err(unstorable(
                ENTRIES,
                &row.id,
                Problem {
                    what: "revision: 0; an update carries the stored revision + 1".into(),
                    source: None,
                },
            ));
        };
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        let found = stored_revision(&tx, &row.id)
            .map_err(self.sql())?
            .ok_or_else(|| StoreError::NotFound { id: row.id.clone() })?
            .map_err(|p| bad_row(ENTRIES, quote(&row.id), p))?;
        if found != expected {
            return Err(StoreError::Conflict {
                id: row.id.clone(),
                expected,
                found,
            });
        }
        self.refuse_same_identity(&tx, &encoded, Some(&row.id))?;
        tx.prepare(
            "UPDATE entries SET spiffe_id = :spiffe_id, selectors = :selectors, \
             selector_key = :selector_key, x509_svid_ttl_ms = :x509_svid_ttl_ms, \
             jwt_svid_ttl_ms = :jwt_svid_ttl_ms, dns_names = :dns_names, hint = :hint, \
             federates_with = :federates_with, audiences = :audiences, \
             process_bound = :process_bound, created_at_ms = :created_at_ms, updated_at_ms = :updated_at_ms, \
             revision = :revision WHERE id = :id",
        )
        .and_then(|mut stmt| stmt.execute(entry_params(&encoded).as_slice()))
        .map_err(self.write_error(|| format!("entry {}", quote(&row.id))))?;
        tx.commit().map_err(self.sql())
    }

    /// Deletes an entry; `false` when there was none.
    pub fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let deleted = conn
            .prepare("DELETE FROM entries WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute([id]))
            .map_err(self.sql())?;
        Ok(deleted > 0)
    }

    /// Every stored entry, oldest `created_at` first (ties by id): the order
    /// the registry matches them in.
    pub fn entries(&self) -> Result<Vec<EntryRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {ENTRY_COLUMNS_SQL}, rowid FROM entries ORDER BY created_at_ms, id"
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query([]).map_err(self.sql())?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql())? {
            entries.push(decode_entry(row)?);
        }
        Ok(entries)
    }

    /// The stored entry with this id.
    pub fn entry(&self, id: &str) -> Result<Option<EntryRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {ENTRY_COLUMNS_SQL}, rowid FROM entries WHERE id = ?1"
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query([id]).map_err(self.sql())?;
        match rows.next().map_err(self.sql())? {
            Some(row) => decode_entry(row).map(Some),
            None => Ok(None),
        }
    }

    /// Records an issued X.509-SVID. [`StoreError::Duplicate`] when its serial
    /// is already recorded.
    pub fn record_x509_issued(&self, record: &IssuedX509) -> Result<(), StoreError> {
        let encoded =
            EncodedX509::new(record).map_err(|p| unstorable(ISSUED_X509, &record.serial, p))?;
        let conn = self.conn();
        conn.prepare(
            "INSERT INTO issued_x509 (serial, entry_id, spiffe_id, not_before_ms, \
             not_after_ms, issued_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut stmt| {
            stmt.execute(rusqlite::params![
                encoded.serial,
                encoded.entry_id,
                encoded.spiffe_id,
                encoded.not_before_ms,
                encoded.not_after_ms,
                encoded.issued_at_ms,
            ])
        })
        .map_err(
            self.write_error(|| format!("X.509-SVID record with serial {}", quote(&record.serial))),
        )?;
        Ok(())
    }

    /// Records whose `not_after` is after `now`, newest first (by
    /// `issued_at`, then serial).
    pub fn live_x509(&self, now: SystemTime) -> Result<Vec<IssuedX509>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {X509_COLUMNS_SQL}, rowid FROM issued_x509 WHERE not_after_ms > ?1 \
                 ORDER BY issued_at_ms DESC, serial"
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query([query_millis(now)]).map_err(self.sql())?;
        let mut records = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql())? {
            records.push(decode_x509(row)?);
        }
        Ok(records)
    }

    /// Deletes records that expired before `before`; returns how many.
    pub fn prune_x509(&self, before: SystemTime) -> Result<usize, StoreError> {
        let conn = self.conn();
        conn.prepare("DELETE FROM issued_x509 WHERE not_after_ms < ?1")
            .and_then(|mut stmt| stmt.execute([query_millis(before)]))
            .map_err(self.sql())
    }

    /// Records the revocation of an X.509-SVID; `Ok(true)` when recorded.
    /// A serial already revoked keeps its first record (its CA, time, expiry
    /// and reason): `Ok(false)`, changing nothing. Serials are compared as
    /// stored text, so callers write them in one case.
    pub fn revoke_x509(&self, record: &RevokedX509) -> Result<bool, StoreError> {
        let encoded =
            EncodedRevoked::new(record).map_err(|p| unstorable(REVOKED_X509, &record.serial, p))?;
        let conn = self.conn();
        // DO NOTHING for the serial only: any other constraint still fails.
        let inserted = conn
            .prepare(
                "INSERT INTO revoked_x509 (serial, ca_id, revoked_at_ms, not_after_ms, reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (serial) DO NOTHING",
            )
            .and_then(|mut stmt| {
                stmt.execute(rusqlite::params![
                    encoded.serial,
                    encoded.ca_id,
                    encoded.revoked_at_ms,
                    encoded.not_after_ms,
                    encoded.reason,
                ])
            })
            .map_err(self.sql())?;
        Ok(inserted > 0)
    }

    /// Revocations whose certificate has not expired at `now` (`not_after`
    /// after `now`), of every CA: what the CRLs list. Oldest `revoked_at`
    /// first (ties by serial).
    pub fn revoked_x509(&self, now: SystemTime) -> Result<Vec<RevokedX509>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {REVOKED_COLUMNS_SQL}, rowid FROM revoked_x509 WHERE not_after_ms > ?1 \
                 ORDER BY revoked_at_ms, serial"
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query([query_millis(now)]).map_err(self.sql())?;
        let mut records = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql())? {
            records.push(decode_revoked(row)?);
        }
        Ok(records)
    }

    /// Deletes revocations of certificates that expired before `before`;
    /// returns how many. An expired certificate fails validation without a
    /// CRL, so its revocation no longer needs publishing.
    pub fn prune_revoked_x509(&self, before: SystemTime) -> Result<usize, StoreError> {
        let conn = self.conn();
        conn.prepare("DELETE FROM revoked_x509 WHERE not_after_ms < ?1")
            .and_then(|mut stmt| stmt.execute([query_millis(before)]))
            .map_err(self.sql())
    }

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
        let conn = self.conn();
        let changed = conn
            .prepare(END_TASK_SQL)
            .and_then(|mut stmt| stmt.execute(end_params(&encoded).as_slice()))
            .map_err(self.sql())?;
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
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS_SQL}, rowid FROM tasks WHERE id = ?1"
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query([id]).map_err(self.sql())?;
        match rows.next().map_err(self.sql())? {
            Some(row) => decode_task(row).map(Some),
            None => Ok(None),
        }
    }

    /// Every task whose deadline is after `now`, active or ended: what a
    /// restart must know, since tokens of such a task may still be presented
    /// and an ended one's must stay refused. Oldest `created_at` first (ties
    /// by id).
    pub fn tasks_until(&self, now: SystemTime) -> Result<Vec<TaskRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS_SQL}, rowid FROM tasks WHERE deadline_ms > ?1 \
                 ORDER BY created_at_ms, id"
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query([query_millis(now)]).map_err(self.sql())?;
        let mut tasks = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql())? {
            tasks.push(decode_task(row)?);
        }
        Ok(tasks)
    }

    /// Deletes tasks, active or ended, whose deadline is before `before`;
    /// returns how many. Past its deadline a task's tokens have all expired,
    /// so its end no longer needs remembering.
    pub fn prune_tasks(&self, before: SystemTime) -> Result<usize, StoreError> {
        let conn = self.conn();
        conn.prepare("DELETE FROM tasks WHERE deadline_ms < ?1")
            .and_then(|mut stmt| stmt.execute([query_millis(before)]))
            .map_err(self.sql())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot leave the connection half
        // way: an open transaction rolls back when its guard unwinds.
        self.shared
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses `entry` if another entry (not `except`) has its SPIFFE ID and
    /// selector set. The UNIQUE index would refuse it too; asking first
    /// names the entry it collides with.
    fn refuse_same_identity(
        &self,
        conn: &Connection,
        entry: &EncodedEntry<'_>,
        except: Option<&str>,
    ) -> Result<(), StoreError> {
        let other: Option<String> = conn
            .prepare(&format!(
                "SELECT substr(id, 1, {MAX_QUOTED}) FROM entries \
                 WHERE spiffe_id = ?1 AND selector_key = ?2 AND id IS NOT ?3"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(
                    rusqlite::params![entry.spiffe_id, entry.selector_key, except],
                    |row| row.get(0),
                )
                .optional()
            })
            .map_err(self.sql())?;
        match other {
            Some(other) => Err(StoreError::Duplicate {
                what: format!(
                    "an entry for {} with selectors {} (entry {})",
                    quote(entry.spiffe_id),
                    shorten(&entry.selector_key, MAX_QUOTED),
                    quote(&other),
                ),
            }),
            None => Ok(()),
        }
    }

    /// Maps a SQLite error: damage to [`StoreError::Corrupt`], the rest to
    /// [`StoreError::Sql`].
    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |e| {
            if is_damage(&e) {
                self.corrupt(e.to_string())
            } else {
                StoreError::Sql(e)
            }
        }
    }

    /// As [`Store::sql`], with a constraint violation read as a duplicate of
    /// `what`.
    fn write_error<F: Fn() -> String>(&self, what: F) -> impl Fn(rusqlite::Error) -> StoreError {
        let sql = self.sql();
        move |e| {
            if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) {
                StoreError::Duplicate { what: what() }
            } else {
                sql(e)
            }
        }
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            path: self.shared.path.clone(),
            detail,
        }
    }
}

// === opening ===

/// Creates the database file 0600 if it is missing, and refuses database
/// files that are not owner-only regular files.
fn prepare_files(data_dir: &Path, path: &Path) -> Result<(), StoreError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    // SQLite would create the file with the umask's mode; create it first so
    // it is never readable by others, not even for a moment. SQLite gives
    // -wal and -shm the mode of the database file.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => {
            file.sync_all().map_err(io_err(path))?;
            // Make the new name durable before any write is acknowledged:
            // otherwise a power loss could drop the file, and the next start
            // would find an empty store where acknowledged entries were.
            File::open(data_dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io_err(data_dir))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    check_private(path, true)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = OsString::from(path.as_os_str());
        side.push(suffix);
        check_private(Path::new(&side), false)?;
    }
    Ok(())
}

fn check_private(path: &Path, required: bool) -> Result<(), StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    // A regular file, the agent's or root's, that nobody else may write: a
    // database someone else planted would hand them every entry.
    trusted_fs::check_file(path, &meta, false)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissive {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Per-connection settings; none of them writes to the file.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Refuses writable_schema and other ways for SQL to corrupt the file.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // FULL (2): in WAL mode NORMAL may lose the last commits on power loss.
    conn.pragma_update(None, "synchronous", 2)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Damaged pages then fail as errors instead of being misread.
    conn.pragma_update(None, "cell_size_check", true)?;
    conn.pragma_update(None, "trusted_schema", false)
}

fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut findings = Vec::new();
    let checked = (|| {
        let mut stmt = conn.prepare(&format!("PRAGMA quick_check({QUICK_CHECK_MAX_FINDINGS})"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            findings.push(row.get::<_, String>(0)?);
        }
        Ok(())
    })();
    match checked {
        Ok(()) if findings.len() == 1 && findings[0] == "ok" => return Ok(()),
        Ok(()) => {}
        // quick_check reports a damaged page as a finding, then fails when
        // its NOT NULL and STRICT checks scan a table through that page: keep
        // what it found before failing (which page), and the failure.
        Err(e) if is_damage(&e) => findings.push(e.to_string()),
        Err(e) => return Err(open_error(path)(e)),
    }
    // One line: findings come as multi-line text.
    let findings: Vec<String> = findings
        .iter()
        .flat_map(|f| f.lines())
        .map(|line| shorten(line, MAX_FINDING_LEN))
        .collect();
    Err(StoreError::Corrupt {
        path: path.to_owned(),
        detail: format!("quick_check found: {}", findings.join("; ")),
    })
}

/// Refuses another program's database, and one with a schema newer than
/// `steps` produce.
fn check_identity(conn: &Connection, path: &Path, steps: &[&str]) -> Result<(), StoreError> {
    let not_ours = |detail: String| StoreError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let version = migrations::user_version(conn).map_err(open_error(path))?;
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(open_error(path))?;
    if version == 0 {
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .map_err(open_error(path))?;
        if objects > 0 || app_id != 0 {
            return Err(not_ours(format!(
                "it holds {objects} schema objects but no tether schema version \
                 (application_id {app_id:#x})"
            )));
        }
        return Ok(());
    }
    if app_id != migrations::APPLICATION_ID {
        return Err(not_ours(format!(
            "its application_id is {app_id:#x}, not tether's {:#x}",
            migrations::APPLICATION_ID
        )));
    }
    let found =
        u32::try_from(version).map_err(|_| not_ours(format!("schema version {version}")))?;
    let known = migrations::version_of(steps);
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known,
        });
    }
    Ok(())
}

fn open_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| {
        if is_damage(&source) {
            StoreError::Corrupt {
                path: path.to_owned(),
                detail: source.to_string(),
            }
        } else {
            StoreError::Open {
                path: path.to_owned(),
                source,
            }
        }
    }
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

// === rows ===

fn entry_params<'a>(e: &'a EncodedEntry<'a>) -> [(&'static str, &'a dyn rusqlite::ToSql); 14] {
    [
        (":id", &e.id),
        (":spiffe_id", &e.spiffe_id),
        (":selectors", &e.selectors),
        (":selector_key", &e.selector_key),
        (":x509_svid_ttl_ms", &e.x509_svid_ttl_ms),
        (":jwt_svid_ttl_ms", &e.jwt_svid_ttl_ms),
        (":dns_names", &e.dns_names),
        (":hint", &e.hint),
        (":federates_with", &e.federates_with),
        (":audiences", &e.audiences),
        (":process_bound", &e.process_bound),
        (":created_at_ms", &e.created_at_ms),
        (":updated_at_ms", &e.updated_at_ms),
        (":revision", &e.revision),
    ]
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

/// The stored revision of entry `id`: `None` when absent, the inner error
/// when the stored value cannot be decoded.
fn stored_revision(conn: &Connection, id: &str) -> rusqlite::Result<Option<Result<u64, Problem>>> {
    conn.prepare("SELECT revision FROM entries WHERE id = ?1")?
        .query_row([id], |row| Ok(rows::decode_revision(row.get_ref(0)?)))
        .optional()
}

fn decode_entry(row: &rusqlite::Row<'_>) -> Result<EntryRow, StoreError> {
    let values = values::<ENTRY_COLUMNS>(row)?;
    rows::decode_entry(&values).map_err(|p| bad_row(ENTRIES, row_label(&values, row), p))
}

fn decode_task(row: &rusqlite::Row<'_>) -> Result<TaskRow, StoreError> {
    let values = values::<TASK_COLUMNS>(row)?;
    rows::decode_task(&values).map_err(|p| bad_row(TASKS, row_label(&values, row), p))
}

fn decode_x509(row: &rusqlite::Row<'_>) -> Result<IssuedX509, StoreError> {
    let values = values::<X509_COLUMNS>(row)?;
    rows::decode_x509(&values).map_err(|p| bad_row(ISSUED_X509, row_label(&values, row), p))
}

fn decode_revoked(row: &rusqlite::Row<'_>) -> Result<RevokedX509, StoreError> {
    let values = values::<REVOKED_COLUMNS>(row)?;
    rows::decode_revoked(&values).map_err(|p| bad_row(REVOKED_X509, row_label(&values, row), p))
}

fn values<'r, const N: usize>(row: &'r rusqlite::Row<'_>) -> Result<[ValueRef<'r>; N], StoreError> {
    let mut values = [ValueRef::Null; N];
    for (i, value) in values.iter_mut().enumerate() {
        *value = row.get_ref(i).map_err(StoreError::Sql)?;
    }
    Ok(values)
}

/// Names a bad row by its first column (id, serial), or by its rowid (the
/// column after the decoded ones) when that cannot be read either.
fn row_label(values: &[ValueRef<'_>], row: &rusqlite::Row<'_>) -> String {
    match values
        .first()
        .map(|v| rows::decode_text("id", *v, MAX_ID_LEN))
    {
        Some(Ok(id)) => quote(id),
        _ => match row.get::<_, i64>(values.len()) {
            Ok(rowid) => format!("at rowid {rowid}"),
            Err(_) => "at an unknown rowid".into(),
        },
    }
}

fn unstorable(table: &'static str, id: &str, problem: Problem) -> StoreError {
    StoreError::Unstorable {
        table,
        id: quote(id),
        problem: problem.what,
    }
}

fn bad_row(table: &'static str, id: String, problem: Problem) -> StoreError {
    StoreError::BadRow {
        table,
        id,
        problem: problem.what,
        source: problem.source,
    }
}

/// `time` as a bound for a query: unlike a stored time, any instant is a
/// fine bound, so clamp instead of refusing.
fn query_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        // Before every stored time, which are all >= 0.
        Err(_) => -1,
    }
}

/// Quotes caller or stored text for an error message, shortened: an error
/// about an oversized id must not be oversized itself.
fn quote(text: &str) -> String {
    format!("{:?}", shorten(text, MAX_QUOTED))
}

fn shorten(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    use super::*;

    /// Tells [`child_crash_writer`] where the store is.
    const CRASH_DIR_VAR: &str = "TETHER_STORE_CRASH_DIR";
    /// Prefix for the child's entry ids, distinct per round.
    const CRASH_ROUND_VAR: &str = "TETHER_STORE_CRASH_ROUND";
    const CRASH_CHILD: &str = "store::tests::child_crash_writer";
    /// The child stops by itself after this many writes if nobody kills it.
    const CRASH_CHILD_MAX_WRITES: u64 = 20_000;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> EntryRow {
        EntryRow {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            x509_svid_ttl: Some(Duration::from_secs(3600)),
            jwt_svid_ttl: None,
            dns_names: vec!["a.example.org".into()],
            hint: Some("primary".into()),
            federates_with: vec!["spiffe://other.org".into()],
            audiences: vec!["https://mcp.jira.internal".into()],
            process_bound: false,
            created_at: at(0),
            updated_at: at(0),
            revision: 1,
        }
    }

    fn revoked(serial: &str, revoked_at: u64, not_after: u64) -> RevokedX509 {
        RevokedX509 {
            serial: serial.into(),
            ca_id: "ca-1".into(),
            revoked_at: at(revoked_at),
            not_after: at(not_after),
            reason: "process exited".into(),
        }
    }

    fn serials(records: &[RevokedX509]) -> Vec<&str> {
        records.iter().map(|r| r.serial.as_str()).collect()
    }

    fn task(id: &str, created_at: u64, deadline: u64) -> TaskRow {
        TaskRow {
            id: id.into(),
            owner_pid: 4242,
            owner_start_time: 1_234_567,
            owner_uid: 1000,
            owner_executable: Some("/usr/local/bin/agent".into()),
            owner_exe_sha256: Some("ab".repeat(32)),
            spiffe_id: "spiffe://example.org/agent".into(),
            entry_id: "e1".into(),
            audience: "https://mcp.jira.internal".into(),
            intent: "triage the open tickets".into(),
            tools: vec!["jira.search".into(), "jira.comment".into()],
            bind_x5t: Some("x".repeat(43)),
            created_at: at(created_at),
            deadline: at(deadline),
            ended: None,
            tokens_issued: 0,
            scope_descendants: false,
        }
    }

    fn end(at_ms: u64, reason: &str) -> TaskEnd {
        TaskEnd {
            at: at(at_ms),
            reason: reason.into(),
        }
    }

    fn task_ids(tasks: &[TaskRow]) -> Vec<&str> {
        tasks.iter().map(|t| t.id.as_str()).collect()
    }

    fn issued(serial: &str, issued_at: u64, not_after: u64) -> IssuedX509 {
        IssuedX509 {
            serial: serial.into(),
            entry_id: "e1".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            not_before: at(issued_at),
            not_after: at(not_after),
            issued_at: at(issued_at),
        }
    }

    fn ids(entries: &[EntryRow]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    /// A raw connection, as another program (or damage) would write.
    fn raw(dir: &Path) -> Connection {
        Connection::open(dir.join(DB_FILE)).unwrap()
    }

    /// A store of `n` entries, closed (checkpointed into the main file).
    fn populated(dir: &Path, n: u64) {
        let store = Store::open(dir).unwrap();
        for i in 0..n {
            let id = format!("entry-{i:05}");
            let mut row = entry(&id, &format!("spiffe://example.org/w/{i}"), &["unix:uid:0"]);
            row.created_at = at(i);
            store.insert_entry(&row).unwrap();
        }
    }

    #[test]
    fn entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.entries().unwrap().is_empty());

        let mut b = entry("b", "spiffe://example.org/b", &["unix:uid:1"]);
        b.created_at = at(5);
        b.process_bound = true;
        let mut a = entry("a", "spiffe://example.org/a", &["unix:uid:2", "unix:gid:2"]);
        a.created_at = at(5);
        a.process_bound = true;
        let mut first = entry("z", "spiffe://example.org/z", &[]);
        first.created_at = at(1);
        first.x509_svid_ttl = None;
        first.jwt_svid_ttl = Some(Duration::from_millis(300_250));
        first.hint = None;
        first.dns_names = vec![];
        first.federates_with = vec![];
        first.audiences = vec![];
        for row in [&b, &a, &first] {
            store.insert_entry(row).unwrap();
        }
        // Oldest first; equal times by id.
        let listed = store.entries().unwrap();
        assert_eq!(ids(&listed), ["z", "a", "b"]);
        assert_eq!(listed, [first.clone(), a.clone(), b.clone()]);
        assert_eq!(store.entry("a").unwrap(), Some(a.clone()));
        assert_eq!(store.entry("missing").unwrap(), None);

        let mut changed = a.clone();
        changed.selectors = vec!["unix:uid:3".into()];
        changed.spiffe_id = "spiffe://example.org/a2".into();
        changed.hint = None;
        changed.audiences = vec!["https://a.internal".into(), "https://b.internal".into()];
        changed.process_bound = false;
        changed.updated_at = at(9);
        changed.revision = 2;
        store.update_entry(&changed).unwrap();
        assert_eq!(store.entry("a").unwrap(), Some(changed.clone()));
        // And back: an update writes the flag both ways.
        changed.process_bound = true;
        changed.revision = 3;
        store.update_entry(&changed).unwrap();
        assert!(store.entry("a").unwrap().unwrap().process_bound);

        assert!(store.delete_entry("a").unwrap());
        assert!(!store.delete_entry("a").unwrap());
        assert_eq!(store.entry("a").unwrap(), None);
        assert_eq!(ids(&store.entries().unwrap()), ["z", "b"]);

        // And it is all still there after a restart, the flag included
        // (b's is set, first's is not).
        let mut first_bound = first.clone();
        first_bound.process_bound = true;
        first_bound.revision = 2;
        store.update_entry(&first_bound).unwrap();
        first_bound.process_bound = false;
        first_bound.revision = 3;
        store.update_entry(&first_bound).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.entries().unwrap(), [first_bound, b]);
    }

    #[test]
    fn duplicates_by_id_and_by_selector_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = "spiffe://example.org/a";
        store
            .insert_entry(&entry("e1", a, &["unix:uid:1", "unix:gid:1"]))
            .unwrap();

        let err = store
            .insert_entry(&entry("e1", "spiffe://example.org/other", &["x:y"]))
            .unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
        assert!(err.to_string().contains("\"e1\""), "{err}");

        // Same SPIFFE ID and selector set, in another order and repeated.
        let err = store
            .insert_entry(&entry("e2", a, &["unix:gid:1", "unix:uid:1", "unix:gid:1"]))
            .unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
        assert!(err.to_string().contains("(entry \"e1\")"), "{err}");
        // Nor do other audiences make another entry.
        let mut other_audiences = entry("e2", a, &["unix:uid:1", "unix:gid:1"]);
        other_audiences.audiences = vec!["https://elsewhere.internal".into()];
        let err = store.insert_entry(&other_audiences).unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
        // Nor does process binding.
        let mut process_bound = entry("e2", a, &["unix:uid:1", "unix:gid:1"]);
        process_bound.process_bound = true;
        let err = store.insert_entry(&process_bound).unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");

        // A different SPIFFE ID or a different set is another entry.
        let other = "spiffe://example.org/b";
        store
            .insert_entry(&entry("e3", other, &["unix:uid:1", "unix:gid:1"]))
            .unwrap();
        store
            .insert_entry(&entry("e4", a, &["unix:uid:1"]))
            .unwrap();
        assert_eq!(store.entries().unwrap().len(), 3);

        // An update may not take another entry's identity...
        let mut e4 = entry("e4", a, &["unix:gid:1", "unix:uid:1"]);
        e4.revision = 2;
        let err = store.update_entry(&e4).unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
        // ...but keeping its own identity, reordered, is no duplicate.
        let mut e1 = entry("e1", a, &["unix:gid:1", "unix:uid:1"]);
        e1.revision = 2;
        store.update_entry(&e1).unwrap();

        let err = store
            .record_x509_issued(&issued("0a", 0, 10))
            .and_then(|()| store.record_x509_issued(&issued("0a", 1, 11)));
        assert!(matches!(err, Err(StoreError::Duplicate { .. })), "{err:?}");
    }

    #[test]
    fn updates_need_the_next_revision_of_an_existing_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut row = entry("e1", "spiffe://example.org/a", &["unix:uid:1"]);

        row.revision = 2;
        let err = store.update_entry(&row).unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { ref id } if id == "e1"),
            "{err}"
        );

        row.revision = 1;
        store.insert_entry(&row).unwrap();
        row.revision = 2;
        store.update_entry(&row).unwrap();

        // A second writer that also read revision 1.
        let err = store.update_entry(&row).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    expected: 1,
                    found: 2,
                    ..
                }
            ),
            "{err}"
        );
        row.revision = 7;
        let err = store.update_entry(&row).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    expected: 6,
                    found: 2,
                    ..
                }
            ),
            "{err}"
        );
        row.revision = 0;
        let err = store.update_entry(&row).unwrap_err();
        assert!(matches!(err, StoreError::Unstorable { .. }), "{err}");
        assert_eq!(store.entry("e1").unwrap().unwrap().revision, 2);
    }

    #[test]
    fn migrates_from_empty_and_reopens_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), migrations::LATEST);
        {
            let conn = store.conn();
            let pragma = |name: &str| -> String {
                conn.pragma_query_value(None, name, |r| {
                    Ok(match r.get_ref(0)? {
                        ValueRef::Integer(n) => n.to_string(),
                        other => other.as_str().unwrap().to_owned(),
                    })
                })
                .unwrap()
            };
            assert_eq!(pragma("journal_mode"), "wal");
            assert_eq!(pragma("synchronous"), "2", "FULL");
            assert_eq!(pragma("foreign_keys"), "1");
        }
        store
            .insert_entry(&entry("e1", "spiffe://example.org/a", &[]))
            .unwrap();
        drop(store);

        for _ in 0..2 {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.schema_version().unwrap(), migrations::LATEST);
            assert_eq!(ids(&store.entries().unwrap()), ["e1"]);
        }
    }

    #[test]
    fn a_newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let newer = i64::from(migrations::LATEST) + 1;
        raw(dir.path())
            .pragma_update(None, "user_version", newer)
            .unwrap();
        let before = fs::read(dir.path().join(DB_FILE)).unwrap();

        let err = Store::open(dir.path()).unwrap_err();
        match &err {
            StoreError::NewerSchema { found, known, .. } => {
                assert_eq!(i64::from(*found), newer);
                assert_eq!(*known, migrations::LATEST);
            }
            other => panic!("expected NewerSchema, got {other}"),
        }
        assert!(err.to_string().contains("newer tether"), "{err}");
        assert_eq!(fs::read(dir.path().join(DB_FILE)).unwrap(), before);
    }

    #[test]
    fn garbage_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        // Deterministic noise (xorshift), several pages of it.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let garbage: Vec<u8> = (0..16 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(&garbage)
            .unwrap();

        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("restore it from a backup"), "{message}");
        assert_eq!(fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn a_damaged_page_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        populated(dir.path(), 400);
        let path = dir.path().join(DB_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
        let pages = bytes.len() / page_size;
        assert!(
            pages >= 8,
            "only {pages} pages: make the test database bigger"
        );
        // Flip every bit of one page in the middle (never page 1, the header).
        let middle = pages / 2;
        for byte in &mut bytes[middle * page_size..(middle + 1) * page_size] {
            *byte ^= 0xff;
        }
        fs::write(&path, &bytes).unwrap();

        let err = Store::open(dir.path()).unwrap_err();
        match &err {
            StoreError::Corrupt { detail, .. } => {
                assert!(detail.starts_with("quick_check found: "), "{detail}");
                assert!(!detail.contains('\n'), "{detail}");
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "the damaged file was modified"
        );
        // Refused again on the next start, not repaired in between.
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_damaged_database_with_pending_commits_is_not_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        populated(dir.path(), 400);
        // Commits left in the -wal, as after a crash: another connection
        // that never checkpoints.
        let conn = raw(dir.path());
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .unwrap();
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint = 0; \
             INSERT INTO entries SELECT 'zzz', 'spiffe://example.org/zzz', selectors, \
             selector_key, x509_svid_ttl_ms, jwt_svid_ttl_ms, dns_names, hint, \
             federates_with, created_at_ms + 100000, updated_at_ms, revision, audiences, \
             process_bound FROM entries WHERE id = 'entry-00000';",
        )
        .unwrap();
        drop(conn);
        let path = dir.path().join(DB_FILE);
        let wal = dir.path().join("tether.db-wal");
        let wal_before = fs::read(&wal).unwrap();
        assert!(!wal_before.is_empty(), "no pending commits to protect");

        let mut bytes = fs::read(&path).unwrap();
        let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
        // Damage a page the -wal does not hold a newer copy of, or readers
        // would never see the damage. A WAL frame is a 24-byte header (page
        // number first) and a page, after a 32-byte file header.
        let in_wal: Vec<usize> = wal_before[32..]
            .chunks(24 + page_size)
            .map(|frame| u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize - 1)
            .collect();
        let pages = bytes.len() / page_size;
        let damaged = (pages / 2..pages)
            .find(|p| !in_wal.contains(p))
            .expect("every later page is in the -wal");
        for byte in &mut bytes[damaged * page_size..(damaged + 1) * page_size] {
            *byte ^= 0xff;
        }
        fs::write(&path, &bytes).unwrap();

        let result = Store::open(dir.path());
        assert!(
            matches!(result, Err(StoreError::Corrupt { .. })),
            "{result:?}"
        );
        // Closing normally would have copied the -wal into the damaged file
        // and removed it: both are kept as found, for whoever investigates.
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "the damaged file was modified"
        );
        assert_eq!(fs::read(&wal).unwrap(), wal_before, "the -wal was modified");
    }

    #[test]
    fn another_programs_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        File::create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        raw(dir.path())
            .execute_batch("CREATE TABLE accounts (name TEXT);")
            .unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");

        raw(dir.path())
            .execute_batch("PRAGMA user_version = 1;")
            .unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("application_id"), "{err}");
    }

    #[test]
    fn files_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .insert_entry(&entry("e1", "spiffe://example.org/a", &[]))
            .unwrap();
        for name in [DB_FILE, "tether.db-wal", "tether.db-shm"] {
            assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
        }
        drop(store);

        let path = dir.path().join(DB_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::Permissive { mode: 0o644, .. }),
            "{err}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

        // A leftover WAL others could write would let them inject rows.
        let wal = dir.path().join("tether.db-wal");
        File::create(&wal).unwrap();
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Untrusted(TrustedFsError::Mode {
                mode: 0o666,
                ..
            }))
        ));
        fs::remove_file(&wal).unwrap();

        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Untrusted(TrustedFsError::Symlink(_)))
        ));
    }

    #[test]
    fn issued_records_list_live_ones_and_prune_expired_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // serial, issued at, not after
        for (serial, issued_at, not_after) in [
            ("01", 0, 100),
            ("02", 10, 200),
            ("03", 20, 300),
            ("04", 30, 50),
        ] {
            store
                .record_x509_issued(&issued(serial, issued_at, not_after))
                .unwrap();
        }
        let serials = |records: Vec<IssuedX509>| -> Vec<String> {
            records.into_iter().map(|r| r.serial).collect()
        };
        // Newest first; "04" expired at 50, and "01" expires exactly at 100.
        assert_eq!(
            serials(store.live_x509(at(60)).unwrap()),
            ["03", "02", "01"]
        );
        assert_eq!(serials(store.live_x509(at(100)).unwrap()), ["03", "02"]);
        assert_eq!(store.live_x509(at(0)).unwrap()[0], issued("04", 30, 50));
        assert_eq!(
            store
                .live_x509(UNIX_EPOCH - Duration::from_secs(1))
                .unwrap()
                .len(),
            4
        );

        assert_eq!(
            store.prune_x509(at(100)).unwrap(),
            1,
            "only 04 expired before 100"
        );
        assert_eq!(store.prune_x509(at(100)).unwrap(), 0);
        assert_eq!(store.prune_x509(at(201)).unwrap(), 2);
        assert_eq!(serials(store.live_x509(at(0)).unwrap()), ["03"]);
    }

    #[test]
    fn values_outside_the_bounds_are_refused_on_write_and_bad_rows_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut row = entry("e1", "spiffe://example.org/a", &[]);
        row.selectors = (0..10_000).map(|i| format!("unix:uid:{i}")).collect();
        let err = store.insert_entry(&row).unwrap_err();
        assert!(matches!(err, StoreError::Unstorable { .. }), "{err}");
        let mut row = entry(&"x".repeat(100_000), "spiffe://example.org/a", &[]);
        let err = store.insert_entry(&row).unwrap_err();
        assert!(
            err.to_string().len() < 500,
            "error quotes the whole id: {err}"
        );
        row.id = "e1".into();
        row.created_at = UNIX_EPOCH - Duration::from_millis(1);
        assert!(matches!(
            store.insert_entry(&row),
            Err(StoreError::Unstorable { .. })
        ));
        let mut row = entry("e1", "spiffe://example.org/a", &[]);
        row.audiences = vec!["x".repeat(rows::MAX_LIST_ITEM_LEN + 1)];
        match store.insert_entry(&row) {
            Err(StoreError::Unstorable { problem, .. }) => {
                assert!(problem.starts_with("audiences: "), "{problem}")
            }
            other => panic!("expected Unstorable, got {other:?}"),
        }
        row.audiences = (0..=rows::MAX_LIST_ITEMS).map(|i| i.to_string()).collect();
        assert!(matches!(
            store.insert_entry(&row),
            Err(StoreError::Unstorable { .. })
        ));
        row.audiences = vec![];
        store.insert_entry(&row).unwrap();
        row.revision = 2;
        row.audiences = vec!["x".repeat(rows::MAX_LIST_ITEM_LEN + 1)];
        assert!(matches!(
            store.update_entry(&row),
            Err(StoreError::Unstorable { .. })
        ));
        assert!(store.delete_entry("e1").unwrap());
        assert!(matches!(
            store.record_x509_issued(&IssuedX509 {
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 2),
                ..issued("01", 0, 1)
            }),
            Err(StoreError::Unstorable { .. })
        ));
        assert!(store.entries().unwrap().is_empty());

        // Damage that keeps the file structurally sound: values no write
        // could have produced.
        store
            .insert_entry(&entry("good", "spiffe://example.org/good", &[]))
            .unwrap();
        store.record_x509_issued(&issued("0b", 0, 10)).unwrap();
        let conn = raw(dir.path());
        for (column, value) in [
            ("selectors", "'{\"not\": \"a list\"}'"),
            ("dns_names", "'[1, 2]'"),
            ("federates_with", "'[\"' || hex(zeroblob(300000)) || '\"]'"),
            ("created_at_ms", "-5"),
            ("revision", "-1"),
            ("x509_svid_ttl_ms", "9223372036854775807"),
            ("hint", "hex(zeroblob(5000))"),
            ("audiences", "'[\"https://a.internal\", 7]'"),
            // 257 items: one more than a write may store.
            (
                "audiences",
                "'[' || substr(replace(hex(zeroblob(257)), '00', '\"a\",'), 1, 1027) || ']'",
            ),
            // A flag is 0 or 1, strictly: no other value means "set".
            ("process_bound", "2"),
            ("process_bound", "-1"),
        ] {
            conn.execute_batch(&format!(
                "INSERT INTO entries SELECT 'bad', spiffe_id || '/bad', selectors, \
                 selector_key, x509_svid_ttl_ms, jwt_svid_ttl_ms, dns_names, hint, \
                 federates_with, created_at_ms + 1, updated_at_ms, revision, audiences, \
                 process_bound FROM entries WHERE id = 'good'; \
                 UPDATE entries SET {column} = {value} WHERE id = 'bad';"
            ))
            .unwrap();
            for result in [store.entries().map(|_| ()), store.entry("bad").map(|_| ())] {
                match result {
                    Err(StoreError::BadRow {
                        table, id, problem, ..
                    }) => {
                        assert_eq!(table, "entries");
                        assert_eq!(id, "\"bad\"");
                        assert!(problem.starts_with(column), "{column}: {problem}");
                    }
                    other => panic!("{column}: expected BadRow, got {other:?}"),
                }
            }
            assert!(store.entry("good").unwrap().is_some());
            conn.execute("DELETE FROM entries WHERE id = 'bad'", [])
                .unwrap();
        }

        // An id that cannot be read is named by its rowid.
        conn.execute(
            "UPDATE entries SET id = hex(zeroblob(1000)) WHERE id = 'good'",
            [],
        )
        .unwrap();
        match store.entries() {
            Err(StoreError::BadRow { id, .. }) => assert!(id.starts_with("at rowid"), "{id}"),
            other => panic!("expected BadRow, got {other:?}"),
        }
        conn.execute(
            "UPDATE issued_x509 SET not_after_ms = ?1",
            [rows::MAX_MILLIS + 1],
        )
        .unwrap();
        assert!(matches!(
            store.live_x509(UNIX_EPOCH - Duration::from_secs(1)),
            Err(StoreError::BadRow {
                table: "issued_x509",
                ..
            })
        ));
    }

    /// Stores `row` as a v1 build did: every v1 column, no audiences and no
    /// process binding.
    fn insert_v1_entry(store: &Store, row: &EntryRow) {
        let encoded = EncodedEntry::new(row).unwrap();
        let params: Vec<_> = entry_params(&encoded)
            .into_iter()
            .filter(|(name, _)| ![":audiences", ":process_bound"].contains(name))
            .collect();
        store
            .conn()
            .execute(
                "INSERT INTO entries (id, spiffe_id, selectors, selector_key, x509_svid_ttl_ms, \
                 jwt_svid_ttl_ms, dns_names, hint, federates_with, created_at_ms, updated_at_ms, \
                 revision) VALUES (:id, :spiffe_id, :selectors, :selector_key, \
                 :x509_svid_ttl_ms, :jwt_svid_ttl_ms, :dns_names, :hint, :federates_with, \
                 :created_at_ms, :updated_at_ms, :revision)",
                params.as_slice(),
            )
            .unwrap();
    }

    #[test]
    fn a_v1_database_upgrades_keeping_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = &migrations::STEPS[..1];
        let mut a = entry("a", "spiffe://example.org/a", &["unix:uid:1"]);
        a.audiences = vec![];
        let mut b = entry("b", "spiffe://example.org/b", &["unix:uid:2"]);
        b.audiences = vec![];
        b.created_at = at(1);
        {
            // What a v1 build wrote: no audiences or process_bound column, no
            // tasks or revoked_x509 table.
            let store = Store::open_with(dir.path(), v1).unwrap();
            assert_eq!(store.schema_version().unwrap(), 1);
            insert_v1_entry(&store, &a);
            insert_v1_entry(&store, &b);
            store.record_x509_issued(&issued("01", 0, 100)).unwrap();
        }
        // A v1 build reopens its own database (and nothing upgraded it).
        assert_eq!(
            Store::open_with(dir.path(), v1)
                .unwrap()
                .schema_version()
                .unwrap(),
            1
        );

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), 2);
        // Every v1 row reads back whole, with no audiences, and not process
        // bound: v1 entries shared one SVID per entry.
        assert!(!a.process_bound && !b.process_bound);
        assert_eq!(store.entries().unwrap(), [a.clone(), b]);
        assert_eq!(store.live_x509(at(0)).unwrap(), [issued("01", 0, 100)]);
        assert!(store.tasks_until(UNIX_EPOCH).unwrap().is_empty());
        assert!(store.revoked_x509(UNIX_EPOCH).unwrap().is_empty());

        // And the upgraded rows take audiences, process binding, tasks and
        // revocations like new ones.
        a.audiences = vec!["https://mcp.jira.internal".into()];
        a.process_bound = true;
        a.revision = 2;
        store.update_entry(&a).unwrap();
        assert_eq!(store.entry("a").unwrap(), Some(a.clone()));
        store.insert_task(&task("t1", 0, 100)).unwrap();
        assert!(store.revoke_x509(&revoked("01", 50, 100)).unwrap());
        drop(store);

        // A v1 build now refuses the database rather than misread it.
        match Store::open_with(dir.path(), v1) {
            Err(StoreError::NewerSchema {
                found: 2, known: 1, ..
            }) => {}
            other => panic!("expected NewerSchema, got {other:?}"),
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.task("t1").unwrap(), Some(task("t1", 0, 100)));
        assert_eq!(store.entry("a").unwrap(), Some(a));
        assert_eq!(store.revoked_x509(at(0)).unwrap(), [revoked("01", 50, 100)]);
    }

    #[test]
    fn revocations_list_until_expiry_and_the_first_record_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.revoked_x509(UNIX_EPOCH).unwrap().is_empty());
        // serial, revoked at, not after
        for (serial, revoked_at, not_after) in [
            ("0c", 20, 300),
            ("0b", 10, 200),
            ("0a", 10, 100),
            ("ff", 0, 50),
        ] {
            assert!(
                store
                    .revoke_x509(&revoked(serial, revoked_at, not_after))
                    .unwrap()
            );
        }
        let listed = |ms| serials(&store.revoked_x509(at(ms)).unwrap()).join(",");

        // Oldest revocation first, ties by serial.
        assert_eq!(listed(0), "ff,0a,0b,0c");
        assert_eq!(listed(49), "ff,0a,0b,0c");
        // A certificate expiring at `now` has expired.
        assert_eq!(listed(50), "0a,0b,0c");
        assert_eq!(listed(99), "0a,0b,0c");
        assert_eq!(listed(100), "0b,0c");
        assert_eq!(listed(299), "0c");
        assert_eq!(listed(300), "");
        assert_eq!(
            store
                .revoked_x509(UNIX_EPOCH - Duration::from_secs(1))
                .unwrap()
                .len(),
            4
        );

        // Revoking again keeps the first record whole: CA, time, expiry and
        // reason.
        let first = revoked("0b", 10, 200);
        let again = RevokedX509 {
            ca_id: "ca-2".into(),
            revoked_at: at(15),
            not_after: at(900),
            reason: "operator".into(),
            ..first.clone()
        };
        assert!(!store.revoke_x509(&again).unwrap());
        assert!(!store.revoke_x509(&first).unwrap());
        assert_eq!(listed(150), "0b,0c");
        assert_eq!(store.revoked_x509(at(150)).unwrap()[0], first);
        // Serials are text: another case is another serial.
        assert!(store.revoke_x509(&revoked("0B", 30, 200)).unwrap());
        assert_eq!(listed(150), "0b,0c,0B");

        // And all of it survives a restart.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let listed = |ms| serials(&store.revoked_x509(at(ms)).unwrap()).join(",");
        assert_eq!(listed(0), "ff,0a,0b,0c,0B");
        assert_eq!(store.revoked_x509(at(150)).unwrap()[0], first);

        // Strictly before: a certificate expiring at `before` is kept.
        assert_eq!(store.prune_revoked_x509(at(50)).unwrap(), 0);
        assert_eq!(store.prune_revoked_x509(at(51)).unwrap(), 1);
        assert_eq!(store.prune_revoked_x509(at(51)).unwrap(), 0);
        assert_eq!(listed(0), "0a,0b,0c,0B");
        assert_eq!(store.prune_revoked_x509(at(201)).unwrap(), 3);
        assert_eq!(listed(0), "0c");
        // A pruned serial's record is gone: revoking it again records anew.
        assert!(store.revoke_x509(&revoked("ff", 60, 70)).unwrap());
        assert_eq!(listed(0), "0c,ff");
    }

    #[test]
    fn revocation_values_outside_the_bounds_are_refused_on_write_and_bad_rows_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let long = |n: usize| "x".repeat(n);
        let last = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64);

        // Every bound, at its limit, round trips.
        let widest = RevokedX509 {
            serial: long(MAX_ID_LEN),
            ca_id: long(MAX_ID_LEN),
            revoked_at: UNIX_EPOCH,
            not_after: last,
            reason: long(rows::MAX_REASON_LEN),
        };
        assert!(store.revoke_x509(&widest).unwrap());
        assert_eq!(store.revoked_x509(UNIX_EPOCH).unwrap(), [widest]);
        assert_eq!(store.prune_revoked_x509(last).unwrap(), 0);
        store
            .conn()
            .execute("DELETE FROM revoked_x509", [])
            .unwrap();

        // One past each bound is refused, naming the field.
        type Damage = fn(&mut RevokedX509);
        let refused: [(&str, Damage); 6] = [
            ("serial", |r| r.serial = "x".repeat(MAX_ID_LEN + 1)),
            ("ca_id", |r| r.ca_id = "x".repeat(MAX_ID_LEN + 1)),
            ("revoked_at", |r| {
                r.revoked_at = UNIX_EPOCH - Duration::from_millis(1)
            }),
            ("not_after", |r| {
                r.not_after = UNIX_EPOCH - Duration::from_millis(1)
            }),
            ("not_after", |r| {
                r.not_after = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64 + 1)
            }),
            ("reason", |r| {
                r.reason = "x".repeat(rows::MAX_REASON_LEN + 1)
            }),
        ];
        for (field, damage) in refused {
            let mut record = revoked("0a", 0, 100);
            damage(&mut record);
            match store.revoke_x509(&record) {
                Err(StoreError::Unstorable {
                    table: "revoked_x509",
                    id,
                    problem,
                }) => {
                    assert!(problem.starts_with(&format!("{field}: ")), "{problem}");
                    assert!(id.len() < 100, "error quotes the whole serial: {id}");
                }
                other => panic!("{field}: expected Unstorable, got {other:?}"),
            }
        }
        assert!(store.revoked_x509(UNIX_EPOCH).unwrap().is_empty());

        // Damage that keeps the file structurally sound (STRICT still holds
        // the types): values no write could have produced.
        assert!(store.revoke_x509(&revoked("good", 0, 100)).unwrap());
        let conn = raw(dir.path());
        let ext = |n: usize| format!("hex(zeroblob({}))", n.div_ceil(2));
        for (assignments, column) in [
            (format!("ca_id = {}", ext(MAX_ID_LEN + 1)), "ca_id"),
            ("revoked_at_ms = -1".to_owned(), "revoked_at_ms"),
            (
                format!("not_after_ms = {}", rows::MAX_MILLIS + 1),
                "not_after_ms",
            ),
            (
                format!("reason = {}", ext(rows::MAX_REASON_LEN + 1)),
                "reason",
            ),
            ("reason = CAST(x'ff' AS TEXT)".into(), "reason"),
        ] {
            conn.execute_batch(&format!(
                "INSERT INTO revoked_x509 SELECT 'bad', ca_id, revoked_at_ms + 1, \
                 not_after_ms, reason FROM revoked_x509 WHERE serial = 'good'; \
                 UPDATE revoked_x509 SET {assignments} WHERE serial = 'bad';"
            ))
            .unwrap();
            match store.revoked_x509(UNIX_EPOCH) {
                Err(StoreError::BadRow {
                    table, id, problem, ..
                }) => {
                    assert_eq!(table, "revoked_x509");
                    assert_eq!(id, "\"bad\"");
                    assert!(
                        problem.starts_with(&format!("{column}: ")),
                        "{assignments}: {problem}"
                    );
                }
                other => panic!("{assignments}: expected BadRow, got {other:?}"),
            }
            conn.execute("DELETE FROM revoked_x509 WHERE serial = 'bad'", [])
                .unwrap();
        }
        assert_eq!(
            store.revoked_x509(UNIX_EPOCH).unwrap(),
            [revoked("good", 0, 100)]
        );

        // A serial that cannot be read is named by its rowid.
        conn.execute(
            &format!(
                "UPDATE revoked_x509 SET serial = {} WHERE serial = 'good'",
                ext(MAX_ID_LEN + 1)
            ),
            [],
        )
        .unwrap();
        match store.revoked_x509(UNIX_EPOCH) {
            Err(StoreError::BadRow { table, id, .. }) => {
                assert_eq!(table, "revoked_x509");
                assert!(id.starts_with("at rowid"), "{id}");
            }
            other => panic!("expected BadRow, got {other:?}"),
        }
    }

    #[test]
    fn a_task_is_stored_active_and_its_first_end_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut t1 = task("t1", 0, 60_000);
        t1.owner_executable = None;
        t1.owner_exe_sha256 = None;
        t1.bind_x5t = None;
        t1.tools = vec![];
        t1.tokens_issued = 2;
        store.insert_task(&t1).unwrap();
        assert_eq!(store.task("t1").unwrap(), Some(t1.clone()));
        assert_eq!(store.task("missing").unwrap(), None);

        let err = store.insert_task(&task("t1", 5, 10)).unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
        assert!(err.to_string().contains("task \"t1\""), "{err}");

        // An end arrives only through end_task.
        let mut born_ended = task("t2", 0, 60_000);
        born_ended.ended = Some(end(1, "completed"));
        match store.insert_task(&born_ended) {
            Err(StoreError::Unstorable {
                table: "tasks",
                problem,
                ..
            }) => assert!(problem.starts_with("ended: "), "{problem}"),
            other => panic!("expected Unstorable, got {other:?}"),
        }
        assert_eq!(store.task("t2").unwrap(), None);

        assert!(store.end_task("t1", &end(30, "completed"), 7).unwrap());
        let ended = TaskRow {
            ended: Some(end(30, "completed")),
            tokens_issued: 7,
            ..t1.clone()
        };
        assert_eq!(store.task("t1").unwrap(), Some(ended.clone()));
        // A later end changes nothing: not the time, the reason or the count.
        assert!(!store.end_task("t1", &end(40, "owner exited"), 9).unwrap());
        assert_eq!(store.task("t1").unwrap(), Some(ended.clone()));
        assert!(!store.end_task("missing", &end(40, "completed"), 0).unwrap());
        // An ended task's id stays taken, so it cannot be restarted active.
        assert!(matches!(
            store.insert_task(&t1),
            Err(StoreError::Duplicate { .. })
        ));

        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.task("t1").unwrap(), Some(ended));
    }

    #[test]
    fn a_batch_of_tasks_is_stored_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_tasks(&[]).unwrap();

        // A duplicate inside the batch: neither copy, nor the rows before it.
        let err = store
            .insert_tasks(&[task("a", 0, 10), task("b", 0, 10), task("a", 1, 10)])
            .unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
        assert!(err.to_string().contains("task \"a\""), "{err}");
        assert!(store.tasks_until(UNIX_EPOCH).unwrap().is_empty());

        store
            .insert_tasks(&[task("a", 0, 10), task("b", 1, 10)])
            .unwrap();
        // A duplicate of a stored task, last in the batch.
        let err = store
            .insert_tasks(&[task("c", 2, 10), task("d", 3, 10), task("b", 4, 10)])
            .unwrap_err();
        assert!(err.to_string().contains("task \"b\""), "{err}");
        // One row that cannot be stored refuses the batch before any write.
        let mut bad = task("e", 5, 10);
        bad.owner_pid = 0;
        let err = store.insert_tasks(&[task("c", 2, 10), bad]).unwrap_err();
        assert!(matches!(err, StoreError::Unstorable { .. }), "{err}");
        assert_eq!(
            task_ids(&store.tasks_until(UNIX_EPOCH).unwrap()),
            ["a", "b"]
        );
        assert_eq!(store.task("b").unwrap(), Some(task("b", 1, 10)));
    }

    #[test]
    fn a_batch_of_ends_is_one_transaction_and_first_ends_win() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .insert_tasks(&[task("a", 0, 100), task("b", 1, 100), task("c", 2, 100)])
            .unwrap();
        assert!(store.end_task("b", &end(5, "completed"), 1).unwrap());
        assert_eq!(store.end_tasks(&[]).unwrap(), 0);

        // One end that cannot be stored refuses the batch: "a" stays active.
        let err = store
            .end_tasks(&[
                ("a".into(), end(6, "owner exited"), 3),
                ("c".into(), end(6, &"r".repeat(rows::MAX_REASON_LEN + 1)), 0),
            ])
            .unwrap_err();
        match err {
            StoreError::Unstorable { id, problem, .. } => {
                assert_eq!(id, "\"c\"");
                assert!(problem.starts_with("ended.reason: "), "{problem}");
            }
            other => panic!("expected Unstorable, got {other:?}"),
        }
        assert_eq!(store.task("a").unwrap().unwrap().ended, None);

        let changed = store
            .end_tasks(&[
                ("a".into(), end(7, "owner exited"), 3),
                ("b".into(), end(7, "revoked"), 9),
                ("missing".into(), end(7, "revoked"), 0),
                ("a".into(), end(8, "deadline"), 4),
            ])
            .unwrap();
        assert_eq!(changed, 1, "only a was active");
        let a = store.task("a").unwrap().unwrap();
        assert_eq!(
            (a.ended, a.tokens_issued),
            (Some(end(7, "owner exited")), 3)
        );
        let b = store.task("b").unwrap().unwrap();
        assert_eq!((b.ended, b.tokens_issued), (Some(end(5, "completed")), 1));
        assert_eq!(store.task("c").unwrap().unwrap().ended, None);
    }

    #[test]
    fn tasks_list_until_their_deadline_and_prune_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // id, created at, deadline
        for (id, created_at, deadline) in [
            ("late", 30, 300),
            ("b", 10, 200),
            ("a", 10, 100),
            ("first", 0, 50),
        ] {
            store.insert_task(&task(id, created_at, deadline)).unwrap();
        }
        assert!(store.end_task("b", &end(20, "completed"), 1).unwrap());
        let until = |ms| task_ids(&store.tasks_until(at(ms)).unwrap()).join(",");

        // Oldest first, ties by id; ended tasks too, until their deadline.
        assert_eq!(until(0), "first,a,b,late");
        assert_eq!(until(49), "first,a,b,late");
        // A deadline equal to `now` has passed.
        assert_eq!(until(50), "a,b,late");
        assert_eq!(until(99), "a,b,late");
        assert_eq!(until(100), "b,late");
        assert_eq!(until(199), "b,late");
        assert_eq!(until(200), "late");
        assert_eq!(until(300), "");
        assert_eq!(
            store.tasks_until(at(150)).unwrap()[0],
            TaskRow {
                ended: Some(end(20, "completed")),
                tokens_issued: 1,
                ..task("b", 10, 200)
            }
        );
        assert_eq!(
            store
                .tasks_until(UNIX_EPOCH - Duration::from_secs(1))
                .unwrap()
                .len(),
            4
        );

        // Strictly before: a deadline equal to `before` is kept.
        assert_eq!(store.prune_tasks(at(50)).unwrap(), 0);
        assert_eq!(store.prune_tasks(at(51)).unwrap(), 1);
        assert_eq!(store.prune_tasks(at(51)).unwrap(), 0);
        // Ended or not.
        assert_eq!(store.prune_tasks(at(250)).unwrap(), 2);
        assert_eq!(until(0), "late");
        assert_eq!(store.task("b").unwrap(), None);
        assert!(!store.end_task("b", &end(260, "completed"), 0).unwrap());
    }

    #[test]
    fn task_values_outside_the_bounds_are_refused_on_write_and_bad_rows_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let long = |n: usize| "x".repeat(n);

        // Every bound, at its limit, round trips.
        let widest = TaskRow {
            id: long(MAX_ID_LEN),
            owner_pid: i32::MAX,
            owner_start_time: i64::MAX as u64,
            owner_uid: u32::MAX,
            owner_executable: Some(long(rows::MAX_PATH_LEN)),
            owner_exe_sha256: Some(long(MAX_ID_LEN)),
            spiffe_id: long(rows::MAX_SPIFFE_ID_LEN),
            entry_id: long(MAX_ID_LEN),
            audience: long(rows::MAX_SPIFFE_ID_LEN),
            intent: long(MAX_INTENT_LEN),
            tools: (0..rows::MAX_LIST_ITEMS).map(|i| i.to_string()).collect(),
            bind_x5t: Some(long(MAX_ID_LEN)),
            created_at: UNIX_EPOCH,
            deadline: UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64),
            ended: None,
            tokens_issued: i64::MAX as u64,
            scope_descendants: true,
        };
        store.insert_task(&widest).unwrap();
        let reason = long(rows::MAX_REASON_LEN);
        let last = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64);
        let widest_end = TaskEnd { at: last, reason };
        assert!(
            store
                .end_task(&widest.id, &widest_end, i64::MAX as u64)
                .unwrap()
        );
        let stored = store.task(&widest.id).unwrap().unwrap();
        assert_eq!(stored.ended, Some(widest_end));
        assert_eq!(
            stored,
            TaskRow {
                ended: stored.ended.clone(),
                ..widest.clone()
            }
        );
        assert_eq!(store.prune_tasks(last).unwrap(), 0);
        store.conn().execute("DELETE FROM tasks", []).unwrap();

        // One past each bound is refused, naming the field.
        type Damage = fn(&mut TaskRow);
        let refused: [(&str, Damage); 17] = [
            ("id", |t| t.id = "x".repeat(MAX_ID_LEN + 1)),
            ("owner_pid", |t| t.owner_pid = 0),
            ("owner_pid", |t| t.owner_pid = -1),
            ("owner_start_time", |t| {
                t.owner_start_time = i64::MAX as u64 + 1
            }),
            ("owner_executable", |t| {
                t.owner_executable = Some("x".repeat(rows::MAX_PATH_LEN + 1))
            }),
            ("owner_exe_sha256", |t| {
                t.owner_exe_sha256 = Some("x".repeat(MAX_ID_LEN + 1))
            }),
            ("spiffe_id", |t| {
                t.spiffe_id = "x".repeat(rows::MAX_SPIFFE_ID_LEN + 1)
            }),
            ("entry_id", |t| t.entry_id = "x".repeat(MAX_ID_LEN + 1)),
            ("audience", |t| {
                t.audience = "x".repeat(rows::MAX_SPIFFE_ID_LEN + 1)
            }),
            ("intent", |t| t.intent = "x".repeat(MAX_INTENT_LEN + 1)),
            ("tools", |t| {
                t.tools = (0..=rows::MAX_LIST_ITEMS).map(|i| i.to_string()).collect()
            }),
            ("tools", |t| {
                t.tools = vec!["x".repeat(rows::MAX_LIST_ITEM_LEN + 1)]
            }),
            ("bind_x5t", |t| {
                t.bind_x5t = Some("x".repeat(MAX_ID_LEN + 1))
            }),
            ("created_at", |t| {
                t.created_at = UNIX_EPOCH - Duration::from_millis(1)
            }),
            ("deadline", |t| {
                t.deadline = UNIX_EPOCH + Duration::from_millis(rows::MAX_MILLIS as u64 + 1)
            }),
            ("tokens_issued", |t| t.tokens_issued = u64::MAX),
            ("ended", |t| t.ended = Some(end(1, "completed"))),
        ];
        for (field, damage) in refused {
            let mut row = task("t", 0, 100);
            damage(&mut row);
            for result in [
                store.insert_task(&row),
                store.insert_tasks(&[task("ok", 0, 100), row.clone()]),
            ] {
                match result {
                    Err(StoreError::Unstorable {
                        table: "tasks",
                        problem,
                        ..
                    }) => assert!(problem.starts_with(&format!("{field}: ")), "{problem}"),
                    other => panic!("{field}: expected Unstorable, got {other:?}"),
                }
            }
        }
        assert!(store.tasks_until(UNIX_EPOCH).unwrap().is_empty());

        store.insert_task(&task("good", 0, 100)).unwrap();
        for (field, bad_end, tokens) in [
            ("tokens_issued", end(0, "completed"), u64::MAX),
            ("ended.reason", end(0, &long(rows::MAX_REASON_LEN + 1)), 0),
            (
                "ended.at",
                TaskEnd {
                    at: UNIX_EPOCH - Duration::from_millis(1),
                    reason: "completed".into(),
                },
                0,
            ),
        ] {
            for result in [
                store.end_task("good", &bad_end, tokens).map(|_| ()),
                store
                    .end_tasks(&[("good".into(), bad_end.clone(), tokens)])
                    .map(|_| ()),
            ] {
                match result {
                    Err(StoreError::Unstorable { problem, .. }) => {
                        assert!(problem.starts_with(&format!("{field}: ")), "{problem}")
                    }
                    other => panic!("{field}: expected Unstorable, got {other:?}"),
                }
            }
        }
        assert_eq!(store.task("good").unwrap(), Some(task("good", 0, 100)));

        // Damage that keeps the file structurally sound (STRICT still holds
        // the types): values no write could have produced.
        let conn = raw(dir.path());
        let ext = |n: usize| format!("hex(zeroblob({}))", n.div_ceil(2));
        for (assignments, column) in [
            ("owner_pid = 0".to_owned(), "owner_pid"),
            ("owner_pid = 2147483648".into(), "owner_pid"),
            ("owner_start_time = -1".into(), "owner_start_time"),
            ("owner_uid = -1".into(), "owner_uid"),
            ("owner_uid = 4294967296".into(), "owner_uid"),
            (
                format!("owner_executable = {}", ext(rows::MAX_PATH_LEN + 1)),
                "owner_executable",
            ),
            (
                format!("owner_exe_sha256 = {}", ext(MAX_ID_LEN + 1)),
                "owner_exe_sha256",
            ),
            (
                format!("spiffe_id = {}", ext(rows::MAX_SPIFFE_ID_LEN + 1)),
                "spiffe_id",
            ),
            (format!("entry_id = {}", ext(MAX_ID_LEN + 1)), "entry_id"),
            (
                format!("audience = {}", ext(rows::MAX_SPIFFE_ID_LEN + 1)),
                "audience",
            ),
            (format!("intent = {}", ext(MAX_INTENT_LEN + 1)), "intent"),
            ("tools = '[\"jira.search\", 1]'".into(), "tools"),
            ("tools = 'jira.search'".into(), "tools"),
            (format!("bind_x5t = {}", ext(MAX_ID_LEN + 1)), "bind_x5t"),
            ("created_at_ms = -5".into(), "created_at_ms"),
            (
                format!("deadline_ms = {}", rows::MAX_MILLIS + 1),
                "deadline_ms",
            ),
            // An end half written: either half alone is damage.
            ("ended_at_ms = 5".into(), "end_reason"),
            ("end_reason = 'completed'".into(), "ended_at_ms"),
            (
                "ended_at_ms = -1, end_reason = 'completed'".into(),
                "ended_at_ms",
            ),
            (
                format!(
                    "ended_at_ms = 5, end_reason = {}",
                    ext(rows::MAX_REASON_LEN + 1)
                ),
                "end_reason",
            ),
            ("tokens_issued = -1".into(), "tokens_issued"),
            ("scope_descendants = 2".into(), "scope_descendants"),
        ] {
            conn.execute_batch(&format!(
                "INSERT INTO tasks SELECT 'bad', owner_pid, owner_start_time, owner_uid, \
                 owner_executable, owner_exe_sha256, spiffe_id, entry_id, audience, intent, \
                 tools, bind_x5t, created_at_ms + 1, deadline_ms, ended_at_ms, end_reason, \
                 tokens_issued, scope_descendants FROM tasks WHERE id = 'good'; \
                 UPDATE tasks SET {assignments} WHERE id = 'bad';"
            ))
            .unwrap();
            let listed = store
                .tasks_until(UNIX_EPOCH - Duration::from_secs(1))
                .map(|_| ());
            for result in [listed, store.task("bad").map(|_| ())] {
                match result {
                    Err(StoreError::BadRow {
                        table, id, problem, ..
                    }) => {
                        assert_eq!(table, "tasks");
                        assert_eq!(id, "\"bad\"");
                        assert!(
                            problem.starts_with(&format!("{column}: ")),
                            "{assignments}: {problem}"
                        );
                    }
                    other => panic!("{assignments}: expected BadRow, got {other:?}"),
                }
            }
            assert!(store.task("good").unwrap().is_some());
            conn.execute("DELETE FROM tasks WHERE id = 'bad'", [])
                .unwrap();
        }

        // An id that cannot be read is named by its rowid.
        conn.execute(
            &format!(
                "UPDATE tasks SET id = {} WHERE id = 'good'",
                ext(MAX_ID_LEN + 1)
            ),
            [],
        )
        .unwrap();
        match store.tasks_until(UNIX_EPOCH) {
            Err(StoreError::BadRow { table, id, .. }) => {
                assert_eq!(table, "tasks");
                assert!(id.starts_with("at rowid"), "{id}");
            }
            other => panic!("expected BadRow, got {other:?}"),
        }
    }

    #[test]
    fn clones_share_one_connection_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = store.clone();
                s.spawn(move || {
                    for i in 0..25 {
                        let id = format!("t{t}-{i}");
                        store
                            .insert_entry(&entry(&id, &format!("spiffe://example.org/{id}"), &[]))
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(store.entries().unwrap().len(), 100);
    }

    /// Acknowledged writes survive the writer being killed at an arbitrary
    /// point, over several kill/restart rounds on the same database (each
    /// round also recovers the WAL the previous victim left): entries (with
    /// their process binding), records, revocations (first record kept),
    /// task batches and task ends. A batch cut by the kill is there
    /// whole or not at all. SIGKILL keeps
    /// the page cache, so this proves commit-before-acknowledge and recovery,
    /// not power-loss durability, which rests on `synchronous = FULL`
    /// (checked in `migrates_from_empty_and_reopens_idempotently`).
    #[test]
    fn acknowledged_writes_survive_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut acknowledged = Vec::new();
        for (round, kill_after) in [(0, 150), (1, 250), (2, 350)] {
            acknowledged.extend(run_writer_until_killed(dir.path(), round, kill_after));

            let store = Store::open(dir.path()).unwrap();
            // Every row decodes, and every acknowledged write is there.
            let stored: HashMap<String, EntryRow> = store
                .entries()
                .unwrap()
                .into_iter()
                .map(|e| (e.id.clone(), e))
                .collect();
            let records: Vec<String> = store
                .live_x509(UNIX_EPOCH)
                .unwrap()
                .into_iter()
                .map(|r| r.serial)
                .collect();
            let revocations: HashMap<String, RevokedX509> = store
                .revoked_x509(UNIX_EPOCH)
                .unwrap()
                .into_iter()
                .map(|r| (r.serial.clone(), r))
                .collect();
            for id in &acknowledged {
                assert!(
                    stored.contains_key(id),
                    "round {round}: acknowledged entry {id} lost"
                );
                assert!(
                    records.contains(id),
                    "round {round}: acknowledged record {id} lost"
                );
                assert!(
                    revocations.contains_key(id),
                    "round {round}: acknowledged revocation {id} lost"
                );
            }
            // Every entry has the flag its write set, and every revocation,
            // acknowledged or cut short by the kill, is its first record:
            // never the second one the writer tried.
            for (id, row) in &stored {
                let i = crash_i(id);
                assert_eq!(row.process_bound, i % 2 == 1, "round {round}: {id}");
            }
            for (serial, record) in &revocations {
                assert_eq!(
                    *record,
                    crash_revocation(serial),
                    "round {round}: revocation {serial}"
                );
            }

            let tasks: HashMap<String, TaskRow> = store
                .tasks_until(UNIX_EPOCH)
                .unwrap()
                .into_iter()
                .map(|t| (t.id.clone(), t))
                .collect();
            let state = |id: &str| -> Option<Option<TaskEnd>> {
                let task = tasks.get(id)?;
                let tokens = if task.ended.is_some() { crash_i(id) } else { 0 };
                assert_eq!(task.tokens_issued, tokens, "round {round}: task {id}");
                Some(task.ended.clone())
            };
            // Every task, acknowledged or cut short by the kill, is in a
            // state some prefix of its writes produced: both tasks of a batch
            // or neither, both ends of a batch or neither.
            let bases: BTreeSet<&str> = tasks
                .keys()
                .map(|id| id.rsplit_once('-').unwrap().0)
                .collect();
            for base in &bases {
                let (a, b) = (format!("{base}-a"), format!("{base}-b"));
                let (Some(a_end), Some(b_end)) = (state(&a), state(&b)) else {
                    panic!("round {round}: a batch of tasks was stored in part: {base}");
                };
                let states = crash_task_states(crash_i(base));
                assert!(
                    states.contains(&(a_end.clone(), b_end.clone())),
                    "round {round}: {base} ended as {a_end:?} and {b_end:?}, no prefix of {states:?}"
                );
            }
            // And an acknowledged task has all its writes.
            for id in &acknowledged {
                let final_state = crash_task_states(crash_i(id)).pop().unwrap();
                let a = state(&format!("{id}-a"));
                let b = state(&format!("{id}-b"));
                assert_eq!(
                    (a, b),
                    (Some(final_state.0), Some(final_state.1)),
                    "round {round}: acknowledged tasks of {id} lost or not ended"
                );
            }
        }
    }

    /// The revocation the crash writer records first for serial `id`.
    fn crash_revocation(id: &str) -> RevokedX509 {
        let i = crash_i(id);
        RevokedX509 {
            serial: id.to_owned(),
            ..revoked("", i, i + 3_600_000)
        }
    }

    /// The write number in a crash writer's id (`r1-00042`, `r1-00042-a`).
    fn crash_i(id: &str) -> u64 {
        id.split('-').nth(1).unwrap().parse().unwrap()
    }

    /// The ends of the two tasks the crash writer's `i`-th write stores
    /// (`-a`, `-b`), after each of its task writes in turn: as inserted,
    /// after `end_task` (even `i`), after `end_tasks` (`i` a multiple of 3).
    /// Mirrors [`child_crash_writer`].
    fn crash_task_states(i: u64) -> Vec<(Option<TaskEnd>, Option<TaskEnd>)> {
        let mut states = vec![(None, None)];
        let (mut a, mut b) = (None, None);
        if i.is_multiple_of(2) {
            a = Some(end(i, "completed"));
            states.push((a.clone(), b.clone()));
        }
        if i.is_multiple_of(3) {
            // The first end wins: an `a` ended above keeps "completed".
            a.get_or_insert(end(i, "revoked"));
            b = Some(end(i, "owner exited"));
            states.push((a, b));
        }
        states
    }

    fn run_writer_until_killed(dir: &Path, round: u32, kill_after: usize) -> Vec<String> {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CRASH_CHILD, "--nocapture", "--ignored"])
            .env(CRASH_DIR_VAR, dir)
            .env(CRASH_ROUND_VAR, round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut acks = Vec::new();
        // Only whole lines count: a line cut by the kill was never finished.
        let mut read_ack = |acks: &mut Vec<String>| -> bool {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                return false;
            }
            if let Some(id) = line.strip_prefix("ack ").and_then(|l| l.strip_suffix('\n')) {
                acks.push(id.to_owned());
            }
            true
        };
        while acks.len() < kill_after {
            assert!(
                read_ack(&mut acks),
                "the writer exited after {} acknowledgements",
                acks.len()
            );
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        // Acknowledgements already in the pipe count too.
        while read_ack(&mut acks) {}
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status}");
        acks
    }

    #[test]
    #[ignore = "child process of store::tests::acknowledged_writes_survive_sigkill"]
    fn child_crash_writer() {
        let dir = std::env::var(CRASH_DIR_VAR).expect("run by acknowledged_writes_survive_sigkill");
        let round =
            std::env::var(CRASH_ROUND_VAR).expect("run by acknowledged_writes_survive_sigkill");
        let store = Store::open(Path::new(&dir)).unwrap();
        let mut stdout = io::stdout().lock();
        for i in 0..CRASH_CHILD_MAX_WRITES {
            let id = format!("r{round}-{i:05}");
            let mut row = entry(&id, &format!("spiffe://example.org/{id}"), &["unix:uid:0"]);
            row.created_at = at(i);
            row.process_bound = i % 2 == 1;
            store.insert_entry(&row).unwrap();
            store
                .record_x509_issued(&IssuedX509 {
                    serial: id.clone(),
                    entry_id: id.clone(),
                    ..issued("", i, i + 3_600_000)
                })
                .unwrap();
            let first = crash_revocation(&id);
            assert!(store.revoke_x509(&first).unwrap());
            let second = RevokedX509 {
                revoked_at: at(i + 1),
                reason: "operator".into(),
                ..first
            };
            assert!(!store.revoke_x509(&second).unwrap());
            let (a, b) = (format!("{id}-a"), format!("{id}-b"));
            store
                .insert_tasks(&[task(&a, i, i + 3_600_000), task(&b, i, i + 3_600_000)])
                .unwrap();
            if i.is_multiple_of(2) {
                assert!(store.end_task(&a, &end(i, "completed"), i).unwrap());
            }
            if i.is_multiple_of(3) {
                let ended = store
                    .end_tasks(&[
                        (b.clone(), end(i, "owner exited"), i),
                        (a.clone(), end(i, "revoked"), i),
                    ])
                    .unwrap();
                assert_eq!(ended, if i.is_multiple_of(2) { 1 } else { 2 });
            }
            writeln!(stdout, "ack {id}").unwrap();
            stdout.flush().unwrap();
        }
    }
}
