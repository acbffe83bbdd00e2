-- 006: custom base images. A user's image (or an operator's, user_id NULL,
-- visible to every user) is a sparse raw ext4 under
-- <data_dir>/custom-images/<id>.ext4 that sandbox disks back onto.
CREATE TABLE images (
    id          TEXT    PRIMARY KEY,
    user_id     INTEGER REFERENCES users (id) ON DELETE RESTRICT,
    name        TEXT    NOT NULL,
    -- Where it came from: "save <sandbox>", "import", "pull <reference>".
    source      TEXT    NOT NULL,
    -- Host bytes the file takes (counted against the owner's storage quota).
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    created_at  TEXT    NOT NULL
);

-- Unique per owner; operator images (NULL owner) among themselves.
CREATE UNIQUE INDEX images_owner_name ON images (COALESCE(user_id, 0), name);

-- The custom image a sandbox was created from (NULL: the built rootfs).
ALTER TABLE sandboxes ADD COLUMN image_id TEXT REFERENCES images (id) ON DELETE RESTRICT;
