//! Users and their API keys.
//!
//! An API key is `bht_` followed by 40 random alphanumeric characters
//! (~238 bits). Only its SHA-256 (hex) is stored; the key is shown once at
//! create/rotate time and looked up by hash.

use rand::distributions::Alphanumeric;
use rand::Rng;
use rusqlite::{params, OptionalExtension, Row};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{fmt_ts, is_unique_violation, now, ts_col, Store, StoreError};

/// Every API key starts with this.
pub const API_KEY_PREFIX: &str = "bht_";
const API_KEY_RANDOM_LEN: usize = 40;

/// A user (an API key holder) and their limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    /// Maximum number of sandboxes at once.
    pub max_sandboxes: u32,
    /// Maximum vCPUs per sandbox.
    pub max_cpus: u32,
    /// Maximum memory per sandbox, in MB.
    pub max_memory_mb: u32,
    pub created_at: OffsetDateTime,
}

/// Limits given at user creation. Defaults match `bhatti user create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u32,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            max_sandboxes: 5,
            max_cpus: 4,
            max_memory_mb: 4096,
        }
    }
}

/// A user plus how many sandboxes they have now (for `bhatti user list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub user: User,
    pub sandboxes: u32,
}

/// A new random API key (`bht_…`).
pub fn generate_api_key() -> String {
    let random: String = rand::rngs::OsRng
        .sample_iter(&Alphanumeric)
        .take(API_KEY_RANDOM_LEN)
        .map(char::from)
        .collect();
    format!("{API_KEY_PREFIX}{random}")
}

/// SHA-256 of the whole key, lowercase hex: what the database holds.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// User names follow the sandbox name rule: `[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}`.
pub fn validate_user_name(name: &str) -> Result<(), StoreError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid user name {name:?}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// `[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}`.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

const USER_COLUMNS: &str = "id, name, max_sandboxes, max_cpus, max_memory_mb, created_at";

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get("id")?,
        name: row.get("name")?,
        max_sandboxes: row.get("max_sandboxes")?,
        max_cpus: row.get("max_cpus")?,
        max_memory_mb: row.get("max_memory_mb")?,
        created_at: ts_col(row, "created_at")?,
    })
}

fn no_user(name: &str) -> StoreError {
    StoreError::NotFound(format!("no user named {name}"))
}

fn check_limits(limits: &UserLimits) -> Result<(), StoreError> {
    if limits.max_cpus == 0 {
        return Err(StoreError::Invalid("max-cpus must be at least 1".into()));
    }
    if limits.max_memory_mb == 0 {
        return Err(StoreError::Invalid(
            "max-memory must be at least 1 MB".into(),
        ));
    }
    Ok(())
}

