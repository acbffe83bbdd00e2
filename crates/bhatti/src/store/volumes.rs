//! Persistent volumes and which sandboxes have them (see
//! `migrations/005_volumes.sql`).
//!
//! Rules kept here, inside write transactions so that concurrent creates
//! cannot break them: a volume attached read-write has no other attachment;
//! one attached read-only may be attached read-only to any number of
//! sandboxes; an attached volume cannot be deleted; the sizes of a user's
//! volumes stay within `users.max_storage_mb`.

use rand::Rng;
use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::users::is_valid_name;
use super::{fmt_ts, is_unique_violation, now, ts_col, Store, StoreError};

/// Largest volume, MiB (1 TiB).
pub const MAX_VOLUME_MB: u64 = 1024 * 1024;
/// Most volumes one sandbox may have.
pub const MAX_VOLUMES_PER_SANDBOX: usize = 8;

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// `vol-` and 12 hex digits; also the disk's virtio serial in the guest.
    pub id: String,
    pub user_id: i64,
    pub name: String,
    /// Size of the disk and its filesystem, MiB.
    pub size_mb: u64,
    pub created_at: OffsetDateTime,
}

/// One volume of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachment {
    pub sandbox_id: String,
    /// Name of the sandbox (for listings).
    pub sandbox_name: String,
    pub volume_id: String,
    pub volume_name: String,
    /// Absolute mount point in the guest.
    pub mount_path: String,
    pub read_only: bool,
    /// Place among the sandbox's volumes (device order).
    pub position: u32,
}

/// A volume to attach to a new sandbox, as the caller names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    /// Name or id of one of the caller's volumes.
    pub volume: String,
    pub mount_path: String,
    pub read_only: bool,
}

/// `vol-` and 12 random hex digits (fits a virtio serial's 20 bytes).
pub fn generate_volume_id() -> String {
    let bytes: [u8; 6] = rand::rngs::OsRng.gen();
    format!("vol-{}", hex::encode(bytes))
}

/// Volume names follow the sandbox name rule and do not start with `vol-`
/// (which would make a name look like another volume's id).
pub fn validate_volume_name(name: &str) -> Result<(), StoreError> {
    if !is_valid_name(name) {
        return Err(StoreError::Invalid(format!(
            "invalid volume name {name:?}: must match [a-zA-Z0-9][a-zA-Z0-9._-]{{0,62}}"
        )));
    }
    if super::images::has_prefix(name, "vol-") {
        return Err(StoreError::Invalid(format!(
            "invalid volume name {name:?}: must not start with vol- (volume ids do)"
        )));
    }
    Ok(())
}

/// Directories a volume may not hide: the system's own (exactly).
const SYSTEM_DIRS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
];
/// Trees nothing may be mounted into (kernel filesystems and the OS itself).
const SYSTEM_TREES: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run",
    "/sbin", "/sys", "/usr",
];

/// A mount path must be absolute, at most 255 bytes, without `.`/`..`
/// components, empty components or control characters, and neither a
/// system directory (`/`, `/etc`, `/usr`, `/var`, …) nor inside `/proc`,
/// `/sys`, `/dev`, `/run`, `/etc`, `/usr`, `/boot` or the `bin`/`lib` dirs.
pub fn validate_mount_path(path: &str) -> Result<(), StoreError> {
    let bad = |why: &str| {
        Err(StoreError::Invalid(format!(
            "invalid mount path {path:?}: {why}"
        )))
    };
    if !path.starts_with('/') {
        return bad("must be absolute (start with /)");
    }
    if path.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if path.chars().any(|c| c.is_control()) {
        return bad("contains control characters");
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.split('/').skip(1).any(|c| c == ".." || c == ".") {
        return bad("must not contain . or .. components");
    }
    if trimmed.split('/').skip(1).any(str::is_empty) {
        return bad("must not contain empty components (//)");
    }
    let norm = if trimmed.is_empty() { "/" } else { trimmed };
    if SYSTEM_DIRS.contains(&norm) {
        return bad("is a system directory");
    }
    if let Some(tree) = SYSTEM_TREES.iter().find(|t| {
        norm.strip_prefix(**t)
            .is_some_and(|rest| rest.starts_with('/'))
    }) {
        return bad(&format!("is inside the system directory {tree}"));
    }
    Ok(())
}

fn volume_from_row(row: &Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: row.get("id")?,
        user_id: row.get("user_id")?,
        name: row.get("name")?,
        size_mb: row.get::<_, i64>("size_mb")?.max(0) as u64,
        created_at: ts_col(row, "created_at")?,
    })
}

