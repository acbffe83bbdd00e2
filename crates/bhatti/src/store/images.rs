//! Custom base images (see `migrations/006_images.sql`): a user's own, and
//! the operator's (no owner), which every user sees and none can delete.

use rand::Rng;
use rusqlite::{params, OptionalExtension, Row};
use time::OffsetDateTime;

use super::users::is_valid_name;
use super::volumes::check_quota;
use super::{fmt_ts, is_unique_violation, now, ts_col, Store, StoreError};

/// A custom image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// `img-` and 12 hex digits; names its file.
    pub id: String,
    /// `None`: an operator image, visible to every user.
    pub user_id: Option<i64>,
    pub name: String,
    /// "save <sandbox>", "import", "pull <reference>".
    pub source: String,
    /// Host bytes of its file.
    pub size_bytes: u64,
    pub created_at: OffsetDateTime,
}

impl ImageRecord {
    /// A new record with a fresh id.
    pub fn new(user_id: Option<i64>, name: &str, source: &str, size_bytes: u64) -> Self {
        let bytes: [u8; 6] = rand::rngs::OsRng.gen();
        ImageRecord {
            id: format!("img-{}", hex::encode(bytes)),
            user_id,
            name: name.to_string(),
            source: source.to_string(),
            size_bytes,
            created_at: now(),
        }
    }
}

/// Image names follow the sandbox name rule and do not start with `img-`
/// (which would make a name look like another image's id).
pub fn validate_image_name(name: &str) -> Result<(), StoreError> {
    if !is_valid_name(name) {
        return Err(StoreError::Invalid(format!(
            "invalid image name {name:?}: must match [a-zA-Z0-9][a-zA-Z0-9._-]{{0,62}}"
        )));
    }
    if has_prefix(name, "img-") {
        return Err(StoreError::Invalid(format!(
            "invalid image name {name:?}: must not start with img- (image ids do)"
        )));
    }
    Ok(())
}

/// Whether `name` starts with `prefix`, ignoring ASCII case.
pub(crate) fn has_prefix(name: &str, prefix: &str) -> bool {
    name.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        id: row.get("id")?,
        user_id: row.get("user_id")?,
        name: row.get("name")?,
        source: row.get("source")?,
        size_bytes: row.get::<_, i64>("size_bytes")?.max(0) as u64,
        created_at: ts_col(row, "created_at")?,
    })
}

