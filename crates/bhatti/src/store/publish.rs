//! Publish rules: `<alias>.<domain>` → a sandbox's port.
//!
//! Aliases are lowercase DNS labels, unique across all users. Rules are
//! deleted with their sandbox (foreign key cascade).

use rand::Rng;
use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::{fmt_ts, is_unique_violation, now, ts_col, Store, StoreError};

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRule {
    pub id: i64,
    pub sandbox_id: String,
    pub user_id: i64,
    pub port: u16,
    pub alias: String,
    pub created_at: OffsetDateTime,
}

/// An alias must be a DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
/// (upper case is accepted and folded to lower case by the store).
pub fn validate_alias(alias: &str) -> Result<(), StoreError> {
    let ok = !alias.is_empty()
        && alias.len() <= 63
        && !alias.starts_with('-')
        && !alias.ends_with('-')
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid alias {alias:?}: use 1-63 letters, digits or '-', not starting or ending with '-'"
        )))
    }
}

/// `<sandbox-name>-<6 random [a-z0-9]>`, with the name folded into a DNS
/// label (lowercase, `.`/`_` → `-`, trimmed to fit 63 characters).
pub fn generate_alias(sandbox_name: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut base: String = sandbox_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(56)
        .collect();
    while base.ends_with('-') {
        base.pop();
    }
    let base = base.trim_start_matches('-');
    let mut rng = rand::rngs::OsRng;
    let suffix: String = (0..6)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect();
    if base.is_empty() {
        suffix
    } else {
        format!("{base}-{suffix}")
    }
}

fn rule_from_row(row: &Row<'_>) -> rusqlite::Result<PublishRule> {
    Ok(PublishRule {
        id: row.get("id")?,
        sandbox_id: row.get("sandbox_id")?,
        user_id: row.get("user_id")?,
        port: row.get("port")?,
        alias: row.get("alias")?,
        created_at: ts_col(row, "created_at")?,
    })
}

const RULE_COLUMNS: &str = "id, sandbox_id, user_id, port, alias, created_at";

