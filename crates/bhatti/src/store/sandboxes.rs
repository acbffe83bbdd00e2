//! Sandbox rows: identity, owner, resources, network address, state.
//!
//! A row exists exactly as long as the sandbox does: destroying a sandbox
//! deletes its row (its publish rules cascade), which frees its name and IP.
//! IPs are allocated inside the insert's transaction: the lowest guest
//! address of the subnet that no row holds.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::str::FromStr;

use rand::Rng;
use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::labels::{self, Labels};
use super::users::is_valid_name;
use super::{conversion_err, fmt_ts, is_unique_violation, now, ts_col, Store, StoreError};
use crate::config::Ipv4Subnet;
use crate::egress::EgressPolicy;

/// Lifecycle and thermal state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxStatus {
    /// Row inserted, VM being created and booted.
    Creating,
    /// Hot: the VM runs.
    Running,
    /// Warm: vCPUs stopped through QMP; RAM kept.
    Warm,
    /// Cold: state saved to disk after idling, QEMU exited; woken on use.
    Cold,
    /// Stopped on request (state saved to disk); started on request.
    Stopped,
    /// The VM died or failed to boot.
    Error,
    /// Teardown in progress; the row goes away when it finishes.
    Destroying,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "creating",
            SandboxStatus::Running => "running",
            SandboxStatus::Warm => "warm",
            SandboxStatus::Cold => "cold",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Error => "error",
            SandboxStatus::Destroying => "destroying",
        }
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "creating" => SandboxStatus::Creating,
            "running" => SandboxStatus::Running,
            "warm" => SandboxStatus::Warm,
            "cold" => SandboxStatus::Cold,
            "stopped" => SandboxStatus::Stopped,
            "error" => SandboxStatus::Error,
            "destroying" => SandboxStatus::Destroying,
            other => return Err(format!("unknown sandbox status {other:?}")),
        })
    }
}

/// A stored sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// `sb_` + 12 hex characters. Lookups by "id or name" try the id first.
    pub id: String,
    pub user_id: i64,
    pub name: String,
    pub status: SandboxStatus,
    pub ip: Ipv4Addr,
    pub cpus: u32,
    pub memory_mb: u32,
    pub keep_hot: bool,
    /// Token the host presents to the guest agent (AUTH frame).
    pub token: String,
    pub env: BTreeMap<String, String>,
    /// Names of the user's secrets injected as environment variables.
    pub secrets: Vec<String>,
    pub init: Option<String>,
    /// The owner's labels (see `store::labels`).
    pub labels: Labels,
    /// Where the guest may connect to.
    pub egress: EgressPolicy,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub last_active_at: OffsetDateTime,
    /// How its VM came to be: `boot`, `template`, `fork` or `snapshot`
    /// (`None`: made by an older daemon, or not yet running).
    pub born: Option<String>,
}

/// What [`Store::create_sandbox`] needs. `NewSandbox::new` fills a random
/// id and token and the API defaults (1 vCPU, 512 MB, status `creating`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSandbox {
    pub id: String,
    pub user_id: i64,
    pub name: String,
    pub status: SandboxStatus,
    pub cpus: u32,
    pub memory_mb: u32,
    pub keep_hot: bool,
    pub token: String,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<String>,
    pub init: Option<String>,
    pub labels: Labels,
    pub egress: EgressPolicy,
    /// Addresses not to give it (one a template build holds for a moment).
    pub avoid_ips: Vec<Ipv4Addr>,
}

impl NewSandbox {
    pub fn new(user_id: i64, name: impl Into<String>) -> Self {
        Self {
            id: generate_sandbox_id(),
            user_id,
            name: name.into(),
            status: SandboxStatus::Creating,
            cpus: 1,
            memory_mb: 512,
            keep_hot: false,
            token: generate_sandbox_token(),
            env: BTreeMap::new(),
            secrets: Vec::new(),
            init: None,
            labels: Labels::new(),
            egress: EgressPolicy::default(),
            avoid_ips: Vec::new(),
        }
    }
}

/// Fields `PATCH /sandboxes/:id` may change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxPatch {
    pub name: Option<String>,
    pub keep_hot: Option<bool>,
    /// Labels to add or change.
    pub labels_set: Labels,
    /// Label keys to remove (after `labels_set` is applied).
    pub labels_delete: Vec<String>,
}

/// `sb_` + 12 random lowercase hex characters.
pub fn generate_sandbox_id() -> String {
    let bytes: [u8; 6] = rand::rngs::OsRng.gen();
    format!("sb_{}", hex::encode(bytes))
}

