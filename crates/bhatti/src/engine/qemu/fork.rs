//! Checkpoints and restores into a new identity (issue 13; design in
//! docs/forks.md).
//!
//! A checkpoint is a VM's memory (`<data_dir>/checkpoints/<id>/vm.state`,
//! QEMU's migration stream) and its disk frozen as a read-only qcow2 layer
//! (`<data_dir>/layers/<layer>.qcow2`). The VM keeps running: it is paused
//! while its overlay is swapped (QMP `blockdev-add` + `blockdev-snapshot` onto a new
//! overlay whose backing is the frozen layer) and its memory written.
//!
//! A restore boots a new sandbox from a checkpoint: its own overlay on the
//! layer, its own TAP, the checkpoint's memory. The copy wakes up as its
//! parent (address, MAC, token), so its TAP sits in a quarantine namespace
//! of its own until the agent has taken the new identity (IDENTITY), then
//! moves onto the bridge.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;

use super::lifecycle::read_meta;
use super::netns_dialer::{NetnsDialer, NetnsSockets};
use super::process::{self, NotReady, VmFiles};
use super::ramfile;
use super::snapshot::{load_state_from, wait_migration, FD_NAME, SAVE_BANDWIDTH};
use super::{
    blocking, check_id, config_drive, disks, net_err, network, QemuEngine, Vm, CONSOLE_TAIL_LINES,
};
use crate::engine::agent_client::{AgentClient, AgentError};
use crate::engine::{CheckpointInfo, DiskLayers, EngineError, SandboxSpec, VmRuntime};

/// The `-drive id=` of the root disk (see `process::qemu_argv`).
const ROOT_DRIVE: &str = "root";
/// Longest disk chain (overlay, layers, base) a running VM keeps after a
/// checkpoint; a deeper one is flattened onto the base.
const MAX_CHAIN: usize = 4;
/// How long flattening a chain may take.
const FLATTEN_TIMEOUT: Duration = Duration::from_secs(120);
/// A kept checkpoint's RAM on disk (in its dir), for after a host restart.
const DURABLE_RAM: &str = "mem.ram";
/// How long a restored copy's agent may take to accept its identity.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a checkpoint taken for a fork says which layer its disk is and
/// the disk's virtual size (bytes), once that file is final.
type Decided = tokio::sync::oneshot::Sender<(String, u64)>;

/// A restore started while its checkpoint is still being taken (a fork):
/// it waits on `layer` before it makes the copy's disk and starts QEMU,
/// and on `done` (the whole checkpoint) before QEMU reads guest memory.
struct Pending {
    layer: tokio::sync::oneshot::Receiver<(String, u64)>,
    done: tokio::sync::oneshot::Receiver<CheckpointInfo>,
}

/// `-m` and `-smp` of a VM's argv.
fn machine_size(argv: &[String]) -> Option<(u32, u32)> {
    let after = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse::<u32>().ok())
    };
    Some((after("-smp")?, after("-m")?))
}

/// `bytes` random bytes from the host's OS RNG, as lowercase hex.
pub(super) fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// The id of the layer under `layers_dir` that image `image` backs onto
/// (`None`: the base image, or no backing file).
pub(super) fn layer_of_backing(image: &Path, layers_dir: &Path) -> Option<String> {
    let backing = disks::info(image).ok()?.backing_filename?;
    layer_id_of(Path::new(&backing), layers_dir)
}

/// The layer id of `path` when it is a layer file under `layers_dir`.
pub(super) fn layer_id_of(path: &Path, layers_dir: &Path) -> Option<String> {
    if path.parent()? != layers_dir {
        return None;
    }
    let id = path.file_name()?.to_str()?.strip_suffix(".qcow2")?;
    check_id(id).ok().map(|()| id.to_string())
}

/// Writes a paused VM's state to `file` (device state only when the
/// capability `x-ignore-shared` is on and its RAM is its own file); the
/// caller resumes the VM.
async fn save_state(
    qmp: &super::qmp::Qmp,
    pid: u32,
    file: &std::fs::File,
    id: &str,
) -> Result<(), EngineError> {
    let err = |source| EngineError::Qmp {
        context: format!("checkpoint of {id}"),
        source,
    };
    let saved = async {
        qmp.getfd(FD_NAME, file.as_fd()).await.map_err(err)?;
        qmp.migrate(&format!("fd:{FD_NAME}")).await.map_err(err)?;
        wait_migration(qmp, pid, "checkpointing").await.map(|_| ())
    }
    .await;
    if saved.is_err() {
        let _ = qmp.migrate_cancel().await;
    }
    saved
}

impl QemuEngine {
    pub(super) fn checkpoints_dir(&self) -> PathBuf {
        self.sandboxes_dir.with_file_name("checkpoints")
    }

    pub(super) fn layers_dir(&self) -> PathBuf {
        self.sandboxes_dir.with_file_name("layers")
    }

    /// Where a layer's image lives.
    pub fn layer_path(&self, layer: &str) -> PathBuf {
        self.layers_dir().join(format!("{layer}.qcow2"))
    }

    fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.checkpoints_dir().join(id)
    }

    /// A checkpoint's guest RAM: on the engine's ramfs, where nothing can
    /// punch holes into it (see [`QemuEngine::cow_dir`]).
    fn checkpoint_ram(&self, id: &str) -> PathBuf {
        self.cow_dir.join(format!("{id}.ram"))
    }

    /// See [`crate::engine::Engine::checkpoint`].
    pub(super) async fn take_checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
        layer: &str,
    ) -> Result<CheckpointInfo, EngineError> {
        self.take_checkpoint_with(id, checkpoint, layer, None).await
    }

    /// [`take_checkpoint`](Self::take_checkpoint); a running VM's also
    /// sends on `decided` the layer the checkpoint's disk is and its
    /// virtual size as soon as that file is final (early in the pause, and
    /// once its RAM file, if any, has its full length), so that a copy can
    /// be started while the rest of the checkpoint runs.
    async fn take_checkpoint_with(
        &self,
        id: &str,
        checkpoint: &str,
        layer: &str,
        decided: Option<Decided>,
    ) -> Result<CheckpointInfo, EngineError> {
        check_id(id)?;
        check_id(checkpoint)?;
        check_id(layer)?;
        let files = VmFiles::new(self.sandbox_dir(id));
        let meta = read_meta(&files.meta).ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        let (cpus, memory_mb) = machine_size(&meta.argv).ok_or_else(|| {
            EngineError::State(format!("cannot read the machine size of VM {id}"))
        })?;
        let cp_dir = self.checkpoint_dir(checkpoint);
        let layer_path = self.layer_path(layer);
        if cp_dir.exists() || layer_path.exists() {
            return Err(EngineError::AlreadyExists(format!(
                "checkpoint {checkpoint} or layer {layer} already exists"
            )));
        }
        std::fs::create_dir_all(self.layers_dir())?;
        std::fs::create_dir_all(&cp_dir)?;
        std::fs::set_permissions(&cp_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let state = cp_dir.join("vm.state");
        // RAM in a file of its own: the checkpoint copies the file (holes
        // stay holes) and streams device state only.
        let ram = process::mem_backing(&meta.argv)
            .is_some_and(|(p, shared)| shared && p == files.ram)
            .then(|| (files.ram.clone(), self.checkpoint_ram(checkpoint)));
        let _busy = self.reserve(id)?;
        let started = Instant::now();
        // A layer frozen from a deep chain would hand that depth, plus one,
        // to every copy of it, and a fork of a fork of … would grow without
        // bound: a source at the bound is flattened onto the base first.
        let running = self.vm(id);
        // A running source that maps a RAM file on disk privately (a
        // template's copy): the stream reads its holes, see below.
        let reads_holes_of = running
            .as_ref()
            .map(|vm| vm.pid)
            .zip(process::mem_backing(&meta.argv))
            .filter(|(_, (p, shared))| !shared && !ramfile::is_ramfs(p))
            .map(|(pid, (p, _))| (pid, p));
        let source_flattened = (running.is_some() || files.state.is_file())
            && self
                .flatten_before_freeze(id, &files, running.is_some())
                .await;
        let result = match running {
            Some(vm) => {
                self.checkpoint_running(id, &vm, &files, &state, &layer_path, ram.clone(), decided)
                    .await
            }
            None if files.state.is_file() => {
                let ram = ram.clone().filter(|_| meta.saved_ram_in_file);
                self.checkpoint_stopped(&files, &state, &layer_path, ram)
                    .await
            }
            None => Err(EngineError::NotFound(id.to_string())),
        };
        let ((disk_size, pause, reused), ram_copy) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&cp_dir);
                if let Some((_, cp_ram)) = &ram {
                    let _ = std::fs::remove_file(cp_ram);
                }
                return Err(e);
            }
        };
        if let Some((pid, mapped)) = reads_holes_of {
            // Every hole the stream read is a page of zeros now mapped in
            // the source: give them back (docs/templates.md, "Memory"), a
            // second later, off the path of a fork's copy, which loads now.
            super::snapshot::page_out_holes_later(id, pid, &mapped);
        }
        let cp_ram = self.checkpoint_ram(checkpoint);
        let ram_file = cp_ram.exists();
        let new_layer = reused.is_none();
        let layer = reused.unwrap_or_else(|| layer.to_string());
        // What the layer backs onto, as the file says (the store records it).
        let parent_layer = {
            let (lp, layers) = (self.layer_path(&layer), self.layers_dir());
            blocking(move || layer_of_backing(&lp, &layers)).await?
        };
        let state_bytes = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0) + ram_copy.bytes;
        let layer_bytes = std::fs::metadata(self.layer_path(&layer))
            .map(|m| m.len())
            .unwrap_or(0);
        let info = CheckpointInfo {
            id: checkpoint.to_string(),
            layer: layer.clone(),
            new_layer,
            cpus,
            memory_mb,
            parent_ip: meta.ip,
            parent_mac: meta.mac.clone(),
            disk_size,
            state_bytes,
            layer_bytes,
            pause_ms: pause.map(|p| p.as_millis() as u64),
            ram_file,
            source_flattened,
            parent_layer,
            report_free_pages: process::reports_free_pages(&meta.argv),
        };
        if ram_file && !checkpoint.starts_with(crate::engine::FORK_CHECKPOINT_PREFIX) {
            // The ramfs does not outlive the host: a kept checkpoint (a
            // named snapshot) gets a copy on disk too, made after the pause.
            let (from, to) = (cp_ram.clone(), cp_dir.join(DURABLE_RAM));
            // Only the source's data ranges: the ramfs itself knows no holes.
            let extents = ram_copy.extents.clone();
            if let Err(e) = blocking(move || ramfile::copy_extents(&from, &to, &extents)).await? {
                let _ = std::fs::remove_dir_all(&cp_dir);
                let _ = std::fs::remove_file(&cp_ram);
                return Err(EngineError::State(format!(
                    "cannot keep the checkpoint's RAM on disk: {e}"
                )));
            }
            if !info.report_free_pages {
                // Nothing punches it: the copies map the disk copy (its
                // pages are then clean page cache the kernel can reclaim,
                // the ramfs's never are). docs/templates.md, "Memory".
                let _ = std::fs::remove_file(&cp_ram);
            }
        }
        let json =
            serde_json::to_vec_pretty(&info).map_err(|e| EngineError::Internal(e.to_string()))?;
        std::fs::write(cp_dir.join("checkpoint.json"), json)?;
        tracing::info!(id, checkpoint, layer = %info.layer, new_layer = info.new_layer, ram_file, pause_ms = ?info.pause_ms, state_mib = state_bytes >> 20, total_ms = started.elapsed().as_millis() as u64, "checkpoint taken");
        Ok(info)
    }

    /// A running VM: pause, swap its overlay onto a new one over the frozen
    /// layer, write its memory, resume. Returns the disk's virtual size, the
    /// pause, the reused layer (if any), and the RAM bytes copied.
    #[allow(clippy::too_many_arguments)]
    async fn checkpoint_running(
        &self,
        id: &str,
        vm: &Vm,
        files: &VmFiles,
        state: &Path,
        layer_path: &Path,
        ram: Option<(PathBuf, PathBuf)>,
        decided: Option<Decided>,
    ) -> Result<((u64, Option<Duration>, Option<String>), ramfile::Copied), EngineError> {
        let qmp = self.qmp_of(id).await?;
        let err = |source| EngineError::Qmp {
            context: format!("checkpoint of {id}"),
            source,
        };
        qmp.set_migrate_max_bandwidth(SAVE_BANDWIDTH)
            .await
            .map_err(err)?;
        qmp.set_ignore_shared(ram.is_some()).await.map_err(err)?;
        let p = state.to_path_buf();
        let file = blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
        })
        .await??;
        // An overlay with data keeps it: only an empty one needs a second
        // look once the guest stands still (fewer `qemu-img` runs in the pause).
        let maybe_empty = self.reusable_layer(files).await.is_some();
        // The RAM file is made, at its full length, before the pause: a
        // copy started during the checkpoint maps it at once (it reads it
        // only once the checkpoint is whole).
        let ram = match ram {
            Some((from, to)) => Some(
                blocking(move || -> std::io::Result<(PathBuf, std::fs::File)> {
                    let len = std::fs::metadata(&from)?.len();
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&to)?;
                    f.set_len(len)?;
                    Ok((from, f))
                })
                .await??,
            ),
            None => None,
        };
        let paused_at = Instant::now();
        qmp.stop().await.map_err(err)?;
        // The RAM copy is the longest step: it runs alongside the rest.
        let copy = ram.map(|(from, to)| {
            tokio::task::spawn_blocking(move || ramfile::copy_sparse_to(&from, &to))
        });
        let frozen = self
            .freeze_paused(id, &qmp, vm, files, &file, layer_path, maybe_empty, decided)
            .await;
        let copied = match copy {
            Some(h) => match h.await {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => Err(EngineError::State(format!("copying the RAM of {id}: {e}"))),
                Err(e) => Err(EngineError::Internal(format!("RAM copy task failed: {e}"))),
            },
            None => Ok(ramfile::Copied::default()),
        };
        let resumed = qmp.cont().await;
        let pause = paused_at.elapsed();
        let (size, reused) = frozen?;
        let ram_copy = copied?;
        resumed.map_err(err)?;
        blocking(move || file.sync_all()).await??;
        Ok(((size, Some(pause), reused), ram_copy))
    }

    /// The steps of a checkpoint while the VM is paused, but the RAM copy:
    /// the disk frozen into the layer (or the current layer reused), then
    /// the state stream into `file`. On error the disk is as before.
    #[allow(clippy::too_many_arguments)]
    async fn freeze_paused(
        &self,
        id: &str,
        qmp: &super::qmp::Qmp,
        vm: &Vm,
        files: &VmFiles,
        file: &std::fs::File,
        layer_path: &Path,
        maybe_empty: bool,
        decided: Option<Decided>,
    ) -> Result<(u64, Option<String>), EngineError> {
        let err = |source| EngineError::Qmp {
            context: format!("checkpoint of {id}"),
            source,
        };
        let reuse = if maybe_empty {
            self.reusable_layer(files).await
        } else {
            None
        };
        if let Some(current) = reuse {
            let size = disks::info(&files.overlay)?.virtual_size;
            if let Some(tx) = decided {
                let _ = tx.send((current.clone(), size));
            }
            save_state(qmp, vm.pid, file, id).await?;
            return Ok((size, Some(current)));
        }
        // The guest stands still: its disk (flushed by `stop`) becomes the layer.
        let next = files.dir.join("disk.next.qcow2");
        let (ov, lp, nx) = (
            files.overlay.clone(),
            layer_path.to_path_buf(),
            next.clone(),
        );
        let (size, overlay_file) =
            blocking(move || -> Result<(u64, std::fs::File), EngineError> {
                std::fs::rename(&ov, &lp)?;
                let undo = |e: EngineError| {
                    let _ = std::fs::rename(&lp, &ov);
                    let _ = std::fs::remove_file(&nx);
                    e
                };
                let size = disks::info(&lp).map_err(|e| undo(e.into()))?.virtual_size;
                disks::create_overlay_on_layer(&lp, &nx, size).map_err(|e| undo(e.into()))?;
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&nx)
                    .map_err(|e| undo(e.into()))?;
                Ok((size, f))
            })
            .await??;
        let switched = async {
            let set = qmp.add_fd(overlay_file.as_fd()).await?;
            let node = format!("ov-{}", random_hex(6));
            qmp.snapshot_onto(ROOT_DRIVE, &format!("/dev/fdset/{set}"), &node)
                .await
        }
        .await;
        if let Err(e) = switched {
            let _ = std::fs::rename(layer_path, &files.overlay);
            let _ = std::fs::remove_file(&next);
            return Err(err(e));
        }
        // From here the VM writes to the new overlay; its name is the one in argv.
        std::fs::rename(&next, &files.overlay)?;
        if let (Some(tx), Some(layer)) = (decided, layer_id_of(layer_path, &self.layers_dir())) {
            let _ = tx.send((layer, size));
        }
        save_state(qmp, vm.pid, file, id).await?;
        Ok((size, None))
    }

    /// Flattens VM `id`'s disk onto the base image when its chain (overlay,
    /// layers, base) has reached [`MAX_CHAIN`] and its overlay holds data of
    /// its own (an empty one is not frozen: its current layer is reused), so
    /// that the layer a checkpoint freezes next backs onto the base: every
    /// layer's chain then stays below the bound, and every disk on one
    /// (the source's and its copies') within it. A running VM streams its
    /// layers into its overlay (QMP `block-stream`, while it runs); a
    /// stopped one is rebased offline (`qemu-img rebase` onto the base,
    /// which copies the layers' data into the overlay). Returns whether it
    /// did. Failures only log: the chain stays valid, just deeper.
    async fn flatten_before_freeze(&self, id: &str, files: &VmFiles, running: bool) -> bool {
        let overlay = files.overlay.clone();
        let chain = match blocking(move || disks::backing_chain(&overlay)).await {
            Ok(Ok(c)) => c,
            _ => return false,
        };
        if chain.len() < MAX_CHAIN || self.reusable_layer(files).await.is_some() {
            return false;
        }
        let Some(base) = chain.last().cloned() else {
            return false;
        };
        if !running {
            let (overlay, b) = (files.overlay.clone(), base.clone());
            let started = Instant::now();
            return match blocking(move || disks::rebase_onto_base(&overlay, Path::new(&b))).await {
                Ok(Ok(())) => {
                    tracing::info!(
                        id,
                        depth = chain.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "stopped VM's disk chain flattened onto the base"
                    );
                    true
                }
                Ok(Err(e)) => {
                    tracing::warn!(id, depth = chain.len(), error = %e, "cannot flatten the disk chain");
                    false
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "cannot flatten the disk chain");
                    false
                }
            };
        }
        let started = Instant::now();
        let result = async {
            let qmp = self.qmp_of(id).await?;
            let job = format!("flatten-{}", random_hex(4));
            qmp.block_stream(&job, ROOT_DRIVE, &base)
                .await
                .map_err(|source| EngineError::Qmp {
                    context: format!("flattening the disk of {id}"),
                    source,
                })?;
            let deadline = Instant::now() + FLATTEN_TIMEOUT;
            loop {
                let jobs = qmp.block_jobs().await.map_err(|source| EngineError::Qmp {
                    context: format!("flattening the disk of {id}"),
                    source,
                })?;
                match jobs.iter().find(|j| j.device == job) {
                    None => break,
                    Some(j) if j.error.is_some() => {
                        return Err(EngineError::State(format!(
                            "block-stream failed: {}",
                            j.error.clone().unwrap_or_default()
                        )))
                    }
                    Some(_) if Instant::now() > deadline => {
                        return Err(EngineError::State("block-stream takes too long".into()))
                    }
                    Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            // The job is gone: done, or failed (then the chain is unchanged).
            let overlay = files.overlay.clone();
            let backing = blocking(move || disks::info(&overlay))
                .await??
                .backing_filename;
            if backing.as_deref() == Some(base.as_str()) {
                Ok(())
            } else {
                Err(EngineError::State(format!(
                    "after block-stream the disk backs onto {backing:?}, not {base}"
                )))
            }
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(
                    id,
                    depth = chain.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "disk chain flattened onto the base"
                );
                true
            }
            Err(e) => {
                tracing::warn!(id, depth = chain.len(), error = %e, "cannot flatten the disk chain");
                false
            }
        }
    }

    /// The layer `files`' overlay backs onto, if the overlay holds nothing
    /// of its own (so a checkpoint needs no new layer).
    async fn reusable_layer(&self, files: &VmFiles) -> Option<String> {
        let (overlay, layers) = (files.overlay.clone(), self.layers_dir());
        blocking(move || {
            let id = layer_of_backing(&overlay, &layers)?;
            disks::overlay_is_empty(&overlay).ok()?.then_some(id)
        })
        .await
        .ok()
        .flatten()
    }

    /// A stopped VM: its saved state is the checkpoint's memory (a hard
    /// link: a start removes the VM's own name for it); its overlay becomes
    /// the layer, and a new overlay on it takes its place.
    async fn checkpoint_stopped(
        &self,
        files: &VmFiles,
        state: &Path,
        layer_path: &Path,
        ram: Option<(PathBuf, PathBuf)>,
    ) -> Result<((u64, Option<Duration>, Option<String>), ramfile::Copied), EngineError> {
        let ram_copy = match ram {
            // Not a link: the VM's own file changes once it starts again.
            Some((from, to)) => blocking(move || ramfile::copy_sparse(&from, &to)).await??,
            None => ramfile::Copied::default(),
        };
        if let Some(current) = self.reusable_layer(files).await {
            let (f, st) = (files.clone(), state.to_path_buf());
            let size = blocking(move || -> Result<u64, EngineError> {
                std::fs::hard_link(&f.state, &st)?;
                Ok(disks::info(&f.overlay)?.virtual_size)
            })
            .await??;
            return Ok(((size, None, Some(current)), ram_copy));
        }
        let (f, st, lp) = (files.clone(), state.to_path_buf(), layer_path.to_path_buf());
        let size = blocking(move || -> Result<u64, EngineError> {
            std::fs::hard_link(&f.state, &st)?;
            freeze_offline(&f, &lp)
        })
        .await??;
        Ok(((size, None, None), ram_copy))
    }

    /// See [`crate::engine::Engine::delete_checkpoint`].
    pub(super) async fn remove_checkpoint(&self, checkpoint: &str) -> Result<(), EngineError> {
        check_id(checkpoint)?;
        // Copies that map it keep its pages until they exit.
        match std::fs::remove_file(self.checkpoint_ram(checkpoint)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        match std::fs::remove_dir_all(self.checkpoint_dir(checkpoint)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// See [`crate::engine::Engine::delete_layer`].
    pub(super) async fn remove_layer(&self, layer: &str) -> Result<(), EngineError> {
        check_id(layer)?;
        match std::fs::remove_file(self.layer_path(layer)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// See [`crate::engine::Engine::restore_checkpoint`].
    pub(super) async fn restore_into(
        &self,
        checkpoint: &str,
        parent_token: &str,
        spec: &SandboxSpec,
    ) -> Result<VmRuntime, EngineError> {
        check_id(checkpoint)?;
        let cp: CheckpointInfo =
            std::fs::read(self.checkpoint_dir(checkpoint).join("checkpoint.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| EngineError::NotFound(format!("checkpoint {checkpoint}")))?;
        self.restore_copy(cp, parent_token, spec, None).await
    }

    /// See [`crate::engine::Engine::fork`]: a running source's checkpoint
    /// and the copy's restore run side by side. The copy's overlay, its
    /// quarantine and its QEMU (`-incoming defer`) are made while the
    /// source is paused and its RAM copied; the copy loads its memory once
    /// the checkpoint is whole. A stopped source is checkpointed first.
    pub(super) async fn fork_into(
        &self,
        id: &str,
        rt: &VmRuntime,
        checkpoint: &str,
        layer: &str,
        spec: &SandboxSpec,
    ) -> Result<(CheckpointInfo, Result<VmRuntime, EngineError>), EngineError> {
        let parent_token = rt.token.as_str();
        check_id(id)?;
        check_id(checkpoint)?;
        let files = VmFiles::new(self.sandbox_dir(id));
        // What the copy needs before the checkpoint ends: the source's
        // machine, address and MAC, and whether its RAM is a file.
        let early = match (self.vm(id), read_meta(&files.meta)) {
            (Some(_), Some(meta)) => {
                machine_size(&meta.argv).map(|(cpus, memory_mb)| CheckpointInfo {
                    id: checkpoint.to_string(),
                    layer: String::new(),
                    new_layer: true,
                    cpus,
                    memory_mb,
                    parent_ip: meta.ip,
                    parent_mac: meta.mac.clone(),
                    disk_size: 0,
                    state_bytes: 0,
                    layer_bytes: 0,
                    pause_ms: None,
                    ram_file: process::mem_backing(&meta.argv)
                        .is_some_and(|(p, shared)| shared && p == files.ram),
                    source_flattened: false,
                    parent_layer: None,
                    report_free_pages: process::reports_free_pages(&meta.argv),
                })
            }
            _ => None,
        };
        let Some(early) = early else {
            let info = self.take_checkpoint(id, checkpoint, layer).await?;
            self.clock_after_checkpoint(id, rt, &info).await;
            let restored = self.restore_into(checkpoint, parent_token, spec).await;
            return Ok((info, restored));
        };
        let (layer_tx, layer_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let checkpointed = async {
            let r = self
                .take_checkpoint_with(id, checkpoint, layer, Some(layer_tx))
                .await;
            if let Ok(info) = &r {
                let _ = done_tx.send(info.clone());
                self.clock_after_checkpoint(id, rt, info).await;
            }
            r
        };
        let pending = Pending {
            layer: layer_rx,
            done: done_rx,
        };
        let restored = self.restore_copy(early, parent_token, spec, Some(pending));
        let (info, restored) = tokio::join!(checkpointed, restored);
        // A failed checkpoint failed the restore too (it was waiting for it).
        Ok((info?, restored))
    }

    /// Restores `spec` from checkpoint `cp` (see `restore_into`); with
    /// `pending`, from one still being taken.
    async fn restore_copy(
        &self,
        cp: CheckpointInfo,
        parent_token: &str,
        spec: &SandboxSpec,
        pending: Option<Pending>,
    ) -> Result<VmRuntime, EngineError> {
        self.check_spec(spec)?;
        let checkpoint = cp.id.as_str();
        let cp_dir = self.checkpoint_dir(checkpoint);
        let (files, mut guard) = self.begin_create(spec)?;
        self.remove_leftovers(&spec.id, &files, None, None).await?;
        std::fs::create_dir_all(&files.dir)?;
        std::fs::set_permissions(
            &files.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        guard.armed = true;
        let qns = network::quarantine_netns(&self.net, &spec.id);
        let started = Instant::now();
        match self
            .restore_steps(
                &cp,
                &cp_dir,
                parent_token,
                spec,
                &files,
                &qns,
                &guard.pid,
                pending,
            )
            .await
        {
            Ok(vm) => {
                guard.armed = false;
                tracing::info!(id = %spec.id, checkpoint, ms = started.elapsed().as_millis() as u64, "VM restored into a new identity");
                self.registry().insert(spec.id.clone(), vm);
                Ok(VmRuntime {
                    ip: spec.ip,
                    token: spec.token.clone(),
                })
            }
            Err(e) => {
                tracing::warn!(id = %spec.id, error = %e, "restore into a new identity failed; cleaning up");
                if let Some(pid) = guard.pid.lock().ok().and_then(|p| *p) {
                    process::kill(pid);
                    process::wait_exit(pid, Duration::from_secs(5)).await;
                }
                let q = qns.clone();
                let _ = blocking(move || network::quarantine_delete(&q)).await;
                if let Err(ce) = self
                    .remove_leftovers(&spec.id, &files, Some(spec.ip), None)
                    .await
                {
                    tracing::warn!(id = %spec.id, error = %ce, "cleanup after failed restore incomplete");
                }
                guard.armed = false;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_steps(
        &self,
        cp: &CheckpointInfo,
        cp_dir: &Path,
        parent_token: &str,
        spec: &SandboxSpec,
        files: &VmFiles,
        qns: &str,
        pid_slot: &Mutex<Option<u32>>,
        pending: Option<Pending>,
    ) -> Result<Arc<Vm>, EngineError> {
        // A checkpoint with a RAM file: mapped copy-on-write, shared with
        // every other copy of it. Else the stream carries the RAM, loaded
        // into anonymous memory (see `process::with_anonymous_ram`).
        let durable = cp_dir.join(DURABLE_RAM);
        // No free page reporting in the copies: nothing can punch the disk
        // copy, which they map as it is.
        let cp_ram = if cp.report_free_pages || !durable.exists() {
            self.checkpoint_ram(&cp.id)
        } else {
            durable.clone()
        };
        if cp.ram_file && !cp_ram.exists() && durable.exists() {
            // After a host restart: back onto the ramfs from the disk copy,
            // under a name of this copy's own, renamed when whole: a crash
            // midway must not leave a partial file under the checkpoint's
            // name (every later resume would map it), and concurrent resumes
            // must not write one file. The start-up sweep removes a partial
            // one (no checkpoint dir of its name).
            let part = self.cow_dir.join(format!("{}.{}.ram", cp.id, spec.id));
            let (from, to, done) = (durable.clone(), part.clone(), cp_ram.clone());
            blocking(move || {
                ramfile::copy_sparse(&from, &to)?;
                std::fs::rename(&to, &done).inspect_err(|_| {
                    let _ = std::fs::remove_file(&to);
                })
            })
            .await?
            .map_err(|e| EngineError::State(format!("cannot load the checkpoint's RAM: {e}")))?;
        }
        let mem = if cp.ram_file {
            process::MemBacking {
                path: &cp_ram,
                shared: false,
            }
        } else {
            process::MemBacking {
                path: &files.ram,
                shared: true,
            }
        };
        let mut meta = self.vm_meta(
            spec,
            cp.cpus,
            cp.memory_mb,
            files,
            mem,
            cp.report_free_pages,
        );
        if !cp.ram_file {
            if let Some(argv) = process::with_anonymous_ram(&meta.argv) {
                meta.argv = argv;
            }
        }
        let (tap, mac, argv) = (meta.tap.clone(), meta.mac.clone(), meta.argv.clone());
        let record = meta.clone();
        // The guest read its boot config long ago; QEMU only needs the file.
        let boot = config_drive::scrubbed(&self.boot_config(spec));
        let (net, f, q, t, pip, pmac) = (
            self.net.clone(),
            files.clone(),
            qns.to_string(),
            tap.clone(),
            cp.parent_ip,
            cp.parent_mac.clone(),
        );
        let t0 = Instant::now();
        // Disk and network side by side: both are a few processes long.
        let quarantine =
            tokio::task::spawn_blocking(move || network::quarantine_up(&net, &q, &t, pip, &pmac));
        let (mut pending_done, decided) = match pending {
            Some(p) => (Some(p.done), p.layer.await.ok()),
            None => (None, Some((cp.layer.clone(), cp.disk_size))),
        };
        let files_made = match decided {
            Some((layer_id, size)) => {
                let layer = self.layer_path(&layer_id);
                blocking(move || -> Result<String, EngineError> {
                    disks::create_overlay_on_layer(&layer, &f.overlay, size)?;
                    config_drive::write(&f.config, &boot)?;
                    let meta_json = serde_json::to_vec_pretty(&meta)
                        .map_err(|e| EngineError::Internal(format!("VM record: {e}")))?;
                    std::fs::write(&f.meta, meta_json)?;
                    Ok(layer_id)
                })
                .await
            }
            None => Ok(Err(EngineError::State(
                "the checkpoint of the source failed".into(),
            ))),
        };
        quarantine
            .await
            .map_err(|e| EngineError::Internal(format!("engine task failed: {e}")))?
            .map_err(net_err)?;
        let layer_id = files_made??;
        let prepared = t0.elapsed();

        let mut argv_in = argv.clone();
        argv_in.extend(["-incoming".to_string(), "defer".to_string()]);
        let pid = process::launch(&self.cfg.qemu_binary, qns, &argv_in, &files.pidfile)
            .await
            .map_err(|e| EngineError::Boot {
                reason: format!("cannot start QEMU to restore the checkpoint: {e}"),
                console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
            })?;
        if let Ok(mut p) = pid_slot.lock() {
            *p = Some(pid);
        }
        let launched = t0.elapsed();
        // The quarantine's socket thread starts while QEMU loads.
        let q = qns.to_string();
        let qsockets = tokio::task::spawn_blocking(move || NetnsSockets::new(&q));
        if let Some(done) = pending_done.take() {
            // QEMU has only mapped the RAM file so far: it reads guest
            // memory from here on, once the checkpoint is whole.
            let whole = done
                .await
                .map_err(|_| EngineError::State("the checkpoint of the source failed".into()))?;
            if whole.ram_file != cp.ram_file || whole.layer != layer_id {
                return Err(EngineError::State(format!(
                    "checkpoint {} is not what its copy was started for",
                    whole.id
                )));
            }
        }
        let waited = t0.elapsed();
        let qmp = load_state_from(files, &cp_dir.join("vm.state"), pid, cp.ram_file).await?;
        qmp.cont().await.map_err(|e| EngineError::Boot {
            reason: format!("the restored VM does not resume: {e}"),
            console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
        })?;
        let loaded = t0.elapsed();

        // The copy answers as its parent, inside the quarantine namespace.
        let qsockets = qsockets
            .await
            .map_err(|e| EngineError::Internal(format!("engine task failed: {e}")))?
            .map_err(|e| EngineError::Network(e.to_string()))?;
        let parent_dialer = NetnsDialer::new(qsockets, cp.parent_ip);
        // Its rules must be in place before its TAP joins the bridge: they
        // go in (an `nft` run) while the guest comes up.
        let (firewall, ready) = tokio::join!(
            self.install_firewall(&record),
            process::wait_ready_quick(
                &parent_dialer,
                parent_token.as_bytes(),
                pid,
                IDENTITY_TIMEOUT,
            )
        );
        firewall?;
        match ready {
            Ok(()) => {}
            Err(NotReady::Died) => {
                return Err(EngineError::Boot {
                    reason: format!("QEMU (pid {pid}) exited right after the restore"),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
            Err(NotReady::Timeout(last)) => {
                return Err(EngineError::Timeout {
                    secs: IDENTITY_TIMEOUT.as_secs(),
                    reason: format!(
                        "the restored copy does not answer as its parent (last attempt: {last})"
                    ),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
        }
        let answered = t0.elapsed();
        let parent = AgentClient::new(Arc::new(parent_dialer), parent_token.as_bytes().to_vec());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let identity = bhatti_proto::Identity {
            hostname: spec.name.clone(),
            ip: format!("{}/{}", spec.ip, self.net.subnet.prefix()),
            gateway: self.net.subnet.gateway().to_string(),
            mac: mac.clone(),
            token: spec.token.clone(),
            machine_id: random_hex(16),
            env: spec.env.clone(),
            entropy_hex: random_hex(bhatti_proto::IDENTITY_ENTROPY_BYTES),
            time_unix_ms: now_ms,
            // Set only for a template-born sandbox (the service clears it for copies).
            init: spec.init.clone(),
        };
        let deadline = Instant::now() + IDENTITY_TIMEOUT;
        loop {
            if !process::pid_alive(pid) {
                return Err(EngineError::Boot {
                    reason: format!("QEMU (pid {pid}) exited right after the restore"),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                });
            }
            match parent.identity(&identity).await {
                Ok(_) => break,
                Err(AgentError::Connect(_) | AgentError::Frame(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // The agent answered and refused: say why, at once.
                Err(e @ AgentError::Remote { .. }) => {
                    return Err(EngineError::Boot {
                        reason: format!("the restored copy refused its new identity: {e}"),
                        console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                    })
                }
                Err(e) => {
                    return Err(EngineError::Timeout {
                        secs: IDENTITY_TIMEOUT.as_secs(),
                        reason: format!("the restored copy did not take its new identity: {e}"),
                        console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                    })
                }
            }
        }
        drop(parent);
        let identified = t0.elapsed();
        let (net, q, t, ip, m) = (
            self.net.clone(),
            qns.to_string(),
            tap.clone(),
            spec.ip,
            mac.clone(),
        );
        blocking(move || network::quarantine_release(&net, &q, &t, ip, &m))
            .await?
            .map_err(net_err)?;
        let released = t0.elapsed();
        let dialer = NetnsDialer::new(self.sockets.clone(), spec.ip);
        match process::wait_ready_quick(&dialer, spec.token.as_bytes(), pid, self.boot_timeout)
            .await
        {
            Ok(()) => {}
            Err(NotReady::Died) => {
                return Err(EngineError::Boot {
                    reason: format!("QEMU (pid {pid}) exited after the copy took its identity"),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
            Err(NotReady::Timeout(last)) => {
                return Err(EngineError::Timeout {
                    secs: self.boot_timeout.as_secs(),
                    reason: format!(
                        "the copy never answered at its new address {} (last attempt: {last})",
                        spec.ip
                    ),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
        }
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            id = %spec.id,
            prepare_ms = ms(prepared),
            launch_ms = ms(launched - prepared),
            wait_ms = ms(waited - launched),
            load_ms = ms(loaded - waited),
            answer_ms = ms(answered - loaded),
            identity_ms = ms(identified - answered),
            release_ms = ms(released - identified),
            ready_ms = ms(t0.elapsed() - released),
            "restore phases"
        );
        Ok(Arc::new(Vm {
            files: files.clone(),
            pid,
            ip: spec.ip,
            tap,
            qmp: tokio::sync::Mutex::new(Some(Arc::new(qmp))),
        }))
    }

    /// Depth of a sandbox's disk chain (overlay, layers, base), for tests and diagnostics.
    pub fn disk_chain_depth(&self, id: &str) -> Result<usize, EngineError> {
        Ok(disks::chain_depth(
            &VmFiles::new(self.sandbox_dir(id)).overlay,
        )?)
    }

    /// Removes what a crash mid-fork leaves: fork checkpoints (a fork's
    /// checkpoint lives only until its copy runs, and no fork is under way
    /// while the daemon starts), and checkpoint RAM files without their
    /// checkpoint. Named snapshots' checkpoints stay.
    pub(super) fn sweep_checkpoints(&self) {
        let dir = self.checkpoints_dir();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(crate::engine::FORK_CHECKPOINT_PREFIX) && check_id(&name).is_ok() {
                tracing::info!(checkpoint = %name, "sweep: removing a fork's leftover checkpoint");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        for e in std::fs::read_dir(&self.cow_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(cp) = name.strip_suffix(".ram") else {
                continue;
            };
            if !dir.join(cp).is_dir() {
                tracing::info!(checkpoint = %cp, "sweep: removing a leftover checkpoint RAM file");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Removes quarantine namespaces no restore uses (after a crash).
    pub(super) fn sweep_quarantines(&self) {
        let busy: Vec<String> = self
            .busy
            .lock()
            .map(|b| {
                b.iter()
                    .map(|id| network::quarantine_netns(&self.net, id))
                    .collect()
            })
            .unwrap_or_default();
        for q in network::list_quarantines(&self.net) {
            if !busy.contains(&q) {
                tracing::info!(netns = %q, "sweep: removing a leftover quarantine namespace");
                network::quarantine_delete(&q);
            }
        }
    }
}

/// See [`crate::engine::Engine::sweep_snapshot_checkpoints`]: checkpoints
/// live in `checkpoints_dir`, their RAM in `cow_dir`, layers in `layers_dir`.
pub(super) fn sweep_snapshot_checkpoints(
    checkpoints_dir: &Path,
    cow_dir: &Path,
    layers_dir: &Path,
    keep: &[String],
) -> Vec<String> {
    for e in std::fs::read_dir(checkpoints_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(crate::engine::SNAPSHOT_CHECKPOINT_PREFIX)
            && check_id(&name).is_ok()
            && !keep.contains(&name)
        {
            tracing::info!(checkpoint = %name, "sweep: removing a snapshot checkpoint without its snapshot");
            let _ = std::fs::remove_dir_all(e.path());
            let _ = std::fs::remove_file(cow_dir.join(format!("{name}.ram")));
        }
    }
    keep.iter()
        .filter(|id| {
            let dir = checkpoints_dir.join(id);
            let whole = std::fs::read(dir.join("checkpoint.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<CheckpointInfo>(&b).ok())
                .is_some_and(|cp| {
                    dir.join("vm.state").is_file()
                        && layers_dir.join(format!("{}.qcow2", cp.layer)).is_file()
                        && (!cp.ram_file
                            || dir.join(DURABLE_RAM).is_file()
                            || cow_dir.join(format!("{id}.ram")).is_file())
                });
            check_id(id).is_err() || !whole
        })
        .cloned()
        .collect()
}

/// See [`crate::engine::Engine::disk_layers`].
pub(super) fn disk_layers(
    sandboxes_dir: &Path,
    checkpoints_dir: &Path,
    layers_dir: &Path,
) -> DiskLayers {
    let mut out = DiskLayers::default();
    let entries = |dir: &Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect()
    };
    for (name, path) in entries(layers_dir) {
        if let Some(id) = layer_id_of(&path, layers_dir) {
            out.layers.insert(id, layer_of_backing(&path, layers_dir));
        } else {
            tracing::debug!(file = %name, "not a layer file");
        }
    }
    for (name, path) in entries(sandboxes_dir) {
        let overlay = VmFiles::new(path).overlay;
        if check_id(&name).is_err() || !overlay.is_file() {
            continue;
        }
        if let Ok(info) = disks::info(&overlay) {
            let layer = info
                .backing_filename
                .and_then(|b| layer_id_of(Path::new(&b), layers_dir));
            out.vms.insert(name, layer);
        }
    }
    for (name, path) in entries(checkpoints_dir) {
        let cp = std::fs::read(path.join("checkpoint.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<CheckpointInfo>(&b).ok());
        if let Some(cp) = cp {
            out.checkpoints.insert(name, cp.layer);
        }
    }
    out
}

/// The files a process has open, each with whether it is open for writing
/// (from `/proc/<pid>/fd` and `fdinfo`). Empty when they cannot be read.
fn open_files(pid: u32) -> Vec<(PathBuf, bool)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        // `flags:` is octal; O_WRONLY 01, O_RDWR 02.
        let writable = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|f| f & 0o3 != 0);
        out.push((target, writable));
    }
    out
}

/// Names, in a VM dir, the layer an offline disk freeze is turning the
/// VM's overlay into (its absolute path); present only while the freeze
/// runs, so that a crash in the middle can be undone (see [`freeze_offline`]).
pub const FREEZE_MARKER: &str = "freeze.layer";

/// Writes `path` with `text` and makes it and its name durable.
fn write_durable(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Freezes a stopped VM's overlay into the layer `layer_path` and puts a
/// new overlay on it in its place; returns the disk's virtual size. The
/// steps are ordered so that a crash anywhere leaves a state
/// [`repair_interrupted_freeze`] undoes: the marker naming the layer is
/// written (durably) first, the new overlay is made aside as
/// `disk.next.qcow2`, then the overlay is renamed into the layer, the new
/// one into its place, and the marker goes last. On error the disk is as
/// before.
fn freeze_offline(files: &VmFiles, layer_path: &Path) -> Result<u64, EngineError> {
    let marker = files.dir.join(FREEZE_MARKER);
    let next = files.dir.join("disk.next.qcow2");
    let size = disks::info(&files.overlay)?.virtual_size;
    let layer_text = layer_path
        .to_str()
        .ok_or_else(|| EngineError::Internal("layer path is not UTF-8".into()))?;
    write_durable(&marker, layer_text)?;
    let undo = |e: EngineError| {
        if !files.overlay.exists() && layer_path.is_file() {
            let _ = std::fs::rename(layer_path, &files.overlay);
        }
        let _ = std::fs::remove_file(&next);
        let _ = std::fs::remove_file(&marker);
        e
    };
    disks::create_overlay_on_layer(layer_path, &next, size).map_err(|e| undo(e.into()))?;
    std::fs::rename(&files.overlay, layer_path).map_err(|e| undo(e.into()))?;
    std::fs::rename(&next, &files.overlay).map_err(|e| undo(e.into()))?;
    // The marker goes only once the renames are on disk.
    std::fs::File::open(&files.dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| undo(e.into()))?;
    std::fs::remove_file(&marker)?;
    Ok(size)
}

/// Undoes an offline freeze (see [`freeze_offline`]) a crash cut short,
/// when the marker is there: the VM is stopped (no QEMU), so its old
/// overlay, renamed into the layer or not, is still its disk whole; a new
/// overlay made aside goes. Returns whether a marker was found.
fn repair_offline_freeze(id: &str, files: &VmFiles) -> bool {
    let marker = files.dir.join(FREEZE_MARKER);
    let Ok(layer) = std::fs::read_to_string(&marker) else {
        return false;
    };
    let layer = PathBuf::from(layer.trim());
    let next = files.dir.join("disk.next.qcow2");
    let repaired = if files.overlay.exists() {
        // Not renamed yet, or the new overlay is in place already (the
        // layer then stays: its copies' store rows, if any, are repaired
        // by the daemon's layer reconciliation).
        Ok(())
    } else if layer.is_file() {
        tracing::warn!(id, layer = %layer.display(), "rolling an interrupted offline disk freeze back");
        std::fs::rename(&layer, &files.overlay)
    } else {
        tracing::error!(id, layer = %layer.display(), "the VM's disk file and the layer it was being frozen into are both missing");
        return true;
    };
    match repaired {
        Ok(()) => {
            let _ = std::fs::remove_file(&next);
            let _ = std::fs::remove_file(&marker);
        }
        Err(e) => {
            tracing::error!(id, error = %e, "cannot undo an interrupted offline disk freeze")
        }
    }
    true
}

/// Repairs the disk files of VM dir `files` when a crash cut a running
/// VM's freeze short (see `freeze_paused`): its overlay renamed into a
/// layer under `layers_dir`, and the new overlay `disk.next.qcow2` not yet
/// renamed to `disk.qcow2`. `pid` is the VM's live QEMU, if any: it
/// decides. If QEMU has the new overlay open it was switched onto it: roll
/// forward (the new overlay becomes `disk.qcow2`; its layer stays, not
/// recorded, so never collected, but the chain is valid). Otherwise the
/// layer file QEMU still writes to is the old overlay: roll back. With no
/// QEMU, a complete new overlay on an existing layer holds the disk either
/// way: roll forward. Failures only log: the VM runs on its open files.
pub(super) fn repair_interrupted_freeze(
    id: &str,
    files: &VmFiles,
    layers_dir: &Path,
    pid: Option<u32>,
) {
    if pid.is_none() && repair_offline_freeze(id, files) {
        return;
    }
    let next = files.dir.join("disk.next.qcow2");
    let open = pid.map(open_files).unwrap_or_default();
    let next_open = open.iter().any(|(p, _)| *p == next);
    if files.overlay.exists() {
        // An undo that did not get to remove the unused new overlay.
        if next.exists() && !next_open {
            let _ = std::fs::remove_file(&next);
        }
        return;
    }
    let repaired = if next_open {
        tracing::warn!(id, "rolling an interrupted disk freeze forward");
        std::fs::rename(&next, &files.overlay)
    } else if pid.is_some() {
        let Some((old, _)) = open
            .iter()
            .find(|(p, w)| *w && p.starts_with(layers_dir) && p.is_file())
        else {
            tracing::error!(
                id,
                "the VM's disk file is missing and its QEMU holds no layer open for writing"
            );
            return;
        };
        tracing::warn!(id, layer = %old.display(), "rolling an interrupted disk freeze back");
        let r = std::fs::rename(old, &files.overlay);
        if r.is_ok() {
            let _ = std::fs::remove_file(&next);
        }
        r
    } else {
        let layer = disks::info(&next)
            .ok()
            .and_then(|i| i.backing_filename)
            .map(PathBuf::from)
            .filter(|l| l.starts_with(layers_dir) && l.is_file());
        if layer.is_none() {
            tracing::error!(
                id,
                "the VM's disk file is missing and no complete new overlay replaces it"
            );
            return;
        }
        tracing::warn!(
            id,
            "rolling an interrupted disk freeze forward (VM not running)"
        );
        std::fs::rename(&next, &files.overlay)
    };
    if let Err(e) = repaired {
        tracing::error!(id, error = %e, "cannot repair the VM's disk files after an interrupted freeze");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_size_from_argv() {
        let argv: Vec<String> = ["-M", "microvm", "-m", "512", "-smp", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(machine_size(&argv), Some((2, 512)));
        assert_eq!(machine_size(&argv[..4]), None);
    }
}
