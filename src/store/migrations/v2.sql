-- Schema v2: entry audiences and process binding, tasks (units of delegated
-- agent work that own short-lived tokens), and revoked X.509-SVIDs.
-- Shipped: never edit this file. Change the schema by appending a step
-- (v3.sql) to STEPS in migrations.rs.

-- The audience names an entry's holders answer to besides their SPIFFE ID
-- (https://mcp.jira.internal), as a JSON array of strings. Entries stored by
-- v1 have none.
ALTER TABLE entries ADD COLUMN audiences TEXT NOT NULL DEFAULT '[]';

-- 1 when each process matching the entry gets its own X.509-SVID (key and
-- certificate), revoked when the process exits; 0 when the processes share
-- one per entry, as every entry stored by v1 does.
ALTER TABLE entries ADD COLUMN process_bound INTEGER NOT NULL DEFAULT 0;

-- A task row is written when the task begins and changed once, when it ends.
-- Its end is what keeps its tokens refused after a restart, so it is kept
-- until the deadline has passed, after which every token has expired anyway.
-- No foreign key to entries: the entry may come from the config file, and
-- the task's record outlives it.
CREATE TABLE tasks (
    id                TEXT    NOT NULL PRIMARY KEY,
    -- The owner process: pid with its start time (clock ticks since boot,
    -- /proc/<pid>/stat field 22), so a reused pid is not mistaken for it.
    owner_pid         INTEGER NOT NULL,
    owner_start_time  INTEGER NOT NULL,
    owner_uid         INTEGER NOT NULL,
    owner_executable  TEXT,
    owner_exe_sha256  TEXT,
    spiffe_id         TEXT    NOT NULL,
    entry_id          TEXT    NOT NULL,
    audience          TEXT    NOT NULL,
    intent            TEXT    NOT NULL,
    -- JSON array of strings.
    tools             TEXT    NOT NULL,
    -- base64url SHA-256 certificate thumbprint the tokens are bound to.
    bind_x5t          TEXT,
    -- Unix milliseconds.
    created_at_ms     INTEGER NOT NULL,
    deadline_ms       INTEGER NOT NULL,
    -- Both NULL while the task is active, both set once it has ended.
    ended_at_ms       INTEGER,
    end_reason        TEXT,
    tokens_issued     INTEGER NOT NULL,
    -- 1 when the owner's descendants are scoped to the task (`tether task
    -- run`): their FetchJWTSVID gets this task's token only.
    scope_descendants INTEGER NOT NULL DEFAULT 0
) STRICT;

-- Loading at start (deadline still ahead) and pruning (deadline passed)
-- both select on the deadline.
CREATE INDEX tasks_by_deadline ON tasks (deadline_ms);

-- Revoked X.509-SVIDs, for the CRLs the agent publishes. The first record of
-- a serial is kept, and kept until the certificate expires: after that the
-- certificate fails validation anyway. No foreign key to issued_x509: that
-- record may have been pruned, or never written.
CREATE TABLE revoked_x509 (
    serial        TEXT    NOT NULL PRIMARY KEY,
    -- The id of the CA that signed it: each CA's CRL lists its own.
    ca_id         TEXT    NOT NULL,
    -- Unix milliseconds.
    revoked_at_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    reason        TEXT    NOT NULL
) STRICT;

-- Listing (not yet expired) and pruning (expired) both select on expiry.
CREATE INDEX revoked_x509_by_expiry ON revoked_x509 (not_after_ms);
