//! The service: the only place where the store and the engine meet.
//!
//! Handlers call one method here per request; each method reads top to
//! bottom: check input, consult the store, drive the engine, record the result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;
use time::format_description::well_known::Rfc3339;

use crate::config::Ipv4Subnet;
use crate::egress::EgressPolicy;
use crate::engine::agent_client::{AgentClient, AgentError, ErrorCode};
use crate::engine::{Engine, EngineError, SandboxSpec, VmRuntime, VmState};
use crate::model::{CreateSandboxRequest, Health, PatchSandboxRequest, Sandbox, SecretInfo};
use crate::secrets::{validate_secret_name, SecretCipher, SecretsError};
use crate::store::{NewSandbox, SandboxPatch, SandboxRecord, SandboxStatus};
use crate::store::{Store, StoreError, User};

pub mod exec;
pub mod exec_session;
pub mod files;
mod idle;
mod images;
mod inspect;
mod ports;
mod proxy;
mod publish;
mod pull;
pub mod routes;
pub mod sessions;
pub mod share;
mod snapshots;
mod templates;
mod thermal;
pub mod upstream;
mod usage;
mod volumes;

pub use idle::MAX_SAVE_FAILURES;
pub use images::{WorkDir, MAX_IMPORT_BYTES};
pub use proxy::{hold_until_sent, Routed};
pub use templates::{templates_enabled, Shape, TEMPLATE_PREFIX};
pub use thermal::{thermal_of, RESTORE_RETRY_AFTER_SECS};
pub use usage::{InFlight, ThermalConfig};
pub use volumes::parse_volume_arg;

/// How often a long-lived connection (shell, exec WebSocket) re-checks its
/// API key: `bhatti user rotate-key` works on the database directly.
pub const KEY_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Memory of a sandbox whose create names none, in MB (at most the user's cap).
pub const DEFAULT_MEMORY_MB: i64 = 512;
/// How long a create with no free address but the one a template build
/// holds waits for that build to let it go (a build boots one guest).
const HOLD_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Smallest guest that boots the Debian cloud kernel with room to work.
pub const MIN_MEMORY_MB: i64 = 128;

/// Why a service call failed: the one error type of the service, whatever
/// layer below it failed. Callers decide by [`ServiceError::kind`] (mapped
/// to HTTP once, in `api::error`); the message is the error's `Display`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input: the message names the field and why.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// No or an unknown API key.
    #[error("invalid API key")]
    Unauthorized,
    /// The sandbox exists but cannot serve the request now.
    #[error("{0}")]
    Unavailable(String),
    /// The sandbox's status does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// The request carries more than a limit allows (the message names it).
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The guest agent refused (its message as it is) or could not be reached.
    #[error("{}", agent_message(.0))]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// A request relayed into a sandbox port failed.
    #[error(transparent)]
    Proxy(#[from] upstream::ProxyError),
    /// Too many cold restores run at once; the client should retry later.
    #[error("{message}")]
    Busy {
        retry_after_secs: u64,
        message: String,
    },
}

/// What kind of failure a [`ServiceError`] is: what a caller tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input (also a guest path that is not a directory, or is one).
    Invalid,
    /// No or an unknown API key.
    Unauthorized,
    /// The guest's permissions forbid it.
    Forbidden,
    NotFound,
    /// In use, already exists, or a status that does not allow it.
    Conflict,
    /// Over a size limit.
    TooLarge,
    /// Over a user's quota.
    LimitExceeded,
    /// The guest's disk is full.
    NoSpace,
    /// Cannot serve now (not running, agent unreachable, VM failures).
    Unavailable,
    /// Too many cold restores at once: retry after this many seconds.
    Busy {
        retry_after_secs: u64,
    },
    /// The app in a sandbox gave no usable answer (the proxies' 502).
    BadGateway,
    /// A fault on our side.
    Internal,
}

impl ServiceError {
    /// The kind of this failure, wherever it came from: the one place where
    /// store, engine and agent errors are classified.
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            ServiceError::Invalid(_) => K::Invalid,
            ServiceError::NotFound(_) => K::NotFound,
            ServiceError::Unauthorized => K::Unauthorized,
            ServiceError::Unavailable(_) => K::Unavailable,
            ServiceError::Conflict(_) => K::Conflict,
            ServiceError::TooLarge(_) => K::TooLarge,
            ServiceError::Busy {
                retry_after_secs, ..
            } => K::Busy {
                retry_after_secs: *retry_after_secs,
            },
            ServiceError::Secrets(_) => K::Internal,
            ServiceError::Proxy(e) => e.kind(),
            ServiceError::Store(e) => match e {
                StoreError::NotFound(_) => K::NotFound,
                StoreError::Conflict(_) => K::Conflict,
                StoreError::LimitExceeded(_) => K::LimitExceeded,
                StoreError::Invalid(_) => K::Invalid,
                StoreError::SubnetFull(_) => K::Unavailable,
                _ => K::Internal,
            },
            ServiceError::Engine(e) => match e {
                EngineError::NotFound(_) => K::NotFound,
                EngineError::Busy(_) | EngineError::AlreadyExists(_) => K::Conflict,
                EngineError::InvalidSpec(_) => K::Invalid,
                EngineError::Internal(_)
                | EngineError::Storage(_)
                | EngineError::FilesystemNotGrown(_) => K::Internal,
                _ => K::Unavailable,
            },
            ServiceError::Agent(AgentError::Remote { code, .. }) => kind_of_code(*code),
            ServiceError::Agent(AgentError::BodyEnded(_)) => K::Invalid,
            ServiceError::Agent(_) => K::Unavailable,
        }
    }
}