fn attachment_from_row(row: &Row<'_>) -> rusqlite::Result<VolumeAttachment> {
    Ok(VolumeAttachment {
        sandbox_id: row.get("sandbox_id")?,
        sandbox_name: row.get("sandbox_name")?,
        volume_id: row.get("volume_id")?,
        volume_name: row.get("volume_name")?,
        mount_path: row.get("mount_path")?,
        read_only: row.get("read_only")?,
        position: row.get("position")?,
    })
}

const ATTACHMENT_SELECT: &str = "SELECT a.sandbox_id, s.name AS sandbox_name, a.volume_id,
        v.name AS volume_name, a.mount_path, a.read_only, a.position
     FROM sandbox_volumes a
     JOIN sandboxes s ON s.id = a.sandbox_id
     JOIN volumes v ON v.id = a.volume_id";

fn find_in(tx: &rusqlite::Connection, user_id: i64, key: &str) -> Result<VolumeRecord, StoreError> {
    tx.query_row(
        // An exact id wins over a name (names cannot look like ids, but
        // rows from before that rule may).
        "SELECT * FROM volumes WHERE user_id = ?1 AND (id = ?2 OR name = ?2)
         ORDER BY id = ?2 DESC LIMIT 1",
        params![user_id, key],
        volume_from_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("no volume named {key}")))
}

/// MiB of storage the user has: the sizes of their volumes plus the host
/// bytes of their images (rounded up).
pub(crate) fn storage_used_mb(tx: &rusqlite::Connection, user_id: i64) -> Result<u64, StoreError> {
    let volumes: i64 = tx.query_row(
        "SELECT COALESCE(SUM(size_mb), 0) FROM volumes WHERE user_id = ?1",
        params![user_id],
        |r| r.get(0),
    )?;
    let image_bytes: i64 = tx.query_row(
        "SELECT COALESCE(SUM(size_bytes), 0) FROM images WHERE user_id = ?1",
        params![user_id],
        |r| r.get(0),
    )?;
    Ok(volumes.max(0) as u64 + (image_bytes.max(0) as u64).div_ceil(1024 * 1024))
}

/// Fails with `LimitExceeded` if `extra_mb` more would take the user over
/// their storage quota (volumes and images together).
pub(crate) fn check_quota(
    tx: &rusqlite::Connection,
    user_id: i64,
    extra_mb: u64,
) -> Result<(), StoreError> {
    let max: i64 = tx.query_row(
        "SELECT max_storage_mb FROM users WHERE id = ?1",
        params![user_id],
        |r| r.get(0),
    )?;
    let used = storage_used_mb(tx, user_id)?;
    let max = max.max(0) as u64;
    if used.saturating_add(extra_mb) > max {
        return Err(StoreError::LimitExceeded(format!(
            "storage quota exceeded: {used} MB of {max} MB in use, {extra_mb} MB more asked; \
             delete what you no longer need (`bhatti volume delete NAME`, `bhatti image delete NAME`)"
        )));
    }
    Ok(())
}

