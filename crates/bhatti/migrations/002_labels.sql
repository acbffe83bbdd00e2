-- Labels: a JSON object of string keys and values, chosen by the owner
-- (at most 16; key and value rules in store/labels.rs).
ALTER TABLE sandboxes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
