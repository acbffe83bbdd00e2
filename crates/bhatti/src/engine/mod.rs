//! The engine runs sandboxes: it boots VMs and talks to their agents.
//!
//! The API layer never sees QEMU: it goes through [`Engine`], so another VMM
//! (Firecracker, Cloud Hypervisor) can be added as a second implementation.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub mod agent_client;
pub mod qemu;

use agent_client::AgentClient;

/// What the daemon asks the engine to boot.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique id; names the sandbox dir, TAP and QEMU process.
    pub id: String,
    /// Hostname in the guest.
    pub name: String,
    pub cpus: u32,
    pub memory_mb: u32,
    /// Guest address, allocated (and persisted) by the caller from [`Engine::subnet`].
    pub ip: Ipv4Addr,
    /// Per-sandbox agent token.
    pub token: String,
    /// Sandbox env, secrets included.
    pub env: BTreeMap<String, String>,
    /// Init script, run as TTY session "init".
    pub init: Option<String>,
}

/// What a running VM needs to be reached again, also after a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRuntime {
    pub ip: Ipv4Addr,
    pub token: String,
}

/// A VM frozen for forks and snapshots: its memory and its disk as a
/// read-only layer (see `docs/forks.md`). Stored by the engine next to the
/// memory file, so a restore needs only its id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointInfo {
    pub id: String,
    /// The layer the checkpoint's disk is; the source VM's overlay now backs onto it too.
    pub layer: String,
    /// Whether `layer` was frozen by this checkpoint. `false`: the source
    /// had written nothing since its last freeze, and its current layer
    /// serves (keeps chains short when one sandbox is forked many times).
    #[serde(default = "yes")]
    pub new_layer: bool,
    pub cpus: u32,
    pub memory_mb: u32,
    /// The source's address and MAC, which a restored copy has until it takes its identity.
    pub parent_ip: Ipv4Addr,
    pub parent_mac: String,
    /// Virtual size of the disk, bytes.
    pub disk_size: u64,
    /// Bytes of the memory file on the host.
    pub state_bytes: u64,
    /// Bytes of the disk layer on the host (what the VM had written).
    pub layer_bytes: u64,
    /// How long a running source was paused, ms (`None`: it was stopped).
    pub pause_ms: Option<u64>,
    /// Whether the guest RAM is a file of its own (copies map it
    /// copy-on-write) and the state holds device state only.
    #[serde(default)]
    pub ram_file: bool,
    /// Whether the source's own disk was flattened onto the base image
    /// after the checkpoint (its chain had grown too deep): it backs onto
    /// no layer any more.
    #[serde(default)]
    pub source_flattened: bool,
}

/// Ids of checkpoints made for one fork start with this: they live only
/// until the copy runs, so [`Engine::sweep`] removes any it finds.
pub const FORK_CHECKPOINT_PREFIX: &str = "fork-";

fn yes() -> bool {
    true
}

/// State of a VM as the engine finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    Running,
    /// Saved to disk, no process: [`Engine::start`] restores it.
    Stopped,
    /// The VM is gone; the string says why (for an honest status).
    Dead(String),
}

/// Errors of the engine, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The guest images are missing or unusable.
    #[error("guest image problem: {0}")]
    Image(String),
    /// QEMU could not start or died; carries the tail of the console log.
    #[error("VM failed to start: {reason}\n--- console (last lines) ---\n{console_tail}")]
    Boot {
        reason: String,
        console_tail: String,
    },
    /// The agent did not answer in time.
    #[error("VM did not become ready within {secs} s: {reason}\n--- console (last lines) ---\n{console_tail}")]
    Timeout {
        secs: u64,
        reason: String,
        console_tail: String,
    },
    /// Host networking could not be set up.
    #[error("network setup failed: {0}")]
    Network(String),
    /// No such VM.
    #[error("no VM with id {0}")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A VM engine.
