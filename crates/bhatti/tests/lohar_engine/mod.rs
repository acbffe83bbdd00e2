//! A fast engine for service and API tests: its "VMs" are lohar processes
//! in test mode (Unix sockets, children run as the current user), so the
//! real service, the real HTTP API and the real agent run in seconds,
//! without root, QEMU or a network namespace.
//!
//! "Stopped" kills the agent (its sessions are lost, as after a real crash,
//! not as after a real stop); "paused" is SIGSTOP. Counters let a test see
//! how often the service drove each transition, and a few knobs inject the
//! failures a real engine has (a create that fails, a slow start).
//!
//! Every agent runs with `RLIMIT_FSIZE` = [`FILE_SIZE_LIMIT`] and SIGXFSZ
//! ignored, so a larger write fails with EFBIG (the agent's `too_large`).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bhatti::api::router::{router, AppState};
use bhatti::engine::agent_client::{AgentClient, UnixDialer};
use bhatti::engine::{CheckpointInfo, Engine, EngineError, SandboxSpec, VmRuntime, VmState};
use bhatti::secrets::SecretCipher;
use bhatti::service::Service;
use bhatti::store::{Store, UserLimits};

/// Largest file an agent of this engine can write, bytes.
pub const FILE_SIZE_LIMIT: u64 = 4 << 20;

/// The lohar binary: `$BHATTI_LOHAR` (set by scripts/test.sh), else a build
/// in this workspace.
pub fn lohar_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BHATTI_LOHAR") {
        return p.into();
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    ["x86_64-unknown-linux-gnu/release/lohar", "debug/lohar"]
        .iter()
        .map(|p| target.join(p))
        .find(|p| p.is_file())
        .expect("no lohar binary: build it (cargo build -p lohar) or set BHATTI_LOHAR")
}

struct Vm {
    dir: PathBuf,
    spec: SandboxSpec,
    /// `None`: stopped.
    child: Option<Child>,
    paused: bool,
}

impl Vm {
    fn control(&self) -> PathBuf {
        self.dir.join("c.sock")
    }
    fn forward(&self) -> PathBuf {
        self.dir.join("f.sock")
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.control());
        let _ = std::fs::remove_file(self.forward());
        self.paused = false;
    }
}

/// How often the service drove each transition.
#[derive(Default)]
pub struct Counts {
    pub creates: AtomicUsize,
    pub starts: AtomicUsize,
    pub stops: AtomicUsize,
    pub pauses: AtomicUsize,
    pub resumes: AtomicUsize,
    pub destroys: AtomicUsize,
}

impl Counts {
    pub fn get(c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }
}

/// The engine. Dropping it kills every agent.
pub struct LoharEngine {
    root: tempfile::TempDir,
    vms: Mutex<HashMap<String, Vm>>,
    pub counts: Counts,
    /// Creates of sandboxes with these names fail after the agent started.
    pub fail_create: Mutex<HashSet<String>>,
    /// Checkpoints taken and not yet deleted.
    pub checkpoints: Mutex<HashSet<String>>,
    /// How long a start (a cold wake) takes.
    pub start_delay: Mutex<Duration>,
    /// How long a create takes before its agent starts.
    pub create_delay: Mutex<Duration>,
    /// Sandboxes with these names get a small disk (see [`spawn_agent`]).
    pub small_disk: Mutex<HashSet<String>>,
    /// The layer each VM's disk (and each checkpoint) backs onto.
    layers: Mutex<HashMap<String, String>>,
}

