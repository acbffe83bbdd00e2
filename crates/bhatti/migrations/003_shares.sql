-- 003: web terminal shares. At most one per sandbox: a new share replaces
-- the old one; destroying the sandbox deletes it.
CREATE TABLE shares (
    sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
    -- SHA-256 (lowercase hex) of the share token; the token itself is never stored.
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
