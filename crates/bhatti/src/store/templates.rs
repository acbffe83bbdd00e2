//! Template rows (migrations 009 and 010; design in docs/templates.md): one
//! kept checkpoint and its disk layer per template key, and when it was
//! last used.

use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::{fmt_ts, ts_col, Store, StoreError};

/// A ready template: restore `checkpoint` (disk `layer_id`) with `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRecord {
    /// Hash of everything the booted guest is made of (see `service::templates`).
    pub key: String,
    pub checkpoint: String,
    pub layer_id: String,
    /// The template VM's agent token: opens a copy before it takes its identity.
    pub token: String,
    pub cpus: u32,
    pub memory_mb: u32,
    pub created_at: OffsetDateTime,
    /// The last create restored from it (its creation until then), to the
    /// millisecond: the least recently used template is dropped first.
    pub used_at: OffsetDateTime,
}

/// `t` in whole Unix milliseconds.
fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<TemplateRecord> {
    let ms: i64 = row.get("used_at_ms")?;
    Ok(TemplateRecord {
        key: row.get("key")?,
        checkpoint: row.get("checkpoint")?,
        layer_id: row.get("layer_id")?,
        token: row.get("token")?,
        cpus: row.get("cpus")?,
        memory_mb: row.get("memory_mb")?,
        created_at: ts_col(row, "created_at")?,
        used_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
    })
}

impl Store {
    /// Records a template and its layer (a new layer on the base image),
    /// in one transaction. `Conflict` if the key is taken.
    pub fn insert_template(&self, t: &TemplateRecord) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            let at = fmt_ts(t.created_at);
            tx.execute(
                "INSERT INTO layers (id, parent, created_at) VALUES (?1, NULL, ?2)",
                params![t.layer_id, at],
            )?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO templates
                   (key, checkpoint, layer_id, token, cpus, memory_mb, created_at, used_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    t.key,
                    t.checkpoint,
                    t.layer_id,
                    t.token,
                    t.cpus,
                    t.memory_mb,
                    at,
                    unix_ms(t.used_at)
                ],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "a template with key {} already exists",
                    t.key
                )));
            }
            Ok(())
        })
    }

    /// The template of `key`, if one is ready.
    pub fn get_template(&self, key: &str) -> Result<Option<TemplateRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM templates WHERE key = ?1",
                params![key],
                from_row,
            )
            .optional()?)
    }

    /// Every recorded template, least recently used first.
    pub fn list_templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT * FROM templates ORDER BY used_at_ms, created_at, key")?;
        let rows = st.query_map([], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that a create was restored from template `key` at `at`
    /// (never moves its time back). A key no longer recorded is no error.
    pub fn mark_template_used(&self, key: &str, at: OffsetDateTime) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE templates SET used_at_ms = MAX(used_at_ms, ?2) WHERE key = ?1",
            params![key, unix_ms(at)],
        )?;
        Ok(())
    }

    /// Forgets template `key` if its checkpoint is still `checkpoint` (not
    /// a newer template of the same key); its layer stays until
    /// [`Store::unused_layers`] lists it. Returns whether a row went.
    pub fn delete_template(&self, key: &str, checkpoint: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM templates WHERE key = ?1 AND checkpoint = ?2",
            params![key, checkpoint],
        )?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::temp_store;
    use super::*;

    fn template(key: &str, at_s: i64) -> TemplateRecord {
        let at = OffsetDateTime::from_unix_timestamp(at_s).expect("time");
        TemplateRecord {
            key: key.into(),
            checkpoint: format!("tpl-{key}"),
            layer_id: format!("tpl-{key}-l"),
            token: "tok".into(),
            cpus: 1,
            memory_mb: 512,
            created_at: at,
            used_at: at,
        }
    }

    #[test]
    fn a_template_holds_its_layer() {
        let (_dir, store) = temp_store();
        let t = template("k1", 0);
        store.insert_template(&t).unwrap();
        assert_eq!(store.get_template("k1").unwrap(), Some(t.clone()));
        assert!(store.unused_layers().unwrap().is_empty());
        assert_eq!(
            store.layer_users("tpl-k1-l").unwrap(),
            vec!["template k1".to_string()]
        );
        // A drop of an older template of the key leaves this one.
        assert!(!store.delete_template("k1", "tpl-k1-older").unwrap());
        assert!(store.get_template("k1").unwrap().is_some());
        assert!(store.delete_template("k1", "tpl-k1").unwrap());
        assert!(!store.delete_template("k1", "tpl-k1").unwrap());
        assert_eq!(store.unused_layers().unwrap(), vec!["tpl-k1-l".to_string()]);
        assert!(store.list_templates().unwrap().is_empty());
    }

    /// Templates are listed by last use, not by age: the first is the one
    /// to drop.
    #[test]
    fn templates_are_listed_least_recently_used_first() {
        let (_dir, store) = temp_store();
        for (k, at) in [("old", 100), ("mid", 200), ("new", 300)] {
            store.insert_template(&template(k, at)).unwrap();
        }
        let keys = |s: &Store| -> Vec<String> {
            s.list_templates()
                .unwrap()
                .into_iter()
                .map(|t| t.key)
                .collect()
        };
        assert_eq!(keys(&store), ["old", "mid", "new"]);
        // Used a millisecond apart: the order follows.
        let used = OffsetDateTime::from_unix_timestamp(400).expect("time");
        store.mark_template_used("old", used).unwrap();
        store
            .mark_template_used("mid", used + time::Duration::milliseconds(1))
            .unwrap();
        assert_eq!(keys(&store), ["new", "old", "mid"]);
        assert_eq!(
            store
                .get_template("mid")
                .unwrap()
                .unwrap()
                .used_at
                .unix_timestamp_nanos(),
            400_001_000_000
        );
        // A late mark never moves a time back; a gone key is no error.
        store
            .mark_template_used("mid", OffsetDateTime::from_unix_timestamp(1).expect("time"))
            .unwrap();
        assert_eq!(keys(&store), ["new", "old", "mid"]);
        store.mark_template_used("gone", used).unwrap();
    }

    /// A database from before 010: its templates count as used when made.
    #[test]
    fn migration_010_dates_use_from_creation() {
        let (dir, store) = temp_store();
        store.insert_template(&template("k1", 1_000)).unwrap();
        {
            let conn = store.conn();
            conn.execute_batch("ALTER TABLE templates DROP COLUMN used_at_ms;")
                .expect("back to 9");
            conn.pragma_update(None, "user_version", 9).expect("v9");
        }
        drop(store);
        let store = Store::open(dir.path()).expect("migrate");
        let t = store.get_template("k1").unwrap().expect("kept");
        assert_eq!(t.used_at.unix_timestamp(), 1_000);
    }
}
