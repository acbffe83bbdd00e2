-- 004: snapshots and the disk layers that forks and snapshots share.
-- A layer is a read-only qcow2 under <data_dir>/layers/<id>.qcow2, frozen
-- from a sandbox's disk by a fork or a snapshot; `parent` is the layer it
-- backs onto (NULL: the base image). A layer is deleted when nothing uses
-- it any more: no sandbox disk (sandbox_layers), no snapshot, no layer.
CREATE TABLE layers (
    id         TEXT PRIMARY KEY,
    parent     TEXT REFERENCES layers (id) ON DELETE RESTRICT,
    created_at TEXT NOT NULL
);

-- The layer a sandbox's own overlay backs onto (no row: the base image).
CREATE TABLE sandbox_layers (
    sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    layer_id   TEXT NOT NULL REFERENCES layers (id) ON DELETE RESTRICT
);

-- Named snapshots: memory in <data_dir>/checkpoints/<id>/, disk in a layer.
CREATE TABLE snapshots (
    id          TEXT    PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    name        TEXT    NOT NULL,
    -- Name of the sandbox it was taken from (which may be gone since).
    source_name TEXT    NOT NULL,
    layer_id    TEXT    NOT NULL REFERENCES layers (id) ON DELETE RESTRICT,
    cpus        INTEGER NOT NULL CHECK (cpus >= 1),
    memory_mb   INTEGER NOT NULL CHECK (memory_mb >= 1),
    -- The source's agent token: it opens a restored copy until the copy
    -- has taken its own identity.
    token       TEXT    NOT NULL,
    -- Bytes on the host: memory file, and the disk layer (what the sandbox had written).
    state_bytes INTEGER NOT NULL,
    layer_bytes INTEGER NOT NULL,
    created_at  TEXT    NOT NULL,
    UNIQUE (user_id, name)
);

-- Per-user snapshot quota.
ALTER TABLE users ADD COLUMN max_snapshots INTEGER NOT NULL DEFAULT 5 CHECK (max_snapshots >= 0);