impl Store {
    /// Records a new volume of `size_mb` MiB (the caller makes its disk).
    ///
    /// Errors: `Invalid` (name, size), `Conflict` (name in use),
    /// `LimitExceeded` (storage quota).
    pub fn create_volume(
        &self,
        user_id: i64,
        name: &str,
        size_mb: u64,
    ) -> Result<VolumeRecord, StoreError> {
        validate_volume_name(name)?;
        if size_mb == 0 || size_mb > MAX_VOLUME_MB {
            return Err(StoreError::Invalid(format!(
                "invalid volume size {size_mb} MB: must be 1-{MAX_VOLUME_MB}"
            )));
        }
        let rec = VolumeRecord {
            id: generate_volume_id(),
            user_id,
            name: name.to_string(),
            size_mb,
            created_at: now(),
        };
        self.write_tx(|tx| {
            check_quota(tx, user_id, size_mb)?;
            tx.execute(
                "INSERT INTO volumes (id, user_id, name, size_mb, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![rec.id, user_id, rec.name, size_mb as i64, fmt_ts(rec.created_at)],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("a volume named {name} already exists"))
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })?;
        Ok(rec)
    }

    /// The user's volume named (or with id) `key`.
    pub fn find_volume(&self, user_id: i64, key: &str) -> Result<VolumeRecord, StoreError> {
        find_in(&self.conn(), user_id, key)
    }

    /// The user's volumes by name.
    pub fn list_volumes(&self, user_id: i64) -> Result<Vec<VolumeRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT * FROM volumes WHERE user_id = ?1 ORDER BY name")?;
        let rows = st.query_map(params![user_id], volume_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sandboxes volume `volume_id` is attached to.
    pub fn volume_attachments(&self, volume_id: &str) -> Result<Vec<VolumeAttachment>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "{ATTACHMENT_SELECT} WHERE a.volume_id = ?1 ORDER BY s.name"
        ))?;
        let rows = st.query_map(params![volume_id], attachment_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The volumes of sandbox `sandbox_id`, in device order.
    pub fn sandbox_volumes(&self, sandbox_id: &str) -> Result<Vec<VolumeAttachment>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "{ATTACHMENT_SELECT} WHERE a.sandbox_id = ?1 ORDER BY a.position"
        ))?;
        let rows = st.query_map(params![sandbox_id], attachment_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Attaches the user's volumes to the (new) sandbox `sandbox_id`, in
    /// the order given.
    ///
    /// Errors: `NotFound` for an unknown volume; `Invalid` for a bad or
    /// repeated mount path or a volume named twice; `Conflict` when a
    /// read-write attachment meets any other, naming the sandbox holding it.
    pub fn attach_volumes(
        &self,
        user_id: i64,
        sandbox_id: &str,
        reqs: &[VolumeRequest],
    ) -> Result<Vec<VolumeAttachment>, StoreError> {
        if reqs.len() > MAX_VOLUMES_PER_SANDBOX {
            return Err(StoreError::Invalid(format!(
                "too many volumes: {} (at most {MAX_VOLUMES_PER_SANDBOX} per sandbox)",
                reqs.len()
            )));
        }
        for (i, r) in reqs.iter().enumerate() {
            validate_mount_path(&r.mount_path)?;
            let norm = r.mount_path.trim_end_matches('/');
            if reqs[..i]
                .iter()
                .any(|o| o.mount_path.trim_end_matches('/') == norm)
            {
                return Err(StoreError::Invalid(format!(
                    "mount path {} is given twice",
                    r.mount_path
                )));
            }
        }
        self.write_tx(|tx| {
            let mut seen = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                let vol = find_in(tx, user_id, &r.volume)?;
                if seen.contains(&vol.id) {
                    return Err(StoreError::Invalid(format!(
                        "volume {} is given twice",
                        vol.name
                    )));
                }
                seen.push(vol.id.clone());
                // Other sandboxes that have it, and whether any of them writes.
                let holders: Vec<(String, bool)> = {
                    let mut st = tx.prepare(
                        "SELECT s.name, a.read_only FROM sandbox_volumes a
                         JOIN sandboxes s ON s.id = a.sandbox_id WHERE a.volume_id = ?1",
                    )?;
                    let rows = st.query_map(params![vol.id], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    rows.collect::<Result<_, _>>()?
                };
                if let Some((holder, _)) = holders.iter().find(|(_, ro)| !ro) {
                    return Err(StoreError::Conflict(format!(
                        "volume {} is attached read-write to sandbox {holder}; a read-write volume is attached to one sandbox at a time",
                        vol.name
                    )));
                }
                if !r.read_only && !holders.is_empty() {
                    let names: Vec<&str> = holders.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(StoreError::Conflict(format!(
                        "volume {} is attached read-only to {}; it can only be attached read-only (`:ro`) while they have it",
                        vol.name,
                        names.join(", ")
                    )));
                }
                tx.execute(
                    "INSERT INTO sandbox_volumes (sandbox_id, volume_id, mount_path, read_only, position)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![sandbox_id, vol.id, r.mount_path.trim_end_matches('/'), r.read_only, i as i64],
                )?;
            }
            Ok(())
        })?;
        self.sandbox_volumes(sandbox_id)
    }

    /// Forgets the user's volume `key` (the caller removes its disk).
    ///
    /// Errors: `NotFound`; `Conflict` while a sandbox has it, naming them.
    pub fn delete_volume(&self, user_id: i64, key: &str) -> Result<VolumeRecord, StoreError> {
        self.write_tx(|tx| {
            let vol = find_in(tx, user_id, key)?;
            let holders: Vec<String> = {
                let mut st = tx.prepare(
                    "SELECT s.name FROM sandbox_volumes a JOIN sandboxes s ON s.id = a.sandbox_id
                     WHERE a.volume_id = ?1 ORDER BY s.name",
                )?;
                let rows = st.query_map(params![vol.id], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            if !holders.is_empty() {
                return Err(StoreError::Conflict(format!(
                    "volume {} is attached to sandbox {}; destroy {} first",
                    vol.name,
                    holders.join(", "),
                    if holders.len() == 1 { "it" } else { "them" }
                )));
            }
            tx.execute("DELETE FROM volumes WHERE id = ?1", params![vol.id])?;
            Ok(vol)
        })
    }

    /// Records a volume's new, larger size (quota checked).
    ///
    /// Errors: `Invalid` when not larger; `LimitExceeded` over the storage quota.
    pub fn grow_volume(&self, user_id: i64, id: &str, size_mb: u64) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            let vol = find_in(tx, user_id, id)?;
            if size_mb <= vol.size_mb {
                return Err(StoreError::Invalid(format!(
                    "invalid size {size_mb} MB: volume {} has {} MB and can only grow",
                    vol.name, vol.size_mb
                )));
            }
            if size_mb > MAX_VOLUME_MB {
                return Err(StoreError::Invalid(format!(
                    "invalid size {size_mb} MB: at most {MAX_VOLUME_MB}"
                )));
            }
            check_quota(tx, user_id, size_mb - vol.size_mb)?;
            tx.execute(
                "UPDATE volumes SET size_mb = ?2 WHERE id = ?1",
                params![vol.id, size_mb as i64],
            )?;
            Ok(())
        })
    }

    /// Sets a volume's recorded size (undoing a grow whose disk failed).
    pub fn set_volume_size(&self, id: &str, size_mb: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE volumes SET size_mb = ?2 WHERE id = ?1",
            params![id, i64::try_from(size_mb).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    /// MiB of the user's storage quota still free.
    ///
    /// Errors: `LimitExceeded` when nothing is left (used ≥ quota), so work
    /// that would only be refused afterwards is refused up front.
    pub fn storage_room_mb(&self, user_id: i64) -> Result<u64, StoreError> {
        let max = self.storage_quota(user_id)?;
        let used = storage_used_mb(&self.conn(), user_id)?;
        if used >= max {
            return Err(StoreError::LimitExceeded(format!(
                "storage quota exceeded: {used} MB of {max} MB in use; \
                 delete what you no longer need (`bhatti volume delete NAME`, `bhatti image delete NAME`)"
            )));
        }
        Ok(max - used)
    }

    /// The user's storage quota, MiB.
    pub fn storage_quota(&self, user_id: i64) -> Result<u64, StoreError> {
        let max: i64 = self.conn().query_row(
            "SELECT max_storage_mb FROM users WHERE id = ?1",
            params![user_id],
            |r| r.get(0),
        )?;
        Ok(max.max(0) as u64)
    }

    /// Sets a user's storage quota, MiB (operators, tests).
    pub fn set_storage_quota(&self, user_id: i64, max_mb: u64) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE users SET max_storage_mb = ?2 WHERE id = ?1",
            params![user_id, i64::try_from(max_mb).unwrap_or(i64::MAX)],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no user with id {user_id}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;
    use crate::store::{NewSandbox, UserLimits};

    fn req(volume: &str, path: &str, ro: bool) -> VolumeRequest {
        VolumeRequest {
            volume: volume.into(),
            mount_path: path.into(),
            read_only: ro,
        }
    }

    #[test]
    fn mount_paths() {
        for ok in [
            "/data",
            "/workspace",
            "/workspace/cache/",
            "/mnt/x",
            "/var/cache/apt",
            "/home/lohar/x",
        ] {
            validate_mount_path(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "data", "", "/", "/etc", "/usr/", "/proc/x", "/sys", "/dev/shm", "/a/../b", "/a/./b",
            "/a//b", "/var", "/tmp", "/lib64/x", "/run/x", "/a\nb",
        ] {
            assert!(validate_mount_path(bad).is_err(), "{bad:?}");
        }
        let e = validate_mount_path("/etc/x").expect_err("system");
        assert!(
            e.to_string().contains("inside the system directory /etc"),
            "{e}"
        );
    }

    #[test]
    fn attach_rules_quota_and_delete() {
        let (_d, store) = temp_store();
        let (user, _) = store
            .create_user("alice", UserLimits::default())
            .expect("user");
        let subnet = "192.168.137.0/24".parse().expect("subnet");
        let sb = |name: &str| {
            store
                .create_sandbox(&NewSandbox::new(user.id, name.to_string()), &subnet)
                .expect("sandbox")
        };
        let (a, b, c) = (sb("a"), sb("b"), sb("c"));
        store.create_volume(user.id, "data", 100).expect("create");
        store.create_volume(user.id, "ref", 100).expect("create");
        assert!(matches!(
            store.create_volume(user.id, "data", 1),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.create_volume(user.id, "bad name", 1),
            Err(StoreError::Invalid(_))
        ));
        // A name shaped like an id is refused; an id finds its own volume
        // even where an old row's name is that id.
        let e = store
            .create_volume(user.id, "VOL-000000000001", 1)
            .expect_err("id-shaped name");
        assert!(e.to_string().contains("must not start with vol-"), "{e}");
        let data_id = store.find_volume(user.id, "data").expect("data").id;
        store
            .conn()
            .execute(
                "INSERT INTO volumes (id, user_id, name, size_mb, created_at)
                 SELECT 'vol-0000000000ff', user_id, ?1, 1, created_at FROM volumes WHERE id = ?1",
                params![data_id],
            )
            .expect("legacy row");
        assert_eq!(
            store.find_volume(user.id, &data_id).expect("by id").name,
            "data"
        );
        store
            .conn()
            .execute("DELETE FROM volumes WHERE id = 'vol-0000000000ff'", [])
            .expect("cleanup");
        store.set_storage_quota(user.id, 250).expect("quota");
        let e = store.create_volume(user.id, "big", 51).expect_err("quota");
        assert!(
            e.to_string()
                .contains("storage quota exceeded: 200 MB of 250 MB"),
            "{e}"
        );

        let got = store
            .attach_volumes(
                user.id,
                &a.id,
                &[req("data", "/data/", false), req("ref", "/ref", true)],
            )
            .expect("attach");
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].mount_path.as_str(), got[0].position), ("/data", 0));
        assert!(got[1].read_only);
        // RW double attach refused, naming the holder; RO to many works.
        let e = store
            .attach_volumes(user.id, &b.id, &[req("data", "/d", true)])
            .expect_err("rw held");
        assert!(
            e.to_string().contains("attached read-write to sandbox a"),
            "{e}"
        );
        store
            .attach_volumes(user.id, &b.id, &[req("ref", "/ref", true)])
            .expect("ro twice");
        let e = store
            .attach_volumes(user.id, &c.id, &[req("ref", "/ref", false)])
            .expect_err("rw on ro");
        assert!(e.to_string().contains("attached read-only to a, b"), "{e}");
        assert!(matches!(
            store.attach_volumes(user.id, &c.id, &[req("nope", "/x", false)]),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.attach_volumes(
                user.id,
                &c.id,
                &[req("ref", "/x", true), req("ref", "/y", true)]
            ),
            Err(StoreError::Invalid(_))
        ));
        // A failed attach leaves nothing behind.
        assert!(store.sandbox_volumes(&c.id).expect("list").is_empty());

        let e = store.delete_volume(user.id, "data").expect_err("attached");
        assert!(e.to_string().contains("attached to sandbox a"), "{e}");
        assert!(matches!(
            store.grow_volume(user.id, "data", 100),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.grow_volume(user.id, "data", 200),
            Err(StoreError::LimitExceeded(_))
        ));
        store.grow_volume(user.id, "data", 150).expect("grow");
        store.delete_sandbox(&a.id).expect("destroy a");
        assert_eq!(
            store
                .volume_attachments(&store.find_volume(user.id, "ref").expect("ref").id)
                .expect("att")
                .len(),
            1
        );
        store
            .attach_volumes(user.id, &c.id, &[req("data", "/data", false)])
            .expect("rw after destroy");
        store.delete_sandbox(&c.id).expect("destroy c");
        let gone = store.delete_volume(user.id, "data").expect("delete");
        assert_eq!(gone.size_mb, 150);
        assert!(matches!(
            store.find_volume(user.id, "data"),
            Err(StoreError::NotFound(_))
        ));
    }
}