impl Store {
    /// Whether `user_id` (or, with `None`, the operator) already has an image named `name`.
    pub fn image_name_taken(&self, user_id: Option<i64>, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM images WHERE COALESCE(user_id, 0) = COALESCE(?1, 0) AND name = ?2",
                params![user_id, name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records an image whose file exists; a user's counts against their storage quota.
    ///
    /// Errors: `Invalid` (name), `Conflict` (name in use), `LimitExceeded` (quota).
    pub fn insert_image(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        validate_image_name(&rec.name)?;
        self.write_tx(|tx| {
            if let Some(uid) = rec.user_id {
                check_quota(tx, uid, rec.size_bytes.div_ceil(1024 * 1024))?;
            }
            tx.execute(
                "INSERT INTO images (id, user_id, name, source, size_bytes, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    rec.id,
                    rec.user_id,
                    rec.name,
                    rec.source,
                    rec.size_bytes as i64,
                    fmt_ts(rec.created_at)
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("an image named {} already exists", rec.name))
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    /// The image `key` the user may use: the one with that id, else the one
    /// with that name (their own first, then the operator's).
    pub fn find_image(&self, user_id: i64, key: &str) -> Result<ImageRecord, StoreError> {
        self.conn()
            .query_row(
                "SELECT * FROM images WHERE (user_id = ?1 OR user_id IS NULL) AND (id = ?2 OR name = ?2)
                 ORDER BY id = ?2 DESC, user_id IS NULL LIMIT 1",
                params![user_id, key],
                from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no image named {key}")))
    }

    /// The images the user may use: their own and the operator's, by name.
    pub fn list_images(&self, user_id: i64) -> Result<Vec<ImageRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT * FROM images WHERE user_id = ?1 OR user_id IS NULL ORDER BY name, user_id IS NULL",
        )?;
        let rows = st.query_map(params![user_id], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Names of the sandboxes created from image `id`.
    pub fn image_sandboxes(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT name FROM sandboxes WHERE image_id = ?1 ORDER BY name")?;
        let rows = st.query_map(params![id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Name of the custom image sandbox `sandbox_id` was created from (`None`: the default image).
    pub fn sandbox_image_name(&self, sandbox_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT i.name FROM sandboxes s JOIN images i ON i.id = s.image_id WHERE s.id = ?1",
                params![sandbox_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records the image sandbox `sandbox_id` was created from.
    pub fn set_sandbox_image(&self, sandbox_id: &str, image_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET image_id = ?2 WHERE id = ?1",
            params![sandbox_id, image_id],
        )?;
        Ok(())
    }

    /// Makes the user's image `name` an operator image, visible to every user.
    ///
    /// Errors: `NotFound`; `Conflict` when an operator image has that name.
    pub fn promote_image(&self, user_id: i64, name: &str) -> Result<ImageRecord, StoreError> {
        self.write_tx(|tx| {
            let n = tx
                .execute(
                    "UPDATE images SET user_id = NULL WHERE user_id = ?1 AND name = ?2",
                    params![user_id, name],
                )
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::Conflict(format!(
                            "an operator image named {name} already exists"
                        ))
                    } else {
                        e.into()
                    }
                })?;
            if n == 0 {
                return Err(StoreError::NotFound(format!(
                    "the user has no image named {name}"
                )));
            }
            Ok(tx.query_row(
                "SELECT * FROM images WHERE user_id IS NULL AND name = ?1",
                params![name],
                from_row,
            )?)
        })
    }

    /// Gives the operator image `name` back to a user (who may then delete it).
    ///
    /// Errors: `NotFound`; `Conflict` when the user has an image of that name.
    pub fn demote_image(&self, name: &str, user_id: i64) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE images SET user_id = ?2 WHERE user_id IS NULL AND name = ?1",
                params![name, user_id],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("the user already has an image named {name}"))
                } else {
                    e.into()
                }
            })?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "no operator image named {name}"
            )));
        }
        Ok(())
    }

    /// Forgets image `id` (the caller checked that nothing uses its file).
    ///
    /// Errors: `Conflict` while a sandbox records it as its image.
    pub fn delete_image(&self, id: &str) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            let users: Vec<String> = {
                let mut st =
                    tx.prepare("SELECT name FROM sandboxes WHERE image_id = ?1 ORDER BY name")?;
                let rows = st.query_map(params![id], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            if !users.is_empty() {
                return Err(StoreError::Conflict(format!(
                    "image is used by sandbox {}",
                    users.join(", ")
                )));
            }
            tx.execute("DELETE FROM images WHERE id = ?1", params![id])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;
    use crate::store::UserLimits;

    #[test]
    fn own_and_operator_images_quota() {
        let (_d, store) = temp_store();
        let (a, _) = store.create_user("a", UserLimits::default()).expect("a");
        let (b, _) = store.create_user("b", UserLimits::default()).expect("b");
        store.set_storage_quota(a.id, 100).expect("quota");
        let op = ImageRecord::new(None, "py", "import", 5 << 20);
        store.insert_image(&op).expect("operator");
        let mine = ImageRecord::new(Some(a.id), "py", "save x", 60 << 20);
        store.insert_image(&mine).expect("mine");
        // Own first, then the operator's; b sees only the operator's.
        assert_eq!(store.find_image(a.id, "py").expect("a py").id, mine.id);
        assert_eq!(store.find_image(b.id, "py").expect("b py").id, op.id);
        assert!(matches!(
            store.find_image(b.id, &mine.id),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.list_images(a.id).expect("list").len(), 2);
        // Id-shaped names are refused; an exact id wins over a (legacy) name.
        let e = store
            .insert_image(&ImageRecord::new(
                Some(a.id),
                "img-000000000001",
                "import",
                1,
            ))
            .expect_err("id-shaped name");
        assert!(e.to_string().contains("must not start with img-"), "{e}");
        store
            .conn()
            .execute(
                "INSERT INTO images (id, user_id, name, source, size_bytes, created_at)
                 VALUES ('img-0000000000ff', ?1, ?2, 'import', 0, '2024-01-01T00:00:00Z')",
                params![a.id, op.id],
            )
            .expect("legacy row");
        assert_eq!(store.find_image(a.id, &op.id).expect("by id").id, op.id);
        store
            .conn()
            .execute("DELETE FROM images WHERE id = 'img-0000000000ff'", [])
            .expect("cleanup");
        assert!(matches!(
            store.insert_image(&ImageRecord::new(Some(a.id), "py", "import", 1)),
            Err(StoreError::Conflict(_))
        ));
        // Images and volumes share the quota: 60 MB used.
        let e = store.create_volume(a.id, "v", 41).expect_err("quota");
        assert!(e.to_string().contains("60 MB of 100 MB in use"), "{e}");
        let e = store
            .insert_image(&ImageRecord::new(Some(a.id), "big", "import", 41 << 20))
            .expect_err("quota");
        assert!(matches!(e, StoreError::LimitExceeded(_)), "{e}");
        store.delete_image(&mine.id).expect("delete");
        store.create_volume(a.id, "v", 41).expect("room again");
        // Promote to the operator (name clash refused), demote back.
        store
            .insert_image(&ImageRecord::new(Some(b.id), "py", "import", 1))
            .expect("b py");
        assert!(matches!(
            store.promote_image(b.id, "py"),
            Err(StoreError::Conflict(_))
        ));
        store.demote_image("py", a.id).expect("demote");
        assert_eq!(
            store.find_image(a.id, "py").expect("a py").user_id,
            Some(a.id)
        );
        let op = store.promote_image(b.id, "py").expect("promote");
        assert_eq!(op.user_id, None);
        assert_eq!(
            store.find_image(a.id, "py").expect("own first").user_id,
            Some(a.id)
        );
    }
}
