//! The QEMU `microvm` engine.
//!
//! Each sandbox is one QEMU process in its own session, started inside the
//! daemon's network namespace, with everything it owns in one directory:
//! `<data_dir>/sandboxes/<id>/{disk.qcow2, config.json, console.log,
//! qmp.sock, qemu.pid, vm.json}` plus a TAP `bt-<hash>` on the bridge.
//! QEMU outlives the daemon; a restarted daemon adopts it again. A stopped
//! VM has no process, and its state in `vm.state` (see [`snapshot`]).

pub mod accel;
pub mod config_drive;
pub mod disks;
pub mod dns;
pub mod firewall;
mod fork;
pub use fork::FREEZE_MARKER;
pub mod image;
mod images;
mod lifecycle;
pub mod netns_dialer;
pub mod network;
pub mod prereq;
pub mod process;
pub mod qmp;
pub mod ramfile;
mod snapshot;
mod templates;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::accel::{Accel, AccelMode};
use self::image::ImagePaths;
use self::lifecycle::read_meta;
use self::netns_dialer::{NetnsDialer, NetnsSockets};
use self::network::{NetConfig, NetworkError, Subnet};
use self::process::VmFiles;
use self::qmp::commands::RunState;
use self::qmp::Qmp;
use super::agent_client::AgentClient;
use super::{CheckpointInfo, DiskLayers, Engine, EngineError, SandboxSpec, VmRuntime, VmState};

/// How many console lines an error carries.
const CONSOLE_TAIL_LINES: usize = 30;
/// How long QEMU gets to exit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(2);

/// Settings of the QEMU engine (mapped from the daemon config by the caller).
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Sandbox dirs live in `<data_dir>/sandboxes`.
    pub data_dir: PathBuf,
    pub images: ImagePaths,
    pub accel: AccelMode,
    /// Network namespace owned by this daemon.
    pub netns: String,
    pub bridge: String,
    pub subnet: Subnet,
    /// Veth + NAT to the outside world. Tests keep this off.
    pub egress: bool,
    /// Name servers written to the guest's resolv.conf when egress is off
    /// (with egress on, guests use the daemon's resolver on the gateway).
    pub dns: Vec<String>,
    /// Where the daemon's resolver sends guests' queries (port 53 if none
    /// given); queried from the uplink namespace. Empty: the host's
    /// `/etc/resolv.conf`.
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// Namespace that plays the host for egress (see [`NetConfig::uplink_netns`]).
    pub uplink_netns: Option<String>,
    /// How long a VM may take to answer; `None`: 30 s under TCG, 10 s with KVM.
    pub boot_timeout: Option<Duration>,
    /// QEMU binary (name on PATH or absolute path).
    pub qemu_binary: String,
    /// Extra kernel command line words (from the image builder).
    pub extra_cmdline: String,
}

impl QemuConfig {
    /// The defaults of the architecture: netns `bhatti`, bridge `brbhatti0`,
    /// subnet 192.168.137.0/24, egress on, accel auto.
    pub fn new(data_dir: impl Into<PathBuf>, images: ImagePaths) -> QemuConfig {
        QemuConfig {
            data_dir: data_dir.into(),
            images,
            accel: AccelMode::Auto,
            netns: "bhatti".into(),
            bridge: "brbhatti0".into(),
            subnet: Subnet::new(Ipv4Addr::new(192, 168, 137, 0), 24)
                .expect("the default subnet is valid"),
            egress: true,
            dns: vec!["1.1.1.1".into(), "8.8.8.8".into()],
            dns_upstream: Vec::new(),
            uplink_netns: None,
            boot_timeout: None,
            qemu_binary: "qemu-system-x86_64".into(),
            extra_cmdline: String::new(),
        }
    }
}

