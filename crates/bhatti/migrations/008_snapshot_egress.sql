-- 008: a snapshot keeps its source's egress policy (JSON as sandboxes.egress),
-- so that a resume gets it rather than the daemon's default. Older snapshots
-- take the policy of their source if it still exists; NULL: unknown, and a
-- resume then gets the daemon's default, as before.
ALTER TABLE snapshots ADD COLUMN egress TEXT;
UPDATE snapshots SET egress = (
    SELECT s.egress FROM sandboxes s
    WHERE s.user_id = snapshots.user_id AND s.name = snapshots.source_name
);