/// The kind of each agent error code: the one place they are classified.
fn kind_of_code(code: ErrorCode) -> ErrorKind {
    use ErrorKind as K;
    match code {
        ErrorCode::NotFound => K::NotFound,
        ErrorCode::Invalid | ErrorCode::NotADirectory | ErrorCode::IsADirectory => K::Invalid,
        ErrorCode::PermissionDenied => K::Forbidden,
        ErrorCode::TooLarge => K::TooLarge,
        ErrorCode::NoSpace => K::NoSpace,
        ErrorCode::Busy | ErrorCode::Exists => K::Conflict,
        ErrorCode::Internal => K::Internal,
    }
}

/// An agent's refusal as it said it; anything else says the agent is unavailable.
fn agent_message(e: &AgentError) -> String {
    match e {
        AgentError::Remote { message, .. } => message.clone(),
        e @ AgentError::BodyEnded(_) => e.to_string(),
        other => format!("sandbox agent unavailable: {other}"),
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;

/// Runs `work` on its own task and waits for it: dropping the returned
/// future does not cancel the work (a multi-step change such as a create
/// must finish or roll back, whoever is still waiting).
///
/// Errors: those of `work`; `Unavailable` if its task panicked.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| ServiceError::Unavailable(format!("the operation failed: {e}")))?
}

/// A lock held across awaits, one per key of a map.
type AsyncLock = Arc<tokio::sync::Mutex<()>>;

/// What [`Service::create_sandbox`] did.
#[derive(Debug, Clone)]
pub struct Created {
    pub sandbox: Sandbox,
    /// False when a sandbox of that name already existed and is returned.
    pub created: bool,
}

/// Everything the API needs, behind one handle.
pub struct Service {
    store: Store,
    engine: Arc<dyn Engine>,
    cipher: Arc<SecretCipher>,
    subnet: Ipv4Subnet,
    started: Instant,
    /// Route cache and upstream connections of the proxies.
    proxy: Arc<upstream::ProxyState>,
    /// Published URLs are `<url_scheme>://<alias>.<domain>`; `domain` may
    /// carry a `:port` (see `DaemonConfig::public_url_host_suffix`).
    domain: String,
    url_scheme: String,
    /// One lock per sandbox for stop, start, pause, wake-up and destroy.
    thermal_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per snapshot id: resumes read, a delete writes.
    snapshot_locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// One lock per (user, name) being created: concurrent identical creates
    /// make one sandbox.
    create_locks: Mutex<HashMap<(i64, String), AsyncLock>>,
    /// Piped exec sessions that survive their client (exec WebSocket).
    exec_sessions: exec_session::ExecSessions,
    /// Idle transitions: settings, use of each sandbox, restore permits.
    thermal: thermal::Thermal,
    /// Open web terminals and their connection budget.
    shares: share::ShareHub,
    /// Egress policy of a sandbox whose create names none.
    default_egress: EgressPolicy,
    /// Sandboxes of one user reach each other.
    same_user_peers: bool,
    /// Guests have a route out at all (config `egress`); policies only
    /// narrow it.
    uplink: bool,
    /// One lock per volume: a grow and a create that attaches it never overlap.
    volume_locks: Mutex<HashMap<String, AsyncLock>>,
    /// Image pulls running or recently finished.
    tasks: pull::Tasks,
    /// Pre-booted templates new sandboxes are restored from.
    templates: templates::Templates,
}

impl Service {
    pub fn new(
        store: Store,
        engine: Arc<dyn Engine>,
        cipher: Arc<SecretCipher>,
        subnet: Ipv4Subnet,
    ) -> Self {
        Service {
            store,
            engine,
            cipher,
            subnet,
            started: Instant::now(),
            proxy: Arc::new(upstream::ProxyState::default()),
            domain: "localhost".into(),
            url_scheme: "https".into(),
            thermal_locks: Mutex::new(HashMap::new()),
            snapshot_locks: Mutex::new(HashMap::new()),
            create_locks: Mutex::new(HashMap::new()),
            exec_sessions: Default::default(),
            thermal: thermal::Thermal::new(ThermalConfig::disabled()),
            shares: share::ShareHub::default(),
            default_egress: EgressPolicy::default(),
            same_user_peers: false,
            uplink: true,
            volume_locks: Mutex::new(HashMap::new()),
            tasks: pull::Tasks::default(),
            templates: templates::Templates::new(
                false,
                templates::Shape {
                    cpus: 1,
                    memory_mb: DEFAULT_MEMORY_MB as u32,
                },
            ),
        }
    }

    /// Egress of sandboxes whose create names none, and whether one user's
    /// sandboxes reach each other (config `egress_*`, `same_user_peers`).
    pub fn with_egress(mut self, default: EgressPolicy, same_user_peers: bool) -> Self {
        self.default_egress = default;
        self.same_user_peers = same_user_peers;
        self
    }

    /// Whether guests have a route out at all (config `egress`; default
    /// true). Shown by inspect: without one, no policy reaches anything.
    pub fn with_uplink(mut self, uplink: bool) -> Self {
        self.uplink = uplink;
        self
    }

    /// The egress policy of a create request: each field it names, else
    /// the same field of `base` — the source's policy for a fork or a
    /// resumed snapshot (a copy keeps its source's policy), the daemon's
    /// default otherwise.
    ///
    /// Errors: `Invalid` naming the field (a bad entry, or an allowance
    /// that overlaps the sandbox subnet).
    fn egress_of(
        &self,
        req: &CreateSandboxRequest,
        base: Option<&EgressPolicy>,
    ) -> Result<EgressPolicy> {
        let d = base.unwrap_or(&self.default_egress);
        let hosts = req
            .allow_hosts
            .clone()
            .unwrap_or_else(|| d.allow_hosts.clone());
        let cidrs = req
            .allow_cidrs
            .clone()
            .unwrap_or_else(|| d.allow_cidrs.iter().map(|n| n.to_string()).collect());
        let policy = EgressPolicy::parse(req.egress.unwrap_or(d.mode), &hosts, &cidrs)
            .and_then(|p| p.check_subnet(self.subnet.net()).map(|()| p))
            .map_err(|e| ServiceError::Invalid(e.to_string()))?;
        Ok(policy)
    }

    /// Published URLs become `<scheme>://<alias>.<domain>` (`domain` may end in `:port`).
    pub fn with_public_urls(mut self, scheme: &str, domain: &str) -> Self {
        self.url_scheme = scheme.to_string();
        self.domain = domain.to_string();
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The user holding this API key.
    pub async fn authenticate(&self, key: &str) -> Result<User> {
        let key = key.to_string();
        match self.store.call(move |s| s.authenticate(&key)).await? {
            Some(user) => Ok(user),
            None => Err(ServiceError::Unauthorized),
        }
    }

    /// Completes once `key` no longer authenticates (rotated, or its user
    /// deleted), checked every [`KEY_RECHECK`]: open WebSockets end then. A
    /// store that cannot be read does not count as a revocation.
    pub async fn key_revoked(&self, key: &str) {
        loop {
            tokio::time::sleep(KEY_RECHECK).await;
            if matches!(
                self.authenticate(key).await,
                Err(ServiceError::Unauthorized)
            ) {
                return;
            }
        }
    }

    pub async fn health(&self) -> Result<Health> {
        let n = self.store.call(|s| s.count_sandboxes(None)).await?;
        Ok(Health {
            status: "ok".into(),
            sandboxes: n as u64,
            uptime: format_uptime(self.started.elapsed().as_secs()),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// Validates, records, boots and returns a new sandbox; `created` is
    /// false when the caller already has a sandbox of that name, which is
    /// returned as it is (a create retried after a timeout must not fail).
    /// Concurrent creates of one name by one user wait for each other, so
    /// they make one sandbox. A VM that fails to boot leaves no row, no IP
    /// and nothing on the host behind.
    ///
    /// The create runs on its own task: a caller that goes away (a client
    /// that disconnects) does not cut it short, so it never leaves a
    /// sandbox `creating`, counted against the quota and holding volumes.
    ///
    /// Errors: `Invalid` for bad fields and for cpus/memory over the user's
    /// per-sandbox caps (named); the store's `LimitExceeded` over the user's
    /// sandbox quota; engine failures.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        user: &User,
        req: CreateSandboxRequest,
    ) -> Result<Created> {
        let (svc, user) = (self.clone(), user.clone());
        detached(async move { svc.create_with(&user, req, None).await }).await
    }

    /// [`create_sandbox`](Self::create_sandbox), or, with `snapshot`, the
    /// new sandbox restored from that snapshot of the caller's.
    async fn create_with(
        &self,
        user: &User,
        req: CreateSandboxRequest,
        snapshot: Option<&str>,
    ) -> Result<Created> {
        // Bad egress fields are a 400 before anything is made (a fork's checkpoint included).
        self.egress_of(&req, None)?;
        let name = match req.name.clone() {
            Some(n) => n,
            None => generate_name(),
        };
        let lock = {
            let mut locks = self
                .create_locks
                .lock()
                .map_err(|_| ServiceError::Unavailable("create locks poisoned".into()))?;
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry((user.id, name.clone())).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        match self.find(user, &name).await {
            // (`find` also matches ids: a new name that looks like another
            // sandbox's id is still a new name.)
            Ok(rec) if rec.name == name => {
                // A retry must not pass for a create with another policy.
                if names_egress(&req) && self.egress_of(&req, Some(&rec.egress))? != rec.egress {
                    return Err(ServiceError::Conflict(format!(
                        "sandbox {name} already exists with another egress policy ({}); egress cannot be changed after create",
                        describe_egress(&rec.egress)
                    )));
                }
                return Ok(Created {
                    sandbox: view(&rec),
                    created: false,
                });
            }
            Ok(_) | Err(ServiceError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        // Everything a copy can be refused for is checked before its
        // source is checkpointed: a fork's checkpoint holds the source's
        // whole RAM in ramfs until it is removed.
        if req.from.is_some() || snapshot.is_some() {
            self.check_copy_request(user, &name, &req, snapshot).await?;
        }
        let source = match (req.from.as_deref(), snapshot) {
            (Some(from), None) => Some(self.fork_source(user, from).await?),
            (None, Some(snap)) => Some(self.snapshot_source(user, snap).await?),
            _ => None,
        };
        // Removes a fork's checkpoint on every way out, a dropped request included.
        let temporary = source
            .as_ref()
            .filter(|s| s.temporary)
            .map(|s| snapshots::TempCheckpoint::new(self.engine.clone(), s.checkpoint.clone()));
        let result = self.create_new(user, name, req, source).await;
        if let Some(cp) = temporary {
            cp.remove().await;
        }
        let sandbox = result?;
        Ok(Created {
            sandbox,
            created: true,
        })
    }

    async fn create_new(
        &self,
        user: &User,
        name: String,
        req: CreateSandboxRequest,
        source: Option<snapshots::RestoreSource>,
    ) -> Result<Sandbox> {
        let egress = self.egress_of(&req, source.as_ref().and_then(|s| s.egress.as_ref()))?;
        let cold_boot = req.cold_boot.unwrap_or(false);
        let (cpus, memory_mb) = match &source {
            // A restored VM has its source's machine: QEMU needs the same size.
            Some(src) => src.machine(req.cpus, req.memory_mb)?,
            None => (
                capped("cpus", req.cpus.unwrap_or(1), 1, user.max_cpus, "vCPUs")?,
                capped(
                    "memory_mb",
                    req.memory_mb
                        .unwrap_or_else(|| DEFAULT_MEMORY_MB.min(i64::from(user.max_memory_mb))),
                    MIN_MEMORY_MB,
                    user.max_memory_mb,
                    "MB",
                )?,
            ),
        };
        let env = req.env.unwrap_or_default();
        for (key, value) in &env {
            // Same rules as secret names, but said about `env`.
            validate_secret_name(key).map_err(|e| {
                ServiceError::Invalid(match e {
                    SecretsError::InvalidName { name, reason } => {
                        format!("invalid field `env`: variable name {name:?}: {reason}")
                    }
                    other => format!("invalid field `env`: {other}"),
                })
            })?;
            // Every exec in the sandbox carries these: one NUL would fail them all.
            exec::no_nul("env", value)?;
        }
        let secret_names = req.secrets.unwrap_or_default();
        let mut guest_env = env.clone();
        if !secret_names.is_empty() {
            let (uid, names) = (user.id, secret_names.clone());
            let records = self
                .store
                .call(move |s| s.get_secrets(uid, &names))
                .await
                .map_err(|e| match e {
                    StoreError::NotFound(m) => {
                        ServiceError::Invalid(format!("invalid field `secrets`: {m}"))
                    }
                    other => other.into(),
                })?;
            for r in records {
                guest_env.insert(
                    r.name.clone(),
                    self.cipher.decrypt(&r.ciphertext)?.to_string(),
                );
            }
        }

        let image = match req.image.as_deref() {
            None => None,
            Some(key) => Some(self.image_for_create(user, key).await?),
        };
        let mut new = NewSandbox::new(user.id, name);
        new.cpus = cpus;
        new.memory_mb = memory_mb;
        new.keep_hot = req.keep_hot.unwrap_or(false);
        new.env = env;
        new.secrets = secret_names;
        new.init = req.init.filter(|s| !s.trim().is_empty());
        new.labels = req.labels.unwrap_or_default();
        new.egress = egress;
        let subnet = self.subnet;
        // A template build's VM holds its address for a few seconds: a
        // create that finds no other one free waits for the build (at most
        // HOLD_WAIT) instead of failing because of a template.
        let deadline = Instant::now() + HOLD_WAIT;
        let rec = loop {
            let (new, hold) = (new.clone(), self.templates.ip_hold());
            let made = self
                .store
                .call(move |s| {
                    // Not the address a template build's VM holds; and no build
                    // picks one while this create takes its own.
                    let held = hold.lock().unwrap_or_else(|p| p.into_inner());
                    let mut new = new;
                    new.avoid_ips = held.iter().copied().collect();
                    match s.create_sandbox(&new, &subnet) {
                        Err(StoreError::SubnetFull(_)) if held.is_some() => Ok(None),
                        other => other.map(Some),
                    }
                })
                .await?;
            match made {
                Some(rec) => break rec,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                None => return Err(StoreError::SubnetFull(subnet.to_string()).into()),
            }
        };
        if let Some(img) = &image {
            let (sid, iid) = (rec.id.clone(), img.clone());
            if let Err(e) = self
                .store
                .call(move |s| s.set_sandbox_image(&sid, &iid))
                .await
            {
                let id = rec.id.clone();
                let _ = self.store.call(move |s| s.delete_sandbox(&id)).await;
                return Err(e.into());
            }
        }
        let (volumes, _volume_locks) = match self
            .attach_for_create(user, &rec.id, req.volumes.as_deref().unwrap_or_default())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                let id = rec.id.clone();
                if let Err(del) = self.store.call(move |s| s.delete_sandbox(&id)).await {
                    tracing::error!(sandbox = %rec.id, error = %del, "could not remove the row of a failed sandbox");
                }
                return Err(e);
            }
        };

        let spec = SandboxSpec {
            id: rec.id.clone(),
            name: rec.name.clone(),
            cpus: rec.cpus,
            memory_mb: rec.memory_mb,
            ip: rec.ip,
            token: rec.token.clone(),
            env: guest_env,
            init: rec.init.clone(),
            egress: rec.egress.clone(),
            peer_group: self.same_user_peers.then(|| format!("user-{}", user.id)),
            volumes,
            image,
            template: false,
        };
        // The default image without volumes (devices the template lacks)
        // starts from a pre-booted template of its shape when one is ready.
        let shape = templates::Shape { cpus, memory_mb };
        let template =
            if source.is_none() && !cold_boot && spec.image.is_none() && spec.volumes.is_empty() {
                self.template_source(shape).await
            } else {
                templates::TemplatePick::Off
            };
        let from_template = matches!(template, templates::TemplatePick::Ready(..));
        let spec = SandboxSpec {
            // A copy carries its source's processes: no init script runs.
            init: if source.is_some() { None } else { spec.init },
            ..spec
        };
        // A template build this create asks for: queued when the create is
        // over (dropped on every return), not alongside its boot.
        let mut _build_after = None;
        let (booted, born) = match (&source, template) {
            (Some(src), _) => (
                self.restore_new_identity(src, &spec).await,
                if src.temporary { "fork" } else { "snapshot" },
            ),
            (None, templates::TemplatePick::Ready(ready)) => {
                let (src, t) = *ready;
                let restored = self.restore_new_identity(&src, &spec).await;
                // Lets go of the template: a drop may go ahead.
                drop(src);
                match restored {
                    Ok(()) => {
                        self.template_used(&t).await;
                        (Ok(()), "template")
                    }
                    Err(e) => {
                        // Never a failed create: the template goes, this
                        // sandbox boots, and then the template is built again
                        // (not alongside the boot: two boots on the same cores).
                        tracing::warn!(sandbox = %rec.id, template = %t.key, error = %e, "restore from the template failed; booting instead");
                        let sid = rec.id.clone();
                        let _ = self.store.call(move |s| s.clear_sandbox_layer(&sid)).await;
                        _build_after = Some(self.template_failed(&t, shape).await);
                        (self.boot(&spec).await, "boot")
                    }
                }
            }
            (None, templates::TemplatePick::Missing(build)) => {
                _build_after = Some(build);
                (self.boot(&spec).await, "boot")
            }
            (None, templates::TemplatePick::Off) => (self.boot(&spec).await, "boot"),
        };
        if let Err(e) = booted {
            tracing::warn!(sandbox = %rec.id, error = %e, "create failed");
            let id = rec.id.clone();
            if let Err(del) = self.store.call(move |s| s.delete_sandbox(&id)).await {
                tracing::error!(sandbox = %rec.id, error = %del, "could not remove the row of a failed sandbox");
            }
            if source.is_some() || from_template {
                // Its layer may have had no other user left.
                self.collect_layers().await;
            }
            return Err(e);
        }
        let id = rec.id.clone();
        self.store
            .call(move |s| {
                s.set_sandbox_born(&id, born)?;
                s.set_sandbox_status(&id, SandboxStatus::Running)
            })
            .await?;
        tracing::info!(sandbox = %rec.id, name = %rec.name, ip = %rec.ip, born, "sandbox created");
        Ok(view(&SandboxRecord {
            status: SandboxStatus::Running,
            born: Some(born.to_string()),
            ..rec
        }))
    }

    /// Boots `spec`'s VM from its kernel.
    async fn boot(&self, spec: &SandboxSpec) -> Result<()> {
        self.engine.create(spec).await?;
        Ok(())
    }

    /// The caller's sandboxes that carry every `key=value` of `labels`
    /// (all of them for an empty filter).
    ///
    /// Errors: `Invalid` for a filter pair that breaks the label rules.
    pub async fn list_sandboxes(
        &self,
        user: &User,
        labels: &[(String, String)],
    ) -> Result<Vec<Sandbox>> {
        for (k, v) in labels {
            crate::store::labels::validate_pair(k, v)
                .map_err(|e| ServiceError::Invalid(format!("invalid label filter: {e}")))?;
        }
        let uid = user.id;
        Ok(self
            .store
            .call(move |s| s.list_sandboxes(uid))
            .await?
            .iter()
            .filter(|r| crate::store::labels::matches(&r.labels, labels))
            .map(view)
            .collect())
    }

    pub async fn get_sandbox(&self, user: &User, id: &str) -> Result<Sandbox> {
        Ok(view(&self.find(user, id).await?))
    }

    pub async fn patch_sandbox(
        &self,
        user: &User,
        id: &str,
        req: PatchSandboxRequest,
    ) -> Result<Sandbox> {
        let (uid, id) = (user.id, id.to_string());
        let wake = req.keep_hot == Some(true);
        let patch = SandboxPatch {
            name: req.name,
            keep_hot: req.keep_hot,
            labels_set: req.labels.unwrap_or_default(),
            labels_delete: req.labels_delete.unwrap_or_default(),
        };
        let rec = self
            .store
            .call(move |s| s.update_sandbox(uid, &id, &patch))
            .await?;
        // An edit is use: the idle clocks start over.
        drop(self.enter(&rec).await);
        if wake {
            // keep_hot means hot now, not after the next request.
            return Ok(view(&self.wake(rec, thermal::WakeMode::Wait).await?));
        }
        Ok(view(&rec))
    }

    /// Stops the VM, removes everything it had, then forgets the sandbox.
    pub async fn destroy_sandbox(&self, user: &User, id: &str) -> Result<()> {
        let rec = self.find(user, id).await?;
        // Not in the middle of a stop or start.
        let _lock = self.thermal_lock(&rec.id).lock_owned().await;
        // What a volume was last sent must reach its disk before the VM goes
        // (a warm or saved VM was synced when it was frozen).
        let current = self.reload(&rec.id).await.unwrap_or_else(|_| rec.clone());
        self.sync_volumes(&current).await;
        let sid = rec.id.clone();
        self.store
            .call(move |s| s.set_sandbox_status(&sid, SandboxStatus::Destroying))
            .await?;
        // Its URLs stop working now, not when a cache entry expires.
        self.proxy.forget_sandbox(&rec.id);
        match self.engine.destroy(&rec.id).await {
            Ok(()) | Err(EngineError::NotFound(_)) => {}
            Err(e) => {
                // Keep the row so that the next start's recovery finishes the job.
                tracing::error!(sandbox = %rec.id, error = %e, "destroy failed");
                return Err(e.into());
            }
        }
        let sid = rec.id.clone();
        self.store.call(move |s| s.delete_sandbox(&sid)).await?;
        self.proxy.forget_sandbox(&rec.id);
        self.drop_thermal_lock(&rec.id);
        // Layers only this sandbox's disk used go with it.
        self.collect_layers().await;
        tracing::info!(sandbox = %rec.id, name = %rec.name, "sandbox destroyed");
        Ok(())
    }

    /// A client of the sandbox's agent; a warm, cold or stopped sandbox is
    /// woken first. The request counts as in flight (the sandbox stays hot)
    /// while the client or any connection it opened lives.
    pub(in crate::service) async fn agent(&self, user: &User, id: &str) -> Result<AgentClient> {
        let rec = self.find(user, id).await?;
        let hold = self.enter(&rec).await;
        // The manager may have cooled it between the lookup and `enter`.
        let rec = self.reload(&rec.id).await?;
        let rec = self.wake(rec, thermal::WakeMode::Wait).await?;
        self.require_running(&rec)?;
        let sid = rec.id.clone();
        // Best effort: activity bookkeeping must never fail a request.
        let _ = self.store.call(move |s| s.touch_sandbox(&sid)).await;
        Ok(self.tracked_agent(&rec, hold))
    }

    /// The sandbox can serve requests now (after [`wake`](Self::wake)).
    fn require_running(&self, rec: &SandboxRecord) -> Result<()> {
        match rec.status {
            SandboxStatus::Running => {}
            SandboxStatus::Creating => {
                return Err(ServiceError::Unavailable(format!(
                    "sandbox {} is still starting",
                    rec.name
                )))
            }
            other => {
                return Err(ServiceError::Unavailable(format!(
                    "sandbox {} is not running (status {other})",
                    rec.name
                )))
            }
        }
        Ok(())
    }

    fn agent_of(&self, rec: &SandboxRecord) -> AgentClient {
        self.engine.agent(
            &rec.id,
            &VmRuntime {
                ip: rec.ip,
                token: rec.token.clone(),
            },
        )
    }

    pub async fn set_secret(&self, user: &User, name: &str, value: &str) -> Result<SecretInfo> {
        validate_secret_name(name)
            .map_err(|e| ServiceError::Invalid(format!("invalid field `name`: {e}")))?;
        crate::secrets::validate_secret_value(value)
            .map_err(|e| ServiceError::Invalid(format!("invalid field `value`: {e}")))?;
        let ct = self.cipher.encrypt(value)?;
        let (uid, name) = (user.id, name.to_string());
        let meta = self
            .store
            .call(move |s| s.put_secret(uid, &name, &ct))
            .await?;
        Ok(SecretInfo {
            name: meta.name,
            created_at: rfc3339(meta.created_at),
            updated_at: rfc3339(meta.updated_at),
        })
    }

    pub async fn list_secrets(&self, user: &User) -> Result<Vec<SecretInfo>> {
        let uid = user.id;
        let list = self.store.call(move |s| s.list_secrets(uid)).await?;
        Ok(list
            .into_iter()
            .map(|m| SecretInfo {
                name: m.name,
                created_at: rfc3339(m.created_at),
                updated_at: rfc3339(m.updated_at),
            })
            .collect())
    }

    pub async fn delete_secret(&self, user: &User, name: &str) -> Result<()> {
        let (uid, name) = (user.id, name.to_string());
        Ok(self
            .store
            .call(move |s| s.delete_secret(uid, &name))
            .await?)
    }

    /// After a daemon start: re-adopts live VMs, marks dead ones, finishes
    /// interrupted destroys and sweeps host leftovers of sandboxes the store
    /// no longer knows.
    pub async fn recover(&self) -> Result<()> {
        let all = self.store.call(|s| s.list_all_sandboxes()).await?;
        let mut keep = Vec::new();
        for rec in all {
            let rt = VmRuntime {
                ip: rec.ip,
                token: rec.token.clone(),
            };
            let new_status = match rec.status {
                SandboxStatus::Destroying => {
                    let _ = self.engine.destroy(&rec.id).await;
                    let sid = rec.id.clone();
                    self.store.call(move |s| s.delete_sandbox(&sid)).await?;
                    tracing::info!(sandbox = %rec.id, "finished an interrupted destroy");
                    continue;
                }
                // A create (or copy) the crash cut short: its VM, if alive,
                // never got its identity or answered; its request failed.
                SandboxStatus::Creating => {
                    if let Err(e) = self.engine.destroy(&rec.id).await {
                        tracing::warn!(sandbox = %rec.id, error = %e, "cannot remove a half-made sandbox's VM");
                    }
                    let sid = rec.id.clone();
                    self.store.call(move |s| s.delete_sandbox(&sid)).await?;
                    tracing::info!(sandbox = %rec.id, name = %rec.name, "removed a sandbox whose create was interrupted");
                    continue;
                }
                _ => match self.engine.adopt(&rec.id, &rt).await {
                    // A paused VM is warm, whatever the store said (a crash
                    // may have come between the pause and its record).
                    VmState::Running => match self.engine.paused(&rec.id).await {
                        Ok(true) => SandboxStatus::Warm,
                        Ok(false) if rec.status == SandboxStatus::Warm => {
                            // Resumed by a wake the crash cut short: set its clock.
                            if let Err(e) = self.engine.resume(&rec.id, &rt).await {
                                tracing::warn!(sandbox = %rec.id, error = %e, "cannot finish an interrupted wake");
                            }
                            SandboxStatus::Running
                        }
                        _ => SandboxStatus::Running,
                    },
                    // Saved to disk (also when a crash interrupted the stop).
                    VmState::Stopped if rec.status == SandboxStatus::Cold => SandboxStatus::Cold,
                    VmState::Stopped => SandboxStatus::Stopped,
                    VmState::Dead(reason) => {
                        tracing::warn!(sandbox = %rec.id, name = %rec.name, %reason, "VM is gone; marking the sandbox as error");
                        SandboxStatus::Error
                    }
                },
            };
            if new_status != rec.status {
                let sid = rec.id.clone();
                self.store
                    .call(move |s| s.set_sandbox_status(&sid, new_status))
                    .await?;
            }
            keep.push(rec.id);
        }
        self.engine.sweep(&keep).await?;
        self.sweep_import_dirs();
        // Snapshots and layers as the files say; layers only a swept fork
        // (or nothing) held go.
        if let Err(e) = self.reconcile_layers().await {
            // The store's layer records stay as they were: valid chains,
            // maybe some layer never collected.
            tracing::warn!(error = %e, "cannot reconcile snapshots and layers with the files");
        }
        Ok(())
    }

    /// Marks running sandboxes whose VM has died as `error`, so that lists
    /// and requests tell the truth instead of timing out on a dead guest.
    pub async fn watch_vms(self: Arc<Self>, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let all = match self.store.call(|s| s.list_all_sandboxes()).await {
                Ok(all) => all,
                Err(e) => {
                    tracing::warn!(error = %e, "VM watch: cannot list sandboxes");
                    continue;
                }
            };
            for rec in all
                .into_iter()
                .filter(|r| matches!(r.status, SandboxStatus::Running | SandboxStatus::Warm))
            {
                if let VmState::Dead(reason) = self.engine.state(&rec.id) {
                    tracing::warn!(sandbox = %rec.id, name = %rec.name, %reason, "VM died; marking the sandbox as error");
                    self.proxy.forget_sandbox(&rec.id);
                    let sid = rec.id.clone();
                    // Only a sandbox still marked running: a concurrent destroy wins.
                    let from = rec.status;
                    let _ = self
                        .store
                        .call(move |s| s.set_sandbox_status_if(&sid, from, SandboxStatus::Error))
                        .await;
                }
            }
        }
    }

    async fn find(&self, user: &User, id: &str) -> Result<SandboxRecord> {
        let (uid, key) = (user.id, id.to_string());
        self.store
            .call(move |s| s.find_sandbox(uid, &key))
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => ServiceError::NotFound(format!("no sandbox named {id}")),
                other => other.into(),
            })
    }
}

/// A sandbox as the API shows it.
/// Whether a create request names any egress field.
fn names_egress(req: &CreateSandboxRequest) -> bool {
    req.egress.is_some() || req.allow_hosts.is_some() || req.allow_cidrs.is_some()
}

/// A policy in a few words, for messages: `deny, allow_hosts [a.com]`.
fn describe_egress(p: &EgressPolicy) -> String {
    let mut s = p.mode.as_str().to_string();
    if !p.allow_hosts.is_empty() {
        s.push_str(&format!(", allow_hosts [{}]", p.allow_hosts.join(", ")));
    }
    if !p.allow_cidrs.is_empty() {
        let c: Vec<String> = p.allow_cidrs.iter().map(|n| n.to_string()).collect();
        s.push_str(&format!(", allow_cidrs [{}]", c.join(", ")));
    }
    s
}

pub fn view(r: &SandboxRecord) -> Sandbox {
    Sandbox {
        id: r.id.clone(),
        name: r.name.clone(),
        status: r.status.as_str().to_string(),
        ip: r.ip.to_string(),
        cpus: r.cpus,
        memory_mb: r.memory_mb,
        keep_hot: r.keep_hot,
        labels: r.labels.clone(),
        thermal: thermal_of(r.status).map(str::to_string),
        created_at: rfc3339(r.created_at),
        egress: r.egress.clone(),
        born: r.born.clone(),
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// `positive`, and at most the user's per-sandbox `cap` (named in the error).
fn capped(field: &str, v: i64, min: i64, cap: u32, unit: &str) -> Result<u32> {
    let v = positive(field, v, min)?;
    if v > cap {
        return Err(ServiceError::Invalid(format!(
            "invalid field `{field}`: {v} is over your limit of {cap} {unit} per sandbox"
        )));
    }
    Ok(v)
}

fn positive(field: &str, v: i64, min: i64) -> Result<u32> {
    if v < min {
        return Err(ServiceError::Invalid(format!(
            "invalid field `{field}`: must be at least {min}, got {v}"
        )));
    }
    u32::try_from(v)
        .map_err(|_| ServiceError::Invalid(format!("invalid field `{field}`: {v} is too large")))
}

/// `sandbox-` and six random lowercase letters or digits.
fn generate_name() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..6)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sandbox-{suffix}")
}

/// "2h15m30s", as `/health` reports it.
pub fn format_uptime(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_are_kinds_not_message_text() {
        use ErrorCode as C;
        use ErrorKind as K;
        for (code, kind) in [
            (C::NotFound, K::NotFound),
            (C::Invalid, K::Invalid),
            (C::NotADirectory, K::Invalid),
            (C::IsADirectory, K::Invalid),
            (C::PermissionDenied, K::Forbidden),
            (C::TooLarge, K::TooLarge),
            (C::NoSpace, K::NoSpace),
            (C::Busy, K::Conflict),
            (C::Exists, K::Conflict),
            (C::Internal, K::Internal),
        ] {
            // The text says "not found", the code decides.
            let e = ServiceError::from(AgentError::remote(code, "/srv/not found/x"));
            assert_eq!(e.kind(), kind, "{code}");
            assert_eq!(e.to_string(), "/srv/not found/x");
        }
        let e = ServiceError::from(AgentError::Protocol("x".into()));
        assert_eq!(e.kind(), K::Unavailable);
        assert!(
            e.to_string().starts_with("sandbox agent unavailable: "),
            "{e}"
        );
    }

    #[test]
    fn engine_errors_callers_tell_apart() {
        use ErrorKind as K;
        for (e, kind) in [
            (EngineError::Busy("b".into()), K::Conflict),
            (EngineError::AlreadyExists("a".into()), K::Conflict),
            (EngineError::InvalidSpec("i".into()), K::Invalid),
            (EngineError::NotFound("n".into()), K::NotFound),
            (EngineError::Internal("x".into()), K::Internal),
            (EngineError::State("s".into()), K::Unavailable),
            (EngineError::Network("n".into()), K::Unavailable),
        ] {
            assert_eq!(ServiceError::from(e).kind(), kind);
        }
    }

    #[test]
    fn uptime_format() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(61), "1m1s");
        assert_eq!(format_uptime(2 * 3600 + 15 * 60 + 30), "2h15m30s");
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..50 {
            crate::store::validate_sandbox_name(&generate_name()).unwrap();
        }
    }

    #[test]
    fn positive_limits() {
        assert!(positive("cpus", 0, 1).is_err());
        assert!(positive("cpus", -1, 1).is_err());
        assert_eq!(positive("cpus", 1, 1).unwrap(), 1);
        assert!(positive("memory_mb", 127, 128).is_err());
        assert_eq!(capped("cpus", 4, 1, 4, "vCPUs").unwrap(), 4);
        let e = capped("cpus", 5, 1, 4, "vCPUs").expect_err("over the cap");
        assert!(e.to_string().contains("limit of 4 vCPUs"), "{e}");
    }
}
