//! Templates: every sandbox starts from a pre-booted guest (issue 14;
//! design in docs/templates.md).
//!
//! A template is a guest of one shape (default image, cpus, memory) booted
//! once, idle with its agent ready, and checkpointed (RAM file, device
//! state, frozen disk layer). A create of that shape restores it into the
//! new sandbox's identity (the fork path) instead of booting a kernel. The
//! service decides when to build, use and drop one; the engine only boots,
//! checkpoints, restores and deletes.
//!
//! Templates are keyed by a hash of the engine's basis (kernel, initramfs,
//! rootfs, QEMU, accelerator, network plan), the shape and
//! [`FORMAT_VERSION`]: a daemon started on other images computes other
//! keys, drops the old templates (their layers stay while template-born
//! sandboxes use them) and builds new ones.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::snapshots::RestoreSource;
use super::Service;
use crate::egress::{EgressPolicy, Posture};
use crate::engine::SandboxSpec;
use crate::store::TemplateRecord;

/// Ids of template VMs, checkpoints and layers start with this.
pub const TEMPLATE_PREFIX: &str = "tpl-";
/// Bump when what a template holds changes for the same basis and shape.
/// 2: template VMs boot without free page reporting, and their RAM stays
/// on disk only (templates of version 1 are dropped and built again).
const FORMAT_VERSION: u32 = 2;
/// After a failed build, the same shape is not tried again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(300);
/// Templates kept at most: each holds its guest's RAM in host memory.
const MAX_TEMPLATES: usize = 4;
/// A booted guest is given this long to settle before its checkpoint.
const SETTLE: Duration = Duration::from_millis(300);
/// A build waits at most this long for the boots that asked for it.
const MAX_BUILD_WAIT: Duration = Duration::from_secs(60);

/// The machine a template is booted with (the default image only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub cpus: u32,
    pub memory_mb: u32,
}

/// The template state of a service.
pub(super) struct Templates {
    /// Config `templates` (and `$BHATTI_TEMPLATES`).
    enabled: bool,
    /// Shape to build when the daemon starts.
    default_shape: Shape,
    /// Queue of the builder task (absent until [`Service::start_templates`]).
    queue: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Shape>>>,
    /// Keys queued or building, so one shape is queued once.
    pending: Mutex<HashSet<String>>,
    /// Keys whose last build failed, and when.
    failed: Mutex<HashMap<String, Instant>>,
    /// The address a build's VM holds while it runs: no sandbox gets it.
    /// A build picks it, and a create allocates its address, under this
    /// lock, so that the two never pick the same free address.
    holding_ip: Arc<Mutex<Option<Ipv4Addr>>>,
    /// Per key: restores from the template (readers) against its drop
    /// (the writer), so that a drop never deletes files a restore is
    /// reading, and a restore never picks a template being dropped.
    locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Boots of creates that found no usable template and asked for a
    /// build: builds wait until none is left, so that a build does not
    /// compete for the cores with the boot that asked for it.
    waiting_boots: tokio::sync::watch::Sender<usize>,
}

