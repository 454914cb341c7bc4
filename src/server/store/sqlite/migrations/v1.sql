-- The server's schema v1: join tokens, nodes, entries and the entries'
-- revision. Shipped: never edit this file. Change the schema by appending a
-- step (v2.sql) to STEPS in sql.rs.

-- Marks the file as the server's ("tsrv"), so neither another program's
-- database nor the agent's ("teth") is taken for it.
PRAGMA application_id = 1953722998; -- 0x74737276

-- Only a token's SHA-256 is kept, never the token.
CREATE TABLE join_tokens (
    hash          BLOB    NOT NULL PRIMARY KEY,
    node          TEXT    NOT NULL,
    -- Unix milliseconds.
    expires_at_ms INTEGER NOT NULL,
    -- NULL until the token admits its node.
    used_at_ms    INTEGER
) STRICT;

-- Pruning selects on expiry.
CREATE INDEX join_tokens_by_expiry ON join_tokens (expires_at_ms);

CREATE TABLE nodes (
    name               TEXT    NOT NULL PRIMARY KEY,
    attestation        TEXT    NOT NULL,
    attested_at_ms     INTEGER NOT NULL,
    -- Lowercase hex.
    svid_serial        TEXT    NOT NULL,
    svid_expires_at_ms INTEGER NOT NULL,
    -- 0 or 1.
    evicted            INTEGER NOT NULL
) STRICT;

-- Entries are read whole and matched in memory, never queried by field:
-- the operator's spec and the nodes it names are JSON.
CREATE TABLE entries (
    id            TEXT    NOT NULL PRIMARY KEY,
    spec_json     TEXT    NOT NULL,
    -- A JSON array of node names.
    nodes_json    TEXT    NOT NULL,
    revision      INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;

-- Counters of the whole store: `entries_revision` grows with every entry
-- change.
CREATE TABLE meta (
    key   TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

INSERT INTO meta (key, value) VALUES ('entries_revision', 0);
