//! Custom base images: save a sandbox's disk, import a container image,
//! list, delete, and boot from one (`image` of a create).
//!
//! A user sees their own images and the operator's (no owner); names are
//! unique per owner and a user's own image wins over an operator's of the
//! same name. An image is in use while a sandbox was created from it or
//! any disk (a sandbox's, a fork's or snapshot's layer) backs onto it.

use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;

use super::thermal::WakeMode;
use super::{Result, Service, ServiceError};
use crate::model::images::Image;
use crate::store::{ImageRecord, SandboxStatus, StoreError, User};

/// Largest archive `image import` accepts, bytes.
pub const MAX_IMPORT_BYTES: u64 = 16 << 30;
/// Free room an imported image gets beyond its files, MiB (the file is sparse).
const IMPORT_HEADROOM_MB: u64 = 2048;

fn view(r: &ImageRecord) -> Image {
    Image {
        id: r.id.clone(),
        name: r.name.clone(),
        owner: if r.user_id.is_some() {
            "user"
        } else {
            "operator"
        }
        .into(),
        source: r.source.clone(),
        size_bytes: r.size_bytes,
        created_at: r.created_at.format(&Rfc3339).unwrap_or_default(),
    }
}

/// Removes a work dir when dropped (also when the request is cancelled).
pub struct WorkDir(pub PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Service {
    pub(super) async fn check_image_name(&self, user: &User, name: &str) -> Result<()> {
        crate::store::validate_image_name(name)?;
        let (uid, n) = (user.id, name.to_string());
        if self
            .store
            .call(move |s| s.image_name_taken(Some(uid), &n))
            .await?
        {
            return Err(ServiceError::Store(StoreError::Conflict(format!(
                "an image named {name} already exists"
            ))));
        }
        Ok(())
    }

    /// Bytes of storage quota the user has left.
    ///
    /// Errors: `LimitExceeded` when none is left: an import, pull or save
    /// that could only be refused afterwards is refused before the work.
    pub async fn storage_room(&self, user: &User) -> Result<u64> {
        let uid = user.id;
        let mb = self.store.call(move |s| s.storage_room_mb(uid)).await?;
        Ok(mb.saturating_mul(1 << 20))
    }

    /// Records a new image file; if the record is refused (quota, name), the file goes.
    async fn record_image(&self, rec: ImageRecord) -> Result<Image> {
        let r = rec.clone();
        if let Err(e) = self.store.call(move |s| s.insert_image(&r)).await {
            if let Err(de) = self.engine.delete_image(&rec.id).await {
                tracing::error!(image = %rec.id, error = %de, "cannot remove a refused image's file");
            }
            return Err(e.into());
        }
        tracing::info!(image = %rec.id, name = %rec.name, source = %rec.source, bytes = rec.size_bytes, "image created");
        Ok(view(&rec))
    }

    /// The images the caller may use.
    pub async fn list_images(&self, user: &User) -> Result<Vec<Image>> {
        let uid = user.id;
        Ok(self
            .store
            .call(move |s| s.list_images(uid))
            .await?
            .iter()
            .map(view)
            .collect())
    }

    pub async fn get_image(&self, user: &User, key: &str) -> Result<Image> {
        let (uid, k) = (user.id, key.to_string());
        Ok(view(
            &self.store.call(move |s| s.find_image(uid, &k)).await?,
        ))
    }

    /// The id of the image `key` for a create; unknown: `Invalid` naming the field.
    pub(super) async fn image_for_create(&self, user: &User, key: &str) -> Result<String> {
        let (uid, k) = (user.id, key.to_string());
        match self.store.call(move |s| s.find_image(uid, &k)).await {
            Ok(r) => Ok(r.id),
            Err(StoreError::NotFound(m)) => {
                Err(ServiceError::Invalid(format!("invalid field `image`: {m}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Flattens the caller's sandbox `sandbox` into the new image `name`. A
    /// warm sandbox is woken; a running one writes out its page cache and is
    /// paused while its disk is copied, then runs on; a stopped one stays so.
    ///
    /// Errors: `Invalid`/`Conflict` for the name, `LimitExceeded` over the
    /// storage quota, `Conflict` for a sandbox that is neither running nor stopped.
    pub async fn save_image(&self, user: &User, sandbox: &str, name: &str) -> Result<Image> {
        self.check_image_name(user, name).await?;
        self.storage_room(user).await?;
        let rec = self.find(user, sandbox).await?;
        let rec = if rec.status == SandboxStatus::Warm {
            self.wake(rec, WakeMode::Wait).await?
        } else {
            rec
        };
        let _lock = self.thermal_lock(&rec.id).lock_owned().await;
        let rec = self.reload(&rec.id).await?;
        if !matches!(
            rec.status,
            SandboxStatus::Running | SandboxStatus::Cold | SandboxStatus::Stopped
        ) {
            return Err(ServiceError::Conflict(format!(
                "sandbox {} is {}; only a running or stopped sandbox can be saved",
                rec.name, rec.status
            )));
        }
        let img = ImageRecord::new(Some(user.id), name, &format!("save {}", rec.name), 0);
        let rt = super::thermal::runtime(&rec);
        let bytes = self.engine.save_image(&rec.id, &rt, &img.id).await?;
        self.record_image(ImageRecord {
            size_bytes: bytes,
            ..img
        })
        .await
    }

    /// Removes the work dirs of imports and pulls a crash cut short (daemon start).
    pub(super) fn sweep_import_dirs(&self) {
        if let Some(d) = self.store.path().parent() {
            let _ = std::fs::remove_dir_all(d.join("import-tmp"));
        }
    }

    /// A fresh work dir for an import (on the data dir's filesystem: images are big).
    pub fn import_dir(&self) -> Result<WorkDir> {
        let base = self
            .store
            .path()
            .parent()
            .unwrap_or(Path::new("/tmp"))
            .join("import-tmp");
        let dir = base.join(crate::store::generate_volume_id());
        std::fs::create_dir_all(&dir).map_err(|e| {
            ServiceError::Unavailable(format!("cannot make {}: {e}", dir.display()))
        })?;
        Ok(WorkDir(dir))
    }

    /// Makes the image `name` from a `docker save` tarball or an OCI image
    /// layout tar at `work/archive.tar`: layers applied in order with their
    /// whiteouts, made bootable ([`crate::oci::make_bootable`]), written
    /// into a sparse ext4. `source` is recorded as where it came from.
    ///
    /// The unpacked files may take at most the caller's storage quota left;
    /// unpacking stops as soon as they pass it.
    ///
    /// Errors: `Invalid` for an archive that is not an image; name and
    /// quota errors (`LimitExceeded` also for files over the quota left).
    pub async fn import_image(
        &self,
        user: &User,
        name: &str,
        work: &WorkDir,
        source: &str,
    ) -> Result<Image> {
        self.check_image_name(user, name).await?;
        let room = self.storage_room(user).await?;
        let (dir, archive) = (work.0.clone(), work.0.join("archive.tar"));
        let root = dir.join("rootfs");
        let r = root.clone();
        let (added, bytes) = tokio::task::spawn_blocking(move || {
            let added = if archive.is_file() {
                crate::oci::archive_to_tree(&archive, &dir, &r, room)
            } else {
                crate::oci::layout_to_tree(&dir.join("layout"), &r, room)
            }?;
            Ok::<_, crate::oci::OciError>((added, crate::oci::tree_bytes(&r)))
        })
        .await
        .map_err(|e| ServiceError::Unavailable(format!("import task failed: {e}")))?
        .map_err(|e| match e {
            crate::oci::OciError::Format(m) => ServiceError::Invalid(format!("not an image: {m}")),
            e @ crate::oci::OciError::TooBig { .. } => {
                ServiceError::Store(StoreError::LimitExceeded(e.to_string()))
            }
            // The host's paths stay in the log.
            crate::oci::OciError::Io { path, source } => {
                tracing::warn!(%path, error = %source, "image import failed");
                ServiceError::Unavailable(format!("cannot unpack the image: {source}"))
            }
        })?;
        tracing::info!(name, added = ?added.0, "imported image made bootable");
        let size_mb = (bytes + bytes / 4).div_ceil(1 << 20) + IMPORT_HEADROOM_MB;
        let img = ImageRecord::new(Some(user.id), name, source, 0);
        let host = self.engine.import_image(&img.id, &root, size_mb).await?;
        self.record_image(ImageRecord {
            size_bytes: host,
            ..img
        })
        .await
    }

    /// Deletes one of the caller's images.
    ///
    /// Errors: `NotFound`; `Conflict` for an operator image or while a
    /// sandbox, fork or snapshot uses it.
    pub async fn delete_image(&self, user: &User, key: &str) -> Result<()> {
        let (uid, k) = (user.id, key.to_string());
        let img = self.store.call(move |s| s.find_image(uid, &k)).await?;
        if img.user_id.is_none() {
            return Err(ServiceError::Conflict(format!(
                "image {} belongs to the operator; only they can delete it (on the host)",
                img.name
            )));
        }
        let id = img.id.clone();
        let mut users = self.store.call(move |s| s.image_sandboxes(&id)).await?;
        for u in self.engine.image_users(&img.id)? {
            // A layer is named by the snapshots and sandboxes on it, not its id.
            let named = match u.strip_prefix(crate::engine::LAYER_USER) {
                Some(layer) => {
                    let l = layer.to_string();
                    let on = self.store.call(move |s| s.layer_users(&l)).await?;
                    if on.is_empty() {
                        vec![format!("a fork in progress (disk layer {layer})")]
                    } else {
                        on
                    }
                }
                // Sandboxes made from it are named by the store already.
                None if u.starts_with("sb_") => continue,
                None => vec![u],
            };
            for n in named {
                let bare = n.strip_prefix("sandbox ").unwrap_or(&n);
                if !users.iter().any(|x| x == &n || x == bare) {
                    users.push(n);
                }
            }
        }
        if !users.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "image {} is in use by {}; destroy those first (snapshots: `bhatti snapshot delete`)",
                img.name,
                users.join(", ")
            )));
        }
        let id = img.id.clone();
        self.store.call(move |s| s.delete_image(&id)).await?;
        if let Err(e) = self.engine.delete_image(&img.id).await {
            tracing::error!(image = %img.id, error = %e, "cannot remove a deleted image's file");
        }
        tracing::info!(image = %img.id, name = %img.name, "image deleted");
        Ok(())
    }
}