/// What the engine records next to a VM so it can find (and later restore) it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmMeta {
    pub id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub tap: String,
    pub netns: String,
    pub accel: Accel,
    pub qemu: String,
    /// The exact argv (without `-daemonize`); a snapshot restore reuses it.
    pub argv: Vec<String>,
    /// Egress policy (absent in records of older daemons: `public`).
    #[serde(default)]
    pub egress: crate::egress::EgressPolicy,
    /// Peer group (see [`SandboxSpec::peer_group`]).
    #[serde(default)]
    pub peer_group: Option<String>,
    /// Whether the VM's saved `vm.state` holds device state only, its RAM
    /// being in its own RAM file (`false`: the stream carries the RAM).
    #[serde(default)]
    pub saved_ram_in_file: bool,
}

/// A VM the engine knows to be running.
struct Vm {
    files: VmFiles,
    pid: u32,
    ip: Ipv4Addr,
    tap: String,
    /// The one QMP connection of this VM (QEMU serves one client at a time).
    qmp: tokio::sync::Mutex<Option<Arc<Qmp>>>,
}

/// The QEMU microvm engine.
pub struct QemuEngine {
    cfg: QemuConfig,
    net: NetConfig,
    sandboxes_dir: PathBuf,
    /// A ramfs holding the RAM files of checkpoints, which copies map
    /// copy-on-write (`share=off`). Not a disk or tmpfs file: QEMU 7.2 turns
    /// a guest's free page reports into `fallocate(PUNCH_HOLE)` on the
    /// backing file even for a private mapping, which would zero pages
    /// under every other copy; ramfs refuses hole punching.
    cow_dir: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
    boot_timeout: Duration,
    sockets: NetnsSockets,
    /// Per-sandbox rules (source check, egress, peers).
    firewall: Arc<firewall::Firewall>,
    /// The guests' resolver; runs while egress is on.
    resolver: Option<dns::Resolver>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Ids with a create, stop or start in progress.
    busy: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for QemuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuEngine")
            .field("netns", &self.net.netns)
            .field("accel", &self.accel)
            .finish()
    }
}

fn net_err(e: NetworkError) -> EngineError {
    EngineError::Network(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Internal(format!("engine task failed: {e}")))
}

/// Ids name directories, TAPs and processes: keep them plain.
fn check_id(id: &str) -> Result<(), EngineError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidSpec(format!(
            "invalid sandbox id {id:?}: use 1-64 characters of [A-Za-z0-9_-]"
        )))
    }
}

/// A checkpoint (fork or snapshot) cut short by a daemon crash leaves its
/// source's QEMU migrating into a file nobody reads, or done with it in
/// run state `postmigrate` (vCPUs stopped, disks inactive). Cancels such a
/// migration and resumes a `postmigrate` VM (`cont` takes its disks back);
/// a VM left merely paused stays paused and is adopted as warm.
async fn finish_interrupted_checkpoint(id: &str, qmp: &Qmp) {
    use self::qmp::commands::MigrationStatus;
    let migrating = |m: &Option<MigrationStatus>| {
        matches!(
            m,
            Some(MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling)
        )
    };
    if let Ok(m) = qmp.query_migrate().await {
        if migrating(&m.status) {
            tracing::warn!(id, "cancelling a checkpoint interrupted by a restart");
            let _ = qmp.migrate_cancel().await;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                match qmp.query_migrate().await {
                    Ok(m) if migrating(&m.status) => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    _ => break,
                }
            }
        }
    }
    if let Ok(s) = qmp.query_status().await {
        if s.status == RunState::Postmigrate {
            tracing::warn!(id, "resuming a VM whose checkpoint was interrupted");
            if let Err(e) = qmp.cont().await {
                tracing::warn!(id, error = %e, "cannot resume a VM after an interrupted checkpoint");
            }
        }
    }
}

