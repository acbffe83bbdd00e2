//! Forks and named snapshots (issue 13; design in docs/forks.md).
//!
//! Both stand on two engine calls: a checkpoint (the source's memory, and
//! its disk frozen into a read-only layer it keeps backing onto) and a
//! restore into a new identity. A fork is a checkpoint used once and
//! removed; a snapshot is a checkpoint kept under a name, resumed any
//! number of times. Layers are recorded in the store and deleted once no
//! sandbox, snapshot or other layer backs onto them.

use std::collections::BTreeSet;
use std::sync::Arc;

use rand::RngCore;
use time::format_description::well_known::Rfc3339;

use super::thermal::WakeMode;
use super::{Result, Service, ServiceError};
use crate::egress::EgressPolicy;
use crate::engine::{CheckpointInfo, Engine, SandboxSpec};
use crate::model::{CreateSandboxRequest, Snapshot};
use crate::store::{
    validate_sandbox_name, SandboxRecord, SandboxStatus, SnapshotRecord, StoreError, User,
};

/// Where a new sandbox's VM comes from when it is not booted fresh.
#[derive(Debug, Clone)]
pub(crate) struct RestoreSource {
    /// Engine checkpoint to restore.
    pub checkpoint: String,
    /// Opens the copy's agent before it has taken its identity.
    pub parent_token: String,
    /// The layer the copy's disk backs onto (a fork's: known once its
    /// checkpoint is taken, in [`Service::restore_new_identity`]).
    pub layer: String,
    pub cpus: u32,
    pub memory_mb: u32,
    /// A fork's checkpoint, removed once the copy runs (or failed).
    pub temporary: bool,
    /// The source's egress policy, which the copy keeps unless its request
    /// names another (`None`: an old snapshot's, unknown: the daemon's default).
    pub egress: Option<EgressPolicy>,
    /// A snapshot's: held until the copy is made, so that a delete of the
    /// snapshot waits for it (and not the other way round).
    pub _hold: Option<Arc<tokio::sync::OwnedRwLockReadGuard<()>>>,
    /// A fork's source sandbox: `checkpoint` is taken together with the
    /// restore (the engine overlaps them), not before.
    pub fork_of: Option<String>,
}

impl RestoreSource {
    /// The copy's machine size: the source's; a request may only repeat it.
    pub fn machine(&self, cpus: Option<i64>, memory_mb: Option<i64>) -> Result<(u32, u32)> {
        same_machine(cpus, memory_mb, self.cpus, self.memory_mb)?;
        Ok((self.cpus, self.memory_mb))
    }
}

/// `Invalid` unless the requested size (if any) is the source's.
fn same_machine(
    cpus: Option<i64>,
    memory_mb: Option<i64>,
    src_cpus: u32,
    src_memory_mb: u32,
) -> Result<()> {
    if cpus.is_some_and(|c| c != i64::from(src_cpus)) {
        return Err(ServiceError::Invalid(format!(
            "invalid field `cpus`: a copy has its source's {src_cpus} vCPUs"
        )));
    }
    if memory_mb.is_some_and(|m| m != i64::from(src_memory_mb)) {
        return Err(ServiceError::Invalid(format!(
            "invalid field `memory_mb`: a copy has its source's {src_memory_mb} MB"
        )));
    }
    Ok(())
}

/// A fork's checkpoint that must not outlive its request: removed by
/// [`remove`](Self::remove), or, if the request is dropped or fails on
/// the way, in the background when the guard goes.
pub(crate) struct TempCheckpoint {
    engine: Arc<dyn Engine>,
    id: Option<String>,
}

impl TempCheckpoint {
    pub fn new(engine: Arc<dyn Engine>, id: String) -> Self {
        Self {
            engine,
            id: Some(id),
        }
    }

    /// Removes the checkpoint now (a failure is logged: the startup sweep
    /// removes fork checkpoints left behind).
    pub async fn remove(mut self) {
        if let Some(cp) = self.id.take() {
            if let Err(e) = self.engine.delete_checkpoint(&cp).await {
                tracing::warn!(checkpoint = %cp, error = %e, "cannot remove a fork's checkpoint");
            }
        }
    }
}

