-- 001: users, sandboxes, secrets, publish rules.
-- Timestamps are RFC 3339 UTC text with whole seconds ("2025-01-02T03:04:05Z"),
-- so they sort as text and read well in the sqlite3 shell.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    -- SHA-256 (lowercase hex) of the full API key; the key itself is never stored.
    key_hash      TEXT    NOT NULL UNIQUE,
    max_sandboxes INTEGER NOT NULL CHECK (max_sandboxes >= 0),
    max_cpus      INTEGER NOT NULL CHECK (max_cpus >= 1),
    max_memory_mb INTEGER NOT NULL CHECK (max_memory_mb >= 1),
    created_at    TEXT    NOT NULL
);

-- One row per sandbox that exists; destroying a sandbox deletes its row
-- (publish rules go with it), which frees its name and IP.
CREATE TABLE sandboxes (
    id             TEXT    PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    name           TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    ip             TEXT    NOT NULL UNIQUE,
    cpus           INTEGER NOT NULL CHECK (cpus >= 1),
    memory_mb      INTEGER NOT NULL CHECK (memory_mb >= 1),
    keep_hot       INTEGER NOT NULL DEFAULT 0 CHECK (keep_hot IN (0, 1)),
    -- Per-sandbox token the host presents to the guest agent.
    token          TEXT    NOT NULL,
    -- JSON object of environment variables given at create time.
    env            TEXT    NOT NULL DEFAULT '{}',
    -- Names of the user's secrets injected at boot (JSON array).
    secrets        TEXT    NOT NULL DEFAULT '[]',
    init           TEXT,
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL,
    last_active_at TEXT    NOT NULL,
    UNIQUE (user_id, name)
);

CREATE TABLE secrets (
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    -- age (X25519) ciphertext, binary format.
    ciphertext BLOB    NOT NULL,
    created_at TEXT    NOT NULL,
    updated_at TEXT    NOT NULL,
    PRIMARY KEY (user_id, name)
);

CREATE TABLE publish_rules (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT    NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    port       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    -- DNS label, unique across all users (case-insensitive).
    alias      TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    created_at TEXT    NOT NULL,
    UNIQUE (sandbox_id, port)
);

CREATE INDEX publish_rules_user ON publish_rules (user_id);
