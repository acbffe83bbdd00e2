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
    /// Where the guest may connect to (see [`crate::egress`]).
    pub egress: crate::egress::EgressPolicy,
    /// Sandboxes of one group reach each other over the bridge (the daemon
    /// uses the owner when its config allows it); `None`: no other sandbox.
    pub peer_group: Option<String>,
    /// Volumes, in device order (kept for the VM's life: a saved VM
    /// restores onto the same devices).
    pub volumes: Vec<VolumeSpec>,
    /// Custom base image (its id) the disk backs onto; `None`: the built rootfs.
    pub image: Option<String>,
    /// A template VM (docs/templates.md): booted without free page
    /// reporting, so that nothing punches holes into the RAM file its copies
    /// will map, and its checkpoint's RAM stays on disk only. Its copies,
    /// and their copies, inherit the setting from the checkpoint.
    pub template: bool,
}

/// A volume attached to a VM: its disk (by volume id) and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The volume's id: names its disk on the host and is the disk's serial in the guest.
    pub id: String,
    /// Absolute mount point in the guest.
    pub mount: String,
    pub read_only: bool,
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
    /// before its disk was frozen (its chain had reached the bound): the
    /// new layer backs onto the base, not onto the source's old layers.
    #[serde(default)]
    pub source_flattened: bool,
    /// The layer `layer` backs onto, read from its file (`None`: the base image).
    #[serde(default)]
    pub parent_layer: Option<String>,
    /// Whether the source reported free pages (see
    /// [`SandboxSpec::template`]); its copies get the same balloon device.
    /// `false`: nothing can punch the RAM file, so a kept checkpoint's copies
    /// map its copy on disk and no ramfs copy is kept.
    #[serde(default = "yes")]
    pub report_free_pages: bool,
}

/// Ids of checkpoints made for one fork start with this: they live only
/// until the copy runs, so [`Engine::sweep`] removes any it finds.
pub const FORK_CHECKPOINT_PREFIX: &str = "fork-";

/// Ids of the checkpoints of named snapshots start with this: one without
/// its snapshot row (a crash between the two) is removed at start-up (see
/// [`Engine::sweep_snapshot_checkpoints`]).
pub const SNAPSHOT_CHECKPOINT_PREFIX: &str = "snap-";

/// The disk layers as the files on the host say (see [`Engine::disk_layers`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskLayers {
    /// Every layer file: its id and the layer it backs onto (`None`: the base image).
    pub layers: BTreeMap<String, Option<String>>,
    /// Every VM with a readable disk: its id and the layer its own overlay
    /// backs onto (`None`: the base image).
    pub vms: BTreeMap<String, Option<String>>,
    /// Every checkpoint on the host: its id and its layer.
    pub checkpoints: BTreeMap<String, String>,
}

impl DiskLayers {
    /// The layers some VM disk or checkpoint needs, with everything under
    /// them.
    pub fn in_use(&self) -> std::collections::BTreeSet<String> {
        let mut used = std::collections::BTreeSet::new();
        let roots = self.vms.values().flatten().chain(self.checkpoints.values());
        for root in roots {
            let mut at = Some(root.clone());
            while let Some(l) = at {
                if !used.insert(l.clone()) {
                    break;
                }
                at = self.layers.get(&l).cloned().flatten();
            }
        }
        used
    }
}

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