impl Drop for TempCheckpoint {
    fn drop(&mut self) {
        let Some(cp) = self.id.take() else { return };
        let engine = self.engine.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = engine.delete_checkpoint(&cp).await {
                        tracing::warn!(checkpoint = %cp, error = %e, "cannot remove a fork's checkpoint");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(checkpoint = %cp, "a fork's checkpoint stays until the next start")
            }
        }
    }
}

/// A fork's source that is not there is a bad `from`.
fn from_field(e: ServiceError) -> ServiceError {
    match e {
        ServiceError::NotFound(m) => ServiceError::Invalid(format!("invalid field `from`: {m}")),
        other => other,
    }
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

fn view(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        id: s.id.clone(),
        name: s.name.clone(),
        sandbox: s.source_name.clone(),
        cpus: s.cpus,
        memory_mb: s.memory_mb,
        memory_bytes: s.state_bytes,
        disk_bytes: s.layer_bytes,
        size_bytes: s.state_bytes + s.layer_bytes,
        created_at: s.created_at.format(&Rfc3339).unwrap_or_default(),
        pause_ms: None,
    }
}

impl Service {
    /// Checkpoints the caller's sandbox `key` (running, warm or stopped; it
    /// runs on, or stays stopped) into checkpoint `checkpoint`, and records
    /// the layer its disk was frozen into.
    async fn checkpoint_sandbox(
        &self,
        user: &User,
        key: &str,
        checkpoint: &str,
    ) -> Result<(SandboxRecord, CheckpointInfo)> {
        let rec = self.copy_source(user, key).await?;
        let _lock = self.thermal_lock(&rec.id).lock_owned().await;
        let rec = self.copyable(&rec.id).await?;
        let layer = random_id("l");
        let rt = super::thermal::runtime(&rec);
        let info = self
            .engine
            .checkpoint(&rec.id, &rt, checkpoint, &layer)
            .await?;
        self.record_frozen_layer(&rec, checkpoint, &layer, &info)
            .await?;
        Ok((rec, info))
    }

    /// The caller's sandbox `key` as the source of a copy: one with
    /// volumes is refused, a paused one woken (it would come back running
    /// from the checkpoint).
    async fn copy_source(&self, user: &User, key: &str) -> Result<SandboxRecord> {
        let rec = self.find(user, key).await?;
        self.refuse_copy_with_volumes(&rec.id, &rec.name).await?;
        if rec.status == SandboxStatus::Warm {
            self.wake(rec, WakeMode::Wait).await
        } else {
            Ok(rec)
        }
    }

    /// Sandbox `id`'s record, when it can be checkpointed now (the caller
    /// holds its thermal lock): running or stopped, else `Conflict`.
    async fn copyable(&self, id: &str) -> Result<SandboxRecord> {
        let rec = self.reload(id).await?;
        match rec.status {
            SandboxStatus::Running | SandboxStatus::Cold | SandboxStatus::Stopped => Ok(rec),
            other => Err(ServiceError::Conflict(format!(
                "sandbox {} is {other}; only a running or stopped sandbox can be copied",
                rec.name
            ))),
        }
    }

    /// Records the layer checkpoint `info` of `rec` froze its disk into
    /// (nothing when it reused its current one).
    async fn record_frozen_layer(
        &self,
        rec: &SandboxRecord,
        checkpoint: &str,
        layer: &str,
        info: &CheckpointInfo,
    ) -> Result<()> {
        if !info.new_layer {
            // The sandbox wrote nothing since its last freeze: same layer.
            return Ok(());
        }
        let (sid, l, parent) = (rec.id.clone(), layer.to_string(), info.parent_layer.clone());
        if let Err(e) = self
            .store
            .call(move |s| s.freeze_layer_on(&sid, &l, parent.as_deref()))
            .await
        {
            // The disk is already switched; without the record the layer is
            // never collected, but every chain stays valid.
            tracing::error!(sandbox = %rec.id, layer, error = %e, "cannot record a frozen layer");
            let _ = self.engine.delete_checkpoint(checkpoint).await;
            return Err(e.into());
        }
        // A source flattened before the freeze left its old layers to the
        // copies and snapshots on them: the next collection takes them once
        // unused (not now: a fork of it in flight may not hold its layer yet).
        Ok(())
    }