/// 32 random bytes as 64 hex characters.
pub fn generate_sandbox_token() -> String {
    let bytes: [u8; 32] = rand::rngs::OsRng.gen();
    hex::encode(bytes)
}

/// Sandbox names: `[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}`.
pub fn validate_sandbox_name(name: &str) -> Result<(), StoreError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid sandbox name {name:?}: must match [a-zA-Z0-9][a-zA-Z0-9._-]{{0,62}}"
        )))
    }
}

const SANDBOX_COLUMNS: &str = "id, user_id, name, status, ip, cpus, memory_mb, keep_hot, token, \
     env, secrets, init, labels, egress, created_at, updated_at, last_active_at, born";

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<SandboxRecord> {
    let status: String = row.get("status")?;
    let ip: String = row.get("ip")?;
    let env: String = row.get("env")?;
    let secrets: String = row.get("secrets")?;
    let labels: String = row.get("labels")?;
    let egress: String = row.get("egress")?;
    Ok(SandboxRecord {
        id: row.get("id")?,
        user_id: row.get("user_id")?,
        name: row.get("name")?,
        status: status.parse().map_err(conversion_err)?,
        ip: ip
            .parse()
            .map_err(|_| conversion_err(format!("bad sandbox ip {ip:?}")))?,
        cpus: row.get("cpus")?,
        memory_mb: row.get("memory_mb")?,
        keep_hot: row.get("keep_hot")?,
        token: row.get("token")?,
        env: serde_json::from_str(&env)
            .map_err(|e| conversion_err(format!("bad sandbox env: {e}")))?,
        secrets: serde_json::from_str(&secrets)
            .map_err(|e| conversion_err(format!("bad sandbox secrets: {e}")))?,
        init: row.get("init")?,
        labels: serde_json::from_str(&labels)
            .map_err(|e| conversion_err(format!("bad sandbox labels: {e}")))?,
        egress: serde_json::from_str(&egress)
            .map_err(|e| conversion_err(format!("bad sandbox egress: {e}")))?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
        last_active_at: ts_col(row, "last_active_at")?,
        born: row.get("born")?,
    })
}

fn not_found(id_or_name: &str) -> StoreError {
    StoreError::NotFound(format!("sandbox {id_or_name} not found"))
}

fn name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("a sandbox named {name} already exists"))
}

fn json(v: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(e.to_string()))
}

