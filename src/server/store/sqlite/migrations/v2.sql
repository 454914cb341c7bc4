-- The server's schema v2: each replica's published trust bundle, so every
-- replica serves the union. Shipped: never edit this file.

CREATE TABLE bundle_keys (
    -- The publishing replica's id.
    replica       TEXT    NOT NULL PRIMARY KEY,
    -- Its SPIFFE bundle document (JSON): CA certificates and JWT keys.
    bundle_json   TEXT    NOT NULL,
    -- Unix milliseconds.
    updated_at_ms INTEGER NOT NULL
) STRICT;