impl Store {
    /// Publishes `port` of a sandbox under `alias`. `Conflict` when the
    /// alias is taken (by anyone) or the port is already published;
    /// `NotFound` when the sandbox does not exist.
    pub fn create_publish_rule(
        &self,
        sandbox_id: &str,
        port: u16,
        alias: &str,
    ) -> Result<PublishRule, StoreError> {
        validate_alias(alias)?;
        if port == 0 {
            return Err(StoreError::Invalid("port must be 1-65535".into()));
        }
        let alias = alias.to_ascii_lowercase();
        let created_at = now();
        let (id, user_id) = self.write_tx(|tx| {
            let user_id: i64 = tx
                .query_row(
                    "SELECT user_id FROM sandboxes WHERE id = ?1",
                    [sandbox_id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("sandbox {sandbox_id} not found")))?;
            let port_taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM publish_rules WHERE sandbox_id = ?1 AND port = ?2)",
                params![sandbox_id, port],
                |r| r.get(0),
            )?;
            if port_taken {
                return Err(StoreError::Conflict(format!(
                    "port {port} is already published"
                )));
            }
            let alias_taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM publish_rules WHERE alias = ?1)",
                [&alias],
                |r| r.get(0),
            )?;
            if alias_taken {
                return Err(StoreError::Conflict(format!(
                    "alias {alias} is already taken"
                )));
            }
            tx.execute(
                "INSERT INTO publish_rules (sandbox_id, user_id, port, alias, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![sandbox_id, user_id, port, alias, fmt_ts(created_at)],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!(
                        "alias {alias} or port {port} is already published"
                    ))
                } else {
                    e.into()
                }
            })?;
            Ok((tx.last_insert_rowid(), user_id))
        })?;
        Ok(PublishRule {
            id,
            sandbox_id: sandbox_id.to_string(),
            user_id,
            port,
            alias,
            created_at,
        })
    }

    /// A sandbox's rules, by port.
    pub fn list_publish_rules(&self, sandbox_id: &str) -> Result<Vec<PublishRule>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RULE_COLUMNS} FROM publish_rules WHERE sandbox_id = ?1 ORDER BY port"
        ))?;
        let rows = stmt.query_map([sandbox_id], rule_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The rule for an alias (case-insensitive), for the public proxy.
    pub fn find_publish_rule(&self, alias: &str) -> Result<PublishRule, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {RULE_COLUMNS} FROM publish_rules WHERE alias = ?1"),
                [alias],
                rule_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no published alias {alias}")))
    }

    /// Unpublishes a port; `NotFound` if it was not published.
    pub fn delete_publish_rule(&self, sandbox_id: &str, port: u16) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "DELETE FROM publish_rules WHERE sandbox_id = ?1 AND port = ?2",
            params![sandbox_id, port],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "port {port} is not published"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;
    use crate::store::{NewSandbox, UserLimits};

    #[test]
    fn aliases() {
        for ok in ["a", "my-app", "A1", &"x".repeat(63)] {
            assert!(validate_alias(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "a_b", "a b", &"x".repeat(64)] {
            assert!(validate_alias(bad).is_err(), "{bad:?}");
        }
        let g = generate_alias("My.Dev_box");
        assert!(g.starts_with("my-dev-box-"), "{g}");
        assert_eq!(g.len(), "my-dev-box-".len() + 6);
        validate_alias(&g).expect("generated alias is valid");
        validate_alias(&generate_alias(&"a".repeat(63))).expect("long name");
        validate_alias(&generate_alias("a-")).expect("trailing dash");
    }

    #[test]
    fn publish_conflicts_and_cascade() {
        let (_d, s) = temp_store();
        let subnet = crate::config::DaemonConfig::default().subnet;
        let (a, _) = s
            .create_user("alice", UserLimits::default())
            .expect("alice");
        let (b, _) = s.create_user("bob", UserLimits::default()).expect("bob");
        let sa = s
            .create_sandbox(&NewSandbox::new(a.id, "dev"), &subnet)
            .expect("sa");
        let sb = s
            .create_sandbox(&NewSandbox::new(b.id, "dev"), &subnet)
            .expect("sb");
        let r = s
            .create_publish_rule(&sa.id, 3000, "My-App")
            .expect("publish");
        assert_eq!(
            (r.alias.as_str(), r.user_id, r.port),
            ("my-app", a.id, 3000)
        );
        assert_eq!(s.find_publish_rule("MY-APP").expect("find"), r);
        // Same port again on the same sandbox.
        let e = s
            .create_publish_rule(&sa.id, 3000, "other")
            .expect_err("port");
        assert_eq!(e.to_string(), "port 3000 is already published");
        // Alias taken by another user.
        let e = s
            .create_publish_rule(&sb.id, 3000, "my-app")
            .expect_err("alias");
        assert!(matches!(e, StoreError::Conflict(_)));
        assert_eq!(e.to_string(), "alias my-app is already taken");
        s.create_publish_rule(&sa.id, 8080, "second")
            .expect("second port");
        assert!(matches!(
            s.create_publish_rule("sb_nope", 1, "x"),
            Err(StoreError::NotFound(_))
        ));
        let ports: Vec<_> = s
            .list_publish_rules(&sa.id)
            .expect("list")
            .iter()
            .map(|r| r.port)
            .collect();
        assert_eq!(ports, [3000, 8080]);
        s.delete_publish_rule(&sa.id, 8080).expect("unpublish");
        assert!(matches!(
            s.delete_publish_rule(&sa.id, 8080),
            Err(StoreError::NotFound(_))
        ));
        // Rules die with their sandbox.
        s.delete_sandbox(&sa.id).expect("delete sandbox");
        assert!(matches!(
            s.find_publish_rule("my-app"),
            Err(StoreError::NotFound(_))
        ));
        s.create_publish_rule(&sb.id, 3000, "my-app")
            .expect("alias free again");
    }
}
