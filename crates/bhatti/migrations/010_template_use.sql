-- 010: when each template was last used (docs/templates.md), in Unix
-- milliseconds. A create restored from a template counts as use. At most
-- 4 templates are kept; building another drops the least recently used
-- (never the default shape's). Templates made before this count as used
-- when they were made.
ALTER TABLE templates ADD COLUMN used_at_ms INTEGER NOT NULL DEFAULT 0;
UPDATE templates
   SET used_at_ms = COALESCE(CAST(strftime('%s', created_at) AS INTEGER) * 1000, 0);