/// Marks a disk layer's id among [`Engine::image_users`].
pub const LAYER_USER: &str = "layer:";

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
    /// Another operation on the VM is in progress; try again when it is done.
    #[error("{0}")]
    Busy(String),
    /// A VM, checkpoint or layer of that id (or a QEMU for it) already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The spec cannot be run as it is (id, size, address): the message says why.
    #[error("{0}")]
    InvalidSpec(String),
    /// The host's setup cannot run VMs (paths, acceleration).
    #[error("{0}")]
    Config(String),
    /// QEMU failed or refused a QMP command.
    #[error("{context}: {source}")]
    Qmp {
        /// What the engine was doing, e.g. "pausing VM sb_x".
        context: String,
        #[source]
        source: qemu::qmp::QmpError,
    },
    /// A disk image could not be created or read.
    #[error(transparent)]
    Disk(#[from] qemu::disks::DiskError),
    /// The VM's config drive could not be written or scrubbed.
    #[error(transparent)]
    ConfigDrive(#[from] qemu::config_drive::ConfigDriveError),
    /// The QEMU process could not be managed.
    #[error(transparent)]
    Process(#[from] qemu::process::ProcessError),
    /// A saved VM state (memory file, VM record) is missing or unusable, or
    /// saving or loading it failed.
    #[error("{0}")]
    State(String),
    /// The VM's agent could not be told something the engine must tell it.
    #[error("{context}: {source}")]
    Agent {
        context: String,
        #[source]
        source: agent_client::AgentError,
    },
    /// A volume's or custom image's disk could not be made, checked, grown
    /// or converted (host tools such as qemu-img, mke2fs, e2fsck, resize2fs,
    /// or the guest's own `sync`/`resize2fs`), or is missing.
    #[error("{0}")]
    Storage(String),
    /// An attached volume's disk grew to the size asked, but the guest did
    /// not grow its filesystem (the message says why). The disk keeps its
    /// new size; another grow redoes only the guest's half.
    #[error("the volume's disk grew, but its filesystem in the guest did not: {0}")]
    FilesystemNotGrown(String),
    /// A fault in the engine itself (a task that panicked, a record that
    /// cannot be serialised).
    #[error("{0}")]
    Internal(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// A QMP failure while doing `context`.
    pub fn qmp(context: impl Into<String>) -> impl FnOnce(qemu::qmp::QmpError) -> EngineError {
        let context = context.into();
        move |source| EngineError::Qmp { context, source }
    }
}

/// A VM engine.
#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// The subnet guests get addresses from; the gateway is its first host address.
    fn subnet(&self) -> (Ipv4Addr, u8);
    /// Everything a booted guest of this engine is made of (images, VMM
    /// version, accelerator, network plan), as text that changes whenever
    /// a guest booted now would differ from one booted before: templates
    /// are keyed by it (docs/templates.md). `None`: the engine keeps no
    /// templates (every create boots).
    fn template_basis(&self) -> Option<String> {
        None
    }
    /// Ids of the checkpoints on the host (recorded or not).
    fn checkpoint_ids(&self) -> Vec<String> {
        Vec::new()
    }
    /// Ids of the disk layers on the host (recorded or not).
    fn layer_ids(&self) -> Vec<String> {
        Vec::new()
    }
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
    /// Removes the checkpoints of named snapshots (ids starting with
    /// [`SNAPSHOT_CHECKPOINT_PREFIX`]) not in `keep` (a crash came between
    /// the checkpoint and its snapshot's row), and returns the ids in `keep`
    /// whose checkpoint is missing or incomplete (record, state, memory or
    /// layer file gone). Checkpoints of other prefixes stay.
    async fn sweep_snapshot_checkpoints(
        &self,
        _keep: &[String],
    ) -> Result<Vec<String>, EngineError> {
        Ok(Vec::new())
    }
    /// What the layer, VM disk and checkpoint files on the host back onto:
    /// the truth the store's layer records are repaired from after a crash.
    async fn disk_layers(&self) -> Result<DiskLayers, EngineError> {
        Ok(DiskLayers::default())
    }
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
    /// A fork: [`Engine::checkpoint`] of VM `id` into `checkpoint` and
    /// `layer`, and [`Engine::restore_checkpoint`] of it as `spec`, which an
    /// engine may run side by side (the default: one after the other).
    ///
    /// Errors: `Err` when the checkpoint failed (no copy was made). A
    /// checkpoint taken gives `Ok` with its info, which the caller records
    /// whatever the restore's own result (the second item) says.
    async fn fork(
        &self,
        id: &str,
        rt: &VmRuntime,
        checkpoint: &str,
        layer: &str,
        spec: &SandboxSpec,
    ) -> Result<(CheckpointInfo, Result<VmRuntime, EngineError>), EngineError> {
        let info = self.checkpoint(id, rt, checkpoint, layer).await?;
        let restored = self.restore_checkpoint(checkpoint, &rt.token, spec).await;
        Ok((info, restored))
    }
    /// Deletes a checkpoint's memory file (its layer stays; see [`Engine::delete_layer`]).
    async fn delete_checkpoint(&self, checkpoint: &str) -> Result<(), EngineError>;
    /// Deletes a disk layer; the caller makes sure no disk backs onto it any more.
    async fn delete_layer(&self, layer: &str) -> Result<(), EngineError>;
    /// Makes the disk of volume `id`: `size_mb` MiB, sparse, ext4 whose root
    /// directory belongs to uid/gid 1000 (the guest's `lohar` user).
    async fn create_volume(&self, id: &str, size_mb: u64) -> Result<(), EngineError>;
    /// Removes the disk of volume `id`; the caller makes sure no VM has it.
    async fn delete_volume(&self, id: &str) -> Result<(), EngineError>;
    /// Grows volume `id`'s disk and filesystem to `size_mb` MiB. `attached`:
    /// the running VM that has it read-write, whose guest grows the mounted
    /// filesystem; `None`: no VM has it, and it is grown on the host.
    async fn grow_volume(
        &self,
        id: &str,
        size_mb: u64,
        attached: Option<(&str, &VmRuntime)>,
    ) -> Result<(), EngineError>;
    /// Host bytes the volume's disk takes (allocated; the disk is sparse).
    fn volume_usage(&self, id: &str) -> Result<u64, EngineError>;
    /// Flattens VM `id`'s disk into the new custom image `image` (a running
    /// VM syncs, is paused for the copy and runs on); returns the image's
    /// host bytes.
    async fn save_image(&self, id: &str, rt: &VmRuntime, image: &str) -> Result<u64, EngineError>;
    /// Makes custom image `image` from the root filesystem tree `tree`
    /// (`mke2fs -d`, sparse, `size_mb` MiB); returns its host bytes.
    async fn import_image(
        &self,
        image: &str,
        tree: &std::path::Path,
        size_mb: u64,
    ) -> Result<u64, EngineError>;
    /// Removes custom image `image`'s file.
    async fn delete_image(&self, image: &str) -> Result<(), EngineError>;
    /// What backs onto custom image `image`: sandbox ids, and disk layer
    /// ids prefixed with [`LAYER_USER`]; empty: unused.
    fn image_users(&self, image: &str) -> Result<Vec<String>, EngineError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In use: every layer a VM disk or a checkpoint stands on, down its
    /// chain; a layer only another unused one backs onto is not.
    #[test]
    fn layers_in_use_follow_the_chains() {
        let some = |s: &str| Some(s.to_string());
        let d = DiskLayers {
            layers: [
                ("l1".to_string(), None),
                ("l2".to_string(), some("l1")),
                ("l3".to_string(), some("l2")),
                ("l4".to_string(), None),
                ("l5".to_string(), some("l4")),
                ("l6".to_string(), None),
            ]
            .into(),
            vms: [("a".to_string(), some("l2")), ("b".to_string(), None)].into(),
            checkpoints: [("snap-x".to_string(), "l4".to_string())].into(),
        };
        let used: Vec<String> = d.in_use().into_iter().collect();
        assert_eq!(used, ["l1", "l2", "l4"]);
    }
}
