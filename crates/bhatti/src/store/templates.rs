//! Template rows (migration 009; design in docs/templates.md): one kept
//! checkpoint and its disk layer per template key.

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
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<TemplateRecord> {
    Ok(TemplateRecord {
        key: row.get("key")?,
        checkpoint: row.get("checkpoint")?,
        layer_id: row.get("layer_id")?,
        token: row.get("token")?,
        cpus: row.get("cpus")?,
        memory_mb: row.get("memory_mb")?,
        created_at: ts_col(row, "created_at")?,
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
                "INSERT OR IGNORE INTO templates (key, checkpoint, layer_id, token, cpus, memory_mb, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.key, t.checkpoint, t.layer_id, t.token, t.cpus, t.memory_mb, at],
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

    /// Every recorded template, oldest first.
    pub fn list_templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT * FROM templates ORDER BY created_at, key")?;
        let rows = st.query_map([], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets template `key` (its layer stays until [`Store::unused_layers`] lists it).
    pub fn delete_template(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM templates WHERE key = ?1", params![key])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::temp_store;
    use super::*;

    #[test]
    fn a_template_holds_its_layer() {
        let (_dir, store) = temp_store();
        let t = TemplateRecord {
            key: "k1".into(),
            checkpoint: "tpl-k1".into(),
            layer_id: "tpl-k1-l".into(),
            token: "tok".into(),
            cpus: 1,
            memory_mb: 512,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        store.insert_template(&t).unwrap();
        assert_eq!(store.get_template("k1").unwrap(), Some(t.clone()));
        assert!(store.unused_layers().unwrap().is_empty());
        assert_eq!(
            store.layer_users("tpl-k1-l").unwrap(),
            vec!["template k1".to_string()]
        );
        store.delete_template("k1").unwrap();
        assert_eq!(store.unused_layers().unwrap(), vec!["tpl-k1-l".to_string()]);
        assert!(store.list_templates().unwrap().is_empty());
    }
}