impl QemuEngine {
    /// Sets the clock of VM `id` after checkpoint `info` paused it (its
    /// clock stood still meanwhile), in the background.
    pub(super) async fn clock_after_checkpoint(
        &self,
        id: &str,
        rt: &VmRuntime,
        info: &CheckpointInfo,
    ) {
        if info.pause_ms.is_none() {
            return;
        }
        match crate::engine::Engine::agent(self, id, rt).send_time().await {
            Ok(sent) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), sent.lag_ms()).await;
                });
            }
            Err(e) => tracing::warn!(id, error = %e, "cannot set the clock after a checkpoint"),
        }
    }

    /// Chooses the accelerator, sets up (or repairs) the namespace, bridge and
    /// firewall, and starts the namespace's socket thread. Images are checked
    /// at each create, so the engine can start before they are built.
    pub async fn new(cfg: QemuConfig) -> Result<QemuEngine, EngineError> {
        let net = NetConfig {
            netns: cfg.netns.clone(),
            bridge: cfg.bridge.clone(),
            subnet: cfg.subnet,
            egress: cfg.egress,
            uplink_netns: cfg.uplink_netns.clone(),
            dns: cfg.egress,
        };
        net.validate().map_err(net_err)?;
        let data_dir = std::path::absolute(&cfg.data_dir)?;
        let sandboxes_dir = data_dir.join("sandboxes");
        // QEMU's option syntax splits on commas; keep paths it sees free of them.
        if sandboxes_dir.to_string_lossy().contains([',', '\n']) {
            return Err(EngineError::Config(format!(
                "data dir {} must not contain commas",
                data_dir.display()
            )));
        }
        std::fs::create_dir_all(&sandboxes_dir)?;
        let cow_dir = data_dir.join("cow");
        ramfile::ensure_ramfs(&cow_dir)
            .map_err(|e| EngineError::Config(format!("ramfs at {}: {e}", cow_dir.display())))?;
        let accel = accel::resolve(cfg.accel).map_err(|e| EngineError::Config(e.to_string()))?;
        let tsc_khz = accel::host_tsc_khz();
        if tsc_khz.is_none() {
            tracing::warn!(
                "cannot find the host TSC frequency; guests may hang calibrating their clock"
            );
        }
        let boot_timeout = cfg.boot_timeout.unwrap_or(match accel {
            Accel::Tcg => Duration::from_secs(30),
            Accel::Kvm => Duration::from_secs(10),
        });
        let n = net.clone();
        blocking(move || network::ensure_base(&n))
            .await?
            .map_err(net_err)?;
        let netns = net.netns.clone();
        let sockets = blocking(move || NetnsSockets::new(&netns))
            .await?
            .map_err(|e| EngineError::Network(e.to_string()))?;
        let firewall = Arc::new(firewall::Firewall::new(net.clone()));
        let resolver = if net.egress {
            Some(
                dns::Resolver::start(
                    &sockets,
                    net.subnet.gateway(),
                    &cfg.dns_upstream,
                    cfg.uplink_netns.as_deref(),
                    firewall.clone(),
                )
                .await
                .map_err(|e| {
                    EngineError::Network(format!("cannot start the guests' resolver: {e}"))
                })?,
            )
        } else {
            None
        };
        tracing::info!(netns = %net.netns, bridge = %net.bridge, subnet = %net.subnet, egress = net.egress, uplink = ?net.uplink_netns, ?accel, "QEMU engine ready");
        Ok(QemuEngine {
            cfg,
            net,
            sandboxes_dir,
            cow_dir,
            accel,
            tsc_khz,
            boot_timeout,
            sockets,
            firewall,
            resolver,
            vms: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
        })
    }

    /// Installs a VM's per-sandbox firewall rules from its record, before
    /// the VM runs (see [`firewall`]).
    ///
    /// Errors: `Network` when `nft` fails; the caller fails the start.
    async fn install_firewall(&self, meta: &VmMeta) -> Result<(), EngineError> {
        let fw = self.firewall.clone();
        let m = meta.clone();
        blocking(move || {
            fw.install(
                &m.id,
                &m.tap,
                m.ip,
                &m.mac,
                &m.egress,
                m.peer_group.as_deref(),
            )
        })
        .await?
        .map_err(|e| {
            EngineError::Network(format!("cannot install the sandbox's firewall rules: {e}"))
        })
    }

    /// The accelerator VMs run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The network settings in effect.
    pub fn net_config(&self) -> &NetConfig {
        &self.net
    }

    /// Sockets inside the engine's namespace (e.g. to serve something to guests in tests).
    pub fn sockets(&self) -> &NetnsSockets {
        &self.sockets
    }

    /// Where a sandbox's files live.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes_dir.join(id)
    }

    /// The running VMs. A panic while the lock was held cannot leave the map
    /// half-updated (every change is one insert or remove), so a poisoned
    /// lock is used as it is: a VM is never dropped from the registry, nor
    /// an insert lost, because some other thread panicked.
    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids with an operation in progress (poisoning handled as in [`registry`](Self::registry)).
    fn busy_ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm(&self, id: &str) -> Option<Arc<Vm>> {
        self.registry().get(id).cloned()
    }

    /// Marks `id` busy until the guard drops; refuses a second operation at once.
    fn reserve(&self, id: &str) -> Result<Busy<'_>, EngineError> {
        let mut busy = self.busy_ids();
        if !busy.insert(id.to_string()) {
            return Err(EngineError::Busy(format!(
                "another operation on VM {id} is in progress"
            )));
        }
        Ok(Busy {
            engine: self,
            id: id.to_string(),
        })
    }

    /// The VM's QMP connection, reconnecting if it was lost.
    async fn qmp_of(&self, id: &str) -> Result<Arc<Qmp>, EngineError> {
        let vm = self
            .vm(id)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        let mut slot = vm.qmp.lock().await;
        if let Some(q) = slot.as_ref().filter(|q| !q.is_closed()) {
            return Ok(q.clone());
        }
        let q = Arc::new(
            Qmp::connect(&vm.files.qmp)
                .await
                .map_err(EngineError::qmp(format!("connecting to VM {id}")))?,
        );
        *slot = Some(q.clone());
        Ok(q)
    }

    /// Stops the VM's vCPUs (thermal state "warm").
    pub async fn pause(&self, id: &str) -> Result<(), EngineError> {
        self.qmp_of(id)
            .await?
            .stop()
            .await
            .map_err(EngineError::qmp(format!("pausing VM {id}")))
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, id: &str) -> Result<(), EngineError> {
        self.qmp_of(id)
            .await?
            .cont()
            .await
            .map_err(EngineError::qmp(format!("resuming VM {id}")))
    }

    /// QEMU's run state of the VM ("running", "paused", ...).
    pub async fn run_state(&self, id: &str) -> Result<String, EngineError> {
        Ok(self
            .qmp_of(id)
            .await?
            .query_status()
            .await
            .map_err(EngineError::qmp(format!("querying the state of VM {id}")))?
            .status
            .as_str()
            .to_string())
    }

    /// The host pid of the VM's QEMU.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.vm(id).map(|v| v.pid)
    }
}

