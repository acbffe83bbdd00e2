//! Persistent volumes: create, list, delete, grow, and attach at sandbox create.
//!
//! A volume is a disk of its own (engine) recorded in the store with its
//! attachments. Rules (store): read-write to one sandbox at a time, read-only
//! to many; an attached volume cannot be deleted; sizes within the user's
//! storage quota. Forks and snapshots of a sandbox with volumes are refused:
//! a volume's contents are no part of the copy, and a read-write volume
//! cannot be shared with it.

use std::sync::Arc;

use time::format_description::well_known::Rfc3339;

use super::thermal::WakeMode;
use super::{AsyncLock, Result, Service, ServiceError};
use crate::engine::{EngineError, VolumeSpec};
use crate::model::volumes::{Volume, VolumeAttachmentInfo, VolumeMountRequest};
use crate::store::{StoreError, User, VolumeAttachment, VolumeRecord, VolumeRequest};

/// How long a guest may take to `sync` its volumes before its VM is ended.
const VOLUME_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Service {
    /// The lock of one volume: a grow and a sandbox create that attaches it
    /// never overlap.
    fn volume_lock(&self, id: &str) -> AsyncLock {
        let mut locks = self
            .volume_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_string()).or_default().clone()
    }

    fn volume_view(&self, v: &VolumeRecord, attachments: &[VolumeAttachment]) -> Volume {
        Volume {
            id: v.id.clone(),
            name: v.name.clone(),
            size_mb: v.size_mb,
            used_bytes: self.engine.volume_usage(&v.id).unwrap_or(0),
            attachments: attachments
                .iter()
                .map(|a| VolumeAttachmentInfo {
                    sandbox: a.sandbox_name.clone(),
                    mount: a.mount_path.clone(),
                    read_only: a.read_only,
                })
                .collect(),
            created_at: v.created_at.format(&Rfc3339).unwrap_or_default(),
        }
    }

    async fn find_volume(&self, user: &User, key: &str) -> Result<VolumeRecord> {
        let (uid, k) = (user.id, key.to_string());
        Ok(self.store.call(move |s| s.find_volume(uid, &k)).await?)
    }

    /// Makes a new, empty volume of `size_mb` MiB.
    ///
    /// Errors: `Invalid` (name, size), `Conflict` (name in use),
    /// `LimitExceeded` (storage quota), engine failures (nothing is left behind).
    pub async fn create_volume(&self, user: &User, name: &str, size_mb: i64) -> Result<Volume> {
        let size = u64::try_from(size_mb).map_err(|_| {
            ServiceError::Invalid(format!(
                "invalid field `size_mb`: must be at least 1, got {size_mb}"
            ))
        })?;
        let (uid, n) = (user.id, name.to_string());
        let rec = self
            .store
            .call(move |s| s.create_volume(uid, &n, size))
            .await?;
        if let Err(e) = self.engine.create_volume(&rec.id, rec.size_mb).await {
            let id = rec.id.clone();
            let (uid, vid) = (user.id, rec.id.clone());
            if let Err(del) = self.store.call(move |s| s.delete_volume(uid, &vid)).await {
                tracing::error!(volume = %id, error = %del, "cannot forget a volume whose disk failed");
            }
            return Err(e.into());
        }
        tracing::info!(volume = %rec.id, name = %rec.name, size_mb = rec.size_mb, "volume created");
        Ok(self.volume_view(&rec, &[]))
    }

    /// The caller's volumes, by name, with their attachments.
    pub async fn list_volumes(&self, user: &User) -> Result<Vec<Volume>> {
        let uid = user.id;
        let all = self
            .store
            .call(move |s| {
                s.list_volumes(uid)?
                    .into_iter()
                    .map(|v| {
                        let a = s.volume_attachments(&v.id)?;
                        Ok((v, a))
                    })
                    .collect::<std::result::Result<Vec<_>, StoreError>>()
            })
            .await?;
        Ok(all.iter().map(|(v, a)| self.volume_view(v, a)).collect())
    }

    /// One of the caller's volumes.
    pub async fn get_volume(&self, user: &User, key: &str) -> Result<Volume> {
        let v = self.find_volume(user, key).await?;
        let id = v.id.clone();
        let a = self.store.call(move |s| s.volume_attachments(&id)).await?;
        Ok(self.volume_view(&v, &a))
    }

    /// Deletes a detached volume and its disk.
    ///
    /// Errors: `NotFound`; `Conflict` while a sandbox has it.
    pub async fn delete_volume(&self, user: &User, key: &str) -> Result<()> {
        let v = self.find_volume(user, key).await?;
        let _lock = self.volume_lock(&v.id).lock_owned().await;
        let (uid, id) = (user.id, v.id.clone());
        let v = self.store.call(move |s| s.delete_volume(uid, &id)).await?;
        if let Err(e) = self.engine.delete_volume(&v.id).await {
            // The record is gone; the file is only wasted space now.
            tracing::error!(volume = %v.id, error = %e, "cannot remove a deleted volume's disk");
        }
        tracing::info!(volume = %v.id, name = %v.name, "volume deleted");
        Ok(())
    }

    /// Grows a volume and its filesystem to `size_mb` MiB. Detached: on the
    /// host. Attached read-write: in its sandbox, woken first if it is warm
    /// or cold. Attached read-only: refused (a guest that reads it would
    /// not see the change and its cache would go stale).
    ///
    /// Errors: `Invalid` when not larger; `LimitExceeded` over the storage
    /// quota; `Conflict` while attached read-only or to a sandbox that is
    /// stopped or broken; engine failures (the recorded size stays).
    pub async fn resize_volume(&self, user: &User, key: &str, size_mb: i64) -> Result<Volume> {
        let size = u64::try_from(size_mb).map_err(|_| {
            ServiceError::Invalid(format!("invalid field `size_mb`: {size_mb} is not a size"))
        })?;
        let v = self.find_volume(user, key).await?;
        let _lock = self.volume_lock(&v.id).lock_owned().await;
        let id = v.id.clone();
        let attachments = self.store.call(move |s| s.volume_attachments(&id)).await?;
        if let Some(ro) = attachments.iter().find(|a| a.read_only) {
            return Err(ServiceError::Conflict(format!(
                "volume {} is attached read-only to sandbox {}; it can only grow while detached or attached read-write",
                v.name, ro.sandbox_name
            )));
        }
        // Quota and "only grows" first: the record changes only after the disk did.
        if size <= v.size_mb {
            return Err(ServiceError::Invalid(format!(
                "invalid size {size} MB: volume {} has {} MB and can only grow",
                v.name, v.size_mb
            )));
        }
        let holder = match attachments.first() {
            None => None,
            Some(a) => {
                let rec = self.reload(&a.sandbox_id).await?;
                let rec = self.wake(rec, WakeMode::Wait).await?;
                if rec.status != crate::store::SandboxStatus::Running {
                    return Err(ServiceError::Conflict(format!(
                        "volume {} is attached to sandbox {}, which is {}; start it (or destroy it) to grow the volume",
                        v.name, rec.name, rec.status
                    )));
                }
                Some(rec)
            }
        };
        let (uid, id) = (user.id, v.id.clone());
        // Checks the quota and records the size in one transaction…
        self.store
            .call(move |s| s.grow_volume(uid, &id, size))
            .await?;
        let grown = match &holder {
            None => self.engine.grow_volume(&v.id, size, None).await,
            Some(rec) => {
                let _thermal = self.thermal_lock(&rec.id).lock_owned().await;
                let rt = super::thermal::runtime(rec);
                self.engine
                    .grow_volume(&v.id, size, Some((&rec.id, &rt)))
                    .await
            }
        };
        if let Err(EngineError::FilesystemNotGrown(why)) = grown {
            // The disk did grow: the record keeps the new size (it must
            // never be below the disk's), and the message says what failed.
            tracing::warn!(volume = %v.id, error = %why, "volume disk grown, guest filesystem not");
            return Err(ServiceError::Engine(EngineError::Storage(format!(
                "volume {}'s disk grew to {size} MB, but its filesystem in sandbox {} did not: {why}; \
                 the volume is recorded at {size} MB; grow it again (to any larger size) to finish",
                v.name,
                holder.as_ref().map(|r| r.name.as_str()).unwrap_or("?"),
            ))));
        }
        if let Err(e) = grown {
            // …and puts the old size back if the disk could not grow.
            let (vid, old) = (v.id.clone(), v.size_mb);
            if let Err(re) = self.store.call(move |s| s.set_volume_size(&vid, old)).await {
                tracing::error!(volume = %v.id, error = %re, "cannot restore a volume's recorded size");
            }
            return Err(e.into());
        }
        tracing::info!(volume = %v.id, name = %v.name, size_mb = size, online = holder.is_some(), "volume grown");
        self.get_volume(user, &v.id).await
    }

    /// Attaches the requested volumes to the new sandbox `sandbox_id` and
    /// returns them as the engine boots them; holds each volume's lock
    /// (returned) until the VM has opened them.
    pub(super) async fn attach_for_create(
        &self,
        user: &User,
        sandbox_id: &str,
        reqs: &[VolumeMountRequest],
    ) -> Result<(Vec<VolumeSpec>, Vec<tokio::sync::OwnedMutexGuard<()>>)> {
        if reqs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut guards = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        for r in reqs {
            let v = self
                .find_volume(user, &r.volume)
                .await
                .map_err(|e| match e {
                    ServiceError::Store(StoreError::NotFound(m)) => {
                        ServiceError::Invalid(format!("invalid field `volumes`: {m}"))
                    }
                    other => other,
                })?;
            ids.push(v.id);
        }
        // One order for every caller, so two creates cannot deadlock.
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        for id in &sorted {
            guards.push(self.volume_lock(id).lock_owned().await);
        }
        let reqs: Vec<VolumeRequest> = reqs
            .iter()
            .zip(&ids)
            .map(|(r, id)| VolumeRequest {
                volume: id.clone(),
                mount_path: r.mount.clone(),
                read_only: r.read_only,
            })
            .collect();
        let (uid, sid) = (user.id, sandbox_id.to_string());
        let attached = self
            .store
            .call(move |s| s.attach_volumes(uid, &sid, &reqs))
            .await
            .map_err(|e| match e {
                StoreError::Invalid(m) => {
                    ServiceError::Invalid(format!("invalid field `volumes`: {m}"))
                }
                other => other.into(),
            })?;
        let specs = attached
            .into_iter()
            .map(|a| VolumeSpec {
                id: a.volume_id,
                mount: a.mount_path,
                read_only: a.read_only,
            })
            .collect();
        Ok((specs, guards))
    }

    /// Has the guest of the running sandbox `rec` write its dirty pages to
    /// its disks (`sync` through the agent) when it has a read-write volume.
    /// Called before anything ends or freezes the VM (destroy, pause, save):
    /// a killed QEMU takes the guest's page cache with it, and the volume is
    /// all that outlives the sandbox. Best effort with a short timeout: a
    /// hung guest must not block a destroy; the failure is logged.
    pub(super) async fn sync_volumes(&self, rec: &crate::store::SandboxRecord) {
        if rec.status != crate::store::SandboxStatus::Running {
            return;
        }
        let sid = rec.id.clone();
        let writable = match self.store.call(move |s| s.sandbox_volumes(&sid)).await {
            Ok(v) => v.iter().any(|a| !a.read_only),
            Err(e) => {
                tracing::warn!(sandbox = %rec.id, error = %e, "cannot list the sandbox's volumes");
                true
            }
        };
        if !writable {
            return;
        }
        let started = std::time::Instant::now();
        let agent = self.agent_of(rec);
        let synced = tokio::time::timeout(
            VOLUME_SYNC_TIMEOUT,
            agent.exec_buffered(bhatti_proto::ExecRequest::command(["sync"])),
        )
        .await;
        match synced {
            Ok(Ok(o)) if o.exit_code == 0 => {
                tracing::debug!(sandbox = %rec.id, ms = started.elapsed().as_millis() as u64, "volumes synced");
            }
            Ok(Ok(o)) => {
                tracing::warn!(sandbox = %rec.id, exit = o.exit_code, "sync in the guest failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %rec.id, error = %e, "cannot sync the guest's volumes")
            }
            Err(_) => {
                tracing::warn!(sandbox = %rec.id, "the guest did not finish syncing its volumes in time")
            }
        }
    }

    /// Refuses a fork or snapshot of a sandbox that has volumes.
    pub(super) async fn refuse_copy_with_volumes(
        &self,
        sandbox_id: &str,
        name: &str,
    ) -> Result<()> {
        let sid = sandbox_id.to_string();
        let vols = self.store.call(move |s| s.sandbox_volumes(&sid)).await?;
        if let Some(v) = vols.first() {
            return Err(ServiceError::Conflict(format!(
                "sandbox {name} has volumes ({} on {}); forks and snapshots of a sandbox with volumes are not supported (a volume's data is no part of the copy)",
                v.volume_name, v.mount_path
            )));
        }
        Ok(())
    }
}

