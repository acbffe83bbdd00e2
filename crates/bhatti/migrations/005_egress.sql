-- Egress policy of a sandbox: JSON {"mode": "public"|"deny", "allow_hosts": [...],
-- "allow_cidrs": [...]} (see src/egress.rs). Older rows: public, no allowances.
ALTER TABLE sandboxes ADD COLUMN egress TEXT NOT NULL DEFAULT '{"mode":"public"}';
