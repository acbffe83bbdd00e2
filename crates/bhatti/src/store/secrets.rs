//! Per-user secrets, stored as age ciphertext only.
//!
//! The store never sees a plaintext value: callers encrypt with
//! [`crate::secrets::SecretCipher`] first and decrypt what they read back.

use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::{fmt_ts, now, ts_col, Store, StoreError};
use crate::secrets::validate_secret_name;

/// Name and timestamps of a secret: all `GET /secrets` may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// A secret with its ciphertext (for injection into a VM).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRecord {
    pub user_id: i64,
    pub name: String,
    /// age ciphertext (binary).
    pub ciphertext: Vec<u8>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("user_id", &self.user_id)
            .field("name", &self.name)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

fn meta_from_row(row: &Row<'_>) -> rusqlite::Result<SecretMeta> {
    Ok(SecretMeta {
        name: row.get("name")?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<SecretRecord> {
    Ok(SecretRecord {
        user_id: row.get("user_id")?,
        name: row.get("name")?,
        ciphertext: row.get("ciphertext")?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn no_secret(name: &str) -> StoreError {
    StoreError::NotFound(format!("no secret named {name}"))
}

impl Store {
    /// Creates or replaces a secret (keeping its original `created_at`).
    pub fn put_secret(
        &self,
        user_id: i64,
        name: &str,
        ciphertext: &[u8],
    ) -> Result<SecretMeta, StoreError> {
        validate_secret_name(name).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let at = fmt_ts(now());
        let conn = self.conn();
        conn.execute(
            "INSERT INTO secrets (user_id, name, ciphertext, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (user_id, name)
             DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
            params![user_id, name, ciphertext, at],
        )
        .map_err(|e| match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
            {
                StoreError::NotFound(format!("no user with id {user_id}"))
            }
            _ => e.into(),
        })?;
        Ok(conn.query_row(
            "SELECT name, created_at, updated_at FROM secrets WHERE user_id = ?1 AND name = ?2",
            params![user_id, name],
            meta_from_row,
        )?)
    }

    /// The user's secrets (names and timestamps only), by name.
    pub fn list_secrets(&self, user_id: i64) -> Result<Vec<SecretMeta>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, created_at, updated_at FROM secrets WHERE user_id = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([user_id], meta_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One secret with its ciphertext.
    pub fn get_secret(&self, user_id: i64, name: &str) -> Result<SecretRecord, StoreError> {
        self.conn()
            .query_row(
                "SELECT user_id, name, ciphertext, created_at, updated_at
                 FROM secrets WHERE user_id = ?1 AND name = ?2",
                params![user_id, name],
                record_from_row,
            )
            .optional()?
            .ok_or_else(|| no_secret(name))
    }

    /// Several secrets, in the order asked; `NotFound` names the first
    /// missing one (so a sandbox is never created with half its secrets).
    pub fn get_secrets(
        &self,
        user_id: i64,
        names: &[String],
    ) -> Result<Vec<SecretRecord>, StoreError> {
        names.iter().map(|n| self.get_secret(user_id, n)).collect()
    }

    /// Deletes a secret; `NotFound` if it does not exist.
    pub fn delete_secret(&self, user_id: i64, name: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "DELETE FROM secrets WHERE user_id = ?1 AND name = ?2",
            params![user_id, name],
        )?;
        if n == 0 {
            return Err(no_secret(name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretCipher;
    use crate::store::tests::temp_store;
    use crate::store::UserLimits;

    #[test]
    fn put_replace_list_get_delete() {
        let (_d, s) = temp_store();
        let (u, _) = s.create_user("alice", UserLimits::default()).expect("user");
        let (b, _) = s.create_user("bob", UserLimits::default()).expect("bob");
        let first = s.put_secret(u.id, "B_KEY", b"one").expect("put");
        s.put_secret(u.id, "A_KEY", b"x").expect("put");
        let second = s.put_secret(u.id, "B_KEY", b"two").expect("replace");
        assert_eq!(first.created_at, second.created_at);
        let names: Vec<_> = s
            .list_secrets(u.id)
            .expect("list")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["A_KEY", "B_KEY"]);
        assert_eq!(s.get_secret(u.id, "B_KEY").expect("get").ciphertext, b"two");
        // Scoped per user.
        assert!(s.list_secrets(b.id).expect("list").is_empty());
        assert!(matches!(
            s.get_secret(b.id, "B_KEY"),
            Err(StoreError::NotFound(_))
        ));
        let e = s
            .get_secrets(u.id, &["A_KEY".into(), "MISSING".into()])
            .expect_err("missing");
        assert_eq!(e.to_string(), "no secret named MISSING");
        assert_eq!(
            s.get_secrets(u.id, &["B_KEY".into(), "A_KEY".into()])
                .expect("both")
                .len(),
            2
        );
        s.delete_secret(u.id, "A_KEY").expect("delete");
        assert!(matches!(
            s.delete_secret(u.id, "A_KEY"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.put_secret(u.id, "bad-name", b"x"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.put_secret(999, "X", b"x"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn plaintext_never_reaches_the_database_file() {
        let (dir, s) = temp_store();
        let cipher = SecretCipher::load_or_create(dir.path()).expect("cipher");
        let (u, _) = s.create_user("alice", UserLimits::default()).expect("user");
        let plaintext = "sk-very-secret-value-0123456789";
        let ct = cipher.encrypt(plaintext).expect("encrypt");
        s.put_secret(u.id, "API_KEY", &ct).expect("put");
        let back = s.get_secret(u.id, "API_KEY").expect("get");
        assert_eq!(
            cipher.decrypt(&back.ciphertext).expect("decrypt").as_str(),
            plaintext
        );
        // Look at the raw bytes of the db and its WAL, before and after a checkpoint.
        let scan = || {
            for f in ["state.db", "state.db-wal"] {
                if let Ok(bytes) = std::fs::read(dir.path().join(f)) {
                    assert!(
                        !bytes
                            .windows(plaintext.len())
                            .any(|w| w == plaintext.as_bytes()),
                        "plaintext found in {f}"
                    );
                }
            }
        };
        scan();
        s.checkpoint().expect("checkpoint");
        scan();
        // And the ciphertext really is there (so the scan looked at real data).
        let db = std::fs::read(dir.path().join("state.db")).expect("read db");
        let tail = &ct[ct.len() - 32..];
        assert!(db.windows(tail.len()).any(|w| w == tail));
    }
}
