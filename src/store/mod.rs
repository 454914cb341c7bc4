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
//! The files: this one opens the database (file modes, pragmas, integrity
//! and identity checks: `open_connection`, which the server's SQLite store
//! opens its own database through, with its own `application_id` and
//! steps) and holds the [`Store`] handle, its error, and the one reader
//! every query goes through (`select`); `entries`, `x509`
//! (issued and revoked X.509-SVIDs) and `tasks` add the `Store` methods of
//! each table; `rows` holds the row types and the column codec with its
//! bounds; `migrations` the append-only schema steps. The tests are in
//! `tests/`, a file per topic.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, Params};

use crate::trusted_fs::{self, TrustedFsError};

mod entries;
mod migrations;
mod rows;
mod tasks;
mod x509;

pub use rows::{EntryRow, IssuedX509, MAX_INTENT_LEN, RevokedX509, TaskEnd, TaskRow};

/// The column codec (bounds, times as unix milliseconds, flags), shared
/// with the server's SQLite store so both read and write columns alike.
pub(crate) mod codec {
    pub(crate) use super::rows::{
        Problem, bounded, decode_flag, decode_integer, decode_text, decode_time, encode_count,
        encode_flag, encode_time,
    };
}

use rows::{MAX_ID_LEN, Problem, RowCodec};

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
    #[error("{path}")]
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
    #[error("opening {path}")]
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
    #[error("a store query failed")]
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
        let conn = open_connection(&path, migrations::APPLICATION_ID, steps)?;
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

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot leave the connection half
        // way: an open transaction rolls back when its guard unwinds.
        self.shared
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

/// Opens (creating it 0600 if missing) the SQLite database at `path` as
/// tether keeps its databases: owner-only files checked with `trusted_fs`,
/// write-ahead logging with `synchronous = FULL`, `quick_check` before
/// anything is written, a database that is not this one's
/// (`application_id`, once it has a schema) or has a schema newer than
/// `steps` refused untouched, then the pending `steps` applied (the first
/// sets `application_id`). The agent's store and the server's SQLite store
/// both open through here. The directory of `path` must exist and be
/// trusted (its owner checks it).
pub(crate) fn open_connection(
    path: &Path,
    application_id: i64,
    steps: &[&str],
) -> Result<Connection, StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    prepare_files(dir, path)?;

    // No CREATE: the file exists by now, and one that vanished meanwhile
    // must not be replaced by an empty database. NO_MUTEX: the caller
    // serialises access. NOFOLLOW: a path swapped for a symlink is refused.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_error(path))?;

    // Until every check has passed, closing must not checkpoint: that
    // would copy frames from a leftover -wal into a database we refuse.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(open_error(path))?;
    configure(&conn).map_err(open_error(path))?;
    check_integrity(&conn, path)?;
    check_identity(&conn, path, application_id, steps)?;

    // Persistent in the file header; the first write since `quick_check`.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error(path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    migrations::apply(&mut conn, steps).map_err(open_error(path))?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
        .map_err(open_error(path))?;
    Ok(conn)
}

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

/// Refuses another program's database (or the other role's: the agent's and
/// the server's differ in `application_id`), and one with a schema newer
/// than `steps` produce.
fn check_identity(
    conn: &Connection,
    path: &Path,
    application_id: i64,
    steps: &[&str],
) -> Result<(), StoreError> {
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
    if app_id != application_id {
        return Err(not_ours(format!(
            "its application_id is {app_id:#x}, not the expected {application_id:#x}"
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

/// Whether SQLite reports the database damaged (or not a database).
pub(crate) fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

// === reading and writing rows ===

impl Store {
    /// Runs one statement on its own (SQLite commits it before returning);
    /// returns how many rows it changed.
    fn execute(&self, sql: &str, params: impl Params) -> Result<usize, StoreError> {
        let conn = self.conn();
        conn.prepare(sql)
            .and_then(|mut stmt| stmt.execute(params))
            .map_err(self.sql())
    }

    /// The rows of `codec`'s table that `clause` (`WHERE`, `ORDER BY`)
    /// selects, decoded: the one way rows are read back. A row that does not
    /// decode fails the whole read with [`StoreError::BadRow`].
    fn select<T, const N: usize>(
        &self,
        codec: &RowCodec<T, N>,
        clause: &str,
        params: impl Params,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.conn();
        // The rowid after the decoded columns names a row whose first column
        // cannot be read (`row_label`).
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {}, rowid FROM {} {clause}",
                codec.columns, codec.table
            ))
            .map_err(self.sql())?;
        let mut rows = stmt.query(params).map_err(self.sql())?;
        let mut decoded = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql())? {
            decoded.push(decode_row(codec, row)?);
        }
        Ok(decoded)
    }
}

fn decode_row<T, const N: usize>(
    codec: &RowCodec<T, N>,
    row: &rusqlite::Row<'_>,
) -> Result<T, StoreError> {
    let mut values = [ValueRef::Null; N];
    for (i, value) in values.iter_mut().enumerate() {
        *value = row.get_ref(i).map_err(StoreError::Sql)?;
    }
    (codec.decode)(&values).map_err(|p| bad_row(codec.table, row_label(&values, row), p))
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

// === errors and quoting ===

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
pub(crate) fn query_millis(time: SystemTime) -> i64 {
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
mod tests;
