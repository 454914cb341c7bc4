-- The server's PostgreSQL schema v1: join tokens, nodes, entries, the
-- entries' revision and each replica's published bundle. The same tables
-- and columns as the SQLite schema (v1 and v2 there), so both backends run
-- the same statements. Shipped: never edit this file. Change the schema by
-- appending a step (v2.sql) to STEPS in schema.rs.

-- Only a token's SHA-256 is kept, never the token.
CREATE TABLE join_tokens (
    hash          BYTEA  NOT NULL PRIMARY KEY,
    node          TEXT   NOT NULL,
    -- Unix milliseconds.
    expires_at_ms BIGINT NOT NULL,
    -- NULL until the token admits its node.
    used_at_ms    BIGINT
);

-- Pruning selects on expiry.
CREATE INDEX join_tokens_by_expiry ON join_tokens (expires_at_ms);

CREATE TABLE nodes (
    name               TEXT    NOT NULL PRIMARY KEY,
    attestation        TEXT    NOT NULL,
    attested_at_ms     BIGINT  NOT NULL,
    -- Lowercase hex.
    svid_serial        TEXT    NOT NULL,
    svid_expires_at_ms BIGINT  NOT NULL,
    evicted            BOOLEAN NOT NULL
);

-- Entries are read whole and matched in memory, never queried by field:
-- the operator's spec and the nodes it names are JSON.
CREATE TABLE entries (
    id            TEXT   NOT NULL PRIMARY KEY,
    spec_json     TEXT   NOT NULL,
    -- A JSON array of node names.
    nodes_json    TEXT   NOT NULL,
    revision      BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Counters of the whole store: `entries_revision` grows with every entry
-- change (the row lock of its update orders concurrent changes).
CREATE TABLE meta (
    key   TEXT   NOT NULL PRIMARY KEY,
    value BIGINT NOT NULL
);

INSERT INTO meta (key, value) VALUES ('entries_revision', 0);

-- Each replica's trust bundle (SPIFFE bundle JSON); every replica serves
-- the union.
CREATE TABLE bundle_keys (
    replica       TEXT   NOT NULL PRIMARY KEY,
    bundle_json   TEXT   NOT NULL,
    -- Unix milliseconds.
    updated_at_ms BIGINT NOT NULL
);
