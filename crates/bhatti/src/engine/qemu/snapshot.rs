//! Stop and start: a VM saved to disk with QEMU's migration, its process
//! ended (RAM freed), and later restored from that file with everything the
//! guest had running: processes, TTY sessions, listeners.
//!
//! The daemon opens the state file itself and hands QEMU the descriptor over
//! QMP (`getfd`, then `fd:` URIs): QEMU runs as `nobody` and cannot open
//! anything in the root-only sandbox dir, and 7.2 has no `file:` URI.
//! Zero pages cost nothing in the stream: a fresh 512 MiB guest is ~100 MiB.
//!
//! Invariant: while `vm.state` exists the guest has not run since it was
//! saved (start removes the file before resuming the guest). So a QEMU found
//! next to a state file (a crash mid-stop or mid-start) may be killed, and
//! the file restored, without the guest's memory and disk disagreeing.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lifecycle::read_meta;
use super::netns_dialer::NetnsDialer;
use super::process::{self, NotReady, VmFiles};
use super::qmp::commands::{MigrationInfo, MigrationStatus};
use super::qmp::{Qmp, QmpError};
use super::{blocking, check_id, net_err, network, ramfile, QemuEngine, Vm, CONSOLE_TAIL_LINES};
use crate::engine::{EngineError, VmRuntime};

/// Name of the state file's descriptor inside QEMU.
pub(super) const FD_NAME: &str = "bhatti-state";
/// Migration speed cap while saving: effectively none (see [`Qmp::set_migrate_max_bandwidth`]).
pub(super) const SAVE_BANDWIDTH: u64 = 1 << 40;
/// How long saving or loading a VM's state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// The `-drive` option without which QEMU cannot save the VM (see `process::qemu_argv`).
const DRIVE_OPTION: &str = "auto-read-only=off";
/// Interval of `query-migrate` polls (one costs well under a millisecond).
const POLL: Duration = Duration::from_millis(5);

/// The state file while it is being written; renamed once complete.
pub(super) fn partial_state(files: &VmFiles) -> PathBuf {
    files.dir.join("vm.state.tmp")
}

fn save_err(source: QmpError) -> EngineError {
    EngineError::Qmp {
        context: "saving the VM to disk failed".into(),
        source,
    }
}

/// Pages out, a second later and in the background, the pages with which
/// VM `pid` maps the holes of its RAM file `ram`
/// ([`ramfile::page_out_holes`]); best effort. For the two ways a running
/// VM ends up mapping pages of zeros over a file's holes: a stream loaded
/// into its own RAM file (QEMU read every page the stream said was zero,
/// to see whether to clear it: 585 MiB RSS measured for a 512 MB guest with
/// ~90 MiB of data), and a streamed checkpoint of a VM mapping a template's
/// file on disk (the stream read every page: 512 MiB resident). The delay
/// keeps it off the path of the restore or fork under way, which wants
/// both cores.
pub(super) fn page_out_holes_later(id: &str, pid: u32, ram: &Path) {
    let (id, ram) = (id.to_string(), ram.to_path_buf());
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        match ramfile::page_out_holes(pid, &ram) {
            // The VM or its file went meanwhile: nothing left to give back.
            Err(e)
                if e.raw_os_error() == Some(libc::ESRCH)
                    || e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(id, file = %ram.display(), error = %e, "cannot page out the zero pages a VM maps")
            }
            Ok(_) => {}
        }
    });
}

/// Resident bytes of a RAM file beyond its data that are not worth a
/// retry after a save (the kernel's read-ahead around the data).
const HOLE_SLACK: u64 = 8 << 20;