impl Templates {
    pub fn new(enabled: bool, default_shape: Shape) -> Self {
        Self {
            enabled,
            default_shape,
            queue: Mutex::new(None),
            pending: Mutex::new(HashSet::new()),
            failed: Mutex::new(HashMap::new()),
            holding_ip: Arc::new(Mutex::new(None)),
            locks: Mutex::new(HashMap::new()),
            waiting_boots: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The address a template build's VM holds (if one runs). Allocate a
    /// sandbox's address while holding this lock, avoiding that address.
    pub fn ip_hold(&self) -> Arc<Mutex<Option<Ipv4Addr>>> {
        self.holding_ip.clone()
    }
}

/// A template picked for a create, and what to do without one.
pub(super) enum TemplatePick<'a> {
    /// Restore this (the source holds the template's read lock).
    Ready(Box<(RestoreSource, TemplateRecord)>),
    /// None of the shape is ready: boot; a build of the shape is queued
    /// when this is dropped, after the boot.
    Missing(BuildAfterBoot<'a>),
    /// Templates are off, or this create cannot use one.
    Off,
}

/// A boot that asked for a template build: the build is queued when this
/// is dropped (after the boot, whatever its outcome), and no build starts
/// while one of these lives (for at most [`MAX_BUILD_WAIT`]).
pub(super) struct BuildAfterBoot<'a> {
    svc: &'a Service,
    shape: Shape,
}

impl<'a> BuildAfterBoot<'a> {
    fn new(svc: &'a Service, shape: Shape) -> Self {
        svc.templates.waiting_boots.send_modify(|n| *n += 1);
        Self { svc, shape }
    }
}

impl Drop for BuildAfterBoot<'_> {
    fn drop(&mut self) {
        self.svc.request_template(self.shape);
        self.svc
            .templates
            .waiting_boots
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Whether templates are on: config `templates`, unless `$BHATTI_TEMPLATES`
/// says `0`/`false`/`off` (or `1`/`true`/`on`).
pub fn templates_enabled(config: bool) -> bool {
    match std::env::var("BHATTI_TEMPLATES").ok().as_deref() {
        Some("0" | "false" | "off" | "no") => false,
        Some("1" | "true" | "on" | "yes") => true,
        _ => config,
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// The key of a template of `shape` on an engine of `basis`.
fn key_of(basis: &str, shape: Shape) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update(basis.as_bytes());
    h.update(b"\nimage=default");
    h.update(shape.cpus.to_le_bytes());
    h.update(shape.memory_mb.to_le_bytes());
    hex::encode(&h.finalize()[..8])
}

impl Service {
    /// Turns templates on or off and sets the shape built at start (the
    /// default create's: 1 vCPU, [`super::DEFAULT_MEMORY_MB`]).
    pub fn with_templates(mut self, enabled: bool) -> Self {
        self.templates = Templates::new(
            enabled,
            Shape {
                cpus: 1,
                memory_mb: super::DEFAULT_MEMORY_MB as u32,
            },
        );
        self
    }

    fn template_key(&self, shape: Shape) -> Option<String> {
        self.engine
            .template_basis()
            .map(|basis| key_of(&basis, shape))
    }

    /// Starts the template builder: drops templates of another basis and
    /// host leftovers of builds cut short, then builds the default shape,
    /// then whatever creates ask for. With templates off, drops every
    /// template of an earlier run before it returns. Call after
    /// [`Service::recover`].
    pub async fn start_templates(self: Arc<Self>) {
        if !self.templates.enabled() || self.engine.template_basis().is_none() {
            // Their RAM and checkpoint files would stay on the host for nothing.
            self.sweep_templates(false).await;
            tracing::info!("templates off: every create boots");
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut q) = self.templates.queue.lock() {
            *q = Some(tx);
        }
        let svc = self.clone();
        tokio::spawn(async move {
            svc.sweep_templates(true).await;
            svc.request_template(svc.templates.default_shape);
            while let Some(shape) = rx.recv().await {
                svc.wait_for_boots().await;
                svc.build_if_missing(shape).await;
            }
        });
    }

    /// Waits (at most [`MAX_BUILD_WAIT`]) until no boot that asked for a
    /// build is under way: a build is one more boot on the same cores.
    async fn wait_for_boots(&self) {
        let mut rx = self.templates.waiting_boots.subscribe();
        if tokio::time::timeout(MAX_BUILD_WAIT, rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::info!(
                "boots still under way after {} s; building a template alongside them",
                MAX_BUILD_WAIT.as_secs()
            );
        }
    }

    /// The lock between restores from template `key` and its drop.
    fn template_lock(&self, key: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self
            .templates
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Queues a build of `shape` unless it is ready, queued, or failed lately.
    fn request_template(&self, shape: Shape) {
        let Some(key) = self.template_key(shape) else {
            return;
        };
        if self
            .templates
            .failed
            .lock()
            .ok()
            .and_then(|f| f.get(&key).copied())
            .is_some_and(|t| t.elapsed() < RETRY_AFTER)
        {
            return;
        }
        let fresh = self
            .templates
            .pending
            .lock()
            .map(|mut p| p.insert(key))
            .unwrap_or(false);
        if fresh {
            if let Ok(Some(q)) = self.templates.queue.lock().as_deref() {
                let _ = q.send(shape);
            }
        }
    }

    async fn build_if_missing(&self, shape: Shape) {
        let Some(key) = self.template_key(shape) else {
            return;
        };
        let k = key.clone();
        let ready = matches!(
            self.store.call(move |s| s.get_template(&k)).await,
            Ok(Some(_))
        );
        if !ready {
            tracing::info!(
                key,
                cpus = shape.cpus,
                memory_mb = shape.memory_mb,
                "building a template"
            );
            let started = Instant::now();
            match self.build_template(shape, &key).await {
                Ok(t) => {
                    tracing::info!(key, checkpoint = %t.checkpoint, cpus = shape.cpus, memory_mb = shape.memory_mb, ms = started.elapsed().as_millis() as u64, "template ready");
                    if let Ok(mut f) = self.templates.failed.lock() {
                        f.remove(&key);
                    }
                    self.evict_templates(&key).await;
                }
                // A full subnet is no fault of the shape: the next create
                // of it asks again, once an address may be free.
                Err(super::ServiceError::Store(crate::store::StoreError::SubnetFull(net))) => {
                    tracing::info!(key, cpus = shape.cpus, memory_mb = shape.memory_mb, subnet = %net, "no spare address for a template build (one stays free for creates); creates of this shape boot");
                }
                Err(e) => {
                    tracing::warn!(key, cpus = shape.cpus, memory_mb = shape.memory_mb, error = %e, "template build failed; creates of this shape boot");
                    if let Ok(mut f) = self.templates.failed.lock() {
                        f.insert(key.clone(), Instant::now());
                    }
                }
            }
        }
        if let Ok(mut p) = self.templates.pending.lock() {
            p.remove(&key);
        }
    }

    /// Keeps at most [`MAX_TEMPLATES`]: the least recently used go first,
    /// never the default shape's nor `keep` (the one just built).
    async fn evict_templates(&self, keep: &str) {
        let default = self.template_key(self.templates.default_shape);
        let Ok(all) = self.store.call(|s| s.list_templates()).await else {
            return;
        };
        let mut excess = all.len().saturating_sub(MAX_TEMPLATES);
        for t in all {
            if excess == 0 {
                break;
            }
            if t.key == keep || default.as_deref() == Some(t.key.as_str()) {
                continue;
            }
            tracing::info!(key = %t.key, cpus = t.cpus, memory_mb = t.memory_mb, used_at = %t.used_at, "dropping the least recently used template (at most {MAX_TEMPLATES})");
            self.drop_template(&t).await;
            excess -= 1;
        }
    }

    /// Boots a template VM of `shape` (an address no sandbox holds, no
    /// route out, no user code), checkpoints it once its agent is ready,
    /// removes the VM and records the checkpoint and layer under `key`.
    async fn build_template(&self, shape: Shape, key: &str) -> super::Result<TemplateRecord> {
        // The highest free address, held before any create can allocate it;
        // never the last free one: a create must not fail for a build.
        let (subnet, hold) = (self.subnet, self.templates.ip_hold());
        let ip = self
            .store
            .call(move |s| {
                let mut held = hold.lock().unwrap_or_else(|p| p.into_inner());
                let used = s.used_ips()?;
                let mut free = subnet.guest_hosts().filter(|ip| !used.contains(ip));
                let (Some(_), Some(ip)) = (free.next(), free.last()) else {
                    return Err(crate::store::StoreError::SubnetFull(subnet.to_string()));
                };
                *held = Some(ip);
                Ok(ip)
            })
            .await?;
        let suffix = random_hex(4);
        let vm = format!("{TEMPLATE_PREFIX}{key}-{suffix}");
        let spec = SandboxSpec {
            id: vm.clone(),
            name: "bhatti-template".into(),
            cpus: shape.cpus,
            memory_mb: shape.memory_mb,
            ip,
            token: random_hex(16),
            env: Default::default(),
            init: None,
            egress: EgressPolicy {
                mode: Posture::Deny,
                ..Default::default()
            },
            peer_group: None,
            volumes: Vec::new(),
            image: None,
            template: true,
        };
        let checkpoint = format!("{TEMPLATE_PREFIX}{key}-{suffix}");
        let layer = format!("{TEMPLATE_PREFIX}{key}-{suffix}-l");
        let made = async {
            let rt = self.engine.create(&spec).await?;
            tokio::time::sleep(SETTLE).await;
            let info = self
                .engine
                .checkpoint(&vm, &rt, &checkpoint, &layer)
                .await?;
            Ok::<_, crate::engine::EngineError>(info)
        }
        .await;
        // The VM goes whatever happened; the checkpoint and layer stay.
        if let Err(e) = self.engine.destroy(&vm).await {
            tracing::warn!(vm, error = %e, "cannot remove a template's VM");
        }
        *self
            .templates
            .holding_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let discard = |this: &Self| {
            let (engine, cp, l) = (this.engine.clone(), checkpoint.clone(), layer.clone());
            async move {
                let _ = engine.delete_checkpoint(&cp).await;
                let _ = engine.delete_layer(&l).await;
            }
        };
        let info = match made {
            Ok(v) => v,
            Err(e) => {
                discard(self).await;
                return Err(e.into());
            }
        };
        let now = time::OffsetDateTime::now_utc();
        let rec = TemplateRecord {
            key: key.to_string(),
            checkpoint: checkpoint.clone(),
            layer_id: info.layer.clone(),
            token: spec.token.clone(),
            cpus: info.cpus,
            memory_mb: info.memory_mb,
            created_at: now.replace_nanosecond(0).unwrap_or(now),
            used_at: now,
        };
        let r = rec.clone();
        if let Err(e) = self.store.call(move |s| s.insert_template(&r)).await {
            discard(self).await;
            return Err(e.into());
        }
        Ok(rec)
    }

    /// The ready template for a create of `shape`, as a restore source
    /// holding the template (a drop waits for the restore); or, with none
    /// ready, a [`BuildAfterBoot`] (the create boots, then a build is
    /// queued); or [`TemplatePick::Off`] with templates off.
    pub(super) async fn template_source(&self, shape: Shape) -> TemplatePick<'_> {
        if !self.templates.enabled() {
            return TemplatePick::Off;
        }
        let Some(key) = self.template_key(shape) else {
            return TemplatePick::Off;
        };
        let lock = self.template_lock(&key);
        let hold = lock.read_owned().await;
        // Read under the lock: a drop that ran while this waited has removed it.
        let k = key.clone();
        match self.store.call(move |s| s.get_template(&k)).await {
            Ok(Some(t)) => TemplatePick::Ready(Box::new((
                RestoreSource {
                    _hold: Some(Arc::new(hold)),
                    fork_of: None,
                    checkpoint: t.checkpoint.clone(),
                    parent_token: t.token.clone(),
                    layer: t.layer_id.clone(),
                    cpus: t.cpus,
                    memory_mb: t.memory_mb,
                    temporary: false,
                    egress: None,
                },
                t,
            ))),
            Ok(None) => TemplatePick::Missing(BuildAfterBoot::new(self, shape)),
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot look up a template");
                TemplatePick::Off
            }
        }
    }

    /// Records that a create was restored from `t` now (eviction drops the
    /// least recently used first).
    pub(super) async fn template_used(&self, t: &TemplateRecord) {
        let (k, now) = (t.key.clone(), time::OffsetDateTime::now_utc());
        if let Err(e) = self
            .store
            .call(move |s| s.mark_template_used(&k, now))
            .await
        {
            tracing::warn!(key = %t.key, error = %e, "cannot record a template's use");
        }
    }

    /// Forgets template `t` and deletes its checkpoint (copies that map
    /// its RAM keep their pages); its layer goes once no sandbox uses it.
    /// A newer template of the same key stays.
    /// Waits for restores from it under way; the caller must not hold its
    /// lock (a [`TemplatePick::Ready`] source).
    pub(super) async fn drop_template(&self, t: &TemplateRecord) {
        let lock = self.template_lock(&t.key);
        let _only_me = lock.write().await;
        let (k, cp) = (t.key.clone(), t.checkpoint.clone());
        match self.store.call(move |s| s.delete_template(&k, &cp)).await {
            Ok(true) => {}
            // Dropped already (two failed restores of it), perhaps built
            // again since: nothing of this one is left to drop.
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(key = %t.key, error = %e, "cannot forget a template");
                return;
            }
        }
        if let Err(e) = self.engine.delete_checkpoint(&t.checkpoint).await {
            tracing::warn!(checkpoint = %t.checkpoint, error = %e, "cannot delete a template's checkpoint");
        }
        self.collect_layers().await;
    }

    /// A template that failed to restore: dropped now, and built again
    /// once the fallback boot (while the returned guard lives) is over.
    pub(super) async fn template_failed(
        &self,
        t: &TemplateRecord,
        shape: Shape,
    ) -> BuildAfterBoot<'_> {
        let rebuild = BuildAfterBoot::new(self, shape);
        self.drop_template(t).await;
        rebuild
    }