#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// The subnet guests get addresses from; the gateway is its first host address.
    fn subnet(&self) -> (Ipv4Addr, u8);
    /// Boots a VM and waits until its agent answers.
    async fn create(&self, spec: &SandboxSpec) -> Result<VmRuntime, EngineError>;
    /// Stops the VM and removes everything it had on the host (process, overlay, TAP, files).
    async fn destroy(&self, id: &str) -> Result<(), EngineError>;
    /// Saves a running VM to disk and ends its process, freeing its RAM; its
    /// disk and network stay. Stopping a stopped VM succeeds.
    async fn stop(&self, id: &str) -> Result<(), EngineError>;
    /// Restores a stopped VM (processes, sessions and listeners as they were)
    /// and waits until its agent answers. Starting a running VM succeeds.
    async fn start(&self, id: &str, rt: &VmRuntime) -> Result<(), EngineError>;
    /// Stops a running VM's vCPUs (thermal state "warm"); RAM and process stay.
    async fn pause(&self, id: &str) -> Result<(), EngineError>;
    /// Resumes a paused VM and sets its wall clock (it stood still while
    /// paused). Resuming a running VM succeeds.
    async fn resume(&self, id: &str, rt: &VmRuntime) -> Result<(), EngineError>;
    /// Whether a running VM's vCPUs are stopped (after a pause, or left so
    /// by a daemon that died mid-transition).
    async fn paused(&self, id: &str) -> Result<bool, EngineError>;
    /// Re-attaches to a VM left running by an earlier daemon, or reports it
    /// stopped or dead.
    async fn adopt(&self, id: &str, rt: &VmRuntime) -> VmState;
    /// Whether the VM is still there (running or stopped); cheap (no guest
    /// round trip), for periodic checks of running sandboxes.
    fn state(&self, id: &str) -> VmState;
    /// Removes host leftovers (dirs, TAPs, processes) of VMs not in `keep`,
    /// and those of forks cut short (checkpoints, quarantine namespaces).
    async fn sweep(&self, keep: &[String]) -> Result<(), EngineError>;
    /// A client of the VM's agent.
    fn agent(&self, id: &str, rt: &VmRuntime) -> AgentClient;
    /// Host disk the sandbox takes, in bytes actually allocated (its overlay,
    /// a saved memory state): sparse files count only what they use.
    fn disk_usage(&self, id: &str) -> Result<u64, EngineError>;
    /// Freezes VM `id` (running or stopped; a running VM is paused for the
    /// copy and runs on) into checkpoint `checkpoint`, its disk into the new
    /// layer `layer`, onto which the VM's own overlay then backs; or, if the
    /// VM wrote nothing since its disk was last frozen, into the layer it
    /// already backs onto (see [`CheckpointInfo::new_layer`]).
    /// `rt` reaches the VM's agent: a running VM's clock is set after the pause.
    async fn checkpoint(
        &self,
        id: &str,
        rt: &VmRuntime,
        checkpoint: &str,
        layer: &str,
    ) -> Result<CheckpointInfo, EngineError>;
    /// Boots `spec` from checkpoint `checkpoint` with an identity of its own
    /// (hostname, address, MAC, token, machine-id, env, reseeded RNG, clock);
    /// `parent_token` opens the copy's agent before it has taken it. The new
    /// VM's overlay backs onto the checkpoint's layer.
    async fn restore_checkpoint(
        &self,
        checkpoint: &str,
        parent_token: &str,
        spec: &SandboxSpec,
    ) -> Result<VmRuntime, EngineError>;
    /// Deletes a checkpoint's memory file (its layer stays; see [`Engine::delete_layer`]).
    async fn delete_checkpoint(&self, checkpoint: &str) -> Result<(), EngineError>;
    /// Deletes a disk layer; the caller makes sure no disk backs onto it any more.
    async fn delete_layer(&self, layer: &str) -> Result<(), EngineError>;
}
