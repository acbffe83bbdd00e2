-- 005: persistent volumes. A volume is an ext4 disk of its own under
-- <data_dir>/volumes/<id>.img, owned by a user, surviving its sandboxes.
CREATE TABLE volumes (
    id         TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    name       TEXT    NOT NULL,
    -- Size of the disk (and of its filesystem), MiB.
    size_mb    INTEGER NOT NULL CHECK (size_mb >= 1),
    created_at TEXT    NOT NULL,
    UNIQUE (user_id, name)
);

-- Which sandbox has which volume, where. A read-write attachment is the
-- volume's only one; read-only ones may be many. `position` is the disk's
-- place among the sandbox's volumes (its device order, fixed for the
-- sandbox's life so that a saved VM restores onto the same devices).
CREATE TABLE sandbox_volumes (
    sandbox_id TEXT    NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    volume_id  TEXT    NOT NULL REFERENCES volumes (id) ON DELETE RESTRICT,
    mount_path TEXT    NOT NULL,
    read_only  INTEGER NOT NULL CHECK (read_only IN (0, 1)),
    position   INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, volume_id),
    UNIQUE (sandbox_id, mount_path)
);

CREATE INDEX sandbox_volumes_volume ON sandbox_volumes (volume_id);

-- Per-user storage quota (volumes), MiB.
ALTER TABLE users ADD COLUMN max_storage_mb INTEGER NOT NULL DEFAULT 20480 CHECK (max_storage_mb >= 0);
