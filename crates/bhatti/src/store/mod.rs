//! SQLite store: users, sandboxes, secrets, publish rules.
//!
//! One database per data dir at `<data_dir>/state.db`, in WAL mode with a
//! busy timeout, so the daemon and the operator commands (`bhatti user …`)
//! can use it at the same time. The schema is versioned by
//! `PRAGMA user_version` and built from the numbered files in
//! `crates/bhatti/migrations/`, applied in order, each in its own
//! transaction.
//!
//! [`Store`] is `Clone + Send + Sync`: one connection behind a mutex. Every
//! method blocks (SQLite I/O, and up to the busy timeout if another process
//! holds the write lock), so async code should call it through
//! [`Store::call`], which runs the closure on tokio's blocking pool. Methods
//! are short (one statement or one small transaction) and never hold the
//! lock across anything but SQLite.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod images;
pub mod labels;
mod publish;
mod sandboxes;
mod secrets;
mod shares;
mod snapshots;
mod templates;
mod users;
mod volumes;

pub use images::{validate_image_name, ImageRecord};
pub use labels::Labels;
pub use publish::{generate_alias, validate_alias, PublishRule};
pub use sandboxes::{
    generate_sandbox_id, generate_sandbox_token, validate_sandbox_name, NewSandbox, SandboxPatch,
    SandboxRecord, SandboxStatus,
};
pub use secrets::{SecretMeta, SecretRecord};
pub use shares::{generate_share_token, hash_share_token, ShareRecord, SHARE_TOKEN_PREFIX};
pub use snapshots::SnapshotRecord;
pub use templates::TemplateRecord;
pub use users::{
    generate_api_key, hash_api_key, validate_user_name, User, UserLimits, UserSummary,
    API_KEY_PREFIX,
};
pub use volumes::{
    generate_volume_id, validate_mount_path, validate_volume_name, VolumeAttachment, VolumeRecord,
    VolumeRequest, MAX_VOLUMES_PER_SANDBOX, MAX_VOLUME_MB,
};

/// Database file name inside the data dir.
pub const DB_FILE: &str = "state.db";
/// How long a statement waits for another writer before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, in order; migration `i` brings `user_version` to `i + 1`.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "001_initial",
        include_str!("../../migrations/001_initial.sql"),
    ),
    (
        "002_labels",
        include_str!("../../migrations/002_labels.sql"),
    ),
    (
        "003_shares",
        include_str!("../../migrations/003_shares.sql"),
    ),
    (
        "004_snapshots",
        include_str!("../../migrations/004_snapshots.sql"),
    ),
    (
        "005_egress",
        include_str!("../../migrations/005_egress.sql"),
    ),
    (
        "006_volumes",
        include_str!("../../migrations/006_volumes.sql"),
    ),
    (
        "007_images",
        include_str!("../../migrations/007_images.sql"),
    ),
    (
        "008_snapshot_egress",
        include_str!("../../migrations/008_snapshot_egress.sql"),
    ),
    (
        "009_templates",
        include_str!("../../migrations/009_templates.sql"),
    ),
    (
        "010_template_use",
        include_str!("../../migrations/010_template_use.sql"),
    ),
];