impl Store {
    /// Creates a user; returns it and its API key (the only time the key
    /// exists in clear).
    pub fn create_user(
        &self,
        name: &str,
        limits: UserLimits,
    ) -> Result<(User, String), StoreError> {
        validate_user_name(name)?;
        check_limits(&limits)?;
        let key = generate_api_key();
        let created_at = now();
        let id = self.write_tx(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )?;
            if exists {
                return Err(StoreError::Conflict(format!("user {name} already exists")));
            }
            tx.execute(
                "INSERT INTO users (name, key_hash, max_sandboxes, max_cpus, max_memory_mb, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    name,
                    hash_api_key(&key),
                    limits.max_sandboxes,
                    limits.max_cpus,
                    limits.max_memory_mb,
                    fmt_ts(created_at)
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("user {name} already exists"))
                } else {
                    e.into()
                }
            })?;
            Ok(tx.last_insert_rowid())
        })?;
        let user = User {
            id,
            name: name.to_string(),
            max_sandboxes: limits.max_sandboxes,
            max_cpus: limits.max_cpus,
            max_memory_mb: limits.max_memory_mb,
            created_at,
        };
        Ok((user, key))
    }

    /// The user with this id.
    pub fn get_user(&self, id: i64) -> Result<User, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"),
                [id],
                user_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no user with id {id}")))
    }

    /// The user with this name.
    pub fn get_user_by_name(&self, name: &str) -> Result<User, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"),
                [name],
                user_from_row,
            )
            .optional()?
            .ok_or_else(|| no_user(name))
    }

    /// The user owning `api_key`, or `None` for an unknown key.
    pub fn authenticate(&self, api_key: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE key_hash = ?1"),
                [hash_api_key(api_key)],
                user_from_row,
            )
            .optional()?)
    }

    /// All users with their current sandbox counts, by name.
    pub fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT u.id AS id, u.name AS name, u.max_sandboxes AS max_sandboxes,
                    u.max_cpus AS max_cpus, u.max_memory_mb AS max_memory_mb,
                    u.created_at AS created_at,
                    (SELECT COUNT(*) FROM sandboxes s WHERE s.user_id = u.id) AS sandbox_count
             FROM users u ORDER BY u.name",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(UserSummary {
                user: user_from_row(row)?,
                sandboxes: row.get("sandbox_count")?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Replaces the user's API key; the old one stops working at once.
    /// Returns the new key.
    pub fn rotate_key(&self, name: &str) -> Result<String, StoreError> {
        let key = generate_api_key();
        let changed = self.conn().execute(
            "UPDATE users SET key_hash = ?1 WHERE name = ?2",
            params![hash_api_key(&key), name],
        )?;
        if changed == 0 {
            return Err(no_user(name));
        }
        Ok(key)
    }

    /// Deletes a user and their secrets. Refused (Conflict) while the user
    /// still has sandboxes.
    pub fn delete_user(&self, name: &str) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            let row: Option<(i64, u32)> = tx
                .query_row(
                    "SELECT id, (SELECT COUNT(*) FROM sandboxes s WHERE s.user_id = u.id)
                     FROM users u WHERE name = ?1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (id, count) = row.ok_or_else(|| no_user(name))?;
            if count > 0 {
                let noun = if count == 1 { "sandbox" } else { "sandboxes" };
                return Err(StoreError::Conflict(format!(
                    "user {name} still has {count} {noun}; destroy them first"
                )));
            }
            tx.execute("DELETE FROM users WHERE id = ?1", [id])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;

    #[test]
    fn api_key_shape_and_hash() {
        let k = generate_api_key();
        assert!(k.starts_with("bht_"));
        assert_eq!(k.len(), 4 + API_KEY_RANDOM_LEN);
        assert!(k[4..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(k, generate_api_key());
        let h = hash_api_key(&k);
        assert_eq!(h.len(), 64);
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names() {
        for ok in ["a", "alice", "A1", "a.b_c-d", &"x".repeat(63)] {
            assert!(validate_user_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(validate_user_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_get_authenticate() {
        let (_d, s) = temp_store();
        let (u, key) = s
            .create_user(
                "alice",
                UserLimits {
                    max_sandboxes: 2,
                    max_cpus: 3,
                    max_memory_mb: 1024,
                },
            )
            .expect("create");
        assert_eq!(u.max_cpus, 3);
        assert_eq!(s.get_user(u.id).expect("get"), u);
        assert_eq!(s.get_user_by_name("alice").expect("by name"), u);
        assert_eq!(s.authenticate(&key).expect("auth"), Some(u.clone()));
        assert_eq!(s.authenticate("bht_wrong").expect("auth"), None);
        assert_eq!(s.authenticate("").expect("auth"), None);
        // The key itself is not in the database, only its hash.
        let stored: String = s
            .conn()
            .query_row("SELECT key_hash FROM users", [], |r| r.get(0))
            .expect("hash");
        assert_eq!(stored, hash_api_key(&key));
        assert_ne!(stored, key);
    }

    #[test]
    fn duplicate_and_unknown() {
        let (_d, s) = temp_store();
        s.create_user("alice", UserLimits::default())
            .expect("create");
        let e = s
            .create_user("alice", UserLimits::default())
            .expect_err("dup");
        assert!(matches!(e, StoreError::Conflict(_)));
        assert_eq!(e.to_string(), "user alice already exists");
        let e = s.get_user_by_name("bob").expect_err("unknown");
        assert_eq!(e.to_string(), "no user named bob");
        assert!(matches!(s.rotate_key("bob"), Err(StoreError::NotFound(_))));
        assert!(matches!(s.delete_user("bob"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.create_user("bad name", UserLimits::default()),
            Err(StoreError::Invalid(_))
        ));
        let zero = UserLimits {
            max_cpus: 0,
            ..UserLimits::default()
        };
        assert!(matches!(
            s.create_user("carol", zero),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn rotate_invalidates_old_key() {
        let (_d, s) = temp_store();
        let (u, old) = s
            .create_user("alice", UserLimits::default())
            .expect("create");
        let new = s.rotate_key("alice").expect("rotate");
        assert_ne!(old, new);
        assert_eq!(s.authenticate(&old).expect("auth"), None);
        assert_eq!(
            s.authenticate(&new).expect("auth").map(|u| u.id),
            Some(u.id)
        );
    }

    #[test]
    fn list_counts_sandboxes_and_delete_refuses_with_sandboxes() {
        let (_d, s) = temp_store();
        let (alice, _) = s
            .create_user("alice", UserLimits::default())
            .expect("alice");
        s.create_user("bob", UserLimits::default()).expect("bob");
        let subnet = crate::config::DaemonConfig::default().subnet;
        let sb = s
            .create_sandbox(&crate::store::NewSandbox::new(alice.id, "dev"), &subnet)
            .expect("sandbox");
        let list = s.list_users().expect("list");
        let names: Vec<_> = list
            .iter()
            .map(|u| (u.user.name.as_str(), u.sandboxes))
            .collect();
        assert_eq!(names, [("alice", 1), ("bob", 0)]);
        let e = s.delete_user("alice").expect_err("has sandboxes");
        assert!(matches!(e, StoreError::Conflict(_)));
        assert!(e.to_string().contains("1 sandbox"), "{e}");
        s.delete_sandbox(&sb.id).expect("delete sandbox");
        s.put_secret(alice.id, "TOKEN", b"ct").expect("secret");
        s.delete_user("alice").expect("delete");
        assert!(s.get_user_by_name("alice").is_err());
        // Secrets went with the user.
        let n: i64 = s
            .conn()
            .query_row("SELECT COUNT(*) FROM secrets", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 0);
    }
}
