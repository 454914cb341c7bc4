//! Registration entries created at runtime: insert, optimistic update,
//! delete and reads, with the duplicate rules (by id, and by SPIFFE ID and
//! selector set).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::rows::{self, ENTRIES, EncodedEntry, EntryRow, Problem};
use super::{MAX_QUOTED, Store, StoreError, bad_row, quote, shorten, unstorable};

// === impl Store ===

impl Store {
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
        let deleted = self.execute("DELETE FROM entries WHERE id = ?1", [id])?;
        Ok(deleted > 0)
    }

    /// Every stored entry, oldest `created_at` first (ties by id): the order
    /// the registry matches them in.
    pub fn entries(&self) -> Result<Vec<EntryRow>, StoreError> {
        self.select(&rows::ENTRY, "ORDER BY created_at_ms, id", [])
    }

    /// The stored entry with this id.
    pub fn entry(&self, id: &str) -> Result<Option<EntryRow>, StoreError> {
        // At most one: `id` is the primary key.
        Ok(self.select(&rows::ENTRY, "WHERE id = ?1", [id])?.pop())
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
}

pub(super) fn entry_params<'a>(
    e: &'a EncodedEntry<'a>,
) -> [(&'static str, &'a dyn rusqlite::ToSql); 14] {
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

/// The stored revision of entry `id`: `None` when absent, the inner error
/// when the stored value cannot be decoded.
fn stored_revision(conn: &Connection, id: &str) -> rusqlite::Result<Option<Result<u64, Problem>>> {
    conn.prepare("SELECT revision FROM entries WHERE id = ?1")?
        .query_row([id], |row| Ok(rows::decode_revision(row.get_ref(0)?)))
        .optional()
}