/// Errors of the store. The API maps them: `NotFound` → 404,
/// `Conflict` → 409, `LimitExceeded` → 422, `Invalid` → 400,
/// `SubnetFull` → 503, anything else → 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist; the message says which (e.g. "no user named alice").
    #[error("{0}")]
    NotFound(String),
    /// A uniqueness or dependency conflict (e.g. "user alice already exists").
    #[error("{0}")]
    Conflict(String),
    /// A user limit would be exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// Input the store refuses (bad name, bad port).
    #[error("{0}")]
    Invalid(String),
    /// Every guest address of the subnet is taken.
    #[error("no free IP address left in {0}")]
    SubnetFull(String),
    /// `open_existing` found no database.
    #[error("no bhatti database at {0} (wrong --data-dir or --config?)")]
    NoDatabase(PathBuf),
    /// The database was written by a newer bhatti.
    #[error("database schema version {found} is newer than this bhatti supports ({supported}); upgrade bhatti")]
    SchemaTooNew { found: i64, supported: i64 },
    /// A migration failed; the database stays at the previous version.
    #[error("database migration {name} failed: {source}")]
    Migration {
        name: &'static str,
        source: rusqlite::Error,
    },
    /// Creating the data dir or database file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A stored value could not be decoded.
    #[error("corrupt database row: {0}")]
    Corrupt(String),
    /// The blocking task running a store call panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
    /// Any other SQLite error.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Opens `<data_dir>/state.db`, creating the data dir (mode 0700) and
    /// the database (mode 0600) when missing, and migrates it.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(io(data_dir))?;
        let path = data_dir.join(DB_FILE);
        // Create the file ourselves so it is born 0600; SQLite gives the
        // -wal and -shm files the same mode.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Self::open_path(&path)
    }

    /// Opens `<data_dir>/state.db` only if it exists (operator commands
    /// other than `user create` use this so a typo in `--data-dir` does not
    /// silently create an empty database).
    pub fn open_existing(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.is_file() {
            return Err(StoreError::NoDatabase(path));
        }
        Self::open_path(&path)
    }

    fn open_path(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "SQLite did not switch to WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                path: path.to_path_buf(),
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Current schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Runs `f` on tokio's blocking pool. Use from async code:
    /// `store.call(move |s| s.get_user(id)).await`.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Moves the WAL into the main file (used by tests and on shutdown).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Locks the connection. A poisoned lock is recovered: a panic cannot
    /// leave a transaction open because `Transaction` rolls back on drop.
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction (takes the write lock up
    /// front, so check-then-insert sequences cannot race another writer).
    pub(crate) fn write_tx<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let target = i as i64 + 1;
        let err = |source| StoreError::Migration { name, source };
        // Re-read the version under the write lock: another process may
        // have migrated meanwhile.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let current: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if current > supported {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported,
            });
        }
        if current >= target {
            continue;
        }
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", target)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::debug!(migration = name, "applied database migration");
    }
    Ok(())
}

/// Now, UTC, whole seconds (the stored precision).
pub(crate) fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

pub(crate) fn fmt_ts(t: OffsetDateTime) -> String {
    // Rfc3339 formatting only fails for years outside 0..=9999.
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Reads an RFC 3339 text column.
pub(crate) fn ts_col(row: &rusqlite::Row<'_>, idx: &str) -> rusqlite::Result<OffsetDateTime> {
    let s: String = row.get(idx)?;
    OffsetDateTime::parse(&s, &Rfc3339).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Converts a decoding error inside a row mapper.
pub(crate) fn conversion_err(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::new(StoreError::Corrupt(msg)),
    )
}

/// Whether `e` is a UNIQUE / PRIMARY KEY violation.
pub(crate) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == ErrorCode::ConstraintViolation
                && (f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh store in a temp dir (the dir lives as long as the guard).
    pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open store");
        (dir, store)
    }

    #[test]
    fn open_sets_wal_fk_and_version() {
        let (dir, store) = temp_store();
        let conn = store.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("fk");
        assert_eq!(fk, 1);
        drop(conn);
        assert_eq!(
            store.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(DB_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn reopen_is_idempotent_and_two_handles_coexist() {
        let (dir, a) = temp_store();
        let b = Store::open(dir.path()).expect("second open");
        let c = Store::open_existing(dir.path()).expect("open existing");
        a.create_user("alice", UserLimits::default())
            .expect("create");
        assert_eq!(b.list_users().expect("list").len(), 1);
        assert_eq!(c.schema_version().expect("v"), MIGRATIONS.len() as i64);
    }

    #[test]
    fn open_existing_refuses_missing_db() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Store::open_existing(dir.path()).expect_err("missing");
        assert!(matches!(e, StoreError::NoDatabase(_)), "{e}");
        assert!(!dir.path().join(DB_FILE).exists());
    }

    #[test]
    fn newer_schema_is_refused() {
        let (dir, store) = temp_store();
        store
            .conn()
            .pragma_update(None, "user_version", 999)
            .expect("bump");
        drop(store);
        let e = Store::open(dir.path()).expect_err("too new");
        assert!(
            matches!(e, StoreError::SchemaTooNew { found: 999, .. }),
            "{e}"
        );
    }

    #[test]
    fn store_is_clone_send_sync() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<Store>();
    }

    #[tokio::test]
    async fn call_runs_on_blocking_pool() {
        let (_dir, store) = temp_store();
        let n = store
            .call(|s| s.list_users().map(|u| u.len()))
            .await
            .expect("call");
        assert_eq!(n, 0);
    }

    #[test]
    fn timestamps_roundtrip() {
        let t = now();
        let s = fmt_ts(t);
        assert!(s.ends_with('Z'), "{s}");
        assert_eq!(OffsetDateTime::parse(&s, &Rfc3339).expect("parse"), t);
    }
}