/// An id reserved by [`QemuEngine::reserve`].
struct Busy<'a> {
    engine: &'a QemuEngine,
    id: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.engine.busy_ids().remove(&self.id);
    }
}

#[async_trait::async_trait]
impl Engine for QemuEngine {
    fn subnet(&self) -> (Ipv4Addr, u8) {
        (self.net.subnet.network(), self.net.subnet.prefix())
    }

    fn template_basis(&self) -> Option<String> {
        Some(self.basis())
    }

    fn checkpoint_ids(&self) -> Vec<String> {
        QemuEngine::checkpoint_ids(self)
    }

    fn layer_ids(&self) -> Vec<String> {
        QemuEngine::layer_ids(self)
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<VmRuntime, EngineError> {
        self.check_spec(spec)?;
        let (files, mut guard) = self.begin_create(spec)?;
        if let Some(pid) =
            process::read_pidfile(&files.pidfile).filter(|p| process::is_our_qemu(*p, &files.dir))
        {
            return Err(EngineError::AlreadyExists(format!(
                "a QEMU (pid {pid}) already runs for sandbox {}; destroy it first",
                spec.id
            )));
        }
        // Leftovers of an earlier, crashed attempt.
        self.remove_leftovers(&spec.id, &files, None, None).await?;
        std::fs::create_dir_all(&files.dir)?;
        std::fs::set_permissions(
            &files.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        guard.armed = true;

        let started = std::time::Instant::now();
        match self.boot(spec, &files, &guard.pid).await {
            Ok(vm) => {
                guard.armed = false;
                tracing::info!(id = %spec.id, ip = %spec.ip, pid = vm.pid, ms = started.elapsed().as_millis() as u64, "VM ready");
                self.registry().insert(spec.id.clone(), vm);
                let rt = VmRuntime {
                    ip: spec.ip,
                    token: spec.token.clone(),
                };
                // The boot config's time was taken before QEMU started: the
                // guest lags by about its boot until told the time.
                match crate::engine::Engine::agent(self, &spec.id, &rt)
                    .set_time()
                    .await
                {
                    Ok(lag_ms) => {
                        tracing::debug!(id = %spec.id, lag_ms, "booted guest's clock set")
                    }
                    Err(e) => {
                        tracing::warn!(id = %spec.id, error = %e, "cannot set the booted guest's clock")
                    }
                }
                Ok(rt)
            }
            Err(e) => {
                tracing::warn!(id = %spec.id, error = %e, "VM failed to start; cleaning up");
                let pid = guard.pid.lock().ok().and_then(|p| *p);
                let partial = pid.map(|pid| Vm {
                    files: files.clone(),
                    pid,
                    ip: spec.ip,
                    tap: network::tap_name(&spec.id),
                    qmp: tokio::sync::Mutex::new(None),
                });
                self.stop_qemu(partial.as_ref(), &files).await;
                if let Err(ce) = self
                    .remove_leftovers(&spec.id, &files, Some(spec.ip), None)
                    .await
                {
                    tracing::warn!(id = %spec.id, error = %ce, "cleanup after failed start incomplete");
                }
                guard.armed = false;
                Err(e)
            }
        }
    }

    /// Idempotent: destroying a VM that is already gone succeeds.
    async fn destroy(&self, id: &str) -> Result<(), EngineError> {
        check_id(id)?;
        let vm = self.registry().remove(id);
        let files = VmFiles::new(self.sandbox_dir(id));
        self.stop_qemu(vm.as_deref(), &files).await;
        self.remove_leftovers(
            id,
            &files,
            vm.as_ref().map(|v| v.ip),
            vm.as_ref().map(|v| v.tap.clone()),
        )
        .await
    }

    async fn stop(&self, id: &str) -> Result<(), EngineError> {
        self.save_to_disk(id).await
    }

    async fn pause(&self, id: &str) -> Result<(), EngineError> {
        QemuEngine::pause(self, id).await
    }

    async fn resume(&self, id: &str, rt: &VmRuntime) -> Result<(), EngineError> {
        let started = std::time::Instant::now();
        QemuEngine::resume(self, id).await?;
        let resumed = started.elapsed();
        // The guest's clock stood still while paused. The frame is on its
        // way before any request after the wake is sent; its answer (a
        // guest round trip) is not waited for.
        let sent = crate::engine::Engine::agent(self, id, rt)
            .send_time()
            .await
            .map_err(|source| EngineError::Agent {
                context: "cannot set the resumed guest's clock".into(),
                source,
            })?;
        let total_us = started.elapsed().as_micros() as u64;
        let id = id.to_string();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), sent.lag_ms()).await {
                Ok(Ok(lag_ms)) => tracing::debug!(
                    id,
                    cont_us = resumed.as_micros() as u64,
                    total_us,
                    lag_ms,
                    "VM resumed"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(id, error = %e, "the resumed guest did not set its clock")
                }
                Err(_) => tracing::warn!(id, "the resumed guest did not answer SET_TIME"),
            }
        });
        Ok(())
    }

    async fn paused(&self, id: &str) -> Result<bool, EngineError> {
        let s = self
            .qmp_of(id)
            .await?
            .query_status()
            .await
            .map_err(EngineError::qmp(format!("querying the state of VM {id}")))?;
        Ok(!s.running)
    }

    async fn start(&self, id: &str, rt: &VmRuntime) -> Result<(), EngineError> {
        self.restore_from_disk(id, rt).await
    }

    fn state(&self, id: &str) -> VmState {
        let files = VmFiles::new(self.sandbox_dir(id));
        match process::read_pidfile(&files.pidfile) {
            Some(pid) if process::is_our_qemu(pid, &files.dir) => VmState::Running,
            _ if files.state.is_file() => VmState::Stopped,
            Some(pid) => VmState::Dead(format!(
                "the VM's QEMU process (pid {pid}) has exited; last console lines:\n{}",
                process::console_tail(&files.console, 5)
            )),
            None => VmState::Dead("the VM is not running (no QEMU pidfile)".into()),
        }
    }

    async fn adopt(&self, id: &str, rt: &VmRuntime) -> VmState {
        if check_id(id).is_err() {
            return VmState::Dead(format!("invalid sandbox id {id:?}"));
        }
        let files = VmFiles::new(self.sandbox_dir(id));
        // A fork's disk freeze the crash cut short leaves the disk files mid-rename.
        let live =
            process::read_pidfile(&files.pidfile).filter(|p| process::is_our_qemu(*p, &files.dir));
        let (f, layers, i) = (files.clone(), self.layers_dir(), id.to_string());
        let _ = blocking(move || fork::repair_interrupted_freeze(&i, &f, &layers, live)).await;
        if files.state.is_file() {
            // A stop or start interrupted by a crash may have left a QEMU
            // behind; with the state on disk it never ran the guest since.
            if let Some(pid) = process::read_pidfile(&files.pidfile)
                .filter(|p| process::is_our_qemu(*p, &files.dir))
            {
                tracing::warn!(id, pid, "killing the QEMU of a VM saved to disk");
                process::kill(pid);
                process::wait_exit(pid, QUIT_GRACE).await;
            }
            let _ = std::fs::remove_file(&files.pidfile);
            let _ = std::fs::remove_file(snapshot::partial_state(&files));
            return VmState::Stopped;
        }
        let Some(pid) = process::read_pidfile(&files.pidfile) else {
            return VmState::Dead(
                "the VM is not running (no QEMU pidfile; the host may have rebooted)".into(),
            );
        };
        if !process::is_our_qemu(pid, &files.dir) {
            return VmState::Dead(format!("the VM's QEMU process (pid {pid}) has exited"));
        }
        let meta = read_meta(&files.meta);
        let tap = meta
            .as_ref()
            .map(|m| m.tap.clone())
            .unwrap_or_else(|| network::tap_name(id));
        let mac = meta
            .map(|m| m.mac)
            .unwrap_or_else(|| network::guest_mac(rt.ip));
        let net = self.net.clone();
        let ip = rt.ip;
        let repaired = blocking(move || {
            if !network::base_present(&net) {
                return Err(format!(
                    "network namespace {} or bridge {} is gone; the VM is unreachable",
                    net.netns, net.bridge
                ));
            }
            network::ensure_neighbour(&net, ip, &mac).map_err(|e| e.to_string())
        })
        .await;
        match repaired {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return VmState::Dead(reason),
            Err(e) => return VmState::Dead(e.to_string()),
        }
        // The namespace's ruleset was replaced at engine start.
        if let Some(m) = read_meta(&files.meta) {
            if let Err(e) = self.install_firewall(&m).await {
                return VmState::Dead(e.to_string());
            }
        }
        let qmp = match tokio::time::timeout(Duration::from_secs(5), Qmp::connect(&files.qmp)).await
        {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                return VmState::Dead(format!(
                    "QEMU (pid {pid}) runs but its control socket does not answer: {e}"
                ))
            }
            Err(_) => {
                return VmState::Dead(format!(
                    "QEMU (pid {pid}) runs but its control socket does not answer"
                ))
            }
        };
        // A save interrupted by a crash left the vCPUs stopped: carry on.
        let partial = snapshot::partial_state(&files);
        if partial.exists() {
            tracing::warn!(id, "resuming a VM whose save to disk was interrupted");
            let _ = qmp.cont().await;
            let _ = std::fs::remove_file(&partial);
        }
        finish_interrupted_checkpoint(id, &qmp).await;
        match qmp.query_status().await {
            Ok(s)
                if matches!(
                    s.status,
                    RunState::Running | RunState::Paused | RunState::Suspended
                ) => {}
            Ok(s) => return VmState::Dead(format!("QEMU (pid {pid}) is in state {:?}", s.status)),
            Err(e) => {
                return VmState::Dead(format!("QEMU (pid {pid}) does not report its state: {e}"))
            }
        }
        let vm = Arc::new(Vm {
            files,
            pid,
            ip: rt.ip,
            tap,
            qmp: tokio::sync::Mutex::new(Some(Arc::new(qmp))),
        });
        self.registry().insert(id.to_string(), vm);
        VmState::Running
    }

    fn disk_usage(&self, id: &str) -> Result<u64, EngineError> {
        check_id(id)?;
        let mut total = 0u64;
        for entry in std::fs::read_dir(self.sandbox_dir(id))? {
            let meta = entry?.metadata()?;
            if meta.is_file() {
                // st_blocks is in 512-byte units whatever the filesystem's block size.
                total += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            }
        }
        Ok(total)
    }

    async fn sweep(&self, keep: &[String]) -> Result<(), EngineError> {
        let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
        // Processes first: a QEMU whose dir is already gone still holds its TAP.
        let dir = self.sandboxes_dir.clone();
        let strays: Vec<(u32, String)> = blocking(move || process::find_qemus_under(&dir))
            .await?
            .into_iter()
            .filter(|(_, id)| !keep.contains(id.as_str()))
            .collect();
        for (pid, id) in &strays {
            tracing::info!(pid, id = %id, "sweep: killing QEMU of an unknown sandbox");
            process::kill(*pid);
        }
        for (pid, _) in &strays {
            process::wait_exit(*pid, QUIT_GRACE).await;
        }
        let mut kept_ips = HashSet::new();
        for entry in std::fs::read_dir(&self.sandboxes_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(name.as_str()) {
                if let Some(m) = read_meta(&entry.path().join("vm.json")) {
                    kept_ips.insert(m.ip);
                }
                continue;
            }
            if check_id(&name).is_err() {
                continue;
            }
            tracing::info!(id = %name, "sweep: removing leftovers of an unknown sandbox");
            self.registry().remove(&name);
            let files = VmFiles::new(entry.path());
            self.stop_qemu(None, &files).await;
            self.remove_leftovers(&name, &files, None, None).await?;
        }
        self.sweep_quarantines();
        self.sweep_checkpoints();
        let keep_taps: HashSet<String> = keep.iter().map(|id| network::tap_name(id)).collect();
        let net = self.net.clone();
        blocking(move || -> Result<(), NetworkError> {
            for tap in network::list_taps(&net.netns)? {
                if !keep_taps.contains(&tap) {
                    tracing::info!(tap = %tap, "sweep: removing orphan TAP");
                    network::remove_tap(&net, &tap, None)?;
                }
            }
            for (ip, _) in network::list_neighbours(&net)? {
                if !kept_ips.contains(&ip) {
                    network::remove_neighbour(&net, ip);
                }
            }
            Ok(())
        })
        .await?
        .map_err(net_err)
    }

    async fn sweep_snapshot_checkpoints(
        &self,
        keep: &[String],
    ) -> Result<Vec<String>, EngineError> {
        let keep = keep.to_vec();
        let this = (
            self.checkpoints_dir(),
            self.cow_dir.clone(),
            self.layers_dir(),
        );
        blocking(move || fork::sweep_snapshot_checkpoints(&this.0, &this.1, &this.2, &keep)).await
    }

    async fn disk_layers(&self) -> Result<DiskLayers, EngineError> {
        let dirs = (
            self.sandboxes_dir.clone(),
            self.checkpoints_dir(),
            self.layers_dir(),
        );
        blocking(move || fork::disk_layers(&dirs.0, &dirs.1, &dirs.2)).await
    }

    async fn checkpoint(
        &self,
        id: &str,
        rt: &VmRuntime,
        checkpoint: &str,
        layer: &str,
    ) -> Result<CheckpointInfo, EngineError> {
        let info = self.take_checkpoint(id, checkpoint, layer).await?;
        self.clock_after_checkpoint(id, rt, &info).await;
        Ok(info)
    }

    async fn fork(
        &self,
        id: &str,
        rt: &VmRuntime,
        checkpoint: &str,
        layer: &str,
        spec: &SandboxSpec,
    ) -> Result<(CheckpointInfo, Result<VmRuntime, EngineError>), EngineError> {
        self.fork_into(id, rt, checkpoint, layer, spec).await
    }

    async fn restore_checkpoint(
        &self,
        checkpoint: &str,
        parent_token: &str,
        spec: &SandboxSpec,
    ) -> Result<VmRuntime, EngineError> {
        self.restore_into(checkpoint, parent_token, spec).await
    }

    async fn delete_checkpoint(&self, checkpoint: &str) -> Result<(), EngineError> {
        self.remove_checkpoint(checkpoint).await
    }

    async fn delete_layer(&self, layer: &str) -> Result<(), EngineError> {
        self.remove_layer(layer).await
    }

    async fn create_volume(&self, id: &str, size_mb: u64) -> Result<(), EngineError> {
        self.make_volume(id, size_mb).await
    }

    async fn delete_volume(&self, id: &str) -> Result<(), EngineError> {
        self.remove_volume(id).await
    }

    async fn grow_volume(
        &self,
        id: &str,
        size_mb: u64,
        attached: Option<(&str, &VmRuntime)>,
    ) -> Result<(), EngineError> {
        self.grow(id, size_mb, attached).await
    }

    fn volume_usage(&self, id: &str) -> Result<u64, EngineError> {
        self.volume_bytes(id)
    }

    async fn save_image(&self, id: &str, rt: &VmRuntime, image: &str) -> Result<u64, EngineError> {
        self.save_disk(id, rt, image).await
    }

    async fn import_image(
        &self,
        image: &str,
        tree: &std::path::Path,
        size_mb: u64,
    ) -> Result<u64, EngineError> {
        self.image_from_tree(image, tree, size_mb).await
    }

    async fn delete_image(&self, image: &str) -> Result<(), EngineError> {
        self.remove_image(image)
    }

    fn image_users(&self, image: &str) -> Result<Vec<String>, EngineError> {
        self.image_backers(image)
    }

    fn agent(&self, _id: &str, rt: &VmRuntime) -> AgentClient {
        AgentClient::new(
            Arc::new(NetnsDialer::new(self.sockets.clone(), rt.ip)),
            rt.token.as_bytes().to_vec(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("sb_01-abc").is_ok());
        for bad in ["", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
