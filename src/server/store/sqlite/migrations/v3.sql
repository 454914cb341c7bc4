-- The server's schema v3: the fleet's task index and the revision of its
-- ends. Shipped: never edit this file.

-- A task as its first token was signed, live until ended: the three
-- `ended_*`/`end_revision` columns are NULL together (live) or set
-- together (ended, once: nothing makes a task live again).
CREATE TABLE fleet_tasks (
    -- The task id (`txn`).
    txn          TEXT    NOT NULL PRIMARY KEY,
    owner_node   TEXT    NOT NULL,
    spiffe_id    TEXT    NOT NULL,
    -- Unix milliseconds.
    began_at_ms  INTEGER NOT NULL,
    deadline_ms  INTEGER NOT NULL,
    ended_reason TEXT,
    ended_at_ms  INTEGER,
    -- The end's place among the fleet's ends (1, 2, ...).
    end_revision INTEGER UNIQUE,
    CHECK ((ended_reason IS NULL) = (ended_at_ms IS NULL)
       AND (ended_at_ms IS NULL) = (end_revision IS NULL))
) STRICT;

-- Listing selects newest first; pruning selects on the deadline; a
-- node's quota counts its rows. The UNIQUE constraint indexes the ends by
-- revision.
CREATE INDEX fleet_tasks_by_began ON fleet_tasks (began_at_ms, txn);
CREATE INDEX fleet_tasks_by_deadline ON fleet_tasks (deadline_ms);
CREATE INDEX fleet_tasks_by_owner ON fleet_tasks (owner_node);

-- The revision of the latest task end: one row, bumped in the transaction
-- of each end, never lowered (pruning included).
CREATE TABLE fleet_task_end_revision (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
) STRICT;

INSERT INTO fleet_task_end_revision (id, revision) VALUES (1, 0);
