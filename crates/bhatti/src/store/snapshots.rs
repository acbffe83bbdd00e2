//! Named snapshots and the disk layers forks and snapshots share (see
//! `migrations/004_snapshots.sql` and docs/forks.md).

use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::{fmt_ts, is_unique_violation, now, ts_col, Store, StoreError};
use crate::egress::EgressPolicy;

/// A named snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Also the engine's checkpoint id.
    pub id: String,
    pub user_id: i64,
    pub name: String,
    pub source_name: String,
    pub layer_id: String,
    pub cpus: u32,
    pub memory_mb: u32,
    /// The source's agent token (opens a restored copy before it takes its identity).
    pub token: String,
    pub state_bytes: u64,
    pub layer_bytes: u64,
    pub created_at: OffsetDateTime,
    /// The source's egress policy, which a resume keeps (`None`: a snapshot
    /// taken before it was recorded, whose source is gone).
    pub egress: Option<EgressPolicy>,
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: row.get("id")?,
        user_id: row.get("user_id")?,
        name: row.get("name")?,
        source_name: row.get("source_name")?,
        layer_id: row.get("layer_id")?,
        cpus: row.get("cpus")?,
        memory_mb: row.get("memory_mb")?,
        token: row.get("token")?,
        state_bytes: row.get::<_, i64>("state_bytes")?.max(0) as u64,
        layer_bytes: row.get::<_, i64>("layer_bytes")?.max(0) as u64,
        created_at: ts_col(row, "created_at")?,
        egress: match row.get::<_, Option<String>>("egress")? {
            None => None,
            Some(j) => Some(serde_json::from_str(&j).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("bad snapshot egress: {e}").into(),
                )
            })?),
        },
    })
}

