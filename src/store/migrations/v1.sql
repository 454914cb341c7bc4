-- Schema v1: registration entries created at runtime, and issued X.509-SVIDs.
-- Shipped: never edit this file. Change the schema by appending a step
-- (v2.sql) to STEPS in migrations.rs.

-- Marks the file as tether's, so another program's SQLite database is refused.
PRAGMA application_id = 1952805992; -- 0x74657468, "teth"

CREATE TABLE entries (
    id               TEXT    NOT NULL PRIMARY KEY,
    spiffe_id        TEXT    NOT NULL,
    -- JSON arrays of strings.
    selectors        TEXT    NOT NULL,
    -- The selectors sorted, deduplicated, as a JSON array: the identity of
    -- an entry together with its SPIFFE ID.
    selector_key     TEXT    NOT NULL,
    x509_svid_ttl_ms INTEGER,
    jwt_svid_ttl_ms  INTEGER,
    dns_names        TEXT    NOT NULL,
    hint             TEXT,
    federates_with   TEXT    NOT NULL,
    -- Unix milliseconds.
    created_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL,
    revision         INTEGER NOT NULL,
    UNIQUE (spiffe_id, selector_key)
) STRICT;

-- Listing order.
CREATE INDEX entries_by_creation ON entries (created_at_ms, id);

-- No foreign key to entries: a record may name an entry from the config file,
-- and outlives the entry it was issued for.
CREATE TABLE issued_x509 (
    serial        TEXT    NOT NULL PRIMARY KEY,
    entry_id      TEXT    NOT NULL,
    spiffe_id     TEXT    NOT NULL,
    not_before_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    issued_at_ms  INTEGER NOT NULL
) STRICT;

-- Live listing and pruning both select on expiry.
CREATE INDEX issued_x509_by_expiry ON issued_x509 (not_after_ms);