impl Store {
    /// Refuses (`LimitExceeded`) when user `user_id` already has their
    /// `max_sandboxes`: a cheap early answer before costly work (a fork's
    /// checkpoint); [`create_sandbox`](Self::create_sandbox) checks again.
    pub fn check_sandbox_quota(&self, user_id: i64) -> Result<(), StoreError> {
        let (user_name, max): (String, u32) = self
            .conn()
            .query_row(
                "SELECT name, max_sandboxes FROM users WHERE id = ?1",
                [user_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no user with id {user_id}")))?;
        let count: u32 = self.conn().query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE user_id = ?1",
            [user_id],
            |r| r.get(0),
        )?;
        if count >= max {
            return Err(StoreError::LimitExceeded(format!(
                "sandbox limit reached: user {user_name} may have at most {max} sandboxes"
            )));
        }
        Ok(())
    }

    /// Inserts a sandbox, allocating its IP, in one transaction that also
    /// enforces the owner's `max_sandboxes` (`LimitExceeded`) and the name's
    /// uniqueness among the owner's sandboxes (`Conflict`). Clamping cpus
    /// and memory to the user's per-sandbox limits is the caller's job.
    pub fn create_sandbox(
        &self,
        new: &NewSandbox,
        subnet: &Ipv4Subnet,
    ) -> Result<SandboxRecord, StoreError> {
        validate_sandbox_name(&new.name)?;
        if new.cpus == 0 || new.memory_mb == 0 {
            return Err(StoreError::Invalid(
                "cpus and memory_mb must be at least 1".into(),
            ));
        }
        labels::validate(&new.labels)?;
        let env = json(&new.env)?;
        let secrets = json(&new.secrets)?;
        let labels = json(&new.labels)?;
        let egress = json(&new.egress)?;
        let at = now();
        let ip = self.write_tx(|tx| {
            let user: Option<(String, u32)> = tx
                .query_row(
                    "SELECT name, max_sandboxes FROM users WHERE id = ?1",
                    [new.user_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (user_name, max) = user
                .ok_or_else(|| StoreError::NotFound(format!("no user with id {}", new.user_id)))?;
            let count: u32 = tx.query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE user_id = ?1",
                [new.user_id],
                |r| r.get(0),
            )?;
            if count >= max {
                return Err(StoreError::LimitExceeded(format!(
                    "sandbox limit reached: user {user_name} may have at most {max} sandboxes"
                )));
            }
            let taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sandboxes WHERE user_id = ?1 AND name = ?2)",
                params![new.user_id, new.name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(name_taken(&new.name));
            }
            let used: HashSet<Ipv4Addr> = {
                let mut stmt = tx.prepare("SELECT ip FROM sandboxes")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                let mut used = HashSet::new();
                for ip in rows {
                    if let Ok(ip) = ip?.parse() {
                        used.insert(ip);
                    }
                }
                used
            };
            let ip = subnet
                .guest_hosts()
                .find(|ip| !used.contains(ip) && !new.avoid_ips.contains(ip))
                .ok_or_else(|| StoreError::SubnetFull(subnet.to_string()))?;
            tx.execute(
                "INSERT INTO sandboxes (id, user_id, name, status, ip, cpus, memory_mb, keep_hot,
                     token, env, secrets, init, labels, egress, created_at, updated_at, last_active_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?14, ?15, ?13, ?13, ?13)",
                params![
                    new.id,
                    new.user_id,
                    new.name,
                    new.status.as_str(),
                    ip.to_string(),
                    new.cpus,
                    new.memory_mb,
                    new.keep_hot,
                    new.token,
                    env,
                    secrets,
                    new.init,
                    fmt_ts(at),
                    labels,
                    egress,
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("sandbox id {} already exists", new.id))
                } else {
                    e.into()
                }
            })?;
            Ok(ip)
        })?;
        Ok(SandboxRecord {
            id: new.id.clone(),
            user_id: new.user_id,
            name: new.name.clone(),
            status: new.status,
            ip,
            cpus: new.cpus,
            memory_mb: new.memory_mb,
            keep_hot: new.keep_hot,
            token: new.token.clone(),
            env: new.env.clone(),
            secrets: new.secrets.clone(),
            init: new.init.clone(),
            labels: new.labels.clone(),
            egress: new.egress.clone(),
            created_at: at,
            updated_at: at,
            last_active_at: at,
            born: None,
        })
    }

    /// A sandbox by id, whatever its owner (daemon-internal use).
    pub fn get_sandbox(&self, id: &str) -> Result<SandboxRecord, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
                sandbox_from_row,
            )
            .optional()?
            .ok_or_else(|| not_found(id))
    }

    /// One of `user_id`'s sandboxes by id or name (id wins). Another user's
    /// sandbox is `NotFound`, exactly like a missing one.
    pub fn find_sandbox(
        &self,
        user_id: i64,
        id_or_name: &str,
    ) -> Result<SandboxRecord, StoreError> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE user_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
                ),
                params![user_id, id_or_name],
                sandbox_from_row,
            )
            .optional()?
            .ok_or_else(|| not_found(id_or_name))
    }

    /// The user's sandboxes, oldest first.
    pub fn list_sandboxes(&self, user_id: i64) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE user_id = ?1 ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([user_id], sandbox_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every sandbox of every user (re-adoption at daemon start, idle sweeps).
    pub fn list_all_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([], sandbox_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of sandboxes of one user, or of everyone (`None`, for /health).
    pub fn count_sandboxes(&self, user_id: Option<i64>) -> Result<u32, StoreError> {
        let conn = self.conn();
        Ok(match user_id {
            Some(id) => conn.query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE user_id = ?1",
                [id],
                |r| r.get(0),
            )?,
            None => conn.query_row("SELECT COUNT(*) FROM sandboxes", [], |r| r.get(0))?,
        })
    }

    /// Sets the status (and `updated_at`).
    /// Records how sandbox `id`'s VM came to be (see [`SandboxRecord::born`]).
    pub fn set_sandbox_born(&self, id: &str, born: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET born = ?2 WHERE id = ?1",
            params![id, born],
        )?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// The addresses sandboxes hold now.
    pub fn used_ips(&self) -> Result<HashSet<Ipv4Addr>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT ip FROM sandboxes")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut used = HashSet::new();
        for ip in rows {
            if let Ok(ip) = ip?.parse() {
                used.insert(ip);
            }
        }
        Ok(used)
    }

    pub fn set_sandbox_status(&self, id: &str, status: SandboxStatus) -> Result<(), StoreError> {
        if self.update_status(id, None, status)? == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// Moves a sandbox from `from` to `to`; returns whether it was in `from`
    /// (a compare-and-set, so a concurrent change of status wins).
    pub fn set_sandbox_status_if(
        &self,
        id: &str,
        from: SandboxStatus,
        to: SandboxStatus,
    ) -> Result<bool, StoreError> {
        Ok(self.update_status(id, Some(from), to)? == 1)
    }

    /// The rows changed by setting `id`'s status to `to` (only from `from`, if given).
    fn update_status(
        &self,
        id: &str,
        from: Option<SandboxStatus>,
        to: SandboxStatus,
    ) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE sandboxes SET status = ?1, updated_at = ?2 WHERE id = ?3 AND (?4 IS NULL OR status = ?4)",
            params![to.as_str(), fmt_ts(now()), id, from.map(|f| f.as_str())],
        )?)
    }

    /// Records activity now (idle timers count from `last_active_at`).
    pub fn touch_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET last_active_at = ?1 WHERE id = ?2",
            params![fmt_ts(now()), id],
        )?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// Sets `last_active_at` to `at`: the thermal manager persists the use
    /// it saw, so a restarted daemon resumes its idle clocks instead of
    /// starting them over.
    pub fn set_last_active(&self, id: &str, at: OffsetDateTime) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET last_active_at = ?1 WHERE id = ?2",
            params![fmt_ts(at), id],
        )?;
        Ok(())
    }

    /// Renames and/or changes `keep_hot` of one of the user's sandboxes
    /// (by id or name); `Conflict` on a name clash. Returns the new record.
    pub fn update_sandbox(
        &self,
        user_id: i64,
        id_or_name: &str,
        patch: &SandboxPatch,
    ) -> Result<SandboxRecord, StoreError> {
        if let Some(name) = &patch.name {
            validate_sandbox_name(name)?;
        }
        patch
            .labels_set
            .iter()
            .try_for_each(|(k, v)| labels::validate_pair(k, v))?;
        patch
            .labels_delete
            .iter()
            .try_for_each(|k| labels::validate_key(k))?;
        let id = self.write_tx(|tx| {
            let id: String = tx
                .query_row(
                    "SELECT id FROM sandboxes WHERE user_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1",
                    params![user_id, id_or_name],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| not_found(id_or_name))?;
            let at = fmt_ts(now());
            if let Some(name) = &patch.name {
                let taken: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sandboxes
                                    WHERE user_id = ?1 AND name = ?2 AND id <> ?3)",
                    params![user_id, name, id],
                    |r| r.get(0),
                )?;
                if taken {
                    return Err(name_taken(name));
                }
                tx.execute(
                    "UPDATE sandboxes SET name = ?1, updated_at = ?2 WHERE id = ?3",
                    params![name, at, id],
                )?;
            }
            if let Some(keep_hot) = patch.keep_hot {
                tx.execute(
                    "UPDATE sandboxes SET keep_hot = ?1, updated_at = ?2 WHERE id = ?3",
                    params![keep_hot, at, id],
                )?;
            }
            if !patch.labels_set.is_empty() || !patch.labels_delete.is_empty() {
                let text: String =
                    tx.query_row("SELECT labels FROM sandboxes WHERE id = ?1", [&id], |r| {
                        r.get(0)
                    })?;
                let mut have: Labels = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Invalid(format!("stored labels: {e}")))?;
                have.extend(patch.labels_set.clone());
                for k in &patch.labels_delete {
                    have.remove(k);
                }
                labels::validate(&have)?;
                tx.execute(
                    "UPDATE sandboxes SET labels = ?1, updated_at = ?2 WHERE id = ?3",
                    params![json(&have)?, at, id],
                )?;
            }
            Ok(id)
        })?;
        self.get_sandbox(&id)
    }

    /// Deletes the row (publish rules cascade); frees its name and IP.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;
    use crate::store::UserLimits;

    fn subnet() -> Ipv4Subnet {
        "192.168.137.0/24".parse().expect("subnet")
    }

    fn user(s: &Store, name: &str, max: u32) -> i64 {
        s.create_user(
            name,
            UserLimits {
                max_sandboxes: max,
                ..UserLimits::default()
            },
        )
        .expect("user")
        .0
        .id
    }

    #[test]
    fn id_and_token_shapes() {
        let id = generate_sandbox_id();
        assert_eq!(id.len(), 15);
        assert!(id.starts_with("sb_"));
        assert_eq!(generate_sandbox_token().len(), 64);
    }

    #[test]
    fn create_roundtrip_and_find() {
        let (_d, s) = temp_store();
        let u = user(&s, "alice", 5);
        let mut new = NewSandbox::new(u, "dev");
        new.cpus = 2;
        new.memory_mb = 1024;
        new.keep_hot = true;
        new.env.insert("A".into(), "1".into());
        new.secrets.push("API_KEY".into());
        new.init = Some("echo hi".into());
        let rec = s.create_sandbox(&new, &subnet()).expect("create");
        assert_eq!(rec.ip, Ipv4Addr::new(192, 168, 137, 2));
        assert_eq!(s.get_sandbox(&rec.id).expect("get"), rec);
        assert_eq!(s.find_sandbox(u, "dev").expect("by name"), rec);
        assert_eq!(s.find_sandbox(u, &rec.id).expect("by id"), rec);
        assert_eq!(
            s.list_sandboxes(u).expect("list"),
            std::slice::from_ref(&rec)
        );
        assert_eq!(s.count_sandboxes(Some(u)).expect("count"), 1);
        assert_eq!(s.count_sandboxes(None).expect("count"), 1);
        // Another user's sandbox is invisible.
        let other = user(&s, "bob", 5);
        assert!(matches!(
            s.find_sandbox(other, "dev"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.find_sandbox(other, &rec.id),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn names_unique_per_user_only() {
        let (_d, s) = temp_store();
        let a = user(&s, "alice", 5);
        let b = user(&s, "bob", 5);
        s.create_sandbox(&NewSandbox::new(a, "dev"), &subnet())
            .expect("a/dev");
        let e = s
            .create_sandbox(&NewSandbox::new(a, "dev"), &subnet())
            .expect_err("dup");
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        s.create_sandbox(&NewSandbox::new(b, "dev"), &subnet())
            .expect("b/dev");
        assert!(matches!(
            s.create_sandbox(&NewSandbox::new(a, "bad name"), &subnet()),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.create_sandbox(&NewSandbox::new(999, "x"), &subnet()),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn max_sandboxes_enforced() {
        let (_d, s) = temp_store();
        let a = user(&s, "alice", 2);
        s.create_sandbox(&NewSandbox::new(a, "one"), &subnet())
            .expect("1");
        s.create_sandbox(&NewSandbox::new(a, "two"), &subnet())
            .expect("2");
        let e = s
            .create_sandbox(&NewSandbox::new(a, "three"), &subnet())
            .expect_err("limit");
        assert!(matches!(e, StoreError::LimitExceeded(_)), "{e}");
        // Nothing partial was written.
        assert_eq!(s.count_sandboxes(Some(a)).expect("count"), 2);
    }

    #[test]
    fn ip_allocation_lowest_free_no_reuse_while_allocated() {
        let (_d, s) = temp_store();
        let a = user(&s, "alice", 100);
        let net: Ipv4Subnet = "10.9.0.0/29".parse().expect("subnet"); // guests .2 to .6
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = s
                .create_sandbox(&NewSandbox::new(a, format!("s{i}")), &net)
                .expect("create");
            assert_eq!(r.ip, Ipv4Addr::new(10, 9, 0, 2 + i));
            ids.push(r.id);
        }
        let e = s
            .create_sandbox(&NewSandbox::new(a, "full"), &net)
            .expect_err("full");
        assert!(matches!(e, StoreError::SubnetFull(_)), "{e}");
        // Free .4, then the next sandbox gets exactly .4.
        s.delete_sandbox(&ids[2]).expect("delete");
        let r = s
            .create_sandbox(&NewSandbox::new(a, "again"), &net)
            .expect("again");
        assert_eq!(r.ip, Ipv4Addr::new(10, 9, 0, 4));
    }

    #[test]
    fn avoided_addresses_are_not_given_and_born_is_recorded() {
        let (_d, s) = temp_store();
        let a = user(&s, "alice", 100);
        let net: Ipv4Subnet = "10.9.0.0/29".parse().expect("subnet"); // guests .2 to .6
        let mut new = NewSandbox::new(a, "x");
        new.avoid_ips = vec![Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 3)];
        let r = s.create_sandbox(&new, &net).expect("create");
        assert_eq!(r.ip, Ipv4Addr::new(10, 9, 0, 4));
        assert_eq!(r.born, None);
        s.set_sandbox_born(&r.id, "template").expect("born");
        assert_eq!(
            s.get_sandbox(&r.id).expect("get").born.as_deref(),
            Some("template")
        );
        assert!(s.used_ips().expect("used").contains(&r.ip));
    }

    #[test]
    fn concurrent_creates_get_distinct_ips() {
        let (d, s) = temp_store();
        let a = user(&s, "alice", 100);
        // Half the threads share one handle, the others each open their own
        // connection (as the daemon and `bhatti user` do).
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = if i % 2 == 0 {
                    s.clone()
                } else {
                    Store::open(d.path()).expect("second connection")
                };
                std::thread::spawn(move || {
                    s.create_sandbox(&NewSandbox::new(a, format!("t{i}")), &subnet())
                        .expect("create")
                        .ip
                })
            })
            .collect();
        let ips: HashSet<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(ips.len(), 8);
    }

    #[test]
    fn status_touch_update_delete() {
        let (_d, s) = temp_store();
        let a = user(&s, "alice", 5);
        let r = s
            .create_sandbox(&NewSandbox::new(a, "dev"), &subnet())
            .expect("dev");
        s.create_sandbox(&NewSandbox::new(a, "other"), &subnet())
            .expect("other");
        s.set_sandbox_status(&r.id, SandboxStatus::Running)
            .expect("status");
        s.touch_sandbox(&r.id).expect("touch");
        assert_eq!(
            s.get_sandbox(&r.id).expect("get").status,
            SandboxStatus::Running
        );
        let e = s
            .update_sandbox(
                a,
                "dev",
                &SandboxPatch {
                    name: Some("other".into()),
                    keep_hot: None,
                    ..Default::default()
                },
            )
            .expect_err("clash");
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        let up = s
            .update_sandbox(
                a,
                "dev",
                &SandboxPatch {
                    name: Some("renamed".into()),
                    keep_hot: Some(true),
                    ..Default::default()
                },
            )
            .expect("update");
        assert_eq!((up.name.as_str(), up.keep_hot), ("renamed", true));
        // Renaming to its own name is fine.
        s.update_sandbox(
            a,
            "renamed",
            &SandboxPatch {
                name: Some("renamed".into()),
                keep_hot: None,
                ..Default::default()
            },
        )
        .expect("same name");
        s.delete_sandbox(&r.id).expect("delete");
        assert!(matches!(s.get_sandbox(&r.id), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.delete_sandbox(&r.id),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.set_sandbox_status(&r.id, SandboxStatus::Error),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn status_strings_roundtrip() {
        for st in [
            SandboxStatus::Creating,
            SandboxStatus::Running,
            SandboxStatus::Warm,
            SandboxStatus::Cold,
            SandboxStatus::Stopped,
            SandboxStatus::Error,
            SandboxStatus::Destroying,
        ] {
            assert_eq!(st.as_str().parse::<SandboxStatus>(), Ok(st));
        }
        assert!("bogus".parse::<SandboxStatus>().is_err());
    }

    #[test]
    fn labels_roundtrip_edit_and_limits() {
        let (_d, s) = temp_store();
        let a = user(&s, "alice", 5);
        let mut new = NewSandbox::new(a, "lab");
        new.labels.insert("team".into(), "ml".into());
        let r = s.create_sandbox(&new, &subnet()).expect("create");
        assert_eq!(s.get_sandbox(&r.id).expect("get").labels, new.labels);
        let patch = SandboxPatch {
            labels_set: [("env".to_string(), "dev".to_string())].into(),
            labels_delete: vec!["team".into()],
            ..Default::default()
        };
        let up = s.update_sandbox(a, "lab", &patch).expect("edit");
        assert_eq!(up.labels, Labels::from([("env".into(), "dev".into())]));
        // Past the limit: refused, nothing changed.
        let patch = SandboxPatch {
            labels_set: (0..16).map(|i| (format!("k{i}"), "v".into())).collect(),
            ..Default::default()
        };
        let e = s.update_sandbox(a, "lab", &patch).expect_err("17 labels");
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
        assert_eq!(s.get_sandbox(&r.id).expect("get").labels.len(), 1);
        let mut bad = NewSandbox::new(a, "bad");
        bad.labels.insert("-x".into(), "v".into());
        assert!(matches!(
            s.create_sandbox(&bad, &subnet()),
            Err(StoreError::Invalid(_))
        ));
    }
}
