//! The agent's embedded database: `data_dir/tether.db`, SQLite in WAL mode.
//!
//! Owns the operator state that must outlive restarts and crashes:
//! registration entries created at runtime (config-file entries are never
//! stored) and a record of issued X.509-SVIDs. [`Store`] is a cheap-to-clone
//! handle; its methods block (async callers use `spawn_blocking`) and are
//! serialised by one connection behind a mutex. Rows are plain data
//! ([`EntryRow`], [`IssuedX509`]) that callers validate; the store knows no
//! domain type and only bounds what it keeps.
//!
//! Invariants:
//! - An acknowledged write is durable: every write commits before its method
//!   returns, and `synchronous = FULL` syncs the WAL on each commit, so it
//!   survives `kill -9` and power loss.
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

mod migrations;
mod rows;

pub use rows::{EntryRow, IssuedX509};

use rows::{
    ENTRY_COLUMNS, ENTRY_COLUMNS_SQL, EncodedEntry, EncodedX509, MAX_ID_LEN, Problem, X509_COLUMNS,
    X509_COLUMNS_SQL,
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
        check_identity(&conn, &path)?;

        // Persistent in the file header; the first write since `quick_check`.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_error(&path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        migrations::apply(&mut conn, migrations::STEPS).map_err(open_error(&path))?;
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

    /// The schema version of the open database (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let conn = self.conn();
        let version = migrations::user_version(&conn).map_err(self.sql())?;
        u32::try_from(version).map_err(|_| self.corrupt(format!("schema version {version}")))
    }

    /// Stores a new entry. [`StoreError::Duplicate`] when its id is taken, or
    /// when another entry has the same SPIFFE ID and the same selector set
    /// (in any order, repeats ignored).
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
             jwt_svid_ttl_ms, dns_names, hint, federates_with, created_at_ms, updated_at_ms, \
             revision) VALUES (:id, :spiffe_id, :selectors, :selector_key, :x509_svid_ttl_ms, \
             :jwt_svid_ttl_ms, :dns_names, :hint, :federates_with, :created_at_ms, \
             :updated_at_ms, :revision)",
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
             federates_with = :federates_with, created_at_ms = :created_at_ms, \
             updated_at_ms = :updated_at_ms, revision = :revision WHERE id = :id",
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
    if !meta.file_type().is_file() {
        return Err(StoreError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
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
    let findings = (|| {
        let mut stmt = conn.prepare(&format!("PRAGMA quick_check({QUICK_CHECK_MAX_FINDINGS})"))?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    })()
    .map_err(open_error(path))?;
    if findings.len() == 1 && findings[0] == "ok" {
        return Ok(());
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

/// Refuses another program's database, and one from a newer tether.
fn check_identity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
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
    if found > migrations::LATEST {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known: migrations::LATEST,
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

fn entry_params<'a>(e: &'a EncodedEntry<'a>) -> [(&'static str, &'a dyn rusqlite::ToSql); 12] {
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
        (":created_at_ms", &e.created_at_ms),
        (":updated_at_ms", &e.updated_at_ms),
        (":revision", &e.revision),
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

fn decode_x509(row: &rusqlite::Row<'_>) -> Result<IssuedX509, StoreError> {
    let values = values::<X509_COLUMNS>(row)?;
    rows::decode_x509(&values).map_err(|p| bad_row(ISSUED_X509, row_label(&values, row), p))
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
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    use super::*;

    /// Tells [`crash_writer_child`] where the store is; unset, it does nothing.
    const CRASH_DIR_VAR: &str = "TETHER_STORE_CRASH_DIR";
    /// Prefix for the child's entry ids, distinct per round.
    const CRASH_ROUND_VAR: &str = "TETHER_STORE_CRASH_ROUND";
    const CRASH_CHILD: &str = "store::tests::crash_writer_child";
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
            created_at: at(0),
            updated_at: at(0),
            revision: 1,
        }
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
        let mut a = entry("a", "spiffe://example.org/a", &["unix:uid:2", "unix:gid:2"]);
        a.created_at = at(5);
        let mut first = entry("z", "spiffe://example.org/z", &[]);
        first.created_at = at(1);
        first.x509_svid_ttl = None;
        first.jwt_svid_ttl = Some(Duration::from_millis(300_250));
        first.hint = None;
        first.dns_names = vec![];
        first.federates_with = vec![];
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
        changed.updated_at = at(9);
        changed.revision = 2;
        store.update_entry(&changed).unwrap();
        assert_eq!(store.entry("a").unwrap(), Some(changed));

        assert!(store.delete_entry("a").unwrap());
        assert!(!store.delete_entry("a").unwrap());
        assert_eq!(store.entry("a").unwrap(), None);
        assert_eq!(ids(&store.entries().unwrap()), ["z", "b"]);

        // And it is all still there after a restart.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.entries().unwrap(), [first, b]);
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
             federates_with, created_at_ms + 100000, updated_at_ms, revision \
             FROM entries WHERE id = 'entry-00000';",
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
            Err(StoreError::Permissive { .. })
        ));
        fs::remove_file(&wal).unwrap();

        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Io { .. })
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
        ] {
            conn.execute_batch(&format!(
                "INSERT INTO entries SELECT 'bad', spiffe_id || '/bad', selectors, \
                 selector_key, x509_svid_ttl_ms, jwt_svid_ttl_ms, dns_names, hint, \
                 federates_with, created_at_ms + 1, updated_at_ms, revision \
                 FROM entries WHERE id = 'good'; \
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
    /// round also recovers the WAL the previous victim left). SIGKILL keeps
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
            let stored: Vec<String> = store.entries().unwrap().into_iter().map(|e| e.id).collect();
            let records: Vec<String> = store
                .live_x509(UNIX_EPOCH)
                .unwrap()
                .into_iter()
                .map(|r| r.serial)
                .collect();
            for id in &acknowledged {
                assert!(
                    stored.contains(id),
                    "round {round}: acknowledged entry {id} lost"
                );
                assert!(
                    records.contains(id),
                    "round {round}: acknowledged record {id} lost"
                );
            }
        }
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
    fn crash_writer_child() {
        let (Ok(dir), Ok(round)) = (std::env::var(CRASH_DIR_VAR), std::env::var(CRASH_ROUND_VAR))
        else {
            return;
        };
        let store = Store::open(Path::new(&dir)).unwrap();
        let mut stdout = io::stdout().lock();
        for i in 0..CRASH_CHILD_MAX_WRITES {
            let id = format!("r{round}-{i:05}");
            let mut row = entry(&id, &format!("spiffe://example.org/{id}"), &["unix:uid:0"]);
            row.created_at = at(i);
            store.insert_entry(&row).unwrap();
            store
                .record_x509_issued(&IssuedX509 {
                    serial: id.clone(),
                    entry_id: id.clone(),
                    ..issued("", i, i + 3_600_000)
                })
                .unwrap();
            writeln!(stdout, "ack {id}").unwrap();
            stdout.flush().unwrap();
        }
    }
}
