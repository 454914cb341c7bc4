//! X.509-SVID records: what was issued (for `tether svid list` and
//! investigations) and what was revoked (for the CRLs), each kept until the
//! certificate expires.

use std::time::SystemTime;

use super::rows::{
    self, EncodedRevoked, EncodedX509, ISSUED_X509, IssuedX509, REVOKED_X509, RevokedX509,
};
use super::{Store, StoreError, query_millis, quote, unstorable};

// === impl Store ===

impl Store {
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
        self.select(
            &rows::X509,
            "WHERE not_after_ms > ?1 ORDER BY issued_at_ms DESC, serial",
            [query_millis(now)],
        )
    }

    /// Deletes records that expired before `before`; returns how many.
    pub fn prune_x509(&self, before: SystemTime) -> Result<usize, StoreError> {
        self.execute(
            "DELETE FROM issued_x509 WHERE not_after_ms < ?1",
            [query_millis(before)],
        )
    }

    /// Records the revocation of an X.509-SVID; `Ok(true)` when recorded.
    /// A serial already revoked keeps its first record (its CA, time, expiry
    /// and reason): `Ok(false)`, changing nothing. Serials are compared as
    /// stored text, so callers write them in one case.
    pub fn revoke_x509(&self, record: &RevokedX509) -> Result<bool, StoreError> {
        let encoded =
            EncodedRevoked::new(record).map_err(|p| unstorable(REVOKED_X509, &record.serial, p))?;
        // DO NOTHING for the serial only: any other constraint still fails.
        let inserted = self.execute(
            "INSERT INTO revoked_x509 (serial, ca_id, revoked_at_ms, not_after_ms, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (serial) DO NOTHING",
            rusqlite::params![
                encoded.serial,
                encoded.ca_id,
                encoded.revoked_at_ms,
                encoded.not_after_ms,
                encoded.reason,
            ],
        )?;
        Ok(inserted > 0)
    }

    /// Revocations whose certificate has not expired at `now` (`not_after`
    /// after `now`), of every CA: what the CRLs list. Oldest `revoked_at`
    /// first (ties by serial).
    pub fn revoked_x509(&self, now: SystemTime) -> Result<Vec<RevokedX509>, StoreError> {
        self.select(
            &rows::REVOKED,
            "WHERE not_after_ms > ?1 ORDER BY revoked_at_ms, serial",
            [query_millis(now)],
        )
    }

    /// Deletes revocations of certificates that expired before `before`;
    /// returns how many. An expired certificate fails validation without a
    /// CRL, so its revocation no longer needs publishing.
    pub fn prune_revoked_x509(&self, before: SystemTime) -> Result<usize, StoreError> {
        self.execute(
            "DELETE FROM revoked_x509 WHERE not_after_ms < ?1",
            [query_millis(before)],
        )
    }
}