impl Store {
    /// The layer sandbox `sandbox_id`'s overlay backs onto (`None`: the base image).
    pub fn sandbox_layer(&self, sandbox_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT layer_id FROM sandbox_layers WHERE sandbox_id = ?1",
                params![sandbox_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records the new layer `layer` frozen from `sandbox_id`'s disk, backing
    /// onto `parent` (as its file says; `None`: the base image), and makes
    /// the sandbox back onto it.
    pub fn freeze_layer_on(
        &self,
        sandbox_id: &str,
        layer: &str,
        parent: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO layers (id, parent, created_at) VALUES (?1, ?2, ?3)",
            params![layer, parent, fmt_ts(now())],
        )?;
        tx.execute(
            "INSERT INTO sandbox_layers (sandbox_id, layer_id) VALUES (?1, ?2)
             ON CONFLICT (sandbox_id) DO UPDATE SET layer_id = excluded.layer_id",
            params![sandbox_id, layer],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records layer `layer` found on the host without a row (frozen by a
    /// checkpoint a crash cut short), backing onto `parent`, which must be
    /// recorded already; a recorded layer stays as it is. Returns whether
    /// it added a row.
    pub fn adopt_layer(&self, layer: &str, parent: Option<&str>) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT INTO layers (id, parent, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO NOTHING",
            params![layer, parent, fmt_ts(now())],
        )?;
        Ok(n > 0)
    }

    /// Every recorded layer's id.
    pub fn layer_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT id FROM layers ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every snapshot of every user (start-up checks).
    pub fn list_all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT * FROM snapshots ORDER BY created_at, name")?;
        let rows = st.query_map([], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Makes `sandbox_id`'s overlay back onto the existing `layer` (a restored copy).
    pub fn set_sandbox_layer(&self, sandbox_id: &str, layer: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO sandbox_layers (sandbox_id, layer_id) VALUES (?1, ?2)
             ON CONFLICT (sandbox_id) DO UPDATE SET layer_id = excluded.layer_id",
            params![sandbox_id, layer],
        )?;
        Ok(())
    }

    /// Makes `sandbox_id`'s overlay back onto the base image (its chain was flattened).
    pub fn clear_sandbox_layer(&self, sandbox_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM sandbox_layers WHERE sandbox_id = ?1",
            params![sandbox_id],
        )?;
        Ok(())
    }

    /// The user's snapshot quota.
    pub fn snapshot_quota(&self, user_id: i64) -> Result<u32, StoreError> {
        let max: i64 = self.conn().query_row(
            "SELECT max_snapshots FROM users WHERE id = ?1",
            params![user_id],
            |r| r.get(0),
        )?;
        Ok(max.max(0) as u32)
    }

    /// Fails with `LimitExceeded` if the user is at their snapshot quota.
    pub fn check_snapshot_quota(&self, user_id: i64) -> Result<(), StoreError> {
        let max = self.snapshot_quota(user_id)?;
        let have: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM snapshots WHERE user_id = ?1",
            params![user_id],
            |r| r.get(0),
        )?;
        if have >= i64::from(max) {
            return Err(StoreError::LimitExceeded(format!(
                "snapshot quota reached: {have} of {max}; delete one with `bhatti snapshot delete NAME`"
            )));
        }
        Ok(())
    }

    /// Stores a snapshot (quota and name checked again inside the transaction).
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let egress = match &s.egress {
            Some(p) => Some(
                serde_json::to_string(p)
                    .map_err(|e| StoreError::Invalid(format!("snapshot egress: {e}")))?,
            ),
            None => None,
        };
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let max: i64 = tx.query_row(
            "SELECT max_snapshots FROM users WHERE id = ?1",
            params![s.user_id],
            |r| r.get(0),
        )?;
        let have: i64 = tx.query_row(
            "SELECT COUNT(*) FROM snapshots WHERE user_id = ?1",
            params![s.user_id],
            |r| r.get(0),
        )?;
        if have >= max {
            return Err(StoreError::LimitExceeded(format!(
                "snapshot quota reached: {have} of {max}; delete one with `bhatti snapshot delete NAME`"
            )));
        }
        tx.execute(
            "INSERT INTO snapshots (id, user_id, name, source_name, layer_id, cpus, memory_mb,
                                    token, state_bytes, layer_bytes, created_at, egress)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                s.id,
                s.user_id,
                s.name,
                s.source_name,
                s.layer_id,
                s.cpus,
                s.memory_mb,
                s.token,
                s.state_bytes as i64,
                s.layer_bytes as i64,
                fmt_ts(s.created_at),
                egress
            ],
        )
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("a snapshot named {} already exists", s.name))
            } else {
                e.into()
            }
        })?;
        tx.commit()?;
        Ok(())
    }

    /// Whether the user already has a snapshot of that name.
    pub fn snapshot_exists(&self, user_id: i64, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM snapshots WHERE user_id = ?1 AND name = ?2",
                params![user_id, name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The user's snapshot named (or with id) `key`.
    pub fn find_snapshot(&self, user_id: i64, key: &str) -> Result<SnapshotRecord, StoreError> {
        self.conn()
            .query_row(
                "SELECT * FROM snapshots WHERE user_id = ?1 AND (name = ?2 OR id = ?2)",
                params![user_id, key],
                from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no snapshot named {key}")))
    }

    /// The user's snapshots, oldest first.
    pub fn list_snapshots(&self, user_id: i64) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT * FROM snapshots WHERE user_id = ?1 ORDER BY created_at, name")?;
        let rows = st.query_map(params![user_id], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a snapshot (its layer stays until [`Store::unused_layers`] lists it).
    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Layers nothing uses: no sandbox, snapshot, template or other layer backs onto them.
    pub fn unused_layers(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id FROM layers l
             WHERE NOT EXISTS (SELECT 1 FROM sandbox_layers s WHERE s.layer_id = l.id)
               AND NOT EXISTS (SELECT 1 FROM snapshots p WHERE p.layer_id = l.id)
               AND NOT EXISTS (SELECT 1 FROM templates t WHERE t.layer_id = l.id)
               AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent = l.id)",
        )?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Who uses disk layer `layer`, directly or through layers backing onto
    /// it: `snapshot NAME` and `sandbox NAME` (sorted; empty: nothing recorded).
    pub fn layer_users(&self, layer: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "WITH RECURSIVE d(id) AS (
                 SELECT ?1 UNION SELECT l.id FROM layers l JOIN d ON l.parent = d.id)
             SELECT 'snapshot ' || p.name AS n FROM snapshots p WHERE p.layer_id IN d
             UNION
             SELECT 'template ' || t.key FROM templates t WHERE t.layer_id IN d
             UNION
             SELECT 'sandbox ' || s.name FROM sandbox_layers sl JOIN sandboxes s ON s.id = sl.sandbox_id
             WHERE sl.layer_id IN d
             ORDER BY n",
        )?;
        let rows = st.query_map(params![layer], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a layer whose file is gone.
    pub fn delete_layer(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM layers WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// How many layers are recorded (tests, diagnostics).
    pub fn layer_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM layers", [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::temp_store;
    use super::*;
    use crate::egress::Posture;
    use crate::store::{NewSandbox, UserLimits};

    fn snapshot(user_id: i64, name: &str, source: &str, layer: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: format!("snap-{name}"),
            user_id,
            name: name.into(),
            source_name: source.into(),
            layer_id: layer.into(),
            cpus: 1,
            memory_mb: 512,
            token: "t".into(),
            state_bytes: 1,
            layer_bytes: 1,
            created_at: now(),
            egress: None,
        }
    }

    /// A snapshot keeps its source's egress policy; migration 008 gives
    /// older snapshots their source's policy when the source still exists.
    #[test]
    fn snapshots_keep_the_egress_policy() {
        let (dir, store) = temp_store();
        let (user, _) = store
            .create_user("alice", UserLimits::default())
            .expect("user");
        let deny = EgressPolicy::parse(
            Posture::Deny,
            &["api.example.com".to_string()],
            &["10.99.0.0/24".to_string()],
        )
        .expect("policy");
        let mut new = NewSandbox::new(user.id, "src");
        new.egress = deny.clone();
        let sb = store
            .create_sandbox(&new, &Default::default())
            .expect("sandbox");
        store.freeze_layer_on(&sb.id, "l1", None).expect("layer");
        let mut with = snapshot(user.id, "new", "src", "l1");
        with.egress = Some(deny.clone());
        store.insert_snapshot(&with).expect("insert");
        store
            .insert_snapshot(&snapshot(user.id, "orphan", "gone", "l1"))
            .expect("insert");
        assert_eq!(
            store.find_snapshot(user.id, "new").expect("find").egress,
            Some(deny.clone())
        );

        // As a database from before 008: no column (nor 009's table and
        // column), version 7.
        {
            let conn = store.conn();
            conn.execute_batch(
                "ALTER TABLE snapshots DROP COLUMN egress;
                 DROP TABLE templates;
                 ALTER TABLE sandboxes DROP COLUMN born;",
            )
            .expect("back to 7");
            conn.pragma_update(None, "user_version", 7).expect("v7");
        }
        drop(store);
        let store = Store::open(dir.path()).expect("migrate");
        assert_eq!(
            store.find_snapshot(user.id, "new").expect("find").egress,
            Some(deny),
            "backfilled from the source"
        );
        assert_eq!(
            store.find_snapshot(user.id, "orphan").expect("find").egress,
            None,
            "source gone: unknown"
        );
    }

    /// A layer's users are the snapshots and sandboxes on it or on layers
    /// frozen on top of it, by name.
    #[test]
    fn layer_users_follow_the_chain() {
        let (_dir, store) = temp_store();
        let (user, _) = store
            .create_user("alice", UserLimits::default())
            .expect("user");
        let sb = store
            .create_sandbox(&NewSandbox::new(user.id, "src"), &Default::default())
            .expect("sandbox");
        store.freeze_layer_on(&sb.id, "l1", None).expect("l1");
        assert_eq!(store.layer_users("l1").expect("users"), ["sandbox src"]);
        store
            .insert_snapshot(&snapshot(user.id, "first", "src", "l1"))
            .expect("insert");
        // A second freeze puts l2 on top of l1: l1's users now come through l2.
        store.freeze_layer_on(&sb.id, "l2", Some("l1")).expect("l2");
        store
            .insert_snapshot(&snapshot(user.id, "second", "src", "l2"))
            .expect("insert");
        assert_eq!(
            store.layer_users("l1").expect("users"),
            ["sandbox src", "snapshot first", "snapshot second"]
        );
        assert_eq!(
            store.layer_users("l2").expect("users"),
            ["sandbox src", "snapshot second"]
        );
        assert!(store.layer_users("nope").expect("users").is_empty());
    }

    /// A layer frozen from a flattened disk records the parent its file
    /// names (none), not the sandbox's old layer, so the old one goes once
    /// unused; an adopted layer gets a row once, and a recorded one stays.
    #[test]
    fn frozen_and_adopted_layers_record_their_files_parent() {
        let (_dir, store) = temp_store();
        let (user, _) = store
            .create_user("alice", UserLimits::default())
            .expect("user");
        let sb = store
            .create_sandbox(&NewSandbox::new(user.id, "src"), &Default::default())
            .expect("sandbox");
        store.freeze_layer_on(&sb.id, "l1", None).expect("l1");
        store.freeze_layer_on(&sb.id, "l2", Some("l1")).expect("l2");
        assert!(store.unused_layers().expect("unused").is_empty());
        // Flattened before its next freeze: l3 backs onto the base.
        store.freeze_layer_on(&sb.id, "l3", None).expect("l3");
        assert_eq!(store.unused_layers().expect("unused"), ["l2"]);
        assert!(store.adopt_layer("l4", Some("l3")).expect("adopt"));
        assert!(!store.adopt_layer("l4", None).expect("again"));
        assert_eq!(store.layer_ids().expect("ids"), ["l1", "l2", "l3", "l4"]);
        store.set_sandbox_layer(&sb.id, "l4").expect("set");
        assert_eq!(
            store.sandbox_layer(&sb.id).expect("layer").as_deref(),
            Some("l4")
        );
        assert_eq!(store.unused_layers().expect("unused"), ["l2"]);
    }
}
