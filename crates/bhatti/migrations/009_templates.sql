-- 009: templates (docs/templates.md). A template is an already-booted,
-- idle guest of one shape (image, cpus, memory), kept as a checkpoint
-- (memory under <data_dir>/checkpoints/<checkpoint>/, RAM on the ramfs)
-- and a disk layer; new sandboxes of that shape are restored from it into
-- their own identity instead of booting. `key` hashes everything the
-- booted guest is made of (kernel, initramfs, rootfs, QEMU, machine,
-- network plan, format version): a template whose key no longer matches
-- is removed once no sandbox needs its layer.
CREATE TABLE templates (
    key        TEXT    PRIMARY KEY,
    checkpoint TEXT    NOT NULL,
    layer_id   TEXT    NOT NULL REFERENCES layers (id) ON DELETE RESTRICT,
    -- The template VM's agent token: it opens a restored copy until the
    -- copy has taken its own identity.
    token      TEXT    NOT NULL,
    cpus       INTEGER NOT NULL CHECK (cpus >= 1),
    memory_mb  INTEGER NOT NULL CHECK (memory_mb >= 1),
    created_at TEXT    NOT NULL
);

-- How a sandbox's VM came to be: boot, template, fork or snapshot (NULL:
-- made before this migration).
ALTER TABLE sandboxes ADD COLUMN born TEXT;