/// Parses the CLI's `NAME:/mount[:ro]` (also `:rw`).
pub fn parse_volume_arg(arg: &str) -> std::result::Result<VolumeMountRequest, String> {
    let (name, rest) = arg
        .split_once(':')
        .ok_or_else(|| format!("invalid --volume {arg:?}: expected NAME:/mount[:ro]"))?;
    let (mount, read_only) = match rest.rsplit_once(':') {
        Some((m, "ro")) => (m, true),
        Some((m, "rw")) => (m, false),
        _ => (rest, false),
    };
    if name.is_empty() || mount.is_empty() {
        return Err(format!(
            "invalid --volume {arg:?}: expected NAME:/mount[:ro]"
        ));
    }
    Ok(VolumeMountRequest {
        volume: name.to_string(),
        mount: mount.to_string(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_args() {
        let v = parse_volume_arg("data:/data").expect("rw");
        assert_eq!(
            (v.volume.as_str(), v.mount.as_str(), v.read_only),
            ("data", "/data", false)
        );
        let v = parse_volume_arg("ref:/mnt/ref:ro").expect("ro");
        assert_eq!((v.mount.as_str(), v.read_only), ("/mnt/ref", true));
        assert!(!parse_volume_arg("ref:/mnt/ref:rw").expect("rw").read_only);
        for bad in ["data", ":/x", "data:", "data::ro"] {
            assert!(parse_volume_arg(bad).is_err(), "{bad}");
        }
    }
}