impl Default for LoharEngine {
    fn default() -> Self {
        LoharEngine {
            root: tempfile::tempdir().expect("tempdir"),
            vms: Mutex::new(HashMap::new()),
            counts: Counts::default(),
            fail_create: Mutex::new(HashSet::new()),
            checkpoints: Mutex::new(HashSet::new()),
            layers: Mutex::new(HashMap::new()),
            start_delay: Mutex::new(Duration::ZERO),
            create_delay: Mutex::new(Duration::ZERO),
            small_disk: Mutex::new(HashSet::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Size of the tmpfs a small-disk VM has at `<home>/small`, bytes.
pub const SMALL_DISK: u64 = 64 * 1024;

/// Starts lohar in test mode for `vm` and waits for its sockets. With
/// `small_disk`, the agent runs in its own user and mount namespace (no
/// root needed where unprivileged user namespaces are allowed) with a
/// [`SMALL_DISK`] tmpfs at `<home>/small`, so a bigger write fails with
/// ENOSPC (the agent's `no_space`).
async fn spawn_agent(vm: &mut Vm, small_disk: bool) -> Result<(), EngineError> {
    let home = vm.dir.join("home");
    std::fs::create_dir_all(&home)?;
    let small = small_disk.then(|| {
        let dir = home.join("small");
        let _ = std::fs::create_dir_all(&dir);
        let c = |s: String| std::ffi::CString::new(s).expect("no NUL");
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        (
            c(dir.to_string_lossy().into_owned()),
            c(format!("0 {uid} 1")),
            c(format!("0 {gid} 1")),
            c(format!("size={SMALL_DISK}")),
        )
    });
    let env: BTreeMap<_, _> = vm.spec.env.clone();
    let mut cmd = Command::new(lohar_bin());
    cmd.env("LOHAR_TEST", "1")
        .env("LOHAR_SOCK", vm.control())
        .env("LOHAR_FWD_SOCK", vm.forward())
        .env("LOHAR_TOKEN", &vm.spec.token)
        .env(
            "LOHAR_ENV",
            serde_json::to_string(&env).expect("env is JSON"),
        )
        .env_remove("LOHAR_INIT")
        // Login shells read this home's (absent) profile, not the tester's.
        .env("HOME", &home)
        .current_dir(&home)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: FILE_SIZE_LIMIT,
                rlim_max: FILE_SIZE_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if let Some((dir, uid_map, gid_map, size)) = &small {
                if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let put = |path: &[u8], data: &[u8]| -> std::io::Result<()> {
                    let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, data.as_ptr().cast(), data.len());
                    libc::close(fd);
                    if n < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                put(b"/proc/self/setgroups\0", b"deny")?;
                put(b"/proc/self/uid_map\0", uid_map.as_bytes())?;
                put(b"/proc/self/gid_map\0", gid_map.as_bytes())?;
                if libc::mount(
                    c"none".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    size.as_ptr().cast(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    vm.child = Some(child);
    let t0 = Instant::now();
    while !(vm.control().exists() && vm.forward().exists()) {
        if t0.elapsed() > Duration::from_secs(10) {
            vm.kill();
            return Err(EngineError::Timeout {
                secs: 10,
                reason: "lohar did not open its sockets".into(),
                console_tail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn signal(vm: &Vm, sig: libc::c_int) -> Result<(), EngineError> {
    let pid = vm
        .child
        .as_ref()
        .map(|c| c.id())
        .ok_or_else(|| EngineError::State("the VM is stopped".into()))?;
    // SAFETY: kill(2) on our own child's pid.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

impl LoharEngine {
    /// Kills a VM's agent behind the service's back (a VM that died).
    pub fn crash(&self, id: &str) {
        if let Some(vm) = lock(&self.vms).get_mut(id) {
            if let Some(c) = vm.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Forgets a VM entirely, as if the host lost it.
    pub fn forget(&self, id: &str) {
        if let Some(mut vm) = lock(&self.vms).remove(id) {
            vm.kill();
        }
    }

    /// Ids of the VMs the engine has (running, paused or stopped).
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<_> = lock(&self.vms).keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of agent processes alive.
    pub fn running(&self) -> usize {
        lock(&self.vms)
            .values_mut()
            .filter_map(|v| v.child.as_mut())
            .filter_map(|c| c.try_wait().ok())
            .filter(Option::is_none)
            .count()
    }

    /// The home dir (agent cwd) of a VM.
    pub fn home(&self, id: &str) -> Option<PathBuf> {
        lock(&self.vms).get(id).map(|v| v.dir.join("home"))
    }
}

impl Drop for LoharEngine {
    fn drop(&mut self) {
        for vm in lock(&self.vms).values_mut() {
            vm.kill();
        }
    }
}

#[async_trait::async_trait]
impl Engine for LoharEngine {
    fn subnet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 250, 0, 0), 24)
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<VmRuntime, EngineError> {
        self.counts.creates.fetch_add(1, Ordering::SeqCst);
        let delay = *lock(&self.create_delay);
        tokio::time::sleep(delay).await;
        let mut vm = {
            let vms = lock(&self.vms);
            if vms.contains_key(&spec.id) {
                return Err(EngineError::AlreadyExists(format!(
                    "a VM with id {} already exists",
                    spec.id
                )));
            }
            Vm {
                dir: self.root.path().join(&spec.id),
                spec: spec.clone(),
                child: None,
                paused: false,
            }
        };
        std::fs::create_dir_all(&vm.dir)?;
        let small = lock(&self.small_disk).contains(&spec.name);
        spawn_agent(&mut vm, small).await?;
        if lock(&self.fail_create).contains(&spec.name) {
            // As a real boot that fails late: nothing stays behind.
            vm.kill();
            let _ = std::fs::remove_dir_all(&vm.dir);
            return Err(EngineError::Boot {
                reason: "injected failure".into(),
                console_tail: String::new(),
            });
        }
        lock(&self.vms).insert(spec.id.clone(), vm);
        Ok(VmRuntime {
            ip: spec.ip,
            token: spec.token.clone(),
        })
    }

    async fn destroy(&self, id: &str) -> Result<(), EngineError> {
        self.counts.destroys.fetch_add(1, Ordering::SeqCst);
        let mut vm = lock(&self.vms)
            .remove(id)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        vm.kill();
        let _ = std::fs::remove_dir_all(&vm.dir);
        Ok(())
    }

    async fn stop(&self, id: &str) -> Result<(), EngineError> {
        self.counts.stops.fetch_add(1, Ordering::SeqCst);
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        vm.kill();
        Ok(())
    }

    async fn start(&self, id: &str, _rt: &VmRuntime) -> Result<(), EngineError> {
        let delay = *lock(&self.start_delay);
        tokio::time::sleep(delay).await;
        let mut vm = {
            let mut vms = lock(&self.vms);
            let vm = vms
                .get_mut(id)
                .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
            if vm.child.is_some() {
                return Ok(());
            }
            self.counts.starts.fetch_add(1, Ordering::SeqCst);
            Vm {
                dir: vm.dir.clone(),
                spec: vm.spec.clone(),
                child: None,
                paused: false,
            }
        };
        let small = lock(&self.small_disk).contains(&vm.spec.name);
        spawn_agent(&mut vm, small).await?;
        let child = vm.child.take();
        if let Some(v) = lock(&self.vms).get_mut(id) {
            v.child = child;
        }
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<(), EngineError> {
        self.counts.pauses.fetch_add(1, Ordering::SeqCst);
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        signal(vm, libc::SIGSTOP)?;
        vm.paused = true;
        Ok(())
    }

    async fn resume(&self, id: &str, _rt: &VmRuntime) -> Result<(), EngineError> {
        self.counts.resumes.fetch_add(1, Ordering::SeqCst);
        let mut vms = lock(&self.vms);
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        signal(vm, libc::SIGCONT)?;
        vm.paused = false;
        Ok(())
    }

    async fn paused(&self, id: &str) -> Result<bool, EngineError> {
        lock(&self.vms)
            .get(id)
            .map(|v| v.paused)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))
    }

    async fn adopt(&self, id: &str, _rt: &VmRuntime) -> VmState {
        self.state(id)
    }

    fn state(&self, id: &str) -> VmState {
        match lock(&self.vms).get_mut(id) {
            None => VmState::Dead("no such VM".into()),
            Some(vm) => match vm.child.as_mut() {
                None => VmState::Stopped,
                Some(c) => match c.try_wait() {
                    Ok(None) => VmState::Running,
                    _ => VmState::Dead("the agent exited".into()),
                },
            },
        }
    }

    async fn sweep(&self, _keep: &[String]) -> Result<(), EngineError> {
        Ok(())
    }

    fn agent(&self, id: &str, rt: &VmRuntime) -> AgentClient {
        let dir = self.root.path().join(id);
        AgentClient::new(
            Arc::new(UnixDialer {
                control: dir.join("c.sock"),
                forward: dir.join("f.sock"),
            }),
            rt.token.as_bytes().to_vec(),
        )
    }

    fn disk_usage(&self, _id: &str) -> Result<u64, EngineError> {
        Ok(0)
    }

    /// A stand-in checkpoint: it records the source's size; a restore
    /// starts a fresh agent (no memory or files are copied). Enough for
    /// what the service decides about copies (policy, machine, layers).
    async fn checkpoint(
        &self,
        id: &str,
        _rt: &VmRuntime,
        checkpoint: &str,
        layer: &str,
    ) -> Result<CheckpointInfo, EngineError> {
        let spec = lock(&self.vms)
            .get(id)
            .map(|vm| vm.spec.clone())
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        lock(&self.checkpoints).insert(checkpoint.to_string());
        let parent_layer = {
            let mut layers = lock(&self.layers);
            layers.insert(checkpoint.to_string(), layer.to_string());
            layers.insert(id.to_string(), layer.to_string())
        };
        Ok(CheckpointInfo {
            id: checkpoint.to_string(),
            layer: layer.to_string(),
            new_layer: true,
            cpus: spec.cpus,
            memory_mb: spec.memory_mb,
            parent_ip: spec.ip,
            parent_mac: String::new(),
            disk_size: 0,
            state_bytes: 0,
            layer_bytes: 0,
            pause_ms: Some(0),
            ram_file: false,
            source_flattened: false,
            parent_layer,
            report_free_pages: !spec.template,
        })
    }

    async fn restore_checkpoint(
        &self,
        checkpoint: &str,
        _parent_token: &str,
        spec: &SandboxSpec,
    ) -> Result<VmRuntime, EngineError> {
        {
            let mut layers = lock(&self.layers);
            if let Some(l) = layers.get(checkpoint).cloned() {
                layers.insert(spec.id.clone(), l);
            }
        }
        self.create(spec).await
    }

    async fn delete_checkpoint(&self, checkpoint: &str) -> Result<(), EngineError> {
        lock(&self.checkpoints).remove(checkpoint);
        Ok(())
    }

    async fn delete_layer(&self, _layer: &str) -> Result<(), EngineError> {
        Ok(())
    }

    // Volumes and custom images are disks of real VMs: tests/volumes.rs and
    // tests/images.rs cover them; this engine refuses them plainly.
    async fn create_volume(&self, _id: &str, _size_mb: u64) -> Result<(), EngineError> {
        Err(no_disks())
    }

    async fn delete_volume(&self, _id: &str) -> Result<(), EngineError> {
        Err(no_disks())
    }

    async fn grow_volume(
        &self,
        _id: &str,
        _size_mb: u64,
        _attached: Option<(&str, &VmRuntime)>,
    ) -> Result<(), EngineError> {
        Err(no_disks())
    }

    fn volume_usage(&self, _id: &str) -> Result<u64, EngineError> {
        Ok(0)
    }

    async fn save_image(
        &self,
        _id: &str,
        _rt: &VmRuntime,
        _image: &str,
    ) -> Result<u64, EngineError> {
        Err(no_disks())
    }

    async fn import_image(
        &self,
        _image: &str,
        _tree: &std::path::Path,
        _size_mb: u64,
    ) -> Result<u64, EngineError> {
        Err(no_disks())
    }

    async fn delete_image(&self, _image: &str) -> Result<(), EngineError> {
        Err(no_disks())
    }

    fn image_users(&self, _image: &str) -> Result<Vec<String>, EngineError> {
        Ok(Vec::new())
    }
}

fn no_disks() -> EngineError {
    EngineError::InvalidSpec("the lohar test engine has no volumes or images".into())
}

/// The real service and HTTP API on a loopback port, over a [`LoharEngine`].
pub struct FastDaemon {
    pub url: String,
    /// The public proxy's address; published hosts are `<alias>.localhost`.
    pub public: SocketAddr,
    pub engine: Arc<LoharEngine>,
    pub service: Arc<Service>,
    pub store: Store,
    /// API key of user `alice`.
    pub key: String,
    _data: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl FastDaemon {
    /// Starts one; `limits` are alice's.
    pub async fn start(limits: UserLimits) -> FastDaemon {
        let data = tempfile::tempdir().expect("tempdir");
        let store = Store::open(data.path()).expect("store");
        let cipher = Arc::new(SecretCipher::load_or_create(data.path()).expect("age key"));
        let engine = Arc::new(LoharEngine::default());
        let subnet = "10.250.0.0/24".parse().expect("subnet");
        let service = Arc::new(Service::new(store.clone(), engine.clone(), cipher, subnet));
        let (_, key) = store
            .call(move |s| s.create_user("alice", limits))
            .await
            .expect("user");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Rate limits off: these tests are about the service, not budgets.
        let app = router(AppState {
            service: service.clone(),
            limits: std::sync::Arc::new(bhatti::rate_limit::UserLimits::new(
                bhatti::rate_limit::UserRates {
                    create_per_min: 0,
                    write_per_min: 0,
                    read_per_min: 0,
                },
            )),
        });
        let public_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let public = public_listener.local_addr().expect("addr");
        let cfg = bhatti::proxy::public::PublicConfig {
            domain: "localhost".into(),
            scheme: "http",
            rate_per_alias: 0,
            rate_global: 0,
            rate_per_client: 0,
        };
        let public_proxy = bhatti::proxy::public::serve(
            public_listener,
            service.clone(),
            cfg,
            std::future::pending(),
        );
        let server = tokio::spawn(async move {
            let api = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            );
            tokio::select! {
                _ = api => {}
                _ = public_proxy => {}
            }
        });
        FastDaemon {
            url: format!("http://{addr}"),
            public,
            engine,
            service,
            store,
            key,
            _data: data,
            server,
        }
    }

    /// An API client for alice.
    pub fn api(&self) -> crate::common::Api {
        crate::common::Api::new(&self.url, &self.key)
    }
}

impl Drop for FastDaemon {
    fn drop(&mut self) {
        self.server.abort();
    }
}