impl QemuEngine {
    /// [`Engine::stop`](crate::engine::Engine::stop): the VM's state goes to
    /// `vm.state`, then QEMU quits. On failure the VM keeps running.
    pub(super) async fn save_to_disk(&self, id: &str) -> Result<(), EngineError> {
        check_id(id)?;
        let files = VmFiles::new(self.sandbox_dir(id));
        let Some(vm) = self.vm(id) else {
            return if files.state.is_file() {
                Ok(())
            } else {
                Err(EngineError::NotFound(id.to_string()))
            };
        };
        if read_meta(&files.meta).is_some_and(|m| !m.argv.iter().any(|a| a.contains(DRIVE_OPTION)))
        {
            return Err(EngineError::State(format!(
                "VM {id} was started by an older bhatti whose QEMU options do not allow \
                 saving it to disk; it keeps running (recreate the sandbox to be able to stop it)"
            )));
        }
        let _busy = self.reserve(id)?;
        let started = Instant::now();
        let qmp = self.qmp_of(id).await?;
        let tmp = partial_state(&files);
        // A VM whose RAM is its own file saves device state only: the file
        // is its saved memory. A copy mapping a checkpoint's RAM privately
        // saves everything, and restarts with a RAM file of its own.
        let mut meta = read_meta(&files.meta);
        let backing = meta.as_ref().and_then(|m| process::mem_backing(&m.argv));
        let own_ram = backing
            .as_ref()
            .is_some_and(|(p, shared)| *shared && *p == files.ram);
        let saved = match self.write_state(&qmp, vm.pid, &tmp, own_ram).await {
            Ok(m) => std::fs::rename(&tmp, &files.state)
                .map(|()| m)
                .map_err(EngineError::from),
            Err(e) => Err(e),
        };
        if saved.is_ok() {
            if let Some(m) = meta.as_mut() {
                m.saved_ram_in_file = own_ram;
                if !own_ram {
                    let own = process::MemBacking {
                        path: &files.ram,
                        shared: true,
                    };
                    if let Some(argv) = process::with_mem_backing(&m.argv, own) {
                        m.argv = argv;
                    }
                }
                write_meta(&files.meta, m)?;
            }
        }
        let migration = match saved {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                // Undo the `stop`: the guest carries on as if nothing happened.
                if let Err(ce) = qmp.cont().await {
                    tracing::warn!(id, error = %ce, "cannot resume the VM after a failed save");
                }
                return Err(e);
            }
        };
        let saved_in = started.elapsed();
        // From here on the VM is stopped, whatever happens to its process.
        self.registry().remove(id);
        self.stop_qemu(Some(&vm), &files).await;
        if own_ram {
            let ram = files.ram.clone();
            blocking(move || std::fs::File::open(ram).and_then(|f| f.sync_data())).await??;
        } else if let Some((mapped, _)) = backing {
            self.release_read_holes(id, mapped).await;
        }
        // QEMU (as nobody) cannot remove these itself.
        let _ = std::fs::remove_file(&files.pidfile);
        let _ = std::fs::remove_file(&files.qmp);
        let size = std::fs::metadata(&files.state)
            .map(|m| m.len())
            .unwrap_or(0);
        tracing::info!(
            id,
            state_mib = size / (1024 * 1024),
            ram_mib = migration.ram.map_or(0, |r| r.total) / (1024 * 1024),
            save_ms = saved_in.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "VM saved to disk"
        );
        Ok(())
    }

    /// After a full save of a VM that mapped the checkpoint RAM file
    /// `mapped` privately: the save read every page through the mapping, so
    /// each hole of the file became a page of zeros. On disk (a template's
    /// RAM) they are dropped from the page cache; on the ramfs (a kept
    /// snapshot's RAM) the file is rewritten without them, for the next
    /// copies (docs/forks.md). Best effort: a failure costs memory only.
    async fn release_read_holes(&self, id: &str, mapped: PathBuf) {
        if !ramfile::is_ramfs(&mapped) {
            // QEMU's other threads may still hold its memory for a moment
            // after its main thread is a zombie, and mapped pages stay.
            let data = ramfile::allocated(&mapped);
            for _ in 0..40 {
                let m = mapped.clone();
                let left = blocking(move || {
                    ramfile::drop_cached_holes(&m)?;
                    ramfile::resident(&m)
                })
                .await;
                if !matches!(left, Ok(Ok(n)) if n > data + HOLE_SLACK) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::warn!(id, file = %mapped.display(), "zero pages a save read stay cached");
            return;
        }
        let Some(cp_dir) = mapped.file_stem().map(|s| self.checkpoints_dir().join(s)) else {
            return;
        };
        let m = mapped.clone();
        let r = blocking(move || {
            if !m.is_file() {
                return Ok(None); // a fork's, already gone
            }
            ramfile::compact(&m)
        })
        .await;
        match r {
            Ok(Ok(Some((before, after)))) => {
                // Deleted meanwhile: the rename must not bring it back.
                if !cp_dir.is_dir() {
                    let _ = std::fs::remove_file(&mapped);
                }
                tracing::info!(id, file = %mapped.display(), before_mib = before >> 20, after_mib = after >> 20, "checkpoint RAM compacted after a copy's full save");
            }
            Ok(Err(e)) => {
                tracing::warn!(id, file = %mapped.display(), error = %e, "cannot compact a checkpoint's RAM")
            }
            _ => {}
        }
    }

    /// Stops the vCPUs and migrates the VM into a new file at `path`;
    /// `ram_in_file`: its RAM is its own file, and only device state goes.
    async fn write_state(
        &self,
        qmp: &Qmp,
        pid: u32,
        path: &Path,
        ram_in_file: bool,
    ) -> Result<MigrationInfo, EngineError> {
        qmp.set_migrate_max_bandwidth(SAVE_BANDWIDTH)
            .await
            .map_err(save_err)?;
        qmp.set_ignore_shared(ram_in_file).await.map_err(save_err)?;
        let p = path.to_path_buf();
        let file = blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
        })
        .await??;
        qmp.stop().await.map_err(save_err)?;
        qmp.getfd(FD_NAME, file.as_fd()).await.map_err(save_err)?;
        qmp.migrate(&format!("fd:{FD_NAME}"))
            .await
            .map_err(save_err)?;
        let m = match wait_migration(qmp, pid, "saving").await {
            Ok(m) => m,
            Err(e) => {
                let _ = qmp.migrate_cancel().await;
                return Err(e);
            }
        };
        blocking(move || file.sync_all()).await??;
        Ok(m)
    }

    /// [`Engine::start`](crate::engine::Engine::start): QEMU with the VM's
    /// own argv plus `-incoming defer` loads `vm.state`, then the guest runs
    /// on and gets the current time.
    pub(super) async fn restore_from_disk(
        &self,
        id: &str,
        rt: &VmRuntime,
    ) -> Result<(), EngineError> {
        check_id(id)?;
        if let Some(vm) = self.vm(id) {
            if process::is_our_qemu(vm.pid, &vm.files.dir) {
                return Ok(());
            }
        }
        let files = VmFiles::new(self.sandbox_dir(id));
        if !files.state.is_file() {
            return Err(EngineError::State(format!(
                "sandbox {id} has no saved state to start from"
            )));
        }
        let meta = read_meta(&files.meta).ok_or_else(|| {
            EngineError::State(format!(
                "{} is missing or unreadable; the VM cannot be restored",
                files.meta.display()
            ))
        })?;
        let _busy = self.reserve(id)?;
        let started = Instant::now();

        // Exclusive use of overlay and TAP: no other QEMU of this sandbox may
        // run. One next to a state file never ran the guest since (see above).
        let dir = self.sandboxes_dir.clone();
        let stale: Vec<u32> = blocking(move || process::find_qemus_under(&dir))
            .await?
            .into_iter()
            .filter(|(_, i)| i == id)
            .map(|(pid, _)| pid)
            .collect();
        for pid in stale {
            tracing::warn!(
                id,
                pid,
                "killing a stale QEMU of a stopped VM before restoring it"
            );
            process::kill(pid);
            if !process::wait_exit(pid, Duration::from_secs(5)).await {
                return Err(EngineError::State(format!(
                    "a QEMU (pid {pid}) of sandbox {id} does not exit; cannot restore"
                )));
            }
        }

        let (net, tap, mac, ip) = (self.net.clone(), meta.tap.clone(), meta.mac.clone(), rt.ip);
        blocking(move || {
            if !network::base_present(&net) {
                network::ensure_base(&net)?;
            }
            network::ensure_tap(&net, &tap, ip, &mac)
        })
        .await?
        .map_err(net_err)?;
        self.install_firewall(&meta).await?;

        let _ = std::fs::remove_file(&files.pidfile);
        if !meta.saved_ram_in_file {
            // The stream carries the RAM; a stale RAM file would only take disk.
            let _ = std::fs::remove_file(&files.ram);
        }
        let mut argv = meta.argv.clone();
        argv.extend(["-incoming".to_string(), "defer".to_string()]);
        let pid = process::launch(&meta.qemu, &self.net.netns, &argv, &files.pidfile)
            .await
            .map_err(|e| EngineError::Boot {
                reason: format!("cannot start QEMU to restore the VM: {e}"),
                console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
            })?;
        let launched = started.elapsed();
        let qmp = match load_state_from(&files, &files.state, pid, meta.saved_ram_in_file).await {
            Ok(q) => q,
            Err(e) => {
                // The state file stays: the VM is still stopped and can be started again.
                process::kill(pid);
                process::wait_exit(pid, Duration::from_secs(5)).await;
                let _ = std::fs::remove_file(&files.pidfile);
                return Err(e);
            }
        };
        let loaded = started.elapsed();
        if !meta.saved_ram_in_file {
            page_out_holes_later(id, pid, &files.ram);
        }

        // The guest runs from here on and its disk moves ahead of the saved
        // memory: that state must never be loaded again.
        std::fs::remove_file(&files.state)?;
        let qmp = Arc::new(qmp);
        let vm = Arc::new(Vm {
            files: files.clone(),
            pid,
            ip: rt.ip,
            tap: meta.tap.clone(),
            qmp: tokio::sync::Mutex::new(Some(qmp.clone())),
        });
        self.registry().insert(id.to_string(), vm);
        qmp.cont().await.map_err(|e| EngineError::Boot {
            reason: format!("the restored VM does not resume: {e}"),
            console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
        })?;

        let dialer = NetnsDialer::new(self.sockets.clone(), rt.ip);
        match process::wait_ready(&dialer, rt.token.as_bytes(), pid, self.boot_timeout).await {
            Ok(()) => {}
            Err(NotReady::Died) => {
                return Err(EngineError::Boot {
                    reason: format!("QEMU (pid {pid}) exited right after the VM was restored"),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
            Err(NotReady::Timeout(last)) => {
                return Err(EngineError::Timeout {
                    secs: self.boot_timeout.as_secs(),
                    reason: format!(
                        "the restored VM's agent never answered (last attempt: {last})"
                    ),
                    console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
                })
            }
        }
        let ready = started.elapsed();
        // The guest's clock stood still while it was on disk.
        match crate::engine::Engine::agent(self, id, rt).set_time().await {
            Ok(lag_ms) => tracing::debug!(id, lag_ms, "restored guest's clock set"),
            Err(e) => tracing::warn!(id, error = %e, "cannot set the restored guest's clock"),
        }
        tracing::info!(
            id,
            pid,
            launch_ms = launched.as_millis() as u64,
            load_ms = (loaded - launched).as_millis() as u64,
            agent_ms = (ready - loaded).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "VM restored from disk"
        );
        Ok(())
    }
}

/// Writes a VM's record atomically (a crash leaves the old or the new one).
pub(super) fn write_meta(path: &Path, meta: &super::VmMeta) -> Result<(), EngineError> {
    let json = serde_json::to_vec_pretty(meta)
        .map_err(|e| EngineError::Internal(format!("VM record: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Loads the migration stream at `state` into the QEMU `pid` (of the VM
/// whose files are `files`), started with `-incoming defer`.
/// `device_only`: the stream was written with `x-ignore-shared` (RAM in a file).
pub(super) async fn load_state_from(
    files: &VmFiles,
    state: &Path,
    pid: u32,
    device_only: bool,
) -> Result<Qmp, EngineError> {
    {
        let boot_err = |reason: String| EngineError::Boot {
            reason,
            console_tail: process::console_tail(&files.console, CONSOLE_TAIL_LINES),
        };
        let qmp = Qmp::connect_retry(&files.qmp, Duration::from_secs(5))
            .await
            .map_err(|e| boot_err(e.to_string()))?;
        let p = state.to_path_buf();
        let file = blocking(move || std::fs::File::open(p)).await??;
        let load_err = |e: QmpError| boot_err(format!("loading the saved VM failed: {e}"));
        qmp.set_ignore_shared(device_only).await.map_err(load_err)?;
        qmp.getfd(FD_NAME, file.as_fd()).await.map_err(load_err)?;
        qmp.migrate_incoming(&format!("fd:{FD_NAME}"))
            .await
            .map_err(load_err)?;
        wait_migration(&qmp, pid, "loading")
            .await
            .map_err(|e| boot_err(e.to_string()))?;
        Ok(qmp)
    }
}

/// Polls `query-migrate` until the migration completed, failed, QEMU died
/// or [`MIGRATION_TIMEOUT`] passed.
pub(super) async fn wait_migration(
    qmp: &Qmp,
    pid: u32,
    what: &str,
) -> Result<MigrationInfo, EngineError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let m = match qmp.query_migrate().await {
            Ok(m) => m,
            Err(_) if !process::pid_alive(pid) => {
                return Err(EngineError::State(format!(
                    "QEMU (pid {pid}) exited while {what} the VM's state"
                )))
            }
            Err(e) => {
                return Err(EngineError::State(format!(
                    "{what} the VM's state: QEMU does not report progress: {e}"
                )))
            }
        };
        match m.status {
            Some(MigrationStatus::Completed) => return Ok(m),
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(EngineError::State(format!(
                    "{what} the VM's state failed: {}",
                    m.error_desc.as_deref().unwrap_or("QEMU gives no reason")
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(EngineError::State(format!(
                "{what} the VM's state did not finish within {} s (status {:?})",
                MIGRATION_TIMEOUT.as_secs(),
                m.status
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