    /// Drops templates whose key is not what this daemon computes for
    /// their shape (other images, QEMU, network plan) — every template if
    /// `enabled` is false —, and template checkpoints and layers on the
    /// host that nothing records (a build cut short).
    async fn sweep_templates(&self, enabled: bool) {
        let all = match self.store.call(|s| s.list_templates()).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list templates");
                return;
            }
        };
        let mut keep = HashSet::new();
        for t in all {
            let shape = Shape {
                cpus: t.cpus,
                memory_mb: t.memory_mb,
            };
            if !enabled {
                tracing::info!(key = %t.key, cpus = t.cpus, memory_mb = t.memory_mb, "templates off: dropping a template of an earlier run");
                self.drop_template(&t).await;
            } else if self.template_key(shape).as_deref() == Some(t.key.as_str()) {
                keep.insert(t.checkpoint.clone());
            } else {
                tracing::info!(key = %t.key, "dropping a template of another basis (images, QEMU or network changed)");
                self.drop_template(&t).await;
            }
        }
        for cp in self.engine.checkpoint_ids() {
            if cp.starts_with(TEMPLATE_PREFIX) && !keep.contains(&cp) {
                tracing::info!(checkpoint = %cp, "sweep: removing a template checkpoint nothing records");
                let _ = self.engine.delete_checkpoint(&cp).await;
            }
        }
        let known = self.store.call(|s| s.layer_ids()).await.unwrap_or_default();
        if !known.is_empty() || self.store.call(|s| s.layer_count()).await.ok() == Some(0) {
            for l in self.engine.layer_ids() {
                if l.starts_with(TEMPLATE_PREFIX) && !known.contains(&l) {
                    tracing::info!(layer = %l, "sweep: removing a template layer nothing records");
                    let _ = self.engine.delete_layer(&l).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_basis_and_shape() {
        let s = Shape {
            cpus: 1,
            memory_mb: 512,
        };
        let k = key_of("initramfs=a", s);
        assert_eq!(k, key_of("initramfs=a", s));
        assert_eq!(k.len(), 16);
        assert_ne!(k, key_of("initramfs=b", s));
        assert_ne!(
            k,
            key_of(
                "initramfs=a",
                Shape {
                    cpus: 2,
                    memory_mb: 512
                }
            )
        );
    }
}
