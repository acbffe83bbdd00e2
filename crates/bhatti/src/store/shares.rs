//! Web terminal shares: one revocable token per sandbox that opens its
//! terminal in a browser (`/_shell/<id>#token=…`) without an API key.
//!
//! Only the SHA-256 of a token is stored. A new share replaces the previous
//! one; a share dies with its sandbox (foreign key cascade).

use rand::distributions::Alphanumeric;
use rand::Rng;
use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{fmt_ts, now, ts_col, Store, StoreError};

/// Every share token starts with this.
pub const SHARE_TOKEN_PREFIX: &str = "bsh_";
/// Random characters after the prefix (`[A-Za-z0-9]`, ~238 bits).
const SHARE_TOKEN_RANDOM_LEN: usize = 40;

/// The share of a sandbox, as stored (no token: only its hash is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRecord {
    pub sandbox_id: String,
    pub token_hash: String,
    pub created_at: OffsetDateTime,
}

/// A new random share token (`bsh_…`).
pub fn generate_share_token() -> String {
    let random: String = rand::rngs::OsRng
        .sample_iter(&Alphanumeric)
        .take(SHARE_TOKEN_RANDOM_LEN)
        .map(char::from)
        .collect();
    format!("{SHARE_TOKEN_PREFIX}{random}")
}

/// SHA-256 of the whole token, lowercase hex: what the database holds.
pub fn hash_share_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Store {
    /// Mints a share for a sandbox, replacing any previous one, and returns
    /// the token (shown once) with the stored record. `NotFound` when the
    /// sandbox does not exist.
    pub fn create_share(&self, sandbox_id: &str) -> Result<(String, ShareRecord), StoreError> {
        let token = generate_share_token();
        let rec = ShareRecord {
            sandbox_id: sandbox_id.to_string(),
            token_hash: hash_share_token(&token),
            created_at: now(),
        };
        self.write_tx(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)",
                [sandbox_id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(StoreError::NotFound(format!(
                    "sandbox {sandbox_id} not found"
                )));
            }
            tx.execute(
                "INSERT INTO shares (sandbox_id, token_hash, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sandbox_id) DO UPDATE
                 SET token_hash = excluded.token_hash, created_at = excluded.created_at",
                params![rec.sandbox_id, rec.token_hash, fmt_ts(rec.created_at)],
            )?;
            Ok(())
        })?;
        Ok((token, rec))
    }

    /// The sandbox's share, if it has one.
    pub fn get_share(&self, sandbox_id: &str) -> Result<Option<ShareRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT sandbox_id, token_hash, created_at FROM shares WHERE sandbox_id = ?1",
                [sandbox_id],
                |r| {
                    Ok(ShareRecord {
                        sandbox_id: r.get("sandbox_id")?,
                        token_hash: r.get("token_hash")?,
                        created_at: ts_col(r, "created_at")?,
                    })
                },
            )
            .optional()?)
    }

    /// Whether `token` is the current share token of `sandbox_id`.
    pub fn share_token_valid(&self, sandbox_id: &str, token: &str) -> Result<bool, StoreError> {
        let hash = hash_share_token(token);
        Ok(self.conn().query_row(
            "SELECT EXISTS (SELECT 1 FROM shares WHERE sandbox_id = ?1 AND token_hash = ?2)",
            params![sandbox_id, hash],
            |r| r.get(0),
        )?)
    }

    /// Ends the sandbox's share; false when it had none.
    pub fn delete_share(&self, sandbox_id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM shares WHERE sandbox_id = ?1", [sandbox_id])?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;
    use crate::store::{NewSandbox, UserLimits};

    fn sandbox(store: &Store) -> String {
        let user = store
            .create_user("alice", UserLimits::default())
            .expect("user")
            .0;
        let subnet = "192.168.150.0/24".parse().expect("subnet");
        store
            .create_sandbox(&NewSandbox::new(user.id, "dev"), &subnet)
            .expect("sandbox")
            .id
    }

    #[test]
    fn share_is_hashed_replaced_and_revoked() {
        let (_dir, store) = temp_store();
        let id = sandbox(&store);
        let (t1, rec) = store.create_share(&id).expect("share");
        assert!(t1.starts_with(SHARE_TOKEN_PREFIX), "{t1}");
        assert_ne!(rec.token_hash, t1, "the token is not stored");
        assert!(store.share_token_valid(&id, &t1).expect("check"));
        let (t2, _) = store.create_share(&id).expect("second share");
        assert_ne!(t1, t2);
        assert!(!store.share_token_valid(&id, &t1).expect("old"), "replaced");
        assert!(store.share_token_valid(&id, &t2).expect("new"));
        assert!(!store.share_token_valid("sb_other", &t2).expect("other"));
        assert!(store.delete_share(&id).expect("revoke"));
        assert!(!store.share_token_valid(&id, &t2).expect("revoked"));
        assert!(!store.delete_share(&id).expect("again"));
    }

    #[test]
    fn share_needs_a_sandbox_and_dies_with_it() {
        let (_dir, store) = temp_store();
        assert!(matches!(
            store.create_share("sb_missing"),
            Err(StoreError::NotFound(_))
        ));
        let id = sandbox(&store);
        store.create_share(&id).expect("share");
        store.delete_sandbox(&id).expect("delete");
        assert!(store.get_share(&id).expect("get").is_none());
    }
}