    /// Refuses a copy request (fork `req.from` or resume of `snapshot`) for
    /// every reason that does not need the copy itself: both sources, a bad
    /// name, an image or volumes, another machine size, a source that
    /// cannot be copied, the sandbox quota. Run before any checkpoint.
    pub(super) async fn check_copy_request(
        &self,
        user: &User,
        name: &str,
        req: &CreateSandboxRequest,
        snapshot: Option<&str>,
    ) -> Result<()> {
        validate_sandbox_name(name)
            .map_err(|e| ServiceError::Invalid(format!("invalid field `name`: {e}")))?;
        if req.image.is_some() {
            return Err(ServiceError::Invalid(
                "invalid field `image`: a fork or a resumed snapshot has its source's disk".into(),
            ));
        }
        if req.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(ServiceError::Invalid(
                "invalid field `volumes`: a fork or a resumed snapshot has its source's devices and cannot take volumes".into(),
            ));
        }
        let (cpus, memory_mb) = match (req.from.as_deref(), snapshot) {
            (Some(_), Some(_)) => {
                return Err(ServiceError::Invalid(
                    "invalid field `from`: a sandbox resumed from a snapshot has no `from`".into(),
                ))
            }
            (Some(from), None) => {
                let rec = self.find(user, from).await.map_err(|e| match e {
                    ServiceError::NotFound(m) => {
                        ServiceError::Invalid(format!("invalid field `from`: {m}"))
                    }
                    other => other,
                })?;
                self.refuse_copy_with_volumes(&rec.id, &rec.name).await?;
                (rec.cpus, rec.memory_mb)
            }
            (None, Some(snap)) => {
                let snap = self.find_snapshot(user, snap).await?;
                (snap.cpus, snap.memory_mb)
            }
            (None, None) => return Ok(()),
        };
        same_machine(req.cpus, req.memory_mb, cpus, memory_mb)?;
        let uid = user.id;
        self.store.call(move |s| s.check_sandbox_quota(uid)).await?;
        Ok(())
    }

    /// `create --from`: a one-time checkpoint of the caller's sandbox
    /// `from`, taken by [`Service::restore_new_identity`] together with the
    /// copy's restore.
    pub(super) async fn fork_source(&self, user: &User, from: &str) -> Result<RestoreSource> {
        let rec = self.copy_source(user, from).await.map_err(from_field)?;
        // Refused now, before the copy's row exists; checked again under the lock.
        self.copyable(&rec.id).await?;
        Ok(RestoreSource {
            _hold: None,
            checkpoint: random_id(crate::engine::FORK_CHECKPOINT_PREFIX),
            parent_token: rec.token,
            layer: String::new(),
            cpus: rec.cpus,
            memory_mb: rec.memory_mb,
            temporary: true,
            egress: Some(rec.egress),
            fork_of: Some(rec.id),
        })
    }

    /// A fork: the source's checkpoint and the copy's restore in one
    /// engine call (the copy's VM starts while the source is paused), the
    /// source's thermal state held still throughout; then the source's new
    /// layer and the copy's are recorded.
    async fn fork_new_identity(
        &self,
        src: &RestoreSource,
        source_id: &str,
        spec: &SandboxSpec,
    ) -> Result<()> {
        let _lock = self.thermal_lock(source_id).lock_owned().await;
        let rec = self.copyable(source_id).await.map_err(from_field)?;
        let layer = random_id("l");
        let rt = super::thermal::runtime(&rec);
        let (info, restored) = self
            .engine
            .fork(&rec.id, &rt, &src.checkpoint, &layer, spec)
            .await
            .map_err(|e| from_field(e.into()))?;
        let recorded = async {
            self.record_frozen_layer(&rec, &src.checkpoint, &layer, &info)
                .await?;
            let (sid, l) = (spec.id.clone(), info.layer.clone());
            self.store
                .call(move |s| s.set_sandbox_layer(&sid, &l))
                .await?;
            Ok::<(), ServiceError>(())
        }
        .await;
        match (restored, recorded) {
            (Ok(_), Ok(())) => Ok(()),
            (Err(e), _) => Err(e.into()),
            (Ok(_), Err(e)) => {
                // The copy runs, but its disk's layer is not on record.
                if let Err(de) = self.engine.destroy(&spec.id).await {
                    tracing::warn!(sandbox = %spec.id, error = %de, "cannot remove a copy whose layer was not recorded");
                }
                Err(e)
            }
        }
    }

    /// A resume of the caller's snapshot `key`.
    pub(super) async fn snapshot_source(&self, user: &User, key: &str) -> Result<RestoreSource> {
        let snap = self.find_snapshot(user, key).await?;
        let hold = self.snapshot_lock(&snap.id).read_owned().await;
        // A delete that ran while this waited has removed it: say so.
        let snap = self.find_snapshot(user, &snap.id).await?;
        Ok(RestoreSource {
            _hold: Some(Arc::new(hold)),
            fork_of: None,
            checkpoint: snap.id,
            parent_token: snap.token,
            layer: snap.layer_id,
            cpus: snap.cpus,
            memory_mb: snap.memory_mb,
            temporary: false,
            egress: snap.egress,
        })
    }

    /// Restores `src` as the new sandbox `spec` (whose row exists) with its
    /// own identity, and records the layer its disk backs onto. The path
    /// every copy takes: forks, snapshot resumes (and templates).
    pub(super) async fn restore_new_identity(
        &self,
        src: &RestoreSource,
        spec: &SandboxSpec,
    ) -> Result<()> {
        if let Some(source_id) = &src.fork_of {
            return self.fork_new_identity(src, source_id, spec).await;
        }
        // The copy holds its layer before it boots: a source destroyed (or a
        // snapshot deleted) meanwhile cannot take the layer away. A failed
        // restore deletes the row, and the reference with it.
        let (sid, layer) = (spec.id.clone(), src.layer.clone());
        self.store
            .call(move |s| s.set_sandbox_layer(&sid, &layer))
            .await?;
        self.engine
            .restore_checkpoint(&src.checkpoint, &src.parent_token, spec)
            .await?;
        Ok(())
    }

    async fn find_snapshot(&self, user: &User, key: &str) -> Result<SnapshotRecord> {
        let (uid, k) = (user.id, key.to_string());
        self.store
            .call(move |s| s.find_snapshot(uid, &k))
            .await
            .map_err(|e| match e {
                StoreError::NotFound(m) => ServiceError::NotFound(m),
                other => other.into(),
            })
    }

    /// Snapshots the caller's sandbox `sandbox` (memory and disk) under
    /// `name`; a running sandbox runs on after a short pause.
    ///
    /// Errors: `Invalid` for a bad name; `Conflict` for a name in use or a
    /// sandbox that cannot be copied now; the store's `LimitExceeded` at
    /// the user's snapshot quota; engine failures.
    pub async fn create_snapshot(
        &self,
        user: &User,
        sandbox: &str,
        name: &str,
    ) -> Result<Snapshot> {
        validate_sandbox_name(name)
            .map_err(|e| ServiceError::Invalid(format!("invalid field `name`: {e}")))?;
        // Not found and name taken answer before the quota: they say what to fix.
        self.find(user, sandbox).await?;
        let (uid, n) = (user.id, name.to_string());
        let exists = self.store.call(move |s| s.snapshot_exists(uid, &n)).await?;
        if exists {
            return Err(ServiceError::Conflict(format!(
                "a snapshot named {name} already exists"
            )));
        }
        self.store
            .call(move |s| s.check_snapshot_quota(uid))
            .await?;
        let id = random_id(crate::engine::SNAPSHOT_CHECKPOINT_PREFIX);
        let (rec, info) = self.checkpoint_sandbox(user, sandbox, &id).await?;
        let record = SnapshotRecord {
            id: id.clone(),
            user_id: user.id,
            name: name.to_string(),
            source_name: rec.name.clone(),
            layer_id: info.layer.clone(),
            cpus: info.cpus,
            memory_mb: info.memory_mb,
            token: rec.token.clone(),
            state_bytes: info.state_bytes,
            layer_bytes: info.layer_bytes,
            created_at: time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc()),
            egress: Some(rec.egress.clone()),
        };
        let r = record.clone();
        if let Err(e) = self.store.call(move |s| s.insert_snapshot(&r)).await {
            let _ = self.engine.delete_checkpoint(&id).await;
            return Err(e.into());
        }
        tracing::info!(sandbox = %rec.name, snapshot = name, pause_ms = ?info.pause_ms, "snapshot taken");
        Ok(Snapshot {
            pause_ms: info.pause_ms,
            ..view(&record)
        })
    }

    /// The caller's snapshots, oldest first.
    pub async fn list_snapshots(&self, user: &User) -> Result<Vec<Snapshot>> {
        let uid = user.id;
        Ok(self
            .store
            .call(move |s| s.list_snapshots(uid))
            .await?
            .iter()
            .map(view)
            .collect())
    }

    pub async fn get_snapshot(&self, user: &User, key: &str) -> Result<Snapshot> {
        Ok(view(&self.find_snapshot(user, key).await?))
    }

    /// Deletes the caller's snapshot `key`; sandboxes resumed from it keep
    /// working (their disks keep its layer).
    pub async fn delete_snapshot(&self, user: &User, key: &str) -> Result<()> {
        let snap = self.find_snapshot(user, key).await?;
        // Resumes under way finish first; later ones find it gone.
        let lock = self.snapshot_lock(&snap.id);
        let _only_me = lock.write().await;
        let snap = self.find_snapshot(user, &snap.id).await?;
        let id = snap.id.clone();
        self.store.call(move |s| s.delete_snapshot(&id)).await?;
        if let Err(e) = self.engine.delete_checkpoint(&snap.id).await {
            tracing::warn!(snapshot = %snap.name, error = %e, "cannot remove a snapshot's memory file");
        }
        self.collect_layers().await;
        Ok(())
    }

    /// The lock between resumes (readers) and the delete (writer) of snapshot `id`.
    fn snapshot_lock(&self, id: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self
            .snapshot_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_string()).or_default().clone()
    }

    /// A new sandbox from the caller's snapshot `key`, as `req` names it.
    /// Runs to completion even when the caller's future is dropped (see
    /// [`create_sandbox`](Service::create_sandbox)).
    pub async fn resume_snapshot(
        self: &Arc<Self>,
        user: &User,
        key: &str,
        req: CreateSandboxRequest,
    ) -> Result<super::Created> {
        let (svc, user, key) = (self.clone(), user.clone(), key.to_string());
        super::detached(async move { svc.create_with(&user, req, Some(&key)).await }).await
    }

    /// Deletes the layers nothing uses any more (files first, then rows).
    pub(super) async fn collect_layers(&self) {
        self.collect_layers_except(&BTreeSet::new()).await
    }

    /// [`collect_layers`](Self::collect_layers), keeping the layers in `keep`
    /// (those the files on the host still need, whatever the store says).
    async fn collect_layers_except(&self, keep: &BTreeSet<String>) {
        // Each round frees the layers whose last user went in the round before.
        for _ in 0..64 {
            let unused: Vec<String> = match self.store.call(|s| s.unused_layers()).await {
                Ok(u) => u.into_iter().filter(|l| !keep.contains(l)).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list unused layers");
                    return;
                }
            };
            let unused = match unused {
                u if !u.is_empty() => u,
                _ => return,
            };
            for layer in unused {
                if let Err(e) = self.engine.delete_layer(&layer).await {
                    tracing::warn!(layer, error = %e, "cannot delete a layer");
                    return;
                }
                let l = layer.clone();
                if let Err(e) = self.store.call(move |s| s.delete_layer(&l)).await {
                    tracing::warn!(layer, error = %e, "cannot forget a deleted layer");
                    return;
                }
                tracing::debug!(layer, "unused layer deleted");
            }
        }
    }

    /// At start-up, after the engine's sweep: removes the checkpoints of
    /// snapshots a crash cut short (no row) and the rows of snapshots whose
    /// files are gone, makes the store's layer records agree with the files
    /// (layers frozen by a checkpoint the crash interrupted are adopted;
    /// each sandbox backs onto the layer its disk really backs onto), then
    /// deletes every layer neither a record nor a file needs.
    pub(super) async fn reconcile_layers(&self) -> Result<()> {
        let snaps = self.store.call(|s| s.list_all_snapshots()).await?;
        let ids: Vec<String> = snaps.iter().map(|s| s.id.clone()).collect();
        for broken in self.engine.sweep_snapshot_checkpoints(&ids).await? {
            let Some(snap) = snaps.iter().find(|s| s.id == broken) else {
                continue;
            };
            tracing::warn!(snapshot = %snap.name, user_id = snap.user_id, id = %snap.id, "removing a snapshot whose files are gone (memory, record or disk layer)");
            let id = snap.id.clone();
            self.store.call(move |s| s.delete_snapshot(&id)).await?;
            if let Err(e) = self.engine.delete_checkpoint(&snap.id).await {
                tracing::warn!(snapshot = %snap.name, error = %e, "cannot remove a broken snapshot's files");
            }
        }

        let disk = self.engine.disk_layers().await?;
        let recorded: BTreeSet<String> = self
            .store
            .call(|s| s.layer_ids())
            .await?
            .into_iter()
            .collect();
        // Parents first: a row names a recorded parent.
        let mut adopted = BTreeSet::new();
        for layer in disk.layers.keys() {
            let mut chain = Vec::new();
            let mut at = Some(layer.clone());
            while let Some(l) = at {
                if recorded.contains(&l)
                    || adopted.contains(&l)
                    || chain.contains(&l)
                    || !disk.layers.contains_key(&l)
                {
                    break;
                }
                at = disk.layers.get(&l).cloned().flatten();
                chain.push(l);
            }
            for l in chain.into_iter().rev() {
                let parent = disk
                    .layers
                    .get(&l)
                    .cloned()
                    .flatten()
                    .filter(|p| recorded.contains(p) || adopted.contains(p));
                let (id, p) = (l.clone(), parent.clone());
                if self
                    .store
                    .call(move |s| s.adopt_layer(&id, p.as_deref()))
                    .await?
                {
                    tracing::warn!(layer = %l, parent = ?parent, "recorded a layer a crash left unrecorded");
                }
                adopted.insert(l);
            }
        }
        for rec in self.store.call(|s| s.list_all_sandboxes()).await? {
            let Some(actual) = disk.vms.get(&rec.id) else {
                continue;
            };
            let sid = rec.id.clone();
            let stored = self.store.call(move |s| s.sandbox_layer(&sid)).await?;
            if stored == *actual {
                continue;
            }
            if actual
                .as_ref()
                .is_some_and(|l| !recorded.contains(l) && !adopted.contains(l))
            {
                tracing::error!(sandbox = %rec.name, layer = ?actual, "the sandbox's disk backs onto a layer file that is gone");
                continue;
            }
            tracing::warn!(sandbox = %rec.name, recorded = ?stored, actual = ?actual, "recording the layer the sandbox's disk backs onto");
            let (sid, l) = (rec.id.clone(), actual.clone());
            self.store
                .call(move |s| match l {
                    Some(l) => s.set_sandbox_layer(&sid, &l),
                    None => s.clear_sandbox_layer(&sid),
                })
                .await?;
        }
        self.collect_layers_except(&disk.in_use()).await;
        Ok(())
    }
}
